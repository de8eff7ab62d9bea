"""The train step: one batch from every dataset of the mixture, their loss-weighted gradients
accumulated (Flamingo Section 3), then the optimizer update; and the shardings of its state."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from flamingo_jax import sharding
from flamingo_jax.batch import Batch
from flamingo_jax.models.kinds import kind_of
from flamingo_jax.train.optimizer import learning_rate_schedule, opt_state_shardings
from flamingo_jax.train.params import FlatParams, merge_model


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: FlatParams
    opt_state: optax.OptState


def gate_values(params: FlatParams) -> dict[str, jax.Array]:
    """tanh(alpha) of each xattn gate, keyed 'gate/<block>/attn' and 'gate/<block>/ffw' (the
    blocks' gates stacked in one array with ``LlamaConfig.scan_layers``; per-channel gates,
    ``XAttnConfig.gate_shape='vector'``, by their mean)."""
    gates = {}
    for key, value in params.items():
        parts = key.split("/")
        if parts[0] == "xattn_layers" and parts[-1] in ("attn_gate", "ffw_gate"):
            kind = parts[-1][: -len("_gate")]
            if parts[1].isdigit():  # one block's gate
                gates[f"gate/{parts[1]}/{kind}"] = jnp.mean(jnp.tanh(value))
            else:  # every block's, stacked on axis 0
                gates.update(
                    {f"gate/{block}/{kind}": jnp.mean(jnp.tanh(value[block])) for block in range(value.shape[0])}
                )
    return gates


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    loss_weights: dict[str, float],
    schedule,
    loss_options=None,
    *,
    joint: bool = False,
):
    """``step(state, frozen, batches) -> (state, metrics)`` for a {dataset name: Batch} mixture;
    datasets absent from ``batches`` (the 'sample' strategy) contribute nothing that step.
    ``loss_options``: {dataset name: keyword arguments of the model's ``train_loss``} for the
    datasets that set any (``unique_rows``, ``target_capacity``).

    ``joint``: one forward and backward pass for all the datasets (the model's
    ``train_losses``), which a scanned model needs so that FSDP gathers each period's weights
    once per pass rather than once per dataset; otherwise one dataset's pass after the other's,
    which holds one dataset's activations at a time."""
    loss_options = loss_options or {}

    def dataset_loss(params, frozen, batch: Batch, name: str):
        return merge_model(graphdef, params, frozen).train_loss(batch, **loss_options.get(name, {}))

    def joint_loss(params, frozen, batches: dict[str, Batch]):
        losses = merge_model(graphdef, params, frozen).train_losses(batches, loss_options)
        return sum(loss_weights[name] * loss for name, (loss, _) in losses.items()), losses

    def update(state: TrainState, grads, total, metrics):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics.update(loss=total, grad_norm=optax.global_norm(grads), learning_rate=schedule(state.step))
        metrics.update(gate_values(params))
        return TrainState(state.step + 1, params, opt_state), metrics

    def joint_step(state: TrainState, frozen: FlatParams, batches: dict[str, Batch]):
        present = {name: batches[name] for name in loss_weights if name in batches}
        (total, losses), grads = jax.value_and_grad(joint_loss, has_aux=True)(state.params, frozen, present)
        metrics = {}
        for name, (loss, count) in losses.items():
            metrics[f"loss/{name}"] = loss
            metrics[f"targets/{name}"] = count
        return update(state, grads, total, metrics)

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
        return update(state, grads, total, metrics)

    return joint_step if joint else step


def train_state_shardings(tx, trainable: FlatParams, mesh) -> TrainState:
    """Shardings of the whole train state from the (possibly abstract) trainable parameters'."""
    param_shardings = {key: value.sharding for key, value in trainable.items()}
    opt_state = opt_state_shardings(tx, trainable, param_shardings, mesh)
    return TrainState(sharding.replicated(mesh), param_shardings, opt_state)


def loss_options(dataset) -> dict[str, int]:
    """The ``train_loss`` keyword arguments a ``DatasetConfig`` sets (its exact savings)."""
    options = {"unique_rows": dataset.unique_rows, "target_capacity": dataset.target_capacity}
    return {key: value for key, value in options.items() if value}


def jit_train_step(config, graphdef, tx, state_shardings: TrainState, frozen_shardings: dict):
    """The jitted ``step(state, frozen, batches)`` of a run (``config``: its ``RunConfig``; donates
    the old state); the batches' shardings come from the arrays passed in."""
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
            {dataset.name: options for dataset in config.datasets if (options := loss_options(dataset))},
            joint=kind_of(config.model).joint_pass(config.model),
        ),
        in_shardings=(state_shardings, frozen_shardings, None),
        out_shardings=(state_shardings, state_shardings.step),
        donate_argnums=(0,),
    )
