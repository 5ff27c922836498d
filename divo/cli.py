"""The ``divo`` command.

divo train <recipe> [--quiet] [hydra overrides...]   train a recipe (Hydra -m sweeps work)
divo evaluate <run dir | checkpoint> [--episodes N]  re-evaluate a saved policy
divo convert <file | run dir>...                     rewrite an older divo's files as plain data
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import difflib
import importlib.resources
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from divo.config import (
    available_recipes,
    compose_config,
    config_keys,
    did_you_mean,
    group_options,
    resolve_recipe,
)
from divo.errors import CheckpointError, ConfigError, DivoError, RunInUseError

USAGE = """usage: divo <command> ...   (divo <command> --help, divo --version)

commands:
  train <recipe> [--quiet] [overrides...]   train a recipe from recipes/ (or a path to a YAML)
  train <run dir> [train.steps=N] [--trust MODULE]
                                            resume a run from its newest checkpoint
  evaluate <run dir | checkpoint> [--episodes N] [--seed S] [--device D] [--trust MODULE]
           [--set KEY=VALUE] [--critic]     re-evaluate a saved policy (--trust: a module of
                                            your own whose classes the file may name; --set: a
                                            setting of the saved policy, e.g. selection=argmax;
                                            --critic: a checkpoint's critic against the returns)
  convert <file | run dir>...               rewrite an older divo's policy files and checkpoints
                                            as plain data (unpickles them: trusted files only)
  report <dir>... [--compare A B] [--out DIR]
                                            tables and figures over the runs under <dir>
  study bandit [key=value...] [--out PNG]   the 2-D bandit study figure (docs/bandit_study.png)
  study locomotion [key=value...] [--jobs N]
                                            DIVO vs its ablations and TD3+BC on MuJoCo data
                                            (resumable; writes docs/results.md)
  study diffusion-ql-toy [key=value...]     Diffusion-QL on its own toy and on divo's bandit
                                            (resumable; writes docs/diffusion_ql_toy.md)
  study ogbench [key=value...] [--pilot]    DIVO vs FQL, IQL, TD3+BC on OGBench's singletask
                                            tasks (resumable; writes docs/ogbench_study.md)
  data build <env id> [options]             train SAC, write D4RL-style Minari datasets
  data pointmaze <umaze|medium> [options]   sparse-reward maze data from a waypoint planner
  data ogbench <env> [options]              OGBench manipulation data from its own oracles
recipes: {recipes}
"""

TRAIN_USAGE = """usage: divo train <recipe | recipe.yaml> [--quiet] [-m] [overrides...]
       divo train <run dir> [train.steps=N] [device=D] [logger.*=...]
       divo train <recipe> resume=<run dir> [train.*=...]

Train a recipe, or resume a run from its newest checkpoint (a finished run is left as it is
and its result printed; a larger train.steps extends it).

options:
  -q, --quiet        no progress bar (train.progress=false)
  -m, --multirun     Hydra sweep over comma-separated values, e.g. -m seed=0,1,2
  --cfg job          print the composed recipe without running it
  --trust MODULE     on resume: a module of yours whose classes the run's files may name
  <recipe> --help    the recipe's config groups and options (Hydra's help)

overrides: key=value (train.steps=20000, dataset=bandit, device=cpu, ...); +key=value adds a
key the recipe does not have.
recipes: {recipes}
"""


def _summary(result: dict) -> str:
    score = result.get("normalized_score")
    ret = result.get("return_mean")
    parts = [f"divo: {result['recipe']} on {result['dataset_id']} seed {result['seed']}"]
    if ret is not None:
        score_txt = f"normalized score {score:.1f}" if score is not None else "no normalized score"
        success = result.get("success_rate")
        if success is not None:  # goal-reaching data (OGBench): the score is the success rate
            parts.append(
                f"{score_txt} (success in {round(success * result['episodes'])} of "
                f"{result['episodes']} episodes; return {ret:.3f} +- {result['return_std']:.3f})"
            )
        elif "seeds" in result:  # stacked seeds: the spread of the seeds' mean returns
            parts.append(
                f"{score_txt} (mean over {len(result['seeds'])} seeds; return {ret:.3f} +- "
                f"{result['return_std']:.3f} across seeds, {result['episodes']} episodes in all)"
            )
        else:
            parts.append(
                f"{score_txt} (return {ret:.3f} +- {result['return_std']:.3f} over "
                f"{result['episodes']} episodes)"
            )
    parts.append(f"after {result['steps']} steps in {result['wall_clock_s']:.1f} s")
    return ": ".join(parts[:2]) + " " + " ".join(parts[2:]) + f" -> {result['run_dir']}"


_HYDRA_FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml")


def _hydra_traces(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """What Hydra rewrites in an existing run directory before divo's checks run: its .hydra/
    files and train.log (None for a folder that does not exist yet: a refused new run's folder
    is removed whole)."""
    if not run_dir.is_dir():
        return None
    files = {name: _content_and_times(run_dir / name) for name in (*_HYDRA_FILES, "train.log")}
    return run_dir.resolve(), files


def _content_and_times(path: Path) -> tuple[bytes, tuple[int, int]] | None:
    if not path.is_file():
        return None
    stat = path.stat()
    return path.read_bytes(), (stat.st_atime_ns, stat.st_mtime_ns)


def _restore_hydra_traces(traces: tuple[Path, dict[str, Any]]) -> None:
    """A refused run in an existing folder leaves it as it was: Hydra's .hydra/ files and
    train.log (the lines Hydra and the refused job appended) put back, times included."""
    run_dir, files = traces
    for name, saved in files.items():
        path = run_dir / name
        if saved is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(saved[0])
            os.utime(path, ns=saved[1])
    hydra_dir = run_dir / ".hydra"
    if hydra_dir.is_dir() and not any(hydra_dir.iterdir()):
        hydra_dir.rmdir()


def _remove_refused_run(run_dir: Path, keep: set[Path]) -> None:
    """Drop a run directory that a job refused on its input left holding only Hydra's files,
    and the folders made for it (``runs/<recipe>/<dataset>/``) that are left empty; ``keep``:
    folders that existed before the command (never removed)."""
    if not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} > {".hydra", "train.log"}:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    _remove_empty_folders(run_dir.resolve().parent, keep)


def _remove_empty_folders(path: Path, keep: set[Path]) -> None:
    """``path`` and its ancestors, while they are empty and not in ``keep``."""
    for folder in (path.resolve(), *path.resolve().parents):
        if folder in keep or not folder.is_dir() or any(folder.iterdir()):
            break
        folder.rmdir()


def _check_ray_cluster(recipe: str, overrides: Sequence[str]) -> None:
    """For a Ray launcher that joins a running cluster: connect here, before Hydra's launcher
    does, so that a cluster that cannot be reached is one line naming its address (Ray retries
    an unreachable address for minutes, and Hydra prints the launcher's traceback). Hydra's
    Ray launcher then finds Ray connected and uses that connection."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(
            [o for o in overrides if not o.startswith("hydra.searchpath")]
        )
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        launcher = compose_config(recipe, fixed, with_hydra=True).hydra.get("launcher")
        if launcher is None or not str(launcher.get("_target_", "")).endswith("RayLauncher"):
            return
        init = OmegaConf.to_container(launcher.ray.init, resolve=True) or {}
    except Exception:  # noqa: BLE001 - not a Ray sweep we can read: the launcher decides
        return
    address = init.get("address")
    if address is None:  # a local Ray instance, started by the launcher
        return
    shown = (os.environ.get("RAY_ADDRESS") or address) if address == "auto" else address
    setting = "RAY_ADDRESS" if shown != address else "hydra.launcher.ray.init.address"
    host, _, port = str(shown).removeprefix("ray://").rpartition(":")
    if host and port.isdigit():  # a TCP address: refused or unreachable fails fast here
        import socket

        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as exc:
            raise ConfigError(
                f"cannot connect to the Ray cluster at {shown} ({setting}): "
                f"{exc.strerror or exc}; start it (ray start --head) or point {setting} at it"
            ) from None
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(**init)
    except (ConnectionError, TimeoutError) as exc:
        raise ConfigError(
            f"cannot connect to the Ray cluster at {shown} ({setting}): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


_NOW = re.compile(r"\$\{now:([^}]*)\}")


def _sweep_folders(recipe: str, overrides: Sequence[str]) -> tuple[str | None, Path]:
    """Where a sweep writes, read once here: (the value of ``hydra.sweep.dir`` every job is to
    use, its ``${now:...}`` read once so that all jobs agree, or None when it cannot be read
    here; the folder the failed jobs' records go through).

    The records go through the sweep folder, or, when that folder names a job's values (e.g.
    ``.../steps${train.steps}``), through the folder all the jobs' sweep folders lie under:
    either is on the file system the jobs share (SLURM and Ray nodes do not share the
    submitting machine's /tmp)."""
    try:
        combos = _sweep_combos(overrides)
        cfg = compose_config(recipe, combos[0], with_hydra=True)
        raw = str(OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["dir"])
    except Exception:  # noqa: BLE001 - the launcher will say what is wrong
        return None, Path.cwd().resolve()
    stamp = datetime.datetime.now()
    pinned = _NOW.sub(lambda m: stamp.strftime(m.group(1)), raw)
    folders = []
    for combo in combos:  # each swept value at least once
        try:
            job = compose_config(recipe, [*combo, f"hydra.sweep.dir={pinned}"], with_hydra=True)
            folders.append(str(job.hydra.sweep.dir))
        except Exception:  # noqa: BLE001 - e.g. ${hydra.job.num}: known to the job only
            folders = []
            break
    if folders and len(set(folders)) == 1:  # one sweep folder for every job
        return folders[0], Path(folders[0]).resolve()
    if folders:
        return pinned, Path(os.path.commonpath([str(Path(f).resolve()) for f in folders]))
    static = pinned.split("${", 1)[0]  # the part no job changes
    root = Path(static) if static.endswith("/") or not static else Path(static).parent
    return pinned, root.resolve()


def _existing_folders(path: Path) -> set[Path]:
    """``path`` and its ancestors that exist now (resolved)."""
    path = path.resolve()
    return {p for p in (path, *path.parents) if p.is_dir()}


def _take_trust(argv: list[str]) -> tuple[list[str], list[str]]:
    """``--trust MODULE`` / ``--trust=MODULE`` (repeatable) taken out of ``argv``."""
    rest, trust, it = [], [], iter(argv)
    for a in it:
        if a == "--trust":
            value = next(it, None)
            if value is None:
                raise ConfigError("--trust needs a module name, e.g. --trust my_pkg")
            trust.append(value)
        elif a.startswith("--trust="):
            trust.append(a.split("=", 1)[1])
        else:
            rest.append(a)
    return rest, trust


def _train(argv: list[str]) -> int:
    quiet = False
    args = []
    argv, trust = _take_trust(argv)
    for a in argv:
        if a in ("-q", "--quiet"):
            quiet = True
        else:
            args.append(a)
    positional = [a for a in args if not a.startswith("-") and "=" not in a]
    run_dir_help = (
        positional and Path(positional[0]).is_dir() and positional[0] not in available_recipes()
    )
    if (not positional or run_dir_help) and any(a in ("-h", "--help") for a in args):
        print(TRAIN_USAGE.format(recipes=", ".join(available_recipes())))
        return 0
    if not positional:
        raise ConfigError(
            f"divo train needs a recipe; choose one of {', '.join(available_recipes())} "
            "(divo train --help)"
        )
    recipe = positional[0]
    args.remove(recipe)
    resume = [a for a in args if a.startswith("resume=")]
    is_run_dir = recipe not in available_recipes() and Path(recipe).is_dir()
    if is_run_dir or resume:
        for a in resume:
            args.remove(a)
        run_dir = Path(recipe) if not resume else Path(resume[-1].split("=", 1)[1])
        return _resume(run_dir, None if not resume else recipe, args, quiet, trust)
    if trust:
        raise ConfigError(
            "--trust is for files read from a run directory (divo train <run dir>, divo "
            "evaluate); a recipe names its classes itself: drop --trust"
        )
    config_dir, name, user = resolve_recipe(recipe)
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    if any(a in ("-h", "--help") for a in args):
        print(_recipe_help(recipe, overrides, config_dir))
        return 0
    if quiet:
        overrides.append("train.progress=false")
    if user:
        overrides.append(f"hydra.searchpath=[pkg://divo.recipes,file://{config_dir}]")
    multirun = any(a in ("-m", "--multirun") for a in args)
    hydra_flags = [a for a in args if a not in overrides]
    keep = _existing_folders(Path.cwd())  # folders a refused job must leave in place
    before_hydra = None  # an existing run folder's Hydra files, for a refused single run
    if not multirun and not any(
        f in hydra_flags for f in ("--cfg", "-c", "--help", "-h", "--info")
    ):
        cfg = compose_config(
            recipe, [o for o in overrides if not o.startswith("hydra.searchpath")], with_hydra=True
        )
        run_dir = None
        with contextlib.suppress(Exception):  # e.g. a run dir naming Hydra's runtime values
            run_dir = Path(str(cfg.hydra.run.dir))
            keep |= _existing_folders(run_dir.parent)
        if run_dir is not None:  # before Hydra writes its .hydra/ files into the folder
            from divo.agents.runs import check_same_run

            before_hydra = _hydra_traces(run_dir)  # put back if the run is refused

            job_cfg = cfg.copy()
            with open_dict(job_cfg):
                job_cfg.pop("hydra")
            check_same_run(job_cfg, run_dir)

    import hydra
    from hydra.core.hydra_config import HydraConfig

    from divo.agents.train import train

    # Jobs may run in other processes (joblib) or on other machines (SLURM, Ray launchers): each
    # failed job appends its one-line error to this file, which the parent reads to set the
    # exit status. A sweep's file lives where the launchers' nodes share it: in its sweep
    # folder (pinned here so that the parent and every job agree on it), or, when that folder
    # names a job's values, in the folder all the jobs' folders lie under; a single run's in
    # /tmp.
    launching = not any(f in hydra_flags for f in ("--cfg", "-c", "--help", "-h", "--info"))
    if multirun and launching:
        _validate_sweep(recipe, overrides)  # every job's settings, before any job starts
        _check_ray_cluster(recipe, overrides)
    sweep_dir, record_dir = _sweep_folders(recipe, overrides) if multirun else (None, None)
    if multirun:  # jobs that differ in a swept value get folders of their own
        overrides.append(_sweep_leaf_exclusions(overrides))
    if sweep_dir is not None and not any(o.startswith("hydra.sweep.dir=") for o in overrides):
        overrides.append(f"hydra.sweep.dir={sweep_dir}")
    if record_dir is not None:
        keep |= _existing_folders(record_dir.parent)
        made_record_dir = not record_dir.exists()
        record_dir.mkdir(parents=True, exist_ok=True)
        fd, failures_path = tempfile.mkstemp(
            prefix=".divo-failures-", suffix=".txt", dir=record_dir.resolve()
        )
    else:
        fd, failures_path = tempfile.mkstemp(prefix="divo-failures-", suffix=".txt")
    os.close(fd)

    @hydra.main(version_base=None, config_path=str(config_dir), config_name=name)
    def _task(cfg: DictConfig):
        logging.getLogger("torchrl").setLevel(logging.WARNING)  # its per-storage INFO lines
        run_dir = HydraConfig.get().runtime.output_dir
        try:
            result = train(cfg, run_dir)
        except DivoError as exc:  # one line per failed job; other sweep jobs go on
            print(f"divo: error: {exc}", file=sys.stderr, flush=True)
            with open(failures_path, "a") as f:
                f.write(f"{run_dir}: {exc}\n")
            hydra_cfg = HydraConfig.get()
            sweep = hydra_cfg.sweep.dir if hydra_cfg.mode.name == "MULTIRUN" else None
            _remove_refused_run(Path(run_dir), keep | ({Path(sweep).resolve()} if sweep else set()))
            from divo.agents.logging import raised_after_start

            if (
                before_hydra is not None
                and Path(run_dir).resolve() == before_hydra[0]
                and not raised_after_start(exc)  # a run that trained keeps its own log
                and not isinstance(exc, RunInUseError)  # the folder is another process's
            ):
                _restore_hydra_traces(before_hydra)
            return None
        print(_summary(result), flush=True)
        return result

    argv_before = sys.argv
    sys.argv = ["divo-train", *hydra_flags, *overrides]
    try:
        _task()
        failed = Path(failures_path).read_text().splitlines()
    finally:
        sys.argv = argv_before
        Path(failures_path).unlink(missing_ok=True)
        if record_dir is not None and made_record_dir:  # nothing ran: leave no empty folder
            _remove_empty_folders(record_dir, keep)
    if failed and multirun:
        print(f"divo: {len(failed)} job(s) of the sweep failed:", file=sys.stderr)
        for line in failed:  # "<job folder>: <its one-line error>"
            print(f"  {line}", file=sys.stderr)
    return 2 if failed else 0


RESUMABLE_OVERRIDES = ("train.", "device=", "logger.")
# Parts of a job's folder already (recipes/common/base.yaml, hydra.sweep.subdir)
_IN_SWEEP_SUBDIR = ("seed", "dataset", "dataset.id")


def is_swept(value: str) -> bool:
    """Whether an override's value sweeps (``a,b`` or a sweep function such as ``range(0,3)``)
    rather than sets one value (``[1,2]``, ``'a,b'``), as Hydra's own override parser reads it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(f"key={value}").is_sweep_override()
    except HydraException:
        return False  # not valid Hydra syntax: the single-run check says what is wrong


# config-group folders of recipes/ that are not a recipe's parts (shared base, study settings,
# Hydra's launchers): not listed in a recipe's --help
_INTERNAL_GROUPS = ("common", "study", "hydra")


def _recipe_help(recipe: str, overrides: Sequence[str], config_dir: Path) -> str:
    """``divo train <recipe> --help``: the recipe's parts (its config groups) with their options,
    the recipe's choice of each marked, and how to see every setting."""
    cfg = compose_config(recipe, overrides, with_hydra=True)
    choices = dict(cfg.hydra.runtime.choices)
    groups = sorted(
        g
        for g in choices
        if "/" not in g and g not in _INTERNAL_GROUPS and not g.startswith("hydra")
    )
    lines = [
        f"usage: divo train {recipe} [group=option ...] [key=value ...] [-m]",
        "",
        f"Configuration groups of {recipe} (its choice in brackets; group=option picks another):",
    ]
    for group in groups:
        options = [
            f"[{o}]" if choices.get(group) == o else o for o in group_options(group, config_dir)
        ]
        lines.append(f"  {group}: {', '.join(options)}")
    lines += [
        "",
        f"Every setting and its value: divo train {recipe} --cfg job   (recipes: docs/recipes.md)",
    ]
    return "\n".join(lines)


def _validate_sweep(recipe: str, overrides: Sequence[str]) -> None:
    """Compose every value of every swept key (the others at their first value) as a single run
    would, so that a misspelt key or option is refused in one line before any job starts and
    nothing is left behind."""
    for combo in _sweep_combos(overrides):
        compose_config(recipe, combo)


def _sweep_combos(overrides: Sequence[str]) -> list[list[str]]:
    """The overrides of the sweep's first job (every swept key at its first value), then one
    list per other value of each swept key (the other keys at their first values)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    plain = [o for o in overrides if not o.startswith("hydra.searchpath")]
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except HydraException as exc:
        raise ConfigError(
            f"cannot parse the sweep's overrides: {str(exc).splitlines()[0]}"
        ) from None
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else None for o in parsed]
    firsts = [
        f"{o.get_key_element()}={v[0]}" if v else text
        for o, v, text in zip(parsed, values, plain, strict=True)
    ]
    combos = [firsts]
    for i, (o, v) in enumerate(zip(parsed, values, strict=True)):
        for value in (v or [])[1:]:
            combos.append([*firsts[:i], f"{o.get_key_element()}={value}", *firsts[i + 1 :]])
    return combos


def _sweep_leaf_exclusions(overrides: Sequence[str]) -> str:
    """The override that leaves out of each job's folder name every key the sweep does not vary
    (and those the folder names anyway): a job's folder is then
    ``<recipe>/<dataset>/seed<k>`` plus ``/key=value`` for each other swept key, so no two jobs
    of a sweep share a folder (one would "resume" the other's run)."""
    fixed = sorted(
        {
            key
            for o in overrides
            if "=" in o and not o.startswith("hydra")
            for key in [o.split("=", 1)[0].lstrip("+~")]
            if key in _IN_SWEEP_SUBDIR or not is_swept(o.split("=", 1)[1])
        }
        | set(_IN_SWEEP_SUBDIR)
    )
    return f"hydra.job.config.override_dirname.exclude_keys=[{','.join(fixed)}]"


def _note_stretched_schedules(cfg: DictConfig, old_steps: int, step: int) -> None:
    """Say so when a new train.steps moves a learning-rate schedule that decays over train.steps
    (``<part>.lr_decay_steps: null``, e.g. IQL's and IDQL's cosine): the resumed run follows
    the schedule of a run planned for the new length, from the checkpoint's step on."""
    from divo.agents.agent import cosine_decay

    new_steps = int(cfg.train.steps)
    for part in ("critic", "actor", "value", "behavior"):
        node = cfg.get(part)
        if node is None or node.get("lr_schedule") is None or node.get("lr_decay_steps"):
            continue
        before = cosine_decay(step, old_steps)
        after = cosine_decay(step, new_steps)
        print(
            f"divo: note: {part}.lr_schedule={node.lr_schedule} decays over train.steps, now "
            f"{new_steps} instead of {old_steps}: at step {step} its learning-rate factor goes "
            f"from {before:.2f} to {after:.2f}, as in a run planned for {new_steps} steps; "
            f"{part}.lr_decay_steps={old_steps} keeps the schedule it had",
            flush=True,
        )


def _resume(
    run_dir: Path, recipe: str | None, args: list[str], quiet: bool, trust: list[str]
) -> int:
    """Continue the run in ``run_dir`` from its newest checkpoint, with its saved config (whose
    classes must be divo's or those of a ``--trust``ed module)."""
    from divo.agents.runs import validate_config
    from divo.agents.train import train
    from divo.agents.trust import check_config

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory (no config.yaml); pass a recipe name to start a run"
        )
    try:
        cfg = OmegaConf.load(config)
        if not isinstance(cfg, DictConfig) or "train" not in cfg or "recipe" not in cfg:
            raise ValueError("no recipe or train section")
    except Exception as exc:  # noqa: BLE001 - YAML's and OmegaConf's errors are many-lined
        raise CheckpointError(
            f"{config} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0]}); restore it "
            "from the run's checkpoints (each holds its config), or start a new run"
        ) from None
    check_config(OmegaConf.to_container(cfg), trust, str(config))
    if recipe is not None and cfg.get("recipe") != recipe:
        raise CheckpointError(
            f"{run_dir} is a run of recipe {cfg.get('recipe')!r}, not {recipe!r}; resume it with "
            f"`divo train {run_dir}`"
        )
    bad = [a for a in args if not a.startswith(RESUMABLE_OVERRIDES)]
    if bad:
        raise ConfigError(
            f"cannot change {' '.join(bad)} when resuming {run_dir}: only train.*, device and "
            "logger.* may change (e.g. train.steps=... to extend); start a new run instead"
        )
    keys = config_keys(OmegaConf.to_container(cfg, resolve=False))
    for arg in args:
        key = arg.split("=", 1)[0]
        if key not in keys:
            hint = did_you_mean(key, keys)
            raise ConfigError(
                f"{run_dir} has no key {key} (override {arg}){hint}; "
                + ("fix the name" if hint else f"see the keys in {config}")
            )
    try:
        old_steps = int(cfg.train.steps)
    except (TypeError, ValueError):
        raise CheckpointError(f"{config} is damaged (train.steps={cfg.train.steps!r})") from None
    try:
        cfg.merge_with_dotlist(args + (["train.progress=false"] if quiet else []))
    except Exception as exc:  # noqa: BLE001 - OmegaConf's errors are many-lined
        raise ConfigError(f"bad override in {' '.join(args)}: {str(exc).splitlines()[0]}") from None
    validate_config(cfg)  # before anything reads the new values
    # a stacked-seed run keeps its checkpoints in its seeds' folders
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt")) or sorted(
        run_dir.glob("seed*/checkpoints/step_*.pt"), key=lambda p: p.name
    )
    if not ckpts:
        print(f"divo: {run_dir} has no checkpoint yet; training starts from step 0", flush=True)
    elif int(cfg.train.steps) != old_steps:
        _note_stretched_schedules(cfg, old_steps, int(ckpts[-1].stem.split("_")[-1]))
    result = train(cfg, run_dir, trust=trust)
    print(_summary(result), flush=True)
    return 0


def _parse_settings(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items -> {key: value}, each value read as a YAML scalar (42, 0.5,
    true, argmax)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set selection=argmax")
        value = yaml.safe_load(text) if text.strip() else ""
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise ConfigError(f"--set {item!r}: the value must be a number, a string or a boolean")
        out[key.strip()] = value
    return out


def _evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="divo evaluate", description="Re-evaluate a saved policy."
    )
    parser.add_argument("path", help="a run directory, its policy.pt, or a checkpoint file")
    parser.add_argument(
        "--episodes",
        type=int,
        default=None,
        help="default: the run's own train.eval_episodes (10 without its config.yaml)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the first episode; default: the run's seed + 100, as its evaluations "
        "in training (100 without its config.yaml)",
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module of yours (e.g. a plugged-in behaviour model's) whose classes the file "
        "may name; repeatable",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="settings",
        help="deploy the saved policy with one of its settings changed, e.g. selection=argmax "
        "or num_samples=256 (IDQL); repeatable",
    )
    parser.add_argument(
        "--critic",
        action="store_true",
        help="also set the critic's Q on the policy's own steps against the returns that "
        "followed (the training-time critic check); needs a checkpoint, not a policy.pt, and "
        "the run's dataset",
    )
    ns = parser.parse_args(argv)
    if ns.episodes is not None and ns.episodes <= 0:
        raise ConfigError(f"--episodes={ns.episodes} must be a positive integer")
    if ns.critic:
        return _recheck_critic(ns)
    from divo.agents.policy_io import evaluate_saved_policy

    result = evaluate_saved_policy(
        ns.path,
        episodes=ns.episodes,
        seed=ns.seed,
        device=ns.device,
        trust=ns.trust,
        settings=_parse_settings(ns.settings),
    )
    if ns.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"divo: {result['source']}: {_score_line(result)}")
    return 0


def _score_line(result: dict) -> str:
    """An evaluation's score in words: the normalised score, the return and, on goal-reaching
    tasks, how many episodes succeeded."""
    score = result["normalized_score"]
    score_txt = f"normalized score {score:.1f}" if score is not None else "no normalized score"
    success = result.get("success_rate")
    if success is None:
        return (
            f"{score_txt} (return {result['return_mean']:.3f} +- {result['return_std']:.3f} "
            f"over {result['episodes']} episodes)"
        )
    return (  # goal-reaching tasks: the score is the success rate
        f"{score_txt} (return {result['return_mean']:.3f} +- {result['return_std']:.3f}, "
        f"success in {round(success * result['episodes'])} of {result['episodes']} episodes, "
        f"mean length {result['episode_length_mean']:.1f})"
    )


def _recheck_critic(ns: argparse.Namespace) -> int:
    """``divo evaluate <checkpoint> --critic``."""
    if ns.settings:
        raise ConfigError(
            "--set changes a saved policy's deployment; the critic check evaluates the policy "
            "the run trained: drop --set or --critic"
        )
    from divo.agents.recheck import recheck_critic

    result = recheck_critic(
        ns.path, episodes=ns.episodes, seed=ns.seed, device=ns.device, trust=ns.trust
    )
    if ns.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"divo: {result['source']} (step {result['step']}): {_score_line(result)}")
    critic = result["critic"]
    if critic is None:
        print("divo: no critic check: the agent has no twin critic, or no step qualified")
        return 0
    how = result.get("critic_q", "min")
    if "eval_q_bias" in critic:
        print(
            f"divo: critic {how} Q {critic['eval_q']:.2f}, discounted return "
            f"{critic['eval_return_to_go']:.2f} on the policy's own steps (Q - return "
            f"{critic['eval_q_bias']:+.2f})"
        )
    if "eval_q_bias_min" in critic:
        print(
            f"divo: critic {how} Q {critic['eval_q_all']:.2f} on all the policy's steps, "
            f"discounted return that followed at most {critic['eval_return_to_go_max']:.2f} "
            f"(Q - return >= {critic['eval_q_bias_min']:+.2f})"
        )
    if result["critic_alarm"] is not None:
        print(
            "divo: the critic overestimates this policy by more than half the scale of its "
            "values (see docs/runs.md, 'The critic check')"
        )
    return 0


def _convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="divo convert",
        description="Rewrite policy files and checkpoints of an older divo in this version's "
        "format: plain data with the checksum of their contents. Files are read as plain data "
        "plus the NumPy array an older divo pickled, and nothing else: a file that holds any "
        "other object is refused without running it, and left as it is.",
    )
    parser.add_argument("paths", nargs="+", help="policy.pt / checkpoint files or run dirs")
    ns = parser.parse_args(argv)
    from divo.agents.checkpoints import convert_file, run_files

    files = [f for p in ns.paths for f in run_files(p)]
    if not files:
        raise CheckpointError(f"no policy.pt or checkpoints/step_*.pt in {' '.join(ns.paths)}")
    for file in files:
        print(f"divo: {convert_file(file)}", flush=True)
    return 0


def _study(argv: list[str]) -> int:
    from divo.studies import STUDIES

    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: divo study <name> [key=value...] [options]   (divo study <name> --help)\n"
            f"studies: {', '.join(STUDIES)}"
        )
        return 0 if argv else 2
    module = STUDIES.get(argv[0])
    if module is None:
        close = difflib.get_close_matches(argv[0], list(STUDIES), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown study {argv[0]!r}{hint}; the studies: {', '.join(STUDIES)}")
    return importlib.import_module(module).study_command(argv[1:])


# command name -> function(argv) -> exit status; each one raises DivoError for bad input
COMMANDS = {
    "train": _train,
    "evaluate": _evaluate,
    "convert": _convert,
    "report": lambda argv: importlib.import_module("divo.report").main(argv),
    "study": lambda argv: _study(argv),
    "data": lambda argv: importlib.import_module("divo.data.factory.cli").data_command(argv),
}


def _package_roots() -> tuple[str, ...]:
    """The folders of divo's own packages (they install from separate top-level folders)."""
    import divo.agents
    import divo.behavior_models
    import divo.objectives

    modules = (sys.modules["divo"], divo.agents, divo.behavior_models, divo.objectives)
    return tuple(str(Path(m.__file__).resolve().parent) + os.sep for m in modules)


@contextlib.contextmanager
def _one_line_warnings():
    """Print divo's own warnings as ``divo: warning: <message>`` (no source line echoed).

    Warnings raised by other libraries keep Python's format, with their location.
    """
    roots = _package_roots()
    default = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):  # noqa: ANN001
        if str(Path(filename).resolve()).startswith(roots):
            return f"divo: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = default


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(recipes=", ".join(available_recipes())))
        return 0
    if argv[0] in ("-V", "--version"):
        from divo import __version__
        from divo.errors import DISTRIBUTION

        print(f"divo {__version__} (distribution {DISTRIBUTION}, Python {sys.version.split()[0]})")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            close = difflib.get_close_matches(command, list(COMMANDS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"unknown command {command!r}{hint}; use one of {', '.join(COMMANDS)} (divo --help)"
            )
        with _one_line_warnings():
            return COMMANDS[command](rest)
    except DivoError as exc:
        print(f"divo: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except SystemExit as exc:  # argparse's and Hydra's --help (0) and usage errors (2)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1


if __name__ == "__main__":
    sys.exit(main())
