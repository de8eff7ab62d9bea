"""CLIP ViT import vs transformers' CLIPVisionModel, and the OpenFlamingo importer vs the
open-flamingo package's Perceiver Resampler and gated cross-attention modules (same random
weights on both sides)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [reference] extra (torch, transformers)")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from references import openflamingo_module  # noqa: E402

from flamingo_jax import configs  # noqa: E402
from flamingo_jax.importers import clip, openflamingo  # noqa: E402
from flamingo_jax.importers.pretrained import assign  # noqa: E402
from flamingo_jax.models.flamingo import Flamingo  # noqa: E402
from flamingo_jax.models.layers import CountingRngs  # noqa: E402
from flamingo_jax.models.resampler import PerceiverResampler, ResamplerConfig  # noqa: E402
from flamingo_jax.models.vit import ViT  # noqa: E402
from flamingo_jax.models.xattn import GatedCrossAttentionBlock, XAttnConfig, media_attention_mask  # noqa: E402

pytestmark = pytest.mark.reference


def _numpy_state(module):
    return {key: value.detach().numpy() for key, value in module.state_dict().items()}


def _randomize(module, seed):
    """Random values everywhere, gates and norms included, so no mapping error hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(
                torch.randn(parameter.shape, generator=generator) * 0.2 + (0.5 if parameter.ndim <= 1 else 0)
            )


def _build(cls, config):
    with nnx.use_eager_sharding(False):
        return cls(config, rngs=CountingRngs(1))


@pytest.fixture(scope="module")
def hf_clip():
    hf_config = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    model = transformers.CLIPVisionModel(hf_config).float().eval()
    _randomize(model, 0)
    return hf_config, model


def test_hf_clip_vision_parity(hf_clip):
    hf_config, model = hf_clip
    config = clip.vit_config_from_hf(hf_config.to_dict())
    ours = _build(ViT, config)
    assign(ours, clip.from_hf_clip_vision(_numpy_state(model), config))
    images = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model(pixel_values=torch.tensor(images))
    actual = np.asarray(ours(images.transpose(0, 2, 3, 1)))
    assert np.abs(actual - expected.last_hidden_state.numpy()).max() <= 1e-4
    pooled = _build(ViT, dataclasses.replace(config, post_norm_tokens=True))
    assign(pooled, clip.from_hf_clip_vision(_numpy_state(model), config))
    cls = np.asarray(pooled(images.transpose(0, 2, 3, 1)))[:, 0]
    assert np.abs(cls - expected.pooler_output.numpy()).max() <= 1e-4


def test_open_clip_layout_gives_the_same_model(hf_clip):
    """The open_clip layout (fused in_proj, conv1, ln_pre/ln_post, c_fc/c_proj) written from the
    same weights imports to the same parameters."""
    hf_config, model = hf_clip
    config = clip.vit_config_from_hf(hf_config.to_dict())
    hf = {k.removeprefix("vision_model."): v for k, v in _numpy_state(model).items()}
    state = {
        "visual.conv1.weight": hf["embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf["embeddings.class_embedding"],
        "visual.positional_embedding": hf["embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf["pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf["pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["post_layernorm.weight"],
        "visual.ln_post.bias": hf["post_layernorm.bias"],
    }
    for i in range(config.depth):
        theirs, ours = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for suffix in ("weight", "bias"):
            state[ours + f"attn.in_proj_{suffix}"] = np.concatenate(
                [hf[theirs + f"self_attn.{p}_proj.{suffix}"] for p in "qkv"], axis=0
            )
            state[ours + f"attn.out_proj.{suffix}"] = hf[theirs + f"self_attn.out_proj.{suffix}"]
            state[ours + f"mlp.c_fc.{suffix}"] = hf[theirs + f"mlp.fc1.{suffix}"]
            state[ours + f"mlp.c_proj.{suffix}"] = hf[theirs + f"mlp.fc2.{suffix}"]
            state[ours + f"ln_1.{suffix}"] = hf[theirs + f"layer_norm1.{suffix}"]
            state[ours + f"ln_2.{suffix}"] = hf[theirs + f"layer_norm2.{suffix}"]
    from_open_clip = clip.from_open_clip_visual(state, config)
    from_hf = clip.from_hf_clip_vision(_numpy_state(model), config)
    assert from_open_clip.keys() == from_hf.keys()
    for key, value in from_hf.items():
        np.testing.assert_array_equal(from_open_clip[key], value, err_msg=key)


def _openflamingo_helpers():
    return openflamingo_module("helpers")


def _close(actual, expected):
    return np.abs(actual - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("frames", [1, 3])
def test_perceiver_resampler_parity(frames):
    helpers = _openflamingo_helpers()
    reference = helpers.PerceiverResampler(dim=32, depth=2, dim_head=16, heads=4, num_latents=8, max_num_frames=4)
    _randomize(reference, 1)
    config = ResamplerConfig(
        width=32, depth=2, num_heads=4, head_dim=16, num_latents=8, max_frames=4, activation="gelu"
    )
    ours = _build(PerceiverResampler, config)
    assign(ours, openflamingo.resampler_params(_numpy_state(reference), depth=2, prefix=""))
    features = np.random.default_rng(2).normal(size=(2, 3, frames, 5, 32)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.tensor(features)).numpy()
    assert _close(np.asarray(ours(features)), expected) <= 1e-5


@pytest.mark.parametrize("attend", ["last", "all_previous"])
def test_gated_cross_attention_parity(attend):
    helpers = _openflamingo_helpers()
    reference = helpers.GatedCrossAttentionBlock(
        dim=48, dim_visual=32, dim_head=16, heads=4, ff_mult=2, only_attend_immediate_media=attend == "last"
    )
    _randomize(reference, 3)
    config = XAttnConfig(
        num_heads=4, head_dim=16, ffw_mult=2, activation="gelu", attend=attend, placement="openflamingo"
    )
    with nnx.use_eager_sharding(False):
        ours = GatedCrossAttentionBlock(config, 48, 32, param_dtype="float32", dtype="float32", rngs=CountingRngs(0))
    state = {f"block.{k}": v for k, v in _numpy_state(reference).items()}
    assign(ours, openflamingo.xattn_block_params(state, "block."))
    rng = np.random.default_rng(4)
    text = rng.normal(size=(2, 10, 48)).astype(np.float32)
    media = rng.normal(size=(2, 3, 8, 32)).astype(np.float32)
    locations = np.zeros((2, 10), bool)
    locations[:, [1, 4, 7]] = True  # <image> positions: tokens 0 sees no image
    with torch.no_grad():
        expected = reference(torch.tensor(text), torch.tensor(media), media_locations=torch.tensor(locations)).numpy()
    image_index = np.cumsum(locations, axis=1) - 1
    mask = media_attention_mask(image_index, np.ones((2, 3), bool), 8, attend)
    actual = np.asarray(ours(text, ours.media_kv(media), mask))
    if attend == "all_previous":
        # OpenFlamingo lets tokens before any image attend to every image in this mode; ours
        # gives them no cross-attention (DESIGN.md). Compare the tokens after the first image.
        actual, expected = actual[:, 1:], expected[:, 1:]
    assert _close(actual, expected) <= 1e-5


@pytest.mark.parametrize(
    "block_prefix",
    [
        "lang_encoder.gated_cross_attn_layers.{}.",
        # The released v2 files: the blocks inside the wrapped decoder layers (MPT's names).
        "lang_encoder.transformer.blocks.{}.gated_cross_attn_layer.",
    ],
)
def test_openflamingo_checkpoint_maps_onto_the_openflamingo_config(block_prefix):
    helpers = _openflamingo_helpers()
    config = configs.load_model_config(
        "models/tiny.gin",
        [
            "XAttnConfig.placement = 'openflamingo'",
            "ResamplerConfig.max_frames = 0",
            "XAttnConfig.head_dim = 16",
            "XAttnConfig.activation = 'gelu'",
            "ResamplerConfig.activation = 'gelu'",
        ],
    )
    assert config.xattn_layer_indices == (1, 3)
    resampler = helpers.PerceiverResampler(dim=48, depth=2, dim_head=16, heads=2, num_latents=4)
    state = {f"perceiver.{k}": v for k, v in _numpy_state(resampler).items()}
    gates = {}
    for layer in (1, 3):
        block = helpers.GatedCrossAttentionBlock(dim=64, dim_visual=48, dim_head=16, heads=4, ff_mult=4)
        with torch.no_grad():
            block.attn_gate.fill_(0.1 * layer)
        state.update({block_prefix.format(layer) + k: v for k, v in _numpy_state(block).items()})
        gates[layer] = float(block.attn_gate.detach())
    embeddings = np.random.default_rng(0).normal(size=(131, 64)).astype(np.float32)
    head = np.random.default_rng(1).normal(size=(131, 64)).astype(np.float32)
    state["lang_encoder.transformer.wte.weight"] = embeddings
    state["lang_encoder.embed_out.weight"] = head
    params = openflamingo.flamingo_params(
        state,
        config,
        media_token_index=129,
        endofchunk_token_index=128,
        input_embeddings_key="lang_encoder.transformer.wte.weight",
        output_embeddings_key="lang_encoder.embed_out.weight",
    )
    model = _build(Flamingo, config)
    assign(model, params)
    assert [float(model.xattn_layers[position].attn_gate[...]) for position in (0, 1)] == [gates[1], gates[3]]
    # OpenFlamingo trains the whole input embedding: its base rows replace the LM's.
    np.testing.assert_array_equal(np.asarray(model.new_tokens.embed[...]), embeddings[[129, 128]])
    np.testing.assert_array_equal(np.asarray(model.lm.embed[...]), embeddings[:128])
    np.testing.assert_array_equal(np.asarray(model.lm.lm_head.linear.kernel[...]), head[:128].T)
    np.testing.assert_array_equal(np.asarray(model.new_tokens.head[...]), head[[129, 128]].T)
    with pytest.raises(ValueError, match="checkpoint has no 'lang_encoder.wte'"):
        openflamingo.flamingo_params(
            state, config, media_token_index=129, endofchunk_token_index=128, input_embeddings_key="lang_encoder.wte"
        )
    every_layer = configs.load_model_config(
        "models/tiny.gin", ["XAttnConfig.placement = 'openflamingo'", "XAttnConfig.every = 1"]
    )
    with pytest.raises(ValueError, match="blocks before LM layers \\[1, 3\\], the config expects \\[0, 1, 2, 3\\]"):
        openflamingo.flamingo_params(state, every_layer)
