"""Vision Transformer in the CLIP / open_clip layout (frozen vision encoder option 1).

Class token, learned position embeddings, pre-LN blocks, ``quick_gelu`` (OpenAI CLIP) or
``gelu`` (open_clip LAION models). Outputs patch tokens for the Perceiver Resampler.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models import layers


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """A CLIP-style ViT. ``output_tokens``: 'patches' (open_clip/OpenFlamingo) or 'all' (with CLS).

    ``post_norm_tokens``: apply the final LayerNorm to the returned tokens (open_clip >= 2.24
    does by default; open_clip before 2.24, whose tokens OpenFlamingo v2 trained on, and the
    Hugging Face ``CLIPVisionModel.last_hidden_state`` do not).
    """

    image_size: int = 224
    patch_size: int = 32
    channels: int = 3
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"
    norm_eps: float = 1e-5
    output_tokens: str = "patches"
    post_norm_tokens: bool = True
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig: image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.output_tokens not in ("patches", "all"):
            raise ValueError(f"ViTConfig.output_tokens must be 'patches' or 'all', got {self.output_tokens!r}")
        layers.activation(self.activation)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def output_dim(self) -> int:
        return self.width

    @property
    def num_output_tokens(self) -> int:
        return self.num_patches + (self.output_tokens == "all")


class EncoderBlock(nnx.Module):
    """Pre-LN bidirectional transformer block (the ViT's, and the contrastive text encoder's).

    ``config``: a ViTConfig or TextEncoderConfig (``width``, ``num_heads``, ``mlp_dim``,
    ``activation``, ``norm_eps``, ``param_dtype``, ``dtype``).
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        self.num_heads, self.activation = config.num_heads, config.activation
        width, param_dtype = config.width, config.param_dtype
        norm = lambda: layers.layer_norm(width, eps=config.norm_eps, param_dtype=param_dtype, rngs=rngs)
        dense = lambda i, o, names: layers.Dense(
            i, o, names, use_bias=True, param_dtype=param_dtype, dtype=config.dtype, rngs=rngs
        )
        self.norm1 = norm()
        self.q_proj = dense(width, width, ("embed", "heads"))
        self.k_proj = dense(width, width, ("embed", "heads"))
        self.v_proj = dense(width, width, ("embed", "heads"))
        self.out_proj = dense(width, width, ("heads", "embed"))
        self.norm2 = norm()
        self.fc1 = dense(width, config.mlp_dim, ("embed", "mlp"))
        self.fc2 = dense(config.mlp_dim, width, ("mlp", "embed"))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: float[B, T, W]; mask: optional bool[B, T, T] of allowed (query, key) pairs."""
        batch, length, width = x.shape
        h = layers.apply_norm(self.norm1, x)
        split = lambda t: t.reshape(batch, length, self.num_heads, width // self.num_heads)
        attended = layers.dot_product_attention(
            split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)), mask
        )
        x = x + self.out_proj(attended.reshape(batch, length, width))
        h = layers.apply_norm(self.norm2, x)
        return x + self.fc2(layers.activation(self.activation)(self.fc1(h)))


class ViT(nnx.Module):
    """float[B, H, W, C] normalised images -> float[B, num_output_tokens, width]."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.normal(0.02)
        patch = config.patch_size
        self.patch_embed = nnx.Param(
            init(rngs.params(), (patch, patch, config.channels, config.width), config.param_dtype),
            out_sharding=(None, None, None, "embed"),
        )
        self.class_embed = nnx.Param(init(rngs.params(), (config.width,), config.param_dtype), out_sharding=("embed",))
        self.position_embed = nnx.Param(
            init(rngs.params(), (config.num_patches + 1, config.width), config.param_dtype),
            out_sharding=(None, "embed"),
        )
        self.pre_norm = layers.layer_norm(config.width, eps=config.norm_eps, param_dtype=config.param_dtype, rngs=rngs)
        self.blocks = nnx.List([EncoderBlock(config, rngs=rngs) for _ in range(config.depth)])
        self.post_norm = layers.layer_norm(config.width, eps=config.norm_eps, param_dtype=config.param_dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        config = self.config
        if images.shape[1:] != (config.image_size, config.image_size, config.channels):
            raise ValueError(
                f"ViT expects images of shape [B, {config.image_size}, {config.image_size}, "
                f"{config.channels}], got {images.shape}"
            )
        dtype = jnp.dtype(config.dtype)
        patches = jax.lax.conv_general_dilated(
            images.astype(dtype),
            self.patch_embed[...].astype(dtype),
            window_strides=(config.patch_size, config.patch_size),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        batch = images.shape[0]
        tokens = patches.reshape(batch, -1, config.width)
        cls = jnp.broadcast_to(self.class_embed[...].astype(dtype), (batch, 1, config.width))
        x = jnp.concatenate([cls, tokens], axis=1) + self.position_embed[...].astype(dtype)
        x = layers.apply_norm(self.pre_norm, x)
        for block in self.blocks:
            x = block(x)
        if config.post_norm_tokens:
            x = layers.apply_norm(self.post_norm, x)
        return x[:, 1:] if config.output_tokens == "patches" else x
