"""``divo data build``: D4RL-style offline datasets for a continuous-control Gymnasium env.

The recipe D4RL used for its Gym locomotion data, step by step:

1. train SAC online (``divo.data.factory.sac``), keeping a policy snapshot and its evaluation return
   every ``snapshot_every`` steps (resumable);
2. pick snapshots (``select_snapshots``): ``expert`` = the best snapshot (or the final one),
   ``medium`` = the snapshot whose return is closest to ``medium_fraction`` (1/3) of the
   expert's, among those taken no later than the expert;
3. reference returns: ``ref_min_score`` = mean return of a uniform random policy,
   ``ref_max_score`` = mean return of the expert policy (stochastic, as in its data), each over
   ``ref_episodes`` episodes with fixed seeds;
4. write Minari datasets, one per level: ``random``, ``medium``, ``expert`` (``dataset_size``
   transitions of that policy acting stochastically), ``medium-replay`` (the SAC replay buffer
   up to the medium snapshot) and ``medium-expert`` (the medium and expert data together).

Every phase can be interrupted: SAC resumes from its checkpoint, the reference returns are
kept in the work dir, and a dataset already written by the same build is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np

from divo.data.factory.rollouts import episode_returns, run_episodes, torch_policy, uniform_policy
from divo.data.factory.sac import SACRun, SACSettings, Snapshot, check_env, env_slug
from divo.data.minari_io import float32_box, write_minari_dataset
from divo.data.paths import get_dataset_path, is_local, publish_dataset
from divo.errors import DatasetError

LEVELS = ("random", "medium", "expert", "medium-replay", "medium-expert")
DEFAULT_LEVELS = ("medium", "medium-replay", "expert")
BUILD_FILE = "build.json"
REFS_FILE = "references.json"

# Seed offsets of the build's random streams (SAC uses the seed itself).
_REF_RANDOM, _REF_EXPERT = 20_000_000, 30_000_000
_DATA_SEEDS = {"random": 40_000_000, "medium": 50_000_000, "expert": 60_000_000}


@dataclass(frozen=True)
class BuildSettings:
    """What ``divo data build`` writes (SAC's own settings are ``SACSettings``)."""

    levels: tuple[str, ...] = DEFAULT_LEVELS
    dataset_size: int = 100_000  # transitions per rollout level; D4RL used 1M
    medium_fraction: float = 1 / 3  # medium = snapshot closest to this share of the expert
    expert: str = "best"  # "best" snapshot or "final" one
    ref_episodes: int = 50  # episodes behind each reference return
    namespace: str = "local"  # dataset ids: <namespace>/<env>/<level>-v<version>
    version: int = 0
    num_envs: int = 10  # environment copies stepped together in rollouts

    def __post_init__(self) -> None:
        unknown = [level for level in self.levels if level not in LEVELS]
        if unknown or not self.levels:
            raise DatasetError(
                f"unknown level(s) {', '.join(unknown) or '(none given)'}; choose from "
                f"{', '.join(LEVELS)} (comma-separated)"
            )
        if self.dataset_size < 1 or self.ref_episodes < 1 or self.num_envs < 1:
            raise DatasetError("dataset_size, ref_episodes and num_envs must be >= 1")
        if not 0 < self.medium_fraction < 1:
            raise DatasetError(
                f"medium_fraction must be in (0, 1), got {self.medium_fraction} (D4RL: 1/3)"
            )
        if self.expert not in ("best", "final"):
            raise DatasetError(f"expert must be 'best' or 'final', got {self.expert!r}")


@dataclass(frozen=True)
class Selection:
    expert: Snapshot
    medium: Snapshot
    medium_target: float  # medium_fraction x the expert's return


def select_snapshots(
    snapshots: Sequence[Snapshot],
    *,
    medium_fraction: float = 1 / 3,
    expert: str = "best",
    random_steps: int = 0,
    need_medium: bool = True,
) -> Selection:
    """D4RL's rule. ``expert``: the snapshot with the highest return ("best"; the later one on a
    tie) or the last one ("final"). ``medium``: among the trained snapshots no later than the
    expert, the one whose return is closest to ``medium_fraction`` x the expert's (the earlier
    one on a tie). A snapshot is trained once SAC has updated: after its ``random_steps`` of
    uniform warm-up (snapshots within it are the initial policy). A fraction of the expert's
    return is a level between the expert and doing nothing only when that return is positive:
    with a return <= 0 the rule is refused, not applied (``need_medium=False``: no level uses
    the medium snapshot, and the expert is picked whatever its return)."""
    trained = [s for s in snapshots if s.step > max(random_steps, 0)]
    if not trained:
        raise DatasetError(
            f"SAC has no snapshot after its {random_steps} warm-up steps yet (snapshots before "
            "them are the untrained policy); train it longer"
        )
    if expert == "final":
        chosen = trained[-1]
    else:
        chosen = max(reversed(trained), key=lambda s: s.mean_return)
    if not need_medium:
        return Selection(expert=chosen, medium=chosen, medium_target=float("nan"))
    if chosen.mean_return <= 0:
        raise DatasetError(
            f"the expert snapshot (step {chosen.step}) returns {chosen.mean_return:.1f}: D4RL's "
            f"medium rule ({medium_fraction:.3g} x the expert's return) needs a positive return "
            "(here it would lie above every snapshot and pick the expert as medium); build "
            "--levels random,expert, or shift the environment's reward so a do-nothing policy "
            "earns about 0"
        )
    target = medium_fraction * chosen.mean_return
    candidates = [s for s in trained if s.step <= chosen.step]
    medium = min(candidates, key=lambda s: abs(s.mean_return - target))
    return Selection(expert=chosen, medium=medium, medium_target=target)


def dataset_id(namespace: str, env_id: str, level: str, version: int = 0) -> str:
    return f"{namespace}/{env_slug(env_id)}/{level}-v{version}"


def _build_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _level_settings(settings: BuildSettings, level: str) -> dict[str, Any]:
    """The dataset settings a level's data depend on (medium-replay is SAC's buffer up to the
    medium snapshot: its size is not --size)."""
    keys = ["medium_fraction", "expert", "ref_episodes"]
    if level != "medium-replay":
        keys.append("dataset_size")
    return {k: v for k, v in dataclasses.asdict(settings).items() if k in keys}


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _atomic_json(path: Path, value: Any) -> None:
    scratch = path.with_suffix(path.suffix + ".tmp")
    scratch.write_text(json.dumps(value, indent=2) + "\n")
    scratch.replace(path)


def _say(progress: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if progress:
            print(f"divo data: {message}", file=sys.stderr, flush=True)

    return say


def build_datasets(
    env_id: str,
    *,
    sac: SACSettings | None = None,
    settings: BuildSettings | None = None,
    seed: int = 0,
    work_dir: str | Path | None = None,
    env_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train SAC on ``env_id`` and write the datasets ``settings.levels`` (module docstring).

    Args:
        env_id: a Gymnasium id with a bounded Box action space and flat Box observations
            (``module:Id`` imports ``module`` first, for user environments).
        sac, settings: SAC and dataset settings (defaults: ``SACSettings()``, ``BuildSettings()``).
        seed: seeds SAC, the snapshot evaluations, the references and the rollouts; the same
            seed and settings give the same datasets.
        work_dir: SAC checkpoints, snapshots, references and ``build.json``; default
            ``runs/data/<env>-seed<seed>``. Rerunning with the same work dir resumes.
        overwrite: replace datasets with the same ids written by another build (a dataset
            written by this same build is always kept).

    Returns:
        The build summary also written to ``<work_dir>/build.json``: snapshots, selection,
        references and, per level, the dataset id, episodes and transitions.
    """
    sac = sac or SACSettings()
    settings = settings or BuildSettings()
    work = (
        Path(work_dir)
        if work_dir is not None
        else Path("runs/data") / f"{env_slug(env_id)}-seed{seed}"
    )
    say = _say(progress)
    probe = check_env(env_id, env_kwargs)
    env_spec = probe.spec
    observation_space = float32_box(probe.observation_space)
    action_space = probe.action_space
    probe.close()
    ids = {
        level: dataset_id(settings.namespace, env_id, level, settings.version)
        for level in settings.levels
    }
    identity = {
        "env_id": env_id,
        "env_kwargs": env_kwargs or {},
        "seed": seed,
        "sac": sac.to_dict(),
    }
    for level, name in ids.items():  # refuse before hours of training, not after
        stored = _stored_build(name) if is_local(name) else None
        if is_local(name) and not overwrite and (stored is None or stored["identity"] != identity):
            made_by = "another divo data build" if stored else "something other than this build"
            raise DatasetError(
                f"dataset {name!r} already exists at {get_dataset_path(name)}, made by "
                f"{made_by}; pass --overwrite to replace it, or pick another "
                "--namespace/--version"
            )
        kept = (stored or {}).get("settings")  # builds before this record say nothing
        if is_local(name) and not overwrite and kept is not None:
            changed = {
                k: (kept.get(k), v)
                for k, v in _level_settings(settings, level).items()
                if kept.get(k) != v
            }
            if changed:
                shown = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
                raise DatasetError(
                    f"dataset {name!r} was built by this SAC run with other settings ({shown}); "
                    "pass --overwrite to replace it, or pick another --namespace/--version"
                )

    say(f"phase 1/3: SAC on {env_id} for {sac.total_steps} steps (work dir {work})")
    run = SACRun(env_id, sac, seed=seed, work_dir=work, env_kwargs=env_kwargs)
    snapshots = run.train(progress=progress)
    selection = select_snapshots(
        snapshots,
        medium_fraction=settings.medium_fraction,
        expert=settings.expert,
        random_steps=sac.random_steps,
        need_medium=bool({"medium", "medium-replay", "medium-expert"} & set(settings.levels)),
    )
    medium_txt = (
        f"medium = step {selection.medium.step} (return {selection.medium.mean_return:.1f}, "
        f"target {selection.medium_target:.1f})"
        if math.isfinite(selection.medium_target)
        else "no medium level asked for"
    )
    say(
        f"expert = snapshot at step {selection.expert.step} (return "
        f"{selection.expert.mean_return:.1f}); {medium_txt}"
    )

    def make_env() -> gym.Env:
        return gym.make(env_spec)

    say(f"phase 2/3: reference returns over {settings.ref_episodes} episodes each")
    refs_key = _build_key(
        {**identity, "expert": selection.expert.step, "episodes": settings.ref_episodes}
    )
    refs_path = work / REFS_FILE
    refs = json.loads(refs_path.read_text()) if refs_path.is_file() else {}
    if refs.get("key") != refs_key:
        random_eps = run_episodes(
            make_env,
            uniform_policy(action_space, seed + _REF_RANDOM),
            seed=seed + _REF_RANDOM,
            num_episodes=settings.ref_episodes,
            num_envs=settings.num_envs,
            progress="reference: random policy" if progress else False,
        )
        expert_eps = run_episodes(
            make_env,
            torch_policy(run.load_actor(selection.expert), seed + _REF_EXPERT),
            seed=seed + _REF_EXPERT,
            num_episodes=settings.ref_episodes,
            num_envs=settings.num_envs,
            progress="reference: expert policy" if progress else False,
        )
        refs = {
            "key": refs_key,
            "ref_min_score": float(episode_returns(random_eps).mean()),
            "ref_max_score": float(episode_returns(expert_eps).mean()),
            "episodes": settings.ref_episodes,
        }
        _atomic_json(refs_path, refs)
    say(f"ref_min_score {refs['ref_min_score']:.1f}, ref_max_score {refs['ref_max_score']:.1f}")
    if refs["ref_max_score"] <= refs["ref_min_score"]:
        raise DatasetError(
            f"the expert's return ({refs['ref_max_score']:.1f}) is not above the random "
            f"policy's ({refs['ref_min_score']:.1f}): SAC did not learn; train longer "
            "(--sac-steps) or check the environment's reward"
        )

    rollouts: dict[str, list[dict[str, np.ndarray]]] = {}

    def policy_data(level: str) -> list[dict[str, np.ndarray]]:
        if level not in rollouts:
            data_seed = seed + _DATA_SEEDS[level]
            if level == "random":
                act = uniform_policy(action_space, data_seed)
            else:
                snapshot = selection.medium if level == "medium" else selection.expert
                act = torch_policy(run.load_actor(snapshot), data_seed)
            rollouts[level] = run_episodes(
                make_env,
                act,
                seed=data_seed,
                num_steps=settings.dataset_size,
                num_envs=settings.num_envs,
                progress=f"rollouts: {level}" if progress else False,
            )
        return rollouts[level]

    say(f"phase 3/3: datasets {', '.join(ids.values())}")
    written: dict[str, Any] = {}
    for level, name in ids.items():
        key = _build_key(
            {
                **identity,
                "level": level,
                "refs": refs_key,
                # what the datasets are made of, not only how they were asked for: a resumed SAC
                # run is not bit-identical to an uninterrupted one, so two work dirs with the
                # same settings can hold other snapshots, and other references
                "refs_values": [refs["ref_min_score"], refs["ref_max_score"]],
                "snapshot_files": [
                    _file_digest(work / selection.expert.path),
                    _file_digest(work / selection.medium.path),
                ],
                "selection": [selection.expert.step, selection.medium.step],
                "settings": _level_settings(settings, level),
            }
        )
        if is_local(name):
            if (_stored_build(name) or {}).get("key") == key:
                say(f"{name}: already written by this build, kept")
                written[level] = _summary(name)
                continue
            if not overwrite:
                raise DatasetError(
                    f"dataset {name!r} exists from a different build; pass --overwrite to "
                    "replace it, or pick another --namespace/--version"
                )
        if level == "medium-replay":
            episodes = run.transitions_before(selection.medium.step)
        elif level == "medium-expert":
            episodes = policy_data("medium") + policy_data("expert")
        else:
            episodes = policy_data(level)
        build_record = {
            "key": key,
            "identity": identity,
            "level": level,
            "expert_step": selection.expert.step,
            "medium_step": selection.medium.step,
            "ref_episodes": settings.ref_episodes,
            "settings": _level_settings(settings, level),
        }

        def write(name=name, episodes=episodes, level=level, build_record=build_record) -> None:
            # in a scratch root, published whole (references and build record included): an
            # interrupted build leaves no dataset that loads as if whole
            dataset = write_minari_dataset(
                name,
                episodes,
                env=env_spec,
                observation_space=observation_space,
                action_space=action_space,
                ref_min_score=refs["ref_min_score"],
                ref_max_score=refs["ref_max_score"],
                algorithm_name=_algorithm(level),
                description=_describe(
                    level, env_id, sac, settings, seed, selection, refs, episodes
                ),
            )
            dataset.storage.update_metadata({"divo_build": build_record})

        publish_dataset(name, write, replace=overwrite)  # the old one goes once this is whole
        written[level] = _summary(name, episodes)
        say(f"{name}: {written[level]['episodes']} episodes, {written[level]['steps']} steps")

    report = {
        **identity,
        "build": dataclasses.asdict(settings),
        "snapshots": [dataclasses.asdict(s) for s in snapshots],
        "selection": {
            "expert": dataclasses.asdict(selection.expert),
            "medium": dataclasses.asdict(selection.medium),
            "medium_target": (
                selection.medium_target if math.isfinite(selection.medium_target) else None
            ),  # null: no medium level asked for (JSON has no NaN)
        },
        "references": refs,
        "datasets": written,
    }
    _atomic_json(work / BUILD_FILE, report)
    return report


def _stored_build(name: str) -> dict[str, Any] | None:
    """What ``build_datasets`` stored about how it made dataset ``name`` (None: not made by it)."""
    try:
        metadata = minari.load_dataset(name).storage.metadata
    except Exception:  # an unreadable dataset is not ours
        return None
    stored = metadata.get("divo_build")
    return stored if isinstance(stored, dict) and "key" in stored else None


def _summary(name: str, episodes: list[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Id, size and mean episode return of dataset ``name``; from ``episodes`` when the caller
    has just written them (else read back from the stored dataset)."""
    if episodes is None:
        episodes = [{"rewards": e.rewards} for e in minari.load_dataset(name).iterate_episodes()]
    return {
        "id": name,
        "episodes": len(episodes),
        "steps": sum(len(e["rewards"]) for e in episodes),
        "mean_episode_return": float(np.mean([np.sum(e["rewards"]) for e in episodes])),
        "path": str(get_dataset_path(name)),
    }


def _algorithm(level: str) -> str:
    return {
        "random": "uniform-random policy",
        "medium": "SAC (TorchRL) medium snapshot",
        "expert": "SAC (TorchRL) expert snapshot",
        "medium-replay": "SAC (TorchRL) replay buffer up to the medium snapshot",
        "medium-expert": "SAC (TorchRL) medium + expert snapshots",
    }[level]


def _describe(
    level: str,
    env_id: str,
    sac: SACSettings,
    settings: BuildSettings,
    seed: int,
    selection: Selection,
    refs: dict[str, Any],
    episodes: list[dict[str, np.ndarray]],
) -> str:
    steps = sum(len(e["actions"]) for e in episodes)
    what = {
        "random": f"{steps} transitions of a uniform random policy",
        "medium": f"{steps} transitions of the medium policy acting stochastically",
        "expert": f"{steps} transitions of the expert policy acting stochastically",
        "medium-replay": (
            f"all {steps} transitions SAC collected before its medium snapshot (step "
            f"{selection.medium.step}), including its {sac.random_steps} uniform random steps"
        ),
        "medium-expert": (f"the medium and expert datasets concatenated ({steps} transitions)"),
    }[level]
    return (
        f"D4RL-style {level} dataset for {env_id}, made by divo data build (seed {seed}): "
        f"{what}. SAC (TorchRL SACLoss, 2x{sac.hidden_sizes[0]} MLPs, batch "
        f"{sac.batch_size}, lr {sac.lr}, gamma {sac.gamma}) trained {sac.total_steps} steps, "
        f"with a snapshot every {sac.snapshot_every} steps evaluated over {sac.eval_episodes} "
        f"episodes. Expert = {settings.expert} snapshot (step {selection.expert.step}, return "
        f"{selection.expert.mean_return:.1f})"
        + (
            f"; medium = snapshot closest to {settings.medium_fraction:.3g} of the expert's "
            f"return (step {selection.medium.step}, return {selection.medium.mean_return:.1f})"
            if math.isfinite(selection.medium_target)
            else ""
        )
        + ". ref_min_score = mean return of a uniform "
        f"random policy, ref_max_score = mean return of the expert policy acting stochastically, "
        f"each over {refs['episodes']} episodes. Rebuild: "
        + rebuild_command(env_id, level, sac, settings, seed)
        + "."
    )


def rebuild_command(
    env_id: str, level: str, sac: SACSettings, settings: BuildSettings, seed: int
) -> str:
    """The ``divo data build`` command that makes this level again: every setting the command
    line sets, so a default changed since cannot make it another build."""
    return (
        f"divo data build {env_id} --levels {level} --namespace {settings.namespace} "
        f"--version {settings.version} --seed {seed} --sac-steps {sac.total_steps} "
        f"--random-steps {sac.random_steps} --snapshot-every {sac.snapshot_every} "
        f"--eval-episodes {sac.eval_episodes} --batch-size {sac.batch_size} "
        f"--hidden {sac.hidden_sizes[0]} --size {settings.dataset_size} "
        f"--medium-fraction {settings.medium_fraction!r} --expert {settings.expert} "
        f"--ref-episodes {settings.ref_episodes}"
    )


__all__ = [
    "DEFAULT_LEVELS",
    "LEVELS",
    "BuildSettings",
    "Selection",
    "build_datasets",
    "dataset_id",
    "select_snapshots",
]
