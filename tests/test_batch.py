"""The batch contract's validation names the bad field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flamingo_jax.batch import Batch, BatchError, validate

from conftest import make_batch


def test_valid_batch_passes(tiny_config):
    batch = make_batch(tiny_config)
    assert validate(batch, image_shape=(16, 16, 3), vocab_size=tiny_config.total_vocab_size) is batch


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("tokens", np.zeros((2, 12), np.float32), "integer dtype"),
        ("tokens", np.zeros((2, 12, 1), np.int32), "int32\\[B, T\\]"),
        ("images", np.zeros((2, 3, 16, 16, 3), np.float32), "float\\[B, N, F, H, W, C\\]"),
        ("images", np.zeros((2, 3, 1, 16, 16, 3), np.uint8), "float dtype"),
        ("image_mask", np.ones((2, 4), bool), "expected shape \\(2, 3\\)"),
        ("image_index", np.zeros((2, 11), np.int32), "expected shape \\(2, 12\\)"),
        ("loss_mask", np.ones((2, 12), np.int32), "floating dtype"),
    ],
)
def test_bad_shapes_and_dtypes_name_the_field(tiny_config, field, value, message):
    batch = dataclasses.replace(make_batch(tiny_config), **{field: value})
    with pytest.raises(BatchError, match=f"'{field}'.*{message}"):
        validate(batch)


def test_value_ranges(tiny_config):
    batch = make_batch(tiny_config)
    with pytest.raises(BatchError, match="'tokens'.*ids must lie"):
        validate(dataclasses.replace(batch, tokens=batch.tokens + 1000), vocab_size=tiny_config.total_vocab_size)
    index = batch.image_index.copy()
    index[0, -1] = 3
    with pytest.raises(BatchError, match="'image_index'.*\\[-1, 3\\)"):
        validate(dataclasses.replace(batch, image_index=index))
    index = batch.image_index.copy()
    index[1, -1] = 2  # row 1's slot 2 is padding
    with pytest.raises(BatchError, match="example 1 points at a media slot"):
        validate(dataclasses.replace(batch, image_index=index))
    with pytest.raises(BatchError, match="'images'.*frames of shape"):
        validate(batch, image_shape=(32, 32, 3))
    loss = batch.loss_mask.copy()
    loss[0, 0] = np.nan
    with pytest.raises(BatchError, match="'loss_mask'"):
        validate(dataclasses.replace(batch, loss_mask=loss))


def test_from_dict_reports_missing_fields(tiny_config):
    fields = make_batch(tiny_config).as_dict()
    assert Batch.from_dict(fields).tokens is fields["tokens"]
    del fields["image_index"]
    with pytest.raises(BatchError, match="missing fields \\['image_index'\\]"):
        Batch.from_dict(fields)
