"""Finding a dataset id: the local Minari root, the datasets divo ships or builds on first
use (``BUILTIN_DATASETS``), else Minari's remote server.

``ensure_builtin`` writes a missing built-in dataset into the local Minari root the first time it
is asked for; :func:`open_dataset` is the single place an id is resolved to a
``MinariDataset``, with an error that lists what exists when it is not found.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import minari
from minari.dataset.minari_dataset import parse_dataset_id

from divo.data.bandit import (
    BANDIT_DATASET_ID,
    RARE_BANDIT_DATASET_ID,
    build_bandit_dataset,
    build_rare_bandit_dataset,
)
from divo.data.paths import get_dataset_path, is_local, minari_root, publish_dataset
from divo.errors import DatasetError, install_hint

# --------------------------------------------------------------------------------------------
# Built-in datasets: created on first use.


def _pointmaze_builder(maze: str) -> Callable[[str], Any]:
    def build(dataset_id: str) -> Any:
        # imported here: the maze extra is optional (and the factory sits above this module)
        from divo.data.factory.pointmaze import build_pointmaze_dataset

        return build_pointmaze_dataset(maze, dataset_id=dataset_id)

    return build


# Datasets made with `divo data build` on our machines and shipped inside the package
# (divo/data/shipped/<id>/data/...: Minari's own layout); the first use copies one into the local
# Minari root. docs/datasets.md, "Shipped datasets", says how each was made and how to rebuild it.
SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped"


def shipped_datasets() -> list[str]:
    """Ids of the datasets shipped with divo."""
    return sorted(
        str(path.parent.parent.relative_to(SHIPPED_ROOT)).replace(os.sep, "/")
        for path in SHIPPED_ROOT.glob("**/data/metadata.json")
    )


def copy_shipped_dataset(dataset_id: str) -> minari.MinariDataset:
    """Copy the shipped dataset ``dataset_id`` into the local Minari root."""
    source = SHIPPED_ROOT / dataset_id
    if not source.joinpath("data", "metadata.json").is_file():
        raise DatasetError(
            f"{dataset_id!r} is not shipped with divo (shipped: {', '.join(shipped_datasets())})"
        )
    shutil.copytree(source, get_dataset_path(dataset_id), dirs_exist_ok=True)
    return minari.load_dataset(dataset_id)


BUILTIN_DATASETS: dict[str, Callable[[str], Any]] = {
    **{dataset_id: copy_shipped_dataset for dataset_id in shipped_datasets()},
    BANDIT_DATASET_ID: build_bandit_dataset,
    RARE_BANDIT_DATASET_ID: build_rare_bandit_dataset,  # the best mode in 5% of the actions
    # sparse-reward navigation (waypoint planner + PD controller; needs the maze extra)
    "divo/pointmaze/umaze-v0": _pointmaze_builder("umaze"),
    "divo/pointmaze/medium-v0": _pointmaze_builder("medium"),
}


def ensure_builtin(dataset_id: str) -> bool:
    """Write the built-in dataset ``dataset_id`` into the local Minari root if it is missing.

    The dataset is written into a hidden scratch folder of the root and renamed into place, so
    a crash never leaves half a dataset behind and concurrent first uses (several seeds started
    together) do not clash: the first rename wins and the others discard their copy.

    Returns:
        True if ``dataset_id`` is built-in (and now stored locally), False if it is not built-in.
    """
    builder = BUILTIN_DATASETS.get(dataset_id)
    if builder is None:
        return False
    if is_local(dataset_id):
        return True
    publish_dataset(dataset_id, lambda: builder(dataset_id), lost_race_ok=True)
    return True


def available_datasets() -> list[str]:
    """Ids of the datasets in the local Minari root (none, and nothing created, without one)."""
    if not minari_root().is_dir():
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Minari warns about every misconfigured folder
        return sorted(minari.list_local_datasets())


def _not_found(dataset_id: str, reason: str, *, malformed: bool = False) -> DatasetError:
    local = available_datasets()

    candidates = sorted(set(local) | set(BUILTIN_DATASETS))
    close = difflib.get_close_matches(dataset_id, candidates, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listed = ", ".join(local) if local else "none"
    fix = "give the exact id, or point MINARI_DATASETS_PATH at the folder holding it"
    if malformed:
        fix = "give the exact id, in Minari's namespace/name-v<version> form"
    else:
        fix += f", or fetch it with `minari download {dataset_id}`"
    return DatasetError(
        f"dataset {dataset_id!r} not found: {reason}.{hint} Local datasets in {minari_root()}: "
        f"{listed}; built-in: {', '.join(BUILTIN_DATASETS)}. Fix: {fix}."
    )


def open_dataset(dataset_id: str, *, download: bool) -> minari.MinariDataset:
    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):
        raise _not_found(dataset_id, "the id is malformed", malformed=True) from None
    if not is_local(dataset_id) and not ensure_builtin(dataset_id):
        if not download:
            raise _not_found(dataset_id, "it is not in the local Minari root (download=False)")
        with _root_removed_if_left_empty():
            return _download(dataset_id)
    try:
        return minari.load_dataset(dataset_id)
    except Exception as exc:
        raise DatasetError(
            f"dataset {dataset_id!r} exists in {minari_root()} but cannot be read "
            f"({type(exc).__name__}: {exc}); delete it (minari delete {dataset_id}) and write or "
            "download it again"
        ) from exc


@contextlib.contextmanager
def _root_removed_if_left_empty() -> Iterator[None]:
    """Minari creates the local root before it downloads: a download that fails leaves nothing
    behind (the root is removed again if it was absent before and is still empty)."""
    root = minari_root().absolute()
    missing = [p for p in (root, *root.parents) if not p.exists()]  # what Minari would create
    try:
        yield
    except BaseException:
        for folder in missing:  # deepest first, each only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _download(dataset_id: str) -> minari.MinariDataset:
    try:
        return minari.load_dataset(dataset_id, download=True)
    except ImportError as exc:  # minari's remote client needs huggingface_hub
        reason = (
            "it is not local, and downloading it needs minari's Hugging Face client "
            f"({exc.name or 'huggingface_hub'} is missing: {install_hint('download')}, or "
            "set dataset.download=false to use local datasets only)"
        )
        raise _not_found(dataset_id, reason) from None
    except Exception as exc:  # no network, unknown remote id, ...
        reason = f"not local and the download failed ({type(exc).__name__}: {exc})"
        raise _not_found(dataset_id, reason) from exc
