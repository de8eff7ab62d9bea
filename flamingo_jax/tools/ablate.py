"""Ablation runner: trains each row of an ablation table on the same data for the same steps,
evaluates it with the run's registered tasks and writes the table.

  python -m flamingo_jax.tools.ablate --gin_file=RUN.gin \\
      --rows=baseline,no_tanh_gating,vanilla_xattn,graft --workdir=DIR [--seeds=2] \\
      [--primary=TASK:SHOTS] [--gin.KEY=VALUE ...]

A row is ``baseline`` (the gin files alone), the name of a file in ``experiments/ablations/``
(``no_tanh_gating`` ...) or a path to a gin file, added after the run's gin files. Each row
trains and evaluates in its own process (``python -m flamingo_jax.main`` with
``RunConfig.evaluate_at_end``) in ``DIR/<row>/seed<k>``; a rerun skips the runs that finished
(their ``eval/report.md`` exists) and resumes the others from their checkpoints, so nothing is
lost on a crash. Seed 0 runs for every row first; then seed 1 (``RunConfig.seed``) for the
baseline and for every row whose primary cell lies within two standard errors of the baseline's
(the difference against the standard error of the difference): the rows whose ranking one seed
cannot settle. ``--seeds=1`` skips the second pass.

Writes ``DIR/ablations.md`` and ``DIR/ablations.json`` after every finished run (``--report_only``:
only that, from the runs finished before): per row, each task's metric per shot count (the mean
over its seeds, ± the standard error: binomial over queries for classification, over episodes
for episode tasks, over the queries' CIDEr-D for captioning, the seeds' own spread for other
metrics), its difference from the baseline on the primary cell, the wall time of its runs, and
the direction the Flamingo paper (Table 3) or Idefics2 reports for that change, and the machine
each run trained on (``DIR/<row>/seed<k>/ablate_machine.json``: CPU model and matmul peak,
measured before the run).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from absl import app, flags, logging

from flamingo_jax import configs, machine, storage
from flamingo_jax.evaluation import metrics, report

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, so that importing this module beside
    ``flamingo_jax.main`` defines nothing twice)."""
    flags.DEFINE_multi_string("gin_file", [], "The run's gin files (every row shares them).")
    flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings for every row; also --gin.KEY=VALUE.")
    flags.DEFINE_list("rows", ["baseline"], "Rows: 'baseline', names in experiments/ablations/, or gin paths.")
    flags.DEFINE_string("workdir", None, "Where each row's runs and the table go.")
    flags.DEFINE_integer("seeds", 2, "Training seeds for the baseline and the rows close to it (1 or 2).")
    flags.DEFINE_string("primary", None, "TASK:SHOTS deciding the second seeds (default: the first task, most shots).")
    flags.DEFINE_bool("report_only", False, "Train nothing: write the table of the runs finished so far.")


BASELINE = "baseline"

# What the literature reports for each row against its baseline.
PAPER_DIRECTIONS = {
    "no_tanh_gating": "lower (Flamingo Table 3 (iii); less stable training)",
    "vanilla_xattn": "lower (Flamingo Table 3 (iv))",
    "graft": "lower (Flamingo Table 3 (iv))",
    "xattn_every_1": "the paper's 3B choice; every 2nd / 4th slightly lower at less compute (Table 3 (v))",
    "xattn_every_4": "slightly lower than every layer, at less compute (Flamingo Table 3 (v))",
    "xattn_once": "lower (Flamingo Table 3 (v), single block in the middle)",
    "resampler_mlp": "lower (Flamingo Table 3 (vi))",
    "resampler_transformer": "lower (Flamingo Table 3 (vi))",
    "lm_finetuned": "lower (Flamingo Table 3 (viii), catastrophic forgetting of the LM)",
    "lm_lora": "Idefics2: trained backbones (LoRA) help; then token-level fusion overtakes cross-attention",
    "mixture_sampled": "lower (Flamingo Table 3 (ii), round robin against accumulation)",
    "connector_mlp": "lower (Idefics2 Section 3.1: with frozen backbones cross-attention beats token-level fusion)",
    "connector_qformer": "lower (Idefics2 Section 3.1, frozen backbones); above the MLP (learned-query pooling)",
}


def row_gin(row: str) -> str | None:
    """The gin file a row adds (None for the baseline); raises naming the row if there is none."""
    if row == BASELINE:
        return None
    for candidate in (row, f"ablations/{row}.gin"):
        try:
            return configs.resolve_gin_file(candidate)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"ablation row {row!r}: no gin file {row!r} and none in experiments/ablations/")


def row_name(row: str) -> str:
    return os.path.splitext(os.path.basename(row))[0]


def run_row(row: str, seed: int, gin_files, bindings, workdir: str) -> float:
    """Trains and evaluates one row at one seed (unless it finished before); its wall time in s
    (that of the earlier run when skipped)."""
    run_dir = os.path.join(workdir, row_name(row), f"seed{seed}")
    timing = os.path.join(run_dir, "ablate_wall_time_s.txt")
    if os.path.exists(os.path.join(run_dir, "eval", "report.md")) and os.path.exists(timing):
        logging.info("%s seed %d: done before, skipped", row, seed)
        return float(pathlib.Path(timing).read_text())
    extra = row_gin(row)
    command = [sys.executable, "-m", "flamingo_jax.main", f"--workdir={run_dir}"]
    command += [f"--gin_file={path}" for path in (*gin_files, *([extra] if extra else []))]
    run_bindings = (*bindings, f"RunConfig.seed = {seed}", "RunConfig.evaluate_at_end = True")
    command += [f"--gin_bindings={binding}" for binding in run_bindings]
    logging.info("%s seed %d: %s", row, seed, " ".join(command))
    os.makedirs(run_dir, exist_ok=True)
    described = machine.describe()  # before the run: the matmul peak of a quiet machine
    storage.write_text(os.path.join(run_dir, "ablate_machine.json"), json.dumps(described, indent=1))
    started = time.perf_counter()
    with open(os.path.join(run_dir, "ablate.log"), "a") as log_file:
        done = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(
            f"ablation row {row!r} seed {seed} failed (exit {done.returncode}): see {run_dir}/ablate.log"
        )
    seconds = round(time.perf_counter() - started, 1)
    with open(timing, "w") as f:
        f.write(f"{seconds:.1f}")
    return seconds


def cells(run_dir: str) -> dict[str, tuple[float, float, str]]:
    """{'task:shots': (metric, standard error, metric name)} of a run's latest evaluated step."""
    records = report.read_records(run_dir)
    latest = {}
    for record in records:
        if record["step"] >= latest.get(record["task"], {"step": -1})["step"]:
            latest[record["task"]] = record
    out = {}
    for task, record in sorted(latest.items()):
        for shots, values in record["results"].items():
            metric = values.get("metric", "accuracy")
            value = float(values[metric])
            if "accuracy_se" in values:  # episode tasks: over episodes
                se = float(values["accuracy_se"])
            elif record["kind"] == "classification":
                n = report.queries_of(record)
                se = 100 * float(np.sqrt(value / 100 * (1 - value / 100) / max(n, 1)))
            elif record["kind"] == "captioning" and _with_answers(record.get("predictions", {}).get(shots)):
                se = caption_se(record["predictions"][shots])
            else:
                se = float(values.get(metric + "_std", 0.0))
            out[f"{task}:{shots}"] = (value, se, metric)
    return out


def _with_answers(by_seed: dict | None) -> bool:
    return bool(by_seed) and all("answers" in row for rows in by_seed.values() for row in rows)


def caption_se(by_seed: dict[str, list[dict]]) -> float:
    """The standard error over queries of a captioning cell's CIDEr (x100): each query's CIDEr-D
    averaged over the evaluation seeds, their spread over the square root of their number."""
    per_seed = [
        metrics.cider_per_item({r["id"]: r["prediction"] for r in rows}, {r["id"]: r["answers"] for r in rows})
        for rows in by_seed.values()
    ]
    items = 100.0 * np.mean(per_seed, axis=0)
    return float(np.std(items, ddof=1) / np.sqrt(len(items))) if len(items) > 1 else 0.0


def combine(per_seed: list[dict]) -> dict[str, tuple[float, float, str]]:
    """The seeds' mean per cell, with the standard error of that mean (independent seeds)."""
    out = {}
    for key in per_seed[0]:
        values = [cell[key] for cell in per_seed if key in cell]
        mean = float(np.mean([v for v, _, _ in values]))
        se = float(np.sqrt(sum(s * s for _, s, _ in values)) / len(values))
        out[key] = (mean, se, values[0][2])
    return out


def default_primary(cells_of_baseline: dict) -> str:
    """The first task's cell at its most shots."""
    first = sorted(cells_of_baseline)[0].split(":")[0]
    shots = max(int(key.split(":")[1]) for key in cells_of_baseline if key.split(":")[0] == first)
    return f"{first}:{shots}"


def close_to(baseline: tuple, row: tuple) -> bool:
    """Whether a row's cell is within two standard errors (of the difference) of the baseline's."""
    return abs(row[0] - baseline[0]) <= 2 * np.hypot(row[1], baseline[1])


def ablate(
    rows, gin_files, bindings, workdir: str, *, seeds: int = 2, primary: str | None = None, train: bool = True
) -> dict:
    """Runs the table (see the module docstring); returns what ``ablations.json`` holds. The
    table is rewritten after every finished run (the rows finished so far), so a long table
    shows its progress and a stopped one keeps what it measured. ``train=False`` trains
    nothing: the table of the runs finished before."""
    if BASELINE not in rows:
        rows = [BASELINE, *rows]
    for row in rows:
        row_gin(row)  # every row's file exists before anything trains
    if seeds not in (1, 2):
        raise ValueError(f"--seeds must be 1 or 2, got {seeds}")
    if not train:
        return write_table(rows, gin_files, bindings, workdir, primary)
    for row in rows:
        run_row(row, 0, gin_files, bindings, workdir)
        result = write_table(rows, gin_files, bindings, workdir, primary)
    if seeds == 2:
        primary = result["primary"]
        for row in second_seed_rows(rows, workdir, primary):
            run_row(row, 1, gin_files, bindings, workdir)
            result = write_table(rows, gin_files, bindings, workdir, primary)
    return result


def second_seed_rows(rows, workdir: str, primary: str) -> list[str]:
    """The rows that get a second training seed, from their finished first ones: the baseline,
    and each row whose ``primary`` cell is within two standard errors of the baseline's."""
    base = cells(os.path.join(workdir, BASELINE, "seed0"))[primary]
    chosen = []
    for row in rows:
        first = os.path.join(workdir, row_name(row), "seed0")
        if _finished(first) and (row == BASELINE or close_to(base, cells(first).get(primary, base))):
            chosen.append(row)
    return chosen


def _finished(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, "eval", "report.md")) and os.path.exists(
        os.path.join(run_dir, "ablate_wall_time_s.txt")
    )


def write_table(rows, gin_files, bindings, workdir: str, primary: str | None) -> dict:
    """Writes ``ablations.json`` / ``ablations.md`` from the finished runs of ``rows`` (the
    baseline's first seed must be one of them); rows with none yet are listed as pending."""
    seed_dirs = {
        row: [d for d in (os.path.join(workdir, row_name(row), f"seed{k}") for k in (0, 1)) if _finished(d)]
        for row in rows
    }
    if not seed_dirs[BASELINE]:
        raise ValueError(f"the baseline has no finished run in {workdir}/{BASELINE}/seed0")
    seed_cells = {row: [cells(d) for d in dirs] for row, dirs in seed_dirs.items() if dirs}
    primary = primary or default_primary(seed_cells[BASELINE][0])
    if primary not in seed_cells[BASELINE][0]:
        evaluated = sorted(seed_cells[BASELINE][0])
        raise ValueError(f"--primary={primary!r} is not an evaluated cell; the cells: {evaluated}")
    table = {row: combine(per_seed) for row, per_seed in seed_cells.items()}
    result = {
        "gin_files": list(gin_files),
        "bindings": list(bindings),
        "primary": primary,
        "rows": {
            row_name(row): {
                "gin_file": row_gin(row),
                "seeds": len(seed_cells[row]),
                "cells": {key: {"value": v, "se": s, "metric": m} for key, (v, s, m) in table[row].items()},
                "difference": _difference(table[BASELINE], table[row], primary),
                "wall_time_s": [float(pathlib.Path(d, "ablate_wall_time_s.txt").read_text()) for d in seed_dirs[row]],
                "machines": [_machine_of(d) for d in seed_dirs[row]],
                "paper": PAPER_DIRECTIONS.get(row_name(row), ""),
            }
            for row in rows
            if row in seed_cells
        },
        "pending": [row_name(row) for row in rows if row not in seed_cells],
    }
    storage.write_text(os.path.join(workdir, "ablations.json"), json.dumps(result, indent=1))
    storage.write_text(os.path.join(workdir, "ablations.md"), markdown(result))
    return result


def _machine_of(run_dir: str) -> str:
    """The machine a run trained on ('AMD EPYC, 377 GFLOP/s'); '?' for a run from before the
    runner recorded it."""
    path = os.path.join(run_dir, "ablate_machine.json")
    if not os.path.exists(path):
        return "?"
    with open(path) as f:
        return machine.short(json.load(f))


def _difference(baseline: dict, row: dict, primary: str) -> dict | None:
    if primary not in row:
        return None
    (b, bse, _), (r, rse, _) = baseline[primary], row[primary]
    return {"value": r - b, "se": float(np.hypot(rse, bse))}


def markdown(result: dict) -> str:
    """The table of ``ablations.json`` as markdown."""
    keys = sorted({key for row in result["rows"].values() for key in row["cells"]})
    head = " | ".join(f"{key.split(':')[0]} {key.split(':')[1]}-shot" for key in keys)
    lines = [
        f"# Ablations ({', '.join(result['gin_files'])})",
        "",
        f"Each cell: the mean over the row's seeds ± its standard error; Δ: the row minus the baseline on "
        f"{result['primary']}, ± the standard error of that difference.",
        "",
        f"| row | seeds | {head} | Δ {result['primary']} | wall time (min) | machine | the literature |",
        "|---|---|" + "---|" * len(keys) + "---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        values = " | ".join(
            f"{row['cells'][key]['value']:.1f} ± {row['cells'][key]['se']:.1f}" if key in row["cells"] else ""
            for key in keys
        )
        difference = row["difference"]
        delta = "" if name == BASELINE or difference is None else f"{difference['value']:+.1f} ± {difference['se']:.1f}"
        minutes = " + ".join(f"{s / 60:.1f}" for s in row["wall_time_s"])
        machines = "; ".join(dict.fromkeys(row.get("machines", [])))
        lines.append(f"| {name} | {row['seeds']} | {values} | {delta} | {minutes} | {machines} | {row['paper']} |")
    if result.get("pending"):
        lines += ["", f"Not run yet: {', '.join(result['pending'])}."]
    return "\n".join(lines) + "\n"


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        sys.exit("ablate: --workdir is required")
    if not FLAGS.gin_file:
        sys.exit("ablate: give the run's --gin_file(s)")
    try:
        result = ablate(
            FLAGS.rows,
            FLAGS.gin_file,
            FLAGS.gin_bindings,
            FLAGS.workdir,
            seeds=FLAGS.seeds,
            primary=FLAGS.primary,
            train=not FLAGS.report_only,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        sys.exit(f"ablate: {error}")
    print(markdown(result))


if __name__ == "__main__":
    define_flags()
    app.run(main, argv=configs.rewrite_gin_args(sys.argv))
