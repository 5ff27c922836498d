"""Weighting schemes: advantage [*B, 1] -> non-negative, detached weight [*B, 1].

They hold no trainable parameters. How weights are reduced over the batch is an explicit option
of :class:`divo.objectives.behavior.WeightedBehaviorLoss`, never hidden in here.
"""

from __future__ import annotations

import torch
from torch import nn

from divo.errors import ProtocolError, type_name


class WeightingScheme(nn.Module):
    """Base class: ``forward(advantage [*B, 1]) -> weight [*B, 1]`` (>= 0, no gradient)."""

    needs_advantage: bool = True
    # the largest weight the scheme gives, when it clips (the agent logs the share at the clip)
    clip: float | None = None

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
        self.clip = w_max

    @torch.no_grad()
    def forward(self, advantage: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.beta * advantage).clamp(max=self.w_max)


class UniformWeight(WeightingScheme):
    """w = 1: plain behaviour cloning of every dataset action."""

    needs_advantage = False

    @torch.no_grad()
    def forward(self, advantage: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(advantage)


def check_weighting(scheme: object) -> None:
    """Check a weighting scheme against the protocol on a probe batch of advantages; raise
    :class:`divo.errors.ProtocolError` naming the first thing wrong: a ``needs_advantage``
    flag (subclass :class:`WeightingScheme`), and ``[4, 1]`` advantages -> ``[4, 1]`` finite,
    non-negative weights."""
    name = type_name(scheme)
    if not callable(scheme) or not isinstance(getattr(scheme, "needs_advantage", None), bool):
        raise ProtocolError(
            f"weighting scheme {name} must be callable (advantage [*B, 1] -> weight [*B, 1]) "
            "and say whether it reads advantages (needs_advantage: bool); subclass "
            "divo.objectives.WeightingScheme"
        )
    advantage = torch.tensor([[-1.0], [0.0], [0.5], [2.0]])
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # the probe leaves no trace
            weight = scheme(advantage)
    except Exception as exc:
        raise ProtocolError(
            f"weighting scheme {name} failed on advantages of shape [4, 1]: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (4, 1):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ProtocolError(
            f"weighting scheme {name} turned advantages of shape (4, 1) into {got}; it must "
            "return one weight per transition, of the advantage's shape"
        )
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ProtocolError(
            f"weighting scheme {name} gave weights {weight.flatten().tolist()} for advantages "
            "[-1, 0, 0.5, 2]; weights must be finite and non-negative (clip them)"
        )
    if not scheme.needs_advantage:  # the agent then hands it zeros, not advantages
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            at_zero = scheme(torch.zeros_like(advantage))
        if not torch.equal(torch.as_tensor(at_zero), weight):
            raise ProtocolError(
                f"weighting scheme {name} says needs_advantage=False but its weights depend on "
                f"the advantage ({weight.flatten().tolist()} for [-1, 0, 0.5, 2], "
                f"{torch.as_tensor(at_zero).flatten().tolist()} for zeros): the agent computes "
                "no advantages for it and would hand it zeros; set needs_advantage = True"
            )
