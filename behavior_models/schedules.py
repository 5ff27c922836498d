"""Noise schedules of discrete-time diffusion models, as modules whose constants are buffers."""

from __future__ import annotations

import math

import torch
from torch import nn


def vp_betas(num_steps: int, b_min: float = 0.1, b_max: float = 10.0) -> torch.Tensor:
    """Variance-preserving schedule of Diffusion-QL (Xiao et al. 2021 discretisation).

    beta_k = 1 - exp(-b_min / K - 0.5 (b_max - b_min) (2k - 1) / K^2), k = 1..K.
    """
    k = torch.arange(1, num_steps + 1, dtype=torch.float64)
    alpha = torch.exp(-b_min / num_steps - 0.5 * (b_max - b_min) * (2 * k - 1) / num_steps**2)
    return 1.0 - alpha


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """Ho et al. (2020) linear schedule."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021) cosine schedule."""
    x = torch.linspace(0, num_steps, num_steps + 1, dtype=torch.float64)
    f = torch.cos(((x / num_steps) + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


SCHEDULES = {"vp": vp_betas, "linear": linear_betas, "cosine": cosine_betas}


class DiffusionSchedule(nn.Module):
    """All constants of a DDPM with ``num_steps`` steps, as float32 buffers indexed by k = 0..K-1.

    Index k here is the paper's step k + 1: ``alphas_cumprod[k]`` is abar_{k+1}.
    """

    def __init__(self, num_steps: int, kind: str = "vp") -> None:
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; choose one of {sorted(SCHEDULES)}")
        self.num_steps = num_steps
        self.kind = kind
        betas = SCHEDULES[kind](num_steps)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        consts = {
            "betas": betas,
            "alphas_cumprod": abar,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / abar).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
            "posterior_variance": post_var,
            # log of a variance that is 0 at k = 0 is clipped to the next value (Ho et al.)
            "posterior_log_variance_clipped": torch.log(
                torch.cat([post_var[1:2], post_var[1:]]) if num_steps > 1 else post_var.clamp(1e-20)
            ),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        }
        for name, value in consts.items():
            self.register_buffer(name, value.float())

    def extract(self, name: str, k: torch.Tensor, ndim: int) -> torch.Tensor:
        """Buffer ``name`` at indices ``k`` [B], shaped [B, 1, ...] to broadcast over ndim dims."""
        v = getattr(self, name).gather(0, k)
        return v.reshape(k.shape[0], *([1] * (ndim - 1)))
