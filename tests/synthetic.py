"""Small synthetic Minari datasets shared by the tests (import as ``from synthetic import ...``)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from divo.data.minari_io import write_minari_dataset


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


class PushRightEnv(gym.Env):
    """A task SAC learns in a few hundred updates: reward = the action, 20 steps per episode.

    Observation: the elapsed fraction of the episode. A uniform random policy earns 0 on
    average, the best policy 20. Registered as ``divo-test/PushRight-v0`` (``register_push_right``).
    """

    observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    horizon = 20

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self._t += 1
        reward = float(np.clip(action, -1.0, 1.0)[0])
        return np.array([self._t / self.horizon], np.float32), reward, False, False, {}


PUSH_RIGHT_ID = "divo-test/PushRight-v0"


def register_push_right() -> str:
    if PUSH_RIGHT_ID not in gym.registry:
        gym.register(
            PUSH_RIGHT_ID,
            entry_point="synthetic:PushRightEnv",
            max_episode_steps=PushRightEnv.horizon,
        )
    return PUSH_RIGHT_ID


class NestedDictEnv(gym.Env):
    """A Dict observation whose nested Dict is declared out of key order (z before a): its
    values are distinct constants, so a column in the wrong place is visible."""

    observation_space = gym.spaces.Dict(
        {
            "goal": gym.spaces.Box(-10.0, 10.0, (2,), np.float32),
            "state": gym.spaces.Dict(
                [
                    ("z", gym.spaces.Box(-200.0, 200.0, (1,), np.float32)),
                    ("a", gym.spaces.Box(-10.0, 10.0, (2,), np.float32)),
                ]
            ),
        }
    )
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return self._obs(), {}

    def _obs(self):
        state = {
            "z": np.array([100.0 + self._t], np.float32),
            "a": np.array([1.0, 2.0], np.float32),
        }
        return {"goal": np.array([-5.0, -6.0], np.float32), "state": state}

    def step(self, action):
        self._t += 1
        return self._obs(), -abs(float(action[0])), False, False, {}


NESTED_DICT_ID = "divo-test/NestedDict-v0"


def register_nested_dict() -> str:
    if NESTED_DICT_ID not in gym.registry:
        gym.register(NESTED_DICT_ID, entry_point="synthetic:NestedDictEnv", max_episode_steps=3)
    return NESTED_DICT_ID
