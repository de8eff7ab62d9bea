"""The entry point end to end: outputs, continuation and configuration errors through
``main.main`` in this process (flags parsed as the command line parses them); runs killed by
SIGKILL and stopped by SIGTERM, the exit status and the absence of tracebacks as real subprocesses
(their resumption runs in this process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags

from flamingo_jax import configs, main
from flamingo_jax.train.writer import read_metrics

TIMING_KEYS = ("step_time_s", "tokens_per_s", "mfu")


def main_command(workdir, *bindings):
    return [
        sys.executable,
        "-m",
        "flamingo_jax.main",
        "--gin_file=runs/smoke_cpu.gin",
        f"--workdir={workdir}",
        *(f"--gin.{binding}" for binding in bindings),
    ]


def run_main(workdir, *bindings, timeout=300):
    return subprocess.run(main_command(workdir, *bindings), capture_output=True, text=True, timeout=timeout)


def main_in_process(workdir, *bindings):
    """``main.main`` on the command line ``main_command`` would run, in this process."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(configs.rewrite_gin_args(main_command(workdir, *bindings)[2:]))
    main.main(["flamingo_jax.main"])


def without_timing(records):
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in records]


def final_params(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path)
    return {key: np.asarray(value) for key, value in restored["params"].items()}


def start(command, log_path, cwd=None):
    """``command`` started in the background, its stdout and stderr going to ``log_path`` (a pipe
    nobody reads while the test waits would block the process once it holds 64 KiB)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    process.log_path = log_path
    return process


def output_of(process) -> str:
    with open(process.log_path) as f:
        return f.read()


def wait_for(predicate, timeout, process):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        assert process.poll() is None, output_of(process)[-3000:]
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


@pytest.mark.slow
def test_smoke_run_writes_its_outputs_and_continues(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    main_in_process(workdir, "TRAIN_STEPS=10", "CHECKPOINT_EVERY=5", "LOG_EVERY=5")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "5"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [5, 10]
    required = {
        "loss",
        "loss/interleaved",
        "loss/pairs",
        "learning_rate",
        "grad_norm",
        "tokens_per_s",
        "step_time_s",
        "mfu",
    }
    assert required <= set(records[0])
    assert {"gate/0/attn", "gate/0/ffw", "gate/1/attn", "gate/1/ffw"} <= set(records[0])
    assert all(np.isfinite(r["loss"]) and r["mfu"] > 0 for r in records)
    with open(os.path.join(workdir, "config.gin")) as f:
        assert "TRAIN_STEPS = 10" in f.read()

    with caplog.at_level("INFO", logger="flamingo_jax"):
        main_in_process(workdir, "TRAIN_STEPS=15", "CHECKPOINT_EVERY=5", "LOG_EVERY=5")
    assert "resumed from the checkpoint at step 10" in caplog.text
    assert [r["step"] for r in read_metrics(workdir)] == [5, 10, 15]


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_resumes_bit_identically(tmp_path):
    bindings = ("TRAIN_STEPS=30", "CHECKPOINT_EVERY=5", "LOG_EVERY=1")
    reference = str(tmp_path / "reference")
    main_in_process(reference, *bindings)  # the same program as the subprocess's, on the same devices

    interrupted = str(tmp_path / "interrupted")
    process = start(main_command(interrupted, *bindings), tmp_path / "interrupted.log")
    wait_for(lambda: os.path.isdir(os.path.join(interrupted, "checkpoints", "5")), 300, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps = [int(name) for name in os.listdir(os.path.join(interrupted, "checkpoints")) if name.isdigit()]
    assert max(steps) < 30, "the run finished before it could be killed"
    killed_at = max(r["step"] for r in read_metrics(interrupted))

    main_in_process(interrupted, *bindings)  # resumed here: the killed run was the subprocess
    resumed = read_metrics(interrupted)
    assert [r["step"] for r in resumed] == list(range(1, 31)), killed_at
    assert without_timing(resumed) == without_timing(read_metrics(reference))
    expected = final_params(reference, 30)
    actual = final_params(interrupted, 30)
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(actual[key], value, err_msg=key)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_loses_no_step(tmp_path):
    workdir = str(tmp_path / "run")
    bindings = ("TRAIN_STEPS=100000", "CHECKPOINT_EVERY=100000", "LOG_EVERY=1")
    process = start(main_command(workdir, *bindings), tmp_path / "run.log")

    def logged_five():
        return len(read_metrics(workdir)) >= 5

    wait_for(logged_five, 300, process)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    output = output_of(process)
    assert process.returncode == 0, output[-3000:]
    assert "preempted" in output
    saved = [int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()]
    last_logged = max(r["step"] for r in read_metrics(workdir))
    assert saved == [last_logged]

    main_in_process(workdir, f"TRAIN_STEPS={last_logged + 3}", "CHECKPOINT_EVERY=100000", "LOG_EVERY=1")
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, last_logged + 4))


def test_bad_configuration_fails_at_start_naming_the_setting(tmp_path):
    cases = {
        "RunConfig.trian_steps=3": "trian_steps",
        "MeshConfig.data=3": "MeshConfig: data=3",
        "RunConfig.init_from='/no/such/checkpoint'": "RunConfig.init_from",
        "MeshConfig.rules='zero3'": "MeshConfig.rules='zero3'",
        "pairs/DatasetConfig.source='my_pairs'": "unknown data source 'my_pairs'; registered:",
    }
    for binding, message in cases.items():
        with pytest.raises(SystemExit, match=message):
            main_in_process(str(tmp_path / "bad"), binding)
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")
    # As a command: a non-zero exit status and the message, no traceback, quickly.
    started = time.monotonic()
    result = run_main(str(tmp_path / "bad"), "RunConfig.trian_steps=3")
    assert result.returncode != 0 and "trian_steps" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - started < 60


def test_missing_workdir_flag():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["flamingo_jax.main", "--gin_file=runs/smoke_cpu.gin"])
    with pytest.raises(SystemExit, match="--workdir is required"):
        main.main(["flamingo_jax.main"])
