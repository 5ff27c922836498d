"""Losses and the parts they are built from: critic, value, weighting, behaviour loss,
target selectors, actor."""

from divo.objectives.actor import (
    DeterministicActor,
    NormalizedPolicy,
    ObservationNormalizer,
    TD3BCActorLoss,
)
from divo.objectives.behavior import WeightedBehaviorLoss
from divo.objectives.critic import TD3CriticLoss, TwinQ
from divo.objectives.diffusion_ql import DiffusionQLActorLoss, DiffusionQLCriticLoss
from divo.objectives.fql import FQLActorLoss, FQLCriticLoss, NoiseConditionedActor
from divo.objectives.keys import DEFAULT_KEYS, Keys
from divo.objectives.selectors import (
    ADPOSelector,
    BehaviorModePolicy,
    DatasetSelector,
    ExpectileResamplingPolicy,
    ResamplingPolicy,
    ResamplingSelector,
    TargetSelector,
    check_selector,
)
from divo.objectives.value import Advantage, StateValue, ValueLoss
from divo.objectives.weighting import (
    BinaryWeight,
    ExpAWRWeight,
    UniformWeight,
    WeightingScheme,
    check_weighting,
)

__all__ = [
    "DEFAULT_KEYS",
    "ADPOSelector",
    "Advantage",
    "BehaviorModePolicy",
    "BinaryWeight",
    "DatasetSelector",
    "DeterministicActor",
    "DiffusionQLCriticLoss",
    "DiffusionQLActorLoss",
    "ExpAWRWeight",
    "ExpectileResamplingPolicy",
    "FQLActorLoss",
    "FQLCriticLoss",
    "Keys",
    "NoiseConditionedActor",
    "NormalizedPolicy",
    "ObservationNormalizer",
    "ResamplingPolicy",
    "ResamplingSelector",
    "StateValue",
    "TD3BCActorLoss",
    "TD3CriticLoss",
    "TargetSelector",
    "TwinQ",
    "UniformWeight",
    "ValueLoss",
    "WeightedBehaviorLoss",
    "WeightingScheme",
    "check_selector",
    "check_weighting",
]
