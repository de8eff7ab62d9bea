"""The TPU launch script in dry-run for a v5p-64 pod slice: the exact gcloud commands, every
worker, the training environment and the gin flags passed through."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "tpu.py")
WHERE = ["--name=flamingo", "--zone=us-east5-a", "--project=lab", "--accelerator_type=v5p-64"]


def dry_run(action, *extra, main_args=()):
    command = [sys.executable, SCRIPT, action, *WHERE, "--dry_run", *extra]
    if main_args:
        command += ["--", *main_args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return result, [shlex.split(line) for line in result.stdout.splitlines()]


def test_create_direct_spot_and_queued():
    result, (command,) = dry_run("create", "--spot")
    assert result.returncode == 0
    assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "flamingo"]
    assert {
        "--zone=us-east5-a",
        "--project=lab",
        "--accelerator-type=v5p-64",
        "--version=v2-alpha-tpuv5",
        "--spot",
    } <= set(command)
    _, (queued,) = dry_run("create", "--queued")
    assert queued[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert "--node-id=flamingo" in queued and "--runtime-version=v2-alpha-tpuv5" in queued


def test_setup_copies_and_installs_on_every_worker():
    result, commands = dry_run("setup")
    assert result.returncode == 0 and len(commands) == 3
    assert commands[0][:2] == ["git", "-C"] and "archive" in commands[0]
    assert commands[1][4] == "scp" and "--worker=all" in commands[1]
    ssh = commands[2]
    assert ssh[4] == "ssh" and "--worker=all" in ssh
    remote = next(a for a in ssh if a.startswith("--command="))
    assert "pip install -q -e '.' 'jax[tpu]'" in remote and "fashion" not in remote


def test_setup_installs_the_extras_and_packages_asked_for():
    result, commands = dry_run("setup", "--extras=notebook", "--pip=my-weights==1.0")
    remote = next(a for a in commands[2] if a.startswith("--command="))
    assert result.returncode == 0 and "pip install -q -e '.[notebook]' 'jax[tpu]'" in remote
    assert remote.endswith("pip install -q my-weights==1.0")


def test_run_passes_gin_flags_and_environment_to_all_workers():
    gin = ["--gin_file=runs/smoke_cpu.gin", "--gin.TRAIN_STEPS=1000", "--gin.MeshConfig.rules='fsdp_tensor'"]
    result, (command,) = dry_run("run", "--workdir=/mnt/shared/run", main_args=gin)
    assert result.returncode == 0
    assert command[4] == "ssh" and "--worker=all" in command
    remote = next(a for a in command if a.startswith("--command="))[len("--command=") :]
    assert "PYTHONUNBUFFERED=1" in remote and "TPU_STDERR_LOG_LEVEL=0" in remote
    main = shlex.split(remote.split(" .venv/bin/", 1)[1].split(" > ")[0])
    assert main[:5] == ["python", "-m", "flamingo_jax.main", "--distributed", "--workdir=/mnt/shared/run"]
    assert main[5:] == gin  # passed through exactly, quoting included
    result, _ = dry_run("run", main_args=gin)
    assert result.returncode == 2 and "needs --workdir" in result.stderr


@pytest.mark.parametrize("action, verb", [("logs", "ssh"), ("stop", "stop"), ("delete", "delete")])
def test_logs_stop_delete(action, verb):
    result, (command,) = dry_run(action)
    assert result.returncode == 0 and command[4] == verb and "--zone=us-east5-a" in command
    if action == "logs":
        assert "--worker=all" in command
    _, (collect,) = dry_run("logs", "--collect=./logs")
    assert collect[4] == "scp" and "--worker=all" in collect and "./logs" in collect
