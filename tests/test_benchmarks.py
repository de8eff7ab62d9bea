"""The standard benchmarks through ``--mode=eval``: COCO Karpathy captioning, VQAv2 and
HatefulMemes, read from small files in their published layouts whose paths are set in gin."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flamingo_jax import configs
from flamingo_jax.evaluation.fewshot import build_tasks

from conftest import SMOKE_STEPS, copy_run, one_device_env


def path_bindings(files: dict[str, str]) -> list[str]:
    return [f"{key.upper()}='{value}'" for key, value in files.items()]


@pytest.mark.slow
def test_eval_mode_runs_coco_vqav2_and_hateful_memes_from_gin_paths(smoke_run, benchmark_files, tmp_path):
    workdir = copy_run(smoke_run, tmp_path / "run")
    bindings = [
        *path_bindings(benchmark_files),
        "EvalConfig.shots=[0, 1]",
        "EvalConfig.num_beams=2",
        "EvalConfig.max_new_tokens=4",
        "EvalConfig.batch_size=4",
    ]
    command = [sys.executable, "-m", "flamingo_jax.main", "--mode=eval", f"--workdir={workdir}"]
    command += ["--gin_file=runs/smoke_cpu.gin", "--gin_file=runs/eval_benchmarks.gin"]
    command += [f"--gin.{binding}" for binding in bindings]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=one_device_env())
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {"coco": ("CIDEr", 3), "vqav2": ("accuracy", 4), "hateful_memes": ("roc_auc", 4)}
    for task, (metric, queries) in expected.items():
        with open(os.path.join(workdir, "eval", f"{task}_{SMOKE_STEPS}.json")) as f:
            record = json.load(f)
        assert record["task"] == task and set(record["results"]) == {"0", "1"}
        for shots in ("0", "1"):
            assert record["results"][shots]["metric"] == metric
            assert 0.0 <= record["results"][shots][metric] <= 1000.0
            assert len(record["predictions"][shots]["0"]) == queries
    report = (workdir / "eval" / "report.md").read_text()
    assert all(f"| {task} | {SMOKE_STEPS} |" in report for task in expected)


def test_a_benchmark_without_its_paths_is_a_clear_error(benchmark_files):
    files = dict(benchmark_files, coco_images=None)
    configs.parse_gin(
        ["runs/smoke_cpu.gin", "runs/eval_benchmarks.gin"],
        [*path_bindings({k: v for k, v in files.items() if v}), "EvalConfig.tasks=['coco']"],
    )
    with pytest.raises(
        ValueError, match=r"task 'coco' needs EvalConfig.task_options\['coco'\] to set \['image_root'\]"
    ):
        build_tasks(configs.eval_config())
    configs.parse_gin(
        ["runs/smoke_cpu.gin", "runs/eval_benchmarks.gin"],
        [
            *path_bindings(benchmark_files),
            "EvalConfig.task_options={'coco': {'path': 'x', 'image_root': 'y', 'ways': 2}}",
        ],
    )
    with pytest.raises(ValueError, match=r"task_options\['coco'\]: \['ways'\] are not options of the task"):
        build_tasks(configs.eval_config())
    # A task's own shot counts are a list: a bare number is an error naming the setting.
    configs.parse_gin(
        ["runs/smoke_cpu.gin", "runs/eval_benchmarks.gin"],
        [*path_bindings(benchmark_files), "EvalConfig.task_options={'coco': {'shots': 2}}"],
    )
    with pytest.raises(ValueError, match=r"task_options\['coco'\]\['shots'\]=2: must be a list of ints"):
        configs.eval_config()
