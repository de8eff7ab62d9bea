"""Image decoding that never crashes on bad input, and preprocessing with augmentation.

``decode_image`` turns any bytes into uint8[H, W, 3] or raises :class:`BadRecord` with a short
reason (counted per dataset by the pipeline, never a crash). ``preprocess`` resizes (random
resized crop, flip and colour jitter when training; centre crop otherwise) and normalises; it is
deterministic given its ``rng``.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image

# CLIP's normalisation (OpenAI CLIP / open_clip models, used by OpenFlamingo).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BadRecord(Exception):
    """A record to skip; ``reason`` is the counter key (e.g. 'empty_image', 'corrupt_image')."""

    def __init__(self, reason: str, detail: str = "", *, also: tuple[str, ...] = ()):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.also = tuple(also)  # further reasons found on the way (e.g. a document's bad images)


def image_file(path: str) -> Callable[[], np.ndarray]:
    """A loader of the image file at ``path`` (read and decoded when called)."""

    def load():
        with open(path, "rb") as f:
            return decode_image(f.read())

    return load


def decode_image(data: bytes, *, max_pixels: int = 64_000_000) -> np.ndarray:
    """Encoded image bytes -> uint8[H, W, 3] RGB.

    Palette, greyscale, CMYK, alpha and 16-bit images are converted; empty, truncated or
    undecodable data and images above ``max_pixels`` (decompression bombs) raise BadRecord.
    """
    if not data:
        raise BadRecord("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadRecord("huge_image", f"{width}x{height}")
            image.load()
    except BadRecord:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise BadRecord("huge_image", str(error)) from None
    except Exception as error:  # PIL raises many types for bad data (OSError, SyntaxError, ...)
        raise BadRecord("corrupt_image", f"{type(error).__name__}: {error}") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        rgba = image.convert("RGBA")
        background.paste(rgba, mask=rgba.split()[-1])
        image = background
    array = np.asarray(image.convert("RGB"), np.uint8)
    if array.ndim != 3 or min(array.shape[:2]) < 1:
        raise BadRecord("corrupt_image", f"shape {array.shape}")
    return array


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """Preprocessing; the augmentations apply only when training."""

    image_size: int = 224
    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    colour_jitter: float = 0.1
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


def image_config_for(vision_config, **overrides) -> ImageConfig:
    """The preprocessing a vision encoder expects: its input size and pixel normalisation
    (``pixel_mean`` / ``pixel_std`` of its config; CLIP's when it names none)."""
    values = dict(
        image_size=getattr(vision_config, "image_size", 224),
        mean=tuple(getattr(vision_config, "pixel_mean", CLIP_MEAN)),
        std=tuple(getattr(vision_config, "pixel_std", CLIP_STD)),
    )
    values.update(overrides)
    return ImageConfig(**values)


def _crop_box(height, width, config: ImageConfig, rng) -> tuple[int, int, int, int]:
    if rng is not None and config.random_resized_crop:
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(*config.crop_scale)
            ratio = np.exp(rng.uniform(np.log(config.crop_ratio[0]), np.log(config.crop_ratio[1])))
            crop_w = int(round(np.sqrt(target * ratio)))
            crop_h = int(round(np.sqrt(target / ratio)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(rng.integers(0, height - crop_h + 1))
                left = int(rng.integers(0, width - crop_w + 1))
                return left, top, left + crop_w, top + crop_h
    side = min(height, width)  # centre square
    top, left = (height - side) // 2, (width - side) // 2
    return left, top, left + side, top + side


def preprocess(image: np.ndarray, config: ImageConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8[H, W, 3] -> float32[S, S, 3] normalised; ``rng`` None means evaluation (no
    augmentation)."""
    height, width = image.shape[:2]
    box = _crop_box(height, width, config, rng)
    resized = Image.fromarray(image).resize((config.image_size, config.image_size), Image.BICUBIC, box=box)
    out = np.asarray(resized, np.float32) / 255.0
    if rng is not None:
        if config.flip and rng.random() < 0.5:
            out = out[:, ::-1]
        if config.colour_jitter:
            jitter = config.colour_jitter
            brightness = 1.0 + rng.uniform(-jitter, jitter)
            contrast = 1.0 + rng.uniform(-jitter, jitter)
            saturation = 1.0 + rng.uniform(-jitter, jitter)
            out = out * brightness
            out = (out - out.mean()) * contrast + out.mean()
            grey = out.mean(axis=-1, keepdims=True)
            out = np.clip((out - grey) * saturation + grey, 0.0, 1.0)
    return ((out - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)).astype(np.float32)
