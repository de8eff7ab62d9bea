"""Side-by-side benchmark against OpenFlamingo (PyTorch, the ``open-flamingo`` package, random
weights, nothing downloaded): training-step throughput and greedy generation, same model
dimensions, same machine, 2 threads, fp32, reported as ratios.

Config (both sides): LM with the SmolLM2-135M shape (vocab 49152, width 576, 30 layers, 9 heads,
3 KV heads, MLP 1536, RoPE theta 1e5, tied embeddings), frozen; ViT-B/32 at 224 px, frozen;
resampler depth 6, 64 latents, 8 x 64 heads; gated xattn every 2 LM layers, 8 x 64 heads,
FFW x4; trainable: resampler + xattn + the two new-token rows. Training step: batch 8, 128
tokens with 2 ``<image>`` tokens and 2 images per example, forward + backward + AdamW (lr 1e-4).
Generation: batch 1, ``<image>`` + 15 tokens with one image, 32 greedy tokens, no early stop.

Every (side, allocator) pair runs in its own process, under glibc's default allocator and under
one tuned to keep freed memory (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736
MALLOC_TOP_PAD_=536870912``; page faults are slow on these VMs).

    python bench/vs_openflamingo.py     # writes bench/results/vs_openflamingo_<date>.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from step_config import BATCH, ENDOFCHUNK, IMAGES, LENGTH, MEDIA, MODEL_GIN, VOCAB, bench_inputs  # bench/ on sys.path

PROMPT_TOKENS, NEW_TOKENS = 16, 32
THREADS = 2
TUNED_MALLOC = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "536870912",
}


def timed(fn, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return {"seconds": statistics.median(times), "seconds_all": times}


# ----------------------------------------------------------------------------------------------
# Our side.
# ----------------------------------------------------------------------------------------------


def ours(repeats: int) -> dict:
    from step_config import bench_batch, build_training

    from flamingo_jax import flops
    from flamingo_jax.evaluation.generate import GenerateConfig, generate
    from flamingo_jax.models.kinds import count_params
    from flamingo_jax.train.params import merge_model

    model_config, training = build_training()
    tokens, images = bench_inputs()
    batch = bench_batch()

    def step(training=training):
        float(training.step({"bench": batch})["loss"])  # the float() waits for the step

    started = time.perf_counter()
    step()
    compile_s = time.perf_counter() - started
    train_result = timed(step, repeats, warmup=1)
    compiled_programs = training.step_fn._cache_size()  # 1: no recompilation between steps
    step_flops = flops.train_step_flops(model_config, BATCH, LENGTH, IMAGES)
    peak = flops.measured_matmul_peak(size=2048)

    # bf16 frozen weights and activations (trainable weights stay fp32), reported separately.
    bf16_bindings = [
        f"{name}.{field} = 'bfloat16'" for name in ("LlamaConfig", "ViTConfig") for field in ("param_dtype", "dtype")
    ]
    bf16_bindings += ["ResamplerConfig.dtype = 'bfloat16'"]
    _, bf16_training = build_training(bf16_bindings)
    step(bf16_training)
    bf16_result = timed(lambda: step(bf16_training), repeats, warmup=1)
    bf16_result["tokens_per_s"] = BATCH * LENGTH / bf16_result["seconds"]

    model = merge_model(training.graphdef, training.state.params, training.frozen)
    prompt = tokens[:1, :PROMPT_TOKENS].copy()
    inputs = (prompt, np.zeros((1, PROMPT_TOKENS), np.int32), np.ones((1, 1), bool), images[:1, :1])
    config = GenerateConfig(max_new_tokens=NEW_TOKENS, stop_tokens=(-1,))
    generation = {}
    for use_cache in (True, False):
        run = lambda use_cache=use_cache: generate(model, *inputs, config=config, use_cache=use_cache)
        result = timed(run, repeats, warmup=1)
        result["tokens_per_s"] = NEW_TOKENS / result["seconds"]
        result["tokens"] = np.asarray(run().tokens[0]).tolist()
        generation["cached" if use_cache else "uncached"] = result
    # Bytes of weights read per decoded token: the LM (with its tied head) and the xattn blocks.
    decode_bytes = 4 * (count_params(model.lm) + count_params(model.xattn_layers) + count_params(model.new_tokens))
    return {
        "train": {
            **train_result,
            "compile_and_first_s": compile_s,
            "tokens_per_s": BATCH * LENGTH / train_result["seconds"],
            "flops_per_step": step_flops,
            "matmul_peak_flops": peak,
            "mfu": step_flops / train_result["seconds"] / peak,
            "compiled_programs_after_all_steps": compiled_programs,
        },
        "train_bf16": bf16_result,
        "generate": generation,
        "decode_weight_bytes_per_token": decode_bytes,
    }


# ----------------------------------------------------------------------------------------------
# OpenFlamingo's side.
# ----------------------------------------------------------------------------------------------


def build_openflamingo():
    """OpenFlamingo's ``Flamingo`` of the bench dimensions (random weights, gates at 0.5), built
    as its factory builds one, and ``torch``."""
    import types

    # The package's __init__ imports open_clip for its factory; the model classes do not need it.
    sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))
    import torch
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)

    class Visual(torch.nn.Module):  # open_clip's visual interface: (pooled, patch tokens)
        def __init__(self):
            super().__init__()
            vision = CLIPVisionConfig(
                hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=32
            )
            self.model = CLIPVisionModel(vision)

        def forward(self, pixels):
            hidden = self.model(pixel_values=pixels).last_hidden_state
            return hidden[:, 0], hidden[:, 1:]

    class VisionEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = Visual()

    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            rope_theta=100000.0,
            tie_word_embeddings=True,
        )
    )
    # As open_flamingo.src.factory.create_model_and_transforms does.
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("model.layers")
    lm.resize_token_embeddings(VOCAB + 2, mean_resizing=False)
    model = Flamingo(VisionEncoder(), lm, ENDOFCHUNK, MEDIA, vis_dim=768, cross_attn_every_n_layers=2)
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)  # its train loop masks all but new rows
    for layer in model.lang_encoder.gated_cross_attn_layers:
        if layer is not None:
            with torch.no_grad():
                layer.attn_gate.fill_(0.5)
                layer.ff_gate.fill_(0.5)
    return model, torch


def openflamingo(repeats: int) -> dict:
    model, torch = build_openflamingo()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    tokens, images = bench_inputs()
    lang = torch.from_numpy(tokens.astype(np.int64))
    vision = torch.from_numpy(images.transpose(0, 1, 2, 5, 3, 4).copy())
    mask = torch.ones_like(lang)

    def step():
        loss = model(vision, lang, attention_mask=mask, labels=lang).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_result = timed(step, repeats, warmup=2)
    model.eval()

    def run():
        # OpenFlamingo's generate(): media encoded once, then Hugging Face's cached greedy loop.
        # transformers >= 5 calls the LM mixin without the attention mask it requires, so the
        # same loop is written out here: one cached forward per new token, argmax, no early stop.
        with torch.no_grad():
            model.lang_encoder._use_cached_vision_x = True
            model._encode_vision_x(vision_x=vision[:1, :1])
            ids, attention = lang[:1, :PROMPT_TOKENS], mask[:1, :PROMPT_TOKENS]
            out = model.lang_encoder(input_ids=ids, attention_mask=attention, use_cache=True)
            generated = []
            for _ in range(NEW_TOKENS):
                next_id = out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(next_id)
                attention = torch.cat([attention, torch.ones_like(next_id)], dim=1)
                out = model.lang_encoder(
                    input_ids=next_id, attention_mask=attention, past_key_values=out.past_key_values, use_cache=True
                )
            model.lang_encoder.clear_conditioned_layers()
            model.lang_encoder._use_cached_vision_x = False
            return torch.cat(generated, dim=1)

    generation = timed(run, repeats, warmup=1)
    generation["tokens_per_s"] = NEW_TOKENS / generation["seconds"]
    return {
        "train": {**train_result, "tokens_per_s": BATCH * LENGTH / train_result["seconds"]},
        "generate": generation,
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------------------------


def run_worker(side: str, allocator: str, repeats: int) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as the PyTorch side
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    if allocator == "tuned":
        env.update(TUNED_MALLOC)
    command = [sys.executable, __file__, f"--worker={side}", f"--repeats={repeats}"]
    print(f"running {side} ({allocator} allocator) ...", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{side} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def latest_data_pipeline(out_dir: str) -> float | None:
    """Examples/s of the best setting in the newest bench/results/data_pipeline_*.json."""
    import glob

    files = sorted(glob.glob(os.path.join(out_dir, "data_pipeline_*.json")))
    if not files:
        return None
    with open(files[-1]) as f:
        return round(max(entry["examples_per_s"] for entry in json.load(f)["pipeline"]), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=["ours", "openflamingo"], default=None)
    parser.add_argument("--allocators", default="default,tuned")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if args.worker:
        result = ours(args.repeats) if args.worker == "ours" else openflamingo(args.repeats)
        print(json.dumps(result))
        return

    from machine import describe, line
    from results_io import write_results  # bench/ is on sys.path when run as a script

    machine = describe(threads=THREADS)
    bandwidth = machine["stream_bytes_per_s"]
    runs = {}
    for allocator in args.allocators.split(","):
        runs[allocator] = {side: run_worker(side, allocator, args.repeats) for side in ("ours", "openflamingo")}
    primary = runs["tuned"] if "tuned" in runs else next(iter(runs.values()))
    ours_primary, theirs_primary = primary["ours"], primary["openflamingo"]
    decode_bytes = ours_primary["decode_weight_bytes_per_token"]
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {**machine, "threads": THREADS},
        "config": {"batch": BATCH, "length": LENGTH, "images": IMAGES, "dtype": "float32", "model": MODEL_GIN},
        "runs": runs,
        "train_ratio_vs_openflamingo": ours_primary["train"]["tokens_per_s"] / theirs_primary["train"]["tokens_per_s"],
        "generate_ratio_vs_openflamingo": ours_primary["generate"]["cached"]["tokens_per_s"]
        / theirs_primary["generate"]["tokens_per_s"],
        "ratios_from_allocator": "tuned" if "tuned" in runs else next(iter(runs)),
        "mfu_vs_measured_matmul_peak": ours_primary["train"]["mfu"],
        "streaming_read_bytes_per_s": bandwidth,
        "decode_weight_bytes_per_token": decode_bytes,
        "decode_bandwidth_fraction": ours_primary["generate"]["cached"]["tokens_per_s"] * decode_bytes / bandwidth,
        "openflamingo_decode_bandwidth_fraction": theirs_primary["generate"]["tokens_per_s"] * decode_bytes / bandwidth,
    }
    lines = [
        f"# Against OpenFlamingo, {result['date']} ({os.cpu_count()} CPUs, {THREADS} threads, fp32)",
        "",
        line(machine),
        "",
        "SmolLM2-135M-shaped LM + ViT-B/32 (224 px), resampler depth 6, xattn every 2 layers; random weights.",
        f"Train step: batch {BATCH} x {LENGTH} tokens, {IMAGES} images each, forward + backward + AdamW. "
        f"Generation: `<image>` + 15 tokens, {NEW_TOKENS} greedy tokens, batch 1. Median of {args.repeats}.",
        "",
        "| allocator | side | s / train step | train tokens/s | generate tokens/s |",
        "|---|---|---|---|---|",
    ]
    for allocator, sides in runs.items():
        for side, figures in sides.items():
            generate_figure = figures["generate"]["cached"] if side == "ours" else figures["generate"]
            lines.append(
                f"| {allocator} | {'flamingo_jax' if side == 'ours' else 'OpenFlamingo'} | "
                f"{figures['train']['seconds']:.2f} | {figures['train']['tokens_per_s']:.0f} | "
                f"{generate_figure['tokens_per_s']:.1f} |"
            )
        uncached = sides["ours"]["generate"]["uncached"]["tokens_per_s"]
        lines.append(f"| {allocator} | flamingo_jax, no caches | | | {uncached:.1f} |")
    pipeline = latest_data_pipeline(args.out)
    consumed = BATCH / ours_primary["train"]["seconds"]
    result["train_bf16_tokens_per_s"] = ours_primary["train_bf16"]["tokens_per_s"]
    result["data_pipeline_examples_per_s"] = pipeline
    result["train_examples_per_s"] = consumed
    peak_gflops = ours_primary["train"]["matmul_peak_flops"] / 1e9
    lines += [
        "",
        f"Ratios ({result['ratios_from_allocator']} allocator): training "
        f"**{result['train_ratio_vs_openflamingo']:.2f}x** OpenFlamingo's tokens/s, cached generation "
        f"**{result['generate_ratio_vs_openflamingo']:.2f}x**.",
        f"Our step's MFU against the fp32 matmul peak measured in the same run ({peak_gflops:.0f} GFLOP/s): "
        f"{100 * result['mfu_vs_measured_matmul_peak']:.0f}%. Decoding reads {decode_bytes / 1e6:.0f} MB of "
        f"weights per token: {100 * result['decode_bandwidth_fraction']:.0f}% of the measured streaming-read "
        f"bandwidth ({bandwidth / 1e9:.1f} GB/s) for us, "
        f"{100 * result['openflamingo_decode_bandwidth_fraction']:.0f}% for OpenFlamingo.",
        f"Our step with bf16 frozen weights and activations: {ours_primary['train_bf16']['seconds']:.2f} s "
        f"({ours_primary['train_bf16']['tokens_per_s']:.0f} tokens/s). "
        f"One compiled program served every step ({ours_primary['train']['compiled_programs_after_all_steps']}).",
        f"Data pipeline (bench/data_pipeline.py, latest result): {pipeline} examples/s vs the "
        f"{consumed:.2f} examples/s this step consumes.",
    ]
    write_results(args.out, "vs_openflamingo", result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
