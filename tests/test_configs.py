"""Every model gin file parses; bad bindings fail with a message naming them."""

from __future__ import annotations

import glob
import os

import gin
import pytest

from flamingo_jax import configs
from flamingo_jax.models.flamingo import FlamingoConfig

MODEL_FILES = sorted(
    os.path.relpath(path, configs.EXPERIMENTS_DIR)
    for path in glob.glob(os.path.join(configs.EXPERIMENTS_DIR, "models", "*.gin"))
    if not path.endswith("_common.gin")
) + ["flamingo_jax/demo/demo_model.gin"]


def test_model_files_exist():
    names = {os.path.basename(path) for path in MODEL_FILES}
    expected = {"flamingo_3b.gin", "flamingo_9b.gin", "flamingo_80b.gin"}
    expected |= {"openflamingo_3b.gin", "openflamingo_4b.gin", "openflamingo_9b.gin"}
    assert expected | {"smollm2_135m.gin", "tiny.gin"} <= names


@pytest.mark.parametrize("path", MODEL_FILES)
def test_model_gin_parses(path):
    config = configs.load_model_config(path)
    assert isinstance(config, FlamingoConfig)
    assert config.xattn_layer_indices


def test_openflamingo_layout():
    config = configs.load_model_config("models/openflamingo_9b.gin")
    assert config.xattn_layer_indices == (3, 7, 11, 15, 19, 23, 27, 31)
    assert (config.xattn.num_heads, config.xattn.head_dim, config.xattn.activation) == (8, 64, "gelu")
    assert config.resampler.max_frames == 0
    # The v2 releases' LMs and their xattn spacing (OpenFlamingo's model cards).
    families = {}
    for name in ("3b", "4b", "9b"):
        config = configs.load_model_config(f"models/openflamingo_{name}.gin")
        families[name] = (config.lm.family, config.lm.num_layers, config.xattn.every, len(config.xattn_layer_indices))
    assert families == {"3b": ("mpt", 24, 1, 24), "4b": ("gpt_neox", 32, 2, 16), "9b": ("mpt", 32, 4, 8)}


def test_smollm2_matches_the_shipped_checkpoint_shape():
    lm = configs.load_model_config("models/smollm2_135m.gin").lm
    assert (lm.vocab_size, lm.width, lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.mlp_dim) == (
        49152,
        576,
        30,
        9,
        3,
        1536,
    )
    assert lm.tie_embeddings and lm.rope_theta == 100000.0


def test_bindings_override_and_unknown_binding_fails():
    config = configs.load_model_config("models/tiny.gin", ["XAttnConfig.every = 1"])
    assert config.xattn_layer_indices == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="No configurable matching 'XAttnConfig.evry'|evry"):
        configs.load_model_config("models/tiny.gin", ["XAttnConfig.evry = 1"])
    gin.clear_config()


def test_missing_gin_file_is_named():
    with pytest.raises(FileNotFoundError, match="no_such_model.gin"):
        configs.load_model_config("models/no_such_model.gin")


def test_invalid_values_fail_with_the_setting_name():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        configs.load_model_config("models/tiny.gin", ["LlamaConfig.num_heads = 6", "LlamaConfig.num_kv_heads = 4"])


RUN_FILES = sorted(
    os.path.relpath(path, configs.EXPERIMENTS_DIR)
    for path in glob.glob(os.path.join(configs.EXPERIMENTS_DIR, "runs", "*.gin"))
    # Partial files added to a run: evaluation settings and the shared paper recipe.
    if os.path.basename(path)
    not in ("eval_benchmarks.gin", "openflamingo_eval.gin", "idefics_eval.gin", "flamingo_recipe.gin")
) + ["flamingo_jax/demo/demo_cpu.gin", "flamingo_jax/demo/contrastive_fashion.gin"]


@pytest.mark.parametrize("path", ["runs/eval_benchmarks.gin", "flamingo_jax/demo/demo_eval.gin"])
def test_eval_gin_parses_beside_a_run(path):
    configs.parse_gin(["runs/smoke_cpu.gin", path])
    eval_config = configs.eval_config()
    assert eval_config.tasks and eval_config.shots


@pytest.mark.parametrize("size", ["3b", "4b", "9b"])
def test_openflamingo_eval_follows_its_protocol(size):
    """open_flamingo/eval/evaluate.py: shots 0/4/8/16/32, one trial with seed 42, a 2048-example
    demonstration pool, 3 beams without length penalty, 20 new tokens for captions and 5 for
    VQA; a converted model is evaluated as the run's initialisation, with no training data."""
    configs.parse_gin([f"models/openflamingo_{size}.gin", "runs/openflamingo_eval.gin"])
    run_config, eval_config = configs.run_config(), configs.eval_config()
    assert run_config.datasets == () and run_config.model.xattn.placement == "openflamingo"
    assert (eval_config.shots, eval_config.seeds, eval_config.pool_size) == ((0, 4, 8, 16, 32), (42,), 2048)
    assert (eval_config.num_beams, eval_config.length_penalty, eval_config.checkpoint_step) == (3, 0.0, 0)
    assert {task: eval_config.for_task(task, 0).max_new_tokens for task in eval_config.task_options} == {
        "coco": 20,
        "flickr30k": 20,
        "vqav2": 5,
        "ok_vqa": 5,
        "textvqa": 5,
        "vizwiz": 5,
        "hateful_memes": 20,
        "imagenet": 20,
    }


@pytest.mark.parametrize("path", RUN_FILES)
def test_run_gin_parses(path):
    """Every run config parses into a RunConfig without its data present (paths are checked when
    training starts, so configs can be planned anywhere)."""
    configs.parse_gin([path])
    run_config = configs.run_config()
    assert run_config.datasets and run_config.train_steps > 0


@pytest.mark.parametrize("size", ["3b", "9b", "80b"])
def test_paper_recipes(size):
    """Appendix B.1.2: AdamW lr 1e-4 after 5k warmup steps then constant, weight decay 0.1 but not
    on the resampler, clipping 1.0, 500k steps, M3W/ALIGN/LTIP/VTP weighted 1.0/0.2/0.2/0.03,
    320 px images, 8 video frames, bf16 activations and frozen weights; B.3.1 batch sizes."""
    configs.parse_gin([f"runs/flamingo_{size}.gin"])
    run_config = configs.run_config()
    optimizer = run_config.optimizer
    assert (optimizer.learning_rate, optimizer.warmup_steps, optimizer.schedule) == (1e-4, 5000, "constant")
    assert (optimizer.weight_decay, optimizer.no_decay, optimizer.clip_norm) == (0.1, ("resampler",), 1.0)
    assert run_config.train_steps == 500_000 and run_config.mixture_strategy == "accumulate"
    datasets = {d.name: d for d in run_config.datasets}
    assert {n: d.loss_weight for n, d in datasets.items()} == {"m3w": 1.0, "align": 0.2, "ltip": 0.2, "vtp": 0.03}
    assert {n: d.batch_size for n, d in datasets.items()} == {"m3w": 256, "align": 512, "ltip": 512, "vtp": 64}
    assert (datasets["vtp"].num_frames, datasets["m3w"].max_images) == (8, 5)
    model = run_config.model
    assert model.vision.image_size == 320
    assert (model.lm.dtype, model.lm.param_dtype, model.trainable_param_dtype) == ("bfloat16", "bfloat16", "float32")
    assert model is not None and configs.load_model_config(f"models/flamingo_{size}.gin") == model
    if size == "80b":  # 16-way model parallelism as in the paper
        assert (run_config.mesh.tensor, run_config.mesh.rules) == (16, "fsdp_tensor")


def test_demo_eval_overrides_to_fewer_tasks():
    """The demo's per-task settings (captions on 48 queries, the initialisation on classification
    at 4 shots) stay valid when a command line evaluates fewer tasks."""
    configs.parse_gin(["flamingo_jax/demo/demo_cpu.gin"])
    full = configs.eval_config()
    assert full.queries_for("fashion_mnist_captions") == 48 and full.queries_for("fashion_mnist") == 300
    assert full.tasks_for(None) == ("fashion_mnist", "fashion_mnist_captions")
    assert full.tasks_for(0) == ("fashion_mnist",)
    assert (full.shots_for(None), full.shots_for(0)) == ((0, 4, 8), (4,))
    configs.parse_gin(["flamingo_jax/demo/demo_cpu.gin"], ["EvalConfig.tasks=['fashion_mnist_captions']"])
    fewer = configs.eval_config()
    assert fewer.tasks_for(None) == ("fashion_mnist_captions",) and fewer.tasks_for(0) == ()


def test_binding_recipe_parses_with_the_demo():
    """binding.gin on top of the demo: four blocks before the frozen LM's copying heads (16.0,
    17.3), both episode streams iid with the loss on answerable labels only, and each binding
    task evaluated at its own shot counts in the training template."""
    configs.parse_gin(["flamingo_jax/demo/demo_cpu.gin", "flamingo_jax/demo/binding.gin"])
    run_config, eval_config = configs.run_config(), configs.eval_config()
    # Four blocks below the copying heads (exp C6 in flamingo_jax/demo/RESULTS.md).
    assert [layer for layer in run_config.model.xattn_layer_indices if layer <= 16] == [10, 12, 14, 16]
    datasets = {d.name: d for d in run_config.datasets}
    assert list(datasets) == ["fashion_pairs", "episodes", "names"]
    for name in ("episodes", "names"):
        options = datasets[name].options
        assert (options["order"], options["loss"], options["template"]) == ("iid", "answerable", "{}.")
        assert options["max_images"] == datasets[name].max_images == 26
    assert eval_config.shots_for(None, "binding_emoji_3way_novel") == (1, 2, 4, 8)
    assert eval_config.shots_for(None, "fashion_mnist") == (0, 4)
    assert eval_config.task_options["binding_emoji_3way_names"]["template"] == "{}."


def test_a_directory_shadowing_an_include_folder_is_named(tmp_path, monkeypatch):
    """A ``runs/`` directory in the working directory (a workdir, say) hides
    ``experiments/runs/`` from gin's package lookup of an ``include``: the error names it.
    ``python -m ...`` puts the working directory first on ``sys.path``; pytest's workers may not."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match=r"\['runs'\] shadow"):
        configs.parse_gin(["models/openflamingo_3b.gin", "runs/openflamingo_eval.gin"])
