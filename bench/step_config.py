"""The training step the benchmarks measure (bench/vs_openflamingo.py, bench/profile_step.py).

LM with the SmolLM2-135M shape (``models/smollm2_135m.gin``: vocab 49152, width 576, 30 layers,
9 heads, 3 KV heads, MLP 1536, tied embeddings), frozen; ViT-B/32 at 224 px, frozen; resampler
depth 6, 64 latents; gated xattn every 2 LM layers; trainable: resampler + xattn + the two
new-token rows. Batch 8, 128 tokens with 2 ``<image>`` tokens and 2 images per example, every
position a target; forward + backward + AdamW (lr 1e-4); fp32; one device; random weights.
"""

from __future__ import annotations

import numpy as np

BATCH, LENGTH, IMAGES = 8, 128, 2
VOCAB = 49152
MEDIA, ENDOFCHUNK = VOCAB, VOCAB + 1
MODEL_GIN = "models/smollm2_135m.gin"


def bench_inputs(seed: int = 0):
    """The same token ids, image positions and pixels for every side (numpy)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    tokens[:, 0] = MEDIA
    tokens[:, LENGTH // 2] = MEDIA
    images = rng.normal(size=(BATCH, IMAGES, 1, 224, 224, 3)).astype(np.float32)
    return tokens, images


def bench_batch():
    """The bench inputs as our ``Batch`` (device arrays): the first image before position
    LENGTH / 2, the second from there on; every position but the last is a target."""
    import jax.numpy as jnp

    from flamingo_jax.batch import Batch

    tokens, images = bench_inputs()
    index = np.where(np.arange(LENGTH) >= LENGTH // 2, 1, 0).astype(np.int32)
    return Batch(
        tokens=jnp.asarray(tokens),
        images=jnp.asarray(images),
        image_mask=jnp.ones((BATCH, IMAGES), bool),
        image_index=jnp.asarray(np.broadcast_to(index, (BATCH, LENGTH))),
        loss_mask=jnp.asarray(np.pad(np.ones((BATCH, LENGTH - 1), np.float32), ((0, 0), (0, 1)))),
    )


def build_training(bindings=()):
    """(model config, ``Training``) of the bench step on one device, with every xattn gate parameter
    set to 0.5 (as after some training): the visual path does real work in every block."""
    import jax
    import jax.numpy as jnp

    from flamingo_jax import configs, sharding
    from flamingo_jax.data.mixture import DatasetConfig
    from flamingo_jax.train.loop import RunConfig
    from flamingo_jax.train.loop import build_training as build
    from flamingo_jax.train.optimizer import OptimizerConfig

    model_config = configs.load_model_config(MODEL_GIN, bindings)
    run_config = RunConfig(
        model=model_config,
        datasets=(DatasetConfig(name="bench", batch_size=BATCH),),
        mesh=sharding.MeshConfig(data=1),
        optimizer=OptimizerConfig(learning_rate=1e-4, warmup_steps=1),
    )
    training = build(run_config, sharding.create_mesh(run_config.mesh, jax.devices()[:1]))
    training.state.params = {
        key: (jnp.full_like(value, 0.5) if key.endswith("_gate") else value)
        for key, value in training.state.params.items()
    }
    return model_config, training
