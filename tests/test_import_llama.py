"""Llama import: parity with transformers' LlamaForCausalLM on the same random weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [reference] extra (torch, transformers)")
transformers = pytest.importorskip("transformers")

from flamingo_jax.importers import llama  # noqa: E402
from flamingo_jax.importers.pretrained import lm_from_pretrained  # noqa: E402

pytestmark = pytest.mark.reference


@pytest.mark.parametrize("tied, kv_heads", [(True, 2), (False, 4), (False, 1)])
def test_hf_llama_logits_match_transformers(tmp_path, tied, kv_heads):
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        max_position_embeddings=128,
    )
    reference = transformers.LlamaForCausalLM(hf_config).float().eval()
    with torch.no_grad():  # random norms too, so a swapped norm would show
        for name, parameter in reference.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    reference.save_pretrained(tmp_path)
    config, model = lm_from_pretrained(str(tmp_path))
    assert (config.num_kv_heads, config.tie_embeddings, config.rope_theta) == (kv_heads, tied, 50000.0)
    tokens = np.random.default_rng(0).integers(0, 300, (2, 17))
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    actual = np.asarray(model(tokens.astype(np.int32))[0])
    assert np.abs(actual - expected).max() <= 1e-4


def test_importer_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        llama.load_hf_llama(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        llama.load_gguf_llama(str(tmp_path / "missing.gguf"))
    config = llama.llama_config_from_hf(
        {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}
    )
    params = {name: np.zeros(shape, np.float32) for name, shape in llama.expected_shapes(config).items()}
    params["layers/0/mlp/up_proj/linear/kernel"] = np.zeros((8, 15), np.float32)
    with pytest.raises(ValueError, match="up_proj/linear/kernel has shape \\(8, 15\\), expected \\(8, 16\\)"):
        llama.check_complete(config, params, source="x")
