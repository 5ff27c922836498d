"""Weighting schemes: advantage [*B, 1] -> non-negative, detached weight [*B, 1].

They hold no trainable parameters. How weights are reduced over the batch is an explicit option
of :class:`divo.objectives.behavior.WeightedBehaviorLoss`, never hidden in here.
"""

from __future__ import annotations

import torch
from torch import nn


class WeightingScheme(nn.Module):
    """Base class: ``forward(advantage [*B, 1]) -> weight [*B, 1]`` (>= 0, no gradient)."""

    needs_advantage: bool = True

    def forward(self, advantage: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class BinaryWeight(WeightingScheme):
    """DIVO's PAD weight: w = base + eta * 1[A > 0].

    The default base = 0, eta = 1 clones only positive-advantage actions (as A2PR does);
    base = 1 is "clone all, boost the good".
    """

    def __init__(self, eta: float = 1.0, base: float = 0.0) -> None:
        super().__init__()
        if eta < 0 or base < 0:
            raise ValueError(f"binary weight needs eta >= 0 and base >= 0, got {eta}, {base}")
        self.eta = eta
        self.base = base

    @torch.no_grad()
    def forward(self, advantage: torch.Tensor) -> torch.Tensor:
        return self.base + self.eta * (advantage > 0).to(advantage.dtype)


class ExpAWRWeight(WeightingScheme):
    """Exponential advantage weight (AWR / IQL): w = min(exp(beta * A), w_max)."""

    def __init__(self, beta: float = 3.0, w_max: float = 100.0) -> None:
        super().__init__()
        if beta < 0 or w_max <= 0:
            raise ValueError(f"exp_awr needs beta >= 0 and w_max > 0, got {beta}, {w_max}")
        self.beta = beta
        self.w_max = w_max

    @torch.no_grad()
    def forward(self, advantage: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.beta * advantage).clamp(max=self.w_max)


class UniformWeight(WeightingScheme):
    """w = 1: plain behaviour cloning of every dataset action."""

    needs_advantage = False

    @torch.no_grad()
    def forward(self, advantage: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(advantage)
