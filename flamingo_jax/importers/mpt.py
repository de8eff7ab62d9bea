"""MPT LM weights (the LMs of OpenFlamingo-3B and -9B) from a Hugging Face checkpoint directory:
``(LlamaConfig(family='mpt'), {our parameter path: float32 array})`` with the paths of
:class:`flamingo_jax.models.llama.LlamaLM`.

Two layouts of the same math:

- transformers' ``MptForCausalLM`` (``model_type: mpt``; MPT-7B): ``transformer.wte``,
  ``transformer.blocks.{i}.norm_1`` / ``attn.Wqkv`` / ``attn.out_proj`` / ``norm_2`` /
  ``ffn.up_proj`` / ``ffn.down_proj``, ``transformer.norm_f``, the head tied to ``wte``.
- MosaicGPT (``model_type: mosaic_gpt``; MPT-1B-RedPajama-200B, the code published with its
  weights): ``transformer.blocks.{i}.ln_1`` / ``attn.Wqkv`` / ``attn.q_ln`` / ``attn.k_ln`` /
  ``attn.out_proj`` / ``ln_2`` / ``mlp.mlp_up`` / ``mlp.mlp_down``, ``transformer.ln_f``; its
  config names fields ``mlp_ratio``, ``attn_qk_ln`` (LayerNorms over all heads' queries and keys
  before they split), ``attn_clip_qkv``, ``softmax_scale`` at the top level. Its ALiBi slopes
  are ``2 ** (-alibi_bias_max * h / n_heads)`` without rounding the head count up to a power of
  two, the same as transformers' for the power-of-two head counts it is published with.
"""

from __future__ import annotations

import numpy as np

from flamingo_jax.importers.llama import check_complete, read_hf_config, read_hf_tensors
from flamingo_jax.models.llama import LlamaConfig

_LAYER = {
    "norm_1.weight": "input_norm/scale",
    "norm_2.weight": "post_attention_norm/scale",
    "attn.out_proj.weight": "attention/o_proj/linear/kernel",
    "ffn.up_proj.weight": "mlp/up_proj/linear/kernel",
    "ffn.down_proj.weight": "mlp/down_proj/linear/kernel",
}


def _mpt_config(source: str, unsupported: dict, overrides: dict, **shape) -> LlamaConfig:
    """LlamaConfig(family='mpt') of either layout: raises naming the first setting in
    ``unsupported`` ({name: (value, the one supported value)}) that the model does not implement."""
    for name, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(f"{source}: {name}={value!r} is not supported (only {supported!r})")
    values = dict(family="mpt", num_kv_heads=shape["num_heads"], tie_embeddings=True, **shape)
    values.update(overrides)
    return LlamaConfig(**values)


def mpt_config_from_hf(config: dict, *, source: str = "MPT config", **overrides) -> LlamaConfig:
    """A Hugging Face MPT ``config.json`` dict -> LlamaConfig(family='mpt'); raises naming any
    setting the model does not implement."""
    attn = config.get("attn_config") or {}
    unsupported = {
        "attn_config.alibi": (attn.get("alibi", True), True),
        "attn_config.attn_type": (attn.get("attn_type", "multihead_attention"), "multihead_attention"),
        "attn_config.prefix_lm": (attn.get("prefix_lm", False), False),
        "attn_config.softmax_scale": (attn.get("softmax_scale"), None),
        "logit_scale": (config.get("logit_scale"), None),
        "no_bias": (config.get("no_bias", True), True),
    }
    return _mpt_config(
        source,
        unsupported,
        overrides,
        vocab_size=config["vocab_size"],
        width=config["d_model"],
        num_layers=config["n_layers"],
        num_heads=config["n_heads"],
        mlp_dim=int(config.get("expansion_ratio", 4)) * config["d_model"],
        norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
        qk_norm=bool(attn.get("qk_ln", False)),
        clip_qkv=attn.get("clip_qkv"),
    )


_MOSAIC_LAYER = {
    "ln_1.weight": "input_norm/scale",
    "ln_2.weight": "post_attention_norm/scale",
    "attn.q_ln.weight": "attention/q_norm/scale",
    "attn.k_ln.weight": "attention/k_norm/scale",
    "attn.out_proj.weight": "attention/o_proj/linear/kernel",
    "mlp.mlp_up.weight": "mlp/up_proj/linear/kernel",
    "mlp.mlp_down.weight": "mlp/down_proj/linear/kernel",
}


def mosaic_gpt_config_from_hf(config: dict, *, source: str = "MosaicGPT config", **overrides) -> LlamaConfig:
    """A MosaicGPT ``config.json`` dict -> LlamaConfig(family='mpt')."""
    heads = config["n_heads"]
    unsupported = {
        "alibi": (config.get("alibi", True), True),
        "prefix_lm": (config.get("prefix_lm", False), False),
        "softmax_scale": (config.get("softmax_scale"), None),
        "logit_scale": (config.get("logit_scale"), None),
        "no_bias": (config.get("no_bias", True), True),
        "n_heads is a power of two": (heads & (heads - 1) == 0, True),
    }
    return _mpt_config(
        source,
        unsupported,
        overrides,
        vocab_size=config["vocab_size"],
        width=config["d_model"],
        num_layers=config["n_layers"],
        num_heads=heads,
        mlp_dim=int(config.get("mlp_ratio", 4)) * config["d_model"],
        norm_eps=1e-5,  # MosaicGPT's LayerNorms keep torch's default
        alibi_bias_max=float(config.get("alibi_bias_max", 8)),
        qk_norm=bool(config.get("attn_qk_ln", False)),
        clip_qkv=config.get("attn_clip_qkv"),
    )


def load_mosaic_gpt(directory: str, **config_overrides) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Reads ``config.json`` and the weights of a MosaicGPT checkpoint (MPT-1B-RedPajama-200B)."""
    hf_config = read_hf_config(directory)
    if hf_config.get("model_type") != "mosaic_gpt":
        raise ValueError(f"{directory}: model_type {hf_config.get('model_type')!r} is not 'mosaic_gpt'")
    config = mosaic_gpt_config_from_hf(hf_config, source=directory, **config_overrides)
    return config, _convert(read_hf_tensors(directory), config, directory, _MOSAIC_LAYER, "ln_f")


def split_wqkv(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MPT's fused ``Wqkv`` [3W, W] holds the q, k and v rows one after the other."""
    return tuple(np.split(weight, 3, axis=0))


def load_hf_mpt(directory: str, **config_overrides) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Reads ``config.json`` and the weights of a transformers ``MptForCausalLM`` checkpoint."""
    hf_config = read_hf_config(directory)
    if hf_config.get("model_type") != "mpt":
        raise ValueError(f"{directory}: model_type {hf_config.get('model_type')!r} is not 'mpt'")
    config = mpt_config_from_hf(hf_config, source=directory, **config_overrides)
    if config.qk_norm:
        raise ValueError(f"{directory}: attn_config.qk_ln is true, which transformers' MPT layout has no weights for")
    return config, _convert(read_hf_tensors(directory), config, directory, _LAYER, "norm_f")


def _convert(tensors: dict, config: LlamaConfig, source: str, layer_names: dict, final_norm: str) -> dict:
    """Both layouts' tensors -> our parameters (their per-layer names in ``layer_names``)."""
    params = {}
    for name, value in tensors.items():
        value = np.asarray(value, np.float32)
        if name == "transformer.wte.weight":
            params["embed"] = value
        elif name == f"transformer.{final_norm}.weight":
            params["final_norm/scale"] = value
        elif name == "lm_head.weight":
            continue  # tied to wte
        elif name.startswith("transformer.blocks."):
            index, rest = name[len("transformer.blocks.") :].split(".", 1)
            if rest == "attn.Wqkv.weight":
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_wqkv(value), strict=True):
                    params[f"layers/{index}/attention/{proj}/linear/kernel"] = part.T
            elif rest in layer_names:
                target = layer_names[rest]
                params[f"layers/{index}/{target}"] = value.T if target.endswith("kernel") else value
            else:
                raise ValueError(f"{source}: unexpected tensor {name}")
        else:
            raise ValueError(f"{source}: unexpected tensor {name}")
    check_complete(config, params, source=source)
    return params
