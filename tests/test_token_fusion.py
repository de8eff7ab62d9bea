"""Token-level connectors (LLaVA's MLP projector, BLIP-2's Q-Former): the visual tokens sit at the
right input positions, text before an image never sees it, the Q-Former gives its query count,
and cached generation and ranking give what full forwards give."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flamingo_jax import flops
from flamingo_jax.evaluation.generate import GenerateConfig, generate
from flamingo_jax.evaluation.ranking import class_log_likelihoods
from flamingo_jax.models import kinds
from flamingo_jax.models.connector import ConnectorConfig
from flamingo_jax.models.flamingo import Flamingo, FlamingoConfig
from flamingo_jax.models.token_fusion import TokenFusion, expand_positions

from conftest import jit_forward, jitted, make_batch

CONNECTORS = {
    "mlp": ConnectorConfig(kind="mlp", max_frames=4),
    "qformer": ConnectorConfig(
        kind="qformer", num_queries=3, width=32, depth=3, num_heads=2, head_dim=16, max_frames=4
    ),
}


def _config(tiny_config, kind: str) -> FlamingoConfig:
    return dataclasses.replace(tiny_config, connector=CONNECTORS[kind])


def _model(tiny_config, kind: str, seed: int = 0) -> TokenFusion:
    model = kinds.build(_config(tiny_config, kind), seed=seed)
    assert isinstance(model, TokenFusion)
    return model


def _per_medium(config, num_frames=1) -> int:
    return config.connector.tokens_per_medium(config.vision.num_output_tokens, num_frames)


def test_expanded_positions_by_hand():
    """Row 0: images at 1 and 3 (two slots, 2 tokens each); row 1: one image at 2, its second
    slot padding: its room (2 positions) is padding in front."""
    media = 9
    tokens = jnp.asarray([[5, media, 6, media, 7], [5, 6, media, 7, 8]], jnp.int32)
    index = jnp.asarray([[-1, 0, 0, 1, 1], [-1, -1, 0, 0, 0]], jnp.int32)
    mask = jnp.asarray([[True, True], [True, False]])
    text, read, start, expanded = expand_positions(tokens, index, mask, media, 2)
    assert np.asarray(text).tolist() == [[0, 1, 4, 5, 8], [2, 3, 4, 7, 8]]
    assert np.asarray(read).tolist() == [[0, 3, 4, 7, 8], [2, 3, 6, 7, 8]]
    assert np.asarray(start).tolist() == [[2, 6], [5, 9]]  # 9: no image (the expanded length)
    assert np.asarray(expanded).tolist() == [[False, True, False, True, False], [False, False, True, False, False]]


def _plain_lm_logits(model, sequence):
    """The LM (and the head) alone on input embeddings float[1, T', W]."""
    return model.head(model.lm.backbone(sequence)[0])


@pytest.mark.parametrize(("kind", "frames"), [("mlp", 1), ("qformer", 1), ("mlp", 2)])
def test_the_lm_reads_each_images_visual_tokens_after_its_image_token(tiny_config, kind, frames):
    """The model equals the plain LM on a hand-built input: each row's text embeddings with each
    image's N visual tokens right after its ``<image>``; exactly N positions per image (per
    video: frames x features with the MLP projector)."""
    model = _model(tiny_config, kind, seed=1)
    batch = make_batch(tiny_config, batch_size=2, length=12, num_media=3, num_frames=frames, seed=2)
    logits = np.asarray(jit_forward(model)(batch.tokens, batch.image_index, batch.image_mask, batch.images))
    visual = np.asarray(jitted(model, "encode_media")(batch.images))
    per_medium = _per_medium(model.config, frames)
    assert visual.shape[2] == per_medium
    graphdef, state = nnx.split(model)
    plain_lm = jax.jit(lambda state, sequence: _plain_lm_logits(nnx.merge(graphdef, state), sequence))
    for row in range(2):
        pieces, reads, position = [], [], 0
        embedded = np.asarray(model.embed_tokens(jnp.asarray(batch.tokens[row : row + 1])))[0]
        for t, token in enumerate(batch.tokens[row]):
            pieces.append(embedded[t : t + 1])
            position += 1
            if token == model.config.media_token_id:
                pieces.append(visual[row, batch.image_index[row, t]])
                position += per_medium
            reads.append(position - 1)
        sequence = np.concatenate(pieces)[None]
        images_in_row = int(batch.image_mask[row].sum())
        assert sequence.shape[1] == 12 + images_in_row * per_medium
        expected = np.asarray(plain_lm(state, jnp.asarray(sequence)))[0, reads]
        np.testing.assert_allclose(logits[row], expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", sorted(CONNECTORS))
def test_text_before_an_image_never_sees_it(tiny_config, kind):
    """Changing the last image changes no logit before its ``<image>`` token and changes the
    logits from it on (position 9 of row 0 in ``make_batch``)."""
    model = _model(tiny_config, kind, seed=1)
    forward = jit_forward(model)
    batch = make_batch(tiny_config, batch_size=2, length=12, num_media=3, seed=2)
    other = np.array(batch.images)
    other[0, 2] = np.random.default_rng(7).normal(size=other[0, 2].shape)
    before = np.asarray(forward(batch.tokens, batch.image_index, batch.image_mask, batch.images))
    after = np.asarray(forward(batch.tokens, batch.image_index, batch.image_mask, other))
    np.testing.assert_array_equal(before[0, :9], after[0, :9])
    assert np.abs(before[0, 9:] - after[0, 9:]).max() > 1e-4
    np.testing.assert_array_equal(before[1], after[1])  # row 1's third slot is padding


def test_qformer_gives_its_query_count_for_any_frames(tiny_config):
    model = _model(tiny_config, "qformer")
    for frames in (1, 3):
        batch = make_batch(tiny_config, batch_size=2, length=12, num_media=2, num_frames=frames)
        assert jitted(model, "encode_media")(batch.images).shape == (2, 2, 3, tiny_config.lm.width)


def test_mlp_projector_gives_every_feature_of_every_frame(tiny_config):
    model = _model(tiny_config, "mlp")
    features = tiny_config.vision.num_output_tokens
    batch = make_batch(tiny_config, batch_size=1, length=12, num_media=2, num_frames=3)
    assert jitted(model, "encode_media")(batch.images).shape == (1, 2, 3 * features, tiny_config.lm.width)


def test_mlp_projector_parameters_by_hand(tiny_config):
    """Two linear layers with biases (LLaVA-1.5) and the time embeddings; no resampler, no xattn
    blocks; the connector and the new-token rows train."""
    config = _config(tiny_config, "mlp")
    model = nnx.eval_shape(lambda: kinds.build(config))
    vision, width = config.vision.output_dim, config.lm.width
    expected = vision * width + width + width * width + width + config.connector.max_frames * vision
    assert kinds.count_params(model.connector) == expected
    assert not hasattr(model, "resampler") and not hasattr(model, "xattn_layers")
    assert config.xattn_layer_indices == ()
    trainable = nnx.state(model, kinds.trainable_filter(config))
    assert kinds.count_params(model, kinds.trainable_filter(config)) == expected + 2 * 2 * width
    assert {str(path[0]) for path, _ in nnx.to_flat_state(trainable)} == {"connector", "new_tokens"}


def test_token_level_configs_are_checked(tiny_config):
    with pytest.raises(ValueError, match="lacks 'connector'"):
        dataclasses.replace(tiny_config, connector=CONNECTORS["mlp"], trainable=("new_tokens",))
    with pytest.raises(ValueError, match="token-level"):
        Flamingo(_config(tiny_config, "mlp"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ConnectorConfig.kind"):
        ConnectorConfig(kind="linear")


@pytest.mark.parametrize("kind", ["mlp", pytest.param("qformer", marks=pytest.mark.slow)])
def test_cached_generation_matches_uncached(tiny_config, kind):
    """Greedy and beam search with the KV cache (the prompt expanded once, then plain text) give
    the tokens and scores of decoding without it (every step a full forward of the images and
    the whole sequence); the second prompt is left-padded."""
    model = _model(tiny_config, kind, seed=3)
    batch = make_batch(tiny_config, batch_size=2, length=12, num_media=3, seed=5)
    tokens, index = np.array(batch.tokens), np.array(batch.image_index)
    mask = np.ones(tokens.shape, bool)
    tokens[1, 3:], index[1, 3:] = tokens[1, :-3].copy(), index[1, :-3].copy()
    tokens[1, :3], index[1, :3], mask[1, :3] = 0, -1, False
    for beams in (1, 3):
        config = GenerateConfig(max_new_tokens=6, num_beams=beams, stop_tokens=(1,))
        args = (model, tokens, index, batch.image_mask, batch.images)
        cached = generate(*args, input_mask=mask, config=config)
        uncached = generate(*args, input_mask=mask, config=config, use_cache=False)
        np.testing.assert_array_equal(cached.tokens, uncached.tokens)
        np.testing.assert_allclose(cached.scores, uncached.scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(CONNECTORS))
def test_ranking_equals_full_forward_log_likelihoods(tiny_config, kind):
    """Class log-likelihoods from the cached prompt equal those of a full forward of prompt +
    class name (one- and three-token classes)."""
    model = _model(tiny_config, kind, seed=4)
    batch = make_batch(tiny_config, batch_size=2, length=12, num_media=3, seed=6)
    classes = [[7], [8, 9, 10], [11, 12]]
    scores = class_log_likelihoods(model, batch.tokens, batch.image_index, batch.image_mask, batch.images, classes)
    forward = jit_forward(model)
    for row in range(2):
        for column, ids in enumerate(classes):
            tokens = np.concatenate([batch.tokens[row], ids])[None]
            index = np.concatenate([batch.image_index[row], [batch.image_index[row, -1]] * len(ids)])[None]
            logp = jax.nn.log_softmax(
                forward(tokens, index, batch.image_mask[row : row + 1], batch.images[row : row + 1])
            )
            expected = sum(float(logp[0, 11 + j, token]) for j, token in enumerate(ids))
            assert scores[row, column] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("kind", sorted(CONNECTORS))
def test_train_loss_is_finite_and_reaches_only_the_connector_and_new_tokens(tiny_config, kind):
    """The loss gradient reaches the connector and the new-token rows (the trainable groups)."""
    config = _config(tiny_config, kind)
    model = kinds.build(config, seed=0)
    batch = make_batch(tiny_config, batch_size=2, length=12, num_media=3, seed=1)
    graphdef, trainable, frozen = nnx.split(model, kinds.trainable_filter(config), ...)

    def loss(trainable):
        return nnx.merge(graphdef, trainable, frozen).train_loss(batch)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
    assert np.isfinite(float(value))
    norms = {str(path[0]): 0.0 for path, _ in nnx.to_flat_state(grads)}
    for path, leaf in nnx.to_flat_state(grads):
        norms[str(path[0])] += float(jnp.sum(jnp.square(leaf[...])))
    assert set(norms) == {"connector", "new_tokens"} and all(v > 0 for v in norms.values())


def test_flops_count_the_expanded_sequence(tiny_config):
    """The token-level model's LM runs on the text plus every image's visual tokens: its FLOPs
    grow with the number of media though nothing cross-attends."""
    config = _config(tiny_config, "qformer")
    one, three = (flops.train_step_flops(config, 2, 12, media) for media in (1, 3))
    assert three > one > flops._lm_train_flops(config, 2, 12, 0)
