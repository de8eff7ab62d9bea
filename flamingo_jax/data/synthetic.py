"""A generated interleaved image-text dataset that a model can actually learn from.

Each example holds ``num_media`` images; image ``k`` shows one of ``num_classes`` colour
patterns, and its caption names the class (tokens derived from it). Predicting the caption
therefore requires looking at the image: a falling loss means the cross-attention works.
Deterministic in (seed, index); nothing is read from disk.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    num_media: int = 2
    image_size: int = 16
    channels: int = 3
    length: int = 24
    num_classes: int = 8
    caption_length: int = 3
    seed: int = 0


def class_image(label: int, num_classes: int, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """float32[size, size, channels]: a colour given by ``label`` in one quadrant, plus noise."""
    image = rng.normal(0.0, 0.3, (size, size, channels)).astype(np.float32)
    colour = np.cos(np.arange(channels) * 2.0 + label * 2 * np.pi / num_classes)
    half = size // 2
    row, col = divmod(label % 4, 2)
    image[row * half : (row + 1) * half, col * half : (col + 1) * half] += 1.5 * colour
    return image


def make_example(
    index: int, config: SyntheticConfig, *, vocab_size: int, media_token_id: int, endofchunk_token_id: int
):
    """One example as a dict of numpy arrays following the batch contract (without batch dim)."""
    rng = np.random.default_rng((config.seed, index))
    tokens = np.full(config.length, PAD_ID, np.int32)
    image_index = np.full(config.length, -1, np.int32)
    images = np.zeros((config.num_media, 1, config.image_size, config.image_size, config.channels), np.float32)
    position = int(rng.integers(0, 3))
    tokens[:position] = rng.integers(1, vocab_size, position)  # some text before the first image
    for slot in range(config.num_media):
        label = int(rng.integers(config.num_classes))
        images[slot, 0] = class_image(label, config.num_classes, config.image_size, config.channels, rng)
        # Caption tokens are a function of the label: 1 + label * caption_length + j.
        caption = 1 + label * config.caption_length + np.arange(config.caption_length)
        chunk = [media_token_id, *caption.tolist(), endofchunk_token_id]
        if position + len(chunk) > config.length:
            raise ValueError(f"SyntheticConfig.length={config.length} is too short for {config.num_media} captions")
        tokens[position : position + len(chunk)] = chunk
        image_index[position:] = slot
        position += len(chunk)
    image_index[position:] = -1 if position == 0 else image_index[position - 1]
    # loss_mask[t] weights predicting tokens[t + 1]: after the first image, not <image>, not padding.
    following = np.append(tokens[1:], PAD_ID)
    loss_mask = ((image_index >= 0) & (following != PAD_ID) & (following != media_token_id)).astype(np.float32)
    return {
        "tokens": tokens,
        "images": images,
        "image_mask": np.ones(config.num_media, bool),
        "image_index": image_index,
        "loss_mask": loss_mask,
    }
