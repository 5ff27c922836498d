"""TensorDict keys read by the losses, declared once and remappable (TorchRL's idiom)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

NestedKey = str | tuple[str, ...]


@dataclass(frozen=True)
class Keys:
    """TorchRL TED layout plus the keys DIVO's objectives write."""

    observation: NestedKey = "observation"
    action: NestedKey = "action"
    next_observation: NestedKey = ("next", "observation")
    reward: NestedKey = ("next", "reward")
    terminated: NestedKey = ("next", "terminated")
    truncated: NestedKey = ("next", "truncated")
    done: NestedKey = ("next", "done")
    advantage: NestedKey = "advantage"
    sample_weight: NestedKey = "sample_weight"
    candidate_action: NestedKey = "candidate_action"
    candidate_advantage: NestedKey = "candidate_advantage"
    target_action: NestedKey = "target_action"
    target_mask: NestedKey = "target_mask"

    def remap(self, **kwargs: NestedKey) -> Keys:
        """A copy with some keys renamed, e.g. ``keys.remap(reward=("next", "my_reward"))``."""
        names = {f.name for f in fields(self)}
        unknown = set(kwargs) - names
        if unknown:
            raise KeyError(f"unknown key names {sorted(unknown)}; known: {sorted(names)}")
        return replace(self, **kwargs)


DEFAULT_KEYS = Keys()
