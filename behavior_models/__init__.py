"""Behaviour models: the protocol and its implementations."""

from divo.behavior_models.base import (
    BehaviorModel,
    BehaviorModelError,
    as_policy_module,
    as_sampler_module,
    check_behavior_model,
)
from divo.behavior_models.consistency import ConsistencyModel
from divo.behavior_models.cvae import CVAE
from divo.behavior_models.ddpm import DDPM
from divo.behavior_models.flow import FlowMatching
from divo.behavior_models.gaussian import GaussianBehavior

__all__ = [
    "CVAE",
    "DDPM",
    "BehaviorModel",
    "BehaviorModelError",
    "ConsistencyModel",
    "FlowMatching",
    "GaussianBehavior",
    "as_policy_module",
    "as_sampler_module",
    "check_behavior_model",
]
