"""Where the training step's time goes: a ``jax.profiler`` trace of the bench step
(bench/step_config.py) or of a run's step on its first batches (``--gin_file``), its HLO
operations ranked by time, each mapped back to the model code
through the named scopes of the model (vision, resampler, xattn, attention, mlp, embed, lm_head,
loss; backward passes marked ``bwd``; the optimizer update and the rest as ``other``).

    python bench/profile_step.py                  # writes bench/results/profile_step_<date>.{json,md}
    python bench/profile_step.py --steps 5 --trace_dir /tmp/trace   # keeps the Perfetto trace
    python bench/profile_step.py --gin_file=flamingo_jax/demo/demo_cpu.gin   # the demo's step

Open the trace at https://ui.perfetto.dev (``perfetto_trace.json.gz`` under the trace dir; the
compiled module's text, whose instruction names the trace shows, is ``step.hlo.txt`` beside it).
Shares are of the summed operation time on the thunk executor's threads (operations that run
concurrently each count fully), so they add up to 100% whatever the parallelism.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

from step_config import BATCH, IMAGES, LENGTH  # bench/ is on sys.path when run as a script

SCOPES = ("vision", "resampler", "xattn", "attention", "mlp", "embed", "lm_head", "loss")


def scope_of(op_name: str) -> str:
    """'<scope>' or '<scope> bwd' for the innermost named scope of an HLO op's jax name stack,
    'optimizer' for the update outside the loss, 'other' for the rest."""
    parts = op_name.split("/")
    backward = "transpose(" in op_name
    for part in reversed(parts):
        name = re.sub(r"^(transpose\()?(jvp\()?|\)+$", "", part)
        if name in SCOPES:
            return f"{name} bwd" if backward else name
    if "value_and_grad" not in op_name and "jvp(" not in op_name and "transpose(" not in op_name:
        return "optimizer+other"
    return "other bwd" if backward else "other"


def hlo_ops(hlo_text: str) -> dict[str, dict]:
    """{instruction name: {'opcode', 'op_name', 'kind'}} of every instruction of the compiled
    module (the trace names the top-level ones: fusions, custom calls, copies, dots...)."""
    ops = {}
    for line in hlo_text.splitlines():
        match = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(", line)
        if not match:
            continue
        name, opcode = match.groups()
        kind = re.search(r"kind=(\w+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        ops[name] = {
            "opcode": opcode,
            "kind": kind.group(1) if kind else "",
            "op_name": op_name.group(1) if op_name else "",
        }
    return ops


def trace_events(trace_dir: str, module: str) -> list[tuple[str, float]]:
    """(HLO op name, microseconds) of every operation of ``module`` the trace recorded."""
    paths = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(sorted(paths)[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    out = []
    for event in events:
        args = event.get("args") or {}
        if event.get("ph") == "X" and args.get("hlo_op") and args.get("hlo_module", "").startswith(module):
            out.append((args["hlo_op"], float(event["dur"])))
    return out


def bench_step(bindings=()):
    """(Training, batches, FLOPs per step) of the bench step (bench/step_config.py)."""
    from step_config import bench_batch, build_training

    from flamingo_jax import flops

    model_config, training = build_training(bindings)
    return training, {"bench": bench_batch()}, flops.train_step_flops(model_config, BATCH, LENGTH, IMAGES)


def run_step(gin_file: str, bindings=()):
    """(Training, batches, FLOPs per step) of a run's step on the first item of its mixture, on
    this process's devices."""
    import gin

    from flamingo_jax import configs, sharding
    from flamingo_jax.data import mixture
    from flamingo_jax.train.loop import build_training, global_batches, mixture_flops, open_mixture

    configs.parse_gin([gin_file], bindings)
    try:
        config = configs.run_config()
    finally:
        gin.clear_config()
    training = build_training(config, sharding.create_mesh(config.mesh))
    dataset = open_mixture(config)
    local, _ = mixture.split_skipped(dataset[0])
    step_flops = mixture_flops(config, dataset.first())
    return training, global_batches(local, training.mesh, training.rules), sum(step_flops[name] for name in local)


def profile(training, batches, step_flops: float, steps: int, trace_dir: str) -> dict:
    import jax

    from flamingo_jax import sharding

    with sharding.activation_sharding(training.mesh, training.rules):
        started = time.perf_counter()
        compiled = training.step_fn.lower(training.state, training.frozen, batches).compile()
        compile_s = time.perf_counter() - started
        state = training.state

        def step(state):
            state, metrics = compiled(state, training.frozen, batches)
            float(metrics["loss"])  # waits for the step
            return state

        state = step(state)  # warm-up
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            state = step(state)
            times.append(time.perf_counter() - started)
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            state = step(state)
    with open(os.path.join(trace_dir, "step.hlo.txt"), "w") as f:  # beside the trace, for reading its op names
        f.write(compiled.as_text())
    return {
        "step_seconds": statistics.median(times),
        "step_seconds_all": times,
        "compile_s": compile_s,
        "flops_per_step": step_flops,
        **analyse(compiled.as_text(), trace_dir),
    }


def analyse(hlo_text: str, trace_dir: str, top: int = 40) -> dict:
    """The traced operations of the compiled module ``hlo_text``: their number, summed time, the
    ``top`` ones by time and the shares by scope and by operation name."""
    ops = hlo_ops(hlo_text)
    module = hlo_text.split("\n", 1)[0].split()[1].rstrip(",")
    events = trace_events(trace_dir, module)
    if not events:
        raise RuntimeError(f"the trace in {trace_dir} recorded no operation of module {module}")
    by_op = collections.defaultdict(float)
    for name, micros in events:
        by_op[name] += micros
    total = sum(by_op.values())
    rows = []
    for name, micros in sorted(by_op.items(), key=lambda item: -item[1]):
        info = ops.get(name, {"opcode": "?", "kind": "", "op_name": ""})
        rows.append(
            {
                "op": name,
                "opcode": info["opcode"] + (f" ({info['kind']})" if info["kind"] else ""),
                "scope": scope_of(info["op_name"]),
                "op_name": info["op_name"],
                "ms": micros / 1e3,
                "share": micros / total,
            }
        )
    by_scope = collections.defaultdict(float)
    by_opcode = collections.defaultdict(float)
    for row in rows:
        by_scope[row["scope"]] += row["share"]
        by_opcode[re.sub(r"\.\d+$", "", row["op"])] += row["share"]  # ynn_fusion, copy_bitcast_fusion, ...
    return {
        "operations": len(rows),
        "op_time_ms": total / 1e3,
        "top_ops": rows[:top],
        "by_scope": dict(sorted(by_scope.items(), key=lambda item: -item[1])),
        "by_opcode": dict(sorted(by_opcode.items(), key=lambda item: -item[1])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps before the traced one")
    parser.add_argument("--trace_dir", default=None, help="where the trace goes (default: a temporary dir)")
    parser.add_argument("--gin_file", default=None, help="a run's gin file: profile its step instead of the bench's")
    parser.add_argument("--gin", action="append", default=[], help="a gin binding, e.g. LlamaConfig.dtype='bfloat16'")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()

    from machine import describe, line
    from results_io import write_results

    machine = describe()
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
    step = run_step(args.gin_file, args.gin) if args.gin_file else bench_step(args.gin)
    figures = profile(*step, args.steps, trace_dir)
    mfu = figures["flops_per_step"] / figures["step_seconds"] / machine["matmul_peak_flops"]
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "gin_file": args.gin_file,
        "bindings": args.gin,
        "mfu": mfu,
        "trace_dir": trace_dir,
        **figures,
    }
    lines = [
        f"# Profile of the training step, {result['date']}",
        "",
        line(machine),
        "",
        f"Step ({args.gin_file or 'bench/step_config.py'}{', ' + ', '.join(args.gin) if args.gin else ''}): "
        f"{figures['step_seconds']:.2f} s median of {args.steps}, "
        f"{figures['flops_per_step'] / 1e12:.2f} TFLOP (flamingo_jax.flops): MFU {100 * mfu:.0f}% of the "
        f"measured matmul peak. {figures['operations']} HLO operations ran, "
        f"{figures['op_time_ms'] / 1e3:.2f} s of operation time on all threads.",
        "",
        "| scope | share |",
        "|---|---|",
        *(f"| {scope} | {100 * share:.1f}% |" for scope, share in figures["by_scope"].items()),
        "",
        "| operation (HLO name without its number) | share |",
        "|---|---|",
        *(f"| {kind} | {100 * share:.1f}% |" for kind, share in figures["by_opcode"].items() if share >= 0.001),
        "",
        f"Top {args.top} operations:",
        "",
        "| op | kind | scope | ms | share | jax op |",
        "|---|---|---|---|---|---|",
        *(
            f"| {row['op']} | {row['opcode']} | {row['scope']} | {row['ms']:.1f} | {100 * row['share']:.1f}% | "
            f"`{row['op_name'].split('/')[-1][:60]}` |"
            for row in figures["top_ops"][: args.top]
        ),
    ]
    name = "profile_step" + (f"_{os.path.splitext(os.path.basename(args.gin_file))[0]}" if args.gin_file else "")
    stem = write_results(args.out, name, result, lines)
    print("\n".join(lines))
    print(f"\nwritten: {stem}.{{json,md}}; trace: {trace_dir}")


if __name__ == "__main__":
    main()
