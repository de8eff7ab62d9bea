"""The Flamingo paper's architecture ablations as switches (its Table 3), each checked for its
defining property: no tanh gating, vanilla cross-attention (no dense block), grafting (the blocks
stacked on top of the frozen LM), and the cross-attention frequency."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from flamingo_jax import configs
from flamingo_jax.models import layers
from flamingo_jax.models.flamingo import create_flamingo
from flamingo_jax.models.kinds import count_params, trainable_filter
from flamingo_jax.models.llama import KVCache
from flamingo_jax.models.xattn import XAttnConfig, media_attention_mask
from flamingo_jax.train.params import flatten_state, path_key
from flamingo_jax.train.step import gate_values

from conftest import jit_forward, make_batch


def _with_xattn(config, **changes):
    return dataclasses.replace(config, xattn=dataclasses.replace(config.xattn, **changes))


def _block_params(config) -> tuple[int, int]:
    """(cross-attention, dense) parameters of one block of ``config``, counted by hand: a
    LayerNorm (scale and bias), q / k / v / out projections without biases and a scalar gate;
    a LayerNorm, two feed-forward matrices and a scalar gate."""
    width, media = config.lm.width, config.resampler.width
    inner = config.xattn.num_heads * (config.xattn.head_dim or width // config.xattn.num_heads)
    hidden = width * config.xattn.ffw_mult
    attention = 2 * width + width * inner + 2 * media * inner + inner * width + 1
    dense = 2 * width + 2 * width * hidden + 1
    return attention, dense


def _xattn_params(model) -> int:
    return count_params(model.xattn_layers)


def test_hand_counted_block_parameters(tiny_config):
    attention, dense = _block_params(tiny_config)
    model = nnx.eval_shape(lambda: create_flamingo(tiny_config))
    assert _xattn_params(model) == len(tiny_config.xattn_layer_indices) * (attention + dense)


@pytest.mark.parametrize(
    ("every", "first_layer", "indices"),
    [(1, 0, (0, 1, 2, 3)), (2, 0, (0, 2)), (4, 0, (0,)), (4, 2, (2,))],  # the last: once, in the middle
)
def test_xattn_frequency_sets_block_and_parameter_count(tiny_config, every, first_layer, indices):
    config = _with_xattn(tiny_config, every=every, first_layer=first_layer)
    assert config.xattn_layer_indices == indices
    model = nnx.eval_shape(lambda: create_flamingo(config))
    assert len(model.xattn_layers) == len(indices)
    assert _xattn_params(model) == len(indices) * sum(_block_params(config))


def test_without_tanh_gating_the_initial_model_is_not_the_frozen_lm(tiny_config):
    batch = make_batch(tiny_config)
    gated = jit_forward(create_flamingo(tiny_config))(batch.tokens, batch.image_index, batch.image_mask, batch.images)
    config = _with_xattn(tiny_config, gating="none")
    model = create_flamingo(config)
    ungated = jit_forward(model)(batch.tokens, batch.image_index, batch.image_mask, batch.images)
    # The same seed: the same weights, less the two alphas per block; tanh(0) = 0 silenced them.
    assert _xattn_params(model) == _xattn_params(create_flamingo(tiny_config)) - 2 * len(model.xattn_layers)
    assert not gate_values(flatten_state(nnx.state(model, nnx.Param)))
    assert gate_values(flatten_state(nnx.state(create_flamingo(tiny_config), nnx.Param)))
    difference = np.abs(np.asarray(ungated) - np.asarray(gated))
    assert difference.max() > 1e-3
    # Even tokens before the first image differ: the ungated dense block reads every token.
    before = batch.image_index[0] < 0
    assert before.any() and difference[0, before].max() > 1e-3
    # With zero output projections the ungated model starts as the frozen LM again.
    zero = create_flamingo(_with_xattn(config, init="zero_output"))
    start = jit_forward(zero)(batch.tokens, batch.image_index, batch.image_mask, batch.images)
    np.testing.assert_allclose(np.asarray(start), np.asarray(gated), atol=1e-5)


def test_vanilla_cross_attention_has_no_dense_block(tiny_config):
    config = _with_xattn(tiny_config, dense=False, init="zero_output")
    model = create_flamingo(config)
    attention, _ = _block_params(config)
    assert _xattn_params(model) == len(config.xattn_layer_indices) * attention
    assert all(block.ffw is None and block.ffw_gate is None for block in model.xattn_layers)
    # A block adds exactly its gated attention: set its output projection, and nothing else moves.
    batch = make_batch(config)
    hidden = np.random.default_rng(0).normal(size=(2, batch.tokens.shape[1], config.lm.width)).astype(np.float32)
    block = model.xattn_layers[0]
    block.to_out.linear.kernel[...] = np.random.default_rng(1).normal(size=block.to_out.linear.kernel.shape)
    media_kv = model.media_kv(model.encode_media(batch.images))[0]
    mask = media_attention_mask(batch.image_index, batch.image_mask, config.resampler.num_latents, "last")
    out = np.asarray(block(hidden, media_kv, mask))
    query = block.to_q(layers.apply_norm(block.norm, hidden)).reshape(2, -1, config.xattn.num_heads, 16)
    attended = layers.dot_product_attention(query, media_kv[0], media_kv[1], mask).reshape(2, hidden.shape[1], -1)
    expected = hidden + np.tanh(float(block.attn_gate[...])) * np.asarray(block.to_out(attended))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_grafted_blocks_run_on_top_of_the_frozen_lm(tiny_config):
    config = _with_xattn(tiny_config, placement="graft", init="zero_output")
    assert config.xattn_layer_indices == (4, 4)  # as many blocks as 'paper' places, after layer 3
    model = create_flamingo(config)
    for block in model.xattn_layers:  # non-zero outputs, so that the blocks matter
        for dense in (block.to_out, block.ffw.output):
            dense.linear.kernel[...] = 0.1 * np.random.default_rng(2).normal(size=dense.linear.kernel.shape)
    batch = make_batch(config)
    logits = np.asarray(jit_forward(model)(batch.tokens, batch.image_index, batch.image_mask, batch.images))
    # By hand: the whole frozen LM on the text, then the blocks in order, the final norm, the head.
    hidden, _ = model.lm.backbone(model.embed_tokens(batch.tokens), final_norm=False)
    mask = media_attention_mask(batch.image_index, batch.image_mask, config.resampler.num_latents, "last")
    for block, kv in zip(model.xattn_layers, model.media_kv(model.encode_media(batch.images)), strict=True):
        hidden = block(hidden, kv, mask)
    expected = np.asarray(model.head(model.lm.final_norm(hidden)))
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
    lm_only = np.asarray(model.head(model.lm.backbone(model.embed_tokens(batch.tokens))[0]))
    assert np.abs(logits - lm_only).max() > 1e-3
    # Training backpropagates through no frozen layer: the loss from the LM's top.
    loss = jax.jit(lambda m, b: m.train_loss(b)[0])
    unique = jax.jit(lambda m, b: m.train_loss(b, unique_rows=2)[0])
    np.testing.assert_allclose(float(unique(model, batch)), float(loss(model, batch)), rtol=1e-5)
    # Cached decoding: the blocks on top see each new token, as in the full pass.
    graphdef, state = nnx.split(model)
    media_kv = model.media_kv(model.encode_media(batch.images))
    step = jax.jit(lambda s, t, i, c: nnx.merge(graphdef, s)(t, i, batch.image_mask, media_kv=media_kv, cache=c))
    cache = KVCache.create(config.lm, batch_size=2, max_length=16)
    pieces, cache = step(state, batch.tokens[:, :6], batch.image_index[:, :6], cache)
    pieces = [np.asarray(pieces)]
    for t in range(6, batch.tokens.shape[1]):
        out, cache = step(state, batch.tokens[:, t : t + 1], batch.image_index[:, t : t + 1], cache)
        pieces.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), logits, atol=2e-5, rtol=1e-5)


def test_scanned_grafted_model_equals_unscanned(tiny_config):
    config = _with_xattn(tiny_config, placement="graft", gating="none")  # random block outputs
    batch = make_batch(config)
    scanned = dataclasses.replace(config, lm=dataclasses.replace(config.lm, scan_layers=True))
    outputs = [
        np.asarray(jit_forward(create_flamingo(c))(batch.tokens, batch.image_index, batch.image_mask, batch.images))
        for c in (config, scanned)
    ]
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)


def test_unknown_gating_is_rejected():
    with pytest.raises(ValueError, match="XAttnConfig.gating must be one of"):
        XAttnConfig(gating="sigmoid")


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_resampler_alternatives_keep_every_feature(tiny_config, kind):
    """The ablation's MLP and Transformer in place of the Perceiver Resampler: a visual token per
    vision feature (frames x positions); the MLP reads each feature alone, the Transformer all."""
    config = dataclasses.replace(tiny_config, resampler=dataclasses.replace(tiny_config.resampler, kind=kind))
    model = create_flamingo(config)
    assert model.resampler.latents is None
    features_per_frame = config.vision.num_output_tokens
    width = config.vision.output_dim
    features = np.random.default_rng(0).normal(size=(2, 3, 2, features_per_frame, width)).astype(np.float32)
    out = np.asarray(model.resampler(features))
    tokens = config.resampler.tokens_per_medium(features_per_frame, num_frames=2)
    assert tokens == 2 * features_per_frame != config.resampler.num_latents
    assert out.shape == (2, 3, tokens, config.resampler.width)
    moved = features.copy()
    moved[0, 1, 1, 0] += 1.0  # medium 1's second frame, first position
    changed = np.abs(np.asarray(model.resampler(moved)) - out).max(axis=-1) > 1e-6
    assert not changed[1].any() and not changed[0, [0, 2]].any()  # other media untouched
    if kind == "mlp":
        assert changed[0, 1].tolist() == [i == features_per_frame for i in range(tokens)]
    else:
        assert changed[0, 1].all()
    # In the whole model, each text token still sees only the visual tokens of its image.
    batch = make_batch(config)
    logits = np.asarray(jit_forward(model)(batch.tokens, batch.image_index, batch.image_mask, batch.images))
    assert np.isfinite(logits).all()
    keys = model.media_kv(model.encode_media(batch.images))[0][0]
    assert keys.shape[1] == batch.images.shape[1] * config.resampler.tokens_per_medium(features_per_frame)


def test_unknown_resampler_kind_is_rejected(tiny_config):
    with pytest.raises(ValueError, match="ResamplerConfig.kind must be one of"):
        dataclasses.replace(tiny_config.resampler, kind="qformer")


_ABLATION_GINS = {
    # file: (what it sets, the demo model's blocks: their count and their LM layers)
    "no_tanh_gating": ({"gating": "none"}, (6, (18, 20, 22, 24, 26, 28))),
    "vanilla_xattn": ({"dense": False}, (6, (18, 20, 22, 24, 26, 28))),
    "graft": ({"placement": "graft"}, (6, (30,) * 6)),
    "xattn_every_1": ({"every": 1}, (12, tuple(range(18, 30)))),
    "xattn_every_4": ({"every": 4}, (3, (18, 22, 26))),
    "xattn_once": ({"first_layer": 24}, (1, (24,))),
    "resampler_mlp": ({}, (6, (18, 20, 22, 24, 26, 28))),
    "resampler_transformer": ({}, (6, (18, 20, 22, 24, 26, 28))),
    "lm_finetuned": ({}, (6, (18, 20, 22, 24, 26, 28))),
    "lm_lora": ({}, (6, (18, 20, 22, 24, 26, 28))),
    "mixture_sampled": ({}, (6, (18, 20, 22, 24, 26, 28))),
    "connector_mlp": ({}, (0, ())),
    "connector_qformer": ({}, (0, ())),
}


@pytest.mark.parametrize("name", sorted(_ABLATION_GINS))
def test_ablation_gin_files_on_the_demo(name):
    """Each experiments/ablations file on top of the demo's: it sets its switch, and the demo's
    30-layer LM gets the blocks the file's comment says."""
    configs.parse_gin(["flamingo_jax/demo/demo_cpu.gin", f"ablations/{name}.gin"])
    model = configs.run_config().model
    fields, (count, indices) = _ABLATION_GINS[name]
    assert {key: getattr(model.xattn, key) for key in fields} == fields
    assert model.xattn_layer_indices == indices and len(indices) == count
    if name.startswith("resampler_"):
        assert model.resampler.kind == name.split("_")[1]
    if name.startswith("lm_"):
        assert ("lm" in model.trainable) == (name == "lm_finetuned")
        assert model.lm.lora_rank == (16 if name == "lm_lora" else 0)
    assert (configs.run_config().mixture_strategy == "sample") == (name == "mixture_sampled")
    assert model.connector.kind == (name.split("_")[1] if name.startswith("connector_") else "xattn")
    text = pathlib.Path(configs.resolve_gin_file(f"ablations/{name}.gin")).read_text()
    # The paper's row it reproduces (LoRA and the connectors are not in Flamingo's Table 3).
    assert text.startswith("# Flamingo Table 3 (") or name in ("lm_lora", "connector_mlp", "connector_qformer")


def _lora_config(tiny_config, rank=2, targets=("q_proj", "v_proj", "down_proj")):
    return dataclasses.replace(
        tiny_config,
        lm=dataclasses.replace(tiny_config.lm, lora_rank=rank, lora_targets=targets),
        trainable=(*tiny_config.trainable, "lora"),
    )


def test_lora_starts_as_the_lm_and_trains_only_its_adapters(tiny_config):
    """LoRA on chosen projections: the same model at the start (the adapters' B is zero), the
    frozen weights bit-equal after optimizer steps, and optimizer state for the adapters (and the
    Flamingo groups) only."""
    config = _lora_config(tiny_config)
    model = create_flamingo(config)
    plain = create_flamingo(tiny_config)
    batch = make_batch(config)
    text = batch.tokens % config.lm.vocab_size
    np.testing.assert_array_equal(np.asarray(model.lm(text)[0]), np.asarray(plain.lm(text)[0]))
    layer = model.lm.layers[0]
    assert layer.attention.q_proj.lora_a.shape == (64, 2) and layer.attention.k_proj.lora_a is None
    assert layer.mlp.down_proj.lora_b.shape == (2, 64)
    flt = trainable_filter(config)
    trained = {path_key(p) for p, _ in nnx.to_flat_state(nnx.state(model, flt))}
    lm_trained = sorted(key for key in trained if key.startswith("lm/"))
    assert lm_trained and all(key.rsplit("/", 1)[1] in ("lora_a", "lora_b") for key in lm_trained)
    assert len(lm_trained) == 2 * 3 * config.lm.num_layers  # a and b, three targets, every layer
    frozen_before = {path_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(flt)))}

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=flt)
    leaves = jax.tree.leaves(nnx.state(optimizer.opt_state))
    moments = sum(int(np.size(x)) for x in leaves if np.issubdtype(x.dtype, np.floating))
    assert moments == 2 * count_params(model, flt)

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            return model.train_loss(batch)[0]

        grads = nnx.grad(loss, argnums=nnx.DiffState(0, flt))(model)
        optimizer.update(model, grads)

    for _ in range(3):
        step(model, optimizer)
    after = {path_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(flt)))}
    assert after.keys() == frozen_before.keys()
    for key, value in frozen_before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    assert np.abs(np.asarray(model.lm.layers[0].attention.q_proj.lora_b[...])).max() > 0


def test_fine_tuning_the_lm_reaches_its_weights(tiny_config):
    """The paper's unfrozen-LM row: with 'lm' trainable, every LM layer's weights get gradients."""
    config = dataclasses.replace(tiny_config, trainable=(*tiny_config.trainable, "lm"))
    model = create_flamingo(config)
    batch = make_batch(config)
    grads = nnx.grad(lambda m: m.train_loss(batch)[0], argnums=nnx.DiffState(0, trainable_filter(config)))(model)
    flat = {path_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    for index in range(config.lm.num_layers):
        assert np.abs(flat[f"lm/layers/{index}/mlp/down_proj/linear/kernel"]).max() > 0


def test_lora_switches_must_agree(tiny_config):
    with pytest.raises(ValueError, match="'lora' exactly when LlamaConfig.lora_rank > 0"):
        dataclasses.replace(tiny_config, trainable=(*tiny_config.trainable, "lora"))
    with pytest.raises(ValueError, match="'lora' exactly when"):
        dataclasses.replace(tiny_config, lm=dataclasses.replace(tiny_config.lm, lora_rank=4))
    with pytest.raises(ValueError, match="lora_targets"):
        dataclasses.replace(tiny_config.lm, lora_targets=("qkv",))
