"""Prepared records -> batch-contract examples, skipping and counting bad records.

A record that cannot make an example (undecodable or missing image, empty or non-UTF-8 text,
no target left to learn) raises :class:`BadRecord` in its converter; :class:`RobustRecords`
then takes the next record instead and counts the skip per dataset and reason, so the data
stays random-access and deterministic and a bad record never crashes a run or yields NaN.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading

import grain
import numpy as np

from flamingo_jax.data import examples
from flamingo_jax.data.images import BadRecord, ImageConfig, decode_image, preprocess


class SkipCounts:
    """Thread-safe counts of skipped records, keyed 'skipped/<dataset>/<reason>'."""

    def __init__(self):
        self._counts = collections.Counter()
        self._lock = threading.Lock()

    def add(self, dataset: str, reason: str) -> None:
        with self._lock:
            self._counts[f"skipped/{dataset}/{reason}"] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


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


def _checked(example: dict) -> dict:
    if not example["loss_mask"].any():
        raise BadRecord("no_targets")
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
        ids = examples.SpecialIds(
            self.tokenizer.media_token_id, self.tokenizer.endofchunk_token_id, self.tokenizer.pad_id
        )
        caption_ids = self.tokenizer.encode(caption)[: self.length - 2]
        return _checked(examples.pair_example(caption_ids, image[None], ids=ids, length=self.length))


@dataclasses.dataclass(frozen=True)
class DocumentConverter:
    """An ``MMC4Documents`` record -> an interleaved example (images that fail to decode are
    dropped from the document and counted; a document left without images is skipped)."""

    tokenizer: object
    image_config: ImageConfig
    length: int = 256
    max_images: int = 5
    p_next: float = 0.5
    train: bool = True
    counts: SkipCounts | None = None
    name: str = ""

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        texts = json.loads(decode_text(record["texts"]))
        sentences = [self.tokenizer.encode(" " + t.strip() if i else t.strip()) for i, t in enumerate(texts)]
        images, matched = [], []
        for data, index in zip(record["images"], record["matched_text_index"], strict=True):
            try:
                if not 0 <= int(index) < len(sentences):
                    raise BadRecord("bad_match_index")
                images.append(preprocess(decode_image(data), self.image_config, rng if self.train else None)[None])
                matched.append(int(index))
            except BadRecord as error:
                if self.counts is not None:
                    self.counts.add(self.name, f"document_image/{error.reason}")
        if not images:
            raise BadRecord("no_images")
        ids = examples.SpecialIds(
            self.tokenizer.media_token_id, self.tokenizer.endofchunk_token_id, self.tokenizer.pad_id
        )
        example = examples.interleaved_example(
            sentences,
            images,
            matched,
            ids=ids,
            rng=rng,
            length=self.length,
            max_images=self.max_images,
            p_next=self.p_next,
        )
        if example is None:
            raise BadRecord("no_images_in_window")
        return _checked(example)


class RobustRecords(grain.MapDataset):
    """Example ``i`` = converter(record i), or of the next good record; skips are counted.

    The converter's randomness comes from ``(seed, i)``, so an example is reproducible
    from its index alone (what makes resumption exact).
    """

    def __init__(self, source, converter, *, name: str, seed: int, counts: SkipCounts, max_skips: int = 64):
        super().__init__([])
        self._source, self._converter = source, converter
        self._name, self._seed, self._counts, self._max_skips = name, seed, counts, max_skips

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        size = len(self._source)
        for offset in range(self._max_skips + 1):
            record = self._source[(index + offset) % size]
            try:
                return self._converter(record, np.random.default_rng((self._seed, index, offset)))
            except BadRecord as error:
                self._counts.add(self._name, error.reason)
        raise RuntimeError(
            f"dataset {self._name!r}: {self._max_skips + 1} consecutive bad records from index {index}; "
            f"skip counts so far: {self._counts.snapshot()}"
        )
