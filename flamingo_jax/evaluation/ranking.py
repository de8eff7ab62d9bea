"""Classification by ranking class names by their log-likelihood after a shared prompt, and
RICES demonstration retrieval.

``class_log_likelihoods`` runs each prompt once (filling the KV cache and the visual keys/values
of every cross-attention block), then scores all class names at once as continuations of the
cached prompt, so the prompt is never recomputed per class.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flamingo_jax.evaluation.generate import left_padded_prompts, repeat_rows
from flamingo_jax.models.llama import KVCache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, tokens, input_mask, image_index, image_mask, images, classes, class_mask):
    model = nnx.merge(graphdef, state)
    batch, prompt_length = tokens.shape
    num_classes, class_length = classes.shape
    media_kv = model.media_kv(model.encode_media(images))
    # The last class token is only scored, never fed: the cache holds the prompt and the others.
    cache = KVCache.create(model.config.lm, batch, prompt_length + class_length - 1)
    logits, cache = model(
        tokens, image_index, image_mask, media_kv=media_kv, input_mask=input_mask, cache=cache, last_only=True
    )
    first = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)  # [B, V]: the class's first token
    total = first[:, classes[:, 0]]  # [B, C]
    if class_length == 1:
        return total
    fed = jnp.tile(classes[:, :-1], (batch, 1))  # row b * C + c holds class c
    fed_mask = jnp.tile(class_mask[:, :-1], (batch, 1))
    last_image = jnp.repeat(image_index[:, -1:], num_classes, axis=0)
    class_logits, _ = model(
        fed,
        jnp.broadcast_to(last_image, fed.shape),
        jnp.repeat(image_mask, num_classes, axis=0),
        media_kv=repeat_rows(media_kv, num_classes),
        input_mask=fed_mask,
        cache=repeat_rows(cache, num_classes),
    )
    logp = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)  # [rows, L - 1, V]
    # Token j >= 1 of a class is predicted by fed position j - 1 (token 0: by the prompt).
    targets = jnp.tile(classes[:, 1:], (batch, 1))
    later = jnp.take_along_axis(logp, targets[..., None], axis=2)[..., 0]
    later = jnp.sum(jnp.where(jnp.tile(class_mask[:, 1:], (batch, 1)), later, 0.0), axis=1)
    return total + later.reshape(batch, num_classes)


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
) -> np.ndarray:
    """float[B, C]: log p(class name | prompt) of every class for every left-padded prompt
    (divided by the class's token count when ``normalize``)."""
    if not class_tokens or any(len(c) == 0 for c in class_tokens):
        raise ValueError("class_log_likelihoods: every class needs at least one token")
    tokens, input_mask = left_padded_prompts(tokens, input_mask, "class_log_likelihoods")
    length = max(len(c) for c in class_tokens)
    classes = np.zeros((len(class_tokens), length), np.int32)
    class_mask = np.zeros((len(class_tokens), length), bool)
    for row, ids in enumerate(class_tokens):
        classes[row, : len(ids)], class_mask[row, : len(ids)] = ids, True
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
    )
    scores = np.asarray(scores)
    if normalize:
        scores = scores / class_mask.sum(axis=1)[None, :]
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
