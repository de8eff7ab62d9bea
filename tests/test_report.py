"""The run's report: every evaluated step's metric per shot count with the number of queries
(blank where a step was not evaluated at that shot count), the standard error an accuracy has
at that many queries, and the picture grid."""

from __future__ import annotations

import json
import os

import numpy as np

from flamingo_jax.demo import fashion_mnist
from flamingo_jax.demo.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from flamingo_jax.evaluation import report


def _record(step: int, shots_accuracy: dict[int, float], queries: list) -> dict:
    rows = [
        {"id": q.id, "label": q.label, "scores": [0.0] * 10, "prediction": FASHION_MNIST_CLASSES[q.label]}
        for q in queries
    ]
    return {
        "task": "fashion_mnist",
        "kind": "classification",
        "step": step,
        "results": {
            str(s): {"accuracy": a, "accuracy_std": 0.0, "per_seed": [{"accuracy": a}], "metric": "accuracy"}
            for s, a in shots_accuracy.items()
        },
        "predictions": {str(s): {"0": rows} for s in shots_accuracy},
    }


def test_report_table_queries_and_standard_error(tmp_path):
    task = fashion_mnist.classification(num_queries=300, pool_size=0)
    queries = task.queries
    os.makedirs(tmp_path / "eval")
    for step, accuracies in ((320, {0: 81.0, 4: 80.0, 8: 79.0}), (0, {4: 7.5})):
        with open(tmp_path / "eval" / f"fashion_mnist_{step}.json", "w") as f:
            json.dump(_record(step, accuracies, queries), f)
    without_tasks = report.write_report(str(tmp_path), wall_time_s=600.0)
    assert "report.png" not in without_tasks and not (tmp_path / "eval" / "report.png").exists()
    text = report.write_report(str(tmp_path), wall_time_s=600.0, tasks={"fashion_mnist": task})
    assert text == without_tasks + "\n![predictions](report.png)\n"
    assert "| task | step | metric | queries | 0-shot | 4-shot | 8-shot |" in text
    assert "| fashion_mnist | init (frozen LM) | accuracy | 300 |  | 7.5 ± 0.0 |  |" in text
    assert "| fashion_mnist | 320 | accuracy | 300 | 81.0 ± 0.0 | 80.0 ± 0.0 | 79.0 ± 0.0 |" in text
    errors = " / ".join(f"{100 * np.sqrt(p * (1 - p) / 300):.1f}" for p in (0.81, 0.80, 0.79))
    assert f"for fashion_mnist at step 320 (0/4/8 shots), {errors} points at 300 queries." in text
    assert "4 - 0 shots +0.0 ± 0.0; 8 - 0 shots +0.0 ± 0.0." in text  # the paired differences
    assert "Wall time (train + evaluate): 10.0 min" in text
    assert (tmp_path / "eval" / "report.md").read_text() == text
    assert os.path.getsize(tmp_path / "eval" / "report.png") > 10_000


def test_paired_difference_against_the_fewest_shots():
    """Each query's correctness at k shots minus at the fewest, over the same (seed, query)
    pairs: the mean and the standard error of that per-query difference (hand-computed here)."""

    def rows(correct: list[bool]) -> list[dict]:
        return [
            {"id": str(i), "label": 1, "scores": [0.0, 1.0] if ok else [1.0, 0.0], "prediction": ""}
            for i, ok in enumerate(correct)
        ]

    zero = [True, True, False, False, True, False, True, True]
    four = [True, True, True, True, True, False, False, True]  # +2 right, -1: d = [0,0,1,1,0,0,-1,0]
    record = {"predictions": {"0": {"0": rows(zero)}, "4": {"0": rows(four)}, "8": {"0": rows(zero[:1])}}}
    differences = report.paired_differences(record)
    d = np.array([0, 0, 1, 1, 0, 0, -1, 0], float)
    mean, se = differences[("4", "0")]
    assert np.isclose(mean, 100 * d.mean()) and np.isclose(se, 100 * d.std(ddof=1) / np.sqrt(8))
    assert ("8", "0") not in differences  # one pair is no standard error
