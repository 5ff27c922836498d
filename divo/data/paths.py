"""Where datasets and their transitions caches are stored (the bottom of :mod:`divo.data`)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from minari.storage.datasets_root_dir import get_dataset_path


def minari_root() -> Path:
    """The local Minari root: ``MINARI_DATASETS_PATH`` if set, else ``~/.minari/datasets``."""
    return Path(get_dataset_path())


def is_local(dataset_id: str) -> bool:
    """Whether ``dataset_id`` is stored under the local Minari root."""
    return get_dataset_path(dataset_id).joinpath("data").is_dir()


CACHE_DIR = ".divo-cache"
CACHE_FILE = "transitions-v1.npz"


def transitions_cache_path(dataset_id: str, observation_keys: Sequence[str] | None = None) -> Path:
    """Where the flat transitions of ``dataset_id`` are cached (under the current Minari root);
    with ``observation_keys`` (a Dict observation space), one file per choice of keys."""
    name = CACHE_FILE
    if observation_keys is not None:
        name = CACHE_FILE.replace(".npz", f"-obs-{'+'.join(observation_keys)}.npz")
    return minari_root() / CACHE_DIR / dataset_id / name


def remove_local(dataset_id: str) -> None:
    """Delete a local dataset and its transitions cache (no error if they are absent)."""
    shutil.rmtree(get_dataset_path(dataset_id), ignore_errors=True)
    shutil.rmtree(transitions_cache_path(dataset_id).parent, ignore_errors=True)
