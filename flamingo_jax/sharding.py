"""Device mesh, logical-axis rules and sharded initialisation.

Parameters and activations carry logical axis names; a rule set (selected by name in gin) maps
them to the mesh axes ``('data', 'fsdp', 'tensor')``. Model code calls :func:`constrain` with
logical names only and never names a mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Activation names: act_batch, act_len, act_embed, act_heads, act_mlp, act_vocab; media_batch,
# the images the vision encoder reads, split over every mesh axis (media_split: a batch shard's
# images over the tensor axis): the tensor axis splits the LM's heads and MLPs but is one more
# batch axis to the (small, frozen) vision encoder, so no chip encodes another's images.
_BATCH = ("act_batch", ("data", "fsdp"))
_MEDIA_BATCH = (("media_batch", ("data", "fsdp", "tensor")), ("media_split", "tensor"))
RULE_SETS: dict[str, tuple[tuple[str, str | tuple[str, ...] | None], ...]] = {
    # Every weight replicated, the batch split over all devices.
    "data_parallel": (_BATCH, *_MEDIA_BATCH),
    # Weights split along their model width over 'fsdp' (ZeRO-3 style), batch over data x fsdp.
    "fsdp": (
        _BATCH,
        *_MEDIA_BATCH,
        ("embed", "fsdp"),
        ("media_embed", "fsdp"),
        ("vision_embed", "fsdp"),
        ("conv_out", "fsdp"),
    ),
    # FSDP plus Megatron-style tensor parallelism over heads / MLP / vocab.
    "fsdp_tensor": (
        _BATCH,
        *_MEDIA_BATCH,
        ("embed", "fsdp"),
        ("media_embed", "fsdp"),
        ("vision_embed", "fsdp"),
        ("conv_out", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("act_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
    ),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: str = "fsdp"

    def __post_init__(self):
        if self.rules not in RULE_SETS:
            raise ValueError(f"MeshConfig.rules={self.rules!r} is not one of {sorted(RULE_SETS)}")

    def axis_sizes(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(
                f"MeshConfig: at most one axis may be -1, got data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}"
            )
        if any(size == 0 or size < -1 for size in sizes):
            raise ValueError(f"MeshConfig: axis sizes must be positive or -1, got {sizes}")
        known = math.prod(size for size in sizes if size != -1)
        if num_devices % known:
            raise ValueError(
                f"MeshConfig: data={self.data} x fsdp={self.fsdp} x tensor={self.tensor} does not divide "
                f"the {num_devices} available devices"
            )
        sizes = [num_devices // known if size == -1 else size for size in sizes]
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"MeshConfig: data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
                f"but {num_devices} devices are available"
            )
        return tuple(sizes)


def create_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types (rule-based sharding needs them)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.axis_sizes(len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(names: Sequence[str | None], rules, shape: Sequence[int] | None = None, mesh=None) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec. A mesh axis is used at most once; with
    ``shape`` and ``mesh`` given, a dimension its mesh axes do not divide stays replicated."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(axis for axis in axes if axis not in used)
        if axes and shape is not None and mesh is not None and shape[dim] % math.prod(mesh.shape[a] for a in axes):
            axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def state_shardings(state, mesh, rules):
    """NamedShardings for every Variable of an (abstract) nnx state from its logical names."""

    def sharding_of(variable):
        names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        return NamedSharding(mesh, logical_to_spec(names, rules, variable.shape, mesh))

    return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# The active (mesh, rules) for activation constraints while tracing a step.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("flamingo_jax_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh, rules):
    """Within this context :func:`constrain` pins activations to ``rules`` on ``mesh``."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside :func:`activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shards_of(name: str) -> int:
    """How many ways the active mesh splits a dimension of logical name ``name`` (1 outside
    :func:`activation_sharding`)."""
    active = _ACTIVE.get()
    if active is None:
        return 1
    mesh, rules = active
    spec = logical_to_spec((name,), rules)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(mesh.shape[axis] for axis in axes)


def map_over_batch(fn, x: jax.Array, *replicated_args, batch: str = "act_batch"):
    """``fn(x, *replicated_args)`` computed on each device's batch shard of ``x`` (shard_map), with
    the other arguments replicated; a plain call outside :func:`activation_sharding` or when the
    batch does not divide. For ops XLA's SPMD partitioner would otherwise run on the gathered
    batch (grouped convolutions). ``batch``: the logical name of the batch dimension."""
    active = _ACTIVE.get()
    if active is None:
        return fn(x, *replicated_args)
    mesh, rules = active
    spec = logical_to_spec((batch,) + (None,) * (x.ndim - 1), rules, x.shape, mesh)
    if spec[0] is None:
        return fn(x, *replicated_args)
    in_specs = (spec,) + (PartitionSpec(),) * len(replicated_args)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec)(x, *replicated_args)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh, rules, ndim: int) -> NamedSharding:
    """Sharding of a batch array: leading dim over the batch axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("act_batch",) + (None,) * (ndim - 1), rules))
