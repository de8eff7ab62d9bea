"""GPT-NeoX LM weights (RedPajama-INCITE, Pythia; the LM of OpenFlamingo-4B) from a Hugging Face
checkpoint directory: ``(LlamaConfig(family='gpt_neox'), {our parameter path: float32 array})``
with the paths of :class:`flamingo_jax.models.llama.LlamaLM`."""

from __future__ import annotations

import numpy as np

from flamingo_jax.importers.llama import check_complete, read_hf_config, read_hf_tensors
from flamingo_jax.models.llama import LlamaConfig

_LAYER = {
    "input_layernorm.weight": "input_norm/scale",
    "input_layernorm.bias": "input_norm/bias",
    "post_attention_layernorm.weight": "post_attention_norm/scale",
    "post_attention_layernorm.bias": "post_attention_norm/bias",
    "attention.dense.weight": "attention/o_proj/linear/kernel",
    "attention.dense.bias": "attention/o_proj/linear/bias",
    "mlp.dense_h_to_4h.weight": "mlp/up_proj/linear/kernel",
    "mlp.dense_h_to_4h.bias": "mlp/up_proj/linear/bias",
    "mlp.dense_4h_to_h.weight": "mlp/down_proj/linear/kernel",
    "mlp.dense_4h_to_h.bias": "mlp/down_proj/linear/bias",
}
# Buffers some published checkpoints carry (the causal mask, RoPE's frequencies): recomputed here.
_BUFFERS = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")


def gpt_neox_config_from_hf(config: dict, **overrides) -> LlamaConfig:
    """A Hugging Face GPT-NeoX ``config.json`` dict -> LlamaConfig(family='gpt_neox')."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"GPT-NeoX config: scaled RoPE {rope!r} is not supported")
    heads = config["num_attention_heads"]
    values = dict(
        family="gpt_neox",
        vocab_size=config["vocab_size"],
        width=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        mlp_dim=config["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", config.get("rotary_emb_base", 10000.0))),
        rotary_fraction=float(rope.get("partial_rotary_factor", config.get("rotary_pct", 0.25))),
        norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", True)),
        mlp_bias=True,
        parallel_residual=bool(config.get("use_parallel_residual", True)),
        activation=_ACTIVATIONS.get(config.get("hidden_act", "gelu"), config.get("hidden_act")),
    )
    values.update(overrides)
    return LlamaConfig(**values)


# transformers' activation names -> ours (layers.ACTIVATIONS).
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def split_query_key_value(weight: np.ndarray, num_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPT-NeoX's fused ``query_key_value`` rows are ordered (head, q/k/v, head dim): split them
    into the q, k and v rows, each ordered (head, head dim). Works for weights [3W, W] and biases [3W]."""
    rows = weight.reshape(num_heads, 3, -1, *weight.shape[1:])
    return tuple(rows[:, index].reshape(-1, *weight.shape[1:]) for index in range(3))


def load_hf_gpt_neox(directory: str, **config_overrides) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Reads ``config.json`` and the ``*.safetensors`` (or ``pytorch_model*.bin``) of a Hugging
    Face GPT-NeoX checkpoint."""
    hf_config = read_hf_config(directory)
    if hf_config.get("model_type") != "gpt_neox":
        raise ValueError(f"{directory}: model_type {hf_config.get('model_type')!r} is not 'gpt_neox'")
    config = gpt_neox_config_from_hf(hf_config, **config_overrides)
    tensors = read_hf_tensors(directory)
    params = {}
    for name, value in tensors.items():
        value = np.asarray(value, np.float32)
        short = name.removeprefix("gpt_neox.")
        if short == "embed_in.weight":
            params["embed"] = value
        elif short == "final_layer_norm.weight":
            params["final_norm/scale"] = value
        elif short == "final_layer_norm.bias":
            params["final_norm/bias"] = value
        elif name in ("embed_out.weight", "lm_head.weight"):
            if not config.tie_embeddings:
                params["lm_head/linear/kernel"] = value.T
        elif short.startswith("layers."):
            index, rest = short[len("layers.") :].split(".", 1)
            prefix = f"layers/{index}/attention"
            if rest in ("attention.query_key_value.weight", "attention.query_key_value.bias"):
                kind = "kernel" if rest.endswith("weight") else "bias"
                parts = split_query_key_value(value, config.num_heads)
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                    params[f"{prefix}/{proj}/linear/{kind}"] = part.T if kind == "kernel" else part
            elif rest in _LAYER:
                target = _LAYER[rest]
                params[f"layers/{index}/{target}"] = value.T if target.endswith("kernel") else value
            elif rest not in _BUFFERS:
                raise ValueError(f"{directory}: unexpected tensor {name}")
        elif not short.endswith("rotary_emb.inv_freq"):
            raise ValueError(f"{directory}: unexpected tensor {name}")
    check_complete(config, params, source=directory)
    return config, params
