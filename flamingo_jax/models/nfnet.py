"""Normalizer-Free ResNet (NFNet, Brock et al. 2021): the paper's convolutional vision encoder.

Flamingo (Section 2.1) uses a contrastively pretrained NFNet-F6 and feeds the Perceiver Resampler
the flattened final 2D feature map. Weight-standardised convolutions, scaled GELU, SE blocks and
zero-initialised skip gains follow the reference NFNet layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models import layers

# NFNet-F{0..6} stage depths (Brock et al. 2021, Table 1); widths are shared by all variants.
NFNET_DEPTHS = {f"F{i}": tuple(d * (i + 1) for d in (1, 2, 6, 3)) for i in range(7)}
_GELU_GAMMA = 1.7015043497085571  # keeps activations unit-variance at init (NFNet appendix)


@dataclasses.dataclass(frozen=True)
class NFNetConfig:
    variant: str = "F6"
    image_size: int = 320
    channels: int = 3
    widths: tuple[int, ...] = (256, 512, 1536, 1536)
    group_size: int = 128
    bottleneck_ratio: float = 0.5
    se_ratio: float = 0.5
    alpha: float = 0.2
    final_conv_mult: int = 2
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.variant not in NFNET_DEPTHS:
            raise ValueError(f"NFNetConfig.variant must be one of {sorted(NFNET_DEPTHS)}, got {self.variant!r}")
        if self.image_size % 32:
            raise ValueError(f"NFNetConfig.image_size={self.image_size} must be a multiple of 32")

    @property
    def depths(self) -> tuple[int, ...]:
        return NFNET_DEPTHS[self.variant]

    @property
    def output_dim(self) -> int:
        return self.widths[-1] * self.final_conv_mult

    @property
    def num_output_tokens(self) -> int:
        return (self.image_size // 32) ** 2


def _act(x):
    return jax.nn.gelu(x, approximate=False) * _GELU_GAMMA


class WSConv(nnx.Module):
    """Scaled weight-standardised convolution with a learnable per-channel gain and bias."""

    def __init__(self, in_ch, out_ch, kernel, stride=1, groups=1, *, config: NFNetConfig, rngs: nnx.Rngs):
        shape = (kernel, kernel, in_ch // groups, out_ch)
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
        self.weight = nnx.Param(
            init(rngs.params(), shape, config.param_dtype), out_sharding=(None, None, None, "conv_out")
        )
        self.gain = nnx.Param(jnp.ones((out_ch,), config.param_dtype), out_sharding=("conv_out",))
        self.bias = nnx.Param(jnp.zeros((out_ch,), config.param_dtype), out_sharding=("conv_out",))
        self.stride, self.groups, self.dtype = stride, groups, jnp.dtype(config.dtype)

    def __call__(self, x):
        weight = self.weight[...].astype(jnp.float32)
        fan_in = weight.shape[0] * weight.shape[1] * weight.shape[2]
        mean = weight.mean(axis=(0, 1, 2), keepdims=True)
        var = weight.var(axis=(0, 1, 2), keepdims=True)
        scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, 1e-4)) * self.gain[...].astype(jnp.float32)
        weight = (weight * scale - mean * scale).astype(self.dtype)
        out = layers.conv2d(x.astype(self.dtype), weight, self.stride, self.groups)
        return out + self.bias[...].astype(self.dtype)


class NFBlock(nnx.Module):
    def __init__(self, in_ch, out_ch, stride, beta, *, config: NFNetConfig, rngs: nnx.Rngs):
        mid = int(out_ch * config.bottleneck_ratio)
        groups = mid // config.group_size
        conv = lambda i, o, k, s=1, g=1: WSConv(i, o, k, s, g, config=config, rngs=rngs)
        self.beta, self.alpha, self.stride = beta, config.alpha, stride
        self.conv0 = conv(in_ch, mid, 1)
        self.conv1 = conv(mid, mid, 3, stride, groups)
        self.conv1b = conv(mid, mid, 3, 1, groups)
        self.conv2 = conv(mid, out_ch, 1)
        self.shortcut = conv(in_ch, out_ch, 1) if (stride > 1 or in_ch != out_ch) else None
        hidden = max(1, int(out_ch * config.se_ratio))
        dense = lambda i, o: layers.Dense(
            i, o, ("conv_out", None), use_bias=True, param_dtype=config.param_dtype, rngs=rngs
        )
        self.se_fc0 = dense(out_ch, hidden)
        self.se_fc1 = dense(hidden, out_ch)
        self.skip_gain = nnx.Param(jnp.zeros((), config.param_dtype), out_sharding=())

    def __call__(self, x):
        out = _act(x) * self.beta
        if self.stride > 1:
            pooled = nnx.avg_pool(out, (2, 2), strides=(2, 2), padding="SAME")
            shortcut = self.shortcut(pooled)
        elif self.shortcut is not None:
            shortcut = self.shortcut(out)
        else:
            shortcut = x
        out = self.conv0(out)
        out = self.conv1(_act(out))
        out = self.conv1b(_act(out))
        out = self.conv2(_act(out))
        squeeze = self.se_fc1(jax.nn.relu(self.se_fc0(out.mean(axis=(1, 2)))))
        out = out * (2.0 * jax.nn.sigmoid(squeeze))[:, None, None, :]
        return out * self.skip_gain[...].astype(out.dtype) * self.alpha + shortcut


class NFNet(nnx.Module):
    """float[B, H, W, C] -> float[B, (H/32)*(W/32), widths[-1] * final_conv_mult] spatial tokens."""

    def __init__(self, config: NFNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        conv = lambda i, o, k, s=1: WSConv(i, o, k, s, config=config, rngs=rngs)
        stem_out = config.widths[0] // 2
        self.stem = nnx.List(
            [conv(config.channels, 16, 3, 2), conv(16, 32, 3), conv(32, 64, 3), conv(64, stem_out, 3, 2)]
        )
        blocks, in_ch, expected_std = [], stem_out, 1.0
        for stage, (width, depth) in enumerate(zip(config.widths, config.depths, strict=True)):
            for index in range(depth):
                if index == 0:
                    expected_std = 1.0
                stride = 2 if (index == 0 and stage > 0) else 1
                blocks.append(NFBlock(in_ch, width, stride, 1.0 / expected_std, config=config, rngs=rngs))
                expected_std = (expected_std**2 + config.alpha**2) ** 0.5
                in_ch = width
        self.blocks = nnx.List(blocks)
        self.final_conv = conv(in_ch, config.output_dim, 1)

    def __call__(self, images: jax.Array) -> jax.Array:
        config = self.config
        if images.shape[1:] != (config.image_size, config.image_size, config.channels):
            raise ValueError(
                f"NFNet expects images of shape [B, {config.image_size}, {config.image_size}, "
                f"{config.channels}], got {images.shape}"
            )
        x = images
        for index, conv in enumerate(self.stem):
            x = conv(x) if index == 0 else conv(_act(x))
        for block in self.blocks:
            x = block(x)
        x = _act(self.final_conv(x))
        return x.reshape(x.shape[0], -1, x.shape[-1])
