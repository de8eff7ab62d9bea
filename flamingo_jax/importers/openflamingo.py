"""OpenFlamingo checkpoints (``checkpoint.pt`` holds only the trainable parts) into an
OpenFlamingo-layout Flamingo config (``experiments/models/openflamingo_*.gin``).

Key mapping:
  perceiver.latents / .frame_embs / .layers.{i}.0.{norm_media,norm_latents,to_q,to_kv,to_out}
    / .layers.{i}.1.{0,1,3} / .norm                        -> resampler/...
  lang_encoder.gated_cross_attn_layers.{layer}.attn.{norm,to_q,to_kv,to_out} / .attn_gate
    / .ff.{0,1,3} / .ff_gate                               -> xattn_layers/{position}/...
  the <image> and <|endofchunk|> rows of the LM input embeddings -> new_tokens/embed
The file is read with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import numpy as np

from flamingo_jax.models.flamingo import FlamingoConfig


def _layer_norm(params, ours, state, theirs):
    params[f"{ours}/scale"] = state[f"{theirs}.weight"]
    params[f"{ours}/bias"] = state[f"{theirs}.bias"]


def _linear(params, ours, weight):
    params[f"{ours}/linear/kernel"] = weight.T


def _ffw(params, ours, state, theirs):
    _layer_norm(params, f"{ours}/norm", state, f"{theirs}.0")
    _linear(params, f"{ours}/fc1", state[f"{theirs}.1.weight"])
    _linear(params, f"{ours}/fc2", state[f"{theirs}.3.weight"])


def _attention(params, ours, state, theirs, q_name="to_q"):
    _linear(params, f"{ours}/to_q", state[f"{theirs}.{q_name}.weight"])
    keys, values = np.split(state[f"{theirs}.to_kv.weight"], 2, axis=0)
    _linear(params, f"{ours}/to_k", keys)
    _linear(params, f"{ours}/to_v", values)
    _linear(params, f"{ours}/to_out", state[f"{theirs}.to_out.weight"])


def resampler_params(state: dict[str, np.ndarray], depth: int, prefix: str = "perceiver.") -> dict[str, np.ndarray]:
    """OpenFlamingo ``PerceiverResampler`` state -> our resampler parameters (no ``resampler/``)."""
    state = {k.removeprefix(prefix): np.asarray(v, np.float32) for k, v in state.items() if k.startswith(prefix)}
    if "media_time_embs" in state:
        raise ValueError("OpenFlamingo media_time_embs (max_num_media) are not supported; no released model uses them")
    params = {"latents": state["latents"]}
    if "frame_embs" in state:
        params["frame_embed"] = state["frame_embs"]
    for i in range(depth):
        _layer_norm(params, f"layers/{i}/attention/norm_media", state, f"layers.{i}.0.norm_media")
        _layer_norm(params, f"layers/{i}/attention/norm_latents", state, f"layers.{i}.0.norm_latents")
        _attention(params, f"layers/{i}/attention", state, f"layers.{i}.0")
        _ffw(params, f"layers/{i}/ffw", state, f"layers.{i}.1")
    _layer_norm(params, "norm", state, "norm")
    return params


def xattn_block_params(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """One OpenFlamingo ``GatedCrossAttentionBlock`` (keys under ``prefix``) -> our block."""
    state = {k.removeprefix(prefix): np.asarray(v, np.float32) for k, v in state.items() if k.startswith(prefix)}
    params = {}
    _layer_norm(params, "norm", state, "attn.norm")
    _attention(params, "", state, "attn")
    params = {key.lstrip("/"): value for key, value in params.items()}
    params["attn_gate"] = state["attn_gate"].reshape(())
    _ffw(params, "ffw", state, "ff")
    params["ffw_gate"] = state["ff_gate"].reshape(())
    return params


def flamingo_params(
    state: dict[str, np.ndarray],
    config: FlamingoConfig,
    *,
    media_token_index: int | None = None,
    endofchunk_token_index: int | None = None,
    input_embeddings_key: str | None = None,
) -> dict[str, np.ndarray]:
    """A whole OpenFlamingo ``checkpoint.pt`` state -> our Flamingo parameters (flat paths).

    With ``input_embeddings_key`` (the LM input-embedding matrix in the checkpoint) and the two
    token indices of the OpenFlamingo tokenizer, the new tokens' rows are imported too.
    """
    if config.xattn.placement != "openflamingo":
        raise ValueError("OpenFlamingo checkpoints need XAttnConfig.placement = 'openflamingo'")
    params = {f"resampler/{k}": v for k, v in resampler_params(state, config.resampler.depth).items()}
    present = sorted(
        {int(key.split(".")[2]) for key in state if key.startswith("lang_encoder.gated_cross_attn_layers.")}
    )
    expected = list(config.xattn_layer_indices)
    if present != expected:
        raise ValueError(f"checkpoint has xattn blocks before LM layers {present}, the config expects {expected}")
    for position, layer in enumerate(expected):
        block = xattn_block_params(state, f"lang_encoder.gated_cross_attn_layers.{layer}.")
        params.update({f"xattn_layers/{position}/{k}": v for k, v in block.items()})
    if input_embeddings_key is not None:
        if media_token_index is None or endofchunk_token_index is None:
            raise ValueError("importing the new-token rows needs media_token_index and endofchunk_token_index")
        table = np.asarray(state[input_embeddings_key], np.float32)
        params["new_tokens/embed"] = table[[media_token_index, endofchunk_token_index]]
    return params


def load_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Reads an OpenFlamingo ``checkpoint.pt`` without executing pickled code."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if "model_state_dict" in state:
        state = state["model_state_dict"]
    return {key.removeprefix("module."): value.float().numpy() for key, value in state.items()}
