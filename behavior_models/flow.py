"""Conditional flow matching (Lipman et al. 2023; the linear path of rectified flow, Liu et al.
2023) as a behaviour model: FQL's BC flow (Park, Li, Levine, ICML 2025).

* Path: x_t = (1 - t) z + t a between noise z ~ N(0, I) (t = 0) and the action a (t = 1); its
  velocity is dx_t / dt = a - z.
* Loss per transition: t ~ U(0, 1), z ~ N(0, I), l(s, a) = mean over action dims of
  (v_theta(s, x_t, t) - (a - z))^2: one loss per transition, never averaged over the batch (its
  batch mean is FQL's ``bc_flow_loss``).
* Sampler: K Euler steps of dx/dt = v_theta(s, x, t) from x_0 = z, at t_i = i / K:
  x_{i+1} = x_i + v_theta(s, x_i, t_i) / K; the result clipped to [-1, 1] (``clip_sample``, as
  FQL's ``compute_flow_actions``). :meth:`FlowMatching.sample_from_noise` starts from a given z,
  so that a caller can compare the flow's action with another function of the same noise (FQL
  distils it into a one-step actor mu(s, z)).

The velocity network reads concat[s, x, t] with the time as the raw scalar t in [0, 1] (FQL's
``ActorVectorField``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from divo.behavior_models.backbones import mlp
from divo.behavior_models.base import BehaviorModel, flatten_batch, repeat_for_samples


class VelocityNetwork(nn.Module):
    """v(s, x, t): an MLP over concat[s, x, t]: [B, O], [B, A], [B, 1] -> [B, A]."""

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (256, 256, 256),
        activation: str = "mish",
        layer_norm: bool = False,
        init: str = "torch",
    ) -> None:
        super().__init__()
        self.net = mlp(
            observation_dim + action_dim + 1,
            action_dim,
            tuple(hidden),
            activation,
            layer_norm=layer_norm,
            init=init,
        )

    def forward(self, observation: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([observation, x, t], dim=-1))


class FlowMatching(BehaviorModel):
    """Flow-matching model of pi_b(a | s), sampled with K Euler steps.

    Args:
        observation_dim: size of an observation, filled in by the builder.
        action_dim: size of an action, filled in by the builder.
        num_steps: K, Euler steps of the sampler (FQL's ``flow_steps``: 10).
        hidden: hidden widths of the velocity network.
        activation: its hidden activation.
        layer_norm: a LayerNorm after each hidden activation (FQL's ``actor_layer_norm``).
        init: ``torch`` (nn.Linear's default) or ``xavier_uniform`` (flax's default, FQL's).
        clip_sample: clip the sampler's result to [-1, 1]. Without it a sample may leave the
            action range (the behaviour-model protocol asks for [-1, 1]).
    """

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        num_steps: int = 10,
        hidden: Sequence[int] = (256, 256, 256),
        activation: str = "mish",
        layer_norm: bool = False,
        init: str = "torch",
        clip_sample: bool = True,
    ) -> None:
        super().__init__(observation_dim, action_dim)
        if int(num_steps) < 1:
            raise ValueError(f"num_steps (Euler steps) must be >= 1, got {num_steps}")
        self.num_steps = int(num_steps)
        self.clip_sample = bool(clip_sample)
        self.network = VelocityNetwork(
            observation_dim, action_dim, tuple(hidden), activation, layer_norm, init
        )

    def velocity(self, observation: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v_theta(s, x, t): [B, O], [B, A], [B, 1] -> [B, A]."""
        return self.network(observation, x, t)

    def per_sample_loss(
        self,
        action: torch.Tensor,
        observation: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """||v_theta(s, x_t, t) - (a - z)||^2 averaged over action dims, with t ~ U(0, 1),
        z ~ N(0, I), x_t = (1 - t) z + t a: [*B, A], [*B, O] -> [*B]."""
        a, batch_shape = flatten_batch(action)
        obs, _ = flatten_batch(observation)
        z = torch.randn(a.shape, device=a.device, dtype=a.dtype, generator=generator)
        t = torch.rand((a.shape[0], 1), device=a.device, dtype=a.dtype, generator=generator)
        x_t = (1.0 - t) * z + t * a
        pred = self.velocity(obs, x_t, t)
        return (pred - (a - z)).pow(2).mean(-1).reshape(batch_shape)

    def sample_from_noise(self, observation: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The Euler solution of the flow from x_0 = ``noise``: [*B, O], [*B, A] -> [*B, A]
        (clipped to [-1, 1] with ``clip_sample``). Deterministic given the noise;
        differentiable unless the caller disables gradients."""
        obs, batch_shape = flatten_batch(observation)
        x, noise_shape = flatten_batch(noise)
        if noise_shape != batch_shape or x.shape[-1] != self.action_dim:
            raise ValueError(
                f"noise of shape {tuple(noise.shape)} does not match observation "
                f"{tuple(observation.shape)}: expected {(*batch_shape, self.action_dim)}"
            )
        dt = 1.0 / self.num_steps
        for i in range(self.num_steps):
            t = torch.full((x.shape[0], 1), i * dt, device=x.device, dtype=x.dtype)
            x = x + dt * self.velocity(obs, x, t)
        if self.clip_sample:
            x = x.clamp(-1.0, 1.0)
        return x.reshape(*batch_shape, self.action_dim)

    def sample(
        self,
        observation: torch.Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """K Euler steps from z ~ N(0, I): [*B, O] -> [*B, N, A]."""
        obs, batch_shape = repeat_for_samples(observation, num_samples)
        z = torch.randn(
            (obs.shape[0], self.action_dim), device=obs.device, dtype=obs.dtype, generator=generator
        )
        x = self.sample_from_noise(obs, z)
        return x.reshape(*batch_shape, num_samples, self.action_dim)
