"""Generation benchmark: tokens/s of greedy decoding with and without the caches (the text KV
cache and the per-prompt visual keys/values), measured in the same run.

Model: ``models/smollm2_135m.gin`` (SmolLM2-135M shape, ViT-B/32 at 224 px, xattn every 2
layers; random weights, fp32). Prompt: one image + ``<image>`` and 15 text tokens; 32 new tokens,
greedy, no early stop; batch 1.

    python bench/generate.py            # writes bench/results/generate_<date>.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import numpy as np
from results_io import write_results  # bench/ is on sys.path when run as a script

PROMPT_TOKENS, NEW_TOKENS = 16, 32  # <image> + 15 text tokens


def time_generation(model, inputs, *, use_cache: bool, repeats: int) -> dict:
    from flamingo_jax.evaluation.generate import GenerateConfig, generate

    config = GenerateConfig(max_new_tokens=NEW_TOKENS, stop_tokens=(-1,))  # never stops early
    started = time.perf_counter()
    first = generate(model, *inputs, config=config, use_cache=use_cache)
    compile_s = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = generate(model, *inputs, config=config, use_cache=use_cache)
        times.append(time.perf_counter() - started)
    assert out.tokens.shape == (1, NEW_TOKENS)
    seconds = statistics.median(times)
    return {
        "use_cache": use_cache,
        "seconds": seconds,
        "seconds_all": times,
        "compile_and_first_s": compile_s,
        "tokens_per_s": NEW_TOKENS / seconds,
        "tokens": first.tokens[0].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gin_file", default="models/smollm2_135m.gin")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()

    import jax

    from flamingo_jax import configs
    from flamingo_jax.models.flamingo import create_flamingo

    config = configs.load_model_config(args.gin_file)
    model = create_flamingo(config, seed=0)
    for block in model.xattn_layers:  # open gates: the visual path does real work
        block.attn_gate[...] = np.float32(0.5)
        block.ffw_gate[...] = np.float32(0.5)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.lm.vocab_size, (1, PROMPT_TOKENS)).astype(np.int32)
    tokens[0, 0] = config.media_token_id
    index = np.zeros((1, PROMPT_TOKENS), np.int32)
    vision = config.vision
    images = rng.normal(size=(1, 1, 1, vision.image_size, vision.image_size, 3)).astype(np.float32)
    inputs = (tokens, index, np.ones((1, 1), bool), images)

    cached = time_generation(model, inputs, use_cache=True, repeats=args.repeats)
    uncached = time_generation(model, inputs, use_cache=False, repeats=args.repeats)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "devices": str(jax.devices())},
        "model": args.gin_file,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "cached": cached,
        "uncached": uncached,
        "same_tokens": cached["tokens"] == uncached["tokens"],
        "speedup_from_caches": cached["tokens_per_s"] / uncached["tokens_per_s"],
    }
    lines = [
        f"# Generation, {result['date']} ({os.cpu_count()} CPUs, {args.gin_file}, fp32, batch 1)",
        "",
        f"Prompt: `<image>` + 15 tokens with one 224 px image; {NEW_TOKENS} greedy tokens, no early stop; "
        f"median of {args.repeats}.",
        "",
        "| decoding | s per prompt | tokens/s |",
        "|---|---|---|",
        f"| KV cache + visual keys/values once | {cached['seconds']:.2f} | {cached['tokens_per_s']:.1f} |",
        f"| no caches (recompute all every token) | {uncached['seconds']:.2f} | {uncached['tokens_per_s']:.1f} |",
        "",
        f"Speed-up from the caches: **{result['speedup_from_caches']:.1f}x**; same tokens: {result['same_tokens']}.",
    ]
    write_results(args.out, "generate", result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
