"""Minari dataset -> one TorchRL TED TensorDict, normalisation statistics and a replay buffer.

``load_offline_data(dataset_id)`` is the single entry point. A dataset id goes down the layers
of this package once: find (:mod:`divo.data.builtin`: the local Minari root, divo's built-in
datasets written on first use, a download only as a last resort) -> read
(:mod:`divo.data.transitions`) -> check (:mod:`divo.data.checks`) -> to TED (here). It
returns an :class:`OfflineData` holding every transition in TorchRL's TED layout (batch size
``[N]``)::

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

import contextlib
import hashlib
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.envs.registration import EnvSpec
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

from divo.data import ogbench
from divo.data.batches import OBS_STD_EPS
from divo.data.builtin import open_dataset
from divo.data.checks import (
    ACTION_BOUNDS,
    check_action_bounds,
    check_environment,
    check_finite,
    clip_actions,
    observation_layout,
    reference_scores,
    reference_warnings,
    with_rescaled_actions,
)
from divo.data.envs import make_env
from divo.data.transitions import read_transitions
from divo.errors import DatasetError

SOURCES = ("auto", "minari", "ogbench")
# OGBench's environments take 1-2 s each to build: evaluations reuse this many (in waves)
OGBENCH_EVAL_ENVS = 10
# OGBench's manipulation reward: (satisfied sub-goals) - (sub-goals), so at most 0
OGBENCH_REWARD_MAX = 0.0


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
        ref_source: where they come from: ``"dataset"`` (stored with the data), ``"D4RL
            <Name>-v2"`` (D4RL's for an environment of that name: measured on other data and
            another environment version; the loader warns), None without references.
        env_spec: the environment the dataset was collected in, None if unknown or not makeable.
        eval_env_spec: the environment to evaluate in (the dataset's eval env, else env_spec).
        num_episodes, num_transitions: ``E`` and ``N``.
        behavior_return: the data's mean episode return (rewards as stored, before
            ``reward_scale``/``reward_shift``; episodes cut off by the collector included): the
            level a learned policy should beat.
        batch_size: default batch size of ``replay_buffer()``.
        device: where ``data`` and replay-buffer samples live.
        reward_factor: the factor ``return_range`` multiplied the rewards by (1.0: none).
        action_low, action_high: ``[A]`` bounds of the stored action space when its actions
            were rescaled onto [-1, 1] (None when the space is [-1, 1] already).
        action_bounds: the ``action_bounds`` policy the data were loaded with.
        score: what the normalised score measures: ``"return"`` (D4RL's
            ``100 * (return - ref_min) / (ref_max - ref_min)``) or ``"success"`` (OGBench: the
            percentage of evaluation episodes that end in success).
        provenance: where the data came from, when that needs saying (OGBench: OGBench's hosted
            file or one divo generated).
        eval_env_pool: evaluate in this many environments made once and reused by every
            evaluation (``evaluation_envs``), for environments slow to build (OGBench's take
            1-2 s each); None: fresh environments for each evaluation.
        reward_max: the most the task's reward can pay in one step, as stored (before
            ``reward_scale``/``reward_shift``), when the task states it (OGBench: 0, every
            sub-goal satisfied); None when unknown. It bounds what a truncated evaluation
            episode's missing tail could have paid, for the critic's check.
        fingerprint: ``sha256:<hex>`` of the transitions as stored in the source (before any
            rescaling; :func:`data_fingerprint`): two runs with the same fingerprint trained
            on the same data, whatever the file's name, folder or history. Runs record it
            (result.json ``data_fingerprint``), a resume refuses a checkpoint of other data and
            ``divo report`` refuses to pool runs of one dataset id made on different data.
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
    action_low: torch.Tensor | None = None
    action_high: torch.Tensor | None = None
    action_bounds: str = "rescale"
    score: str = "return"
    provenance: str | None = None
    eval_env_pool: int | None = None
    reward_max: float | None = None
    fingerprint: str | None = None
    ref_source: str | None = None
    _envs: list[gym.Env] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        # the pooled evaluation environments are closed when the data go, if not before
        weakref.finalize(self, _close_envs, self._envs)

    def close(self) -> None:
        """Close the evaluation environments ``evaluation_envs`` made (they are made again on
        the next need); training calls it when a run ends."""
        _close_envs(self._envs)

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

    def evaluation_envs(self, episodes: int) -> list[gym.Env] | None:
        """The environments an evaluation of ``episodes`` episodes reuses (at most
        ``eval_env_pool``, made on first need and kept for later evaluations), or None when
        evaluations make fresh ones (``eval_env_pool`` unset)."""
        if not self.eval_env_pool:
            return None
        while len(self._envs) < min(self.eval_env_pool, episodes):
            self._envs.append(self.make_env())
        return self._envs[: min(self.eval_env_pool, episodes)]


def _close_envs(envs: list[gym.Env]) -> None:
    while envs:
        with contextlib.suppress(Exception):  # closing is best effort: nothing depends on it
            envs.pop().close()


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
    source: str = "auto",
    data_dir: str | None = None,
    files: str = "auto",
    generate: bool = True,
    eval_env_kwargs: Mapping[str, Any] | None = None,
    ref_scores: Sequence[float] | None = None,
) -> OfflineData:
    """Read, check and convert a Minari dataset or an OGBench singletask dataset.

    Args:
        dataset_id: Minari id, e.g. ``"mujoco/hopper/medium-v0"`` or
            ``"divo/bandit/multimodal-v0"`` (built-in: written on first use).
        device: where the transitions (and replay-buffer samples) live.
        batch_size: default batch size of ``OfflineData.replay_buffer()``.
        reward_scale: the stored reward is ``r' = reward_scale * r + reward_shift``.
        reward_shift: see ``reward_scale`` (AntMaze's usual ``r - 1`` is ``reward_shift=-1``).
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
            (sorted by key; :func:`divo.data.transitions.observation_key_order`; a nested
            Dict in the order the environment declares it), and the
            environments are wrapped with ``FilterObservation`` + ``FlattenObservation``, so
            evaluation sees the same layout.
        source: ``auto`` (default): an id without a Minari namespace that names an OGBench
            singletask dataset (``cube-single-play-singletask-v0``) is read as OGBench data,
            anything else as Minari data; ``minari`` or ``ogbench`` force one.
        data_dir: OGBench only: the folder of OGBench's hosted files (default
            ``~/.ogbench/data``).
        files: OGBench only: ``auto`` (hosted files if present, else divo-generated ones),
            ``hosted`` or ``generated`` (see :mod:`divo.data.ogbench`).
        generate: OGBench only: generate missing files with OGBench's oracles
            (``divo data ogbench``; 20-50 minutes per 1M transitions on one core).
        eval_env_kwargs: Minari only: keyword arguments merged into the evaluation
            environment's (e.g. ``{"continuing_task": False}``: Minari's AntMaze evaluation
            environment then ends an episode at the goal, as D4RL's did); recorded with the
            policy, so ``divo evaluate`` rebuilds the same environment.
        ref_scores: Minari only: ``[random, expert]`` returns to score against (0 and 100) in
            place of the dataset's stored ones (``[0, 1]`` with the kwargs above: D4RL's
            AntMaze success rate).

    Raises:
        DatasetError: the dataset cannot be found, is empty, holds NaN/inf, uses non-Box spaces,
            or does not match its environment.
    """
    device = torch.device(device)
    if action_bounds not in ACTION_BOUNDS:
        raise DatasetError(
            f"action_bounds={action_bounds!r} is unknown; use one of {', '.join(ACTION_BOUNDS)}"
        )
    if source not in SOURCES:
        raise DatasetError(f"dataset.source={source!r} is unknown; use one of {', '.join(SOURCES)}")
    options = {
        "device": device,
        "batch_size": batch_size,
        "reward_scale": reward_scale,
        "reward_shift": reward_shift,
        "return_range": return_range,
        "action_bounds": action_bounds,
    }
    if source == "ogbench" or (source == "auto" and ogbench.looks_like_ogbench(dataset_id)):
        if eval_env_kwargs or ref_scores is not None:
            raise DatasetError(
                "OGBench data are evaluated in OGBench's own environment and scored by success; "
                "drop dataset.eval_env_kwargs and dataset.ref_scores"
            )
        if observation_keys is not None:
            raise DatasetError(
                "OGBench observations are flat vectors; drop dataset.observation_keys"
            )
        raw = ogbench.read_ogbench(
            dataset_id, data_dir=data_dir, files=files, download=download, generate=generate
        )
        ogbench.check_spaces(dataset_id, raw)
        act_space = raw["action_space"]
        return _to_offline_data(
            dataset_id,
            raw,
            act_space,
            int(raw["observation_space"].shape[0]),
            rescale=check_action_bounds(dataset_id, act_space, action_bounds),
            env_spec=raw["env_spec"],
            eval_env_spec=raw["env_spec"],
            references=(None, None, None),
            score="success",
            provenance=raw["provenance"],
            eval_env_pool=OGBENCH_EVAL_ENVS,
            reward_max=OGBENCH_REWARD_MAX,
            **options,
        )
    dataset = open_dataset(dataset_id, download=download)
    obs_space, act_space = dataset.observation_space, dataset.action_space
    keys, obs_size = observation_layout(dataset_id, obs_space, observation_keys)
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        raise DatasetError(
            f"dataset {dataset_id!r} has an action space {act_space}, which divo does not "
            "support; it needs flat continuous (1-D Box) actions"
        )
    rescale = check_action_bounds(
        dataset_id, act_space, action_bounds, evaluated=dataset.env_spec is not None
    )
    if dataset.total_episodes == 0 or dataset.total_steps == 0:
        raise DatasetError(
            f"dataset {dataset_id!r} is empty (no transitions); write data into it or pick "
            "another dataset"
        )

    nested = keys is not None and any(
        isinstance(obs_space[key], gym.spaces.Dict) for key in keys
    )  # a Dict inside the Dict: its order is the environment's (see _env_observation_space)
    env_space = _env_observation_space(dataset) if nested else None
    raw = read_transitions(
        dataset,
        observation_keys=keys,
        observation_space=env_space,
        use_cache=not (nested and env_space is None),  # never cache a layout not checked
    )
    for name, key, space, size in (
        ("observation", "observation", obs_space, obs_size),
        ("action", "action", act_space, act_space.shape[0]),
    ):
        if raw[key].shape[1] != size:
            raise DatasetError(
                f"dataset {dataset_id!r} stores {name}s of size {raw[key].shape[1]} but declares "
                f"a {name} space {space}; the dataset is inconsistent: write it again"
            )
    env_spec, eval_env_spec = check_environment(dataset, dataset_id, raw, keys, eval_env_kwargs)
    references = reference_scores(dataset, env_spec, ref_scores)
    for note in reference_warnings(dataset_id, references, env_spec):
        warnings.warn(note, stacklevel=3)
    return _to_offline_data(
        dataset_id,
        raw,
        act_space,
        obs_size,
        rescale=rescale,
        env_spec=env_spec,
        eval_env_spec=eval_env_spec,
        references=references,
        **options,
    )


def _env_observation_space(dataset: Any) -> gym.Space | None:
    """For nested Dict observations, the evaluation environment's own observation space: the
    data are flattened in its nested order, which FlattenObservation follows there (Minari
    stores the space and gives it back with nested Dicts sorted by key). None when the
    environment cannot be made here (the environment check then says why)."""
    spec = getattr(dataset, "_eval_env_spec", None) or dataset.env_spec
    if spec is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            env = make_env(spec)  # as evaluation makes it (maze model files removed)
    except Exception:  # noqa: BLE001 - reported by check_environment
        return None
    try:
        return env.observation_space
    finally:
        env.close()


def _to_offline_data(
    dataset_id: str,
    raw: dict[str, Any],
    act_space: gym.spaces.Box,
    obs_size: int,
    *,
    rescale: bool,
    env_spec: EnvSpec | None,
    eval_env_spec: EnvSpec | None,
    references: tuple[float | None, float | None, str | None],
    device: torch.device,
    batch_size: int,
    reward_scale: float,
    reward_shift: float,
    return_range: float | str | None,
    action_bounds: str,
    score: str = "return",
    provenance: str | None = None,
    eval_env_pool: int | None = None,
    reward_max: float | None = None,
) -> OfflineData:
    """Checked raw transitions (whatever their source) -> TED TensorDict and statistics."""
    check_finite(dataset_id, raw)
    action = raw["action"]
    if rescale:
        low, high = act_space.low.astype(np.float64), act_space.high.astype(np.float64)
        action = (2.0 * (action - low) / (high - low) - 1.0).astype(np.float32)
        if eval_env_spec is not None:
            eval_env_spec = with_rescaled_actions(eval_env_spec)
    action = clip_actions(dataset_id, action, action_bounds)

    terminated = raw["terminated"].copy()
    truncated = raw["truncated"].copy()
    # An episode's last step that is neither terminated nor truncated (data cut off by the
    # collector) is a truncation: the episode goes on beyond it, but not in this dataset.
    last = np.cumsum(raw["episode_length"]) - 1
    unflagged = int((~terminated[last] & ~truncated[last]).sum())
    if unflagged > 1 and unflagged > 0.01 * len(last):  # a collector's last cut-off is normal
        warnings.warn(
            f"dataset {dataset_id!r}: {unflagged} of {len(last)} episodes end with neither "
            "termination nor truncation; they are read as truncated (the episode goes on "
            "beyond the data), so the TD target bootstraps there. If they ended (one-step "
            "episodes, a goal reached), store terminations=True on their last step",
            stacklevel=3,
        )
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
    ref_min, ref_max, ref_source = references
    return OfflineData(
        fingerprint=data_fingerprint(raw),
        dataset_id=dataset_id,
        data=data,
        observation_dim=obs_size,
        action_dim=int(act_space.shape[0]),
        obs_mean=obs_mean,
        obs_std=obs_std,
        ref_min_score=ref_min,
        ref_max_score=ref_max,
        ref_source=ref_source,
        env_spec=env_spec,
        eval_env_spec=eval_env_spec,
        num_episodes=int(len(raw["episode_length"])),
        num_transitions=n,
        behavior_return=float(returns.mean()),
        batch_size=batch_size,
        device=device,
        reward_factor=factor,
        action_low=torch.as_tensor(act_space.low, dtype=torch.float32) if rescale else None,
        action_high=torch.as_tensor(act_space.high, dtype=torch.float32) if rescale else None,
        action_bounds=action_bounds,
        score=score,
        provenance=provenance,
        eval_env_pool=eval_env_pool,
        reward_max=reward_max,
    )


# the arrays a fingerprint covers, in this order: what training reads from a source
FINGERPRINT_KEYS = (
    "observation",
    "action",
    "reward",
    "terminated",
    "truncated",
    "next_observation",
    "episode_length",
)


def data_fingerprint(raw: dict[str, Any]) -> str:
    """``sha256:<hex>`` over the arrays of :data:`FINGERPRINT_KEYS` as read from the source
    (each array's name, dtype, shape and bytes): equal exactly when the transitions are.

    It tells regenerated or replaced data apart from the data a run (or a study's other cells)
    trained on; the loader's own options (reward scale, action rescaling, ...) are not in it,
    they are in each run's config.yaml.
    """
    digest = hashlib.sha256()
    for key in FINGERPRINT_KEYS:
        array = np.ascontiguousarray(raw[key])
        digest.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(memoryview(array).cast("B"))
    return f"sha256:{digest.hexdigest()}"


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
