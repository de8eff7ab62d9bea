"""A short human-readable report of a run's evaluations: ``DIR/eval/report.md`` (every task's
metric per shot count, for each evaluated step, e.g. the trained model next to its
initialisation) and ``DIR/eval/report.png`` (images with what the model generated or chose)."""

from __future__ import annotations

import io
import json
import logging

import numpy as np

from flamingo_jax import storage
from flamingo_jax.train.writer import read_metrics

log = logging.getLogger(__name__)


def read_records(workdir: str) -> list[dict]:
    records = []
    directory = storage.path(workdir) / "eval"
    for path in sorted(directory.glob("*_*.json")) if directory.exists() else ():
        record = json.loads(path.read_text())
        if "results" in record and "task" in record:
            records.append(record)
    return records


def write_report(
    workdir: str, *, wall_time_s: float | None = None, tasks: dict | None = None, images_per_task: int = 8
) -> str:
    """Writes the report files; returns the markdown text. ``tasks``: {name: Task} whose images
    the picture grid shows (with what the model answered); none: no picture."""
    records = read_records(workdir)
    if not records:
        raise FileNotFoundError(f"no evaluation results in {workdir}/eval")
    lines = [f"# Evaluation of {workdir}", ""]
    if wall_time_s is not None:
        lines += [f"Wall time (train + evaluate): {wall_time_s / 60:.1f} min", ""]
    speed = _training_speed(workdir)
    if speed:
        lines += [speed, ""]
    all_shots = sorted({int(k) for r in records for k in r["results"]})
    lines.append("| task | step | metric | queries | " + " | ".join(f"{s}-shot" for s in all_shots) + " |")
    lines.append("|---|---|---|---|" + "---|" * len(all_shots))
    for record in sorted(records, key=lambda r: (r["task"], r["step"])):
        results = record["results"]
        metric = next(iter(results.values()))["metric"]
        queries = queries_of(record)
        cells = []
        for shots in all_shots:
            values = results.get(str(shots))
            cells.append("" if values is None else f"{values[metric]:.1f} ± {values[metric + '_std']:.1f}")
        label = "init (frozen LM)" if record["step"] == 0 else str(record["step"])
        lines.append(f"| {record['task']} | {label} | {metric} | {queries} | " + " | ".join(cells) + " |")
    lines += ["", "± : the standard deviation over the evaluation seeds (0.0 with one seed)."]
    classified = [r for r in records if r["kind"] == "classification"]
    if classified:  # the latest step's accuracies, as the binomial error bar they carry
        record = max(classified, key=lambda r: r["step"])
        queries = queries_of(record)
        shots = sorted(record["results"], key=int)
        accuracy = [record["results"][s]["accuracy"] for s in shots]
        error = [100 * np.sqrt(a / 100 * (1 - a / 100) / max(queries, 1)) for a in accuracy]
        lines.append(
            f"One seed's accuracy p over n queries has a standard error of sqrt(p (1 - p) / n): for "
            f"{record['task']} at step {record['step']} ({'/'.join(shots)} shots), "
            + " / ".join(f"{e:.1f}" for e in error)
            + f" points at {queries} queries."
        )
        differences = paired_differences(record)
        if differences:
            lines.append(
                "Against the fewest shots on the same queries (paired: the standard error of the "
                "per-query difference in correctness): "
                + "; ".join(f"{k} - {base} shots {d:+.1f} ± {se:.1f}" for (k, base), (d, se) in differences.items())
                + "."
            )
    for record in sorted((r for r in records if r["kind"] == "episodes"), key=lambda r: (r["task"], r["step"])):
        results = record["results"]
        shots = sorted(results, key=int)
        cells = []
        for s in shots:
            values = results[s]
            reference = f", encoder prototypes {values['prototype']:.1f}" if "prototype" in values else ""
            generated = f", generated {values['open_accuracy']:.1f}" if "open_accuracy" in values else ""
            cells.append(f"{s}-shot {values['accuracy']:.1f} ± {values['accuracy_se']:.1f}{reference}{generated}")
        lines.append(
            f"{record['task']} at step {record['step']} ({results[shots[0]]['episodes']} episodes per cell; ± the "
            "standard error over episodes): " + "; ".join(cells) + "."
        )
    text = "\n".join(lines) + "\n"
    if tasks and _write_grid(workdir, records, tasks, images_per_task):
        text += "\n![predictions](report.png)\n"
    storage.write_text(storage.path(workdir) / "eval" / "report.md", text)
    return text


def paired_differences(record: dict) -> dict[tuple[str, str], tuple[float, float]]:
    """{(shots, fewest shots): (accuracy difference, its paired standard error)} in points, for a
    classification record: each query's correctness at ``shots`` minus at the fewest shots, over
    the (seed, query) pairs scored at both; the standard error is that of the mean difference,
    smaller than the unpaired one when the same queries tend to be right at both counts."""
    predictions = record["predictions"]
    shots = sorted(predictions, key=int)

    def correct(count: str) -> dict:
        return {
            (seed, row["id"]): float(int(np.argmax(row["scores"])) == row["label"])
            for seed, rows in predictions[count].items()
            for row in rows
        }

    base = correct(shots[0])
    out = {}
    for count in shots[1:]:
        other = correct(count)
        keys = sorted(set(base) & set(other))
        if len(keys) < 2:
            continue
        d = np.asarray([other[k] - base[k] for k in keys])
        out[(count, shots[0])] = (100.0 * float(d.mean()), 100.0 * float(d.std(ddof=1) / np.sqrt(len(d))))
    return out


def queries_of(record: dict) -> int:
    """How many queries a record's evaluation scored (per shot count and seed)."""
    per_seed = next(iter(record["predictions"].values()))
    return len(next(iter(per_seed.values())))


def _training_speed(workdir: str) -> str | None:
    """'Training: N steps, median S s/step' from the run's metrics (the logged steps): with the
    step's cost fixed by the config, it makes wall times comparable across machines; None without
    logged steps."""
    rows = [r for r in read_metrics(workdir) if "step_time_s" in r]
    if not rows:
        return None
    step_time = float(np.median([r["step_time_s"] for r in rows]))
    steps = max(int(r["step"]) for r in rows)
    return f"Training: {steps} steps, median {step_time:.2f} s/step"


def _write_grid(workdir: str, records: list[dict], tasks: dict, per_task: int) -> bool:
    """Writes ``report.png``; False (and a warning) without matplotlib or anything to show."""
    try:
        import matplotlib
    except ImportError:
        log.warning("no report.png: matplotlib is not installed (pip install -e '.[notebook]')")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = {}
    for record in records:
        shown = record["task"] in tasks and record["kind"] != "episodes"  # episodes: several images each
        if shown and record["step"] >= latest.get(record["task"], {"step": -1})["step"]:
            latest[record["task"]] = record
    panels = []
    for name, record in sorted(latest.items()):
        by_id = {example.id: example for example in tasks[name].queries}
        shots = max(record["predictions"], key=int)
        rows = next(iter(record["predictions"][shots].values()))
        for row in [r for r in rows if r["id"] in by_id][:per_task]:
            example = by_id[row["id"]]
            truth = example.answers[0] if example.answers else ""
            panels.append(
                (example.load_image(), f"{name} ({shots}-shot)\n{row['prediction'][:36]!r}\ntruth: {truth[:36]}")
            )
    if not panels:
        return False
    columns = 4
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 3.6 * lines), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (image, title) in zip(axes.flat, panels, strict=False):
        axis.imshow(np.asarray(image), cmap="gray")
        axis.set_title(title, fontsize=7)
    fig.tight_layout()
    picture = io.BytesIO()
    fig.savefig(picture, format="png", dpi=70)
    storage.write_bytes(storage.path(workdir) / "eval" / "report.png", picture.getvalue())
    plt.close(fig)
    return True
