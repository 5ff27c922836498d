"""Environments shipped with divo; importing this package registers them with Gymnasium."""

from __future__ import annotations

import gymnasium as gym

BANDIT_ENV_ID = "divo/MultimodalBandit-v0"


def register_envs() -> None:
    """Register divo's environments with Gymnasium (idempotent: safe to call repeatedly)."""
    if BANDIT_ENV_ID not in gym.registry:
        gym.register(
            id=BANDIT_ENV_ID,
            # No max_episode_steps: the env ends every episode itself (terminated=True), and a
            # TimeLimit would also flag the same step as truncated.
            entry_point="divo.envs.bandit:MultimodalBanditEnv",
        )


register_envs()

__all__ = ["BANDIT_ENV_ID", "register_envs"]
