"""Entry point: ``python -m flamingo_jax.main --gin_file=runs/X.gin --gin.KEY=VALUE --workdir=DIR``.

Writes the operative config to ``DIR/config.gin`` and trains; restarted with the same command, a
run resumes from the latest checkpoint in ``DIR``. Under several processes (a TPU pod, or
``launch/local.py`` here) every process runs this same command.

``--mode=eval`` (with the run's gin files plus an ``EvalConfig``, e.g. ``runs/eval_benchmarks.gin``)
evaluates the latest checkpoint in ``DIR`` and writes ``DIR/eval/<task>_<step>.json``.
"""

from __future__ import annotations

import logging
import sys
import time

import jax
from absl import app, flags
from absl import logging as absl_logging

from flamingo_jax import configs, storage
from flamingo_jax.evaluation.run import evaluate_run
from flamingo_jax.train.loop import train

_GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "Run gin file(s); searched in experiments/ too.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings; also spelled --gin.KEY=VALUE.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train, or evaluate the run's checkpoint.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of JAX processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU VM pod slices)."
)
_NUM_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", None, "Fake CPU devices for this process (local runs).")


def initialize_distributed() -> None:
    if _NUM_CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _NUM_CPU_DEVICES.value)
    if _COORDINATOR.value or _NUM_PROCESSES.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


def main(argv) -> None:
    if len(argv) > 1:
        sys.exit(f"flamingo_jax.main: unexpected arguments {argv[1:]}")
    if not _WORKDIR.value:
        sys.exit("flamingo_jax.main: --workdir is required")
    if not _GIN_FILE.value:
        sys.exit("flamingo_jax.main: --gin_file is required, e.g. --gin_file=runs/smoke_cpu.gin")
    # Our progress at INFO; the libraries' (orbax logs every save in detail) at WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("flamingo_jax").setLevel(logging.INFO)
    try:
        configs.parse_gin(_GIN_FILE.value, _GIN_BINDINGS.value)
        run_config = configs.run_config()
        if _MODE.value == "train":
            if not run_config.datasets:
                raise ValueError("RunConfig.datasets is empty: bind at least one DatasetConfig to train")
            for dataset in run_config.datasets:
                dataset.check_path()
        wants_eval = _MODE.value == "eval" or run_config.evaluate_at_end
        eval_config = configs.eval_config() if wants_eval else None
    except (ValueError, TypeError, FileNotFoundError) as error:
        sys.exit(f"flamingo_jax.main: configuration error: {error}")
    initialize_distributed()
    workdir = str(storage.path(_WORKDIR.value))  # a local directory or gs://bucket/run
    started = time.time()
    if _MODE.value == "eval":
        run_evaluation(run_config, eval_config, workdir, started)
        return
    if jax.process_index() == 0:
        config_text = configs.operative_config(_GIN_FILE.value, _GIN_BINDINGS.value)
        storage.write_text(storage.path(workdir) / "config.gin", config_text)
    try:
        summary = train(run_config, workdir)
    except ValueError as error:
        sys.exit(f"flamingo_jax.main: {error}")
    logging.getLogger("flamingo_jax").info(
        "finished at step %d%s", summary["step"], " (preempted)" if summary["preempted"] else ""
    )
    if run_config.evaluate_at_end and not summary["preempted"]:
        run_evaluation(run_config, eval_config, workdir, started, summary)


def run_evaluation(run_config, eval_config, workdir: str, started: float, trained: dict | None = None) -> None:
    """Evaluates the run as its model kind is evaluated (and its initialisation with
    ``EvalConfig.include_init``), writing ``DIR/eval/``. ``trained``: the summary of the training
    that just ran in this process, whose model is evaluated as it is (no rebuild, no checkpoint
    read)."""
    try:
        for path in evaluate_run(run_config, eval_config, workdir, trained, started):
            logging.getLogger("flamingo_jax").info("wrote %s", path)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"flamingo_jax.main: {error}")


def run() -> None:
    app.run(main, argv=configs.rewrite_gin_args(sys.argv))


if __name__ == "__main__":
    run()
