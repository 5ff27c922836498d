"""OGBench's reward-based "singletask" datasets, read through OGBench's own loader.

A dataset id such as ``cube-single-play-singletask-v0`` (the environment's default task) or
``cube-single-play-singletask-task3-v0`` names one file pair of OGBench's layout,
``cube-single-play-v0.npz`` and ``cube-single-play-v0-val.npz``, and a fixed task. The files are
found in this order (``files="auto"``):

1. OGBench's hosted files where the user has them: ``data_dir``, else OGBench's own dataset
   folder (``~/.ogbench/data``, where ``ogbench.download_datasets`` puts them);
2. files generated here by ``divo data ogbench`` (:func:`generated_dir`);
3. missing: generated on first use (``generate=True``; the size and time are stated first), or
   downloaded with OGBench's download function (``download=True``, needs internet).

``files="hosted"`` or ``"generated"`` accepts only that kind. Whatever the source, the pair is
read by ``ogbench.make_env_and_datasets``, which relabels rewards and masks for the task from
the stored simulator state (``relabel_utils.relabel_dataset``), so divo's rewards are OGBench's
for the installed version. divo pins ``ogbench==1.2.2``: since 1.2.0 the reward, the mask and
success are computed on the state s of a transition (``success_timing="pre"``), where 1.1.x
computed them on s'. Papers that pinned 1.1.0 (FQL among them) trained on rewards shifted by one
step from ours; their success rates are measured in the 1.1 environments, which end an episode
at the step that reaches the goal (the 1.2 environments one step later, leaving a policy one
action fewer within the time limit).

Conversion to divo's transitions: ``reward`` is OGBench's (the number of satisfied sub-goals
minus their count, so 0 only when solved); ``terminated`` is OGBench's mask = 0 (the state s
solves the task: the TD target does not bootstrap past it); ``truncated`` marks the last stored
transition of each 1,000-step trajectory that is not terminated. Trajectories go on after a
solved state (the data were collected for other goals), so a terminated transition may sit
inside a stored trajectory. Evaluation follows OGBench: the singletask environment with its
fixed goal, an episode ending on success, and the success rate over the episodes (50 in FQL's
protocol) as the normalised score.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from divo.data.envs import ogbench_version, require_ogbench
from divo.data.paths import minari_root
from divo.errors import DatasetError

_log = logging.getLogger("divo")

# OGBench's manipulation environments: the evaluation time limit (its registrations) and the
# default task of the bare `-singletask-v0` ids (cube and scene: task 2; puzzle: task 4)
MANIPULATION_ENVS: dict[str, tuple[int, int]] = {
    "cube-single": (200, 2),
    "cube-double": (500, 2),
    "cube-triple": (1000, 2),
    "cube-quadruple": (1000, 2),
    "scene": (750, 2),
    "puzzle-3x3": (500, 4),
    "puzzle-4x4": (500, 4),
    "puzzle-4x5": (1000, 4),
    "puzzle-4x6": (1000, 4),
}
DATASET_KINDS = ("play", "noisy")
TASKS = 5
FILES = ("auto", "hosted", "generated")
HOSTED_DIR = "~/.ogbench/data"  # ogbench.utils.DEFAULT_DATASET_DIR
_ID = re.compile(r"^(?P<env>.+)-(?P<kind>[a-z]+)-singletask(?:-task(?P<task>\d+))?-v0$")


@dataclass(frozen=True)
class OGBenchId:
    """A parsed singletask dataset id."""

    dataset_id: str
    env: str  # e.g. "cube-single"
    kind: str  # "play" or "noisy"
    task: int | None  # None: the environment's default task

    @property
    def dataset_name(self) -> str:
        """The file pair's name: ``<env>-<kind>-v0``."""
        return f"{self.env}-{self.kind}-v0"

    @property
    def env_name(self) -> str:
        """The singletask environment OGBench evaluates in."""
        task = "" if self.task is None else f"-task{self.task}"
        return f"{self.env}-singletask{task}-v0"

    @property
    def task_number(self) -> int:
        return MANIPULATION_ENVS[self.env][1] if self.task is None else self.task


def valid_ids() -> list[str]:
    """Every singletask dataset id divo reads."""
    tasks = [""] + [f"-task{i}" for i in range(1, TASKS + 1)]
    return [
        f"{env}-{kind}-singletask{task}-v0"
        for env in MANIPULATION_ENVS
        for kind in DATASET_KINDS
        for task in tasks
    ]


def looks_like_ogbench(dataset_id: str) -> bool:
    """Whether an id is meant for OGBench: no Minari namespace, and a singletask name or an
    OGBench environment's name at its start."""
    if not isinstance(dataset_id, str) or "/" in dataset_id:
        return False
    return "singletask" in dataset_id or any(dataset_id.startswith(e) for e in MANIPULATION_ENVS)


def parse_id(dataset_id: str) -> OGBenchId:
    """Parse a singletask id; a wrong one is refused in one line naming the valid ids."""
    match = _ID.match(dataset_id) if isinstance(dataset_id, str) else None
    if match:
        env, kind, task = match["env"], match["kind"], match["task"]
        if (
            env in MANIPULATION_ENVS
            and kind in DATASET_KINDS
            and (task is None or 1 <= int(task) <= TASKS)
        ):
            return OGBenchId(dataset_id, env, kind, None if task is None else int(task))
    close = difflib.get_close_matches(str(dataset_id), valid_ids(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise DatasetError(
        f"unknown OGBench dataset id {dataset_id!r}.{hint} Valid ids: "
        f"<env>-<kind>-singletask[-task1..-task{TASKS}]-v0 with env one of "
        f"{', '.join(MANIPULATION_ENVS)} and kind {' or '.join(DATASET_KINDS)}, e.g. "
        "cube-single-play-singletask-v0 (the default task) or cube-double-play-singletask-task3-v0"
    )


def generated_dir() -> Path:
    """Where ``divo data ogbench`` writes by default: ``DIVO_OGBENCH_DIR`` if set, else the
    hidden folder ``.ogbench`` of the local Minari root (``~/.minari/datasets/.ogbench``)."""
    env = os.environ.get("DIVO_OGBENCH_DIR")
    return Path(env).expanduser() if env else minari_root() / ".ogbench"


def hosted_dir(data_dir: str | os.PathLike | None = None) -> Path:
    return Path(data_dir if data_dir is not None else HOSTED_DIR).expanduser()


@dataclass
class FoundFiles:
    train: Path
    source: str  # "hosted" or "generated"
    record: dict[str, Any] | None  # divo's generation record (generated files only)

    def describe(self) -> str:
        """Where the files came from, the home folder written as ``~`` (this text goes into
        result.json and train.log, which studies commit)."""
        home = Path.home()
        inside = self.train.is_relative_to(home)
        shown = f"~/{self.train.relative_to(home)}" if inside else self.train
        if self.source == "hosted":
            return f"OGBench's file {shown}"
        settings = (self.record or {}).get("settings", {})
        episodes = settings.get("episodes")
        note = ""
        if episodes is not None and episodes < 1000:
            note = f"; {episodes} episodes, OGBench's file has 1000"
        seed = settings.get("seed")
        return f"divo-generated file {shown} (OGBench's oracles, seed {seed}{note})"


def _pair(directory: Path, name: str) -> Path | None:
    train = directory / f"{name}.npz"
    val = directory / f"{name}-val.npz"
    return train if train.is_file() and val.is_file() else None


def _record(train: Path) -> dict[str, Any] | None:
    path = train.with_name(train.name.replace(".npz", ".divo.json"))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def find_files(
    ident: OGBenchId,
    *,
    data_dir: str | os.PathLike | None = None,
    files: str = "auto",
    download: bool = False,
    generate: bool = True,
    workers: int = 1,
) -> FoundFiles:
    """The file pair behind ``ident``, made or fetched when missing and allowed (a generation
    on ``workers`` processes)."""
    if files not in FILES:
        raise DatasetError(f"dataset.files={files!r} is unknown; use one of {', '.join(FILES)}")
    name = ident.dataset_name
    hosted = hosted_dir(data_dir)
    generated = generated_dir()
    if files in ("auto", "hosted") and (train := _pair(hosted, name)) is not None:
        record = _record(train)  # divo's record beside it: generated here, whatever the folder
        if record is None or files == "auto":
            return FoundFiles(train, "hosted" if record is None else "generated", record)
    if files in ("auto", "generated") and (train := _pair(generated, name)) is not None:
        return FoundFiles(train, "generated", _record(train))
    from divo.data.factory.ogbench import GENERATED_ENVS

    can_generate = generate and files != "hosted" and ident.env in GENERATED_ENVS
    if download and files != "generated":  # the hosted files first: what papers report on
        ogbench = require_ogbench()
        try:
            ogbench.download_datasets([name], dataset_dir=str(hosted))
            return FoundFiles(hosted / f"{name}.npz", "hosted", None)
        except Exception as exc:  # no network, server down, ...
            if not can_generate:
                raise DatasetError(
                    f"OGBench data {name} are not in {hosted} or {generated}, and downloading "
                    f"them failed ({type(exc).__name__}: {exc}); download {name}.npz and "
                    f"{name}-val.npz into {hosted}, or generate them: divo data ogbench "
                    f"{ident.env}"
                ) from exc
            _log.warning(
                "downloading OGBench's %s failed (%s: %s); generating it here instead",
                name,
                type(exc).__name__,
                exc,
            )
    if can_generate:
        from divo.data.factory import ogbench as factory

        settings = factory.generation_settings(ident.env, ident.kind)
        _log.info(
            "OGBench data %s are not here (looked in %s and %s): generating them with OGBench's "
            "oracles: %s (`divo data ogbench %s --episodes N` makes a smaller set first)",
            name,
            hosted,
            generated,
            factory.estimate(settings, workers=workers),
            ident.env,
        )
        factory.generate_ogbench_dataset(settings, generated, workers=workers)
        train = generated / f"{name}.npz"
        return FoundFiles(train, "generated", _record(train))
    ways = []
    if ident.env in GENERATED_ENVS:
        ways.append(f"generate them with `divo data ogbench {ident.env}`")
    ways.append(f"put OGBench's {name}.npz and {name}-val.npz into {hosted}")
    ways.append("set dataset.download=true (OGBench's download, needs internet)")
    raise DatasetError(
        f"OGBench data {name} not found (dataset.files={files}: looked in "
        f"{hosted if files != 'generated' else ''}{' and ' if files == 'auto' else ''}"
        f"{generated if files != 'hosted' else ''}); {'; or '.join(ways)}"
    )


def read_ogbench(
    dataset_id: str,
    *,
    data_dir: str | os.PathLike | None = None,
    files: str = "auto",
    download: bool = False,
    generate: bool = True,
) -> dict[str, Any]:
    """Read an OGBench singletask dataset into divo's raw transition arrays.

    Returns a dict with the arrays of :func:`divo.data.transitions.episodes_to_transitions`
    (``observation``, ``next_observation``, ``action``, ``reward``, ``terminated``,
    ``truncated``, ``episode_length``) and ``env_spec`` (the singletask environment),
    ``observation_space``, ``action_space`` and ``provenance`` (where the files came from).
    """
    ident = parse_id(dataset_id)
    ogbench = require_ogbench()
    found = find_files(ident, data_dir=data_dir, files=files, download=download, generate=generate)
    try:
        with warnings.catch_warnings():  # gymnasium's float32 casts of OGBench's bounds
            warnings.simplefilter("ignore")
            env, train, _ = ogbench.make_env_and_datasets(dataset_id, dataset_path=str(found.train))
    except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(
            f"OGBench data {found.train} (and its -val.npz) cannot be read "
            f"({type(exc).__name__}: {exc}); delete them and generate or download them again"
        ) from exc
    try:
        spec = env.spec
        observation_space, action_space = env.observation_space, env.action_space
    finally:
        env.close()
    masks = np.asarray(train["masks"])
    ends = np.asarray(train["terminals"]).astype(bool)
    terminated = masks == 0.0
    if not len(masks) or not ends[-1]:
        raise DatasetError(
            f"OGBench data {found.train} hold no whole trajectory; generate or download it again"
        )
    stops = np.flatnonzero(ends)
    lengths = np.diff(np.concatenate([[-1], stops])).astype(np.int64)
    return {
        "observation": np.asarray(train["observations"], dtype=np.float32),
        "next_observation": np.asarray(train["next_observations"], dtype=np.float32),
        "action": np.asarray(train["actions"], dtype=np.float32),
        "reward": np.asarray(train["rewards"], dtype=np.float64),
        "terminated": terminated,
        "truncated": ends & ~terminated,
        "episode_length": lengths,
        "env_spec": spec,
        "observation_space": observation_space,
        "action_space": action_space,
        "provenance": found.describe(),
    }


def check_spaces(dataset_id: str, raw: dict[str, Any]) -> None:
    """The stored arrays against the singletask environment's spaces."""
    obs_space, act_space = raw["observation_space"], raw["action_space"]
    if not isinstance(obs_space, gym.spaces.Box) or not isinstance(act_space, gym.spaces.Box):
        raise DatasetError(f"OGBench environment of {dataset_id!r} has non-Box spaces")
    for name, key, space in (
        ("observations", "observation", obs_space),
        ("actions", "action", act_space),
    ):
        if raw[key].shape[1:] != space.shape:
            raise DatasetError(
                f"OGBench data for {dataset_id!r} store {name} of shape {raw[key].shape[1:]} but "
                f"the environment's are {space.shape}; the files are of another environment or "
                "version: generate or download them again"
            )


__all__ = [
    "DATASET_KINDS",
    "FILES",
    "MANIPULATION_ENVS",
    "OGBenchId",
    "check_spaces",
    "find_files",
    "generated_dir",
    "hosted_dir",
    "looks_like_ogbench",
    "ogbench_version",
    "parse_id",
    "read_ogbench",
    "valid_ids",
]
