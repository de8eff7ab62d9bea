"""Example construction: token / image_index / loss_mask alignment on hand-checked examples."""

from __future__ import annotations

import numpy as np
import pytest

from flamingo_jax.data import examples

IDS = examples.SpecialIds(media=100, endofchunk=101, pad=0)
M, E = IDS.media, IDS.endofchunk


class _Fixed:
    """An rng whose ``random()`` returns the given values in turn (to pin p_next choices)."""

    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def _image(value):
    return np.full((1, 2, 2, 3), value, np.float32)


def test_interleaved_placement_before_and_after():
    sentences = [[1, 2], [3, 4, 5], [6]]
    images = [_image(1), _image(2)]
    # image 0 belongs to sentence 1 and goes before it (0.1 < p_next); image 1 belongs to
    # sentence 2 and goes after it (0.9 >= p_next).
    example = examples.interleaved_example(sentences, images, [1, 2], ids=IDS, rng=_Fixed([0.1, 0.9]), length=12)
    expected = [1, 2, M, 3, 4, 5, 6, E, M, E, 0, 0]
    assert example["tokens"].tolist() == expected
    assert example["image_index"].tolist() == [-1, -1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert example["image_mask"].tolist() == [True, True, False, False, False]
    assert example["images"][1, 0, 0, 0, 0] == 2.0
    # loss_mask[t] weights predicting tokens[t + 1]: targets 3 4 5 6 E (after image 0) and the
    # final E (after image 1); not the first M, not 1 2 (before any image), not the second M.
    targets = [expected[t + 1] for t in range(11) if example["loss_mask"][t]]
    assert targets == [3, 4, 5, 6, E, E]


def test_sentence_weights_scale_the_targets_of_their_text_and_its_endofchunk():
    sentences = [[1, 2], [3], [4, 5]]
    images = [_image(1), _image(2), _image(3)]
    example = examples.interleaved_example(
        sentences, images, [0, 1, 2], ids=IDS, rng=_Fixed([0.0] * 3), length=12, sentence_weights=[0.0, 1.0, 0.5]
    )
    tokens = example["tokens"].tolist()
    assert tokens == [M, 1, 2, E, M, 3, E, M, 4, 5, E, 0]
    weights = {t: float(example["loss_mask"][t - 1]) for t in range(1, 12) if example["loss_mask"][t - 1]}
    # Targets 1, 2 and their E weigh 0; 3 and its E 1; 4, 5 and the last E 0.5; no <image> target.
    assert weights == {5: 1.0, 6: 1.0, 8: 0.5, 9: 0.5, 10: 0.5}
    plain = examples.interleaved_example(sentences, images, [0, 1, 2], ids=IDS, rng=_Fixed([0.0] * 3), length=12)
    assert plain["tokens"].tolist() == tokens
    np.testing.assert_array_equal(plain["loss_mask"] > 0, [t in (0, 1, 2, 4, 5, 7, 8, 9) for t in range(12)])


def test_text_between_endofchunk_and_next_image_is_not_a_target():
    tokens = np.array([M, 3, E, 7, 8, M, 4, E, 0], np.int32)
    mask = examples.loss_mask_for(tokens, IDS)
    targets = [int(tokens[t + 1]) for t in range(8) if mask[t]]
    assert targets == [3, E, 4, E]


def test_window_keeps_at_most_five_images_and_length():
    rng = np.random.default_rng(0)
    sentences = [list(range(1, 30)) for _ in range(12)]
    images = [_image(i) for i in range(12)]
    for _ in range(20):
        example = examples.interleaved_example(sentences, images, list(range(12)), ids=IDS, rng=rng, length=64)
        if example is None:
            continue
        tokens = example["tokens"]
        assert len(tokens) == 64
        assert (tokens == M).sum() == example["image_mask"].sum() <= 5
        # image_index and <image> tokens agree everywhere.
        np.testing.assert_array_equal(example["image_index"], np.cumsum(tokens == M) - 1)


def test_p_next_placement_frequency():
    rng = np.random.default_rng(1)
    before = 0
    for _ in range(400):
        example = examples.interleaved_example([[1, 2], [3, 4]], [_image(0)], [1], ids=IDS, rng=rng, length=8)
        before += example["tokens"].tolist()[2] == M
    assert 0.43 < before / 400 < 0.57


def test_packed_pairs_reset_image_index_per_pair():
    pairs = [([5, 6], _image(1)), ([7], _image(2)), ([8, 9, 10, 11], _image(3))]
    example = examples.pack_pairs(pairs, ids=IDS, length=10, max_images=3)
    assert example["tokens"].tolist() == [M, 5, 6, E, M, 7, E, 0, 0, 0]  # the third pair does not fit
    assert example["image_index"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert example["image_mask"].tolist() == [True, True, False]
    single = examples.pair_example([5, 6], _image(1), ids=IDS, length=6)
    assert single["tokens"].tolist() == [M, 5, 6, E, 0, 0]
    assert [t for t in range(5) if single["loss_mask"][t]] == [0, 1, 2]


def test_video_frames_at_one_fps():
    indices = examples.sample_frame_indices(300, 30.0, num_frames=8)
    assert indices.tolist() == [0, 30, 60, 90, 120, 150, 180, 210]
    short = examples.sample_frame_indices(100, 30.0, num_frames=8)
    assert len(short) == 8 and short.max() == 99
    random_start = examples.sample_frame_indices(900, 30.0, num_frames=8, rng=np.random.default_rng(0))
    assert np.all(np.diff(random_start) == 30)
    with pytest.raises(ValueError, match="no frames"):
        examples.sample_frame_indices(0, 30.0)
