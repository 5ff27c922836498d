"""Flow Q-learning's parts (FQL: Park, Li, Levine, ICML 2025; code: seohongpark/fql).

* One-step actor mu(s, z): an MLP of the state and a noise z ~ N(0, I) of the action's size,
  deployed with a fresh z per action and clipped to [-1, 1].
* Critic: y = r + gamma (1 - d) agg_i Q'_i(s', a') with a' = clip(mu(s', z'), -1, 1) for a fresh
  z' (no target-policy smoothing), agg = mean over the heads (FQL's default ``q_agg``) or min;
  loss: the squared error averaged over heads and batch.
* Actor: L = alpha * mean ||mu(s, z) - flow(s, z)||^2 - mean_B Q(s, clip(mu(s, z))), with the
  flow's Euler solution from the SAME z computed without gradient (the flow is trained by its
  own BC loss alone), Q the mean over the critic's heads (gradient into mu only), and, with
  ``normalize_q_loss`` (off in FQL's paper), the Q term divided by mean |Q| (detached).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from divo.behavior_models.backbones import mlp
from divo.objectives.critic import TwinQ
from divo.objectives.functional import td_target

Q_AGGREGATIONS = ("mean", "min")


class NoiseConditionedActor(nn.Module):
    """FQL's one-step policy mu(s, z) (``actor_onestep_flow``): an MLP over concat[s, z].

    ``act(observation [*B, O], noise [*B, A]) -> [*B, A]`` is mu itself (unclipped, as FQL's
    distillation loss reads it); ``forward(observation) -> [*B, A]`` is the deployed policy:
    a fresh z ~ N(0, I) per action, the result clipped to [-1, 1].
    """

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (512, 512, 512, 512),
        activation: str = "gelu_tanh",
        layer_norm: bool = False,
        init: str = "xavier_uniform",
    ) -> None:
        super().__init__()
        self.action_dim = int(action_dim)
        self.net = mlp(
            observation_dim + action_dim,
            action_dim,
            tuple(hidden),
            activation,
            layer_norm=layer_norm,
            init=init,
        )

    def act(self, observation: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """mu(s, z), unclipped."""
        return self.net(torch.cat([observation, noise], dim=-1))

    def draw_noise(
        self, observation: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z ~ N(0, I) for each state: [*B, O] -> [*B, A]."""
        shape = (*observation.shape[:-1], self.action_dim)
        return torch.randn(
            shape, device=observation.device, dtype=observation.dtype, generator=generator
        )

    def sample(
        self, observation: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """clip(mu(s, z), -1, 1) with a fresh z: [*B, O] -> [*B, A]."""
        noise = self.draw_noise(observation, generator)
        return self.act(observation, noise).clamp(-1.0, 1.0)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.sample(observation)


class FQLCriticLoss(nn.Module):
    """FQL's critic loss: mean over heads and batch of (Q_i(s, a) - y)^2 with y as in the module
    docstring. ``policy_noise`` > 0 adds TD3's target-policy smoothing to a' (clipped Gaussian,
    ``noise_clip``), which FQL does not use (0)."""

    def __init__(
        self,
        gamma: float = 0.99,
        q_agg: str = "mean",
        policy_noise: float = 0.0,
        noise_clip: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if q_agg not in Q_AGGREGATIONS:
            raise ValueError(f"q_agg must be one of {Q_AGGREGATIONS}, got {q_agg!r}")
        if policy_noise < 0 or noise_clip < 0:
            raise ValueError(
                f"policy_noise and noise_clip must be >= 0, got {policy_noise}, {noise_clip}"
            )
        self.gamma = gamma
        self.q_agg = q_agg
        self.policy_noise = policy_noise
        self.noise_clip = noise_clip

    def aggregate(self, q: torch.Tensor) -> torch.Tensor:
        """The heads' Q [E, *B, 1] -> [*B, 1]: their mean or their min (``q_agg``)."""
        return q.mean(dim=0) if self.q_agg == "mean" else q.min(dim=0).values

    @torch.no_grad()
    def next_action(
        self,
        next_observation: torch.Tensor,
        actor: NoiseConditionedActor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """a' = clip(mu(s', z'), -1, 1), z' fresh (plus TD3's smoothing if ``policy_noise``)."""
        action = actor.sample(next_observation, generator)
        if self.policy_noise > 0:
            eps = torch.randn(
                action.shape, device=action.device, dtype=action.dtype, generator=generator
            )
            eps = (eps * self.policy_noise).clamp(-self.noise_clip, self.noise_clip)
            action = (action + eps).clamp(-1.0, 1.0)
        return action

    @torch.no_grad()
    def target(
        self,
        reward: torch.Tensor,
        terminated: torch.Tensor,
        next_observation: torch.Tensor,
        critic_target: TwinQ,
        actor: NoiseConditionedActor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The TD target y [*B, 1] (no gradient)."""
        next_action = self.next_action(next_observation, actor, generator)
        next_q = self.aggregate(critic_target(next_observation, next_action))
        return td_target(reward, terminated, next_q, self.gamma)

    def forward(
        self,
        observation: torch.Tensor,
        action: torch.Tensor,
        target: torch.Tensor,
        critic: TwinQ,
    ) -> dict[str, torch.Tensor]:
        """``loss_critic`` (mean over heads and batch) and detached ``q_mean``,
        ``td_target_mean``."""
        q = critic(observation, action)  # [E, B, 1]
        loss = (q - target.unsqueeze(0)).pow(2).mean()
        return {
            "loss_critic": loss,
            "q_mean": q.detach().mean(),
            "td_target_mean": target.detach().mean(),
        }


class FQLActorLoss(nn.Module):
    """L = alpha * distillation - Q term (see the module docstring).

    forward(observation [B, O], actor, flow, critic) -> ``loss_actor`` and detached
    ``actor_distill`` (mean ||mu - flow||^2 over batch and action dims), ``actor_q`` (the Q
    term as it enters the loss) and ``actor_q_mean`` (mean Q of the clipped actor actions).
    ``flow`` needs ``sample_from_noise(observation, noise)``
    (:class:`divo.behavior_models.FlowMatching`).
    """

    def __init__(self, alpha: float = 10.0, normalize_q_loss: bool = False) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = alpha
        self.normalize_q_loss = normalize_q_loss

    def forward(
        self,
        observation: torch.Tensor,
        actor: NoiseConditionedActor,
        flow: nn.Module,
        critic: TwinQ,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        noise = actor.draw_noise(observation, generator)
        with torch.no_grad():  # the distillation target: no gradient reaches the flow
            target = flow.sample_from_noise(observation, noise)
        mu = actor.act(observation, noise)
        distill = (mu - target).pow(2).mean()
        # Q of the clipped action, averaged over the heads; gradients reach mu, not the critic
        q = critic(observation, mu.clamp(-1.0, 1.0), detach_params=True).mean(dim=0)
        q_loss = -q.mean()
        if self.normalize_q_loss:
            q_loss = q_loss / q.detach().abs().mean().clamp_min(1e-8)
        loss = self.alpha * distill + q_loss
        return {
            "loss_actor": loss,
            "actor_distill": distill.detach(),
            "actor_q": q_loss.detach(),
            "actor_q_mean": q.detach().mean(),
        }
