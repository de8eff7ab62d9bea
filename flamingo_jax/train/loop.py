"""The training run: ``RunConfig``, then one loop from the (resumed) step to the end.

Reads top to bottom: build the mesh, the sharded parameters (``init_from`` and pretrained
weights, the rest seeded) and the jitted step; open the data mixture and the checkpointer; resume if a
checkpoint exists; step, log, checkpoint, and stop cleanly on preemption.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flamingo_jax import checkpointing, flops, sharding, storage
from flamingo_jax.batch import NEW_TOKENS, Batch
from flamingo_jax.data import mixture
from flamingo_jax.data.images import image_config_for
from flamingo_jax.importers.pretrained import pretrained_params
from flamingo_jax.models.flamingo import FlamingoConfig
from flamingo_jax.models.kinds import kind_of
from flamingo_jax.tokenizer import load_tokenizer
from flamingo_jax.train.optimizer import OptimizerConfig, make_optimizer
from flamingo_jax.train.params import FlatParams, init_params, param_targets
from flamingo_jax.train.step import TrainState, jit_train_step, train_state_shardings
from flamingo_jax.train.writer import MetricsWriter

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; built by gin in ``main.py`` and passed down as is."""

    model: FlamingoConfig
    datasets: tuple = ()
    mesh: sharding.MeshConfig = sharding.MeshConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train_steps: int = 100
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    seed: int = 0
    init_from: str | None = None
    # Pretrained sources loaded at the start of every run (and resume), as in
    # importers.pretrained.pretrained_params: {'lm': PATH, 'vision_hf': PATH, ...}, each PATH a file
    # or a registered weights name. ``tokenizer``: as in tokenizer.load_tokenizer.
    pretrained: dict = dataclasses.field(default_factory=dict)
    # Evaluate (the EvalConfig) and write DIR/eval/report.md when training finishes.
    evaluate_at_end: bool = False
    async_checkpointing: bool = True
    tokenizer: str = "bytes"
    mixture_strategy: str = "accumulate"
    data_workers: int = 0
    # Threads of this process preparing the next steps' batches while a step runs (0: each
    # step's batches are prepared before it, in the training loop).
    data_threads: int = 0

    def __post_init__(self):
        for name in ("train_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RunConfig.{name} must be positive, got {getattr(self, name)}")
        if self.mixture_strategy not in mixture.STRATEGIES:
            raise ValueError(
                f"RunConfig.mixture_strategy={self.mixture_strategy!r}; available: {list(mixture.STRATEGIES)}"
            )
        for name in ("data_workers", "data_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"RunConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.init_from is not None and not storage.path(self.init_from).is_dir():
            raise FileNotFoundError(f"RunConfig.init_from: no checkpoint directory at {self.init_from!r}")


def global_batches(local: dict[str, dict], mesh, rules) -> dict[str, Batch]:
    """This process's numpy batches -> global jax Arrays sharded over the batch axes."""
    out = {}
    for name, fields in local.items():
        arrays = {
            key: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, rules, value.ndim), value)
            for key, value in fields.items()
        }
        out[name] = Batch.from_dict(arrays)
    return out


def _check_batch_divisibility(config: RunConfig, mesh) -> None:
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    for dataset in config.datasets:
        if dataset.batch_size % batch_devices:
            raise ValueError(
                f"DatasetConfig {dataset.name!r}: batch_size={dataset.batch_size} is not divisible by the "
                f"data x fsdp = {batch_devices} devices the batch is split over"
            )


@dataclasses.dataclass
class Training:
    """A run's compiled pieces on one mesh: the state, the frozen weights and the jitted step."""

    mesh: jax.sharding.Mesh
    rules: tuple
    graphdef: nnx.GraphDef
    state: TrainState
    frozen: FlatParams
    state_shardings: TrainState
    step_fn: object

    def step(self, batches: dict[str, Batch]):
        """Runs one step (donating the old state) and returns its metrics (device arrays)."""
        with sharding.activation_sharding(self.mesh, self.rules):
            self.state, step_metrics = self.step_fn(self.state, self.frozen, batches)
        return step_metrics

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with this mesh's shardings: the target to restore a checkpoint onto."""
        return jax.tree.map(
            lambda value, target: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=target),
            self.state,
            self.state_shardings,
        )


def _loaded_params(config: RunConfig, targets: dict) -> FlatParams:
    """The parameters that ``config.init_from`` and ``config.pretrained`` supply, each placed onto
    its target (``params.param_targets``); a pretrained file wins where both have a key."""
    loaded = {}
    if config.init_from:
        restored = checkpointing.load_params(
            config.init_from, {key: target.sharding for key, target in targets.items()}, targets, config.model
        )
        loaded.update({key: value.astype(targets[key].dtype) for key, value in restored.items()})
        log.info("init_from %s: loaded %d parameter arrays", config.init_from, len(restored))
    if config.pretrained:
        files = pretrained_params(config.model, **config.pretrained)
        for key, value in files.items():
            if key not in targets:
                continue
            # Every process read the files: each fills only its own shards.
            array = np.asarray(value).astype(targets[key].dtype)
            target = targets[key]
            loaded[key] = jax.make_array_from_callback(target.shape, target.sharding, lambda index, a=array: a[index])
        log.info("pretrained %s: loaded %d parameter arrays", config.pretrained, len(files))
    return loaded


def build_training(config: RunConfig, mesh) -> Training:
    """Initialises (sharded) parameters and optimizer state and jits the step for ``mesh``."""
    rules = sharding.RULE_SETS[config.mesh.rules]
    _check_batch_divisibility(config, mesh)
    supplied = {}
    if config.init_from or config.pretrained:
        trainable_targets, frozen_targets = param_targets(config.model, mesh, rules)
        supplied = _loaded_params(config, {**trainable_targets, **frozen_targets})
    with sharding.activation_sharding(mesh, rules):
        graphdef, trainable, frozen = init_params(config.model, mesh, rules, config.seed, supplied)
    tx = make_optimizer(config.optimizer)
    state_shardings = train_state_shardings(tx, trainable, mesh)
    opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(trainable)
    state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), state_shardings.step), trainable, opt_state)
    frozen_shardings = {key: value.sharding for key, value in frozen.items()}
    step_fn = jit_train_step(config, graphdef, tx, state_shardings, frozen_shardings)
    return Training(mesh, rules, graphdef, state, frozen, state_shardings, step_fn)


def open_mixture(config: RunConfig):
    """The run's data mixture (``mixture.mixture_dataset``) for this process, with the run's
    tokenizer (checked against the model's vocabulary) where a dataset reads text."""
    model_config = config.model
    token_ids = mixture.TokenIds(
        model_config.base_vocab_size, model_config.media_token_id, model_config.endofchunk_token_id
    )
    tokenizer = None
    if any(d.source != "synthetic" for d in config.datasets):
        tokenizer = load_tokenizer(config.tokenizer, getattr(model_config, "new_tokens", NEW_TOKENS))
        if tokenizer.base_vocab_size != model_config.base_vocab_size:
            raise ValueError(
                f"RunConfig.tokenizer={config.tokenizer!r} has {tokenizer.base_vocab_size} base tokens but "
                f"the model's vocabulary (LlamaConfig / TextEncoderConfig.vocab_size) is {model_config.base_vocab_size}"
            )
    return mixture.mixture_dataset(
        config.datasets,
        token_ids,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        tokenizer=tokenizer,
        image_size=getattr(model_config.vision, "image_size", 224),
        image_config=image_config_for(model_config.vision),
        strategy=config.mixture_strategy,
    )


def mixture_flops(config: RunConfig, first: dict[str, dict]) -> dict[str, float]:
    """{dataset name: FLOPs of its forward + backward in one step}, from the shapes of ``first``,
    the mixture's ``first()`` batches."""
    shapes = {name: {key: value.shape for key, value in fields.items()} for name, fields in first.items()}
    return {
        d.name: kind_of(config.model).step_flops(
            config.model,
            d.batch_size,
            shapes[d.name]["tokens"][1],
            num_media=shapes[d.name]["images"][1],
            num_frames=shapes[d.name]["images"][2],
        )
        for d in config.datasets
    }


def train(config: RunConfig, workdir: str) -> dict:
    """Trains (or resumes) a run in ``workdir``. Returns a summary: the final ``step``, whether
    the run stopped early for ``preempted``, the ``training`` (its final state) and the
    ``initial_params`` (kept for ``evaluate_at_end`` in a run that started at step 0, else None),
    which evaluation reuses instead of rebuilding."""

    if not config.datasets:  # evaluation alone needs none
        raise ValueError("RunConfig.datasets is empty: bind at least one DatasetConfig to train")
    mesh = sharding.create_mesh(config.mesh)
    training = build_training(config, mesh)
    rules = training.rules

    dataset = open_mixture(config)
    # Measured before the data threads start (they would share the cores with the measurement).
    peak, peak_source = flops.peak_flops_per_step_second(jax.devices())
    iterator = mixture.mixture_iterator(dataset, workers=config.data_workers, prefetch_threads=config.data_threads)

    checkpointer = checkpointing.Checkpointer(
        storage.path(workdir) / "checkpoints", keep=config.keep_checkpoints, async_save=config.async_checkpointing
    )
    latest = checkpointer.latest_step()
    if latest is not None:
        training.state = checkpointer.restore(latest, training.abstract_state(), iterator)
        log.info("resumed from the checkpoint at step %d", latest)
    start_step = int(training.state.step)
    # The step donates the state: a copy of the initialisation's trainable parameters for the
    # evaluation at the end to use without rebuilding the model (only then: it costs their memory).
    keep_initial = config.evaluate_at_end and start_step == 0
    initial_params = jax.tree.map(jnp.copy, training.state.params) if keep_initial else None

    first = dataset.first()  # reads and decodes a batch of every dataset: once
    dataset_flops = mixture_flops(config, first)
    dataset_tokens = {d.name: d.batch_size * first[d.name]["tokens"].shape[1] for d in config.datasets}
    if peak is None:
        log.warning("%.3g FLOPs per step; %s", sum(dataset_flops.values()), peak_source)
    else:
        log.info("%.3g FLOPs per step; peak %.3g FLOP/s (%s)", sum(dataset_flops.values()), peak, peak_source)

    writer = MetricsWriter(
        workdir, total_steps=config.train_steps, resume_step=start_step, primary=jax.process_index() == 0
    )
    watcher = checkpointing.PreemptionWatcher().install()
    preempted = False
    last_saved = latest
    # The CPU backend deadlocks with many sharded steps in flight: there the host waits for every
    # step. Elsewhere steps stay in flight, and the host waits only where it logs or saves.
    sync_every_step = jax.default_backend() == "cpu"
    window_start, window_steps = None, 0
    try:
        for step in range(start_step, config.train_steps):
            local = next(iterator)
            batches = global_batches(local, mesh, rules)
            if window_start is None:
                window_start = time.perf_counter()
            step_metrics = training.step(batches)
            window_steps += 1
            done = step + 1
            log_now = done % config.log_every == 0 or done == config.train_steps
            save_now = done % config.checkpoint_every == 0 or done == config.train_steps
            stop_now = watcher.should_stop(done)
            writer.advance()
            if not (sync_every_step or log_now or save_now or stop_now):
                continue
            loss = float(step_metrics["loss"])  # waits for the step
            step_time = (time.perf_counter() - window_start) / window_steps
            window_start, window_steps = None, 0
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {done}: loss is {loss}; stopping before it reaches a checkpoint")
            if log_now:
                record = jax.device_get(step_metrics)
                record.update(iterator.skipped)
                record.update(
                    step_time_s=step_time,
                    tokens_per_s=sum(dataset_tokens[name] for name in local) / step_time,
                )
                if peak is not None:
                    record["mfu"] = sum(dataset_flops[name] for name in local) / step_time / peak
                writer.write(done, record)
            if save_now:
                writer.flush()  # what a resume from this checkpoint will not log again
                checkpointer.save(done, training.state, iterator)
                last_saved = done
            if stop_now:
                if last_saved != done:
                    writer.flush()
                    checkpointer.save(done, training.state, iterator)
                    last_saved = done
                preempted = True
                break
    finally:
        watcher.uninstall()
        checkpointer.close()
        iterator.close()
        writer.close()
    return {
        "step": int(training.state.step),
        "preempted": preempted,
        "training": training,
        "initial_params": initial_params,
    }
