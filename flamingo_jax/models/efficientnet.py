"""EfficientNet-Lite (Tan & Le 2019, the Lite variant for mobile: no squeeze-excitation, ReLU6,
fixed stem and head) as a frozen Flamingo vision encoder.

Batch norm runs in inference mode from stored statistics (the encoder is frozen). Convolutions use
TF 'SAME' padding, as the reference weights were trained with. The output is the head's 7x7 grid
(at 224 px) flattened into spatial tokens, as Flamingo flattens NFNet's final feature map, or
with ``output_stage`` the feature map of an earlier stage (the 1x1 head expands the last stage to
1280 channels for the ImageNet classifier; earlier, more general features can serve a new domain
better). Weights in the ``efficientnet_pytorch`` layout: ``flamingo_jax.importers.efficientnet``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models import layers

# (repeats, kernel, stride, expand ratio, in, out) of the seven stages (EfficientNet-B0 layout).
LITE_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Lite models take pixels scaled to [-1, 1]: (x - 127) / 128 on 0..255.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def stage_count(output_stage: int | None) -> int:
    """How many stages of LITE_BLOCKS run for ``output_stage`` (None: all, then the head)."""
    return len(LITE_BLOCKS) if output_stage is None else output_stage + 1


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    variant: str = "lite0"
    image_size: int = 224
    channels: int = 3
    head_width: int = 1280
    num_classes: int = 1000  # the ImageNet classifier, kept for checking imported weights
    bn_eps: float = 1e-3
    pixel_mean: tuple[float, float, float] = LITE_MEAN
    pixel_std: tuple[float, float, float] = LITE_STD
    param_dtype: str = "float32"
    dtype: str = "float32"
    # None: the head's feature map (head_width channels, stride 32); k: the output of stage k of
    # LITE_BLOCKS (its channels, at its stride), the later stages and the head left out.
    output_stage: int | None = None

    def __post_init__(self):
        if self.variant != "lite0":
            raise ValueError(f"EfficientNetConfig.variant: only 'lite0' is implemented, got {self.variant!r}")
        if self.image_size % 32:
            raise ValueError(f"EfficientNetConfig.image_size={self.image_size} must be a multiple of 32")
        if self.output_stage is not None and not 0 <= self.output_stage < len(LITE_BLOCKS):
            last = len(LITE_BLOCKS) - 1
            raise ValueError(f"EfficientNetConfig.output_stage={self.output_stage}: None (the head) or 0..{last}")

    @property
    def stages(self) -> int:
        """How many stages of LITE_BLOCKS the features pass through."""
        return stage_count(self.output_stage)

    @property
    def output_dim(self) -> int:
        return self.head_width if self.output_stage is None else LITE_BLOCKS[self.output_stage][-1]

    @property
    def num_output_tokens(self) -> int:
        stride = 2 * math.prod(stage[2] for stage in LITE_BLOCKS[: self.stages])  # the stem's 2, then each stage's
        return (-(-self.image_size // stride)) ** 2


class ConvBN(nnx.Module):
    """Convolution without bias, then inference-mode batch norm (and ReLU6 when ``act``)."""

    def __init__(self, in_ch, out_ch, kernel, stride=1, groups=1, *, act=True, config: EfficientNetConfig, rngs):
        init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
        dtype = config.param_dtype
        self.kernel = nnx.Param(
            init(rngs.params(), (kernel, kernel, in_ch // groups, out_ch), dtype),
            out_sharding=(None, None, None, "conv_out"),
        )
        self.scale = nnx.Param(jnp.ones((out_ch,), dtype), out_sharding=("conv_out",))
        self.bias = nnx.Param(jnp.zeros((out_ch,), dtype), out_sharding=("conv_out",))
        self.mean = nnx.Param(jnp.zeros((out_ch,), dtype), out_sharding=("conv_out",))
        self.var = nnx.Param(jnp.ones((out_ch,), dtype), out_sharding=("conv_out",))
        self.stride, self.groups, self.act = stride, groups, act
        self.eps, self.dtype = config.bn_eps, jnp.dtype(config.dtype)

    def __call__(self, x):
        out = layers.conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, self.groups)
        inv = self.scale[...].astype(jnp.float32) * jax.lax.rsqrt(self.var[...].astype(jnp.float32) + self.eps)
        shift = self.bias[...].astype(jnp.float32) - self.mean[...].astype(jnp.float32) * inv
        out = (out.astype(jnp.float32) * inv + shift).astype(self.dtype)
        return jnp.clip(out, 0.0, 6.0) if self.act else out


class MBConv(nnx.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project (no activation), skip when the
    shape is kept."""

    def __init__(self, in_ch, out_ch, kernel, stride, expand, *, config, rngs):
        mid = in_ch * expand
        self.expand = ConvBN(in_ch, mid, 1, config=config, rngs=rngs) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid, config=config, rngs=rngs)
        self.project = ConvBN(mid, out_ch, 1, act=False, config=config, rngs=rngs)
        self.skip = stride == 1 and in_ch == out_ch

    def __call__(self, x):
        out = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(out))
        return out + x if self.skip else out


class EfficientNet(nnx.Module):
    """float[B, H, W, C] -> float[B, (H/32) * (W/32), head_width] spatial tokens."""

    def __init__(self, config: EfficientNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.stem = ConvBN(config.channels, 32, 3, 2, config=config, rngs=rngs)
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in LITE_BLOCKS:
            for index in range(repeats):
                blocks.append(
                    MBConv(in_ch if index == 0 else out_ch, out_ch, kernel, stride if index == 0 else 1, expand,
                           config=config, rngs=rngs)
                )  # fmt: skip
        self.blocks = nnx.List(blocks)
        self.head = ConvBN(LITE_BLOCKS[-1][-1], config.head_width, 1, config=config, rngs=rngs)
        init = nnx.initializers.lecun_normal()
        self.classifier_kernel = nnx.Param(
            init(rngs.params(), (config.head_width, config.num_classes), config.param_dtype), out_sharding=(None, None)
        )
        self.classifier_bias = nnx.Param(jnp.zeros((config.num_classes,), config.param_dtype), out_sharding=(None,))

    def feature_map(self, images, *, output_stage: int | None = None):
        """The head's feature map, or with ``output_stage`` the output of that stage."""
        x = self.stem(images)
        for block in self.blocks[: sum(stage[0] for stage in LITE_BLOCKS[: stage_count(output_stage)])]:
            x = block(x)
        return self.head(x) if output_stage is None else x

    def __call__(self, images):
        """The spatial tokens of ``config.output_stage``'s feature map."""
        features = self.feature_map(images, output_stage=self.config.output_stage)
        batch, height, width, channels = features.shape
        return features.reshape(batch, height * width, channels)

    def classify(self, images):
        """ImageNet logits (global average pool, then the classifier)."""
        pooled = self.feature_map(images).astype(jnp.float32).mean(axis=(1, 2))
        return pooled @ self.classifier_kernel[...].astype(jnp.float32) + self.classifier_bias[...].astype(jnp.float32)
