"""agents/evaluate.py: batched rollouts and normalised scores."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

from divo.agents.evaluate import (
    EndlessEpisodeError,
    critic_calibration,
    evaluate_policy,
    normalized_score,
)
from divo.data.bandit import BANDIT_DATASET_ID, best_action
from divo.data.envs import BANDIT_ENV_ID
from divo.data.load import load_offline_data


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


def test_actions_outside_the_action_space_are_clipped_and_counted():
    """A policy (a plugged-in model, say) proposing actions past the space's bounds is
    evaluated on the clipped actions, with a warning and the share of such steps; MuJoCo's
    tasks would otherwise charge control cost on the raw action."""
    stepped = []

    class Recorder(gym.Wrapper):
        def step(self, action):
            stepped.append(np.array(action))
            return super().step(action)

    def make():
        return Recorder(gym.make("Pendulum-v1"))  # Box(-2, 2)

    def wild(obs):
        return torch.full((obs.shape[0], 1), 5.0)

    with pytest.warns(UserWarning, match="outside the environment's action space"):
        result = evaluate_policy(wild, make, episodes=2, seed=0)
    assert result["actions_clipped_frac"] == 1.0
    assert all(float(a[0]) == 2.0 for a in stepped)

    def tame(obs):
        return torch.full((obs.shape[0], 1), 2.0 + 1e-6)  # a float32 rescaling's overshoot

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate_policy(tame, make, episodes=1, seed=0)["actions_clipped_frac"] == 0.0


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


def test_an_episode_that_never_ends_is_an_error_not_a_hang(monkeypatch):
    """An environment without a time limit that never ends its episodes hung the run's step-0
    evaluation forever; past the cap it is refused, naming the fix."""
    import divo.agents.evaluate as evaluation

    class Endless(gym.Wrapper):
        def step(self, action):
            observation, reward, *_ = self.env.step(action)
            self.env.reset()
            return observation, reward, False, False, {}

    monkeypatch.setattr(evaluation, "EPISODE_STEP_CAP", 50)
    with pytest.raises(EndlessEpisodeError, match="ran 50 steps without ending.*max_episode_steps"):
        evaluate_policy(
            CountingPolicy(best_action()), lambda: Endless(gym.make(BANDIT_ENV_ID)), episodes=2
        )


def test_training_stops_on_an_endless_episode_and_goes_on_after_other_eval_failures(
    monkeypatch,
):
    """Training turns evaluation failures into a warning and goes on, but an endless episode
    would make every later evaluation hang as long: it ends the run."""
    import divo.agents.runs as runs

    def endless(*args):
        raise EndlessEpisodeError("an evaluation episode ran 100,000 steps without ending")

    monkeypatch.setattr(runs, "_evaluate", endless)
    with pytest.raises(EndlessEpisodeError):
        runs.evaluate_into_row(None, None, None, "cpu", 0, {})

    def broken(*args):
        raise ValueError("a flaky renderer")

    monkeypatch.setattr(runs, "_evaluate", broken)
    row = {}
    with pytest.warns(UserWarning, match="evaluation at step 0 failed"):
        assert runs.evaluate_into_row(None, None, None, "cpu", 0, row) is None
    assert row == {"eval_failed": 1.0}


def test_record_keeps_each_episode_as_the_policy_and_env_saw_it():
    data = load_offline_data(BANDIT_DATASET_ID)
    policy = CountingPolicy(best_action())
    result = evaluate_policy(policy, data.make_env, episodes=3, seed=100, record=True)
    trajectories = result["trajectories"]
    assert len(trajectories) == 3
    for episode, ret in zip(trajectories, result["returns"], strict=True):
        assert episode["observation"].shape == (1, 1) and episode["action"].shape == (1, 2)
        np.testing.assert_allclose(episode["action"][0], best_action(), atol=1e-6)
        assert episode["reward"].sum() == pytest.approx(ret)
        assert episode["terminated"]  # the bandit ends every episode after one step
    assert "trajectories" not in evaluate_policy(policy, data.make_env, episodes=1, seed=100)


def test_critic_calibration_by_hand():
    """Q_t against G_t = sum_k gamma^k r'_(t+k): a terminated episode counts whole; a truncated
    one only up to T - log(tail) / log(gamma), where the missing tail weighs < ``tail``."""
    terminated = {
        "observation": np.zeros((3, 1), np.float32),
        "action": np.array([[1.0], [2.0], [3.0]], np.float32),
        "reward": np.array([1.0, 2.0, 3.0]),
        "terminated": True,
    }
    truncated = {
        "observation": np.zeros((10, 1), np.float32),
        "action": np.full((10, 1), 0.5, np.float32),
        "reward": np.ones(10),
        "terminated": False,
    }

    def q_value(obs, act):  # Q = the action's first coordinate
        return act[:, :1]

    # r' = 2 r - 1; gamma 0.5; tail 0.25 -> horizon 2: the truncated episode keeps t <= 8
    out = critic_calibration(
        [terminated, truncated],
        q_value,
        gamma=0.5,
        reward_transform=lambda r: 2 * r - 1,
        tail=0.25,
        batch_size=4,  # several batches
    )
    g_terminated = [1 + 0.5 * 3 + 0.25 * 5, 3 + 0.5 * 5, 5.0]
    g_truncated = [sum(0.5**k for k in range(10 - t)) for t in range(9)]
    g = np.array(g_terminated + g_truncated)
    q = np.array([1.0, 2.0, 3.0] + [0.5] * 9)
    assert out["eval_return_to_go"] == pytest.approx(g.mean())
    assert out["eval_q"] == pytest.approx(q.mean())
    assert out["eval_q_bias"] == pytest.approx((q - g).mean())
    # nothing qualifies: a truncated episode shorter than the horizon, or gamma = 1
    assert critic_calibration([truncated], q_value, gamma=0.5, tail=1e-4) is None
    assert critic_calibration([truncated], q_value, gamma=1.0) is None
    whole = critic_calibration([terminated], q_value, gamma=1.0)
    assert whole["eval_return_to_go"] == pytest.approx((6 + 5 + 3) / 3)
    with pytest.raises(ValueError, match="tail"):
        critic_calibration([terminated], q_value, gamma=0.5, tail=0.0)


def test_the_one_sided_critic_check_bounds_what_a_truncated_tail_could_pay():
    """With a reward ceiling every step counts: the return that followed is at most the
    observed part plus gamma^(T-t) max(ceiling, 0) / (1 - gamma), so Q minus that bound is at
    least the critic's overestimation."""
    truncated = {
        "observation": np.zeros((4, 1), np.float32),
        "action": np.full((4, 1), -1.0, np.float32),
        "reward": -np.ones(4),
        "terminated": False,
    }
    terminated = {
        "observation": np.zeros((2, 1), np.float32),
        "action": np.full((2, 1), -0.5, np.float32),
        "reward": np.array([-1.0, 0.0]),
        "terminated": True,
    }

    def q_value(obs, act):
        return act[:, :1]

    gamma = 0.5
    observed = [sum(-(gamma**k) for k in range(4 - t)) for t in range(4)]
    # ceiling 0 (OGBench): nothing is added; the exact check keeps only the terminated episode
    out = critic_calibration([truncated, terminated], q_value, gamma=gamma, reward_max=0.0)
    bound = np.array(observed + [-1.0, 0.0])
    q = np.array([-1.0] * 4 + [-0.5] * 2)
    assert out["eval_return_to_go_max"] == pytest.approx(bound.mean())
    assert out["eval_q_all"] == pytest.approx(q.mean())
    assert out["eval_q_bias_min"] == pytest.approx((q - bound).mean())
    assert out["eval_q_bias"] == pytest.approx(np.mean([-0.5 - -1.0, -0.5 - 0.0]))
    # a positive ceiling adds the most the missing tail could pay
    out = critic_calibration([truncated], q_value, gamma=gamma, reward_max=2.0, tail=1e-4)
    tail = [gamma ** (4 - t) * 2.0 / (1 - gamma) for t in range(4)]
    assert "eval_q_bias" not in out  # nothing qualified for the exact check
    assert out["eval_return_to_go_max"] == pytest.approx(np.mean(np.add(observed, tail)))
    # a ceiling holds only when it is one: an undiscounted positive tail has no bound
    assert critic_calibration([truncated], q_value, gamma=1.0, reward_max=1.0) is None
    with pytest.raises(ValueError, match="finite"):
        critic_calibration([truncated], q_value, gamma=gamma, reward_max=float("inf"))


def test_the_critic_alarm_rings_on_overestimation_only(tmp_path):
    """The alarm: excess over half the larger of |Q| and |return|, exact check first, else the
    one-sided bound; read back from metrics.csv for result.json, step 0 left out."""
    from divo.agents.runs import critic_alarms, critic_overestimation

    assert (
        critic_overestimation({"eval_q": -15.0, "eval_return_to_go": -16.0, "eval_q_bias": 1.0})
        is None
    )
    assert critic_overestimation({"eval_q": 40.0, "eval_return_to_go": 11.0, "eval_q_bias": 29.0})
    # an underestimating critic never rings, however far off
    assert (
        critic_overestimation({"eval_q": -90.0, "eval_return_to_go": -15.0, "eval_q_bias": -75.0})
        is None
    )
    found = critic_overestimation(
        {"eval_q_all": -15.0, "eval_return_to_go_max": -57.0, "eval_q_bias_min": 42.0}
    )
    assert found == {"q": -15.0, "return_to_go": -57.0, "excess": 42.0, "bound": True}
    rows = [
        "step,eval_q,eval_return_to_go,eval_q_bias,eval_q_all,eval_return_to_go_max,eval_q_bias_min",
        "0,40,10,30,,,",  # the untrained critic: never an alarm
        "1000,,,,,,",
        "5000,10,9,1,,,",
        "10000,,,,-15,-57,42",
    ]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    alarms = critic_alarms(tmp_path)
    assert [a["step"] for a in alarms] == [10000] and alarms[0]["bound"]
    assert critic_alarms(tmp_path / "missing") == []


def test_the_data_level_guard_holds_a_policy_to_its_data(tmp_path, caplog):
    """The guard: a score below half the data's own normalised level, after step 0, is a
    warning in the log and a step in result.json's list; data without a level it can be held to
    (no references, a level at or below 0, success-scored goal data) never ring it."""
    from types import SimpleNamespace

    from divo.agents.runs import below_data_level, data_level, data_level_alarms

    def data(**kw):
        base = dict(score="return", behavior_return=60.0, ref_min_score=0.0, ref_max_score=100.0)
        return SimpleNamespace(**{**base, **kw})

    assert data_level(data()) == pytest.approx(60.0)
    assert data_level(data(ref_min_score=None, ref_max_score=None)) is None
    assert data_level(data(behavior_return=-5.0)) is None
    assert data_level(data(score="success")) is None
    assert data_level(None) is None
    assert below_data_level(29.9, 60.0) and not below_data_level(30.0, 60.0)
    assert not below_data_level("", 60.0) and not below_data_level(5.0, None)
    rows = ["step,normalized_score", "0,4.0", "1000,", "5000,20.0", "10000,45.0", "15000,7.7"]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    assert data_level_alarms(tmp_path, 67.4) == [
        {"step": 5000, "score": 20.0},
        {"step": 15000, "score": 7.7},
    ]
    assert data_level_alarms(tmp_path, None) == []
    assert data_level_alarms(tmp_path / "missing", 67.4) == []


@pytest.mark.parametrize(
    ("recipe", "q_agg", "how"),
    [("fql", "mean", "mean"), ("fql", "min", "min"), ("td3bc", None, "min")],
)
def test_the_critic_check_reads_the_heads_as_the_agents_updates_do(recipe, q_agg, how):
    """FQL with q_agg=mean (its setting on OGBench) trains its actor and its target on the mean
    of the two heads: the check reads that value, not min(Q1, Q2), which is never above it and
    would under-report an overvaluation."""
    from types import SimpleNamespace

    from divo.agents.builder import build_agent
    from divo.agents.runs import critic_aggregate, run_critic_check
    from divo.config import compose_recipe

    overrides = ["critic.network.hidden=[16,16]"] + (
        [f"critic.loss.q_agg={q_agg}"] if q_agg else []
    )
    cfg = compose_recipe(recipe, overrides)
    torch.manual_seed(0)
    agent = build_agent(
        cfg, observation_dim=3, action_dim=2, obs_mean=torch.zeros(3), obs_std=torch.ones(3)
    )
    assert critic_aggregate(agent) == how
    rng = np.random.default_rng(0)
    episode = {
        "observation": rng.normal(size=(4, 3)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(4, 2)).astype(np.float32),
        "reward": rng.normal(size=4),
        "terminated": True,
    }
    data = SimpleNamespace(reward_factor=1.0, reward_max=None)
    out = run_critic_check(agent, data, cfg, [episode], "cpu")
    with torch.no_grad():
        heads = agent.critic(
            agent.normalizer(torch.as_tensor(episode["observation"])),
            torch.as_tensor(episode["action"]),
        )
    expected = heads.mean(dim=0) if how == "mean" else heads.min(dim=0).values
    assert out["eval_q"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert not torch.allclose(heads[0], heads[1])  # the two readings differ on this critic
