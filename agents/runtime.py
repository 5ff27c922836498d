"""Run-time plumbing: device choice, seeding, atomic checkpoint files.

Files divo writes hold plain data only (tensors, numbers, strings, None, lists, tuples, dicts):
:func:`load_file` reads them with ``torch.load(weights_only=True)``, which never unpickles an
object, so opening a file from elsewhere cannot run code through pickle.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import random
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from divo.errors import CheckpointError, ConfigError, UntrustedFileError, first_line


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(
            f"device={name!r} is not a device name ({exc}); use auto, cpu or cuda"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=auto or cpu")
    return device


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one) and its
    core count, for result files and benchmark reports."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def numpy_rng_state(state: tuple) -> dict[str, Any]:
    """``np.random.get_state()``'s tuple as plain data (its key array as an int64 tensor)."""
    kind, keys, pos, has_gauss, cached_gaussian = state
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def rng_state() -> dict[str, Any]:
    """All global RNG states as plain data (tensors, numbers, tuples), for exact resumption."""
    state = {
        "python": random.getstate(),  # (version, tuple of ints, float | None)
        "numpy": numpy_rng_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def separate_rng() -> Iterator[None]:
    """Run a block on the global RNGs and put them back afterwards: what the block draws (an
    evaluation's sampling policy, say) leaves the training stream exactly where it was, so a run
    with more or fewer evaluations trains on the same random numbers."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


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
