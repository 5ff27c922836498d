"""The locomotion study: DIVO against its ablations and TD3+BC on MuJoCo datasets, over seeds.

``divo study locomotion [key=value ...] [--config FILE] [--jobs N] [--page-only] [--dry-run]``.
Settings: ``recipes/study/locomotion.yaml`` (recipes, datasets, seeds, training steps, extra
overrides), then a YAML file of a variant (``--config``), then ``key=value``.

Every (recipe, dataset, seed) cell is one ordinary ``divo train`` run, in a subprocess of its
own (one torch thread; ``--jobs`` of them side by side). The study is made to span sittings:

- a cell is *done* when ``<results>/runs/<recipe>/<dataset>/seed<k>/result.json`` exists; its
  small outputs (result.json, metrics.csv, config.yaml, train.log) are copied there when it
  finishes, so they can be committed and a fresh clone skips the cell;
- a cell whose full run directory (under ``work_dir``) holds a checkpoint resumes from it
  (``divo train <run dir>``) instead of starting again; an interrupted study loses at most
  ``checkpoint_every`` steps per running cell;
- after every finished cell ``divo report`` is rerun over ``<results>/runs`` (tables, 95%
  bootstrap CIs, paired differences, learning curves, training diagnostics) and the results
  page is rewritten, with the hand-written notes file included;
- a recipe listed under ``deployments`` has its final policy evaluated again with other
  settings of the deployed policy (``divo evaluate --set``, e.g. IDQL's max-Q pick), kept as
  ``deploy-<name>.json`` beside the cell's result and tabled on the page against the policy as
  trained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from divo.studies.runner import run_cells, study_arguments, study_settings

STUDY_CONFIG = "study/locomotion.yaml"
KEPT_FILES = ("result.json", "metrics.csv", "config.yaml", "train.log")


def study_config(overrides: Sequence[str] = (), config: str | Path | None = None) -> Any:
    """The study's settings: ``recipes/study/locomotion.yaml``, then the YAML file ``config``
    (a variant of the study: other overrides, results folder, ...), then dot-list
    ``overrides``. Unknown keys are refused."""
    cfg = study_settings(STUDY_CONFIG, overrides, config)
    # where the settings came from, for the page's header and its command (not a setting)
    cfg._source = str(config) if config is not None else None
    return cfg


@dataclass(frozen=True)
class Cell:
    recipe: str
    dataset: str
    seed: int

    @property
    def rel(self) -> Path:
        return Path(self.recipe) / self.dataset.replace("/", "-") / f"seed{self.seed}"

    def __str__(self) -> str:
        return f"{self.recipe} on {self.dataset} seed {self.seed}"


def study_recipes(cfg: Any) -> list[str]:
    """``recipes`` then ``extra_recipes`` (the baselines that run once the main grid is done)."""
    return [str(r) for r in (*cfg.recipes, *(cfg.get("extra_recipes") or []))]


def study_cells(cfg: Any) -> list[Cell]:
    """Seed-major order: every recipe and dataset gets its first seed before any gets a second,
    so a study stopped half-way still compares all of them. The cells of ``extra_recipes``
    follow every cell of ``recipes``, in the same order."""
    groups = [list(cfg.recipes), list(cfg.get("extra_recipes") or [])]
    return [
        Cell(str(recipe), str(dataset), int(seed))
        for group in groups
        for seed in cfg.seeds
        for dataset in cfg.datasets
        for recipe in group
    ]


def is_done(cell: Cell, cfg: Any) -> bool:
    """The cell's kept result.json exists and was trained for the study's ``steps`` (a study
    run again with other steps retrains it: give such a variant a ``results`` folder of its
    own to keep both)."""
    path = Path(cfg.results) / "runs" / cell.rel / "result.json"
    if not path.is_file():
        return False
    try:
        return int(json.loads(path.read_text()).get("steps", -1)) == int(cfg.steps)
    except (ValueError, TypeError, AttributeError):
        return False


def cell_command(cell: Cell, cfg: Any) -> list[str]:
    """The ``divo train`` command line of a cell: a resume when its run holds a checkpoint."""
    run_dir = Path(cfg.work_dir) / cell.rel
    divo = [sys.executable, "-m", "divo.cli", "train"]
    if any((run_dir / "checkpoints").glob("*.pt")):
        return [*divo, str(run_dir), "--quiet"]
    return [
        *divo,
        cell.recipe,
        f"dataset.id={cell.dataset}",
        f"seed={cell.seed}",
        f"train.steps={cfg.steps}",
        f"train.eval_every={cfg.eval_every}",
        f"train.checkpoint_every={cfg.checkpoint_every}",
        "train.threads=1",
        *[str(o) for o in cfg.overrides],
        f"hydra.run.dir={run_dir}",
        "--quiet",
    ]


def deployments(cell: Cell, cfg: Any) -> dict[str, list[str]]:
    """The cell's recipe's deployment variants: name -> ``--set`` items (``deployments``)."""
    variants = (cfg.get("deployments") or {}).get(cell.recipe) or {}
    return {str(name): [str(item) for item in items] for name, items in variants.items()}


def deployment_file(cell: Cell, cfg: Any, name: str) -> Path:
    return Path(cfg.results) / "runs" / cell.rel / f"deploy-{name}.json"


def evaluate_deployments(cell: Cell, cfg: Any) -> list[str]:
    """Evaluate the cell's final policy (``<work_dir>/<cell>/policy.pt``) under each of its
    recipe's deployment variants not yet kept, with the episodes and episode seeds of its final
    training evaluation; returns one line per variant evaluated (or failed)."""
    run_dir = Path(cfg.work_dir) / cell.rel
    kept = Path(cfg.results) / "runs" / cell.rel
    lines = []
    for name, items in deployments(cell, cfg).items():
        out = deployment_file(cell, cfg, name)
        if out.is_file() or not (run_dir / "policy.pt").is_file():
            continue
        result = json.loads((kept / "result.json").read_text())
        command = [sys.executable, "-m", "divo.cli", "evaluate", str(run_dir), "--json"]
        command += ["--episodes", str(result.get("episodes", 10)), "--seed", str(cell.seed + 100)]
        command += [arg for item in items for arg in ("--set", item)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip().splitlines()
            lines.append(f"{cell} deployed as {name}: FAILED: {err[-1] if err else '?'}")
            continue
        evaluated = json.loads(proc.stdout)
        evaluated["source"] = str(run_dir / "policy.pt")
        out.write_text(json.dumps(evaluated, indent=2) + "\n")
        lines.append(
            f"{cell} deployed as {name} ({' '.join(items)}): normalized score "
            f"{evaluated.get('normalized_score', float('nan')):.1f}"
        )
    return lines


def run_cell(cell: Cell, cfg: Any) -> tuple[bool, str]:
    """Train (or resume) one cell; on success copy its small outputs into the results folder.
    Returns (finished, a one-line account)."""
    run_dir = Path(cfg.work_dir) / cell.rel
    if run_dir.exists() and not any((run_dir / "checkpoints").glob("*.pt")):
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to resume
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cell_command(cell, cfg), capture_output=True, text=True, env=env)
    minutes = (time.perf_counter() - start) / 60
    if proc.returncode != 0 or not (run_dir / "result.json").is_file():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return False, f"{cell}: FAILED after {minutes:.1f} min: {lines[-1] if lines else '?'}"
    kept = Path(cfg.results) / "runs" / cell.rel
    kept.mkdir(parents=True, exist_ok=True)
    for name in KEPT_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, kept / name)
    result = json.loads((run_dir / "result.json").read_text())
    # the kept copy is committed: the run's folder as the study named it, not this machine's path
    result["run_dir"] = str(run_dir)
    (kept / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    score = result.get("normalized_score")
    score_txt = f"normalized score {score:.1f}" if score is not None else "no score"
    line = f"{cell}: {score_txt} after {result.get('steps')} steps ({minutes:.1f} min)"
    return True, "\n  ".join([line, *evaluate_deployments(cell, cfg)])


def time_left(cfg: Any, jobs: int) -> str:
    """``N of M cells done; about X h left at jobs=J``: each cell still to run costs the mean
    wall-clock time of its recipe's finished cells (of all finished cells for a recipe with
    none yet), spread over ``jobs``; empty before any cell has finished."""
    cells = study_cells(cfg)
    minutes: dict[str, list[float]] = {}
    todo = []
    for cell in cells:
        if not is_done(cell, cfg):
            todo.append(cell)
            continue
        path = Path(cfg.results) / "runs" / cell.rel / "result.json"
        seconds = json.loads(path.read_text()).get("wall_clock_s")
        if isinstance(seconds, (int, float)):
            minutes.setdefault(cell.recipe, []).append(seconds / 60)
    if not minutes:
        return ""
    overall = [m for ms in minutes.values() for m in ms]
    mean_all = sum(overall) / len(overall)
    left = sum(
        sum(minutes[c.recipe]) / len(minutes[c.recipe]) if c.recipe in minutes else mean_all
        for c in todo
    ) / max(1, jobs)
    unseen = sorted({c.recipe for c in todo if c.recipe not in minutes})
    guess = f"; {', '.join(unseen)} at the mean of all, none finished yet" if unseen else ""
    return (
        f"{len(cells) - len(todo)} of {len(cells)} cells done; about {left / 60:.1f} h left "
        f"at jobs={jobs} (each recipe's mean cell time so far{guess})"
    )


def write_page(cfg: Any, log=print) -> Path:
    """Rerun ``divo report`` over the finished cells and write the results page."""
    from divo.errors import ConfigError
    from divo.report import make_report

    results = Path(cfg.results)
    page = Path(cfg.page)
    cells = study_cells(cfg)
    done = [c for c in cells if is_done(c, cfg)]
    report_dir = results / "report"
    rel_report = os.path.relpath(report_dir, page.parent)
    body: list[str] = []
    finished = {c.recipe for c in done}  # the report compares recipes with finished cells only
    compare = [str(c) for c in cfg.compare if str(c) in finished]
    compare = compare if len(compare) > 1 else []
    if done:
        try:
            make_report(
                [results / "runs"],
                report_dir,
                compare=compare or None,
                command=f"divo report {results / 'runs'}"
                + (f" --compare {' '.join(compare)}" if compare else "")
                + f" --out {report_dir}",
            )
        except ConfigError as exc:
            body = [f"No report yet: {exc}"]
        else:
            text = (report_dir / "report.md").read_text().splitlines()
            for line in text[1:]:  # the report without its title, links into report/
                if line.startswith("## "):
                    line = "#" + line
                body.append(_relink(line, rel_report))
        body += _robustness_section(cfg, results, compare)
        body += _deployment_section(cfg, done)
    else:
        body = ["No cell has finished yet."]
    notes = Path(cfg.notes) if cfg.get("notes") else None  # null: a page without notes
    source = cfg.get("_source")
    command = "divo study locomotion" + (f" --config {source}" if source else "")
    settings = f"`recipes/{STUDY_CONFIG}`" + (f" then `{source}`" if source else "")
    lines = [
        "# Results: what each part of DIVO buys on MuJoCo data",
        "",
        f"Made by `{command}` (settings: {settings}); this page is "
        "rewritten after every finished cell. Recipes "
        + ", ".join(f"`{r}`" for r in study_recipes(cfg))
        + f"; datasets {', '.join(f'`{d}`' for d in cfg.datasets)}; seeds "
        f"{', '.join(str(s) for s in cfg.seeds)}; {cfg.steps:,} training steps per run, "
        f"evaluated every {cfg.eval_every:,} steps (10 episodes)"
        + (
            f"; extra overrides {' '.join(f'`{o}`' for o in cfg.overrides)}"
            if cfg.overrides
            else ""
        )
        + ".",
        "",
        f"**Status: {len(done)} of {len(cells)} cells finished.** Each finished run's "
        f"result.json, metrics.csv, config.yaml and train.log are under "
        f"`{results / 'runs'}`; `{command}` runs the rest (`--jobs 2` on two cores) "
        "and skips what is there.",
        "",
    ]
    if notes is not None and notes.is_file():
        lines += [notes.read_text().strip(), ""]
    lines += body
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines).rstrip() + "\n")
    log(f"divo study locomotion: {len(done)}/{len(cells)} cells finished -> {page}")
    return page


ROBUST_SECTIONS = (
    "## Mean normalised score",
    "## Aggregate over datasets",
    "## Paired differences",
)


def _robustness_section(cfg: Any, results: Path, compare: list[str]) -> list[str]:
    """The score, aggregate and paired tables again under ``robust_score`` (e.g. ``last:3``, the
    mean of each run's last evaluations), from a report of their own in ``report-<score>``."""
    from divo.errors import ConfigError
    from divo.report import make_report

    score = cfg.get("robust_score")
    if not score:
        return []
    out = results / f"report-{str(score).replace(':', '')}"
    try:
        with warnings.catch_warnings():  # the few-seeds warning is on the page already
            warnings.simplefilter("ignore")
            make_report(
                [results / "runs"],
                out,
                compare=compare or None,
                figures=False,
                score=str(score),
                command=f"divo report {results / 'runs'}"
                + (f" --compare {' '.join(compare)}" if compare else "")
                + f" --score {score} --no-figures --out {out}",
            )
    except ConfigError as exc:
        return ["", f"## Robustness: `--score {score}`", "", f"No report yet: {exc}"]
    lines = ["", f"## Robustness: the same tables with `--score {score}`", ""]
    lines += [
        "One evaluation is 10 episodes of one policy, and a policy's score swings from one "
        "evaluation to the next; averaging each run's last evaluations (TD3+BC's protocol averages "
        f"its final 10) damps that. Scored by `--score {score}`:",
        "",
    ]
    keep = False
    for line in (out / "report.md").read_text().splitlines():
        if line.startswith("## "):
            keep = line.startswith(ROBUST_SECTIONS)
            line = "#" + line
        if keep:
            lines.append(line)
    return lines


def _deployment_section(cfg: Any, done: list[Cell]) -> list[str]:
    """Per recipe with deployment variants: per dataset, the final score as trained and under
    each variant, over the same seeds, and their mean paired difference (min, max); beside
    them the first ``compare`` recipe (the study's subject) on those seeds, and the variant's
    paired difference from it, so a re-deployed baseline is read against the subject too."""
    lines: list[str] = []
    compare = [str(r) for r in (cfg.get("compare") or [])]
    for recipe, variants in (cfg.get("deployments") or {}).items():
        cells = [c for c in done if c.recipe == str(recipe)]
        if not cells or not variants:
            continue
        subject = compare[0] if compare and compare[0] != str(recipe) else None
        head = "| dataset | variant | seeds | as trained | variant | variant - as trained "
        head += "(min, max) |"
        rule = "|---|---|---|---|---|---|"
        if subject:  # the study's subject on the same seeds, paired with the variant
            head += f" `{subject}` | variant - `{subject}` (min, max) |"
            rule += "---|---|"
        lines += [
            "",
            f"## `{recipe}` deployed otherwise",
            "",
            "The same trained models, their final policy evaluated again (`divo evaluate --set`, "
            "10 episodes with the final evaluation's episode seeds) with other settings of the "
            "deployed policy"
            + (f"; beside them `{subject}`'s final score on the same seeds:" if subject else ":"),
            "",
            head,
            rule,
        ]
        for name, items in variants.items():
            for dataset in cfg.datasets:
                pairs: list[tuple[float, float]] = []
                against: list[tuple[float, float]] = []  # (subject's score, variant's)
                for cell in cells:
                    path = deployment_file(cell, cfg, str(name))
                    if cell.dataset != str(dataset) or not path.is_file():
                        continue
                    trained = _final_score(cell, cfg)
                    variant = json.loads(path.read_text()).get("normalized_score")
                    if trained is None or variant is None:
                        continue
                    pairs.append((trained, float(variant)))
                    same_seed = Cell(subject, cell.dataset, cell.seed) if subject else None
                    theirs = _final_score(same_seed, cfg) if same_seed else None
                    if theirs is not None:
                        against.append((theirs, float(variant)))
                if not pairs:
                    continue
                row = (
                    f"| {dataset} | `{' '.join(str(i) for i in items)}` | {len(pairs)} | "
                    f"{_mean(t for t, _ in pairs):.1f} | {_mean(v for _, v in pairs):.1f} | "
                    f"{_spread([v - t for t, v in pairs])} |"
                )
                if subject:
                    fewer = f" ({len(against)} seeds)" if len(against) < len(pairs) else ""
                    row += (
                        f" {_mean(s for s, _ in against):.1f}{fewer} | "
                        f"{_spread([v - s for s, v in against])} |"
                        if against
                        else " n/a | n/a |"
                    )
                lines.append(row)
    return lines


def _final_score(cell: Cell, cfg: Any) -> float | None:
    """A finished cell's kept final normalised score; None when it has none (yet)."""
    path = Path(cfg.results) / "runs" / cell.rel / "result.json"
    if not path.is_file():
        return None
    score = json.loads(path.read_text()).get("normalized_score")
    return None if score is None else float(score)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _spread(diffs: list[float]) -> str:
    """``+mean (+min, +max)`` of paired differences."""
    return f"{_mean(diffs):+.1f} ({min(diffs):+.1f}, {max(diffs):+.1f})"


def _relink(line: str, prefix: str) -> str:
    """Point the report's relative links (``](file)``) into its folder."""
    out, rest = [], line
    while "](" in rest:
        head, tail = rest.split("](", 1)
        out.append(head + "](")
        if not tail.startswith(("http", "#", "/")):
            out.append(prefix + "/")
        rest = tail
    out.append(rest)
    return "".join(out)


def run_study(cfg: Any, jobs: int | None = None, dry_run: bool = False, log=print) -> int:
    """Run every cell not yet done (``jobs`` at a time), rewriting the page after each.
    Returns the number of cells that failed."""
    cells = study_cells(cfg)
    todo = [c for c in cells if not is_done(c, cfg)]
    jobs = int(jobs or cfg.jobs)
    estimate = time_left(cfg, jobs)
    log(
        f"divo study locomotion: {len(cells) - len(todo)} of {len(cells)} cells done, "
        f"{len(todo)} to run, {jobs} at a time"
        + (f" ({estimate.split('; ', 1)[1]})" if estimate else "")
    )
    if dry_run:
        for cell in todo:
            log("  " + " ".join(cell_command(cell, cfg)[2:]))
        return 0
    backfilled = [line for c in cells if c not in todo for line in evaluate_deployments(c, cfg)]
    for line in backfilled:  # cells finished before their recipe had deployment variants
        log("  " + line)
    if backfilled:
        write_page(cfg, log)

    def run_one(cell: Cell) -> tuple[bool, str]:
        log(f"  started {cell}")
        return run_cell(cell, cfg)

    def after_each() -> None:
        write_page(cfg, log)
        estimate = time_left(cfg, jobs)
        if estimate:
            log("  " + estimate)

    failed = run_cells(todo, run_one, after_each, jobs=jobs, log=log)
    write_page(cfg, log)
    return failed


def study_command(argv: Sequence[str]) -> int:
    """``divo study locomotion [key=value ...] [--config FILE] [--jobs N] [--page-only]
    [--dry-run]``."""

    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--config", default=None, help="a YAML file of settings merged over the shipped ones"
        )
        parser.add_argument("--jobs", type=int, default=None, help="cells side by side")
        parser.add_argument("--dry-run", action="store_true", help="list the cells' commands")

    ns = study_arguments(
        "divo study locomotion",
        "DIVO, TD3+BC and DIVO's ablations over MuJoCo datasets and seeds; resumable, rewrites "
        "the results page after every cell.",
        argv,
        STUDY_CONFIG,
        options,
    )
    cfg = study_config(ns.overrides, ns.config)
    if ns.page_only:
        write_page(cfg)
        return 0
    return 1 if run_study(cfg, ns.jobs, ns.dry_run) else 0
