"""The Flamingo model: frozen vision encoder -> Perceiver Resampler -> frozen LM with GATED
XATTN-DENSE blocks inserted, plus trainable embedding rows for ``<image>`` and ``<|endofchunk|>``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.batch import Batch
from flamingo_jax.models.efficientnet import EfficientNet, EfficientNetConfig
from flamingo_jax.models.llama import KVCache, LlamaConfig, LlamaLM
from flamingo_jax.models.nfnet import NFNet, NFNetConfig
from flamingo_jax.models.resampler import PerceiverResampler, ResamplerConfig
from flamingo_jax.models.vit import ViT, ViTConfig
from flamingo_jax.models.xattn import GatedCrossAttentionBlock, XAttnConfig, media_attention_mask

VisionConfig = ViTConfig | NFNetConfig | EfficientNetConfig

# Top-level module names that hold trainable parameters; everything else is frozen.
TRAINABLE_GROUPS = ("resampler", "xattn_layers", "new_tokens")
NEW_TOKENS = ("<image>", "<|endofchunk|>")


@dataclasses.dataclass(frozen=True)
class FlamingoConfig:
    """A whole Flamingo model. Token ids ``lm.vocab_size`` and ``lm.vocab_size + 1`` are
    ``<image>`` and ``<|endofchunk|>``; logits cover ``lm.vocab_size + 2`` entries.

    ``trainable`` lists the top-level groups that train (default: resampler, xattn blocks and the
    new-token rows, as in the paper); adding 'lm' or 'vision' unfreezes those for ablations.
    ``trainable_param_dtype`` is the storage dtype of the trainable groups (fp32 by default).
    """

    lm: LlamaConfig = LlamaConfig()
    vision: VisionConfig = ViTConfig()
    resampler: ResamplerConfig = ResamplerConfig()
    xattn: XAttnConfig = XAttnConfig()
    trainable: tuple[str, ...] = TRAINABLE_GROUPS
    trainable_param_dtype: str = "float32"

    def __post_init__(self):
        unknown = set(self.trainable) - set(TRAINABLE_GROUPS) - {"lm", "vision"}
        if unknown:
            raise ValueError(
                f"FlamingoConfig.trainable has unknown groups {sorted(unknown)}; "
                f"choose from {list(TRAINABLE_GROUPS) + ['lm', 'vision']}"
            )

    @property
    def base_vocab_size(self) -> int:
        return self.lm.vocab_size

    @property
    def media_token_id(self) -> int:
        return self.lm.vocab_size

    @property
    def endofchunk_token_id(self) -> int:
        return self.lm.vocab_size + 1

    @property
    def total_vocab_size(self) -> int:
        return self.lm.vocab_size + len(NEW_TOKENS)

    @property
    def xattn_layer_indices(self) -> tuple[int, ...]:
        return self.xattn.layer_indices(self.lm.num_layers)


def build_vision_encoder(config: VisionConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Any module mapping float[B, H, W, C] to float[B, tokens, config.output_dim] fits here."""
    if isinstance(config, ViTConfig):
        return ViT(config, rngs=rngs)
    if isinstance(config, NFNetConfig):
        return NFNet(config, rngs=rngs)
    if isinstance(config, EfficientNetConfig):
        return EfficientNet(config, rngs=rngs)
    raise TypeError(f"unsupported vision config type {type(config).__name__}")


class NewTokens(nnx.Module):
    """Trainable input embeddings and output logits rows for the tokens added to the LM vocab."""

    def __init__(self, width: int, *, tied: bool, param_dtype: str, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(init(rngs.params(), (len(NEW_TOKENS), width), param_dtype), out_sharding=(None, "embed"))
        self.head = (
            None
            if tied
            else nnx.Param(init(rngs.params(), (width, len(NEW_TOKENS)), param_dtype), out_sharding=("embed", None))
        )

    def logits(self, hidden: jax.Array) -> jax.Array:
        kernel = self.embed[...].T if self.head is None else self.head[...]
        return jnp.einsum("btw,wn->btn", hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)


class Flamingo(nnx.Module):
    def __init__(self, config: FlamingoConfig, *, rngs: nnx.Rngs):
        self.config = config
        trainable_dtype = config.trainable_param_dtype
        self.vision = build_vision_encoder(config.vision, rngs=rngs)
        self.resampler = PerceiverResampler(
            dataclasses.replace(config.resampler, input_dim=config.vision.output_dim, param_dtype=trainable_dtype),
            rngs=rngs,
        )
        self.lm = LlamaLM(config.lm, rngs=rngs)
        self.xattn_layers = nnx.List(
            [
                GatedCrossAttentionBlock(
                    config.xattn,
                    config.lm.width,
                    config.resampler.width,
                    param_dtype=trainable_dtype,
                    dtype=config.lm.dtype,
                    rngs=rngs,
                )
                for _ in config.xattn_layer_indices
            ]
        )
        self.new_tokens = NewTokens(
            config.lm.width, tied=config.lm.tie_embeddings, param_dtype=trainable_dtype, rngs=rngs
        )

    def encode_media(self, images: jax.Array) -> jax.Array:
        """float[B, N, F, H, W, C] -> visual tokens float[B, N, num_latents, resampler.width].

        The vision encoder is frozen: no gradient flows into it (and XLA does no work for one).
        """
        batch, num_media, num_frames = images.shape[:3]
        flat = images.reshape(batch * num_media * num_frames, *images.shape[3:])
        features = self.vision(flat)
        if "vision" not in self.config.trainable:
            features = jax.lax.stop_gradient(features)
        features = features.reshape(batch, num_media, num_frames, *features.shape[1:])
        return self.resampler(features)

    def media_kv(self, visual: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """Per xattn block (keys, values) of the visual tokens; cached once per prompt in decoding."""
        return tuple(block.media_kv(visual) for block in self.xattn_layers)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """int32[B, T] with new-token ids >= lm.vocab_size -> float[B, T, W]."""
        vocab = self.config.lm.vocab_size
        base = self.lm.embed_tokens(jnp.clip(tokens, 0, vocab - 1))
        new_rows = jnp.take(self.new_tokens.embed[...], jnp.clip(tokens - vocab, 0, len(NEW_TOKENS) - 1), axis=0)
        return jnp.where((tokens >= vocab)[..., None], new_rows.astype(base.dtype), base)

    def __call__(
        self,
        tokens: jax.Array,
        image_index: jax.Array,
        image_mask: jax.Array,
        images: jax.Array | None = None,
        *,
        media_kv: tuple[tuple[jax.Array, jax.Array], ...] | None = None,
        input_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        unique_rows: int = 0,
        last_only: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Next-token logits conditioned on media.

        Args:
          tokens: int32[B, T].
          image_index: int32[B, T], media slot each token attends to (-1: none).
          image_mask: bool[B, N], real media slots; padded slots have no effect on any logit.
          images: float[B, N, F, H, W, C], or None when ``media_kv`` (from :meth:`media_kv`) is given.
          input_mask, positions, cache: as in :meth:`LlamaLM.backbone`.
          unique_rows: > 0 runs the LM layers below the first cross-attention block once per
            distinct token row (at most this many; every row when a batch has more), since they
            see no image: exact, and much cheaper for templated text such as captioned pairs.
          last_only: the logits of the last position only (``T`` = 1 in the result): what a
            prompt's prefill needs, without the vocabulary projection of every prompt token.

        Returns:
          (float32[B, T, lm.vocab_size + 2] logits, updated KV cache or None).
        """
        if media_kv is None:
            if images is None:
                raise ValueError("Flamingo needs either images or precomputed media_kv")
            media_kv = self.media_kv(self.encode_media(images))
        mask = media_attention_mask(
            image_index, image_mask, self.config.resampler.num_latents, self.config.xattn.attend
        )
        blocks = {layer: position for position, layer in enumerate(self.config.xattn_layer_indices)}

        def before_layer(index, hidden):
            if index not in blocks:
                return hidden
            position = blocks[index]
            return self.xattn_layers[position](hidden, media_kv[position], mask)

        hidden, layer_range = self.embed_tokens(tokens), None
        if unique_rows:
            if cache is not None or input_mask is not None or positions is not None:
                raise ValueError("Flamingo: unique_rows is for training passes (no cache, mask or positions)")
            if not blocks:
                raise ValueError("Flamingo: unique_rows needs at least one cross-attention block")
            first = min(blocks)
            hidden = self._below_first_block(tokens, first, unique_rows)
            layer_range = (first, self.config.lm.num_layers)
        hidden, cache = self.lm.backbone(
            hidden,
            input_mask=input_mask,
            positions=positions,
            cache=cache,
            before_layer=before_layer,
            layer_range=layer_range,
        )
        if last_only:
            hidden = hidden[:, -1:]
        logits = jnp.concatenate([self.lm.logits(hidden), self.new_tokens.logits(hidden)], axis=-1)
        return logits, cache

    def _below_first_block(self, tokens: jax.Array, stop: int, max_rows: int) -> jax.Array:
        """float[B, T, W]: the LM's hidden states entering layer ``stop``, computed once per
        distinct row of ``tokens`` when there are at most ``max_rows`` of them."""
        lower = lambda rows: self.lm.backbone(self.embed_tokens(rows), layer_range=(0, stop))[0]
        if max_rows >= tokens.shape[0]:
            return lower(tokens)
        rows, inverse = jnp.unique(tokens, axis=0, size=max_rows, fill_value=0, return_inverse=True)
        inverse = inverse.reshape(-1)  # (B,) or (B, 1) depending on the numpy API level
        return jax.lax.cond(
            jnp.max(inverse) < max_rows,
            lambda: jnp.take(lower(rows), inverse, axis=0),
            lambda: lower(tokens),
        )

    def train_loss(self, batch: Batch, *, unique_rows: int = 0) -> tuple[jax.Array, jax.Array]:
        """(next-token loss over the targets ``loss_mask`` selects, number of targets)."""
        logits, _ = self(batch.tokens, batch.image_index, batch.image_mask, batch.images, unique_rows=unique_rows)
        return token_loss(logits, batch)


def token_loss(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over the targets ``loss_mask`` selects.

    Returns (loss, number of counted targets). A batch with no counted target gives loss 0, not
    NaN (its gradient is zero too).
    """
    weights = batch.loss_mask[:, :-1].astype(jnp.float32)
    targets = batch.tokens[:, 1:]
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    count = weights.sum()
    return (nll * weights).sum() / jnp.maximum(count, 1.0), count


def trainable_filter(config: FlamingoConfig):
    """An nnx filter selecting the trainable parameters (the optimizer holds state for these only)."""
    return nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(group) for group in config.trainable)))


def create_flamingo(config: FlamingoConfig, seed: int = 0) -> Flamingo:
    """Builds a model with logical-axis metadata recorded but not applied (sharding is applied by
    ``flamingo_jax.sharding`` under a mesh)."""
    with nnx.use_eager_sharding(False):
        return Flamingo(config, rngs=CountingRngs(seed))


class CountingRngs:
    """A stand-in for ``nnx.Rngs`` whose draws are ``fold_in(key(seed), n)`` for n = 0, 1, ...

    The draw counter is a Python int, not nnx state: with ``nnx.Rngs`` every traced counter
    update makes flax probe ``tracer.sharding``, whose error message walks the whole jaxpr, so
    tracing an init is quadratic in the number of parameters (~1 min for 80B, ~10 s even for the
    tiny test model). Deterministic: the same seed gives the same parameters on any mesh.
    """

    def __init__(self, seed: int):
        self._key = jax.random.key(seed)
        self._draws = 0

    def __call__(self):
        self._draws += 1
        return jax.random.fold_in(self._key, self._draws)

    def __getattr__(self, stream: str):
        if stream.startswith("_"):
            raise AttributeError(stream)
        return self.__call__


def model_class(config) -> type[nnx.Module]:
    """The module a model config builds: Flamingo, or the stage-1 contrastive two-tower model."""
    from flamingo_jax.models.contrastive import ContrastiveConfig, ContrastiveModel

    return ContrastiveModel if isinstance(config, ContrastiveConfig) else Flamingo


def abstract_model(config) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves: shapes and counts without allocating anything."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: model_class(config)(config, rngs=CountingRngs(0)))


def count_params(model: nnx.Module, flt=nnx.Param) -> int:
    """Number of parameters (works on abstract models)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, flt)))
