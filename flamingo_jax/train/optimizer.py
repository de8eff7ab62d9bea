"""The optimizer: AdamW over the trainable parameters only, global-norm clipping, the learning-rate
schedule and per-group learning-rate multipliers (Flamingo Appendix B.1.2)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from flamingo_jax import sharding

FlatParams = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Paper defaults (Appendix B.1.2): AdamW, lr 1e-4 after a 5k-step linear warmup then constant,
    weight decay 0.1 except on the Perceiver Resampler (and a token-level connector), global-norm
    clipping at 1.0."""

    learning_rate: float = 1e-4
    warmup_steps: int = 5000
    weight_decay: float = 0.1
    no_decay: tuple[str, ...] = ("resampler", "connector")
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
