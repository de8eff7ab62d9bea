"""Token-level fusion: the frozen LM reads each image's visual tokens (from a
:mod:`flamingo_jax.models.connector`: LLaVA's MLP projector or BLIP-2's Q-Former) as input
positions right after its ``<image>`` token, instead of cross-attending to them.

The batch contract is unchanged: the model expands the sequence itself. Row b's ``<image>``
token at position t (pointing at a real media slot m through ``image_index``) is followed, in
the LM's own sequence of ``T + N_slots * tokens_per_medium`` positions, by the medium's visual
tokens; the positions left over (rows with fewer images than slots) are masked padding placed
first, so the last position is still every row's last token (prompts stay left-padded). The
logits come back at the T original positions: position t's logits are read after its visual
tokens when t is an ``<image>``, so they predict token t + 1 having seen the image, and
``loss_mask`` keeps its meaning. Text before an image never sees it (causal attention); text
after it sees every earlier image (there is no ``XAttnConfig.attend``).

In cached decoding, ``media_kv`` is the visual tokens themselves, the prompt's cache holds the
expanded sequence (:meth:`TokenFusion.cache_slots`), and the decoded tokens
(``continuation=True``) are plain text.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.batch import Batch
from flamingo_jax.models.connector import build_connector
from flamingo_jax.models.flamingo import Flamingo, FlamingoConfig, NewTokens
from flamingo_jax.models.llama import KVCache, LlamaLM
from flamingo_jax.models.vision import build_vision_encoder


def expand_positions(
    tokens: jax.Array, image_index: jax.Array, image_mask: jax.Array, media_token_id: int, tokens_per_medium: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Where everything goes in the expanded sequence of ``T + N * tokens_per_medium`` positions.

    Args:
      tokens, image_index: int32[B, T]; image_mask: bool[B, N] (the batch contract).

    Returns:
      (text_position int32[B, T]: each token's position; read_position int32[B, T]: where its
      logits are read (after the visual tokens for an expanded ``<image>``); visual_start
      int32[B, N]: the first visual token's position of each slot, the expanded length for a slot
      with no ``<image>`` token; expanded bool[B, T]: the ``<image>`` tokens that are expanded).
    """
    batch, length = tokens.shape
    num_media = image_mask.shape[1]
    slot = jnp.clip(image_index, 0, num_media - 1)
    expanded = (tokens == media_token_id) & (image_index >= 0) & jnp.take_along_axis(image_mask, slot, axis=1)
    before = jnp.cumsum(expanded, axis=1, dtype=jnp.int32) - expanded  # expanded images before t
    # Right-aligned: the unused slots' room is padding in front.
    unused = num_media - expanded.sum(axis=1, dtype=jnp.int32)
    text_position = jnp.arange(length, dtype=jnp.int32) + tokens_per_medium * (before + unused[:, None])
    read_position = text_position + tokens_per_medium * expanded
    total = length + num_media * tokens_per_medium
    rows = jnp.arange(batch)[:, None]
    visual_start = (
        jnp.full((batch, num_media), total, jnp.int32)
        .at[rows, jnp.where(expanded, slot, num_media)]
        .set(text_position + 1, mode="drop")
    )
    return text_position, read_position, visual_start, expanded


class TokenFusion(Flamingo):
    """A frozen vision encoder, a token-level connector and a frozen LM with trainable
    ``<image>`` / ``<|endofchunk|>`` rows: the same interface as :class:`Flamingo` (the train
    loop, generation, ranking and evaluation use either), with no resampler or xattn blocks."""

    def __init__(self, config: FlamingoConfig, *, rngs: nnx.Rngs):
        if not config.connector.token_level:
            raise ValueError("TokenFusion needs a token-level FlamingoConfig.connector ('mlp' or 'qformer')")
        self.config = config
        self.vision = build_vision_encoder(config.vision, rngs=rngs)
        self.connector = build_connector(config.connector, config.vision.output_dim, config.lm.width, rngs=rngs)
        self.lm = LlamaLM(config.lm, rngs=rngs)
        self.new_tokens = NewTokens(
            config.lm.width, tied=config.lm.tie_embeddings, param_dtype=config.trainable_param_dtype, rngs=rngs
        )

    def encode_media(self, images: jax.Array) -> jax.Array:
        """float[B, N, F, H, W, C] -> visual tokens float[B, N, tokens, lm.width] in the LM's dtype."""
        with jax.named_scope("connector"):
            return self.connector(self.vision_features(images)).astype(self.config.lm.dtype)

    def media_kv(self, visual: jax.Array) -> jax.Array:
        """The visual tokens themselves (what a cached prompt keeps for its images)."""
        return visual

    def cache_slots(self, length: int, media_kv: jax.Array) -> int:
        """KV-cache positions a sequence of ``length`` tokens takes with ``media_kv``'s images."""
        return length + media_kv.shape[1] * media_kv.shape[2]

    def expand(
        self,
        tokens: jax.Array,
        image_index: jax.Array,
        image_mask: jax.Array,
        visual: jax.Array,
        input_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(embeddings float[B, T', W], valid bool[B, T'], read_position int32[B, T]) of the
        expanded sequence (module docstring); ``visual``: float[B, N, tokens, W]."""
        batch, length = tokens.shape
        _, num_media, per_medium, width = visual.shape
        text_position, read_position, visual_start, expanded = expand_positions(
            tokens, image_index, image_mask, self.config.media_token_id, per_medium
        )
        total = length + num_media * per_medium
        input_mask = jnp.ones(tokens.shape, bool) if input_mask is None else input_mask
        rows = jnp.arange(batch)[:, None]
        text = self.embed_tokens(tokens)
        hidden = jnp.zeros((batch, total, width), text.dtype).at[rows, text_position].set(text)
        valid = jnp.zeros((batch, total), bool).at[rows, text_position].set(input_mask)
        visual_position = (visual_start[..., None] + jnp.arange(per_medium)).reshape(batch, -1)  # [B, N * tokens]
        hidden = hidden.at[rows, visual_position].set(visual.reshape(batch, -1, width).astype(text.dtype), mode="drop")
        valid = valid.at[rows, visual_position].set(True, mode="drop")
        return hidden, valid, read_position

    def __call__(
        self,
        tokens: jax.Array,
        image_index: jax.Array,
        image_mask: jax.Array,
        images: jax.Array | None = None,
        *,
        media_kv: jax.Array | None = None,
        input_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        continuation: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """As :meth:`Flamingo.__call__`; the logits at the T positions of ``tokens``.
        ``continuation``: the tokens continue a cached sequence and are plain text (their
        ``<image>`` tokens, if any, are not expanded; images and ``media_kv`` are unused)."""
        if continuation:
            hidden, cache = self.lm.backbone(
                self.embed_tokens(tokens), input_mask=input_mask, positions=positions, cache=cache
            )
            return self.head(hidden[:, -1:] if last_only else hidden), cache
        if positions is not None:
            raise ValueError("TokenFusion: positions are derived from the expanded sequence; pass none")
        hidden, cache = self._expanded_hidden(tokens, image_index, image_mask, images, media_kv, input_mask, cache)
        return self.head(hidden[:, -1:] if last_only else hidden), cache

    def _expanded_hidden(self, tokens, image_index, image_mask, images, media_kv, input_mask, cache):
        """Final-normed hidden states float[B, T, W] at the original positions (and the cache)."""
        if media_kv is None:
            if images is None:
                raise ValueError("TokenFusion needs either images or precomputed media_kv")
            media_kv = self.encode_media(images)
        hidden, valid, read_position = self.expand(tokens, image_index, image_mask, media_kv, input_mask)
        hidden, cache = self.lm.backbone(hidden, input_mask=valid, cache=cache)
        return jnp.take_along_axis(hidden, read_position[..., None], axis=1), cache

    def train_loss(
        self, batch: Batch, *, unique_rows: int = 0, target_capacity: int = 0
    ) -> tuple[jax.Array, jax.Array]:
        """As :meth:`Flamingo.train_loss`. ``unique_rows`` is unused (every layer sees the
        images here, so no layer's work can be shared between rows)."""
        del unique_rows
        hidden, _ = self._expanded_hidden(
            batch.tokens, batch.image_index, batch.image_mask, batch.images, None, None, None
        )
        return self._loss(hidden, batch, target_capacity)

    def train_losses(
        self, batches: dict[str, Batch], options: dict[str, dict] | None = None
    ) -> dict[str, tuple[jax.Array, jax.Array]]:
        """{dataset: ``train_loss`` of its batch}, one pass per dataset."""
        options = options or {}
        return {name: self.train_loss(batch, **options.get(name, {})) for name, batch in batches.items()}
