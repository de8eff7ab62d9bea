"""MPT and GPT-NeoX LMs: parity with transformers' MptForCausalLM and GPTNeoXForCausalLM on the
same random weights, cached decoding equal to the full pass, and the importers' errors."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [reference] extra (torch, transformers)")
transformers = pytest.importorskip("transformers")

from flamingo_jax.importers import gpt_neox, mpt  # noqa: E402
from flamingo_jax.importers.lm import load_lm  # noqa: E402
from flamingo_jax.importers.pretrained import flamingo_from_pretrained, lm_from_pretrained  # noqa: E402
from flamingo_jax.models.llama import KVCache, LlamaConfig, alibi_slopes  # noqa: E402

from conftest import with_lm_family  # noqa: E402

pytestmark = pytest.mark.reference

VOCAB = 300


def _randomise_norms(reference):
    """Norm weights and biases away from 1 / 0, so a swapped or dropped norm parameter shows."""
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5) if name.endswith("weight") else parameter.uniform_(-0.3, 0.3)
            elif name.endswith("bias"):
                parameter.uniform_(-0.1, 0.1)


def _logits_match(reference, model, length=19):
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, length))
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    actual = np.asarray(model(tokens.astype(np.int32))[0])
    return np.abs(actual - expected).max()


def _decode_matches_full_pass(model, config: LlamaConfig, prompt=7, steps=4):
    """Logits of tokens fed one at a time through the KV cache (after a left-padded prompt)
    equal those of one pass over the unpadded sequence."""
    tokens = np.random.default_rng(1).integers(0, VOCAB, (1, prompt + steps)).astype(np.int32)
    full = np.asarray(model(tokens)[0])
    pad = 3
    padded = np.concatenate([np.zeros((1, pad), np.int32), tokens[:, :prompt]], axis=1)
    mask = np.concatenate([np.zeros((1, pad), bool), np.ones((1, prompt), bool)], axis=1)
    cache = KVCache.create(config, 1, pad + prompt + steps)
    logits, cache = model(jnp.asarray(padded), input_mask=jnp.asarray(mask), cache=cache)
    worst = np.abs(np.asarray(logits)[:, pad:] - full[:, :prompt]).max()
    for step in range(steps):
        position = prompt + step
        logits, cache = model(jnp.asarray(tokens[:, position : position + 1]), cache=cache)
        worst = max(worst, np.abs(np.asarray(logits)[:, 0] - full[:, position]).max())
    return worst


@pytest.mark.parametrize("heads, clip_qkv", [(4, None), (6, 0.4)])
def test_mpt_logits_match_transformers(tmp_path, heads, clip_qkv):
    """6 heads: ALiBi's slopes for a head count that is not a power of two (interleaved)."""
    torch.manual_seed(0)
    hf_config = transformers.MptConfig(
        d_model=48,
        n_heads=heads,
        n_layers=3,
        vocab_size=VOCAB,
        max_seq_len=64,
        attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": clip_qkv},
    )
    reference = transformers.MptForCausalLM(hf_config).float().eval()
    _randomise_norms(reference)
    reference.save_pretrained(tmp_path)
    config, model = lm_from_pretrained(str(tmp_path))
    assert (config.family, config.num_heads, config.tie_embeddings, config.clip_qkv) == ("mpt", heads, True, clip_qkv)
    assert _logits_match(reference, model) <= 1e-4
    assert _decode_matches_full_pass(model, config) <= 1e-4


# transformers' MPT names -> MosaicGPT's (MPT-1B-RedPajama-200B's published modeling code).
_TO_MOSAIC = {"norm_1": "ln_1", "norm_2": "ln_2", "ffn.up_proj": "mlp.mlp_up", "ffn.down_proj": "mlp.mlp_down"}


def test_mosaic_gpt_layout_with_qk_layernorms(tmp_path):
    """MPT-1B-RedPajama-200B's layout (MosaicGPT: its own names, a weight-only LayerNorm over all
    heads' queries and one over the keys before the heads split, published as pytorch_model.bin).
    The reference is transformers' MPT with those LayerNorms applied to its fused q/k/v output,
    where MosaicGPT's attention applies them."""
    torch.manual_seed(0)
    width, heads = 48, 4
    hf_config = transformers.MptConfig(d_model=width, n_heads=heads, n_layers=2, vocab_size=VOCAB, max_seq_len=64)
    reference = transformers.MptForCausalLM(hf_config).float().eval()
    _randomise_norms(reference)
    state = {}
    for index, block in enumerate(reference.transformer.blocks):
        q_ln = torch.nn.LayerNorm(width, bias=False)
        k_ln = torch.nn.LayerNorm(width, bias=False)
        with torch.no_grad():
            q_ln.weight.uniform_(0.5, 1.5)
            k_ln.weight.uniform_(0.5, 1.5)

        def qk_layernorms(module, inputs, qkv, q_ln=q_ln, k_ln=k_ln):
            query, key, value = qkv.chunk(3, dim=-1)
            return torch.cat([q_ln(query), k_ln(key), value], dim=-1)

        block.attn.Wqkv.register_forward_hook(qk_layernorms)
        state[f"transformer.blocks.{index}.attn.q_ln.weight"] = q_ln.weight.detach().clone()
        state[f"transformer.blocks.{index}.attn.k_ln.weight"] = k_ln.weight.detach().clone()
    for name, value in reference.state_dict().items():
        if name == "lm_head.weight":
            continue  # MosaicGPT's head is wte itself
        for theirs, mosaic in _TO_MOSAIC.items():
            name = name.replace(f".{theirs}.", f".{mosaic}.")
        state[name.replace("transformer.norm_f.", "transformer.ln_f.")] = value.clone()
    torch.save(state, tmp_path / "pytorch_model.bin")
    mosaic_config = {
        "model_type": "mosaic_gpt",
        "architectures": ["MosaicGPT"],
        "d_model": width,
        "n_heads": heads,
        "n_layers": 2,
        "mlp_ratio": 4,
        "max_seq_len": 64,
        "vocab_size": VOCAB,
        "alibi": True,
        "alibi_bias_max": 8,
        "attn_qk_ln": True,
        "attn_clip_qkv": None,
        "softmax_scale": None,
        "no_bias": True,
        "low_precision_layernorm": True,
        "logit_scale": None,
    }
    (tmp_path / "config.json").write_text(json.dumps(mosaic_config))
    config, model = lm_from_pretrained(str(tmp_path))
    assert (config.family, config.qk_norm, config.mlp_dim) == ("mpt", True, 4 * width)
    assert _logits_match(reference, model) <= 1e-4
    assert _decode_matches_full_pass(model, config) <= 1e-4
    with pytest.raises(ValueError, match="n_heads is a power of two=False is not supported"):
        mpt.mosaic_gpt_config_from_hf({**mosaic_config, "n_heads": 6})


def test_flamingo_with_an_mpt_lm_whose_embedding_is_padded(tmp_path, tiny_config):
    """A Flamingo model around an imported MPT whose embedding has more rows than the tokenizer
    (MPT-1B: 50432 for 50277 tokens): the unused rows are dropped, and with the gates at 0 the
    model's base-vocabulary logits are the LM's."""
    torch.manual_seed(0)
    hf_config = transformers.MptConfig(d_model=64, n_heads=4, n_layers=4, vocab_size=160, max_seq_len=64)
    reference = transformers.MptForCausalLM(hf_config).float().eval()
    _randomise_norms(reference)
    reference.save_pretrained(tmp_path)
    config = with_lm_family(tiny_config, "mpt")
    config = dataclasses.replace(config, lm=dataclasses.replace(config.lm, clip_qkv=None, qk_norm=False, mlp_dim=256))
    model = flamingo_from_pretrained(config, lm=str(tmp_path))
    tokens = np.random.default_rng(0).integers(0, 128, (1, 9))
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()[..., :128]
    images = np.zeros((1, 1, 1, 16, 16, 3), np.float32)
    logits, _ = model(tokens.astype(np.int32), np.zeros((1, 9), np.int32), np.ones((1, 1), bool), images)
    assert np.asarray(logits).shape[-1] == 130  # 128 base tokens, <image>, <|endofchunk|>
    assert np.abs(np.asarray(logits)[..., :128] - expected).max() <= 1e-4


def test_alibi_slopes_follow_mpt():
    for heads in (4, 6, 12, 32):
        expected = transformers.models.mpt.modeling_mpt.build_mpt_alibi_tensor(heads, 2, alibi_bias_max=8)
        np.testing.assert_allclose(np.asarray(alibi_slopes(heads, 8.0)), expected[:, 0, 0].numpy() * -1, rtol=1e-6)


@pytest.mark.parametrize("parallel, rotary_pct, tied", [(True, 0.25, False), (False, 1.0, True)])
def test_gpt_neox_logits_match_transformers(tmp_path, parallel, rotary_pct, tied):
    torch.manual_seed(0)
    hf_config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=160,
        rotary_pct=rotary_pct,
        rotary_emb_base=5000,
        use_parallel_residual=parallel,
        tie_word_embeddings=tied,
        max_position_embeddings=64,
        layer_norm_eps=1e-5,
    )
    reference = transformers.GPTNeoXForCausalLM(hf_config).float().eval()
    _randomise_norms(reference)
    reference.save_pretrained(tmp_path)
    config, model = lm_from_pretrained(str(tmp_path))
    assert (config.family, config.parallel_residual, config.rotary_fraction) == ("gpt_neox", parallel, rotary_pct)
    assert (config.rope_theta, config.tie_embeddings, config.attention_bias) == (5000.0, tied, True)
    assert _logits_match(reference, model) <= 1e-4
    assert _decode_matches_full_pass(model, config) <= 1e-4


def test_published_names_and_pytorch_bin_files(tmp_path):
    """Published GPT-NeoX checkpoints (RedPajama-INCITE) name the head ``embed_out`` and ship
    ``pytorch_model.bin`` with buffers beside the weights; they load the same."""
    torch.manual_seed(0)
    hf_config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    reference = transformers.GPTNeoXForCausalLM(hf_config).float().eval()
    reference.save_pretrained(tmp_path / "safe")
    _, expected = load_lm(str(tmp_path / "safe"))
    state = {key: value.clone() for key, value in reference.state_dict().items()}
    state["embed_out.weight"] = state.pop("lm_head.weight")
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "safe" / "config.json").read_text())
    _, actual = load_lm(str(tmp_path / "bin"))
    assert sorted(actual) == sorted(expected)
    assert all(np.array_equal(actual[key], expected[key]) for key in expected)


def test_importer_errors_name_the_setting(tmp_path):
    base = {"d_model": 32, "n_heads": 4, "n_layers": 1, "vocab_size": 10}
    with pytest.raises(ValueError, match="attn_config.alibi=False is not supported"):
        mpt.mpt_config_from_hf({**base, "attn_config": {"alibi": False}})
    with pytest.raises(ValueError, match="logit_scale=2.0 is not supported"):
        mpt.mpt_config_from_hf({**base, "logit_scale": 2.0})
    neox = {"vocab_size": 10, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}
    with pytest.raises(ValueError, match="scaled RoPE"):
        gpt_neox.gpt_neox_config_from_hf({**neox, "intermediate_size": 64, "rope_scaling": {"type": "linear"}})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(ValueError, match="model_type 'falcon' has no importer"):
        load_lm(str(tmp_path))
    with pytest.raises(ValueError, match="family='gpt2' is not one of"):
        LlamaConfig(family="gpt2")
    for fraction in (1.5, 0.3125):  # beyond the head; 5 of 16 dimensions (RoPE rotates pairs)
        with pytest.raises(ValueError, match=f"rotary_fraction={fraction}"):
            LlamaConfig(family="gpt_neox", width=64, num_heads=4, num_kv_heads=4, rotary_fraction=fraction)
    with pytest.raises(ValueError, match="no grouped-query attention"):
        LlamaConfig(family="mpt", width=64, num_heads=4, num_kv_heads=2)
