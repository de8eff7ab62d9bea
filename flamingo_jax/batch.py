"""The batch contract: the one definition every stage (data, train, eval, generate) speaks.

| field        | shape                      | meaning                                                   |
|--------------|----------------------------|-----------------------------------------------------------|
| tokens       | int32[B, T]                | text with ``<image>`` and ``<|endofchunk|>`` tokens        |
| images       | float[B, N, F, H, W, C]    | N media per example, F frames each (F = 1 for stills)     |
| image_mask   | bool[B, N]                 | real media slots (padding slots have no effect)           |
| image_index  | int32[B, T]                | media slot each token attends to; -1 for none             |
| loss_mask    | float32[B, T]              | which targets count (weight of predicting token t+1 at t) |

``loss_mask[b, t]`` weights the prediction made at position t, i.e. the loss of ``tokens[b, t+1]``;
the last column is ignored.

Token-level models (``FlamingoConfig.connector`` 'mlp' or 'qformer') take the same batches: the
model, not the data pipeline, places each medium's visual tokens after its ``<image>`` token
(``flamingo_jax.models.token_fusion``), so one dataset serves both kinds of connector.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

# The tokens Flamingo adds to a language model's vocabulary, in this order: ids
# ``base_vocab_size`` and ``base_vocab_size + 1`` (the model's new embedding rows).
NEW_TOKENS = ("<image>", "<|endofchunk|>")


class BatchError(ValueError):
    """A batch that does not follow the contract; the message names the field."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
    tokens: jax.Array
    images: jax.Array
    image_mask: jax.Array
    image_index: jax.Array
    loss_mask: jax.Array

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_media(self) -> int:
        return self.images.shape[1]

    @classmethod
    def from_dict(cls, fields: dict) -> Batch:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in fields]
        if missing:
            raise BatchError(f"batch is missing fields {missing}; got {sorted(fields)}")
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)})

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer) and not isinstance(x, jax.ShapeDtypeStruct)


def validate(
    batch: Batch,
    *,
    image_shape: tuple[int, int, int] | None = None,
    vocab_size: int | None = None,
) -> Batch:
    """Checks shapes and dtypes (and, for concrete arrays, value ranges); raises BatchError.

    Args:
      image_shape: expected (H, W, C) of each frame, if known.
      vocab_size: total vocabulary (including the new tokens), if known.
    """
    tokens, images = batch.tokens, batch.images

    def fail(field, message):
        raise BatchError(f"batch field {field!r}: {message}")

    if tokens.ndim != 2:
        fail("tokens", f"expected int32[B, T], got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        fail("tokens", f"expected an integer dtype, got {tokens.dtype}")
    batch_size, length = tokens.shape
    if images.ndim != 6:
        fail("images", f"expected float[B, N, F, H, W, C], got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        fail("images", f"expected a float dtype, got {images.dtype}")
    if images.shape[0] != batch_size:
        fail("images", f"batch size {images.shape[0]} differs from tokens' {batch_size}")
    if image_shape is not None and tuple(images.shape[3:]) != tuple(image_shape):
        fail("images", f"frames of shape {tuple(images.shape[3:])}, expected {tuple(image_shape)}")
    num_media = images.shape[1]
    expected = {
        "image_mask": ((batch_size, num_media), np.bool_),
        "image_index": ((batch_size, length), np.integer),
        "loss_mask": ((batch_size, length), np.floating),
    }
    for field, (shape, kind) in expected.items():
        value = getattr(batch, field)
        if tuple(value.shape) != shape:
            fail(field, f"expected shape {shape}, got {tuple(value.shape)}")
        if not np.issubdtype(value.dtype, kind):
            fail(field, f"expected a {kind.__name__} dtype, got {value.dtype}")

    if all(_is_concrete(x) for x in (tokens, batch.image_index, batch.image_mask, batch.loss_mask)):
        tokens_np = np.asarray(tokens)
        if tokens_np.size and (tokens_np.min() < 0 or (vocab_size is not None and tokens_np.max() >= vocab_size)):
            fail("tokens", f"ids must lie in [0, {vocab_size}), got range [{tokens_np.min()}, {tokens_np.max()}]")
        index = np.asarray(batch.image_index)
        if index.size and (index.min() < -1 or index.max() >= num_media):
            fail("image_index", f"values must lie in [-1, {num_media}), got range [{index.min()}, {index.max()}]")
        mask = np.asarray(batch.image_mask)
        rows, cols = np.nonzero(index >= 0)
        if rows.size and not mask[rows, index[rows, cols]].all():
            bad = int(rows[~mask[rows, index[rows, cols]]][0])
            fail("image_index", f"example {bad} points at a media slot that image_mask marks as padding")
        loss = np.asarray(batch.loss_mask)
        if not np.isfinite(loss).all() or (loss < 0).any():
            fail("loss_mask", "weights must be finite and non-negative")
    return batch
