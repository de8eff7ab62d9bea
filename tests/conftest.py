"""Shared fixtures: the tiny model config and batches that follow the batch contract."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile

# Many tests (and the subprocesses they start) compile the same programs: share a persistent
# compilation cache for the session. Set before jax initialises its backend.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "flamingo_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from flamingo_jax import configs
from flamingo_jax.batch import Batch


@pytest.fixture(scope="session")
def tiny_config():
    return configs.load_model_config("models/tiny.gin")


def set_gates(model, value: float) -> None:
    """Sets every tanh-gate alpha of the model's xattn blocks to ``value``."""
    for block in model.xattn_layers:
        block.attn_gate[...] = np.float32(value)
        block.ffw_gate[...] = np.float32(value)


def make_batch(config, *, batch_size=2, length=12, num_media=3, num_frames=1, seed=0) -> Batch:
    """A random batch: images at positions 2, 6 and 9 of each row (fewer for the second row,
    whose last media slot is padding)."""
    rng = np.random.default_rng(seed)
    vision = config.vision
    tokens = rng.integers(0, config.lm.vocab_size, (batch_size, length)).astype(np.int32)
    image_index = np.full((batch_size, length), -1, np.int32)
    image_mask = np.ones((batch_size, num_media), bool)
    for row in range(batch_size):
        starts = [2, 6, 9][:num_media]
        if row % 2 == 1 and num_media > 1:
            starts = starts[:-1]
            image_mask[row, num_media - 1] = False
        for slot, start in enumerate(starts):
            tokens[row, start] = config.media_token_id
            image_index[row, start:] = slot
    images = rng.normal(size=(batch_size, num_media, num_frames, vision.image_size, vision.image_size, vision.channels))
    loss_mask = (image_index >= 0).astype(np.float32)
    return Batch(tokens, images.astype(np.float32), image_mask, image_index, loss_mask)


def jit_forward(model):
    """A jitted ``(state, tokens, image_index, image_mask, images) -> logits`` for ``model``."""
    import jax

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, image_index, image_mask, images):
        return nnx.merge(graphdef, state)(tokens, image_index, image_mask, images)[0]

    return lambda *args: forward(state, *args)


def encoded_image(colour, mode="RGB", fmt="JPEG", size=(24, 20)):
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def add_tar_member(archive, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory):
    """img2dataset-style tar shard: good pairs, every bad-record kind, an escaping member."""
    root = tmp_path_factory.mktemp("wds")
    good = encoded_image((200, 30, 30))
    samples = {
        "000000": (good, b"a red square"),
        "000001": (encoded_image((0, 0, 0, 255), mode="CMYK"), b"a black square in CMYK"),
        "000002": (encoded_image((10, 20, 30), fmt="PNG", mode="P"), b"a palette image"),
        "000003": (b"", b"zero-byte image"),
        "000004": (good[: len(good) // 3], b"truncated image"),
        "000005": (good, b""),
        "000006": (good, b"\xff\xfe not utf-8 \xc3\x28"),
        "000007": (good, b"   "),
    }
    with tarfile.open(root / "00000.tar", "w") as archive:
        for key, (image, caption) in samples.items():
            add_tar_member(archive, f"{key}.jpg", image)
            add_tar_member(archive, f"{key}.txt", caption)
            add_tar_member(archive, f"{key}.json", json.dumps({"key": key}).encode())
        add_tar_member(archive, "../escape.jpg", good)
        add_tar_member(archive, "../escape.txt", b"an escaping member")
    return root
