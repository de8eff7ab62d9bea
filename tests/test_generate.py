"""Generation: the cached path (text KV cache + visual keys/values once per prompt) produces
exactly the tokens of uncached decoding, greedy and beam; left padding changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from flamingo_jax.evaluation.generate import GenerateConfig, generate
from flamingo_jax.models.flamingo import create_flamingo

from conftest import jit_forward, make_batch, set_gates

NEW = 10


@pytest.fixture(scope="module")
def model(tiny_config):
    model = create_flamingo(tiny_config, seed=3)
    set_gates(model, 0.7)  # so the images matter
    return model


@pytest.fixture(scope="module")
def prompts(tiny_config):
    """Two prompts with images; the second is 3 tokens shorter and left-padded."""
    batch = make_batch(tiny_config, batch_size=2, length=12, num_media=3, seed=5)
    tokens, index = np.array(batch.tokens), np.array(batch.image_index)
    mask = np.ones(tokens.shape, bool)
    tokens[1, 3:], index[1, 3:] = tokens[1, :-3].copy(), index[1, :-3].copy()
    tokens[1, :3], index[1, :3], mask[1, :3] = 0, -1, False
    return tokens, index, np.array(batch.image_mask), np.array(batch.images), mask


def _greedy_step_by_step(model, tokens, index, image_mask, images, stops):
    """The plainest reference: one full forward per new token on the growing, unpadded prompt."""
    forward = jit_forward(model)
    tokens, index = list(tokens), list(index)
    out = []
    for _ in range(NEW):
        logits = forward(np.asarray([tokens]), np.asarray([index]), image_mask[None], images[None])
        token = int(np.argmax(np.asarray(logits)[0, -1]))
        out.append(token)
        if token in stops:
            break
        tokens.append(token)
        index.append(index[-1])
    return out


@pytest.mark.slow
def test_cached_greedy_matches_step_by_step(model, prompts, tiny_config):
    tokens, index, image_mask, images, mask = prompts
    config = GenerateConfig(max_new_tokens=NEW, stop_tokens=(tiny_config.endofchunk_token_id,))
    cached = generate(model, tokens, index, image_mask, images, input_mask=mask, config=config)
    uncached = generate(model, tokens, index, image_mask, images, input_mask=mask, config=config, use_cache=False)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_array_equal(cached.lengths, uncached.lengths)
    for row in range(2):
        real = mask[row]
        expected = _greedy_step_by_step(
            model, tokens[row][real], index[row][real], image_mask[row], images[row], config.stop_tokens
        )
        assert cached.tokens[row, : cached.lengths[row]].tolist() == expected
        assert (cached.tokens[row, cached.lengths[row] :] == 0).all()  # padding after a stop


def test_cached_beam_search_matches_uncached(model, prompts):
    tokens, index, image_mask, images, mask = prompts
    config = GenerateConfig(max_new_tokens=NEW, num_beams=3, length_penalty=0.7)
    cached = generate(model, tokens, index, image_mask, images, input_mask=mask, config=config)
    uncached = generate(model, tokens, index, image_mask, images, input_mask=mask, config=config, use_cache=False)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_allclose(cached.scores, uncached.scores, rtol=1e-4)
    # The reported score is the length-normalised log-probability of the returned sequence,
    # recomputed here with one full forward pass.
    forward = jit_forward(model)
    row, length = 0, int(cached.lengths[0])
    sequence = np.concatenate([tokens[row], cached.tokens[row, :length]])
    sequence_index = np.concatenate([index[row], np.full(length, index[row, -1])])
    logits = np.asarray(forward(sequence[None], sequence_index[None], image_mask[row : row + 1], images[row : row + 1]))
    shifted = logits[0] - logits[0].max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    prompt_length = tokens.shape[1]
    total = sum(logp[prompt_length - 1 + i, sequence[prompt_length + i]] for i in range(length))
    np.testing.assert_allclose(cached.scores[row], total / length**0.7, rtol=1e-4)


def test_left_padding_does_not_change_the_continuation(model, prompts):
    tokens, index, image_mask, images, mask = prompts
    config = GenerateConfig(max_new_tokens=NEW)
    batched = generate(model, tokens, index, image_mask, images, input_mask=mask, config=config)
    alone = generate(model, tokens[1:, 3:], index[1:, 3:], image_mask[1:], images[1:], config=config)
    np.testing.assert_array_equal(batched.tokens[1], alone.tokens[0])


def test_right_padded_prompts_are_rejected(model, prompts):
    tokens, index, image_mask, images, mask = prompts
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, tokens, index, image_mask, images, input_mask=mask[:, ::-1])
