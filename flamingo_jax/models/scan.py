"""Scanned layers: weights of repeated layers stacked on a leading ``layers`` axis, run with one
``lax.scan`` over the model's repeating period, rematerialised by named policies.

A stacked module is the per-layer modules' parameters stacked, so a model built with
``LlamaConfig.scan_layers`` holds exactly the weights of the unscanned model of the same seed
(:func:`stack`), and per-layer parameter dicts convert both ways (:func:`stack_params`,
:func:`unstack_params`). The leading axis has the logical name ``layers``, which no rule set
maps to a mesh axis: each scan iteration slices one period's weights, so under FSDP the weights
are gathered inside the loop body, one period at a time.

Remat policies (``LlamaConfig.remat_policy``) name what the backward pass keeps from the forward
pass of each layer; the rest is recomputed (as MaxText's policies do):

- ``none``: keep everything (no rematerialisation);
- ``full``: keep only each layer's input;
- ``minimal``: keep every matmul output with no batch dimension (projections, not attention);
- ``save_dot_except_mlp``: keep the attention projections (q, k, v, output), recompute the MLPs;
- ``save_qkv_proj``: keep the q, k, v projections;
- ``save_out_proj``: keep the attention output projections.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

AXIS = "layers"

# Tensor names the layers tag with ``jax.ad_checkpoint.checkpoint_name``.
QUERY, KEY, VALUE, OUT = "query_proj", "key_proj", "value_proj", "out_proj"

_names = jax.checkpoint_policies.save_only_these_names
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_dot_except_mlp": _names(QUERY, KEY, VALUE, OUT),
    "save_qkv_proj": _names(QUERY, KEY, VALUE),
    "save_out_proj": _names(OUT),
}


def check_policy(name: str, owner: str) -> None:
    if name not in REMAT_POLICIES:
        raise ValueError(f"{owner}.remat_policy must be one of {sorted(REMAT_POLICIES)}, got {name!r}")


def remat(fn, policy: str):
    """``fn`` rematerialised under the named policy (``fn`` itself for 'none')."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


def stack(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module of the same structure whose every parameter is the modules' parameters
    stacked on a new leading axis named ``layers``."""
    if not modules:
        raise ValueError("scan.stack needs at least one module")
    graphdef, first = nnx.split(modules[0])
    states = [first] + [nnx.split(module)[1] for module in modules[1:]]
    flats = [dict(nnx.to_flat_state(state)) for state in states]

    def stacked(path, variable):
        names = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
        value = jnp.stack([flat[path].get_value() for flat in flats])
        return variable.replace(value, out_sharding=(AXIS, *names))

    return nnx.merge(graphdef, nnx.from_flat_state([(p, stacked(p, v)) for p, v in nnx.to_flat_state(first)]))


def take(graphdef: nnx.GraphDef, state: nnx.State, index) -> nnx.Module:
    """The module of layer ``index`` (an int or a traced index) of a stacked state."""
    return nnx.merge(graphdef, jax.tree.map(lambda value: value[index], state))


def segment(state: nnx.State, start: int, periods: int, period: int) -> nnx.State:
    """Layers ``[start, start + periods * period)`` of a stacked state, as [periods, period, ...]."""
    return jax.tree.map(
        lambda value: value[start : start + periods * period].reshape(periods, period, *value.shape[1:]), state
    )


# ----------------------------------------------------------------------------------------------
# Converting parameter dicts between the per-layer and the stacked layout.
# ----------------------------------------------------------------------------------------------


def _lm_config(config):
    """The LlamaConfig of a FlamingoConfig (its ``lm``), or a LlamaConfig itself."""
    return config.lm if hasattr(config, "xattn_layer_indices") else config


def _first_part(key: str, heads: str) -> str:
    """The path component after the group prefix ``heads``: a layer index in the per-layer
    layout, a parameter name in the stacked one."""
    return key[len(heads) :].split("/")[0]


def stacked_groups(config) -> tuple[tuple[str, int], ...]:
    """(prefix, count) of each stacked group of a Flamingo (or Llama) config with scan_layers:
    ``lm/layers`` and ``xattn_layers`` (a LlamaLM's: ``layers``)."""
    lm = _lm_config(config)
    if lm is config:
        return (("layers", lm.num_layers),)
    return (("lm/layers", lm.num_layers), ("xattn_layers", len(config.xattn_layer_indices)))


def stack_params(flat: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """Per-layer parameter paths (``lm/layers/3/mlp/...``) -> stacked ones (``lm/layers/mlp/...``
    with the layer first). Paths outside the stacked groups pass through; a group with a missing
    layer is an error naming it."""
    out = dict(flat)
    for prefix, count in stacked_groups(config):
        heads = f"{prefix}/"
        per_layer: dict[str, dict[int, np.ndarray]] = {}
        for key in [k for k in out if k.startswith(heads) and _first_part(k, heads).isdigit()]:
            index, _, rest = key[len(heads) :].partition("/")
            per_layer.setdefault(rest, {})[int(index)] = out.pop(key)
        for rest, layers in per_layer.items():
            missing = sorted(set(range(count)) - set(layers))
            if missing:
                raise ValueError(f"stack_params: {heads}{{i}}/{rest} is missing for layers {missing}")
            out[f"{heads}{rest}"] = np.stack([np.asarray(layers[i]) for i in range(count)])
    return out


def to_layout(flat: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """A parameter dict in either layout -> the layout ``config`` builds (stacked with
    ``scan_layers``, per layer without)."""
    return stack_params(flat, config) if _lm_config(config).scan_layers else unstack_params(flat, config)


def layout_mismatch(keys, config) -> str | None:
    """A message when parameter paths ``keys`` hold a stacked group in the other layout than
    ``config`` builds (a checkpoint of the scanned model loaded into the unscanned one, or the
    reverse); None when they agree."""
    lm = _lm_config(config)
    for prefix, _ in stacked_groups(config):
        heads = f"{prefix}/"
        inner = [_first_part(key, heads) for key in keys if key.startswith(heads)]
        per_layer = any(part.isdigit() for part in inner)
        stacked = any(not part.isdigit() for part in inner)
        if (lm.scan_layers and per_layer) or (not lm.scan_layers and stacked):
            found = "per-layer" if per_layer else "stacked"
            return (
                f"its {prefix} parameters are {found} but the model has LlamaConfig.scan_layers="
                f"{lm.scan_layers}; rewrite it in the model's layout with python -m flamingo_jax.tools.convert "
                "--gin_file=MODEL.gin --params=DIR --output=NEW_DIR"
            )
    return None


def unstack_params(flat: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """The inverse of :func:`stack_params`: stacked paths -> per-layer paths."""
    out = dict(flat)
    for prefix, count in stacked_groups(config):
        heads = f"{prefix}/"
        for key in [k for k in out if k.startswith(heads) and not _first_part(k, heads).isdigit()]:
            value = out.pop(key)
            if value.shape[0] != count:
                raise ValueError(f"unstack_params: {key} has {value.shape[0]} layers, the config {count}")
            rest = key[len(heads) :]
            out.update({f"{heads}{i}/{rest}": value[i] for i in range(count)})
    return out
