"""Models to evaluate: a run's model rebuilt as training builds it, with the trainable parameters
of a checkpoint (or of the training that just ran in this process)."""

from __future__ import annotations

from flamingo_jax import checkpointing, sharding, storage
from flamingo_jax.train.loop import RunConfig, build_training
from flamingo_jax.train.params import merge_model


def load_model(run_config: RunConfig, workdir: str, step: int | None):
    """(model, step, mesh, rules) with the parameters of ``step`` (None: latest; 0: initialisation)."""
    return next(load_models(run_config, workdir, [step]))


def load_models(run_config: RunConfig, workdir: str, steps, trained: dict | None = None):
    """Yields (model, step, mesh, rules) for each of ``steps`` (None: latest; 0: initialisation),
    building the model and reading the pretrained weights once for all of them.

    ``trained``: the summary ``train.loop.train`` returned in this process; its final state and
    initial parameters are used as they are instead of building the model and reading the
    checkpoint again (the model is only rebuilt for an initialisation it did not keep)."""
    if trained is not None and (trained["initial_params"] is not None or 0 not in steps):
        training, initial = trained["training"], trained["initial_params"]
    else:  # nothing trained here, or a run that did not keep its initialisation: rebuild
        training = build_training(run_config, sharding.create_mesh(run_config.mesh))
        initial = training.state.params
    mesh = training.mesh
    for step in steps:
        params = initial
        if trained is not None and step in (None, trained["step"]):
            step, params = trained["step"], trained["training"].state.params
        elif step != 0:
            checkpointer = checkpointing.Checkpointer(storage.path(workdir) / "checkpoints", async_save=False)
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
        yield merge_model(training.graphdef, params, training.frozen), step, mesh, training.rules
