"""The real photographs scikit-image ships, captioned by their loaders' docstrings: the demo's
photographs to train on (data source ``skimage_photos``) and to caption (task
``skimage_captions``, which measures recall: the photos are in the training mixture)."""

from __future__ import annotations

import inspect

import numpy as np
import skimage.data

from flamingo_jax.data import builders
from flamingo_jax.data.sources import SOURCES, Source
from flamingo_jax.evaluation.tasks import TASKS, Example, Task, grey_to_rgb

# Real photographs shipped inside scikit-image (its synthetic and 3-D images left out).
SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)


def skimage_photos() -> list[tuple[str, np.ndarray, str]]:
    """(name, uint8 image, caption) of each photo; the caption is its loader's docstring line."""
    photos = []
    for name in SKIMAGE_PHOTOS:
        loader = getattr(skimage.data, name)
        caption = inspect.getdoc(loader).split("\n")[0].strip().replace('"', "")
        photos.append((name, np.asarray(loader()), caption))
    return photos


class SkimagePhotos(builders.Builder):
    """scikit-image's real photographs as image-text pairs (``source`` is scikit-image's data
    directory, found automatically)."""

    FEATURES = builders.PAIR_FEATURES

    def __init__(self, *, source: str | None = None, **kwargs):
        if source is None:
            source = skimage.data.__path__[0]
        super().__init__(source=source, **kwargs)

    def _generate_examples(self):
        for name, image, caption in skimage_photos():
            yield name, {"key": name, "image": builders.png_bytes(image), "caption": caption.encode(), "meta": "{}"}


SOURCES.register("skimage_photos", Source("pairs", SkimagePhotos, lambda: skimage.data.__path__[0]))


@TASKS.register("skimage_captions")
def captioning() -> Task:
    """Every photo is a query and the others are its demonstrations."""
    examples = [
        Example(name, grey_to_rgb(image)[..., :3], [caption.rstrip(".")]) for name, image, caption in skimage_photos()
    ]
    return Task("skimage_captions", "captioning", examples, examples)
