"""Metrics logging: ``metrics.csv`` always, TensorBoard or W&B through TorchRL's loggers."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import logging
import math
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from divo.errors import ConfigError, install_hint
from divo.files import RunLock

BACKENDS = ("csv", "tensorboard", "wandb")


def check_backend(backend: str) -> None:
    """Refuse an unknown logger backend, or one whose package is missing, before a run writes
    anything (one-line ConfigError naming the fix)."""
    if backend not in BACKENDS:
        raise ConfigError(f"logger.backend={backend!r} is unknown; choose one of {BACKENDS}")
    if backend != "csv" and importlib.util.find_spec(backend) is None:
        raise ConfigError(
            f"logger.backend={backend} needs the {backend} package, which is not installed; "
            f"{install_hint(backend)} or use logger.backend=csv"
        )


class MetricAccumulator:
    """Running sums of per-step metrics, kept on the device: no host sync until :meth:`mean`."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, metrics: Mapping[str, torch.Tensor]) -> None:
        sums, values = [], []
        for name, value in metrics.items():
            value = value.detach().float()
            if name in self._sums:
                sums.append(self._sums[name])
                values.append(value)
                self._counts[name] += 1
            else:
                self._sums[name] = value.clone()
                self._counts[name] = 1
        if sums:  # one fused launch for every metric, not one per metric
            torch._foreach_add_(sums, values)

    def state_dict(self) -> dict:
        return {
            "sums": {k: v.detach().cpu() for k, v in self._sums.items()},
            "counts": dict(self._counts),
        }

    def load_state_dict(self, state: Mapping, device: torch.device | str = "cpu") -> None:
        self._sums = {k: v.to(device) for k, v in state.get("sums", {}).items()}
        self._counts = dict(state.get("counts", {}))

    def mean(self) -> dict[str, float]:
        """Means since the last call (one device -> host transfer), then reset."""
        if not self._sums:
            return {}
        names = list(self._sums)
        values = torch.stack([self._sums[n] for n in names]).cpu().tolist()
        out = {n: v / self._counts[n] for n, v in zip(names, values, strict=True)}
        self._sums.clear()
        self._counts.clear()
        return out


class MetricsLogger:
    """Writes rows of ``{step, metric...}`` to ``<run>/metrics.csv`` and an optional backend.

    The CSV's columns grow when a new metric appears (the file is rewritten once, atomically
    enough for a log); rows missing a metric leave its cell empty.
    """

    def __init__(
        self,
        run_dir: str | Path,
        backend: str = "csv",
        project: str = "divo",
        name: str = "run",
        resume_step: int | None = None,
    ) -> None:
        check_backend(backend)
        self.path = Path(run_dir) / "metrics.csv"
        self.columns: list[str] = ["step"]
        self._rows: list[dict[str, float]] = []
        if self.path.exists() and resume_step is not None:
            # continuing a run: keep the rows up to the checkpoint, drop those logged after it
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                rows = [dict(r) for r in reader]
            self._rows = _rows_up_to(rows, resume_step, self.path)
            self._rewrite()
        elif self.path.exists():
            self.path.unlink()  # a fresh run in a used folder starts a fresh log
        self._external = None
        if backend != "csv":
            self._external = _torchrl_logger(backend, Path(run_dir), project, name)

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self._rows)
        tmp.replace(self.path)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        new = [k for k in row if k not in self.columns]
        self._rows.append(row)
        if new or not self.path.exists():
            self.columns += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)
        if self._external is not None:
            for k, v in metrics.items():
                if v is not None and isinstance(v, float | int) and math.isfinite(v):
                    self._external.log_scalar(k, float(v), step=step)


def _rows_up_to(rows: list[dict], resume_step: int, path: Path) -> list[dict]:
    """The rows of a resumed run's metrics.csv logged up to its checkpoint. A row that is not
    whole (a write cut short: missing or extra cells, a step or value that is not a number, a
    step out of order) ends what is kept, with a warning: the run logs those steps again."""
    kept: list[dict] = []
    for row in rows:
        try:
            step = int(row["step"])
            whole = None not in row and all(
                v == "" or float(v) is not None for v in row.values()
            )  # float() raises on a cut cell; None: a short row (missing cells) or extra ones
        except (TypeError, ValueError):
            whole = False
        if not whole or (kept and step <= int(kept[-1]["step"])):
            dropped = len(rows) - len(kept)
            warnings.warn(
                f"{path}: {dropped} row(s) from row {len(kept) + 1} on are damaged (a write "
                "cut short, or edited) and were dropped; the resumed run logs its steps again",
                stacklevel=4,
            )
            break
        if step > resume_step:
            break
        kept.append(row)
    return kept


def _torchrl_logger(backend: str, run_dir: Path, project: str, name: str):
    from torchrl.record.loggers import get_logger

    try:
        if backend == "wandb":
            return get_logger(
                "wandb", logger_name=str(run_dir), experiment_name=name, project=project
            )
        return get_logger(
            "tensorboard", logger_name=str(run_dir / "tensorboard"), experiment_name=name
        )
    except ImportError as exc:
        extra = "tensorboard" if backend == "tensorboard" else "wandb"
        raise ConfigError(
            f"logger.backend={backend} needs its package ({exc}); {install_hint(extra)} or use "
            "logger.backend=csv"
        ) from None


LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job-log format


def _handlers_of(logger: logging.Logger) -> list[logging.Handler]:
    """Every handler a record of ``logger`` reaches (its own and its ancestors')."""
    found: list[logging.Handler] = []
    node: logging.Logger | None = logger
    while node is not None:
        found += node.handlers
        node = node.parent if node.propagate else None
    return found


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return not isinstance(handler, logging.FileHandler) and stream in consoles


def file_handler_for(path: str | Path, logger: logging.Logger) -> logging.FileHandler | None:
    """The file handler a record of ``logger`` reaches that writes ``path`` (e.g. Hydra's job
    log of the run), if any."""
    target = Path(path).resolve()
    return next(
        (
            h
            for h in _handlers_of(logger)
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve() == target
        ),
        None,
    )


def log_size(path: str | Path) -> int | None:
    """The size of a log file in bytes (None: there is none); every line written through a
    logging handler is flushed, so this is where the next line goes."""
    try:
        return Path(path).stat().st_size
    except FileNotFoundError:
        return None


def drop_interrupted_lines(path: str | Path, offset: int | None, own_start: int | None) -> int:
    """Take out of the log at ``path`` what an interrupted run wrote after the checkpoint a
    resume starts from: the bytes from ``offset`` (the log's size when that checkpoint was
    saved) to ``own_start`` (its size when this process began; the lines this process wrote
    since stay). Returns the number of lines taken out (0 when the log does not go past
    ``offset``, e.g. a checkpoint of an older divo, which records none)."""
    path = Path(path)
    if offset is None or own_start is None or not path.is_file() or offset >= own_start:
        return 0
    with path.open("r+b") as f:
        if offset > 0:  # a line ends there, unless the log was edited since: then keep it all
            f.seek(offset - 1)
            if f.read(1) != b"\n":
                return 0
        dropped = f.read(own_start - offset)
        tail = f.read()
        f.seek(offset)
        f.write(tail)
        f.truncate()
    return dropped.count(b"\n")


def error_record(exc: BaseException, logger: str = "divo.train") -> logging.LogRecord:
    """The train.log line of an error that ends a run: ``error: <its one-line message>``."""
    from divo.errors import DivoError, first_line

    if isinstance(exc, DivoError):
        text = f"error: {exc}"
    elif isinstance(exc, KeyboardInterrupt):
        text = "interrupted (KeyboardInterrupt); resume with `divo train <run dir>`"
    else:
        text = f"error: {type(exc).__name__}: {first_line(exc)}"
    return logging.LogRecord(logger, logging.ERROR, __file__, 0, text, None, None)


def mark_after_start(exc: BaseException) -> None:
    """Mark an error raised after a run was accepted (it trained, its files are its own): the
    command line then leaves its folder as the run left it, where a refusal is undone."""
    with contextlib.suppress(AttributeError):
        exc.divo_after_start = True


def raised_after_start(exc: BaseException) -> bool:
    return bool(getattr(exc, "divo_after_start", False))


class RunLog:
    """A run's ``train.log`` and its console lines, the same with or without Hydra.

    Under ``divo train <recipe>`` Hydra's job logging already writes ``train.log`` and the
    console; a resume (``divo train <run dir>``) and the Python API have neither, so this adds
    what is missing: a console handler (when no handler prints to the console) and a file
    handler appending to ``<run>/train.log``. Lines logged before :meth:`commit` are held in
    memory and written only once the run is accepted, so that a refused run (or a refused
    resume) changes nothing on disk. divo's warnings during the run go to ``train.log`` as well
    (the console shows them as usual), and so does an error that ends an accepted run.

    ``lock=True``: the run directory is held for this process (:class:`divo.files.RunLock`)
    from the start (from :meth:`commit` when it does not exist yet); a directory another
    process holds is refused (:class:`divo.errors.RunInUseError`) before anything is logged.
    """

    def __init__(self, run_dir: str | Path, logger: str = "divo", *, lock: bool = False) -> None:
        self.path = Path(run_dir) / "train.log"
        self.logger = logging.getLogger(logger)
        self._added: list[logging.Handler] = []
        self._pending: list[logging.LogRecord] | None = None
        self._file: logging.Handler | None = None
        self._lock = RunLock(run_dir) if lock else None
        self.committed = False
        self._start: int | None = None

    def __enter__(self) -> RunLog:
        if self._lock is not None:
            self._lock.acquire()  # refused here: nothing was logged or written
        self._start = log_size(self.path)  # where this process's lines begin
        reached = _handlers_of(self.logger)
        self._file = file_handler_for(self.path, self.logger)
        if self._file is None:  # no Hydra job log for this run: hold lines until commit()
            self._pending = []
            self._add(_ListHandler(self._pending))
        if not any(_is_console(h) for h in reached):
            console = logging.StreamHandler(sys.stdout)
            console.setFormatter(logging.Formatter(LOG_FORMAT))
            self._add(console)
        self._level = self.logger.level
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._show_warning
        return self

    def _add(self, handler: logging.Handler) -> None:
        handler.setLevel(logging.INFO)
        self.logger.addHandler(handler)
        self._added.append(handler)

    def _show_warning(self, message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        self._showwarning(message, category, filename, lineno, file, line)
        record = logging.LogRecord(
            "py.warnings", logging.WARNING, filename, lineno, str(message), None, None
        )
        if self._pending is not None:
            self._pending.append(record)
        elif self._file is not None:
            self._file.handle(record)

    def size(self) -> int | None:
        """train.log's size now (for a checkpoint: where a resume from it cuts the log)."""
        return log_size(self.path)

    def commit(self, resume_offset: int | None = None) -> int:
        """The run is accepted: write the held lines to ``train.log`` and append from now on.
        ``resume_offset``: train.log's size when the checkpoint this run resumes from was saved;
        the lines an interrupted run logged after it are taken out (:func:`drop_interrupted_lines`),
        so that the log reads like an uninterrupted run's. Returns how many lines were taken out.
        """
        if self._lock is not None:
            self._lock.acquire(create=True)  # a run directory made now: hold it from here on
            self._lock.commit()
        self.committed = True
        dropped = drop_interrupted_lines(self.path, resume_offset, self._start)
        if self._pending is None:
            return dropped
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        for record in self._pending:
            handler.handle(record)
        buffer = next(h for h in self._added if isinstance(h, _ListHandler))
        self.logger.removeHandler(buffer)
        self._added.remove(buffer)
        self._add(handler)
        self._file, self._pending = handler, None
        return dropped

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc is not None and self.committed:
            mark_after_start(exc)
        try:
            if exc is not None and self.committed and self._file is not None:
                self._file.handle(error_record(exc))  # the console gets it from the caller
        finally:
            warnings.showwarning = self._showwarning
            for handler in self._added:
                self.logger.removeHandler(handler)
                handler.close()
            self.logger.setLevel(self._level)
            if self._lock is not None:
                self._lock.release()


class _ListHandler(logging.Handler):
    """Keeps records in a list (lines of a run not yet accepted)."""

    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
