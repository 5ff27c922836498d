"""`divo study locomotion`: cells run once, their small outputs are kept, an interrupted study
resumes, and the results page is written from `divo report`."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from unittest import mock

import pytest

from divo.data.builtin import ensure_builtin
from divo.errors import ConfigError, DatasetError
from divo.studies.locomotion import (
    Cell,
    cell_command,
    live_cell_minutes,
    study_cells,
    study_command,
    study_config,
    time_left,
)

BANDIT = "divo/bandit/multimodal-v0"


def settings(tmp_path) -> list[str]:
    return [
        f"results={tmp_path / 'results'}",
        f"work_dir={tmp_path / 'work'}",
        f"page={tmp_path / 'results.md'}",
        f"notes={tmp_path / 'notes.md'}",
        "recipes=[td3bc]",
        "extra_recipes=[]",
        "compare=[td3bc]",
        f"datasets=[{BANDIT}]",
        "seeds=[0,1]",
        "steps=40",
        "eval_every=10",
        "checkpoint_every=20",
        "overrides=[train.eval_episodes=2]",
        "earlier_runs=null",
        "extra_pairs=[]",
    ]


def test_the_study_runs_each_cell_once_keeps_its_outputs_and_resumes(tmp_path):
    ensure_builtin(BANDIT)  # the tests' small bandit, before the cells' subprocesses look
    (tmp_path / "notes.md").write_text("Hand-written reading of the numbers.")
    args = settings(tmp_path)
    assert study_command(args) == 0
    kept = tmp_path / "results" / "runs" / "td3bc" / "divo-bandit-multimodal-v0"
    for seed in (0, 1):
        files = sorted(p.name for p in (kept / f"seed{seed}").iterdir())
        assert files == ["config.yaml", "metrics.csv", "result.json", "train.log"]
        result = json.loads((kept / f"seed{seed}" / "result.json").read_text())
        assert result["seed"] == seed and result["steps"] == 40
    page = (tmp_path / "results.md").read_text()
    assert "Status: 2 of 2 cells finished" in page
    assert "Hand-written reading of the numbers." in page
    # the declared primary score (the mean of the last 3 evaluations: steps 20, 30, 40) first
    assert "**Primary score: `last:3`** (declared as `primary_score`" in page
    assert "### Mean normalised score of the last 3 evaluations" in page
    assert (tmp_path / "results" / "report" / "scores.csv").is_file()
    # the same tables scored by the final evaluation, in a section of their own
    assert "## The same tables with `--score final`" in page
    assert "### Final normalised score per recipe and dataset" in page
    other = (tmp_path / "results" / "report-final" / "scores.csv").read_text()
    assert other.count("td3bc") == 1

    # a second call runs nothing: the kept result.json marks a cell done
    stamp = (kept / "seed0" / "result.json").stat().st_mtime_ns
    assert study_command(args) == 0
    assert (kept / "seed0" / "result.json").stat().st_mtime_ns == stamp

    # kept outputs of another budget do not count: the cell would be trained again
    assert "0 of 2 cells done" in _dry_run([*args, "steps=80"])

    # a cell whose kept outputs are gone but whose run holds a checkpoint is resumed
    for p in (kept / "seed1").iterdir():
        p.unlink()
    cfg = study_config(args)
    command = cell_command(Cell("td3bc", BANDIT, 1), cfg)
    assert command[4] == str(tmp_path / "work" / "td3bc" / "divo-bandit-multimodal-v0" / "seed1")
    assert study_command(args) == 0
    assert (kept / "seed1" / "result.json").is_file()

    # a new cell on data other than the kept cells of its seed trained on is refused before it
    # starts (here: the kept record says another fingerprint, as after a regeneration); kept
    # cells of other seeds may differ (each seed's column on one set of data)
    record = json.loads((kept / "seed0" / "result.json").read_text())
    assert record["data_fingerprint"].startswith("sha256:")
    (kept / "seed0" / "result.json").write_text(
        json.dumps({**record, "data_fingerprint": "sha256:" + "0" * 64})
    )
    more = [*args, "recipes=[td3bc,uniform_weight]"]
    with pytest.raises(DatasetError, match="are not those its kept cells of seed 0 trained on"):
        study_command(more)
    assert not (tmp_path / "work" / "uniform_weight").exists()
    lines: list[str] = []
    from divo.studies.locomotion import run_study

    cfg = study_config([*more, "seeds=[1]"])
    assert run_study(cfg, log=lines.append) == 0  # seed 1's column: its own data, unchanged
    assert any("seed(s) 0 trained on other data" in line for line in lines)
    uniform = tmp_path / "results" / "runs" / "uniform_weight" / "divo-bandit-multimodal-v0"
    assert (uniform / "seed1" / "result.json").is_file()


def _dry_run(args: list[str]) -> str:
    lines: list[str] = []
    from divo.studies.locomotion import run_study

    run_study(study_config(args), dry_run=True, log=lines.append)
    return "\n".join(lines)


def test_extra_recipes_run_after_the_main_grid():
    cfg = study_config(["recipes=[divo,td3bc]", "extra_recipes=[iql]", "seeds=[0,1]"])
    cfg.datasets = ["a", "b"]
    order = [(c.recipe, c.dataset, c.seed) for c in study_cells(cfg)]
    main = [(r, d, s) for s in (0, 1) for d in ("a", "b") for r in ("divo", "td3bc")]
    assert order == main + [("iql", d, s) for s in (0, 1) for d in ("a", "b")]


def test_time_left_counts_each_recipes_mean_cell_time(tmp_path):
    cfg = study_config([f"results={tmp_path}", "recipes=[divo,td3bc]", "extra_recipes=[iql]",
                        "seeds=[0,1]", f"datasets=[{BANDIT}]", "steps=40",
                        f"work_dir={tmp_path / 'work'}"])  # fmt: skip
    assert time_left(cfg, 2) == ""  # nothing finished: no estimate
    for cell, seconds in [(Cell("divo", BANDIT, 0), 3000), (Cell("td3bc", BANDIT, 0), 600)]:
        kept = tmp_path / "runs" / cell.rel
        kept.mkdir(parents=True)
        (kept / "result.json").write_text(json.dumps({"steps": 40, "wall_clock_s": seconds}))
    # left: divo seed 1 (50 min), td3bc seed 1 (10 min), iql x 2 at the mean of all (30 min each)
    assert time_left(cfg, 2) == (
        "2 of 6 cells done; about 1.0 h left at jobs=2 (each recipe's mean cell time so far, on "
        "its dataset where it has one; iql at the mean of all, none finished yet)"
    )
    # a run narrowed to seed 1's column costs its cells from the kept cells of seed 0
    narrowed = study_config([f"results={tmp_path}", "recipes=[divo,td3bc]", "extra_recipes=[iql]",
                             "seeds=[1]", f"datasets=[{BANDIT}]", "steps=40",
                             f"work_dir={tmp_path / 'work'}"])  # fmt: skip
    assert time_left(narrowed, 1).startswith("0 of 3 cells done; about 1.5 h left at jobs=1")
    finished = study_config([f"results={tmp_path}", "recipes=[divo]", "extra_recipes=[]",
                             "seeds=[0]", f"datasets=[{BANDIT}]", "steps=40"])  # fmt: skip
    assert time_left(finished, 1) == ""  # nothing left to run: no estimate


def test_unknown_study_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown study setting"):
        study_config(["stepz=10"])
    bad = tmp_path / "variant.yaml"
    bad.write_text("seedz: [0]\n")
    with pytest.raises(ConfigError, match="variant.yaml"):
        study_config([], bad)


def test_deployment_variants_are_evaluated_kept_backfilled_and_tabled(tmp_path):
    """A recipe under `deployments` has its final policy evaluated again with other settings
    (`divo evaluate --set`); a cell finished before the variant existed gets it on the next
    call; a variant the policy refuses is logged, not kept, and fails no cell."""
    ensure_builtin(BANDIT)
    small = ["train.eval_episodes=2", "critic.network.hidden=[16,16]",
             "actor.network.hidden=[16,16]", "behavior_model.hidden=[16,16]"]  # fmt: skip
    tiny = "[" + ",".join(f"'{o}'" for o in small) + "]"
    args = [
        *settings(tmp_path)[:4],
        "recipes=[resampling]",
        "extra_recipes=[]",
        "compare=[resampling]",
        f"datasets=[{BANDIT}]",
        "seeds=[0]",
        "steps=20",
        "eval_every=20",
        "checkpoint_every=20",
        f"overrides={tiny}",
        "deployments.resampling.greedy=[temperature=0]",
        "deployments.resampling.broken=[temperatur=0]",
    ]
    assert study_command(args) == 0
    cell = tmp_path / "results" / "runs" / "resampling" / "divo-bandit-multimodal-v0" / "seed0"
    greedy = json.loads((cell / "deploy-greedy.json").read_text())
    assert greedy["settings"] == {"temperature": 0} and greedy["episodes"] == 2
    assert not (cell / "deploy-broken.json").exists()
    page = (tmp_path / "results.md").read_text()
    assert "## `resampling` deployed otherwise" in page
    row = next(line for line in page.splitlines() if "`temperature=0`" in line)
    trained = json.loads((cell / "result.json").read_text())["normalized_score"]
    assert row.startswith(f"| {BANDIT} | `temperature=0` | 1 | {trained:.1f} | ")
    (cell / "deploy-greedy.json").unlink()  # as for a cell kept before the variant existed
    lines: list[str] = []
    from divo.studies.locomotion import run_study

    assert run_study(study_config(args), log=lines.append) == 0
    assert (cell / "deploy-greedy.json").is_file()
    assert any("deployed as broken: FAILED" in line and "no setting 'temperatur'" in line
               for line in lines)  # fmt: skip


def test_a_redeployed_baseline_is_paired_with_the_study_subject_by_seed(tmp_path):
    """The deployment table puts the first ``compare`` recipe's final score on the same seeds
    beside each variant, with their paired difference; a seed the subject lacks is left out of
    that pairing, and the subject's own variants get no such column."""
    from divo.studies.locomotion import _deployment_section

    cfg = study_config([*settings(tmp_path), "recipes=[td3bc,idql]", "compare=[td3bc,idql]",
                        "deployments={idql: {argmax: [selection=argmax]}}"])  # fmt: skip
    scores = {("td3bc", 0): 50.0, ("td3bc", 1): 40.0, ("idql", 0): 30.0, ("idql", 1): 20.0,
              ("idql", 2): 10.0}  # fmt: skip
    argmax = {0: 70.0, 1: 35.0, 2: 60.0}
    for (recipe, seed), score in scores.items():
        cell = tmp_path / "results" / "runs" / Cell(recipe, BANDIT, seed).rel
        cell.mkdir(parents=True)
        (cell / "result.json").write_text(json.dumps({"normalized_score": score}))
        if recipe == "idql":
            (cell / "deploy-argmax.json").write_text(json.dumps({"normalized_score": argmax[seed]}))
    done = [Cell("idql", BANDIT, seed) for seed in (0, 1, 2)]
    lines = _deployment_section(cfg, done)
    assert lines[lines.index("## `idql` deployed otherwise") + 4].endswith(
        "| `td3bc` | variant - `td3bc` (min, max) |"
    )
    row = next(line for line in lines if line.startswith(f"| {BANDIT} |"))
    # as trained 20.0, argmax 55.0 over seeds 0-2 (+35 = mean of +40, +15, +50); td3bc on
    # seeds 0-1 only: 45.0, and argmax - td3bc = mean of +20 and -5
    assert row == (f"| {BANDIT} | `selection=argmax` | 3 | 20.0 | 55.0 | +35.0 (+15.0, +50.0) | "
                   "45.0 (2 seeds) | +7.5 (-5.0, +20.0) |")  # fmt: skip
    own = study_config([*settings(tmp_path), "recipes=[td3bc,idql]", "compare=[idql,td3bc]",
                        "deployments={idql: {argmax: [selection=argmax]}}"])  # fmt: skip
    row = next(line for line in _deployment_section(own, done) if line.startswith(f"| {BANDIT}"))
    assert row.endswith("| +35.0 (+15.0, +50.0) |")


def test_a_page_without_notes(tmp_path):
    """``notes: null`` (a variant without hand-written notes) writes the page all the same."""
    assert study_command([*settings(tmp_path), "notes=null", "--page-only"]) == 0
    assert "No cell has finished yet." in (tmp_path / "results.md").read_text()


def test_a_variant_page_names_its_settings_file_and_command(tmp_path):
    """A study run with ``--config FILE`` says so on its page: the settings it merged and the
    command that resumes it (not the shipped study's)."""
    variant = tmp_path / "variant.yaml"
    variant.write_text("seeds: [0]\n")
    assert study_command([*settings(tmp_path), "--config", str(variant), "--page-only"]) == 0
    page = (tmp_path / "results.md").read_text()
    command = f"`divo study locomotion --config {variant}`"
    assert f"Made by {command} (settings: `recipes/study/locomotion.yaml` then `{variant}`)" in page
    assert f"{command} runs the rest" in page
    assert study_command([*settings(tmp_path), "--page-only"]) == 0  # the shipped study's page
    page = (tmp_path / "results.md").read_text()
    assert "Made by `divo study locomotion` (settings: `recipes/study/locomotion.yaml`)" in page


@pytest.mark.slow
def test_the_committed_cells_regenerate_the_results_page_identically(tmp_path, monkeypatch):
    """``divo study locomotion --page-only`` over the committed cells writes docs/results.md
    byte for byte (the report's tables and the notes come from the committed files only)."""

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(
        root / "docs" / "results",
        tmp_path / "docs" / "results",
        ignore=shutil.ignore_patterns(
            "report", "report-final", "report-last3", "design", "diffusion_ql_toy"
        ),
    )
    monkeypatch.chdir(tmp_path)
    assert study_command(["--page-only"]) == 0
    page = (tmp_path / "docs" / "results.md").read_text()
    assert page == (root / "docs" / "results.md").read_text()


def test_earlier_runs_are_tagged_and_their_schedule_is_tabled(tmp_path):
    """An ``earlier_runs`` folder's cells are listed under their tag with the lr schedule each
    row ran (compressed into the run, or the reference's horizon), and their deployment table
    carries an over-datasets line: the subject minus the variant, both intervals, seed pairs."""
    from divo.studies.locomotion import _deployment_section, _earlier_runs_lines, earlier_cells

    old = tmp_path / "old"
    args = [*settings(tmp_path), "recipes=[td3bc,idql]", "compare=[td3bc,idql]",
            "deployments={idql: {argmax: [selection=argmax]}}"]  # fmt: skip
    cfg = study_config(args)  # settings() clears the shipped earlier_runs; one of the test's:
    cfg.earlier_runs = {str(old): "(compressed lr)"}
    for root, decay, seeds in (
        (old, "null", (0, 1)),
        (tmp_path / "results" / "runs", 1000000, (0,)),
    ):
        for seed in seeds:
            cell = root / Cell("idql", BANDIT, seed).rel
            cell.mkdir(parents=True)
            (cell / "result.json").write_text(json.dumps(
                {"dataset_id": BANDIT, "seed": seed, "steps": 40, "normalized_score": 10.0}
            ))  # fmt: skip
            (cell / "config.yaml").write_text(
                "train:\n  steps: 40\n  batch_size: 512\nbehavior:\n  lr_schedule: cosine\n"
                f"  lr_decay_steps: {decay}\nevaluation_policy:\n  selection: importance\n"
            )
            if root == old:
                (cell / "deploy-argmax.json").write_text(json.dumps({"normalized_score": 30.0}))
    for seed, score in ((0, 25.0), (1, 15.0)):
        cell = tmp_path / "results" / "runs" / Cell("td3bc", BANDIT, seed).rel
        cell.mkdir(parents=True)
        (cell / "result.json").write_text(json.dumps({"normalized_score": score, "steps": 40}))
    assert [(c.recipe, c.seed, tag) for c, _, tag in earlier_cells(cfg)] == [
        ("idql", 0, "(compressed lr)"),
        ("idql", 1, "(compressed lr)"),
    ]
    lines = _earlier_runs_lines(cfg, [Cell("idql", BANDIT, 0)])
    rows = [line for line in lines if line.startswith("| `idql")]
    assert rows == [
        "| `idql` | 1 | cosine | 1,000,000 steps (the reference run's length; last step at "
        "100.0% of the start) | 512 | quantile (`importance`) |",
        "| `idql (compressed lr)` | 2 | cosine | 40 steps (compressed into the run; last step at "
        "0.2% of the start) | 512 | quantile (`importance`) |",
    ]
    section = _deployment_section(cfg, [Cell("idql", BANDIT, 0)])
    assert "## `idql (compressed lr)` deployed otherwise" in section
    # td3bc - argmax: 25 - 30 = -5 and 15 - 30 = -15 on the one dataset: mean -10
    assert section[-1].startswith(
        "Over the 1 datasets, `td3bc` minus the `selection=argmax` deployment (final scores): "
        "-10.0, 95% bootstrap CI [-15.0, -5.0] (exact), t CI ["
    )
    assert section[-1].endswith("`td3bc` ahead on 0 of 2 seed pairs.")


def test_a_deployment_summary_over_single_seed_pairs_says_its_t_interval_is_undefined():
    """With one seed pair per dataset a t interval has no spread to stand on: the over-datasets
    line says n/a instead of printing nan; with two pairs it gives the interval."""
    from divo.studies.locomotion import _over_datasets

    one = _over_datasets("divo", "selection=argmax", [[-10.0]])  # variant minus subject
    assert "t CI n/a" in one and "nan" not in one
    assert "+10.0" in one and "ahead on 1 of 1 seed pairs" in one
    two = _over_datasets("divo", "selection=argmax", [[-10.0, -20.0]])
    assert "t CI [" in two and "nan" not in two and "+15.0" in two


def test_kept_cells_from_before_fingerprints_are_checked_by_their_data_level(tmp_path):
    """Kept cells without a fingerprint are compared by their data's mean episode return."""
    from types import SimpleNamespace

    from divo.studies.runner import check_data_as_kept

    kept = tmp_path / "runs" / "divo" / "cube" / "seed0"
    kept.mkdir(parents=True)
    record = {"dataset_id": "cube", "seed": 0, "behavior_return": -978.982}
    (kept / "result.json").write_text(json.dumps(record))
    here = SimpleNamespace(fingerprint="sha256:" + "1" * 64, behavior_return=-978.983)
    with pytest.raises(DatasetError, match="mean episode return -978.982 there, -978.983 here"):
        check_data_as_kept(tmp_path, [Cell("fql", "cube", 0)], load=lambda d: here)
    lines: list[str] = []
    check_data_as_kept(tmp_path, [Cell("fql", "cube", 1)], load=lambda d: here, log=lines.append)
    assert lines == [
        "  data cube: mean episode return checked against its 1 kept cell(s); seed(s) 0 trained "
        "on other data (another machine's files): each seed's column stays on one set"
    ]
    same = SimpleNamespace(fingerprint="sha256:" + "1" * 64, behavior_return=-978.982)
    lines.clear()
    check_data_as_kept(tmp_path, [Cell("fql", "cube", 0)], load=lambda d: same, log=lines.append)
    assert lines == ["  data cube: mean episode return checked against its 1 kept cell(s)"]


def _train_log(run_dir, lines):
    run_dir.mkdir(parents=True)
    (run_dir / "train.log").write_text(
        "".join(f"[2026-12-07 {t},123][divo.train][INFO] - {m}\n" for t, m in lines)
    )


def test_time_left_reads_cells_in_progress_from_their_train_log(tmp_path):
    """A cell in progress costs what its own log projects, and a recipe with no finished cell
    is costed at its running cell's pace, not at other recipes' mean (fql's first OGBench cell
    was once estimated at divo's 18 minutes; it took 100)."""
    work = tmp_path / "work"
    cfg = study_config([f"results={tmp_path}", "recipes=[divo,fql]", "extra_recipes=[]",
                        "seeds=[0,1]", f"datasets=[{BANDIT}]", "steps=40",
                        f"work_dir={work}"])  # fmt: skip
    kept = tmp_path / "runs" / Cell("divo", BANDIT, 0).rel
    kept.mkdir(parents=True)
    (kept / "result.json").write_text(json.dumps({"steps": 40, "wall_clock_s": 1200}))
    # fql seed 0: started 10:00, evaluated at 10:01 (step 0) and 10:11 (step 10 of 40): 1 min
    # a step, so 41 min projected in all (1 + 40) and 30 min left at 10:11, 20 min left at 10:21
    _train_log(work / Cell("fql", BANDIT, 0).rel, [
        ("09:00:00", "training 40 steps on cpu (an earlier sitting)"),
        ("09:00:30", "step 0: normalized score 0.0 (...)"),
        ("10:00:00", "training 40 steps on cpu (AMD EPYC (2 cores)); ETA after the first steps"),
        ("10:00:05", "7 steps/s: about 3.3 h to go (step 1 of 40)"),
        ("10:01:00", "step 0: normalized score 0.0 (success in 0 of 50 episodes)"),
        ("10:11:00", "step 10: normalized score 2.0 (success in 1 of 50 episodes)"),
    ])  # fmt: skip
    now = time.mktime(time.strptime("2026-12-07 10:21:00", "%Y-%m-%d %H:%M:%S"))
    assert live_cell_minutes(work / Cell("fql", BANDIT, 0).rel, now=now) == (41.0, 20.0)
    # before a second evaluation, the run's own ETA line
    _train_log(work / Cell("divo", BANDIT, 1).rel, [
        ("10:00:00", "training 40 steps on cpu"),
        ("10:00:30", "step 0: normalized score 0.0 (...)"),
        ("10:01:00", "50 steps/s: about 15 min to go (step 1 of 40)"),
    ])  # fmt: skip
    assert live_cell_minutes(work / Cell("divo", BANDIT, 1).rel, now=now) == (16.0, 0.0)
    # a log quiet for longer than its projection (+30 min) is a process that is gone
    late = now + 3600
    assert live_cell_minutes(work / Cell("divo", BANDIT, 1).rel, now=late) is None
    with mock.patch("time.time", return_value=now):
        # left: fql seed 0 (20, its log), fql seed 1 (41, fql's projected length), divo seed 1
        # (0 by its own log): 61 min over 1 job
        assert time_left(cfg, 1) == (
            "1 of 4 cells done; about 1.0 h left at jobs=1 (each recipe's mean cell time so "
            "far, on its dataset where it has one; 2 cell(s) in progress at their own pace)"
        )


def test_kept_and_started_cells_must_have_run_with_the_studys_settings(tmp_path):
    """A study whose overrides or eval_every changed would count its kept cells as done (and
    resume its started runs) under settings they never ran; it refuses before any cell."""
    from omegaconf import OmegaConf

    from divo.config import compose_recipe
    from divo.studies.locomotion import cell_overrides, check_settings

    work = tmp_path / "work"
    base = [f"results={tmp_path}", "recipes=[td3bc]", "extra_recipes=[]", "seeds=[0,1]",
            f"datasets=[{BANDIT}]", "steps=40", "eval_every=20", f"work_dir={work}"]  # fmt: skip
    cfg = study_config(base)
    cells = study_cells(cfg)
    kept = tmp_path / "runs" / cells[0].rel
    kept.mkdir(parents=True)
    ran = compose_recipe("td3bc", cell_overrides(cells[0], cfg))
    OmegaConf.save(ran, kept / "config.yaml", resolve=True)
    check_settings(cells, cfg, log=lambda _: None)  # as the study gives it: fine

    for changed, shown in [
        ("overrides=[actor.loss.alpha=5]", "actor.loss.alpha: 0.25 -> 5"),
        ("eval_every=10", "train.eval_every: 20 -> 10"),
    ]:
        with pytest.raises(ConfigError, match=rf"1 kept or started cell.*\({shown}\)"):
            check_settings(cells, study_config([*base, changed]), log=lambda _: None)
    # other steps are not a mismatch: the cell is not done, and its run is extended
    check_settings(cells, study_config([*base, "steps=80"]), log=lambda _: None)
    assert "train.steps=80" in cell_command(cells[0], study_config([*base, "steps=80"]))

    # a started run (checkpoints in work_dir) of other settings would be resumed as they were
    started = work / cells[1].rel
    (started / "checkpoints").mkdir(parents=True)
    (started / "checkpoints" / "step_000000020.pt").write_bytes(b"")
    other = compose_recipe("td3bc", [*cell_overrides(cells[1], cfg), "critic.loss.gamma=0.9"])
    OmegaConf.save(other, started / "config.yaml", resolve=True)
    with pytest.raises(ConfigError, match=r"seed1 \(critic.loss.gamma: 0.9 -> 0.99\)"):
        check_settings(cells, cfg, log=lambda _: None)
    command = cell_command(cells[1], cfg)  # a resume passes the study's schedule again
    assert command[4:6] == [str(started), "train.steps=40"]


def _kept_cell(cfg, cell, scores: dict[int, float]) -> None:
    """A kept cell as a finished run leaves it, without training: its config.yaml as the study
    composes it, metrics.csv's evaluations, result.json's final one."""
    from omegaconf import OmegaConf

    from divo.config import compose_recipe
    from divo.studies.locomotion import cell_overrides

    kept = Path(cfg.results) / "runs" / cell.rel
    kept.mkdir(parents=True)
    OmegaConf.save(compose_recipe(cell.recipe, cell_overrides(cell, cfg)), kept / "config.yaml",
                   resolve=True)  # fmt: skip
    rows = ["step,eval_return_mean,normalized_score"]
    rows += [f"{step},{score / 10},{score}" for step, score in sorted(scores.items())]
    (kept / "metrics.csv").write_text("\n".join(rows) + "\n")
    last = max(scores)
    result = {"recipe": cell.recipe, "dataset_id": cell.dataset, "seed": cell.seed,
              "steps": last, "return_mean": scores[last] / 10,
              "normalized_score": scores[last], "episodes": 2}  # fmt: skip
    (kept / "result.json").write_text(json.dumps(result))


def test_a_page_is_written_only_from_the_cells_it_states(tmp_path):
    """``--page-only`` refuses (and leaves the page as it was) when a kept cell is not the cell
    its folder names, was trained for other steps, or with other settings than the page would
    state; a run kept under the runs folder that the grid does not count stays out of the
    tables; a narrowed run writing to the study's own page writes the whole study's page."""
    from divo.studies.locomotion import _cell_folders
    from divo.studies.runner import page_settings

    args = [*settings(tmp_path), "recipes=[td3bc,uniform_weight]", "compare=[td3bc,uniform_weight]",
            "notes=null"]  # fmt: skip
    cfg = study_config(args)
    for cell in study_cells(cfg):
        base = 60.0 if cell.recipe == "td3bc" else 20.0
        _kept_cell(cfg, cell, {10: base, 20: base + 1, 30: base + 2, 40: base + 3 + cell.seed})
    assert study_command([*args, "--page-only"]) == 0
    page = tmp_path / "results.md"
    written = page.read_text()
    assert "Status: 4 of 4 cells finished" in written
    assert f"divo report {tmp_path / 'results' / 'runs'} --compare" in written

    runs = tmp_path / "results" / "runs"
    # a kept run the grid does not count (seed 7, as if copied in): not in the tables
    stray = runs / Cell("td3bc", BANDIT, 7).rel
    shutil.copytree(runs / Cell("td3bc", BANDIT, 0).rel, stray)
    record = json.loads((stray / "result.json").read_text())
    (stray / "result.json").write_text(json.dumps({**record, "seed": 7}))
    done = study_cells(cfg)
    assert _cell_folders(runs, done) == [runs / c.rel for c in done]
    assert study_command([*args, "--page-only"]) == 0
    assert "Status: 4 of 4 cells finished" in page.read_text()
    assert str(stray) not in page.read_text()
    assert "4 found (4 complete)" in (tmp_path / "results" / "report" / "report.md").read_text()
    shutil.rmtree(stray)
    assert study_command([*args, "--page-only"]) == 0
    written = page.read_text()

    # another budget, other settings: refused, the page untouched
    with pytest.raises(ConfigError, match=r"4 kept cell\(s\) were not trained for steps=80"):
        study_command([*args, "steps=80", "--page-only"])
    with pytest.raises(ConfigError, match=r"ran with other settings.*eval_every: 10 -> 20"):
        study_command([*args, "eval_every=20", "--page-only"])
    assert page.read_text() == written

    # a cell folder holding another cell's result.json (seed 0's copied over seed 1's)
    seed1 = runs / Cell("uniform_weight", BANDIT, 1).rel
    shutil.copy2(runs / Cell("uniform_weight", BANDIT, 0).rel / "result.json", seed1)
    with pytest.raises(ConfigError, match=r"is not this cell's result: it records seed 0"):
        study_command([*args, "--page-only"])
    assert page.read_text() == written
    shutil.copy2(runs / Cell("td3bc", BANDIT, 1).rel / "result.json", seed1)
    with pytest.raises(ConfigError, match=r"records recipe 'td3bc' \(the cell's: 'uniform_weight'"):
        study_command([*args, "--page-only"])

    # a narrowed run (one seed) writing to the study's own page writes the whole study's page;
    # with a page or results folder of its own, the selection is a study of its own
    narrowed = ["seeds=[1]", "steps=80"]
    whole = page_settings(study_config(narrowed), narrowed, study_config)
    assert list(whole.seeds) == [0, 1, 2] and whole.steps == 80
    assert list(page_settings(study_config(args), args, study_config).seeds) == [0, 1]
    # cells a narrowed run picks outside the page's grid are named: kept, not tabled
    from divo.studies.locomotion import check_page_grid

    beyond = ["seeds=[3]", "recipes=[td3bc]", "extra_recipes=[]"]
    lines: list[str] = []
    check_page_grid(study_config(beyond), page_settings(study_config(beyond), beyond,
                       study_config), log=lines.append)  # fmt: skip
    assert lines and lines[0].startswith("  4 cell(s) of this run are not in the grid")


def test_a_primary_score_is_not_repeated_as_the_other_score(tmp_path):
    """``primary_score: final`` with ``other_score: final`` (a design study that ran before
    studies declared a score) writes its tables once."""
    args = [*settings(tmp_path), "notes=null", "seeds=[0]", "primary_score=final",
            "other_score=final"]  # fmt: skip
    cfg = study_config(args)
    _kept_cell(cfg, study_cells(cfg)[0], {10: 5.0, 20: 6.0, 30: 7.0, 40: 8.0})
    assert study_command([*args, "--page-only"]) == 0
    page = (tmp_path / "results.md").read_text()
    assert "### Final normalised score per recipe and dataset" in page
    assert "The same tables with" not in page
