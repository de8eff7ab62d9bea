"""Run metrics: ``metrics.jsonl`` (one object per logged step), TensorBoard event files
(tensorboardX, no TensorFlow), and a progress bar on a terminal or plain log lines elsewhere."""

from __future__ import annotations

import json
import logging
import math
import os
import sys

import numpy as np

log = logging.getLogger(__name__)


class MetricsWriter:
    """Only the primary process writes. ``resume_step`` drops lines logged after the checkpoint
    a run resumes from, so a resumed run's curve equals an uninterrupted one."""

    def __init__(self, workdir: str, *, total_steps: int, resume_step: int = 0, primary: bool = True):
        self.primary = primary
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tensorboard = None
        self._progress = None
        if not primary:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
        from tensorboardX import SummaryWriter

        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._progress = tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.primary:
            return
        record = {"step": int(step)}
        record.update({key: _plain(value) for key, value in sorted(metrics.items())})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, float) and math.isfinite(value):
                self._tensorboard.add_scalar(key, value, step)
        summary = f"step {step}: loss {record.get('loss', float('nan')):.4f}"
        if self._progress is not None:
            self._progress.set_postfix_str(summary.split(": ", 1)[1], refresh=False)
        else:
            log.info("%s, %.1f tokens/s", summary, record.get("tokens_per_s", 0.0))

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


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
