"""Checks and adaptations of training batches, for replay buffers a user hands over.

The trainer samples TED batches (``observation``, ``action``, ``("next", ...)``); a user's
TorchRL buffer may store flags as ``[B]`` rather than ``[B, 1]``, hold NaN, or lack a key: each
is found here once, before training starts.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from tensordict import TensorDictBase

from divo.errors import ConfigError, DatasetError

# Added to the state standard deviation before dividing (TD3+BC's eps; method.md).
OBS_STD_EPS = 1e-3

# The keys one training batch must carry (TED layout).
REQUIRED_BATCH_KEYS: tuple[str | tuple[str, ...], ...] = (
    "observation",
    "action",
    ("next", "observation"),
    ("next", "reward"),
    ("next", "terminated"),
)


def check_batch_keys(td: TensorDictBase) -> None:
    """Raise a one-line DatasetError if a (replay-buffer) batch lacks the TED keys training needs.

    Required: ``observation``, ``action``, ``("next", "observation")``, ``("next", "reward")``,
    ``("next", "terminated")``.
    """
    present = set(td.keys(include_nested=True))
    missing = [key for key in REQUIRED_BATCH_KEYS if key not in present]
    if missing:
        names = ", ".join(key if isinstance(key, str) else "/".join(key) for key in missing)
        raise DatasetError(
            f"replay-buffer samples lack the TED key(s) {names}; divo needs observation, "
            "action, next/observation, next/reward and next/terminated (TorchRL's TED layout, "
            "as written by torchrl.data.datasets loaders or load_offline_data)"
        )
    if td.batch_dims != 1:
        raise DatasetError(
            f"replay-buffer samples have batch size {tuple(td.batch_size)}; divo trains on "
            "a flat batch of transitions [B]: flatten the stored data (e.g. td.reshape(-1))"
        )
    (size,) = td.batch_size
    obs, action = td["observation"], td["action"]
    for name, value, letter in (("observation", obs, "O"), ("action", action, "A")):
        if value.dim() != 2:
            raise DatasetError(
                f"replay-buffer samples hold {name} of shape {tuple(value.shape)} in a batch of "
                f"{size}; divo needs [B, {letter}] (one number per transition as [B, 1]; "
                "images or sequences flattened to one vector): reshape the stored data"
            )
    expected = {
        "observation": (size, obs.shape[-1]),
        "next/observation": (size, obs.shape[-1]),
        "action": (size, action.shape[-1]),
        "next/reward": (size, 1),
        "next/terminated": (size, 1),
    }
    for name, shape in expected.items():
        got = tuple(td[tuple(name.split("/"))].shape)
        if got != shape:
            raise DatasetError(
                f"replay-buffer samples hold {name} of shape {got} in a batch of {size}; "
                f"divo needs {shape} (TorchRL's TED shapes: [B, O], [B, A], and [B, 1] for "
                "rewards and flags): reshape the stored data"
            )


TED_FLAG_KEYS = (
    ("next", "reward"),
    ("next", "terminated"),
    ("next", "truncated"),
    ("next", "done"),
)


def flat_flag_keys(td: TensorDictBase) -> tuple[tuple[str, str], ...]:
    """The rewards and flags a (replay-buffer) batch holds as ``[B]`` rather than TED's
    ``[B, 1]``; read once from a probe batch, then given to ``conform_batch`` at every step."""
    return tuple(
        key
        for key in TED_FLAG_KEYS
        if (value := td.get(key, None)) is not None and value.dim() == td.batch_dims
    )


# the entries training reads as float32 numbers (the flags are read as they are)
FLOAT_BATCH_KEYS = FINITE_BATCH_KEYS = (
    ("observation",),
    ("action",),
    ("next", "observation"),
    ("next", "reward"),
)


def other_dtype_keys(td: TensorDictBase) -> tuple[tuple[str, ...], ...]:
    """The entries of :data:`FLOAT_BATCH_KEYS` a (replay-buffer) batch holds in another dtype
    than float32 (float64 storage, integer rewards, ...); read once from a probe batch, then
    given to ``conform_batch`` at every step, which converts them as a dataset's are."""
    return tuple(
        key
        for key in FLOAT_BATCH_KEYS
        if (value := td.get(key, None)) is not None and value.dtype != torch.float32
    )


def conform_batch(
    td: TensorDictBase,
    keys: Iterable[tuple[str, str]],
    to_float: Iterable[tuple[str, ...]] = (),
) -> TensorDictBase:
    """Give the ``[B]`` entries ``keys`` (see ``flat_flag_keys``) TED's shape ``[B, 1]``, and
    the entries ``to_float`` (see ``other_dtype_keys``) float32, in place; returns ``td``.
    Other shapes are left for ``check_batch_keys`` to judge."""
    for key in keys:
        td.set(key, td.get(key).unsqueeze(-1))
    for key in to_float:
        td.set(key, td.get(key).to(torch.float32))
    return td


# rows of a replay buffer's storage read at a time by the whole-buffer checks below
READ_CHUNK = 262_144


def storage_chunks(buffer: Any, chunk: int = READ_CHUNK) -> Iterator[TensorDictBase]:
    """The rows a TorchRL replay buffer holds, ``chunk`` at a time, by index (raises whatever
    the storage raises when it cannot be read by index)."""
    n = len(buffer)
    for start in range(0, n, chunk):
        yield buffer[start : min(start + chunk, n)]


def buffer_observation_stats(
    buffer: Any, chunk: int = READ_CHUNK
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Mean and std (plus ``OBS_STD_EPS``, as for a dataset) of the observations a TorchRL
    replay buffer holds, read from its storage in chunks; None when its storage cannot be read
    by index (then there is nothing to normalise with)."""
    try:
        n = len(buffer)
        total = total_sq = None
        for rows in storage_chunks(buffer, chunk):
            obs = rows["observation"].detach()
            obs = obs.to("cpu", torch.float64).reshape(-1, obs.shape[-1])
            part, part_sq = obs.sum(0), (obs * obs).sum(0)
            total = part if total is None else total + part
            total_sq = part_sq if total_sq is None else total_sq + part_sq
    except Exception:  # noqa: BLE001 - any storage that cannot be read whole: no statistics
        return None
    if not n or total is None:
        return None
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(0.0).sqrt()
    return mean.float(), (std + OBS_STD_EPS).float()


def _non_finite_counts(td: TensorDictBase) -> dict[str, int]:
    counts = {}
    for key in FINITE_BATCH_KEYS:
        value = td.get(key, None)
        if value is not None and value.is_floating_point():
            counts["/".join(key)] = int((~torch.isfinite(value)).sum())
    return counts


def check_buffer_finite(buffer: Any, probe: TensorDictBase, chunk: int = READ_CHUNK) -> None:
    """Refuse a user's replay buffer holding NaN/inf in observations, actions or rewards, when
    it is handed over: every stored transition when its storage can be read by index (as for
    the observation statistics), else the probe batch ``probe`` sampled from it."""
    whole = True
    try:
        totals: dict[str, int] = {}
        for rows in storage_chunks(buffer, chunk):
            for name, count in _non_finite_counts(rows).items():
                totals[name] = totals.get(name, 0) + count
    except Exception:  # noqa: BLE001 - a storage that cannot be read whole: check the sample
        whole, totals = False, _non_finite_counts(probe)
    bad = {name: count for name, count in totals.items() if count}
    if bad:
        what = ", ".join(f"{count} in {name}" for name, count in bad.items())
        where = (
            "the replay buffer holds" if whole else "a batch sampled from the replay buffer holds"
        )
        raise DatasetError(
            f"{where} non-finite values (NaN/inf): {what}; clean the data (drop or repair the "
            "affected transitions) before extending the buffer"
        )


# what a training step reads from a batch: a user's buffer's fingerprint covers these
FINGERPRINT_BATCH_KEYS = (
    ("observation",),
    ("action",),
    ("next", "observation"),
    ("next", "reward"),
    ("next", "terminated"),
    ("next", "truncated"),
    ("next", "done"),
)


def buffer_fingerprint(buffer: Any, chunk: int = READ_CHUNK) -> str | None:
    """``sha256-buffer:<hex>`` over what a user's replay buffer stores for training (the keys of
    :data:`FINGERPRINT_BATCH_KEYS` it has, row by row in storage order, each chunk's name,
    dtype, shape and bytes): equal exactly when the stored transitions are. None when its
    storage cannot be read by index (then a resume cannot check it). Not comparable with a
    dataset's fingerprint (:func:`divo.data.load.data_fingerprint`), which hashes the source's
    arrays before any conversion."""
    digest = hashlib.sha256()
    try:
        rows_seen = 0
        for rows in storage_chunks(buffer, chunk):
            for key in FINGERPRINT_BATCH_KEYS:
                value = rows.get(key, None)
                if value is None:
                    continue
                array = value.detach().to("cpu").contiguous()
                digest.update(f"{'/'.join(key)}|{array.dtype}|{tuple(array.shape)}|".encode())
                digest.update(array.view(torch.uint8).numpy() if array.numel() else b"")
            rows_seen += rows.batch_size[0] if rows.batch_dims else 0
    except Exception:  # noqa: BLE001 - any storage that cannot be read whole: not fingerprinted
        return None
    return f"sha256-buffer:{digest.hexdigest()}" if rows_seen else None


# actions within this of a bound count as on it (float32 storage of a bound value)
ACTION_TOLERANCE = 1e-4


def buffer_action_range(
    buffer: Any, probe: TensorDictBase, chunk: int = READ_CHUNK
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per-dimension (min, max) of the actions a replay buffer holds, read from its storage in
    chunks, and whether the whole buffer was read (else: the probe batch only)."""
    try:
        low = high = None
        for rows in storage_chunks(buffer, chunk):
            act = rows["action"].detach()
            act = act.to("cpu", torch.float32).reshape(-1, act.shape[-1])
            low = act.amin(0) if low is None else torch.minimum(low, act.amin(0))
            high = act.amax(0) if high is None else torch.maximum(high, act.amax(0))
        if low is not None:
            return low, high, True
    except Exception:  # noqa: BLE001 - a storage that cannot be read whole: the probe
        pass
    act = probe["action"].detach().to("cpu", torch.float32).reshape(-1, probe["action"].shape[-1])
    return act.amin(0), act.amax(0), False


def buffer_sampler(buffer: Any, batch_size: int) -> Callable[[], TensorDictBase]:
    """How training draws a batch of ``batch_size`` (``train.batch_size``) from a user's replay
    buffer: the buffer's own ``sample()`` when it was built with that batch size, ``sample(
    batch_size)`` when it was built with none. A buffer built with another batch size is
    refused: its batches would silently replace the recipe's (and the run's config.yaml would
    record a batch size its updates never used)."""
    own = getattr(buffer, "batch_size", None)
    if own is None:
        return functools.partial(buffer.sample, batch_size)
    if int(own) != int(batch_size):
        raise ConfigError(
            f"the replay buffer samples batches of {own} but train.batch_size is {batch_size}: "
            f"build the buffer with batch_size={batch_size} (or with none), or set "
            f"train.batch_size={own}"
        )
    return buffer.sample


def check_buffer_without_dataset(
    buffer: Any, probe: TensorDictBase, action_range: tuple | None = None
) -> None:
    """A user's buffer trained on with ``dataset.id=null``: no action space to rescale by, and
    divo's policies act in [-1, 1], so actions outside it are refused (clipped, a policy could
    never reach the data's range, and nothing would say so). ``action_range``: what
    :func:`buffer_action_range` returned, when the caller has it already."""
    low, high, whole = action_range or buffer_action_range(buffer, probe)
    if bool((low >= -1 - ACTION_TOLERANCE).all() and (high <= 1 + ACTION_TOLERANCE).all()):
        return
    where = "the replay buffer holds" if whole else "a batch sampled from the replay buffer has"
    raise DatasetError(
        f"{where} actions in [{low.min().item():.4g}, {high.max().item():.4g}], outside the "
        "[-1, 1] divo's policies act in, and dataset.id is null (no action space to rescale "
        "them by): rescale them onto [-1, 1] (and evaluate through gymnasium's "
        "RescaleAction(-1, 1)), or give the dataset.id they come from"
    )


def check_buffer_not_constant(
    buffer: Any, probe: TensorDictBase, action_range: tuple | None = None
) -> None:
    """Refuse a user's buffer whose every action is the same value (an all-zero buffer, e.g.
    one a dataset loader failed to fill): there is nothing to learn from, and training on it
    would report a score. ``action_range``: as for :func:`check_buffer_without_dataset`."""
    low, high, whole = action_range or buffer_action_range(buffer, probe)
    if whole and bool((high - low == 0).all()) and len(buffer) > 1:
        value = ", ".join(f"{v:.4g}" for v in low.tolist()[:4])
        raise DatasetError(
            f"every action in the replay buffer ({len(buffer)} transitions) is the same "
            f"([{value}{', ...' if len(low) > 4 else ''}]): nothing to learn from; check what "
            "filled it (a dataset loader that returned zeros, a buffer never extended with the "
            "data)"
        )


def buffer_action_transform(
    buffer: Any,
    probe: TensorDictBase,
    dataset_id: str,
    space_low: torch.Tensor | None,
    space_high: torch.Tensor | None,
    policy: str,
    action_range: tuple | None = None,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """How a user's buffer's actions must be mapped to the [-1, 1] divo's policies act in, as
    the loader maps the dataset's own (``space_low``/``space_high``: the dataset's action space
    when it is not [-1, 1], else None; ``policy``: ``dataset.action_bounds``).

    - actions within [-1, 1]: used as they are (with a space other than [-1, 1], taken as
      already rescaled, as ``load_offline_data`` returns them; said in a warning);
    - actions in the dataset's own units (outside [-1, 1], inside its space): rescaled onto
      [-1, 1] at every batch, with a warning, or refused when ``policy`` is ``refuse``;
    - actions outside the space: refused, naming the range found and the range expected (with
      a [-1, 1] space and ``policy=rescale``, stray values are clipped, as the loader does).
    """
    low, high, whole = action_range or buffer_action_range(buffer, probe)
    where = "the replay buffer holds" if whole else "a batch sampled from the replay buffer has"
    found = f"[{low.min().item():.4g}, {high.max().item():.4g}]"
    tol = ACTION_TOLERANCE
    if bool((low >= -1 - tol).all() and (high <= 1 + tol).all()):
        if space_low is not None:
            warnings.warn(
                f"{where} actions in {found}, within [-1, 1], while dataset {dataset_id!r} acts "
                f"in [{space_low.min().item():.4g}, {space_high.max().item():.4g}]: they are "
                "taken as already rescaled onto [-1, 1] (as load_offline_data returns them)",
                stacklevel=3,
            )
        return None
    if space_low is None:
        if policy == "refuse":
            raise DatasetError(
                f"{where} actions in {found}, outside the [-1, 1] of dataset {dataset_id!r}'s "
                "action space; rescale them to [-1, 1], or set dataset.action_bounds=rescale to "
                "clip them"
            )
        warnings.warn(
            f"{where} actions in {found}, outside the [-1, 1] of dataset {dataset_id!r}'s "
            "action space: each batch's actions are clipped to [-1, 1]",
            stacklevel=3,
        )
        return lambda action: action.clamp(-1.0, 1.0)
    space = f"[{space_low.min().item():.4g}, {space_high.max().item():.4g}]"
    inside = bool((low >= space_low - tol).all() and (high <= space_high + tol).all())
    if not inside:
        raise DatasetError(
            f"{where} actions in {found}, outside both [-1, 1] and dataset {dataset_id!r}'s "
            f"action space {space}: they were not collected in its environment, or in other "
            "units; fix the buffer or pass the matching dataset.id"
        )
    if policy == "refuse":
        raise DatasetError(
            f"{where} actions in {found}, in the units of dataset {dataset_id!r}'s action space "
            f"{space}, but divo's policies act in [-1, 1]; set dataset.action_bounds=rescale to "
            "map them onto [-1, 1], or rescale the buffer yourself"
        )
    warnings.warn(
        f"{where} actions in {found}, in the units of dataset {dataset_id!r}'s action space "
        f"{space}: each batch's actions are rescaled linearly onto [-1, 1], as the dataset's "
        "own are (evaluation runs the environment through RescaleAction(-1, 1))",
        stacklevel=3,
    )
    span = space_high - space_low

    def rescale(action: torch.Tensor) -> torch.Tensor:
        lo, width = space_low.to(action.device), span.to(action.device)
        return (2.0 * (action - lo) / width - 1.0).clamp(-1.0, 1.0)

    return rescale
