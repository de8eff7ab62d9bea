"""The weighted dataset mixture: every step takes one batch from *each* dataset.

Flamingo accumulates the weighted gradients of all datasets at every step (Section 3, "Training
on a mixture of vision and language datasets"; round-robin was 7.8 points worse). The mixture
is a random-access grain dataset indexed by step, so its iterator state is a position that
checkpoints and resumes exactly. Each JAX process reads only its own shard of every dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import grain
import numpy as np

from flamingo_jax.data import synthetic

SOURCES = ("synthetic", "webdataset", "mmc4")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """One dataset of the mixture: its global batch size per step and loss weight.

    ``source``: 'synthetic' (generated, see ``synthetic``), 'webdataset' (image-text pair tar
    shards at ``path``) or 'mmc4' (interleaved jsonl + images at ``path``). Real sources are
    prepared once into ArrayRecord under ``data_dir`` (default ``<path>/tfds``) and produce
    sequences of ``length`` tokens with up to ``max_images`` images.
    """

    name: str
    batch_size: int
    loss_weight: float = 1.0
    source: str = "synthetic"
    synthetic: synthetic.SyntheticConfig = synthetic.SyntheticConfig()
    num_examples: int = 10_000
    path: str | None = None
    data_dir: str | None = None
    length: int = 256
    max_images: int = 5
    p_next: float = 0.5
    augment: bool = True

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"DatasetConfig {self.name!r}: batch_size must be positive, got {self.batch_size}")
        if self.loss_weight < 0:
            raise ValueError(f"DatasetConfig {self.name!r}: loss_weight must be >= 0, got {self.loss_weight}")
        if self.source not in SOURCES:
            raise ValueError(f"DatasetConfig {self.name!r}: unknown source {self.source!r}; available: {list(SOURCES)}")
        if self.source != "synthetic" and (not self.path or not os.path.exists(self.path)):
            raise FileNotFoundError(
                f"DatasetConfig {self.name!r}: source {self.source!r} needs an existing path, got {self.path!r}"
            )


@dataclasses.dataclass(frozen=True)
class TokenIds:
    vocab_size: int
    media_token_id: int
    endofchunk_token_id: int


def _collate(examples):
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def _real_examples(config: DatasetConfig, tokenizer, image_size: int, seed: int, counts):
    """Random-access examples of a real source (built into ArrayRecord on first use)."""
    from flamingo_jax.data import builders, records
    from flamingo_jax.data.images import ImageConfig

    if tokenizer is None:
        raise ValueError(
            f"DatasetConfig {config.name!r}: source {config.source!r} needs a tokenizer (RunConfig.tokenizer)"
        )
    counts = counts if counts is not None else records.SkipCounts()
    builder_cls = {"webdataset": builders.WebdatasetPairs, "mmc4": builders.MMC4Documents}[config.source]
    data_dir = config.data_dir or os.path.join(config.path, "tfds")
    source = builders.prepare(builder_cls, source=config.path, data_dir=data_dir).as_data_source("train")
    image_config = ImageConfig(image_size=image_size)
    if config.source == "webdataset":
        converter = records.PairConverter(tokenizer, image_config, config.length, train=config.augment)
    else:
        converter = records.DocumentConverter(
            tokenizer,
            image_config,
            config.length,
            config.max_images,
            config.p_next,
            train=config.augment,
            counts=counts,
            name=config.name,
        )
    return records.RobustRecords(source, converter, name=config.name, seed=seed, counts=counts)


def dataset_stream(
    config: DatasetConfig,
    token_ids: TokenIds,
    *,
    seed: int,
    process_index: int,
    process_count: int,
    tokenizer=None,
    image_size: int = 224,
    counts=None,
) -> grain.MapDataset:
    """This process's part of each global batch of one dataset, indexed by step (infinite,
    reshuffled each epoch).

    The global batch of a step is the same whatever the number of processes (so runs and
    resumptions on other topologies see the same data); each process builds only its
    ``batch_size / process_count`` rows of it.
    """
    if config.batch_size % process_count:
        raise ValueError(
            f"DatasetConfig {config.name!r}: batch_size={config.batch_size} is not divisible by the "
            f"{process_count} JAX processes"
        )
    if config.source == "synthetic":
        make = functools.partial(
            synthetic.make_example,
            config=config.synthetic,
            vocab_size=token_ids.vocab_size,
            media_token_id=token_ids.media_token_id,
            endofchunk_token_id=token_ids.endofchunk_token_id,
        )
        size = config.num_examples
    else:
        examples = _real_examples(config, tokenizer, image_size, seed, counts)
        make, size = examples.__getitem__, len(examples)
    local = config.batch_size // process_count
    first = process_index * local
    global_batches = grain.MapDataset.range(size).shuffle(seed=seed).repeat(None).batch(config.batch_size)
    return global_batches.map(lambda indices: _collate([make(int(i)) for i in indices[first : first + local]]))


class _StepBatches(grain.MapDataset):
    """Step ``i`` -> {dataset name: that dataset's i-th batch}."""

    def __init__(self, streams: dict[str, grain.MapDataset]):
        super().__init__(list(streams.values()))
        self._streams = streams

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index):
        return {name: stream[index] for name, stream in self._streams.items()}


def mixture_dataset(
    datasets: tuple[DatasetConfig, ...],
    token_ids: TokenIds,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer=None,
    image_size: int = 224,
    counts=None,
) -> grain.MapDataset:
    """{name: this process's rows of the step's batch} for every step; real sources need the
    ``tokenizer``, the model's ``image_size`` and a ``counts`` (SkipCounts) for skipped records."""
    names = [config.name for config in datasets]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"mixture dataset names must be unique and non-empty, got {names}")
    streams = {
        config.name: dataset_stream(
            config,
            token_ids,
            seed=seed + 1000 * position,
            process_index=process_index,
            process_count=process_count,
            tokenizer=tokenizer,
            image_size=image_size,
            counts=counts,
        )
        for position, config in enumerate(datasets)
    }
    return _StepBatches(streams)


def mixture_iterator(dataset: grain.MapDataset, *, prefetch_threads: int = 0):
    """A checkpointable iterator (``get_state`` / ``set_state``) over the step batches."""
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=2)))
