"""Stage 1: the contrastive two-tower model, its global-batch loss, its evaluators, training and
resume through the same loop, and export of the vision tower into a Flamingo model."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax import configs, sharding
from flamingo_jax.batch import Batch
from flamingo_jax.evaluation import contrastive as evaluation
from flamingo_jax.models.contrastive import ContrastiveConfig, TextEncoderConfig, caption_tokens, contrastive_loss
from flamingo_jax.models.kinds import build
from flamingo_jax.models.vit import ViTConfig
from flamingo_jax.train.loop import RunConfig, build_training, global_batches
from flamingo_jax.train.loop import train as train_run
from flamingo_jax.train.optimizer import OptimizerConfig

from conftest import user_env

TINY = ContrastiveConfig(
    vision=ViTConfig(image_size=16, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64, activation="gelu"),
    text=TextEncoderConfig(vocab_size=50, max_length=12, width=32, depth=1, num_heads=2, mlp_dim=64),
    embed_dim=16,
)


def _pairs(batch_size: int, seed: int = 0) -> Batch:
    """Pairs in the batch contract: <image> caption <|endofchunk|> pad."""
    rng = np.random.default_rng(seed)
    length = 12
    tokens = np.zeros((batch_size, length), np.int32)
    loss_mask = np.zeros((batch_size, length), np.float32)
    for row in range(batch_size):
        words = rng.integers(1, 50, size=rng.integers(3, 8))
        sequence = [TINY.media_token_id, *words, TINY.endofchunk_token_id]
        tokens[row, : len(sequence)] = sequence
        loss_mask[row, : len(sequence) - 1] = 1.0  # predicting every token after <image>
    return Batch(
        tokens=jnp.asarray(tokens),
        images=jnp.asarray(rng.normal(size=(batch_size, 1, 1, 16, 16, 3)), jnp.float32),
        image_mask=jnp.ones((batch_size, 1), bool),
        image_index=jnp.asarray(np.zeros((batch_size, length), np.int32)),
        loss_mask=jnp.asarray(loss_mask),
    )


def _model():
    return build(TINY)


def test_caption_tokens_follow_the_batch_contract():
    batch = _pairs(2)
    tokens, mask = caption_tokens(batch, TINY)
    for row in range(2):
        ids = np.asarray(batch.tokens[row])
        end = int(np.flatnonzero(ids == TINY.endofchunk_token_id)[0])
        expected = np.zeros_like(ids, bool)
        expected[1:end] = True  # the words only: no <image>, <|endofchunk|> or padding
        np.testing.assert_array_equal(np.asarray(mask[row]), expected)


def test_loss_matches_a_hand_computation():
    """Two pairs, orthogonal embeddings, scale s: each direction's loss is log(1 + exp(-s))."""
    images = jnp.eye(2, dtype=jnp.float32)
    scale = jnp.float32(3.0)
    loss, count = contrastive_loss(images, images, scale, jnp.ones(2, bool))
    assert float(count) == 2
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-3.0)), rel=1e-6)
    # A pair without an image is neither a positive nor a negative.
    texts = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    loss3, count3 = contrastive_loss(texts, texts, scale, jnp.asarray([True, True, False]))
    assert float(count3) == 2 and float(loss3) == pytest.approx(float(loss), rel=1e-6)
    empty, _ = contrastive_loss(texts, texts, scale, jnp.zeros(3, bool))
    assert float(empty) == 0.0


def test_negatives_are_the_global_batch_on_eight_devices():
    """The loss of a batch sharded over 8 devices equals the loss of the same batch on one device,
    and differs from the mean of per-device (local-negative) losses."""
    model = _model()
    batch = _pairs(16)
    single = float(jax.jit(lambda b: model.train_loss(b)[0])(batch))

    mesh = sharding.create_mesh(sharding.MeshConfig(data=-1))
    rules = sharding.RULE_SETS["fsdp"]
    placed = jax.tree.map(lambda x: jax.device_put(x, sharding.batch_sharding(mesh, rules, x.ndim)), batch)

    def sharded_loss(b):
        with sharding.activation_sharding(mesh, rules):
            return model.train_loss(b)[0]

    distributed = float(jax.jit(sharded_loss)(placed))
    assert distributed == pytest.approx(single, rel=1e-5)
    local = np.mean(
        [float(model.train_loss(jax.tree.map(lambda x, i=i: x[2 * i : 2 * i + 2], batch))[0]) for i in range(8)]
    )
    assert abs(local - single) > 0.1  # two negatives per device would be a different loss


def test_retrieval_metrics_match_a_hand_checked_matrix():
    similarity = np.asarray(
        [
            [0.9, 0.1, 0.5, 0.0],  # image 0: ranking t0 t2 t1 t3
            [0.2, 0.3, 0.8, 0.1],  # image 1: t2 t1 t0 t3
            [0.4, 0.6, 0.5, 0.7],  # image 2: t3 t1 t2 t0
        ]
    )
    relevant = np.zeros((3, 4), bool)
    relevant[0, 0] = relevant[1, 1] = relevant[2, 2] = relevant[2, 3] = True
    metrics = evaluation.retrieval_metrics(similarity, relevant, ks=(1, 2))
    # image->text: image 0 hit at rank 1, image 1 at rank 2, image 2 at rank 1 (t3).
    assert metrics["image_to_text/R@1"] == pytest.approx(200 / 3)
    assert metrics["image_to_text/R@2"] == pytest.approx(100.0)
    # text->image: t0 ranks i0 first (hit); t1 ranks i2, i1 (hit at 2); t2 ranks i1, then i0 and
    # i2 tied at 0.5 in index order (its image i2 comes third); t3 ranks i2 first (hit).
    assert metrics["text_to_image/R@1"] == pytest.approx(50.0)
    assert metrics["text_to_image/R@2"] == pytest.approx(75.0)
    with pytest.raises(ValueError, match="differ in shape"):
        evaluation.retrieval_metrics(similarity, relevant[:2])


def _synthetic_run(tmp_path, steps: int, **overrides) -> RunConfig:
    """A tiny contrastive run on generated pairs (no data preparation)."""
    from flamingo_jax.data.mixture import DatasetConfig
    from flamingo_jax.data.synthetic import SyntheticConfig

    pairs = DatasetConfig(
        name="pairs", batch_size=8, synthetic=SyntheticConfig(num_media=1, image_size=16, length=12, caption_length=4)
    )
    return RunConfig(
        model=dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, vocab_size=259)),
        datasets=(pairs,),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=2),
        train_steps=steps,
        checkpoint_every=2,
        log_every=1,
        async_checkpointing=False,
        **overrides,
    )


@pytest.mark.slow
def test_training_resumes_bit_identically(tmp_path):
    """Same loop, same guarantees: 3 steps, restart to 5, equals 5 steps straight."""
    straight = train_run(_synthetic_run(tmp_path, 5), str(tmp_path / "straight"))
    train_run(_synthetic_run(tmp_path, 3), str(tmp_path / "resumed"))
    resumed = train_run(_synthetic_run(tmp_path, 5), str(tmp_path / "resumed"))
    assert straight["step"] == resumed["step"] == 5

    def final(workdir):
        from flamingo_jax import checkpointing

        config = _synthetic_run(tmp_path, 5)
        training = build_training(config, sharding.create_mesh(config.mesh))
        checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"), async_save=False)
        try:
            return checkpointer.restore_state(5, training.abstract_state()).params
        finally:
            checkpointer.close()

    first, second = final(tmp_path / "straight"), final(tmp_path / "resumed")
    assert set(first) == set(second) and any(key.startswith("text/") for key in first)
    for key in first:
        np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(second[key]), err_msg=key)


@pytest.mark.slow
def test_fashion_mnist_run_lifts_zero_shot_retrieval(tmp_path):
    """The demo's contrastive_fashion.gin through ``main``, shortened to 120 steps: zero-shot R@1
    in both directions far above the initialisation (12.2 / 10.8 -> 42.4 / 47.2 on 2026-12-04,
    AMD EPYC; 150 steps: 45.0 / 50.0, 100: 41.8 / 35.4, under the bar; the full 300-step run's
    numbers are in the demo's RESULTS.md). In its own process on one device with XLA's default
    compile settings, as a user runs it: the session's 8 fake devices and quick compile flags
    would only slow it."""
    workdir = tmp_path / "contrastive"
    command = [
        sys.executable,
        "-m",
        "flamingo_jax.main",
        "--gin_file=flamingo_jax/demo/contrastive_fashion.gin",
        f"--workdir={workdir}",
        "--gin.TRAIN_STEPS=120",
        "--gin.EvalConfig.num_queries=500",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=user_env())
    assert done.returncode == 0, done.stderr[-3000:]

    def evaluated(step):
        with open(workdir / "eval" / f"contrastive_{step}.json") as f:
            return json.load(f)

    trained, initial = evaluated(120), evaluated(0)  # RunConfig.evaluate_at_end, EvalConfig.include_init
    assert trained["step"] == 120 and initial["step"] == 0
    trained, initial = trained["metrics"]["fashion_mnist"], initial["metrics"]["fashion_mnist"]
    assert trained["num_images"] == 500
    assert trained["image_to_text/R@1"] > initial["image_to_text/R@1"] + 25
    assert trained["text_to_image/R@1"] > initial["text_to_image/R@1"] + 25


@pytest.mark.slow
def test_exported_tower_trains_inside_a_flamingo_model(tmp_path):
    """The tower of a contrastive run, exported, is the frozen vision encoder of a Flamingo model
    with the same vision config (bit-equal weights), and that model trains."""
    from flamingo_jax import checkpointing
    from flamingo_jax.data import mixture
    from flamingo_jax.models.flamingo import FlamingoConfig
    from flamingo_jax.tools.export_vision import export_vision

    contrastive_run = _synthetic_run(tmp_path, 2)
    workdir = str(tmp_path / "contrastive")
    train_run(contrastive_run, workdir)
    step, count = export_vision(contrastive_run, workdir, str(tmp_path / "vision"))
    assert step == 2 and count > 10

    configs.parse_gin(["runs/smoke_cpu.gin"])
    try:
        smoke = configs.run_config()
    finally:
        gin.clear_config()
    model = dataclasses.replace(smoke.model, vision=TINY.vision)
    assert isinstance(model, FlamingoConfig)
    flamingo_run = dataclasses.replace(smoke, model=model, init_from=str(tmp_path / "vision"))
    mesh = sharding.create_mesh(flamingo_run.mesh)
    training = build_training(flamingo_run, mesh)

    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in training.frozen.items() if k.startswith("vision/")}
    targets = {key: training.frozen[key].sharding for key in shapes}
    exported = checkpointing.load_params(str(tmp_path / "vision"), targets, shapes)
    assert set(exported) == set(shapes)
    contrastive_training = build_training(contrastive_run, sharding.create_mesh(contrastive_run.mesh))
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "contrastive" / "checkpoints"), async_save=False)
    try:
        trained = checkpointer.restore_state(2, contrastive_training.abstract_state()).params
    finally:
        checkpointer.close()
    for key in shapes:
        np.testing.assert_array_equal(np.asarray(training.frozen[key]), np.asarray(trained[key]), err_msg=key)

    token_ids = mixture.TokenIds(259, model.media_token_id, model.endofchunk_token_id)
    local = mixture.split_skipped(mixture.mixture_dataset(flamingo_run.datasets, token_ids, seed=0)[0])[0]
    batches = global_batches(local, mesh, training.rules)
    assert np.isfinite(float(training.step(batches)["loss"]))
