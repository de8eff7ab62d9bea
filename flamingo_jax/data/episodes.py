"""Few-shot episodes over labelled image collections: what teaches and tests in-context binding.

An N-way K-shot episode shows K demonstrations of each of N classes (balanced, in random
order), each ``<image>A photo of a {label}.``, then a query image of one of the N classes; the
model must name it with one of the N labels. The labels' ``flavour``:

* ``'names'``: the classes' real names (what the model may already know);
* ``'novel'``: invented words bound to the classes for this episode only (``'dax'``, ``'wug'``):
  the demonstrations are the only way to the answer (Frozen's open-ended miniImageNet);
* ``'words'``: real words of other things drawn per episode (training: a word carries no class
  information across documents).

A :class:`Collection` is one image source's classes and images, loaded lazily by id; projects
register theirs in ``COLLECTIONS`` (``ImageFolder`` reads a folder of class folders). Classes are
held out by a stable hash of their name (:func:`split_classes`), so a class stays on its side as
a collection grows. Episodes are written to and read from JSON lines (:func:`write_episodes`,
:func:`read_episodes`), one episode per line::

    {"demos": [{"image": "a.png", "label": "dax"}, ...],
     "query": {"image": "q.png", "label": "dax"},
     "candidates": ["dax", "wug", "zib"]}

(image paths relative to the file; ``"id"`` optional; the query's label is one of the
candidates).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from flamingo_jax.data import builders
from flamingo_jax.data.images import image_file
from flamingo_jax.registry import Registry

FLAVOURS = ("names", "novel", "words")
TEMPLATE = "A photo of a {}."
# Training documents: 'balanced' episodes (their demonstrations, then the query), or 'iid'
# sequences whose every image's class is drawn afresh (no count of earlier labels predicts it).
ORDERS = ("balanced", "iid")
# Which labels of a training document carry a loss: 'all', or 'answerable' (those an earlier
# shot of the document names: a label seen for the first time cannot be known from the document
# unless it is the class's real name).
LOSSES = ("all", "answerable")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")

ImageLoader = Callable[[], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Collection:
    """One image source: ``classes`` (real names) and, for each, its images' loaders (callables
    returning uint8[H, W, 3]). An image's id is ``'{name}/{class index}/{image index}'``."""

    name: str
    classes: tuple[str, ...]
    images: tuple[tuple[ImageLoader, ...], ...]

    def __post_init__(self):
        if len(self.classes) != len(self.images):
            raise ValueError(
                f"collection {self.name!r}: {len(self.classes)} classes but {len(self.images)} image lists"
            )
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"collection {self.name!r}: duplicate class names")
        empty = [c for c, images in zip(self.classes, self.images, strict=True) if not images]
        if empty:
            raise ValueError(f"collection {self.name!r}: classes without images: {empty[:5]}")

    def image_id(self, class_index: int, image_index: int) -> str:
        return f"{self.name}/{class_index}/{image_index}"

    def load(self, image_id: str) -> np.ndarray:
        name, class_index, image_index = image_id.rsplit("/", 2)
        if name != self.name:
            raise KeyError(f"image {image_id!r} is not in collection {self.name!r}")
        image = np.asarray(self.images[int(class_index)][int(image_index)]())
        return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]

    def subset(self, class_indices: Sequence[int]) -> Collection:
        """The collection restricted to ``class_indices`` (ids renumbered)."""
        return Collection(
            self.name, tuple(self.classes[i] for i in class_indices), tuple(self.images[i] for i in class_indices)
        )


COLLECTIONS: Registry[Callable[..., Collection]] = Registry("image collection")


def image_folder(root: str, *, name: str | None = None, min_images: int = 2) -> Collection:
    """A folder of class folders (``root/<class name>/<image files>``); underscores in a folder's
    name read as spaces. Classes with fewer than ``min_images`` images are left out."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image_folder: {root!r} is not a directory")
    classes, images = [], []
    for entry in sorted(os.listdir(root)):
        folder = os.path.join(root, entry)
        if not os.path.isdir(folder):
            continue
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        if len(files) >= min_images:
            classes.append(entry.replace("_", " "))
            images.append(tuple(image_file(os.path.join(folder, f)) for f in files))
    if not classes:
        raise FileNotFoundError(f"image_folder: no class folder in {root!r} has {min_images} or more images")
    return Collection(name or os.path.basename(os.path.normpath(root)), tuple(classes), tuple(images))


COLLECTIONS.register("image_folder", image_folder)


def heldout(class_name: str, fraction: float) -> bool:
    """Whether a class is held out of training: a stable hash of its name (not of its position,
    so a class keeps its side when a collection grows)."""
    digest = hashlib.sha256(class_name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_classes(collection: Collection, fraction: float) -> tuple[list[int], list[int]]:
    """(training class indices, held-out class indices) of ``collection``."""
    out = [i for i, name in enumerate(collection.classes) if heldout(name, fraction)]
    held = set(out)
    return [i for i in range(len(collection.classes)) if i not in held], out


# -- labels ------------------------------------------------------------------------------------

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "bl", "gr", "pl", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "b", "d", "k", "m", "n", "p", "s", "t", "x", "z")


def novel_word(rng: np.random.Generator) -> str:
    """An invented word of one or two syllables (``'dax'``, ``'plomet'``)."""
    syllables = 1 + int(rng.integers(2))
    parts = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(syllables)]
    return "".join(parts) + _CODAS[rng.integers(len(_CODAS))]


def episode_labels(
    flavour: str, class_names: Sequence[str], rng: np.random.Generator, *, words: Sequence[str] = (), avoid=()
) -> list[str]:
    """Distinct labels for the classes of one episode in the given flavour. ``words``: the real
    words the ``'words'`` flavour draws from (never the episode's own classes); ``avoid``: what
    no invented word may equal (e.g. every real class name)."""
    if flavour == "names":
        return list(class_names)
    if flavour == "words":
        choices = [w for w in dict.fromkeys(words) if w not in class_names]
        if len(choices) < len(class_names):
            raise ValueError(f"episode_labels: 'words' needs {len(class_names)} words besides the classes' own names")
        return [choices[i] for i in rng.choice(len(choices), len(class_names), replace=False)]
    if flavour == "novel":
        avoid = set(avoid) | set(class_names)
        labels: list[str] = []
        while len(labels) < len(class_names):
            word = novel_word(rng)
            if word not in avoid and word not in labels:
                labels.append(word)
        return labels
    raise ValueError(f"unknown label flavour {flavour!r}; available: {list(FLAVOURS)}")


def split_template(template: str) -> tuple[str, str]:
    """(the text before the label, the text after it) of a template with one ``{}``:
    ``'A photo of a {}.'`` -> ``('A photo of a ', '.')``."""
    if template.count("{}") != 1:
        raise ValueError(f"a label template needs exactly one '{{}}', got {template!r}")
    head, tail = template.split("{}")
    return head, tail


# -- episodes ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shot:
    """An image (a collection id or a file path) and the label shown with it."""

    image: str
    label: str


@dataclasses.dataclass(frozen=True)
class Episode:
    """Demonstrations, a query whose ``label`` is the answer, and the candidate labels ranked.
    ``classes``: the real class of each candidate (for reports; empty when unknown)."""

    demos: tuple[Shot, ...]
    query: Shot
    candidates: tuple[str, ...]
    classes: tuple[str, ...] = ()
    id: str = ""

    def __post_init__(self):
        if len(set(self.candidates)) != len(self.candidates) or len(self.candidates) < 2:
            raise ValueError(f"episode {self.id!r}: needs two or more distinct candidates, got {self.candidates}")
        if self.query.label not in self.candidates:
            raise ValueError(f"episode {self.id!r}: the query's label {self.query.label!r} is not a candidate")

    @property
    def answer(self) -> int:
        return self.candidates.index(self.query.label)

    @property
    def shots(self) -> int:
        """Demonstrations per class (the most of any candidate)."""
        return max((sum(d.label == c for d in self.demos) for c in self.candidates), default=0)


def sample_episode(
    collection: Collection,
    ways: int,
    shots: int,
    flavour: str,
    rng: np.random.Generator,
    *,
    classes: Sequence[int] | None = None,
    words: Sequence[str] = (),
    avoid=(),
    min_images: int | None = None,
    episode_id: str = "",
) -> Episode:
    """One balanced ``ways``-way ``shots``-shot episode over ``classes`` (indices into the
    collection; default all) with labels of ``flavour``. Every image is distinct; the query is
    of a class chosen uniformly; the demonstrations come in random order.

    Episodes drawn from the same ``rng`` state with the same ``min_images`` (default
    ``shots + 1``: the classes eligible) are nested across shot counts: the same classes, labels
    and query, and the demonstrations of fewer shots among those of more."""
    min_images = shots + 1 if min_images is None else min_images
    if min_images < shots + 1:
        raise ValueError(f"sample_episode: min_images={min_images} < shots + 1 = {shots + 1}")
    pool = list(range(len(collection.classes)) if classes is None else classes)
    usable = [c for c in pool if len(collection.images[c]) >= min_images]
    if len(usable) < ways:
        raise ValueError(
            f"collection {collection.name!r}: {ways}-way episodes need {ways} classes with {min_images}+ images, "
            f"{len(usable)} have them"
        )
    chosen = [usable[i] for i in rng.choice(len(usable), ways, replace=False)]
    labels = episode_labels(flavour, [collection.classes[c] for c in chosen], rng, words=words, avoid=avoid)
    target = int(rng.integers(ways))
    orders = [rng.permutation(len(collection.images[c])) for c in chosen]
    query = Shot(collection.image_id(chosen[target], int(orders[target][0])), labels[target])
    demos = []
    for way, (c, order) in enumerate(zip(chosen, orders, strict=True)):
        start = int(way == target)  # the target's first image is the query
        demos.extend(Shot(collection.image_id(c, int(i)), labels[way]) for i in order[start : start + shots])
    # Nested across shot counts: the k-shot demonstrations keep their relative order at k + 1.
    keys = rng.random((ways, max(min_images, 1)))
    rank = [keys[way, j] for way in range(ways) for j in range(shots)]
    order = np.argsort(rank, kind="stable")
    return Episode(
        tuple(demos[i] for i in order),
        query,
        tuple(labels),
        tuple(collection.classes[c] for c in chosen),
        episode_id,
    )


def sample_episodes(
    collection: Collection,
    count: int,
    *,
    ways: int,
    shots: int,
    flavour: str,
    seed: int,
    classes: Sequence[int] | None = None,
    words: Sequence[str] = (),
    avoid=(),
    min_images: int | None = None,
) -> list[Episode]:
    """``count`` episodes, reproducible from ``seed``; with the same ``min_images``, those of
    different shot counts are nested (see :func:`sample_episode`)."""
    return [
        sample_episode(
            collection,
            ways,
            shots,
            flavour,
            np.random.default_rng([seed, index]),
            classes=classes,
            words=words,
            avoid=avoid,
            min_images=min_images,
            episode_id=f"{collection.name}/{ways}way/{flavour}/{seed}/{index}",
        )
        for index in range(count)
    ]


def sample_sequence(
    collection: Collection,
    ways: int,
    length: int,
    flavour: str,
    rng: np.random.Generator,
    *,
    classes: Sequence[int] | None = None,
    words: Sequence[str] = (),
    avoid=(),
) -> list[Shot]:
    """``length`` shots of ``ways`` classes (from ``classes``, default all), each shot's class
    drawn independently and uniformly, every image distinct, labels of ``flavour`` bound for this
    sequence. Unlike a balanced episode, no count of the earlier labels tells the next one. A
    class whose images are used up is not drawn again; the sequence ends early when all are."""
    pool = list(range(len(collection.classes)) if classes is None else classes)
    usable = [c for c in pool if len(collection.images[c]) >= 2]
    if len(usable) < ways:
        raise ValueError(
            f"collection {collection.name!r}: {ways}-way sequences need {ways} classes with 2+ images, "
            f"{len(usable)} have them"
        )
    chosen = [usable[i] for i in rng.choice(len(usable), ways, replace=False)]
    labels = episode_labels(flavour, [collection.classes[c] for c in chosen], rng, words=words, avoid=avoid)
    orders = [list(rng.permutation(len(collection.images[c]))) for c in chosen]
    shots = []
    for _ in range(length):
        open_ways = [w for w in range(ways) if orders[w]]
        if not open_ways:
            break
        way = open_ways[int(rng.integers(len(open_ways)))]
        shots.append(Shot(collection.image_id(chosen[way], int(orders[way].pop())), labels[way]))
    return shots


def answerable(shots: Sequence[Shot], flavour: str) -> list[bool]:
    """Whether each shot's label can be known from the document: named by an earlier shot, or
    any label of the ``'names'`` flavour (the class's own name, known from the image)."""
    seen: set[str] = set()
    known = []
    for shot in shots:
        known.append(flavour == "names" or shot.label in seen)
        seen.add(shot.label)
    return known


# -- JSON lines --------------------------------------------------------------------------------


def write_episodes(path: str, episodes: Sequence[Episode]) -> None:
    """One episode per line, in the format :func:`read_episodes` reads (images as given)."""
    with open(path, "w") as f:
        for e in episodes:
            record = {
                "id": e.id,
                "demos": [{"image": d.image, "label": d.label} for d in e.demos],
                "query": {"image": e.query.image, "label": e.query.label},
                "candidates": list(e.candidates),
            }
            f.write(json.dumps(record) + "\n")


def read_episodes(path: str) -> list[Episode]:
    """Episodes from a JSON-lines file; relative image paths are resolved against the file's
    folder. A malformed line is an error naming the file and line."""
    base = os.path.dirname(os.path.abspath(path))
    resolve = lambda image: image if os.path.isabs(image) else os.path.join(base, image)
    episodes = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                demos = tuple(Shot(resolve(d["image"]), str(d["label"])) for d in record.get("demos", []))
                query = Shot(resolve(record["query"]["image"]), str(record["query"]["label"]))
                episode = Episode(
                    demos, query, tuple(str(c) for c in record["candidates"]), id=str(record.get("id", number))
                )
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not an episode record ({type(error).__name__}: {error})") from None
            for shot in (*demos, query):
                if not os.path.isfile(shot.image):
                    raise FileNotFoundError(f"{path}:{number}: image {shot.image} does not exist")
            episodes.append(episode)
    if not episodes:
        raise ValueError(f"{path}: no episodes")
    return episodes


def load_image(image: str, collections: dict[str, Collection] | None = None) -> np.ndarray:
    """An episode's image: a collection's id when its prefix names one of ``collections``, else
    a file path. uint8[H, W, 3]."""
    prefix = image.split("/", 1)[0]
    if collections and prefix in collections and not os.path.isfile(image):
        return collections[prefix].load(image)
    return image_file(image)()  # decoded as RGB


# -- training documents ------------------------------------------------------------------------


def open_collections(specs: dict[str, dict]) -> dict[str, Collection]:
    """{name: Collection} from ``{registered collection: its options}``."""
    return {name: COLLECTIONS[name](**(options or {})) for name, options in specs.items()}


class EpisodeDocuments(builders.Builder):
    """Few-shot episodes as interleaved training documents: ``<image>`` and the ``template``
    (default ``A photo of a {label}.``) then ``<|endofchunk|>`` for each shot, so the later shots
    can only be answered from the earlier ones when the labels are invented for the document.

    ``collections``: ``{registered collection: options}``; classes of each whose name hashes
    into ``heldout_fraction`` never appear (:func:`split_classes`). Each document picks a
    collection (``weights``, default equal), a way count from ``ways`` and a shot count from
    ``shots`` (with at most ``max_images`` images), and a label flavour by ``flavours``
    (``{flavour: probability}``). The ``'words'`` flavour draws from the training classes' names
    of every collection; invented words never equal a class name. ``order`` (:data:`ORDERS`):
    a balanced episode (``ways x shots`` demonstrations, then the query), or ``max_images``
    images whose classes are drawn independently (``'iid'``: ``shots`` unused; a document fills
    its sequence, with its early shots the few-shot cases). ``loss`` (:data:`LOSSES`): ``'answerable'``
    gives the texts whose label no earlier shot names (:func:`answerable`) no loss. ``source`` is
    not read (the collections know their files); ``documents`` are written, reproducibly from
    ``seed``."""

    FEATURES = {**builders.DOCUMENT_FEATURES, "text_weights": tfds.features.Sequence(np.float32)}

    def __init__(
        self,
        *,
        source: str,
        collections: dict[str, dict],
        heldout_fraction: float = 0.2,
        weights: dict[str, float] | None = None,
        ways: Sequence[int] = (2, 3, 5),
        shots: Sequence[int] = (1, 2, 3),
        flavours: dict[str, float] | None = None,
        max_images: int = 12,
        documents: int = 10_000,
        order: str = "balanced",
        loss: str = "all",
        template: str = TEMPLATE,
        seed: int = 0,
        **kwargs,
    ):
        flavours = flavours or {"novel": 0.5, "words": 0.3, "names": 0.2}
        unknown = set(flavours) - set(FLAVOURS)
        if unknown:
            raise ValueError(f"EpisodeDocuments: unknown flavours {sorted(unknown)}; available: {list(FLAVOURS)}")
        if order not in ORDERS:
            raise ValueError(f"EpisodeDocuments: order={order!r}; available: {list(ORDERS)}")
        if loss not in LOSSES:
            raise ValueError(f"EpisodeDocuments: loss={loss!r}; available: {list(LOSSES)}")
        split_template(template)
        if order == "iid" and max_images <= max(ways):
            raise ValueError(f"EpisodeDocuments: iid documents of {max(ways)} ways need max_images > {max(ways)}")
        if order == "balanced" and not any(w * s + 1 <= max_images for w in ways for s in shots):
            raise ValueError(f"EpisodeDocuments: no (ways, shots) in {ways} x {shots} fits max_images={max_images}")
        COLLECTIONS.check(collections, "EpisodeDocuments.collections")
        self._options = dict(
            collections=collections,
            heldout_fraction=heldout_fraction,
            weights=weights,
            ways=tuple(ways),
            shots=tuple(shots),
            flavours=flavours,
            max_images=max_images,
            documents=documents,
            order=order,
            loss=loss,
            template=template,
            seed=seed,
        )
        super().__init__(source=source, **kwargs)
        self._remember(**self._options)

    def _generate_examples(self):
        o = self._options
        opened = open_collections(o["collections"])
        training = {name: split_classes(c, o["heldout_fraction"])[0] for name, c in opened.items()}
        words = [opened[n].classes[i] for n, kept in training.items() for i in kept]
        avoid = {name for c in opened.values() for name in c.classes}
        names = list(opened)
        weights = np.asarray([(o["weights"] or {}).get(n, 1.0) for n in names], np.float64)
        flavours, chances = list(o["flavours"]), np.asarray(list(o["flavours"].values()), np.float64)
        if o["order"] == "iid":
            shapes = [(w, None) for w in o["ways"]]
        else:
            shapes = [(w, s) for w in o["ways"] for s in o["shots"] if w * s + 1 <= o["max_images"]]
        for index in range(o["documents"]):
            rng = np.random.default_rng([o["seed"], index])
            name = names[rng.choice(len(names), p=weights / weights.sum())]
            ways, shots = shapes[rng.integers(len(shapes))]
            flavour = flavours[rng.choice(len(flavours), p=chances / chances.sum())]
            chosen = dict(classes=training[name], words=words, avoid=avoid)
            if o["order"] == "iid":
                shown = sample_sequence(opened[name], ways, o["max_images"], flavour, rng, **chosen)
            else:
                episode = sample_episode(opened[name], ways, shots, flavour, rng, **chosen)
                shown = [*episode.demos, episode.query]
            key = f"{name}/{index}"
            texts = [o["template"].format(s.label) for s in shown]
            images = [builders.png_bytes(opened[name].load(s.image)) for s in shown]
            record = builders.document_record(key, texts, images, list(range(len(shown))))
            known = answerable(shown, flavour) if o["loss"] == "answerable" else [True] * len(shown)
            yield key, {**record, "text_weights": np.asarray(known, np.float32)}
