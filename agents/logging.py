"""Metrics logging: ``metrics.csv`` always, TensorBoard or W&B through TorchRL's loggers."""

from __future__ import annotations

import csv
import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from divo.errors import ConfigError

BACKENDS = ("csv", "tensorboard", "wandb")


def check_backend(backend: str) -> None:
    """Refuse an unknown logger backend, or one whose package is missing, before a run writes
    anything (one-line ConfigError naming the fix)."""
    if backend not in BACKENDS:
        raise ConfigError(f"logger.backend={backend!r} is unknown; choose one of {BACKENDS}")
    if backend != "csv" and importlib.util.find_spec(backend) is None:
        raise ConfigError(
            f"logger.backend={backend} needs the {backend} package, which is not installed; "
            f"pip install 'divo[{backend}]' or use logger.backend=csv"
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
            with self.path.open() as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self._rows = [dict(r) for r in reader if int(r["step"]) <= resume_step]
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
            f"logger.backend={backend} needs its package ({exc}); pip install 'divo[{extra}]' "
            "or use logger.backend=csv"
        ) from None
