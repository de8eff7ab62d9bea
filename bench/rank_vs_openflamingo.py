"""1000-class ranking (ImageNet's protocol: every class name scored as a continuation of each
prompt) against OpenFlamingo's classification path, same model dimensions and machine, 2 threads,
fp32, as a ratio in one run.

Model: the bench model of ``bench/vs_openflamingo.py`` (SmolLM2-135M-shaped LM, ViT-B/32 at
224 px, random weights, gates at 0.5). Workload: 8 prompts of ``<image>`` + 31 tokens, 1000
classes of 1-5 tokens (10 / 35 / 30 / 15 / 10 %, about the token counts of ImageNet's class names
under the GPT-NeoX tokenizer), length-normalised log-likelihoods.

OpenFlamingo's path is its evaluation's ``get_rank_classifications`` with ``use_cache=True``
(open_flamingo/eval/eval_models/open_flamingo.py): the prompt once with the KV cache, then per
class name its tokens one cached forward at a time for all prompts, the logits concatenated to
the prompt's and log-softmaxed. transformers 5's cache object grows in place, so it is cut back
to the prompt after each class (``DynamicCache.crop`` of the class's tokens), which its tuple caches did implicitly.
Ours: ``flamingo_jax.evaluation.ranking.class_log_likelihoods`` (the prompt once, every class's
first token from its logits, the later tokens in chunks of classes).

    python bench/rank_vs_openflamingo.py    # writes bench/results/rank_vs_openflamingo_<date>.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np
from step_config import MEDIA, VOCAB  # bench/ on sys.path

PROMPTS, PROMPT_TOKENS, NUM_CLASSES = 8, 32, 1000
LENGTHS, LENGTH_SHARES = (1, 2, 3, 4, 5), (0.10, 0.35, 0.30, 0.15, 0.10)
THREADS = 2


def workload(num_classes: int, seed: int = 0):
    """Prompts int[B, T] (``<image>`` first), pixels float[B, 1, 1, 224, 224, 3], class token lists."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (PROMPTS, PROMPT_TOKENS)).astype(np.int32)
    tokens[:, 0] = MEDIA
    images = rng.normal(size=(PROMPTS, 1, 1, 224, 224, 3)).astype(np.float32)
    lengths = rng.choice(LENGTHS, size=num_classes, p=LENGTH_SHARES)
    classes = [rng.integers(0, VOCAB, int(n)).tolist() for n in lengths]
    return tokens, images, classes


def ours(num_classes: int) -> dict:
    from step_config import build_training

    from flamingo_jax.evaluation.ranking import class_log_likelihoods
    from flamingo_jax.train.params import merge_model

    _, training = build_training()
    model = merge_model(training.graphdef, training.state.params, training.frozen)
    tokens, images, classes = workload(num_classes)
    inputs = (tokens, np.zeros_like(tokens), np.ones((PROMPTS, 1), bool), images)
    started = time.perf_counter()
    class_log_likelihoods(model, *inputs, classes, normalize=True)
    first = time.perf_counter() - started
    started = time.perf_counter()
    scores = class_log_likelihoods(model, *inputs, classes, normalize=True)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "compile_and_first_s": first, "finite": bool(np.isfinite(scores).all())}


def openflamingo(num_classes: int, measured_classes: int | None = None) -> dict:
    """OpenFlamingo's path; with ``measured_classes`` only that many classes are run (its loop
    does the same work per class token for every class), and the time is scaled to all of them
    by their token count."""
    from vs_openflamingo import build_openflamingo

    model, torch = build_openflamingo()
    model.eval()
    tokens, images, all_classes = workload(num_classes)
    classes = all_classes[: measured_classes or num_classes]
    lang = torch.from_numpy(tokens.astype(np.int64))
    vision = torch.from_numpy(images.transpose(0, 1, 2, 5, 3, 4).copy())
    started = time.perf_counter()
    with torch.no_grad():
        model.lang_encoder._use_cached_vision_x = True  # class tokens attend to the prompt's image
        model._encode_vision_x(vision_x=vision)
        context = model.lang_encoder(input_ids=lang, attention_mask=torch.ones_like(lang), use_cache=True)
        cache = context.past_key_values
        scores = []
        for class_tokens in classes:
            ids = torch.tensor(class_tokens).repeat(PROMPTS, 1)
            logits = []
            for position in range(ids.shape[1]):
                out = model.lang_encoder(
                    input_ids=ids[:, position : position + 1],
                    attention_mask=None,
                    past_key_values=cache,
                    use_cache=True,
                )
                logits.append(out.logits)
            cache.crop(-ids.shape[1])  # transformers 5: a negative count removes the newest entries
            logprobs = torch.log_softmax(torch.cat([context.logits, *logits], dim=1), dim=-1)
            picked = logprobs[:, -ids.shape[1] - 1 : -1].gather(2, ids[:, :, None])[..., 0]
            scores.append(picked.mean(dim=1))
        model.lang_encoder.clear_conditioned_layers()
    seconds = time.perf_counter() - started
    scale = sum(map(len, all_classes)) / sum(map(len, classes))
    return {
        "seconds": seconds * scale,
        "measured_seconds": seconds,
        "measured_classes": len(classes),
        "scaled_by_tokens": scale,
        "finite": bool(torch.isfinite(torch.stack(scores)).all()),
        "torch": torch.__version__,
    }


def run_worker(side: str, num_classes: int, measured_classes: int | None = None) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as the PyTorch side
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    print(f"running {side} ...", flush=True)
    command = [sys.executable, __file__, f"--worker={side}", f"--classes={num_classes}"]
    if measured_classes:
        command.append(f"--openflamingo_classes={measured_classes}")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{side} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=["ours", "openflamingo"], default=None)
    parser.add_argument("--classes", type=int, default=NUM_CLASSES, help="fewer for a quick check")
    parser.add_argument(
        "--openflamingo_classes", type=int, default=None, help="run OpenFlamingo's loop on this many, scaled to all"
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if args.worker:
        result = ours(args.classes) if args.worker == "ours" else openflamingo(args.classes, args.openflamingo_classes)
        print(json.dumps(result))
        return

    from machine import describe, line
    from results_io import write_results

    machine = describe(threads=THREADS)
    sides = {
        "ours": run_worker("ours", args.classes),
        "openflamingo": run_worker("openflamingo", args.classes, args.openflamingo_classes),
    }
    ratio = sides["openflamingo"]["seconds"] / sides["ours"]["seconds"]
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {**machine, "threads": THREADS},
        "config": {"prompts": PROMPTS, "prompt_tokens": PROMPT_TOKENS, "classes": args.classes, "dtype": "float32"},
        "sides": sides,
        "speedup_vs_openflamingo": ratio,
    }
    lines = [
        f"# {args.classes}-class ranking against OpenFlamingo, {result['date']} ({THREADS} threads, fp32)",
        "",
        line(machine),
        "",
        f"SmolLM2-135M-shaped LM + ViT-B/32, random weights; {PROMPTS} prompts of `<image>` + "
        f"{PROMPT_TOKENS - 1} tokens, {args.classes} classes of 1-5 tokens, length-normalised.",
        "",
        "| side | s per batch of prompts |",
        "|---|---|",
        f"| flamingo_jax (`class_log_likelihoods`) | {sides['ours']['seconds']:.1f} "
        f"(first call with compilation: {sides['ours']['compile_and_first_s']:.1f}) |",
        f"| OpenFlamingo (`get_rank_classifications`, cached) | {sides['openflamingo']['seconds']:.1f} "
        f"({sides['openflamingo']['measured_seconds']:.1f} measured on {sides['openflamingo']['measured_classes']} "
        f"classes, x{sides['openflamingo']['scaled_by_tokens']:.2f} by their token count) |",
        "",
        f"Speed-up: **{ratio:.1f}x**.",
    ]
    write_results(args.out, "rank_vs_openflamingo", result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
