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


def test_every_chip_encodes_its_own_images_over_the_tensor_axis_too(tiny_config):
    """``media_batch``: under data 2 x fsdp 2 x tensor 2 the vision encoder splits each batch
    shard's 5 images (padded to 6) over the tensor axis, 3 per device where the LM's batch axes
    (data x fsdp) alone would give 5; the visual tokens are unchanged."""
    import numpy as np

    from flamingo_jax.models.flamingo import create_flamingo
    from flamingo_jax.train.params import init_params, merge_model

    mesh = sharding.create_mesh(MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tensor"))
    rules = sharding.RULE_SETS["fsdp_tensor"]
    vision = tiny_config.vision
    size = vision.image_size
    images = np.random.default_rng(0).normal(size=(4, 5, 1, size, size, 3)).astype(np.float32)
    with sharding.activation_sharding(mesh, rules):
        assert sharding.shards_of("media_batch") == 8 and sharding.shards_of("act_batch") == 4
        assert sharding.shards_of("media_split") == 2
        graphdef, trainable, frozen = init_params(tiny_config, mesh, rules, seed=0)

    def encode(trainable, frozen, images):
        with sharding.activation_sharding(mesh, rules):
            return merge_model(graphdef, trainable, frozen).encode_media(images)

    sharded = jax.jit(encode).lower(trainable, frozen, images).compile()
    expected = jax.jit(create_flamingo(tiny_config, seed=0).encode_media)
    np.testing.assert_allclose(sharded(trainable, frozen, images), expected(images), rtol=2e-5, atol=2e-5)
    per_device = sharded.cost_analysis()["flops"]
    single = expected.lower(images).compile().cost_analysis()["flops"]
    assert per_device < 0.2 * single, (per_device, single)  # 3 images of 20 per device, not 5


def test_supplied_parameters_replace_their_init_and_leave_the_others_bit_equal(tiny_config):
    """``init_params(..., supplied=)``, as a run with pretrained weights or ``init_from`` calls it:
    the supplied arrays come back as given, on their targets' shardings; every other parameter
    equals the plain init's, bit for bit (its random draws do not depend on which are skipped)."""
    import numpy as np

    from flamingo_jax.train.params import init_params, param_targets

    mesh = sharding.create_mesh(MeshConfig(data=2, fsdp=4, rules="fsdp"))
    rules = sharding.RULE_SETS["fsdp"]
    _, trainable, frozen = init_params(tiny_config, mesh, rules, seed=0)
    trainable_targets, frozen_targets = param_targets(tiny_config, mesh, rules)
    assert {k: (t.shape, t.dtype, t.sharding) for k, t in frozen_targets.items()} == {
        k: (v.shape, v.dtype, v.sharding) for k, v in frozen.items()
    }
    # Every frozen LM weight and one trainable weight supplied, as loaded files would be.
    chosen = [key for key in frozen_targets if key.startswith("lm/")] + [next(iter(trainable_targets))]
    assert len(chosen) > 5
    targets = {**trainable_targets, **frozen_targets}
    supplied = {
        key: jax.device_put(np.full(targets[key].shape, 0.5, targets[key].dtype), targets[key].sharding)
        for key in chosen
    }
    _, trainable2, frozen2 = init_params(tiny_config, mesh, rules, seed=0, supplied=supplied)
    assert list(trainable2) == list(trainable) and list(frozen2) == list(frozen)
    plain_init = {**trainable, **frozen}
    for key, value in {**trainable2, **frozen2}.items():
        if key in supplied:
            assert value is supplied[key], key
        else:
            plain = plain_init[key]
            assert value.sharding == plain.sharding, key
            np.testing.assert_array_equal(np.asarray(value), np.asarray(plain), err_msg=key)
