"""agents/evaluate.py: batched rollouts and normalised scores."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from divo.agents.data import load_offline_data
from divo.agents.evaluate import evaluate_policy, normalized_score
from divo.datasets import BANDIT_DATASET_ID
from divo.envs import BANDIT_ENV_ID
from divo.envs.bandit import best_action


class CountingPolicy(torch.nn.Module):
    """Constant action; records how it was called."""

    def __init__(self, action: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("action", torch.as_tensor(action, dtype=torch.float32))
        self.calls: list[tuple[int, ...]] = []
        self.grad_enabled: list[bool] = []
        self.modes: list[bool] = []

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        assert observation.dtype == torch.float32
        self.calls.append(tuple(observation.shape))
        self.grad_enabled.append(torch.is_grad_enabled())
        self.modes.append(self.training)
        return self.action.expand(observation.shape[0], -1)


def test_normalized_score():
    assert normalized_score(3234.3, -20.272305, 3234.3) == pytest.approx(100.0)
    assert normalized_score(-20.272305, -20.272305, 3234.3) == pytest.approx(0.0)
    assert normalized_score(0.5, 0.0, 1.0) == pytest.approx(50.0)
    assert normalized_score(1.0, None, 1.0) is None
    np.testing.assert_allclose(normalized_score(np.array([0.0, 1.0]), 0.0, 2.0), [0.0, 50.0])


def test_best_centre_scores_100_on_the_bandit():
    data = load_offline_data(BANDIT_DATASET_ID)
    policy = CountingPolicy(best_action())
    result = evaluate_policy(
        policy,
        data.make_env,
        episodes=10,
        seed=100,
        ref_min_score=data.ref_min_score,
        ref_max_score=data.ref_max_score,
    )
    assert result["normalized_score"] == pytest.approx(100.0, abs=1e-3)
    assert result["return_mean"] == pytest.approx(1.0, abs=1e-6)
    assert result["return_std"] == pytest.approx(0.0, abs=1e-6)
    assert result["episodes"] == 10 and result["episode_length_mean"] == 1.0
    assert policy.calls == [(10, 1)]  # one batched call for all ten one-step episodes
    assert policy.grad_enabled == [False] and policy.modes == [False]
    assert policy.training  # the module's mode is restored


def test_worst_centre_scores_below_random():
    result = evaluate_policy(
        CountingPolicy(np.array([-0.8, -0.8])),
        lambda: gym.make(BANDIT_ENV_ID),
        episodes=3,
        ref_min_score=0.078,
        ref_max_score=1.0,
    )
    assert result["normalized_score"] < 0


def test_evaluation_on_hopper_runs(hopper_dataset):
    data = load_offline_data(hopper_dataset)
    policy = CountingPolicy(np.zeros(data.action_dim))
    result = evaluate_policy(
        policy,
        data.make_env,
        episodes=3,
        seed=100,
        ref_min_score=data.ref_min_score,
        ref_max_score=data.ref_max_score,
    )
    assert set(result) >= {
        "return_mean",
        "return_std",
        "normalized_score",
        "episodes",
        "episode_length_mean",
    }
    assert result["episodes"] == 3 and len(result["returns"]) == 3
    assert 1 <= result["episode_length_mean"] <= 50  # the dataset's env has a 50-step limit
    # batched: the first call sees every episode, later calls only the ones still running
    assert policy.calls[0] == (3, data.observation_dim)
    assert len(policy.calls) == max(result["lengths"])
    assert [n for n, _ in policy.calls] == sorted((n for n, _ in policy.calls), reverse=True)
    assert result["normalized_score"] == pytest.approx(
        normalized_score(result["return_mean"], data.ref_min_score, data.ref_max_score)
    )
    # same seed, same deterministic policy: same returns
    again = evaluate_policy(policy, data.make_env, episodes=3, seed=100)
    assert again["returns"] == result["returns"] and again["normalized_score"] is None


def test_reset_seeds_are_seed_plus_index():
    seen = []

    class Recorder(gym.Wrapper):
        def reset(self, *, seed=None, options=None):
            seen.append(seed)
            return super().reset(seed=seed, options=options)

    evaluate_policy(
        CountingPolicy(best_action()),
        lambda: Recorder(gym.make(BANDIT_ENV_ID)),
        episodes=4,
        seed=105,
    )
    assert seen == [105, 106, 107, 108]
