"""Writing Minari datasets, and the datasets divo builds itself (the multimodal bandit).

``write_minari_dataset`` turns whole-episode numpy arrays into a Minari dataset through
``minari.create_dataset_from_buffers`` and ``EpisodeBuffer``s (``minari.DataCollector`` would pull
in JAX). ``BUILTIN_DATASETS`` maps the ids divo can build to their builders; ``ensure_builtin``
writes a missing one into the local Minari root (``MINARI_DATASETS_PATH``, else ``~/.minari``)
the first time it is asked for.

Episode layout (Minari's): ``observations [T+1, O]`` (the last one is the state after the final
step), ``actions [T, A]``, ``rewards [T]``, ``terminations [T]``, ``truncations [T]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
from gymnasium.envs.registration import EnvSpec
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id
from minari.storage.datasets_root_dir import get_dataset_path

from divo.envs import BANDIT_ENV_ID
from divo.envs.bandit import MODE_CENTERS, bandit_reward
from divo.errors import DatasetError

EPISODE_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")

# Minari warns for every optional metadata field left empty; these say nothing to our users.
_MINARI_NOISE = (
    r".*`code_permalink` is set to None.*",
    r".*`author` is set to None.*",
    r".*`author_email` is set to None.*",
    r".*`eval_env` is set to None.*",
    r".*env_spec is None.*",
    r".*`algorithm_name` is set to None.*",
    r".*`description` is set to None.*",
)


def minari_root() -> Path:
    """The local Minari root: ``MINARI_DATASETS_PATH`` if set, else ``~/.minari/datasets``."""
    return Path(get_dataset_path())


def is_local(dataset_id: str) -> bool:
    """Whether ``dataset_id`` is stored under the local Minari root."""
    return get_dataset_path(dataset_id).joinpath("data").is_dir()


def float32_box(space: gym.Space) -> gym.spaces.Box:
    """The same Box with float32 dtype (MuJoCo envs declare float64; datasets store float32)."""
    if not isinstance(space, gym.spaces.Box):
        raise DatasetError(
            f"space {space} is not a Box; divo writes and trains on continuous (Box) spaces only"
        )
    return gym.spaces.Box(
        low=space.low.astype(np.float32), high=space.high.astype(np.float32), dtype=np.float32
    )


def _episode_buffer(index: int, episode: dict[str, np.ndarray]) -> EpisodeBuffer:
    missing = [key for key in EPISODE_KEYS if key not in episode]
    if missing:
        raise DatasetError(
            f"episode {index} lacks {', '.join(missing)}; every episode needs the arrays "
            f"{', '.join(EPISODE_KEYS)}"
        )
    observations = np.asarray(episode["observations"], dtype=np.float32)
    actions = np.asarray(episode["actions"], dtype=np.float32)
    steps = len(actions)
    lengths = {key: len(episode[key]) for key in ("rewards", "terminations", "truncations")}
    if steps == 0 or len(observations) != steps + 1 or any(n != steps for n in lengths.values()):
        raise DatasetError(
            f"episode {index} has {len(observations)} observations, {steps} actions and "
            f"{lengths} per-step values; an episode of T >= 1 steps needs T+1 observations "
            "(the last is the state after the final step) and T of everything else"
        )
    return EpisodeBuffer(
        id=index,
        observations=observations,
        actions=actions,
        rewards=np.asarray(episode["rewards"], dtype=np.float64),
        terminations=np.asarray(episode["terminations"], dtype=bool),
        truncations=np.asarray(episode["truncations"], dtype=bool),
    )


def make_env(spec: EnvSpec | str, **kwargs: Any) -> gym.Env:
    """``gym.make(spec, **kwargs)`` for evaluation, without the noise of its wrappers.

    gymnasium's ``RescaleAction`` (which divo adds to the spec of data whose actions are not in
    [-1, 1]) builds float64 bounds for a float32 space and warns about the cast on every
    environment made; the cast is exact for [-1, 1], so that warning is dropped. Maze envs' model
    files are removed (``remove_maze_xml``).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")
        env = gym.make(spec, **kwargs)
    remove_maze_xml(env)
    return env


def remove_maze_xml(env: gym.Env) -> None:
    """Delete the MJCF file a gymnasium-robotics maze env leaves in the temp folder.

    Every maze env writes its model to ``<tmp>/ant_maze<time>.xml`` (~8 kB) and never deletes
    it; MuJoCo has read it once the env exists, so it can go. Other envs: nothing happens.
    """
    path = getattr(env.unwrapped, "tmp_xml_file_path", None)
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


class EpisodeRecorder:
    """One episode recorded step by step; ``arrays()`` returns it in Minari's layout."""

    def __init__(self, observation: Any) -> None:
        self.observations = [np.asarray(observation, dtype=np.float32)]
        self.actions: list[np.ndarray] = []
        self.rewards: list[float] = []
        self.terminations: list[bool] = []
        self.truncations: list[bool] = []

    def add(self, action: Any, observation: Any, reward: float, terminated: bool,
            truncated: bool) -> None:  # fmt: skip
        """Record one step: the action taken and what the environment returned."""
        self.actions.append(np.asarray(action, dtype=np.float32))
        self.observations.append(np.asarray(observation, dtype=np.float32))
        self.rewards.append(float(reward))
        self.terminations.append(bool(terminated))
        self.truncations.append(bool(truncated))

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def done(self) -> bool:
        return bool(self.actions) and (self.terminations[-1] or self.truncations[-1])

    @property
    def last_observation(self) -> np.ndarray:
        return self.observations[-1]

    def arrays(self, *, cut_off: bool = True) -> dict[str, np.ndarray]:
        """The episode as arrays. ``cut_off``: a last step with neither flag (the episode was
        stopped by a step budget) is flagged truncated, never terminal."""
        truncations = np.asarray(self.truncations, dtype=bool)
        if cut_off and self.actions and not self.done:
            truncations[-1] = True
        return {
            "observations": np.asarray(self.observations, dtype=np.float32),
            "actions": np.asarray(self.actions, dtype=np.float32),
            "rewards": np.asarray(self.rewards, dtype=np.float64),
            "terminations": np.asarray(self.terminations, dtype=bool),
            "truncations": truncations,
        }


def random_policy_episodes(
    env: gym.Env, total_steps: int, *, seed: int = 0, flag_cut_off: bool = True
) -> list[dict[str, np.ndarray]]:
    """Uniform-random-policy episodes in Minari's layout, ``total_steps`` transitions in all.

    Episode i is reset with ``seed + i``. The last episode is cut off where the step budget runs
    out; ``flag_cut_off`` marks that step truncated (False leaves it with neither flag, as a
    collector stopped mid-episode does; the loader then treats it as a truncation).
    """
    env.action_space.seed(seed)
    episodes: list[dict[str, np.ndarray]] = []
    steps = 0
    while steps < total_steps:
        episode = EpisodeRecorder(env.reset(seed=seed + len(episodes))[0])
        while not episode.done and steps < total_steps:
            action = env.action_space.sample()
            episode.add(action, *env.step(action)[:4])
            steps += 1
        episodes.append(episode.arrays(cut_off=flag_cut_off))
    return episodes


def write_minari_dataset(
    dataset_id: str,
    episodes: Sequence[dict[str, np.ndarray]],
    *,
    env: str | EnvSpec | gym.Env | None,
    eval_env: str | EnvSpec | gym.Env | None = None,
    observation_space: gym.spaces.Box | None = None,
    action_space: gym.spaces.Box | None = None,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    algorithm_name: str | None = None,
    description: str | None = None,
) -> minari.MinariDataset:
    """Write ``episodes`` as the Minari dataset ``dataset_id`` under the local Minari root.

    Args:
        dataset_id: ``(namespace/)name-v(version)``, e.g. ``"divo/bandit/multimodal-v0"``.
        episodes: one dict of numpy arrays per episode: ``observations [T+1, O]``,
            ``actions [T, A]``, ``rewards [T]``, ``terminations [T]``, ``truncations [T]``.
            Values are stored as given (float32 observations/actions); no value checks here, the
            loader checks.
        env: the environment (id, spec or instance) the data comes from, stored so that the
            dataset can recreate it for evaluation; None for data without an environment.
        eval_env: the environment to evaluate in when it differs from ``env`` (e.g. a maze
            whose data was collected with moving goals but is evaluated with a fixed one);
            Minari stores it as the dataset's eval env spec.
        observation_space: the stored observation space; default: ``env``'s, as a float32
            Box.
        action_space: the stored action space; default: ``env``'s, as a
            float32 Box.
        ref_min_score: return of a random policy, stored in the metadata for normalised
            scores (written only when given).
        ref_max_score: return of an expert policy, the same way.

    Returns:
        The written ``minari.MinariDataset``.
    """
    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError) as exc:
        raise DatasetError(
            f"dataset id {dataset_id!r} is malformed; use (namespace/)name-v<version>, "
            "e.g. 'divo/bandit/multimodal-v0'"
        ) from exc
    if is_local(dataset_id):
        raise DatasetError(
            f"dataset {dataset_id!r} already exists at {get_dataset_path(dataset_id)}; bump its "
            "version or delete it first (minari delete ID)"
        )
    if observation_space is None or action_space is None:
        if env is None:
            raise DatasetError(
                "write_minari_dataset needs observation_space and action_space when env is None"
            )
        probe = env if isinstance(env, gym.Env) else gym.make(env)
        observation_space = observation_space or float32_box(probe.observation_space)
        action_space = action_space or float32_box(probe.action_space)
        if probe is not env:
            probe.close()
    observation_space = float32_box(observation_space)
    action_space = float32_box(action_space)
    buffers = [_episode_buffer(i, episode) for i, episode in enumerate(episodes)]

    with warnings.catch_warnings():
        for pattern in _MINARI_NOISE:
            warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
        dataset = minari.create_dataset_from_buffers(
            dataset_id=dataset_id,
            buffer=buffers,
            env=env,
            eval_env=eval_env,
            algorithm_name=algorithm_name,
            author="divo",
            observation_space=observation_space,
            action_space=action_space,
            description=description,
        )
    # Minari stores reference scores only when an eval env exists AND ref_max_score is given,
    # and then computes a missing ref_min_score with 100 random-policy episodes; write them
    # ourselves so that what is given is what is stored.
    refs = {
        key: float(value)
        for key, value in (("ref_min_score", ref_min_score), ("ref_max_score", ref_max_score))
        if value is not None
    }
    if refs:
        dataset.storage.update_metadata(refs)
    if buffers:  # the episodes are in memory: prime the transitions cache (see below)
        _write_cache(
            dataset_id,
            Path(dataset.storage.data_path),
            episodes_to_transitions(
                {
                    "observations": b.observations,
                    "actions": b.actions,
                    "rewards": b.rewards,
                    "terminations": b.terminations,
                    "truncations": b.truncations,
                }
                for b in buffers
            ),
        )
    return dataset


# --------------------------------------------------------------------------------------------
# Episodes -> flat transitions, with an on-disk cache.
#
# Minari's HDF5 storage keeps one HDF5 group per episode; reading costs ~2 ms per episode here,
# so datasets of many short episodes (the bandit: one step each) take seconds to read. The flat
# arrays are therefore cached in ``<root>/.divo-cache/<id>/`` (a hidden folder of the Minari
# root: Minari's listings skip it, and it is not inside the dataset's folder, which
# ``minari upload`` sends whole), keyed by the names, sizes and modification times of the
# dataset's data files: any rewrite of the data invalidates the cache. The cache holds the values
# exactly as stored; every check and transform happens after reading it.

CACHE_DIR = ".divo-cache"
CACHE_FILE = "transitions-v1.npz"


def transitions_cache_path(dataset_id: str, observation_keys: Sequence[str] | None = None) -> Path:
    """Where the flat transitions of ``dataset_id`` are cached (under the current Minari root);
    with ``observation_keys`` (a Dict observation space), one file per choice of keys."""
    name = CACHE_FILE
    if observation_keys is not None:
        name = CACHE_FILE.replace(".npz", f"-obs-{'+'.join(observation_keys)}.npz")
    return minari_root() / CACHE_DIR / dataset_id / name


def observation_key_order(space: gym.spaces.Dict, keys: Sequence[str] | None = None) -> list[str]:
    """The keys of a Dict observation space that divo keeps (default: all), in the order in
    which gymnasium's ``FilterObservation`` + ``FlattenObservation`` concatenate them.

    ``FilterObservation`` builds its Dict from a plain dict, which gymnasium sorts by key, so
    the order is the sorted one whatever the order of ``keys``; building the same Dict here keeps
    the data's columns and the evaluation environment's observations in step.
    """
    chosen = list(space.spaces) if keys is None else list(keys)
    return list(gym.spaces.Dict({key: space[key] for key in chosen}).spaces)


def flatten_observations(observations: Any, keys: Sequence[str] | None) -> np.ndarray:
    """``[T, O]`` observations; a dict of per-key arrays becomes ``[T, sum of sizes]`` with the
    keys concatenated in the order given (see ``observation_key_order``)."""
    if not isinstance(observations, Mapping):
        return np.asarray(observations)
    if keys is None:
        raise DatasetError(
            "the episodes hold dict observations but no observation keys were given; pass "
            f"observation_keys (the dataset's keys: {', '.join(observations)})"
        )
    return np.concatenate([_flat_columns(observations[key]) for key in keys], axis=1)


def _flat_columns(value: Any) -> np.ndarray:
    """``[T, ...]`` -> ``[T, size]``; a nested dict (a Dict inside the Dict, e.g. Minari's
    Kitchen goals) is flattened by sorted key, the order of gymnasium's Dict built from a dict,
    which ``FlattenObservation`` follows."""
    if isinstance(value, Mapping):
        return np.concatenate([_flat_columns(value[key]) for key in sorted(value)], axis=1)
    value = np.asarray(value)
    return value.reshape(len(value), -1)


def episodes_to_transitions(
    episodes: Iterable[Mapping[str, Any]], observation_keys: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Flatten whole episodes into per-transition arrays, values as stored.

    Args:
        episodes: mappings with ``observations [T+1, O]``, ``actions [T, A]``, ``rewards [T]``,
            ``terminations [T]``, ``truncations [T]`` (Minari's episode layout).
        observation_keys: for dict observations (a Dict observation space), the keys whose
            arrays are concatenated, in this order (see ``observation_key_order``).

    Returns:
        ``observation [N, O]`` and ``next_observation [N, O]`` (float32; the next one is the
        episode's stored observation t+1, also after a truncation), ``action [N, A]`` (float32),
        ``reward [N]`` (float64), ``terminated [N]``, ``truncated [N]`` (bool, as stored) and
        ``episode_length [E]`` (int64).
    """
    parts: dict[str, list[np.ndarray]] = {
        key: []
        for key in (
            "observation",
            "next_observation",
            "action",
            "reward",
            "terminated",
            "truncated",
        )
    }
    lengths = []
    for index, episode in enumerate(episodes):
        observations = flatten_observations(episode["observations"], observation_keys)
        actions = np.asarray(episode["actions"])
        steps = len(episode["rewards"])
        if observations.ndim != 2 or actions.ndim != 2:
            raise DatasetError(
                f"episode {index} has observations of shape {observations.shape} and actions of "
                f"shape {actions.shape}; divo needs flat vectors ([T+1, O] and [T, A])"
            )
        if len(observations) != steps + 1 or len(actions) != steps:
            raise DatasetError(
                f"episode {index} stores {len(observations)} observations, {len(actions)} "
                f"actions and {steps} rewards; Minari's layout is T+1 observations for T steps: "
                "rewrite the dataset"
            )
        parts["observation"].append(observations[:-1].astype(np.float32, copy=False))
        parts["next_observation"].append(observations[1:].astype(np.float32, copy=False))
        parts["action"].append(actions.astype(np.float32, copy=False))
        parts["reward"].append(np.asarray(episode["rewards"], dtype=np.float64).reshape(steps))
        parts["terminated"].append(np.asarray(episode["terminations"], dtype=bool).reshape(steps))
        parts["truncated"].append(np.asarray(episode["truncations"], dtype=bool).reshape(steps))
        lengths.append(steps)
    if not lengths:
        raise DatasetError("the dataset holds no episodes; write some data into it first")
    out = {key: np.concatenate(value) for key, value in parts.items()}
    out["episode_length"] = np.asarray(lengths, dtype=np.int64)
    return out


def _data_fingerprint(data_path: Path) -> str:
    """Names, sizes and modification times of the data files (not the editable metadata)."""
    entries = []
    for path in sorted(data_path.rglob("*")):
        if path.is_file() and path.name != "metadata.json":
            stat = path.stat()
            entries.append([str(path.relative_to(data_path)), stat.st_size, stat.st_mtime_ns])
    return json.dumps(entries)


def _write_cache(
    dataset_id: str,
    data_path: Path,
    transitions: dict[str, np.ndarray],
    observation_keys: Sequence[str] | None = None,
) -> None:
    cache = transitions_cache_path(dataset_id, observation_keys)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, scratch = tempfile.mkstemp(dir=cache.parent, suffix=".npz")
    except OSError:  # a read-only dataset root: work without the cache
        return
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez(file, fingerprint=np.array(_data_fingerprint(data_path)), **transitions)
        os.replace(scratch, cache)  # atomic: readers see the old cache or the whole new one
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(scratch)


def _read_cache(
    dataset_id: str, data_path: Path, observation_keys: Sequence[str] | None = None
) -> dict[str, np.ndarray] | None:
    cache = transitions_cache_path(dataset_id, observation_keys)
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) != _data_fingerprint(data_path):
                return None
            return {key: stored[key] for key in stored.files if key != "fingerprint"}
    except (OSError, ValueError, KeyError):  # unreadable or stale format: rebuild it
        return None


def read_transitions(
    dataset: minari.MinariDataset,
    *,
    use_cache: bool = True,
    observation_keys: Sequence[str] | None = None,
) -> dict[str, Any]:
    """All transitions of a Minari dataset as flat arrays (see ``episodes_to_transitions``;
    ``observation_keys``: which keys of dict observations, in order)."""
    data_path = Path(dataset.storage.data_path)
    whole = len(dataset.episode_indices) == dataset.storage.total_episodes
    if use_cache and whole:
        cached = _read_cache(dataset.id, data_path, observation_keys)
        if cached is not None:
            return cached
    transitions = episodes_to_transitions(
        dataset.storage.get_episodes(dataset.episode_indices), observation_keys
    )
    if use_cache and whole:
        _write_cache(dataset.id, data_path, transitions, observation_keys)
    return transitions


# --------------------------------------------------------------------------------------------
# The multimodal bandit dataset (Diffusion-QL's 2-D toy task).

BANDIT_DATASET_ID = "divo/bandit/multimodal-v0"
# Diffusion-QL's toy has 10,000 samples, but Minari's HDF5 storage writes ~2 ms per episode
# (10,000 one-step episodes: ~19 s, 136 MB on our 2-core machine), so the built-in dataset holds
# 4,000 (1,000 per mode; ~8 s to write on first use), which is ample for a 2-D, 4-mode task.
BANDIT_NUM_SAMPLES = 4_000
BANDIT_MODE_STD = 0.05  # Diffusion-QL's toy: std of each behaviour mode
BANDIT_DATA_SEED = 0
BANDIT_REF_MIN_SAMPLES = 1_000_000  # Monte Carlo samples of the uniform-random policy's return
BANDIT_REF_MIN_SEED = 12345
BANDIT_REF_MAX_SCORE = 1.0  # the best mode's payoff: r(best centre) = 1.0


def bandit_random_return(
    num_samples: int = BANDIT_REF_MIN_SAMPLES, seed: int = BANDIT_REF_MIN_SEED
) -> float:
    """Expected return of a uniform random action on the bandit (Monte Carlo, fixed seed)."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1.0, 1.0, size=(num_samples, MODE_CENTERS.shape[1]))
    return float(bandit_reward(actions).astype(np.float64).mean())


def bandit_episodes(
    num_samples: int = BANDIT_NUM_SAMPLES,
    *,
    std: float = BANDIT_MODE_STD,
    seed: int = BANDIT_DATA_SEED,
) -> list[dict[str, np.ndarray]]:
    """Behaviour data for the bandit: ``num_samples`` one-step episodes, equally from each mode.

    Actions ~ N(centre_k, std^2 I) clipped to [-1, 1], with the modes in a shuffled order;
    rewards are the bandit's reward of the (clipped) action; every episode terminates.
    """
    rng = np.random.default_rng(seed)
    num_modes = len(MODE_CENTERS)
    modes = np.arange(num_samples) % num_modes  # equal counts (up to one when not divisible)
    rng.shuffle(modes)
    actions = MODE_CENTERS[modes] + std * rng.standard_normal((num_samples, MODE_CENTERS.shape[1]))
    actions = np.clip(actions, -1.0, 1.0).astype(np.float32)
    rewards = bandit_reward(actions)
    observations = np.zeros((2, 1), dtype=np.float32)
    done, not_done = np.ones(1, dtype=bool), np.zeros(1, dtype=bool)
    return [
        {
            "observations": observations,
            "actions": actions[i : i + 1],
            "rewards": rewards[i : i + 1],
            "terminations": done,
            "truncations": not_done,
        }
        for i in range(num_samples)
    ]


def build_bandit_dataset(
    dataset_id: str = BANDIT_DATASET_ID, *, num_samples: int | None = None
) -> minari.MinariDataset:
    """Write the multimodal-bandit dataset (deterministic: fixed seeds).

    ``num_samples`` defaults to the module's ``BANDIT_NUM_SAMPLES``, read at call time.
    """
    num_samples = BANDIT_NUM_SAMPLES if num_samples is None else num_samples
    return write_minari_dataset(
        dataset_id,
        bandit_episodes(num_samples),
        env=BANDIT_ENV_ID,
        ref_min_score=bandit_random_return(),
        ref_max_score=BANDIT_REF_MAX_SCORE,
        algorithm_name="four-gaussian-mixture",
        description=(
            f"Diffusion-QL's 2-D multimodal bandit: {num_samples} one-step episodes whose actions "
            f"are drawn equally from four Gaussians (std {BANDIT_MODE_STD}, clipped to [-1, 1]) "
            "at (+-0.8, +-0.8), paying 1.0 at (-0.8, 0.8), 0.5 at (0.8, -0.8), 0.25 at "
            "(0.8, 0.8) and 0 at (-0.8, -0.8). ref_min_score: uniform random action; "
            "ref_max_score: the best mode's centre."
        ),
    )


# --------------------------------------------------------------------------------------------
# Built-in datasets: created on first use.


def _pointmaze_builder(maze: str) -> Callable[[str], Any]:
    def build(dataset_id: str) -> Any:
        # imported here: the maze extra is optional, and divo.factory imports this module
        from divo.factory.pointmaze import build_pointmaze_dataset

        return build_pointmaze_dataset(maze, dataset_id=dataset_id)

    return build


# Datasets made with `divo data build` on our machines and shipped inside the package
# (divo/shipped/<id>/data/...: Minari's own layout); the first use copies one into the local
# Minari root. docs/datasets.md, "Shipped datasets", says how each was made and how to rebuild it.
SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped"


def shipped_datasets() -> list[str]:
    """Ids of the datasets shipped with divo."""
    return sorted(
        str(path.parent.parent.relative_to(SHIPPED_ROOT)).replace(os.sep, "/")
        for path in SHIPPED_ROOT.glob("**/data/metadata.json")
    )


def copy_shipped_dataset(dataset_id: str) -> minari.MinariDataset:
    """Copy the shipped dataset ``dataset_id`` into the local Minari root."""
    source = SHIPPED_ROOT / dataset_id
    if not source.joinpath("data", "metadata.json").is_file():
        raise DatasetError(
            f"{dataset_id!r} is not shipped with divo (shipped: {', '.join(shipped_datasets())})"
        )
    shutil.copytree(source, get_dataset_path(dataset_id), dirs_exist_ok=True)
    return minari.load_dataset(dataset_id)


BUILTIN_DATASETS: dict[str, Callable[[str], Any]] = {
    **{dataset_id: copy_shipped_dataset for dataset_id in shipped_datasets()},
    BANDIT_DATASET_ID: build_bandit_dataset,
    # sparse-reward navigation (waypoint planner + PD controller; needs the maze extra)
    "divo/pointmaze/umaze-v0": _pointmaze_builder("umaze"),
    "divo/pointmaze/medium-v0": _pointmaze_builder("medium"),
}


@contextlib.contextmanager
def _minari_root_at(path: Path) -> Iterator[None]:
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous


def ensure_builtin(dataset_id: str) -> bool:
    """Write the built-in dataset ``dataset_id`` into the local Minari root if it is missing.

    The dataset is written into a hidden scratch folder of the root and renamed into place, so
    a crash never leaves half a dataset behind and concurrent first uses (several seeds started
    together) do not clash: the first rename wins and the others discard their copy.

    Returns:
        True if ``dataset_id`` is built-in (and now stored locally), False if it is not built-in.
    """
    builder = BUILTIN_DATASETS.get(dataset_id)
    if builder is None:
        return False
    if is_local(dataset_id):
        return True
    root = minari_root()
    target = get_dataset_path(dataset_id)
    try:
        with tempfile.TemporaryDirectory(prefix=".divo-build-", dir=root) as scratch:
            with _minari_root_at(Path(scratch)):
                builder(dataset_id)
                built_cache = transitions_cache_path(dataset_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(Path(scratch, dataset_id), target)
            except OSError:
                if not is_local(dataset_id):  # not a lost race: a real failure
                    raise
            else:  # the cache was written for exactly these files (rename keeps their mtimes)
                with contextlib.suppress(OSError):
                    cache = transitions_cache_path(dataset_id)
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(built_cache, cache)
    except OSError as exc:
        raise DatasetError(
            f"cannot write the built-in dataset {dataset_id!r} into {root} "
            f"({type(exc).__name__}: {exc}); point MINARI_DATASETS_PATH at a writable folder, or "
            f"remove a stale {target}"
        ) from exc
    namespace = parse_dataset_id(dataset_id)[0]
    if namespace is not None and namespace not in minari.namespace.list_local_namespaces():
        with contextlib.suppress(ValueError, OSError):
            minari.namespace.create_namespace(namespace)
    return True


def remove_local(dataset_id: str) -> None:
    """Delete a local dataset and its transitions cache (no error if they are absent)."""
    shutil.rmtree(get_dataset_path(dataset_id), ignore_errors=True)
    shutil.rmtree(transitions_cache_path(dataset_id).parent, ignore_errors=True)


__all__ = [
    "BANDIT_DATASET_ID",
    "EpisodeRecorder",
    "BUILTIN_DATASETS",
    "bandit_episodes",
    "bandit_random_return",
    "build_bandit_dataset",
    "copy_shipped_dataset",
    "ensure_builtin",
    "episodes_to_transitions",
    "float32_box",
    "flatten_observations",
    "is_local",
    "make_env",
    "minari_root",
    "observation_key_order",
    "read_transitions",
    "remove_local",
    "remove_maze_xml",
    "shipped_datasets",
    "transitions_cache_path",
    "write_minari_dataset",
]
