"""`divo study ogbench`: the budget comes from the pilot before the grid runs; the data are
prepared before the cells; the page shows the pilot's curves and the grid's report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("ogbench")

from divo.data.factory import ogbench as factory  # noqa: E402
from divo.errors import ConfigError  # noqa: E402
from divo.studies import ogbench as study  # noqa: E402


def _cfg(tmp_path: Path, *extra: str):
    return study.study_config(
        [
            f"results={tmp_path / 'results'}",
            f"work_dir={tmp_path / 'work'}",
            f"page={tmp_path / 'page.md'}",
            *extra,
        ]
    )


def test_the_grid_waits_for_a_budget_chosen_from_the_pilot(tmp_path):
    assert _cfg(tmp_path).steps == 40000  # shipped: chosen from the pilot's curves
    cfg = _cfg(tmp_path, "steps=null")  # before that choice the grid refuses to start
    with pytest.raises(ConfigError, match=r"--pilot.*steps=N"):
        study.run(cfg, pilot=False)
    pilot = study.pilot_config(cfg)
    assert pilot.steps == cfg.pilot.steps and list(pilot.recipes) == list(cfg.pilot.recipes)
    assert Path(pilot.results) == tmp_path / "results" / "pilot"
    assert Path(pilot.work_dir) == tmp_path / "work" / "pilot"
    assert list(pilot.datasets) == [cfg.pilot.dataset]


def test_the_page_tables_the_pilot_curves_as_they_grow(tmp_path):
    cfg = _cfg(tmp_path, "steps=null")
    pilot = study.pilot_config(cfg)
    # one finished pilot (kept), one still running (its live run folder)
    kept = Path(pilot.results) / "runs" / "divo" / str(cfg.pilot.dataset) / "seed0"
    live = Path(pilot.work_dir) / "fql" / str(cfg.pilot.dataset) / "seed0"
    # the critic check: exact where logged, else the one-sided bound, else blank
    divo_rows = [(0, 0.0, "", ""), (5000, 4.0, "", "44.4"), (10000, 36.0, "-2.5", "3.0")]
    for folder, rows in ((kept, divo_rows), (live, [(0, 0.0, "", "")])):
        folder.mkdir(parents=True)
        lines = ["step,normalized_score,loss_critic,eval_q_bias,eval_q_bias_min"]
        for step, score, exact, bound in rows:
            lines += [f"{step},{score},,{exact},{bound}", f"{step + 100},,0.5,,"]
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    text = study.write_page(cfg, log=lambda _: None).read_text()
    assert "| step | divo | fql | divo: Q - G | fql: Q - G |" in text
    assert "| 10,000 | 36 |  | -2.5; >= +3.0 |  |" in text and "| 0 | 0 | 0 |  |  |" in text
    assert "| 5,000 | 4 |  | >= +44.4 |  |" in text
    assert "Unfinished: `divo` up to step 10,000, `fql` up to step 0 of 100,000" in text
    assert "not OGBench's hosted files" in text and "ogbench 1.2.2" in text
    assert "Grid budget: not chosen yet" in text and "Primary score: `last:3`" in text
    chosen = study.write_page(_cfg(tmp_path), log=lambda _: None).read_text()
    assert "**Grid budget: 40,000 steps.**" in chosen
    assert "**Status:** grid 0 of 45 cells finished." in chosen


def test_a_tiny_grid_prepares_its_data_runs_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVO_OGBENCH_DIR", str(tmp_path / "generated"))
    small = factory.OGBenchGeneration("cube-single", episodes=2, val_episodes=1, episode_steps=61)
    factory.generate_ogbench_dataset(small, tmp_path / "generated", progress=False)
    cfg = _cfg(
        tmp_path,
        "recipes=[td3bc]",
        "compare=[td3bc]",
        "datasets=[cube-single-play-singletask-task1-v0]",
        "seeds=[0]",
        "steps=30",
        "eval_every=10",  # three evaluations: the declared score is the mean of the last 3
        "checkpoint_every=30",
        "other_score=null",
        "reps=200",
        "overrides=[dataset=ogbench,train.eval_episodes=2,train.eval_at_start=false,"
        "train.log_every=10]",
    )
    logged = []
    assert study.run(cfg, pilot=False, log=logged.append) == 0
    assert any("divo-generated file" in line for line in logged)  # found, not regenerated
    kept = tmp_path / "results" / "runs" / "td3bc" / "cube-single-play-singletask-task1-v0"
    result = json.loads((kept / "seed0" / "result.json").read_text())
    assert result["steps"] == 30 and result["success_rate"] is not None
    page = (tmp_path / "page.md").read_text()
    assert "grid 1 of 1 cells finished" in page
    assert "cube-single-play-singletask-task1-v0" in page
    # run again: nothing to do, the page is written again from the kept files
    logged.clear()
    assert study.run(cfg, pilot=False, log=logged.append) == 0
    assert any("1 of 1 cells done, 0 to run" in line for line in logged)


def test_missing_data_are_generated_on_as_many_workers_as_the_study_has_jobs(tmp_path, monkeypatch):
    """Before any cell starts, each task's files are found or made, one task at a time, a
    generation spread over the study's ``jobs`` (their cores wait for it anyway)."""
    import divo.data.ogbench as reader

    asked = []

    def find_files(ident, generate, workers):
        asked.append((ident.dataset_name, generate, workers))
        return reader.FoundFiles(tmp_path / f"{ident.dataset_name}.npz", "generated", None)

    monkeypatch.setattr(reader, "find_files", find_files)
    tasks = [
        "cube-single-play-singletask-v0",
        "cube-single-play-singletask-task2-v0",
        "scene-play-singletask-v0",
    ]
    study.prepare_data(_cfg(tmp_path), tasks, log=lambda _: None, workers=2)
    assert asked == [("cube-single-play-v0", True, 2), ("scene-play-v0", True, 2)]


def test_the_committed_files_regenerate_the_page_identically(tmp_path, monkeypatch):
    """``divo study ogbench --page-only`` over the committed files (the pilot's kept runs, a
    snapshot of an unfinished one included, and the notes) writes docs/ogbench_study.md byte
    for byte: nothing on the page comes from a live run folder."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "docs" / "ogbench_study", tmp_path / "docs" / "ogbench_study")
    monkeypatch.chdir(tmp_path)
    assert study.study_command(["--page-only"]) == 0
    page = (tmp_path / "docs" / "ogbench_study.md").read_text()
    assert page == (root / "docs" / "ogbench_study.md").read_text()
