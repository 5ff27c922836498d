"""Conditional DDPM behaviour model (Ho et al. 2020) as configured by Diffusion-QL and DIVO.

K reverse steps (5 by default), VP schedule, epsilon prediction with an L2 loss at a uniformly
drawn step, DDPM posterior sampling with the predicted x0 clipped to [-1, 1] at every step, no
noise at the last step, the final sample clipped to [-1, 1]. ``sampler="idql"`` runs IDQL's
code's reverse step instead (see :class:`DDPM`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from divo.behavior_models.backbones import noise_network
from divo.behavior_models.base import BehaviorModel, flatten_batch, repeat_for_samples
from divo.behavior_models.schedules import DiffusionSchedule

SAMPLERS = ("posterior", "idql")


class DDPM(BehaviorModel):
    """Denoising diffusion model of pi_b(a | s).

    Args:
        observation_dim: size of an observation, filled in by the builder.
        action_dim: size of an action, filled in by the builder.
        num_steps: K, number of diffusion steps.
        schedule: ``vp`` | ``linear`` | ``cosine``.
        hidden: hidden widths of the noise network (``mlp``: one per layer; ``ln_resnet``: one
            per residual block, all equal).
        time_dim: size of the time embedding (``mlp``: sinusoidal; ``ln_resnet``: learnable
            Fourier features).
        activation: the hidden activation.
        clip_denoised: clip the predicted x0 to [-1, 1] at each reverse step.
        network: ``mlp`` (Diffusion-QL's, :class:`~divo.behavior_models.backbones.NoiseNetwork`)
            or ``ln_resnet`` (IDQL's LayerNorm ResNet,
            :class:`~divo.behavior_models.backbones.ResidualNoiseNetwork`).
        dropout: ``ln_resnet``'s dropout rate, in the loss's pass only (IDQL: 0.1).
        sampler: the reverse step. ``posterior`` (Diffusion-QL's and DIVO's): the posterior
            mean from the predicted x0 (clipped with ``clip_denoised``) plus the posterior
            standard deviation times N(0, I). ``idql`` (IDQL's code, ``ddpm_sampler`` with
            ``clip_sampler=True``): x_(k-1) = (x_k - beta_k / sqrt(1 - abar_k) eps) /
            sqrt(alpha_k) + sqrt(beta_k) z, x_(k-1) itself clipped to [-1, 1] after every
            step, ``clip_denoised`` unused. Both add no noise at the last step and clip the
            final sample; they are the same chain up to the noise's scale and where the
            clipping acts.
    """

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        num_steps: int = 5,
        schedule: str = "vp",
        hidden: Sequence[int] = (256, 256, 256),
        time_dim: int = 16,
        activation: str = "mish",
        clip_denoised: bool = True,
        network: str = "mlp",
        dropout: float = 0.0,
        sampler: str = "posterior",
    ) -> None:
        super().__init__(observation_dim, action_dim)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        self.sampler = sampler
        self.schedule = DiffusionSchedule(num_steps, schedule)
        self.num_steps = num_steps
        self.clip_denoised = clip_denoised
        self.network = noise_network(
            network, observation_dim, action_dim, tuple(hidden), time_dim, activation, dropout
        )

    def noisy_action(
        self, action: torch.Tensor, k: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Forward process q(x_k | x_0): [B, A] actions at step indices k [B]."""
        s = self.schedule
        return (
            s.extract("sqrt_alphas_cumprod", k, 2) * action
            + s.extract("sqrt_one_minus_alphas_cumprod", k, 2) * noise
        )

    def per_sample_loss(
        self,
        action: torch.Tensor,
        observation: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """||eps - eps_theta(x_k, k, s)||^2 averaged over action dims: [*B, A], [*B, O] -> [*B]."""
        a, batch_shape = flatten_batch(action)
        obs, _ = flatten_batch(observation)
        k = torch.randint(self.num_steps, (a.shape[0],), device=a.device, generator=generator)
        noise = torch.randn(a.shape, device=a.device, dtype=a.dtype, generator=generator)
        x = self.noisy_action(a, k, noise)
        pred = self.network(x, k, obs, training_pass=True, generator=generator)  # dropout, if any
        return (pred - noise).pow(2).mean(-1).reshape(batch_shape)

    def reverse_step(
        self,
        x: torch.Tensor,
        k: int,
        observation: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One DDPM reverse step x_{k+1} -> x_k at 0-based index ``k`` ([B, A], [B, O])."""
        s = self.schedule
        kk = torch.full((1,), k, device=x.device, dtype=torch.long)  # same k for every row
        eps = self.network(x, kk, observation)
        if self.sampler == "idql":
            beta = s.betas[k]
            x = (x - beta / s.sqrt_one_minus_alphas_cumprod[k] * eps) / (1.0 - beta).sqrt()
            if k > 0:
                noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
                x = x + beta.sqrt() * noise
            return x.clamp(-1.0, 1.0)
        x0 = s.sqrt_recip_alphas_cumprod[k] * x - s.sqrt_recipm1_alphas_cumprod[k] * eps
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        mean = s.posterior_mean_coef1[k] * x0 + s.posterior_mean_coef2[k] * x
        if k == 0:
            return mean
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return mean + (0.5 * s.posterior_log_variance_clipped[k]).exp() * noise

    def sample(
        self,
        observation: torch.Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Run the K-step reverse chain from N(0, I): [*B, O] -> [*B, N, A] in [-1, 1]."""
        obs, batch_shape = repeat_for_samples(observation, num_samples)
        x = torch.randn(
            (obs.shape[0], self.action_dim), device=obs.device, dtype=obs.dtype, generator=generator
        )
        for k in reversed(range(self.num_steps)):
            x = self.reverse_step(x, k, obs, generator)
        return x.clamp(-1.0, 1.0).reshape(*batch_shape, num_samples, self.action_dim)
