"""Llama-family LM weights from a Hugging Face checkpoint directory or a GGUF file, and what
every LM importer shares (reading a Hugging Face directory, checking the converted weights).

Both return ``(LlamaConfig, {our parameter path: float32 numpy array})``; paths are those of
:class:`flamingo_jax.models.llama.LlamaLM` (prefix them with ``lm/`` for a Flamingo model).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
from flax import nnx

from flamingo_jax.importers import torch_pickle
from flamingo_jax.models.layers import CountingRngs
from flamingo_jax.models.llama import LlamaConfig, LlamaLM

_HF_LAYER = {
    "self_attn.q_proj.weight": "attention/q_proj/linear/kernel",
    "self_attn.k_proj.weight": "attention/k_proj/linear/kernel",
    "self_attn.v_proj.weight": "attention/v_proj/linear/kernel",
    "self_attn.o_proj.weight": "attention/o_proj/linear/kernel",
    "mlp.gate_proj.weight": "mlp/gate_proj/linear/kernel",
    "mlp.up_proj.weight": "mlp/up_proj/linear/kernel",
    "mlp.down_proj.weight": "mlp/down_proj/linear/kernel",
    "input_layernorm.weight": "input_norm/scale",
    "post_attention_layernorm.weight": "post_attention_norm/scale",
}
_GGUF_LAYER = {
    "attn_q.weight": "attention/q_proj/linear/kernel",
    "attn_k.weight": "attention/k_proj/linear/kernel",
    "attn_v.weight": "attention/v_proj/linear/kernel",
    "attn_output.weight": "attention/o_proj/linear/kernel",
    "ffn_gate.weight": "mlp/gate_proj/linear/kernel",
    "ffn_up.weight": "mlp/up_proj/linear/kernel",
    "ffn_down.weight": "mlp/down_proj/linear/kernel",
    "attn_norm.weight": "input_norm/scale",
    "ffn_norm.weight": "post_attention_norm/scale",
}


def llama_config_from_hf(config: dict, **overrides) -> LlamaConfig:
    """A Hugging Face ``config.json`` dict (Llama architecture) -> LlamaConfig."""
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    heads = config["num_attention_heads"]
    values = dict(
        vocab_size=config["vocab_size"],
        width=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim"),
        mlp_dim=config["intermediate_size"],
        rope_theta=float(theta),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    if values["head_dim"] == config["hidden_size"] // heads:
        values["head_dim"] = None
    values.update(overrides)
    return LlamaConfig(**values)


def _to_ours(name: str, weight: np.ndarray) -> np.ndarray:
    # Linear weights are [out, in] in both source layouts and [in, out] here.
    return weight.T if name.endswith("kernel") else weight


def read_hf_config(directory: str) -> dict:
    """The ``config.json`` dict of a Hugging Face checkpoint directory."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face checkpoint directory)")
    with open(config_path) as f:
        return json.load(f)


def read_hf_tensors(directory: str) -> dict[str, np.ndarray]:
    """{tensor name: array} of every ``*.safetensors`` in ``directory``, or else of every
    ``pytorch_model*.bin`` (read without running pickled code, ``importers.torch_pickle``)."""
    from safetensors.numpy import load_file

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    binaries = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
    if not files and not binaries:
        raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin files")
    tensors = {}
    for path in files or binaries:
        tensors.update(load_file(path) if path.endswith(".safetensors") else torch_pickle.load_state_dict(path))
    return tensors


def load_hf_llama(directory: str, **config_overrides) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Reads ``config.json`` and the weights of a Hugging Face Llama checkpoint."""
    hf_config = read_hf_config(directory)
    architectures = hf_config.get("architectures") or ["LlamaForCausalLM"]
    if hf_config.get("model_type", "llama") not in ("llama", "mistral") and "Llama" not in architectures[0]:
        raise ValueError(f"{directory}: model_type {hf_config.get('model_type')!r} is not a Llama-family model")
    config = llama_config_from_hf(hf_config, **config_overrides)
    params = llama_params(read_hf_tensors(directory), config, source=directory)
    check_complete(config, params, source=directory)
    return config, params


def llama_params(tensors: dict[str, np.ndarray], config: LlamaConfig, *, source: str) -> dict[str, np.ndarray]:
    """Hugging Face Llama tensors (``model.embed_tokens``, ``model.layers.*``, ``model.norm``,
    ``lm_head``) -> our LM parameters; any other tensor is an error naming it."""
    params = {}
    for name, value in tensors.items():
        value = np.asarray(value, np.float32)
        if name == "model.embed_tokens.weight":
            params["embed"] = value
        elif name == "model.norm.weight":
            params["final_norm/scale"] = value
        elif name == "lm_head.weight":
            if not config.tie_embeddings:
                params["lm_head/linear/kernel"] = value.T
        elif name.startswith("model.layers."):
            index, rest = name[len("model.layers.") :].split(".", 1)
            if rest not in _HF_LAYER:
                raise ValueError(f"{source}: unexpected tensor {name}")
            params[f"layers/{index}/{_HF_LAYER[rest]}"] = _to_ours(_HF_LAYER[rest], value)
        elif name.endswith("rotary_emb.inv_freq"):
            continue
        else:
            raise ValueError(f"{source}: unexpected tensor {name}")
    return params


def _unpermute_rope(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """GGUF stores q/k rows interleaved for llama.cpp's RoPE; undo it for the HF layout."""
    out, inp = weight.shape
    return weight.reshape(num_heads, out // num_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def load_gguf_llama(path: str, **config_overrides) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Reads (and dequantises) a Llama-architecture GGUF file."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.")}
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}, not 'llama'")
    tensor_names = {t.name for t in reader.tensors}
    heads = int(fields["llama.attention.head_count"])
    vocab = fields.get("llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    values = dict(
        vocab_size=int(vocab),
        width=int(fields["llama.embedding_length"]),
        num_layers=int(fields["llama.block_count"]),
        num_heads=heads,
        num_kv_heads=int(fields.get("llama.attention.head_count_kv", heads)),
        mlp_dim=int(fields["llama.feed_forward_length"]),
        rope_theta=float(fields.get("llama.rope.freq_base", 10000.0)),
        norm_eps=float(fields.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensor_names,
    )
    values.update(config_overrides)
    config = LlamaConfig(**values)
    params = {}
    for tensor in reader.tensors:
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        weight = weight.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        name = tensor.name
        if name == "token_embd.weight":
            params["embed"] = weight
        elif name == "output_norm.weight":
            params["final_norm/scale"] = weight
        elif name == "output.weight":
            params["lm_head/linear/kernel"] = weight.T
        elif name.startswith("blk."):
            index, rest = name[len("blk.") :].split(".", 1)
            if rest not in _GGUF_LAYER:
                raise ValueError(f"{path}: unexpected tensor {name}")
            if rest == "attn_q.weight":
                weight = _unpermute_rope(weight, config.num_heads)
            elif rest == "attn_k.weight":
                weight = _unpermute_rope(weight, config.num_kv_heads)
            params[f"layers/{index}/{_GGUF_LAYER[rest]}"] = _to_ours(_GGUF_LAYER[rest], weight)
        elif name == "rope_freqs.weight":
            raise ValueError(f"{path}: scaled RoPE (rope_freqs) is not supported")
        else:
            raise ValueError(f"{path}: unexpected tensor {name}")
    check_complete(config, params, source=path)
    return config, params


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """{parameter path: shape} of the (unscanned) LM of ``config``, any family."""
    config = dataclasses.replace(config, scan_layers=False)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: LlamaLM(config, rngs=CountingRngs(0)))
    return {
        "/".join(map(str, path)): tuple(leaf.shape) for path, leaf in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    }


def check_complete(config: LlamaConfig, params: dict[str, np.ndarray], *, source: str) -> None:
    """Raises naming the first missing, unexpected or mis-shaped tensor."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(params))
    if missing:
        raise ValueError(f"{source}: missing weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = sorted(set(params) - set(expected))
    if extra:
        raise ValueError(f"{source}: weights {extra[:5]} do not belong to the configured model")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(params[name].shape)}, expected {shape}")
