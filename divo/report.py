"""``divo report <dir>...``: compare finished runs.

Finds every run directory under the given folders (``result.json``, ``config.yaml`` and
``metrics.csv`` as ``divo train`` writes them; sweeps from any Hydra launcher), and writes into
the output folder (default ``<first dir>/report``):

- ``report.md``: the tables below and the figures, in Markdown;
- ``scores.csv``: per (recipe, dataset) the final normalised score, mean and sample standard
  deviation over seeds, with the seed count and the training steps; a dataset without reference
  scores (no ``ref_min_score`` / ``ref_max_score``, no D4RL fallback) is reported by its final
  return instead (``score_kind`` says which) and left out of the aggregate;
- ``aggregate.csv``: across datasets, the mean, median, interquartile mean (IQM) and optimality
  gap with 95% stratified-bootstrap confidence intervals (``rliable``, the protocol of Agarwal
  et al. 2021 that the DIVO paper follows);
- ``paired.csv`` (with ``--compare A B``): per dataset the difference A - B of the scores,
  paired by seed, with bootstrap and t intervals; ``paired_overall.csv`` averaged over datasets;
- ``diagnostics.csv``: per (recipe, dataset) the training diagnostics a researcher watches
  (share of positive advantages, weights at the weighting's clip, the behaviour model's samples'
  advantage over the data's, the share of actor targets taken from the model, Q and V scales),
  each averaged over the last quarter of the logged steps, then over seeds;
- ``runs.csv``: every run found, with its status (runs still in progress, failed or without a
  score are listed and left out of the numbers);
- ``learning_curves.<format>`` (normalised score, or return, over training steps per dataset: mean
  over seeds and a 95% bootstrap band, one line per recipe, the data's behaviour level dashed) and
  ``aggregate_intervals.<format>``, in each of ``--format png,pdf,svg`` (default png) at ``--dpi``
  (default 200).

``--score last:K`` scores each run by the mean of its last K evaluations (metrics.csv) instead
of its final one (result.json): TD3+BC's protocol averages the final 10. It damps the swings of
one 10-episode evaluation; the DIVO paper and the default report the final score. A run with
fewer than K evaluations, or whose last one is not at its final step, is left out.

Fewer than :data:`MIN_SEEDS` seeds per dataset get a warning, on the console and in report.md:
bootstrap intervals and the probability of improvement over so few runs are not to be trusted.

Runs whose configs differ in anything but the seed and bookkeeping settings (say a sweep over
``actor.loss.alpha``) are told apart: their label is the recipe followed by the differing
settings, e.g. ``divo[actor.loss.alpha=7.5]``. Of runs with the same label, dataset and seed, the
newest counts and the others are listed as superseded.

Needs the ``report`` extra (``pip install -e ".[report]"``: rliable, arch, pandas, matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import itertools
import json
import math
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from divo.errors import ConfigError, DatasetError, DivoError, install_hint

METRICS = ("mean", "median", "iqm", "optimality_gap")
METRIC_TITLES = {
    "mean": "Mean",
    "median": "Median",
    "iqm": "IQM",
    "optimality_gap": "Optimality gap",
}
# Config keys that do not change what is trained: never a reason to tell runs apart.
BOOKKEEPING_KEYS = {
    "seed",
    "device",
    "dataset.id",
    "dataset.download",
    "train.progress",
    "train.threads",
    "train.log_every",
    "train.eval_every",
    "train.eval_episodes",
    "train.eval_at_start",
    "train.checkpoint_every",
    "train.keep_checkpoints",
}
BOOKKEEPING_PREFIXES = ("logger.", "hydra.")
SKIP_DIRS = {".hydra", "checkpoints", ".submitit", "__pycache__", ".git"}
OPTIMAL_SCORE = 100.0  # the normalised score of the reference (expert) policy
# Below this many seeds per dataset the report warns: a bootstrap over a handful of runs can only
# resample those few scores (its intervals come out too narrow), and the probability of
# improvement over them takes only a few distinct values.
MIN_SEEDS = 5
FIGURE_FORMATS = ("png", "pdf", "svg")
DEFAULT_DPI = 200


# ---------------------------------------------------------------------------------------------
# Finding and reading runs


@dataclass
class Run:
    """One run directory and what could be read from it."""

    path: Path
    status: str  # complete | incomplete | no score | failed | superseded
    recipe: str | None = None
    dataset: str | None = None
    seed: int | None = None
    steps: int | None = None  # trained steps (complete runs) or the planned train.steps
    last_step: int | None = None  # last step logged in metrics.csv
    normalized: float | None = None  # final normalised score (result.json)
    return_mean: float | None = None  # final mean evaluation return (result.json)
    score: float | None = None  # what the report uses: normalized, or return_mean (score_kind)
    score_kind: str = ""  # "normalized" | "return" (a dataset without reference scores)
    note: str = ""
    behavior_score: float | None = None  # the data's behaviour policy, normalised (result.json)
    diagnostics: dict[str, float] = field(default_factory=dict)  # late-training means
    config: dict[str, Any] = field(default_factory=dict)  # flattened, dotted keys
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # kind -> curve
    label: str = ""
    mtime: float = 0.0
    shown_path: str = ""
    success_scored: bool = False  # its normalised score is a success rate (result.json "score")
    episodes: int | None = None  # evaluation episodes per evaluation (result.json)
    data_fingerprint: str | None = None  # the transitions it trained on (result.json)
    behavior_return: float | None = None  # its data's mean episode return (result.json)
    window: tuple[int, ...] | None = None  # --score last:K: the steps of the K evaluations
    references: tuple[float, float] | None = None  # result.json ref_min_score, ref_max_score


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(node, list):
        return {prefix[:-1]: json.dumps(node, sort_keys=True, default=str)}
    return {prefix[:-1]: node}


def _load_config(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    return _flatten(OmegaConf.to_container(cfg, resolve=False))


CURVE_COLUMNS = {"normalized": "normalized_score", "return": "eval_return_mean"}
# metrics.csv columns shown in the diagnostics table (those a run logs), with their titles
DIAGNOSTICS = {
    "advantage_pos_frac": "A(s,a) > 0",
    "weight_nonzero_frac": "w > 0",
    "weight_clip_frac": "w at clip",
    "sample_advantage_gap": "A(sample) - A(data)",
    "target_from_model_frac": "targets from model",
    "advantage_std": "std A",
    "q_mean": "Q",
    "v_mean": "V",
    "eval_return_to_go": "G (eval)",
    "eval_q_bias": "Q - G (eval)",
    "eval_q_bias_min": "Q - G, at least (eval)",
}
DIAGNOSTIC_TAIL = 0.25  # diagnostics: mean over this last share of the logged rows


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (or a string of one), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _is_number(value: Any) -> bool:
    """Whether ``value`` reads as a number at all, NaN and inf included."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


# curves[kind + NONFINITE]: the evaluations of that kind whose value was NaN or inf
NONFINITE = ":nonfinite"


def _read_curves(
    path: Path,
) -> tuple[dict[str, list[tuple[int, float]]], int | None, dict[str, float]]:
    """Per kind (normalised score, return): (step, value) at each evaluation with a finite
    value, and under ``kind + NONFINITE`` the steps of those whose value was NaN or inf; the
    last step; each diagnostic column's mean over the last :data:`DIAGNOSTIC_TAIL` of its
    logged rows."""
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for kind in CURVE_COLUMNS:
        curves[kind] = []
    series: dict[str, list[float]] = defaultdict(list)
    last = None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row["step"]))
            except (KeyError, TypeError, ValueError):
                continue
            last = step if last is None else max(last, step)
            for kind, column in CURVE_COLUMNS.items():
                value = _finite(row.get(column))
                if value is not None:
                    curves[kind].append((step, value))
                elif _is_number(row.get(column)):  # evaluated, and got NaN or inf
                    curves[f"{kind}{NONFINITE}"].append((step, math.nan))
            for column in DIAGNOSTICS:
                value = _finite(row.get(column))
                if value is not None:
                    series[column].append(value)
    diagnostics = {
        column: float(np.mean(values[-max(1, math.ceil(DIAGNOSTIC_TAIL * len(values))) :]))
        for column, values in series.items()
    }
    return dict(curves), last, diagnostics


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # None, "x", inf (1e999 in JSON)
        return None


def _first_int(value: Any, default: int | None) -> int | None:
    number = _as_int(value)
    return number if number is not None else default


def _as_name(value: Any, default: str | None) -> str | None:
    """A recipe or dataset name from result.json: a string, else the config's (a list or an
    object there would make labels that cannot be grouped)."""
    return value if isinstance(value, str) else default


def read_run(path: Path) -> Run:
    """Read one run directory; never raises for damaged or partial files."""
    run = Run(path=path, status="incomplete")
    notes = []
    config_file = path / "config.yaml"
    if not config_file.is_file():
        config_file = path / ".hydra" / "config.yaml"  # written by Hydra before training starts
    if config_file.is_file():
        try:
            run.config = _load_config(config_file)
        except Exception as exc:  # noqa: BLE001 - a damaged file is reported, not raised
            notes.append(f"unreadable {config_file.name} ({type(exc).__name__})")
    run.recipe = _as_name(run.config.get("recipe"), None)
    run.dataset = _as_name(run.config.get("dataset.id"), None)
    run.seed = _as_int(run.config.get("seed"))
    run.steps = _as_int(run.config.get("train.steps"))

    metrics = path / "metrics.csv"
    if metrics.is_file():
        try:
            run.curves, run.last_step, run.diagnostics = _read_curves(metrics)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"unreadable metrics.csv ({type(exc).__name__})")

    result_file = path / "result.json"
    if result_file.is_file():
        run.mtime = result_file.stat().st_mtime
        try:
            result = json.loads(result_file.read_text())
            if not isinstance(result, dict):
                raise ValueError("not a JSON object")
        except Exception as exc:  # noqa: BLE001
            run.status = "failed"
            notes.append(f"unreadable result.json ({type(exc).__name__}: {exc})")
        else:
            run.recipe = _as_name(result.get("recipe"), run.recipe)
            run.dataset = _as_name(result.get("dataset_id"), run.dataset)
            run.seed = _first_int(result.get("seed"), run.seed)
            run.steps = _first_int(result.get("steps"), run.steps)
            run.normalized = _finite(result.get("normalized_score"))
            run.return_mean = _finite(result.get("return_mean"))
            run.behavior_score = _finite(result.get("behavior_normalized_score"))
            run.success_scored = str(result.get("score", "")).startswith("success rate")
            run.episodes = _as_int(result.get("episodes"))
            fingerprint = result.get("data_fingerprint")
            run.data_fingerprint = fingerprint if isinstance(fingerprint, str) else None
            run.behavior_return = _finite(result.get("behavior_return"))
            ref_min, ref_max = (
                _finite(result.get("ref_min_score")),
                _finite(result.get("ref_max_score")),
            )
            if ref_min is not None and ref_max is not None:
                run.references = (ref_min, ref_max)
            if result.get("normalized_score") is not None and run.normalized is None:
                run.status = "no score"  # damaged: not scored by its return as if it had no refs
                notes.append("result.json's normalized_score is not a finite number")
            elif run.normalized is not None or run.return_mean is not None:
                run.status = "complete"
                if run.normalized is None:
                    notes.append("no reference scores for its dataset: reported by its return")
            else:
                run.status = "no score"
                damaged = [
                    k for k in ("normalized_score", "return_mean") if result.get(k) is not None
                ]
                notes.append(
                    f"result.json's {' and '.join(damaged)} not a finite number"
                    if damaged
                    else "result.json has no final evaluation (train.eval_episodes=0, or no "
                    "evaluation environment)"
                )
        if run.status == "complete":
            mismatch = _final_mismatch(run)
            if mismatch:
                run.status = "failed"
                notes.append(mismatch)
    else:
        run.mtime = max((p.stat().st_mtime for p in path.iterdir()), default=0.0)
        progress = f"last logged step {run.last_step}" if run.last_step else "no metrics yet"
        if run.steps:
            progress += f" of {run.steps}"
        notes.append(f"no result.json: still running, or stopped/failed ({progress})")
    if run.seed is None or run.recipe is None or run.dataset is None:
        known = {"recipe": run.recipe, "dataset": run.dataset, "seed": run.seed}
        missing = [name for name, value in known.items() if value is None]
        if run.status == "complete":
            run.status = "failed"
        notes.append(f"{', '.join(missing)} unknown (no readable result.json or config.yaml)")
    run.note = "; ".join(notes)
    return run


def _final_mismatch(run: Run) -> str | None:
    """How result.json's final score differs from metrics.csv's evaluation at the run's last
    step (the same evaluation, written twice by training), or None. A file edited by hand, or
    the files of two runs mixed in one folder, is not tabled under either score."""
    for kind, value in (("normalized", run.normalized), ("return", run.return_mean)):
        logged = dict(run.curves.get(kind, []))  # a step logged twice: its last row
        if value is None or run.steps is None or run.steps not in logged:
            continue
        if abs(logged[run.steps] - value) > 1e-6 * max(1.0, abs(value)):
            return (
                f"result.json's {CURVE_COLUMNS[kind]} {value:g} is not metrics.csv's "
                f"evaluation at its final step {run.steps} ({logged[run.steps]:g}): the files "
                "disagree (edited, or from two runs); not counted"
            )
    return None


_SEED_DIR = re.compile(r"seed\d+")


def choose_score_kinds(runs: list[Run]) -> None:
    """Set each complete run's ``score``: its normalised score, or, on a dataset where no run
    has one (no reference scores), its final return. On a dataset with normalised scores, a run
    without one is left out."""
    by_dataset: dict[str | None, list[Run]] = defaultdict(list)
    for run in runs:
        if run.status == "complete":
            by_dataset[run.dataset].append(run)
    for group in by_dataset.values():
        kind = "normalized" if any(r.normalized is not None for r in group) else "return"
        for run in group:
            if kind == "normalized" and run.normalized is None:
                run.status = "no score"
                run.note = (
                    "result.json has no normalised score, while other runs on its dataset have "
                    "one (evaluated without the dataset's reference scores?)"
                )
                continue
            run.score_kind = kind
            run.score = run.normalized if kind == "normalized" else run.return_mean


def parse_score(text: str) -> int | None:
    """``final`` -> None; ``last:K`` -> K (the mean of each run's last K evaluations)."""
    text = str(text).strip()
    if text == "final":
        return None
    head, _, tail = text.partition(":")
    if head == "last" and tail.isdigit() and int(tail) >= 1:
        return int(tail)
    raise ConfigError(
        f"--score {text!r}: use final (each run's final evaluation, the default) or last:K "
        "(the mean of its last K evaluations, e.g. last:3)"
    )


def use_last_evaluations(runs: list[Run], k: int) -> None:
    """Re-score each scored run by the mean of its last ``k`` evaluations of its score kind
    (from metrics.csv). The evaluation at step 0 (the untrained policy, ``train.eval_at_start``)
    never counts; a run with fewer than ``k`` after it, whose last evaluation is not at its
    final step, or with a NaN/inf among its last ``k``, is left out with a note."""
    for run in runs:
        if run.status != "complete" or not run.score_kind:
            continue
        finite = run.curves.get(run.score_kind, [])
        bad = run.curves.get(run.score_kind + NONFINITE, [])
        # one evaluation per step: a step logged twice (the resume of an older divo logged
        # again what its checkpoint had) counts once, its last row in metrics.csv
        points = dict(p for p in [*finite, *bad] if p[0] > 0 or run.steps == 0)
        curve = sorted(points.items())
        if len(curve) < k or (run.steps is not None and curve[-1][0] != run.steps):
            run.status = "no score"
            run.note = (
                f"metrics.csv holds {len(curve)} evaluation(s) after step 0"
                + (f", the last at step {curve[-1][0]} of {run.steps}" if curve else "")
                + f": --score last:{k} needs {k} ending at the final step"
            )
            run.score = None
            continue
        values = [value for _, value in curve[-k:]]
        if not all(math.isfinite(v) for v in values):
            run.status = "no score"
            run.note = (
                f"metrics.csv: an evaluation among the last {k} is NaN or inf (steps "
                + ", ".join(str(step) for step, v in curve[-k:] if not math.isfinite(v))
                + ")"
            )
            run.score = None
            continue
        run.score = float(np.mean(values))
        run.window = tuple(step for step, _ in curve[-k:])


def score_notes(runs: list[Run], last_k: int | None) -> list[str]:
    """Where the scores set side by side on one dataset are not like for like: runs trained
    for different numbers of steps, or (``--score last:K``) whose last K evaluations fell at
    different steps (another ``train.eval_every``), or evaluated on different numbers of
    episodes (another ``train.eval_episodes``: a 1-episode success rate is 0 or 100, and its
    spread is not a 50-episode one's; such runs still share a cell, since the episodes do not
    change what trained). Each score is right, and not like for like; one note per dataset and
    kind, for the console and report.md."""
    notes = []
    scored = [r for r in runs if r.status == "complete" and r.score is not None]
    stretch = "their scores are not of the same stretch of training"
    kinds = [("trained for different numbers of steps", lambda r: r.steps, "{}", stretch)]
    if last_k is not None:
        kinds.append(
            (
                f"scored over evaluations at different steps (--score last:{last_k})",
                lambda r: r.window,
                "steps {}",
                stretch,
            )
        )
    kinds.append(
        (
            "evaluated on different numbers of episodes per evaluation",
            lambda r: r.episodes,
            "{} episodes",
            "their scores and spreads are not equally precise (the table pools them)",
        )
    )
    for dataset in sorted({r.dataset for r in scored if r.dataset}):
        here = [r for r in scored if r.dataset == dataset]
        for what, key, shown_as, consequence in kinds:
            groups: dict[Any, list[str]] = defaultdict(list)
            for run in here:
                value = key(run)
                if value is not None and run.label not in groups[value]:
                    groups[value].append(run.label)
            if len(groups) < 2:
                continue
            shown = "; ".join(
                shown_as.format(", ".join(map(str, v)) if isinstance(v, tuple) else v)
                + ": "
                + ", ".join(labels)
                for v, labels in sorted(groups.items())  # one kind: one type of value
            )
            notes.append(f"the runs on {dataset} were {what} ({shown}): {consequence}")
    return notes


def _is_run_dir(path: Path, files: Iterable[str], dirs: Iterable[str]) -> bool:
    names = set(files)
    if names & {"result.json", "metrics.csv"}:
        return True
    if any(_SEED_DIR.fullmatch(d) for d in dirs):  # a train.num_seeds run: its seeds are runs
        return False
    if "config.yaml" in names and path.name not in SKIP_DIRS:
        return True
    # Hydra made the folder and the job stopped before training wrote anything
    return ".hydra" in set(dirs) and "multirun.yaml" not in names


def find_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """Every run directory under ``dirs`` (a run directory itself counts), in path order."""
    runs: list[Run] = []
    seen: set[Path] = set()
    for given in dirs:
        root = Path(given)
        if not root.is_dir():
            raise ConfigError(
                f"{given} is not a directory; pass folders that hold run directories (e.g. "
                "runs/ or a sweep's runs/multirun/<time>)"
            )
        for current, subdirs, files in os.walk(root):
            here = Path(current)
            is_run = _is_run_dir(here, files, subdirs)
            subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS)
            if not is_run:
                continue
            subdirs[:] = []  # runs are not nested
            key = here.resolve()
            if key in seen:
                continue
            seen.add(key)
            run = read_run(here)
            run.shown_path = str(here)
            runs.append(run)
    return runs


def _is_bookkeeping(key: str) -> bool:
    return (
        key in BOOKKEEPING_KEYS
        or key.startswith(BOOKKEEPING_PREFIXES)
        or "resume" in key.split(".")[-1]
    )


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


_UNKNOWN = object()


@functools.cache
def _recipe_defaults(recipe: str) -> dict[str, Any]:
    """The shipped recipe's flattened config as divo composes it today ({} for a recipe it does
    not ship): the value a run written before an option existed ran with, since an option is
    added with the old behaviour as its default."""
    from omegaconf import OmegaConf

    from divo.config import compose_recipe

    try:
        cfg = compose_recipe(recipe)
    except Exception:  # noqa: BLE001 - a user's recipe file, or one no longer shipped
        return {}
    try:
        return _flatten(OmegaConf.to_container(cfg, resolve=True))
    except Exception:  # noqa: BLE001 - an interpolation only a run can resolve
        return _flatten(OmegaConf.to_container(cfg, resolve=False))


def _setting(run: Run, key: str) -> Any:
    """``key`` of the run's config; where its config.yaml predates the option, the shipped
    recipe's value of it today; :data:`_UNKNOWN` if neither has it."""
    if key in run.config:
        return run.config[key]
    return _recipe_defaults(str(run.recipe)).get(key, _UNKNOWN)


def assign_labels(runs: list[Run]) -> None:
    """Label = recipe, plus the settings that tell its runs apart on some dataset. A key a run's
    config lacks (written before the option existed) counts as the recipe's value of it today,
    so adding an option with the old behaviour as its default splits no study in two."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.recipe is not None and run.dataset is not None and run.config:
            groups[(run.recipe, run.dataset)].append(run)
    variant_keys: dict[str, set[str]] = defaultdict(set)
    for (recipe, _), members in groups.items():
        members = [m for m in members if m.status == "complete"]  # resolved config.yaml
        keys = set().union(*(m.config for m in members))
        for key in keys:
            if _is_bookkeeping(key):
                continue
            settings = [_setting(m, key) for m in members]
            values = {json.dumps(v, default=str) for v in settings if v is not _UNKNOWN}
            if len(values) > 1:
                variant_keys[recipe].add(key)
    for run in runs:
        label = str(run.recipe) if run.recipe is not None else "?"
        keys = sorted(variant_keys.get(run.recipe, ()))
        if keys and run.config:
            shown = [(k, _setting(run, k)) for k in keys]
            label += (
                "["
                + ",".join(f"{k}={_fmt_value(None if v is _UNKNOWN else v)}" for k, v in shown)
                + "]"
            )
        run.label = label


def _label_runs(runs: list[Run], dirs: Sequence[str | Path], tags: dict[str, str]) -> None:
    """Labels per folder of ``tags``: the runs under a tagged folder are labelled among
    themselves, then get `` <tag>`` appended; the other runs are labelled together."""
    tagged = {Path(d).resolve(): t for d, t in tags.items()}
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        path = run.path.resolve()
        tag = next((t for d, t in tagged.items() if path.is_relative_to(d)), "")
        groups[tag].append(run)
    for tag, members in groups.items():
        assign_labels(members)
        if tag:
            for run in members:
                run.label = f"{run.label} {tag}"


def drop_duplicates(runs: list[Run]) -> None:
    """Of complete runs with the same label, dataset and seed, the newest counts."""
    latest: dict[tuple[str, str, int], Run] = {}
    for run in runs:
        if run.status != "complete":
            continue
        key = (run.label, run.dataset, run.seed)
        if key not in latest or run.mtime > latest[key].mtime:
            latest[key] = run
    for run in runs:
        if run.status == "complete":
            keep = latest[(run.label, run.dataset, run.seed)]
            if keep is not run:
                run.status = "superseded"
                run.note = f"same recipe, dataset and seed as the newer {keep.shown_path}"


BUFFER_FINGERPRINT = "sha256-buffer:"  # a user's replay buffer's (divo.data.batches)


def _fingerprint_of_kind(run: Run, buffer: bool) -> str | None:
    """A run's data fingerprint when it is of the kind asked for: a dataset file's and a replay
    buffer's hash different things (not comparable), so runs are compared within a kind."""
    value = run.data_fingerprint
    if value is None or value.startswith(BUFFER_FINGERPRINT) != buffer:
        return None
    return value


DATA_KEYS = (
    ("data_fingerprint", lambda r: _fingerprint_of_kind(r, buffer=False)),
    ("data_fingerprint of a replay buffer", lambda r: _fingerprint_of_kind(r, buffer=True)),
    (
        "behavior_return, the data's mean episode return",
        lambda r: behavior_return_key(r.behavior_return),
    ),
)


def _data_groups(runs: list[Run], key, by_seed: bool) -> dict[tuple, dict[str, list[Run]]]:
    """(dataset[, seed]) -> data key -> the complete runs with it (runs without one left out)."""
    groups: dict[tuple, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        value = key(run) if run.status == "complete" and run.dataset else None
        if value is not None:
            groups[(run.dataset, run.seed) if by_seed else (run.dataset,)][value].append(run)
    return {k: v for k, v in groups.items() if len(v) > 1}


def _listed(groups: dict[str, list[Run]]) -> str:
    return "; ".join(
        f"{value[:19]}{'...' if len(value) > 19 else ''}: "
        + ", ".join(r.shown_path or str(r.path) for r in group[:3])
        + (f" and {len(group) - 3} more" if len(group) > 3 else "")
        for value, group in sorted(groups.items(), key=lambda kv: -len(kv[1]))
    )


def check_same_data(runs: list[Run]) -> list[str]:
    """Refuse to pair runs that trained on different transitions under one dataset id and seed:
    their result.json ``data_fingerprint`` differs (a regenerated, edited or replaced file),
    or, for runs written before divo recorded fingerprints, their data's mean episode return
    (``behavior_return``, a property of the stored rewards alone) does. A paired difference
    over them would compare two datasets under one name.

    Different data across the seeds of a dataset (each seed's runs on one set, as a study does
    when each seed's column is run on a machine that regenerated the files) are allowed: the
    data's draw then varies with the seed like the training's, for every recipe alike. Returns
    one note per such dataset, for the console and report.md."""
    for what, key in DATA_KEYS:
        for (dataset, seed), groups in sorted(_data_groups(runs, key, by_seed=True).items()):
            raise DatasetError(
                f"the runs on {dataset} with seed {seed} trained on {len(groups)} different sets "
                f"of transitions (result.json {what}: {_listed(groups)}); pairing them by seed "
                "would compare two datasets under one name. Rerun the odd ones on the data the "
                "others used, or report them apart (one `divo report` per set of run folders)"
            )
    notes = []
    for what, key in DATA_KEYS:
        for (dataset,), groups in sorted(_data_groups(runs, key, by_seed=False).items()):
            seeds = {
                value: sorted({r.seed for r in group if r.seed is not None})
                for value, group in groups.items()
            }
            shown = "; ".join(
                f"{value[:19]}{'...' if len(value) > 19 else ''}: seed(s) "
                + ", ".join(map(str, seeds[value]))
                for value in sorted(groups, key=lambda v: seeds[v])
            )
            notes.append(
                f"the runs on {dataset} trained on {len(groups)} different sets of transitions "
                f"({what}: {shown}), each seed's on one: every recipe's runs of a seed share "
                "its data, so paired differences compare like with like, and the data's draw "
                "varies with the seed as the training's does"
            )
        if notes:
            break  # fingerprints, where runs have them, say it; the returns only for the rest
    return notes


def check_same_references(runs: list[Run]) -> None:
    """Refuse to pool normalised scores of one dataset measured against different reference
    returns (result.json ``ref_min_score``/``ref_max_score``: a dataset whose stored references
    changed, or runs of which some borrowed D4RL's): they are on different scales. Runs that
    predate the record are not compared."""
    by_dataset: dict[str, dict[tuple[float, float], list[Run]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in runs:
        if run.status == "complete" and run.normalized is not None and run.references:
            by_dataset[run.dataset][run.references].append(run)
    for dataset, groups in sorted(by_dataset.items()):
        if len(groups) > 1:
            shown = "; ".join(
                f"{low:g} / {high:g}: " + ", ".join(sorted({str(r.recipe) for r in group}))
                for (low, high), group in sorted(groups.items())
            )
            raise DatasetError(
                f"the runs on {dataset} measured their normalised scores against different "
                f"reference returns (result.json ref_min_score / ref_max_score: {shown}); their "
                "scores are on different scales. Report them apart (one `divo report` per set of "
                "run folders), or evaluate them again against one set"
            )


def behavior_return_key(value: float | None) -> str | None:
    """The data's mean episode return (result.json ``behavior_return``) to 6 significant digits,
    what float round-trips through JSON agree on; None when not recorded. How runs from before
    divo recorded ``data_fingerprint`` are told apart by their data (here and in the studies'
    check before a cell starts)."""
    return None if value is None else f"{value:.6g}"


# ---------------------------------------------------------------------------------------------
# Numbers


@dataclass
class Cell:
    """The final scores of one label on one dataset."""

    label: str
    recipe: str
    dataset: str
    runs: list[Run]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def scores(self) -> np.ndarray:
        return np.array([r.score for r in self.runs], dtype=float)

    @property
    def kind(self) -> str:
        return self.runs[0].score_kind

    @property
    def steps(self) -> str:
        values = sorted({r.steps for r in self.runs if r.steps is not None})
        if not values:
            return ""
        return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"

    def summary(self) -> dict[str, Any]:
        s = self.scores
        return {
            "recipe": self.label,
            "dataset": self.dataset,
            "seeds": len(s),
            "seed_list": " ".join(str(x) for x in self.seeds),
            "steps": self.steps,
            "score_kind": self.kind,
            "score_mean": float(s.mean()),
            "score_std": float(s.std(ddof=1)) if len(s) > 1 else float("nan"),
            "score_min": float(s.min()),
            "score_max": float(s.max()),
        }


def build_cells(runs: list[Run]) -> dict[tuple[str, str], Cell]:
    cells: dict[tuple[str, str], Cell] = {}
    for run in sorted(runs, key=lambda r: (r.label, r.dataset or "", r.seed or 0)):
        if run.status != "complete":
            continue
        key = (run.label, run.dataset)
        if key not in cells:
            cells[key] = Cell(run.label, run.recipe, run.dataset, [])
        cells[key].runs.append(run)
    return cells


def aggregate_metrics(scores: np.ndarray) -> np.ndarray:
    """[mean, median, IQM, optimality gap] of a (runs x datasets) matrix of normalised scores.

    As rliable defines them: mean and median over datasets of the per-dataset mean; IQM = mean
    of the middle 50% of all run x dataset scores; optimality gap = mean of max(100 - score, 0).
    """
    from rliable import metrics

    return np.array(
        [
            metrics.aggregate_mean(scores),
            metrics.aggregate_median(scores),
            metrics.aggregate_iqm(scores),
            metrics.aggregate_optimality_gap(scores, gamma=OPTIMAL_SCORE),
        ]
    )


@dataclass
class Aggregate:
    labels: list[str]
    datasets: list[str]
    seeds_per_dataset: dict[str, int]
    point: dict[str, np.ndarray]
    low: dict[str, np.ndarray]
    high: dict[str, np.ndarray]
    notes: list[str]


def _score_matrix(cells: dict, label: str, datasets: list[str]) -> tuple[np.ndarray, bool]:
    """(runs x datasets); with unequal seed counts, the k lowest seeds of each dataset."""
    per = [cells[(label, d)].scores for d in datasets]
    k = min(len(s) for s in per)
    return np.stack([s[:k] for s in per], axis=1), any(len(s) != k for s in per)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """rliable's bootstrap draws from NumPy's global RNG (it ignores its random_state
    argument), so seed that for a reproducible report and restore it afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def compute_aggregate(
    cells: dict[tuple[str, str], Cell], *, reps: int, seed: int, ci: float = 0.95
) -> Aggregate | None:
    from rliable import library

    notes = []
    raw = sorted({d for (_, d), cell in cells.items() if cell.kind != "normalized"})
    if raw:
        notes.append(
            "left out of the aggregate and of the paired differences over datasets (no "
            "reference scores: reported by their returns): " + ", ".join(raw)
        )
        cells = {key: cell for key, cell in cells.items() if cell.kind == "normalized"}
        if not cells:
            return None
    labels = sorted({label for label, _ in cells})
    datasets = sorted({d for _, d in cells})
    covered = [lb for lb in labels if all((lb, d) in cells for d in datasets)]
    if covered != labels:
        if covered:
            left = [lb for lb in labels if lb not in covered]
            notes.append(f"left out of the aggregate (not run on every dataset): {', '.join(left)}")
        else:  # nobody covers everything: use the datasets they all share
            common = [d for d in datasets if all((lb, d) in cells for lb in labels)]
            if not common:
                return None
            notes.append(
                "aggregate over the datasets every recipe was run on; left out: "
                + ", ".join(d for d in datasets if d not in common)
            )
            datasets, covered = common, labels
    matrices, per_dataset = {}, {}
    for label in covered:
        matrix, trimmed = _score_matrix(cells, label, datasets)
        matrices[label] = matrix
        per_dataset[label] = matrix.shape[0]
        if trimmed:
            notes.append(
                f"{label}: unequal seed counts across datasets; the aggregate uses the "
                f"{matrix.shape[0]} lowest seeds of each dataset"
            )
    point, intervals = {}, {}
    for label, matrix in matrices.items():  # each from the same seed: a recipe's interval does
        with _seeded(seed):  # not move when another recipe joins the report
            p, iv = library.get_interval_estimates(
                {label: matrix}, aggregate_metrics, reps=reps, confidence_interval_size=ci
            )
        point.update(p)
        intervals.update(iv)
    return Aggregate(
        labels=covered,
        datasets=datasets,
        seeds_per_dataset=per_dataset,
        point={k: np.asarray(v, dtype=float) for k, v in point.items()},
        low={k: np.asarray(v, dtype=float)[0] for k, v in intervals.items()},
        high={k: np.asarray(v, dtype=float)[1] for k, v in intervals.items()},
        notes=notes,
    )


def resolve_compare(names: Sequence[str], runs: list[Run]) -> list[str]:
    """Recipe names or labels given to --compare -> labels of complete runs."""
    labels = sorted({r.label for r in runs if r.status == "complete"})
    by_recipe: dict[str, list[str]] = defaultdict(list)
    for r in runs:
        if r.status == "complete" and r.label not in by_recipe[r.recipe]:
            by_recipe[r.recipe].append(r.label)
    out = []
    for name in names:
        if name in labels:
            out.append(name)
        elif name in by_recipe and len(by_recipe[name]) == 1:
            out.append(by_recipe[name][0])
        elif name in by_recipe:
            raise ConfigError(
                f"recipe {name!r} in --compare has several variants in these runs "
                f"({', '.join(sorted(by_recipe[name]))}); name one of them"
            )
        else:
            raise ConfigError(
                f"unknown recipe {name!r} in --compare; the complete runs hold "
                f"{', '.join(labels) or 'none'}"
            )
    if len(set(out)) < 2:
        raise ConfigError(
            "--compare needs at least two different recipes, e.g. --compare divo td3bc"
        )
    return out


def paired_differences(cells: dict, a: str, b: str) -> list[dict[str, Any]]:
    """Per dataset: score(a, seed) - score(b, seed) over the seeds both have."""
    rows = []
    for dataset in sorted({d for _, d in cells}):
        if (a, dataset) not in cells or (b, dataset) not in cells:
            continue
        sa = {r.seed: r.score for r in cells[(a, dataset)].runs}
        sb = {r.seed: r.score for r in cells[(b, dataset)].runs}
        seeds = sorted(set(sa) & set(sb))
        if not seeds:
            continue
        diff = np.array([sa[s] - sb[s] for s in seeds])
        rows.append(
            {
                "dataset": dataset,
                "a": a,
                "b": b,
                "pairs": len(seeds),
                "seed_list": " ".join(str(s) for s in seeds),
                "diff_mean": float(diff.mean()),
                "diff_std": float(diff.std(ddof=1)) if len(diff) > 1 else float("nan"),
                "diff_min": float(diff.min()),
                "diff_max": float(diff.max()),
                "a_better": int((diff > 0).sum()),
                "b_better": int((diff < 0).sum()),
                "diffs": " ".join(f"{d:.6g}" for d in diff),
            }
        )
    return rows


def _with_intervals(row: dict[str, Any], *, reps: int, seed: int) -> dict[str, Any]:
    """A per-dataset paired row with its 95% bootstrap CI (exact for few seeds) and its paired
    t-test CI."""
    diff = [np.array([float(d) for d in row["diffs"].split()])]
    low, high, how = stratified_bootstrap_ci(diff, reps=reps, seed=seed)
    t_low, t_high = stratified_t_ci(diff)
    return {**row, "ci_low": low, "ci_high": high, "bootstrap": how, "t_low": t_low,
            "t_high": t_high}  # fmt: skip


EXACT_BOOTSTRAP_LIMIT = 1_000_000  # enumerate the bootstrap when it has at most this many points
DEFAULT_REPS = 10_000  # resamples of a bootstrap that is not enumerated
POWER = 0.8  # the power of the minimum detectable effect


def _resample_means(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct bootstrap resample of ``d`` (n values drawn with replacement, order
    ignored) -> (their means, their probabilities): the multisets of n indices, each with its
    multinomial weight n! / prod(c_i!) / n^n."""
    n = len(d)
    means, probs = [], []
    for combo in itertools.combinations_with_replacement(range(n), n):
        counts = np.bincount(combo, minlength=n)
        ways = math.factorial(n) // math.prod(math.factorial(int(c)) for c in counts)
        means.append(float(d[list(combo)].mean()))
        probs.append(ways / n**n)
    return np.array(means), np.array(probs)


def _exact_size(diffs: Sequence[np.ndarray]) -> int:
    """Points of the enumerated stratified bootstrap: prod over strata of C(2n - 1, n)."""
    return math.prod(math.comb(2 * len(d) - 1, len(d)) for d in diffs)


def _weighted_quantile(values: np.ndarray, probs: np.ndarray, q: float) -> float:
    """The smallest value whose cumulative probability reaches ``q`` (the inverted-CDF
    quantile, NumPy's ``method="inverted_cdf"`` for equal weights)."""
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(probs[order])
    i = int(np.searchsorted(cum, q - 1e-12, side="left"))
    return float(values[order][min(i, len(values) - 1)])


def stratified_bootstrap_ci(
    diffs: Sequence[np.ndarray],
    *,
    reps: int = DEFAULT_REPS,
    seed: int = 0,
    ci: float = 0.95,
    exact_limit: int = EXACT_BOOTSTRAP_LIMIT,
) -> tuple[float, float, str]:
    """Percentile CI of the mean over strata (datasets) of each stratum's mean, resampling the
    values (seed pairs) within each stratum. When the resamples are few (at most
    ``exact_limit`` distinct points: 3 seeds on 4 datasets make 10^4) the bootstrap
    distribution is enumerated exactly; else ``reps`` resamples are drawn. Both use the
    inverted-CDF quantile. Returns (low, high, how: ``exact`` or ``<reps> resamples``)."""
    diffs = [np.asarray(d, dtype=float) for d in diffs]
    lo_q, hi_q = (1 - ci) / 2, 1 - (1 - ci) / 2
    if _exact_size(diffs) <= exact_limit:
        values, probs = np.zeros(1), np.ones(1)
        for d in diffs:
            m, p = _resample_means(d)
            values = (values[:, None] + m[None, :]).ravel()
            probs = (probs[:, None] * p[None, :]).ravel()
        values /= len(diffs)
        low = _weighted_quantile(values, probs, lo_q)
        return low, _weighted_quantile(values, probs, hi_q), "exact"
    rng = np.random.default_rng(seed)
    boot = np.zeros(reps)
    for d in diffs:
        boot += d[rng.integers(0, len(d), size=(reps, len(d)))].mean(axis=1)
    boot /= len(diffs)
    low = float(np.quantile(boot, lo_q, method="inverted_cdf"))
    high = float(np.quantile(boot, hi_q, method="inverted_cdf"))
    return low, high, f"{reps} resamples"


def _welch(variances: np.ndarray, n: np.ndarray, strata: int) -> tuple[float, float]:
    """(standard error, Welch-Satterthwaite degrees of freedom) of the mean over ``strata``
    of per-stratum means with sample variances ``variances`` over ``n`` values each."""
    v = variances / n
    se = float(np.sqrt(v.sum()) / strata)
    denom = float(np.sum(v**2 / (n - 1)))
    df = float(v.sum() ** 2 / denom) if denom > 0 else float("inf")
    return se, df


def stratified_t_ci(diffs: Sequence[np.ndarray], *, ci: float = 0.95) -> tuple[float, float]:
    """t-based CI of the mean over strata of each stratum's mean: the estimate +- t(df) SE,
    SE^2 = sum_d s_d^2 / n_d / D^2, df by Welch-Satterthwaite (one stratum: the paired t-test's
    n - 1). (nan, nan) when a stratum has fewer than 2 values."""
    from scipy import stats

    diffs = [np.asarray(d, dtype=float) for d in diffs]
    if any(len(d) < 2 for d in diffs):
        return float("nan"), float("nan")
    est = float(np.mean([d.mean() for d in diffs]))
    var = np.array([d.var(ddof=1) for d in diffs])
    se, df = _welch(var, np.array([len(d) for d in diffs], dtype=float), len(diffs))
    if se == 0:
        return est, est
    half = float(stats.t.ppf(1 - (1 - ci) / 2, df)) * se
    return est - half, est + half


def _t_test_power(effect: float, se: float, df: float, alpha: float) -> float:
    """The probability that a two-sided t-test at level ``alpha`` (``df`` degrees of freedom,
    standard error ``se``) rejects when the true mean difference is ``effect``: the noncentral
    t's mass beyond the critical values."""
    from scipy import stats

    critical = float(stats.t.ppf(1 - alpha / 2, df))
    shift = effect / se
    upper = float(stats.nct.sf(critical, df, shift))
    lower = float(stats.nct.cdf(-critical, df, shift))  # far below 1e-10 where scipy gives nan
    return upper + (0.0 if math.isnan(lower) else lower)


def minimum_detectable_effect(
    diffs: Sequence[np.ndarray], seeds: int, *, alpha: float = 0.05, power: float = POWER
) -> float:
    """The smallest true mean difference a two-sided t-test at level ``alpha`` detects with
    probability ``power`` when every stratum has ``seeds`` seed pairs, with each stratum's
    spread at its observed sample variance (SE and df as :func:`stratified_t_ci`): solved
    exactly on the noncentral t. (The textbook shortcut (t(1 - alpha/2) + t(power)) SE falls
    short at few seeds: at 3 seeds its power is 0.77, not 0.80.) nan when a stratum has fewer
    than 2 values."""
    from scipy import optimize, stats

    diffs = [np.asarray(d, dtype=float) for d in diffs]
    if any(len(d) < 2 for d in diffs) or seeds < 2:
        return float("nan")
    var = np.array([d.var(ddof=1) for d in diffs])
    se, df = _welch(var, np.full(len(diffs), float(seeds)), len(diffs))
    if se == 0:
        return 0.0
    shortcut = float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * se)
    return float(
        optimize.brentq(
            lambda effect: _t_test_power(effect, se, df, alpha) - power,
            0.5 * shortcut,
            4.0 * shortcut,
            xtol=1e-12 * shortcut,
        )
    )


def seeds_to_detect(
    diffs: Sequence[np.ndarray], effect: float, *, most: int = 1000, **kw: Any
) -> int | None:
    """The fewest seeds per stratum whose :func:`minimum_detectable_effect` is at most
    ``|effect|`` (it falls as seeds grow: found by bisection); None past ``most`` (or without
    a spread to measure)."""
    if not effect or not np.isfinite(minimum_detectable_effect(diffs, 2, **kw)):
        return None
    if minimum_detectable_effect(diffs, most, **kw) > abs(effect):
        return None
    low, high = 1, most  # MDE(low) > |effect| (or low < 2), MDE(high) <= |effect|
    while high - low > 1:
        mid = (low + high) // 2
        if mid >= 2 and minimum_detectable_effect(diffs, mid, **kw) <= abs(effect):
            high = mid
        else:
            low = mid
    return high


def _seeds_needed_text(row: dict[str, Any]) -> str:
    if row["seeds"] < 2 or not np.isfinite(row["mde"]):
        return "n/a"  # no spread to measure with fewer than 2 pairs
    return "more than 1000" if row["seeds_needed"] is None else str(row["seeds_needed"])


def mean_paired_difference(
    cells: dict, a: str, b: str, *, reps: int, seed: int, ci: float = 0.95
) -> dict[str, Any] | None:
    """a - b over every dataset both were run on: the mean over datasets of the mean paired
    (same-seed) difference, with a stratified percentile-bootstrap CI (seed pairs resampled
    within each dataset; enumerated exactly when the resamples are few), a t-based CI beside it
    (Welch-Satterthwaite), and the minimum detectable effect at the seed count of the grid (the
    fewest pairs of any dataset) with the seeds per dataset the estimate would need. None when
    they share no dataset and seed.

    Differences of one unit only are averaged: the datasets scored by normalised score when
    there are such (those scored by raw return are left out, as from the aggregate), and a
    single dataset's returns otherwise (the returns of two environments share no scale)."""
    rows = paired_differences(cells, a, b)
    normalized = [r for r in rows if cells[(a, r["dataset"])].kind == "normalized"]
    rows = normalized if normalized else rows[:1] if len(rows) == 1 else []
    diffs = []
    for row in rows:
        diffs.append(np.array([float(d) for d in row["diffs"].split()]))
    if not diffs:
        return None
    low, high, how = stratified_bootstrap_ci(diffs, reps=reps, seed=seed, ci=ci)
    t_low, t_high = stratified_t_ci(diffs, ci=ci)
    estimate = float(np.mean([d.mean() for d in diffs]))
    grid = min(len(d) for d in diffs)
    return {
        "a": a,
        "b": b,
        "datasets": len(diffs),
        "pairs": int(sum(len(d) for d in diffs)),
        "estimate": estimate,
        "ci_low": low,
        "ci_high": high,
        "bootstrap": how,
        "t_low": t_low,
        "t_high": t_high,
        "seeds": grid,
        "mde": minimum_detectable_effect(diffs, grid),
        "seeds_needed": seeds_to_detect(diffs, estimate),  # None: past 1000, or no spread
    }


def diagnostics_rows(cells: dict) -> list[dict[str, Any]]:
    """Per (label, dataset): each diagnostic's late-training mean, averaged over the seeds
    whose runs log it (None where none does), and under ``<column>_runs`` how many do (a
    column added to training after some runs finished rests on fewer runs than ``seeds``)."""
    rows = []
    for key in sorted(cells, key=lambda k: (k[1], k[0])):
        cell = cells[key]
        row: dict[str, Any] = {
            "recipe": cell.label,
            "dataset": cell.dataset,
            "seeds": len(cell.runs),
        }
        for column in DIAGNOSTICS:
            values = [r.diagnostics[column] for r in cell.runs if column in r.diagnostics]
            row[column] = float(np.mean(values)) if values else None
            row[f"{column}_runs"] = len(values)
        rows.append(row)
    return rows


def improvement_probability(x: np.ndarray, y: np.ndarray) -> float:
    """rliable's ``metrics.probability_of_improvement`` for score matrices ``x`` [runs, tasks]
    and ``y`` [runs', tasks]: per task the Mann-Whitney U statistic of x over y divided by the
    number of pairs, P(X > Y) + P(X = Y) / 2 over all run pairs, then the mean over tasks.
    Computed here over all pairs at once, the same number without a SciPy test per task and
    resample (those made a report's bootstrap of 10,000 resamples take minutes)."""
    diff = np.asarray(x, dtype=float)[:, None, :] - np.asarray(y, dtype=float)[None, :, :]
    per_task = ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(0, 1))
    return float(per_task.mean())


def probability_of_improvement(
    cells: dict, a: str, b: str, *, reps: int, seed: int, ci: float = 0.95
) -> tuple[float, float, float, int] | None:
    """rliable's P(a > b) averaged over the datasets both were run on, with its 95% CI (its
    bootstrap, with the statistic computed by :func:`improvement_probability`)."""
    from rliable import library

    datasets = sorted(d for _, d in cells if (a, d) in cells and (b, d) in cells)
    datasets = sorted(set(datasets))
    if not datasets:
        return None
    xa, _ = _score_matrix(cells, a, datasets)
    xb, _ = _score_matrix(cells, b, datasets)
    with _seeded(seed):
        point, interval = library.get_interval_estimates(
            {"p": [xa, xb]},
            lambda x, y: np.array([improvement_probability(x, y)]),
            reps=reps,
            confidence_interval_size=ci,
        )
    iv = np.asarray(interval["p"], dtype=float).reshape(2, -1)
    return float(np.asarray(point["p"]).ravel()[0]), float(iv[0, 0]), float(iv[1, 0]), len(datasets)


def curve_band(
    curves: list[list[tuple[int, float]]], *, reps: int, seed: int, ci: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean over runs and a percentile-bootstrap CI of that mean, at every step."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for curve in curves:
        for step, score in curve:
            by_step[step].append(score)
    steps = np.array(sorted(by_step), dtype=float)
    rng = np.random.default_rng(seed)
    mean, low, high = [], [], []
    for step in sorted(by_step):
        values = np.asarray(by_step[step])
        mean.append(values.mean())
        if len(values) > 1:
            boot = values[rng.integers(0, len(values), size=(reps, len(values)))].mean(axis=1)
            low.append(np.quantile(boot, (1 - ci) / 2))
            high.append(np.quantile(boot, 1 - (1 - ci) / 2))
        else:
            low.append(values[0])
            high.append(values[0])
    return steps, np.array(mean), np.array(low), np.array(high)


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib's object API: no pyplot, no global state)


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def learning_curves_figure(runs: list[Run], labels: list[str], *, reps: int, seed: int):
    """The learning-curve figure (a matplotlib ``Figure``), or None when no run has a curve.

    One panel per dataset: per label the mean over seeds with a 95% bootstrap band, and the
    data's behaviour level (``behavior_normalized_score`` of result.json) as a dashed line. A
    label whose runs were evaluated once only is drawn as a point, and the panel says so.
    """
    from matplotlib.figure import Figure

    def curve(run: Run) -> list[tuple[int, float]]:
        return run.curves.get(run.score_kind, []) if run.status == "complete" else []

    datasets = sorted({r.dataset for r in runs if curve(r)})
    if not datasets:
        return None
    colors = _colors(labels)
    ncols = min(3, len(datasets))
    nrows = math.ceil(len(datasets) / ncols)
    # at least 6.4 in wide: one panel still holds the title on one line
    fig = Figure(figsize=(max(4.6 * ncols, 6.4), 3.4 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, dataset in zip(axes, datasets, strict=False):
        single = []  # labels whose runs have one evaluation each
        for label in labels:
            curves = [curve(r) for r in runs if r.label == label and r.dataset == dataset]
            curves = [c for c in curves if c]
            if not curves:
                continue
            steps, mean, low, high = curve_band(curves, reps=reps, seed=seed)
            seeds = f"{len(curves)} seed{'s' if len(curves) > 1 else ''}"
            if len(steps) == 1:
                single.append(label)
                ax.errorbar(
                    steps,
                    mean,
                    yerr=[mean - low, high - mean],
                    color=colors[label],
                    marker="o",
                    markersize=6,
                    capsize=3,
                    linestyle="none",
                    label=f"{label} ({seeds}, 1 evaluation)",
                )
                continue
            name = f"{label} ({seeds})"
            ax.plot(steps, mean, color=colors[label], marker="o", markersize=3, label=name)
            ax.fill_between(steps, low, high, color=colors[label], alpha=0.2, linewidth=0)
        behavior = [r.behavior_score for r in runs if r.dataset == dataset and curve(r)]
        behavior = [b for b in behavior if b is not None]
        if behavior and all(r.score_kind == "normalized" for r in runs if r.dataset == dataset):
            ax.axhline(
                float(np.mean(behavior)),
                color="grey",
                linestyle="--",
                linewidth=1,
                label="behaviour policy (data)",
            )
        if single:
            ax.text(
                0.02,
                0.98,
                "one evaluation per run: a point, not a curve",
                transform=ax.transAxes,
                fontsize="x-small",
                va="top",
                color="dimgrey",
            )
        ax.set_title(dataset, fontsize="medium")
        ax.set_xlabel("training step")
        kinds = {r.score_kind for r in runs if r.dataset == dataset and curve(r)}
        ax.set_ylabel("normalised score" if kinds == {"normalized"} else "return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(datasets) :]:
        ax.set_visible(False)
    fig.suptitle(
        "Evaluation score during training: mean over seeds, 95% bootstrap CI", fontsize="medium"
    )
    return fig


def aggregate_figure(agg: Aggregate, colors: dict[str, Any]):
    """The aggregate metrics with their confidence intervals (a matplotlib ``Figure``)."""
    from matplotlib.figure import Figure

    n = len(agg.labels)
    fig = Figure(figsize=(3.0 * len(METRICS), 1.0 + 0.45 * n), layout="constrained")
    axes = fig.subplots(1, len(METRICS), sharey=True)
    for m, (ax, metric) in enumerate(zip(axes, METRICS, strict=True)):
        for i, label in enumerate(agg.labels):
            lo, hi = agg.low[label][m], agg.high[label][m]
            ax.barh(i, max(hi - lo, 1e-9), left=lo, height=0.6, color=colors[label], alpha=0.75)
            ax.vlines(agg.point[label][m], i - 0.3, i + 0.3, color="black")
        ax.set_title(METRIC_TITLES[metric] + (" (lower is better)" if m == 3 else ""), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("normalised score", fontsize=8)
    axes[0].set_yticks(range(n), agg.labels)
    axes[0].invert_yaxis()
    fig.suptitle(
        f"Aggregate over {len(agg.datasets)} datasets, 95% stratified-bootstrap CIs", fontsize=10
    )
    return fig


def save_figure(fig, stem: Path, formats: Sequence[str], dpi: int) -> list[Path]:
    """Write ``fig`` as ``<stem>.<format>`` for each format; vector files carry no date, so the
    same report gives the same bytes."""
    no_date = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, dpi=dpi, metadata=no_date.get(fmt))
        paths.append(path)
    return paths


def parse_formats(text: str | Sequence[str]) -> list[str]:
    """``"png,pdf"`` (or a list) -> checked, de-duplicated figure formats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    formats = list(dict.fromkeys(f.strip().lower().lstrip(".") for f in items if f.strip()))
    bad = [f for f in formats if f not in FIGURE_FORMATS]
    if bad or not formats:
        raise ConfigError(
            f"--format {','.join(items) if items else '(empty)'}: figure formats are "
            f"{', '.join(FIGURE_FORMATS)}, comma-separated (e.g. --format png,pdf)"
        )
    return formats


def few_seeds(cells: dict[tuple[str, str], Cell]) -> dict[str, int]:
    """Labels with fewer than :data:`MIN_SEEDS` seeds on some dataset -> their fewest seeds."""
    fewest: dict[str, int] = {}
    for (label, _), cell in cells.items():
        fewest[label] = min(fewest.get(label, len(cell.runs)), len(cell.runs))
    return {label: n for label, n in sorted(fewest.items()) if n < MIN_SEEDS}


def few_seeds_warning(fewest: dict[str, int]) -> str:
    counts = ", ".join(f"{label}: {n}" for label, n in fewest.items())
    return (
        f"fewer than {MIN_SEEDS} seeds per dataset ({counts}): bootstrap confidence intervals "
        "and the probability of improvement over so few runs can only reshuffle those few "
        "scores; the intervals come out too narrow and the probability takes only a few "
        f"values. Read them as descriptive and run {MIN_SEEDS} or more seeds "
        "(`-m seed=0,1,2,3,4`) before drawing conclusions"
    )


# ---------------------------------------------------------------------------------------------
# Writing


def _num(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _csv_value(x: Any) -> Any:
    if isinstance(x, float):
        return "" if not math.isfinite(x) else f"{x:.6g}"
    return "" if x is None else x


def write_csv(path: Path, rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in fields})


def score_definition(runs: Sequence[Run]) -> str:
    """What a normalised score is for these runs: D4RL's 100 (R - R_min) / (R_max - R_min), the
    success rate in percent on goal-reaching data (OGBench; result.json says which), or both
    where a report holds both kinds."""
    done = [r for r in runs if r.status == "complete"]
    success = [r.success_scored for r in done]
    if success and all(success):
        return "Score = the success rate (percent of the evaluation episodes that succeed)"
    if any(success):
        return (
            "Score = 100 (R - R_min) / (R_max - R_min) or, on goal-reaching datasets, the "
            "success rate in percent (each run's result.json says which)"
        )
    return "Normalised score = 100 (R - R_min) / (R_max - R_min)"


def episodes_per_evaluation(runs: Sequence[Run]) -> str:
    """The evaluation episodes per evaluation of the complete runs: "10", "10-50", or "" when
    none says."""
    counts = sorted({r.episodes for r in runs if r.status == "complete" and r.episodes})
    if not counts:
        return ""
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _ci_text(point: float, low: float, high: float) -> str:
    return f"{point:.1f} [{low:.1f}, {high:.1f}]"


@dataclass
class Report:
    out_dir: Path
    runs: list[Run]
    files: list[Path]


def make_report(
    dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    compare: Sequence[str] | None = None,
    reps: int = DEFAULT_REPS,
    seed: int = 0,
    figures: bool = True,
    formats: str | Sequence[str] = ("png",),
    dpi: int = DEFAULT_DPI,
    command: str | None = None,
    score: str = "final",
    tags: dict[str, str] | None = None,
    extra_pairs: Sequence[Sequence[str]] = (),
) -> Report:
    """Build the report (see the module docstring); returns where it went and the runs found.

    ``score``: ``final`` (each run's final evaluation, result.json) or ``last:K`` (the mean of
    its last K evaluations, metrics.csv).

    ``tags``: folder (one of ``dirs``) -> a tag appended to the label of every run found under
    it, e.g. runs of an older setting kept apart (``iql (compressed lr)``); the runs of each
    folder get their labels among themselves. ``extra_pairs``: more (a, b) recipes or labels to
    difference, beside ``compare``'s first against each other.

    ``formats`` are the figure formats (any of png, pdf, svg; report.md shows the PNG, else the
    SVG, else links the PDF), written at ``dpi`` dots per inch. Fewer than :data:`MIN_SEEDS`
    seeds per dataset raise a warning (``warnings.warn``) that report.md repeats.
    """
    if not dirs:
        raise ConfigError("divo report needs at least one directory, e.g. divo report runs/")
    if reps < 10:
        raise ConfigError(f"--reps={reps} is too few bootstrap samples; use at least 1000")
    formats = parse_formats(formats)
    last_k = parse_score(score)
    if not isinstance(dpi, int) or isinstance(dpi, bool) or not 50 <= dpi <= 1200:
        raise ConfigError(f"--dpi={dpi!r}: give whole dots per inch from 50 to 1200 (default 200)")
    try:
        import rliable.library  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise DivoError(
            f"divo report needs the report extra ({exc.name} is missing): {install_hint('report')}"
        ) from None

    runs = find_runs(dirs)
    if not runs:
        raise ConfigError(
            f"no runs found under {', '.join(map(str, dirs))}; a run directory holds result.json, "
            "config.yaml and metrics.csv (as `divo train` writes them)"
        )
    _label_runs(runs, dirs, tags or {})
    drop_duplicates(runs)
    data_notes = check_same_data(runs)
    check_same_references(runs)
    for note in data_notes:
        warnings.warn(note, stacklevel=2)
    choose_score_kinds(runs)
    if last_k is not None:
        use_last_evaluations(runs, last_k)
    stretch_notes = score_notes(runs, last_k)
    for note in stretch_notes:
        warnings.warn(note, stacklevel=2)
    cells = build_cells(runs)
    compare_labels = resolve_compare(compare, runs) if compare else []
    pair_list = [(compare_labels[0], other) for other in compare_labels[1:]]
    for a, b in extra_pairs:
        pair = tuple(resolve_compare([str(a), str(b)], runs))
        if pair not in pair_list:
            pair_list.append(pair)
    if not cells:
        counts = defaultdict(int)
        for r in runs:
            counts[r.status] += 1
        status_txt = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        if last_k is not None and any(r.note.endswith("ending at the final step") for r in runs):
            raise ConfigError(
                f"none of the {len(runs)} runs under {', '.join(map(str, dirs))} has {last_k} "
                f"evaluations ending at its final step ({status_txt}): use a smaller K in "
                "--score last:K, or --score final"
            )
        example = next((r for r in runs if r.note), None)
        why = f"; e.g. {example.path}: {example.note}" if example is not None else ""
        raise ConfigError(
            f"none of the {len(runs)} runs under {', '.join(map(str, dirs))} has finished with a "
            f"final evaluation ({status_txt}{why}); wait for them, or check their train.log"
        )
    out = Path(out_dir) if out_dir is not None else Path(dirs[0]) / "report"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    labels = sorted({lb for lb, _ in cells})
    summaries = [cells[k].summary() for k in sorted(cells, key=lambda k: (k[1], k[0]))]
    write_csv(
        out / "scores.csv",
        summaries,
        [
            "recipe",
            "dataset",
            "seeds",
            "seed_list",
            "steps",
            "score_kind",
            "score_mean",
            "score_std",
            "score_min",
            "score_max",
        ],
    )
    files.append(out / "scores.csv")

    run_rows = [
        {
            "run": r.shown_path,
            "status": r.status,
            "recipe": r.label or r.recipe,
            "dataset": r.dataset,
            "seed": r.seed,
            "steps": r.steps,
            "last_logged_step": r.last_step,
            "normalized_score": r.normalized,
            "return_mean": r.return_mean,
            "note": r.note,
        }
        for r in runs
    ]
    write_csv(out / "runs.csv", run_rows, list(run_rows[0]))
    files.append(out / "runs.csv")

    agg = compute_aggregate(cells, reps=reps, seed=seed)
    if agg is not None:
        agg_rows = [
            {
                "recipe": label,
                "metric": metric,
                "estimate": float(agg.point[label][m]),
                "ci_low": float(agg.low[label][m]),
                "ci_high": float(agg.high[label][m]),
                "datasets": len(agg.datasets),
                "seeds_per_dataset": agg.seeds_per_dataset[label],
            }
            for label in agg.labels
            for m, metric in enumerate(METRICS)
        ]
        write_csv(out / "aggregate.csv", agg_rows, list(agg_rows[0]))
        files.append(out / "aggregate.csv")

    diag_rows = diagnostics_rows(cells)
    diag_columns = [c for c in DIAGNOSTICS if any(r[c] is not None for r in diag_rows)]
    diag_counts = [f"{c}_runs" for c in diag_columns]
    partial = any(0 < r[f"{c}_runs"] < r["seeds"] for r in diag_rows for c in diag_columns)
    if diag_columns:
        write_csv(
            out / "diagnostics.csv",
            [
                {k: r[k] for k in ("recipe", "dataset", "seeds", *diag_columns, *diag_counts)}
                for r in diag_rows
            ],
            ["recipe", "dataset", "seeds", *diag_columns, *diag_counts],
        )
        files.append(out / "diagnostics.csv")

    pairs: list[dict[str, Any]] = []
    overall: list[dict[str, Any]] = []
    improvements = []
    for a, other in pair_list:
        pairs += [
            _with_intervals(row, reps=reps, seed=seed)
            for row in paired_differences(cells, a, other)
        ]
        mean_diff = mean_paired_difference(cells, a, other, reps=reps, seed=seed)
        if mean_diff is not None:
            overall.append(mean_diff)
        poi = probability_of_improvement(cells, a, other, reps=reps, seed=seed)
        if poi is not None:
            improvements.append((a, other, *poi))
    if pair_list:
        write_csv(
            out / "paired.csv",
            pairs,
            [
                "dataset",
                "a",
                "b",
                "pairs",
                "seed_list",
                "diff_mean",
                "diff_std",
                "diff_min",
                "diff_max",
                "a_better",
                "b_better",
                "ci_low",
                "ci_high",
                "bootstrap",
                "t_low",
                "t_high",
                "diffs",
            ],
        )
        files.append(out / "paired.csv")
        if overall:
            write_csv(out / "paired_overall.csv", overall, list(overall[0]))
            files.append(out / "paired_overall.csv")

    fewest = few_seeds(cells)
    if fewest:
        warnings.warn(few_seeds_warning(fewest), stacklevel=2)

    curves_fig = aggr_fig = None
    if figures:
        curves_fig = learning_curves_figure(runs, labels, reps=reps, seed=seed)
        if curves_fig is not None:
            files += save_figure(curves_fig, out / "learning_curves", formats, dpi)
        if agg is not None:
            aggr_fig = aggregate_figure(agg, _colors(labels))
            files += save_figure(aggr_fig, out / "aggregate_intervals", formats, dpi)

    def show(stem: str, alt: str) -> list[str]:
        """Markdown for one figure: the PNG, else the SVG, else a link to the PDF."""
        for fmt in ("png", "svg"):
            if fmt in formats:
                return [f"![{alt}]({stem}.{fmt})", ""]
        return [f"[{alt} (PDF)]({stem}.pdf)", ""]

    # ------------------------------------------------------------------ Markdown
    counts = defaultdict(int)
    for r in runs:
        counts[r.status] += 1
    status_txt = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    md = ["# divo report", ""]
    if command:
        md += [f"Made by `{command}`.", ""]
    md += [
        f"Runs under {', '.join(f'`{d}`' for d in dirs)}: {len(runs)} found ({status_txt}).",
        "",
    ]
    if fewest:
        md += [f"**Warning:** {few_seeds_warning(fewest)}.", ""]
    for note in data_notes:
        md += [f"**Data:** {note[0].upper()}{note[1:]}.", ""]
    for note in stretch_notes:
        md += [f"**Score:** {note[0].upper()}{note[1:]}.", ""]
    if last_k is None:
        score_name, evaluation = "Final normalised score", "the final evaluation of each run"
        source = "`result.json`"
    else:
        score_name = f"Mean normalised score of the last {last_k} evaluations"
        evaluation = f"each run's last {last_k} evaluations, averaged"
        source = "`metrics.csv`; `--score final` gives the final evaluation alone"
    md += [
        f"## {score_name} per recipe and dataset",
        "",
        f"{score_definition(runs)} of {evaluation} ({source}), mean +- sample standard "
        "deviation over seeds.",
        "",
    ]
    if any(s["score_kind"] == "return" for s in summaries):
        md += [
            "A dataset marked *(return)* has no reference scores (R_min, R_max): its runs are "
            "compared by their mean return R instead, and it is left out of the "
            "aggregate.",
            "",
        ]
    md += _md_table(
        ["recipe", "dataset", "seeds", "steps", "score (mean +- std)", "min", "max"],
        [
            [
                s["recipe"],
                s["dataset"] + (" *(return)*" if s["score_kind"] == "return" else ""),
                s["seeds"],
                s["steps"],
                f"{_num(s['score_mean'])} +- {_num(s['score_std'])}",
                _num(s["score_min"]),
                _num(s["score_max"]),
            ]
            for s in summaries
        ],
    )
    md += ["", "## Aggregate over datasets", ""]
    if agg is None:
        md += [
            "No aggregate: the recipes share no dataset with reference scores.",
            "",
        ]
    else:
        seeds_txt = ", ".join(f"{lb}: {n}" for lb, n in agg.seeds_per_dataset.items())
        md += [
            f"Over {len(agg.datasets)} datasets ({', '.join(agg.datasets)}); seeds per dataset: "
            f"{seeds_txt}. Point estimates with 95% stratified-bootstrap confidence intervals "
            f"(rliable, {reps} resamples, percentile method). Mean and median are over datasets "
            "of the per-dataset mean; IQM is the mean of the middle 50% of all run x dataset "
            "scores; optimality gap is the mean of max(100 - score, 0) (lower is better).",
            "",
        ]
        md += _md_table(
            ["recipe", *[METRIC_TITLES[m] for m in METRICS]],
            [
                [label]
                + [
                    _ci_text(agg.point[label][m], agg.low[label][m], agg.high[label][m])
                    for m in range(len(METRICS))
                ]
                for label in agg.labels
            ],
        )
        md += [""] + [f"Note: {n}." for n in agg.notes] + ([""] if agg.notes else [])
        if aggr_fig is not None:
            md += show("aggregate_intervals", "aggregate metrics")
    if pair_list:
        md += [
            "## Paired differences",
            "",
            f"{score_name} (or return, on datasets marked *(return)* above) of the first "
            "recipe minus the other's, on the same seeds (mean +- sample std over the seed "
            "pairs), with two 95% intervals for the mean difference: the percentile bootstrap "
            "of the seed pairs (enumerated exactly where the resamples are few, else "
            f"{reps} resamples) and the paired t-test's. With 3 seeds the bootstrap can only "
            "reshuffle three numbers and comes out far narrower than the t-interval: read the "
            "t-interval.",
            "",
        ]
        md += _md_table(
            [
                "dataset",
                "difference",
                "pairs",
                "mean +- std",
                "min",
                "max",
                "first better",
                "bootstrap CI",
                "t CI",
            ],
            [
                [
                    p["dataset"],
                    f"{p['a']} - {p['b']}",
                    p["pairs"],
                    f"{_num(p['diff_mean'])} +- {_num(p['diff_std'])}",
                    _num(p["diff_min"]),
                    _num(p["diff_max"]),
                    f"{p['a_better']}/{p['pairs']}",
                    f"[{_num(p['ci_low'])}, {_num(p['ci_high'])}]",
                    f"[{_num(p['t_low'])}, {_num(p['t_high'])}]" if p["pairs"] > 1 else "n/a",
                ]
                for p in pairs
            ],
        )
        if not pairs:
            md += ["", "No dataset has runs of both with the same seed."]
        if overall:
            md += [
                "",
                "Over datasets: the mean over datasets of the per-dataset mean paired difference; "
                "its 95% stratified percentile-bootstrap CI (seed pairs resampled within each "
                "dataset; *exact*: every resample enumerated) and its t-based CI (standard error "
                "from each dataset's variance of the differences, Welch-Satterthwaite degrees of "
                "freedom); the minimum detectable effect (MDE: the true difference a two-sided "
                f"t-test at 5% finds with probability {POWER:.0%}, on the noncentral t) at the "
                "grid's seeds per "
                "dataset, and the seeds per dataset at which the MDE falls to the estimate.",
                "",
            ]
            md += _md_table(
                [
                    "difference",
                    "datasets",
                    "pairs",
                    "estimate [bootstrap CI]",
                    "t CI",
                    "MDE (seeds)",
                    "seeds to detect the estimate",
                ],
                [
                    [
                        f"{o['a']} - {o['b']}",
                        o["datasets"],
                        o["pairs"],
                        _ci_text(o["estimate"], o["ci_low"], o["ci_high"])
                        + (" exact" if o["bootstrap"] == "exact" else ""),
                        "n/a" if o["seeds"] < 2 else f"[{_num(o['t_low'])}, {_num(o['t_high'])}]",
                        "n/a" if o["seeds"] < 2 else f"{_num(o['mde'])} ({o['seeds']})",
                        _seeds_needed_text(o),
                    ]
                    for o in overall
                ],
            )
        for a, b, p, lo, hi, n in improvements:
            md += [
                "",
                f"Probability of improvement P({a} > {b}) over {n} datasets (rliable): "
                f"{p:.2f} [{lo:.2f}, {hi:.2f}] (95% CI).",
            ]
        md += [""]
    if curves_fig is not None:
        md += ["## Learning curves", ""]
        single = sorted(
            {
                f"{cell.label} on {cell.dataset}"
                for cell in cells.values()
                if all(len(r.curves.get(r.score_kind, [])) == 1 for r in cell.runs)
            }
        )
        if single:
            md += [
                "One evaluation per run (drawn as a point, not a curve): "
                + ", ".join(single)
                + ". Set `train.eval_every` below `train.steps` (or keep `train.eval_at_start`) "
                "for a curve.",
                "",
            ]
        md += show("learning_curves", "learning curves")
    if diag_columns:
        md += [
            "## Training diagnostics",
            "",
            "From metrics.csv: each column's mean over the last "
            f"{DIAGNOSTIC_TAIL:.0%} of the logged steps, then over seeds. "
            + "; ".join(f"*{DIAGNOSTICS[c]}*: `{c}`" for c in diag_columns)
            + ". A(sample) - A(data): the behaviour model's samples' mean advantage minus the "
            "dataset actions' at the same states (> 0: the model is better than its data); "
            "targets from model: the share of the actor's BC targets that are model samples; "
            "G (eval): the discounted return (in training-reward units) that followed the "
            "evaluation policy's own steps, and Q - G (eval) the critic's Q there (min(Q1, "
            "Q2); the heads' mean for runs whose train.log says 'critic mean Q', as `fql` "
            "reads its critic) minus it (> 0: the critic overestimates the policy it guides), "
            "over the runs that log them"
            + (
                "; Q - G, at least (eval): the same with the return bounded from above where "
                "episodes ran into their time limit (a lower bound on the overestimation; "
                "docs/runs.md, 'The critic check')."
                if "eval_q_bias_min" in diag_columns
                else "."
            )
            + (
                " A value marked (k of n) is the mean over the k runs of its n seeds that log "
                "that column (runs that finished before divo logged it have none): it rests on "
                "those k alone."
                if partial
                else ""
            ),
            "",
        ]

        def entry(r: dict[str, Any], c: str) -> str:
            if r[c] is None:
                return ""
            k = r[f"{c}_runs"]
            return f"{r[c]:.3g}" + (f" ({k} of {r['seeds']})" if k < r["seeds"] else "")

        md += _md_table(
            ["recipe", "dataset", "seeds", *[DIAGNOSTICS[c] for c in diag_columns]],
            [
                [r["recipe"], r["dataset"], r["seeds"]] + [entry(r, c) for c in diag_columns]
                for r in diag_rows
            ],
        )
        md += [""]
    others = [r for r in runs if r.status != "complete"]
    md += ["## Runs left out", ""]
    if others:
        md += _md_table(
            ["run", "status", "recipe", "dataset", "seed", "note"],
            [
                [f"`{r.shown_path}`", r.status, r.label or r.recipe, r.dataset, r.seed, r.note]
                for r in others
            ],
        )
    else:
        md += ["None: every run found finished with a score."]
    md += [
        "",
        "Files: " + ", ".join(f"[{p.name}]({p.name})" for p in files) + ".",
        "",
    ]
    (out / "report.md").write_text("\n".join(md))
    files.insert(0, out / "report.md")
    return Report(out_dir=out, runs=runs, files=files)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through divo's error path, not argparse's exit
        raise ConfigError(f"divo report: {message}; see divo report --help")


def main(argv: Sequence[str]) -> int:
    parser = _Parser(
        prog="divo report",
        description="Tables, aggregate metrics with bootstrap CIs and figures from finished runs.",
    )
    parser.add_argument("dirs", nargs="+", help="folders holding run directories (searched)")
    parser.add_argument("--out", help="output folder (default: <first dir>/report)")
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="RECIPE",
        help="paired differences of the first recipe against each other one (by seed)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=DEFAULT_REPS,
        help=f"bootstrap resamples (default {DEFAULT_REPS}; rliable: 50000); a paired "
        "difference's bootstrap with few combinations is enumerated exactly instead",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument(
        "--format",
        default="png",
        metavar="FORMATS",
        help=f"figure formats, comma-separated, of {', '.join(FIGURE_FORMATS)} (default png; "
        "e.g. png,pdf,svg for a paper)",
    )
    parser.add_argument(
        "--dpi", type=int, default=DEFAULT_DPI, help=f"figure resolution (default {DEFAULT_DPI})"
    )
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")
    parser.add_argument(
        "--score",
        default="final",
        help="final (each run's final evaluation, default) or last:K (the mean of its last K "
        "evaluations, e.g. last:3; TD3+BC's protocol averages the final 10)",
    )
    ns = parser.parse_args(list(argv))
    command = "divo report " + " ".join(argv)
    report = make_report(
        ns.dirs,
        ns.out,
        compare=ns.compare,
        reps=ns.reps,
        seed=ns.seed,
        figures=not ns.no_figures,
        formats=ns.format,
        dpi=ns.dpi,
        command=command,
        score=ns.score,
    )
    counts = defaultdict(int)
    for r in report.runs:
        counts[r.status] += 1
    left = sum(n for s, n in counts.items() if s != "complete")
    print(
        f"divo: report on {len(report.runs)} runs ({counts['complete']} complete"
        + (f", {left} left out: see runs.csv" if left else "")
        + f") -> {report.out_dir / 'report.md'}"
    )
    return 0
