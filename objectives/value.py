"""State value V(s) and the advantage A(s, x) = Q(s, x) - V(s)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from divo.behavior_models.backbones import mlp
from divo.objectives.critic import TwinQ
from divo.objectives.functional import expectile_loss

VALUE_OBJECTIVES = ("expectile", "bootstrap")
Q_HEADS = ("q1", "min")
V_SOURCES = ("value_step", "updated")


class StateValue(nn.Module):
    """V(s): MLP [*B, O] -> [*B, 1]."""

    def __init__(
        self, observation_dim: int, hidden: Sequence[int] = (256, 256), activation: str = "relu"
    ) -> None:
        super().__init__()
        self.net = mlp(observation_dim, 1, tuple(hidden), activation)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.net(observation)


class ValueLoss(nn.Module):
    """Loss of V(s).

    * ``expectile`` (IQL): expectile regression of V(s) towards min_i Q_i^target(s, a) on dataset
      actions, with expectile ``expectile`` (0.7 locomotion, 0.9 AntMaze in IQL).
    * ``bootstrap`` (A2PR): MSE of V(s) towards the critic's one-step TD target y.
    """

    def __init__(self, objective: str = "expectile", expectile: float = 0.7) -> None:
        super().__init__()
        if objective not in VALUE_OBJECTIVES:
            raise ValueError(
                f"value objective must be one of {VALUE_OBJECTIVES}, got {objective!r}"
            )
        if not 0.0 < expectile < 1.0:
            raise ValueError(f"expectile must be in (0, 1), got {expectile}")
        self.objective = objective
        self.expectile = expectile

    def forward(
        self,
        observation: torch.Tensor,
        value: StateValue,
        *,
        action: torch.Tensor | None = None,
        critic_target: TwinQ | None = None,
        td_target: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``loss_value``, the diagnostic ``v_mean`` and ``state_value``: this forward pass's
        V(s) [*B, 1], detached (A2PR's advantages use it: see :class:`Advantage`).

        expectile needs ``action`` and ``critic_target``; bootstrap needs ``td_target``.
        """
        v = value(observation)
        if self.objective == "expectile":
            if action is None or critic_target is None:
                raise ValueError("the expectile value loss needs action and critic_target")
            with torch.no_grad():
                target = critic_target.min_q(observation, action)
            loss = expectile_loss(target - v, self.expectile).mean()
        else:
            if td_target is None:
                raise ValueError("the bootstrap value loss needs td_target")
            loss = (v - td_target.detach()).pow(2).mean()
        return {"loss_value": loss, "v_mean": v.detach().mean(), "state_value": v.detach()}


class Advantage(nn.Module):
    """A(s, x) = Q(s, x) - V(s), detached.

    ``q_head``: ``q1`` (A2PR) or ``min`` (min over the twin heads).
    ``v_from``: which V(s) the agent's update uses: ``value_step`` (A2PR's code: the value
    step's own forward pass, before its optimiser step; no extra pass) or ``updated`` (V(s)
    evaluated again after the value update: one more pass of V per step). Q(s, x) is always the
    critic just updated, as in A2PR.
    forward(observation [*B, O], action [*B, A] or candidates [*B, N, A]) -> [*B, 1] / [*B, N, 1].
    """

    def __init__(self, q_head: str = "q1", v_from: str = "value_step") -> None:
        super().__init__()
        if q_head not in Q_HEADS:
            raise ValueError(f"advantage q_head must be one of {Q_HEADS}, got {q_head!r}")
        if v_from not in V_SOURCES:
            raise ValueError(f"advantage v_from must be one of {V_SOURCES}, got {v_from!r}")
        self.q_head = q_head
        self.v_from = v_from

    @torch.no_grad()
    def forward(
        self,
        observation: torch.Tensor,
        action: torch.Tensor,
        critic: TwinQ,
        value: StateValue,
        state_value: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``state_value``: V(observation) [*B, 1] when the caller already has it (saves a pass)."""
        v = value(observation) if state_value is None else state_value
        if action.dim() == observation.dim() + 1:  # candidates [*B, N, A]
            observation = observation.unsqueeze(-2).expand(*action.shape[:-1], -1)
            v = v.unsqueeze(-2)
        if self.q_head == "q1":
            q = critic.q1(observation, action)  # one head's arithmetic, not both
        else:
            q = critic(observation, action).min(dim=0).values
        return q - v
