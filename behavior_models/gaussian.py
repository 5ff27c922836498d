"""A unimodal Gaussian behaviour model: the baseline that cannot represent several modes.

pi_b(a | s) = N(mu(s), diag sigma(s)^2) from one MLP; trained by maximum likelihood. Samples are
clipped to the action box [-1, 1]. On the four-mode bandit it puts its mean between the modes
(see ``divo.studies.bandit``), which is why the expressive models exist. Trained with the
exponential advantage weight it is IQL's policy (``recipes/behavior_model/iql_gaussian.yaml``:
IQL's options ``state_dependent_std: false`` and ``tanh_mean: true``), deployed as its mean
(:meth:`mode`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from divo.behavior_models.backbones import mlp
from divo.behavior_models.base import BehaviorModel, flatten_batch


class GaussianBehavior(BehaviorModel):
    """State-conditional diagonal Gaussian of pi_b(a | s).

    Args:
        observation_dim: size of an observation, filled in by the builder.
        action_dim: size of an action, filled in by the builder.
        hidden: hidden widths of the MLP, which outputs the mean and the log-std.
        activation: the hidden activation.
        log_std_bounds: the log-std is clamped to this range.
        state_dependent_std: the MLP outputs the log-std (true), or it is one learned vector per
            action dimension, initialised at 0 (false: IQL's policy).
        tanh_mean: squash the mean by tanh into [-1, 1] (IQL's policy; the distribution itself
            is not squashed).
    """

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
        log_std_bounds: Sequence[float] = (-5.0, 2.0),
        state_dependent_std: bool = True,
        tanh_mean: bool = False,
    ) -> None:
        super().__init__(observation_dim, action_dim)
        lo, hi = (float(b) for b in log_std_bounds)
        if lo >= hi:
            raise ValueError(f"log_std_bounds must be increasing, got {list(log_std_bounds)}")
        self.log_std_bounds = (lo, hi)
        self.state_dependent_std = bool(state_dependent_std)
        self.tanh_mean = bool(tanh_mean)
        outputs = 2 * action_dim if self.state_dependent_std else action_dim
        self.network = mlp(observation_dim, outputs, tuple(hidden), activation)
        self.log_std = None if self.state_dependent_std else nn.Parameter(torch.zeros(action_dim))

    def distribution_parameters(
        self, observation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of pi_b(. | s): [*B, O] -> ([*B, A], [*B, A])."""
        out = self.network(observation)
        if self.state_dependent_std:
            mean, log_std = out.chunk(2, dim=-1)
        else:
            mean, log_std = out, self.log_std.expand_as(out)
        if self.tanh_mean:
            mean = torch.tanh(mean)
        return mean, log_std.clamp(*self.log_std_bounds).exp()

    def mode(self, observation: torch.Tensor) -> torch.Tensor:
        """The most likely action, clipped to [-1, 1]: [*B, O] -> [*B, A] (IQL deploys it)."""
        return self.distribution_parameters(observation)[0].clamp(-1.0, 1.0)

    def per_sample_loss(
        self,
        action: torch.Tensor,
        observation: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Negative log-likelihood, summed over action dims: [*B, A], [*B, O] -> [*B]."""
        mean, std = self.distribution_parameters(observation)
        z = (action - mean) / std
        return (0.5 * z.pow(2) + std.log() + 0.5 * math.log(2.0 * math.pi)).sum(-1)

    def sample(
        self,
        observation: torch.Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """mu + sigma * eps, clipped to [-1, 1]: [*B, O] -> [*B, N, A]."""
        obs, batch_shape = flatten_batch(observation)
        mean, std = self.distribution_parameters(obs)
        eps = torch.randn(
            (obs.shape[0], num_samples, self.action_dim),
            device=obs.device,
            dtype=obs.dtype,
            generator=generator,
        )
        x = (mean.unsqueeze(1) + std.unsqueeze(1) * eps).clamp(-1.0, 1.0)
        return x.reshape(*batch_shape, num_samples, self.action_dim)
