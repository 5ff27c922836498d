"""Twin-Q critic and the TD3 critic loss (target-policy smoothing, clipped double Q)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from divo.behavior_models.backbones import EnsembleMLP
from divo.objectives.functional import smoothed_target_action, td_target


class TwinQ(nn.Module):
    """``num_q`` independent Q(s, a) MLPs evaluated as ONE batched call.

    forward(observation [*B, O], action [*B, A]) -> [num_q, *B, 1]. ``layer_norm``: a LayerNorm
    after each hidden activation (FQL's critic); ``init``: ``torch`` (nn.Linear's) or
    ``xavier_uniform`` (flax's default, FQL's).
    """

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
        num_q: int = 2,
        layer_norm: bool = False,
        init: str = "torch",
    ) -> None:
        super().__init__()
        self.num_q = num_q
        self.net = EnsembleMLP(
            num_q, observation_dim + action_dim, 1, tuple(hidden), activation, layer_norm, init
        )

    def forward(
        self, observation: torch.Tensor, action: torch.Tensor, detach_params: bool = False
    ) -> torch.Tensor:
        """``detach_params``: gradients flow to the inputs, not to the critic's weights."""
        if observation.shape[:-1] != action.shape[:-1]:
            observation = observation.expand(*action.shape[:-1], observation.shape[-1])
        return self.net(torch.cat([observation, action], dim=-1), detach_params=detach_params)

    def q1(
        self, observation: torch.Tensor, action: torch.Tensor, detach_params: bool = False
    ) -> torch.Tensor:
        """The first head only, [*B, 1], at the cost of one head (TD3+BC's actor loss uses Q1).

        ``detach_params``: gradients flow to the inputs but not to the critic's weights (the
        actor loss needs dQ/da only; skipping the weight gradients saves a third of its
        backward pass).
        """
        if observation.shape[:-1] != action.shape[:-1]:
            observation = observation.expand(*action.shape[:-1], observation.shape[-1])
        return self.net.member(0, torch.cat([observation, action], dim=-1), detach_params)

    def min_q(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """min over heads, [*B, 1]."""
        return self(observation, action).min(dim=0).values


CRITIC_BOOTSTRAPS = ("policy", "value")


class TD3CriticLoss(nn.Module):
    """Twin-Q critic loss: sum over heads of MSE(Q_i(s, a), y), with the TD target y from

    * ``bootstrap: policy`` (TD3): y = r + gamma (1 - d) min Q'(s', a'),
      a' = clip(pi'(s') + clip(N(0, policy_noise^2), -noise_clip, noise_clip), -1, 1), or any
      callable s' -> a' in place of the target actor (Diffusion-QL's EMA policy);
    * ``bootstrap: value`` (IQL): y = r + gamma (1 - d) V(s'), the state value of the next
      state; no next action, so no target-policy smoothing (``policy_noise`` is unused).
    """

    def __init__(
        self,
        gamma: float = 0.99,
        policy_noise: float = 0.2,
        noise_clip: float = 0.5,
        bootstrap: str = "policy",
    ):
        super().__init__()
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if bootstrap not in CRITIC_BOOTSTRAPS:
            raise ValueError(
                f"critic bootstrap must be one of {CRITIC_BOOTSTRAPS}, got {bootstrap!r}"
            )
        self.gamma = gamma
        self.policy_noise = policy_noise
        self.noise_clip = noise_clip
        self.bootstrap = bootstrap

    @torch.no_grad()
    def target(
        self,
        reward: torch.Tensor,
        terminated: torch.Tensor,
        next_observation: torch.Tensor,
        critic_target: TwinQ,
        actor_target: Callable[[torch.Tensor], torch.Tensor] | None,
        generator: torch.Generator | None = None,
        value: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The TD target y [*B, 1] (no gradient); ``value`` (s' [*B, O] -> V(s') [*B, 1]) is
        what ``bootstrap: value`` bootstraps from."""
        return self.target_and_next_action(
            reward, terminated, next_observation, critic_target, actor_target, generator, value
        )[0]

    @torch.no_grad()
    def target_and_next_action(
        self,
        reward: torch.Tensor,
        terminated: torch.Tensor,
        next_observation: torch.Tensor,
        critic_target: TwinQ,
        actor_target: Callable[[torch.Tensor], torch.Tensor] | None,
        generator: torch.Generator | None = None,
        value: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y [*B, 1], the next action a' [*B, A] it used, or None with ``bootstrap: value``)."""
        if self.bootstrap == "value":
            if value is None:
                raise ValueError("critic bootstrap=value needs a state value V(s')")
            return td_target(reward, terminated, value(next_observation), self.gamma), None
        next_action = smoothed_target_action(
            actor_target, next_observation, self.policy_noise, self.noise_clip, generator
        )
        next_q = critic_target(next_observation, next_action).min(dim=0).values
        return td_target(reward, terminated, next_q, self.gamma), next_action

    def forward(
        self,
        observation: torch.Tensor,
        action: torch.Tensor,
        target: torch.Tensor,
        critic: TwinQ,
    ) -> dict[str, torch.Tensor]:
        """Returns ``loss_critic`` and detached diagnostics ``q_mean``, ``td_target_mean``."""
        q = critic(observation, action)  # [E, B, 1]
        loss = (q - target.unsqueeze(0)).pow(2).mean(dim=tuple(range(1, q.dim()))).sum()
        return {
            "loss_critic": loss,
            "q_mean": q.detach().mean(),
            "td_target_mean": target.detach().mean(),
        }
