"""The few-shot in-context protocol of Flamingo / OpenFlamingo.

For every query, ``shots`` demonstrations from the task's pool (chosen at random per seed, or
by RICES: most similar vision features, most similar last) precede it as
``<image>demo<|endofchunk|>``; zero-shot uses two text-only demonstrations instead (Flamingo,
Appendix B.1.5). Captioning and VQA generate (beam search on the KV cache); classification and
binary tasks rank class names by log-likelihood. Each (shots, seed) gives a metric; the result
reports mean and standard deviation over seeds and keeps every prediction.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from collections.abc import Iterator

import numpy as np
import tqdm

from flamingo_jax.data.images import ImageConfig, preprocess
from flamingo_jax.evaluation import metrics
from flamingo_jax.evaluation.episodic import EpisodeEvaluator, EpisodeTask
from flamingo_jax.evaluation.generate import GenerateConfig, batch_prompts, generate
from flamingo_jax.evaluation.ranking import Rices, class_log_likelihoods, vision_features
from flamingo_jax.evaluation.tasks import TASKS, Example, Task, Templates

log = logging.getLogger(__name__)

SELECTIONS = ("random", "rices")
# EvalConfig fields a task's task_options may set for that task alone.
DECODING_OPTIONS = ("max_new_tokens", "num_beams", "length_penalty")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What ``flamingo_jax.main --mode=eval`` (and ``RunConfig.evaluate_at_end``) runs.

    ``tasks``: names registered in ``tasks.TASKS``. ``task_options``: ``{task: {option: value}}``
    passed to that task's factory (file paths of the standard benchmarks, ...), or the protocol's
    own settings for that task alone: ``num_queries``, ``shots`` and the decoding's
    ``max_new_tokens`` / ``num_beams`` / ``length_penalty`` (OpenFlamingo's protocol decodes 5
    tokens for VQA, 20 for captions). ``checkpoint_step``: None for the latest. ``include_init`` also
    evaluates the initialisation (step 0: the frozen LM, gates at 0) as the baseline, on the
    tasks ``init_tasks`` and the shot counts ``init_shots`` when those are set (None: all).
    ``prompt_length_multiple``: prompts are left-padded to a multiple of this many tokens, so
    that a (task, shots) pair compiles few shapes without padding short prompts far.
    ``image_text`` is what an image reads as in a prompt and ``chunk_end`` what ends a
    demonstration (IDEFICS: ``<fake_token_around_image><image><fake_token_around_image>`` and
    a newline). ``task_options[task]['templates']`` ({'demo', 'query', 'text_only_demo'}) sets a
    task's prompt templates (``tasks.Templates``).
    """

    tasks: tuple[str, ...] = ()
    shots: tuple[int, ...] = (0, 4, 8)
    seeds: tuple[int, ...] = (0,)
    num_queries: int = 100
    task_options: dict[str, dict] | None = None
    pool_size: int = 2000
    selection: str = "random"
    batch_size: int = 8
    max_new_tokens: int = 20
    num_beams: int = 3
    length_penalty: float = 0.0
    checkpoint_step: int | None = None
    include_init: bool = False
    init_tasks: tuple[str, ...] | None = None
    init_shots: tuple[int, ...] | None = None
    prompt_length_multiple: int = 16
    image_text: str = "<image>"
    chunk_end: str = "<|endofchunk|>"

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"EvalConfig.selection={self.selection!r}; available: {list(SELECTIONS)}")
        shots = (*self.shots, *(self.init_shots or ()))
        if any(s < 0 for s in shots) or not self.seeds or self.num_queries < 1 or self.batch_size < 1:
            raise ValueError(f"EvalConfig: shots must be >= 0, seeds non-empty, sizes positive; got {self}")
        if self.prompt_length_multiple < 1:
            raise ValueError(f"EvalConfig.prompt_length_multiple must be >= 1, got {self.prompt_length_multiple}")
        # Checked when the config is built (before a training run, not after it); task_options and
        # init_tasks may name tasks that tasks leaves out (a command line's override of tasks).
        for field in ("tasks", "task_options", "init_tasks"):
            TASKS.check(getattr(self, field) or (), f"EvalConfig.{field}")
        for name, options in (self.task_options or {}).items():
            if not isinstance(options, dict):
                raise ValueError(f"EvalConfig.task_options[{name!r}] must be a dict of options, got {options!r}")
            count = options.get("num_queries", 1)
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"EvalConfig.task_options[{name!r}]['num_queries']={count!r}: must be a positive int")
            for key in ("max_new_tokens", "num_beams"):
                value = options.get(key, 1)
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"EvalConfig.task_options[{name!r}][{key!r}]={value!r}: must be a positive int")
            task_shots = options.get("shots", (0,))
            if not isinstance(task_shots, (list, tuple)) or not all(isinstance(k, int) and k >= 0 for k in task_shots):
                raise ValueError(
                    f"EvalConfig.task_options[{name!r}]['shots']={task_shots!r}: must be a list of ints >= 0"
                )

    def __hash__(self):  # task_options is a dict; gin needs configs hashable
        return hash(repr(self))

    def tasks_for(self, step: int | None) -> tuple[str, ...]:
        """The tasks evaluated at ``step`` (0: the initialisation: those of ``tasks`` in ``init_tasks``)."""
        if step != 0 or self.init_tasks is None:
            return tuple(self.tasks)
        return tuple(name for name in self.tasks if name in self.init_tasks)

    def shots_for(self, step: int | None, task_name: str | None = None) -> tuple[int, ...]:
        """The shot counts evaluated at ``step`` (0: the initialisation: ``init_shots`` if set), of
        ``task_name`` when its ``task_options`` set its own ``shots``."""
        if step == 0 and self.init_shots is not None:
            return tuple(self.init_shots)
        own = (self.task_options or {}).get(task_name, {}).get("shots") if task_name else None
        return tuple(self.shots if own is None else own)

    def options_for(self, task_name: str) -> dict:
        """The options ``task_name``'s factory is offered: ``num_queries`` and ``pool_size``, then
        that task's ``task_options``."""
        return {
            "num_queries": self.num_queries,
            "pool_size": self.pool_size,
            **(self.task_options or {}).get(task_name, {}),
        }

    def for_task(self, task_name: str, step: int | None) -> EvalConfig:
        """This config as ``task_name`` is evaluated at ``step``: its shot counts and its own
        decoding settings from ``task_options``."""
        own = (self.task_options or {}).get(task_name, {})
        decoding = {key: own[key] for key in DECODING_OPTIONS if key in own}
        return dataclasses.replace(self, checkpoint_step=step, shots=self.shots_for(step, task_name), **decoding)

    def queries_for(self, task_name: str) -> int:
        """How many queries of ``task_name`` to evaluate."""
        return self.options_for(task_name)["num_queries"]


def make_task(name: str, config: EvalConfig) -> Task:
    """The registered task ``name`` built with the options ``config`` gives it; a missing
    required option (a benchmark's file path) is an error naming it."""
    factory = TASKS[name]
    parameters = inspect.signature(factory).parameters
    offered = {key: value for key, value in config.options_for(name).items() if value is not None}
    # num_queries, pool_size and shots are the protocol's own options (it slices the task by them).
    protocol = {"num_queries", "pool_size", "shots", "templates", *DECODING_OPTIONS}
    unknown = set((config.task_options or {}).get(name, {})) - set(parameters) - protocol
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        raise ValueError(f"EvalConfig.task_options[{name!r}]: {sorted(unknown)} are not options of the task")
    missing = [
        key
        for key, parameter in parameters.items()
        if parameter.default is parameter.empty and parameter.kind != parameter.VAR_KEYWORD and key not in offered
    ]
    if missing:
        raise ValueError(f"task {name!r} needs EvalConfig.task_options[{name!r}] to set {missing}")
    task = factory(**{key: value for key, value in offered.items() if key in parameters})
    templates = (config.task_options or {}).get(name, {}).get("templates")
    if templates is not None:
        unknown = set(templates) - {f.name for f in dataclasses.fields(Templates)}
        if unknown:
            raise ValueError(f"EvalConfig.task_options[{name!r}]['templates']: unknown {sorted(unknown)}")
        task.templates = dataclasses.replace(task.templates, **templates)
    return task


def build_tasks(eval_config: EvalConfig) -> dict[str, Task]:
    """{name: Task} of every task of ``eval_config``, read once for all evaluated steps."""
    if not eval_config.tasks:
        raise ValueError(f"EvalConfig.tasks is empty; registered tasks: {list(TASKS)}")
    return {name: make_task(name, eval_config) for name in eval_config.tasks}


def prepare_image(example: Example, image_config: ImageConfig) -> np.ndarray:
    """An example's image as the model reads it at evaluation (no augmentation)."""
    return preprocess(np.asarray(example.load_image(), np.uint8), image_config, None)


class _ImageCache:
    """Preprocessed images by example id (pools are reused across queries, shots and seeds)."""

    def __init__(self, image_config: ImageConfig):
        self.config, self._images = image_config, {}

    def __call__(self, example: Example) -> np.ndarray:
        if example.id not in self._images:
            self._images[example.id] = prepare_image(example, self.config)
        return self._images[example.id]


def build_prompt(
    task: Task,
    demos: list[Example],
    query: Example,
    *,
    text_only: bool,
    rng,
    image_text: str = "<image>",
    chunk_end: str = "<|endofchunk|>",
) -> str:
    """The interleaved text of one query (``image_text`` marks each image's place, ``chunk_end``
    ends each demonstration)."""
    templates = task.templates
    parts = []
    for demo in demos:
        fields = dict(question=demo.question, text=demo.text, answer=task.demo_answer(demo, rng))
        if text_only:
            parts.append(templates.text_only_demo.format(**fields) + chunk_end)
        else:
            parts.append(image_text + templates.demo.format(**fields) + chunk_end)
    parts.append(image_text + templates.query.format(question=query.question, text=query.text, answer=""))
    return "".join(parts)


def postprocess(text: str) -> str:
    """Cut a generation where the model starts a new demonstration."""
    text = re.split(r"Question|Answer|Output|Short|\n|<\|endofchunk\|>|<image>", text, maxsplit=1)[0]
    return text.strip()


class _Demonstrations:
    """Chooses demonstration indices into the pool, never the query itself."""

    def __init__(self, task: Task, selection: str, features=None):
        self.task, self.selection = task, selection
        self.pool_position = {example.id: i for i, example in enumerate(task.pool)}
        self.rices = None
        if selection == "rices":
            pool_features, self.query_features = features
            self.rices = Rices(pool_features)

    def choose(self, query_position: int, query: Example, shots: int, rng) -> list[int]:
        if shots > len(self.task.pool) - (query.id in self.pool_position):
            raise ValueError(f"task {self.task.name!r}: {shots} shots but the pool has {len(self.task.pool)} examples")
        if self.rices is not None and shots > 0:
            exclude = [self.pool_position.get(query.id, -1)]
            found = self.rices.find(self.query_features[query_position : query_position + 1], shots + 1)[0]
            return [int(i) for i in found if i != exclude[0]][-shots:]
        candidates = rng.permutation(len(self.task.pool))
        return [int(i) for i in candidates if self.task.pool[i].id != query.id][:shots]


class FewShotEvaluator:
    """One task under the few-shot protocol, big_vision style: ``run(model)`` yields ``(metric,
    value)`` pairs (``'<shots>-shot/<metric>'``: the mean over seeds) as each shot count finishes;
    ``results`` and ``predictions`` then hold every metric, seed and prediction."""

    def __init__(self, task: Task, tokenizer, config: EvalConfig, image_config: ImageConfig):
        self.task, self.tokenizer, self.config = task, tokenizer, config
        self.images = _ImageCache(image_config)
        self.queries = task.queries[: config.queries_for(task.name)]
        self.pool_task = dataclasses.replace(task, pool=task.pool[: config.pool_size]) if config.pool_size else task
        self.class_tokens = [tokenizer.encode(" " + name + task.class_suffix) for name in task.class_names]
        self.generate_config = GenerateConfig(
            config.max_new_tokens, config.num_beams, config.length_penalty, tokenizer.end_token_ids
        )
        self.results: dict[int, dict] = {}
        self.predictions: dict[int, dict[int, list[dict]]] = {}

    def run(self, model) -> Iterator[tuple[str, float]]:
        task, config = self.task, self.config
        features = None
        if config.selection == "rices":
            pool_images = np.stack([self.images(e) for e in self.pool_task.pool])
            query_images = np.stack([self.images(e) for e in self.queries])
            features = (vision_features(model, pool_images), vision_features(model, query_images))
        chooser = _Demonstrations(self.pool_task, config.selection, features)
        name = _METRIC_NAMES[task.kind]
        for shots in config.shots:
            per_seed, by_seed = [], {}
            for seed in config.seeds:
                rows = self._rows(model, chooser, shots, seed)
                per_seed.append(_metric(task, self.queries, rows))
                by_seed[seed] = rows
            self.results[shots] = {
                **{key: float(np.mean([v[key] for v in per_seed])) for key in per_seed[0]},
                **{f"{key}_std": float(np.std([v[key] for v in per_seed])) for key in per_seed[0]},
                "per_seed": per_seed,
                "metric": name,
            }
            self.predictions[shots] = by_seed
            mean, std = self.results[shots][name], self.results[shots][f"{name}_std"]
            log.info("%s %d-shot: %s = %.2f ± %.2f", task.name, shots, name, mean, std)
            yield f"{shots}-shot/{name}", mean

    def _rows(self, model, chooser: _Demonstrations, shots: int, seed: int) -> list[dict]:
        """Every query's prediction at ``shots`` shots with the demonstrations of ``seed``."""
        task, config, tokenizer, images = self.task, self.config, self.tokenizer, self.images
        rng = np.random.default_rng((seed, shots))
        rows = []
        for start in tqdm.trange(
            0, len(self.queries), config.batch_size, desc=f"{task.name} {shots}-shot seed {seed}", leave=False
        ):
            batch_queries = self.queries[start : start + config.batch_size]
            prompts, batch_images = [], []
            for offset, query in enumerate(batch_queries):
                text_only = shots == 0
                chosen = chooser.choose(start + offset, query, 2 if text_only else shots, rng)
                demos = [self.pool_task.pool[i] for i in chosen]
                prompt = build_prompt(
                    task,
                    demos,
                    query,
                    text_only=text_only,
                    rng=rng,
                    image_text=config.image_text,
                    chunk_end=config.chunk_end,
                )
                prompts.append(tokenizer.encode(prompt))
                batch_images.append(([] if text_only else [images(d) for d in demos]) + [images(query)])
            tokens, mask, index, media, image_mask = batch_prompts(
                prompts,
                batch_images,
                tokenizer.media_token_id,
                tokenizer.pad_id,
                config.batch_size,
                config.prompt_length_multiple,
            )
            if task.kind in ("classification", "binary"):
                scores = class_log_likelihoods(
                    model, tokens, index, image_mask, media, self.class_tokens, input_mask=mask
                )
                for query, row in zip(batch_queries, scores[: len(batch_queries)], strict=True):
                    prediction = task.class_names[int(np.argmax(row))]
                    rows.append(
                        {"id": query.id, "label": query.label, "scores": row.tolist(), "prediction": prediction}
                    )
            else:
                out = generate(
                    model,
                    tokens,
                    index,
                    image_mask,
                    media,
                    input_mask=mask,
                    config=self.generate_config,
                    pad_id=tokenizer.pad_id,
                    eos_id=tokenizer.eos_id,
                )
                for query, ids, length in zip(batch_queries, out.tokens, out.lengths, strict=False):
                    text = tokenizer.decode(tokenizer.cut_at_end(ids[:length]), skip_special=False)
                    rows.append(
                        {"id": query.id, "prediction": postprocess(text), "raw": text, "answers": query.answers}
                    )
        return rows


def evaluate_task(
    model,
    tokenizer,
    task: Task | EpisodeTask,
    config: EvalConfig,
    *,
    image_size: int = 224,
    image_config: ImageConfig | None = None,
) -> dict:
    """{'results': {shots: {metric: mean, metric + '_std': std, 'per_seed': [...]}},
    'predictions': {shots: {seed: [{'id', 'prediction', ...}]}}} for one task (few-shot
    episodes: see ``episodic.EpisodeEvaluator``)."""
    evaluator_type = EpisodeEvaluator if isinstance(task, EpisodeTask) else FewShotEvaluator
    evaluator = evaluator_type(task, tokenizer, config, image_config or ImageConfig(image_size=image_size))
    for _ in evaluator.run(model):
        pass
    return {"results": evaluator.results, "predictions": evaluator.predictions}


_METRIC_NAMES = {"captioning": "CIDEr", "vqa": "accuracy", "classification": "accuracy", "binary": "roc_auc"}


def _metric(task: Task, queries: list[Example], rows: list[dict]) -> dict[str, float]:
    """The task's metric(s) in percent (CIDEr x100 as the papers report it)."""
    if task.kind == "classification":
        return {"accuracy": 100.0 * float(np.mean([r["prediction"] == task.class_names[r["label"]] for r in rows]))}
    if task.kind == "binary":
        scores = np.asarray([r["scores"] for r in rows])
        positive = scores[:, 1] - np.logaddexp(scores[:, 0], scores[:, 1])
        return {"roc_auc": 100.0 * metrics.roc_auc(positive, [r["label"] for r in rows])}
    if task.kind == "vqa":
        return {
            "accuracy": 100.0
            * float(
                np.mean([metrics.vqa_accuracy(r["prediction"], q.answers) for r, q in zip(rows, queries, strict=True)])
            )
        }
    scores = metrics.caption_scores({r["id"]: r["prediction"] for r in rows}, {q.id: q.answers for q in queries})
    return {"CIDEr": 100.0 * scores["CIDEr"], "BLEU-4": 100.0 * scores["BLEU-4"]}
