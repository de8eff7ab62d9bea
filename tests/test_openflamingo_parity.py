"""Whole-model parity with OpenFlamingo's own ``Flamingo``, built by its factory
(``create_model_and_transforms``) around a tiny MPT or GPT-NeoX LM and tokenizer saved to disk
and open_clip's own ``VisionTransformer``; its trainable parts saved as its training script saves
``checkpoint.pt``; imported here from those files as a user would (the LM directory, the vision
state dict, the checkpoint). Same random weights on both sides: logits within 1e-4, and the same
greedy tokens from one interleaved prompt with two images. Also open_clip's ViT against ours,
with ln_post on the tokens (open_clip >= 2.24) and without (the releases OpenFlamingo v2 used).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [reference] extra (torch, transformers)")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from references import open_clip_transformer, open_clip_zoo, openflamingo_module, openflamingo_trainable_state  # noqa: E402

from flamingo_jax import configs  # noqa: E402
from flamingo_jax.evaluation.generate import GenerateConfig, generate  # noqa: E402
from flamingo_jax.importers import clip  # noqa: E402
from flamingo_jax.importers.pretrained import assign, flamingo_from_pretrained  # noqa: E402
from flamingo_jax.models.layers import CountingRngs  # noqa: E402
from flamingo_jax.models.vit import ViT, ViTConfig  # noqa: E402

from conftest import one_device_env, word_level_tokenizer  # noqa: E402

pytestmark = pytest.mark.reference

BASE_VOCAB = 128  # the tokenizer's own tokens; OpenFlamingo adds <|endofchunk|>, <image>, <PAD>
LM_VOCAB = 160  # the LM's embedding rows (padded beyond the tokenizer, as MPT's and GPT-NeoX's are)
IMAGE, PATCH, VISION_WIDTH = 16, 8, 32


def _randomize(module, seed, scale=0.2):
    """Random values in every parameter (gates and norms included) so no mapping error hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            offset = 0.5 if parameter.ndim == 1 and parameter.numel() > 1 else 0.0  # norms away from 0
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale + offset)


def _open_clip_vit(final_ln_after_pool: bool):
    transformer = open_clip_transformer()
    visual = transformer.VisionTransformer(
        image_size=IMAGE,
        patch_size=PATCH,
        width=VISION_WIDTH,
        layers=2,
        heads=4,
        mlp_ratio=4.0,
        output_dim=16,
        final_ln_after_pool=final_ln_after_pool,
        act_layer=transformer.QuickGELU,  # OpenAI's ViT-L/14 weights, as OpenFlamingo loads them
    )
    _randomize(visual, 0)
    return visual.eval()


def _our_vit_config(post_norm_tokens: bool) -> ViTConfig:
    return ViTConfig(
        image_size=IMAGE,
        patch_size=PATCH,
        width=VISION_WIDTH,
        depth=2,
        num_heads=4,
        mlp_dim=4 * VISION_WIDTH,
        activation="quick_gelu",
        output_tokens="patches",
        post_norm_tokens=post_norm_tokens,
    )


@pytest.mark.parametrize("final_ln_after_pool", [True, False])
def test_open_clip_vision_transformer_parity(final_ln_after_pool):
    """open_clip's tokens (``output_tokens``) are ours with ``post_norm_tokens`` the opposite of
    its ``final_ln_after_pool``; its pooled output is ln_post of our CLS token times ``proj``."""
    visual = _open_clip_vit(final_ln_after_pool)
    visual.output_tokens = True
    state = {k: v.detach().numpy() for k, v in visual.state_dict().items()}
    images = np.random.default_rng(1).normal(size=(2, 3, IMAGE, IMAGE)).astype(np.float32)
    with torch.no_grad():
        pooled, tokens = visual(torch.tensor(images))
    for post_norm, output in ((not final_ln_after_pool, "patches"), (True, "all")):
        config = dataclasses.replace(_our_vit_config(post_norm), output_tokens=output)
        with nnx.use_eager_sharding(False):
            ours = ViT(config, rngs=CountingRngs(0))
        assign(ours, clip.from_open_clip_visual(state, config))
        actual = np.asarray(ours(images.transpose(0, 2, 3, 1)))
        if output == "patches":
            assert actual.shape == tuple(tokens.shape)
            assert np.abs(actual - tokens.numpy()).max() <= 1e-4
        else:
            assert np.abs(actual[:, 0] @ state["proj"] - pooled.numpy()).max() <= 1e-4


def _language_model(family, directory):
    torch.manual_seed(0)
    if family == "mpt":
        config = transformers.MptConfig(d_model=64, n_heads=4, n_layers=4, vocab_size=LM_VOCAB, max_seq_len=64)
        model = transformers.MptForCausalLM(config)
    else:
        config = transformers.GPTNeoXConfig(
            vocab_size=LM_VOCAB,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            rotary_pct=0.5,
            use_parallel_residual=False,
            tie_word_embeddings=False,
            max_position_embeddings=64,
        )
        model = transformers.GPTNeoXForCausalLM(config)
    model = model.float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5) if name.endswith("weight") else parameter.uniform_(-0.3, 0.3)
            elif name.endswith("bias"):
                parameter.uniform_(-0.1, 0.1)
    model.save_pretrained(directory)


# family -> (our gin, overrides, every, decoder-layer prefix of the released checkpoints, embeddings)
FAMILIES = {
    "mpt": (
        "models/openflamingo_3b.gin",
        ["LlamaConfig.qk_norm = False", "LlamaConfig.tie_embeddings = True"],
        1,
        "lang_encoder.transformer.blocks",
        ("lang_encoder.transformer.wte.weight", None),
    ),
    "gpt_neox": (
        "models/openflamingo_4b.gin",
        ["LlamaConfig.rotary_fraction = 0.5"],
        2,
        "lang_encoder.gpt_neox.layers",
        ("lang_encoder.gpt_neox.embed_in.weight", "lang_encoder.embed_out.weight"),
    ),
}


SIZES = [
    f"LlamaConfig.vocab_size = {BASE_VOCAB}",
    "LlamaConfig.width = 64",
    "LlamaConfig.num_layers = 4",
    "LlamaConfig.num_heads = 4",
    "LlamaConfig.num_kv_heads = 4",
    "LlamaConfig.mlp_dim = 256",
    f"ViTConfig.image_size = {IMAGE}",
    f"ViTConfig.patch_size = {PATCH}",
    f"ViTConfig.width = {VISION_WIDTH}",
    "ViTConfig.depth = 2",
    "ViTConfig.num_heads = 4",
    f"ViTConfig.mlp_dim = {4 * VISION_WIDTH}",
    f"ResamplerConfig.width = {VISION_WIDTH}",
]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """family -> OpenFlamingo's model built by its factory, and the files a user would have of it:
    the LM directory, the tokenizer, the vision state dict and the checkpoint its training
    script saves (built once per family)."""
    built = {}

    def get(family):
        if family not in built:
            built[family] = _release(family, tmp_path_factory.mktemp(f"openflamingo_{family}"))
        return built[family]

    return get


def _release(family, root):
    gin_file, overrides, every, layers_prefix, (embed_key, head_key) = FAMILIES[family]
    lm_dir, tokenizer_dir = root / "lm", root / "tokenizer"
    _language_model(family, lm_dir)
    word_level_tokenizer(tokenizer_dir, BASE_VOCAB)
    visual = _open_clip_vit(final_ln_after_pool=True)  # tokens without ln_post, as OpenFlamingo v2's
    torch.save(visual.state_dict(), root / "visual.pt")

    factory = openflamingo_module("factory")
    factory.open_clip = open_clip_zoo(visual, VISION_WIDTH)
    reference, _, tokenizer = factory.create_model_and_transforms(
        "ViT-L-14", "openai", str(lm_dir), str(tokenizer_dir), cross_attn_every_n_layers=every, use_local_files=True
    )
    eoc, media = tokenizer.encode("<|endofchunk|>")[-1], tokenizer.encode("<image>")[-1]
    assert (eoc, media, len(tokenizer)) == (BASE_VOCAB, BASE_VOCAB + 1, BASE_VOCAB + 3)
    # Trained parts random (the factory's gates start at 0), the input embedding included; the
    # frozen LM and vision encoder stay as saved.
    _randomize(reference.perceiver, 1)
    _randomize(reference.lang_encoder.gated_cross_attn_layers, 2)
    with torch.no_grad():
        embedding = reference.lang_encoder.get_input_embeddings().weight
        embedding.copy_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    reference.eval()
    state = openflamingo_trainable_state(reference)
    if head_key and head_key not in state:
        # transformers 4, which OpenFlamingo v2 trained with, named GPT-NeoX's head embed_out, and
        # the filter keeps it for the "embed" in its name (its rows for the new tokens are the
        # resize's, never trained); transformers 5 names it lm_head, which the filter drops.
        state[head_key] = reference.lang_encoder.get_output_embeddings().weight.detach().clone()
    assert any(key.startswith(f"{layers_prefix}.") and ".gated_cross_attn_layer." in key for key in state)
    assert not any("decoder_layer" in key or "vision_encoder" in key for key in state)
    torch.save({"model_state_dict": state}, root / "checkpoint.pt")
    bindings = [*SIZES, f"XAttnConfig.every = {every}", *overrides]
    sources = dict(
        lm=str(lm_dir),
        vision_open_clip=str(root / "visual.pt"),
        openflamingo=str(root / "checkpoint.pt"),
        media_token_index=media,
        endofchunk_token_index=eoc,
        input_embeddings_key=embed_key,
        output_embeddings_key=head_key,
    )
    return types.SimpleNamespace(
        family=family, root=root, gin_file=gin_file, bindings=bindings, sources=sources, reference=reference
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_whole_model_matches_openflamingo(release, family):
    released = release(family)
    reference, media, eoc = (
        released.reference,
        released.sources["media_token_index"],
        released.sources["endofchunk_token_index"],
    )
    config = configs.load_model_config(released.gin_file, released.bindings)
    model = flamingo_from_pretrained(config, **released.sources)

    # <image> w5 w9 w3 <|endofchunk|> <image> w7 w2, two images; OpenFlamingo's ids.
    prompt = np.array([[media, 5, 9, 3, eoc, media, 7, 2], [media, 11, 4, eoc, media, 8, 6, 1]])
    pixels = np.random.default_rng(4).normal(size=(2, 2, 1, 3, IMAGE, IMAGE)).astype(np.float32)
    ours_of = {media: config.media_token_id, eoc: config.endofchunk_token_id}
    tokens = np.vectorize(lambda t: ours_of.get(int(t), int(t)))(prompt).astype(np.int32)
    image_index = (np.cumsum(tokens == config.media_token_id, axis=1) - 1).astype(np.int32)
    images = pixels.transpose(0, 1, 2, 4, 5, 3)
    with torch.no_grad():
        expected = reference(torch.tensor(pixels), torch.tensor(prompt)).logits.numpy()
    logits, _ = model(tokens, image_index, np.ones((2, 2), bool), images)
    # Ours: the base vocabulary, <image>, <|endofchunk|>; OpenFlamingo's adds <PAD> after them.
    expected = expected[..., [*range(BASE_VOCAB), media, eoc]]
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4

    # Greedy decoding by OpenFlamingo's forward, a full pass per step (its ``generate`` goes
    # through transformers' ``generate``, which in transformers 5 calls the LM without the
    # ``attention_mask`` argument OpenFlamingo's FlamingoLMMixin.forward requires).
    steps, theirs = 6, prompt
    with torch.no_grad():
        for _ in range(steps):
            step = reference(torch.tensor(pixels), torch.tensor(theirs)).logits[:, -1].argmax(-1).numpy()
            theirs = np.concatenate([theirs, step[:, None]], axis=1)
    theirs = theirs[:, prompt.shape[1] :]
    generated = generate(model, tokens, image_index, np.ones((2, 2), bool), images, config=GenerateConfig(steps))
    for row in range(2):  # both stop after <|endofchunk|>, OpenFlamingo's end of a chunk
        length = int(generated.lengths[row])
        assert [ours_of.get(int(t), int(t)) for t in theirs[row, :length]] == generated.tokens[row, :length].tolist()
        assert length == steps or theirs[row, length - 1] == eoc


@pytest.mark.slow
def test_converted_checkpoint_evaluates_with_the_openflamingo_protocol(release, benchmark_files, tmp_path):
    """``tools.convert`` on the released files, then ``--mode=eval`` of the converted weights on
    COCO / VQAv2 / HatefulMemes files in their published layouts, with runs/openflamingo_eval.gin
    (each task with its own decoding length). The MPT release: the GPT-NeoX one differs in the
    weights' names and layout only, which ``test_whole_model_matches_openflamingo`` checks
    through the same ``pretrained_params``."""
    released = release("mpt")
    sources = released.sources
    converted = tmp_path / "converted"
    flags = [
        f"--lm={sources['lm']}",
        f"--vision_open_clip={sources['vision_open_clip']}",
        f"--openflamingo={sources['openflamingo']}",
        f"--openflamingo_media_token={sources['media_token_index']}",
        f"--openflamingo_endofchunk_token={sources['endofchunk_token_index']}",
        f"--openflamingo_embeddings_key={sources['input_embeddings_key']}",
    ]
    bindings = [f"--gin_bindings={b}" for b in released.bindings]
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, env=one_device_env()
    )
    result = run(
        "flamingo_jax.tools.convert", f"--gin_file={released.gin_file}", *bindings, *flags, f"--output={converted}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = benchmark_files
    paths = {
        "CONVERTED": converted,
        "TOKENIZER": f"hf_json:{released.root / 'tokenizer' / 'tokenizer.json'}",
        "COCO_JSON": files["coco_json"],
        "COCO_IMAGES": files["coco_images"],
        "VQAV2_QUESTIONS": files["vqav2_questions"],
        "VQAV2_ANNOTATIONS": files["vqav2_annotations"],
        "VQAV2_IMAGES": files["vqav2_images"],
        "HATEFUL_MEMES_JSONL": files["hateful_memes_jsonl"],
        "HATEFUL_MEMES_IMAGES": files["hateful_memes_images"],
    }
    small = ["EvalConfig.shots=[0,2]", "EvalConfig.pool_size=0", "EVAL_QUERIES=3", "EvalConfig.batch_size=3"]
    workdir = tmp_path / "eval"
    result = run(
        "flamingo_jax.main",
        "--mode=eval",
        f"--gin_file={released.gin_file}",
        "--gin_file=runs/openflamingo_eval.gin",
        *bindings,
        *[f"--gin_bindings={key}='{value}'" for key, value in paths.items()],
        *[f"--gin_bindings={b}" for b in small],
        f"--workdir={workdir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for task, metric, new_tokens in (
        ("coco", "CIDEr", 20),
        ("vqav2", "accuracy", 5),
        ("hateful_memes", "roc_auc", 20),
    ):
        with open(workdir / "eval" / f"{task}_0.json") as f:
            record = json.load(f)
        assert record["config"]["max_new_tokens"] == new_tokens
        assert sorted(record["results"]) == ["0", "2"]
        for values in record["results"].values():
            assert values["metric"] == metric and np.isfinite(values[metric])
