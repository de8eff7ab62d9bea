"""The eval mode of the entry point: a smoke run's checkpoint evaluated few-shot on the offline
real sets, JSON results with every prediction; clear errors for a missing checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

EVAL_BINDINGS = [
    "EvalConfig.shots=[0, 2]",
    "EvalConfig.seeds=[0, 1]",
    "EVAL_QUERIES=6",
    "EvalConfig.pool_size=40",
    "EvalConfig.batch_size=6",
    "EvalConfig.max_new_tokens=4",
    "EvalConfig.num_beams=2",
]


def run_main(workdir, mode, *bindings, gin_files=("runs/smoke_cpu.gin",)):
    command = [sys.executable, "-m", "flamingo_jax.main", f"--mode={mode}", f"--workdir={workdir}"]
    command += [f"--gin_file={f}" for f in gin_files] + [f"--gin.{b}" for b in bindings]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    result = run_main(workdir, "train", "TRAIN_STEPS=4", "CHECKPOINT_EVERY=4", "LOG_EVERY=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_eval_mode_writes_results_and_predictions(trained):
    files = ("runs/smoke_cpu.gin", "runs/eval_offline.gin")
    fewer = "EvalConfig.task_queries={'skimage_captions': 3}"
    result = run_main(trained, "eval", *EVAL_BINDINGS, fewer, gin_files=files)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {
        "fashion_mnist": "accuracy",
        "fashion_mnist_vqa": "accuracy",
        "fashion_mnist_captions": "CIDEr",
        "skimage_captions": "CIDEr",
    }
    for task, metric in expected.items():
        with open(os.path.join(trained, "eval", f"{task}_4.json")) as f:
            record = json.load(f)
        assert record["step"] == 4 and record["task"] == task
        for shots in ("0", "2"):
            values = record["results"][shots]
            assert values["metric"] == metric and len(values["per_seed"]) == 2
            assert 0.0 <= values[metric] <= 1000.0 and values[f"{metric}_std"] >= 0.0
            for seed in ("0", "1"):
                rows = record["predictions"][shots][seed]
                assert len(rows) == (3 if task == "skimage_captions" else 6)
                assert all("prediction" in row for row in rows)

    # The initialisation (checkpoint_step=0) is evaluated the same way; a missing step is an error.
    result = run_main(
        trained,
        "eval",
        *EVAL_BINDINGS,
        "EvalConfig.tasks=['fashion_mnist']",
        "EvalConfig.checkpoint_step=0",
        gin_files=files,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.exists(os.path.join(trained, "eval", "fashion_mnist_0.json"))
    result = run_main(trained, "eval", *EVAL_BINDINGS, "EvalConfig.checkpoint_step=3", gin_files=files)
    assert result.returncode != 0 and "no checkpoint at step 3" in result.stderr and "available: [4]" in result.stderr
    result = run_main(trained, "eval", *EVAL_BINDINGS, "EvalConfig.tasks=['imagenet']", gin_files=files)
    assert result.returncode != 0 and "EvalConfig.tasks: unknown tasks ['imagenet']" in result.stderr
    result = run_main(trained, "eval", *EVAL_BINDINGS, "EvalConfig.task_queries={'fashion': 3}", gin_files=files)
    assert result.returncode != 0 and "EvalConfig.task_queries: unknown tasks ['fashion']" in result.stderr


def test_evaluation_at_the_end_of_training_reuses_the_trained_model(tmp_path):
    """``RunConfig.evaluate_at_end`` evaluates the model the training holds (and the initial
    parameters it kept, at ``EvalConfig.init_shots``) without rebuilding it: the same results and
    predictions as ``--mode=eval`` on the run's checkpoint, which rebuilds the model and restores
    the parameters."""
    files = ("runs/smoke_cpu.gin", "runs/eval_offline.gin")
    bindings = [
        *EVAL_BINDINGS,
        "EvalConfig.tasks=['fashion_mnist']",
        "EvalConfig.include_init=True",
        "EvalConfig.init_shots=[2]",
    ]
    run = ["TRAIN_STEPS=3", "CHECKPOINT_EVERY=3", "RunConfig.evaluate_at_end=True"]
    result = run_main(tmp_path, "train", *run, *bindings, gin_files=files)
    assert result.returncode == 0, result.stderr[-3000:]

    def records():
        out = {}
        for step in (3, 0):
            with open(os.path.join(tmp_path, "eval", f"fashion_mnist_{step}.json")) as f:
                record = json.load(f)
            out[step] = (record["results"], record["predictions"])
        return out

    at_end = records()
    assert (set(at_end[3][0]), set(at_end[0][0])) == ({"0", "2"}, {"2"})  # EvalConfig.init_shots
    result = run_main(tmp_path, "eval", *bindings, gin_files=files)
    assert result.returncode == 0, result.stderr[-3000:]
    assert records() == at_end
    assert at_end[3][1] != at_end[0][1]  # the trained model and its initialisation differ


NOTEBOOK = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "evaluate_checkpoint.ipynb"
)


def test_notebook_runs_headless_on_the_workdir(trained, monkeypatch):
    """The checkpoint-evaluation notebook, executed by a real Jupyter kernel against the smoke
    run: no error, and its two figures (prediction grid, training curves) are produced."""
    import nbclient
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    monkeypatch.setenv("FLAMINGO_WORKDIR", str(trained))
    monkeypatch.setenv("FLAMINGO_TASK", "skimage_captions")
    monkeypatch.setenv("FLAMINGO_SHOTS", "2")
    monkeypatch.setenv("FLAMINGO_QUERIES", "4")
    monkeypatch.setenv("XLA_FLAGS", "")  # one device in the kernel is enough
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(trained)}}
    )
    client.execute()
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 2
    for name in ("predictions.png", "training.png"):
        path = os.path.join(trained, "eval", "notebook", name)
        assert os.path.getsize(path) > 5000
    text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "checkpoint at step 4" in text and "skimage_captions, 2-shot: CIDEr =" in text
