"""Files divo writes and reads: atomic writes, checksums, loading as plain data only, and the
lock that keeps a run directory to one process.

Files divo writes hold plain data only (tensors, numbers, strings, None, lists, tuples, dicts):
:func:`load_file` reads them with ``torch.load(weights_only=True)``, which never unpickles an
object, so opening a file from elsewhere cannot run code through pickle. A reader never sees a
half-written file (:func:`atomic_save`), and a file saved with ``checksum=True`` carries the
SHA-256 of its contents (:func:`content_sha256`), checked each time it is read, so damage to
the bytes it is made of is refused instead of used. This module sits below everything that
writes files (the trainer, the dataset factory), so that none of them imports another for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import socket
import struct
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from divo.errors import CheckpointError, RunInUseError, UntrustedFileError, first_line

# The key of a checksummed file's dictionary that holds the SHA-256 of everything else in it.
CHECKSUM_KEY = "sha256"

# What an older divo legitimately pickled beyond plain data, and nothing else: divo-checkpoint-v1
# kept NumPy's global RNG state as ``np.random.get_state()``, a tuple holding a uint32 ndarray,
# which pickles through these globals (``numpy.core`` under NumPy 1, ``numpy._core`` under 2).
# ``divo convert`` reads files with these allowed besides torch's plain data, so that it can
# rewrite such a file without unpickling anything else; no other load allows them.
LEGACY_GLOBALS = (
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
)
# The formats of those files, which ``divo convert`` rewrites as plain data
CONVERTIBLE_FORMATS = ("divo-checkpoint-v1",)


def _legacy_safe_globals() -> list:
    """:data:`LEGACY_GLOBALS` as torch's ``safe_globals`` takes them (object, pickled name),
    plus the class of a uint32 dtype, which the ndarray's state builds (not a global of the
    pickle: it is never called, only given its state)."""
    import numpy as np

    reconstruct = np.ndarray.__reduce__(np.zeros(1, dtype=np.uint32))[0]
    return [
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
        type(np.dtype(np.uint32)),
    ]


# ------------------------------------------------------------------------------- checksums
def content_sha256(obj: Any) -> str:
    """The SHA-256 of plain data, over what loading it gives: every tensor's dtype, shape and
    bytes, every number, string and container (dict keys in their order), so that a file's
    checksum covers exactly the values divo uses, wherever in the file they are stored."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest, obj: Any) -> None:  # noqa: ANN001 - a hashlib object
    def tag(kind: bytes, data: bytes | memoryview = b"") -> None:
        digest.update(kind + struct.pack("<Q", len(data)))
        digest.update(data)

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous().reshape(-1)
        tag(b"T", f"{t.dtype}{tuple(obj.shape)}".encode())
        tag(b"B", memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    elif isinstance(obj, Mapping):
        tag(b"D", str(len(obj)).encode())
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, list | tuple):
        tag(b"L" if isinstance(obj, list) else b"U", f"{type(obj).__name__}{len(obj)}".encode())
        for item in obj:
            _feed(digest, item)
    elif obj is None or isinstance(obj, bool):
        tag(b"N", repr(obj).encode())
    elif isinstance(obj, int):
        tag(b"I", str(obj).encode())
    elif isinstance(obj, float):
        tag(b"F", obj.hex().encode())
    elif isinstance(obj, str):
        tag(b"S", obj.encode("utf-8", "surrogatepass"))
    elif isinstance(obj, bytes | bytearray):
        tag(b"Y", bytes(obj))
    else:  # torch.dtype, torch.device, complex ...: plain values with an exact repr
        tag(b"O", f"{type(obj).__module__}.{type(obj).__qualname__}:{obj!r}".encode())


def damaged_file_error(path: Path, why: str) -> CheckpointError:
    """The one-line refusal of a file whose contents are not what was saved."""
    return CheckpointError(f"{path} is damaged: {why}; use an intact copy of it")


def _checked(payload: Any, path: Path) -> tuple[Any, bool]:
    """``payload`` without its checksum, and whether it had one; a mismatch is refused."""
    if not isinstance(payload, dict) or CHECKSUM_KEY not in payload:
        return payload, False
    stored = payload[CHECKSUM_KEY]
    rest = {k: v for k, v in payload.items() if k != CHECKSUM_KEY}
    if not isinstance(stored, str) or content_sha256(rest) != stored:
        raise damaged_file_error(
            path, "its contents do not match the SHA-256 checksum saved with them"
        )
    return rest, True


# ----------------------------------------------------------------------------- writing
def atomic_save(obj: Any, path: str | os.PathLike, *, checksum: bool = False) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A reader never sees a half-written file: it sees the old one or the new one. ``obj`` must be
    plain data (what :func:`load_file` reads back); anything else is refused before writing.
    ``checksum=True`` (``obj`` a dict): the file also holds the SHA-256 of ``obj``'s contents
    under :data:`CHECKSUM_KEY`, checked by every read; it is checked here on the bytes written.
    """
    path = Path(path)
    if checksum:
        if not isinstance(obj, dict):
            raise TypeError(f"a checksummed file holds a dict, not {type(obj).__name__}")
        obj = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
        obj[CHECKSUM_KEY] = content_sha256(obj)
    blob = io.BytesIO()
    torch.save(obj, blob)
    loaded, blocked = _load_back(blob)
    if blocked is not None:
        raise CheckpointError(
            f"cannot write {path}: it would hold a pickled {blocked}, which divo does not load "
            "back; state_dicts (and a plug-in's get_extra_state) must hold tensors, numbers, "
            "strings, lists and dicts only"
        )
    if checksum:  # what a reader will check: the values as they load back
        _checked(loaded, path)
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


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for a moment
    under every thread); 0o022 where /proc does not say."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def write_json_atomic(path: Path, obj: Any, indent: int | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename: a reader (or a
    study resumed after a crash) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=indent) + "\n")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what a plain write would give
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_back(blob: io.BytesIO) -> tuple[Any, str | None]:
    """The saved bytes loaded as plain data, or the global (or error) that was refused."""
    blob.seek(0)
    try:
        return torch.load(blob, map_location="cpu", weights_only=True), None
    except Exception as exc:  # noqa: BLE001 - the refusal is the answer
        return None, _blocked_global(exc) or f"{type(exc).__name__}: {first_line(exc)}"


# ----------------------------------------------------------------------------- reading
def _blocked_global(exc: Exception) -> str | None:
    """The global (``module.name``) a ``weights_only`` load refused, if that is why it failed."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if found:
        return found.group(1)
    found = re.search(r"(?:got|build) <class '([\w.]+)'>", str(exc))
    return found.group(1) if found else None


def _convertible_format(path: Path) -> str | None:
    """The format of an older divo's file that ``divo convert`` rewrites, if ``path`` is one:
    every global its pickle names is one of :data:`LEGACY_GLOBALS` and its format is one of
    :data:`CONVERTIBLE_FORMATS`. Reads the file as data only (nothing in it runs)."""
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint, or an older torch: no offer
        return None
    if not unsafe <= set(LEGACY_GLOBALS):
        return None
    try:
        payload = _torch_load(path, "cpu", legacy=True)
    except Exception:  # noqa: BLE001 - damaged, or holds what convert does not read either
        return None
    found = payload.get("format") if isinstance(payload, dict) else None
    return found if found in CONVERTIBLE_FORMATS else None


def _torch_load(path: Path, map_location, legacy: bool) -> Any:  # noqa: ANN001
    if not legacy:
        return torch.load(path, map_location=map_location, weights_only=True)
    with torch.serialization.safe_globals(_legacy_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def read_file(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    legacy: bool = False,
) -> tuple[Any, bool]:
    """:func:`load_file`, and whether the file carried a checksum (checked: a mismatch raises)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; pass a run directory or a .pt file it holds"
        )
    try:
        payload = _torch_load(path, map_location, legacy)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user problem
        blocked = _blocked_global(exc)
        if blocked is not None:
            found = None if legacy else _convertible_format(path)
            if found is not None:
                raise UntrustedFileError(
                    f"{path} is a {found} file of an older divo, which held NumPy's RNG state "
                    f"as a pickled array; convert it with `divo convert {path}` (which reads "
                    "it as data: nothing in it runs)"
                ) from None
            raise UntrustedFileError(
                f"{path} holds a pickled Python object ({blocked}), which divo never loads: "
                "unpickling it could run any code, and no divo version writes one; the file "
                "was edited or is not from divo: use a copy that divo saved"
            ) from None
        raise CheckpointError(
            f"cannot read {path} ({type(exc).__name__}: {first_line(exc)}); the file is "
            "damaged or not a divo checkpoint"
        ) from None
    return _checked(payload, path)


def load_file(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    legacy: bool = False,
) -> Any:
    """Load a checkpoint or policy file written by divo as plain data, never unpickling an object.

    A file that holds a pickled object (code to run on loading, or a file of an older divo)
    raises :class:`UntrustedFileError`; a damaged one :class:`CheckpointError`, also when its
    contents do not match the checksum saved with them (which is not returned); both one line.
    ``legacy=True`` (``divo convert`` only) also allows :data:`LEGACY_GLOBALS`, the NumPy array
    an older divo pickled, and nothing else.
    """
    return read_file(path, map_location, legacy=legacy)[0]


# ------------------------------------------------------------------------------ run lock
class RunLock:
    """Keeps run directories to one process: an exclusive ``fcntl.flock`` on ``<run>/.lock``,
    which holds the holder's pid, host and start time for the message a second process gets.

    :meth:`acquire` locks the folders that exist (``create=True``: makes them first); a folder
    held by another process is refused with :class:`RunInUseError`, naming the holder, with
    nothing changed on disk. The operating system releases a lock when its process ends, even
    by SIGKILL, so a lock file left behind by a crash is stale by construction and the next run
    simply takes it. :meth:`release` removes the lock file; a run refused before
    :meth:`commit` instead puts back what was there (a file of a crashed run, or none).
    """

    NAME = ".lock"

    def __init__(self, *run_dirs: str | os.PathLike) -> None:
        self.paths = [Path(d) / self.NAME for d in run_dirs]
        self._held: dict[Path, tuple[int, bytes | None]] = {}
        self._committed = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:  # noqa: ANN002
        self.release()

    def acquire(self, *, create: bool = False) -> None:
        try:
            for path in self.paths:
                if path in self._held:
                    continue
                if not path.parent.is_dir():
                    if not create:
                        continue
                    path.parent.mkdir(parents=True, exist_ok=True)
                self._lock(path)
        except BaseException:
            self.release()
            raise

    def commit(self) -> None:
        """The run is accepted and writes its files: :meth:`release` then removes the lock
        files whatever they held before."""
        self._committed = True

    def _lock(self, path: Path) -> None:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: runs are not kept apart
            return
        while True:
            existed = path.is_file()
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_all(fd)
                os.close(fd)
                raise RunInUseError(
                    f"{path.parent} is in use by another divo process ({_holder(holder)}); "
                    "wait for it to end or stop it, or use another run directory (nothing "
                    "was changed)"
                ) from None
            try:  # a holder that just ended removed the file we opened: lock the new one
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = _read_all(fd) if existed else None
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            _rewrite(fd, (json.dumps(info) + "\n").encode())
            self._held[path] = (fd, old)
            return

    def release(self) -> None:
        for path, (fd, old) in self._held.items():
            try:
                if self._committed or old is None:
                    path.unlink(missing_ok=True)  # before unlocking: nobody locks a dead file
                else:
                    _rewrite(fd, old)
            except OSError:
                pass
            finally:
                os.close(fd)
        self._held.clear()


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _rewrite(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _holder(text: bytes) -> str:
    """The lock holder as a message names it: pid, host and since when."""
    with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
        info = json.loads(text.decode())
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    return "pid unknown: it has just started"
