"""Evaluation of a run: a smoke run's checkpoint evaluated few-shot on real sets, JSON results
with every prediction; the evaluation at the end of training equals a rebuilt one; clear errors
for a missing checkpoint or a bad task; the notebook runs headless on the workdir."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_episodes import COLOURS, write_colour_images  # also registers the 'test_colours' collection

import flamingo_jax.demo  # noqa: F401  (registers the demo's tasks these tests evaluate on)
from flamingo_jax import configs
from flamingo_jax.evaluation.run import evaluate_run

from conftest import SMOKE_STEPS, copy_run

# Each test evaluates a trained run end to end: in the slow step.
pytestmark = pytest.mark.slow

EVAL_BINDINGS = [
    "EvalConfig.shots=[0, 2]",
    "EvalConfig.seeds=[0, 1]",
    "EVAL_QUERIES=6",
    "EvalConfig.pool_size=40",
    "EvalConfig.batch_size=6",
    "EvalConfig.max_new_tokens=4",
    "EvalConfig.num_beams=2",
]
EVAL_FILES = ["runs/smoke_cpu.gin", "flamingo_jax/demo/demo_eval.gin"]


def configs_for(*bindings, files=EVAL_FILES):
    configs.parse_gin(files, [*EVAL_BINDINGS, *bindings])
    return configs.run_config(), configs.eval_config()


def read_record(workdir, task, step):
    with open(os.path.join(workdir, "eval", f"{task}_{step}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def evaluated(smoke_run, tmp_path_factory):
    """The smoke run's last checkpoint evaluated on the demo's four tasks."""
    workdir = copy_run(smoke_run, tmp_path_factory.mktemp("evaluated") / "run")
    run_config, eval_config = configs_for("EvalConfig.task_options={'skimage_captions': {'num_queries': 3}}")
    written = evaluate_run(run_config, eval_config, str(workdir))
    assert os.path.join(workdir, "eval", "report.md") in written
    return workdir


def test_eval_writes_results_and_predictions(evaluated):
    expected = {
        "fashion_mnist": "accuracy",
        "fashion_mnist_vqa": "accuracy",
        "fashion_mnist_captions": "CIDEr",
        "skimage_captions": "CIDEr",
    }
    for task, metric in expected.items():
        record = read_record(evaluated, task, SMOKE_STEPS)
        assert record["step"] == SMOKE_STEPS and record["task"] == task
        for shots in ("0", "2"):
            values = record["results"][shots]
            assert values["metric"] == metric and len(values["per_seed"]) == 2
            assert 0.0 <= values[metric] <= 1000.0 and values[f"{metric}_std"] >= 0.0
            for seed in ("0", "1"):
                rows = record["predictions"][shots][seed]
                assert len(rows) == (3 if task == "skimage_captions" else 6)
                assert all("prediction" in row for row in rows)
    report = (evaluated / "eval" / "report.md").read_text()
    assert all(f"| {task} | {SMOKE_STEPS} |" in report for task in expected)
    assert os.path.getsize(evaluated / "eval" / "report.png") > 10_000


def test_eval_of_the_initialisation_and_clear_errors(evaluated):
    run_config, eval_config = configs_for("EvalConfig.tasks=['fashion_mnist']", "EvalConfig.checkpoint_step=0")
    evaluate_run(run_config, eval_config, str(evaluated))
    assert read_record(evaluated, "fashion_mnist", 0)["step"] == 0
    run_config, eval_config = configs_for("EvalConfig.tasks=['fashion_mnist']", "EvalConfig.checkpoint_step=3")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 3 .*available: \[4\]"):
        evaluate_run(run_config, eval_config, str(evaluated))
    with pytest.raises(ValueError, match="EvalConfig.tasks: unknown evaluation task 'imagenet21k'"):
        configs_for("EvalConfig.tasks=['imagenet21k']")
    with pytest.raises(ValueError, match="EvalConfig.task_options: unknown evaluation task 'fashion'"):
        configs_for("EvalConfig.task_options={'fashion': {'num_queries': 3}}")
    with pytest.raises(
        ValueError, match=r"task 'coco' needs EvalConfig.task_options\['coco'\] to set \['path', 'image_root'\]"
    ):
        run_config, eval_config = configs_for("EvalConfig.tasks=['coco']")
        evaluate_run(run_config, eval_config, str(evaluated))


def test_evaluation_at_the_end_of_training_reuses_the_trained_model(tmp_path):
    """``RunConfig.evaluate_at_end`` evaluates the model the training holds (and the initial
    parameters it kept, at ``EvalConfig.init_shots``) without rebuilding it: the same results and
    predictions as an evaluation that rebuilds the model and restores the checkpoint."""
    from flamingo_jax.train.loop import train

    bindings = ["EvalConfig.tasks=['fashion_mnist']", "EvalConfig.include_init=True", "EvalConfig.init_shots=[2]"]
    run = ["TRAIN_STEPS=3", "CHECKPOINT_EVERY=3", "RunConfig.evaluate_at_end=True"]
    run_config, eval_config = configs_for(*run, *bindings)
    summary = train(run_config, str(tmp_path))
    evaluate_run(run_config, eval_config, str(tmp_path), summary)

    def records():
        return {
            step: (lambda r: (r["results"], r["predictions"]))(read_record(tmp_path, "fashion_mnist", step))
            for step in (3, 0)
        }

    at_end = records()
    assert (set(at_end[3][0]), set(at_end[0][0])) == ({"0", "2"}, {"2"})  # EvalConfig.init_shots
    evaluate_run(run_config, eval_config, str(tmp_path))  # rebuilt, checkpoint restored
    assert records() == at_end
    assert at_end[3][1] != at_end[0][1]  # the trained model and its initialisation differ


NOTEBOOK = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "evaluate_checkpoint.ipynb"
)


def test_notebook_runs_headless_on_the_workdir(smoke_run, tmp_path, monkeypatch):
    """The checkpoint-evaluation notebook, executed by a real Jupyter kernel against the smoke
    run: no error, and its two figures (prediction grid, training curves) are produced."""
    import nbclient
    import nbformat

    workdir = copy_run(smoke_run, tmp_path / "run")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    monkeypatch.setenv("FLAMINGO_WORKDIR", str(workdir))
    monkeypatch.setenv("FLAMINGO_TASK", "skimage_captions")
    monkeypatch.setenv("FLAMINGO_SHOTS", "2")
    monkeypatch.setenv("FLAMINGO_QUERIES", "4")
    monkeypatch.setenv("XLA_FLAGS", "")  # one device in the kernel is enough
    root = os.path.dirname(os.path.dirname(NOTEBOOK))
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": root}}
    )
    client.execute()
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 2
    for name in ("predictions.png", "training.png"):
        path = os.path.join(workdir, "eval", "notebook", name)
        assert os.path.getsize(path) > 5000
    text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert f"checkpoint at step {SMOKE_STEPS}" in text and "skimage_captions, 2-shot: CIDEr =" in text


def test_eval_scores_an_episodes_file_and_a_blind_model_scores_chance(evaluated, tmp_path):
    """``--mode=eval``'s evaluation of the 'episodes' task on a JSON-lines file the test writes
    (its own shot counts, each episode's own candidates); and on sampled novel-word episodes the
    initialisation, whose gates at 0 keep the images out, scores chance (3-way: 33.3%)."""
    from flamingo_jax.data import episodes as ep

    rng = np.random.default_rng(0)
    write_colour_images(tmp_path)
    written = []
    for index in range(8):
        shots = 1 + index % 2
        names = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), 3, replace=False)]
        words = ["dax", "wug", "zib"]
        demos = [ep.Shot(f"{n}{k}.png", w) for n, w in zip(names, words, strict=True) for k in range(shots)]
        written.append(ep.Episode(tuple(demos), ep.Shot(f"{names[index % 3]}2.png", words[index % 3]), tuple(words)))
    ep.write_episodes(str(tmp_path / "mine.jsonl"), written)
    run_config, eval_config = configs_for(
        "EvalConfig.tasks=['episodes']",
        f"EvalConfig.task_options={{'episodes': {{'path': '{tmp_path / 'mine.jsonl'}', 'open_ended': True}}}}",
    )
    evaluate_run(run_config, eval_config, str(evaluated))
    record = read_record(evaluated, "episodes", SMOKE_STEPS)
    assert record["kind"] == "episodes" and set(record["results"]) == {"1", "2"}  # the file's shot counts
    for shots in ("1", "2"):
        values = record["results"][shots]
        rows = record["predictions"][shots]["0"]
        assert values["episodes"] == len(rows) == 4 and all(r["prediction"] in r["candidates"] for r in rows)
        assert values["accuracy"] == 100.0 * np.mean([r["correct"] for r in rows])
        assert values["prototype"] == 100.0 * np.mean([r["prototype_correct"] for r in rows])
        assert values["accuracy_se"] == pytest.approx(
            100 * np.sqrt(values["accuracy"] / 100 * (1 - values["accuracy"] / 100) / 4)
        )
        assert all("generated" in r for r in rows)
    assert "episodes at step 4 (4 episodes per cell" in (evaluated / "eval" / "report.md").read_text()

    run_config, eval_config = configs_for(
        "EvalConfig.tasks=['episodes']",
        "EvalConfig.checkpoint_step=0",
        "EvalConfig.shots=[1]",
        "EvalConfig.seeds=[0]",
        "EvalConfig.batch_size=16",
        "EvalConfig.task_options={'episodes': {'collection': 'test_colours', 'classes': 'all', 'num_queries': 144}}",
    )
    evaluate_run(run_config, eval_config, str(evaluated))
    values = read_record(evaluated, "episodes", 0)["results"]["1"]
    assert values["episodes"] == 144 and values["prototype"] > 95.0  # the images do tell the classes apart
    assert abs(values["accuracy"] - 100 / 3) < 3 * values["accuracy_se"]


def test_binding_diagnosis_finds_the_labels_and_reads_the_blocks(evaluated):
    """tools/binding.py: label positions decode to the labels; one attention row per LM layer and
    one probe per xattn block; at the initialisation the blocks add nothing (gates at 0), so the
    probe's answer is always the first candidate."""
    from flamingo_jax.evaluation.episodic import episode_prompt
    from flamingo_jax.evaluation.fewshot import make_task
    from flamingo_jax.tokenizer import load_tokenizer
    from flamingo_jax.tools import binding

    run_config, eval_config = configs_for(
        "EvalConfig.task_options={'episodes': {'collection': 'test_colours', 'classes': 'all'}}"
    )
    tokenizer = load_tokenizer(run_config.tokenizer)
    task = make_task("episodes", eval_config)
    episodes = task.episodes(2, 0, 2)[:6]
    for episode in episodes:
        prompt = episode_prompt(tokenizer, episode, task.template)
        for label, positions in prompt.label_positions.items():
            text = tokenizer.decode([prompt.tokens[p] for p in positions])
            assert text == (" " + label) * 2  # two demonstrations each
    results = binding.binding_run(
        run_config, eval_config, str(evaluated), [0, None], task="episodes", shots=2, episodes=6, batch_size=6
    )
    assert sorted(results) == [0, SMOKE_STEPS]
    for result in results.values():
        assert len(result["attention"]) == run_config.model.lm.num_layers
        assert [p["lm_layer"] for p in result["xattn_probe"]] == list(run_config.model.xattn_layer_indices)
        assert all(np.isfinite(a["mean_margin"]) for a in result["attention"])
    first = np.mean([e.answer == 0 for e in episodes])
    assert all(p["probe_accuracy"] == first for p in results[0]["xattn_probe"])


def test_text_key_oracle_prompts_and_scores(evaluated):
    """tools.binding --text_keys: each image becomes its class's own word (one per class, never a
    label, the query's that of its answer), the candidates continue the prompt, and the LM-only
    scores are the log-likelihoods of one forward pass over prompt and candidate."""
    import jax
    import jax.numpy as jnp

    from flamingo_jax.evaluation.checkpoints import load_models
    from flamingo_jax.evaluation.fewshot import make_task
    from flamingo_jax.tokenizer import load_tokenizer
    from flamingo_jax.tools import binding

    run_config, eval_config = configs_for(
        "EvalConfig.task_options={'episodes': {'collection': 'test_colours', 'classes': 'all'}}"
    )
    tokenizer = load_tokenizer(run_config.tokenizer)
    task = make_task("episodes", eval_config)
    episodes = task.episodes(2, 0, 2)[:4]
    prompts = [binding.text_key_prompt(tokenizer, e, task.template, np.random.default_rng(0)) for e in episodes]
    for episode, prompt in zip(episodes, prompts, strict=True):
        *demos, query = tokenizer.decode(prompt.tokens).split("\n")
        keys = {}
        for line, demo in zip(demos, episode.demos, strict=True):
            key, text = line.split(" ", 1)
            assert text == task.template.format(demo.label) and keys.setdefault(demo.label, key) == key
        assert len(set(keys.values())) == 3 and not set(keys.values()) & set(episode.candidates)
        assert query == f"{keys[episode.query.label]} A photo of a"
        assert [tokenizer.decode(c) for c in prompt.candidates] == [f" {c}." for c in episode.candidates]
    lm = next(load_models(run_config, str(evaluated), [0]))[0].lm
    scores = binding.lm_candidate_scores(lm, prompts[:2])
    assert scores.shape == (2, 3)
    for row, prompt in enumerate(prompts[:2]):
        for column, candidate in enumerate(prompt.candidates):
            logits, _ = lm(jnp.asarray([[*prompt.tokens, *candidate]], jnp.int32))
            log_probs = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
            direct = sum(log_probs[len(prompt.tokens) + i - 1, t] for i, t in enumerate(candidate))
            np.testing.assert_allclose(scores[row, column], direct, rtol=1e-5, atol=1e-4)
    result = binding.text_key_accuracy(lm, tokenizer, task, shots=2, episodes=8, batch_size=4)
    assert result["episodes"] == len(task.episodes(2, 0, 2)) and result["ways"] == 3
    assert 0.0 <= result["accuracy"] <= 1.0 and result["accuracy_se"] >= 0.0
