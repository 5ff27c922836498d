"""What every study shares: its settings, its command line, its cells and its page.

A study is a grid of *cells* (a training run, or a small experiment) whose finished outputs are
kept as small files that can be committed, so a study spans sittings: run again, it skips the
cells already done and rewrites its page after each new one. The three studies
(:mod:`~divo.studies.bandit`, :mod:`~divo.studies.diffusion_ql_toy`,
:mod:`~divo.studies.locomotion`) build on these pieces:

- :func:`study_settings`: ``recipes/study/<name>.yaml``, then a variant's YAML file, then
  ``key=value`` settings; an unknown setting is refused;
- :func:`study_arguments`: the command line every study shares (``key=value`` settings,
  ``--page-only``) plus its own options;
- :func:`run_cells`: the cells still to run, ``jobs`` at a time, the page rewritten after each;
- :func:`divo.files.write_json_atomic`: a cell's record is never half-written;
- :func:`check_data_as_kept`: before a new cell trains, the data here are the data the kept
  cells of its dataset trained on (a fresh machine regenerates OGBench's files).
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from divo.config import recipes_dir
from divo.errors import ConfigError, DatasetError, first_few
from divo.report import behavior_return_key

Cell = TypeVar("Cell")


def study_settings(
    settings_file: str, overrides: Sequence[str] = (), config: str | Path | None = None
) -> DictConfig:
    """The study's settings: ``recipes/<settings_file>``, then the YAML file ``config`` (a
    variant of the study: other overrides, results folder, ...), then dot-list ``overrides``.
    A top-level key the shipped settings do not have is refused, naming the known ones."""
    cfg = shipped = OmegaConf.load(recipes_dir() / settings_file)
    layers = []
    if config is not None:
        if not Path(config).is_file():
            raise ConfigError(f"study config {config} does not exist")
        layers.append((str(config), OmegaConf.load(config)))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"study settings are key=value pairs, got {' '.join(bad)}")
    layers.append(("key=value settings", OmegaConf.from_dotlist(list(overrides))))
    for where, extra in layers:
        unknown = sorted(set(extra) - set(cfg))
        if unknown:
            raise ConfigError(
                f"unknown study setting(s) {', '.join(unknown)} in {where}; the settings are "
                f"{', '.join(cfg)} (recipes/{settings_file})"
            )
        cfg = OmegaConf.merge(cfg, extra)
    check_setting_types(shipped, cfg, settings_file)
    return cfg


def check_setting_types(shipped: DictConfig, cfg: DictConfig, settings_file: str) -> None:
    """Refuse a setting of another kind than the shipped one: a list given as one value
    (``datasets=cube-single-...`` would be one cell per character), a count that is not an
    integer, a recipe that does not exist; before any data or cell is touched."""
    from divo.config import available_recipes

    for key in shipped:
        was, now = shipped.get(key), cfg.get(key)
        if now is None:
            continue
        if OmegaConf.is_list(was) and not OmegaConf.is_list(now):
            raise ConfigError(
                f"study setting {key}={now!r} must be a list, e.g. '{key}=[{now}]' "
                f"(recipes/{settings_file})"
            )
        if isinstance(was, int) and not isinstance(was, bool):
            if isinstance(now, bool) or not isinstance(now, int) or now < 0:
                raise ConfigError(
                    f"study setting {key}={now!r} must be an integer >= 0 (recipes/{settings_file})"
                )
    known = set(available_recipes())
    for key in ("recipes", "extra_recipes"):
        unknown = [str(r) for r in (cfg.get(key) or []) if str(r) not in known]
        if unknown:
            raise ConfigError(
                f"study setting {key} names no recipe {', '.join(unknown)}; the recipes are "
                f"{', '.join(sorted(known))}"
            )


def study_arguments(
    prog: str,
    description: str,
    argv: Sequence[str],
    settings_file: str,
    add: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """Parse a study's command line: ``key=value`` settings (``recipes/<settings_file>``),
    ``--page-only`` and the options ``add`` declares; settings may follow the options."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("overrides", nargs="*", help=f"key=value (recipes/{settings_file})")
    parser.add_argument(
        "--page-only", action="store_true", help="rewrite the page from finished cells only"
    )
    if add is not None:
        add(parser)
    ns = parser.parse_intermixed_args(list(argv))
    bad = [o for o in ns.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"study settings are key=value pairs, got {' '.join(bad)}")
    return ns


# the settings that pick a grid's cells rather than how each trains
SELECTION_KEYS = ("recipes", "extra_recipes", "datasets", "seeds")


def page_settings(
    cfg: DictConfig, overrides: Sequence[str], compose: Callable[[list[str]], DictConfig]
) -> DictConfig:
    """The settings a study's page is written from. A run narrowed to part of its grid by
    ``key=value`` selection (:data:`SELECTION_KEYS`: one task's column, one seed, ...) still
    writes the whole study's page when it writes to the study's own page: a column run as the
    docs say does not replace the page with a page of that column. ``compose(overrides)``
    builds the settings from the other ``key=value`` pairs. With a ``page=`` or ``results=``
    of its own, the selection is a study of its own and its page shows just that."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    rest = [o for o, k in zip(overrides, keys, strict=True) if k not in SELECTION_KEYS]
    if len(rest) == len(overrides) or {"page", "results"} & set(keys):
        return cfg
    return compose(rest)


def run_cells(
    todo: Iterable[Cell],
    run_one: Callable[[Cell], tuple[bool, str]],
    after_each: Callable[[], None],
    *,
    jobs: int = 1,
    log: Callable[[str], Any] = print,
) -> int:
    """Run each cell of ``todo`` (``jobs`` side by side); after each that finishes, log its
    line and call ``after_each`` (rewrite the page), one at a time. ``run_one(cell)`` returns
    (finished, a one-line account). Returns the number of cells that failed."""
    failed = 0
    lock = threading.Lock()

    def one(cell: Cell) -> None:
        nonlocal failed
        ok, message = run_one(cell)
        with lock:
            log("  " + message)
            if ok:
                after_each()
            else:
                failed += 1

    with ThreadPoolExecutor(max_workers=max(1, int(jobs))) as pool:
        list(pool.map(one, todo))
    return failed


def kept_data_records(
    results: Path, dataset: str
) -> list[tuple[Path, int | None, str | None, float | None]]:
    """(result.json, seed, data_fingerprint, behavior_return) of the kept cells on ``dataset``
    under ``results``/runs."""
    records = []
    for path in sorted((Path(results) / "runs").glob("*/*/seed*/result.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(result, dict) or result.get("dataset_id") != dataset:
            continue
        fingerprint = result.get("data_fingerprint")
        level = result.get("behavior_return")
        seed = result.get("seed")
        records.append(
            (
                path,
                seed if isinstance(seed, int) else None,
                fingerprint if isinstance(fingerprint, str) else None,
                float(level) if isinstance(level, int | float) else None,
            )
        )
    return records


def _differs(data: Any, fingerprint: str | None, level: float | None) -> str | None:
    """How the kept cell's data differ from ``data`` (None: the same, or not known)."""
    if fingerprint and data.fingerprint:
        if fingerprint != data.fingerprint:
            return f"fingerprint {fingerprint[:19]}... there, {data.fingerprint[:19]}... here"
        return None
    if level is None or data.behavior_return is None:
        return None
    there, here = behavior_return_key(level), behavior_return_key(data.behavior_return)
    return f"mean episode return {there} there, {here} here" if there != here else None


def check_data_as_kept(
    results: Path, cells: Iterable[Any], load: Callable[[str], Any] | None = None, log=print
) -> None:
    """Refuse to run new cells on data other than the kept cells of their (dataset, seed) trained
    on: the page pairs a seed's cells across recipes, so each seed's column must be one set of
    transitions.

    For each dataset of ``cells`` (objects with ``dataset`` and ``seed``) with kept cells,
    ``load(dataset)`` (an :class:`OfflineData`) is compared with them: its fingerprint with
    theirs, and for cells from before divo recorded one, its mean episode return with their
    ``behavior_return`` (6 significant digits). A kept cell of a seed the new cells also have
    that differs stops the study before any cell starts (hours are not spent on cells the page
    could not pair; ``divo report`` refuses them too). Kept cells of other seeds may differ (a
    machine that regenerated the files ran them): that is logged, the new column is whole."""
    cells = list(cells)
    for dataset in dict.fromkeys(str(c.dataset) for c in cells):
        kept = kept_data_records(results, dataset)
        if not kept:
            continue
        if load is None:
            from divo.data.load import load_offline_data as load
        data = load(dataset)
        seeds = {int(c.seed) for c in cells if str(c.dataset) == dataset}
        others = set()
        for path, seed, fingerprint, level in kept:
            how = _differs(data, fingerprint, level)
            if how is None:
                continue
            if seed in seeds:
                raise DatasetError(
                    f"the data of {dataset} here are not those its kept cells of seed {seed} "
                    f"trained on ({path.parent}: {how}); new cells of that seed could not be "
                    "paired with them. Make the same data (the same generator, settings, seed, "
                    "package versions and machine), run the other seeds (seeds=[...]), or move "
                    "that seed's kept cells aside to run its column again whole"
                )
            others.add(seed)
        checked = "fingerprint" if any(f for _, _, f, _ in kept) else "mean episode return"
        log(
            f"  data {dataset}: {checked} checked against its {len(kept)} kept cell(s)"
            + (
                f"; seed(s) {', '.join(map(str, sorted(others)))} trained on other data (another "
                "machine's files): each seed's column stays on one set"
                if others
                else ""
            )
        )


# what a cell's score depends on besides what trains (divo report counts them as bookkeeping:
# they never split a label); train.steps is left to the studies' `is_done` (a study run again
# with other steps retrains or extends its cells)
SCORED_KEYS = ("train.eval_every", "train.eval_episodes")


def settings_differences(saved: Path, expected: dict[str, Any]) -> list[str]:
    """``key: saved -> expected`` for each setting of the run config ``saved`` (a config.yaml)
    that differs from the flattened config ``expected``: every key both hold that is not
    bookkeeping (as ``divo report`` tells runs apart), plus :data:`SCORED_KEYS`. A key only one
    of them holds is left out (an option added since the run, with its old behaviour as the
    default, as the report reads it)."""
    from divo.report import _flatten, _is_bookkeeping

    try:
        ran = _flatten(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    except Exception as exc:  # noqa: BLE001 - unreadable: it cannot be shown to match
        return [f"{saved.name} unreadable ({type(exc).__name__})"]
    out = []
    for key in sorted(set(ran) & set(expected)):
        if key == "train.steps" or (_is_bookkeeping(key) and key not in SCORED_KEYS):
            continue
        old, new = (json.dumps(v, sort_keys=True, default=str) for v in (ran[key], expected[key]))
        if old != new:
            out.append(f"{key}: {old} -> {new}")
    return out


def check_settings_as_kept(
    cells: Iterable[Any],
    overrides_of: Callable[[Any], list[str]],
    kept_dir: Callable[[Any], Path],
    work_dir: Callable[[Any], Path],
    log=print,
) -> None:
    """Refuse a study whose kept cells, or whose runs in progress, were trained with other
    settings than the study now gives them (``overrides``, ``eval_every``, a recipe default
    changed since): a kept cell would count as done, and a run in progress resume, under
    settings the page would state but they never ran. Each cell (``recipe``, ``dataset``,
    ``seed``) is composed as the study's ``divo train <recipe> <overrides_of(cell)>`` and
    compared with ``kept_dir(cell)/config.yaml`` and, when it holds checkpoints,
    ``work_dir(cell)/config.yaml`` (:func:`settings_differences`). Raised before any cell
    starts; nothing on disk changes."""
    from divo.config import compose_recipe
    from divo.report import _flatten

    checked, problems = 0, []
    for cell in cells:
        places = [kept_dir(cell) / "config.yaml"]
        if any((work_dir(cell) / "checkpoints").glob("*.pt")):
            places.append(work_dir(cell) / "config.yaml")
        places = [p for p in places if p.is_file()]
        if not places:
            continue
        overrides = [o for o in overrides_of(cell) if not o.startswith("hydra.")]
        cfg = compose_recipe(str(cell.recipe), overrides)
        try:
            expected = _flatten(OmegaConf.to_container(cfg, resolve=True))
        except Exception:  # noqa: BLE001 - an interpolation only a run resolves
            expected = _flatten(OmegaConf.to_container(cfg, resolve=False))
        for place in places:
            checked += 1
            changed = settings_differences(place, expected)
            if changed:
                problems.append(f"{place.parent} ({'; '.join(changed[:3])})")
    if problems:
        shown = first_few(problems)
        raise ConfigError(
            f"{len(problems)} kept or started cell(s) ran with other settings than this study "
            f"gives them: {shown}. Give a variant of the study its own `results` and `work_dir` "
            "folders (--config FILE), or move those cells aside to train them again"
        )
    if checked:
        log(f"  settings: {checked} kept or started cell(s) checked against the study's")
