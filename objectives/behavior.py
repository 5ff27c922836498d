"""The weighted behaviour-model loss, with an explicit reduction over the batch."""

from __future__ import annotations

import torch
from torch import nn

REDUCTIONS = ("mean", "weight_normalized")


class WeightedBehaviorLoss(nn.Module):
    """L = reduce(w * l(s, a)) over the batch [+ mean u(s, a)], l from the model's
    ``loss_terms`` (or ``per_sample_loss``), u its unweighted part when it has one (the CVAE's
    KL term under A2PR's code: only the reconstruction is weighted).

    ``reduction``:
      * ``mean``: mean over the batch of w * l (DIVO's default: a batch with no positive
        advantage under the binary weight gives a zero loss, not 0/0);
      * ``weight_normalized``: sum(w * l) / sum(w), and 0 when every weight is 0.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def forward(
        self,
        per_sample_loss: torch.Tensor,
        weight: torch.Tensor,
        unweighted: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """per_sample_loss [*B], weight [*B, 1], unweighted [*B] or None -> ``loss_behavior`` +
        diagnostics."""
        w = weight.detach().reshape(per_sample_loss.shape)
        weighted = w * per_sample_loss
        if self.reduction == "mean":
            loss = weighted.mean()
        else:
            loss = weighted.sum() / w.sum().clamp_min(1e-8)
        extra = {}
        if unweighted is not None:
            loss = loss + unweighted.mean()
            extra["behavior_unweighted_term"] = unweighted.detach().mean()
        return {
            **extra,
            "loss_behavior": loss,
            "behavior_loss_unweighted": per_sample_loss.detach().mean(),
            "weight_mean": w.mean(),
            "weight_nonzero_frac": (w > 0).float().mean(),
        }
