"""Checks of a dataset's contents against its spaces and its environment.

Each check either passes, adapts the data in a way it states in a warning (actions rescaled onto
[-1, 1], stray actions clipped), or refuses with a :class:`DatasetError` that names the fix.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import minari
import numpy as np
from gymnasium.envs.registration import EnvSpec, WrapperSpec

from divo.data.envs import make_env
from divo.data.transitions import observation_key_order
from divo.errors import DatasetError

# D4RL v2 reference returns (random / expert policy), used when a dataset stores none; keyed by
# the environment's base name (``EnvSpec.name``: "Hopper" for "Hopper-v5"). Source: D4RL's
# infos.py REF_MIN_SCORE / REF_MAX_SCORE for the -v2 locomotion datasets.
D4RL_REFERENCE_SCORES: dict[str, tuple[float, float]] = {
    "Hopper": (-20.272305, 3234.3),
    "HalfCheetah": (-280.178953, 12135.0),
    "Walker2d": (1.629008, 4592.3),
    "Ant": (-325.6, 3879.7),
}
ACTION_BOUNDS = ("rescale", "refuse")


# --------------------------------------------------------------------------------------------
# Checks


def check_action_bounds(
    dataset_id: str, space: gym.spaces.Box, policy: str, *, evaluated: bool = True
) -> bool:
    """True when the action space must be rescaled onto [-1, 1] (``policy`` permitting);
    ``evaluated``: whether the data name an environment to evaluate in."""
    if np.all(space.low == -1.0) and np.all(space.high == 1.0):
        return False
    bounds = f"[{space.low.min()}, {space.high.max()}]"
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise DatasetError(
            f"dataset {dataset_id!r} has unbounded actions ({bounds}), but divo's policies act "
            "in [-1, 1]; store the data with a bounded action space"
        )
    if np.any(space.high <= space.low):
        flat = [int(i) for i in np.flatnonzero(np.ravel(space.high <= space.low))]
        raise DatasetError(
            f"dataset {dataset_id!r} declares an action space whose upper bound is not above its "
            f"lower one in dimension(s) {flat}; such a dimension cannot be rescaled onto "
            "[-1, 1]: store the data with the environment's real action bounds"
        )
    if policy == "refuse":
        raise DatasetError(
            f"dataset {dataset_id!r} has actions bounded by {bounds}, but divo's policies act in "
            "[-1, 1]; set dataset.action_bounds=rescale to map them onto [-1, 1], or rescale the "
            "data yourself"
        )
    warnings.warn(
        f"dataset {dataset_id!r}: actions bounded by {bounds} are rescaled linearly onto "
        "[-1, 1]"
        + (
            "; evaluation wraps the environment with gymnasium's RescaleAction(-1, 1)"
            if evaluated
            else " (deploy the policy through gymnasium's RescaleAction(-1, 1))"
        ),
        stacklevel=3,
    )
    return True


def observation_layout(
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


def with_flat_observations(spec: EnvSpec, keys: Sequence[str]) -> EnvSpec:
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


def with_rescaled_actions(spec: EnvSpec) -> EnvSpec:
    """The same env spec with a RescaleAction(-1, 1) wrapper (kept by EnvSpec.to_json)."""
    wrapper = WrapperSpec(
        name="RescaleAction",
        entry_point="gymnasium.wrappers:RescaleAction",
        kwargs={"min_action": -1.0, "max_action": 1.0},
    )
    return dataclasses.replace(spec, additional_wrappers=(*spec.additional_wrappers, wrapper))


def check_finite(dataset_id: str, raw: dict[str, np.ndarray]) -> None:
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


def check_environment(
    dataset: minari.MinariDataset,
    dataset_id: str,
    raw: dict[str, np.ndarray],
    observation_keys: Sequence[str] | None = None,
    eval_env_kwargs: Mapping[str, Any] | None = None,
) -> tuple[EnvSpec | None, EnvSpec | None]:
    """Make the dataset's environments (wrapped to flatten Dict observations when
    ``observation_keys`` are given); refuse data whose sizes do not fit them.
    ``eval_env_kwargs`` are merged into the evaluation environment's keyword arguments (e.g.
    AntMaze's ``continuing_task=False``, D4RL's episode that ends at the goal); an evaluation
    environment they break is refused, not skipped."""
    env_spec = dataset.env_spec
    if env_spec is None:
        if eval_env_kwargs:
            raise DatasetError(
                f"dataset {dataset_id!r} names no environment: dataset.eval_env_kwargs has "
                "nothing to apply to; drop it"
            )
        warnings.warn(
            f"dataset {dataset_id!r} names no environment: training works, evaluation is "
            "unavailable",
            stacklevel=3,
        )
        return None, None
    eval_spec = getattr(dataset, "_eval_env_spec", None) or env_spec
    if eval_env_kwargs:
        eval_spec = dataclasses.replace(eval_spec, kwargs={**eval_spec.kwargs, **eval_env_kwargs})
    if observation_keys is not None:
        same = eval_spec is env_spec
        env_spec = with_flat_observations(env_spec, observation_keys)
        eval_spec = env_spec if same else with_flat_observations(eval_spec, observation_keys)
    made: dict[str, EnvSpec | None] = {}
    for role, spec in (("environment", env_spec), ("evaluation environment", eval_spec)):
        if role == "evaluation environment" and spec is env_spec:
            made[role] = made["environment"]
            continue
        try:
            env = _make_env(spec)
        except Exception as exc:  # missing package, unregistered id, ...
            if role == "evaluation environment" and eval_env_kwargs:
                raise DatasetError(
                    f"dataset {dataset_id!r}: its evaluation environment {spec.id} cannot be "
                    f"made with dataset.eval_env_kwargs={dict(eval_env_kwargs)} "
                    f"({type(exc).__name__}: {exc}); fix or drop them"
                ) from None
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
            _check_action_units(dataset, dataset_id, env.action_space, role, spec.id)
        finally:
            env.close()
        made[role] = spec
    return made["environment"], made["evaluation environment"]


def _check_action_units(
    dataset: minari.MinariDataset, dataset_id: str, env_space: Any, role: str, env_id: str
) -> None:
    """Refuse data whose declared action bounds are not its environment's: the stored actions
    are then in other units (normalised before writing, say), and a policy trained on them would
    act on the wrong scale where it is evaluated (a [-1, 1] policy in Pendulum's [-2, 2] uses
    half the torque; the other way round, every action is halved)."""
    data_space = getattr(dataset, "action_space", None)
    if not (isinstance(data_space, gym.spaces.Box) and isinstance(env_space, gym.spaces.Box)):
        return
    if data_space.shape != env_space.shape:
        return  # the size check speaks
    low, high = np.asarray(data_space.low, float), np.asarray(data_space.high, float)
    env_low, env_high = np.asarray(env_space.low, float), np.asarray(env_space.high, float)
    if np.allclose(low, env_low, rtol=1e-5, atol=1e-6) and np.allclose(
        high, env_high, rtol=1e-5, atol=1e-6
    ):
        return
    raise DatasetError(
        f"dataset {dataset_id!r} declares actions in [{_bounds(low)}, {_bounds(high)}] but its "
        f"{role} {env_id} acts in [{_bounds(env_low)}, {_bounds(env_high)}]: the stored "
        "actions are in other units than the environment's (normalised before writing?), and a "
        "policy trained on them would act on the wrong scale there. Store the actions as the "
        "environment takes them, with its action space, or store the env spec with the wrapper "
        "that maps them (e.g. gymnasium's RescaleAction)"
    )


def _bounds(values: np.ndarray) -> str:
    """One bound as a number, per-dimension bounds as a list."""
    flat = values.ravel()
    if np.all(flat == flat[0]):
        return f"{flat[0]:g}"
    return "(" + ", ".join(f"{v:g}" for v in flat) + ")"


def clip_actions(dataset_id: str, action: np.ndarray, policy: str) -> np.ndarray:
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


# Minari datasets whose stored reference returns are known not to be D4RL's scale; a run on
# them is warned, with the reason (id prefix -> what is known)
REFERENCE_CAVEATS: dict[str, str] = {
    "D4RL/antmaze/": (
        "Minari's AntMaze evaluation environment is a continuing task (an episode does not end "
        "at the goal) and its reference returns were measured there, so the normalised score "
        "compares the time spent at the goal with Minari's expert's; D4RL scores AntMaze by the "
        "share of episodes that reach the goal (the DIVO paper's 81.1 is on that scale): do not "
        "set the two side by side, or score as D4RL does with "
        "'dataset.eval_env_kwargs={continuing_task: false}' 'dataset.ref_scores=[0,1]'"
    ),
    "D4RL/pen/": (
        "Minari's pen reference returns were measured in 100-step episodes while its evaluation "
        "environment runs 200 (Minari issue #303, open), which roughly doubles the normalised "
        "score against D4RL's pen tables"
    ),
}


def check_reference_pair(low: float, high: float, what: str, fix: str) -> None:
    """A normalised score 100 (r - random) / (expert - random) needs finite references with the
    expert's above the random policy's: reversed, a policy that improves would score lower."""
    if not (np.isfinite(low) and np.isfinite(high)):
        raise DatasetError(f"{what}: the reference returns must be finite numbers; {fix}")
    if high <= low:
        raise DatasetError(
            f"{what}: the expert's reference return must be above the random policy's "
            f"(random {low:g}, expert {high:g}; reversed or equal, a better policy would not "
            f"score higher); {fix}"
        )


def reference_scores(
    dataset: minari.MinariDataset,
    env_spec: EnvSpec | None,
    given: Sequence[float] | None = None,
) -> tuple[float | None, float | None, str | None]:
    """``(ref_min, ref_max, source)``: the ``given`` pair (``dataset.ref_scores``; source
    ``"given"``), else the dataset's stored reference returns (source ``"dataset"``), else
    D4RL v2's for an environment of the same name (source ``"D4RL <Name>-v2"``: returns
    measured on D4RL's data and environment version, not this dataset's; the loader warns),
    else none."""
    if given is not None:
        try:
            low, high = (float(x) for x in given)
        except (TypeError, ValueError):
            raise DatasetError(
                f"dataset.ref_scores={given!r} must be two numbers [random, expert] (the returns "
                "scored 0 and 100), e.g. [0, 1] for D4RL's AntMaze success"
            ) from None
        check_reference_pair(low, high, f"dataset.ref_scores={list(given)!r}", "fix the pair")
        return low, high, "given"
    metadata = dataset.storage.metadata
    ref_min, ref_max = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    if (ref_min is None) != (ref_max is None):
        stored, missing = ("ref_min_score", "ref_max_score")[:: 1 if ref_min is not None else -1]
        raise DatasetError(
            f"dataset {dataset.spec.dataset_id!r} stores {stored} but not {missing}: a "
            "normalised score needs both; give them with dataset.ref_scores=[random, expert]"
        )
    if ref_min is not None and ref_max is not None:
        try:
            low, high = float(ref_min), float(ref_max)
        except (TypeError, ValueError):
            low = high = float("nan")
        check_reference_pair(
            low,
            high,
            f"dataset {dataset.spec.dataset_id!r} stores ref_min_score={ref_min!r}, "
            f"ref_max_score={ref_max!r}",
            "give the right ones with dataset.ref_scores=[random, expert]",
        )
        return low, high, "dataset"
    spec = env_spec or dataset.env_spec
    if spec is not None and spec.name in D4RL_REFERENCE_SCORES:
        return (*D4RL_REFERENCE_SCORES[spec.name], f"D4RL {spec.name}-v2")
    return None, None, None


def reference_warnings(dataset_id: str, references: tuple, env_spec: EnvSpec | None) -> list[str]:
    """What a user must know before reading a normalised score on ``dataset_id`` beside
    published tables: D4RL's references borrowed for data that store none, or a Minari
    dataset whose stored references are known to be off D4RL's scale."""
    ref_min, ref_max, source = references
    notes = []
    if source is not None and source.startswith("D4RL "):
        env = env_spec.id if env_spec is not None else "its environment"
        notes.append(
            f"dataset {dataset_id} stores no reference returns: its normalised score uses "
            f"{source}'s (random {ref_min:g}, expert {ref_max:g}), measured on D4RL's data "
            f"in D4RL's environment version, not on these data in {env}; the score is on "
            "D4RL's scale only as far as the two environments agree (write the dataset's own "
            "with ref_min_score/ref_max_score to score against them)"
        )
    for prefix, caveat in REFERENCE_CAVEATS.items():
        if source == "dataset" and dataset_id.startswith(prefix):
            notes.append(f"dataset {dataset_id}: {caveat}")
    return notes
