"""What a training run does around its updates, shared by the single-seed loop
(:mod:`divo.agents.train`) and the stacked-seed one (:mod:`divo.agents.vectorized`): checking
the settings, loading the data, evaluating, the progress bar and ETA, the result.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from divo.agents.builder import lr_schedule_record
from divo.agents.checkpoints import Checkpointer, config_differences, what_trains
from divo.agents.evaluate import (
    EndlessEpisodeError,
    critic_calibration,
    evaluate_policy,
    normalized_score,
)
from divo.agents.logging import MetricsLogger, check_backend
from divo.agents.runtime import (
    device_name,
    separate_rng,
)
from divo.config import dataset_settings
from divo.data.load import OfflineData, load_offline_data
from divo.errors import ConfigError, DivoError, first_few
from divo.objectives.critic import TwinQ

_log = logging.getLogger("divo.train")


def validate_config(cfg: DictConfig) -> None:
    t = cfg.train
    for key in ("steps", "batch_size", "eval_every", "log_every", "checkpoint_every"):
        value = t.get(key)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"train.{key}={value!r} must be a positive integer; fix the override")
    if not isinstance(t.eval_episodes, int) or t.eval_episodes < 0:
        raise ConfigError(f"train.eval_episodes={t.eval_episodes!r} must be an integer >= 0")
    check_backend(cfg.logger.backend)
    num_seeds = t.get("num_seeds", 1)
    if not isinstance(num_seeds, int) or isinstance(num_seeds, bool) or num_seeds <= 0:
        raise ConfigError(
            f"train.num_seeds={num_seeds!r} must be a positive integer (1: one seed; N: seeds "
            "seed..seed+N-1 in one process)"
        )
    seed = cfg.get("seed")
    if not _is_int(seed) or seed < 0:  # evaluation environments are seeded seed + 100 + i
        raise ConfigError(f"seed={seed!r} must be an integer >= 0; fix the override")
    for key in ("threads", "keep_checkpoints"):
        value = t.get(key)
        if value is not None and (not _is_int(value) or value < 0):
            raise ConfigError(f"train.{key}={value!r} must be an integer >= 0; fix the override")
    for key in ("reward_scale", "reward_shift"):
        value = cfg.dataset.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is not None and not (number and math.isfinite(value)):
            raise ConfigError(f"dataset.{key}={value!r} must be a finite number; fix the override")
    normalize = cfg.get("normalize_observations", True)
    if not isinstance(normalize, bool):
        raise ConfigError(
            f"normalize_observations={normalize!r} must be true or false; fix the override"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _evaluate(agent, data, cfg, device) -> dict[str, Any] | None:
    if data is None or cfg.train.eval_episodes == 0:
        return None
    if not data.can_evaluate:
        return None
    policy = agent.policy
    policy.eval()
    with separate_rng():  # a sampling policy's draws never reach the training stream
        result = evaluate_policy(
            policy,
            data.make_env,
            episodes=cfg.train.eval_episodes,
            seed=cfg.seed + 100,  # method.md: eval env seed = seed + 100
            device=device,
            ref_min_score=data.ref_min_score,
            ref_max_score=data.ref_max_score,
            record=True,
            score=data.score,
            envs=data.evaluation_envs(cfg.train.eval_episodes),
        )
    trajectories = result.pop("trajectories")
    try:
        result["critic"] = run_critic_check(agent, data, cfg, trajectories, device)
    except Exception as exc:  # noqa: BLE001 - a diagnostic never costs the score
        warnings.warn(
            f"the critic's check on the evaluation rollouts failed ({type(exc).__name__}: "
            f"{exc}); the score stands",
            stacklevel=2,
        )
        result["critic"] = None
    return result


def critic_aggregate(agent) -> str:
    """How the agent's own updates read its twin critic: ``"mean"`` for a critic loss that
    averages the heads (FQL's ``q_agg=mean``, its setting on OGBench), else ``"min"``. The
    critic check reads Q the same way, so it checks the value the actor and the target use."""
    return (
        "mean" if getattr(getattr(agent, "critic_loss", None), "q_agg", "min") == "mean" else "min"
    )


def run_critic_check(agent, data, cfg, trajectories, device) -> dict[str, float] | None:
    """The online critic on the evaluation rollouts, its heads read as the agent's updates read
    them (min(Q1, Q2), or their mean for FQL's ``q_agg=mean``: :func:`critic_aggregate`),
    against the discounted return in training-reward units (:func:`critic_calibration`); None
    without a twin critic."""
    critic, normalizer = getattr(agent, "critic", None), getattr(agent, "normalizer", None)
    if not isinstance(critic, TwinQ) or normalizer is None:
        return None
    if critic_aggregate(agent) == "mean":

        def q_value(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
            return critic(normalizer(obs), act).mean(dim=0)
    else:

        def q_value(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
            return critic.min_q(normalizer(obs), act)

    factor = float(cfg.dataset.reward_scale) * float(data.reward_factor)
    shift = float(cfg.dataset.reward_shift)
    reward_max = getattr(data, "reward_max", None)
    if reward_max is not None:  # an upper bound stays one only under an increasing transform
        reward_max = factor * reward_max + shift if factor >= 0 else None
    was_training = critic.training
    critic.eval()
    try:
        return critic_calibration(
            trajectories,
            q_value,
            gamma=float(cfg.critic.loss.gamma),
            reward_transform=lambda r: factor * r + shift,
            reward_max=reward_max,
            device=device,
        )
    finally:
        critic.train(was_training)


def load_recipe_data(cfg: DictConfig, device: str | torch.device = "cpu") -> OfflineData:
    """The dataset of a composed recipe as ``divo train`` trains on it: every ``dataset.*``
    setting applied (the reward transform, ``return_range``, action bounds, observation keys,
    source, folder) and ``train.batch_size``. ``divo.load_offline_data(cfg)`` is this."""
    if cfg.dataset.get("id") is None:
        raise ConfigError("the recipe's dataset.id is null: there is no dataset to load")
    return load_offline_data(
        cfg.dataset.id,
        device=device,
        batch_size=cfg.train.batch_size,
        reward_scale=cfg.dataset.reward_scale,
        reward_shift=cfg.dataset.reward_shift,
        return_range=cfg.dataset.get("return_range"),
        download=cfg.dataset.get("download", True),
        action_bounds=cfg.dataset.get("action_bounds", "rescale"),
        observation_keys=_observation_keys(cfg),
        source=cfg.dataset.get("source", "auto"),
        data_dir=cfg.dataset.get("dir"),
        files=cfg.dataset.get("files", "auto"),
        generate=cfg.dataset.get("generate", True),
        eval_env_kwargs=_container(cfg.dataset.get("eval_env_kwargs")),
        ref_scores=_container(cfg.dataset.get("ref_scores")),
    )


def _container(value: Any) -> Any:
    """A config node as plain Python (dict / list), None as None."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def load_run_data(cfg: DictConfig, device: torch.device) -> tuple[OfflineData | None, float | None]:
    """The recipe's dataset on ``device`` (None with ``dataset.id=null``) and the normalised
    score of its behaviour policy."""
    data, behavior_score = None, None
    if cfg.dataset.get("id") is not None:
        data = load_recipe_data(cfg, device)
        behavior_score = normalized_score(
            data.behavior_return, data.ref_min_score, data.ref_max_score
        )
        if data.provenance:
            _log.info("data %s: %s", data.dataset_id, data.provenance)
        _log.info(
            "data %s: %d transitions in %d episodes; behaviour: mean episode return %.1f%s",
            data.dataset_id,
            data.num_transitions,
            data.num_episodes,
            data.behavior_return,
            f" (normalized score {behavior_score:.1f})" if behavior_score is not None else "",
        )
        _log.info("data %s: fingerprint %s", data.dataset_id, data.fingerprint)
        if data.score == "return" and data.ref_min_score is not None:
            _log.info(
                "data %s: normalised score = 100 (return - %g) / (%g - %g), reference returns "
                "from %s",
                data.dataset_id,
                data.ref_min_score,
                data.ref_max_score,
                data.ref_min_score,
                "the dataset" if data.ref_source == "dataset" else data.ref_source,
            )
        if data.reward_factor != 1.0:  # IQL's reward normalisation
            _log.info(
                "rewards x %.4g (dataset.return_range=%s: max - min episode return rescaled)",
                data.reward_factor,
                cfg.dataset.get("return_range"),
            )
    return data, behavior_score


def buffer_reward_map(cfg: DictConfig, data: OfflineData | None) -> tuple[float, float] | None:
    """``(a, b)``: training reads ``a * r + b`` for each reward ``r`` a user's replay buffer
    stores, the recipe's ``dataset.reward_scale``, ``reward_shift`` and ``return_range`` applied
    as :func:`divo.data.load.load_offline_data` applies them to a dataset's rewards (the
    buffer holds rewards as the environment paid them); None when that is the identity.
    ``return_range`` needs the data's episode returns: with ``dataset.id=null`` it is refused."""
    scale = float(cfg.dataset.get("reward_scale", 1.0))
    shift = float(cfg.dataset.get("reward_shift", 0.0))
    return_range = cfg.dataset.get("return_range")
    if data is not None:
        factor = float(data.reward_factor)
    elif return_range is None:
        factor = 1.0
    else:
        raise ConfigError(
            f"dataset.return_range={return_range} rescales rewards by the data's episode "
            "returns, which divo reads from dataset.id; with dataset.id=null and a replay "
            "buffer set dataset.return_range=null (and scale the stored rewards yourself, or "
            "with dataset.reward_scale), or name the dataset"
        )
    if scale * factor == 1.0 and shift == 0.0:
        return None
    _log.info(
        "the replay buffer's rewards r are trained on as %.6g r %+.6g (dataset.reward_scale=%s, "
        "reward_shift=%s, return_range=%s: as a dataset's rewards are)",
        scale * factor,
        shift,
        cfg.dataset.get("reward_scale", 1.0),
        cfg.dataset.get("reward_shift", 0.0),
        return_range,
    )
    return scale * factor, shift


def log_dataset_settings(cfg: DictConfig) -> None:
    """Say which of the recipe's settings came from a table looked up by dataset id
    (:func:`divo.config.dataset_settings`), and warn when a table the reference tunes per task
    (one with a ``default`` entry: ``fql.tasks``, ``diffusion_ql.tasks``) has no entry for this
    dataset: the run then uses settings nobody chose for it, e.g. FQL's alpha 10 where FQL's
    README sets 300 on every cube task it ran."""
    dataset_id = cfg.dataset.get("id")
    for record in dataset_settings(cfg):
        shown = ", ".join(f"{path}={value}" for path, value in record["values"].items())
        if not shown:
            continue
        table = record["table"]
        if record["entry"]:
            _log.info("settings for %s from %s: %s", dataset_id, table, shown)
        elif record["tuned"]:
            warnings.warn(
                f"{table} has no entry for dataset {dataset_id}: this run uses the table's "
                f"default ({shown}), settings its reference tunes per task; set them for this "
                f"dataset (e.g. {next(iter(record['values']))}=...) or add an entry "
                f"{table}.{dataset_id}",
                stacklevel=2,
            )
        else:
            _log.info(
                "settings for %s: %s has no entry, the recipe's own (%s)", dataset_id, table, shown
            )


def _observation_keys(cfg: DictConfig) -> list[str] | None:
    """``dataset.observation_keys`` as a list (a single key may be given bare), or None."""
    keys = cfg.dataset.get("observation_keys")
    if keys is None:
        return None
    return [str(keys)] if isinstance(keys, str) else [str(key) for key in keys]


# The critic check's alarm: after step 0, the critic's Q on the evaluation policy's own steps
# exceeds the discounted return that followed by more than this share of the larger of the two
# in size. Chosen on the committed locomotion cells: of their 120 evaluations after step 0 that
# logged the check, one rings it (0.68, a run whose score had fallen to 11.7) and the others
# stay at or below 0.21.
OVERESTIMATION_ALARM = 0.5


def critic_overestimation(row: dict[str, Any]) -> dict[str, Any] | None:
    """The critic check's alarm on one evaluation's metrics (a metrics.csv row or the row
    being logged): ``{"q", "return_to_go", "excess", "bound"}`` when the critic overestimates
    the deployed policy by more than ``OVERESTIMATION_ALARM`` of the larger of Q and the return
    in size, else None. ``bound``: the return is an upper bound (``eval_q_bias_min``, every
    episode ran into its time limit with only the most the missing tail could pay added), so
    the excess is at least this much; else it is the exact check (``eval_q_bias``)."""

    checks = (
        (("eval_q", "eval_return_to_go", "eval_q_bias"), False),
        (("eval_q_all", "eval_return_to_go_max", "eval_q_bias_min"), True),
    )
    for keys, bound in checks:
        q, go, excess = (_float(row.get(key)) for key in keys)  # a CSV string or a number
        if q is None or go is None or excess is None:
            continue
        if excess > OVERESTIMATION_ALARM * max(abs(q), abs(go)):
            return {"q": q, "return_to_go": go, "excess": excess, "bound": bound}
    return None


def critic_alarms(run_dir: Path) -> list[dict[str, Any]]:
    """Every evaluation after step 0 in ``<run_dir>/metrics.csv`` where the critic check's alarm
    rang (:func:`critic_overestimation`), in step order, for result.json."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return []
    alarms = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if int(row["step"]) == 0:
                continue
            found = critic_overestimation(row)
            if found is not None:
                alarms.append({"step": int(row["step"]), **found})
    return alarms


# The data-level guard: after step 0, the deployed policy's normalised score is below this share
# of its dataset's own level (the normalised mean episode return of the data's episodes). Chosen
# on the medium-expert HalfCheetah design data of issue 35 (docs/results/design/medium_expert),
# where divo and uniform_weight sit at 8-31 from 5k to 25k steps, against the data's 67.4; of
# the 387 evaluations after step 0 of the locomotion study's cells and the design cells before
# it, it rings on two (iql at 5k steps, on its way up).
BELOW_DATA_LEVEL = 0.5


def data_level(data: OfflineData | None) -> float | None:
    """The normalised score of the data's own episodes, when it is a level the deployed policy
    can be held to: None for data without score references or a positive level, and for
    goal-reaching data scored by success (OGBench's play data does not try the task)."""
    if data is None or data.score != "return" or data.behavior_return is None:
        return None
    level = normalized_score(data.behavior_return, data.ref_min_score, data.ref_max_score)
    return level if level is not None and level > 0 else None


def below_data_level(score: Any, level: float | None) -> bool:
    """The data-level guard on one evaluation (:data:`BELOW_DATA_LEVEL`)."""
    score = _float(score)
    return score is not None and level is not None and score < BELOW_DATA_LEVEL * level


def data_level_alarms(run_dir: Path, level: float | None) -> list[dict[str, Any]]:
    """Every evaluation after step 0 in ``<run_dir>/metrics.csv`` whose score fell below
    :data:`BELOW_DATA_LEVEL` of the data's ``level``, in step order, for result.json."""
    path = Path(run_dir) / "metrics.csv"
    if level is None or not path.exists():
        return []
    with path.open(newline="") as f:
        return [
            {"step": int(row["step"]), "score": float(row["normalized_score"])}
            for row in csv.DictReader(f)
            if int(row["step"]) > 0 and below_data_level(row.get("normalized_score"), level)
        ]


def check_finite(row: dict[str, float], step: int, checkpointer: Checkpointer) -> None:
    bad = [k for k, v in row.items() if not math.isfinite(v)]
    if bad:
        raise DivoError(
            f"non-finite {', '.join(bad)} at step {step}; lower the learning rates or "
            f"check the data ({checkpointer.last_good()})"
        )


def evaluate_into_row(
    agent, data, cfg, device, step: int, row: dict[str, Any], log: logging.Logger = _log
) -> dict[str, Any] | None:
    """Evaluate (a failure is a warning and ``eval_failed`` in the row), add the scores to the
    metrics row and log them; returns the evaluation (None when none ran)."""
    try:
        last_eval = _evaluate(agent, data, cfg, device)
    except EndlessEpisodeError:  # every later evaluation would hang as long: stop here
        raise
    except Exception as exc:  # noqa: BLE001 - never lose training to an eval failure
        warnings.warn(
            f"evaluation at step {step} failed ({type(exc).__name__}: {exc}); training goes on",
            stacklevel=2,
        )
        row["eval_failed"] = 1.0
        return None
    if last_eval is not None:
        row["eval_return_mean"] = last_eval["return_mean"]
        row["eval_return_std"] = last_eval["return_std"]
        row["normalized_score"] = last_eval["normalized_score"]
        row["eval_episode_length_mean"] = last_eval["episode_length_mean"]
        if last_eval.get("success_rate") is not None:
            row["eval_success_rate"] = last_eval["success_rate"]
        row.update(last_eval.get("critic") or {})
        score = last_eval["normalized_score"]
        success = last_eval.get("success_rate")
        if success is None:
            log.info(
                "step %d: normalized score %s (return %.2f +- %.2f over %d episodes)",
                step,
                f"{score:.1f}" if score is not None else "n/a",
                last_eval["return_mean"],
                last_eval["return_std"],
                last_eval["episodes"],
            )
        else:  # goal-reaching tasks: how many episodes succeeded, and how fast
            log.info(
                "step %d: normalized score %s (success in %d of %d episodes; return %.2f +- "
                "%.2f, mean episode length %.1f)",
                step,
                f"{score:.1f}" if score is not None else "n/a",
                round(success * last_eval["episodes"]),
                last_eval["episodes"],
                last_eval["return_mean"],
                last_eval["return_std"],
                last_eval["episode_length_mean"],
            )
        critic = last_eval.get("critic") or {}
        how = critic_aggregate(agent)
        if "eval_q_bias" in critic:
            log.info(
                "step %d: critic %s Q %.2f, discounted return %.2f on the policy's own steps "
                "(Q - return %+.2f)",
                step,
                how,
                critic["eval_q"],
                critic["eval_return_to_go"],
                critic["eval_q_bias"],
            )
        if "eval_q_bias_min" in critic:
            log.info(
                "step %d: critic %s Q %.2f on all the policy's steps, discounted return that "
                "followed at most %.2f (Q - return >= %+.2f)",
                step,
                how,
                critic["eval_q_all"],
                critic["eval_return_to_go_max"],
                critic["eval_q_bias_min"],
            )
        level = data_level(data)
        if step > 0 and below_data_level(score, level):
            log.warning(
                "step %d: the policy scores %.1f, below half its data's own level (%.1f: the "
                "mean episode return of the dataset, normalised); the actor has left what the "
                "data does (see docs/runs.md, 'The data-level guard')",
                step,
                score,
                level,
            )
        alarm = critic_overestimation(critic) if step > 0 else None
        if alarm is not None:
            log.warning(
                "step %d: the critic overestimates the policy it is checked on by %s%.2f (Q %.2f "
                "against a discounted return of %s%.2f on the policy's own evaluation steps): an "
                "actor that follows this critic's gradient is steered toward actions it "
                "overvalues (see docs/runs.md, 'The critic check')",
                step,
                "at least " if alarm["bound"] else "",
                alarm["excess"],
                alarm["q"],
                "at most " if alarm["bound"] else "",
                alarm["return_to_go"],
            )
    return last_eval


def best_evaluation(run_dir: Path) -> dict[str, Any] | None:
    """The best of the evaluations in ``<run_dir>/metrics.csv`` (by normalised score, else by
    return): ``{"note", "step", "return_mean", "normalized_score"}``, or None without any.
    Selecting the best checkpoint on evaluation returns flatters a method (Diffusion-QL's paper
    reports it); result.json's headline is the final policy's."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return None
    best, best_key = None, None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            ret, score = _float(row.get("eval_return_mean")), _float(row.get("normalized_score"))
            if ret is None or int(row["step"]) == 0:  # step 0 (eval_at_start) trained nothing
                continue
            key = score if score is not None else ret
            if best_key is None or key > best_key:
                best_key = key
                best = {"step": int(row["step"]), "return_mean": ret, "normalized_score": score}
    if best is None:
        return None
    note = "best evaluation during training (model selection); not the final policy's score"
    return {"note": note, **best}


def _float(text: str | float | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def evaluate_at_start(
    agent, data, cfg, device, metrics: MetricsLogger, log: logging.Logger = _log
) -> None:
    """``train.eval_at_start``: evaluate the untrained policy, as step 0 of metrics.csv and the
    log. Its random draws are undone (:func:`separate_rng`), so training is the same with or
    without it; it is never the run's result."""
    row: dict[str, Any] = {}
    evaluate_into_row(agent, data, cfg, device, 0, row, log)
    agent.train()
    if row:
        metrics.log(0, row)


def portable_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it, else as given: a
    result.json that a user commits with their runs names no folder of their machine."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_result(
    cfg: DictConfig,
    data: OfflineData | None,
    behavior_score: float | None,
    last_eval: dict[str, Any] | None,
    wall_clock_s: float,
    device: torch.device,
    run_dir: Path,
    data_fingerprint: str | None = None,
) -> dict[str, Any]:
    """The run's ``result.json`` contents; ``data_fingerprint``: that of the transitions it
    trained on (None when they came from a user's replay buffer)."""
    level = data_level(data)
    result = {
        "recipe": cfg.get("recipe"),
        "dataset_id": data.dataset_id if data is not None else None,
        "seed": int(cfg.seed),
        "steps": int(cfg.train.steps),
        "return_mean": last_eval["return_mean"] if last_eval else None,
        "return_std": last_eval["return_std"] if last_eval else None,
        "normalized_score": last_eval["normalized_score"] if last_eval else None,
        "episodes": last_eval["episodes"] if last_eval else 0,
        "behavior_return": data.behavior_return if data is not None else None,
        "behavior_normalized_score": behavior_score,
        # the returns the normalised scores are measured against, and where they come from
        # ("dataset", or D4RL's for an environment of the same name): divo report refuses to
        # pool scores of one dataset measured against different ones
        "ref_min_score": data.ref_min_score if data is not None else None,
        "ref_max_score": data.ref_max_score if data is not None else None,
        "ref_source": data.ref_source if data is not None else None,
        # the transitions trained on (OfflineData.fingerprint): runs of one dataset id with
        # different fingerprints trained on different data, and divo report refuses to pool them
        "data_fingerprint": data_fingerprint,
        "wall_clock_s": round(wall_clock_s, 3),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "run_dir": portable_path(run_dir),
        # model selection, as Diffusion-QL's paper reports: the best evaluation during training,
        # beside (never instead of) the final policy's numbers above
        "best_during_training": best_evaluation(run_dir),
        # evaluations where the critic overestimated the deployed policy by more than
        # OVERESTIMATION_ALARM of its scale (each one also a warning in train.log)
        "critic_overestimation": critic_alarms(run_dir),
        # evaluations where the policy scored below BELOW_DATA_LEVEL of its data's own level
        # (each one also a warning in train.log); empty without a level to hold it to
        "data_level": level,
        "below_data_level": data_level_alarms(run_dir, level),
        # each scheduled learning rate's horizon (a reference run's length, or compressed into
        # this run's steps) and the share of its starting rate the last update used
        "lr_schedules": lr_schedule_record(cfg),
    }
    if data is not None and data.score == "success":  # goal-reaching data (OGBench)
        result["score"] = "success rate (percent of evaluation episodes)"
        result["success_rate"] = last_eval.get("success_rate") if last_eval else None
        result["episode_length_mean"] = last_eval["episode_length_mean"] if last_eval else None
        result["data_provenance"] = data.provenance
    return result


def check_steps(cfg: DictConfig, start_step: int, run_dir: Path) -> None:
    """Refuse a run whose checkpoint is already past ``train.steps`` (before any write)."""
    steps = int(cfg.train.steps)
    if start_step > steps:
        raise ConfigError(
            f"{run_dir} is already at step {start_step} > train.steps={steps}; pass "
            f"train.steps={start_step} or more to extend it (the run was left as it is)"
        )


def progress_bar(cfg: DictConfig, start_step: int, what: str):
    """The progress bar over ``train.steps`` and the context that sends log lines (the console
    handlers of the root and ``divo`` loggers) above it instead of through it."""
    bar = tqdm(
        initial=start_step,
        total=int(cfg.train.steps),
        disable=not cfg.train.progress,
        desc=f"{cfg.get('recipe')} {what}".strip(),
        unit="step",
        mininterval=1.0,
        dynamic_ncols=True,
    )
    # only the loggers that print to the console: tqdm's redirect gives every logger it is
    # handed a console handler of its own, so a divo line would print once for ``divo`` and
    # again for the root logger it propagates to
    printing = [lg for lg in (logging.root, logging.getLogger("divo")) if _prints(lg)]
    redirect = (
        logging_redirect_tqdm(printing)
        if cfg.train.progress and printing
        else contextlib.nullcontext()
    )
    return bar, redirect


def _prints(logger: logging.Logger) -> bool:
    """Whether ``logger`` has a handler of its own that writes to the console."""
    consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return any(
        isinstance(h, logging.StreamHandler)
        and not isinstance(h, logging.FileHandler)
        and h.stream in consoles
        for h in logger.handlers
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Eta:
    """Announces the plan of a run (steps, device) before training, and once the first steps'
    rate is known the expected remaining time, evaluations included; warns when a CPU run would
    take longer than ``CPU_WARN_S``. ``update(step)`` is called after every step and costs one
    clock read until the rate is known, none after; each evaluation runs inside
    :meth:`evaluation`, which times it and keeps it out of the step rate.

    ``eval_every``: the run evaluates at every multiple of it and at the last step (as the
    training loops do). The time to go counts the evaluations left at the duration of the
    latest one (the step-0 evaluation, ``train.eval_at_start``, is the first timed); when none
    was timed yet the ETA says so, and a second line gives the total once the first is.
    Evaluations grow longer as the policy learns to stay up (an untrained Hopper falls within a
    few steps), so after each one the end is projected again, from the step rate measured so
    far and that evaluation's duration, and a projection that moved by more than
    ``REVISE_FRACTION`` of the time left (and ``REVISE_MIN_S``) is logged as a revised ETA.
    """

    WARMUP_STEPS = 10  # not timed: compilation, allocator and cache warm-up
    MEASURE_STEPS = 200  # the rate is measured over this many steps ...
    MEASURE_S = 3.0  # ... or this many seconds, whichever comes first
    CPU_WARN_S = 3 * 3600.0
    REVISE_FRACTION = 0.25
    REVISE_MIN_S = 30.0

    def __init__(
        self,
        start_step: int,
        steps: int,
        device: torch.device,
        log: logging.Logger = _log,
        *,
        eval_every: int | None = None,
    ) -> None:
        self.start, self.steps, self.device, self.log = start_step, steps, device, log
        self.eval_every = eval_every
        self._t0: float | None = None  # when timing began, moved on by each evaluation's time
        self._done = steps - start_step <= self.WARMUP_STEPS
        self._rate: float | None = None  # steps/s, once measured
        self._eval_s: float | None = None  # the latest evaluation's duration
        self._end: float | None = None  # when the last announced ETA expects the run to end
        self._total_pending = False  # the ETA was given without evaluation time
        self._warned = False
        where = f"{device} ({device_name(device)})"
        if start_step:
            plan = f"steps {start_step + 1}-{steps} ({steps - start_step} to go)"
        else:
            plan = f"{steps} steps"
        log.info("training %s on %s; ETA after the first steps", plan, where)

    def evaluations_left(self, step: int) -> int:
        """How many evaluations the run makes after ``step``."""
        if not self.eval_every or step >= self.steps:
            return 0
        every = self.eval_every
        return self.steps // every - step // every + (1 if self.steps % every else 0)

    def _left(self, step: int) -> float:
        left = (self.steps - step) / self._rate
        if self._eval_s is not None:
            left += self.evaluations_left(step) * self._eval_s
        return left

    @contextlib.contextmanager
    def evaluation(self, step: int | None = None) -> Iterator[None]:
        """Time the evaluation run inside (at ``step``; None: before training)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            now = time.perf_counter()
            self._eval_s = now - t
            if self._t0 is not None:
                self._t0 += self._eval_s  # the step rate is measured over training steps only
            if self._rate is not None and step is not None:
                self._project(step, now)

    def _project(self, step: int, now: float) -> None:
        """The end projected again after the evaluation at ``step``; logged when it moved."""
        timed = step - self.start - self.WARMUP_STEPS
        if timed > 0 and now > self._t0:
            self._rate = timed / (now - self._t0)  # every step since the warm-up
        left = self._left(step)
        pending, self._total_pending = self._total_pending, False
        moved = abs(now + left - self._end)
        if pending:
            message = "evaluations take about %s each: about %s to go in all (step %d of %d)"
        elif moved > max(self.REVISE_FRACTION * left, self.REVISE_MIN_S):
            message = (
                "ETA revised (evaluations now take about %s each): about %s to go (step %d of %d)"
            )
        else:
            return
        self._end = now + left
        self.log.info(message, _duration(self._eval_s), _duration(left), step, self.steps)
        self._warn(left, stacklevel=5)  # through _project, contextlib, to the training loop

    def update(self, step: int) -> None:
        if self._done:
            return
        done = step - self.start - self.WARMUP_STEPS
        if done <= 0:
            if done == 0:
                self._t0 = time.perf_counter()
            return
        now = time.perf_counter()
        elapsed = now - self._t0
        if done < self.MEASURE_STEPS and elapsed < self.MEASURE_S:
            return
        self._done = True
        self._rate = done / max(elapsed, 1e-9)
        left = self._left(step)
        self._end = now + left
        evals = self.evaluations_left(step)
        if not evals:
            note = ""
        elif self._eval_s is not None:
            note = f", {evals} evaluation(s) of about {_duration(self._eval_s)} included"
        else:
            note = f", plus {evals} evaluation(s), timed at the first"
            self._total_pending = True
        self.log.info(
            "%.0f steps/s: about %s to go (step %d of %d%s)",
            self._rate, _duration(left), step, self.steps, note,
        )  # fmt: skip
        self._warn(left)

    def _warn(self, left: float, stacklevel: int = 3) -> None:
        if self.device.type == "cpu" and left > self.CPU_WARN_S and not self._warned:
            self._warned = True
            warnings.warn(
                f"this CPU run of {self.steps} steps needs about {_duration(left)} more at "
                f"{self._rate:.0f} steps/s; train on a GPU (device=cuda) or set a smaller "
                "train.steps",
                stacklevel=stacklevel,
            )


def check_same_run(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse to train ``cfg`` into a folder that holds a run of other settings (its
    config.yaml): only train.*, device and logger.* may differ, as on ``divo train <run>``.
    Whatever route led there (a sweep's folder, ``hydra.run.dir``, the Python API), another
    run's checkpoints are never resumed as this one's. Raised before anything changes; so is a
    run directory that is, or lies under, a file."""
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(
                f"the run directory {run_dir} cannot be made: {folder} is a file, not a folder; "
                "give another hydra.run.dir (or run_dir)"
            )
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_file))
    except Exception as exc:  # noqa: BLE001 - unreadable: refuse rather than overwrite it
        raise ConfigError(
            f"{saved_file} cannot be read ({type(exc).__name__}); use a new run directory"
        ) from None
    ours = OmegaConf.to_container(cfg, resolve=True)
    changed = config_differences(what_trains(saved), what_trains(ours))
    if changed:
        shown = first_few(changed)
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({shown}); only train.* (but "
            "train.batch_size), device and logger.* may change when a run resumes: use a new "
            "run directory (or delete that one to start it again)"
        )


def set_aside_earlier_result(run_dir: Path) -> list[str]:
    """When a run trains on in a folder that holds a result (a finished run extended with a
    larger ``train.steps``, or trained again), move its ``result.json`` and ``policy.pt`` aside
    as ``result_at_step_<N>.json`` and ``policy_at_step_<N>.pt``: until the run finishes, the
    folder holds no result its config.yaml does not describe (``divo report`` would read the old
    one as this run's, a study count the cell done). Returns the names they were given."""
    result = run_dir / "result.json"
    if not result.is_file():
        return []
    try:
        steps = int(json.loads(result.read_text()).get("steps"))
        tag = f"at_step_{steps}"
    except Exception:  # noqa: BLE001 - unreadable: set aside all the same
        tag = "earlier"
    moved = []
    for name, new in (("result.json", f"result_{tag}.json"), ("policy.pt", f"policy_{tag}.pt")):
        if (run_dir / name).is_file():
            os.replace(run_dir / name, run_dir / new)
            moved.append(new)
    return moved


def finished_result(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The stored result of a run in ``run_dir`` that already finished ``cfg``'s steps (its
    result.json, policy.pt and a checkpoint at exactly ``train.steps``), else None."""
    path = run_dir / "result.json"
    steps = int(cfg.train.steps)
    if not (path.is_file() and (run_dir / "policy.pt").is_file()):
        return None
    if not (run_dir / "checkpoints" / f"step_{steps:09d}.pt").is_file():
        return None
    if Checkpointer(run_dir, 1).files()[-1].name != f"step_{steps:09d}.pt":
        return None  # extended beyond train.steps since: check_steps refuses it
    try:
        result = json.loads(path.read_text())
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    except Exception:  # noqa: BLE001 - unreadable: the normal resume path says what is wrong
        return None

    ours = OmegaConf.to_container(cfg, resolve=True)
    same = result.get("steps") == steps and what_trains(saved) == what_trains(ours)
    return result if same else None
