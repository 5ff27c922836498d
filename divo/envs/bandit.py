"""A one-step, four-mode continuous bandit: Diffusion-QL's 2-D toy task as a Gymnasium env.

Every episode is a single step. The observation is a constant zero vector of shape (1,); the
action is a point in [-1, 1]^2. The reward is a sum of four Gaussian bumps, one per mode:

    r(a) = sum_k payoff_k * exp(-||a - c_k||^2 / (2 * BANDWIDTH^2))

The modes sit at (+-0.8, +-0.8) and pay differently, so a behaviour dataset drawn equally from all
four modes contains one good mode, two mediocre ones and one worthless one: a policy that clones
the data averages the modes (or picks one at random), while a policy that improves on it must find
the best mode, MODE_CENTERS[best_mode_index()].
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

# Mode centres [4, 2] and their payoffs [4]; the best mode is (-0.8, 0.8).
MODE_CENTERS = np.array([[-0.8, 0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, -0.8]], dtype=np.float32)
MODE_PAYOFFS = np.array([1.0, 0.5, 0.25, 0.0], dtype=np.float32)
# Width of each reward bump; the modes are 1.6 apart, so the bumps barely overlap (< 1e-6).
BANDWIDTH = 0.2
OBSERVATION_DIM = 1
ACTION_DIM = 2


def bandit_reward(action: np.ndarray) -> np.ndarray:
    """Reward of actions ``[*B, 2]`` -> ``[*B]`` (float32, in [0, 1])."""
    action = np.asarray(action, dtype=np.float64)
    sq_dist = ((action[..., None, :] - MODE_CENTERS.astype(np.float64)) ** 2).sum(-1)  # [*B, 4]
    bumps = np.exp(-sq_dist / (2.0 * BANDWIDTH**2))
    return (bumps * MODE_PAYOFFS.astype(np.float64)).sum(-1).astype(np.float32)


def best_mode_index() -> int:
    """Index of the highest-paying mode in MODE_CENTERS."""
    return int(np.argmax(MODE_PAYOFFS))


def best_action() -> np.ndarray:
    """The centre of the best mode, ``[2]`` float32: the optimal action."""
    return MODE_CENTERS[best_mode_index()].copy()


class MultimodalBanditEnv(gym.Env):
    """One-step bandit with four reward modes (registered as ``divo/MultimodalBandit-v0``)."""

    metadata = {"render_modes": []}

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = spaces.Box(
            low=-1.0, high=1.0, shape=(OBSERVATION_DIM,), dtype=np.float32
        )
        self.action_space = spaces.Box(low=-1.0, high=1.0, shape=(ACTION_DIM,), dtype=np.float32)
        self._observation = np.zeros(OBSERVATION_DIM, dtype=np.float32)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        return self._observation.copy(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(ACTION_DIM), -1.0, 1.0)
        reward = float(bandit_reward(action))
        return self._observation.copy(), reward, True, False, {}
