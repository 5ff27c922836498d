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
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from divo.errors import ConfigError, first_few
from divo.files import write_json_atomic
from divo.studies.runner import (
    check_data_as_kept,
    check_settings_as_kept,
    page_settings,
    run_cells,
    study_arguments,
    study_settings,
)

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
    """The cell's kept result.json exists, is the cell's own (its recipe, dataset and seed) and
    was trained for the study's ``steps`` (a study run again with other steps retrains it: give
    such a variant a ``results`` folder of its own to keep both). A kept result.json of another
    cell (a folder copied or renamed by hand) is refused: counted as done, it would stand in
    the tables for a run that never happened."""
    path = Path(cfg.results) / "runs" / cell.rel / "result.json"
    if not path.is_file():
        return False
    try:
        result = json.loads(path.read_text())
        steps = int(result.get("steps", -1))
    except (ValueError, TypeError, AttributeError):
        return False
    expected = {"recipe": cell.recipe, "dataset_id": cell.dataset, "seed": cell.seed}
    wrong = [  # a field the file does not record is not held against it
        f"{k} {result[k]!r} (the cell's: {v!r})"
        for k, v in expected.items()
        if result.get(k) is not None and result[k] != v
    ]
    if wrong:
        raise ConfigError(
            f"{path} is not this cell's result: it records {', '.join(wrong)}. A kept folder "
            f"holds the run it is named for ({cell.rel}); move the file back where it belongs "
            "or delete that folder to train the cell"
        )
    return steps == int(cfg.steps)


def cell_schedule(cfg: Any) -> list[str]:
    """The study's ``train.*`` settings of every cell (a resume passes them again)."""
    return [
        f"train.steps={cfg.steps}",
        f"train.eval_every={cfg.eval_every}",
        f"train.checkpoint_every={cfg.checkpoint_every}",
        "train.threads=1",
    ]


def cell_overrides(cell: Cell, cfg: Any) -> list[str]:
    """The ``divo train <recipe>`` overrides of a cell (its run directory aside)."""
    return [
        f"dataset.id={cell.dataset}",
        f"seed={cell.seed}",
        *cell_schedule(cfg),
        *[str(o) for o in cfg.overrides],
    ]


def cell_command(cell: Cell, cfg: Any) -> list[str]:
    """The ``divo train`` command line of a cell: a resume when its run holds a checkpoint
    (with the study's ``train.*`` settings, so a study whose ``steps`` grew extends it)."""
    run_dir = Path(cfg.work_dir) / cell.rel
    divo = [sys.executable, "-m", "divo.cli", "train"]
    if any((run_dir / "checkpoints").glob("*.pt")):
        return [*divo, str(run_dir), *cell_schedule(cfg), "--quiet"]
    return [*divo, cell.recipe, *cell_overrides(cell, cfg), f"hydra.run.dir={run_dir}", "--quiet"]


def check_settings(cells: Sequence[Cell], cfg: Any, log=print) -> None:
    """Refuse to go on when a kept cell or a started run of ``cells`` ran with other settings
    than the study now gives it (:func:`divo.studies.runner.check_settings_as_kept`)."""
    check_settings_as_kept(
        cells,
        lambda cell: cell_overrides(cell, cfg),
        lambda cell: Path(cfg.results) / "runs" / cell.rel,
        lambda cell: Path(cfg.work_dir) / cell.rel,
        log=log,
    )


def check_page_grid(cfg: Any, page_cfg: Any, log=print) -> None:
    """Before a run: a kept folder of the page's grid holding another cell's result stops it
    now (:func:`is_done`), not after its first cell; and the cells it picks outside the page's
    grid (``seeds=[3,4]``, say) are named: they train and are kept, and stay off the page until
    the study's settings declare them."""
    if page_cfg.get("steps") is None:  # the OGBench grid before its budget is chosen
        return
    page_cells = study_cells(page_cfg)
    for cell in page_cells:
        is_done(cell, page_cfg)
    if page_cfg is cfg:
        return
    on_page = set(page_cells)
    off = [c for c in study_cells(cfg) if c not in on_page]
    if off:
        log(
            f"  {len(off)} cell(s) of this run are not in the grid of the study's page "
            f"({first_few([str(c) for c in off])}): kept under {cfg.results}, tabled once the "
            "study's settings declare them (recipes/study/..., or --config FILE)"
        )


def check_kept_cells(cfg: Any, log=print) -> None:
    """Before a page is written from kept cells alone (``--page-only``): every kept cell of
    the grid is its own cell's run (:func:`is_done`), trained for the ``steps`` the page states
    and with the settings it states (:func:`check_settings`). A page whose header states
    settings its tables' cells never ran is refused, and the page is left as it was."""
    cells = study_cells(cfg)
    kept = [c for c in cells if (Path(cfg.results) / "runs" / c.rel / "result.json").is_file()]
    other = [c for c in kept if not is_done(c, cfg)]
    if other:
        raise ConfigError(
            f"{len(other)} kept cell(s) were not trained for steps={cfg.steps} (or their "
            f"result.json is unreadable): {first_few([str(c.rel) for c in other])}; a page "
            "with these settings would leave them out while stating the grid. Give the steps "
            "they ran, or give a variant of the study its own `results` folder (--config FILE)"
        )
    check_settings(kept, cfg, log)


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
        if name != "result.json" and (run_dir / name).is_file():
            shutil.copy2(run_dir / name, kept / name)
    result = json.loads((run_dir / "result.json").read_text())
    # the kept copy is committed: the run's folder as the study named it, not this machine's path
    result["run_dir"] = str(run_dir)
    # last and whole: a cell counts as done by its result.json, so an interrupted copy leaves
    # no done cell without its other files
    write_json_atomic(kept / "result.json", result, indent=2)
    score = result.get("normalized_score")
    score_txt = f"normalized score {score:.1f}" if score is not None else "no score"
    line = f"{cell}: {score_txt} after {result.get('steps')} steps ({minutes:.1f} min)"
    return True, "\n  ".join([line, *evaluate_deployments(cell, cfg)])


# train.log lines (divo.agents.runs): the run's start, its evaluations, its ETA
_LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]\[divo\.train\]\[\w+\] - (.*)$")
_STARTED = re.compile(r"^training (\d+) steps on ")
_EVALUATED = re.compile(r"^step (\d+): normalized score ")
_ETA = re.compile(r"about ([\d.]+) (s|min|h) to go")
_UNIT_MINUTES = {"s": 1 / 60, "min": 1.0, "h": 60.0}


def live_cell_minutes(run_dir: Path, now: float | None = None) -> tuple[float, float] | None:
    """(projected minutes of the whole run, minutes left now) of a run in progress, read from
    its train.log: the pace between its evaluations since the process started (the latest
    ``training N steps`` line), or before a second evaluation the run's own ETA line. None when
    the log says nothing yet, the run has finished (its result.json exists) or the log went
    quiet for longer than its projection (the process is gone)."""
    log = Path(run_dir) / "train.log"
    if (Path(run_dir) / "result.json").is_file() or not log.is_file():
        return None
    started = steps = None
    evaluations: list[tuple[float, int]] = []
    eta: tuple[float, float] | None = None  # (time, minutes to go then)
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        match = _LOG_LINE.match(line)
        if not match:
            continue
        when = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
        message = match.group(2)
        if m := _STARTED.match(message):
            started, steps, evaluations, eta = when, int(m.group(1)), [], None
        elif started is None:
            continue
        elif m := _EVALUATED.match(message):
            evaluations.append((when, int(m.group(1))))
        elif m := _ETA.search(message):
            eta = (when, float(m.group(1)) * _UNIT_MINUTES[m.group(2)])
    if started is None:
        return None
    if len(evaluations) >= 2 and evaluations[-1][1] > evaluations[0][1]:
        (t0, k0), (t1, k1) = evaluations[0], evaluations[-1]
        per_step = (t1 - t0) / 60 / (k1 - k0)
        when, left_then, total = t1, (steps - k1) * per_step, (t0 - started) / 60 + steps * per_step
    elif eta is not None:
        when, left_then = eta
        total = (when - started) / 60 + left_then
    else:
        return None
    since = ((time.time() if now is None else now) - when) / 60
    if since > left_then + 30:  # quiet past its end: not running
        return None
    return total, max(left_then - since, 0.0)


def time_left(cfg: Any, jobs: int) -> str:
    """``N of M cells done; about X h left at jobs=J``: each cell still to run costs the mean
    wall-clock time of the kept cells of its recipe on its dataset (any seed: a run narrowed to
    one seed's column still learns from the other columns), else of its recipe on any dataset;
    a cell in progress costs what its own train.log projects (:func:`live_cell_minutes`), and a
    recipe with no finished cell is costed at its cells in progress' projected length, else at
    the mean of all finished cells; the sum is spread over ``jobs``. Empty before any cell has
    finished or made progress, and when every cell is done."""
    cells = study_cells(cfg)
    todo = [cell for cell in cells if not is_done(cell, cfg)]
    if not todo:
        return ""
    minutes: dict[str, list[float]] = {}  # recipe -> minutes of its kept cells
    on_dataset: dict[tuple[str, str], list[float]] = {}  # (recipe, dataset) -> the same
    for path in sorted((Path(cfg.results) / "runs").glob("*/*/seed*/result.json")):
        try:
            result = json.loads(path.read_text())
            seconds, steps = result.get("wall_clock_s"), result.get("steps")
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(seconds, int | float) or steps != int(cfg.steps):
            continue
        recipe = str(result.get("recipe") or path.parts[-4])
        minutes.setdefault(recipe, []).append(seconds / 60)
        key = (recipe, str(result.get("dataset_id")))
        on_dataset.setdefault(key, []).append(seconds / 60)
    live = {c: live_cell_minutes(Path(cfg.work_dir) / c.rel) for c in todo}
    live = {c: v for c, v in live.items() if v is not None}
    projected: dict[str, list[float]] = {}
    for cell, (total, _) in live.items():
        if cell.recipe not in minutes:
            projected.setdefault(cell.recipe, []).append(total)
    if not minutes and not projected:
        return ""
    overall = [m for ms in (*minutes.values(), *projected.values()) for m in ms]
    mean_all = sum(overall) / len(overall)

    def cost(cell: Cell) -> float:
        if cell in live:
            return live[cell][1]
        per_cell = (
            on_dataset.get((cell.recipe, cell.dataset))
            or minutes.get(cell.recipe)
            or projected.get(cell.recipe)
        )
        return sum(per_cell) / len(per_cell) if per_cell else mean_all

    left = sum(cost(c) for c in todo) / max(1, jobs)
    notes = ["each recipe's mean cell time so far, on its dataset where it has one"]
    if live:
        notes.append(f"{len(live)} cell(s) in progress at their own pace")
    unseen = sorted(
        {c.recipe for c in todo if c.recipe not in minutes and c.recipe not in projected}
    )
    if unseen:
        notes.append(f"{', '.join(unseen)} at the mean of all, none finished yet")
    return (
        f"{len(cells) - len(todo)} of {len(cells)} cells done; about {left / 60:.1f} h left "
        f"at jobs={jobs} ({'; '.join(notes)})"
    )


def earlier_folders(cfg: Any) -> dict[Path, str]:
    """``earlier_runs``: folder -> tag, for the folders that exist."""
    folders = {Path(str(k)): str(v) for k, v in (cfg.get("earlier_runs") or {}).items()}
    return {folder: tag for folder, tag in folders.items() if folder.is_dir()}


def earlier_cells(cfg: Any) -> list[tuple[Cell, Path, str]]:
    """The finished cells kept under each ``earlier_runs`` folder: (cell, folder, tag)."""
    out = []
    for folder, tag in earlier_folders(cfg).items():
        for path in sorted(folder.glob("*/*/seed*/result.json")):
            result = json.loads(path.read_text())
            recipe = path.parts[-4]
            cell = Cell(recipe, str(result.get("dataset_id")), int(result.get("seed", -1)))
            out.append((cell, folder, tag))
    return out


def _available(cfg: Any, done: list[Cell]) -> set[str]:
    """The labels with finished cells: the recipes of the study's own, and ``<recipe> <tag>``
    for those under an ``earlier_runs`` folder."""
    return {c.recipe for c in done} | {f"{c.recipe} {tag}" for c, _, tag in earlier_cells(cfg)}


def _report_settings(cfg: Any, done: list[Cell]) -> dict[str, Any]:
    """What every report of the page shares: folders, tags, comparisons, resamples."""
    results = Path(cfg.results)
    have = _available(cfg, done)
    compare = [str(c) for c in cfg.compare if str(c) in have]
    compare = compare if len(compare) > 1 else []
    pairs = [
        [str(a), str(b)]
        for a, b in (cfg.get("extra_pairs") or [])
        if str(a) in have and str(b) in have
    ]
    folders = earlier_folders(cfg)
    return {
        "dirs": [*_cell_folders(results / "runs", done), *folders],
        "tags": {str(folder): tag for folder, tag in folders.items()},
        "compare": compare,
        "extra_pairs": pairs,
        "reps": int(cfg.get("reps") or 10000),
    }


def _cell_folders(runs: Path, done: list[Cell]) -> list[Path]:
    """What the page's report reads of the study's own cells: the runs folder when it holds
    exactly the finished cells (the usual case, and a short ``divo report`` command), else
    each finished cell's folder: a run kept there that the study does not count (another
    seed, task or recipe than the settings name, other steps) never enters its tables."""
    from divo.report import find_runs

    mine = [runs / c.rel for c in done]
    found = {r.path.resolve() for r in find_runs([runs])} if runs.is_dir() else set()
    return [runs] if found <= {m.resolve() for m in mine} else mine


def _report_command(opts: dict[str, Any], out: Path, score: str, figures: bool) -> str:
    def quoted(name: str) -> str:
        return f"'{name}'" if " " in name else name

    text = "divo report " + " ".join(str(d) for d in opts["dirs"])
    if opts["compare"]:
        text += " --compare " + " ".join(quoted(c) for c in opts["compare"])
    text += f" --score {score}" + ("" if figures else " --no-figures") + f" --out {out}"
    return text


def report_lines(cfg: Any, done: list[Cell], page: Path) -> list[str]:
    """Rerun ``divo report`` over the finished cells (scored by ``primary_score``, then
    ``other_score`` in a section of its own): its text for the page, links pointing into the
    report folder, or why there is no report yet."""
    from divo.report import make_report

    reports = Path(cfg.get("report_root") or cfg.results)  # where report/, report-<score>/ go
    report_dir = reports / "report"
    rel_report = os.path.relpath(report_dir, page.parent)
    body: list[str] = []
    opts = _report_settings(cfg, done)
    primary = str(cfg.get("primary_score") or "final")
    try:
        make_report(
            opts["dirs"],
            report_dir,
            compare=opts["compare"] or None,
            reps=opts["reps"],
            score=primary,
            tags=opts["tags"],
            extra_pairs=opts["extra_pairs"],
            command=_report_command(opts, report_dir, primary, True),
        )
    except ConfigError as exc:
        body = [f"No report yet: {exc}"]
    else:
        text = (report_dir / "report.md").read_text().splitlines()
        for line in text[1:]:  # the report without its title, links into report/
            if line.startswith("## "):
                line = "#" + line
            body.append(_relink(line, rel_report))
    return body + _other_score_section(cfg, reports, opts)


def grid_options(parser: argparse.ArgumentParser) -> None:
    """The options of a grid study's command line: --config, --jobs, --dry-run."""
    parser.add_argument(
        "--config", default=None, help="a YAML file of settings merged over the shipped ones"
    )
    parser.add_argument("--jobs", type=int, default=None, help="cells side by side")
    parser.add_argument("--dry-run", action="store_true", help="list the cells' commands")


def write_page(cfg: Any, log=print) -> Path:
    """Rerun ``divo report`` over the finished cells and write the results page."""
    results = Path(cfg.results)
    page = Path(cfg.page)
    cells = study_cells(cfg)
    done = [c for c in cells if is_done(c, cfg)]
    if done:
        body = report_lines(cfg, done, page) + _deployment_section(cfg, done)
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
        _score_declaration(cfg),
        "",
    ]
    lines += _earlier_runs_lines(cfg, done)
    if notes is not None and notes.is_file():
        lines += [notes.read_text().strip(), ""]
    lines += body
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines).rstrip() + "\n")
    log(f"divo study locomotion: {len(done)}/{len(cells)} cells finished -> {page}")
    return page


def _score_declaration(cfg: Any) -> str:
    primary = str(cfg.get("primary_score") or "final")
    other = cfg.get("other_score")
    tail = (
        f"; the same tables scored by `{other}` follow in a section of their own." if other else "."
    )
    return (
        f"**Primary score: `{primary}`** (declared as `primary_score` in the study's settings): "
        "the tables below and the notes read it first" + tail
    )


def _schedule_text(config: dict[str, Any], steps: int) -> tuple[str, str]:
    """(lr schedule, its horizon) of a run's policy optimiser, from its config.yaml."""
    from divo.agents.agent import cosine_decay

    behavior = config.get("behavior") or {}
    kind = behavior.get("lr_schedule")
    if not kind:
        return "constant", "n/a"
    horizon = int(behavior.get("lr_decay_steps") or steps)
    where = "compressed into the run" if horizon <= steps else "the reference run's length"
    rate = cosine_decay(max(steps - 1, 0), horizon)
    return str(kind), f"{horizon:,} steps ({where}; last step at {rate:.1%} of the start)"


def _earlier_runs_lines(cfg: Any, done: list[Cell]) -> list[str]:
    """Which settings each scheduled baseline row ran: its lr schedule's horizon, its batch and
    (IDQL) its deployed draw, read from one config.yaml per row."""
    import yaml

    rows = []
    groups: list[tuple[str, Path]] = [
        (r, Path(cfg.results) / "runs" / r) for r in sorted({c.recipe for c in done})
    ]
    groups += [
        (f"{r} {tag}", folder / r)
        for r, folder, tag in sorted({(c.recipe, f, t) for c, f, t in earlier_cells(cfg)})
    ]
    for label, folder in groups:
        configs = sorted(folder.glob("*/seed*/config.yaml"))
        if not configs:
            continue
        config = yaml.safe_load(configs[0].read_text()) or {}
        if not (config.get("behavior") or {}).get("lr_schedule"):
            continue
        steps = int((config.get("train") or {}).get("steps") or cfg.steps)
        kind, horizon = _schedule_text(config, steps)
        picker = config.get("evaluation_policy") or {}
        draw = picker.get("selection")
        draw = {"importance": "quantile (`importance`)"}.get(draw, draw)
        rows.append(
            f"| `{label}` | {len(configs)} | {kind} | {horizon} | "
            f"{(config.get('train') or {}).get('batch_size')} | {draw or 'its mean'} |"
        )
    if not rows:
        return []
    return [
        "The baselines' learning-rate schedules and settings, per row (from each row's "
        "config.yaml); a row tagged *(compressed lr)* is an earlier run kept under "
        + ", ".join(f"`{f}`" for f in earlier_folders(cfg))
        + ", tabled and compared beside the rerun but never counted as a cell of it:",
        "",
        "| row | cells | policy lr schedule | decays over | batch | deployed draw |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


SCORE_SECTIONS = (
    "## Mean normalised score",
    "## Final normalised score",
    "## Aggregate over datasets",
    "## Paired differences",
)


def _other_score_section(cfg: Any, results: Path, opts: dict[str, Any]) -> list[str]:
    """The score, aggregate and paired tables again under ``other_score`` (e.g. ``final``),
    from a report of their own in ``report-<score>``."""
    from divo.report import episodes_per_evaluation, find_runs, make_report

    score = cfg.get("other_score")
    if not score or str(score) == str(cfg.get("primary_score") or "final"):
        return []  # none, or the primary score's tables again
    out = results / f"report-{str(score).replace(':', '')}"
    try:
        with warnings.catch_warnings():  # the few-seeds warning is on the page already
            warnings.simplefilter("ignore")
            make_report(
                opts["dirs"],
                out,
                compare=opts["compare"] or None,
                reps=opts["reps"],
                figures=False,
                score=str(score),
                tags=opts["tags"],
                extra_pairs=opts["extra_pairs"],
                command=_report_command(opts, out, str(score), False),
            )
    except ConfigError as exc:
        return ["", f"## The same tables with `--score {score}`", "", f"No report yet: {exc}"]
    lines = ["", f"## The same tables with `--score {score}`", ""]
    episodes = episodes_per_evaluation(find_runs(opts["dirs"]))  # as the runs record it
    lines += [
        f"One evaluation is {episodes or 'a few'} episodes of one policy, and a policy's score "
        "swings from one evaluation to the next; the mean of a run's last evaluations damps "
        "that (TD3+BC's protocol averages its final 10), the final one is what the DIVO paper "
        f"reports. Scored by `--score {score}`:",
        "",
    ]
    keep = False
    for line in (out / "report.md").read_text().splitlines():
        if line.startswith("## "):
            keep = line.startswith(SCORE_SECTIONS)
            line = "#" + line
        if keep:
            lines.append(line)
    return lines


def _deployment_section(cfg: Any, done: list[Cell]) -> list[str]:
    """Per recipe with deployment variants (its study cells, and those of each
    ``earlier_runs`` folder under their tag): per dataset, the final score as trained and under
    each variant, over the same seeds, and their mean paired difference (min, max); beside
    them the first ``compare`` recipe (the study's subject) on those seeds, and the variant's
    paired difference from it, so a re-deployed baseline is read against the subject too."""
    lines: list[str] = []
    compare = [str(r) for r in (cfg.get("compare") or [])]
    # (label, recipe, the folder holding <recipe>/<dataset>/seed<k>, its cells)
    groups: list[tuple[str, str, Path, list[Cell]]] = []
    for recipe in cfg.get("deployments") or {}:
        recipe = str(recipe)
        kept = Path(cfg.results) / "runs"
        groups.append((recipe, recipe, kept, [c for c in done if c.recipe == recipe]))
        for folder, tag in earlier_folders(cfg).items():
            cells = [c for c, f, _ in earlier_cells(cfg) if f == folder and c.recipe == recipe]
            groups.append((f"{recipe} {tag}", recipe, folder, cells))
    for label, recipe, kept, cells in groups:
        named = {
            str(name): items
            for name, items in (cfg.deployments.get(recipe) or {}).items()
            if any((kept / c.rel / f"deploy-{name}.json").is_file() for c in cells)
        }
        if not cells or not named:
            continue
        subject = compare[0] if compare and compare[0] != recipe else None
        head = "| dataset | variant | seeds | as trained | variant | variant - as trained "
        head += "(min, max) |"
        rule = "|---|---|---|---|---|---|"
        if subject:  # the study's subject on the same seeds, paired with the variant
            head += f" `{subject}` | variant - `{subject}` (min, max) |"
            rule += "---|---|"
        lines += [
            "",
            f"## `{label}` deployed otherwise",
            "",
            "The same trained models, their final policy evaluated again (`divo evaluate --set`, "
            "10 episodes with the final evaluation's episode seeds) with other settings of the "
            "deployed policy; every column is a final score (one evaluation), whatever the "
            "primary score"
            + (f"; beside them `{subject}`'s final score on the same seeds:" if subject else ":"),
            "",
            head,
            rule,
        ]
        summaries: list[str] = []
        for name, items in named.items():
            by_dataset: list[list[float]] = []  # variant - subject, per dataset
            for dataset in cfg.datasets:
                pairs: list[tuple[float, float]] = []
                against: list[tuple[float, float]] = []  # (subject's score, variant's)
                for cell in cells:
                    path = kept / cell.rel / f"deploy-{name}.json"
                    if cell.dataset != str(dataset) or not path.is_file():
                        continue
                    trained = _score_at(kept / cell.rel)
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
                if against:
                    by_dataset.append([v - s for s, v in against])
                if subject:
                    fewer = f" ({len(against)} seeds)" if len(against) < len(pairs) else ""
                    row += (
                        f" {_mean(s for s, _ in against):.1f}{fewer} | "
                        f"{_spread([v - s for s, v in against])} |"
                        if against
                        else " n/a | n/a |"
                    )
                lines.append(row)
            if subject and by_dataset:
                summaries.append(_over_datasets(subject, " ".join(map(str, items)), by_dataset))
        if summaries:
            lines += ["", *summaries]
    return lines


def _over_datasets(subject: str, variant: str, by_dataset: list[list[float]]) -> str:
    """`subject` - variant over the datasets: the mean over datasets of the mean paired
    difference, its bootstrap and t 95% intervals, and the seed pairs the subject leads."""
    import numpy as np

    from divo.report import stratified_bootstrap_ci, stratified_t_ci

    diffs = [-np.asarray(d, dtype=float) for d in by_dataset]  # subject minus variant
    low, high, how = stratified_bootstrap_ci(diffs)
    t_low, t_high = stratified_t_ci(diffs)
    estimate = float(np.mean([d.mean() for d in diffs]))
    ahead = sum(int((d > 0).sum()) for d in diffs)
    pairs = sum(len(d) for d in diffs)
    # a t interval needs a spread: undefined (n/a) while no dataset has two seed pairs
    t_ci = "n/a" if np.isnan(t_low) else f"[{t_low:.1f}, {t_high:.1f}]"
    return (
        f"Over the {len(diffs)} datasets, `{subject}` minus the `{variant}` deployment (final "
        f"scores): {estimate:+.1f}, 95% bootstrap CI [{low:.1f}, {high:.1f}] ({how}), t CI "
        f"{t_ci}; `{subject}` ahead on {ahead} of {pairs} seed pairs."
    )


def _score_at(folder: Path) -> float | None:
    """The final normalised score kept in ``folder/result.json``; None when there is none."""
    path = folder / "result.json"
    if not path.is_file():
        return None
    score = json.loads(path.read_text()).get("normalized_score")
    return None if score is None else float(score)


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


def run_study(
    cfg: Any, jobs: int | None = None, dry_run: bool = False, log=print, page_cfg: Any = None
) -> int:
    """Run every cell not yet done (``jobs`` at a time), rewriting the page after each (from
    ``page_cfg``, the whole study's settings when ``cfg`` runs part of its grid:
    :func:`~divo.studies.runner.page_settings`). Returns the number of cells that failed."""
    page_cfg = cfg if page_cfg is None else page_cfg
    check_page_grid(cfg, page_cfg, log)
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
            log("  " + " ".join(["divo", *cell_command(cell, cfg)[3:]]))
        return 0
    check_data_as_kept(Path(cfg.results), todo, log=log)
    check_settings(cells, cfg, log)
    backfilled = [line for c in cells if c not in todo for line in evaluate_deployments(c, cfg)]
    for line in backfilled:  # cells finished before their recipe had deployment variants
        log("  " + line)
    if backfilled:
        write_page(page_cfg, log)

    def run_one(cell: Cell) -> tuple[bool, str]:
        log(f"  started {cell}")
        return run_cell(cell, cfg)

    def after_each() -> None:
        write_page(page_cfg, log)
        estimate = time_left(cfg, jobs)
        if estimate:
            log("  " + estimate)

    failed = run_cells(todo, run_one, after_each, jobs=jobs, log=log)
    write_page(page_cfg, log)
    return failed


def study_command(argv: Sequence[str]) -> int:
    """``divo study locomotion [key=value ...] [--config FILE] [--jobs N] [--page-only]
    [--dry-run]``."""

    ns = study_arguments(
        "divo study locomotion",
        "DIVO, TD3+BC and DIVO's ablations over MuJoCo datasets and seeds; resumable, rewrites "
        "the results page after every cell.",
        argv,
        STUDY_CONFIG,
        grid_options,
    )
    cfg = study_config(ns.overrides, ns.config)
    page_cfg = page_settings(cfg, ns.overrides, lambda rest: study_config(rest, ns.config))
    if ns.page_only:
        check_kept_cells(page_cfg)
        write_page(page_cfg)
        return 0
    return 1 if run_study(cfg, ns.jobs, ns.dry_run, page_cfg=page_cfg) else 0
