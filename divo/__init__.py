"""divo: offline RL with swappable generative behaviour models (DIVO, TD3+BC and ablations).

The front door (imported on first use, so ``import divo`` stays fast)::

    import divo

    cfg = divo.compose("divo", ["train.steps=5000"])     # a recipe, composed as `divo train`
    result = divo.train(cfg, "runs/my-run")               # or divo.train("divo", "runs/x", ...)
    policy, info = divo.load_policy("runs/my-run")        # the deployed policy of a run
    data = divo.load_offline_data("divo/bandit/multimodal-v0")  # OfflineData: .data is TED
    data = divo.load_offline_data(cfg)                    # a recipe's data, as it trains on it
    divo.evaluate("runs/my-run")                          # as `divo evaluate`

The packages: ``divo.behavior_models``, ``divo.objectives``, ``divo.agents`` (agents, their
training step and the run machinery), ``divo.data`` (datasets), ``divo.studies`` (experiments
run with the library), ``divo.report``, ``divo.config`` (recipes), ``divo.cli`` (the command).
"""

from __future__ import annotations

import importlib
from typing import Any

from divo import _moved
from divo.errors import CheckpointError, ConfigError, DatasetError, DivoError

__version__ = "0.1.0"

_moved.install()  # old import paths (divo.datasets, divo.agents.data, ...) keep working

_FRONT_DOOR = ("compose", "train", "load_policy", "load_offline_data", "evaluate")


def __getattr__(name: str) -> Any:
    if name in _FRONT_DOOR:
        return getattr(importlib.import_module("divo.api"), name)
    raise AttributeError(f"module 'divo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_FRONT_DOOR])


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DivoError",
    "__version__",
    *_FRONT_DOOR,
]
