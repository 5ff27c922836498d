"""Policy evaluation: parallel rollouts and D4RL-style normalised scores.

Protocol (method.md): 10 episodes per evaluation (100 for sparse navigation tasks), evaluation
env seed = run seed + 100 (the caller passes it), normalised score
``100 * (return - ref_min) / (ref_max - ref_min)`` on the mean return.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch

Policy = Callable[[torch.Tensor], torch.Tensor]


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

    Returns:
        ``return_mean``, ``return_std`` (population std over episodes), ``normalized_score``
        (of the mean return; None without references), ``episodes``, ``episode_length_mean``,
        and per-episode ``returns`` / ``lengths`` lists.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    device = torch.device(device)
    envs = [make_env() for _ in range(episodes)]
    returns = np.zeros(episodes, dtype=np.float64)
    lengths = np.zeros(episodes, dtype=np.int64)
    was_training = isinstance(policy, torch.nn.Module) and policy.training
    if isinstance(policy, torch.nn.Module):
        policy.eval()
    try:
        observations = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
        alive = list(range(episodes))
        with torch.no_grad():
            while alive:
                obs = np.stack([np.asarray(observations[i], dtype=np.float32) for i in alive])
                actions = policy(torch.as_tensor(obs, device=device))
                actions = actions.detach().to("cpu", torch.float32).numpy()
                if actions.shape[0] != len(alive):
                    raise ValueError(
                        f"policy returned {actions.shape[0]} actions for {len(alive)} observations"
                    )
                still_alive = []
                for row, i in enumerate(alive):
                    observation, reward, terminated, truncated, _ = envs[i].step(actions[row])
                    returns[i] += float(reward)
                    lengths[i] += 1
                    if terminated or truncated:
                        continue
                    observations[i] = observation
                    still_alive.append(i)
                alive = still_alive
    finally:
        if was_training:
            policy.train()
        for env in envs:
            env.close()
    return_mean = float(returns.mean())
    return {
        "return_mean": return_mean,
        "return_std": float(returns.std()),
        "normalized_score": normalized_score(return_mean, ref_min_score, ref_max_score),
        "episodes": episodes,
        "episode_length_mean": float(lengths.mean()),
        "returns": returns.tolist(),
        "lengths": lengths.tolist(),
    }


__all__ = ["Policy", "evaluate_policy", "normalized_score"]
