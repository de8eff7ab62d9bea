"""IDEFICS: the directory transformers' ``IdeficsForVisionText2Text.save_pretrained`` writes,
imported into our Flamingo; same random weights on both sides (gates, norms and the two extra
embedding rows included), logits within 1e-4 on an interleaved prompt with two images and the
same greedy tokens, for both gate shapes and with and without the query/key norms."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [reference] extra (torch, transformers)")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from flamingo_jax import configs  # noqa: E402
from flamingo_jax.evaluation import fewshot  # noqa: E402
from flamingo_jax.evaluation.generate import GenerateConfig, generate  # noqa: E402
from flamingo_jax.importers import idefics  # noqa: E402
from flamingo_jax.importers.pretrained import assign, flamingo_from_pretrained  # noqa: E402
from flamingo_jax.models.flamingo import Flamingo  # noqa: E402
from flamingo_jax.models.layers import CountingRngs  # noqa: E402
from flamingo_jax.tokenizer import Tokenizer  # noqa: E402

from conftest import one_device_env, word_level_tokenizer  # noqa: E402

pytestmark = pytest.mark.reference

VOCAB, IMAGE = 96, 16
FAKE, MEDIA = VOCAB, VOCAB + 1  # IDEFICS's <fake_token_around_image> and <image> ids


def _reference(alpha_type: str, qk_norms: bool):
    config = transformers.IdeficsConfig(
        vocab_size=VOCAB,
        additional_vocab_size=2,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        cross_layer_interval=2,
        qk_layer_norms=qk_norms,
        alpha_type=alpha_type,
        use_resampler=True,
        max_position_embeddings=64,
        vision_config=dict(
            embed_dim=32,
            image_size=IMAGE,
            patch_size=8,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="gelu",
        ),
        perceiver_config=dict(
            use_resampler=True,
            resampler_n_latents=6,
            resampler_depth=2,
            resampler_n_heads=4,
            resampler_head_dim=8,
            qk_layer_norms_perceiver=qk_norms,
        ),
    )
    config._attn_implementation = "eager"
    model = transformers.IdeficsForVisionText2Text(config).float().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                parameter.copy_(0.1 * noise)
            elif "alpha" in name:
                parameter.copy_(0.5 * noise)
            else:
                parameter.copy_(0.08 * noise)
    return model


def _image_attention_mask(tokens: np.ndarray, num_images: int) -> np.ndarray:
    """As IDEFICS's processor builds it: each token attends to the last image before it."""
    last = np.cumsum(tokens == MEDIA, axis=1) - 1
    return (last[:, :, None] == np.arange(num_images)).astype(np.int64)


@pytest.mark.parametrize("alpha_type, qk_norms", [("float", False), ("vector", True)])
def test_idefics_matches_transformers(tmp_path, alpha_type, qk_norms):
    reference = _reference(alpha_type, qk_norms)
    reference.save_pretrained(tmp_path)
    config, params = idefics.load_idefics(str(tmp_path))
    assert config.xattn_layer_indices == (0, 2)
    with nnx.use_eager_sharding(False):
        model = Flamingo(config, rngs=CountingRngs(0))
    assign(model, params)

    # <fake><image><fake> w5 w9 w3 <fake><image><fake> w7 w2: IDEFICS's prompt layout, two images.
    prompt = np.array(
        [
            [FAKE, MEDIA, FAKE, 5, 9, 3, FAKE, MEDIA, FAKE, 7, 2],
            [1, FAKE, MEDIA, FAKE, 11, 4, FAKE, MEDIA, FAKE, 8, 6],  # token 0 sees no image
        ]
    )
    pixels = np.random.default_rng(1).normal(size=(2, 2, 3, IMAGE, IMAGE)).astype(np.float32)
    ours_of = {MEDIA: config.media_token_id, FAKE: config.endofchunk_token_id}
    to_ours = np.vectorize(lambda t: ours_of.get(int(t), int(t)))
    tokens = to_ours(prompt).astype(np.int32)
    image_index = (np.cumsum(tokens == config.media_token_id, axis=1) - 1).astype(np.int32)
    images = pixels.transpose(0, 1, 3, 4, 2)[:, :, None]  # [B, N, F=1, H, W, C]

    def theirs(ids):
        with torch.no_grad():
            return reference(
                input_ids=torch.tensor(ids),
                pixel_values=torch.tensor(pixels),
                image_attention_mask=torch.tensor(_image_attention_mask(ids, 2)),
            ).logits.numpy()

    expected = theirs(prompt)[..., [*range(VOCAB), MEDIA, FAKE]]  # ours: base, <image>, second row
    logits, _ = model(tokens, image_index, np.ones((2, 2), bool), images)
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4

    steps, continued = 5, prompt
    for _ in range(steps):  # greedy, a full pass per step
        continued = np.concatenate([continued, theirs(continued)[:, -1].argmax(-1)[:, None]], axis=1)
    generated = generate(
        model, tokens, image_index, np.ones((2, 2), bool), images, config=GenerateConfig(steps, stop_tokens=(-1,))
    )
    np.testing.assert_array_equal(generated.tokens, to_ours(continued[:, prompt.shape[1] :]))


def test_idefics_config_errors_name_the_setting(tmp_path):
    reference = _reference("float", False)
    hf = reference.config.to_dict()
    with pytest.raises(ValueError, match="use_resampler=False"):
        idefics.idefics_config_from_hf({**hf, "use_resampler": False, "perceiver_config": {}})
    with pytest.raises(ValueError, match="additional_vocab_size=3"):
        idefics.idefics_config_from_hf({**hf, "additional_vocab_size": 3})
    config = idefics.idefics_config_from_hf(hf)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    del state["model.gated_cross_attn_layers.1.alpha_dense"]
    with pytest.raises(KeyError, match="alpha_dense"):
        idefics.idefics_params(state, config)


@pytest.mark.slow
def test_convert_writes_the_weights_and_the_model_gin(tmp_path):
    """``tools.convert --idefics=DIR`` needs no gin file: it writes the weights and model.gin,
    which rebuild the same model (its logits those of transformers' IDEFICS)."""
    reference = _reference("vector", True)
    reference.save_pretrained(tmp_path / "idefics")
    output = tmp_path / "converted"
    command = [sys.executable, "-m", "flamingo_jax.tools.convert", f"--idefics={tmp_path / 'idefics'}"]
    result = subprocess.run(command + [f"--output={output}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    config = configs.load_model_config(str(output / "model.gin"))
    assert config == idefics.idefics_config_from_hf(reference.config.to_dict())
    model = flamingo_from_pretrained(config, params=str(output))
    prompt = np.array([[FAKE, MEDIA, FAKE, 5, 9, 3, 7]])
    pixels = np.random.default_rng(2).normal(size=(1, 1, 3, IMAGE, IMAGE)).astype(np.float32)
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor(prompt),
            pixel_values=torch.tensor(pixels),
            image_attention_mask=torch.tensor(_image_attention_mask(prompt, 1)),
        ).logits.numpy()[..., [*range(VOCAB), MEDIA, FAKE]]
    tokens = np.where(
        prompt == MEDIA, config.media_token_id, np.where(prompt == FAKE, config.endofchunk_token_id, prompt)
    )
    image_index = (np.cumsum(tokens == config.media_token_id, axis=1) - 1).astype(np.int32)
    images = pixels.transpose(0, 1, 3, 4, 2)[:, :, None]
    logits, _ = model(tokens.astype(np.int32), image_index, np.ones((1, 1), bool), images)
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4


def test_idefics_protocol_prompt_and_tokens(benchmark_files):
    """runs/idefics_eval.gin: each image as <fake><image><fake> (our two new tokens), IDEFICS's
    caption prompt, demonstrations ended by a newline."""
    paths = [
        f"{macro}='{benchmark_files[key]}'"
        for macro, key in (("COCO_JSON", "coco_json"), ("COCO_IMAGES", "coco_images"))
    ]
    configs.parse_gin(["runs/smoke_cpu.gin", "runs/idefics_eval.gin"], [*paths, "EvalConfig.tasks=['coco']"])
    eval_config = configs.eval_config()
    task = fewshot.make_task("coco", eval_config)
    rng = np.random.default_rng(0)
    prompt = fewshot.build_prompt(
        task,
        task.pool[:1],
        task.queries[0],
        text_only=False,
        rng=rng,
        image_text=eval_config.image_text,
        chunk_end=eval_config.chunk_end,
    )
    image = "<fake_token_around_image><image><fake_token_around_image>"
    assert prompt.startswith(image + "Caption: ") and prompt.endswith("\n" + image + "Caption:")
    tokenizer = Tokenizer.from_bytes().with_new_tokens(idefics.NEW_TOKENS)
    ids = tokenizer.encode(prompt)
    media, fake = tokenizer.media_token_id, tokenizer.endofchunk_token_id
    assert ids[:3] == [fake, media, fake] and ids.count(media) == 2 and ids.count(fake) == 4
    assert tokenizer.decode(ids) == prompt and Tokenizer.from_bytes().encode("<fake_token_around_image>")[0] != fake


@pytest.mark.slow
def test_converted_idefics_evaluates_with_its_protocol(tmp_path, benchmark_files):
    reference = _reference("float", False)
    reference.save_pretrained(tmp_path / "idefics")
    converted = tmp_path / "converted"
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, env=one_device_env()
    )
    result = run("flamingo_jax.tools.convert", f"--idefics={tmp_path / 'idefics'}", f"--output={converted}")
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = word_level_tokenizer(tmp_path / "tokenizer", VOCAB)
    files = benchmark_files
    paths = {
        "CONVERTED": converted,
        "TOKENIZER": f"hf_json:{tokenizer}",
        "COCO_JSON": files["coco_json"],
        "COCO_IMAGES": files["coco_images"],
        "VQAV2_QUESTIONS": files["vqav2_questions"],
        "VQAV2_ANNOTATIONS": files["vqav2_annotations"],
        "VQAV2_IMAGES": files["vqav2_images"],
    }
    small = ["EvalConfig.shots=[0,2]", "EvalConfig.pool_size=0", "EVAL_QUERIES=3", "EvalConfig.batch_size=3"]
    workdir = tmp_path / "eval"
    result = run(
        "flamingo_jax.main",
        "--mode=eval",
        f"--gin_file={converted / 'model.gin'}",
        "--gin_file=runs/idefics_eval.gin",
        *[f"--gin_bindings={key}='{value}'" for key, value in paths.items()],
        "--gin_bindings=EvalConfig.tasks=['coco','vqav2']",
        *[f"--gin_bindings={b}" for b in small],
        f"--workdir={workdir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for task, metric, new_tokens in (("coco", "CIDEr", 20), ("vqav2", "accuracy", 5)):
        with open(workdir / "eval" / f"{task}_0.json") as f:
            record = json.load(f)
        assert record["config"]["max_new_tokens"] == new_tokens
        assert record["config"]["image_text"] == "<fake_token_around_image><image><fake_token_around_image>"
        for values in record["results"].values():
            assert values["metric"] == metric and np.isfinite(values[metric])
