"""Small synthetic Minari datasets shared by the tests (import as ``from synthetic import ...``)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from divo.datasets import write_minari_dataset


def hopper_like_episode(obs_dim: int = 11, steps: int = 5, seed: int = 0) -> dict:
    """One random episode in Minari's layout with Hopper's action size (3), ending terminated."""
    rng = np.random.default_rng(seed)
    return {
        "observations": rng.standard_normal((steps + 1, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
        "rewards": rng.standard_normal(steps),
        "terminations": np.eye(steps, dtype=bool)[-1],
        "truncations": np.zeros(steps, dtype=bool),
    }


def write_hopper_like(dataset_id: str, episodes: list[dict], obs_dim: int = 11) -> str:
    """Write ``episodes`` as a local Minari dataset whose environment is Hopper-v5."""
    box = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
    write_minari_dataset(dataset_id, episodes, env="Hopper-v5", observation_space=box)
    return dataset_id
