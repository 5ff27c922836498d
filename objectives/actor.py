"""Deterministic actor, the observation normaliser, and the TD3+BC actor loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from divo.behavior_models.backbones import mlp
from divo.objectives.critic import TwinQ
from divo.objectives.functional import td3bc_lambda


class DeterministicActor(nn.Module):
    """pi(s) = tanh(MLP(s)) in [-1, 1]^A: [*B, O] -> [*B, A]."""

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.net = mlp(observation_dim, action_dim, tuple(hidden), activation, out_act="tanh")

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.net(observation)


class ObservationNormalizer(nn.Module):
    """(s - mean) / std with the dataset's statistics as buffers (saved with the policy)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clone())

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return (observation - self.mean) / self.std


class NormalizedPolicy(nn.Module):
    """The deployable policy: raw observation -> normaliser -> actor -> action."""

    def __init__(self, normalizer: ObservationNormalizer, actor: nn.Module) -> None:
        super().__init__()
        self.normalizer = normalizer
        self.actor = actor

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.actor(self.normalizer(observation))


class TD3BCActorLoss(nn.Module):
    """L = -lambda * mean Q1(s, pi(s)) + beta * mean_B( m * mean_A (pi(s) - target)^2 ).

    lambda = alpha / mean|Q1(s, pi(s))| (detached). With target = dataset action, m = 1 and
    beta = 1 this is exactly TD3+BC (its ``F.mse_loss(pi, a)`` averages over action dims too).
    The target carries gradient only when the caller gives it one (A2PR's code: the behaviour
    model's reconstruction of pi(s), computed from the ``pi`` passed in); selected samples and
    dataset actions arrive without.
    """

    def __init__(self, alpha: float = 2.5, bc_weight: float = 1.0) -> None:
        super().__init__()
        if alpha < 0 or bc_weight < 0:
            raise ValueError(f"alpha and bc_weight must be >= 0, got {alpha}, {bc_weight}")
        self.alpha = alpha
        self.bc_weight = bc_weight

    def forward(
        self,
        observation: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        actor: nn.Module,
        critic: TwinQ,
        pi: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """observation [*B, O], target [*B, A], mask [*B, 1]; ``pi``: actor(observation) when
        the caller has computed it already."""
        pi = actor(observation) if pi is None else pi
        q = critic.q1(observation, pi, detach_params=True)  # only dQ/da is needed
        lmbda = td3bc_lambda(q, self.alpha)
        bc = (mask.detach() * (pi - target).pow(2).mean(-1, keepdim=True)).mean()
        loss = -lmbda * q.mean() + self.bc_weight * bc
        return {
            "loss_actor": loss,
            "actor_q_mean": q.detach().mean(),
            "actor_bc": bc.detach(),
            "lambda": lmbda.detach(),
        }
