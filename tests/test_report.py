"""`divo report` on synthetic run directories (result.json / metrics.csv / config.yaml written
directly, no training): the numbers against hand computations, incomplete and broken runs,
variants and duplicates, figures and one-line errors."""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "rliable", reason="divo report needs the report extra: pip install -e .[report]"
)
pytest.importorskip(
    "matplotlib", reason="divo report needs the report extra: pip install -e .[report]"
)

from divo.cli import main  # noqa: E402

REPS = ["--reps", "200"]  # few bootstrap resamples: the tests check numbers, not CI widths

# Final normalised scores by recipe -> dataset -> seeds 0, 1, 2
DIVO = {"env/a-v0": [10.0, 20.0, 60.0], "env/b-v0": [30.0, 40.0, 110.0], "env/c-v0": [90, 95, 100]}
TD3BC = {"env/a-v0": [5.0, 25.0, 50.0], "env/b-v0": [30.0, 30.0, 30.0], "env/c-v0": [80, 85, 90]}


def write_run(
    root: Path,
    recipe: str,
    dataset: str,
    seed: int,
    score: float | None,
    *,
    steps: int = 100,
    alpha: float = 2.5,
    result: bool = True,
    name: str | None = None,
    ret: float = 2.0,
    extra_config: str = "",
) -> Path:
    """A run directory as `divo train` leaves it (config.yaml, metrics.csv, result.json)."""
    run = root / recipe / dataset.replace("/", "-") / (name or f"seed{seed}")
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"seed: {seed}\ndevice: cpu\nrecipe: {recipe}\n"
        f"dataset:\n  id: {dataset}\n  reward_scale: 1.0\n"
        f"train:\n  steps: {steps}\n  eval_every: {steps // 2}\n  progress: false\n"
        f"actor:\n  loss:\n    alpha: {alpha}\n  hidden: [256, 256]\n" + extra_config
    )
    final = score if score is not None else ""
    half = 0.5 * score if score is not None else ""
    (run / "metrics.csv").write_text(
        "step,loss_critic,eval_return_mean,eval_return_std,normalized_score\n"
        f"{steps // 4},1.0,,,\n{steps // 2},0.5,{ret / 2},0.0,{half}\n"
        f"{steps},0.25,{ret},0.0,{final}\n"
    )
    if result:
        (run / "result.json").write_text(
            json.dumps(
                {
                    "recipe": recipe,
                    "dataset_id": dataset,
                    "seed": seed,
                    "steps": steps,
                    "return_mean": ret,
                    "return_std": 0.0,
                    "normalized_score": score,
                    "episodes": 10,
                    "wall_clock_s": 1.0,
                    "device": "cpu",
                }
            )
        )
    return run


def write_grid(root: Path) -> None:
    for recipe, table in (("divo", DIVO), ("td3bc", TD3BC)):
        for dataset, scores in table.items():
            for seed, score in enumerate(scores):
                write_run(root, recipe, dataset, seed, float(score))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def report(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["report", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_report_numbers_against_hand_computation(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_grid(runs)
    out = tmp_path / "rep"
    code, stdout, err = report(
        [str(runs), "--out", str(out), "--compare", "divo", "td3bc", *REPS], capsys
    )
    assert code == 0, err
    assert "18 runs (18 complete)" in stdout

    # per (recipe, dataset): mean and sample std (ddof 1) over the 3 seeds
    scores = {(r["recipe"], r["dataset"]): r for r in read_csv(out / "scores.csv")}
    a = scores[("divo", "env/a-v0")]
    assert a["seeds"] == "3" and a["seed_list"] == "0 1 2" and a["steps"] == "100"
    assert float(a["score_mean"]) == pytest.approx(30.0)
    # deviations -20, -10, 30 -> sqrt((400 + 100 + 900) / 2)
    assert float(a["score_std"]) == pytest.approx((1400 / 2) ** 0.5, rel=1e-5)
    assert float(scores[("td3bc", "env/b-v0")]["score_std"]) == 0.0

    # aggregate over the 3 datasets (rliable's definitions)
    agg = {(r["recipe"], r["metric"]): r for r in read_csv(out / "aggregate.csv")}
    divo = {m: float(agg[("divo", m)]["estimate"]) for m in ("mean", "median", "iqm")}
    assert divo["mean"] == pytest.approx((30 + 60 + 95) / 3, rel=1e-5)  # mean of dataset means
    assert divo["median"] == pytest.approx(60.0)  # median of dataset means 30, 60, 95
    # IQM: the 9 scores sorted 10 20 | 30 40 60 90 95 | 100 110; trim 2 each side
    assert divo["iqm"] == pytest.approx((30 + 40 + 60 + 90 + 95) / 5, rel=1e-5)
    # optimality gap: 100 - mean(min(score, 100)); 110 counts as 100
    clipped = [10, 20, 60, 30, 40, 100, 90, 95, 100]
    gap = float(agg[("divo", "optimality_gap")]["estimate"])
    assert gap == pytest.approx(100 - sum(clipped) / 9, rel=1e-5)
    for row in agg.values():
        assert float(row["ci_low"]) <= float(row["estimate"]) + 1e-9
        assert float(row["estimate"]) <= float(row["ci_high"]) + 1e-9
        assert row["datasets"] == "3" and row["seeds_per_dataset"] == "3"

    # paired differences divo - td3bc by seed: env/a-v0 -> 5, -5, 10
    paired = {r["dataset"]: r for r in read_csv(out / "paired.csv")}
    pa = paired["env/a-v0"]
    assert pa["a"] == "divo" and pa["b"] == "td3bc" and pa["pairs"] == "3"
    assert float(pa["diff_mean"]) == pytest.approx(10 / 3, rel=1e-5)
    # deviations 5/3, -25/3, 20/3 -> sqrt((25 + 625 + 400) / 9 / 2)
    assert float(pa["diff_std"]) == pytest.approx((1050 / 9 / 2) ** 0.5, rel=1e-5)
    assert pa["a_better"] == "2" and pa["b_better"] == "1"
    assert float(paired["env/b-v0"]["diff_mean"]) == pytest.approx(30.0)

    md = (out / "report.md").read_text()
    assert "| divo | env/a-v0 | 3 | 100 | 30.0 +- 26.5 | 10.0 | 60.0 |" in md
    assert "Probability of improvement P(divo > td3bc)" in md
    assert "| env/a-v0 | divo - td3bc | 3 | 3.3 +- 7.6 |" in md
    for png in ("learning_curves.png", "aggregate_intervals.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
        assert f"]({png})" in md


def test_score_of_the_last_evaluations(tmp_path, capsys):
    """--score last:K: each run's mean over its last K evaluations of metrics.csv (write_run logs
    0.5 x score at mid-training and the score at the end), through every table."""
    runs = tmp_path / "runs"
    write_grid(runs)
    out = tmp_path / "rep"
    args = [str(runs), "--out", str(out), "--compare", "divo", "td3bc", "--score", "last:2"]
    code, _, err = report([*args, *REPS, "--no-figures"], capsys)
    assert code == 0, err
    scores = {(r["recipe"], r["dataset"]): r for r in read_csv(out / "scores.csv")}
    assert float(scores[("divo", "env/a-v0")]["score_mean"]) == pytest.approx(0.75 * 30.0)
    paired = {r["dataset"]: r for r in read_csv(out / "paired.csv")}
    assert float(paired["env/b-v0"]["diff_mean"]) == pytest.approx(0.75 * 30.0)
    md = (out / "report.md").read_text()
    assert "## Mean normalised score of the last 2 evaluations per recipe and dataset" in md
    assert "| divo | env/a-v0 | 3 | 100 | 22.5 +- 19.8 | 7.5 | 45.0 |" in md
    # last:1 is the final evaluation again
    code, _, err = report([*args[:-1], "last:1", *REPS, "--no-figures"], capsys)
    assert code == 0, err
    scores = {(r["recipe"], r["dataset"]): r for r in read_csv(out / "scores.csv")}
    assert float(scores[("divo", "env/a-v0")]["score_mean"]) == pytest.approx(30.0)
    # a run with too few evaluations is left out, named; none left: one line saying why
    write_run(runs, "divo", "env/a-v0", 7, 50.0, steps=200)
    (runs / "divo" / "env-a-v0" / "seed7" / "metrics.csv").write_text(
        "step,normalized_score\n200,50.0\n"
    )
    code, _, err = report([*args, *REPS, "--no-figures"], capsys)
    assert code == 0, err
    left = {r["seed"]: r for r in read_csv(out / "runs.csv") if r["status"] == "no score"}
    assert "needs 2 ending at the final step" in left["7"]["note"]
    line = _one_line_error([str(runs), "--score", "last:5"], capsys)
    assert "has 5 evaluations ending at its final step" in line
    assert "--score" in _one_line_error([str(runs), "--score", "best"], capsys)


def test_pairs_use_the_seeds_both_have_and_default_output_dir(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, score in ((0, 50.0), (1, 60.0), (3, 90.0)):
        write_run(runs, "divo", "env/a-v0", seed, score)
    for seed, score in ((1, 40.0), (0, 45.0), (2, 10.0)):
        write_run(runs, "soft_weight", "env/a-v0", seed, score)
    code, _, err = report([str(runs), "--compare", "divo", "soft_weight", *REPS], capsys)
    assert code == 0, err
    out = runs / "report"  # default: <first dir>/report
    (row,) = read_csv(out / "paired.csv")
    assert row["seed_list"] == "0 1" and row["diffs"] == "5 20"
    assert float(row["diff_mean"]) == pytest.approx(12.5)


def test_incomplete_failed_and_unscored_runs_are_listed(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_grid(runs)
    write_run(runs, "divo", "env/a-v0", 7, 50.0, result=False)  # still running
    broken = write_run(runs, "divo", "env/a-v0", 8, 50.0)
    (broken / "result.json").write_text('{"recipe": "divo", "seed": ')  # cut off mid-write
    write_run(runs, "divo", "env/a-v0", 9, None)  # no evaluation
    early = runs / "td3bc" / "env-a-v0" / "seed5"  # Hydra's folder, job died before training
    (early / ".hydra").mkdir(parents=True)
    (early / ".hydra" / "config.yaml").write_text(
        "seed: 5\nrecipe: td3bc\ndataset:\n  id: env/a-v0\ntrain:\n  steps: 100\n"
    )
    (runs / "notes").mkdir()  # unrelated folders are ignored
    out = tmp_path / "rep"
    code, stdout, err = report([str(runs), "--out", str(out), *REPS, "--no-figures"], capsys)
    assert code == 0, err
    assert "22 runs (18 complete, 4 left out: see runs.csv)" in stdout
    status = {(r["recipe"], r["seed"]): r for r in read_csv(out / "runs.csv")}
    assert status[("divo", "7")]["status"] == "incomplete"
    assert "last logged step 100 of 100" in status[("divo", "7")]["note"]
    assert status[("divo", "9")]["status"] == "no score"
    assert status[("td3bc", "5")]["status"] == "incomplete"
    assert "no metrics yet of 100" in status[("td3bc", "5")]["note"]
    (failed,) = [r for r in status.values() if r["status"] == "failed"]
    assert "unreadable result.json" in failed["note"]
    # the numbers use the complete runs only
    scores = {(r["recipe"], r["dataset"]): r for r in read_csv(out / "scores.csv")}
    assert scores[("divo", "env/a-v0")]["seeds"] == "3"
    md = (out / "report.md").read_text()
    assert "## Runs left out" in md and "no result.json: still running" in md
    assert not (out / "learning_curves.png").exists()


def test_dataset_without_reference_scores_is_reported_by_returns(tmp_path, capsys):
    """A dataset with no reference scores (say a Pendulum dataset of one's own) is compared by
    final returns, marked as such, and kept out of the normalised aggregate."""
    runs = tmp_path / "runs"
    write_grid(runs)
    for seed, (a, b) in enumerate([(-150.0, -400.0), (-170.0, -380.0)]):
        write_run(runs, "divo", "own/pendulum-v0", seed, None, ret=a)
        write_run(runs, "td3bc", "own/pendulum-v0", seed, None, ret=b)
    out = tmp_path / "rep"
    code, stdout, err = report(
        [str(runs), "--out", str(out), *REPS, "--compare", "divo", "td3bc"], capsys
    )
    assert code == 0, err
    assert "22 runs (22 complete)" in stdout
    scores = {(r["recipe"], r["dataset"]): r for r in read_csv(out / "scores.csv")}
    own = scores[("divo", "own/pendulum-v0")]
    assert own["score_kind"] == "return" and float(own["score_mean"]) == pytest.approx(-160.0)
    assert scores[("divo", "env/a-v0")]["score_kind"] == "normalized"
    # the aggregate is over the three normalised datasets only, with the same numbers as without
    agg = {(r["recipe"], r["metric"]): r for r in read_csv(out / "aggregate.csv")}
    assert agg[("divo", "mean")]["datasets"] == "3"
    means = [np.mean(v) for v in DIVO.values()]
    assert float(agg[("divo", "mean")]["estimate"]) == pytest.approx(np.mean(means))
    pairs = {r["dataset"]: r for r in read_csv(out / "paired.csv")}
    assert pairs["own/pendulum-v0"]["diffs"] == "250 210"
    md = (out / "report.md").read_text()
    assert "own/pendulum-v0 *(return)*" in md and "no reference scores" in md
    assert (out / "learning_curves.png").is_file()
    # a run without a normalised score on a dataset that has them is left out, not mixed in
    write_run(runs, "td3bc", "env/a-v0", 3, None, ret=5.0)
    code, stdout, err = report([str(runs), "--out", str(out), *REPS, "--no-figures"], capsys)
    assert code == 0 and "1 left out" in stdout
    status = {(r["recipe"], r["dataset"], r["seed"]): r for r in read_csv(out / "runs.csv")}
    assert status[("td3bc", "env/a-v0", "3")]["status"] == "no score"


def test_variants_and_duplicates(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs, "divo", "env/a-v0", seed, 10.0 + seed, alpha=2.5, name=f"a2.5-s{seed}")
        write_run(runs, "divo", "env/a-v0", seed, 50.0 + seed, alpha=7.5, name=f"a7.5-s{seed}")
    old = write_run(runs, "td3bc", "env/a-v0", 0, 5.0, name="old")
    new = write_run(runs, "td3bc", "env/a-v0", 0, 7.0, name="new")
    os.utime(old / "result.json", (1_000_000, 1_000_000))
    os.utime(new / "result.json", (2_000_000, 2_000_000))
    out = tmp_path / "rep"
    # a recipe with two variants must be named by its label
    code, _, err = report([str(runs), "--out", str(out), "--compare", "divo", "td3bc"], capsys)
    assert code == 2 and "several variants" in err and "divo[actor.loss.alpha=7.5]" in err
    args = [str(runs), "--out", str(out), "--compare", "divo[actor.loss.alpha=7.5]", "td3bc"]
    code, _, err = report([*args, *REPS, "--no-figures"], capsys)
    assert code == 0, err
    scores = {r["recipe"]: r for r in read_csv(out / "scores.csv")}
    assert float(scores["divo[actor.loss.alpha=2.5]"]["score_mean"]) == pytest.approx(10.5)
    assert float(scores["divo[actor.loss.alpha=7.5]"]["score_mean"]) == pytest.approx(50.5)
    assert scores["td3bc"]["seeds"] == "1" and float(scores["td3bc"]["score_mean"]) == 7.0
    superseded = [r for r in read_csv(out / "runs.csv") if r["status"] == "superseded"]
    assert len(superseded) == 1 and superseded[0]["run"].endswith("old")
    (row,) = read_csv(out / "paired.csv")
    assert row["diffs"] == "43"


def test_a_key_older_configs_lack_counts_as_the_recipes_value_today(tmp_path, capsys):
    """Runs written before an option existed lack its key: they ran with what is now the
    shipped recipe's default (divo: behavior_model.network=mlp), so they are no variant of the
    runs that record it; a run that set another value is one, and a key the recipe does not
    know, missing from some runs, tells nothing apart."""
    runs = tmp_path / "runs"
    write_run(runs, "divo", "env/a-v0", 0, 10.0)  # before the option existed
    write_run(runs, "divo", "env/a-v0", 1, 12.0, extra_config="behavior_model:\n  network: mlp\n")
    write_run(runs, "divo", "env/b-v0", 0, 20.0, extra_config="my_plugin:\n  knob: 3\n")
    write_run(runs, "divo", "env/b-v0", 1, 22.0)
    out = tmp_path / "rep"
    code, _, err = report([str(runs), "--out", str(out), *REPS, "--no-figures"], capsys)
    assert code == 0, err
    scores = {(r["recipe"], r["dataset"]): r for r in read_csv(out / "scores.csv")}
    assert scores[("divo", "env/a-v0")]["seeds"] == "2"
    assert scores[("divo", "env/b-v0")]["seeds"] == "2"
    write_run(runs, "divo", "env/a-v0", 2, 30.0,
              extra_config="behavior_model:\n  network: ln_resnet\n")  # fmt: skip
    code, _, err = report([str(runs), "--out", str(out), *REPS, "--no-figures"], capsys)
    assert code == 0, err
    labels = {(r["recipe"], r["dataset"], r["seeds"]) for r in read_csv(out / "scores.csv")}
    assert ("divo[behavior_model.network=mlp]", "env/a-v0", "2") in labels
    assert ("divo[behavior_model.network=ln_resnet]", "env/a-v0", "1") in labels


def _one_line_error(args, capsys) -> str:
    code, _, err = report(args, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("divo: error: "), err
    return lines[0]


def test_bad_input_gives_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no runs found under" in _one_line_error([str(empty)], capsys)
    assert "is not a directory" in _one_line_error([str(tmp_path / "nope")], capsys)
    runs = tmp_path / "runs"
    write_grid(runs)
    line = _one_line_error([str(runs), "--compare", "divo", "iql"], capsys)
    assert "unknown recipe 'iql' in --compare" in line and "td3bc" in line
    assert "at least two" in _one_line_error([str(runs), "--compare", "divo"], capsys)
    assert "--reps" in _one_line_error([str(runs), "--reps", "many"], capsys)
    pending = tmp_path / "pending"
    write_run(pending, "divo", "env/a-v0", 0, 1.0, result=False)
    line = _one_line_error([str(pending)], capsys)
    assert "has finished with a final evaluation (1 incomplete" in line
    stranger = tmp_path / "stranger"  # a result.json that no divo run wrote: the reason is named
    stranger.mkdir()
    (stranger / "result.json").write_text('{"a": 1}')
    line = _one_line_error([str(stranger)], capsys)
    assert "(1 no score; e.g. " in line and "result.json has no final evaluation" in line
    assert "recipe, dataset, seed unknown" in line


def test_crafted_result_files_are_read_as_data_never_a_traceback(tmp_path):
    """read_run never raises: a seed of 1e999 (JSON's infinity) and a recipe or dataset given
    as a list or an object fell through to tracebacks (OverflowError; unhashable labels)."""
    from divo.report import read_run

    run = write_run(tmp_path / "runs", "td3bc", "env/a-v0", 0, 50.0)
    result = json.loads((run / "result.json").read_text())
    (run / "result.json").write_text(
        json.dumps(result).replace('"seed": 0', '"seed": 1e999')
        .replace('"recipe": "td3bc"', '"recipe": ["td3bc"]')
        .replace('"dataset_id": "env/a-v0"', '"dataset_id": {"x": 1}')
    )  # fmt: skip
    read = read_run(run)
    assert (read.recipe, read.dataset, read.seed) == ("td3bc", "env/a-v0", 0)  # config.yaml's
    result["normalized_score"] = float("nan")
    (run / "result.json").write_text(json.dumps(result))
    read = read_run(run)
    assert read.status == "no score" and "normalized_score" in read.note


# --- figures fit for a paper (issue 17, item 10) ---------------------------------------------


def png_size_and_dpi(path: Path) -> tuple[int, int, float]:
    """Width and height in pixels (IHDR) and dots per inch (pHYs) of a PNG file."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    at = data.index(b"pHYs")
    per_metre = int.from_bytes(data[at + 4 : at + 8], "big")
    return width, height, per_metre * 0.0254


def test_figures_in_every_format_at_the_chosen_dpi(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_grid(runs)
    out = tmp_path / "rep"
    code, _, err = report([str(runs), "--out", str(out), *REPS], capsys)
    assert code == 0, err
    width, height, dpi = png_size_and_dpi(out / "learning_curves.png")
    assert dpi == pytest.approx(200, abs=0.5)  # the default: print quality, not 90 dpi
    assert width >= 2000 and height >= 700  # three panels side by side
    assert not (out / "learning_curves.pdf").exists()

    code, _, err = report(
        [str(runs), "--out", str(out), *REPS, "--format", "png,pdf,svg", "--dpi", "100"], capsys
    )
    assert code == 0, err
    w100, h100, dpi = png_size_and_dpi(out / "learning_curves.png")
    assert dpi == pytest.approx(100, abs=0.5)
    assert abs(2 * w100 - width) <= 2 and abs(2 * h100 - height) <= 2  # same inches, half the dpi
    md = (out / "report.md").read_text()
    for stem in ("learning_curves", "aggregate_intervals"):
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        assert "<svg" in (out / f"{stem}.svg").read_text()
        assert f"]({stem}.png)" in md and f"[{stem}.pdf]({stem}.pdf)" in md
    # vector files carry no date: the same report gives the same bytes
    pdf = (out / "learning_curves.pdf").read_bytes()
    report([str(runs), "--out", str(out), *REPS, "--format", "pdf"], capsys)
    assert (out / "learning_curves.pdf").read_bytes() == pdf
    assert "](learning_curves.pdf)" in (out / "report.md").read_text()  # no PNG: a link

    for bad in (["--format", "jpg"], ["--format", ""], ["--dpi", "10"], ["--dpi", "x"]):
        code, _, err = report([str(runs), "--out", str(out), *REPS, *bad], capsys)
        assert code == 2 and err.startswith("divo: error:") and err.count("\n") == 1, err


def _figure(runs_dir: Path):
    from divo.report import (
        assign_labels,
        choose_score_kinds,
        drop_duplicates,
        find_runs,
        learning_curves_figure,
    )

    runs = find_runs([runs_dir])
    assign_labels(runs)
    drop_duplicates(runs)
    choose_score_kinds(runs)
    labels = sorted({r.label for r in runs})
    return learning_curves_figure(runs, labels, reps=50, seed=0)


def _overflow(fig) -> float:
    """How far (inches) what the drawn figure shows reaches past its edges (cut off when
    saved): 0 when everything fits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    drawn, page = fig.get_tightbbox(canvas.get_renderer()), fig.bbox_inches
    return max(0.0, page.x0 - drawn.x0, drawn.x1 - page.x1, page.y0 - drawn.y0, drawn.y1 - page.y1)


@pytest.mark.parametrize("datasets", [1, 2, 4])
def test_learning_curve_texts_fit_in_the_figure(tmp_path, datasets):
    runs = tmp_path / "runs"
    for d in range(datasets):
        for seed in range(2):
            for recipe in ("divo", "td3bc"):
                write_run(runs, recipe, f"env/d{d}-v0", seed, 40.0 + seed)
    fig = _figure(runs)
    assert _overflow(fig) < 0.02
    titles = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
    assert any("95% bootstrap CI" in t for t in titles)


def test_a_single_evaluation_is_marked_as_such(tmp_path, capsys):
    """A run evaluated once (train.eval_every >= train.steps, no evaluation at step 0) has no
    curve: the figure and report.md say so instead of showing a lone dot."""
    runs = tmp_path / "runs"
    for seed in range(2):
        run = write_run(runs, "divo", "env/a-v0", seed, 30.0 + seed)
        (run / "metrics.csv").write_text(
            f"step,loss_critic,eval_return_mean,eval_return_std,normalized_score\n"
            f"50,1.0,,,\n100,0.5,2.0,0.0,{30.0 + seed}\n"
        )
        write_run(runs, "td3bc", "env/a-v0", seed, 20.0)  # evaluated twice: a curve
    fig = _figure(runs)
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("one evaluation per run" in n for n in notes)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "divo (2 seeds, 1 evaluation)" in legend and "td3bc (2 seeds)" in legend
    out = tmp_path / "rep"
    code, _, err = report([str(runs), "--out", str(out), *REPS], capsys)
    assert code == 0, err
    md = (out / "report.md").read_text()
    assert "One evaluation per run (drawn as a point, not a curve): divo on env/a-v0." in md


def test_behaviour_level_line_is_drawn(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(2):
        run = write_run(runs, "divo", "env/a-v0", seed, 30.0)
        result = json.loads((run / "result.json").read_text())
        result["behavior_normalized_score"] = 12.5
        (run / "result.json").write_text(json.dumps(result))
    ax = _figure(runs).axes[0]
    levels = [line for line in ax.get_lines() if line.get_label() == "behaviour policy (data)"]
    assert len(levels) == 1 and list(levels[0].get_ydata()) == [12.5, 12.5]


def test_fewer_than_five_seeds_warns_on_the_console_and_in_the_report(tmp_path, capsys):
    """The console line is a warning (the CLI prints it as `divo: warning: ...`), and report.md
    repeats it at the top."""
    runs = tmp_path / "runs"
    write_grid(runs)  # 3 seeds per dataset
    out = tmp_path / "rep"
    args = [str(runs), "--out", str(out), *REPS, "--no-figures"]
    with pytest.warns(UserWarning, match=r"fewer than 5 seeds per dataset \(divo: 3, td3bc: 3\)"):
        assert report(args, capsys)[0] == 0
    md = (out / "report.md").read_text()
    assert "**Warning:** fewer than 5 seeds per dataset (divo: 3, td3bc: 3)" in md

    for recipe, table in (("divo", DIVO), ("td3bc", TD3BC)):  # seeds 3 and 4 on every dataset
        for dataset, scores in table.items():
            for seed in (3, 4):
                write_run(runs, recipe, dataset, seed, float(scores[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # five seeds everywhere: no warning at all
        assert report(args, capsys)[0] == 0
    assert "Warning" not in (out / "report.md").read_text()
    write_run(runs, "soft_weight", "env/a-v0", 0, 10.0)  # one recipe short of seeds
    with pytest.warns(UserWarning, match=r"seeds per dataset \(soft_weight: 1\):"):
        assert report(args, capsys)[0] == 0
    assert (
        "**Warning:** fewer than 5 seeds per dataset (soft_weight: 1)"
        in (out / "report.md").read_text()
    )


def test_the_one_sided_critic_check_gets_its_own_diagnostics_column(tmp_path, capsys):
    """Runs that log eval_q_bias_min (OGBench: every episode ran into its time limit) show it
    as a column of its own, explained; runs without it leave the table as it was."""
    runs = tmp_path / "runs"
    write_grid(runs)
    out = tmp_path / "rep"
    args = [str(runs), "--out", str(out), "--compare", "divo", "td3bc", *REPS, "--no-figures"]
    code, _, err = report(args, capsys)
    assert code == 0, err
    assert "at least (eval)" not in (out / "report.md").read_text()
    run = runs / "divo" / "env-a-v0" / "seed0"
    (run / "metrics.csv").write_text(
        "step,loss_critic,eval_return_mean,normalized_score,eval_q_bias_min\n"
        "25,1.0,,,\n50,0.5,1.0,5.0,40.0\n100,0.25,2.0,10.0,44.0\n"
    )
    code, _, err = report(args, capsys)
    assert code == 0, err
    md = (out / "report.md").read_text()
    assert "Q - G, at least (eval)" in md and "a lower bound on the overestimation" in md


def test_the_score_is_defined_as_the_runs_record_it(tmp_path, capsys):
    """A report says what its score is from the runs' result.json: D4RL's normalised return,
    a success rate on goal-reaching data (OGBench), or both; and how many episodes one
    evaluation has."""
    from divo.report import episodes_per_evaluation, find_runs, score_definition

    def success(run: Path, episodes: int = 50) -> None:
        result = json.loads((run / "result.json").read_text())
        result.update(score="success rate (percent of evaluation episodes)", episodes=episodes)
        (run / "result.json").write_text(json.dumps(result))

    d4rl, ogb, both = tmp_path / "d4rl", tmp_path / "ogb", tmp_path / "both"
    write_run(d4rl, "divo", "hopper", 0, 40.0)
    for seed in (0, 1):
        success(write_run(ogb, "divo", "cube-single-play-singletask-v0", seed, 30.0))
    write_run(both, "divo", "hopper", 0, 40.0)
    success(write_run(both, "divo", "cube", 0, 20.0))

    assert score_definition(find_runs([d4rl])).startswith("Normalised score = 100 (R - R_min)")
    assert episodes_per_evaluation(find_runs([d4rl])) == "10"
    assert score_definition(find_runs([ogb])).startswith("Score = the success rate")
    assert episodes_per_evaluation(find_runs([ogb])) == "50"
    mixed = score_definition(find_runs([both]))
    assert "R_min" in mixed and "success rate" in mixed
    assert episodes_per_evaluation(find_runs([both])) == "10-50"
    code, _, _ = report([str(ogb), "--out", str(tmp_path / "rep"), "--no-figures"], capsys)
    text = (tmp_path / "rep" / "report.md").read_text()
    assert code == 0 and "Score = the success rate" in text and "R_min" not in text


def _set_fingerprint(run: Path, fingerprint: str) -> None:
    result = json.loads((run / "result.json").read_text())
    result["data_fingerprint"] = fingerprint
    (run / "result.json").write_text(json.dumps(result))


def test_runs_of_one_dataset_on_different_data_are_not_paired(tmp_path, capsys):
    """Runs of one dataset id and seed whose result.json fingerprints differ (the file was
    regenerated between them) are refused, naming the runs; runs without a fingerprint (older
    runs) are compared by their data's mean episode return. Different data across seeds, each
    seed's runs on one, are allowed and said on the console and in report.md."""
    runs = tmp_path / "runs"
    write_grid(runs)
    a = "sha256:" + "a" * 64
    for run in runs.rglob("result.json"):
        _set_fingerprint(run.parent, a)
    out = tmp_path / "out"
    assert report([str(runs), "--out", str(out), *REPS], capsys)[0] == 0
    odd = runs / "td3bc" / "env-b-v0" / "seed1"
    _set_fingerprint(odd, "sha256:" + "b" * 64)
    before = sorted(p.name for p in out.iterdir())
    line = _one_line_error([str(runs), "--out", str(tmp_path / "out2"), *REPS], capsys)
    assert "the runs on env/b-v0 with seed 1 trained on 2 different sets of transitions" in line
    assert "sha256:bbbbbbbbbbbb" in line and "seed1" in line
    assert not (tmp_path / "out2").exists()  # refused before anything was written
    assert sorted(p.name for p in out.iterdir()) == before

    # a run fed through a replay buffer records the buffer's hash, not comparable with a file's:
    # not refused beside the dataset's runs; two buffers' differing hashes are
    _set_fingerprint(odd, "sha256-buffer:" + "c" * 64)
    assert report([str(runs), "--out", str(tmp_path / "out3"), *REPS], capsys)[0] == 0
    _set_fingerprint(runs / "divo" / "env-b-v0" / "seed1", "sha256-buffer:" + "d" * 64)
    line = _one_line_error([str(runs), "--out", str(tmp_path / "out4"), *REPS], capsys)
    assert "data_fingerprint of a replay buffer" in line and "seed 1" in line
    _set_fingerprint(odd, "sha256:" + "b" * 64)

    # the same new data for both recipes' seed 1: allowed, and said
    _set_fingerprint(runs / "divo" / "env-b-v0" / "seed1", "sha256:" + "b" * 64)
    said = "the runs on env/b-v0 trained on 2 different sets of transitions"
    with pytest.warns(UserWarning, match=rf"{said} .*seed\(s\) 0, 2.*seed\(s\) 1"):
        assert report([str(runs), "--out", str(out), *REPS], capsys)[0] == 0
    assert f"**Data:** T{said[1:]}" in (out / "report.md").read_text()

    # runs from before fingerprints: their data's mean episode return tells the data apart
    for run in runs.rglob("result.json"):
        result = json.loads(run.read_text())
        result.pop("data_fingerprint")
        run.write_text(json.dumps(result))
    assert report([str(runs), "--out", str(out), *REPS], capsys)[0] == 0  # unknown: not checked
    for run, level in ((odd, -978.982), (runs / "divo" / "env-b-v0" / "seed1", -978.752)):
        result = json.loads((run / "result.json").read_text())
        (run / "result.json").write_text(json.dumps({**result, "behavior_return": level}))
    line = _one_line_error([str(runs), "--out", str(out), *REPS], capsys)
    assert "result.json behavior_return, the data's mean episode return: " in line
    assert "-978.982: " in line and "-978.752: " in line


def test_last_k_skips_the_untrained_policy_and_refuses_nan(tmp_path, capsys):
    """The step-0 evaluation (train.eval_at_start) is the untrained policy: it never counts in
    --score last:K; a NaN among the last K leaves the run out, named, not an older evaluation
    in its place."""
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_grid_run = write_run(runs, "divo", "env/a-v0", seed, 60.0)
        (write_grid_run / "metrics.csv").write_text(
            "step,normalized_score\n0,1.0\n50,50.0\n100,60.0\n"
        )
    out = tmp_path / "rep"
    args = [str(runs), "--out", str(out), *REPS, "--no-figures", "--score"]
    code, _, err = report([*args, "last:2"], capsys)
    assert code == 0, err
    (row,) = read_csv(out / "scores.csv")
    assert float(row["score_mean"]) == pytest.approx(55.0)  # not (1 + 50 + 60) / 3 anywhere
    assert "has 3 evaluations ending" in _one_line_error([*args[:-1], "--score", "last:3"], capsys)
    (runs / "divo" / "env-a-v0" / "seed1" / "metrics.csv").write_text(
        "step,normalized_score\n0,1.0\n50,nan\n100,60.0\n"
    )
    code, _, err = report([*args, "last:2"], capsys)
    assert code == 0, err
    left = {r["seed"]: r for r in read_csv(out / "runs.csv") if r["status"] == "no score"}
    assert "NaN or inf (steps 50)" in left["1"]["note"]
    (row,) = read_csv(out / "scores.csv")
    assert row["seeds"] == "1" and float(row["score_mean"]) == pytest.approx(55.0)
    # a step logged twice (an older divo's resume logged its checkpoint's evaluations again)
    # counts once, its last row: not (50 + 60 + 60) / 3 nor the earlier 10 at step 100
    (runs / "divo" / "env-a-v0" / "seed1" / "metrics.csv").write_text(
        "step,normalized_score\n0,1.0\n50,50.0\n100,10.0\n50,50.0\n100,60.0\n"
    )
    code, _, err = report([*args, "last:2"], capsys)
    assert code == 0, err
    (row,) = read_csv(out / "scores.csv")
    assert row["seeds"] == "2" and float(row["score_mean"]) == pytest.approx(55.0)


def test_scores_of_different_stretches_of_training_are_noted(tmp_path, capsys):
    """Runs set side by side on a dataset with different step budgets, or scored by last:K over
    evaluations at different steps (another eval_every), get a **Score:** note and a warning."""
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs, "divo", "env/a-v0", seed, 50.0)
        write_run(runs, "td3bc", "env/a-v0", seed, 40.0)
    out = tmp_path / "rep"
    args = [str(runs), "--out", str(out), *REPS, "--no-figures", "--compare", "divo", "td3bc"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = report([*args, "--score", "last:2"], capsys)
    assert code == 0, err
    assert not [w for w in caught if "stretch of training" in str(w.message)]  # like for like
    assert "**Score:**" not in (out / "report.md").read_text()
    # td3bc evaluated every 25 steps instead of 50: its last two are at 75 and 100
    for seed in (0, 1):
        (runs / "td3bc" / "env-a-v0" / f"seed{seed}" / "metrics.csv").write_text(
            "step,normalized_score\n25,10.0\n50,20.0\n75,30.0\n100,40.0\n"
        )
    with pytest.warns(UserWarning, match="evaluations at different steps"):
        code, _, err = report([*args, "--score", "last:2"], capsys)
    md = (out / "report.md").read_text()
    assert (
        "**Score:** The runs on env/a-v0 were scored over evaluations at different steps "
        "(--score last:2) (steps 50, 100: divo; steps 75, 100: td3bc)" in md
    )
    for seed in (0, 1):  # on another dataset, td3bc trained twice as long as divo
        write_run(runs, "divo", "env/b-v0", seed, 50.0)
        write_run(runs, "td3bc", "env/b-v0", seed, 40.0, steps=200)
    with pytest.warns(UserWarning, match="trained for different numbers of steps"):
        code, _, err = report(args, capsys)
    assert code == 0, err
    assert (
        "The runs on env/b-v0 were trained for different numbers of steps (100: divo; 200: "
        "td3bc)" in (out / "report.md").read_text()
    )


def test_scores_over_different_numbers_of_episodes_are_noted(tmp_path, capsys):
    """Runs of one recipe evaluated on 1 and on 20 episodes share a cell (the episodes do not
    change what trained), and the report says so: a 1-episode success rate is 0 or 100."""
    runs = tmp_path / "runs"
    for seed, episodes in ((0, 1), (1, 1), (2, 20)):
        run = write_run(runs, "td3bc", "env/a-v0", seed, 40.0 + seed)
        result = json.loads((run / "result.json").read_text())
        (run / "result.json").write_text(json.dumps({**result, "episodes": episodes}))
    out = tmp_path / "rep"
    with pytest.warns(UserWarning, match="different numbers of episodes"):
        code, _, err = report([str(runs), "--out", str(out), *REPS, "--no-figures"], capsys)
    assert code == 0, err
    (row,) = read_csv(out / "scores.csv")
    assert row["seeds"] == "3"  # one cell, as before: the note says what it pools
    assert (
        "**Score:** The runs on env/a-v0 were evaluated on different numbers of episodes per "
        "evaluation (1 episodes: td3bc; 20 episodes: td3bc)" in (out / "report.md").read_text()
    )


def test_scores_against_different_reference_returns_are_never_pooled(tmp_path, capsys):
    """Normalised scores of one dataset measured against other reference returns (result.json
    ref_min_score / ref_max_score) are on other scales: the report refuses to pool them, naming
    both sets; runs from before the record are not compared."""
    runs = tmp_path / "runs"
    for seed, refs in ((0, (-20.0, 3234.3)), (1, (-20.0, 3234.3)), (2, None)):
        run = write_run(runs, "divo", "env/a-v0", seed, 50.0)
        if refs is not None:
            result = json.loads((run / "result.json").read_text())
            result.update(ref_min_score=refs[0], ref_max_score=refs[1], ref_source="dataset")
            (run / "result.json").write_text(json.dumps(result))
    args = [str(runs), "--out", str(tmp_path / "rep"), *REPS, "--no-figures"]
    code, _, err = report(args, capsys)
    assert code == 0, err  # one set of references, and one run without the record
    odd = write_run(runs, "td3bc", "env/a-v0", 0, 40.0)
    result = json.loads((odd / "result.json").read_text())
    result.update(ref_min_score=0.0, ref_max_score=1000.0, ref_source="dataset")
    (odd / "result.json").write_text(json.dumps(result))
    message = _one_line_error(args, capsys)
    assert "against different reference returns" in message
    assert "-20 / 3234.3: divo; 0 / 1000: td3bc" in message


def test_over_datasets_difference_never_mixes_returns_with_normalised_scores(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_grid(runs)
    for seed, (a, b) in enumerate([(-150.0, -400.0), (-170.0, -380.0), (-160.0, -390.0)]):
        write_run(runs, "divo", "own/pendulum-v0", seed, None, ret=a)
        write_run(runs, "td3bc", "own/pendulum-v0", seed, None, ret=b)
    out = tmp_path / "rep"
    code, _, err = report(
        [str(runs), "--out", str(out), *REPS, "--no-figures", "--compare", "divo", "td3bc"], capsys
    )
    assert code == 0, err
    (row,) = read_csv(out / "paired_overall.csv")
    expected = np.mean([np.mean(np.subtract(DIVO[d], TD3BC[d])) for d in DIVO])
    assert row["datasets"] == "3" and float(row["estimate"]) == pytest.approx(expected, abs=1e-3)
    # one dataset of returns alone is its own unit
    only = tmp_path / "only"
    for seed, (a, b) in enumerate([(-150.0, -400.0), (-170.0, -380.0)]):
        write_run(only, "divo", "own/pendulum-v0", seed, None, ret=a)
        write_run(only, "td3bc", "own/pendulum-v0", seed, None, ret=b)
    code, _, err = report(
        [str(only), "--out", str(out), *REPS, "--no-figures", "--compare", "divo", "td3bc"], capsys
    )
    assert code == 0, err
    (row,) = read_csv(out / "paired_overall.csv")
    assert float(row["estimate"]) == pytest.approx(230.0)


def test_a_final_score_that_is_not_the_last_logged_evaluation_is_left_out(tmp_path, capsys):
    """result.json's final score and metrics.csv's evaluation at the final step are the same
    evaluation written twice; a result.json edited by hand (or one run's result.json beside
    another's metrics.csv) is listed as failed, not tabled under ``--score final``."""
    runs = tmp_path / "runs"
    write_grid(runs)
    edited = runs / "divo" / "env-a-v0" / "seed0" / "result.json"
    record = json.loads(edited.read_text())
    edited.write_text(json.dumps({**record, "normalized_score": 99.0}))
    out = tmp_path / "rep"
    code, stdout, err = report([str(runs), "--out", str(out), *REPS, "--no-figures"], capsys)
    assert code == 0, err
    status = {(r["recipe"], r["dataset"], r["seed"]): r for r in read_csv(out / "runs.csv")}
    row = status[("divo", "env/a-v0", "0")]
    assert row["status"] == "failed"
    assert (
        "normalized_score 99 is not metrics.csv's evaluation at its final step 100" in (row["note"])
    )
    scores = {(r["recipe"], r["dataset"]): r for r in read_csv(out / "scores.csv")}
    assert scores[("divo", "env/a-v0")]["seeds"] == str(len(DIVO["env/a-v0"]) - 1)
    # the return written twice is checked the same way
    edited.write_text(json.dumps({**record, "return_mean": 7.0}))
    report([str(runs), "--out", str(out), *REPS, "--no-figures"], capsys)
    status = {(r["recipe"], r["dataset"], r["seed"]): r for r in read_csv(out / "runs.csv")}
    assert "eval_return_mean 7 is not metrics.csv's" in status[("divo", "env/a-v0", "0")]["note"]
