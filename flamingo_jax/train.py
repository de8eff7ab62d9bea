"""The train step and the objects it works on: flat parameter dicts, the optimizer, the loss.

Reads top to bottom: parameters are split into a frozen and a trainable flat dict (string paths
-> arrays, which orbax, optax and sharding all handle plainly); the optimizer holds state for the
trainable dict only; one step accumulates the loss-weighted gradients of one batch from every
dataset of the mixture (Flamingo Section 3) and applies AdamW with global-norm clipping.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.batch import Batch
from flamingo_jax.models.flamingo import (
    CountingRngs,
    FlamingoConfig,
    abstract_model,
    model_class,
    trainable_filter,
)

log = logging.getLogger(__name__)

FlatParams = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Paper defaults (Appendix B.1.2): AdamW, lr 1e-4 after a 5k-step linear warmup then constant,
    weight decay 0.1 except on the Perceiver Resampler, global-norm clipping at 1.0."""

    learning_rate: float = 1e-4
    warmup_steps: int = 5000
    weight_decay: float = 0.1
    no_decay: tuple[str, ...] = ("resampler",)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0
    # After warmup: 'constant' (the paper) or 'cosine' decay to 0 at step ``decay_steps``.
    schedule: str = "constant"
    decay_steps: int = 0
    # {path part: factor} scaling the updates of parameters whose flat path contains that part,
    # e.g. {'attn_gate': 10.0, 'ffw_gate': 10.0}. Not in the paper; empty by default.
    lr_multipliers: tuple[tuple[str, float], ...] | dict = ()

    def __hash__(self):  # gin hands dict fields over as dicts
        return hash(repr(self))

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"OptimizerConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.schedule == "cosine" and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"OptimizerConfig.decay_steps={self.decay_steps} must exceed warmup_steps={self.warmup_steps} "
                "for the cosine schedule"
            )
        for part, factor in dict(self.lr_multipliers).items():
            if not isinstance(part, str) or not factor > 0:
                raise ValueError(
                    f"OptimizerConfig.lr_multipliers needs {{path part: factor > 0}}, got {part!r}: {factor!r}"
                )


def path_key(path: tuple) -> str:
    return "/".join(str(part) for part in path)


def flatten_state(state: nnx.State) -> FlatParams:
    """nnx.State -> {'xattn_layers/0/to_q/linear/kernel': array, ...}."""
    return {path_key(path): variable.get_value() for path, variable in nnx.to_flat_state(state)}


def unflatten_state(flat: FlatParams) -> nnx.State:
    def part(text):
        return int(text) if text.isdigit() else text

    return nnx.State.from_flat_path({tuple(part(p) for p in key.split("/")): value for key, value in flat.items()})


def logical_names(config: FlamingoConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Logical axis names of every (trainable, frozen) parameter, from the abstract model."""
    model = abstract_model(config)
    _, trainable, frozen = nnx.split(model, trainable_filter(config), ...)

    def names(state):
        return {
            path_key(path): (
                variable.get_metadata().get("out_sharding") or (None,) * variable.ndim,
                variable.get_value(),
            )
            for path, variable in nnx.to_flat_state(state)
        }

    return names(trainable), names(frozen)


def flat_shardings(named: dict[str, tuple], mesh, rules) -> dict[str, jax.sharding.NamedSharding]:
    return {
        key: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(names, rules, value.shape, mesh))
        for key, (names, value) in named.items()
    }


def init_params(config: FlamingoConfig, mesh, rules, seed: int) -> tuple[nnx.GraphDef, FlatParams, FlatParams]:
    """Sharded initialisation under jit: every device creates only its own shards."""
    trainable_names, frozen_names = logical_names(config)
    out_shardings = (flat_shardings(trainable_names, mesh, rules), flat_shardings(frozen_names, mesh, rules))

    def create():
        model = model_class(config)(config, rngs=CountingRngs(seed))
        _, trainable, frozen = nnx.split(model, trainable_filter(config), ...)
        return flatten_state(trainable), flatten_state(frozen)

    with nnx.use_eager_sharding(False):
        trainable, frozen = jax.jit(create, out_shardings=out_shardings)()
    return model_graphdef(config), trainable, frozen


def model_graphdef(config: FlamingoConfig) -> nnx.GraphDef:
    """The model's structure, split (trainable, frozen) as the flat parameter dicts are."""
    with nnx.use_eager_sharding(False):
        return nnx.split(abstract_model(config), trainable_filter(config), ...)[0]


def merge_model(graphdef: nnx.GraphDef, trainable: FlatParams, frozen: FlatParams) -> nnx.Module:
    return nnx.merge(graphdef, unflatten_state(trainable), unflatten_state(frozen))


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    warmup = max(config.warmup_steps, 1)

    def schedule(step):
        rate = config.learning_rate * jnp.minimum(1.0, (step + 1) / warmup)
        if config.schedule == "cosine":
            progress = jnp.clip((step - warmup) / (config.decay_steps - warmup), 0.0, 1.0)
            rate = rate * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return rate

    return schedule


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    def decay_mask(params: FlatParams):
        return {key: not any(group in key.split("/") for group in config.no_decay) for key in params}

    multipliers = dict(config.lr_multipliers)

    def scale_by_path(updates: FlatParams, state, params=None):
        del params
        scaled = {}
        for key, update in updates.items():
            factor = 1.0
            for part in key.split("/"):
                factor *= multipliers.get(part, 1.0)
            scaled[key] = update if factor == 1.0 else update * factor
        return scaled, state

    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        ),
        optax.GradientTransformation(lambda params: optax.EmptyState(), scale_by_path),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: FlatParams
    opt_state: optax.OptState


def gate_values(params: FlatParams) -> dict[str, jax.Array]:
    """tanh(alpha) of each xattn gate, keyed 'gate/<block>/attn' and 'gate/<block>/ffw'."""
    gates = {}
    for key, value in params.items():
        parts = key.split("/")
        if parts[0] == "xattn_layers" and parts[-1] in ("attn_gate", "ffw_gate"):
            gates[f"gate/{parts[1]}/{parts[-1][:-5]}"] = jnp.tanh(value)
    return gates


def make_train_step(
    graphdef, tx: optax.GradientTransformation, loss_weights: dict[str, float], schedule, unique_rows=None
):
    """``step(state, frozen, batches) -> (state, metrics)`` for a {dataset name: Batch} mixture;
    datasets absent from ``batches`` (the 'sample' strategy) contribute nothing that step.
    ``unique_rows``: {dataset name: DatasetConfig.unique_rows} for those that set it."""
    unique_rows = unique_rows or {}

    def dataset_loss(params, frozen, batch: Batch, name: str):
        model = merge_model(graphdef, params, frozen)
        if unique_rows.get(name):
            return model.train_loss(batch, unique_rows=unique_rows[name])
        return model.train_loss(batch)

    def step(state: TrainState, frozen: FlatParams, batches: dict[str, Batch]):
        grads = jax.tree.map(jnp.zeros_like, state.params)
        metrics = {}
        total = jnp.zeros((), jnp.float32)
        for name, weight in loss_weights.items():
            if name not in batches:
                continue
            batch = batches[name]
            if metrics:
                # One dataset's forward/backward after the other's: without this barrier XLA may
                # run all the datasets' forward passes first and hold all their activations.
                grads, batch = jax.lax.optimization_barrier((grads, batch))
            (loss, count), dataset_grads = jax.value_and_grad(functools.partial(dataset_loss, name=name), has_aux=True)(
                state.params, frozen, batch
            )
            grads = jax.tree.map(lambda acc, g, w=weight: acc + w * g.astype(acc.dtype), grads, dataset_grads)
            total = total + weight * loss
            metrics[f"loss/{name}"] = loss
            metrics[f"targets/{name}"] = count
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics.update(loss=total, grad_norm=optax.global_norm(grads), learning_rate=schedule(state.step))
        metrics.update(gate_values(params))
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def opt_state_shardings(tx, params: FlatParams, param_shardings, mesh):
    """Optimizer-state shardings that follow the parameters' (optax's count stays replicated)."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx,
        lambda _, param_sharding: param_sharding,
        abstract,
        param_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh),
    )


# ----------------------------------------------------------------------------------------------
# The training run: config, then one loop from (resumed) step to the end.
# ----------------------------------------------------------------------------------------------


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
    # importers.pretrained.pretrained_params: e.g. {'lm': 'smollm2', 'vision_efficientnet': 'lite0'}.
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
        if not self.datasets:
            raise ValueError("RunConfig.datasets is empty: bind at least one DatasetConfig")
        for name in ("train_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RunConfig.{name} must be positive, got {getattr(self, name)}")
        from flamingo_jax.data import mixture

        if self.mixture_strategy not in mixture.STRATEGIES:
            raise ValueError(
                f"RunConfig.mixture_strategy={self.mixture_strategy!r}; available: {list(mixture.STRATEGIES)}"
            )
        for name in ("data_workers", "data_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"RunConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.init_from is not None and not os.path.isdir(self.init_from):
            raise FileNotFoundError(f"RunConfig.init_from: no checkpoint directory at {self.init_from!r}")


def _global_batches(local: dict[str, dict], mesh, rules) -> dict[str, Batch]:
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


def _overwrite(params: FlatParams, loaded: dict, place) -> FlatParams:
    """``params`` with the entries present in ``loaded`` replaced by ``place(key, old value)``."""
    return {key: place(key, value) if key in loaded else value for key, value in params.items()}


def build_training(config: RunConfig, mesh) -> Training:
    """Initialises (sharded) parameters and optimizer state and jits the step for ``mesh``."""
    from flamingo_jax import checkpointing

    rules = sharding.RULE_SETS[config.mesh.rules]
    _check_batch_divisibility(config, mesh)
    with sharding.activation_sharding(mesh, rules):
        graphdef, trainable, frozen = init_params(config.model, mesh, rules, config.seed)
    if config.init_from:
        every = {**trainable, **frozen}
        shapes = {key: jax.ShapeDtypeStruct(value.shape, value.dtype) for key, value in every.items()}
        loaded = checkpointing.load_params(config.init_from, {k: v.sharding for k, v in every.items()}, shapes)
        place = lambda key, value: loaded[key].astype(value.dtype)
        trainable, frozen = _overwrite(trainable, loaded, place), _overwrite(frozen, loaded, place)
        log.info("init_from %s: loaded %d parameter arrays", config.init_from, len(loaded))
    if config.pretrained:
        from flamingo_jax.importers.pretrained import pretrained_params

        loaded = pretrained_params(config.model, **config.pretrained)

        def place(key, value):  # every process read the files: each fills only its own shards
            array = np.asarray(loaded[key]).astype(value.dtype)
            return jax.make_array_from_callback(value.shape, value.sharding, lambda index: array[index])

        trainable, frozen = _overwrite(trainable, loaded, place), _overwrite(frozen, loaded, place)
        log.info("pretrained %s: loaded %d parameter arrays", config.pretrained, len(loaded))

    tx = make_optimizer(config.optimizer)
    state_shardings = train_state_shardings(tx, trainable, mesh)
    opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(trainable)
    state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), state_shardings.step), trainable, opt_state)
    frozen_shardings = {key: value.sharding for key, value in frozen.items()}
    step_fn = jit_train_step(config, graphdef, tx, state_shardings, frozen_shardings)
    return Training(mesh, rules, graphdef, state, frozen, state_shardings, step_fn)


def train_state_shardings(tx, trainable: FlatParams, mesh) -> TrainState:
    """Shardings of the whole train state from the (possibly abstract) trainable parameters'."""
    param_shardings = {key: value.sharding for key, value in trainable.items()}
    opt_state = opt_state_shardings(tx, trainable, param_shardings, mesh)
    return TrainState(sharding.replicated(mesh), param_shardings, opt_state)


def jit_train_step(config: RunConfig, graphdef, tx, state_shardings: TrainState, frozen_shardings: dict):
    """The jitted ``step(state, frozen, batches)`` of a run (donates the old state); the batches'
    shardings come from the arrays passed in."""
    loss_weights = {
        dataset.name: dataset.loss_weight if config.mixture_strategy == "accumulate" else 1.0
        for dataset in config.datasets
    }
    return jax.jit(
        make_train_step(
            graphdef,
            tx,
            loss_weights,
            learning_rate_schedule(config.optimizer),
            {dataset.name: dataset.unique_rows for dataset in config.datasets if dataset.unique_rows},
        ),
        in_shardings=(state_shardings, frozen_shardings, None),
        out_shardings=(state_shardings, state_shardings.step),
        donate_argnums=(0,),
    )


def train(config: RunConfig, workdir: str) -> dict:
    """Trains (or resumes) a run in ``workdir``. Returns a summary: the final ``step``, whether
    the run stopped early for ``preempted``, the ``training`` (its final state) and the
    ``initial_params`` (kept for ``evaluate_at_end`` in a run that started at step 0, else None),
    which evaluation reuses instead of rebuilding."""
    from flamingo_jax import checkpointing, flops, metrics
    from flamingo_jax.data import mixture
    from flamingo_jax.data.images import image_config_for

    mesh = sharding.create_mesh(config.mesh)
    training = build_training(config, mesh)
    model_config = config.model
    rules = training.rules

    token_ids = mixture.TokenIds(
        model_config.base_vocab_size, model_config.media_token_id, model_config.endofchunk_token_id
    )
    tokenizer = None
    if any(d.source != "synthetic" for d in config.datasets):
        from flamingo_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer)
        if tokenizer.base_vocab_size != model_config.base_vocab_size:
            raise ValueError(
                f"RunConfig.tokenizer={config.tokenizer!r} has {tokenizer.base_vocab_size} base tokens but "
                f"the model's vocabulary (LlamaConfig / TextEncoderConfig.vocab_size) is {model_config.base_vocab_size}"
            )
    dataset = mixture.mixture_dataset(
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
    # Measured before the data threads start (they would share the cores with the measurement).
    peak, peak_source = flops.peak_flops_per_step_second(jax.devices())
    iterator = mixture.mixture_iterator(dataset, workers=config.data_workers, prefetch_threads=config.data_threads)

    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints, async_save=config.async_checkpointing
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

    shapes = {name: {key: value.shape for key, value in fields.items()} for name, fields in dataset.first().items()}
    dataset_flops = {
        d.name: flops.step_flops(
            model_config,
            d.batch_size,
            shapes[d.name]["tokens"][1],
            num_media=shapes[d.name]["images"][1],
            num_frames=shapes[d.name]["images"][2],
        )
        for d in config.datasets
    }
    dataset_tokens = {d.name: d.batch_size * shapes[d.name]["tokens"][1] for d in config.datasets}
    log.info("%.3g FLOPs per step; peak %.3g FLOP/s (%s)", sum(dataset_flops.values()), peak, peak_source)

    writer = metrics.MetricsWriter(
        workdir, total_steps=config.train_steps, resume_step=start_step, primary=jax.process_index() == 0
    )
    watcher = checkpointing.PreemptionWatcher().install()
    preempted = False
    last_saved = latest
    try:
        for step in range(start_step, config.train_steps):
            local = next(iterator)
            batches = _global_batches(local, mesh, rules)
            started = time.perf_counter()
            step_metrics = training.step(batches)
            # Block every step: the CPU backend deadlocks with many sharded steps in flight, and
            # the step time below is only honest this way.
            loss = float(step_metrics["loss"])
            step_time = time.perf_counter() - started
            done = step + 1
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {done}: loss is {loss}; stopping before it reaches a checkpoint")
            if done % config.log_every == 0 or done == config.train_steps:
                record = jax.device_get(step_metrics)
                record.update(iterator.skipped)
                record.update(
                    step_time_s=step_time,
                    tokens_per_s=sum(dataset_tokens[name] for name in local) / step_time,
                    mfu=sum(dataset_flops[name] for name in local) / step_time / peak,
                )
                writer.write(done, record)
            writer.advance()
            if done % config.checkpoint_every == 0 or done == config.train_steps:
                checkpointer.save(done, training.state, iterator)
                last_saved = done
            if watcher.should_stop():
                if last_saved != done:
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
