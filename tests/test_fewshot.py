"""The few-shot protocol end to end on a tiny model: prompts, demonstration choice (random and
RICES, never the query), every task kind's metric, seeds, saved predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest

import flamingo_jax.demo  # noqa: F401  (registers the demo tasks these tests name)
from flamingo_jax import configs
from flamingo_jax.evaluation import fewshot
from flamingo_jax.evaluation.tasks import Example, Task
from flamingo_jax.models.flamingo import create_flamingo
from flamingo_jax.tokenizer import Tokenizer

from conftest import encoded_image, set_gates

TOKENIZER = Tokenizer.from_bytes()


@pytest.fixture(scope="module")
def model():
    config = configs.load_model_config("models/tiny.gin", ["LlamaConfig.vocab_size = 259"])
    model = create_flamingo(config, seed=0)
    set_gates(model, 0.5)
    return model


def _examples(count, prefix="e"):
    rng = np.random.default_rng(len(prefix))
    return [
        Example(
            f"{prefix}{i}",
            rng.integers(0, 255, (20, 20, 3), dtype=np.uint8),
            answers=[f"thing {i % 3}", f"object {i % 3}"],
            question="What is it?",
            label=i % 2,
            text="hello",
        )
        for i in range(count)
    ]


def test_prompt_layout():
    task = Task("t", "vqa", _examples(3), _examples(3))
    rng = np.random.default_rng(0)
    prompt = fewshot.build_prompt(task, task.pool[:2], task.queries[2], text_only=False, rng=rng)
    assert prompt.count("<image>") == 3 and prompt.count("<|endofchunk|>") == 2
    assert prompt.endswith("<image>Question:What is it? Short answer:")
    zero = fewshot.build_prompt(task, task.pool[:2], task.queries[2], text_only=True, rng=rng)
    assert zero.count("<image>") == 1 and zero.startswith("Question:What is it? Short answer: ")


@pytest.mark.parametrize("kind", ["captioning", "vqa", "classification", "binary"])
def test_every_kind_end_to_end(model, kind):
    examples = _examples(6)
    classes = ("no", "yes") if kind == "binary" else ("cat", "dog")
    task = Task("t", kind, examples, examples, class_names=classes if kind in ("classification", "binary") else ())
    config = fewshot.EvalConfig(
        tasks=(), shots=(0, 2), seeds=(0, 1), num_queries=6, batch_size=4, max_new_tokens=4, num_beams=2
    )
    out = fewshot.evaluate_task(model, TOKENIZER, task, config, image_size=16)
    metric = {"captioning": "CIDEr", "vqa": "accuracy", "classification": "accuracy", "binary": "roc_auc"}[kind]
    for shots in (0, 2):
        result = out["results"][shots]
        assert result["metric"] == metric and 0.0 <= result[metric] <= 1000.0
        assert len(result["per_seed"]) == 2 and result[f"{metric}_std"] >= 0
        for seed in (0, 1):
            rows = out["predictions"][shots][seed]
            assert [r["id"] for r in rows] == [e.id for e in examples]
    again = fewshot.evaluate_task(model, TOKENIZER, task, config, image_size=16)
    assert again["results"] == out["results"]  # deterministic given the seeds


def test_evaluator_yields_each_shot_counts_metric(model):
    """big_vision-style evaluators: ``run(model)`` yields ('<shots>-shot/<metric>', mean) as each
    shot count finishes, the same numbers its ``results`` keep."""
    examples = _examples(4)
    task = Task("t", "classification", examples, examples, class_names=("cat", "dog"))
    config = fewshot.EvalConfig(shots=(0, 1), num_queries=4, batch_size=4)
    evaluator = fewshot.FewShotEvaluator(task, TOKENIZER, config, fewshot.ImageConfig(image_size=16))
    pairs = list(evaluator.run(model))
    assert [name for name, _ in pairs] == ["0-shot/accuracy", "1-shot/accuracy"]
    assert [value for _, value in pairs] == [evaluator.results[s]["accuracy"] for s in (0, 1)]
    assert all(len(evaluator.predictions[s][0]) == 4 for s in (0, 1))


def test_task_options_init_tasks_and_init_shots():
    a, b, c = "fashion_mnist", "fashion_mnist_captions", "skimage_captions"
    config = fewshot.EvalConfig(tasks=(a, b), num_queries=100, task_options={b: {"num_queries": 48}})
    assert (config.queries_for(a), config.queries_for(b)) == (100, 48)
    assert config.options_for(b) == {"num_queries": 48, "pool_size": 2000}
    assert fewshot.EvalConfig(tasks=(a,), task_options={c: {"num_queries": 4}}).queries_for(a) == 100  # c is not run
    with pytest.raises(ValueError, match=r"task_options\['fashion_mnist'\]\['num_queries'\]=0"):
        fewshot.EvalConfig(tasks=(a,), task_options={a: {"num_queries": 0}})
    with pytest.raises(ValueError, match=r"task_options\['fashion_mnist'\] must be a dict"):
        fewshot.EvalConfig(tasks=(a,), task_options={a: 3})
    config = fewshot.EvalConfig(tasks=(a, b), init_tasks=(b,))
    assert (config.tasks_for(None), config.tasks_for(500), config.tasks_for(0)) == ((a, b), (a, b), (b,))
    assert fewshot.EvalConfig(tasks=(a, b)).tasks_for(0) == (a, b)
    assert fewshot.EvalConfig(tasks=(a,), init_tasks=(b,)).tasks_for(0) == ()
    config = fewshot.EvalConfig(tasks=(a,), shots=(0, 4, 8), init_shots=(4,))
    assert (config.shots_for(None), config.shots_for(320), config.shots_for(0)) == ((0, 4, 8), (0, 4, 8), (4,))
    assert fewshot.EvalConfig(tasks=(a,), shots=(0, 4)).shots_for(0) == (0, 4)
    # A task's own shots (task_options) replace the config's, except at the initialisation's init_shots.
    config = fewshot.EvalConfig(tasks=(a, b), shots=(0, 4), init_shots=(4,), task_options={b: {"shots": [1, 2]}})
    assert (config.shots_for(None, a), config.shots_for(None, b), config.shots_for(0, b)) == ((0, 4), (1, 2), (4,))
    with pytest.raises(ValueError, match=r"task_options\['fashion_mnist'\]\['shots'\]=4: must be a list"):
        fewshot.EvalConfig(tasks=(a,), task_options={a: {"shots": 4}})
    with pytest.raises(ValueError, match="shots must be >= 0"):
        fewshot.EvalConfig(tasks=(a,), init_shots=(-1,))
    # A name outside the task registry is refused when the config is built, before any training.
    with pytest.raises(ValueError, match=r"EvalConfig.init_tasks: unknown evaluation task 'fashion'; registered"):
        fewshot.EvalConfig(tasks=(a,), init_tasks=("fashion",))
    with pytest.raises(ValueError, match=r"EvalConfig.tasks: unknown evaluation task 'imagenet21k'"):
        fewshot.EvalConfig(tasks=(a, "imagenet21k"))
    # A task's own decoding settings.
    config = fewshot.EvalConfig(tasks=(a, b), num_beams=3, task_options={b: {"max_new_tokens": 5, "num_beams": 1}})
    assert (config.for_task(a, None).max_new_tokens, config.for_task(a, None).num_beams) == (20, 3)
    assert (
        config.for_task(b, 7).max_new_tokens,
        config.for_task(b, 7).num_beams,
        config.for_task(b, 7).checkpoint_step,
    ) == (5, 1, 7)
    with pytest.raises(ValueError, match=r"task_options\['fashion_mnist'\]\['num_beams'\]=0: must be a positive int"):
        fewshot.EvalConfig(tasks=(a,), task_options={a: {"num_beams": 0}})


def test_demonstrations_never_include_the_query_and_rices_picks_nearest():
    pool = _examples(5)
    task = Task("t", "captioning", pool, pool)
    chooser = fewshot._Demonstrations(task, "random")  # noqa: SLF001
    for position, query in enumerate(pool):
        chosen = chooser.choose(position, query, 4, np.random.default_rng(position))
        assert position not in chosen and len(set(chosen)) == 4
    with pytest.raises(ValueError, match="5 shots but the pool has 5"):
        chooser.choose(0, pool[0], 5, np.random.default_rng(0))
    features = np.eye(5) + 0.1 * np.asarray([[0, 1, 0.5, 0, 0]] * 5)
    rices = fewshot._Demonstrations(task, "rices", (features, features))  # noqa: SLF001
    # Query 0 is most similar to itself (excluded), then to pool 1, then pool 2.
    assert rices.choose(0, pool[0], 2, None) == [2, 1]


def test_dataset_readers(benchmark_files, tmp_path):
    """COCO Karpathy JSON, VQAv2 question/annotation JSON and HatefulMemes jsonl, read from
    files in their published layouts."""
    from flamingo_jax.evaluation import tasks

    files = benchmark_files
    coco = tasks.read_karpathy(files["coco_json"], files["coco_images"])
    assert [e.id for e in coco.queries] == ["1", "2", "3"] and [e.id for e in coco.pool] == ["4", "5", "6"]
    assert coco.queries[0].answers == ["A red thing number 1.", "Something red."]
    assert coco.queries[0].load_image().shape == (20, 24, 3)

    vqa = tasks.read_vqav2(files["vqav2_questions"], files["vqav2_annotations"], files["vqav2_images"])
    query = vqa.queries[0]
    assert query.question == "What colour?" and query.answers.count("red") == 9 and query.load_image().shape[2] == 3
    assert vqa.demo_answer(query, np.random.default_rng(0)) == " red"

    memes = tasks.read_hateful_memes(files["hateful_memes_jsonl"], files["hateful_memes_images"])
    assert memes.kind == "binary" and [e.label for e in memes.queries] == [1, 0, 1, 0]
    assert memes.queries[0].text == "meme 1" and memes.queries[0].load_image().shape == (20, 24, 3)
    (tmp_path / "bad.jsonl").write_text('{"id": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not a HatefulMemes record"):
        tasks.read_hateful_memes(str(tmp_path / "bad.jsonl"), str(tmp_path))
    assert {"coco", "flickr30k", "vqav2", "hateful_memes"} <= set(tasks.TASKS)


@pytest.mark.parametrize(
    "name, image_id, file_name",
    [
        ("ok_vqa", 42, "COCO_val2014_000000000042.jpg"),
        ("textvqa", "003a8ae2ef43b901", "003a8ae2ef43b901.jpg"),
        ("vizwiz", "VizWiz_val_00000000.jpg", "VizWiz_val_00000000.jpg"),
    ],
)
def test_vqa_format_benchmarks(tmp_path, name, image_id, file_name):
    """OK-VQA (VQAv2's layout), TextVQA and VizWiz (the VQA-format files OpenFlamingo's
    evaluation ships: string image ids) read their images by their published names."""
    from flamingo_jax.evaluation import tasks

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / file_name).write_bytes(encoded_image((200, 10, 10)))
    questions = {"questions": [{"question": "what is it?", "image_id": image_id, "question_id": 7}]}
    answers = [{"answer": "unanswerable"}] * 3 + [{"answer": "a sign"}] * 7
    annotations = {"annotations": [{"question_id": 7, "answers": answers}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    task = tasks.TASKS[name](
        questions=str(tmp_path / "q.json"), annotations=str(tmp_path / "a.json"), image_root=str(tmp_path / "images")
    )
    (query,) = task.queries
    assert (task.name, task.kind, query.question) == (name, "vqa", "what is it?")
    assert query.load_image().shape == (20, 24, 3) and task.demo_answer(query, np.random.default_rng(0)) == " a sign"


def test_imagenet_class_folders(tmp_path):
    """ImageNet val folders named by wnid, classes from the devkit's synset list (first synonym)
    or a names file; the queries in one shuffled order across classes; errors name the file."""
    from flamingo_jax.evaluation import tasks

    synsets = ["n01440764 tench, Tinca tinca", "n01443537 goldfish, Carassius auratus", "n01484850 great white shark"]
    (tmp_path / "synsets.txt").write_text("\n".join(synsets) + "\n")
    for label, line in enumerate(synsets):
        folder = tmp_path / "val" / line.split()[0]
        folder.mkdir(parents=True)
        for k in range(3):
            (folder / f"ILSVRC2012_val_{label}{k}.JPEG").write_bytes(encoded_image((80 * label, 10 * k, 0)))
        (folder / "notes.txt").write_text("not an image")
    task = tasks.TASKS["imagenet"](image_root=str(tmp_path / "val"), synsets=str(tmp_path / "synsets.txt"))
    assert task.kind == "classification" and task.class_names == ("tench", "goldfish", "great white shark")
    assert len(task.queries) == 9 and task.pool is task.queries
    assert sorted(e.label for e in task.queries) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({e.label for e in task.queries[:3]}) > 1  # shuffled, not class by class
    query = task.queries[0]
    assert query.answers == [task.class_names[query.label]] and query.load_image().shape == (20, 24, 3)
    (tmp_path / "names.txt").write_text("tench fish\ngoldfish\nwhite shark\n")
    renamed = tasks.read_imagenet(
        str(tmp_path / "val"), str(tmp_path / "synsets.txt"), class_names=str(tmp_path / "names.txt")
    )
    assert renamed.class_names == ("tench fish", "goldfish", "white shark")
    (tmp_path / "val" / "n01443537" / "ILSVRC2012_val_10.JPEG").unlink()
    (tmp_path / "synsets.txt").write_text("\n".join(synsets + ["n99999999 missing class"]) + "\n")
    with pytest.raises(FileNotFoundError, match="no folder n99999999"):
        tasks.read_imagenet(str(tmp_path / "val"), str(tmp_path / "synsets.txt"))
    with pytest.raises(ValueError, match="2 names for the 4 classes"):
        (tmp_path / "names.txt").write_text("a\nb\n")
        tasks.read_imagenet(
            str(tmp_path / "val"), str(tmp_path / "synsets.txt"), class_names=str(tmp_path / "names.txt")
        )


def test_fashion_captions_are_held_out_and_read_like_training():
    """The captioning task's queries are Fashion-MNIST test images, demonstrations come from the
    train split, and the prompt is the training captions' layout: ``<image>`` then the caption."""
    from flamingo_jax.demo.fashion_mnist import CAPTION as FASHION_MNIST_CAPTION
    from flamingo_jax.demo.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
    from flamingo_jax.demo.fashion_mnist import captioning as fashion_mnist_captioning

    task = fashion_mnist_captioning(num_queries=5, pool_size=20)
    assert task.kind == "captioning" and len(task.queries) == 5 and len(task.pool) == 20
    assert all(e.id.startswith("test/") for e in task.queries) and all(e.id.startswith("train/") for e in task.pool)
    for example in task.queries + task.pool:
        assert example.answers == [FASHION_MNIST_CAPTION.format(FASHION_MNIST_CLASSES[example.label])]
    rng = np.random.default_rng(0)
    prompt = fewshot.build_prompt(task, task.pool[:2], task.queries[0], text_only=False, rng=rng)
    first, second = (FASHION_MNIST_CAPTION.format(FASHION_MNIST_CLASSES[e.label]) for e in task.pool[:2])
    assert prompt == f"<image> {first}<|endofchunk|><image> {second}<|endofchunk|><image>"
