"""2 processes x 4 devices (jax.distributed over gloo, launched by launch/local.py) train
exactly like 1 process x 8 devices."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_main import main_command, main_in_process, output_of, start, wait_for, without_timing

from flamingo_jax.train.writer import read_metrics

# Multi-process training runs: in the slow step.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINDINGS = ("TRAIN_STEPS=4", "CHECKPOINT_EVERY=2", "LOG_EVERY=1")


def test_two_processes_match_one_process(tmp_path):
    single = str(tmp_path / "single")
    main_in_process(single, *BINDINGS)  # 1 process x 8 devices: this one

    multi = str(tmp_path / "multi")
    launcher = [
        sys.executable,
        os.path.join(REPO, "launch", "local.py"),
        "--num_processes=2",
        "--devices_per_process=4",
    ]
    launcher += ["--timeout_s=240", "--", *main_command(multi, *BINDINGS)]
    # `timeout -s KILL`: a hung collective ignores SIGTERM on the CPU backend.
    result = subprocess.run(["timeout", "-s", "KILL", "300", *launcher], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "[process 1]" in result.stdout

    single_records, multi_records = read_metrics(single), read_metrics(multi)
    assert [r["step"] for r in multi_records] == [1, 2, 3, 4]
    # Same global batches, same math; only the cross-process reduction order may differ.
    for one, two in zip(without_timing(single_records), without_timing(multi_records), strict=True):
        assert one.keys() == two.keys()
        for key in one:
            np.testing.assert_allclose(two[key], one[key], rtol=2e-5, atol=1e-7, err_msg=key)
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["2", "4"]


def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
    """JAX's preemption sync point: a SIGTERM to process 1 alone reaches process 0 through the
    coordination service; both save the same step and exit cleanly, and no step is lost."""
    workdir = str(tmp_path / "multi")
    bindings = ("TRAIN_STEPS=100000", "CHECKPOINT_EVERY=100000", "LOG_EVERY=1")
    launcher = [sys.executable, os.path.join(REPO, "launch", "local.py"), "--num_processes=2"]
    launcher += ["--devices_per_process=4", "--timeout_s=240", "--", *main_command(workdir, *bindings)]
    launched = start(launcher, tmp_path / "launched.log", cwd=REPO)

    def logged_three():
        return len(read_metrics(workdir)) >= 3

    try:
        wait_for(logged_three, 240, launched)
        pattern = f"--workdir={workdir} .*--process_id=1"
        found = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True)
        pids = [int(pid) for pid in found.stdout.split()]
        assert len(pids) == 1, found
        os.kill(pids[0], signal.SIGTERM)
        launched.wait(timeout=180)
    finally:
        if launched.poll() is None:
            launched.kill()
    output = output_of(launched)
    assert launched.returncode == 0, output[-4000:]
    notices = [line for line in output.splitlines() if "preemption notice: saving a checkpoint at step" in line]
    assert {line.split("]")[0] for line in notices} == {"[process 0", "[process 1"}, output[-4000:]
    steps = {line.rsplit("step ", 1)[1].split()[0] for line in notices}
    assert len(steps) == 1
    saved = [int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()]
    assert saved == [int(steps.pop())]
    assert max(r["step"] for r in read_metrics(workdir)) == saved[0]
