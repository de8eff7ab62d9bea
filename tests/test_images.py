"""Image decoding never crashes: every bad kind becomes a BadRecord with its reason; odd modes
decode to RGB; preprocessing is deterministic given its seed."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from flamingo_jax.data.images import BadRecord, ImageConfig, decode_image, preprocess


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _photo(mode="RGB", size=(40, 30)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize(
    "make, fmt",
    [
        (lambda: _photo("CMYK"), "JPEG"),
        (lambda: _photo("P"), "PNG"),
        (lambda: _photo("L"), "PNG"),
        (lambda: _photo("RGBA"), "PNG"),
        (lambda: Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50), "PNG"),
        (lambda: _photo("RGB"), "JPEG"),
    ],
)
def test_unusual_modes_decode_to_rgb(make, fmt):
    array = decode_image(_encode(make(), fmt))
    assert array.dtype == np.uint8 and array.shape == (30, 40, 3)


def test_bad_images_raise_bad_record_with_reason():
    good = _encode(_photo(), "JPEG")
    cases = {
        b"": "empty_image",
        good[: len(good) // 2]: "corrupt_image",
        b"this is not an image at all": "corrupt_image",
    }
    for data, reason in cases.items():
        with pytest.raises(BadRecord) as error:
            decode_image(data)
        assert error.value.reason == reason
    huge = _encode(Image.new("L", (5000, 5000)), "PNG")
    with pytest.raises(BadRecord) as error:
        decode_image(huge, max_pixels=10_000_000)
    assert error.value.reason == "huge_image"


def test_preprocess_deterministic_and_normalised():
    image = decode_image(_encode(_photo(size=(64, 48)), "PNG"))
    config = ImageConfig(image_size=32)
    a = preprocess(image, config, np.random.default_rng(7))
    b = preprocess(image, config, np.random.default_rng(7))
    c = preprocess(image, config, np.random.default_rng(8))
    assert a.shape == (32, 32, 3) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0
    evaluation = preprocess(image, config)
    np.testing.assert_array_equal(evaluation, preprocess(image, config))
    assert -3 < evaluation.min() < evaluation.max() < 3
