"""Perceiver Resampler (Flamingo Section 2.1, Figure 4).

A fixed number of learned latents cross-attend to concat(visual features, latents); learned
time embeddings are added to video frames first (interpolated when a clip has more frames than
were seen in training). Parameter layout follows OpenFlamingo's ``PerceiverResampler`` so its
checkpoints import one-to-one.

``ResamplerConfig.kind`` swaps it for the alternatives of the paper's ablation (Table 3 (vi)):
'mlp' (a residual MLP on each visual feature) and 'transformer' (self-attention layers over a
medium's features); both keep every feature (frames x positions visual tokens per medium, not a
fixed number of latents).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models import layers

KINDS = ("perceiver", "mlp", "transformer")


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    """Paper defaults: 64 latents, depth 6, squared-ReLU FFW x4 (Section 2.1, Appendix B.1.1).

    ``width`` is the latent width; ``input_dim`` the vision feature width (Flamingo sets it from
    its vision encoder), projected to ``width`` first when they differ (a 3072-wide NFNet-F6
    feeding the paper's 1536-wide resampler). The paper's 194M resampler parameters come out
    with 16 heads of 128. ``qk_norm``: a LayerNorm over each head's queries and keys (IDEFICS's
    ``qk_layer_norms_perceiver``).

    ``kind``: 'perceiver' (the paper's), or the ablation's 'mlp' / 'transformer' (``depth``
    residual layers on the features themselves, of ``width``; no latents, so ``num_latents`` is
    unused and a medium gives as many visual tokens as its features: :meth:`tokens_per_medium`).
    """

    kind: str = "perceiver"
    width: int = 1536
    input_dim: int | None = None
    depth: int = 6
    num_heads: int = 16
    head_dim: int = 128
    num_latents: int = 64
    max_frames: int = 8
    ffw_mult: int = 4
    activation: str = "squared_relu"
    norm_eps: float = 1e-5
    qk_norm: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ResamplerConfig.kind must be one of {KINDS}, got {self.kind!r}")
        layers.activation(self.activation)
        if self.max_frames < 0:
            raise ValueError(f"ResamplerConfig.max_frames must be >= 0 (0: no time embeddings), got {self.max_frames}")

    def tokens_per_medium(self, features_per_frame: int, num_frames: int = 1) -> int:
        """Visual tokens the resampler gives one medium of ``num_frames`` frames of
        ``features_per_frame`` vision features each."""
        return self.num_latents if self.kind == "perceiver" else num_frames * features_per_frame


class PerceiverAttention(nnx.Module):
    """The latents' attention to concat(media, latents); with ``self_attention`` (the ablation's
    'transformer' kind) the features' attention to themselves (no media input or its norm)."""

    def __init__(self, config: ResamplerConfig, *, self_attention: bool = False, rngs: nnx.Rngs):
        self.config = config
        inner = config.num_heads * config.head_dim
        dense = lambda i, o, names: layers.Dense(
            i, o, names, param_dtype=config.param_dtype, dtype=config.dtype, rngs=rngs
        )
        norm = lambda: layers.layer_norm(config.width, eps=config.norm_eps, param_dtype=config.param_dtype, rngs=rngs)
        self.norm_media = None if self_attention else norm()
        self.norm_latents = norm()
        self.to_q = dense(config.width, inner, ("embed", "heads"))
        self.to_k = dense(config.width, inner, ("embed", "heads"))
        self.to_v = dense(config.width, inner, ("embed", "heads"))
        self.to_out = dense(inner, config.width, ("heads", "embed"))
        if config.qk_norm:
            head_norm = lambda: layers.layer_norm(
                config.head_dim, eps=config.norm_eps, param_dtype=config.param_dtype, rngs=rngs
            )
            self.q_norm, self.k_norm = head_norm(), head_norm()
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, media, latents):
        """media: float[B, S, D] (None with ``self_attention``); latents: float[B, L, D] ->
        float[B, L, D]."""
        config = self.config
        latents = layers.apply_norm(self.norm_latents, latents)
        if self.norm_media is None:
            kv_input = latents
        else:
            kv_input = jnp.concatenate([layers.apply_norm(self.norm_media, media), latents], axis=1)
        heads = lambda t: t.reshape(t.shape[0], t.shape[1], config.num_heads, config.head_dim)
        query, key = heads(self.to_q(latents)), heads(self.to_k(kv_input))
        if self.q_norm is not None:
            query, key = layers.apply_norm(self.q_norm, query), layers.apply_norm(self.k_norm, key)
        out = layers.dot_product_attention(query, key, heads(self.to_v(kv_input)), None)
        return self.to_out(out.reshape(out.shape[0], out.shape[1], -1))


class FeedForward(nnx.Module):
    """LayerNorm -> Linear(x mult) -> activation -> Linear, no biases (OpenFlamingo layout).
    ``hidden``: the hidden width in place of width x mult; ``norm``: 'layer' or 'rms'."""

    def __init__(
        self,
        width: int,
        mult: int,
        activation: str,
        *,
        norm_eps,
        param_dtype,
        dtype,
        rngs: nnx.Rngs,
        hidden: int | None = None,
        norm: str = "layer",
    ):
        hidden = hidden or width * mult
        self.activation = activation
        self.norm = layers.make_norm(norm, width, eps=norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = layers.Dense(width, hidden, ("embed", "mlp"), param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.fc2 = layers.Dense(hidden, width, ("mlp", "embed"), param_dtype=param_dtype, dtype=dtype, rngs=rngs)

    @property
    def output(self) -> layers.Dense:
        """The output projection (zero-initialised by ``XAttnConfig.init='zero_output'``)."""
        return self.fc2

    def __call__(self, x):
        return self.fc2(layers.activation(self.activation)(self.fc1(layers.apply_norm(self.norm, x))))


class ResamplerLayer(nnx.Module):
    """An attention ('cross': the Perceiver's latents to the media; 'self': the ablation's
    Transformer; None: its MLP) and a feed-forward, each residual."""

    def __init__(self, config: ResamplerConfig, *, attention: str | None = "cross", rngs: nnx.Rngs):
        self.attention = (
            None if attention is None else PerceiverAttention(config, self_attention=attention == "self", rngs=rngs)
        )
        self.ffw = FeedForward(
            config.width,
            config.ffw_mult,
            config.activation,
            norm_eps=config.norm_eps,
            param_dtype=config.param_dtype,
            dtype=config.dtype,
            rngs=rngs,
        )


def frame_embeddings(table: jax.Array, num_frames: int) -> jax.Array:
    """float[max_frames, D] -> float[num_frames, D]; linear interpolation past max_frames.

    Flamingo trains on 8 frames at 1 FPS and interpolates the learned time embeddings for longer
    clips at inference (Section 2.1).
    """
    max_frames = table.shape[0]
    if num_frames <= max_frames:
        return table[:num_frames]
    source = jnp.linspace(0.0, max_frames - 1.0, num_frames)
    low = jnp.floor(source).astype(jnp.int32)
    high = jnp.minimum(low + 1, max_frames - 1)
    frac = (source - low)[:, None].astype(table.dtype)
    return table[low] * (1 - frac) + table[high] * frac


class PerceiverResampler(nnx.Module):
    """float[B, N, F, V, input_dim] media features -> float[B, N, num_latents, width] (with
    ``kind`` 'mlp' or 'transformer': float[B, N, F * V, width])."""

    def __init__(self, config: ResamplerConfig, *, rngs: nnx.Rngs):
        self.config = config
        input_dim = config.input_dim or config.width
        init = nnx.initializers.normal(0.02)
        if input_dim != config.width:
            self.input_proj = layers.Dense(
                input_dim,
                config.width,
                ("vision_embed", "embed"),
                param_dtype=config.param_dtype,
                dtype=config.dtype,
                rngs=rngs,
            )
        else:
            self.input_proj = None
        self.latents = (
            nnx.Param(
                init(rngs.params(), (config.num_latents, config.width), config.param_dtype),
                out_sharding=("latents", "embed"),
            )
            if config.kind == "perceiver"
            else None
        )
        # OpenFlamingo's released models have no time embeddings: max_frames=0 leaves them out.
        self.frame_embed = (
            nnx.Param(
                init(rngs.params(), (config.max_frames, input_dim), config.param_dtype),
                out_sharding=(None, "vision_embed"),
            )
            if config.max_frames
            else None
        )
        attention = {"perceiver": "cross", "transformer": "self", "mlp": None}[config.kind]
        self.layers = nnx.List([ResamplerLayer(config, attention=attention, rngs=rngs) for _ in range(config.depth)])
        self.norm = layers.layer_norm(config.width, eps=config.norm_eps, param_dtype=config.param_dtype, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.trace(features)["output"]

    def trace(self, features: jax.Array) -> dict[str, jax.Array]:
        """The resampler's values on the way, by name: 'input' (the features after the time
        embeddings and the input projection, float[B * N, F * V, width]), 'layer{k}' (the latents
        after layer k, float[B * N, num_latents, width]) and 'output' (what ``__call__`` returns).
        Under jit the ones not used are never computed."""
        config = self.config
        batch, num_media, num_frames, num_tokens, _ = features.shape
        dtype = jnp.dtype(config.dtype)
        x = features.astype(dtype)
        if self.frame_embed is not None:
            x = x + frame_embeddings(self.frame_embed[...], num_frames).astype(dtype)[:, None, :]
        x = x.reshape(batch * num_media, num_frames * num_tokens, -1)
        if self.input_proj is not None:
            x = self.input_proj(x)
        values = {"input": x}
        if config.kind == "perceiver":
            latents = jnp.broadcast_to(
                self.latents[...].astype(dtype), (batch * num_media, config.num_latents, config.width)
            )
            for index, layer in enumerate(self.layers):
                latents = latents + layer.attention(x, latents)
                latents = latents + layer.ffw(latents)
                values[f"layer{index}"] = latents
        else:  # the ablation's MLP / Transformer: every feature is a visual token
            latents = x
            for index, layer in enumerate(self.layers):
                if layer.attention is not None:
                    latents = latents + layer.attention(None, latents)
                latents = latents + layer.ffw(latents)
                values[f"layer{index}"] = latents
        out = layers.apply_norm(self.norm, latents)
        values["output"] = out.reshape(batch, num_media, out.shape[1], config.width)
        return values
