"""The 2-D multimodal bandit (Diffusion-QL's toy task): its environment and its dataset.

One step per episode; the observation is a constant; the reward of an action is the payoff of
the nearest mode centre within ``BANDWIDTH``. The dataset draws actions equally from four
Gaussians around the centres, so the behaviour policy is multimodal and its best mode is known.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import minari
import numpy as np
from gymnasium import spaces

from divo.data.envs import BANDIT_ENV_ID
from divo.data.minari_io import write_minari_dataset

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
# The rare-best variant: the best-paying mode holds only this share of the actions, the other
# three the rest equally; an unfiltered behaviour model seldom proposes the best mode there,
# which is where filtering the model's training data by advantage (PAD) should matter, if
# anywhere (issue 32).
RARE_BANDIT_DATASET_ID = "divo/bandit/rare-best-v0"
RARE_BEST_SHARE = 0.05


def rare_best_shares(best_share: float = RARE_BEST_SHARE) -> np.ndarray:
    """Mode shares ``[4]`` with ``best_share`` on the best-paying mode, the rest equal."""
    if not 0.0 < best_share < 1.0:
        raise ValueError(f"best_share must be in (0, 1), got {best_share}")
    others = len(MODE_CENTERS) - 1
    shares = np.full(len(MODE_CENTERS), (1.0 - best_share) / others)
    shares[best_mode_index()] = best_share
    return shares


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
    mode_shares: np.ndarray | None = None,
) -> list[dict[str, np.ndarray]]:
    """Behaviour data for the bandit: ``num_samples`` one-step episodes, equally from each mode
    (or in the proportions ``mode_shares`` ``[4]``, in the order of ``MODE_CENTERS``).

    Actions ~ N(centre_k, std^2 I) clipped to [-1, 1], with the modes in a shuffled order;
    rewards are the bandit's reward of the (clipped) action; every episode terminates.
    """
    rng = np.random.default_rng(seed)
    num_modes = len(MODE_CENTERS)
    if mode_shares is None:
        modes = np.arange(num_samples) % num_modes  # equal counts (up to one when not divisible)
    else:
        shares = np.asarray(mode_shares, dtype=np.float64)
        if shares.shape != (num_modes,) or (shares < 0).any() or abs(shares.sum() - 1) > 1e-9:
            raise ValueError(f"mode_shares must be {num_modes} shares summing to 1, got {shares}")
        # counts that add up to num_samples, each within one of its share
        counts = np.diff(np.round(np.concatenate([[0.0], np.cumsum(shares)]) * num_samples))
        counts = counts.astype(int)
        modes = np.repeat(np.arange(num_modes), counts)
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
    dataset_id: str = BANDIT_DATASET_ID,
    *,
    num_samples: int | None = None,
    mode_shares: np.ndarray | None = None,
) -> minari.MinariDataset:
    """Write the multimodal-bandit dataset (deterministic: fixed seeds); ``mode_shares`` as in
    :func:`bandit_episodes` (default: equal).

    ``num_samples`` defaults to the module's ``BANDIT_NUM_SAMPLES``, read at call time.
    """
    num_samples = BANDIT_NUM_SAMPLES if num_samples is None else num_samples
    shares = (
        "equally"
        if mode_shares is None
        else (
            "in the shares " + ", ".join(f"{x:.3g}" for x in mode_shares) + " (in the order below)"
        )
    )
    return write_minari_dataset(
        dataset_id,
        bandit_episodes(num_samples, mode_shares=mode_shares),
        env=BANDIT_ENV_ID,
        ref_min_score=bandit_random_return(),
        ref_max_score=BANDIT_REF_MAX_SCORE,
        algorithm_name="four-gaussian-mixture",
        description=(
            f"Diffusion-QL's 2-D multimodal bandit: {num_samples} one-step episodes whose actions "
            f"are drawn {shares} from four Gaussians (std {BANDIT_MODE_STD}, clipped to [-1, 1]) "
            "at (+-0.8, +-0.8), paying 1.0 at (-0.8, 0.8), 0.5 at (0.8, -0.8), 0.25 at "
            "(0.8, 0.8) and 0 at (-0.8, -0.8). ref_min_score: uniform random action; "
            "ref_max_score: the best mode's centre."
        ),
    )


def build_rare_bandit_dataset(
    dataset_id: str = RARE_BANDIT_DATASET_ID, *, num_samples: int | None = None
) -> minari.MinariDataset:
    """The rare-best bandit: the best-paying mode holds ``RARE_BEST_SHARE`` of the actions."""
    return build_bandit_dataset(dataset_id, num_samples=num_samples, mode_shares=rare_best_shares())
