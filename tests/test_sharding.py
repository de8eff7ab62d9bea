"""Mesh construction and logical-axis rules."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec

from flamingo_jax import sharding
from flamingo_jax.sharding import MeshConfig


def test_mesh_sizes_fill_and_errors():
    assert MeshConfig(data=-1, fsdp=2, tensor=2).axis_sizes(8) == (2, 2, 2)
    assert MeshConfig(data=1, fsdp=-1).axis_sizes(8) == (1, 8, 1)
    with pytest.raises(ValueError, match="does not divide the 8 available devices"):
        MeshConfig(data=3).axis_sizes(8)
    with pytest.raises(ValueError, match="= 4 but 8 devices"):
        MeshConfig(data=2, fsdp=2, tensor=1).axis_sizes(8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1).axis_sizes(8)
    with pytest.raises(ValueError, match="rules='zero'"):
        MeshConfig(rules="zero")


def test_mesh_on_fake_devices():
    assert jax.device_count() == 8, "run the tests with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    mesh = sharding.create_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_logical_rules():
    rules = sharding.RULE_SETS["fsdp_tensor"]
    mesh = sharding.create_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == PartitionSpec("fsdp", "tensor")
    assert sharding.logical_to_spec(("act_batch", None), rules) == PartitionSpec(("data", "fsdp"), None)
    # A dimension the mesh axis does not divide stays replicated.
    assert sharding.logical_to_spec(("embed", "heads"), rules, (64, 5), mesh) == PartitionSpec("fsdp", None)
    # A mesh axis is used once per array.
    assert sharding.logical_to_spec(("embed", "embed"), rules) == PartitionSpec("fsdp", None)
    assert sharding.logical_to_spec(("embed", "mlp"), sharding.RULE_SETS["data_parallel"]) == PartitionSpec(None, None)


def test_constrain_is_a_no_op_outside_a_rules_context():
    x = jax.numpy.ones((8, 4))
    assert sharding.constrain(x, ("act_batch", None)) is x
