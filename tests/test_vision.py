"""Vision encoders: output shapes, the encoder-swap interface, NFNet numerics."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from flamingo_jax.models.flamingo import create_flamingo
from flamingo_jax.models.nfnet import NFNetConfig
from flamingo_jax.models.vit import ViTConfig

from conftest import make_batch


def test_vit_outputs_patch_tokens(tiny_config):
    model = create_flamingo(tiny_config)
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    tokens = model.vision(images)
    assert tokens.shape == (2, tiny_config.vision.num_output_tokens, tiny_config.vision.width)
    with pytest.raises(ValueError, match="ViT expects images of shape"):
        model.vision(np.zeros((2, 8, 8, 3), np.float32))


def test_convolutional_encoder_swaps_in(tiny_config):
    nfnet = NFNetConfig(variant="F0", image_size=32, widths=(32, 64, 64, 64), group_size=16)
    config = dataclasses.replace(tiny_config, vision=nfnet)
    model = create_flamingo(config)
    batch = make_batch(config)
    assert batch.images.shape[3:] == (32, 32, 3)
    visual = jax.jit(model.encode_media)(batch.images)
    assert visual.shape == (2, 3, config.resampler.num_latents, config.resampler.width)
    assert np.isfinite(np.asarray(visual)).all()
    assert model.resampler.input_proj is not None  # 128-wide NFNet features -> 48-wide latents


def test_nfnet_f6_depths_and_width():
    config = NFNetConfig()
    assert config.depths == (7, 14, 42, 21)
    assert config.output_dim == 3072
    assert config.num_output_tokens == 100  # 320 px / 32


def test_vit_rejects_bad_patching():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        ViTConfig(image_size=30, patch_size=8)
