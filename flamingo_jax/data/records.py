"""Prepared records -> batch-contract examples, skipping and counting bad records.

A record that cannot make an example (undecodable or missing image or video, empty or non-UTF-8
text, no target left to learn) raises :class:`BadRecord` in its converter; :class:`RobustRecords`
then takes the next record instead, so the data stays random-access and deterministic and a bad
record never crashes a run or yields NaN.

The reasons travel *with the data*: every example carries the list of what was skipped to make
it under ``SKIPPED`` (records passed over, images dropped from a document). The mixture sums
them per dataset and reason, so the counts are right with decoding worker processes and are
restored exactly with the iterator state.
"""

from __future__ import annotations

import dataclasses
import json

import grain
import numpy as np

from flamingo_jax.data import examples
from flamingo_jax.data.images import BadRecord, ImageConfig, decode_image, preprocess
from flamingo_jax.data.video import decode_clip, preprocess_clip

SKIPPED = "_skipped"


def pop_skipped(example: dict) -> list[str]:
    """Removes and returns the skip reasons an example carries (see the module docstring)."""
    return list(example.pop(SKIPPED, ()))


def decode_text(data: bytes | str) -> str:
    if isinstance(data, str):
        text = data
    else:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRecord("bad_text", "not UTF-8") from None
    text = text.strip()
    if not text:
        raise BadRecord("empty_text")
    return text


def _special_ids(tokenizer) -> examples.SpecialIds:
    return examples.SpecialIds(tokenizer.media_token_id, tokenizer.endofchunk_token_id, tokenizer.pad_id)


def _checked(example: dict, skipped: list[str] | None = None) -> dict:
    if not example["loss_mask"].any():
        raise BadRecord("no_targets", also=tuple(skipped or ()))
    example[SKIPPED] = list(skipped or ())
    return example


@dataclasses.dataclass(frozen=True)
class PairConverter:
    """A ``WebdatasetPairs`` record -> ``<image>caption<|endofchunk|>``."""

    tokenizer: object
    image_config: ImageConfig
    length: int
    train: bool = True

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        caption = decode_text(record["caption"])
        image = preprocess(decode_image(record["image"]), self.image_config, rng if self.train else None)
        caption_ids = self.tokenizer.encode(caption)[: self.length - 2]
        return _checked(
            examples.pair_example(caption_ids, image[None], ids=_special_ids(self.tokenizer), length=self.length)
        )


@dataclasses.dataclass(frozen=True)
class DocumentConverter:
    """An ``MMC4Documents`` record -> an interleaved example (images that fail to decode are
    dropped from the document and counted; a document left without images is skipped). A record
    may carry ``text_weights``, a loss factor per text (``examples.interleaved_example``'s
    ``sentence_weights``)."""

    tokenizer: object
    image_config: ImageConfig
    length: int = 256
    max_images: int = 5
    p_next: float = 0.5
    train: bool = True

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        texts = json.loads(decode_text(record["texts"]))
        sentences = [self.tokenizer.encode(" " + t.strip() if i else t.strip()) for i, t in enumerate(texts)]
        images, matched, skipped = [], [], []
        for data, index in zip(record["images"], record["matched_text_index"], strict=True):
            try:
                if not 0 <= int(index) < len(sentences):
                    raise BadRecord("bad_match_index")
                images.append(preprocess(decode_image(data), self.image_config, rng if self.train else None)[None])
                matched.append(int(index))
            except BadRecord as error:
                skipped.append(f"document_image/{error.reason}")
        if not images:
            raise BadRecord("no_images", also=tuple(skipped))
        weights = record.get("text_weights")  # optional: a loss factor per text
        if weights is not None and len(weights) != len(sentences):
            raise BadRecord("bad_text_weights", also=tuple(skipped))
        example = examples.interleaved_example(
            sentences,
            images,
            matched,
            ids=_special_ids(self.tokenizer),
            rng=rng,
            length=self.length,
            max_images=self.max_images,
            p_next=self.p_next,
            sentence_weights=None if weights is None else [float(w) for w in weights],
        )
        if example is None:
            raise BadRecord("no_images_in_window", also=tuple(skipped))
        return _checked(example, skipped)


class RobustRecords(grain.MapDataset):
    """Example ``i`` = converter(record i), or of the next good record; the reasons of the
    records passed over are added to the example's ``SKIPPED`` list.

    The converter's randomness comes from ``(seed, i)``, so an example is reproducible
    from its index alone (what makes resumption exact).
    """

    def __init__(self, source, converter, *, name: str, seed: int, max_skips: int = 64):
        super().__init__([])
        self._source, self._converter = source, converter
        self._name, self._seed, self._max_skips = name, seed, max_skips

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        size = len(self._source)
        passed_over = []
        for offset in range(self._max_skips + 1):
            record = self._source[(index + offset) % size]
            try:
                example = self._converter(record, np.random.default_rng((self._seed, index, offset)))
            except BadRecord as error:
                passed_over.extend((error.reason, *error.also))
                continue
            example[SKIPPED] = passed_over + example.get(SKIPPED, [])
            return example
        raise RuntimeError(
            f"dataset {self._name!r}: {self._max_skips + 1} consecutive bad records from index {index} "
            f"(reasons: {sorted(set(passed_over))}); is the data at its path the right format?"
        )


@dataclasses.dataclass(frozen=True)
class VideoConverter:
    """A ``VideoCaptions`` record -> ``<image>caption<|endofchunk|>`` whose one media slot holds
    ``num_frames`` frames sampled at ``fps`` (Flamingo's VTP: 8 frames at 1 FPS)."""

    tokenizer: object
    image_config: ImageConfig
    length: int
    num_frames: int = 8
    fps: float = 1.0
    train: bool = True

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        caption = decode_text(record["caption"])
        frames = decode_clip(record["video"], num_frames=self.num_frames, fps=self.fps, rng=rng if self.train else None)
        clip = preprocess_clip(frames, self.image_config, rng if self.train else None)
        caption_ids = self.tokenizer.encode(caption)[: self.length - 2]
        return _checked(examples.pair_example(caption_ids, clip, ids=_special_ids(self.tokenizer), length=self.length))
