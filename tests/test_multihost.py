"""2 processes x 4 devices (jax.distributed over gloo, launched by launch/local.py) train
exactly like 1 process x 8 devices."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from test_main import main_command, run_main, without_timing

from flamingo_jax.train.writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINDINGS = ("TRAIN_STEPS=4", "CHECKPOINT_EVERY=2", "LOG_EVERY=1")


def test_two_processes_match_one_process(tmp_path):
    single = str(tmp_path / "single")
    result = run_main(single, *BINDINGS)
    assert result.returncode == 0, result.stderr[-3000:]

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
