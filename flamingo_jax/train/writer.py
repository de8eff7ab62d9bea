"""Run metrics: ``DIR/metrics/`` (JSON lines, one object per logged step), TensorBoard event files
(tensorboardX, no TensorFlow), and a progress bar on a terminal or plain log lines elsewhere.

Object stores cannot append, so the metrics are kept in files of ``RECORDS_PER_FILE`` lines
(``metrics/<first step, 10 digits>.jsonl``, in step order by name): each log rewrites only the
newest file, whole. ``read_metrics`` joins them; locally ``cat DIR/metrics/*.jsonl`` does too."""

from __future__ import annotations

import json
import logging
import math
import sys

import numpy as np

from flamingo_jax import storage

log = logging.getLogger(__name__)

RECORDS_PER_FILE = 100


class MetricsWriter:
    """Only the primary process writes. ``resume_step`` drops the records logged after the
    checkpoint a run resumes from (the resumed run logs those steps again), so a resumed run's
    metrics equal an uninterrupted one's."""

    def __init__(self, workdir: str, *, total_steps: int, resume_step: int = 0, primary: bool = True):
        self.primary = primary
        self.directory = storage.path(workdir) / "metrics"
        self._tensorboard = None
        self._progress = None
        self._file, self._records = None, []
        if not primary:
            return
        self._file, self._records = _drop_after(self.directory, resume_step)
        self._tensorboard = storage.tensorboard_writer(
            storage.path(workdir) / "tensorboard", purge_step=resume_step + 1
        )
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._progress = tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.primary:
            return
        record = {"step": int(step)}
        record.update({key: _plain(value) for key, value in sorted(metrics.items())})
        if self._file is None or len(self._records) >= RECORDS_PER_FILE:
            self._file, self._records = _file_for(self.directory, record["step"]), []
        self._records.append(record)
        storage.write_text(self._file, _json_lines(self._records))
        for key, value in record.items():
            if key != "step" and isinstance(value, float) and math.isfinite(value):
                self._tensorboard.add_scalar(key, value, step)
        summary = f"step {step}: loss {record.get('loss', float('nan')):.4f}"
        if self._progress is not None:
            self._progress.set_postfix_str(summary.split(": ", 1)[1], refresh=False)
        else:
            log.info("%s, %.1f tokens/s", summary, record.get("tokens_per_s", 0.0))

    def flush(self) -> None:
        """Makes the TensorBoard events written so far durable (the metrics files are at every
        write); tensorboardX on its own flushes every two minutes, so a crash would lose them."""
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None:
            self._progress.update(steps)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._progress is not None:
            self._progress.close()


def _plain(value):
    value = np.asarray(value)
    return float(value) if value.dtype.kind == "f" else int(value)


def _json_lines(records: list[dict]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def _file_for(directory, first_step: int):
    return directory / f"{first_step:010d}.jsonl"


def _read(file) -> list[dict]:
    lines = file.read_text().splitlines()
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not a metrics file (JSON lines): {error}") from None


def _metric_files(directory) -> list:
    if not directory.exists():
        return []
    return sorted(file for file in directory.iterdir() if file.name.endswith(".jsonl"))


def _drop_after(directory, resume_step: int):
    """Removes the records after ``resume_step``; returns the newest file and its records
    (None, [] when there is none) for the writer to continue."""
    newest, newest_records = None, []
    for file in _metric_files(directory):
        records = _read(file)
        kept = [record for record in records if record["step"] <= resume_step]
        if not kept:
            file.unlink()
            continue
        if len(kept) != len(records):
            storage.write_text(file, _json_lines(kept))
        newest, newest_records = file, kept
    return newest, newest_records


def read_metrics(workdir: str) -> list[dict]:
    """Every logged record of the run in ``workdir``, in step order ([] before the first log)."""
    records = []
    for file in _metric_files(storage.path(workdir) / "metrics"):
        records.extend(_read(file))
    return records
