"""Reading a Minari dataset's episodes as flat transition arrays, with an on-disk cache.

Reading HDF5 episode by episode is slow for datasets of many short episodes; the arrays are
cached beside the dataset (``.divo-cache/``), keyed by a fingerprint of its files.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np

from divo.data.paths import transitions_cache_path
from divo.errors import DatasetError

# --------------------------------------------------------------------------------------------
# Episodes -> flat transitions, with an on-disk cache.
#
# Minari's HDF5 storage keeps one HDF5 group per episode; reading costs ~2 ms per episode here,
# so datasets of many short episodes (the bandit: one step each) take seconds to read. The flat
# arrays are therefore cached in ``<root>/.divo-cache/<id>/`` (a hidden folder of the Minari
# root: Minari's listings skip it, and it is not inside the dataset's folder, which
# ``minari upload`` sends whole), keyed by the names, sizes and modification times of the
# dataset's data files: any rewrite of the data invalidates the cache. The cache holds the values
# exactly as stored; every check and transform happens after reading it.


def observation_key_order(space: gym.spaces.Dict, keys: Sequence[str] | None = None) -> list[str]:
    """The keys of a Dict observation space that divo keeps (default: all), in the order in
    which gymnasium's ``FilterObservation`` + ``FlattenObservation`` concatenate them.

    ``FilterObservation`` builds its Dict from a plain dict, which gymnasium sorts by key, so
    the order is the sorted one whatever the order of ``keys``; building the same Dict here keeps
    the data's columns and the evaluation environment's observations in step.
    """
    chosen = list(space.spaces) if keys is None else list(keys)
    return list(gym.spaces.Dict({key: space[key] for key in chosen}).spaces)


def flatten_observations(
    observations: Any, keys: Sequence[str] | None, space: gym.Space | None = None
) -> np.ndarray:
    """``[T, O]`` observations; a dict of per-key arrays becomes ``[T, sum of sizes]`` with the
    keys concatenated in the order given (see ``observation_key_order``); a nested dict inside
    it in the order of the stored Dict ``space`` (see ``_flat_columns``)."""
    if not isinstance(observations, Mapping):
        return np.asarray(observations)
    if keys is None:
        raise DatasetError(
            "the episodes hold dict observations but no observation keys were given; pass "
            f"observation_keys (the dataset's keys: {', '.join(observations)})"
        )
    spaces = space.spaces if isinstance(space, gym.spaces.Dict) else {}
    return np.concatenate(
        [_flat_columns(observations[key], spaces.get(key)) for key in keys], axis=1
    )


def _flat_columns(value: Any, space: gym.Space | None = None) -> np.ndarray:
    """``[T, ...]`` -> ``[T, size]``; a nested dict (a Dict inside the Dict, e.g. Minari's
    Kitchen goals) is flattened in the order of its Dict ``space``, the order gymnasium's
    ``FlattenObservation`` follows in the evaluation environment (a space declared with an
    OrderedDict keeps its own order; one built from a plain dict is sorted by key, the order
    used when no space is given)."""
    if isinstance(value, Mapping):
        if isinstance(space, gym.spaces.Dict):
            return np.concatenate(
                [_flat_columns(value[key], space[key]) for key in space.spaces], axis=1
            )
        return np.concatenate([_flat_columns(value[key]) for key in sorted(value)], axis=1)
    value = np.asarray(value)
    return value.reshape(len(value), -1)


def episodes_to_transitions(
    episodes: Iterable[Mapping[str, Any]],
    observation_keys: Sequence[str] | None = None,
    observation_space: gym.Space | None = None,
) -> dict[str, np.ndarray]:
    """Flatten whole episodes into per-transition arrays, values as stored.

    Args:
        episodes: mappings with ``observations [T+1, O]``, ``actions [T, A]``, ``rewards [T]``,
            ``terminations [T]``, ``truncations [T]`` (Minari's episode layout).
        observation_keys: for dict observations (a Dict observation space), the keys whose
            arrays are concatenated, in this order (see ``observation_key_order``).
        observation_space: the stored Dict observation space: nested dicts follow its order.

    Returns:
        ``observation [N, O]`` and ``next_observation [N, O]`` (float32; the next one is the
        episode's stored observation t+1, also after a truncation), ``action [N, A]`` (float32),
        ``reward [N]`` (float64), ``terminated [N]``, ``truncated [N]`` (bool, as stored) and
        ``episode_length [E]`` (int64).
    """
    parts: dict[str, list[np.ndarray]] = {
        key: []
        for key in (
            "observation",
            "next_observation",
            "action",
            "reward",
            "terminated",
            "truncated",
        )
    }
    lengths = []
    for index, episode in enumerate(episodes):
        observations = flatten_observations(
            episode["observations"], observation_keys, observation_space
        )
        actions = np.asarray(episode["actions"])
        steps = len(episode["rewards"])
        if observations.ndim != 2 or actions.ndim != 2:
            raise DatasetError(
                f"episode {index} has observations of shape {observations.shape} and actions of "
                f"shape {actions.shape}; divo needs flat vectors ([T+1, O] and [T, A])"
            )
        if len(observations) != steps + 1 or len(actions) != steps:
            raise DatasetError(
                f"episode {index} stores {len(observations)} observations, {len(actions)} "
                f"actions and {steps} rewards; Minari's layout is T+1 observations for T steps: "
                "rewrite the dataset"
            )
        parts["observation"].append(observations[:-1].astype(np.float32, copy=False))
        parts["next_observation"].append(observations[1:].astype(np.float32, copy=False))
        parts["action"].append(actions.astype(np.float32, copy=False))
        parts["reward"].append(np.asarray(episode["rewards"], dtype=np.float64).reshape(steps))
        parts["terminated"].append(np.asarray(episode["terminations"], dtype=bool).reshape(steps))
        parts["truncated"].append(np.asarray(episode["truncations"], dtype=bool).reshape(steps))
        lengths.append(steps)
    if not lengths:
        raise DatasetError("the dataset holds no episodes; write some data into it first")
    out = {key: np.concatenate(value) for key, value in parts.items()}
    out["episode_length"] = np.asarray(lengths, dtype=np.int64)
    return out


def _data_fingerprint(data_path: Path) -> str:
    """Names, sizes and modification times of the data files (not the editable metadata)."""
    entries = []
    for path in sorted(data_path.rglob("*")):
        if path.is_file() and path.name != "metadata.json":
            stat = path.stat()
            entries.append([str(path.relative_to(data_path)), stat.st_size, stat.st_mtime_ns])
    return json.dumps(entries)


def write_cache(
    dataset_id: str,
    data_path: Path,
    transitions: dict[str, np.ndarray],
    observation_keys: Sequence[str] | None = None,
) -> None:
    cache = transitions_cache_path(dataset_id, observation_keys)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, scratch = tempfile.mkstemp(dir=cache.parent, suffix=".npz")
    except OSError:  # a read-only dataset root: work without the cache
        return
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez(file, fingerprint=np.array(_data_fingerprint(data_path)), **transitions)
        os.replace(scratch, cache)  # atomic: readers see the old cache or the whole new one
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(scratch)


def _read_cache(
    dataset_id: str, data_path: Path, observation_keys: Sequence[str] | None = None
) -> dict[str, np.ndarray] | None:
    cache = transitions_cache_path(dataset_id, observation_keys)
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) != _data_fingerprint(data_path):
                return None
            return {key: stored[key] for key in stored.files if key != "fingerprint"}
    except (OSError, ValueError, KeyError):  # unreadable or stale format: rebuild it
        return None


def read_transitions(
    dataset: minari.MinariDataset,
    *,
    use_cache: bool = True,
    observation_keys: Sequence[str] | None = None,
    observation_space: gym.Space | None = None,
) -> dict[str, Any]:
    """All transitions of a Minari dataset as flat arrays (see ``episodes_to_transitions``;
    ``observation_keys``: which keys of dict observations, in order; ``observation_space``: the
    environment's own Dict space, whose nested order the flattening follows, default the stored
    one, which Minari gives back sorted by key)."""
    data_path = Path(dataset.storage.data_path)
    whole = len(dataset.episode_indices) == dataset.storage.total_episodes
    if use_cache and whole:
        cached = _read_cache(dataset.id, data_path, observation_keys)
        if cached is not None:
            return cached
    transitions = episodes_to_transitions(
        dataset.storage.get_episodes(dataset.episode_indices),
        observation_keys,
        observation_space if observation_space is not None else dataset.observation_space,
    )
    if use_cache and whole:
        write_cache(dataset.id, data_path, transitions, observation_keys)
    return transitions
