"""Every model gin file parses; bad bindings fail with a message naming them."""

from __future__ import annotations

import glob
import os

import gin
import pytest

from flamingo_jax import configs
from flamingo_jax.models.flamingo import FlamingoConfig

MODEL_FILES = sorted(
    os.path.relpath(path, configs.EXPERIMENTS_DIR)
    for path in glob.glob(os.path.join(configs.EXPERIMENTS_DIR, "models", "*.gin"))
    if not path.endswith("_common.gin")
)


def test_model_files_exist():
    names = {os.path.basename(path) for path in MODEL_FILES}
    expected = {"flamingo_3b.gin", "flamingo_9b.gin", "flamingo_80b.gin", "openflamingo_3b.gin", "openflamingo_9b.gin"}
    assert expected | {"smollm2_135m.gin", "tiny.gin"} <= names


@pytest.mark.parametrize("path", MODEL_FILES)
def test_model_gin_parses(path):
    config = configs.load_model_config(path)
    assert isinstance(config, FlamingoConfig)
    assert config.xattn_layer_indices


def test_openflamingo_layout():
    config = configs.load_model_config("models/openflamingo_9b.gin")
    assert config.xattn_layer_indices == (3, 7, 11, 15, 19, 23, 27, 31)
    assert (config.xattn.num_heads, config.xattn.head_dim, config.xattn.activation) == (8, 64, "gelu")
    assert config.resampler.max_frames == 0


def test_smollm2_matches_the_shipped_checkpoint_shape():
    lm = configs.load_model_config("models/smollm2_135m.gin").lm
    assert (lm.vocab_size, lm.width, lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.mlp_dim) == (
        49152,
        576,
        30,
        9,
        3,
        1536,
    )
    assert lm.tie_embeddings and lm.rope_theta == 100000.0


def test_bindings_override_and_unknown_binding_fails():
    config = configs.load_model_config("models/tiny.gin", ["XAttnConfig.every = 1"])
    assert config.xattn_layer_indices == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="No configurable matching 'XAttnConfig.evry'|evry"):
        configs.load_model_config("models/tiny.gin", ["XAttnConfig.evry = 1"])
    gin.clear_config()


def test_missing_gin_file_is_named():
    with pytest.raises(FileNotFoundError, match="no_such_model.gin"):
        configs.load_model_config("models/no_such_model.gin")


def test_invalid_values_fail_with_the_setting_name():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        configs.load_model_config("models/tiny.gin", ["LlamaConfig.num_heads = 6", "LlamaConfig.num_kv_heads = 4"])
