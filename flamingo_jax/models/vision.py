"""The frozen vision encoders behind one constructor: any module mapping float[B, H, W, C] to
float[B, tokens, config.output_dim] fits, chosen by the type of its config."""

from __future__ import annotations

from flax import nnx

from flamingo_jax.models.efficientnet import EfficientNet, EfficientNetConfig
from flamingo_jax.models.nfnet import NFNet, NFNetConfig
from flamingo_jax.models.vit import ViT, ViTConfig

VisionConfig = ViTConfig | NFNetConfig | EfficientNetConfig
ENCODERS: dict[type, type[nnx.Module]] = {ViTConfig: ViT, NFNetConfig: NFNet, EfficientNetConfig: EfficientNet}


def build_vision_encoder(config: VisionConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    encoder = ENCODERS.get(type(config))
    if encoder is None:
        raise TypeError(
            f"unsupported vision config type {type(config).__name__}; known: {[c.__name__ for c in ENCODERS]}"
        )
    return encoder(config, rngs=rngs)
