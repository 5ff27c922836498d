"""Behaviour models: the protocol and its implementations."""

from divo.behavior_models.base import BehaviorModel, as_policy_module, as_sampler_module
from divo.behavior_models.ddpm import DDPM

__all__ = ["DDPM", "BehaviorModel", "as_policy_module", "as_sampler_module"]
