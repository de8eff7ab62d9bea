"""MPT LM weights (the LMs of OpenFlamingo-3B and -9B) from a Hugging Face checkpoint directory:
``(LlamaConfig(family='mpt'), {our parameter path: float32 array})`` with the paths of
:class:`flamingo_jax.models.llama.LlamaLM`.

The layout is transformers' ``MptForCausalLM`` (MPT-7B): ``transformer.wte``,
``transformer.blocks.{i}.norm_1`` / ``attn.Wqkv`` / ``attn.out_proj`` / ``norm_2`` /
``ffn.up_proj`` / ``ffn.down_proj``, ``transformer.norm_f``, the head tied to ``wte``.
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


def mpt_config_from_hf(config: dict, *, source: str = "MPT config", **overrides) -> LlamaConfig:
    """A Hugging Face MPT ``config.json`` dict -> LlamaConfig(family='mpt'); raises naming any
    setting the model does not implement."""
    attn = config.get("attn_config") or {}
    width, heads = config["d_model"], config["n_heads"]
    unsupported = {
        "attn_config.alibi": (attn.get("alibi", True), True),
        "attn_config.attn_type": (attn.get("attn_type", "multihead_attention"), "multihead_attention"),
        "attn_config.prefix_lm": (attn.get("prefix_lm", False), False),
        "attn_config.softmax_scale": (attn.get("softmax_scale"), None),
        "logit_scale": (config.get("logit_scale"), None),
        "no_bias": (config.get("no_bias", True), True),
    }
    for name, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(f"{source}: {name}={value!r} is not supported (only {supported!r})")
    values = dict(
        family="mpt",
        vocab_size=config["vocab_size"],
        width=width,
        num_layers=config["n_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        mlp_dim=int(config.get("expansion_ratio", 4)) * width,
        norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=True,
        alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
        qk_norm=bool(attn.get("qk_ln", False)),
        clip_qkv=attn.get("clip_qkv"),
    )
    values.update(overrides)
    return LlamaConfig(**values)


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
    params = {}
    for name, value in read_hf_tensors(directory).items():
        value = np.asarray(value, np.float32)
        if name == "transformer.wte.weight":
            params["embed"] = value
        elif name == "transformer.norm_f.weight":
            params["final_norm/scale"] = value
        elif name == "lm_head.weight":
            continue  # tied to wte
        elif name.startswith("transformer.blocks."):
            index, rest = name[len("transformer.blocks.") :].split(".", 1)
            if rest == "attn.Wqkv.weight":
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_wqkv(value), strict=True):
                    params[f"layers/{index}/attention/{proj}/linear/kernel"] = part.T
            elif rest in _LAYER:
                target = _LAYER[rest]
                params[f"layers/{index}/{target}"] = value.T if target.endswith("kernel") else value
            else:
                raise ValueError(f"{directory}: unexpected tensor {name}")
        else:
            raise ValueError(f"{directory}: unexpected tensor {name}")
    check_complete(config, params, source=directory)
    return config, params
