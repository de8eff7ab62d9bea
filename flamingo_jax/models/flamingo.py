"""The Flamingo model: frozen vision encoder -> Perceiver Resampler -> frozen LM with GATED
XATTN-DENSE blocks inserted, plus trainable embedding rows for ``<image>`` and ``<|endofchunk|>``.

``FlamingoConfig.connector`` with a token-level kind ('mlp', 'qformer') describes the other design
(visual tokens in the LM's input): :class:`flamingo_jax.models.token_fusion.TokenFusion`, which
``flamingo_jax.models.kinds.build`` makes for such a config.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.batch import NEW_TOKENS, Batch
from flamingo_jax.models import scan
from flamingo_jax.models.connector import ConnectorConfig
from flamingo_jax.models.layers import CountingRngs
from flamingo_jax.models.llama import Inserts, KVCache, LlamaConfig, LlamaLM
from flamingo_jax.models.resampler import PerceiverResampler, ResamplerConfig
from flamingo_jax.models.vision import VisionConfig, build_vision_encoder
from flamingo_jax.models.vit import ViTConfig
from flamingo_jax.models.xattn import GatedCrossAttentionBlock, XAttnConfig, media_attention_mask

# Top-level module names that hold trainable parameters; everything else is frozen.
TRAINABLE_GROUPS = ("resampler", "xattn_layers", "connector", "new_tokens")


@dataclasses.dataclass(frozen=True)
class FlamingoConfig:
    """A whole Flamingo model. Token ids ``lm.vocab_size`` and ``lm.vocab_size + 1`` are
    ``<image>`` and ``<|endofchunk|>``; logits cover ``lm.vocab_size + 2`` entries.

    ``trainable`` lists the top-level groups that train (default: resampler, xattn blocks and the
    new-token rows, as in the paper); adding 'lm' or 'vision' unfreezes those for ablations (the
    paper's "frozen LM" row), 'lora' trains the LM's LoRA adapters (``lm.lora_rank`` > 0) alone.
    ``trainable_param_dtype`` is the storage dtype of the trainable groups (fp32 by default).
    ``new_tokens``: the texts of those two tokens in prompts and documents (IDEFICS's second is
    ``<fake_token_around_image>``, placed around each image).
    ``connector``: 'xattn' (Flamingo's resampler and xattn blocks) or a token-level connector
    (LLaVA's 'mlp', BLIP-2's 'qformer'), which replaces both: ``resampler`` and ``xattn`` are
    then unused and the model has no xattn blocks.
    """

    lm: LlamaConfig = LlamaConfig()
    vision: VisionConfig = ViTConfig()
    resampler: ResamplerConfig = ResamplerConfig()
    xattn: XAttnConfig = XAttnConfig()
    trainable: tuple[str, ...] = TRAINABLE_GROUPS
    trainable_param_dtype: str = "float32"
    new_tokens: tuple[str, str] = NEW_TOKENS
    connector: ConnectorConfig = ConnectorConfig()

    def __post_init__(self):
        if len(self.new_tokens) != len(NEW_TOKENS) or len(set(self.new_tokens)) != len(NEW_TOKENS):
            raise ValueError(f"FlamingoConfig.new_tokens must be two distinct strings, got {self.new_tokens!r}")
        unknown = set(self.trainable) - set(TRAINABLE_GROUPS) - {"lm", "vision", "lora"}
        if unknown:
            raise ValueError(
                f"FlamingoConfig.trainable has unknown groups {sorted(unknown)}; "
                f"choose from {list(TRAINABLE_GROUPS) + ['lm', 'vision', 'lora']}"
            )
        if ("lora" in self.trainable) != (self.lm.lora_rank > 0):
            raise ValueError(
                "FlamingoConfig.trainable names 'lora' exactly when LlamaConfig.lora_rank > 0 (the LM's "
                f"adapters): trainable={self.trainable}, lora_rank={self.lm.lora_rank}"
            )
        if self.connector.token_level and "connector" not in self.trainable:
            raise ValueError(
                f"FlamingoConfig.trainable={self.trainable} lacks 'connector': the "
                f"{self.connector.kind!r} connector would never train"
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
        """The LM layers with an xattn block before them (none with a token-level connector)."""
        if self.connector.token_level:
            return ()
        return self.xattn.layer_indices(self.lm.num_layers)


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
        if config.connector.token_level:
            raise ValueError(
                f"Flamingo: connector {config.connector.kind!r} is token-level; build the model with "
                "flamingo_jax.models.kinds.build (a TokenFusion)"
            )
        self.config = config
        trainable_dtype = config.trainable_param_dtype
        self.vision = build_vision_encoder(config.vision, rngs=rngs)
        self.resampler = PerceiverResampler(
            dataclasses.replace(config.resampler, input_dim=config.vision.output_dim, param_dtype=trainable_dtype),
            rngs=rngs,
        )
        self.lm = LlamaLM(config.lm, rngs=rngs)
        blocks = [
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
        # With scan_layers the blocks are stacked like the LM's layers and scanned with them.
        self.xattn_layers = scan.stack(blocks) if config.lm.scan_layers else nnx.List(blocks)
        self.new_tokens = NewTokens(
            config.lm.width, tied=config.lm.tie_embeddings, param_dtype=trainable_dtype, rngs=rngs
        )

    def encode_media(self, images: jax.Array) -> jax.Array:
        """float[B, N, F, H, W, C] -> visual tokens float[B, N, tokens, resampler.width] (tokens:
        ``resampler.tokens_per_medium``)."""
        features = self.vision_features(images)
        with jax.named_scope("resampler"):
            return self.resampler(features)

    def cache_slots(self, length: int, media_kv) -> int:
        """KV-cache positions a sequence of ``length`` tokens takes (its images take none here)."""
        del media_kv
        return length

    def vision_features(self, images: jax.Array) -> jax.Array:
        """float[B, N, F, H, W, C] -> the vision encoder's features float[B, N, F, V, D].

        The vision encoder is frozen: no gradient flows into it (and XLA does no work for one).
        """
        batch, num_media, num_frames = images.shape[:3]
        # Every chip encodes its own images, the tensor axis included: each batch shard's images
        # (its rows' media and frames) are split over the tensor axis ('media_split'), padded with
        # blank images to a multiple of it (80B, 16-way tensor: 40 M3W images per shard -> 48),
        # rather than encoded on every chip of the tensor group. Images of the whole batch stay
        # with their shard, so the visual tokens need a gather within the tensor group only.
        groups = sharding.shards_of("act_batch")
        groups = groups if batch % groups == 0 else 1
        per_group = batch // groups * num_media * num_frames
        split = sharding.shards_of("media_split")
        padded = -(-per_group // split) * split
        pixels = images.shape[3:]
        grouped = images.reshape(groups, per_group, *pixels)
        if padded != per_group:
            grouped = jnp.pad(grouped, ((0, 0), (0, padded - per_group)) + ((0, 0),) * len(pixels))
        grouped = sharding.constrain(grouped, ("act_batch", "media_split") + (None,) * len(pixels))
        flat = sharding.constrain(grouped.reshape(groups * padded, *pixels), ("media_batch",) + (None,) * len(pixels))
        with jax.named_scope("vision"):
            features = self.vision(flat)
        if "vision" not in self.config.trainable:
            features = jax.lax.stop_gradient(features)
        rest = features.shape[1:]
        features = features.reshape(groups, padded, *rest)
        features = sharding.constrain(features, ("act_batch", "media_split") + (None,) * len(rest))[:, :per_group]
        features = sharding.constrain(features, ("act_batch",) + (None,) * (len(rest) + 1))
        return features.reshape(batch, num_media, num_frames, *rest)

    def media_kv(self, visual: jax.Array):
        """Per xattn block (keys, values) of the visual tokens; cached once per prompt in decoding.

        A tuple with one (keys, values) per block; with ``lm.scan_layers`` one (keys, values)
        pair stacked over the blocks on axis 1 (axis 0 stays the batch, which generation and
        ranking repeat and reorder)."""
        with jax.named_scope("xattn"):
            if self.config.lm.scan_layers:
                graph, state = nnx.split(self.xattn_layers)
                return jax.vmap(lambda block: nnx.merge(graph, block).media_kv(visual), out_axes=1)(state)
            return tuple(block.media_kv(visual) for block in self.xattn_layers)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """int32[B, T] with new-token ids >= lm.vocab_size -> float[B, T, W]."""
        vocab = self.config.lm.vocab_size
        with jax.named_scope("embed"):
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
        last_only: bool = False,
        continuation: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Next-token logits conditioned on media.

        Args:
          tokens: int32[B, T].
          image_index: int32[B, T], media slot each token attends to (-1: none).
          image_mask: bool[B, N], real media slots; padded slots have no effect on any logit.
          images: float[B, N, F, H, W, C], or None when ``media_kv`` (from :meth:`media_kv`) is given.
          input_mask, positions, cache: as in :meth:`LlamaLM.backbone`.
          last_only: the logits of the last position only (``T`` = 1 in the result): what a
            prompt's prefill needs, without the vocabulary projection of every prompt token.
          continuation: the tokens continue the sequence in ``cache`` (decoding); the same
            computation here (a token-level model does not expand their ``<image>`` tokens).

        Returns:
          (float32[B, T, lm.vocab_size + 2] logits, updated KV cache or None).
        """
        del continuation
        hidden, cache = self._hidden_from(
            0,
            self.embed_tokens(tokens),
            image_index,
            image_mask,
            images,
            media_kv=media_kv,
            input_mask=input_mask,
            positions=positions,
            cache=cache,
        )
        return self.head(hidden[:, -1:] if last_only else hidden), cache

    def _hidden_from(
        self,
        start: int,
        hidden: jax.Array,
        image_index: jax.Array,
        image_mask: jax.Array,
        images: jax.Array | None,
        *,
        media_kv=None,
        input_mask=None,
        positions=None,
        cache=None,
    ) -> tuple[jax.Array, KVCache | None]:
        """The LM layers from ``start`` (with their xattn blocks) on the hidden states
        float[B, T, W] entering it: the final-normed hidden states the head reads."""
        if media_kv is None:
            if images is None:
                raise ValueError("Flamingo needs either images or precomputed media_kv")
            media_kv = self.media_kv(self.encode_media(images))
        inputs, apply = self._block_inputs(image_index, image_mask, media_kv)
        hidden, cache = self.lm.backbone(
            hidden,
            input_mask=input_mask,
            positions=positions,
            cache=cache,
            inserts=self._inserts(inputs, apply),
            layer_range=(start, self.config.lm.num_layers) if start else None,
        )
        return hidden, cache

    def _inserts(self, inputs, apply) -> Inserts:
        """The xattn blocks as :class:`Inserts` of the LM, with one stream's (or, as tuples,
        every stream's) inputs and ``apply`` from :meth:`_block_inputs`."""
        return Inserts(
            layers=self.config.xattn_layer_indices,
            every=self.config.xattn.every,
            modules=self.xattn_layers,
            inputs=inputs,
            apply=apply,
        )

    def _block_inputs(self, image_index: jax.Array, image_mask: jax.Array, media_kv):
        """(the xattn blocks' inputs, ``apply(block, hidden, input)``) of one stream, as
        :class:`Inserts` takes them: the media keys and values per block (stacked on axis 0 with
        ``lm.scan_layers``), the stream's attention mask closed over."""
        stacked = self.config.lm.scan_layers  # media_kv stacked over the blocks on axis 1
        keys = jax.tree.leaves(media_kv)[0]  # float[B, (blocks,) N * tokens, heads, head_dim]
        tokens_per_medium = keys.shape[2 if stacked else 1] // image_mask.shape[1]
        mask = media_attention_mask(image_index, image_mask, tokens_per_medium, self.config.xattn.attend)

        def block(module, hidden, kv):
            with jax.named_scope("xattn"):
                return module(hidden, kv, mask)

        return (jax.tree.map(lambda kv: jnp.moveaxis(kv, 1, 0), media_kv) if stacked else media_kv), block

    def head(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden float[B, T, W] -> float32[B, T, lm.vocab_size + 2] logits."""
        with jax.named_scope("lm_head"):
            return jnp.concatenate([self.lm.logits(hidden), self.new_tokens.logits(hidden)], axis=-1)

    def _below_first_block(self, tokens: jax.Array, stop: int, max_rows: int) -> jax.Array:
        """float[B, T, W]: the LM's hidden states entering layer ``stop``, computed once per
        distinct row of ``tokens`` when there are at most ``max_rows`` of them."""
        lower = lambda rows: self.lm.backbone(self.embed_tokens(rows), layer_range=(0, stop), final_norm=False)[0]
        if max_rows >= tokens.shape[0]:
            return lower(tokens)
        rows, inverse = jnp.unique(tokens, axis=0, size=max_rows, fill_value=0, return_inverse=True)
        inverse = inverse.reshape(-1)  # (B,) or (B, 1) depending on the numpy API level
        return jax.lax.cond(
            jnp.max(inverse) < max_rows,
            lambda: jnp.take(lower(rows), inverse, axis=0),
            lambda: lower(tokens),
        )

    def train_loss(
        self, batch: Batch, *, unique_rows: int = 0, target_capacity: int = 0
    ) -> tuple[jax.Array, jax.Array]:
        """(next-token loss over the targets ``loss_mask`` selects, number of targets).

        ``unique_rows`` > 0 runs the LM layers below the first cross-attention block once per
        distinct token row of the batch (at most this many; every row when the batch has more):
        they see no image, so this is exact, and much cheaper for templated text such as
        captioned pairs (``DatasetConfig.unique_rows``).

        ``target_capacity`` > 0 applies the head (and the loss) only at the target positions, at
        most this many per row (every position when a row has more): exact, and cheaper where
        many positions carry no loss (``DatasetConfig.target_capacity``).
        """
        if unique_rows:
            if not self.config.xattn_layer_indices:
                raise ValueError("Flamingo: unique_rows needs at least one cross-attention block")
            start = min(self.config.xattn_layer_indices)
            hidden = self._below_first_block(batch.tokens, start, unique_rows)
        else:
            start, hidden = 0, self.embed_tokens(batch.tokens)
        hidden, _ = self._hidden_from(start, hidden, batch.image_index, batch.image_mask, batch.images)
        return self._loss(hidden, batch, target_capacity)

    def _loss(self, hidden: jax.Array, batch: Batch, target_capacity: int) -> tuple[jax.Array, jax.Array]:
        """The loss of the final-normed hidden states of ``batch`` (see :meth:`train_loss`)."""
        if target_capacity and target_capacity < batch.tokens.shape[1] - 1:
            return target_loss(self.head, hidden, batch, target_capacity)
        return token_loss(self.head(hidden), batch)

    def train_losses(
        self, batches: dict[str, Batch], options: dict[str, dict] | None = None
    ) -> dict[str, tuple[jax.Array, jax.Array]]:
        """{dataset: ``train_loss`` of its batch} for the batches of a mixture step, computed in
        one pass: every dataset's stream goes through the same LM layers from the first xattn
        block on (:meth:`LlamaLM.backbone` with a tuple of streams), so a scanned LM reads (under
        FSDP gathers) each period's weights once for all datasets in the forward pass and once
        in the backward pass, instead of once per dataset. The layers below the first block run
        per dataset (``unique_rows`` applies there). ``options``: {dataset: ``train_loss``
        keyword arguments}. The same losses as :meth:`train_loss` on each batch."""
        options = options or {}
        if not self.config.xattn_layer_indices:
            return {name: self.train_loss(batch, **options.get(name, {})) for name, batch in batches.items()}
        start = min(self.config.xattn_layer_indices)
        hiddens, inputs, applies = [], [], []
        for name, batch in batches.items():
            unique_rows = options.get(name, {}).get("unique_rows", 0)
            if unique_rows:
                hidden = self._below_first_block(batch.tokens, start, unique_rows)
            else:
                hidden = self.embed_tokens(batch.tokens)
                if start:
                    hidden = self.lm.backbone(hidden, layer_range=(0, start), final_norm=False)[0]
            hiddens.append(hidden)
            stream_inputs, apply = self._block_inputs(
                batch.image_index, batch.image_mask, self.media_kv(self.encode_media(batch.images))
            )
            inputs.append(stream_inputs)
            applies.append(apply)
        hiddens, _ = self.lm.backbone(
            tuple(hiddens),
            inserts=self._inserts(tuple(inputs), tuple(applies)),
            layer_range=(start, self.config.lm.num_layers) if start else None,
        )
        return {
            name: self._loss(hidden, batch, options.get(name, {}).get("target_capacity", 0))
            for (name, batch), hidden in zip(batches.items(), hiddens, strict=True)
        }


def token_loss(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over the targets ``loss_mask`` selects.

    Returns (loss, number of counted targets). A batch with no counted target gives loss 0, not
    NaN (its gradient is zero too).
    """
    return _weighted_nll(logits[:, :-1], batch.tokens[:, 1:], batch.loss_mask[:, :-1])


def target_loss(head, hidden: jax.Array, batch: Batch, capacity: int) -> tuple[jax.Array, jax.Array]:
    """``token_loss(head(hidden), batch)`` with ``head`` applied at the target positions only:
    the first ``capacity`` positions of each row that ``loss_mask`` selects, in order (padded with
    positions of weight 0). A batch with a row of more targets takes the full path, so the result
    is the same for every batch; both paths are compiled, one runs."""
    weights = batch.loss_mask[:, :-1].astype(jnp.float32)
    targets = batch.tokens[:, 1:]

    def selected(hidden):
        with jax.named_scope("loss"):
            order = jnp.argsort(weights <= 0, axis=1, stable=True)[:, :capacity]
            picked = jnp.take_along_axis(hidden[:, :-1], order[..., None], axis=1)
        logits = head(picked)
        take = lambda values: jnp.take_along_axis(values, order, axis=1)
        return _weighted_nll(logits, take(targets), take(weights))

    def every(hidden):
        return _weighted_nll(head(hidden)[:, :-1], targets, weights)

    fits = jnp.max(jnp.sum(weights > 0, axis=1)) <= capacity
    return jax.lax.cond(fits, selected, every, hidden)


def _weighted_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean of -log p(target) weighted by ``weights``, sum of weights); logits float[B, K, V]
    predict targets int[B, K]."""
    with jax.named_scope("loss"):
        weights = weights.astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        count = weights.sum()
        return (nll * weights).sum() / jnp.maximum(count, 1.0), count


def create_flamingo(config: FlamingoConfig, seed: int = 0) -> Flamingo:
    """Builds a model with logical-axis metadata recorded but not applied (sharding is applied by
    ``flamingo_jax.sharding`` under a mesh)."""
    with nnx.use_eager_sharding(False):
        return Flamingo(config, rngs=CountingRngs(seed))
