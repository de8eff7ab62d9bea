"""Evaluation tasks: what is asked, how a demonstration and a query read, and the data.

A :class:`Task` holds query examples and a pool of demonstration examples. Its ``kind`` picks
the metric: 'captioning' (CIDEr, BLEU-4), 'vqa' (VQAv2 accuracy), 'classification' (top-1 by
class log-likelihood) or 'binary' (ROC-AUC of the positive class, e.g. HatefulMemes).

Readers for the standard formats: COCO / Flickr30k Karpathy-split JSON, VQAv2 question +
annotation JSON, HatefulMemes jsonl. Offline real sets that ship here: Fashion-MNIST test
(classification, templated VQA) and scikit-image photos (captioning).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import numpy as np

KINDS = ("captioning", "vqa", "classification", "binary")


@dataclasses.dataclass
class Example:
    """One item. ``image`` is uint8[H, W, 3] or a callable returning it (read lazily from disk);
    ``answers``: reference captions, annotator answers, or the class name; ``label``: the class."""

    id: str
    image: np.ndarray | Callable[[], np.ndarray]
    answers: list[str] = dataclasses.field(default_factory=list)
    question: str = ""
    label: int = -1
    text: str = ""  # extra text shown with the image (a meme's caption)

    def load_image(self) -> np.ndarray:
        return self.image() if callable(self.image) else self.image


@dataclasses.dataclass(frozen=True)
class Templates:
    """How examples read. ``{question}``, ``{answer}`` and ``{text}`` are filled in; a
    demonstration is ``<image>`` + demo.format(...) + ``<|endofchunk|>``, the query is
    ``<image>`` + query.format(...), and the model continues it."""

    demo: str = "Output:{answer}"
    query: str = "Output:"
    # Zero-shot: two text-only demonstrations precede the query (Flamingo, Appendix B.1.5).
    text_only_demo: str = "Output:{answer}"


TEMPLATES = {
    "captioning": Templates("Output:{answer}", "Output:", "Output:{answer}"),
    "vqa": Templates(
        "Question:{question} Short answer:{answer}",
        "Question:{question} Short answer:",
        "Question:{question} Short answer:{answer}",
    ),
    "classification": Templates("A photo of a {answer}.", "A photo of a", "A photo of a {answer}."),
    "binary": Templates(
        "is an image with: '{text}' written on it. Is it hateful? Answer:{answer}",
        "is an image with: '{text}' written on it. Is it hateful? Answer:",
        "is an image with: '{text}' written on it. Is it hateful? Answer:{answer}",
    ),
}


@dataclasses.dataclass
class Task:
    """``class_names`` (classification, binary) are scored as ``' ' + name + class_suffix``."""

    name: str
    kind: str
    queries: list[Example]
    pool: list[Example]
    class_names: tuple[str, ...] = ()
    class_suffix: str = "."
    templates: Templates | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Task {self.name!r}: unknown kind {self.kind!r}; available: {list(KINDS)}")
        if self.kind in ("classification", "binary") and not self.class_names:
            raise ValueError(f"Task {self.name!r}: a {self.kind} task needs class_names")
        if not self.queries:
            raise ValueError(f"Task {self.name!r}: no query examples")
        if self.templates is None:
            self.templates = TEMPLATES[self.kind]

    def demo_answer(self, example: Example, rng: np.random.Generator) -> str:
        """The answer a demonstration shows: a random reference caption, the most common VQA
        answer, or the class name."""
        if self.kind == "captioning":
            return " " + example.answers[int(rng.integers(len(example.answers)))]
        if self.kind == "vqa":
            values, counts = np.unique(example.answers, return_counts=True)
            return " " + str(values[int(np.argmax(counts))])
        if self.kind == "classification":
            return self.class_names[example.label]
        return " " + self.class_names[example.label]


# -- offline real sets -----------------------------------------------------------------------


def _grey_to_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


def fashion_mnist_classification(*, num_queries: int = 1000, pool_size: int = 2000, source: str | None = None) -> Task:
    """Fashion-MNIST test images as queries, demonstrations from the train split; the classes
    read as in the demo mixture's captions (``A photo of a {class}.``)."""
    from flamingo_jax.data.builders import FASHION_MNIST_CLASSES, read_fashion_mnist
    from flamingo_jax.data.mixture import FASHION_MNIST_DIR

    source = source or FASHION_MNIST_DIR

    def examples(split: str, indices) -> list[Example]:
        images, labels = read_fashion_mnist(source, split)
        indices = indices(len(images))
        return [
            Example(f"{split}/{i}", _grey_to_rgb(images[i]), [FASHION_MNIST_CLASSES[labels[i]]], label=int(labels[i]))
            for i in indices
        ]

    queries = examples("test", lambda count: np.random.default_rng(0).permutation(count)[:num_queries])
    pool = examples("train", lambda count: range(pool_size))
    return Task("fashion_mnist", "classification", queries, pool, class_names=FASHION_MNIST_CLASSES)


def fashion_mnist_vqa(*, num_queries: int = 500, pool_size: int = 2000, source: str | None = None) -> Task:
    """Templated open-ended VQA over Fashion-MNIST: 'What item of clothing is this?' with the
    class name as all 10 annotator answers."""
    task = fashion_mnist_classification(num_queries=num_queries, pool_size=pool_size, source=source)
    question = "What item of clothing is this?"
    convert = lambda e: dataclasses.replace(e, question=question, answers=[e.answers[0]] * 10)
    return Task("fashion_mnist_vqa", "vqa", [convert(e) for e in task.queries], [convert(e) for e in task.pool])


def fashion_mnist_captioning(*, num_queries: int = 1000, pool_size: int = 2000, source: str | None = None) -> Task:
    """Captioning of held-out images: Fashion-MNIST test images, each to be captioned from the
    image alone as the demo mixture captions the training images (``A photo of a {class}.``);
    the prompt is just ``<image>`` (demonstrations: ``<image> {caption}<|endofchunk|>``)."""
    from flamingo_jax.data.builders import FASHION_MNIST_CAPTION

    task = fashion_mnist_classification(num_queries=num_queries, pool_size=pool_size, source=source)
    convert = lambda e: dataclasses.replace(e, answers=[FASHION_MNIST_CAPTION.format(e.answers[0])])
    return Task(
        "fashion_mnist_captions",
        "captioning",
        [convert(e) for e in task.queries],
        [convert(e) for e in task.pool],
        templates=Templates("{answer}", "", "{answer}"),
    )


def skimage_captioning() -> Task:
    """scikit-image's real photographs, captioned by their loaders' docstrings; every photo is a
    query and the others are its demonstrations."""
    from flamingo_jax.data.builders import skimage_photos

    examples = [
        Example(name, _grey_to_rgb(image)[..., :3], [caption.rstrip(".")]) for name, image, caption in skimage_photos()
    ]
    return Task("skimage_captions", "captioning", examples, examples)


# -- readers for the standard formats --------------------------------------------------------


def _image_file(path: str) -> Callable[[], np.ndarray]:
    def load():
        from flamingo_jax.data.images import decode_image

        with open(path, "rb") as f:
            return decode_image(f.read())

    return load


def read_karpathy(
    path: str, image_root: str, *, split: str = "test", pool_split: str = "train", name: str = "coco"
) -> Task:
    """COCO / Flickr30k Karpathy JSON (``images[*].{filepath, filename, split, sentences[*].raw}``)."""
    with open(path) as f:
        images = json.load(f)["images"]

    def examples(wanted: set[str]):
        out = []
        for item in images:
            if item["split"] in wanted:
                file = os.path.join(image_root, item.get("filepath", ""), item["filename"])
                out.append(
                    Example(
                        str(item.get("cocoid", item["filename"])),
                        _image_file(file),
                        [s["raw"].strip() for s in item["sentences"]],
                    )
                )
        return out

    pool_splits = {pool_split, "restval"} if pool_split == "train" else {pool_split}
    return Task(name, "captioning", examples({split}), examples(pool_splits))


def read_vqav2(
    questions: str,
    annotations: str,
    image_root: str,
    *,
    pool_questions: str | None = None,
    pool_annotations: str | None = None,
    image_name: str = "COCO_val2014_{image_id:012d}.jpg",
    pool_image_name: str = "COCO_train2014_{image_id:012d}.jpg",
    name: str = "vqav2",
) -> Task:
    """VQAv2 question + annotation JSON; demonstrations from another question/annotation pair
    (e.g. train) or, without one, from the queries themselves."""

    def read(questions_path, annotations_path, pattern):
        with open(questions_path) as f:
            asked = json.load(f)["questions"]
        with open(annotations_path) as f:
            answered = {a["question_id"]: a for a in json.load(f)["annotations"]}
        out = []
        for q in asked:
            annotation = answered.get(q["question_id"])
            if annotation is None:
                raise ValueError(f"{annotations_path}: no annotation for question {q['question_id']}")
            file = os.path.join(image_root, pattern.format(image_id=q["image_id"]))
            answers = [a["answer"] for a in annotation["answers"]]
            out.append(Example(str(q["question_id"]), _image_file(file), answers, question=q["question"]))
        return out

    queries = read(questions, annotations, image_name)
    pool = read(pool_questions, pool_annotations, pool_image_name) if pool_questions else queries
    return Task(name, "vqa", queries, pool)


def read_hateful_memes(
    path: str, image_root: str, *, pool_path: str | None = None, name: str = "hateful_memes"
) -> Task:
    """HatefulMemes jsonl (``{"id", "img", "label", "text"}``); ROC-AUC of 'yes'."""

    def read(file):
        out = []
        with open(file) as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    out.append(
                        Example(
                            str(item["id"]),
                            _image_file(os.path.join(image_root, item["img"])),
                            label=int(item["label"]),
                            text=item["text"],
                        )
                    )
                except (ValueError, KeyError) as error:
                    raise ValueError(f"{file}:{line_number}: not a HatefulMemes record ({error})") from None
        return out

    queries = read(path)
    return Task(
        name, "binary", queries, read(pool_path) if pool_path else queries, class_names=("no", "yes"), class_suffix=""
    )


OFFLINE_TASKS = {
    "fashion_mnist": fashion_mnist_classification,
    "fashion_mnist_vqa": fashion_mnist_vqa,
    "fashion_mnist_captions": fashion_mnist_captioning,
    "skimage_captions": skimage_captioning,
}
