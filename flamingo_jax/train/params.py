"""Parameters as flat dicts: string paths -> arrays, split into the trainable and the frozen set
(orbax, optax and sharding all handle them plainly), initialised sharded under ``jit``."""

from __future__ import annotations

import jax
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.models.kinds import abstract_model, kind_of, trainable_filter
from flamingo_jax.models.layers import CountingRngs

FlatParams = dict[str, jax.Array]


def path_key(path: tuple) -> str:
    return "/".join(str(part) for part in path)


def flatten_state(state: nnx.State) -> FlatParams:
    """nnx.State -> {'xattn_layers/0/to_q/linear/kernel': array, ...}."""
    return {path_key(path): variable.get_value() for path, variable in nnx.to_flat_state(state)}


def unflatten_state(flat: FlatParams) -> nnx.State:
    def part(text):
        return int(text) if text.isdigit() else text

    return nnx.State.from_flat_path({tuple(part(p) for p in key.split("/")): value for key, value in flat.items()})


def logical_names(config) -> tuple[dict[str, tuple], dict[str, tuple]]:
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


def param_targets(config, mesh, rules) -> tuple[dict, dict]:
    """Every (trainable, frozen) parameter as a ``jax.ShapeDtypeStruct`` with its sharding on
    ``mesh``, nothing created: what loaded weights are placed onto."""

    def targets(named):
        shardings = flat_shardings(named, mesh, rules)
        return {
            key: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=shardings[key])
            for key, (_, value) in named.items()
        }

    trainable_names, frozen_names = logical_names(config)
    return targets(trainable_names), targets(frozen_names)


def init_params(
    config, mesh, rules, seed: int, supplied: FlatParams | None = None
) -> tuple[nnx.GraphDef, FlatParams, FlatParams]:
    """Sharded initialisation under jit: every device creates only its own shards.

    ``supplied``: arrays for some of the parameters (pretrained weights, a checkpoint's), placed
    as their targets are (:func:`param_targets`); they take the place of those parameters'
    random values, which are then never computed (for a pretrained LM, most of the init's time,
    compile and memory). The other parameters come out as without it, bit for bit.
    """
    supplied = supplied or {}
    targets = param_targets(config, mesh, rules)
    out_shardings = tuple(
        {key: target.sharding for key, target in part.items() if key not in supplied} for part in targets
    )

    def create():
        model = kind_of(config).module(config, rngs=CountingRngs(seed))
        _, *parts = nnx.split(model, trainable_filter(config), ...)
        return tuple(
            {key: value for key, value in flatten_state(part).items() if key not in supplied} for part in parts
        )

    with nnx.use_eager_sharding(False):
        created = jax.jit(create, out_shardings=out_shardings)()
    trainable, frozen = (
        {key: supplied[key] if key in supplied else part[key] for key in named}
        for part, named in zip(created, targets, strict=True)
    )
    return model_graphdef(config), trainable, frozen


def model_graphdef(config) -> nnx.GraphDef:
    """The model's structure, split (trainable, frozen) as the flat parameter dicts are."""
    with nnx.use_eager_sharding(False):
        return nnx.split(abstract_model(config), trainable_filter(config), ...)[0]


def merge_model(graphdef: nnx.GraphDef, trainable: FlatParams, frozen: FlatParams) -> nnx.Module:
    return nnx.merge(graphdef, unflatten_state(trainable), unflatten_state(frozen))
