"""The demo's labelled image collections for few-shot episodes (``flamingo_jax.data.episodes``),
from Debian packages, nothing downloaded:

* ``fashion_mnist``: Fashion-MNIST's 10 classes (``dataset-fashion-mnist``), a split's images;
* ``emoji``: the emoji of Google's Noto Color Emoji font (``fonts-noto-color-emoji``), each a
  class named by its Unicode name ("red apple"), its images the glyph drawn at random sizes,
  positions, angles and background colours;
* ``icons``: freedesktop icons (``printer``, ``media-eject``) drawn by several icon themes
  (``*-icon-theme``): a class is an icon name, its images that icon in each theme that has it,
  so the same thing in different artists' styles.
"""

from __future__ import annotations

import functools
import os
import unicodedata

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flamingo_jax.data.episodes import COLLECTIONS, Collection
from flamingo_jax.data.images import image_file
from flamingo_jax.demo.fashion_mnist import CLASSES, FASHION_MNIST_DIR, read_fashion_mnist
from flamingo_jax.evaluation.episodic import episodes_task
from flamingo_jax.evaluation.tasks import TASKS

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"  # Debian's fonts-noto-color-emoji
ICON_ROOT = "/usr/share/icons"
# Base themes only (their -dark variants redraw the same icons); install with apt-get install
# oxygen-icon-theme tango-icon-theme gnome-icon-theme mate-icon-theme elementary-xfce-icon-theme
# faenza-icon-theme lxde-icon-theme. Themes that are missing are skipped.
ICON_THEMES = ("oxygen", "Tango", "gnome", "mate", "elementary-xfce", "Faenza", "nuoveXT2", "hicolor", "Adwaita")


@COLLECTIONS.register("fashion_mnist")
def fashion_mnist(*, split: str = "train", per_class: int = 500, source: str = FASHION_MNIST_DIR) -> Collection:
    """The first ``per_class`` images of each class of a split."""
    images, labels = read_fashion_mnist(source, split)
    loaders = []
    for label in range(len(CLASSES)):
        chosen = np.flatnonzero(labels == label)[:per_class]
        loaders.append(tuple(functools.partial(lambda image: image, images[i]) for i in chosen))
    return Collection("fashion_mnist", CLASSES, tuple(loaders))


# -- emoji -------------------------------------------------------------------------------------

# Single code points in these blocks that the font draws (flags and ZWJ sequences left out).
_EMOJI_RANGES = ((0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF))
_EMOJI_SIZE = 109  # the font's only bitmap size (CBDT)


@functools.lru_cache(maxsize=1)
def _emoji_font() -> ImageFont.FreeTypeFont:
    if not os.path.isfile(EMOJI_FONT):
        raise FileNotFoundError(
            f"emoji font {EMOJI_FONT} is missing (install Debian's fonts-noto-color-emoji: "
            "apt-get install fonts-noto-color-emoji)"
        )
    return ImageFont.truetype(EMOJI_FONT, _EMOJI_SIZE)


@functools.lru_cache(maxsize=4096)
def _glyph(character: str) -> Image.Image | None:
    """The emoji drawn in colour on a transparent square, cropped to its ink; None if the font
    has no glyph for it."""
    font = _emoji_font()
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), character, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None or box[2] - box[0] < 20:
        return None
    return canvas.crop(box)


def _emoji_image(character: str, seed: int, size: int) -> np.ndarray:
    """uint8[size, size, 3]: the glyph scaled to 45-90% of the image, turned by up to 25 degrees,
    at a random place on a random light background; seed 0 is the glyph centred on white."""
    glyph = _glyph(character)
    rng = np.random.default_rng([ord(character), seed])
    if seed == 0:
        scale, angle, background = 0.8, 0.0, (255, 255, 255)
    else:
        scale, angle = rng.uniform(0.45, 0.9), rng.uniform(-25, 25)
        background = tuple(int(v) for v in rng.integers(150, 256, 3))
    side = max(8, int(size * scale))
    drawn = glyph.resize((side, side), Image.LANCZOS).rotate(angle, resample=Image.BICUBIC, expand=True)
    image = Image.new("RGB", (size, size), background)
    free = (max(size - drawn.width, 0), max(size - drawn.height, 0))
    at = (free[0] // 2, free[1] // 2) if seed == 0 else (int(rng.integers(free[0] + 1)), int(rng.integers(free[1] + 1)))
    image.paste(drawn, at, mask=drawn.split()[-1])
    return np.asarray(image)


@COLLECTIONS.register("emoji")
def emoji(*, per_class: int = 12, size: int = 96) -> Collection:
    """Every single-code-point emoji of the font as a class named by its Unicode name (lower
    case), with ``per_class`` drawings."""
    classes, loaders = [], []
    for first, last in _EMOJI_RANGES:
        for code in range(first, last + 1):
            character = chr(code)
            name = unicodedata.name(character, "").lower()
            if not name or _glyph(character) is None or name in classes:
                continue
            classes.append(name)
            loaders.append(tuple(functools.partial(_emoji_image, character, i, size) for i in range(per_class)))
    return Collection("emoji", tuple(classes), tuple(loaders))


# -- icons -------------------------------------------------------------------------------------


def _theme_icons(theme_dir: str, min_size: int) -> dict[str, str]:
    """{icon name: the path of its largest PNG (of at least ``min_size`` px, at most 128)}."""
    best: dict[str, tuple[int, str]] = {}
    for directory, _, files in os.walk(theme_dir):
        size = _size_of(directory)
        if size is None or not min_size <= size <= 128:
            continue
        for file in files:
            name, suffix = os.path.splitext(file)
            if suffix != ".png" or "symbolic" in name:
                continue
            if name not in best or size > best[name][0]:
                best[name] = (size, os.path.join(directory, file))
    return {name: path for name, (_, path) in best.items()}


def _size_of(directory: str) -> int | None:
    """The pixel size of an icon theme folder (``48x48``, ``48``), None if it names none."""
    for part in directory.split(os.sep):
        head = part.split("x")[0].split("@")[0]
        if head.isdigit():
            return int(head)
    return None


@COLLECTIONS.register("icons")
def icons(*, min_themes: int = 5, min_size: int = 32, root: str = ICON_ROOT, themes=ICON_THEMES) -> Collection:
    """Icon names drawn by at least ``min_themes`` of ``themes`` as classes (``'media-eject'``
    reads ``'media eject'``); an icon that is another's alias in every theme (the same files)
    counts once."""
    found = {t: _theme_icons(os.path.join(root, t), min_size) for t in themes if os.path.isdir(os.path.join(root, t))}
    if len(found) < min_themes:
        raise FileNotFoundError(
            f"icons: {len(found)} of the icon themes {list(themes)} are installed under {root}, {min_themes} needed "
            "(apt-get install oxygen-icon-theme tango-icon-theme gnome-icon-theme mate-icon-theme "
            "elementary-xfce-icon-theme faenza-icon-theme lxde-icon-theme)"
        )
    names = sorted({n for icons_of in found.values() for n in icons_of})
    classes, loaders, seen = [], [], set()
    for name in names:
        paths = [found[t][name] for t in found if name in found[t]]
        files = tuple(sorted({os.path.realpath(p) for p in paths}))
        label = name.replace("-", " ").replace("_", " ")
        if len(files) < min_themes or files in seen or label in classes:
            continue
        seen.add(files)
        classes.append(label)
        loaders.append(tuple(image_file(p) for p in files))
    return Collection("icons", tuple(classes), tuple(loaders))


# -- evaluation tasks: binding on held-out classes ---------------------------------------------

# Emoji are the held-out image source (no emoji is in the demo's training data); icons and
# Fashion-MNIST are the training sources, whose hash-held-out classes are tested too.
for _name, _options in {
    "binding_emoji_3way_novel": dict(collection="emoji", ways=3, flavour="novel"),
    "binding_emoji_5way_novel": dict(collection="emoji", ways=5, flavour="novel"),
    "binding_emoji_3way_names": dict(collection="emoji", ways=3, flavour="names"),
    "binding_icons_3way_novel": dict(collection="icons", ways=3, flavour="novel"),
}.items():
    TASKS.register(_name, functools.partial(episodes_task, name=_name, classes="heldout", **_options))
