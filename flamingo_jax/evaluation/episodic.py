"""Few-shot episodes as an evaluation task: does the model learn new classes and new words from
its demonstrations (``flamingo_jax.data.episodes``)?

Each episode is one prompt: its demonstrations ``<image>A photo of a {label}.<|endofchunk|>``
(the task's ``template``), then ``<image>A photo of a``, tokenised as training documents are
(each text on its own, with a leading space after the first: ``records.DocumentConverter``). The
model's answer is ranked among the episode's candidate labels (the rest of the query's text,
``' ' + label + '.'``, log-likelihood on the cached prompt) and, with ``open_ended``, also
generated greedily and read up to its first full stop. ``shots`` are demonstrations per class;
0 shots is the query alone. Beside the model, the encoder-only reference: nearest-prototype
accuracy of the frozen vision encoder's features on the same episodes (the class whose
demonstrations' mean feature is most similar by cosine; not a strict bound on the model).

Per shot count, results hold the accuracy (mean over seeds), its standard deviation over seeds,
its standard error over all episodes (``sqrt(p (1 - p) / n)``), the prototype reference and,
with ``open_ended``, the generated answers' accuracy.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator

import numpy as np
import tqdm

from flamingo_jax.data import episodes as ep
from flamingo_jax.data.images import ImageConfig, preprocess
from flamingo_jax.evaluation.generate import GenerateConfig, batch_prompts, generate
from flamingo_jax.evaluation.ranking import candidate_log_likelihoods, vision_features
from flamingo_jax.evaluation.tasks import TASKS

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EpisodeTask:
    """Episodes to evaluate. ``sample(shots, seed, max_shots)`` draws a seed's episodes at a shot
    count (nested across shot counts for the same ``max_shots``); a task read from a file has
    ``fixed`` episodes instead and reports them by their own shot counts. ``collections`` load
    the images whose ids name them."""

    name: str
    sample: Callable[[int, int, int], list[ep.Episode]] | None = None
    fixed: list[ep.Episode] | None = None
    collections: dict[str, ep.Collection] = dataclasses.field(default_factory=dict)
    open_ended: bool = False
    template: str = ep.TEMPLATE
    kind: str = dataclasses.field(default="episodes", init=False)

    def __post_init__(self):
        if (self.sample is None) == (self.fixed is None):
            raise ValueError(f"EpisodeTask {self.name!r}: give exactly one of sample and fixed")
        ep.split_template(self.template)

    def episodes(self, shots: int, seed: int, max_shots: int) -> list[ep.Episode]:
        if self.fixed is not None:
            return [e for e in self.fixed if e.shots == shots]
        return self.sample(shots, seed, max_shots)

    def shot_counts(self, configured) -> tuple[int, ...]:
        """The evaluated shot counts: the config's, or a file's own."""
        if self.fixed is not None:
            return tuple(sorted({e.shots for e in self.fixed}))
        return tuple(configured)


@dataclasses.dataclass(frozen=True)
class EpisodePrompt:
    """An episode's prompt ids, each candidate's ids as it continues the prompt, and the
    positions of each label's tokens in the demonstrations (for ``tools.binding``)."""

    tokens: list[int]
    candidates: list[list[int]]
    label_positions: dict[str, list[int]]


def episode_prompt(tokenizer, episode: ep.Episode, template: str = ep.TEMPLATE) -> EpisodePrompt:
    """The prompt tokenised as ``records.DocumentConverter`` tokenises a training document: each
    text on its own, after the first with a leading space; ``<image>`` before and
    ``<|endofchunk|>`` after each demonstration's text; the query's text up to its label."""
    head, _ = ep.split_template(template)
    sentence = lambda index, text: (" " if index else "") + text.strip()  # as DocumentConverter encodes
    tokens: list[int] = []
    positions: dict[str, list[int]] = {label: [] for label in episode.candidates}
    for index, demo in enumerate(episode.demos):
        before = tokenizer.encode(sentence(index, head).rstrip())
        with_label = tokenizer.encode(sentence(index, head + demo.label))
        start = len(tokens) + 1  # after the <image>
        positions[demo.label].extend(range(start + len(before), start + len(with_label)))
        tokens += [tokenizer.media_token_id, *tokenizer.encode(sentence(index, template.format(demo.label)))]
        tokens.append(tokenizer.endofchunk_token_id)
    last = len(episode.demos)
    query = tokenizer.encode(sentence(last, head).rstrip())
    candidates = []
    for label in episode.candidates:
        full = tokenizer.encode(sentence(last, template.format(label)))
        if full[: len(query)] != query:
            raise ValueError(f"episode {episode.id!r}: the candidate {label!r} does not continue the prompt's tokens")
        candidates.append(full[len(query) :])
    return EpisodePrompt([*tokens, tokenizer.media_token_id, *query], candidates, positions)


def answer_of(text: str) -> str:
    """A generated continuation's label: up to its first full stop or chunk end."""
    for stop in (".", "<|endofchunk|>", "<image>", "\n"):
        text = text.split(stop, 1)[0]
    return text.strip()


class EpisodeImages:
    """Preprocessed images of episodes by id or path (reused across shot counts and seeds)."""

    def __init__(self, collections: dict[str, ep.Collection], image_config: ImageConfig):
        self.collections, self.config, self._images = collections, image_config, {}

    def __call__(self, image: str) -> np.ndarray:
        if image not in self._images:
            self._images[image] = preprocess(ep.load_image(image, self.collections), self.config, None)
        return self._images[image]


def candidate_rows(prompts: list[EpisodePrompt], rows: int) -> list[list[list[int]]]:
    """Each prompt's candidates as scored, the last repeated to ``rows``."""
    candidates = [p.candidates for p in prompts]
    return candidates + [candidates[-1]] * (rows - len(prompts))


def prototype_prediction(episode: ep.Episode, features: dict[str, np.ndarray]) -> int:
    """The candidate whose demonstrations' mean (L2-normalised) feature is most similar to the
    query's by cosine; -1 without demonstrations."""
    if not episode.demos:
        return -1
    similarity = []
    for label in episode.candidates:
        shown = [features[d.image] for d in episode.demos if d.label == label]
        if not shown:
            similarity.append(-np.inf)
            continue
        prototype = np.mean(shown, axis=0)
        similarity.append(float(prototype @ features[episode.query.image]) / max(np.linalg.norm(prototype), 1e-12))
    return int(np.argmax(similarity))


class EpisodeEvaluator:
    """``run(model)`` yields ``('<shots>-shot/accuracy', mean)`` as each shot count finishes;
    ``results`` and ``predictions`` then hold every metric, seed and episode (as
    ``fewshot.FewShotEvaluator`` does for the other tasks)."""

    def __init__(self, task: EpisodeTask, tokenizer, config, image_config: ImageConfig):
        self.task, self.tokenizer, self.config, self.image_config = task, tokenizer, config, image_config
        self._image = EpisodeImages(task.collections, image_config)
        self._features_cache: dict[str, np.ndarray] = {}
        self.results: dict[int, dict] = {}
        self.predictions: dict[int, dict[int, list[dict]]] = {}

    def run(self, model) -> Iterator[tuple[str, float]]:
        task, config = self.task, self.config
        counts = task.shot_counts(config.shots)
        for shots in counts:
            per_seed, by_seed = [], {}
            seeds = (0,) if task.fixed is not None else config.seeds
            for seed in seeds:
                episodes = task.episodes(shots, seed, max(counts))  # a file's: all of them
                if not episodes:
                    raise ValueError(f"task {task.name!r}: no {shots}-shot episodes")
                rows = self._rows(model, episodes, shots, seed)
                scores = {"accuracy": 100.0 * float(np.mean([r["correct"] for r in rows])), "episodes": len(rows)}
                if shots > 0:  # the reference needs demonstrations
                    scores["prototype"] = 100.0 * float(np.mean([r["prototype_correct"] for r in rows]))
                if task.open_ended:
                    scores["open_accuracy"] = 100.0 * float(np.mean([r["open_correct"] for r in rows]))
                per_seed.append(scores)
                by_seed[seed] = rows
            total = sum(s["episodes"] for s in per_seed)
            summary = {key: float(np.mean([s[key] for s in per_seed])) for key in per_seed[0] if key != "episodes"}
            for key in list(summary):
                summary[f"{key}_std"] = float(np.std([s[key] for s in per_seed]))
                p = sum(s[key] * s["episodes"] for s in per_seed) / total / 100.0  # pooled over seeds
                summary[f"{key}_se"] = 100.0 * float(np.sqrt(max(p * (1 - p), 0.0) / total))
            self.results[shots] = {**summary, "episodes": total, "per_seed": per_seed, "metric": "accuracy"}
            self.predictions[shots] = by_seed
            r = self.results[shots]
            log.info(
                "%s %d-shot: accuracy %.1f ± %.1f (s.e., %d episodes)%s%s",
                task.name,
                shots,
                r["accuracy"],
                r["accuracy_se"],
                total,
                f"; encoder prototypes {r['prototype']:.1f}" if "prototype" in r else "",
                f"; generated {r['open_accuracy']:.1f}" if task.open_ended else "",
            )
            yield f"{shots}-shot/accuracy", r["accuracy"]

    def _features(self, model, episodes: list[ep.Episode]) -> dict[str, np.ndarray]:
        ids = sorted({s.image for e in episodes for s in (*e.demos, e.query)})
        missing = [i for i in ids if i not in self._features_cache]
        if missing:
            for i, f in zip(missing, vision_features(model, np.stack([self._image(i) for i in missing])), strict=True):
                self._features_cache[i] = f
        return self._features_cache

    def _rows(self, model, episodes: list[ep.Episode], shots: int, seed: int) -> list[dict]:
        tokenizer, config = self.tokenizer, self.config
        features = self._features(model, episodes)
        generate_config = GenerateConfig(6, 1, 0.0, tokenizer.end_token_ids)
        rows = []
        by_ways: dict[int, list[ep.Episode]] = {}
        for episode in episodes:
            by_ways.setdefault(len(episode.candidates), []).append(episode)
        for group in by_ways.values():
            for start in tqdm.trange(
                0, len(group), config.batch_size, desc=f"{self.task.name} {shots}-shot seed {seed}", leave=False
            ):
                batch = group[start : start + config.batch_size]
                prompts = [episode_prompt(tokenizer, e, self.task.template) for e in batch]
                images = [[self._image(s.image) for s in (*e.demos, e.query)] for e in batch]
                tokens, mask, index, media, image_mask = batch_prompts(
                    [p.tokens for p in prompts],
                    images,
                    tokenizer.media_token_id,
                    tokenizer.pad_id,
                    config.batch_size,
                    config.prompt_length_multiple,
                )
                candidates = candidate_rows(prompts, len(tokens))
                scores = candidate_log_likelihoods(model, tokens, index, image_mask, media, candidates, input_mask=mask)
                generated = None
                if self.task.open_ended:
                    out = generate(
                        model,
                        tokens,
                        index,
                        image_mask,
                        media,
                        input_mask=mask,
                        config=generate_config,
                        pad_id=tokenizer.pad_id,
                        eos_id=tokenizer.eos_id,
                    )
                    generated = [
                        answer_of(tokenizer.decode(tokenizer.cut_at_end(ids[:length]), skip_special=False))
                        for ids, length in zip(out.tokens, out.lengths, strict=False)
                    ]
                for row, episode in enumerate(batch):
                    choice = int(np.argmax(scores[row]))
                    prototype = prototype_prediction(episode, features)
                    record = {
                        "id": episode.id,
                        "answer": episode.query.label,
                        "candidates": list(episode.candidates),
                        "classes": list(episode.classes),
                        "scores": scores[row].tolist(),
                        "prediction": episode.candidates[choice],
                        "correct": choice == episode.answer,
                        "prototype_correct": prototype == episode.answer,
                    }
                    if generated is not None:
                        record["generated"] = generated[row]
                        record["open_correct"] = generated[row] == episode.query.label
                    rows.append(record)
        return rows


# -- registered tasks --------------------------------------------------------------------------


@TASKS.register("episodes")
def episodes_task(
    *,
    collection: str | None = None,
    collection_options: dict | None = None,
    path: str | None = None,
    ways: int = 3,
    flavour: str = "novel",
    classes: str = "heldout",
    heldout_fraction: float = 0.2,
    open_ended: bool = False,
    num_queries: int = 300,
    template: str = ep.TEMPLATE,
    name: str = "episodes",
) -> EpisodeTask:
    """N-way few-shot episodes: drawn from a registered image ``collection`` (``classes``:
    'heldout', 'training' or 'all' of its classes, split by ``heldout_fraction`` as training
    documents split them), ``num_queries`` per seed, with labels of ``flavour``; or read from a
    JSON-lines ``path`` (``data.episodes.read_episodes``: the file fixes the episodes). Each shot
    reads ``template`` with its label (``EpisodeDocuments.template`` of the training data)."""
    if (collection is None) == (path is None):
        raise ValueError(f"task {name!r}: set exactly one of collection and path")
    if path is not None:
        return EpisodeTask(name, fixed=ep.read_episodes(path), open_ended=open_ended, template=template)
    if classes not in ("heldout", "training", "all"):
        raise ValueError(f"task {name!r}: classes={classes!r}; one of 'heldout', 'training', 'all'")
    opened = ep.COLLECTIONS[collection](**(collection_options or {}))
    training, held = ep.split_classes(opened, heldout_fraction)
    chosen = {"heldout": held, "training": training, "all": None}[classes]
    avoid = set(opened.classes)

    def sample(shots: int, seed: int, max_shots: int) -> list[ep.Episode]:
        return ep.sample_episodes(
            opened,
            num_queries,
            ways=ways,
            shots=shots,
            flavour=flavour,
            seed=seed,
            classes=chosen,
            avoid=avoid,
            min_images=max_shots + 1,
        )

    return EpisodeTask(name, sample=sample, collections={opened.name: opened}, open_ended=open_ended, template=template)
