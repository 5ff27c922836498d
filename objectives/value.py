"""State value V(s) and the advantage A(s, x) = Q(s, x) - V(s)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from divo.behavior_models.backbones import mlp
from divo.objectives.critic import TwinQ
from divo.objectives.functional import expectile_loss

VALUE_OBJECTIVES = ("expectile", "bootstrap", "bootstrap_min")
Q_HEADS = ("q1", "min")
V_SOURCES = ("value_step", "updated")
ADVANTAGE_CRITICS = ("paired", "online", "target")
# value objective -> (the critic V is fitted to, the Q head its reference code uses)
PAIRINGS = {
    "expectile": ("target", "min"),
    "bootstrap": ("online", "q1"),
    "bootstrap_min": ("online", "q1"),
}


class StateValue(nn.Module):
    """V(s): MLP [*B, O] -> [*B, 1]; ``layer_norm``: a LayerNorm after each hidden activation
    (the value networks of FQL's code base, IQL's included)."""

    def __init__(
        self,
        observation_dim: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        self.net = mlp(observation_dim, 1, tuple(hidden), activation, layer_norm=layer_norm)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.net(observation)


class ValueLoss(nn.Module):
    """Loss of V(s).

    * ``expectile`` (IQL): expectile regression of V(s) towards min_i Q_i^target(s, a) on dataset
      actions, with expectile ``expectile`` (0.7 locomotion, 0.9 AntMaze in IQL).
    * ``bootstrap`` (A2PR as described): MSE of V(s) towards the critic's one-step TD target y.
    * ``bootstrap_min`` (A2PR as its code runs): MSE of V(s) towards min(y, y_online), where
      y_online = r + gamma (1 - d) min_i Q_i(s', a') is the same target computed with the online
      critic just updated, at the same next action a'.
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
        online_td_target: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``loss_value``, the diagnostic ``v_mean`` and ``state_value``: this forward pass's
        V(s) [*B, 1], detached (A2PR's advantages use it: see :class:`Advantage`); for
        ``expectile`` also ``target_q``: min Q_target(s, a) [*B, 1], V's regression target,
        which is Q of the dataset actions' paired advantage (the agent reuses it).

        expectile needs ``action`` and ``critic_target``; bootstrap needs ``td_target``;
        bootstrap_min also ``online_td_target`` (all [*B, 1]).
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
                raise ValueError(f"the {self.objective} value loss needs td_target")
            target = td_target.detach()
            if self.objective == "bootstrap_min":
                if online_td_target is None:
                    raise ValueError("the bootstrap_min value loss needs online_td_target")
                target = torch.minimum(target, online_td_target.detach())
            loss = (v - target).pow(2).mean()
        out = {"loss_value": loss, "v_mean": v.detach().mean(), "state_value": v.detach()}
        if self.objective == "expectile":
            out["target_q"] = target
        return out


class Advantage(nn.Module):
    """A(s, x) = Q(s, x) - V(s), detached, with Q from the critic V is fitted to.

    ``critic``: ``paired`` (default) takes the critic that V's objective pairs it with:

    * ``expectile`` (IQL): V is the expectile of min Q_target(s, a), so A uses the *target*
      critic (and ``q_head: auto`` = ``min``, as IQL);
    * ``bootstrap`` / ``bootstrap_min`` (A2PR): V regresses towards the TD target y that the
      *online* critic also regresses to (or the smaller of it and the online critic's own), so
      A uses the online critic just updated (``q_head: auto`` = ``q1``, as A2PR).

    ``online`` / ``target`` name the critic explicitly. A critic other than the paired one
    builds the Polyak lag between the online critic and its target into every advantage (while
    Q rises nearly every action looks positive; with negative rewards nearly none does), so it
    is refused unless ``allow_mismatch: true`` says it is meant (an ablation of the pairing).
    ``q_head``: ``auto``, ``q1`` or ``min`` (min over the twin heads).
    ``v_from``: which V(s) the agent's update uses: ``value_step`` (the value step's own forward
    pass, before its optimiser step, as A2PR's code; no extra pass) or ``updated`` (V(s)
    evaluated again after the value update: one more pass of V per step).
    forward(observation [*B, O], action [*B, A] or candidates [*B, N, A]) -> [*B, 1] / [*B, N, 1].
    The agent calls :meth:`pair_with` with its value objective before the first update.
    """

    def __init__(
        self,
        critic: str = "paired",
        q_head: str = "auto",
        v_from: str = "value_step",
        allow_mismatch: bool = False,
    ) -> None:
        super().__init__()
        if critic not in ADVANTAGE_CRITICS:
            raise ValueError(f"advantage critic must be one of {ADVANTAGE_CRITICS}, got {critic!r}")
        if q_head not in ("auto", *Q_HEADS):
            raise ValueError(
                f"advantage q_head must be one of {('auto', *Q_HEADS)}, got {q_head!r}"
            )
        if v_from not in V_SOURCES:
            raise ValueError(f"advantage v_from must be one of {V_SOURCES}, got {v_from!r}")
        self.critic = critic
        self.q_head = q_head
        self.v_from = v_from
        self.allow_mismatch = bool(allow_mismatch)
        # resolved by pair_with (the value objective decides what ``paired``/``auto`` mean)
        self.uses_target_critic: bool | None = None
        self.head: str | None = None

    def pair_with(self, objective: str) -> None:
        """Resolve ``critic`` and ``q_head`` for V's ``objective``; refuse a mismatched critic
        unless ``allow_mismatch``."""
        if objective not in PAIRINGS:
            raise ValueError(
                f"value objective must be one of {VALUE_OBJECTIVES}, got {objective!r}"
            )
        paired_critic, paired_head = PAIRINGS[objective]
        critic = paired_critic if self.critic == "paired" else self.critic
        if critic != paired_critic and not self.allow_mismatch:
            raise ValueError(
                f"value.advantage.critic={critic} does not match value.loss.objective="
                f"{objective}, whose V is fitted to the {paired_critic} critic: advantages "
                "would carry the Polyak lag between the two critics; use "
                "value.advantage.critic=paired, or set value.advantage.allow_mismatch=true "
                "to study the mismatch on purpose"
            )
        self.uses_target_critic = critic == "target"
        self.head = paired_head if self.q_head == "auto" else self.q_head

    def extra_repr(self) -> str:
        return f"critic={self.critic}, q_head={self.q_head}, v_from={self.v_from}"

    @torch.no_grad()
    def forward(
        self,
        observation: torch.Tensor,
        action: torch.Tensor,
        critic: TwinQ,
        value: StateValue,
        state_value: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``critic``: the one :attr:`uses_target_critic` names (the agent passes it);
        ``state_value``: V(observation) [*B, 1] when the caller already has it (saves a pass)."""
        if self.head is None:
            raise RuntimeError("Advantage.pair_with(objective) must be called before use")
        v = value(observation) if state_value is None else state_value
        if action.dim() == observation.dim() + 1:  # candidates [*B, N, A]
            observation = observation.unsqueeze(-2).expand(*action.shape[:-1], -1)
            v = v.unsqueeze(-2)
        if self.head == "q1":
            q = critic.q1(observation, action)  # one head's arithmetic, not both
        else:
            q = critic.min_q(observation, action)
        return q - v
