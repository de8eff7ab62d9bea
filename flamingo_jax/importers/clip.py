"""CLIP ViT weights (Hugging Face ``CLIPVisionModel`` and open_clip ``visual`` layouts) for
:class:`flamingo_jax.models.vit.ViT`. Inputs are {name: numpy array} state dicts."""

from __future__ import annotations

import numpy as np

from flamingo_jax.models.vit import ViTConfig


def vit_config_from_hf(config: dict, **overrides) -> ViTConfig:
    """A Hugging Face ``CLIPVisionConfig`` dict -> ViTConfig (HF ``last_hidden_state`` semantics:
    every token, no final LayerNorm on them)."""
    values = dict(
        image_size=config["image_size"],
        patch_size=config["patch_size"],
        channels=config.get("num_channels", 3),
        width=config["hidden_size"],
        depth=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        mlp_dim=config["intermediate_size"],
        activation=config.get("hidden_act", "quick_gelu"),
        norm_eps=config.get("layer_norm_eps", 1e-5),
        output_tokens="all",
        post_norm_tokens=False,
    )
    values.update(overrides)
    return ViTConfig(**values)


_HF_DENSE = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "out_proj": "self_attn.out_proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


def _patch_kernel(weight):  # torch conv [W, C, p, p] -> ours [p, p, C, W]
    return np.transpose(weight, (2, 3, 1, 0))


def _norm(params, ours, weight, bias):
    params[f"{ours}/scale"] = weight
    params[f"{ours}/bias"] = bias


def _dense(params, ours, weight, bias=None):
    params[f"{ours}/linear/kernel"] = weight.T
    if bias is not None:
        params[f"{ours}/linear/bias"] = bias


def from_hf_clip_vision(state: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    """``CLIPVisionModel.state_dict()`` (keys ``vision_model.*``) -> our ViT parameters."""
    state = {key.removeprefix("vision_model."): np.asarray(value, np.float32) for key, value in state.items()}
    params = {
        "patch_embed": _patch_kernel(state["embeddings.patch_embedding.weight"]),
        "class_embed": state["embeddings.class_embedding"],
        "position_embed": state["embeddings.position_embedding.weight"],
    }
    _norm(params, "pre_norm", state["pre_layrnorm.weight"], state["pre_layrnorm.bias"])
    _norm(params, "post_norm", state["post_layernorm.weight"], state["post_layernorm.bias"])
    for i in range(config.depth):
        prefix = f"encoder.layers.{i}."
        for ours, theirs in _HF_DENSE.items():
            _dense(params, f"blocks/{i}/{ours}", state[prefix + theirs + ".weight"], state[prefix + theirs + ".bias"])
        _norm(params, f"blocks/{i}/norm1", state[prefix + "layer_norm1.weight"], state[prefix + "layer_norm1.bias"])
        _norm(params, f"blocks/{i}/norm2", state[prefix + "layer_norm2.weight"], state[prefix + "layer_norm2.bias"])
    return params


def from_open_clip_visual(state: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    """open_clip ``model.visual.state_dict()`` (or a full state dict with ``visual.`` keys)."""
    state = {key.removeprefix("visual."): np.asarray(value, np.float32) for key, value in state.items()}
    width = config.width
    params = {
        "patch_embed": _patch_kernel(state["conv1.weight"]),
        "class_embed": state["class_embedding"],
        "position_embed": state["positional_embedding"],
    }
    _norm(params, "pre_norm", state["ln_pre.weight"], state["ln_pre.bias"])
    _norm(params, "post_norm", state["ln_post.weight"], state["ln_post.bias"])
    for i in range(config.depth):
        prefix = f"transformer.resblocks.{i}."
        in_weight, in_bias = state[prefix + "attn.in_proj_weight"], state[prefix + "attn.in_proj_bias"]
        for part, ours in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(part * width, (part + 1) * width)
            _dense(params, f"blocks/{i}/{ours}", in_weight[rows], in_bias[rows])
        _dense(
            params, f"blocks/{i}/out_proj", state[prefix + "attn.out_proj.weight"], state[prefix + "attn.out_proj.bias"]
        )
        _dense(params, f"blocks/{i}/fc1", state[prefix + "mlp.c_fc.weight"], state[prefix + "mlp.c_fc.bias"])
        _dense(params, f"blocks/{i}/fc2", state[prefix + "mlp.c_proj.weight"], state[prefix + "mlp.c_proj.bias"])
        _norm(params, f"blocks/{i}/norm1", state[prefix + "ln_1.weight"], state[prefix + "ln_1.bias"])
        _norm(params, f"blocks/{i}/norm2", state[prefix + "ln_2.weight"], state[prefix + "ln_2.bias"])
    return params
