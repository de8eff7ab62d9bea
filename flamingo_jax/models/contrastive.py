"""Stage 1: the contrastive two-tower model that pretrains Flamingo's vision encoder (Alayrac et
al. 2022, Section 3 and Appendix B.1.3): a vision encoder (any of the Flamingo vision options) and
a BERT-style bidirectional text encoder, mean-pooled, projected to a shared space and compared
with a learned temperature under the symmetric (two-term) InfoNCE loss.

The loss is written on the *global* batch: inside ``jit`` with a batch-sharded input, the
similarity matrix ``image_embeddings @ text_embeddings.T`` makes XLA gather the other devices'
embeddings, so every example's negatives are all the other examples of the step on every device
(tested against the same batch on one device). The vision tower lives under the same path
(``vision/...``) as in :class:`~flamingo_jax.models.flamingo.Flamingo`, so its weights drop into
a Flamingo model through ``RunConfig.init_from`` (see ``flamingo_jax.tools.export_vision``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.batch import Batch
from flamingo_jax.models import layers
from flamingo_jax.models.efficientnet import EfficientNetConfig
from flamingo_jax.models.nfnet import NFNetConfig
from flamingo_jax.models.vision import build_vision_encoder
from flamingo_jax.models.vit import EncoderBlock, ViTConfig

CONTRASTIVE_GROUPS = ("vision", "text", "image_projection", "text_projection", "log_scale")


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """BERT-style encoder: token + learned position embeddings, pre-LN bidirectional blocks,
    final LayerNorm, mean pooling over the caption's tokens."""

    vocab_size: int = 32000
    max_length: int = 64
    width: int = 512
    depth: int = 6
    num_heads: int = 8
    mlp_dim: int = 2048
    activation: str = "gelu"
    norm_eps: float = 1e-5
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"TextEncoderConfig: width={self.width} is not divisible by num_heads={self.num_heads}")
        layers.activation(self.activation)


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    """The two towers and the shared embedding space.

    ``init_temperature``: the softmax temperature at initialisation (0.07 as in CLIP / ALIGN); its
    inverse is learned in log space and capped at ``max_scale``. ``trainable`` lists the groups
    that train (all of them by default).
    """

    vision: ViTConfig | NFNetConfig | EfficientNetConfig = ViTConfig()
    text: TextEncoderConfig = TextEncoderConfig()
    embed_dim: int = 512
    init_temperature: float = 0.07
    max_scale: float = 100.0
    trainable: tuple[str, ...] = CONTRASTIVE_GROUPS

    def __post_init__(self):
        unknown = set(self.trainable) - set(CONTRASTIVE_GROUPS)
        if unknown:
            raise ValueError(
                f"ContrastiveConfig.trainable has unknown groups {sorted(unknown)}; choose from {CONTRASTIVE_GROUPS}"
            )
        if not 0 < self.init_temperature < 1:
            raise ValueError(f"ContrastiveConfig.init_temperature must be in (0, 1), got {self.init_temperature}")

    # The batch contract's special tokens, as for a Flamingo model with this text vocabulary.
    @property
    def base_vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def media_token_id(self) -> int:
        return self.text.vocab_size

    @property
    def endofchunk_token_id(self) -> int:
        return self.text.vocab_size + 1


class TextEncoder(nnx.Module):
    """int32[B, T] tokens, bool[B, T] mask -> float[B, width] mean-pooled features."""

    def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.normal(0.02)
        self.token_embed = nnx.Param(
            init(rngs.params(), (config.vocab_size, config.width), config.param_dtype), out_sharding=("vocab", "embed")
        )
        self.position_embed = nnx.Param(
            init(rngs.params(), (config.max_length, config.width), config.param_dtype), out_sharding=(None, "embed")
        )
        self.blocks = nnx.List([EncoderBlock(config, rngs=rngs) for _ in range(config.depth)])
        self.final_norm = layers.layer_norm(
            config.width, eps=config.norm_eps, param_dtype=config.param_dtype, rngs=rngs
        )

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        config = self.config
        length = tokens.shape[1]
        if length > config.max_length:
            raise ValueError(f"TextEncoder: {length} tokens exceed TextEncoderConfig.max_length={config.max_length}")
        dtype = jnp.dtype(config.dtype)
        ids = jnp.clip(tokens, 0, config.vocab_size - 1)
        x = jnp.take(self.token_embed[...], ids, axis=0).astype(dtype)
        x = x + self.position_embed[...][:length].astype(dtype)
        attend = mask[:, None, :] & mask[:, :, None]
        for block in self.blocks:
            x = block(x, attend)
        x = layers.apply_norm(self.final_norm, x).astype(jnp.float32)
        weights = mask.astype(jnp.float32)[..., None]
        return (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)


def caption_tokens(batch: Batch, config: ContrastiveConfig) -> tuple[jax.Array, jax.Array]:
    """The caption of each pair in the batch contract: (int32[B, T] tokens, bool[B, T] mask).

    A pair reads ``<image> caption <|endofchunk|> pad...`` and ``loss_mask[t]`` marks the caption
    tokens at ``t + 1``; the special tokens (ids >= vocab_size) are left out.
    """
    counted = jnp.pad(batch.loss_mask[:, :-1] > 0, ((0, 0), (1, 0)))
    return batch.tokens, counted & (batch.tokens < config.text.vocab_size)


class ContrastiveModel(nnx.Module):
    def __init__(self, config: ContrastiveConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision = build_vision_encoder(config.vision, rngs=rngs)
        self.text = TextEncoder(config.text, rngs=rngs)
        dense = lambda i, o: layers.Dense(i, o, ("embed", None), param_dtype="float32", rngs=rngs)
        self.image_projection = dense(config.vision.output_dim, config.embed_dim)
        self.text_projection = dense(config.text.width, config.embed_dim)
        self.log_scale = nnx.Param(jnp.asarray(math.log(1.0 / config.init_temperature), jnp.float32), out_sharding=())

    def embed_images(self, images: jax.Array) -> jax.Array:
        """float[B, H, W, C] -> unit-norm float32[B, embed_dim] (vision tokens mean-pooled)."""
        features = self.vision(images).astype(jnp.float32).mean(axis=1)
        return _normalize(self.image_projection(features))

    def embed_texts(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """int32[B, T], bool[B, T] -> unit-norm float32[B, embed_dim]."""
        return _normalize(self.text_projection(self.text(tokens, mask)))

    def scale(self) -> jax.Array:
        return jnp.minimum(jnp.exp(self.log_scale[...]), self.config.max_scale)

    def train_loss(
        self, batch: Batch, *, unique_rows: int = 0, target_capacity: int = 0
    ) -> tuple[jax.Array, jax.Array]:
        """Symmetric InfoNCE over the global batch of pairs: (loss, number of pairs counted).

        Pairs without an image or without caption tokens take part neither as positives nor as
        negatives; a batch with none gives loss 0 (not NaN). ``unique_rows`` and ``target_capacity``
        (savings of a language model's layers and head) do not apply: the text tower trains.
        """
        for name, value in (("unique_rows", unique_rows), ("target_capacity", target_capacity)):
            if value:
                raise ValueError(f"DatasetConfig.{name} applies to Flamingo models, not the contrastive model")
        tokens, mask = caption_tokens(batch, self.config)
        valid = batch.image_mask[:, 0] & mask.any(axis=1)
        images = self.embed_images(batch.images[:, 0, 0])
        texts = self.embed_texts(tokens, mask)
        return contrastive_loss(images, texts, self.scale(), valid)


def _normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def contrastive_loss(images: jax.Array, texts: jax.Array, scale: jax.Array, valid: jax.Array):
    """Mean of the image->text and text->image cross-entropies of the [B, B] similarity matrix
    (positives on the diagonal). images, texts: float32[B, D] unit vectors; valid: bool[B]."""
    logits = scale * images @ texts.T
    pair_ok = valid[:, None] & valid[None, :]
    logits = jnp.where(pair_ok, logits, -1e9)
    diagonal = jnp.diagonal(logits)
    image_to_text = jax.nn.logsumexp(logits, axis=1) - diagonal
    text_to_image = jax.nn.logsumexp(logits, axis=0) - diagonal
    weights = valid.astype(jnp.float32)
    count = weights.sum()
    loss = 0.5 * ((image_to_text + text_to_image) * weights).sum() / jnp.maximum(count, 1.0)
    return loss, count
