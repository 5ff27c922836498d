"""Conditional VAE behaviour model, as in BCQ (Fujimoto et al. 2019) and A2PR (Liu et al. 2024).

Encoder q(z | s, a) and decoder p(a | s, z) are ReLU MLPs (750 x 2 in BCQ/A2PR); the latent has
2 * A dimensions; the decoder output is squashed by tanh into [-1, 1]. Training minimises a
per-sample negative ELBO with BCQ's scaling:

    l(s, a) = mean_A (a - dec(s, z))^2 + kl_weight * mean_L KL(q(z | s, a) || N(0, I)),
    z = mu(s, a) + sigma(s, a) * eps,

whose batch mean is exactly BCQ's ``recon_loss + 0.5 * KL_loss`` (both of BCQ's terms average
over dimensions as well as over the batch). Sampling decodes latents drawn from the prior and
clipped to [-prior_clip, prior_clip] (BCQ's 0.5), which keeps samples near the data's bulk.

``weight_kl: false`` (A2PR's code): a weighting scheme weights the reconstruction term only; the
KL term is averaged unweighted (:meth:`CVAE.loss_terms`). :meth:`CVAE.reconstruct` passes an
action through encoder and decoder with gradients (A2PR's code reconstructs the actor's action).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from divo.behavior_models.backbones import mlp
from divo.behavior_models.base import BehaviorModel, flatten_batch, repeat_for_samples


class CVAE(BehaviorModel):
    """BCQ-style conditional VAE of pi_b(a | s).

    Args:
        observation_dim: size of an observation, filled in by the builder.
        action_dim: size of an action, filled in by the builder.
        hidden: widths of the encoder's and of the decoder's hidden layers.
        latent_dim: latent size; ``None`` means 2 * action_dim (BCQ).
        kl_weight: weight of the KL term (BCQ: 0.5).
        prior_clip: latents are drawn from N(0, I) clipped to [-prior_clip, prior_clip].
        log_std_bounds: the encoder's log-std is clamped to this range (BCQ: [-4, 15]).
        activation: hidden activation of both networks.
        weight_kl: whether a weighting scheme weights the KL term too (true: the whole negative
            ELBO is the per-sample loss) or the reconstruction only (false: A2PR's code).
    """

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (750, 750),
        latent_dim: int | None = None,
        kl_weight: float = 0.5,
        prior_clip: float = 0.5,
        log_std_bounds: Sequence[float] = (-4.0, 15.0),
        activation: str = "relu",
        weight_kl: bool = True,
    ) -> None:
        super().__init__(observation_dim, action_dim)
        self.weight_kl = bool(weight_kl)
        if kl_weight < 0 or prior_clip <= 0:
            raise ValueError(
                f"CVAE needs kl_weight >= 0 and prior_clip > 0, got {kl_weight}, {prior_clip}"
            )
        lo, hi = (float(b) for b in log_std_bounds)
        if lo >= hi:
            raise ValueError(f"log_std_bounds must be increasing, got {list(log_std_bounds)}")
        self.latent_dim = int(latent_dim) if latent_dim else 2 * action_dim
        self.kl_weight = kl_weight
        self.prior_clip = prior_clip
        self.log_std_bounds = (lo, hi)
        hidden = tuple(hidden)
        self.encoder = mlp(observation_dim + action_dim, 2 * self.latent_dim, hidden, activation)
        self.decoder = mlp(
            observation_dim + self.latent_dim, action_dim, hidden, activation, out_act="tanh"
        )

    def encode(
        self, action: torch.Tensor, observation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | s, a): mean and std, each [B, L]."""
        mean, log_std = self.encoder(torch.cat([observation, action], -1)).chunk(2, dim=-1)
        return mean, log_std.clamp(*self.log_std_bounds).exp()

    def decode(self, observation: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """p(a | s, z)'s mean, in [-1, 1]: [B, O], [B, L] -> [B, A]."""
        return self.decoder(torch.cat([observation, z], -1))

    def _reconstruct(
        self, a: torch.Tensor, obs: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction [B, A], latent mean [B, L], latent std [B, L]) of flat a, obs."""
        mean, std = self.encode(a, obs)
        eps = torch.randn(mean.shape, device=a.device, dtype=a.dtype, generator=generator)
        return self.decode(obs, mean + std * eps), mean, std

    def reconstruct(
        self,
        observation: torch.Tensor,
        action: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """dec(s, z), z ~ q(z | s, a), differentiable in ``action``: [*B, O], [*B, A] -> [*B, A]."""
        a, batch_shape = flatten_batch(action)
        obs, _ = flatten_batch(observation)
        return self._reconstruct(a, obs, generator)[0].reshape(*batch_shape, self.action_dim)

    def loss_terms(
        self,
        action: torch.Tensor,
        observation: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the part a weighting scheme weights [*B], the unweighted part [*B] or None)."""
        a, batch_shape = flatten_batch(action)
        obs, _ = flatten_batch(observation)
        recon, mean, std = self._reconstruct(a, obs, generator)
        reconstruction = (recon - a).pow(2).mean(-1).reshape(batch_shape)
        kl = (-0.5 * (1.0 + 2.0 * std.log() - mean.pow(2) - std.pow(2))).mean(-1)
        kl = self.kl_weight * kl.reshape(batch_shape)
        if self.weight_kl:
            return reconstruction + kl, None
        return reconstruction, kl

    def per_sample_loss(
        self,
        action: torch.Tensor,
        observation: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Reconstruction + kl_weight * KL per transition: [*B, A], [*B, O] -> [*B]."""
        weighted, unweighted = self.loss_terms(action, observation, generator)
        return weighted if unweighted is None else weighted + unweighted

    def sample(
        self,
        observation: torch.Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode clipped prior latents: [*B, O] -> [*B, N, A] in [-1, 1]."""
        obs, batch_shape = repeat_for_samples(observation, num_samples)
        z = torch.randn(
            (obs.shape[0], self.latent_dim), device=obs.device, dtype=obs.dtype, generator=generator
        ).clamp(-self.prior_clip, self.prior_clip)
        return self.decode(obs, z).reshape(*batch_shape, num_samples, self.action_dim)
