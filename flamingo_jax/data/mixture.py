"""The weighted dataset mixture: every step takes one batch from *each* dataset.

Flamingo accumulates the weighted gradients of all datasets at every step (Section 3, "Training
on a mixture of vision and language datasets"; round-robin was 7.8 points worse). The mixture
is a random-access grain dataset indexed by step, so its iterator state is a position that
checkpoints and resumes exactly. Each JAX process reads only its own shard of every dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

import grain
import jax
import numpy as np

from flamingo_jax.data import builders, records, synthetic
from flamingo_jax.data.images import ImageConfig
from flamingo_jax.data.sources import SOURCES, SYNTHETIC

STRATEGIES = ("accumulate", "sample")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """One dataset of the mixture: its global batch size per step and its weight.

    ``source``: 'synthetic' (generated, see ``synthetic``) or a registered source of
    ``sources.SOURCES``: 'webdataset' (pair tar shards at ``path``), 'mmc4' (interleaved jsonl +
    images at ``path``), 'obelics' (interleaved parquet at ``path``), 'video' (videos + captions
    at ``path``), or a project's (sources reading packaged data default their ``path``). Real
    sources are prepared once into ArrayRecord under ``data_dir`` (default: a folder per source,
    path and options under ``$FLAMINGO_JAX_DATA`` or ``~/.cache/flamingo_jax/tfds``), read from
    ``split``, and produce sequences of ``length`` tokens with up to ``max_images`` images; video
    sources give ``num_frames`` frames at ``fps``. ``options`` are extra builder arguments
    (``image_dir``, a project's builder's own).

    ``loss_weight`` is the dataset's weight in the step's loss under the 'accumulate' strategy
    and its sampling weight under 'sample' (see ``mixture_dataset``).

    ``unique_rows`` > 0: the frozen LM layers below the first cross-attention block run once per
    distinct token row of a batch (up to this many; all rows when there are more). Exact; for
    templated text (pairs whose captions come from a few templates). Best on one host: finding
    the distinct rows gathers the dataset's global batch of tokens.

    ``target_capacity`` > 0: the LM head and the loss run at no more than this many positions per
    row, those ``loss_mask`` selects (in order), instead of at every position. Exact: a batch with
    a row of more targets computes them all. Pays where many positions carry no loss (padding,
    images, prompts in instruction tuning); the batch stays sharded as it is.
    """

    name: str
    batch_size: int
    loss_weight: float = 1.0
    source: str = "synthetic"
    synthetic: synthetic.SyntheticConfig = synthetic.SyntheticConfig()
    num_examples: int = 10_000
    path: str | None = None
    data_dir: str | None = None
    split: str = "train"
    options: dict = dataclasses.field(default_factory=dict)
    length: int = 256
    max_images: int = 5
    p_next: float = 0.5
    num_frames: int = 8
    fps: float = 1.0
    augment: bool = True
    unique_rows: int = 0
    target_capacity: int = 0

    def __post_init__(self):
        for field in ("unique_rows", "target_capacity"):
            if getattr(self, field) < 0:
                raise ValueError(f"DatasetConfig {self.name!r}: {field} must be >= 0, got {getattr(self, field)}")
        if self.batch_size <= 0:
            raise ValueError(f"DatasetConfig {self.name!r}: batch_size must be positive, got {self.batch_size}")
        if self.loss_weight < 0:
            raise ValueError(f"DatasetConfig {self.name!r}: loss_weight must be >= 0, got {self.loss_weight}")
        if self.source != SYNTHETIC and self.source not in SOURCES:
            raise ValueError(f"DatasetConfig {self.name!r}: {SOURCES.unknown(self.source)} (or 'synthetic')")

    def check_path(self) -> None:
        """Raises FileNotFoundError naming the dataset when its source data is missing. Not done at
        construction, so that configs parse (and plan) on machines without the data."""
        needs_path = self.source != SYNTHETIC and SOURCES[self.source].needs_path
        if needs_path and (not self.path or not os.path.exists(self.path)):
            raise FileNotFoundError(
                f"DatasetConfig {self.name!r}: source {self.source!r} needs an existing path, got {self.path!r}"
            )
        if self.path and not os.path.exists(self.path):
            raise FileNotFoundError(f"DatasetConfig {self.name!r}: path {self.path!r} does not exist")

    def __hash__(self):  # options is a dict; gin needs configs hashable
        return hash((self.name, self.source, self.path, self.split, json.dumps(self.options, sort_keys=True)))


@dataclasses.dataclass(frozen=True)
class TokenIds:
    vocab_size: int
    media_token_id: int
    endofchunk_token_id: int


def _collate(examples: list[dict]) -> dict:
    """Stacks examples; their skip reasons become ``{reason: count}`` under ``records.SKIPPED``."""
    skipped: dict[str, int] = {}
    for example in examples:
        for reason in records.pop_skipped(example):
            skipped[reason] = skipped.get(reason, 0) + 1
    batch = {key: np.stack([example[key] for example in examples]) for key in examples[0]}
    batch[records.SKIPPED] = skipped
    return batch


def _prepared_source(config: DatasetConfig):
    """The dataset's ArrayRecord data source, built on first use (by process 0 first when
    several JAX processes share the folder)."""
    config.check_path()
    options = dict(config.options)
    source = SOURCES[config.source]
    path = config.path or (source.default_path() if source.default_path else None)
    data_dir = config.data_dir or builders.default_data_dir(config.source, path, options)
    prepare = functools.partial(builders.prepare, source.builder, source=path, data_dir=data_dir, **options)
    first = jax.process_index() == 0
    if first:
        builder = prepare()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"prepare {config.name}")
    if not first:
        builder = prepare()  # finds process 0's data on a shared folder, else builds its own
    if config.split not in builder.info.splits:
        raise ValueError(
            f"DatasetConfig {config.name!r}: split {config.split!r} not in {list(builder.info.splits)} "
            f"of source {config.source!r}"
        )
    return builder.as_data_source(config.split)


def _real_examples(config: DatasetConfig, tokenizer, image_config, seed: int):
    """Random-access examples of a real source; bad records are skipped (reasons carried)."""
    if tokenizer is None:
        raise ValueError(
            f"DatasetConfig {config.name!r}: source {config.source!r} needs a tokenizer (RunConfig.tokenizer)"
        )
    kind = SOURCES[config.source].kind
    if kind == "pairs":
        converter = records.PairConverter(tokenizer, image_config, config.length, train=config.augment)
    elif kind == "video":
        converter = records.VideoConverter(
            tokenizer, image_config, config.length, config.num_frames, config.fps, train=config.augment
        )
    else:
        converter = records.DocumentConverter(
            tokenizer, image_config, config.length, config.max_images, config.p_next, train=config.augment
        )
    return records.RobustRecords(_prepared_source(config), converter, name=config.name, seed=seed)


def dataset_stream(
    config: DatasetConfig,
    token_ids: TokenIds,
    *,
    seed: int,
    process_index: int,
    process_count: int,
    tokenizer=None,
    image_size: int = 224,
    image_config=None,
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
    if config.source == SYNTHETIC:
        make = functools.partial(
            synthetic.make_example,
            config=config.synthetic,
            vocab_size=token_ids.vocab_size,
            media_token_id=token_ids.media_token_id,
            endofchunk_token_id=token_ids.endofchunk_token_id,
        )
        size = config.num_examples
    else:
        examples = _real_examples(config, tokenizer, image_config or ImageConfig(image_size=image_size), seed)
        make, size = examples.__getitem__, len(examples)
    local = config.batch_size // process_count
    first = process_index * local
    global_batches = grain.MapDataset.range(size).shuffle(seed=seed).repeat(None).batch(config.batch_size)
    return global_batches.map(lambda indices: _collate([make(int(i)) for i in indices[first : first + local]]))


class _StepBatches(grain.MapDataset):
    """Step ``i`` -> {dataset name: that dataset's i-th batch} (the 'accumulate' strategy)."""

    def __init__(self, streams: dict[str, grain.MapDataset]):
        super().__init__(list(streams.values()))
        self._streams = streams

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return {name: stream[index] for name, stream in self._streams.items()}

    def first(self) -> dict:
        """{name: the first batch of every dataset}, skip counts removed (for shapes)."""
        return split_skipped({name: stream[0] for name, stream in self._streams.items()})[0]


class _SampledSteps(_StepBatches):
    """Step ``i`` -> {name: next batch of one dataset drawn with probability proportional to
    its weight} (the 'sample' strategy). Draws are seeded per block of steps and each dataset's
    position is the number of earlier draws of it, so any step is computed directly."""

    BLOCK = 4096

    def __init__(self, streams: dict[str, grain.MapDataset], weights: list[float], seed: int):
        super().__init__(streams)
        self._names = list(streams)
        total = float(sum(weights))
        if total <= 0:
            raise ValueError("the 'sample' strategy needs a positive loss_weight on some dataset")
        self._probabilities = np.asarray(weights, np.float64) / total
        self._seed = seed
        self._starts = [np.zeros(len(self._names), np.int64)]  # draws per dataset before each block

    def _block(self, block: int) -> np.ndarray:
        rng = np.random.default_rng((self._seed, block))
        return rng.choice(len(self._names), size=self.BLOCK, p=self._probabilities)

    def choice(self, index: int) -> tuple[str, int]:
        """(dataset name, its batch position) of step ``index``."""
        block, offset = divmod(index, self.BLOCK)
        if len(self._starts) <= block:  # built aside, then swapped in: safe with reader threads
            starts = list(self._starts)
            while len(starts) <= block:
                counts = np.bincount(self._block(len(starts) - 1), minlength=len(self._names))
                starts.append(starts[-1] + counts)
            self._starts = starts
        draws = self._block(block)
        chosen = int(draws[offset])
        return self._names[chosen], int(self._starts[block][chosen] + np.sum(draws[:offset] == chosen))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        name, position = self.choice(index)
        return {name: self._streams[name][position]}


def mixture_dataset(
    datasets: tuple[DatasetConfig, ...],
    token_ids: TokenIds,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer=None,
    image_size: int = 224,
    image_config=None,
    strategy: str = "accumulate",
) -> grain.MapDataset:
    """{name: this process's rows of the step's batch}, indexed by step.

    ``strategy='accumulate'`` (the paper's): every step holds a batch of *every* dataset and the
    train step accumulates their gradients weighted by ``loss_weight``. ``'sample'``: every step
    holds the batch of one dataset, drawn with probability proportional to ``loss_weight`` (the
    alternative the paper compares against). Each batch carries its skipped-record counts under
    ``records.SKIPPED``; ``MixtureIterator`` takes them out. Real sources need the
    ``tokenizer`` and the model's ``image_size`` (or a full ``image_config``: size and pixel
    normalisation, see ``images.image_config_for``).
    """
    names = [config.name for config in datasets]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"mixture dataset names must be unique and non-empty, got {names}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown mixture strategy {strategy!r}; available: {list(STRATEGIES)}")
    streams = {
        config.name: dataset_stream(
            config,
            token_ids,
            seed=seed + 1000 * position,
            process_index=process_index,
            process_count=process_count,
            tokenizer=tokenizer,
            image_size=image_size,
            image_config=image_config,
        )
        for position, config in enumerate(datasets)
    }
    if strategy == "sample":
        return _SampledSteps(streams, [config.loss_weight for config in datasets], seed)
    return _StepBatches(streams)


def split_skipped(item: dict) -> tuple[dict, dict[str, int]]:
    """A mixture item -> ({name: batch fields}, {'skipped/<name>/<reason>': count})."""
    batches, skipped = {}, {}
    for name, batch in item.items():
        batch = dict(batch)
        for reason, count in batch.pop(records.SKIPPED, {}).items():
            skipped[f"skipped/{name}/{reason}"] = count
        batches[name] = batch
    return batches, skipped


class MixtureIterator:
    """Iterates the mixture's steps (optionally decoded in ``workers`` processes) and sums the
    skipped-record counts; ``get_state`` / ``set_state`` (what the checkpoint stores) cover both
    the data position and the counts, so a resumed run continues exactly.

    With workers, restore with the same number of workers.
    """

    def __init__(self, dataset: grain.MapDataset, *, workers: int = 0, prefetch_threads: int = 0):
        self._dataset, self._workers, self._threads = dataset, workers, prefetch_threads
        self.skipped: dict[str, int] = {}
        self._iterator = self._new_iterator()

    def _new_iterator(self):
        iter_dataset = self._dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=2 if self._threads else 0)
        )
        if self._workers:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
                flags.FLAGS.mark_as_parsed()
            iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
        return iter(iter_dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batches, skipped = split_skipped(next(self._iterator))
        for key, count in skipped.items():
            self.skipped[key] = self.skipped.get(key, 0) + count
        return batches

    def get_state(self) -> bytes:
        return json.dumps({"data": self._iterator.get_state(), "skipped": self.skipped}).encode()

    def set_state(self, state: bytes | str) -> None:
        state = json.loads(state)
        self._iterator.set_state(state["data"])
        self.skipped = dict(state["skipped"])

    def start_prefetch(self) -> None:
        start = getattr(self._iterator, "start_prefetch", None)
        if start is not None:
            start()

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def mixture_iterator(dataset: grain.MapDataset, *, workers: int = 0, prefetch_threads: int = 0) -> MixtureIterator:
    """A checkpointable iterator (``get_state`` / ``set_state``) over the step batches."""
    return MixtureIterator(dataset, workers=workers, prefetch_threads=prefetch_threads)
