"""Shared fixtures: the tiny model config and batches that follow the batch contract."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
import tempfile

# Many tests (and the subprocesses they start) compile the same programs: share a persistent
# compilation cache for the session. Set before jax initialises its backend.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "flamingo_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from flamingo_jax import configs
from flamingo_jax.batch import Batch

# What the tests compile with, unless they run real model sizes: their programs are tiny, so XLA's
# compile time, not their run time, is what they wait for. Measured on 2 cores (AMD EPYC, 206
# GFLOP/s): LLVM level 0 cut the quick suite's wall time by 32%; the classic CPU fusion emitters
# instead of the newer MLIR ones compile the tiny train step in 3.5 s instead of 5.5 s and cut it
# from 11.3 to 7.6 minutes.
QUICK_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def quick_compile(markexpr: str) -> bool:
    """Whether a run selected by ``-m markexpr`` compiles with ``QUICK_COMPILE_FLAGS``: every run
    that selects by marker, as ``.ci/run`` and the README's command do. A run without ``-m`` keeps
    XLA's defaults, as a user's program does. The test whose trained model counts (the
    contrastive Fashion-MNIST run) starts its run in a process of its own with XLA's defaults;
    tests/test_real_weights.py (the real SmolLM2 weights, in this process) took 63 s with these
    flags and 61 s with XLA's defaults (2026-12-04, AMD EPYC, 481 GFLOP/s)."""
    return bool(markexpr)


def pytest_configure(config):
    """Sets ``QUICK_COMPILE_FLAGS`` for the runs :func:`quick_compile` picks. Every test compares
    programs compiled under the same settings, and the subprocesses it starts inherit them. Runs
    before any test module starts JAX's backend, which reads XLA_FLAGS once; a flag already set in
    XLA_FLAGS is kept."""
    if not quick_compile(config.option.markexpr or ""):
        return
    flags = os.environ.get("XLA_FLAGS", "").split()
    for flag in QUICK_COMPILE_FLAGS:
        if not any(f.split("=")[0] == flag.split("=")[0] for f in flags):
            flags.append(flag)
    os.environ["XLA_FLAGS"] = " ".join(flags)


def one_device_env(**extra: str) -> dict[str, str]:
    """The environment for a run in a subprocess that needs no mesh of its own: one CPU device,
    the session's other XLA flags kept. On 8 fake devices every compile is partitioned 8 ways and
    every step runs 8 device threads on the 2 cores: a 30-step smoke run takes 17.3 s there and
    12.3 s on one device (2026-12-04, AMD EPYC, 481 GFLOP/s)."""
    flags = [
        f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
    ]
    return {**os.environ, "XLA_FLAGS": " ".join(flags), **extra}


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a run as a user launches it: one CPU device and XLA's default flags
    (neither the session's fake devices nor its quick compile flags), for the end-to-end runs
    whose trained model a test judges (the contrastive stage)."""
    return {**os.environ, "XLA_FLAGS": "", **extra}


@pytest.fixture(scope="session")
def tiny_config():
    return configs.load_model_config("models/tiny.gin")


# The tiny model's LM in each family beside Llama (models/llama.py FAMILIES).
LM_FAMILIES = {
    "llama": {},
    "mpt": {"family": "mpt", "num_kv_heads": 4, "tie_embeddings": True, "clip_qkv": 3.0, "qk_norm": True},
    "gpt_neox": {
        "family": "gpt_neox",
        "num_kv_heads": 4,
        "attention_bias": True,
        "mlp_bias": True,
        "parallel_residual": True,
        "rotary_fraction": 0.5,
    },
}


def with_lm_family(config, family: str):
    """``config`` (a FlamingoConfig) with its LM in ``family``."""
    return dataclasses.replace(config, lm=dataclasses.replace(config.lm, **LM_FAMILIES[family]))


def set_gates(model, value: float) -> None:
    """Sets every tanh-gate alpha of the model's xattn blocks to ``value``."""
    blocks = model.xattn_layers  # a list, or one stacked module (LlamaConfig.scan_layers)
    for block in blocks if isinstance(blocks, nnx.List) else [blocks]:
        block.attn_gate[...] = np.full(block.attn_gate.shape, value, np.float32)
        block.ffw_gate[...] = np.full(block.ffw_gate.shape, value, np.float32)


def make_batch(config, *, batch_size=2, length=12, num_media=3, num_frames=1, seed=0) -> Batch:
    """A random batch: images at positions 2, 6 and 9 of each row (fewer for the second row,
    whose last media slot is padding)."""
    rng = np.random.default_rng(seed)
    vision = config.vision
    tokens = rng.integers(0, config.lm.vocab_size, (batch_size, length)).astype(np.int32)
    image_index = np.full((batch_size, length), -1, np.int32)
    image_mask = np.ones((batch_size, num_media), bool)
    for row in range(batch_size):
        starts = [2, 6, 9][:num_media]
        if row % 2 == 1 and num_media > 1:
            starts = starts[:-1]
            image_mask[row, num_media - 1] = False
        for slot, start in enumerate(starts):
            tokens[row, start] = config.media_token_id
            image_index[row, start:] = slot
    images = rng.normal(size=(batch_size, num_media, num_frames, vision.image_size, vision.image_size, vision.channels))
    loss_mask = (image_index >= 0).astype(np.float32)
    return Batch(tokens, images.astype(np.float32), image_mask, image_index, loss_mask)


def jitted(module, method="__call__"):
    """``module.method`` as one compiled program with the weights passed in (closed over, they
    would be constants of the program; op by op, a network compiles hundreds of small programs)."""
    import jax

    graphdef, state = nnx.split(module)
    call = jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args))
    return lambda *args: call(state, *args)


def jit_forward(model):
    """A jitted ``(tokens, image_index, image_mask, images) -> logits`` of a Flamingo ``model``."""
    forward = jitted(model)
    return lambda *args: forward(*args)[0]


def word_level_tokenizer(directory, size: int, **specials) -> str:
    """A tokenizer of the words w0 .. w{size - 1} saved as transformers saves one (w0 unknown,
    w1 end of sequence); returns its tokenizer.json path."""
    import tokenizers
    import transformers

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w1", unk_token="w0")
    tokenizer.save_pretrained(directory)
    return os.path.join(directory, "tokenizer.json")


def encoded_image(colour, mode="RGB", fmt="JPEG", size=(24, 20)):
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def add_tar_member(archive, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory):
    """img2dataset-style tar shard: good pairs, every bad-record kind, an escaping member."""
    root = tmp_path_factory.mktemp("wds")
    good = encoded_image((200, 30, 30))
    samples = {
        "000000": (good, b"a red square"),
        "000001": (encoded_image((0, 0, 0, 255), mode="CMYK"), b"a black square in CMYK"),
        "000002": (encoded_image((10, 20, 30), fmt="PNG", mode="P"), b"a palette image"),
        "000003": (b"", b"zero-byte image"),
        "000004": (good[: len(good) // 3], b"truncated image"),
        "000005": (good, b""),
        "000006": (good, b"\xff\xfe not utf-8 \xc3\x28"),
        "000007": (good, b"   "),
    }
    with tarfile.open(root / "00000.tar", "w") as archive:
        for key, (image, caption) in samples.items():
            add_tar_member(archive, f"{key}.jpg", image)
            add_tar_member(archive, f"{key}.txt", caption)
            add_tar_member(archive, f"{key}.json", json.dumps({"key": key}).encode())
        add_tar_member(archive, "../escape.jpg", good)
        add_tar_member(archive, "../escape.txt", b"an escaping member")
    return root


SMOKE_STEPS = 4


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One smoke training run (``runs/smoke_cpu.gin``, 4 steps, a checkpoint at 4, metrics every
    2), trained in this process once for every test that needs a trained workdir. Tests read it;
    a test that writes into a workdir copies it first (:func:`copy_run`)."""
    from flamingo_jax.train.loop import train

    workdir = tmp_path_factory.mktemp("smoke_run")
    configs.parse_gin(
        ["runs/smoke_cpu.gin"], [f"TRAIN_STEPS={SMOKE_STEPS}", f"CHECKPOINT_EVERY={SMOKE_STEPS}", "LOG_EVERY=2"]
    )
    summary = train(configs.run_config(), str(workdir))
    assert summary["step"] == SMOKE_STEPS and not summary["preempted"]
    return workdir


def copy_run(workdir, destination):
    """A writable copy of a run's workdir."""
    import shutil

    shutil.copytree(workdir, destination)
    return destination


@pytest.fixture(scope="session")
def benchmark_files(tmp_path_factory):
    """Small files in the published layouts of COCO Karpathy (``dataset_coco.json`` + images),
    VQAv2 (questions + annotations JSON over COCO val images) and HatefulMemes (jsonl + images):
    {name: path} as gin would set them."""
    root = tmp_path_factory.mktemp("benchmarks")
    (root / "val2014").mkdir()
    images = []
    for image_id in range(1, 7):
        name = f"COCO_val2014_{image_id:012d}.jpg"
        (root / "val2014" / name).write_bytes(encoded_image((image_id * 40, 20, 0)))
        split = "test" if image_id <= 3 else "restval"
        sentences = [{"raw": f"A red thing number {image_id}. "}, {"raw": "Something red."}]
        images.append(
            {"filepath": "val2014", "filename": name, "split": split, "cocoid": image_id, "sentences": sentences}
        )
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    questions = [{"image_id": i, "question": "What colour?", "question_id": 10 * i} for i in range(1, 5)]
    answers = [{"answer": "red"}] * 9 + [{"answer": "maroon"}]
    annotations = [{"question_id": 10 * i, "answers": answers} for i in range(1, 5)]
    (root / "questions.json").write_text(json.dumps({"questions": questions}))
    (root / "annotations.json").write_text(json.dumps({"annotations": annotations}))
    (root / "img").mkdir()
    lines = []
    for index in range(1, 5):
        (root / "img" / f"{index:02d}.png").write_bytes(encoded_image((0, 0, 50 * index), fmt="PNG"))
        lines.append({"id": index, "img": f"img/{index:02d}.png", "label": index % 2, "text": f"meme {index}"})
    (root / "dev.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return {
        "coco_json": str(root / "dataset_coco.json"),
        "coco_images": str(root),
        "vqav2_questions": str(root / "questions.json"),
        "vqav2_annotations": str(root / "annotations.json"),
        "vqav2_images": str(root / "val2014"),
        "hateful_memes_jsonl": str(root / "dev.jsonl"),
        "hateful_memes_images": str(root),
    }
