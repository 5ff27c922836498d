"""Offline data: finding, reading, checking and converting datasets, writing them, and making them.

A dataset id goes down the layers once (each module imports only those above it in this list):

- :mod:`~divo.data.envs`: divo's environments (registered on import) and ``make_env``
- :mod:`~divo.data.paths`: where datasets and their transitions caches are stored
- :mod:`~divo.data.transitions`: episodes -> flat transition arrays (read; cached)
- :mod:`~divo.data.minari_io`: writing Minari datasets from episode arrays
- :mod:`~divo.data.bandit`: the 2-D multimodal bandit, its environment and its dataset
- :mod:`~divo.data.builtin`: finding an id (local root, built-in and shipped datasets, download)
- :mod:`~divo.data.checks`: checking the data against their spaces and environment
- :mod:`~divo.data.load`: ``load_offline_data``: find -> read -> check -> TED TensorDict
- :mod:`~divo.data.batches`: checks of training batches from a replay buffer a user hands over
- :mod:`~divo.data.factory`: making datasets (SAC snapshots, D4RL's recipe; PointMaze)

Nothing in this package imports from ``divo.agents``, the studies or the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module: imported on first use, so that ``import divo.data`` stays cheap
_EXPORTS = {
    "OfflineData": "load",
    "load_offline_data": "load",
    "available_datasets": "builtin",
    "BUILTIN_DATASETS": "builtin",
    "shipped_datasets": "builtin",
    "write_minari_dataset": "minari_io",
    "random_policy_episodes": "minari_io",
    "EpisodeRecorder": "minari_io",
    "make_env": "envs",
    "read_transitions": "transitions",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'divo.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"divo.data.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
