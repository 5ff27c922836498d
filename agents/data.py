"""Minari dataset -> one TorchRL TED TensorDict, normalisation statistics and a replay buffer.

``load_offline_data(dataset_id)`` is the single entry point: it finds the dataset (local Minari
root first; divo's built-in datasets are written on first use; a download only as a last
resort), checks it, and returns an :class:`OfflineData` holding every transition in TorchRL's
TED layout (batch size ``[N]``)::

    observation [N, O] float32          action [N, A] float32 (in [-1, 1])
    ("next", "observation") [N, O]      ("next", "reward") [N, 1] float32
    ("next", "terminated") [N, 1] bool  ("next", "truncated") [N, 1] bool
    ("next", "done") [N, 1] bool        (= terminated | truncated)

The next observation is the state the dataset stored after the step, also when an episode was
cut by a time limit: such a step is ``truncated`` and NOT ``terminated``, so the TD target
bootstraps from the real next state (TorchRL's D4RL loader zeroes it by default; we do not).
Dict observations (Minari's D4RL maze datasets) are flattened, keys in gymnasium's order, and
the environments are wrapped to flatten theirs the same way (``observation_keys``).
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import minari
import numpy as np
import torch
from gymnasium.envs.registration import EnvSpec, WrapperSpec
from minari.dataset.minari_dataset import parse_dataset_id
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

import divo.envs  # noqa: F401  (registers divo's environments for gym.make)
from divo.datasets import (
    BUILTIN_DATASETS,
    ensure_builtin,
    is_local,
    make_env,
    minari_root,
    observation_key_order,
    read_transitions,
)
from divo.errors import DatasetError, install_hint

# D4RL v2 reference returns (random / expert policy), used when a dataset stores none; keyed by
# the environment's base name (``EnvSpec.name``: "Hopper" for "Hopper-v5"). Source: D4RL's
# infos.py REF_MIN_SCORE / REF_MAX_SCORE for the -v2 locomotion datasets.
D4RL_REFERENCE_SCORES: dict[str, tuple[float, float]] = {
    "Hopper": (-20.272305, 3234.3),
    "HalfCheetah": (-280.178953, 12135.0),
    "Walker2d": (1.629008, 4592.3),
    "Ant": (-325.6, 3879.7),
}

# Added to the state standard deviation before dividing (TD3+BC's eps; method.md).
OBS_STD_EPS = 1e-3
ACTION_BOUNDS = ("rescale", "refuse")

# The keys one training batch must carry (TED layout).
REQUIRED_BATCH_KEYS: tuple[str | tuple[str, ...], ...] = (
    "observation",
    "action",
    ("next", "observation"),
    ("next", "reward"),
    ("next", "terminated"),
)


@dataclass
class OfflineData:
    """An offline dataset, converted and checked.

    Attributes:
        dataset_id: the Minari id it was read from.
        data: every transition in TED layout, batch size ``[N]``, on ``device``.
        observation_dim, action_dim: ``O`` and ``A``.
        obs_mean, obs_std: ``[O]`` float32 state statistics over ``data["observation"]``
            (``obs_std`` already includes ``OBS_STD_EPS``); normalise as ``(s - mean) / std``.
        ref_min_score, ref_max_score: reference returns for normalised scores (the dataset's,
            else D4RL v2's for its environment), None when unknown.
        env_spec: the environment the dataset was collected in, None if unknown or not makeable.
        eval_env_spec: the environment to evaluate in (the dataset's eval env, else env_spec).
        num_episodes, num_transitions: ``E`` and ``N``.
        behavior_return: the data's mean episode return (rewards as stored, before
            ``reward_scale``/``reward_shift``; episodes cut off by the collector included): the
            level a learned policy should beat.
        batch_size: default batch size of ``replay_buffer()``.
        device: where ``data`` and replay-buffer samples live.
        reward_factor: the factor ``return_range`` multiplied the rewards by (1.0: none).
    """

    dataset_id: str
    data: TensorDictBase
    observation_dim: int
    action_dim: int
    obs_mean: torch.Tensor
    obs_std: torch.Tensor
    ref_min_score: float | None
    ref_max_score: float | None
    env_spec: EnvSpec | None
    num_episodes: int
    num_transitions: int
    eval_env_spec: EnvSpec | None = None
    behavior_return: float | None = None
    batch_size: int = 256
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reward_factor: float = 1.0

    def replay_buffer(self, batch_size: int | None = None) -> TensorDictReplayBuffer:
        """A uniform replay buffer holding every transition; samples come out on ``device``."""
        buffer = TensorDictReplayBuffer(
            storage=LazyTensorStorage(self.num_transitions, device=self.device),
            batch_size=self.batch_size if batch_size is None else batch_size,
        )
        buffer.extend(self.data)
        return buffer

    @property
    def can_evaluate(self) -> bool:
        """Whether the evaluation environment can be built."""
        return self.eval_env_spec is not None

    def make_env(self, **kwargs: Any) -> gym.Env:
        """A fresh evaluation environment (``kwargs`` go to ``gym.make``)."""
        if self.eval_env_spec is None:
            raise DatasetError(
                f"dataset {self.dataset_id!r} names no environment that can be built here, so "
                "there is nothing to evaluate in; install the environment's package, or train "
                "with evaluation disabled"
            )
        return make_env(self.eval_env_spec, **kwargs)


def load_offline_data(
    dataset_id: str,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    reward_scale: float = 1.0,
    reward_shift: float = 0.0,
    return_range: float | str | None = None,
    download: bool = True,
    action_bounds: str = "rescale",
    observation_keys: Sequence[str] | None = None,
) -> OfflineData:
    """Read, check and convert a Minari dataset.

    Args:
        dataset_id: Minari id, e.g. ``"mujoco/hopper/medium-v0"`` or
            ``"divo/bandit/multimodal-v0"`` (built-in: written on first use).
        device: where the transitions (and replay-buffer samples) live.
        batch_size: default batch size of ``OfflineData.replay_buffer()``.
        reward_scale, reward_shift: stored reward ``r' = reward_scale * r + reward_shift``
            (AntMaze's usual ``r - 1`` is ``reward_shift=-1``).
        return_range: rescale the rewards first so that the data's best and worst episode
            returns differ by this much: IQL's and IDQL's locomotion normalisation is
            ``1000`` (``r * 1000 / (max return - min return)``, then ``reward_scale`` and
            ``reward_shift``). ``"locomotion"``: 1000 on data from Gym's HalfCheetah, Hopper
            or Walker2d and nothing elsewhere, as IQL's code decides; None (default): off.
        download: when the dataset is neither local nor built-in, try Minari's remote server.
        action_bounds: ``rescale`` (default): an action space other than [-1, 1] is mapped
            linearly onto [-1, 1] (the evaluation environment is wrapped with
            ``RescaleAction`` to match) and stray values outside the space are clipped, each
            with a warning stating it; ``refuse``: either case is a DatasetError.
        observation_keys: for a dataset with a Dict observation space (Minari's D4RL AntMaze
            and PointMaze: ``observation``, ``achieved_goal``, ``desired_goal``), the keys kept;
            default all. Their arrays are flattened and concatenated in gymnasium's order
            (sorted by key; ``observation_key_order``), and the environments are wrapped with
            ``FilterObservation`` + ``FlattenObservation``, so evaluation sees the same layout.

    Raises:
        DatasetError: the dataset cannot be found, is empty, holds NaN/inf, uses non-Box spaces,
            or does not match its environment.
    """
    device = torch.device(device)
    dataset = _open_dataset(dataset_id, download=download)
    obs_space, act_space = dataset.observation_space, dataset.action_space
    keys, obs_size = _observation_layout(dataset_id, obs_space, observation_keys)
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        raise DatasetError(
            f"dataset {dataset_id!r} has an action space {act_space}, which divo does not "
            "support; it needs flat continuous (1-D Box) actions"
        )
    if action_bounds not in ACTION_BOUNDS:
        raise DatasetError(
            f"action_bounds={action_bounds!r} is unknown; use one of {', '.join(ACTION_BOUNDS)}"
        )
    rescale = _check_action_bounds(dataset_id, act_space, action_bounds)
    if dataset.total_episodes == 0 or dataset.total_steps == 0:
        raise DatasetError(
            f"dataset {dataset_id!r} is empty (no transitions); write data into it or pick "
            "another dataset"
        )

    raw = read_transitions(dataset, observation_keys=keys)
    for name, key, space, size in (
        ("observation", "observation", obs_space, obs_size),
        ("action", "action", act_space, act_space.shape[0]),
    ):
        if raw[key].shape[1] != size:
            raise DatasetError(
                f"dataset {dataset_id!r} stores {name}s of size {raw[key].shape[1]} but declares "
                f"a {name} space {space}; the dataset is inconsistent: write it again"
            )
    _check_finite(dataset_id, raw)
    env_spec, eval_env_spec = _check_environment(dataset, dataset_id, raw, keys)
    action = raw["action"]
    if rescale:
        low, high = act_space.low.astype(np.float64), act_space.high.astype(np.float64)
        action = (2.0 * (action - low) / (high - low) - 1.0).astype(np.float32)
        if eval_env_spec is not None:
            eval_env_spec = _with_rescaled_actions(eval_env_spec)
    action = _clip_actions(dataset_id, action, action_bounds)

    terminated = raw["terminated"].copy()
    truncated = raw["truncated"].copy()
    # An episode's last step that is neither terminated nor truncated (data cut off by the
    # collector) is a truncation: the episode goes on beyond it, but not in this dataset.
    last = np.cumsum(raw["episode_length"]) - 1
    truncated[last] |= ~terminated[last]
    truncated &= ~terminated  # a terminal step is terminal, whatever else it is flagged as

    starts = np.cumsum(raw["episode_length"]) - raw["episode_length"]
    returns = np.add.reduceat(raw["reward"].astype(np.float64), starts)
    factor = _return_range_factor(dataset_id, return_range, returns, env_spec)
    reward = (reward_scale * factor * raw["reward"] + reward_shift).astype(np.float32)
    n = len(reward)
    data = TensorDict(
        {
            "observation": torch.from_numpy(raw["observation"]),
            "action": torch.from_numpy(action),
            "next": {
                "observation": torch.from_numpy(raw["next_observation"]),
                "reward": torch.from_numpy(reward).reshape(n, 1),
                "terminated": torch.from_numpy(terminated).reshape(n, 1),
                "truncated": torch.from_numpy(truncated).reshape(n, 1),
                "done": torch.from_numpy(terminated | truncated).reshape(n, 1),
            },
        },
        batch_size=[n],
    ).to(device)

    obs = raw["observation"].astype(np.float64)
    obs_mean = torch.as_tensor(obs.mean(0), dtype=torch.float32, device=device)
    obs_std = torch.as_tensor(obs.std(0) + OBS_STD_EPS, dtype=torch.float32, device=device)
    ref_min, ref_max = _reference_scores(dataset, env_spec)
    return OfflineData(
        dataset_id=dataset_id,
        data=data,
        observation_dim=obs_size,
        action_dim=int(act_space.shape[0]),
        obs_mean=obs_mean,
        obs_std=obs_std,
        ref_min_score=ref_min,
        ref_max_score=ref_max,
        env_spec=env_spec,
        eval_env_spec=eval_env_spec,
        num_episodes=int(len(raw["episode_length"])),
        num_transitions=n,
        behavior_return=float(returns.mean()),
        batch_size=batch_size,
        device=device,
        reward_factor=factor,
    )


# IQL's code normalises rewards on these Gym tasks only (its `normalize` on locomotion)
LOCOMOTION_ENVS = ("halfcheetah", "hopper", "walker2d")


def _return_range_factor(
    dataset_id: str, return_range: float | str | None, returns: np.ndarray, env_spec
) -> float:
    """The reward factor that makes max - min episode return equal ``return_range``."""
    if return_range is None:
        return 1.0
    if isinstance(return_range, str):
        if return_range != "locomotion":
            raise DatasetError(
                f"return_range={return_range!r} is unknown; use a number (IQL: 1000), "
                "'locomotion' (1000 on HalfCheetah, Hopper and Walker2d data only) or null"
            )
        env_id = (env_spec.id if env_spec is not None else "").lower()
        if not any(name in env_id for name in LOCOMOTION_ENVS):
            return 1.0
        return_range = 1000.0
    if not return_range > 0:
        raise DatasetError(f"return_range must be > 0 (IQL: 1000), got {return_range}")
    span = float(returns.max() - returns.min())
    if not span > 0:
        raise DatasetError(
            f"dataset {dataset_id!r}: every episode has the same return ({returns.max():.6g}), "
            "so return_range cannot rescale its rewards; set dataset.return_range=null"
        )
    return float(return_range) / span


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


def conform_batch(td: TensorDictBase, keys: Iterable[tuple[str, str]]) -> TensorDictBase:
    """Give the ``[B]`` entries ``keys`` (see ``flat_flag_keys``) TED's shape ``[B, 1]``, in
    place; returns ``td``. Other shapes are left for ``check_batch_keys`` to judge."""
    for key in keys:
        td.set(key, td.get(key).unsqueeze(-1))
    return td


# --------------------------------------------------------------------------------------------
# Finding the dataset


def buffer_observation_stats(
    buffer: Any, chunk: int = 262_144
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Mean and std (plus ``OBS_STD_EPS``, as for a dataset) of the observations a TorchRL
    replay buffer holds, read from its storage in chunks; None when its storage cannot be read
    by index (then there is nothing to normalise with)."""
    try:
        n = len(buffer)
        total = total_sq = None
        for start in range(0, n, chunk):
            obs = buffer[start : min(start + chunk, n)]["observation"].detach()
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


FINITE_BATCH_KEYS = (
    ("observation",),
    ("action",),
    ("next", "observation"),
    ("next", "reward"),
)


def _non_finite_counts(td: TensorDictBase) -> dict[str, int]:
    counts = {}
    for key in FINITE_BATCH_KEYS:
        value = td.get(key, None)
        if value is not None and value.is_floating_point():
            counts["/".join(key)] = int((~torch.isfinite(value)).sum())
    return counts


def check_buffer_finite(buffer: Any, probe: TensorDictBase, chunk: int = 262_144) -> None:
    """Refuse a user's replay buffer holding NaN/inf in observations, actions or rewards, when
    it is handed over: every stored transition when its storage can be read by index (as for
    the observation statistics), else the probe batch ``probe`` sampled from it."""
    whole = True
    try:
        n = len(buffer)
        totals: dict[str, int] = {}
        for start in range(0, n, chunk):
            for name, count in _non_finite_counts(buffer[start : min(start + chunk, n)]).items():
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


def available_datasets() -> list[str]:
    """Ids of the datasets in the local Minari root."""
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


def _open_dataset(dataset_id: str, *, download: bool) -> minari.MinariDataset:
    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):
        raise _not_found(dataset_id, "the id is malformed", malformed=True) from None
    if not is_local(dataset_id) and not ensure_builtin(dataset_id):
        if not download:
            raise _not_found(dataset_id, "it is not in the local Minari root (download=False)")
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
    try:
        return minari.load_dataset(dataset_id)
    except Exception as exc:
        raise DatasetError(
            f"dataset {dataset_id!r} exists in {minari_root()} but cannot be read "
            f"({type(exc).__name__}: {exc}); delete it (minari delete {dataset_id}) and write or "
            "download it again"
        ) from exc


# --------------------------------------------------------------------------------------------
# Checks


def _check_action_bounds(dataset_id: str, space: gym.spaces.Box, policy: str) -> bool:
    """True when the action space must be rescaled onto [-1, 1] (``policy`` permitting)."""
    if np.all(space.low == -1.0) and np.all(space.high == 1.0):
        return False
    bounds = f"[{space.low.min()}, {space.high.max()}]"
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise DatasetError(
            f"dataset {dataset_id!r} has unbounded actions ({bounds}), but divo's policies act "
            "in [-1, 1]; store the data with a bounded action space"
        )
    if policy == "refuse":
        raise DatasetError(
            f"dataset {dataset_id!r} has actions bounded by {bounds}, but divo's policies act in "
            "[-1, 1]; set dataset.action_bounds=rescale to map them onto [-1, 1], or rescale the "
            "data yourself"
        )
    warnings.warn(
        f"dataset {dataset_id!r}: actions bounded by {bounds} are rescaled linearly onto "
        "[-1, 1]; evaluation wraps the environment with gymnasium's RescaleAction(-1, 1)",
        stacklevel=3,
    )
    return True


def _observation_layout(
    dataset_id: str, space: gym.Space, keys: Sequence[str] | None
) -> tuple[list[str] | None, int]:
    """(the Dict keys kept, in order, or None for a flat Box; the flat observation size)."""
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        if keys is not None:
            raise DatasetError(
                f"dataset {dataset_id!r} has flat observations ({space}), but observation_keys "
                f"{list(keys)} were given; they choose keys of a Dict observation space: drop "
                "dataset.observation_keys"
            )
        return None, int(space.shape[0])
    if isinstance(space, gym.spaces.Dict):
        if keys is not None:
            if isinstance(keys, str) or not len(keys):
                raise DatasetError(
                    f"observation_keys={keys!r} must be a non-empty list of keys of dataset "
                    f"{dataset_id!r} (its keys: {', '.join(space.spaces)}), e.g. "
                    f"dataset.observation_keys=[{next(iter(space.spaces))}]"
                )
            unknown = [key for key in keys if key not in space.spaces]
            if unknown:
                raise DatasetError(
                    f"dataset {dataset_id!r} has no observation key(s) "
                    f"{', '.join(map(repr, unknown))}; its keys are "
                    f"{', '.join(space.spaces)}: fix dataset.observation_keys"
                )
        order = observation_key_order(space, keys)
        not_box = [key for key in order if not _only_boxes(space[key])]
        if not not_box:
            return order, sum(int(gym.spaces.flatdim(space[key])) for key in order)
        raise DatasetError(
            f"dataset {dataset_id!r} has a Dict observation space whose key(s) "
            f"{', '.join(not_box)} are not continuous (Box) arrays; leave them out with "
            "dataset.observation_keys=[...] (its keys: " + ", ".join(space.spaces) + ")"
        )
    raise DatasetError(
        f"dataset {dataset_id!r} has an observation space {space}, which divo does not support; "
        "it needs continuous observations: a 1-D Box, or a Dict of Boxes (flattened)"
    )


def _only_boxes(space: gym.Space) -> bool:
    """A Box, or a (nested) Dict whose every leaf is a Box."""
    if isinstance(space, gym.spaces.Dict):
        return all(_only_boxes(sub) for sub in space.spaces.values())
    return isinstance(space, gym.spaces.Box)


def _with_flat_observations(spec: EnvSpec, keys: Sequence[str]) -> EnvSpec:
    """The same env spec with FilterObservation(keys) + FlattenObservation wrappers, which give
    the layout of the loaded data (kept by EnvSpec.to_json, so saved policies evaluate too)."""
    wrappers = (
        WrapperSpec(
            name="FilterObservation",
            entry_point="gymnasium.wrappers:FilterObservation",
            kwargs={"filter_keys": list(keys)},
        ),
        WrapperSpec(
            name="FlattenObservation",
            entry_point="gymnasium.wrappers:FlattenObservation",
            kwargs={},
        ),
    )
    return dataclasses.replace(spec, additional_wrappers=(*spec.additional_wrappers, *wrappers))


def _with_rescaled_actions(spec: EnvSpec) -> EnvSpec:
    """The same env spec with a RescaleAction(-1, 1) wrapper (kept by EnvSpec.to_json)."""
    wrapper = WrapperSpec(
        name="RescaleAction",
        entry_point="gymnasium.wrappers:RescaleAction",
        kwargs={"min_action": -1.0, "max_action": 1.0},
    )
    return dataclasses.replace(spec, additional_wrappers=(*spec.additional_wrappers, wrapper))


def _check_finite(dataset_id: str, raw: dict[str, np.ndarray]) -> None:
    last = np.cumsum(raw["episode_length"]) - 1
    counts = {
        # every stored observation once: the first of each step plus each episode's final one
        "observations": int((~np.isfinite(raw["observation"])).sum())
        + int((~np.isfinite(raw["next_observation"][last])).sum()),
        "actions": int((~np.isfinite(raw["action"])).sum()),
        "rewards": int((~np.isfinite(raw["reward"])).sum()),
    }
    bad = {key: count for key, count in counts.items() if count}
    if bad:
        what = ", ".join(f"{count} in {key}" for key, count in bad.items())
        raise DatasetError(
            f"dataset {dataset_id!r} holds non-finite values (NaN/inf): {what}; clean the data "
            "(drop or repair the affected episodes) and write the dataset again"
        )


def _make_env(spec: EnvSpec) -> gym.Env:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_env(spec)


def _check_environment(
    dataset: minari.MinariDataset,
    dataset_id: str,
    raw: dict[str, np.ndarray],
    observation_keys: Sequence[str] | None = None,
) -> tuple[EnvSpec | None, EnvSpec | None]:
    """Make the dataset's environments (wrapped to flatten Dict observations when
    ``observation_keys`` are given); refuse data whose sizes do not fit them."""
    env_spec = dataset.env_spec
    if env_spec is None:
        warnings.warn(
            f"dataset {dataset_id!r} names no environment: training works, evaluation is "
            "unavailable",
            stacklevel=3,
        )
        return None, None
    eval_spec = getattr(dataset, "_eval_env_spec", None) or env_spec
    if observation_keys is not None:
        same = eval_spec is env_spec
        env_spec = _with_flat_observations(env_spec, observation_keys)
        eval_spec = env_spec if same else _with_flat_observations(eval_spec, observation_keys)
    made: dict[str, EnvSpec | None] = {}
    for role, spec in (("environment", env_spec), ("evaluation environment", eval_spec)):
        if role == "evaluation environment" and spec is env_spec:
            made[role] = made["environment"]
            continue
        try:
            env = _make_env(spec)
        except Exception as exc:  # missing package, unregistered id, ...
            warnings.warn(
                f"dataset {dataset_id!r}: its {role} {spec.id} cannot be made here "
                f"({type(exc).__name__}: {exc}); training works, evaluation is unavailable",
                stacklevel=3,
            )
            made[role] = None
            continue
        try:
            for name, key, space in (
                ("observation", "observation", env.observation_space),
                ("action", "action", env.action_space),
            ):
                data_size = raw[key].shape[1]
                env_shape = getattr(space, "shape", None)
                if env_shape is None or int(np.prod(env_shape)) != data_size:
                    raise DatasetError(
                        f"dataset {dataset_id!r} has {name}s of size {data_size} but its {role} "
                        f"{spec.id} has a {name} space {space}; the data was not collected in "
                        "this environment: fix the env spec stored with the dataset or pick "
                        "the matching dataset"
                    )
        finally:
            env.close()
        made[role] = spec
    return made["environment"], made["evaluation environment"]


def _clip_actions(dataset_id: str, action: np.ndarray, policy: str) -> np.ndarray:
    outside = (action < -1.0) | (action > 1.0)
    if outside.any() and policy == "refuse":
        raise DatasetError(
            f"dataset {dataset_id!r}: {int(outside.any(1).sum())} of {len(action)} actions lie "
            "outside the action space; set dataset.action_bounds=rescale to clip them (with a "
            "warning), or repair the data"
        )
    if outside.any():
        warnings.warn(
            f"dataset {dataset_id!r}: {int(outside.any(1).sum())} of {len(action)} actions "
            f"({int(outside.sum())} entries) lie outside [-1, 1]; clipped to [-1, 1]",
            stacklevel=3,
        )
        return np.clip(action, -1.0, 1.0)
    return action


def _reference_scores(
    dataset: minari.MinariDataset, env_spec: EnvSpec | None
) -> tuple[float | None, float | None]:
    metadata = dataset.storage.metadata
    ref_min, ref_max = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    if ref_min is not None and ref_max is not None:
        return float(ref_min), float(ref_max)
    spec = env_spec or dataset.env_spec
    if spec is not None and spec.name in D4RL_REFERENCE_SCORES:
        return D4RL_REFERENCE_SCORES[spec.name]
    return None, None


__all__ = [
    "buffer_observation_stats",
    "conform_batch",
    "flat_flag_keys",
    "ACTION_BOUNDS",
    "D4RL_REFERENCE_SCORES",
    "OBS_STD_EPS",
    "OfflineData",
    "REQUIRED_BATCH_KEYS",
    "available_datasets",
    "check_batch_keys",
    "load_offline_data",
]
