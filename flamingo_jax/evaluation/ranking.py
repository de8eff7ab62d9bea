"""Classification by ranking class names by their log-likelihood after a shared prompt, and
RICES demonstration retrieval.

``class_log_likelihoods`` (and ``candidate_log_likelihoods``, each prompt with its own candidates)
runs each prompt once (filling the KV cache and the visual keys/values
of every cross-attention block), reads every class's first token from its last logits, then
scores the classes' later tokens as continuations of the cached prompt, ``chunk`` classes per
pass, so the prompt is never recomputed per class.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flamingo_jax.evaluation.generate import left_padded_prompts, repeat_rows
from flamingo_jax.models.llama import KVCache


@functools.partial(jax.jit, static_argnames=("graphdef", "class_length"))
def _prefill(graphdef, state, tokens, input_mask, image_index, image_mask, images, class_length: int):
    """The prompt once: log p(first class token) float[B, V], the KV cache (room for the class
    tokens after it) and the visual keys/values."""
    model = nnx.merge(graphdef, state)
    batch, prompt_length = tokens.shape
    media_kv = model.media_kv(model.encode_media(images))
    # The last class token is only scored, never fed: the cache holds the prompt and the others.
    cache = KVCache.create(model.config.lm, batch, model.cache_slots(prompt_length, media_kv) + class_length - 1)
    logits, cache = model(
        tokens, image_index, image_mask, media_kv=media_kv, input_mask=input_mask, cache=cache, last_only=True
    )
    return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1), cache, media_kv


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _later_tokens(graphdef, state, cache, media_kv, last_image, image_mask, classes, class_mask):
    """float[B, C]: log p(class tokens 1.. | prompt, token 0) of ``classes`` int[B, C, L], each
    class a continuation of its row's cached prompt (the cache repeated C times)."""
    model = nnx.merge(graphdef, state)
    batch, num_classes, class_length = classes.shape
    fed = classes[:, :, :-1].reshape(batch * num_classes, class_length - 1)  # row b * C + c: class c of b
    fed_mask = class_mask[:, :, :-1].reshape(fed.shape)
    class_logits, _ = model(
        fed,
        jnp.broadcast_to(jnp.repeat(last_image, num_classes, axis=0), fed.shape),
        jnp.repeat(image_mask, num_classes, axis=0),
        media_kv=repeat_rows(media_kv, num_classes),
        input_mask=fed_mask,
        cache=repeat_rows(cache, num_classes),
        continuation=True,
    )
    logp = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)  # [rows, L - 1, V]
    # Token j >= 1 of a class is predicted by fed position j - 1 (token 0: by the prompt).
    targets = classes[:, :, 1:].reshape(fed.shape)
    later = jnp.take_along_axis(logp, targets[..., None], axis=2)[..., 0]
    later = jnp.sum(jnp.where(class_mask[:, :, 1:].reshape(fed.shape), later, 0.0), axis=1)
    return later.reshape(batch, num_classes)


def _score(graphdef, state, tokens, input_mask, image_index, image_mask, images, classes, class_mask, chunk: int):
    """float[B, C]: log p(candidate c of row b | prompt b); the prompt runs once, then the
    candidates' later tokens ``chunk`` candidates at a time, shortest first and each chunk only
    as long as its longest (each chunk holds the prompt's cache ``chunk`` times: 1000 ImageNet
    classes in one pass would hold it 1000 times; single-token candidates need no pass)."""
    class_length = classes.shape[2]
    first, cache, media_kv = _prefill(
        graphdef, state, tokens, input_mask, image_index, image_mask, images, class_length=class_length
    )
    total = np.array(jnp.take_along_axis(first, classes[:, :, 0], axis=1))  # [B, C], writable
    lengths = np.asarray(class_mask).sum(axis=2).max(axis=0)  # [C]: the longest of a column
    order = np.argsort(lengths, kind="stable")
    order = order[lengths[order] > 1]
    if not len(order):
        return total
    size = min(chunk, len(order))
    for start in range(0, len(order), size):
        columns = order[start : start + size]
        padded = np.concatenate([columns, np.repeat(columns[-1:], size - len(columns))])  # one shape
        width = int(lengths[columns].max())
        later = _later_tokens(
            graphdef,
            state,
            cache,
            media_kv,
            image_index[:, -1:],
            image_mask,
            classes[:, padded, :width],
            class_mask[:, padded, :width],
        )
        total[:, columns] += np.asarray(later)[:, : len(columns)]
    return total


def class_log_likelihoods(
    model,
    tokens,
    image_index,
    image_mask,
    images,
    class_tokens: list[list[int]],
    *,
    input_mask=None,
    normalize: bool = False,
    chunk: int = 128,
) -> np.ndarray:
    """float[B, C]: log p(class name | prompt) of every class for every left-padded prompt
    (divided by the class's token count when ``normalize``); ``chunk`` classes at a time after
    the first token (each chunk keeps ``chunk`` copies of the prompt's KV cache)."""
    rows = len(np.asarray(tokens))
    return candidate_log_likelihoods(
        model,
        tokens,
        image_index,
        image_mask,
        images,
        [class_tokens] * rows,
        input_mask=input_mask,
        normalize=normalize,
        chunk=chunk,
    )


def candidate_log_likelihoods(
    model,
    tokens,
    image_index,
    image_mask,
    images,
    candidates: list[list[list[int]]],
    *,
    input_mask=None,
    normalize: bool = False,
    chunk: int = 128,
) -> np.ndarray:
    """float[B, C]: log p(candidate | prompt) for each row's own C candidates (``candidates[b]``:
    C token lists; every row the same C), e.g. the labels of a few-shot episode."""
    if len(candidates) != len(np.asarray(tokens)):
        raise ValueError(f"candidate_log_likelihoods: {len(candidates)} candidate lists for {len(tokens)} prompts")
    counts = {len(row) for row in candidates}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(
            f"candidate_log_likelihoods: every prompt needs the same number (>0) of candidates, got {counts}"
        )
    if chunk < 1:
        raise ValueError(f"candidate_log_likelihoods: chunk must be >= 1, got {chunk}")
    if any(len(c) == 0 for row in candidates for c in row):
        raise ValueError("candidate_log_likelihoods: every candidate needs at least one token")
    tokens, input_mask = left_padded_prompts(tokens, input_mask, "candidate_log_likelihoods")
    length = max(len(c) for row in candidates for c in row)
    classes = np.zeros((len(candidates), counts.pop(), length), np.int32)
    class_mask = np.zeros(classes.shape, bool)
    for row, options in enumerate(candidates):
        for column, ids in enumerate(options):
            classes[row, column, : len(ids)], class_mask[row, column, : len(ids)] = ids, True
    graphdef, state = nnx.split(model)
    scores = _score(
        graphdef,
        state,
        tokens,
        input_mask,
        jnp.asarray(image_index, jnp.int32),
        jnp.asarray(image_mask, bool),
        jnp.asarray(images),
        jnp.asarray(classes),
        jnp.asarray(class_mask),
        chunk=min(chunk, classes.shape[1]),
    )
    if normalize:
        scores = scores / class_mask.sum(axis=2)
    return scores


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _pooled(graphdef, state, images):
    features = nnx.merge(graphdef, state)(images)  # the vision encoder: [B, tokens, D]
    pooled = features.astype(jnp.float32).mean(axis=1)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def vision_features(model, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """float32[N, D]: L2-normalised mean-pooled features of the frozen vision encoder for images
    float[N, H, W, C] (what RICES compares)."""
    graphdef, state = nnx.split(model.vision)
    out = [
        np.asarray(_pooled(graphdef, state, jnp.asarray(images[i : i + batch_size])))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


class Rices:
    """Retrieval-based In-Context Example Selection (Yang et al. 2022; used by Flamingo and
    OpenFlamingo): the demonstrations of a query are the pool examples whose vision features are
    most similar (cosine), ordered with the most similar last, right before the query."""

    def __init__(self, pool_features: np.ndarray):
        pool = np.asarray(pool_features, np.float32)
        self._pool = pool / np.maximum(np.linalg.norm(pool, axis=1, keepdims=True), 1e-12)

    def find(self, query_features: np.ndarray, shots: int, *, exclude: list[int] | None = None) -> np.ndarray:
        """int[Q, shots] pool indices, least similar first; ``exclude[q]`` (e.g. the query itself
        when it is in the pool) is never chosen."""
        query = np.asarray(query_features, np.float32)
        query = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
        similarity = query @ self._pool.T
        if exclude is not None:
            similarity[np.arange(len(query)), np.asarray(exclude)] = -np.inf
        top = np.argsort(-similarity, axis=1, kind="stable")[:, :shots]
        return top[:, ::-1].copy()
