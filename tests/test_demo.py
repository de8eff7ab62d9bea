"""The demo run, shortened: real frozen SmolLM2 + EfficientNet-Lite0, trained on the demo
mixture (Fashion-MNIST pairs and few-shot documents, scikit-image photos, generated documents,
decoded by worker processes), checkpointed, evaluated few-shot (and at initialisation),
reported. On one device with the session's compile flags: the test judges what the run writes,
not its model (3 steps), and XLA's defaults took 125 s here against 103 s (2026-12-05, AMD EPYC,
~410 GFLOP/s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flamingo_jax.train.writer import read_metrics

from conftest import one_device_env

pytestmark = pytest.mark.slow


def test_demo_config_end_to_end(tmp_path):
    workdir = tmp_path / "demo"
    command = [
        sys.executable,
        "-m",
        "flamingo_jax.main",
        "--gin_file=flamingo_jax/demo/demo_cpu.gin",
        f"--workdir={workdir}",
        "--gin.TRAIN_STEPS=3",
        "--gin.OptimizerConfig.warmup_steps=1",
        "--gin.CHECKPOINT_EVERY=3",
        "--gin.LOG_EVERY=1",
        "--gin.RunConfig.data_workers=2",
        "--gin.EVAL_QUERIES=8",
        "--gin.EvalConfig.task_options={'fashion_mnist_captions': {'num_queries': 4}}",
        "--gin.EvalConfig.shots=[0, 4]",
        "--gin.EvalConfig.batch_size=8",
        "--gin.EvalConfig.max_new_tokens=6",
        "--gin.fashion_fewshot/DatasetConfig.options={'shots': 4, 'limit': 400, 'repeat_class': 0.6}",
        "--gin.fashion_pairs/DatasetConfig.options={'limit': 400}",
    ]
    env = one_device_env(FLAMINGO_JAX_DATA=str(tmp_path / "data"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert os.path.isdir(workdir / "checkpoints" / "3")
    last = read_metrics(str(workdir))[-1]
    for name in ("fashion_fewshot", "fashion_pairs", "photos", "generated"):
        assert np.isfinite(last[f"loss/{name}"]) and last[f"targets/{name}"] > 0, name
    assert sorted(os.listdir(tmp_path / "data"))  # prepared once, under FLAMINGO_JAX_DATA
    # The trained model on both tasks, its initialisation on classification at 4 shots
    # (EvalConfig.init_tasks, init_shots).
    for task, step, queries, shots in (
        ("fashion_mnist", 3, 8, {"0", "4"}),
        ("fashion_mnist_captions", 3, 4, {"0", "4"}),
        ("fashion_mnist", 0, 8, {"4"}),
    ):
        with open(workdir / "eval" / f"{task}_{step}.json") as f:
            record = json.load(f)
        assert set(record["results"]) == shots
        assert len(record["predictions"]["4"]["0"]) == queries
    assert not os.path.exists(workdir / "eval" / "fashion_mnist_captions_0.json")
    report = (workdir / "eval" / "report.md").read_text()
    assert "| fashion_mnist | 3 | accuracy | 8 |" in report
    assert "| fashion_mnist | init (frozen LM) | accuracy | 8 |  |" in report  # no 0-shot cell
    assert "points at 8 queries." in report  # the accuracies' standard error
    assert "Training: 3 steps, median " in report
    assert os.path.getsize(workdir / "eval" / "report.png") > 10_000
