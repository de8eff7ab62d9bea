"""One dispatch on the model kind. Each kind of model a run can train (Flamingo; the stage-1
contrastive two-tower model) is a :class:`ModelKind`: the module its config builds, its FLOPs per
train step and the evaluation that fits it. Code outside ``models/`` asks ``kind_of(config)``
instead of testing config types; a new kind is one more entry in ``KINDS``.

Every kind's module implements ``train_loss(batch, *, unique_rows=0, target_capacity=0) -> (loss,
count)`` on the
batch contract, and its config carries ``trainable`` (top-level parameter groups that train) and
the text-vocabulary properties ``base_vocab_size`` / ``media_token_id`` / ``endofchunk_token_id``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
from flax import nnx

from flamingo_jax import flops
from flamingo_jax.models.contrastive import ContrastiveConfig, ContrastiveModel
from flamingo_jax.models.flamingo import Flamingo, FlamingoConfig
from flamingo_jax.models.layers import CountingRngs
from flamingo_jax.models.token_fusion import TokenFusion


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """``step_flops(config, batch_size, length, num_media, num_frames)``: analytic FLOPs of one
    dataset's batch in a train step. ``evaluation``: the evaluator ``--mode=eval`` runs
    ('fewshot': the registered few-shot tasks; 'retrieval': zero-shot retrieval and
    classification of a two-tower model). ``joint_pass(config)``: whether the train step runs
    all the datasets of a step in one pass (the module's ``train_losses``) rather than one after
    the other (see ``train.step.make_train_step``)."""

    name: str
    module: Callable[..., nnx.Module]
    step_flops: Callable[..., float]
    evaluation: str
    joint_pass: Callable[..., bool] = lambda config: False


def _flamingo_module(config: FlamingoConfig, *, rngs) -> Flamingo:
    """Flamingo, or with a token-level ``config.connector`` its token-fusion counterpart."""
    return (TokenFusion if config.connector.token_level else Flamingo)(config, rngs=rngs)


KINDS: dict[type, ModelKind] = {
    # A scanned Flamingo: each period's weights gathered once per pass for all datasets.
    FlamingoConfig: ModelKind(
        "flamingo", _flamingo_module, flops.train_step_flops, "fewshot", joint_pass=lambda config: config.lm.scan_layers
    ),
    ContrastiveConfig: ModelKind(
        "contrastive",
        ContrastiveModel,
        lambda config, batch_size, length, num_media=1, num_frames=1: flops.contrastive_step_flops(
            config, batch_size, length
        ),
        "retrieval",
    ),
}


def kind_of(config) -> ModelKind:
    kind = KINDS.get(type(config))
    if kind is None:
        raise TypeError(f"{type(config).__name__} is not a model config; known: {[c.__name__ for c in KINDS]}")
    return kind


def build(config, seed: int = 0) -> nnx.Module:
    """The model of ``config`` with logical-axis metadata recorded but not applied (sharding is
    applied by ``flamingo_jax.sharding`` under a mesh); parameters drawn from ``seed``."""
    with nnx.use_eager_sharding(False):
        return kind_of(config).module(config, rngs=CountingRngs(seed))


def abstract_model(config) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves: shapes and counts without allocating anything."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: kind_of(config).module(config, rngs=CountingRngs(0)))


def trainable_filter(config):
    """An nnx filter selecting the trainable parameters (the optimizer holds state for these only):
    the top-level groups ``config.trainable`` names ('lora': every LoRA adapter, wherever it sits)."""
    groups = [
        nnx.Any(nnx.PathContains("lora_a"), nnx.PathContains("lora_b")) if group == "lora" else nnx.PathContains(group)
        for group in config.trainable
    ]
    return nnx.All(nnx.Param, nnx.Any(*groups))


def count_params(model: nnx.Module, flt=nnx.Param) -> int:
    """Number of parameters (works on abstract models)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, flt)))
