"""Token-level connectors: visual tokens placed in the LM's input sequence instead of Flamingo's
cross-attention into its layers (the other half of the connector design space).

- 'mlp': LLaVA-1.5's projector (Liu et al. 2023, "Improved Baselines with Visual Instruction
  Tuning", Section 3.2): Linear(vision width -> LM width), GELU, Linear(LM width -> LM width), on
  every vision feature of every frame: a medium gives frames x features visual tokens.
- 'qformer': BLIP-2's Querying Transformer (Li et al. 2023, Section 3.1): ``num_queries``
  learned queries with self-attention, cross-attention to the image features every
  ``cross_attention_every`` layers (BLIP-2: every other) and a feed-forward, then a linear
  projection to the LM width: every medium gives exactly ``num_queries`` visual tokens,
  however many frames it has. Pre-norm layers here (BLIP-2's BERT is post-norm), as the
  resampler's.

Learned time embeddings (as the Perceiver Resampler's) are added to video frames' features
first, so frames are told apart. The model that uses them is
:class:`flamingo_jax.models.token_fusion.TokenFusion`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.resampler import FeedForward, frame_embeddings

KINDS = ("xattn", "mlp", "qformer")


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """How visual information reaches the LM.

    ``kind``: 'xattn' (Flamingo: the Perceiver Resampler and gated cross-attention blocks; the
    other fields are unused), 'mlp' (LLaVA-1.5's projector) or 'qformer' (BLIP-2's Q-Former).
    The Q-Former's shape: ``num_queries`` queries of ``width``, ``depth`` layers of
    ``num_heads`` x ``head_dim`` attention and a ``ffw_mult`` x feed-forward (BLIP-2: 32
    queries, BERT-base: 12 layers of 768, 12 heads; cross-attention every 2nd layer).
    ``max_frames``: time embeddings for up to this many video frames (interpolated beyond;
    0: none).
    """

    kind: str = "xattn"
    num_queries: int = 32
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    head_dim: int = 64
    ffw_mult: int = 4
    cross_attention_every: int = 2
    max_frames: int = 8
    activation: str = "gelu"
    norm_eps: float = 1e-6
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ConnectorConfig.kind must be one of {KINDS}, got {self.kind!r}")
        layers.activation(self.activation)
        if self.kind == "qformer" and min(self.num_queries, self.depth, self.cross_attention_every) < 1:
            raise ValueError(
                "ConnectorConfig: a Q-Former needs num_queries, depth and cross_attention_every >= 1, got "
                f"{self.num_queries}, {self.depth}, {self.cross_attention_every}"
            )
        if self.max_frames < 0:
            raise ValueError(f"ConnectorConfig.max_frames must be >= 0, got {self.max_frames}")

    @property
    def token_level(self) -> bool:
        return self.kind != "xattn"

    def tokens_per_medium(self, features_per_frame: int, num_frames: int = 1) -> int:
        """Visual tokens (LM input positions) one medium of ``num_frames`` frames gives."""
        if self.kind == "qformer":
            return self.num_queries
        if self.kind == "mlp":
            return num_frames * features_per_frame
        raise ValueError("ConnectorConfig.kind 'xattn' places no visual tokens in the LM's input")


class _FrameEmbeddings(nnx.Module):
    """Learned time embeddings added to each frame's features: float[B, N, F, V, D] ->
    float[B * N, F * V, D] (the frames of a medium in one sequence)."""

    def __init__(self, config: ConnectorConfig, input_dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.table = (
            nnx.Param(
                init(rngs.params(), (config.max_frames, input_dim), config.param_dtype),
                out_sharding=(None, "vision_embed"),
            )
            if config.max_frames
            else None
        )

    def __call__(self, features: jax.Array, dtype) -> jax.Array:
        batch, num_media, num_frames, num_features, _ = features.shape
        x = features.astype(dtype)
        if self.table is not None:
            x = x + frame_embeddings(self.table[...], num_frames).astype(dtype)[:, None, :]
        return x.reshape(batch * num_media, num_frames * num_features, -1)


class MlpProjector(nnx.Module):
    """LLaVA-1.5's projector: float[B, N, F, V, input_dim] -> float[B, N, F * V, lm_width]."""

    def __init__(self, config: ConnectorConfig, input_dim: int, lm_width: int, *, rngs: nnx.Rngs):
        self.config = config
        self.frames = _FrameEmbeddings(config, input_dim, rngs=rngs)
        dense = lambda i, o, names: layers.Dense(
            i, o, names, use_bias=True, param_dtype=config.param_dtype, dtype=config.dtype, rngs=rngs
        )
        self.fc1 = dense(input_dim, lm_width, ("vision_embed", "mlp"))
        self.fc2 = dense(lm_width, lm_width, ("mlp", "embed"))

    def __call__(self, features: jax.Array) -> jax.Array:
        batch, num_media = features.shape[:2]
        x = self.frames(features, jnp.dtype(self.config.dtype))
        out = self.fc2(layers.activation(self.config.activation)(self.fc1(x)))
        return out.reshape(batch, num_media, out.shape[1], out.shape[2])


class _Attention(nnx.Module):
    """Multi-head attention of ``queries`` float[B, Q, width] to ``inputs`` float[B, S, in_dim]
    (the queries themselves for self-attention), pre-normed: float[B, Q, width]."""

    def __init__(self, config: ConnectorConfig, input_dim: int, *, rngs: nnx.Rngs):
        self.config = config
        inner = config.num_heads * config.head_dim
        dense = lambda i, o, names: layers.Dense(
            i, o, names, use_bias=True, param_dtype=config.param_dtype, dtype=config.dtype, rngs=rngs
        )
        norm = lambda dim: layers.layer_norm(dim, eps=config.norm_eps, param_dtype=config.param_dtype, rngs=rngs)
        self.norm = norm(config.width)
        self.norm_inputs = norm(input_dim) if input_dim != config.width else None
        self.to_q = dense(config.width, inner, ("embed", "heads"))
        self.to_k = dense(input_dim, inner, ("vision_embed" if input_dim != config.width else "embed", "heads"))
        self.to_v = dense(input_dim, inner, ("vision_embed" if input_dim != config.width else "embed", "heads"))
        self.to_out = dense(inner, config.width, ("heads", "embed"))

    def __call__(self, queries: jax.Array, inputs: jax.Array | None) -> jax.Array:
        config = self.config
        normed = layers.apply_norm(self.norm, queries)
        if inputs is None:
            source = normed
        else:
            source = inputs if self.norm_inputs is None else layers.apply_norm(self.norm_inputs, inputs)
        heads = lambda t: t.reshape(t.shape[0], t.shape[1], config.num_heads, config.head_dim)
        out = layers.dot_product_attention(
            heads(self.to_q(normed)), heads(self.to_k(source)), heads(self.to_v(source)), None
        )
        return self.to_out(out.reshape(out.shape[0], out.shape[1], -1))


class QFormerLayer(nnx.Module):
    """Self-attention of the queries, cross-attention to the image features (when ``cross``),
    a feed-forward; each residual."""

    def __init__(self, config: ConnectorConfig, input_dim: int, *, cross: bool, rngs: nnx.Rngs):
        self.self_attention = _Attention(config, config.width, rngs=rngs)
        self.cross_attention = _Attention(config, input_dim, rngs=rngs) if cross else None
        self.ffw = FeedForward(
            config.width,
            config.ffw_mult,
            config.activation,
            norm_eps=config.norm_eps,
            param_dtype=config.param_dtype,
            dtype=config.dtype,
            rngs=rngs,
        )

    def __call__(self, queries: jax.Array, features: jax.Array) -> jax.Array:
        queries = queries + self.self_attention(queries, None)
        if self.cross_attention is not None:
            queries = queries + self.cross_attention(queries, features)
        return queries + self.ffw(queries)


class QFormer(nnx.Module):
    """BLIP-2's Q-Former: float[B, N, F, V, input_dim] -> float[B, N, num_queries, lm_width].

    Layer k cross-attends to the features when ``k % cross_attention_every == 0`` (BLIP-2's
    ``cross_attention_freq``: layers 0, 2, 4, ...)."""

    def __init__(self, config: ConnectorConfig, input_dim: int, lm_width: int, *, rngs: nnx.Rngs):
        self.config = config
        self.frames = _FrameEmbeddings(config, input_dim, rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.queries = nnx.Param(
            init(rngs.params(), (config.num_queries, config.width), config.param_dtype),
            out_sharding=("latents", "embed"),
        )
        self.layers = nnx.List(
            [
                QFormerLayer(config, input_dim, cross=index % config.cross_attention_every == 0, rngs=rngs)
                for index in range(config.depth)
            ]
        )
        self.norm = layers.layer_norm(config.width, eps=config.norm_eps, param_dtype=config.param_dtype, rngs=rngs)
        # BLIP-2's language projection: the query outputs into the LM's input embedding space.
        self.proj = layers.Dense(
            config.width,
            lm_width,
            ("heads", "embed"),
            use_bias=True,
            param_dtype=config.param_dtype,
            dtype=config.dtype,
            rngs=rngs,
        )

    def __call__(self, features: jax.Array) -> jax.Array:
        config = self.config
        batch, num_media = features.shape[:2]
        dtype = jnp.dtype(config.dtype)
        x = self.frames(features, dtype)
        queries = jnp.broadcast_to(self.queries[...].astype(dtype), (x.shape[0], config.num_queries, config.width))
        for layer in self.layers:
            queries = layer(queries, x)
        out = self.proj(layers.apply_norm(self.norm, queries))
        return out.reshape(batch, num_media, config.num_queries, out.shape[-1])


def build_connector(config: ConnectorConfig, input_dim: int, lm_width: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """The token-level connector module of ``config`` (a 'mlp' projector or a 'qformer')."""
    if config.kind == "mlp":
        return MlpProjector(config, input_dim, lm_width, rngs=rngs)
    if config.kind == "qformer":
        return QFormer(config, input_dim, lm_width, rngs=rngs)
    raise ValueError("build_connector: kind 'xattn' is Flamingo's resampler and xattn blocks, not a connector")
