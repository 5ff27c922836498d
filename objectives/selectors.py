"""Target selectors: pick the action the actor's BC term pulls towards.

Protocol: ``forward(candidates [*B, N, A], candidate_advantage [*B, N, 1], action [*B, A],
action_advantage [*B, 1] | None) -> (target [*B, A], mask [*B, 1])``.

A selector never calls the critic or the behaviour model: candidates and their advantages
arrive precomputed, so each piece is testable alone. (The dataset action's advantage is an
argument beyond the three of the architecture sketch because ADPO's ``compare`` rule needs it.)
Class attributes tell the agent what to precompute: ``num_candidates`` (0 = no sampling) and
``needs_advantage``.
"""

from __future__ import annotations

import torch
from torch import nn

ADPO_RULES = ("compare", "positive")
ADPO_MASKS = ("plain", "three_level")


class TargetSelector(nn.Module):
    """Base class of target selectors."""

    num_candidates: int = 0
    needs_advantage: bool = False

    def forward(
        self,
        candidates: torch.Tensor | None,
        candidate_advantage: torch.Tensor | None,
        action: torch.Tensor,
        action_advantage: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class DatasetSelector(TargetSelector):
    """Plain TD3+BC: the target is the dataset action, with mask 1."""

    def forward(self, candidates, candidate_advantage, action, action_advantage=None):
        return action, torch.ones_like(action[..., :1])


class ADPOSelector(TargetSelector):
    """DIVO's adaptive diffusion-based target (ADPO).

    The best-advantage candidate a_gen competes with the dataset action a:
      * ``compare`` (A2PR, default): target = a_gen if A(s, a_gen) >= A(s, a) else a;
      * ``positive``: target = a_gen if A(s, a_gen) > 0 else a.
    ``mask``: ``plain`` (1 everywhere) or A2PR's ``three_level``
    m = 1[A(s, a_gen) >= 0] + 1[A(s, a) > 0] (values 0, 1, 2).
    """

    needs_advantage = True

    def __init__(self, rule: str = "compare", mask: str = "plain", num_candidates: int = 1):
        super().__init__()
        if rule not in ADPO_RULES:
            raise ValueError(f"ADPO rule must be one of {ADPO_RULES}, got {rule!r}")
        if mask not in ADPO_MASKS:
            raise ValueError(f"ADPO mask must be one of {ADPO_MASKS}, got {mask!r}")
        if num_candidates < 1:
            raise ValueError(f"ADPO needs num_candidates >= 1, got {num_candidates}")
        self.rule = rule
        self.mask = mask
        self.num_candidates = num_candidates

    @torch.no_grad()
    def forward(self, candidates, candidate_advantage, action, action_advantage=None):
        if candidates is None or candidate_advantage is None:
            raise ValueError("ADPO needs candidate actions and their advantages")
        best = candidate_advantage.argmax(dim=-2, keepdim=True)  # [*B, 1, 1]
        a_gen = candidates.gather(-2, best.expand(*best.shape[:-1], candidates.shape[-1]))
        a_gen = a_gen.squeeze(-2)
        adv_gen = candidate_advantage.gather(-2, best).squeeze(-2)  # [*B, 1]
        if self.rule == "compare" or self.mask == "three_level":
            if action_advantage is None:
                raise ValueError(
                    f"ADPO rule {self.rule!r} / mask {self.mask!r} needs the dataset action's "
                    "advantage"
                )
        if self.rule == "compare":
            use_gen = adv_gen >= action_advantage
        else:
            use_gen = adv_gen > 0
        target = torch.where(use_gen, a_gen, action)
        if self.mask == "plain":
            mask = torch.ones_like(adv_gen)
        else:
            mask = (adv_gen >= 0).to(action.dtype) + (action_advantage > 0).to(action.dtype)
        return target, mask
