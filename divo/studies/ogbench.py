"""The OGBench study: DIVO against FQL, IQL, TD3+BC and uniform_weight on OGBench's singletask
manipulation tasks, with data made here by OGBench's own oracles.

Settings: ``recipes/study/ogbench.yaml``. The cells are the locomotion study's (one ordinary
``divo train`` run per recipe, task and seed, with ``dataset=ogbench``; finished cells' small
files kept under ``results``) and run on the same runner; this module adds what OGBench needs:

- the data first: each task's files are found or generated (``divo data ogbench``) in this
  process, one at a time, before any cell starts, so cells side by side never generate the same
  files at once;
- a **budget pilot** (``--pilot``): long single-seed runs of ``pilot.recipes`` on the first
  task, evaluated every ``pilot.eval_every`` steps, whose success curves the page shows; the
  grid refuses to start until ``steps`` is set from them (it is null in the shipped settings);
- a page with the pilot's curves, the grid's report (success rates with intervals, paired
  differences) and what stands between these numbers and the papers' (data regenerated, not
  hosted; ogbench 1.2 vs 1.1; the step budget).
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from divo.errors import ConfigError
from divo.studies.locomotion import (
    Cell,
    _score_declaration,
    check_kept_cells,
    check_page_grid,
    check_settings,
    grid_options,
    is_done,
    report_lines,
    run_cell,
    study_cells,
    time_left,
)
from divo.studies.runner import (
    check_data_as_kept,
    page_settings,
    run_cells,
    study_arguments,
    study_settings,
)

STUDY_CONFIG = "study/ogbench.yaml"
NAME = "divo study ogbench"


def study_config(overrides: Sequence[str] = (), config: str | Path | None = None) -> Any:
    """``recipes/study/ogbench.yaml``, then the YAML file ``config``, then ``overrides``."""
    cfg = study_settings(STUDY_CONFIG, overrides, config)
    cfg._source = str(config) if config is not None else None
    return cfg


def pilot_config(cfg: Any) -> Any:
    """The pilot as a study of its own: its recipes on one task and seed, its steps, its own
    folders under ``results`` and ``work_dir``."""
    pilot = cfg.pilot
    derived = OmegaConf.merge(
        cfg,
        {
            "recipes": list(pilot.recipes),
            "extra_recipes": [],
            "datasets": [str(pilot.dataset)],
            "seeds": [int(pilot.seed)],
            "steps": int(pilot.steps),
            "eval_every": int(pilot.eval_every),
            "results": str(Path(cfg.results) / "pilot"),
            "work_dir": str(Path(cfg.work_dir) / "pilot"),
        },
    )
    derived._source = cfg.get("_source")
    return derived


def grid_cells(cfg: Any) -> list[Cell]:
    """The grid's cells; refused while ``steps`` has not been chosen from the pilot."""
    if cfg.steps is None:
        raise ConfigError(
            "the grid's step budget is not chosen yet (steps: null in recipes/study/ogbench.yaml): "
            f"run the pilot first (`{NAME} --pilot`), read its curves on the page, then give "
            f"`{NAME} steps=N` where the success rates have clearly left zero"
        )
    return study_cells(cfg)


def prepare_data(cfg: Any, datasets: Sequence[str], log=print, workers: int = 1) -> None:
    """Find or generate each task's files here, one at a time, before any cell starts (a
    generation on ``workers`` processes: the study's ``jobs``, whose cores wait for it)."""
    from divo.data.ogbench import find_files, parse_id

    seen = set()
    for dataset in datasets:
        ident = parse_id(str(dataset))
        if ident.dataset_name in seen:
            continue
        seen.add(ident.dataset_name)
        found = find_files(ident, generate=True, workers=workers)
        log(f"{NAME}: data {ident.dataset_name}: {found.describe()}")


def run(
    cfg: Any,
    *,
    pilot: bool,
    jobs: int | None = None,
    dry_run: bool = False,
    log=print,
    page_cfg: Any = None,
):
    """Run the pilot's or the grid's cells not yet done, rewriting the page after each (from
    ``page_cfg``: the whole study's settings when ``cfg`` runs part of its grid)."""
    page_cfg = cfg if page_cfg is None else page_cfg
    if not pilot:
        check_page_grid(cfg, page_cfg, log)
    target = pilot_config(cfg) if pilot else cfg
    cells = study_cells(target) if pilot else grid_cells(cfg)
    todo = [c for c in cells if not is_done(c, target)]
    jobs = int(jobs or cfg.jobs)
    what = "pilot" if pilot else "grid"
    log(f"{NAME}: {what}: {len(cells) - len(todo)} of {len(cells)} cells done, {len(todo)} to run")
    if dry_run:
        from divo.studies.locomotion import cell_command

        for cell in todo:
            log("  " + " ".join(["divo", *cell_command(cell, target)[3:]]))
        return 0
    prepare_data(cfg, [c.dataset for c in todo], log, workers=jobs)
    check_data_as_kept(Path(target.results), todo, log=log)
    check_settings(cells, target, log)

    def after_each() -> None:
        write_page(page_cfg, log)
        estimate = time_left(target, jobs)
        if estimate:
            log("  " + estimate)

    failed = run_cells(todo, lambda cell: run_cell(cell, target), after_each, jobs=jobs, log=log)
    write_page(page_cfg, log)
    return failed


def _curve(folder: Path) -> list[tuple[int, float, str]]:
    """(step, success %, the critic check) of each evaluation in a run's metrics.csv; the
    check is Q minus the return that followed on the policy's own steps: exact (over the steps
    whose return is known: the episodes that succeeded), and ">= x", the one-sided bound over
    every step; "" when the run logged neither."""
    path = folder / "metrics.csv"
    if not path.is_file():
        return []
    points = []
    with path.open() as f:
        for row in csv.DictReader(f):
            score = row.get("normalized_score") or ""
            if score.strip():
                exact, bound = row.get("eval_q_bias") or "", row.get("eval_q_bias_min") or ""
                parts = [f"{float(exact):+.1f}"] if exact.strip() else []
                parts += [f">= {float(bound):+.1f}"] if bound.strip() else []
                check = "; ".join(parts)
                points.append((int(row["step"]), float(score), check))
    return points


def _pilot_section(cfg: Any) -> list[str]:
    target = pilot_config(cfg)
    pilot = cfg.pilot
    curves = {}
    for cell in study_cells(target):
        kept = Path(target.results) / "runs" / cell.rel
        live = Path(target.work_dir) / cell.rel  # a pilot still running: its curve so far
        # the longer curve: a finished pilot's kept files, else the live run's, or the
        # snapshot of an unfinished one kept so that the page regenerates from the kept files
        curves[cell.recipe] = max(_curve(kept), _curve(live), key=len)
    lines = [
        "## Budget pilot",
        "",
        f"Seed {pilot.seed} of {', '.join(f'`{r}`' for r in pilot.recipes)} on "
        f"`{pilot.dataset}`, {int(pilot.steps):,} steps, evaluated every "
        f"{int(pilot.eval_every):,} steps (50 episodes; success in percent). The grid's step "
        "budget is chosen where these curves have clearly left zero, before any grid cell runs "
        f"(`{NAME} --pilot` runs or resumes them). *Q - G*: the critic check on the evaluation "
        "policy's own steps, the critic's min Q minus the discounted return that followed "
        '(exact over the episodes that succeeded, whose return is known; ">=": a lower bound over '
        "every step, the failed episodes having run into their time limit; docs/runs.md, "
        '"The critic check"); blank where the run logged none.',
        "",
    ]
    steps = sorted({s for points in curves.values() for s, _, _ in points})
    if not steps:
        return [*lines, "No pilot evaluation yet.", ""]
    names = list(curves)
    lines += [
        "| step | " + " | ".join(names) + " | " + " | ".join(f"{r}: Q - G" for r in names) + " |",
        "|---|" + "---|" * (2 * len(names)),
    ]
    for step in steps:
        found = {r: {s: (v, c) for s, v, c in curves[r]}.get(step) for r in names}
        scores = [f"{found[r][0]:.0f}" if found[r] else "" for r in names]
        checks = [found[r][1] if found[r] else "" for r in names]
        lines.append(f"| {step:,} | " + " | ".join(scores + checks) + " |")
    unfinished = [
        f"`{r}` up to step {curves[r][-1][0]:,}"
        for r in names
        if curves[r] and curves[r][-1][0] < int(pilot.steps)
    ]
    if unfinished:
        lines += [
            "",
            f"Unfinished: {', '.join(unfinished)} of {int(pilot.steps):,} "
            f"(`{NAME} --pilot` resumes them).",
        ]
    chosen = cfg.steps
    lines += [
        "",
        f"**Grid budget: {chosen:,} steps.**" if chosen else "**Grid budget: not chosen yet.**",
        "",
    ]
    return lines


def write_page(cfg: Any, log=print) -> Path:
    """The study's page: the data's provenance, the pilot, the grid's report."""
    page = Path(cfg.page)
    done: list[Cell] = []
    total = None
    if cfg.steps is not None:
        cells = study_cells(cfg)
        done = [c for c in cells if is_done(c, cfg)]
        total = len(cells)
    source = cfg.get("_source")
    command = NAME + (f" --config {source}" if source else "")
    lines = [
        "# OGBench singletask: DIVO against FQL, IQL, TD3+BC and uniform_weight",
        "",
        f"Made by `{command}` (settings: `recipes/{STUDY_CONFIG}`"
        + (f" then `{source}`" if source else "")
        + "); rewritten after every finished cell. Recipes "
        + ", ".join(f"`{r}`" for r in cfg.recipes)
        + f"; tasks {', '.join(f'`{d}`' for d in cfg.datasets)}; seeds "
        + ", ".join(str(s) for s in cfg.seeds)
        + "; 50 evaluation episodes, the success rate (percent) as the score.",
        "",
        "**What these numbers are not.** The data are generated here by OGBench's own oracles "
        "with its generation settings (`divo data ogbench`, [OGBench data](ogbench.md)), not "
        "OGBench's hosted files: the same distribution, other random draws and MuJoCo build. "
        "Rewards follow ogbench 1.2.2 (reward and success on the state s; FQL's paper pinned "
        "1.1.0, on s'). The budget is a CPU's: "
        + (
            f"{int(cfg.steps):,} steps evaluated every {int(cfg.eval_every):,}"
            if cfg.steps is not None
            else "chosen by the pilot"
        )
        + ", where the papers train 1M steps and evaluate every 100,000. Each task is its "
        "environment's default singletask alone, where the papers average five tasks per "
        "environment. The weights on Q of `divo` (and its ablations) and `td3bc` were chosen "
        "here, on design data (the notes). Set beside published tables, these numbers show "
        "where the recipes stand relative to each other under those differences, not a "
        "reproduction of the tables.",
        "",
        f"**Status:** grid {len(done)} of {total} cells finished."
        if total is not None
        else "**Status:** the grid has not started: its step budget comes from the pilot.",
        "",
        _score_declaration(cfg),
        "",
    ]
    notes = Path(cfg.notes) if cfg.get("notes") else None
    if notes is not None and notes.is_file():
        lines += [notes.read_text().strip(), ""]
    lines += _pilot_section(cfg)
    if done:
        lines += report_lines(cfg, done, page)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines).rstrip() + "\n")
    log(f"{NAME}: page -> {page}")
    return page


def study_command(argv: Sequence[str]) -> int:
    """``divo study ogbench [key=value ...] [--pilot] [--config FILE] [--jobs N]
    [--page-only] [--dry-run]``."""

    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--pilot", action="store_true", help="run (or resume) the budget pilot's cells"
        )
        grid_options(parser)

    ns = study_arguments(
        NAME,
        "DIVO against FQL, IQL, TD3+BC and uniform_weight on OGBench's singletask tasks, on data "
        "made by OGBench's oracles; resumable, rewrites its page after every cell.",
        argv,
        STUDY_CONFIG,
        options,
    )
    cfg = study_config(ns.overrides, ns.config)
    page_cfg = page_settings(cfg, ns.overrides, lambda rest: study_config(rest, ns.config))
    if ns.page_only:
        if page_cfg.steps is not None:
            check_kept_cells(page_cfg)
        write_page(page_cfg)
        return 0
    return 1 if run(cfg, pilot=ns.pilot, jobs=ns.jobs, dry_run=ns.dry_run, page_cfg=page_cfg) else 0
