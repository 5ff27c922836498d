"""Policy evaluation: parallel rollouts, D4RL-style normalised scores, and the critic's
estimate checked against the returns the rollouts earned.

Protocol (method.md): 10 episodes per evaluation (100 for sparse navigation tasks), evaluation
env seed = run seed + 100 (the caller passes it), normalised score
``100 * (return - ref_min) / (ref_max - ref_min)`` on the mean return. On goal-reaching tasks
scored by success (OGBench: 50 episodes, ``score="success"``), the normalised score is the
percentage of episodes whose last step reports ``info["success"]``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from divo.errors import DivoError

Policy = Callable[[torch.Tensor], torch.Tensor]
SCORES = ("return", "success")
# an evaluation episode this long has no end: an environment without a time limit that never
# ends its episodes would otherwise hang the run (D4RL's longest episodes: 1,000 steps)
EPISODE_STEP_CAP = 100_000


class EndlessEpisodeError(DivoError):
    """An evaluation episode passed EPISODE_STEP_CAP steps: it ends the run (every later
    evaluation would hang as long), where other evaluation failures only warn."""


def normalized_score(
    ret: float | np.ndarray, ref_min: float | None, ref_max: float | None
) -> float | np.ndarray | None:
    """D4RL normalised score ``100 * (ret - ref_min) / (ref_max - ref_min)``; None if unknown."""
    if ref_min is None or ref_max is None:
        return None
    if ref_max == ref_min:
        raise ValueError(f"reference scores must differ, got ref_min = ref_max = {ref_min}")
    score = 100.0 * (np.asarray(ret, dtype=np.float64) - ref_min) / (ref_max - ref_min)
    return float(score) if score.ndim == 0 else score


def evaluate_policy(
    policy: Policy,
    make_env: Callable[[], gym.Env],
    *,
    episodes: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    record: bool = False,
    score: str = "return",
    envs: Sequence[gym.Env] | None = None,
) -> dict[str, Any]:
    """Run ``episodes`` episodes side by side, one batched policy call per time step.

    Args:
        policy: maps RAW observations ``[n, O]`` (float32, on ``device``) to actions ``[n, A]``;
            it normalises observations itself. Called under ``torch.no_grad()``; an
            ``nn.Module`` is put in eval mode for the rollouts and restored afterwards.
        make_env: builds one fresh environment per call (e.g. ``OfflineData.make_env``).
        episodes: number of episodes (= environment instances).
        seed: environment ``i`` is reset with ``seed + i``; pass the run seed + 100.
        device: where observations are sent.
        ref_min_score, ref_max_score: references for the normalised score.
        record: also return ``trajectories``: per episode, its raw ``observation`` ``[T, O]``
            and ``action`` ``[T, A]`` (float32, as the policy gave it), environment ``reward``
            ``[T]`` and whether it ended ``terminated`` (else truncated); see
            :func:`critic_calibration`.
        score: ``"return"``: the normalised score is D4RL's, of the mean return;
            ``"success"``: it is ``100 *`` the share of episodes whose last step's ``info``
            says ``success`` (OGBench's protocol).
        envs: environments to reuse instead of making ``episodes`` fresh ones (for
            environments slow to build, e.g. OGBench's, ~1-2 s each): the episodes then run in
            waves of ``len(envs)`` side by side, episode ``i`` still reset with ``seed + i``;
            the caller keeps and closes them.

    Returns:
        ``return_mean``, ``return_std`` (population std over episodes), ``normalized_score``
        (of the mean return, or the success percentage; None without references),
        ``success_rate`` (share of episodes ending with ``info["success"]``; None when the
        environment reports no success), ``episodes``, ``episode_length_mean``, and
        per-episode ``returns`` / ``lengths`` lists (and ``trajectories`` with ``record``).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    device = torch.device(device)
    own = envs is None
    pool = [make_env() for _ in range(episodes)] if own else list(envs)
    if not pool:
        raise ValueError("envs must hold at least one environment")
    returns = np.zeros(episodes, dtype=np.float64)
    lengths = np.zeros(episodes, dtype=np.int64)
    steps: list[list[tuple[np.ndarray, np.ndarray, float]]] = [[] for _ in range(episodes)]
    terminal = np.zeros(episodes, dtype=bool)
    success: list[bool | None] = [None] * episodes
    steps_taken = steps_outside = 0  # actions outside the action space, clipped to it
    was_training = isinstance(policy, torch.nn.Module) and policy.training
    if isinstance(policy, torch.nn.Module):
        policy.eval()
    try:
        # episodes in waves of len(pool) side by side (one wave when the envs are made here)
        for first in range(0, episodes, len(pool)):
            wave = list(range(first, min(first + len(pool), episodes)))
            env_of = {i: pool[i - first] for i in wave}
            observations = {i: env_of[i].reset(seed=seed + i)[0] for i in wave}
            alive = wave
            with torch.no_grad():
                while alive:
                    obs = np.stack([np.asarray(observations[i], dtype=np.float32) for i in alive])
                    actions = policy(torch.as_tensor(obs, device=device))
                    actions = actions.detach().to("cpu", torch.float32).numpy()
                    if actions.shape[0] != len(alive):
                        raise ValueError(
                            f"policy returned {actions.shape[0]} actions for {len(alive)} "
                            "observations"
                        )
                    still_alive = []
                    for row, i in enumerate(alive):
                        action, outside = _within_action_space(env_of[i], actions[row])
                        steps_taken += 1
                        steps_outside += outside
                        observation, reward, terminated, truncated, info = env_of[i].step(action)
                        returns[i] += float(reward)
                        lengths[i] += 1
                        if lengths[i] >= EPISODE_STEP_CAP and not (terminated or truncated):
                            raise EndlessEpisodeError(
                                f"an evaluation episode ran {EPISODE_STEP_CAP:,} steps without "
                                "ending: the evaluation environment has no time limit and "
                                "never ends this episode itself; write the dataset with an "
                                "environment spec that has one (gymnasium.register(..., "
                                "max_episode_steps=N) before writing it: a dataset keeps the "
                                "spec it was written with)"
                            )
                        if record:
                            steps[i].append((obs[row], actions[row].copy(), float(reward)))
                        if terminated or truncated:
                            terminal[i] = bool(terminated)
                            if "success" in info:
                                success[i] = bool(info["success"])
                            continue
                        observations[i] = observation
                        still_alive.append(i)
                    alive = still_alive
    finally:
        if was_training:
            policy.train()
        if own:
            for env in pool:
                env.close()
    if steps_outside:
        warnings.warn(
            "the evaluated policy proposed actions outside the environment's action space; "
            "they were clipped to it before the environment's step (as Gymnasium's ClipAction "
            "does), and the result's actions_clipped_frac says how often",
            stacklevel=2,
        )
    return_mean = float(returns.mean())
    success_rate = None
    if all(s is not None for s in success):
        success_rate = float(np.mean([bool(s) for s in success]))
    if score == "success":
        if success_rate is None:
            raise ValueError(
                "score='success' needs an environment whose last step's info holds 'success'; "
                "this one reports none"
            )
        normalized = 100.0 * success_rate
    else:
        normalized = normalized_score(return_mean, ref_min_score, ref_max_score)
    result = {
        "return_mean": return_mean,
        "return_std": float(returns.std()),
        "normalized_score": normalized,
        "success_rate": success_rate,
        "episodes": episodes,
        "episode_length_mean": float(lengths.mean()),
        "returns": returns.tolist(),
        "lengths": lengths.tolist(),
        "actions_clipped_frac": steps_outside / max(steps_taken, 1),
    }
    if record:
        result["trajectories"] = [
            {
                "observation": np.stack([o for o, _, _ in episode]),
                "action": np.stack([a for _, a, _ in episode]).astype(np.float32),
                "reward": np.array([r for _, _, r in episode], dtype=np.float64),
                "terminated": bool(terminal[i]),
            }
            for i, episode in enumerate(steps)
        ]
    return result


# an action this far past a bound counts as outside it (float32 rescaling lands within it)
ACTION_SPACE_TOLERANCE = 1e-5


def _within_action_space(env: gym.Env, action: np.ndarray) -> tuple[np.ndarray, bool]:
    """``action`` clipped to the environment's Box action space, and whether it was outside it
    by more than :data:`ACTION_SPACE_TOLERANCE` (MuJoCo's tasks would otherwise charge their
    control cost on the raw action while the simulator clamps it)."""
    space = env.action_space
    if not isinstance(space, gym.spaces.Box):
        return action, False
    low, high, tol = space.low, space.high, ACTION_SPACE_TOLERANCE
    outside = bool(np.any(action < low - tol) or np.any(action > high + tol))
    return np.clip(action, low, high).astype(space.dtype, copy=False), outside


def critic_calibration(
    trajectories: list[dict[str, Any]],
    q_value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    gamma: float,
    reward_transform: Callable[[np.ndarray], np.ndarray] = lambda r: r,
    tail: float = 0.01,
    reward_max: float | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 4096,
) -> dict[str, float] | None:
    """The critic's estimate on the evaluation policy's own states and actions against the
    discounted return that actually followed them: does the critic over- or underestimate the
    policy it guides?

    For every step t of every recorded episode, G_t = sum_k gamma^k r'_(t+k) with r' the
    training reward (``reward_transform`` of the environment's), and Q_t = ``q_value(s_t, a_t)``.
    Steps whose episode was truncated before the return's tail fell below ``tail`` of its
    weight (t > T - log(tail) / log(gamma): the data the critic would need is missing) are left
    out; episodes that terminated count whole. With ``gamma=1`` only terminated episodes count.

    Returns ``eval_q`` (mean Q_t), ``eval_return_to_go`` (mean G_t) and ``eval_q_bias``
    (mean Q_t - G_t: > 0, the critic overestimates the deployed policy; on the same scale as
    Q, so compare it with ``eval_q``) over the steps that qualify.

    ``reward_max``: the most one step can pay in training-reward units, when the task states it
    (OGBench: 0). Then every step of every episode counts in a one-sided check: a truncated
    episode's missing tail pays at most ``gamma^(T-t) max(reward_max, 0) / (1 - gamma)`` (an
    episode may also terminate, after which nothing is paid), so ``G_t`` is at most the
    observed part plus that, and ``eval_q_all`` (mean Q_t over all steps),
    ``eval_return_to_go_max`` (mean bound on G_t) and ``eval_q_bias_min`` (mean Q_t minus the
    bound: the critic overestimates the deployed policy on these steps by at least this much)
    join the result. This is the check that remains when every episode runs into its time limit
    (a goal-reaching policy that never succeeds).

    Returns None when no step qualifies for either check.
    """
    if not 0.0 < tail < 1.0:
        raise ValueError(f"tail must be in (0, 1), got {tail}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    horizon = math.inf if gamma >= 1.0 else (math.log(tail) / math.log(gamma) if gamma > 0 else 0)
    bounded = reward_max is not None
    if bounded and not math.isfinite(reward_max):
        raise ValueError(f"reward_max must be finite, got {reward_max}")
    if bounded and reward_max > 0 and gamma >= 1.0:
        bounded = False  # an undiscounted tail of positive rewards has no finite bound
    # the most a step's missing tail can pay, per unit of gamma^(steps to the truncation)
    tail_max = 0.0 if not bounded or reward_max <= 0 else reward_max / (1.0 - gamma)
    observations, actions, go_all, go_max, keeps = [], [], [], [], []
    for episode in trajectories:
        reward = np.asarray(reward_transform(np.asarray(episode["reward"], np.float64)))
        length = len(reward)
        go = np.zeros(length, dtype=np.float64)
        running = 0.0
        for t in range(length - 1, -1, -1):
            running = float(reward[t]) + gamma * running
            go[t] = running
        if episode["terminated"]:
            keep, bound = length, go
        else:  # the tail past the truncation is missing: keep steps where it weighs < tail
            keep = 0 if length < horizon else math.floor(length - horizon) + 1
            bound = go + tail_max * gamma ** np.arange(length, 0, -1, dtype=np.float64)
        if keep == 0 and not bounded:
            continue
        end = length if bounded else keep
        observations.append(np.asarray(episode["observation"][:end], np.float32))
        actions.append(np.asarray(episode["action"][:end], np.float32))
        go_all.append(go[:end])
        go_max.append(bound[:end])
        keeps.append(np.arange(end) < keep)
    if not sum(len(g) for g in go_all):  # no episode, or none with a step that counts
        return None
    obs = torch.as_tensor(np.concatenate(observations), device=device)
    act = torch.as_tensor(np.concatenate(actions), device=device)
    with torch.no_grad():
        q = torch.cat(
            [
                q_value(obs[i : i + batch_size], act[i : i + batch_size]).reshape(-1)
                for i in range(0, obs.shape[0], batch_size)
            ]
        )
    q = q.to("cpu", torch.float64).numpy()
    go, keep = np.concatenate(go_all), np.concatenate(keeps)
    out: dict[str, float] = {}
    if keep.any():
        out["eval_q"] = float(q[keep].mean())
        out["eval_return_to_go"] = float(go[keep].mean())
        out["eval_q_bias"] = float((q[keep] - go[keep]).mean())
    if bounded:
        bound = np.concatenate(go_max)
        out["eval_q_all"] = float(q.mean())
        out["eval_return_to_go_max"] = float(bound.mean())
        out["eval_q_bias_min"] = float((q - bound).mean())
    return out


__all__ = ["Policy", "critic_calibration", "evaluate_policy", "normalized_score"]
