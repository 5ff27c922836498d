"""The critic check of a saved run, again: ``divo evaluate <checkpoint> --critic``.

A run's metrics.csv holds the critic check of each evaluation it made (docs/runs.md, "The
critic check"). This module makes it for a checkpoint after the fact: with more episodes, with
another evaluation seed, or for a run trained before the check existed. A checkpoint holds the
critic (a policy.pt does not); the run's dataset must be loadable as it was in training, since
the check needs its reward transform and its environment.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from divo.agents.builder import build_agent
from divo.agents.checkpoints import load_checkpoint
from divo.agents.evaluate import evaluate_policy
from divo.agents.policy_io import find_policy_file
from divo.agents.runs import (
    critic_aggregate,
    critic_overestimation,
    load_run_data,
    run_critic_check,
)
from divo.agents.runtime import resolve_device, separate_rng
from divo.agents.trust import Trust, check_config
from divo.errors import CheckpointError


def recheck_critic(
    path: str | Path,
    *,
    episodes: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    trust: Trust = None,
) -> dict[str, Any]:
    """Evaluate the policy of a checkpoint (a run directory: its newest) for ``episodes``
    episodes from environment seed ``seed`` (by default as the run's own evaluations: its
    ``train.eval_episodes``, from its seed + 100) and set its critic's Q (min of its heads, or
    their mean where the agent's updates average them) on the policy's own steps against the
    discounted return that followed
    (:func:`divo.agents.evaluate.critic_calibration`, with the run's reward transform and the
    data's reward ceiling). Returns the evaluation's result with ``critic`` (the check's
    numbers, None when the agent has no twin critic), ``critic_q`` (how its heads were read:
    ``"min"``, or ``"mean"`` for FQL's ``q_agg=mean``) and ``critic_alarm``
    (:func:`divo.agents.runs.critic_overestimation`, None when it is quiet)."""
    file = _checkpoint_file(path)
    ckpt = load_checkpoint(file)
    saved = ckpt.get("config")
    check_config(saved, trust, str(file))  # before anything it names is built
    dev = resolve_device(device)
    cfg = OmegaConf.create(saved)
    # by default as the run's own evaluations: its eval_episodes, from its seed + 100
    episodes = int(cfg.train.eval_episodes or 10) if episodes is None else int(episodes)
    seed = int(cfg.seed) + 100 if seed is None else int(seed)
    log = logging.getLogger("divo.train")  # the data's summary line is training's, not ours
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        data, _ = load_run_data(cfg, dev)
    finally:
        log.setLevel(level)
    if data is None or not data.can_evaluate:
        raise CheckpointError(
            f"{file}: the run's dataset ({cfg.dataset.get('id')}) has no environment to "
            "evaluate in, so its critic cannot be checked against returns"
        )
    try:
        obs_dim, act_dim = ckpt.get("observation_dim"), ckpt.get("action_dim")
        if (obs_dim, act_dim) != (data.observation_dim, data.action_dim):
            raise CheckpointError(
                f"{file} was trained on observation/action sizes {obs_dim}/{act_dim} but "
                f"{data.dataset_id} now has {data.observation_dim}/{data.action_dim}"
            )
        before = ckpt.get("data_fingerprint") or ""
        if before.startswith("sha256:") and before != data.fingerprint:
            raise CheckpointError(
                f"{file} was trained on other data than {data.dataset_id} holds now "
                f"(fingerprint {before[:19]}... then, {str(data.fingerprint)[:19]}... now): "
                "the check's reward scale and returns would not be the run's; restore the data "
                "it was trained on"
            )
        agent = build_agent(
            cfg,
            observation_dim=obs_dim,
            action_dim=act_dim,
            obs_mean=data.obs_mean,
            obs_std=data.obs_std,
            device=dev,
        )
        agent.load_training_state(ckpt["agent"])
        agent.eval()
        with separate_rng():
            result = evaluate_policy(
                agent.policy,
                data.make_env,
                episodes=episodes,
                seed=seed,
                device=dev,
                ref_min_score=data.ref_min_score,
                ref_max_score=data.ref_max_score,
                record=True,
                score=data.score,
                envs=data.evaluation_envs(episodes),
            )
        trajectories = result.pop("trajectories")
        result["critic"] = run_critic_check(agent, data, cfg, trajectories, dev)
        result["critic_q"] = critic_aggregate(agent)  # how the heads were read: min or mean
    finally:
        data.close()
    result["critic_alarm"] = critic_overestimation(result["critic"] or {})
    result["source"] = str(file)
    result["step"] = ckpt.get("step")
    result["recipe"] = cfg.get("recipe")
    result["dataset_id"] = data.dataset_id
    return result


def _checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's newest; a policy.pt is refused (no critic)."""
    path = Path(path)
    if path.is_dir():
        ckpts = sorted((path / "checkpoints").glob("step_*.pt"))
        if not ckpts:
            raise CheckpointError(
                f"{path} holds no checkpoints/step_*.pt: the critic check needs a checkpoint "
                "(a policy.pt holds the policy only)"
            )
        return ckpts[-1]
    file = find_policy_file(path)
    if file.name == "policy.pt" or not file.is_file():
        raise CheckpointError(
            f"{file} is not a checkpoint: the critic check needs one (checkpoints/step_*.pt "
            "of the run), a policy.pt holds the policy only"
        )
    return file


__all__ = ["recheck_critic"]
