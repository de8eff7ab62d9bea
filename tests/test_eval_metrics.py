"""VQA accuracy, CIDEr / BLEU-4 and ROC-AUC against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from flamingo_jax.evaluation.metrics import caption_scores, cider_per_item, normalize_vqa_answer, roc_auc, vqa_accuracy


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two", "2"),  # number words become digits
        ("the dog", "dog"),  # articles go
        ("A red, white and blue flag!", "red white and blue flag"),  # punctuation
        ("yes.", "yes"),  # a final period is stripped
        ("3.5", "3.5"),  # a decimal point is not
        ("1,000", "1000"),  # digit-grouping commas vanish
        ("dont", "don't"),  # contractions are restored
        ("  none\n", "0"),
    ],
)
def test_official_answer_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_accuracy_by_hand():
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    # 2 annotators said "dog", 8 "cat": leaving out a "dog" annotator leaves 1 match (1/3),
    # leaving out a "cat" one leaves 2 (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert vqa_accuracy("a dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)
    # 3 matches: 3 subsets keep 2 (2/3), 7 keep 3 (1): (3 * 2/3 + 7) / 10 = 0.9.
    assert vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("blue", ["red"] * 10) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_cider_by_hand():
    """Image 1 repeats its reference: 10. Image 2, "a dog runs" vs "a dog is running": "a"
    occurs in both images' references, so its idf weight log(2) - log(2) is 0; every other
    n-gram has weight w = log(2). 1-grams: overlap dog, cos = w^2 / (sqrt(2) w * sqrt(3) w) =
    1/sqrt(6); 2-grams: overlap "a dog", again 1/sqrt(6); 3- and 4-grams: 0. Length penalty
    exp(-(3 - 4)^2 / (2 * 6^2)). CIDEr-D = 10 * mean over n * penalty; corpus = mean of images."""
    predictions = {1: "A cat sits on a mat.", 2: "a dog runs"}
    references = {1: ["a cat sits on a mat"], 2: ["A dog is running"]}
    image_2 = 10 * (2 / math.sqrt(6)) / 4 * math.exp(-1 / 72)
    scores = caption_scores(predictions, references)
    assert scores["CIDEr"] == pytest.approx((10 + image_2) / 2, rel=1e-6)
    assert cider_per_item(predictions, references) == pytest.approx([10, image_2], rel=1e-6)
    perfect = caption_scores({1: "a cat sits on a mat"}, {1: ["a cat sits on a mat"]})
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="caption_scores: .*differ on ids"):
        caption_scores({1: "x"}, {2: ["y"]})
    with pytest.raises(ValueError, match="cider_per_item: .*differ on ids"):
        cider_per_item({1: "x"}, {2: ["y"]})


def test_roc_auc_by_hand():
    # Positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of the 4 pairs are ordered right.
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # a tie counts one half
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2], [1, 1])
