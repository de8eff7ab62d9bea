"""Evaluation tasks: what is asked, how a demonstration and a query read, and the data.

A :class:`Task` holds query examples and a pool of demonstration examples. Its ``kind`` picks
the metric: 'captioning' (CIDEr, BLEU-4), 'vqa' (VQAv2 accuracy), 'classification' (top-1 by
class log-likelihood) or 'binary' (ROC-AUC of the positive class, e.g. HatefulMemes).

Readers for the standard formats, registered in ``TASKS`` with their paths set in gin: COCO /
Flickr30k Karpathy-split JSON (``coco``, ``flickr30k``), VQAv2 question + annotation JSON
(``vqav2``, ``ok_vqa``; ``textvqa`` and ``vizwiz`` in OpenFlamingo's VQA-format files), HatefulMemes
jsonl (``hateful_memes``), ImageNet class folders (``imagenet``). A project registers its own tasks the same way::

    from flamingo_jax.evaluation.tasks import TASKS, Example, Task

    @TASKS.register("my_task")
    def my_task(*, num_queries: int = 100, path: str) -> Task:
        ...  # read examples; return Task("my_task", "classification", queries, pool, class_names=...)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable

import numpy as np

from flamingo_jax.data.images import image_file
from flamingo_jax.registry import Registry

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


def grey_to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8[H, W] -> uint8[H, W, 3]; colour images unchanged."""
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


# -- readers for the standard formats --------------------------------------------------------


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
                        image_file(file),
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
            out.append(Example(str(q["question_id"]), image_file(file), answers, question=q["question"]))
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
                            image_file(os.path.join(image_root, item["img"])),
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


# Evaluation tasks by name: ``name -> factory(**options) -> Task``. ``EvalConfig.tasks`` names
# them; a factory receives ``EvalConfig.task_options[name]`` plus ``num_queries`` / ``pool_size``
# where its signature takes them. The standard benchmarks read their files from paths set in gin,
# e.g. ``EvalConfig.task_options = {'coco': {'path': '.../dataset_coco.json', 'image_root': '...'}}``.
TASKS: Registry[Callable[..., Task]] = Registry("evaluation task")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def read_imagenet(
    image_root: str,
    synsets: str,
    *,
    pool_root: str | None = None,
    class_names: str | None = None,
    class_suffix: str = ".",
    name: str = "imagenet",
) -> Task:
    """ImageNet-1k as class folders (``image_root/<wnid>/*.JPEG``: torchvision's ImageFolder
    layout, which OpenFlamingo's evaluation reads), its classes from the devkit's synset list
    (``LOC_synset_mapping.txt`` or ``synset_words.txt``: ``<wnid> <name>[, <synonym> ...]`` per
    line, in class-index order), each class ranked by its first name or, with ``class_names``, by
    that file's line of the same index (e.g. the curated names CLIP and OpenFlamingo rank).
    Demonstrations from ``pool_root`` (the train folders) or else from the queries. The examples
    are in one fixed shuffled order, so the first ``num_queries`` are a sample of every class.
    ``class_suffix``: what follows a class name when it is scored (OpenFlamingo's prompt: nothing)."""
    with open(synsets) as f:
        entries = [line.strip().split(" ", 1) for line in f if line.strip()]
    if any(len(entry) != 2 for entry in entries):
        raise ValueError(f"{synsets}: a line is not '<wnid> <name>[, <synonym> ...]'")
    wnids = [wnid for wnid, _ in entries]
    names = [rest.split(",")[0].strip() for _, rest in entries]
    if class_names is not None:
        with open(class_names) as f:
            names = [line.rstrip("\n") for line in f if line.strip()]
        if len(names) != len(wnids):
            raise ValueError(f"{class_names}: {len(names)} names for the {len(wnids)} classes of {synsets}")

    def examples(root: str) -> list[Example]:
        out = []
        for label, wnid in enumerate(wnids):
            folder = os.path.join(root, wnid)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{root}: no folder {wnid} (class {label}, {names[label]!r})")
            for file in sorted(os.listdir(folder)):
                if file.lower().endswith(IMAGE_SUFFIXES):
                    path = os.path.join(folder, file)
                    out.append(Example(f"{wnid}/{file}", image_file(path), [names[label]], label=label))
        order = np.random.default_rng(0).permutation(len(out))
        return [out[i] for i in order]

    queries = examples(image_root)
    pool = examples(pool_root) if pool_root else queries
    return Task(name, "classification", queries, pool, class_names=tuple(names), class_suffix=class_suffix)


TASKS.register("coco", functools.partial(read_karpathy, name="coco"))
TASKS.register("flickr30k", functools.partial(read_karpathy, name="flickr30k"))
TASKS.register("vqav2", functools.partial(read_vqav2, name="vqav2"))
# OK-VQA: VQAv2's layout over COCO val2014 (OpenEnded_mscoco_val2014_questions.json,
# mscoco_val2014_annotations.json). TextVQA and VizWiz: the VQA-format files OpenFlamingo's
# evaluation reads (val_questions_vqa_format.json, val_annotations_vqa_format.json), whose
# image_id is TextVQA's image name without '.jpg' and VizWiz's file name.
TASKS.register("imagenet", functools.partial(read_imagenet, name="imagenet"))
TASKS.register("ok_vqa", functools.partial(read_vqav2, name="ok_vqa"))
TASKS.register(
    "textvqa",
    functools.partial(read_vqav2, name="textvqa", image_name="{image_id}.jpg", pool_image_name="{image_id}.jpg"),
)
TASKS.register(
    "vizwiz", functools.partial(read_vqav2, name="vizwiz", image_name="{image_id}", pool_image_name="{image_id}")
)
TASKS.register("hateful_memes", functools.partial(read_hateful_memes, name="hateful_memes"))
