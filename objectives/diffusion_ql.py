"""Diffusion-QL's losses (Wang et al., ICLR 2023): the diffusion model IS the policy.

* Critic: twin Q regressed to y = r + gamma (1 - d) min_i Q_i'(s', a'), a' from an EMA copy of
  the policy (no target-policy smoothing); with ``max_q_backup`` (AntMaze), N next actions are
  sampled, the max is taken per head, then the min over heads.
* Policy: L = mean_B l_diffusion(s, a) + eta * L_q, with
  L_q = -mean Q_i(s, a_new) / mean |Q_j(s, a_new)| (denominator detached; (i, j) a random
  ordering of the two heads) and a_new drawn through the FULL reverse chain with gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from divo.objectives.critic import TD3CriticLoss, TwinQ
from divo.objectives.functional import td_target


def normalized_q_loss(q: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Diffusion-QL's Q term from the twin heads q [2, *B, 1]:
    -mean Q1 / mean|Q2| (detached) when ``flip`` is False, -mean Q2 / mean|Q1| when True.

    ``flip`` is a 0-dim bool tensor (chosen on the device: no host sync)."""
    q1, q2 = q[0], q[1]
    loss_1 = -q1.mean() / q2.abs().mean().detach().clamp_min(1e-8)
    loss_2 = -q2.mean() / q1.abs().mean().detach().clamp_min(1e-8)
    return torch.where(flip, loss_2, loss_1)


class DiffusionQLCriticLoss(TD3CriticLoss):
    """TD3's clipped double-Q regression with Diffusion-QL's target.

    target(): a' ~ policy(s') from the EMA policy (no smoothing noise). With ``max_q_backup``,
    ``num_backup_samples`` actions per next state: max over them per head, then min over heads.
    forward() is TD3CriticLoss's: the sum over heads of MSE(Q_i(s, a), y).
    """

    def __init__(
        self, gamma: float = 0.99, max_q_backup: bool = False, num_backup_samples: int = 10
    ) -> None:
        super().__init__(gamma=gamma, policy_noise=0.0, noise_clip=0.0)
        if num_backup_samples < 1:
            raise ValueError(f"num_backup_samples must be >= 1, got {num_backup_samples}")
        self.max_q_backup = max_q_backup
        self.num_backup_samples = num_backup_samples

    @torch.no_grad()
    def target(
        self,
        reward: torch.Tensor,
        terminated: torch.Tensor,
        next_observation: torch.Tensor,
        critic_target: TwinQ,
        policy: nn.Module,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The TD target y [*B, 1]; ``policy`` follows the behaviour-model protocol."""
        n = self.num_backup_samples if self.max_q_backup else 1
        next_action = policy.sample(next_observation, n, generator=generator)  # [*B, n, A]
        next_obs = next_observation.unsqueeze(-2).expand(*next_action.shape[:-1], -1)
        q = critic_target(next_obs, next_action)  # [2, *B, n, 1]
        next_q = q.max(dim=-2).values.min(dim=0).values  # max over samples per head, min heads
        return td_target(reward, terminated, next_q, self.gamma)


class DiffusionQLActorLoss(nn.Module):
    """L = mean_B l_diffusion(s, a) + eta * L_q (see the module docstring).

    forward(observation [B, O], action [B, A], policy, critic) -> ``loss_actor`` and detached
    ``actor_bc``, ``actor_q``, ``actor_q_mean``.
    """

    def __init__(self, eta: float = 1.0) -> None:
        super().__init__()
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta

    def forward(
        self,
        observation: torch.Tensor,
        action: torch.Tensor,
        policy: nn.Module,
        critic: TwinQ,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        bc = policy.per_sample_loss(action, observation, generator=generator).mean()
        # the full reverse chain, WITH gradients: the Q term trains every denoising step
        new_action = policy.sample(observation, 1, generator=generator).squeeze(-2)
        q = critic(observation, new_action)  # [2, B, 1]
        flip = torch.rand((), device=q.device, generator=generator) < 0.5
        q_loss = normalized_q_loss(q, flip)
        loss = bc + self.eta * q_loss
        return {
            "loss_actor": loss,
            "actor_bc": bc.detach(),
            "actor_q": q_loss.detach(),
            "actor_q_mean": q.detach().mean(),
        }
