"""OpenFlamingo checkpoints (``checkpoint.pt`` holds only the trainable parts) into an
OpenFlamingo-layout Flamingo config (``experiments/models/openflamingo_*.gin``).

Key mapping:
  perceiver.latents / .frame_embs / .layers.{i}.0.{norm_media,norm_latents,to_q,to_kv,to_out}
    / .layers.{i}.1.{0,1,3} / .norm                        -> resampler/...
  lang_encoder.{decoder layers}.{layer}.gated_cross_attn_layer.attn.{norm,to_q,to_kv,to_out}
    / .attn_gate / .ff.{0,1,3} / .ff_gate                  -> xattn_layers/{position}/...
    (the released v2 files, whose training script drops the ``gated_cross_attn_layers``
    aliases: decoder layers ``transformer.blocks`` for MPT, ``gpt_neox.layers`` for GPT-NeoX;
    ``lang_encoder.gated_cross_attn_layers.{layer}.`` is read too)
  the LM input embeddings (trained by OpenFlamingo): the base rows -> lm/embed, the <image>
    and <|endofchunk|> rows -> new_tokens/embed; an untied output embedding likewise -> lm/lm_head
    and new_tokens/head
The file is read with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import re

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
    output_embeddings_key: str | None = None,
) -> dict[str, np.ndarray]:
    """A whole OpenFlamingo ``checkpoint.pt`` state -> our Flamingo parameters (flat paths).

    With ``input_embeddings_key`` (the LM input-embedding matrix in the checkpoint, e.g.
    ``lang_encoder.transformer.wte.weight``) and the two token indices of the OpenFlamingo
    tokenizer, the embeddings are imported too: OpenFlamingo trains the whole input embedding,
    so its base rows replace the LM's own. ``output_embeddings_key`` does the same for an untied
    head (GPT-NeoX's ``lang_encoder.embed_out.weight``). Rows beyond the base vocabulary and the
    two new tokens (OpenFlamingo's ``<PAD>``) are not part of our model.
    """
    if config.xattn.placement != "openflamingo":
        raise ValueError("OpenFlamingo checkpoints need XAttnConfig.placement = 'openflamingo'")
    params = {f"resampler/{k}": v for k, v in resampler_params(state, config.resampler.depth).items()}
    prefixes = {}  # LM layer -> the key prefix of its block
    for key in state:
        found = _BLOCK_KEY.match(key)
        if found:
            layer = int(found.group("aliased") or found.group("wrapped"))
            prefixes[layer] = key[: found.end()]
    present, expected = sorted(prefixes), list(config.xattn_layer_indices)
    if present != expected:
        raise ValueError(f"checkpoint has xattn blocks before LM layers {present}, the config expects {expected}")
    for position, layer in enumerate(expected):
        block = xattn_block_params(state, prefixes[layer])
        params.update({f"xattn_layers/{position}/{k}": v for k, v in block.items()})
    vocab = config.lm.vocab_size
    # (checkpoint key, our base rows, our new-token rows, whether ours are [width, tokens]).
    for key, base, new, columns in (
        (input_embeddings_key, "lm/embed", "new_tokens/embed", False),
        (output_embeddings_key, "lm/lm_head/linear/kernel", "new_tokens/head", True),
    ):
        if key is None:
            continue
        if media_token_index is None or endofchunk_token_index is None:
            raise ValueError("importing the embedding rows needs media_token_index and endofchunk_token_index")
        if key not in state:
            raise ValueError(f"checkpoint has no {key!r}; its embedding keys: {[k for k in state if 'embed' in k]}")
        table = np.asarray(state[key], np.float32)
        if min(media_token_index, endofchunk_token_index) < vocab or table.shape[0] < vocab:
            raise ValueError(
                f"{key} has {table.shape[0]} rows and the new tokens at {media_token_index} / "
                f"{endofchunk_token_index}; LlamaConfig.vocab_size={vocab} must cover the base rows only"
            )
        base_rows, new_rows = table[:vocab], table[[media_token_index, endofchunk_token_index]]
        params[base] = base_rows.T if columns else base_rows
        params[new] = new_rows.T if columns else new_rows
    return params


# A block's keys: ``lang_encoder.gated_cross_attn_layers.{i}.`` or ``lang_encoder.<decoder
# layers>.{i}.gated_cross_attn_layer.``.
_BLOCK_KEY = re.compile(
    r"lang_encoder\.(?:gated_cross_attn_layers\.(?P<aliased>\d+)\.|[\w.]*?\.(?P<wrapped>\d+)\.gated_cross_attn_layer\.)"
)


def load_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Reads an OpenFlamingo ``checkpoint.pt`` without executing pickled code."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if "model_state_dict" in state:
        state = state["model_state_dict"]
    return {key.removeprefix("module."): value.float().numpy() for key, value in state.items()}
