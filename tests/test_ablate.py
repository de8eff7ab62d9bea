"""The ablation runner (``tools.ablate``): its table from evaluation records, which rows get a
second seed, and (slow) a whole table trained and evaluated on the smoke model, then resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_episodes import COLOURS, write_colour_images

from flamingo_jax.tools import ablate

from conftest import one_device_env


def _record(task: str, kind: str, step: int, results: dict, queries: int = 100) -> dict:
    rows = [{"id": str(i), "label": 0, "scores": [0.0], "prediction": ""} for i in range(queries)]
    return {
        "task": task,
        "kind": kind,
        "step": step,
        "results": results,
        "predictions": {shots: {"0": rows} for shots in results},
    }


def _write(run_dir, *records):
    os.makedirs(run_dir / "eval", exist_ok=True)
    for record in records:
        (run_dir / "eval" / f"{record['task']}_{record['step']}.json").write_text(json.dumps(record))


def test_cells_take_the_latest_step_and_each_kind_of_standard_error(tmp_path):
    accuracy = lambda a: {"accuracy": a, "accuracy_std": 0.0, "metric": "accuracy"}
    _write(
        tmp_path,
        _record("fashion_mnist", "classification", 0, {"0": accuracy(10.0)}),
        _record("fashion_mnist", "classification", 300, {"0": accuracy(80.0), "4": accuracy(84.0)}),
        _record("binding", "episodes", 300, {"4": {**accuracy(70.0), "accuracy_se": 2.5}}),
        _record("coco", "captioning", 300, {"0": {"CIDEr": 40.0, "CIDEr_std": 1.5, "metric": "CIDEr"}}),
    )
    # Captions with their references: the standard error over the queries' CIDEr-D.
    captions = _record("shapes", "captioning", 300, {"0": {"CIDEr": 0.0, "CIDEr_std": 0.0, "metric": "CIDEr"}})
    words = ["a red square", "a blue circle", "a green triangle", "a small red circle"]
    rows = [{"id": str(i), "prediction": words[i % 4], "answers": [words[i % 3], words[i % 4]]} for i in range(12)]
    captions["predictions"]["0"]["0"] = rows
    _write(tmp_path, captions)
    cells = ablate.cells(str(tmp_path))
    assert cells["fashion_mnist:0"] == pytest.approx((80.0, 100 * np.sqrt(0.8 * 0.2 / 100), "accuracy"))
    assert cells["fashion_mnist:4"][0] == 84.0
    assert cells["binding:4"] == (70.0, 2.5, "accuracy")
    assert cells["coco:0"] == (40.0, 1.5, "CIDEr")  # no references kept: the seeds' spread
    per_item = 100 * ablate.metrics.cider_per_item(
        {r["id"]: r["prediction"] for r in rows}, {r["id"]: r["answers"] for r in rows}
    )
    corpus = ablate.metrics.caption_scores(
        {r["id"]: r["prediction"] for r in rows}, {r["id"]: r["answers"] for r in rows}
    )["CIDEr"]
    assert per_item.mean() == pytest.approx(100 * corpus) and per_item.std() > 0
    assert cells["shapes:0"][1] == pytest.approx(per_item.std(ddof=1) / np.sqrt(12))
    assert ablate.default_primary(cells) == "binding:4"  # the first task by name, its most shots


def test_seeds_combine_and_which_rows_are_close():
    seeds = [{"t:4": (70.0, 3.0, "accuracy")}, {"t:4": (74.0, 4.0, "accuracy")}]
    assert ablate.combine(seeds)["t:4"] == pytest.approx((72.0, 2.5, "accuracy"))
    baseline = (70.0, 3.0)
    assert ablate.close_to(baseline, (78.0, 4.0))  # 8 <= 2 * 5
    assert not ablate.close_to(baseline, (59.0, 4.0))


def test_report_only_tables_the_finished_runs_and_lists_the_pending(tmp_path):
    """--report_only trains nothing: the rows with a finished run (records, report, wall time)
    are tabled against the baseline, the others listed as not run yet."""
    accuracy = lambda a: {"accuracy": a, "accuracy_std": 0.0, "metric": "accuracy"}
    for row, value in (("baseline", 80.0), ("graft", 70.0)):
        run_dir = tmp_path / row / "seed0"
        _write(run_dir, _record("fashion_mnist", "classification", 320, {"4": accuracy(value)}))
        (run_dir / "eval" / "report.md").write_text("report")
        (run_dir / "ablate_wall_time_s.txt").write_text("60.0")
    described = {"cpu": "AMD EPYC 7B13 64-Core Processor", "matmul_peak_flops": 377.3e9}
    (tmp_path / "graft" / "seed0" / "ablate_machine.json").write_text(json.dumps(described))
    (tmp_path / "vanilla_xattn" / "seed0").mkdir(parents=True)  # started, not finished
    rows = ["baseline", "graft", "vanilla_xattn"]
    result = ablate.ablate(rows, ["runs/smoke_cpu.gin"], [], str(tmp_path), train=False)
    assert list(result["rows"]) == ["baseline", "graft"] and result["pending"] == ["vanilla_xattn"]
    assert result["rows"]["graft"]["difference"]["value"] == pytest.approx(-10.0)
    assert result["rows"]["baseline"]["wall_time_s"] == [60.0]
    assert result["rows"]["graft"]["machines"] == ["AMD EPYC, 377 GFLOP/s"]
    assert result["rows"]["baseline"]["machines"] == ["?"]  # from before the runner recorded it
    table = (tmp_path / "ablations.md").read_text()
    assert "| 1.0 | AMD EPYC, 377 GFLOP/s |" in table and "Not run yet: vanilla_xattn." in table
    with pytest.raises(ValueError, match="the baseline has no finished run"):
        ablate.ablate(rows, ["runs/smoke_cpu.gin"], [], str(tmp_path / "empty"), train=False)
    # The second seeds: the baseline, and graft when within two standard errors of the difference
    # (binomial over 100 queries: 70 against 80 is 10 <= 2 * 6.1; 60 is 20 > 2 * 6.3).
    seed_rows = lambda: ablate.second_seed_rows(rows, str(tmp_path), "fashion_mnist:4")
    assert seed_rows() == ["baseline", "graft"]  # vanilla_xattn has no finished first seed
    _write(tmp_path / "graft" / "seed0", _record("fashion_mnist", "classification", 320, {"4": accuracy(60.0)}))
    assert seed_rows() == ["baseline"]


def test_unknown_row_is_named_before_anything_trains(tmp_path):
    with pytest.raises(FileNotFoundError, match="ablation row 'no_such_row'"):
        ablate.ablate(["no_such_row"], ["runs/smoke_cpu.gin"], [], str(tmp_path))
    assert not os.listdir(tmp_path)


def _episodes_file(directory) -> str:
    from flamingo_jax.data import episodes as ep

    rng = np.random.default_rng(0)
    write_colour_images(directory)
    episodes = []
    for index in range(6):
        names = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), 2, replace=False)]
        words = ["dax", "wug"]
        demos = tuple(ep.Shot(f"{n}0.png", w) for n, w in zip(names, words, strict=True))
        episodes.append(ep.Episode(demos, ep.Shot(f"{names[index % 2]}2.png", words[index % 2]), tuple(words)))
    path = directory / "episodes.jsonl"
    ep.write_episodes(str(path), episodes)
    return str(path)


@pytest.mark.slow
def test_ablation_table_on_the_smoke_model_and_its_resumption(tmp_path):
    """Two rows on the smoke model (2 steps each, one seed: which rows get a second seed is
    tested above, and a second seed is the same run with ``RunConfig.seed = 1``), evaluated on
    an episodes file: each row's run in its own directory, the table in markdown and JSON; a
    rerun trains nothing."""
    path = _episodes_file(tmp_path)
    workdir = tmp_path / "table"
    command = [
        sys.executable,
        "-m",
        "flamingo_jax.tools.ablate",
        "--gin_file=runs/smoke_cpu.gin",
        "--rows=baseline,vanilla_xattn",
        f"--workdir={workdir}",
        "--seeds=1",
        "--primary=episodes:1",
        "--gin.TRAIN_STEPS=2",
        "--gin.CHECKPOINT_EVERY=2",
        "--gin.EvalConfig.tasks=['episodes']",
        f"--gin.EvalConfig.task_options={{'episodes': {{'path': '{path}'}}}}",
        "--gin.EvalConfig.seeds=[0]",
        "--gin.EvalConfig.batch_size=8",
    ]
    env = one_device_env()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((workdir / "ablations.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["baseline", "vanilla_xattn"] and result["primary"] == "episodes:1"
    assert rows["baseline"]["seeds"] == rows["vanilla_xattn"]["seeds"] == 1
    assert len(rows["baseline"]["wall_time_s"]) == 1 and rows["baseline"]["wall_time_s"][0] > 0
    cell = rows["vanilla_xattn"]["cells"]["episodes:1"]
    assert 0 <= cell["value"] <= 100 and cell["se"] > 0
    assert not (workdir / "baseline" / "seed1").exists()
    assert rows["vanilla_xattn"]["paper"].startswith("lower (Flamingo Table 3 (iv))")
    assert (workdir / "vanilla_xattn" / "seed0" / "eval" / "report.md").exists()
    described = json.loads((workdir / "vanilla_xattn" / "seed0" / "ablate_machine.json").read_text())
    assert described["cores"] == os.cpu_count() and described["matmul_peak_flops"] > 1e9
    assert rows["vanilla_xattn"]["machines"][0].endswith("GFLOP/s")
    table = (workdir / "ablations.md").read_text()
    assert "| row | seeds | episodes 1-shot | Δ episodes:1 |" in table and "| vanilla_xattn |" in table
    # A rerun finds every run done and only rewrites the table.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done before, skipped" in again.stderr
    assert json.loads((workdir / "ablations.json").read_text())["rows"] == rows
