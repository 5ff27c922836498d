"""OGBench manipulation datasets made here by OGBench's own scripted oracles.

OGBench (Park et al., 2024; PyPI ``ogbench``) collects its cube, scene and puzzle datasets with
oracle policies that ship inside its wheel (``ogbench.manipspace.oracles``); the driver that
runs them lives only in OGBench's git repository. This module is divo's driver, written from
OGBench's documented generation settings:

- the environment in ``data_collection`` mode, never ending at a goal, episodes of 1,001 steps
  (so 1,000 transitions each after loading); 1,000 training episodes plus a tenth as many
  validation episodes for cube-single, cube-double, scene, puzzle-3x3 and puzzle-4x4;
- ``play`` data: the plan oracles (keyframes interpolated into a plan) with temporally
  correlated noise, noise level 0.1 and Gaussian smoothing 0.5 (the oracle scales it by
  [0.05, 0.05, 0.05, 0.3, 1.0] for x, y, z, yaw and gripper);
- ``noisy`` data: the closed-loop Markov oracles (minimum action norm 0.4) with Gaussian noise
  of per-episode level xi ~ U(0, 0.1), scaled [xi, xi, xi, 3 xi, 10 xi], and a uniformly random
  action with probability 0.1 (cube, scene) or 0.2 (puzzle);
- a new sub-task as soon as the oracle finishes one; cube stacking with probability 0 (single)
  or U(0, 0.25) per episode (double); the puzzle oracle keeps its gripper closed; scene episodes
  whose cube leaves the visible table are redrawn (OGBench's health check);
- per step: the observation, the clipped action, ``terminals`` (the episode's last step), and
  the simulator state before the action (``qpos``, ``qvel``, and ``button_states`` for scene
  and puzzle), which OGBench's loader uses to compute singletask rewards.

The files are OGBench's layout, ``<env>-<kind>-v0.npz`` and ``<env>-<kind>-v0-val.npz``, read
by :mod:`divo.data.ogbench` exactly as hosted ones are. They are not bit-identical to the
hosted files (other random draws, another MuJoCo build).

Generation is resumable: finished chunks of episodes are kept in a hidden scratch folder beside
the output, each episode is seeded from (seed, episode index) so a resumed run writes what an
uninterrupted one would, and the final files appear under their names only when whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from divo.data.envs import require_ogbench
from divo.errors import DatasetError

# Environments whose datasets OGBench generates with 1,000 episodes of 1,000 transitions (plus
# 10% validation episodes): its data_gen_scripts/commands.sh
GENERATED_ENVS = ("cube-single", "cube-double", "scene", "puzzle-3x3", "puzzle-4x4")
KINDS = ("play", "noisy")
EPISODES = 1000
EPISODE_STEPS = 1001  # stored steps per episode: 1,000 transitions once the loader pairs them
PLAY_NOISE, PLAY_SMOOTHING = 0.1, 0.5
MARKOV_NOISE, MARKOV_MIN_NORM = 0.1, 0.4
CHUNK_EPISODES = 10  # episodes per resumable chunk (about 25 s of simulation here)
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class OGBenchGeneration:
    """What a generation writes; a resumed run must match the settings of the partial one."""

    env: str
    kind: str = "play"
    episodes: int = EPISODES
    val_episodes: int = EPISODES // 10
    seed: int = 0
    episode_steps: int = EPISODE_STEPS
    noise: float = PLAY_NOISE
    noise_smoothing: float = PLAY_SMOOTHING
    min_norm: float = MARKOV_MIN_NORM
    p_random_action: float = 0.0
    generator_version: int = GENERATOR_VERSION

    @property
    def dataset_name(self) -> str:
        return f"{self.env}-{self.kind}-v0"

    @property
    def total_episodes(self) -> int:
        return self.episodes + self.val_episodes


def generation_settings(
    env: str, kind: str = "play", episodes: int = EPISODES, seed: int = 0
) -> OGBenchGeneration:
    """OGBench's settings for ``env`` and ``kind`` with ``episodes`` training episodes (and a
    tenth as many, at least one, for validation)."""
    if env not in GENERATED_ENVS:
        raise DatasetError(
            f"divo generates OGBench data for {', '.join(GENERATED_ENVS)}, not {env!r}; pick "
            "one of those (the other OGBench datasets need downloaded files or expert policies)"
        )
    if kind not in KINDS:
        raise DatasetError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if episodes < 1:
        raise DatasetError(f"episodes must be >= 1, got {episodes}")
    if kind == "play":
        return OGBenchGeneration(env, kind, episodes, max(1, episodes // 10), seed)
    p_random = 0.2 if env.startswith("puzzle") else 0.1
    return OGBenchGeneration(
        env,
        kind,
        episodes,
        max(1, episodes // 10),
        seed,
        noise=MARKOV_NOISE,
        noise_smoothing=0.0,
        p_random_action=p_random,
    )


def _oracles(env: Any, settings: OGBenchGeneration) -> dict[str, Any]:
    """One oracle per sub-task type the environment proposes (its ``privileged/target_task``)."""
    from ogbench.manipspace.oracles.markov.button_markov import ButtonMarkovOracle
    from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle
    from ogbench.manipspace.oracles.markov.drawer_markov import DrawerMarkovOracle
    from ogbench.manipspace.oracles.markov.window_markov import WindowMarkovOracle
    from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
    from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

    if settings.kind == "play":
        plan = {"noise": settings.noise, "noise_smoothing": settings.noise_smoothing}
        if settings.env.startswith("cube"):
            return {"cube": CubePlanOracle(env=env, **plan)}
        if settings.env == "scene":
            return {
                "cube": CubePlanOracle(env=env, **plan),
                "button": ButtonPlanOracle(env=env, **plan),
                "drawer": DrawerPlanOracle(env=env, **plan),
                "window": WindowPlanOracle(env=env, **plan),
            }
        return {"button": ButtonPlanOracle(env=env, gripper_always_closed=True, **plan)}
    norm = {"min_norm": settings.min_norm}
    if settings.env.startswith("cube"):
        return {"cube": CubeMarkovOracle(env=env, **norm)}
    if settings.env == "scene":
        return {
            "cube": CubeMarkovOracle(env=env, max_step=100, **norm),
            "button": ButtonMarkovOracle(env=env, **norm),
            "drawer": DrawerMarkovOracle(env=env, **norm),
            "window": WindowMarkovOracle(env=env, **norm),
        }
    return {"button": ButtonMarkovOracle(env=env, gripper_always_closed=True, **norm)}


def _stack_probability(env: str, rng: np.random.Generator) -> float:
    if env == "cube-single":
        return 0.0
    if env == "cube-double":
        return float(rng.uniform(0.0, 0.25))
    return 0.5  # OGBench's value for environments without cube stacking choices


def _healthy(env: str, qpos: np.ndarray) -> bool:
    """OGBench's scene check: the cube never leaves the visible table unless in the drawer."""
    if env != "scene":
        return True
    xyz = qpos[:, 14:17]
    too_far_right = (xyz[:, 1] >= 0.29).any()
    off_left = ((xyz[:, 1] <= -0.3) & ((xyz[:, 2] < 0.06) | (xyz[:, 2] > 0.08))).any()
    return not (too_far_right or off_left)


def _episode_seed(seed: int, episode: int, attempt: int) -> int:
    return int(np.random.SeedSequence([seed, episode, attempt]).generate_state(1)[0])


def collect_episode(
    env: Any, oracles: dict[str, Any], settings: OGBenchGeneration, episode: int
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """One episode of ``settings.episode_steps`` steps, seeded from (seed, episode)."""
    has_buttons = hasattr(env.unwrapped, "_cur_button_states")
    for attempt in range(100):
        seed = _episode_seed(settings.seed, episode, attempt)
        np.random.seed(seed % 2**32)  # the oracles draw from numpy's global generator
        rng = np.random.default_rng(seed)
        ob, info = env.reset(seed=seed)
        p_stack = _stack_probability(settings.env, rng)
        xi = float(rng.uniform(0.0, settings.noise)) if settings.kind == "noisy" else 0.0
        agent = oracles[info["privileged/target_task"]]
        agent.reset(ob, info)
        steps: dict[str, list[np.ndarray]] = {
            key: [] for key in ("observations", "actions", "terminals", "qpos", "qvel")
        }
        if has_buttons:
            steps["button_states"] = []
        subtasks = {"finished": 0, "succeeded": 0}  # the oracle's sub-tasks run to their end
        done = False
        while not done:
            if settings.p_random_action > 0 and rng.uniform() < settings.p_random_action:
                action = env.action_space.sample()
            else:
                action = np.asarray(agent.select_action(ob, info), dtype=np.float64)
                if settings.kind == "noisy":
                    scale = np.array([xi, xi, xi, 3 * xi, 10 * xi])
                    action = action + rng.normal(0.0, scale, action.shape)
            action = np.clip(action, -1.0, 1.0)
            next_ob, _, terminated, truncated, info = env.step(action)
            done = bool(terminated or truncated)
            if agent.done:  # the sub-task ended: score it, and start the next one
                subtasks["finished"] += 1
                subtasks["succeeded"] += int(bool(info["success"]))
                agent_ob, agent_info = env.unwrapped.set_new_target(p_stack=p_stack)
                agent = oracles[agent_info["privileged/target_task"]]
                agent.reset(agent_ob, agent_info)
            steps["observations"].append(ob)
            steps["actions"].append(action)
            steps["terminals"].append(done)
            steps["qpos"].append(info["prev_qpos"])
            steps["qvel"].append(info["prev_qvel"])
            if has_buttons:
                steps["button_states"].append(info["prev_button_states"])
            ob = next_ob
        arrays = _as_arrays(steps)
        if _healthy(settings.env, arrays["qpos"]):
            return arrays, subtasks
    raise DatasetError(
        f"episode {episode} of {settings.dataset_name}: 100 draws in a row failed OGBench's "
        "health check; the environment build may differ from OGBench's"
    )


def _as_arrays(steps: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    dtypes = {"terminals": bool, "button_states": np.int64}
    return {
        key: np.asarray(value, dtype=dtypes.get(key, np.float32)) for key, value in steps.items()
    }


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray], compressed: bool) -> None:
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            (np.savez_compressed if compressed else np.savez)(file, **arrays)
        _publish(scratch, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
        raise


def _publish(scratch: str, path: Path) -> None:
    """Move a finished scratch file to its name, readable as a plain new file would be (a
    scratch file is made private by ``mkstemp``)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(scratch, 0o666 & ~umask)
    os.replace(scratch, path)


def dataset_paths(directory: Path, dataset_name: str) -> tuple[Path, Path, Path]:
    """(training file, validation file, divo's record of how they were made)."""
    return (
        directory / f"{dataset_name}.npz",
        directory / f"{dataset_name}-val.npz",
        directory / f"{dataset_name}.divo.json",
    )


# environment steps per second of one generation worker, measured on this project's machines
# (cube-single, 1.1M steps): 389 on one, 888 on another, each with one other job beside it
STEPS_PER_SECOND = (350.0, 900.0)


def estimate(settings: OGBenchGeneration, workers: int = 1) -> str:
    """The size and time of a generation, stated before it starts."""
    steps = settings.total_episodes * settings.episode_steps
    fast, slow = (steps / rate / 60 / workers for rate in reversed(STEPS_PER_SECOND))
    where = "on one CPU core" if workers == 1 else f"on {workers} free CPU cores"
    took = "under a minute" if slow < 1 else f"about {max(1, round(fast))}-{slow:.0f} min"
    return (
        f"{settings.total_episodes} episodes ({settings.episodes} training + "
        f"{settings.val_episodes} validation) of {settings.episode_steps} steps = {steps:,} "
        f"environment steps, {took} {where}"
    )


def generate_ogbench_dataset(
    settings: OGBenchGeneration,
    directory: str | Path,
    *,
    progress: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    workers: int = 1,
) -> dict[str, Any]:
    """Generate ``settings`` into ``directory`` (resuming a partial run of the same settings).

    ``workers`` > 1 simulates that many chunks of episodes at once, each in a process of its
    own (one environment per process): every episode is seeded from (seed, episode index)
    alone, so the files are the same as one worker writes; on as many free cores the time
    should approach 1/``workers`` of one worker's.

    Returns the record also written beside the files (``<name>.divo.json``): the settings, the
    package versions, the oracle's sub-task success rate, steps and time.
    """
    require_ogbench()
    import mujoco
    import ogbench

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DatasetError(
            f"workers must be a whole number >= 1 (one per free core), got {workers!r}"
        )
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    train_path, val_path, record_path = dataset_paths(directory, settings.dataset_name)
    if train_path.exists() and not overwrite:
        raise DatasetError(
            f"{train_path} exists already; pass --overwrite to replace it (or another --dir)"
        )
    partial = directory / f".{settings.dataset_name}.partial"
    wanted = asdict(settings)
    settings_file = partial / "settings.json"
    if partial.is_dir():
        try:
            previous = json.loads(settings_file.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != wanted:
            log(f"divo data: discarding a partial generation with other settings in {partial}")
            shutil.rmtree(partial)
    partial.mkdir(exist_ok=True)
    if not settings_file.exists():
        settings_file.write_text(json.dumps(wanted, indent=2))

    total = settings.total_episodes
    chunks = [
        (start, min(start + CHUNK_EPISODES, total)) for start in range(0, total, CHUNK_EPISODES)
    ]
    todo = [c for c in chunks if not _chunk_path(partial, *c).is_file()]
    resumed = total - sum(end - start for start, end in todo)
    if resumed:
        log(f"divo data: resuming {settings.dataset_name}: {resumed} of {total} episodes done")
    workers = min(workers, max(1, len(todo)))
    if workers > 1:
        log(
            f"divo data: {len(todo)} chunks of up to {CHUNK_EPISODES} episodes on {workers} workers"
        )
    bar = tqdm(
        total=total,
        initial=resumed,
        unit="episode",
        desc=settings.dataset_name,
        disable=not progress,
        dynamic_ncols=True,
    )
    t0, new_steps = time.perf_counter(), 0

    def done(episodes: int, steps: int) -> None:
        nonlocal new_steps
        new_steps += steps
        bar.update(episodes)
        bar.set_postfix(steps_per_s=f"{new_steps / (time.perf_counter() - t0):.0f}")

    try:
        if workers == 1:
            env, oracles = _collector(settings)
            try:
                for start, end in todo:
                    _write_chunk(env, oracles, settings, partial, start, end, done)
            finally:
                env.close()
        else:
            _parallel_chunks(settings, partial, todo, workers, done)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0

    parts = [np.load(_chunk_path(partial, s, e)) for s, e in chunks]
    subtasks = np.sum([part["subtasks"] for part in parts], axis=0)
    keys = [key for key in parts[0].files if key != "subtasks"]
    data = {key: np.concatenate([part[key] for part in parts]) for key in keys}
    for part in parts:
        part.close()
    cut = settings.episodes * settings.episode_steps
    # the training file comes last, after its record: it is what says the data exist, and a
    # training file without a record reads as OGBench's hosted one (a replaced one goes first)
    train_path.unlink(missing_ok=True)
    _write_npz_atomic(val_path, {k: v[cut:] for k, v in data.items()}, compressed=True)
    record = {
        "dataset": settings.dataset_name,
        "made_by": "divo data ogbench (OGBench's oracles, divo's driver)",
        "settings": wanted,
        "versions": {
            "ogbench": getattr(ogbench, "__version__", _version("ogbench")),
            "mujoco": mujoco.__version__,
        },
        # where it ran: files made with the same settings and versions on another machine
        # may differ (simulation in floating point), so the record says which machine made it
        "machine": _machine(),
        # sub-tasks the oracle ran to their end, and the share that ended with the target reached
        "oracle_subtasks_finished": int(subtasks[0]),
        "oracle_subtask_success_rate": float(subtasks[1] / max(1, subtasks[0])),
        "transitions": {
            "train": settings.episodes * (settings.episode_steps - 1),
            "val": settings.val_episodes * (settings.episode_steps - 1),
        },
        "generation_seconds_this_run": round(seconds, 1),
        "steps_per_second_this_run": round(new_steps / seconds, 1) if new_steps else None,
    }
    fd, scratch = tempfile.mkstemp(dir=directory, prefix=f".{record_path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as file:
        json.dump(record, file, indent=2)
    _publish(scratch, record_path)
    _write_npz_atomic(train_path, {k: v[:cut] for k, v in data.items()}, compressed=True)
    shutil.rmtree(partial, ignore_errors=True)
    return record


def _chunk_path(partial: Path, start: int, end: int) -> Path:
    return partial / f"chunk-{start:06d}-{end:06d}.npz"


def _collector(settings: OGBenchGeneration) -> tuple[Any, dict[str, Any]]:
    """The data-collection environment and its oracles."""
    import gymnasium as gym

    with warnings.catch_warnings():  # gymnasium's float32 casts of OGBench's bounds
        warnings.simplefilter("ignore")
        env = gym.make(
            f"{settings.env}-v0",
            terminate_at_goal=False,
            mode="data_collection",
            max_episode_steps=settings.episode_steps,
        )
    return env, _oracles(env, settings)


def _write_chunk(
    env: Any,
    oracles: dict[str, Any],
    settings: OGBenchGeneration,
    partial: Path,
    start: int,
    end: int,
    done: Callable[[int, int], None] | None = None,
) -> int:
    """Collect episodes ``start`` to ``end - 1`` into their chunk file (written whole or not at
    all); ``done(episodes, steps)`` after each episode. Returns the steps collected."""
    episodes, finished, succeeded, steps = [], 0, 0, 0
    for episode in range(start, end):
        arrays, subtasks = collect_episode(env, oracles, settings, episode)
        episodes.append(arrays)
        finished += subtasks["finished"]
        succeeded += subtasks["succeeded"]
        steps += len(arrays["terminals"])
        if done is not None:
            done(1, len(arrays["terminals"]))
    merged = {key: np.concatenate([e[key] for e in episodes]) for key in episodes[0]}
    merged["subtasks"] = np.array([finished, succeeded], dtype=np.int64)
    _write_npz_atomic(_chunk_path(partial, start, end), merged, compressed=False)
    return steps


_WORKER: dict[str, Any] = {}  # a generation worker's environment and oracles (its process's)


def _worker_start(settings: OGBenchGeneration) -> None:
    require_ogbench()
    _WORKER["settings"] = settings
    _WORKER["env"], _WORKER["oracles"] = _collector(settings)


def _worker_chunk(partial: str, start: int, end: int) -> tuple[int, int]:
    steps = _write_chunk(
        _WORKER["env"], _WORKER["oracles"], _WORKER["settings"], Path(partial), start, end
    )
    return end - start, steps


def _parallel_chunks(
    settings: OGBenchGeneration,
    partial: Path,
    todo: list[tuple[int, int]],
    workers: int,
    done: Callable[[int, int], None],
) -> None:
    """Write the chunks of ``todo`` on ``workers`` processes (spawned: MuJoCo and forked
    processes do not mix); the first error stops the rest, finished chunks stay for a resume."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_start,
        initargs=(settings,),
    )
    futures: set = set()
    try:
        futures = {pool.submit(_worker_chunk, str(partial), s, e) for s, e in todo}
        _report_as_done(futures, done)
    finally:
        for future in futures:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _report_as_done(futures: set, done: Callable[[int, int], None]) -> None:
    """``done(*result)`` for each future as soon as it finishes (so the progress bar moves
    with every chunk), raising the first worker's error."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    pending = set(futures)
    while pending:
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            try:
                done(*future.result())  # raises a worker's error here
            except BrokenProcessPool as exc:
                raise DatasetError(
                    f"a generation worker ended abruptly ({exc}); the finished chunks are "
                    "kept: rerun the same command to resume (fewer --workers if memory "
                    "ran out)"
                ) from exc


def _machine() -> dict[str, Any]:
    """The processor and the vector instructions it offers (Linux's /proc/cpuinfo where
    readable), the platform and numpy's version."""
    import platform

    model, flags = platform.processor() or platform.machine(), []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                wanted = ("avx", "avx2", "fma", "avx512f")
                flags = [flag for flag in value.split() if flag in wanted]
                break
    return {
        "processor": model,
        "vector_instructions": flags,
        "platform": platform.platform(),
        "numpy": np.__version__,
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


__all__ = [
    "EPISODES",
    "GENERATED_ENVS",
    "KINDS",
    "OGBenchGeneration",
    "collect_episode",
    "dataset_paths",
    "estimate",
    "generate_ogbench_dataset",
    "generation_settings",
]
