"""Files divo writes and reads: atomic writes, and loading as plain data only.

Files divo writes hold plain data only (tensors, numbers, strings, None, lists, tuples, dicts):
:func:`load_file` reads them with ``torch.load(weights_only=True)``, which never unpickles an
object, so opening a file from elsewhere cannot run code through pickle. A reader never sees a
half-written file (:func:`atomic_save`). This module sits below everything that writes files
(the trainer, the dataset factory), so that none of them imports another for it.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from divo.errors import CheckpointError, UntrustedFileError, first_line


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A reader never sees a half-written file: it sees the old one or the new one. ``obj`` must be
    plain data (what :func:`load_file` reads back); anything else is refused before writing.
    """
    path = Path(path)
    blob = io.BytesIO()
    torch.save(obj, blob)
    blocked = _unloadable(blob)
    if blocked is not None:
        raise CheckpointError(
            f"cannot write {path}: it would hold a pickled {blocked}, which divo does not load "
            "back; state_dicts (and a plug-in's get_extra_state) must hold tensors, numbers, "
            "strings, lists and dicts only"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _blocked_global(exc: Exception) -> str | None:
    """The global (``module.name``) a ``weights_only`` load refused, if that is why it failed."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return found.group(1) if found else None


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint or policy file written by divo as plain data, never unpickling an object.

    A file that holds a pickled object (code to run on loading, or a file of an older divo)
    raises :class:`UntrustedFileError`; a damaged one :class:`CheckpointError`; both one line.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; pass a run directory or a .pt file it holds"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user problem
        blocked = _blocked_global(exc)
        if blocked is not None:
            raise UntrustedFileError(
                f"{path} holds a pickled Python object ({blocked}), which divo never loads: "
                "unpickling it could run any code; if the file is from an older divo and you "
                f"trust it, convert it with `divo convert {path}`"
            ) from None
        raise CheckpointError(
            f"cannot read {path} ({type(exc).__name__}: {first_line(exc)}); the file is "
            "damaged or not a divo checkpoint"
        ) from None


def load_trusted_file(path: str | os.PathLike) -> Any:
    """``torch.load`` WITHOUT the plain-data restriction: it runs whatever the file's pickle
    says. Only for ``divo convert``, on files the user vouches for."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - same user problem whatever the failure
        raise CheckpointError(
            f"cannot read {path} ({type(exc).__name__}: {first_line(exc)}); the file is "
            "damaged or not a divo file"
        ) from None


def _unloadable(blob: io.BytesIO) -> str | None:
    """None when the saved bytes load as plain data; else the global (or error) refused."""
    blob.seek(0)
    try:
        torch.load(blob, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the refusal is the answer
        return _blocked_global(exc) or f"{type(exc).__name__}: {first_line(exc)}"
    return None
