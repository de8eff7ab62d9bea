"""Evaluation of a run's checkpoints: ``python -m flamingo_jax.main --mode=eval ...``.

Builds the run's model exactly as training does (same gin files), restores the trainable
parameters of the latest checkpoint in ``DIR/checkpoints`` (or ``EvalConfig.checkpoint_step``; 0
evaluates the initialisation, the frozen LM), runs what fits the model's kind (few-shot tasks, or
zero-shot retrieval for a contrastive model) and writes ``DIR/eval/<task>_<step>.json`` (metrics,
the config, every prediction) and ``DIR/eval/report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import jax

from flamingo_jax import sharding, storage
from flamingo_jax.data.images import image_config_for
from flamingo_jax.evaluation import contrastive, fewshot, report, tasks
from flamingo_jax.evaluation.checkpoints import load_models
from flamingo_jax.evaluation.fewshot import build_tasks
from flamingo_jax.models.kinds import kind_of
from flamingo_jax.tokenizer import load_tokenizer
from flamingo_jax.train.loop import RunConfig

log = logging.getLogger(__name__)


def evaluate_steps(
    run_config: RunConfig,
    eval_config: fewshot.EvalConfig,
    workdir: str,
    steps,
    trained: dict | None = None,
    tasks_to_run: dict[str, tasks.Task] | None = None,
) -> list[dict]:
    """Runs the evaluation for each of ``steps`` (None: latest; 0: initialisation) on one model
    build (``trained``: see :func:`load_models`); returns [{task: path of its JSON}] in the order
    of ``steps``. ``tasks_to_run``: the tasks already built (default: built here, once)."""
    tokenizer = load_tokenizer(run_config.tokenizer, run_config.model.new_tokens)
    if tokenizer.base_vocab_size != run_config.model.lm.vocab_size:
        raise ValueError(
            f"RunConfig.tokenizer={run_config.tokenizer!r} has {tokenizer.base_vocab_size} base tokens but "
            f"LlamaConfig.vocab_size is {run_config.model.lm.vocab_size}"
        )
    image_config = image_config_for(run_config.model.vision)
    out_dir = storage.path(workdir) / "eval"
    tasks_to_run = tasks_to_run or build_tasks(eval_config)
    outputs = []
    for model, step, mesh, rules in load_models(run_config, workdir, steps, trained):
        written = {}
        for name in eval_config.tasks_for(step):
            config = eval_config.for_task(name, step)
            task = tasks_to_run[name]
            with sharding.activation_sharding(mesh, rules):
                result = fewshot.evaluate_task(model, tokenizer, task, config, image_config=image_config)
            record = {"task": name, "kind": task.kind, "step": step, "config": dataclasses.asdict(config), **result}
            path = out_dir / f"{name}_{step}.json"
            if jax.process_index() == 0:
                storage.write_text(path, json.dumps(record, indent=1))
            for shots, values in result["results"].items():
                metric = values["metric"]
                log.info(
                    "%s step %d, %d-shot: %s %.2f ± %.2f",
                    name,
                    step,
                    shots,
                    metric,
                    values[metric],
                    values[f"{metric}_std"],
                )
            written[name] = str(path)
        outputs.append(written)
    return outputs


def evaluate_run(
    run_config: RunConfig,
    eval_config: fewshot.EvalConfig,
    workdir: str,
    trained: dict | None = None,
    started: float | None = None,
) -> list[str]:
    """What ``--mode=eval`` and ``RunConfig.evaluate_at_end`` run for the model's kind: the
    checkpoint ``eval_config.checkpoint_step`` (and the initialisation with ``include_init``),
    then, for few-shot kinds, ``DIR/eval/report.md`` (with the wall time since ``started``, a
    ``time.time()``). Returns the paths written."""
    steps = [eval_config.checkpoint_step]
    if eval_config.include_init and eval_config.checkpoint_step != 0:
        steps.append(0)
    if kind_of(run_config.model).evaluation == "retrieval":
        return [contrastive.evaluate_contrastive(run_config, eval_config, workdir, step) for step in steps]
    built = build_tasks(eval_config)
    outputs = evaluate_steps(run_config, eval_config, workdir, steps, trained, built)
    written = [path for paths in outputs for path in paths.values()]
    if jax.process_index() == 0:
        wall_time = None if started is None else time.time() - started
        text = report.write_report(workdir, wall_time_s=wall_time, tasks=built)
        report_path = str(storage.path(workdir) / "eval" / "report.md")
        log.info("report: %s\n%s", report_path, text)
        written.append(report_path)
    return written
