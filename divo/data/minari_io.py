"""Writing Minari datasets, and where they are stored.

``write_minari_dataset`` turns whole-episode numpy arrays into a Minari dataset through
``minari.create_dataset_from_buffers`` and ``EpisodeBuffer``s (``minari.DataCollector`` would pull
in JAX). Datasets live under the local Minari root (``MINARI_DATASETS_PATH``, else
``~/.minari/datasets``).

Episode layout (Minari's): ``observations [T+1, O]`` (the last one is the state after the final
step), ``actions [T, A]``, ``rewards [T]``, ``terminations [T]``, ``truncations [T]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
from gymnasium.envs.registration import EnvSpec
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id

from divo.data.checks import check_reference_pair
from divo.data.paths import get_dataset_path, is_local
from divo.data.transitions import episodes_to_transitions, write_cache
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
            scores (written only when given; with ``ref_max_score``, and below it).
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
    if (ref_min_score is None) != (ref_max_score is None):
        raise DatasetError(
            f"dataset {dataset_id!r}: give both ref_min_score and ref_max_score, or neither (a "
            "normalised score needs the pair; divo's loader refuses half of one)"
        )
    if ref_min_score is not None:  # the loader's check, before anything is written
        check_reference_pair(
            float(ref_min_score),
            float(ref_max_score),
            f"dataset {dataset_id!r}: ref_min_score={ref_min_score!r}, "
            f"ref_max_score={ref_max_score!r}",
            "give the random policy's return first and the expert's second",
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
    for i, episode in enumerate(episodes):  # before anything is written: a refusal leaves none
        actions = np.asarray(episode["actions"])
        steps = len(actions)
        if actions.ndim != 2 or actions.shape[1:] != action_space.shape:
            raise DatasetError(
                f"episode {i}: actions of shape {actions.shape}; write [T, "
                f"{', '.join(map(str, action_space.shape))}] (the action space's shape per "
                "step, a one-number action as [T, 1])"
            )
        for key in ("rewards", "terminations", "truncations"):
            if np.shape(episode[key]) != (steps,):
                raise DatasetError(
                    f"episode {i}: {key} of shape {np.shape(episode[key])}; write [{steps}], "
                    "one per action"
                )
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
        write_cache(
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
