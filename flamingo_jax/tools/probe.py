"""Linear probes of the visual pathway: how much class information survives each stage between
the frozen vision encoder and the cross-attention blocks, at the initialisation and at trained
checkpoints.

  python -m flamingo_jax.tools.probe --gin_file=RUN.gin --workdir=DIR --task=NAME \\
      [--steps=0,450] [--train_images=2000] [--test_images=500]

For each step (0: the initialisation; default: 0 and the latest checkpoint) it runs the images of
a registered classification task (the first ``--train_images`` of its demonstration pool to fit
on, the first ``--test_images`` of its queries to score) through the vision encoder and the
Perceiver Resampler,
mean-pools every stage over its tokens, fits a softmax regression on the training images'
standardised features and prints its test accuracy per stage:

  vision            the frozen encoder's features
  resampler/input   after the time embeddings and the resampler's input projection
  resampler/layerK  the latents after resampler layer K
  resampler/output  the visual tokens the cross-attention blocks read

A stage whose accuracy falls during training has learned to discard what the encoder sees.
Writes ``DIR/eval/probe.json``.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from flamingo_jax import configs, storage
from flamingo_jax.data.images import image_config_for
from flamingo_jax.evaluation.checkpoints import load_models
from flamingo_jax.evaluation.fewshot import EvalConfig, make_task, prepare_image


def define_flags() -> None:
    """Command-line flags, defined only when run as a script (importing stays flag-free)."""
    flags.DEFINE_multi_string("gin_file", [], "The run's gin file(s).")
    flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings; also spelled --gin.KEY=VALUE.")
    flags.DEFINE_string("workdir", None, "The run's directory.")
    flags.DEFINE_list("steps", None, "Checkpoint steps (0: initialisation; default: 0 and the latest).")
    flags.DEFINE_string("task", None, "A registered classification task whose images are probed.")
    flags.DEFINE_integer("train_images", 2000, "Images of the task's pool the probes are fitted on.")
    flags.DEFINE_integer("test_images", 500, "Queries of the task the probes are scored on.")


def stage_names(resampler_depth: int) -> list[str]:
    """The probed stages in the order images pass through them."""
    return ["vision", "resampler/input", *(f"resampler/layer{k}" for k in range(resampler_depth)), "resampler/output"]


def pathway_stages(model, images: jax.Array) -> dict[str, jax.Array]:
    """float[B, H, W, C] images -> {stage: float[B, width]} mean-pooled over each stage's tokens."""
    features = model.vision(images)
    values = model.resampler.trace(features[:, None, None])
    pooled = {"vision": features.mean(axis=1)}
    for name, value in values.items():
        pooled[f"resampler/{name}"] = value.reshape(images.shape[0], -1, value.shape[-1]).mean(axis=1)
    return pooled


def pathway_features(model, images: np.ndarray, batch_size: int = 100) -> dict[str, np.ndarray]:
    """:func:`pathway_stages` over ``images`` in batches, as numpy arrays."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    stages = jax.jit(lambda state, batch: pathway_stages(nnx.merge(graphdef, state), batch))
    chunks = [stages(state, jnp.asarray(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    names = stage_names(model.config.resampler.depth)  # jit hands dicts back in sorted key order
    return {name: np.concatenate([np.asarray(chunk[name]) for chunk in chunks]) for name in names}


def linear_probe_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int,
    steps: int = 300,
    learning_rate: float = 1e-2,
    weight_decay: float = 1e-4,
) -> float:
    """Test accuracy of a softmax regression fitted full-batch (AdamW, deterministic) on the
    training features standardised by their own mean and deviation."""
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("linear_probe_accuracy: features and labels differ in length")
    if not len(train_x) or not len(test_x):
        raise ValueError("linear_probe_accuracy: needs training and test examples")
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    standardise = lambda x: jnp.asarray((x - mean) / std, jnp.float32)
    train_x, test_x = standardise(train_x), standardise(test_x)
    train_y = jnp.asarray(train_y, jnp.int32)
    params = (jnp.zeros((train_x.shape[1], num_classes)), jnp.zeros((num_classes,)))
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)

    def loss(params):
        logits = train_x @ params[0] + params[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, train_y).mean()

    @jax.jit
    def fit(params):
        def step(carry, _):
            params, opt_state = carry
            grads = jax.grad(loss)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
        return params

    weights, bias = fit(params)
    predictions = np.asarray(jnp.argmax(test_x @ weights + bias, axis=-1))
    return float(np.mean(predictions == np.asarray(test_y)))


def probe_data(task_name: str, image_config, *, train_images: int, test_images: int):
    """(train images, train labels, test images, test labels, number of classes) of a registered
    classification task: the first ``train_images`` of its pool and ``test_images`` of its
    queries, preprocessed for evaluation."""
    task = make_task(task_name, EvalConfig(num_queries=test_images, pool_size=train_images))
    if task.kind != "classification":
        raise ValueError(f"probe: task {task_name!r} is a {task.kind} task; probes need class labels")
    pool, queries = task.pool[:train_images], task.queries[:test_images]
    prepare = lambda examples: np.stack([prepare_image(e, image_config) for e in examples])
    labels = lambda examples: np.asarray([e.label for e in examples])
    return prepare(pool), labels(pool), prepare(queries), labels(queries), len(task.class_names)


def probe_model(model, data) -> dict[str, float]:
    """{stage: test accuracy} of ``model`` on ``data`` from :func:`probe_data`."""
    train_images, train_y, test_images, test_y, num_classes = data
    features = pathway_features(model, np.concatenate([train_images, test_images]))  # one compilation
    split = len(train_images)
    return {
        stage: linear_probe_accuracy(values[:split], train_y, values[split:], test_y, num_classes=num_classes)
        for stage, values in features.items()
    }


def probe_run(
    run_config, workdir: str, steps, *, task: str, train_images: int, test_images: int
) -> dict[int, dict[str, float]]:
    """{step: {stage: test accuracy}} for each of ``steps`` (0: initialisation; None: latest)."""
    data = probe_data(
        task, image_config_for(run_config.model.vision), train_images=train_images, test_images=test_images
    )
    return {step: probe_model(model, data) for model, step, _, _ in load_models(run_config, workdir, steps)}


def format_results(results: dict[int, dict[str, float]]) -> str:
    steps = list(results)
    stages = list(results[steps[0]])
    lines = [f"{'stage':<20}" + "".join(f"{f'step {s}':>12}" for s in steps)]
    for stage in stages:
        lines.append(f"{stage:<20}" + "".join(f"{100 * results[s][stage]:>11.1f}%" for s in steps))
    return "\n".join(lines)


def main(argv) -> None:
    args = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"probe: unexpected arguments {argv[1:]}")
    if not (args.gin_file and args.workdir and args.task):
        sys.exit("probe: --gin_file, --workdir and --task are required")
    try:
        steps = [int(s) for s in args.steps] if args.steps else [0, None]
    except ValueError:
        sys.exit(f"probe: --steps must be integers, got {args.steps}")
    configs.parse_gin(args.gin_file, args.gin_bindings)
    try:
        results = probe_run(
            configs.run_config(),
            args.workdir,
            steps,
            task=args.task,
            train_images=args.train_images,
            test_images=args.test_images,
        )
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"probe: {error}")
    print(format_results(results))
    if jax.process_index() == 0:
        record = {str(step): values for step, values in results.items()}
        storage.write_text(storage.path(args.workdir) / "eval" / "probe.json", json.dumps(record, indent=1))


if __name__ == "__main__":
    define_flags()
    app.run(main, argv=configs.rewrite_gin_args(sys.argv))
