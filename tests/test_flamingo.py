"""Flamingo model behaviour: exact LM equivalence at init, per-image conditioning, padding,
KV-cache decoding, video, and which parameters train."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flamingo_jax.models.flamingo import TRAINABLE_GROUPS, FlamingoConfig, create_flamingo
from flamingo_jax.models.kinds import count_params, trainable_filter
from flamingo_jax.models.llama import KVCache
from flamingo_jax.models.nfnet import NFNetConfig
from flamingo_jax.models.xattn import XAttnConfig, media_attention_mask

from conftest import LM_FAMILIES, jit_forward, make_batch, set_gates, with_lm_family


def _forward_batch(model, batch):
    return np.asarray(jit_forward(model)(batch.tokens, batch.image_index, batch.image_mask, batch.images))


def test_gates_start_at_zero(tiny_config):
    model = create_flamingo(tiny_config)
    gates = [float(b.attn_gate[...]) for b in model.xattn_layers] + [float(b.ffw_gate[...]) for b in model.xattn_layers]
    assert len(gates) == 2 * len(tiny_config.xattn_layer_indices) > 0
    assert gates == [0.0] * len(gates)


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_zero_gates_equal_frozen_lm_exactly(tiny_config, family):
    tiny_config = with_lm_family(tiny_config, family)
    model = create_flamingo(tiny_config)
    vocab = tiny_config.lm.vocab_size
    batch = make_batch(tiny_config)
    rng = np.random.default_rng(1)
    # Text from the base vocabulary: the frozen LM alone can read it.
    text = rng.integers(0, vocab, batch.tokens.shape).astype(np.int32)
    lm_logits = jax.jit(lambda t: model.lm(t)[0])(text)
    for seed in range(2):  # arbitrary images, same logits
        images = rng.normal(size=batch.images.shape).astype(np.float32) * (1 + 10 * seed)
        logits = np.asarray(jit_forward(model)(text, batch.image_index, batch.image_mask, images))
        np.testing.assert_array_equal(logits[..., :vocab], np.asarray(lm_logits))
    # With <image> tokens in the text: equal to the LM run on the same embeddings.
    logits = _forward_batch(model, batch)
    hidden, _ = jax.jit(lambda t: model.lm.backbone(model.embed_tokens(t)))(batch.tokens)
    np.testing.assert_array_equal(logits[..., :vocab], np.asarray(jax.jit(model.lm.logits)(hidden)))
    assert logits.shape[-1] == tiny_config.total_vocab_size


def test_zero_output_init_is_the_frozen_lm_and_trains_its_outputs_first(tiny_config):
    config = dataclasses.replace(tiny_config, xattn=dataclasses.replace(tiny_config.xattn, init="zero_output"))
    model = create_flamingo(config)
    paper = create_flamingo(tiny_config)
    batch = make_batch(config)
    rng = np.random.default_rng(3)
    images = rng.normal(size=batch.images.shape).astype(np.float32)
    logits = np.asarray(jit_forward(model)(batch.tokens, batch.image_index, batch.image_mask, images))
    np.testing.assert_array_equal(logits, _forward_batch(paper, batch))
    for block in model.xattn_layers:
        assert float(block.attn_gate[...]) == float(block.ffw_gate[...]) == config.xattn.gate_init != 0
    # The gradient reaches the output projections at once, with the gates' sign already fixed.
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(config), ...)

    def loss_fn(trainable):
        out, _ = nnx.merge(graphdef, trainable, frozen)(batch.tokens, batch.image_index, batch.image_mask, images)
        return (out[:, :-1] * jax.nn.one_hot(batch.tokens[:, 1:], out.shape[-1])).sum()

    grads = jax.jit(jax.grad(loss_fn))(trainable)
    for block in grads["xattn_layers"].values():
        assert np.abs(np.asarray(block["to_out"]["linear"]["kernel"][...])).max() > 0
        assert np.abs(np.asarray(block["ffw"]["fc2"]["linear"]["kernel"][...])).max() > 0
    with pytest.raises(ValueError, match="XAttnConfig.init"):
        XAttnConfig(init="ones")


@pytest.mark.parametrize("attend", ["last", "all_previous"])
def test_changing_image_k_changes_only_its_tokens(tiny_config, attend):
    """Directly (in each xattn block) a token sees only image ``image_index`` (or all previous
    ones); through the LM's causal self-attention every later token then depends on it too
    (Flamingo Section 2.3), while tokens before image k never change."""
    config = dataclasses.replace(tiny_config, xattn=dataclasses.replace(tiny_config.xattn, attend=attend))
    model = create_flamingo(config)
    set_gates(model, 0.7)
    forward = jit_forward(model)
    batch = make_batch(config, batch_size=1, num_media=3)
    block = model.xattn_layers[0]
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(1, batch.tokens.shape[1], config.lm.width)), jnp.float32)
    mask = media_attention_mask(batch.image_index, batch.image_mask, config.resampler.num_latents, attend)
    block_out = jax.jit(lambda images: block(hidden, block.media_kv(model.encode_media(images)), mask))
    base = np.asarray(forward(batch.tokens, batch.image_index, batch.image_mask, batch.images))
    base_block = np.asarray(block_out(batch.images))
    index = batch.image_index[0]
    for k in range(3):
        images = batch.images.copy()
        images[0, k] = np.random.default_rng(10 + k).normal(size=images.shape[2:])
        direct = np.abs(np.asarray(block_out(images)) - base_block).max(-1)[0]
        expected = index == k if attend == "last" else index >= k
        assert (direct[expected] > 1e-5).all(), (k, direct)
        np.testing.assert_array_equal(direct[~expected], 0.0)

        changed = np.abs(np.asarray(forward(batch.tokens, batch.image_index, batch.image_mask, images)) - base).max(-1)[
            0
        ]
        first = int(np.argmax(index == k))
        assert (changed[first:] > 1e-5).all(), (k, changed)
        np.testing.assert_array_equal(changed[:first], 0.0)
        assert (changed[index == -1] == 0).all()  # tokens before the first image never change


def test_padded_image_slots_have_no_effect(tiny_config):
    model = create_flamingo(tiny_config)
    set_gates(model, 0.9)
    forward = jit_forward(model)
    batch = make_batch(tiny_config, batch_size=2, num_media=3)
    assert not batch.image_mask[1, 2]
    base = np.asarray(forward(batch.tokens, batch.image_index, batch.image_mask, batch.images))
    images = batch.images.copy()
    images[1, 2] = 1e4  # huge values in the padded slot
    np.testing.assert_array_equal(np.asarray(forward(batch.tokens, batch.image_index, batch.image_mask, images)), base)
    # Dropping the padded slot entirely gives the same logits too.
    trimmed = np.asarray(
        forward(batch.tokens[1:], batch.image_index[1:], batch.image_mask[1:, :2], batch.images[1:, :2])
    )
    np.testing.assert_allclose(trimmed, base[1:], atol=1e-5)


def test_tokens_without_image_get_zero_cross_attention(tiny_config):
    model = create_flamingo(tiny_config)
    set_gates(model, 1.0)
    block = model.xattn_layers[0]
    batch = make_batch(tiny_config, batch_size=1)
    visual = model.encode_media(batch.images)
    mask = media_attention_mask(batch.image_index, batch.image_mask, tiny_config.resampler.num_latents, "last")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, batch.tokens.shape[1], tiny_config.lm.width)), jnp.float32)
    block.ffw_gate[...] = 0.0
    out = block(x, block.media_kv(visual), mask)
    no_image = batch.image_index[0] == -1
    assert no_image.any()
    np.testing.assert_array_equal(np.asarray(out)[0, no_image], np.asarray(x)[0, no_image])
    assert np.abs(np.asarray(out - x)[0, ~no_image]).min() > 0


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_kv_cache_decoding_matches_full_forward(tiny_config, family):
    tiny_config = with_lm_family(tiny_config, family)
    model = create_flamingo(tiny_config)
    set_gates(model, 0.5)
    batch = make_batch(tiny_config, batch_size=2, length=12)
    full = _forward_batch(model, batch)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, image_index, media_kv, cache):
        return nnx.merge(graphdef, state)(tokens, image_index, batch.image_mask, media_kv=media_kv, cache=cache)

    media_kv = jax.jit(lambda s, im: nnx.merge(graphdef, s).media_kv(nnx.merge(graphdef, s).encode_media(im)))(
        state, batch.images
    )
    cache = KVCache.create(tiny_config.lm, batch_size=2, max_length=16)
    # Prefill the first 5 tokens at once, then decode one token at a time.
    logits, cache = step(state, batch.tokens[:, :5], batch.image_index[:, :5], media_kv, cache)
    pieces = [np.asarray(logits)]
    for t in range(5, 12):
        logits, cache = step(state, batch.tokens[:, t : t + 1], batch.image_index[:, t : t + 1], media_kv, cache)
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=2e-5, rtol=1e-5)
    assert int(cache.end) == 12
    # A prefill that projects only its last position onto the vocabulary (evaluation's prompts).
    last, last_cache = nnx.merge(graphdef, state)(
        batch.tokens[:, :5],
        batch.image_index[:, :5],
        batch.image_mask,
        media_kv=media_kv,
        cache=KVCache.create(tiny_config.lm, batch_size=2, max_length=16),
        last_only=True,
    )
    assert last.shape == (2, 1, full.shape[-1])
    np.testing.assert_allclose(np.asarray(last), full[:, 4:5], atol=2e-5, rtol=1e-5)
    assert int(last_cache.end) == 5


def test_left_padded_cache_matches_unpadded(tiny_config):
    lm = create_flamingo(tiny_config).lm
    tokens = np.random.default_rng(3).integers(0, tiny_config.lm.vocab_size, (1, 6)).astype(np.int32)
    reference = np.asarray(lm(tokens)[0])
    padded = np.concatenate([np.zeros((1, 3), np.int32), tokens], axis=1)
    mask = np.concatenate([np.zeros((1, 3), bool), np.ones((1, 6), bool)], axis=1)
    cache = KVCache.create(tiny_config.lm, batch_size=1, max_length=12)
    logits, cache = lm(padded[:, :7], input_mask=mask[:, :7], cache=cache)
    np.testing.assert_allclose(np.asarray(logits)[:, 3:], reference[:, :4], atol=2e-5)
    for t in range(7, 9):
        logits, cache = lm(padded[:, t : t + 1], cache=cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], reference[:, t - 3], atol=2e-5)


def test_video_frames_use_time_embeddings(tiny_config):
    model = create_flamingo(tiny_config)
    config = tiny_config
    images = (
        np.random.default_rng(4)
        .normal(size=(1, 1, 8, config.vision.image_size, config.vision.image_size, 3))
        .astype(np.float32)
    )
    assert config.resampler.max_frames < 8  # exercises interpolation of the learned time embeddings
    encode = jax.jit(model.encode_media)
    visual = np.asarray(encode(images))
    assert visual.shape == (1, 1, config.resampler.num_latents, config.resampler.width)
    assert np.isfinite(visual).all()
    permuted = np.asarray(encode(images[:, :, ::-1]))
    assert np.abs(permuted - visual).max() > 1e-3
    # Without time embeddings the resampler is order-invariant over frames.
    model_no_time = create_flamingo(
        dataclasses.replace(config, resampler=dataclasses.replace(config.resampler, max_frames=0))
    )
    encode = jax.jit(model_no_time.encode_media)
    np.testing.assert_allclose(np.asarray(encode(images[:, :, ::-1])), np.asarray(encode(images)), atol=1e-5)


def test_gradients_reach_only_the_trainable_set(tiny_config):
    model = create_flamingo(tiny_config)
    set_gates(model, 0.5)
    batch = make_batch(tiny_config)
    flt = trainable_filter(tiny_config)
    graphdef, trainable, frozen = nnx.split(model, flt, ...)

    def loss_fn(trainable, frozen):
        logits, _ = nnx.merge(graphdef, trainable, frozen)(
            batch.tokens, batch.image_index, batch.image_mask, batch.images
        )
        targets = jax.nn.one_hot(batch.tokens[:, 1:], logits.shape[-1])
        return -(jax.nn.log_softmax(logits[:, :-1]) * targets).sum(-1).mean()

    grads = jax.jit(jax.grad(loss_fn))(trainable, frozen)
    grad_paths = {path for path, _ in nnx.to_flat_state(grads)}
    top_level = {path[0] for path in grad_paths}
    assert top_level == set(TRAINABLE_GROUPS) - {"connector"}  # a token-level model's group
    for path, value in nnx.to_flat_state(grads):
        assert np.abs(np.asarray(value[...] if hasattr(value, "__getitem__") else value)).max() > 0, path
    # Even when differentiated explicitly, the frozen vision encoder gets exactly zero gradient
    # (its features are stop_gradient-ed, so XLA spends nothing on its backward pass).
    vision_grads = jax.jit(jax.grad(lambda vision_state: loss_fn(trainable, _replace_vision(frozen, vision_state))))(
        frozen["vision"]
    )
    assert all(np.abs(np.asarray(leaf)).max() == 0 for leaf in jax.tree.leaves(vision_grads))
    # The optimizer holds state for the trainable set only.
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=flt)
    leaves = jax.tree.leaves(nnx.state(optimizer.opt_state))
    moments = sum(int(np.size(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
    assert moments == 2 * count_params(model, flt)
    assert count_params(model, flt) < count_params(model) / 2


def _replace_vision(frozen, vision_state):
    frozen = nnx.State(dict(frozen))
    frozen["vision"] = vision_state
    return frozen


def test_openflamingo_placement_and_all_previous_switches():
    paper = XAttnConfig(every=4, placement="paper")
    open_flamingo = XAttnConfig(every=4, placement="openflamingo")
    assert paper.layer_indices(12) == (0, 4, 8)
    assert open_flamingo.layer_indices(12) == (3, 7, 11)
    assert XAttnConfig(every=7).layer_indices(80) == tuple(range(0, 80, 7))
    with pytest.raises(ValueError, match="placement"):
        XAttnConfig(placement="middle")


def test_unknown_trainable_group_is_rejected(tiny_config):
    with pytest.raises(ValueError, match="unknown groups"):
        FlamingoConfig(lm=tiny_config.lm, trainable=("resampler", "lm_head"))


def test_every_parameter_has_logical_axis_names(tiny_config):
    model = create_flamingo(
        dataclasses.replace(tiny_config, vision=NFNetConfig(variant="F0", image_size=32, group_size=16))
    )
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert len(flat) > 50
    for path, variable in flat:
        names = variable.get_metadata().get("out_sharding")
        assert names is not None, path
        assert len(names) == np.ndim(variable[...]), (path, names)
        assert all(name is None or isinstance(name, str) for name in names), (path, names)


@pytest.mark.slow
def test_unique_rows_gives_the_same_loss_and_gradients(tiny_config):
    """Running the layers below the first xattn block once per distinct token row is exact:
    same loss and trainable gradients with 3 distinct rows among 6, and when a batch has more
    distinct rows than ``unique_rows`` (every row is then computed)."""
    config = dataclasses.replace(tiny_config, xattn=dataclasses.replace(tiny_config.xattn, first_layer=1))
    assert min(config.xattn_layer_indices) > 0
    model = create_flamingo(config)
    set_gates(model, 0.5)
    base = make_batch(config, batch_size=6, seed=3)
    rng = np.random.default_rng(0)
    graphdef, trainable, rest = nnx.split(model, trainable_filter(config), ...)

    def loss_and_grads(batch, unique_rows):
        def loss(params):
            return nnx.merge(graphdef, params, rest).train_loss(batch, unique_rows=unique_rows)[0]

        return jax.jit(jax.value_and_grad(loss))(trainable)

    repeated = dataclasses.replace(base, tokens=np.asarray(base.tokens)[[0, 1, 2, 0, 1, 2]])
    distinct = dataclasses.replace(
        base, tokens=rng.integers(0, config.lm.vocab_size, base.tokens.shape).astype(np.int32)
    )
    for batch in (repeated, distinct):
        want_loss, want_grads = loss_and_grads(batch, 0)
        got_loss, got_grads = loss_and_grads(batch, 3)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
        for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(want_grads)) > 0


@pytest.mark.slow
def test_target_capacity_gives_the_same_loss_and_gradients(tiny_config):
    """The head and the loss at the target positions only (at most ``target_capacity`` per row)
    are exact: same loss and trainable gradients as at every position, both when every row fits
    (the head then projects only ``capacity`` positions) and when a row has more targets (every
    position is then computed); a row without targets and a batch without any are fine."""
    model = create_flamingo(tiny_config)
    set_gates(model, 0.5)
    graphdef, trainable, rest = nnx.split(model, trainable_filter(tiny_config), ...)
    batch = make_batch(tiny_config, batch_size=4, seed=5)
    loss_mask = np.zeros((4, 12), np.float32)
    for row, positions in enumerate([[2, 3, 4], [5, 6, 7, 8, 10], [], [9, 10]]):
        loss_mask[row, positions] = 1.0
    batch = dataclasses.replace(batch, loss_mask=loss_mask)

    def loss_fn(batch, capacity):
        def loss(params):
            return nnx.merge(graphdef, params, rest).train_loss(batch, target_capacity=capacity)

        return jax.value_and_grad(loss, has_aux=True)

    want = jax.jit(loss_fn(batch, 0))(trainable)
    for capacity in (5, 4):  # every row fits / the second row has 5 targets
        (loss, count), grads = jax.jit(loss_fn(batch, capacity))(trainable)
        np.testing.assert_allclose(loss, want[0][0], rtol=1e-5)
        assert float(count) == float(want[0][1]) == 10
        for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want[1]), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    vocab = tiny_config.lm.vocab_size + 2
    assert f"f32[4,5,{vocab}]" in str(jax.make_jaxpr(loss_fn(batch, 5))(trainable))  # 5 positions projected
    (loss, count), _ = jax.jit(loss_fn(dataclasses.replace(batch, loss_mask=np.zeros_like(loss_mask)), 5))(trainable)
    assert float(loss) == 0.0 and float(count) == 0.0
