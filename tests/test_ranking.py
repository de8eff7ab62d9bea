"""Class ranking scores the shared prompt once yet agrees with per-token log-likelihoods summed
from full forward passes; RICES picks the nearest demonstrations, most similar last."""

from __future__ import annotations

import numpy as np
import pytest
from test_generate import model, prompts  # noqa: F401 (fixtures)

from flamingo_jax.evaluation.ranking import Rices, candidate_log_likelihoods, class_log_likelihoods, vision_features

from conftest import jit_forward, set_gates

CLASSES = [[5], [17, 3, 99], [42, 8]]


def _log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_class_log_likelihoods_match_direct_sums(model, prompts):  # noqa: F811
    tokens, index, image_mask, images, mask = prompts
    scores = class_log_likelihoods(model, tokens, index, image_mask, images, CLASSES, input_mask=mask)
    assert scores.shape == (2, 3)
    forward = jit_forward(model)
    for row in range(2):
        prompt, prompt_index = tokens[row][mask[row]], index[row][mask[row]]
        for c, ids in enumerate(CLASSES):
            sequence = np.concatenate([prompt, ids])
            sequence_index = np.concatenate([prompt_index, np.full(len(ids), prompt_index[-1])])
            logits = np.asarray(forward(sequence[None], sequence_index[None], image_mask[None, row], images[None, row]))
            logp = _log_softmax(logits[0].astype(np.float64))
            direct = sum(logp[len(prompt) - 1 + j, ids[j]] for j in range(len(ids)))
            np.testing.assert_allclose(scores[row, c], direct, rtol=1e-4, atol=1e-4)
    # Single-token classes take the path that feeds nothing after the prompt.
    single = class_log_likelihoods(model, tokens, index, image_mask, images, [[5], [42]], input_mask=mask)
    np.testing.assert_allclose(single[:, 0], scores[:, 0], rtol=1e-5, atol=1e-5)
    normalized = class_log_likelihoods(
        model, tokens, index, image_mask, images, CLASSES, input_mask=mask, normalize=True
    )
    np.testing.assert_allclose(normalized, scores / np.asarray([1, 3, 2]), rtol=1e-6)
    # Classes in chunks of 2 (the last one padded) and of 1 score the same.
    for chunk in (1, 2):
        chunked = class_log_likelihoods(model, tokens, index, image_mask, images, CLASSES, input_mask=mask, chunk=chunk)
        np.testing.assert_allclose(chunked, scores, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        class_log_likelihoods(model, tokens, index, image_mask, images, CLASSES, input_mask=mask, chunk=0)
    with pytest.raises(ValueError, match="at least one token"):
        class_log_likelihoods(model, tokens, index, image_mask, images, [[1], []], input_mask=mask)


def test_candidate_log_likelihoods_score_each_rows_own_candidates(model, prompts):  # noqa: F811
    tokens, index, image_mask, images, mask = prompts
    shared = class_log_likelihoods(model, tokens, index, image_mask, images, CLASSES, input_mask=mask)
    # An episode's labels: row 0 ranks classes 2 and 0, row 1 classes 1 and 2.
    own = candidate_log_likelihoods(
        model, tokens, index, image_mask, images, [[CLASSES[2], CLASSES[0]], [CLASSES[1], CLASSES[2]]], input_mask=mask
    )
    np.testing.assert_allclose(own, [[shared[0, 2], shared[0, 0]], [shared[1, 1], shared[1, 2]]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same number"):
        candidate_log_likelihoods(model, tokens, index, image_mask, images, [[[1]], [[1], [2]]], input_mask=mask)
    with pytest.raises(ValueError, match="2 prompts"):
        candidate_log_likelihoods(model, tokens, index, image_mask, images, [[[1]]], input_mask=mask)


def test_rices_nearest_demonstrations_most_similar_last():
    pool = np.asarray([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    rices = Rices(pool)
    # Cosine similarities to [1, 0]: 1, 0.8, 0, -1.
    np.testing.assert_array_equal(rices.find(np.asarray([[2.0, 0.0]]), 3), [[2, 1, 0]])
    # To [0, -1]: 0, -0.6, -1, 0 -> the two most similar are 0 and 3 (a tie, kept in pool order).
    np.testing.assert_array_equal(rices.find(np.asarray([[0.0, -3.0]]), 2), [[3, 0]])
    np.testing.assert_array_equal(rices.find(np.asarray([[1.0, 0.0]]), 2, exclude=[0]), [[2, 1]])


def test_rices_on_vision_features_finds_the_same_image(tiny_config):
    from flamingo_jax.models.flamingo import create_flamingo

    flamingo = create_flamingo(tiny_config, seed=1)
    set_gates(flamingo, 0.0)
    rng = np.random.default_rng(0)
    size = tiny_config.vision.image_size
    pool_images = rng.normal(size=(12, size, size, 3)).astype(np.float32)
    features = vision_features(flamingo, pool_images, batch_size=5)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    queries = pool_images[[7, 2]] + 0.01 * rng.normal(size=(2, size, size, 3)).astype(np.float32)
    chosen = Rices(features).find(vision_features(flamingo, queries), 4)
    assert chosen[:, -1].tolist() == [7, 2]
