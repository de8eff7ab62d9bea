"""IDEFICS (transformers' ``IdeficsForVisionText2Text``: IDEFICS-9B / -80B) into our Flamingo.

IDEFICS is a Flamingo: a CLIP ViT (all tokens, no final LayerNorm), a Perceiver Resampler
(ReLU feed-forward, optional LayerNorms over each head's queries and keys), gated
cross-attention before every ``cross_layer_interval``-th Llama layer from the first (RMSNorms,
a SwiGLU feed-forward of the LM's width, optional RMSNorms over each head's queries and keys,
``tanh`` gates per block or per channel), and two embedding rows beyond the Llama vocabulary
(``model.embed_tokens.additional_embedding``, ``lm_head.additional_fc``).

Key mapping (the directory ``save_pretrained`` writes, safetensors):
  model.vision_model.*                       -> vision/... (importers.clip, HF CLIP names)
  model.perceiver_resampler.latents / .blocks.{i}.0.{context_layer_norm, latents_layer_norm,
    q_layer_norm, k_layer_norm, q_proj, k_proj, v_proj, output_proj} / .blocks.{i}.1.{ln, fc,
    c_proj} / .layer_norm                    -> resampler/...
  model.embed_tokens.weight, model.layers.*, model.norm, lm_head.weight -> lm/... (importers.llama)
  model.gated_cross_attn_layers.{j}.{input_layernorm, cross_attn.{q,k,v,o}_proj,
    cross_attn.{q,k}_layer_norm, alpha_cross_attn, post_attention_layernorm,
    mlp.{gate,up,down}_proj, alpha_dense}    -> xattn_layers/{j}/...
  the two additional rows                    -> new_tokens/{embed,head}: our ``<image>`` row is
    IDEFICS's ``<image>``, our second row (``<|endofchunk|>``'s id) its
    ``<fake_token_around_image>``
"""

from __future__ import annotations

import numpy as np

from flamingo_jax.importers import clip, llama
from flamingo_jax.importers.pretrained import check_params
from flamingo_jax.models.flamingo import FlamingoConfig
from flamingo_jax.models.resampler import ResamplerConfig
from flamingo_jax.models.vit import ViTConfig
from flamingo_jax.models.xattn import XAttnConfig

# Rows of the additional embedding in IDEFICS's tokenizer (HuggingFaceM4/idefics-9b's
# added tokens: <fake_token_around_image> 32000, <image> 32001, the first beyond the vocabulary).
FAKE_TOKEN_ROW, IMAGE_TOKEN_ROW = 0, 1
# Our two new tokens' texts for IDEFICS (FlamingoConfig.new_tokens): <image>, then the token its
# prompts place around each image.
NEW_TOKENS = ("<image>", "<fake_token_around_image>")


def idefics_config_from_hf(config: dict) -> FlamingoConfig:
    """An ``IdeficsConfig`` dict (config.json) -> our FlamingoConfig of the same model."""
    if config.get("model_type") != "idefics":
        raise ValueError(f"model_type {config.get('model_type')!r} is not 'idefics'")
    perceiver = config.get("perceiver_config") or {}
    if not config.get("use_resampler", perceiver.get("use_resampler", False)):
        raise ValueError("IDEFICS without its Perceiver Resampler (use_resampler=False) is not supported")
    if config.get("additional_vocab_size", 0) != 2:
        raise ValueError(
            f"additional_vocab_size={config.get('additional_vocab_size')}: our model has two new-token rows"
        )
    vision = config["vision_config"]
    lm = llama.llama_config_from_hf({**config, "tie_word_embeddings": config.get("tie_word_embeddings", False)})
    vision_config = ViTConfig(
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        channels=vision.get("num_channels", 3),
        width=vision["embed_dim"],
        depth=vision["num_hidden_layers"],
        num_heads=vision["num_attention_heads"],
        mlp_dim=vision["intermediate_size"],
        activation=vision.get("hidden_act", "gelu"),
        norm_eps=vision.get("layer_norm_eps", 1e-5),
        output_tokens="all",
        post_norm_tokens=False,
    )
    resampler = ResamplerConfig(
        width=vision["embed_dim"],
        depth=perceiver.get("resampler_depth", 6),
        num_heads=perceiver.get("resampler_n_heads", 16),
        head_dim=perceiver.get("resampler_head_dim", 96),
        num_latents=perceiver.get("resampler_n_latents", 64),
        max_frames=0,
        ffw_mult=4,
        activation="relu",
        qk_norm=bool(perceiver.get("qk_layer_norms_perceiver", False)),
    )
    xattn = XAttnConfig(
        every=config.get("cross_layer_interval", 1),
        placement="paper",
        num_heads=lm.num_heads,
        attend="last",
        norm="rms",
        norm_eps=lm.norm_eps,
        ffw="swiglu",
        ffw_dim=lm.mlp_dim,
        activation=config.get("hidden_act", "silu"),
        qk_norm=bool(config.get("qk_layer_norms", False)),
        gate_shape={"float": "scalar", "vector": "vector"}[config.get("alpha_type", "float")],
    )
    return FlamingoConfig(lm=lm, vision=vision_config, resampler=resampler, xattn=xattn, new_tokens=NEW_TOKENS)


def _linear(params, ours, weight):
    params[f"{ours}/linear/kernel"] = weight.T


def _layer_norm(params, ours, state, theirs):
    params[f"{ours}/scale"] = state[f"{theirs}.weight"]
    params[f"{ours}/bias"] = state[f"{theirs}.bias"]


def idefics_params(state: dict[str, np.ndarray], config: FlamingoConfig) -> dict[str, np.ndarray]:
    """An ``IdeficsForVisionText2Text`` state dict -> our Flamingo parameters (flat paths)."""
    state = {key: np.asarray(value, np.float32) for key, value in state.items()}
    vision = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.vision_model.")}
    params = {f"vision/{k}": v for k, v in clip.from_hf_clip_vision(vision, config.vision).items()}

    prefix = "model.perceiver_resampler."
    params["resampler/latents"] = state[prefix + "latents"]
    for i in range(config.resampler.depth):
        theirs, ours = f"{prefix}blocks.{i}.", f"resampler/layers/{i}/"
        _layer_norm(params, ours + "attention/norm_media", state, theirs + "0.context_layer_norm")
        _layer_norm(params, ours + "attention/norm_latents", state, theirs + "0.latents_layer_norm")
        if config.resampler.qk_norm:
            _layer_norm(params, ours + "attention/q_norm", state, theirs + "0.q_layer_norm")
            _layer_norm(params, ours + "attention/k_norm", state, theirs + "0.k_layer_norm")
        for mine, name in (("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out", "output_proj")):
            _linear(params, ours + f"attention/{mine}", state[theirs + f"0.{name}.weight"])
        _layer_norm(params, ours + "ffw/norm", state, theirs + "1.ln")
        _linear(params, ours + "ffw/fc1", state[theirs + "1.fc.weight"])
        _linear(params, ours + "ffw/fc2", state[theirs + "1.c_proj.weight"])
    _layer_norm(params, "resampler/norm", state, prefix + "layer_norm")

    text = {
        key: value
        for key, value in state.items()
        if key.startswith("model.layers.")
        or key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    }
    lm = llama.llama_params(text, config.lm, source="IDEFICS checkpoint")
    llama.check_complete(config.lm, lm, source="IDEFICS checkpoint")
    params.update({f"lm/{k}": v for k, v in lm.items()})

    for j in range(len(config.xattn_layer_indices)):
        theirs, ours = f"model.gated_cross_attn_layers.{j}.", f"xattn_layers/{j}/"
        params[ours + "norm/scale"] = state[theirs + "input_layernorm.weight"]
        for mine, name in (("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out", "o_proj")):
            _linear(params, ours + mine, state[theirs + f"cross_attn.{name}.weight"])
        if config.xattn.qk_norm:
            params[ours + "q_norm/scale"] = state[theirs + "cross_attn.q_layer_norm.weight"]
            params[ours + "k_norm/scale"] = state[theirs + "cross_attn.k_layer_norm.weight"]
        gate_shape = () if config.xattn.gate_shape == "scalar" else (config.lm.width,)
        params[ours + "attn_gate"] = state[theirs + "alpha_cross_attn"].reshape(gate_shape)
        params[ours + "ffw_gate"] = state[theirs + "alpha_dense"].reshape(gate_shape)
        params[ours + "ffw/norm/scale"] = state[theirs + "post_attention_layernorm.weight"]
        for mine, name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            _linear(params, ours + f"ffw/{mine}", state[theirs + f"mlp.{name}.weight"])

    rows = [IMAGE_TOKEN_ROW, FAKE_TOKEN_ROW]  # ours: <image>, then the second new token
    params["new_tokens/embed"] = state["model.embed_tokens.additional_embedding.weight"][rows]
    params["new_tokens/head"] = state["lm_head.additional_fc.weight"][rows].T
    return params


def load_idefics(directory: str) -> tuple[FlamingoConfig, dict[str, np.ndarray]]:
    """config.json and the safetensors of an IDEFICS directory -> (our config, our parameters)."""
    config = idefics_config_from_hf(llama.read_hf_config(directory))
    try:
        params = idefics_params(llama.read_hf_tensors(directory), config)
    except KeyError as error:
        raise ValueError(f"{directory}: no tensor {error} in the IDEFICS checkpoint") from None
    check_params(params, config)
    return config, params
