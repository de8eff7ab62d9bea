"""Fashion-MNIST (Debian's ``dataset-fashion-mnist``) as the demo's data: captioned pairs and
interleaved few-shot documents to train on, and few-shot classification, VQA and captioning of
held-out test images to evaluate on. Registered as data sources ``fashion_mnist_pairs`` /
``fashion_mnist_fewshot`` and as evaluation tasks ``fashion_mnist`` / ``fashion_mnist_vqa`` /
``fashion_mnist_captions``."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os

import numpy as np

from flamingo_jax.data import builders
from flamingo_jax.data.sources import SOURCES, Source
from flamingo_jax.evaluation.tasks import TASKS, Example, Task, Templates, grey_to_rgb

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
CAPTION = "A photo of a {}."


def read_fashion_mnist(source: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8[N, 28, 28] images and int labels of a split ('train' or 'test') from the idx files."""
    prefix = {"train": "train", "test": "t10k"}[split]
    paths = [os.path.join(source, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} is missing (install Debian's dataset-fashion-mnist: "
                "apt-get install dataset-fashion-mnist)"
            )
    with gzip.open(paths[0], "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(paths[1], "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels in {source}")
    return images, labels


class FashionMNISTPairs(builders.Builder):
    """Fashion-MNIST as image-text pairs: ``A photo of a {class}.``; ``meta`` holds the label.
    ``limit`` keeps the first examples of each split (for tests)."""

    FEATURES = builders.PAIR_FEATURES
    SPLITS = ("train", "test")

    def __init__(self, *, source: str = FASHION_MNIST_DIR, limit: int | None = None, **kwargs):
        self._limit = limit
        super().__init__(source=source, **kwargs)
        self._remember(limit=limit)

    def _generate_examples(self, split):
        images, labels = read_fashion_mnist(self._source, split)
        for index, (image, label) in enumerate(zip(images[: self._limit], labels[: self._limit], strict=True)):
            name = CLASSES[label]
            yield (
                index,
                {
                    "key": f"{split}/{index}",
                    "image": builders.png_bytes(image),
                    "caption": CAPTION.format(name).encode(),
                    "meta": json.dumps({"label": int(label), "class": name}),
                },
            )


class FashionMNISTFewShot(builders.Builder):
    """Fashion-MNIST as interleaved few-shot documents: ``shots`` images of a seeded shuffle,
    each followed by its caption (``<image>A photo of a {class}.<|endofchunk|>...``; use
    ``p_next = 1`` to keep each image before its text).

    ``repeat_class``: the probability that a shot after the first shows another image of the
    class of an earlier shot of the same document. At 0 the shots are independent, their labels
    say nothing about the next image, and a model trained on them learns to ignore its
    demonstrations; above 0 the earlier captions are evidence, as demonstrations chosen by
    similarity (RICES) are at evaluation."""

    FEATURES = builders.DOCUMENT_FEATURES
    SPLITS = ("train", "test")

    def __init__(
        self,
        *,
        source: str = FASHION_MNIST_DIR,
        shots: int = 8,
        limit: int | None = None,
        repeat_class: float = 0.0,
        **kwargs,
    ):
        if shots < 1:
            raise ValueError(f"FashionMNISTFewShot: shots must be >= 1, got {shots}")
        if not 0.0 <= repeat_class <= 1.0:
            raise ValueError(f"FashionMNISTFewShot: repeat_class must be in [0, 1], got {repeat_class}")
        self._shots, self._limit, self._repeat = shots, limit, repeat_class
        super().__init__(source=source, **kwargs)
        self._remember(shots=shots, limit=limit, **({"repeat_class": repeat_class} if repeat_class else {}))

    def _documents(self, labels: np.ndarray) -> list[list[int]]:
        """Image indices of every document."""
        order = np.random.default_rng(len(labels)).permutation(len(labels))
        count = len(order) // self._shots
        if not self._repeat:
            return [list(order[d * self._shots : (d + 1) * self._shots]) for d in range(count)]
        rng = np.random.default_rng([len(labels), 1])
        of_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}
        taken = {c: 0 for c in of_class}
        fresh = iter(order)
        documents = []
        for _ in range(count):
            members = []
            for _ in range(self._shots):
                if members and rng.random() < self._repeat:
                    cls = labels[members[int(rng.integers(len(members)))]]
                    pool = of_class[cls]
                    pick = pool[taken[cls] % len(pool)]
                    taken[cls] += 1
                    if pick in members and len(pool) > 1:  # another image of the class
                        pick = pool[taken[cls] % len(pool)]
                        taken[cls] += 1
                    members.append(int(pick))
                else:
                    members.append(int(next(fresh)))
            documents.append(members)
        return documents

    def _generate_examples(self, split):
        images, labels = read_fashion_mnist(self._source, split)
        images, labels = images[: self._limit], labels[: self._limit]
        for document, members in enumerate(self._documents(labels)):
            key = f"{split}/{document}"
            texts = [CAPTION.format(CLASSES[labels[i]]) for i in members]
            yield (
                key,
                builders.document_record(
                    key, texts, [builders.png_bytes(images[i]) for i in members], list(range(len(members)))
                ),
            )


SOURCES.register("fashion_mnist_pairs", Source("pairs", FashionMNISTPairs, lambda: FASHION_MNIST_DIR))
SOURCES.register("fashion_mnist_fewshot", Source("documents", FashionMNISTFewShot, lambda: FASHION_MNIST_DIR))


# -- evaluation tasks --------------------------------------------------------------------------


@TASKS.register("fashion_mnist")
def classification(*, num_queries: int = 1000, pool_size: int = 2000, source: str = FASHION_MNIST_DIR) -> Task:
    """Fashion-MNIST test images as queries, demonstrations from the train split; the classes
    read as in the demo mixture's captions (``A photo of a {class}.``)."""

    def examples(split: str, indices) -> list[Example]:
        images, labels = read_fashion_mnist(source, split)
        indices = indices(len(images))
        return [
            Example(f"{split}/{i}", grey_to_rgb(images[i]), [CLASSES[labels[i]]], label=int(labels[i])) for i in indices
        ]

    queries = examples("test", lambda count: np.random.default_rng(0).permutation(count)[:num_queries])
    pool = examples("train", lambda count: range(pool_size))
    return Task("fashion_mnist", "classification", queries, pool, class_names=CLASSES)


@TASKS.register("fashion_mnist_vqa")
def vqa(*, num_queries: int = 500, pool_size: int = 2000, source: str = FASHION_MNIST_DIR) -> Task:
    """Templated open-ended VQA over Fashion-MNIST: 'What item of clothing is this?' with the
    class name as all 10 annotator answers."""
    task = classification(num_queries=num_queries, pool_size=pool_size, source=source)
    question = "What item of clothing is this?"
    convert = lambda e: dataclasses.replace(e, question=question, answers=[e.answers[0]] * 10)
    return Task("fashion_mnist_vqa", "vqa", [convert(e) for e in task.queries], [convert(e) for e in task.pool])


@TASKS.register("fashion_mnist_captions")
def captioning(*, num_queries: int = 1000, pool_size: int = 2000, source: str = FASHION_MNIST_DIR) -> Task:
    """Captioning of held-out images: Fashion-MNIST test images, each to be captioned from the
    image alone as the demo mixture captions the training images (``A photo of a {class}.``);
    the prompt is just ``<image>`` (demonstrations: ``<image> {caption}<|endofchunk|>``)."""
    task = classification(num_queries=num_queries, pool_size=pool_size, source=source)
    convert = lambda e: dataclasses.replace(e, answers=[CAPTION.format(e.answers[0])])
    return Task(
        "fashion_mnist_captions",
        "captioning",
        [convert(e) for e in task.queries],
        [convert(e) for e in task.pool],
        templates=Templates("{answer}", "", "{answer}"),
    )
