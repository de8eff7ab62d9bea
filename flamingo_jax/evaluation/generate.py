"""Jitted generation: greedy and beam search with a fixed-size text KV cache and the visual
keys/values of every cross-attention block computed once per prompt.

Prompts come left-padded (``Tokenizer.encode_batch(..., padding_side='left')``) so that the last
column is every prompt's last real token. Generated tokens attend to the prompt's last image.
Greedy decoding is beam search with one beam.

``use_cache=False`` decodes the same way without either cache (every step re-encodes the images
and reruns the whole sequence, as OpenFlamingo's ``generate`` does): the reference the cached
path is tested against, and the baseline of the generation benchmark.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.models.llama import KVCache


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """``max_new_tokens`` per prompt; ``num_beams`` 1 is greedy; beams are ranked at the end by
    sum of log-probabilities / (generated length ** ``length_penalty``); generation of a beam
    stops at any of ``stop_tokens`` (default: ``<|endofchunk|>`` and the tokenizer's EOS)."""

    max_new_tokens: int = 32
    num_beams: int = 1
    length_penalty: float = 1.0
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError(f"GenerateConfig: max_new_tokens and num_beams must be >= 1, got {self}")


@dataclasses.dataclass(frozen=True)
class Generated:
    """tokens: int32[B, max_new_tokens] (``pad_id`` after a stop token); lengths: int32[B], the
    generated tokens up to and including the stop token; scores: float32[B] (the ranking score)."""

    tokens: np.ndarray
    lengths: np.ndarray
    scores: np.ndarray


def repeat_rows(tree, times: int):
    """Each row (batch entry) of every array ``times`` times in a row; scalars (a cache's end) kept."""
    return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, times, axis=0), tree)


def left_padded_prompts(tokens, input_mask, who: str) -> tuple[jax.Array, jax.Array]:
    """(int32 tokens, bool mask; all True when None), checking the prompts are left-padded so the
    last column is every prompt's last real token."""
    tokens = jnp.asarray(tokens, jnp.int32)
    input_mask = jnp.ones(tokens.shape, bool) if input_mask is None else jnp.asarray(input_mask, bool)
    if not bool(jnp.all(input_mask[:, -1])):
        raise ValueError(f"{who}: prompts must be left-padded (the last column must be a real token)")
    return tokens, input_mask


def _take(tree, rows):
    return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.take(x, rows, axis=0), tree)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "num_beams", "length_penalty", "use_cache", "pad_id")
)
def _search(
    graphdef,
    state,
    tokens,
    input_mask,
    image_index,
    image_mask,
    images,
    stop_tokens,
    *,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float,
    use_cache: bool,
    pad_id: int,
):
    model = nnx.merge(graphdef, state)
    batch, prompt_length = tokens.shape
    beams, total = num_beams, prompt_length + max_new_tokens
    rows = batch * beams
    last_image = jnp.repeat(image_index[:, -1:], beams, axis=0)  # [rows, 1]
    image_mask_rows = jnp.repeat(image_mask, beams, axis=0)

    if use_cache:
        prompt_media_kv = model.media_kv(model.encode_media(images))
        # A token-level model's prompt also holds its images' visual tokens.
        cache = KVCache.create(
            model.config.lm, batch, model.cache_slots(prompt_length, prompt_media_kv) + max_new_tokens
        )
        logits, cache = model(
            tokens,
            image_index,
            image_mask,
            media_kv=prompt_media_kv,
            input_mask=input_mask,
            cache=cache,
            last_only=True,
        )
        media_kv = repeat_rows(prompt_media_kv, beams)
        decoder = repeat_rows(cache, beams)
        last_logits = jnp.repeat(logits[:, -1], beams, axis=0)
    else:
        images_rows = jnp.repeat(images, beams, axis=0)
        buffer = jnp.full((rows, total), pad_id, jnp.int32).at[:, :prompt_length].set(jnp.repeat(tokens, beams, 0))
        valid = jnp.zeros((rows, total), bool).at[:, :prompt_length].set(jnp.repeat(input_mask, beams, 0))
        index_buffer = jnp.concatenate(
            [jnp.repeat(image_index, beams, 0), jnp.broadcast_to(last_image, (rows, max_new_tokens))], axis=1
        )

        def full_logits(buffer, valid, end):
            logits, _ = model(buffer, index_buffer, image_mask_rows, images_rows, input_mask=valid)
            return jax.lax.dynamic_index_in_dim(logits, end - 1, axis=1, keepdims=False)

        decoder = (buffer, valid)
        last_logits = full_logits(buffer, valid, prompt_length)

    vocab = last_logits.shape[-1]
    scores = jnp.tile(jnp.asarray([0.0] + [-jnp.inf] * (beams - 1), jnp.float32), (batch, 1))  # [B, K]
    generated = jnp.full((batch, beams, max_new_tokens), pad_id, jnp.int32)
    finished = jnp.zeros((batch, beams), bool)
    lengths = jnp.zeros((batch, beams), jnp.int32)
    offsets = (jnp.arange(batch) * beams)[:, None]

    def body(step, carry):
        decoder, last_logits, scores, generated, finished, lengths = carry
        logp = jax.nn.log_softmax(last_logits.astype(jnp.float32), axis=-1).reshape(batch, beams, vocab)
        # A finished beam continues only with padding, at no cost.
        pad_only = jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf)
        logp = jnp.where(finished[..., None], pad_only, logp)
        candidates = (scores[..., None] + logp).reshape(batch, beams * vocab)
        scores, chosen = jax.lax.top_k(candidates, beams)
        parent, token = chosen // vocab, (chosen % vocab).astype(jnp.int32)
        was_finished = jnp.take_along_axis(finished, parent, axis=1)
        generated = jnp.take_along_axis(generated, parent[..., None], axis=1).at[:, :, step].set(token)
        lengths = jnp.take_along_axis(lengths, parent, axis=1) + (~was_finished).astype(jnp.int32)
        finished = was_finished | jnp.isin(token, stop_tokens)
        source_rows = (offsets + parent).reshape(rows)
        decoder = _take(decoder, source_rows)
        fed = token.reshape(rows, 1)
        if use_cache:
            logits, decoder = model(
                fed, last_image, image_mask_rows, media_kv=media_kv, cache=decoder, continuation=True
            )
            last_logits = logits[:, -1]
        else:
            buffer, valid = decoder
            position = prompt_length + step
            buffer = jax.lax.dynamic_update_slice(buffer, fed, (0, position))
            valid = jax.lax.dynamic_update_slice(valid, jnp.ones((rows, 1), bool), (0, position))
            decoder = (buffer, valid)
            last_logits = full_logits(buffer, valid, position + 1)
        return decoder, last_logits, scores, generated, finished, lengths

    carry = (decoder, last_logits, scores, generated, finished, lengths)
    _, _, scores, generated, finished, lengths = jax.lax.fori_loop(0, max_new_tokens, body, carry)
    ranked = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty if beams > 1 else scores
    best = jnp.argmax(ranked, axis=1)
    pick = lambda x: jnp.take_along_axis(x, best[:, None, *([None] * (x.ndim - 2))], axis=1)[:, 0]
    return pick(generated), pick(lengths), pick(ranked)


def generate(
    model: Flamingo,
    tokens,
    image_index,
    image_mask,
    images,
    *,
    input_mask=None,
    config: GenerateConfig = GenerateConfig(),
    pad_id: int = 0,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> Generated:
    """Continues each left-padded prompt of ``tokens`` (int32[B, T]; ``input_mask`` False on the
    padding) conditioned on ``images`` (float[B, N, F, H, W, C]) with ``image_index`` /
    ``image_mask`` as in the batch contract."""
    tokens, input_mask = left_padded_prompts(tokens, input_mask, "generate")
    stops = config.stop_tokens or tuple(t for t in (model.config.endofchunk_token_id, eos_id) if t is not None)
    graphdef, state = nnx.split(model)
    generated, lengths, scores = _search(
        graphdef,
        state,
        tokens,
        input_mask,
        jnp.asarray(image_index, jnp.int32),
        jnp.asarray(image_mask, bool),
        jnp.asarray(images),
        jnp.asarray(stops, jnp.int32),
        max_new_tokens=config.max_new_tokens,
        num_beams=config.num_beams,
        length_penalty=float(config.length_penalty),
        use_cache=use_cache,
        pad_id=int(pad_id),
    )
    return Generated(np.asarray(generated), np.asarray(lengths), np.asarray(scores))


def batch_prompts(
    prompts: list[list[int]], images: list[list[np.ndarray]], media_id: int, pad_id: int, rows: int, multiple: int
):
    """Left-padded tokens, mask, image_index; images [B, N, 1, H, W, C] with their mask. The
    batch is filled up to ``rows`` with copies of its last prompt (results dropped), and its
    length rounded up to a ``multiple``, so a (task, shots) compiles few shapes."""
    prompts = prompts + [prompts[-1]] * (rows - len(prompts))
    images = images + [images[-1]] * (rows - len(images))
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    num_media = max(len(i) for i in images)
    shape = images[0][0].shape
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    media = np.zeros((len(prompts), num_media, 1, *shape), np.float32)
    image_mask = np.zeros((len(prompts), num_media), bool)
    for row, (ids, row_images) in enumerate(zip(prompts, images, strict=True)):
        tokens[row, length - len(ids) :], mask[row, length - len(ids) :] = ids, True
        for slot, image in enumerate(row_images):
            media[row, slot, 0], image_mask[row, slot] = image, True
    index = np.where(mask, np.cumsum(tokens == media_id, axis=1) - 1, -1).astype(np.int32)
    return tokens, mask, index, media, image_mask
