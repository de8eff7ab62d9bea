"""Evaluators of the stage-1 contrastive model: zero-shot image<->text retrieval (R@1/5/10 in
both directions) and zero-shot classification from class-name prompts.

Retrieval takes a relevance matrix rather than assuming one caption per image, so datasets with
several captions per image (COCO, Flickr30k) and datasets whose captions repeat across images
(class-name captions: every image of a class matches every caption of that class) are both
scored correctly.
"""

from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flamingo_jax import storage
from flamingo_jax.data.images import ImageConfig, image_config_for
from flamingo_jax.evaluation.checkpoints import load_model
from flamingo_jax.evaluation.fewshot import build_tasks, prepare_image
from flamingo_jax.evaluation.tasks import Task
from flamingo_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)


def retrieval_metrics(similarity: np.ndarray, relevant: np.ndarray, ks=RECALL_AT) -> dict[str, float]:
    """Recall@K in percent.

    Args:
      similarity: float[num_images, num_texts].
      relevant: bool[num_images, num_texts], which texts describe which image.

    Returns:
      'image_to_text/R@K': share of images with a relevant text among their K most similar;
      'text_to_image/R@K': share of texts with a relevant image among their K most similar.
      Ties are broken by position (stable sort), the same on every run.
    """
    similarity, relevant = np.asarray(similarity, np.float64), np.asarray(relevant, bool)
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {similarity.shape} and relevant {relevant.shape} differ in shape")
    metrics = {}
    for direction, scores, truth in (
        ("image_to_text", similarity, relevant),
        ("text_to_image", similarity.T, relevant.T),
    ):
        order = np.argsort(-scores, axis=1, kind="stable")
        ranked = np.take_along_axis(truth, order, axis=1)
        for k in ks:
            metrics[f"{direction}/R@{k}"] = 100.0 * float(ranked[:, :k].any(axis=1).mean())
    return metrics


def tokenize_captions(tokenizer, captions: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(int32[N, max_length] tokens, bool[N, max_length] mask), truncated to ``max_length``."""
    tokens = np.zeros((len(captions), max_length), np.int32)
    mask = np.zeros((len(captions), max_length), bool)
    for row, caption in enumerate(captions):
        ids = tokenizer.encode(caption)[:max_length]
        if not ids:
            raise ValueError(f"caption {row} ({caption!r}) has no tokens")
        tokens[row, : len(ids)] = ids
        mask[row, : len(ids)] = True
    return tokens, mask


def embed(model, images: np.ndarray | None = None, tokens=None, mask=None, *, batch_size: int = 64) -> np.ndarray:
    """Unit embeddings float32[N, D] of images float[N, H, W, C] or of captions (tokens, mask),
    in fixed-size batches (the last one padded) so one compile serves every batch."""
    count = len(images) if images is not None else len(tokens)
    # The weights are arguments: closed over, they would be constants of the program.
    graphdef, state = nnx.split(model)
    image_fn = functools.partial(jax.jit(lambda s, x: nnx.merge(graphdef, s).embed_images(x)), state)
    text_fn = functools.partial(jax.jit(lambda s, t, m: nnx.merge(graphdef, s).embed_texts(t, m)), state)
    out = []

    def pad(array):
        missing = batch_size - len(array)
        return np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)]) if missing else array

    for start in range(0, count, batch_size):
        rows = slice(start, start + batch_size)
        if images is not None:
            part = image_fn(jnp.asarray(pad(images[rows])))
        else:
            part = text_fn(jnp.asarray(pad(tokens[rows])), jnp.asarray(pad(mask[rows])))
        out.append(np.asarray(part)[: min(batch_size, count - start)])
    return np.concatenate(out)


def zero_shot(model, tokenizer, image_config: ImageConfig, task: Task, *, num_images: int) -> dict:
    """Zero-shot retrieval and classification on the first ``num_images`` queries of a
    classification ``task``, each class captioned as the task's demonstrations read (e.g.
    ``A photo of a {class}.``).

    Image->text ranks the distinct class captions (R@1 is the zero-shot accuracy); text->image
    ranks the images for each image's caption, any image of the caption's class counting as
    relevant.
    """
    if task.kind != "classification":
        raise ValueError(f"zero-shot evaluation needs a classification task; {task.name!r} is {task.kind!r}")
    queries = task.queries[:num_images]
    labels = np.asarray([example.label for example in queries])
    images = np.stack([prepare_image(e, image_config) for e in queries])
    max_length = model.config.text.max_length
    image_embeddings = embed(model, images)
    prompts = [task.templates.demo.format(answer=name, question="", text="") for name in task.class_names]
    class_embeddings = embed(model, None, *tokenize_captions(tokenizer, prompts, max_length))
    classes = np.arange(len(prompts))
    to_classes = retrieval_metrics(image_embeddings @ class_embeddings.T, labels[:, None] == classes[None, :])
    captions = class_embeddings[labels]  # the caption of every image
    to_images = retrieval_metrics(image_embeddings @ captions.T, labels[:, None] == labels[None, :])
    metrics = {key: value for key, value in to_classes.items() if key.startswith("image_to_text")}
    metrics.update({key: value for key, value in to_images.items() if key.startswith("text_to_image")})
    metrics["zero_shot_accuracy"] = metrics["image_to_text/R@1"]
    metrics["num_images"] = len(labels)
    return metrics


def evaluate_contrastive(run_config, eval_config, workdir: str, step: int | None = None) -> str:
    """Evaluates a contrastive run's checkpoint (None: latest; 0: initialisation) zero-shot on the
    classification tasks of ``eval_config`` (``num_queries`` images each); writes and returns
    ``DIR/eval/contrastive_<step>.json`` ({task: metrics})."""
    tokenizer = load_tokenizer(run_config.tokenizer)
    model, step, _, _ = load_model(run_config, workdir, step)
    image_config = image_config_for(run_config.model.vision)
    built = build_tasks(eval_config)
    metrics = {
        name: zero_shot(model, tokenizer, image_config, task, num_images=eval_config.queries_for(name))
        for name, task in built.items()
    }
    record = {"tasks": list(built), "kind": "contrastive", "step": step, "metrics": metrics}
    path = storage.path(workdir) / "eval" / f"contrastive_{step}.json"
    if jax.process_index() == 0:
        storage.write_text(path, json.dumps(record, indent=1))
    for name, values in metrics.items():
        log.info("contrastive step %d, %s: %s", step, name, ", ".join(f"{k} {v:.1f}" for k, v in values.items()))
    return str(path)
