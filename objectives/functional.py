"""Pure functions shared by the losses. Shapes: per-transition scalars keep a trailing 1."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Asymmetric L2, elementwise: |tau - 1[diff < 0]| * diff^2 with diff = target - prediction.

    ``expectile`` = 0.5 is half the MSE; tau > 0.5 pushes the prediction to an upper expectile.
    """
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return weight * diff.pow(2)


def td_target(
    reward: torch.Tensor, terminated: torch.Tensor, next_value: torch.Tensor, gamma: float
) -> torch.Tensor:
    """One-step TD target r + gamma (1 - d) v'. ``terminated`` is the TRUE terminal flag only.

    A time-limit truncation is not terminal: its next state is real and is bootstrapped from.
    """
    return reward + gamma * (~terminated.bool()).to(reward.dtype) * next_value


def smoothed_target_action(
    actor: Callable[[torch.Tensor], torch.Tensor],
    observation: torch.Tensor,
    noise_std: float,
    noise_clip: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TD3 target-policy smoothing: clip(pi(s) + clip(N(0, std^2), -c, c), -1, 1)."""
    action = actor(observation)
    noise = torch.randn(action.shape, device=action.device, dtype=action.dtype, generator=generator)
    noise = (noise * noise_std).clamp(-noise_clip, noise_clip)
    return (action + noise).clamp(-1.0, 1.0)


@torch.no_grad()
def polyak_update(
    target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], tau: float
) -> None:
    """target <- (1 - tau) target + tau online, as one fused foreach operation."""
    torch._foreach_lerp_(list(target), list(online), tau)


def td3bc_lambda(q: torch.Tensor, alpha: float) -> torch.Tensor:
    """TD3+BC's Q normaliser lambda = alpha / mean|Q(s, pi(s))|, detached."""
    return alpha / q.abs().mean().detach().clamp_min(1e-8)
