"""Turning decoded records into examples of the batch contract: one place per kind.

* Interleaved documents (M3W / MMC4 / OBELICS): each image is placed before or after the text
  it belongs to (before with probability p_next, Flamingo Appendix A.3.3), chunks end with
  ``<|endofchunk|>``, then a random window of ``length`` tokens keeps up to ``max_images``
  images (Flamingo Section 3: L = 256, N = 5).
* Image-text pairs (ALIGN / LTIP / LAION): ``<image>caption<|endofchunk|>``, optionally several
  packed into one sequence.
* Video-text pairs (VTP): ``num_frames`` frames sampled at 1 FPS.

Every example is a dict of numpy arrays without the batch dimension.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    media: int
    endofchunk: int
    pad: int


def image_index_for(tokens: np.ndarray, media_id: int) -> np.ndarray:
    """int32[T]: the media slot of the last ``<image>`` at or before each token, -1 before any."""
    return (np.cumsum(tokens == media_id) - 1).astype(np.int32)


def loss_mask_for(tokens: np.ndarray, ids: SpecialIds) -> np.ndarray:
    """float32[T]; entry t weights predicting ``tokens[t + 1]`` (the batch contract).

    As OpenFlamingo trains: no loss on targets up to and including the first ``<image>``, none on
    ``<image>`` or padding, none on text between an ``<|endofchunk|>`` and the next ``<image>``
    (text with no image of its own); the ``<|endofchunk|>`` targets themselves count.
    """
    length = len(tokens)
    counted = np.zeros(length, bool)
    seen_image = False
    in_chunk = False
    for position, token in enumerate(tokens):
        if token == ids.media:
            seen_image, in_chunk = True, True
            continue
        if token == ids.pad:
            continue
        if seen_image and in_chunk:
            counted[position] = True
        if token == ids.endofchunk:
            in_chunk = False
    mask = np.zeros(length, np.float32)
    mask[:-1] = counted[1:]
    return mask


def _finish(
    tokens: list[int],
    images: list[np.ndarray],
    length: int,
    num_media: int,
    ids: SpecialIds,
    frame_shape,
    target_weights: list[float] | None = None,
):
    """``target_weights``: a factor per token of ``tokens`` on the loss of predicting it."""
    token_array = np.full(length, ids.pad, np.int32)
    token_array[: len(tokens)] = tokens[:length]
    media = np.zeros((num_media, *frame_shape), np.float32)
    image_mask = np.zeros(num_media, bool)
    for slot, image in enumerate(images[:num_media]):
        media[slot] = image
        image_mask[slot] = True
    index = image_index_for(token_array, ids.media)
    loss_mask = loss_mask_for(token_array, ids)
    if target_weights is not None:
        factors = np.ones(length, np.float32)
        factors[: len(tokens)] = target_weights[:length]
        loss_mask[:-1] *= factors[1:]
    return {
        "tokens": token_array,
        "images": media,
        "image_mask": image_mask,
        "image_index": index,
        "loss_mask": loss_mask,
    }


def interleaved_example(
    sentences: list[list[int]],
    images: list[np.ndarray],
    matched_sentence: list[int],
    *,
    ids: SpecialIds,
    rng: np.random.Generator,
    length: int = 256,
    max_images: int = 5,
    p_next: float = 0.5,
    sentence_weights: list[float] | None = None,
) -> dict | None:
    """An interleaved document -> one example, or None when no image survives the window.

    Args:
      sentences: token ids of each text segment, in document order.
      images: float[F, H, W, C] per image.
      matched_sentence: for each image, the index of the sentence it belongs to.
      sentence_weights: a factor per sentence on the loss of its tokens and of the
        ``<|endofchunk|>`` that closes it (e.g. 0 for a label no earlier text could predict).
    """
    before = {index: [] for index in range(len(sentences))}
    after = {index: [] for index in range(len(sentences))}
    for image, sentence in enumerate(matched_sentence):
        (before if rng.random() < p_next else after)[sentence].append(image)
    stream: list[int] = []  # tokens, with -(image + 1) standing for the <image> of that image
    weights: list[float] = []  # the loss factor of each entry of stream
    weight_of = (lambda index: 1.0) if sentence_weights is None else (lambda index: float(sentence_weights[index]))
    for index, sentence in enumerate(sentences):
        for image in before[index]:
            stream.append(-(image + 1))
        stream.extend(sentence)
        for image in after[index]:
            stream.append(-(image + 1))
        weights.extend([weight_of(index)] * (len(before[index]) + len(sentence) + len(after[index])))
    # <|endofchunk|> closes the text of each image: before every <image> but the first, and at
    # the end of the document; it weighs as the text it closes.
    with_chunks: list[int] = []
    chunk_weights: list[float] = []
    last_text_weight = 1.0
    for token, weight in zip(stream, weights, strict=True):
        if token < 0 and any(t < 0 for t in with_chunks):
            with_chunks.append(ids.endofchunk)
            chunk_weights.append(last_text_weight)
        with_chunks.append(token)
        chunk_weights.append(weight)
        if token >= 0:
            last_text_weight = weight
    with_chunks.append(ids.endofchunk)
    chunk_weights.append(last_text_weight)

    if len(with_chunks) > length:
        # A random window, started at an <image> when possible so the window has one early.
        starts = [i for i, t in enumerate(with_chunks[: len(with_chunks) - length + 1]) if t < 0]
        if starts and rng.random() < 0.5:
            start = int(rng.choice(starts))
        else:
            start = int(rng.integers(0, len(with_chunks) - length + 1))
        with_chunks = with_chunks[start : start + length]
        chunk_weights = chunk_weights[start : start + length]
    kept: list[int] = []
    tokens: list[int] = []
    for token in with_chunks:
        if token < 0:
            if len(kept) == max_images:
                break  # the window ends before a further image: its text would see the wrong one
            kept.append(-token - 1)
            tokens.append(ids.media)
        else:
            tokens.append(token)
    if not kept:
        return None
    target_weights = None if sentence_weights is None else chunk_weights[: len(tokens)]
    return _finish(tokens, [images[i] for i in kept], length, max_images, ids, images[0].shape, target_weights)


def pair_example(caption: list[int], image: np.ndarray, *, ids: SpecialIds, length: int) -> dict:
    """``<image>caption<|endofchunk|>``, truncated to ``length``."""
    return pack_pairs([(caption, image)], ids=ids, length=length, max_images=1)


def pack_pairs(pairs, *, ids: SpecialIds, length: int, max_images: int) -> dict:
    """Several ``(caption ids, image)`` pairs in one sequence; each caption attends to its own
    image (its ``<image>`` restarts the image index). Pairs that do not fit are left out."""
    tokens: list[int] = []
    images = []
    for caption, image in pairs:
        chunk = [ids.media, *caption, ids.endofchunk]
        if images and (len(tokens) + len(chunk) > length or len(images) == max_images):
            break
        tokens.extend(chunk[:length])
        images.append(image)
    return _finish(tokens[:length], images, length, max_images, ids, images[0].shape)


def sample_frame_indices(num_source_frames: int, source_fps: float, *, num_frames: int = 8, fps: float = 1.0, rng=None):
    """Indices of ``num_frames`` frames ``1/fps`` seconds apart (Flamingo: 8 frames at 1 FPS),
    from a random start when the clip is longer; clips too short repeat their last frame."""
    if num_source_frames <= 0:
        raise ValueError("a video with no frames")
    step = source_fps / fps
    span = step * (num_frames - 1)
    latest_start = max(num_source_frames - 1 - span, 0.0)
    start = float(rng.uniform(0, latest_start)) if rng is not None and latest_start > 0 else 0.0
    indices = np.round(start + step * np.arange(num_frames)).astype(np.int64)
    return np.minimum(indices, num_source_frames - 1)
