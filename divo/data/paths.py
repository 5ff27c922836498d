"""Where datasets and their transitions caches are stored (the bottom of :mod:`divo.data`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


def minari_root() -> Path:
    """The local Minari root: ``MINARI_DATASETS_PATH`` if set, else ``~/.minari/datasets``.

    Read as Minari reads it, without Minari's side effect: its ``get_dataset_path`` creates the
    root, so a lookup that is then refused would leave a folder behind."""
    env = os.environ.get("MINARI_DATASETS_PATH")
    return Path(env) if env is not None else Path.home() / ".minari" / "datasets"


def get_dataset_path(dataset_id: str) -> Path:
    """Where the local dataset ``dataset_id`` is (or would be) stored; creates nothing."""
    return minari_root() / dataset_id


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
        # obs2: nested dicts in their space's order (obs-: sorted, which FlattenObservation
        # does not follow for a space declared in another order)
        name = CACHE_FILE.replace(".npz", f"-obs2-{'+'.join(observation_keys)}.npz")
    return minari_root() / CACHE_DIR / dataset_id / name


def remove_local(dataset_id: str) -> None:
    """Delete a local dataset and its transitions cache (no error if they are absent)."""
    shutil.rmtree(get_dataset_path(dataset_id), ignore_errors=True)
    shutil.rmtree(transitions_cache_path(dataset_id).parent, ignore_errors=True)


@contextlib.contextmanager
def minari_root_at(path: Path) -> Iterator[None]:
    """Point the local Minari root at ``path`` for the block (Minari reads the variable)."""
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous


def publish_dataset(
    dataset_id: str,
    write: Callable[[], Any],
    *,
    lost_race_ok: bool = False,
    replace: bool = False,
) -> None:
    """Run ``write()`` (which writes the Minari dataset ``dataset_id``, its metadata included)
    in a hidden scratch root beside the local Minari root, then rename the finished dataset into
    place: an interrupted or failed write leaves no dataset that would load as if whole (nor
    one whose metadata, e.g. its reference scores, is not yet written). ``lost_race_ok``: a
    dataset that appeared meanwhile (another process published it first) is kept and this
    copy dropped; else that is an error. ``replace``: a local dataset of that id is replaced
    only once the new one is whole (an interrupted overwrite leaves the old one). The
    namespace is created when missing."""
    import minari
    from minari.dataset.minari_dataset import parse_dataset_id

    from divo.errors import DatasetError

    root = minari_root()
    target = get_dataset_path(dataset_id)
    try:
        root.mkdir(parents=True, exist_ok=True)  # a fresh machine has no Minari root yet
        with tempfile.TemporaryDirectory(prefix=".divo-build-", dir=root) as scratch:
            with minari_root_at(Path(scratch)):
                write()
                built_cache = transitions_cache_path(dataset_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            if replace and target.exists():  # set aside into the scratch root, deleted with it
                os.rename(target, Path(scratch, ".replaced"))
                shutil.rmtree(transitions_cache_path(dataset_id).parent, ignore_errors=True)
            try:
                os.rename(Path(scratch, dataset_id), target)
            except OSError:
                if not (lost_race_ok and is_local(dataset_id)):  # not a lost race: a failure
                    raise
            else:  # the cache was written for exactly these files (rename keeps their mtimes)
                with contextlib.suppress(OSError):
                    cache = transitions_cache_path(dataset_id)
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(built_cache, cache)
    except OSError as exc:
        raise DatasetError(
            f"cannot write the dataset {dataset_id!r} into {root} "
            f"({type(exc).__name__}: {exc}); point MINARI_DATASETS_PATH at a writable folder, or "
            f"remove a stale {target}"
        ) from exc
    namespace = parse_dataset_id(dataset_id)[0]
    if namespace is not None and namespace not in minari.namespace.list_local_namespaces():
        with contextlib.suppress(ValueError, OSError):
            minari.namespace.create_namespace(namespace)
