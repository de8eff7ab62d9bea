"""Evaluation of a run's checkpoint: ``python -m flamingo_jax.main --mode=eval ...``.

Builds the run's model exactly as training does (same gin files), restores the trainable
parameters of the latest checkpoint in ``DIR/checkpoints`` (or ``EvalConfig.checkpoint_step``;
0 evaluates the initialisation, the frozen LM), runs every task of the ``EvalConfig`` with the few-shot
protocol and writes ``DIR/eval/<task>_<step>.json`` (metrics, the config, every prediction).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os

import jax

from flamingo_jax import checkpointing, sharding, train
from flamingo_jax.data.images import image_config_for
from flamingo_jax.evaluation import fewshot, tasks

log = logging.getLogger(__name__)


def load_model(run_config: train.RunConfig, workdir: str, step: int | None):
    """(model, step, mesh, rules) with the parameters of ``step`` (None: latest; 0: initialisation)."""
    return next(load_models(run_config, workdir, [step]))


def load_models(run_config: train.RunConfig, workdir: str, steps, trained: dict | None = None):
    """Yields (model, step, mesh, rules) for each of ``steps`` (None: latest; 0: initialisation),
    building the model and reading the pretrained weights once for all of them.

    ``trained``: the summary ``train.train`` returned in this process; its final state and
    initial parameters are used as they are instead of building the model and reading the
    checkpoint again (the model is only rebuilt for an initialisation it did not keep)."""
    if trained is not None and (trained["initial_params"] is not None or 0 not in steps):
        training, initial = trained["training"], trained["initial_params"]
    else:  # nothing trained here, or a run that did not keep its initialisation: rebuild
        training = train.build_training(run_config, sharding.create_mesh(run_config.mesh))
        initial = training.state.params
    mesh = training.mesh
    for step in steps:
        params = initial
        if trained is not None and step in (None, trained["step"]):
            step, params = trained["step"], trained["training"].state.params
        elif step != 0:
            checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
            try:
                available = list(checkpointer.manager.all_steps())
                if step is None:
                    step = checkpointer.latest_step()
                if step is None or step not in available:
                    raise FileNotFoundError(
                        f"no checkpoint {'at all' if step is None else f'at step {step}'} in {workdir}/checkpoints "
                        f"(available: {sorted(available)}); EvalConfig.checkpoint_step=0 evaluates the "
                        "initialisation"
                    )
                params = checkpointer.restore_state(step, training.abstract_state()).params
            finally:
                checkpointer.close()
        yield train.merge_model(training.graphdef, params, training.frozen), step, mesh, training.rules


def make_task(name: str, config: fewshot.EvalConfig) -> tasks.Task:
    if name not in tasks.OFFLINE_TASKS:
        raise ValueError(f"EvalConfig.tasks: unknown task {name!r}; available: {sorted(tasks.OFFLINE_TASKS)}")
    factory = tasks.OFFLINE_TASKS[name]
    accepted = inspect.signature(factory).parameters
    options = {"num_queries": config.queries_for(name), "pool_size": config.pool_size}
    return factory(**{key: value for key, value in options.items() if key in accepted})


def evaluate(run_config: train.RunConfig, eval_config: fewshot.EvalConfig, workdir: str) -> dict[str, str]:
    """Runs the evaluation of ``eval_config.checkpoint_step``; returns {task: path of its JSON}."""
    return evaluate_steps(run_config, eval_config, workdir, [eval_config.checkpoint_step])[0]


def evaluate_steps(
    run_config: train.RunConfig, eval_config: fewshot.EvalConfig, workdir: str, steps, trained: dict | None = None
) -> list[dict]:
    """Runs the evaluation for each of ``steps`` (None: latest; 0: initialisation) on one model
    build (``trained``: see :func:`load_models`); returns [{task: path of its JSON}] in the order
    of ``steps``."""
    from flamingo_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(run_config.tokenizer)
    if tokenizer.base_vocab_size != run_config.model.lm.vocab_size:
        raise ValueError(
            f"RunConfig.tokenizer={run_config.tokenizer!r} has {tokenizer.base_vocab_size} base tokens but "
            f"LlamaConfig.vocab_size is {run_config.model.lm.vocab_size}"
        )
    image_config = image_config_for(run_config.model.vision)
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    tasks_to_run = {name: make_task(name, eval_config) for name in eval_config.tasks}  # read once for all steps
    outputs = []
    for model, step, mesh, rules in load_models(run_config, workdir, steps, trained):
        config = dataclasses.replace(eval_config, checkpoint_step=step, shots=eval_config.shots_for(step))
        written = {}
        for name in config.tasks_for(step):
            task = tasks_to_run[name]
            with sharding.activation_sharding(mesh, rules):
                result = fewshot.evaluate_task(model, tokenizer, task, config, image_config=image_config)
            record = {"task": name, "kind": task.kind, "step": step, "config": dataclasses.asdict(config), **result}
            path = os.path.join(out_dir, f"{name}_{step}.json")
            if jax.process_index() == 0:
                with open(path + ".tmp", "w") as f:
                    json.dump(record, f, indent=1)
                os.replace(path + ".tmp", path)  # never a half-written file
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
            written[name] = path
        outputs.append(written)
    return outputs
