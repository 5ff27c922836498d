"""The training loop: data -> agent -> updates, with evaluation, logging and checkpoints.

``train(cfg, run_dir)`` is the Python API; ``divo train <recipe>`` (``divo.cli``) composes the
recipe with Hydra and calls it with Hydra's output directory.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDictBase
from torchrl.data import ReplayBuffer

from divo.agents.builder import build_agent
from divo.agents.checkpoints import (
    Checkpointer,
    check_resumable,
    check_trusted,
    policy_payload,
    save_policy_file,
    spec_json,
)
from divo.agents.logging import MetricAccumulator, MetricsLogger, RunLog
from divo.agents.runs import (
    Eta,
    buffer_reward_map,
    check_finite,
    check_same_run,
    check_steps,
    evaluate_at_start,
    evaluate_into_row,
    finished_result,
    load_run_data,
    log_dataset_settings,
    progress_bar,
    run_result,
    set_aside_earlier_result,
    validate_config,
)
from divo.agents.runtime import (
    resolve_device,
    seed_everything,
    set_rng_state,
)
from divo.agents.step import DeviceSampler, TrainStep, check_compile_mode, compile_options
from divo.agents.trust import Trust
from divo.agents.vectorized import train_vectorized
from divo.data.batches import (
    buffer_action_range,
    buffer_action_transform,
    buffer_fingerprint,
    buffer_observation_stats,
    buffer_sampler,
    check_batch_keys,
    check_buffer_finite,
    check_buffer_not_constant,
    check_buffer_without_dataset,
    conform_batch,
    flat_flag_keys,
    other_dtype_keys,
)
from divo.errors import ConfigError, DatasetError
from divo.files import write_json_atomic

_log = logging.getLogger("divo.train")


def given_obs_stats(
    obs_stats: tuple[torch.Tensor, torch.Tensor], obs_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``obs_stats=(mean, std)`` as two float32 vectors of the observations' size; refused when
    they have another size, are not finite or a std is not positive."""
    try:
        mean, std = (torch.as_tensor(x, dtype=torch.float32).reshape(-1) for x in obs_stats)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"obs_stats must be (mean, std), two vectors: {exc}") from None
    if mean.shape != (obs_dim,) or std.shape != (obs_dim,):
        raise ConfigError(
            f"obs_stats has sizes {tuple(mean.shape)} and {tuple(std.shape)}, but the "
            f"observations have {obs_dim} entries: pass (mean, std) of shape ({obs_dim},)"
        )
    if not bool(torch.isfinite(mean).all() and torch.isfinite(std).all()) or bool((std <= 0).any()):
        raise ConfigError(
            "obs_stats must be finite, with std > 0 (observations are divided by it; give a "
            "constant entry std 1)"
        )
    return mean, std


def train(
    cfg: DictConfig,
    run_dir: str | Path,
    *,
    replay_buffer: ReplayBuffer | None = None,
    obs_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    resume: bool = True,
    trust: Trust = None,
) -> dict[str, Any]:
    """Train the agent a recipe describes; write config, metrics, checkpoints and result.json.

    When ``run_dir`` already holds checkpoints (and ``resume``), training continues exactly
    from the newest readable one: parameters, targets, optimiser states, step counter, every RNG
    state, the sampler state and the partial metric sums are restored, so on CPU with a fixed
    seed the result equals an uninterrupted run. A checkpoint of another recipe or other data
    sizes is refused before anything on disk changes, and so is one that holds a pickled object
    or names code outside divo, gymnasium, the modules ``cfg`` names and ``trust`` (module
    names, e.g. ``["my_pkg"]``).

    Args:
        cfg: a composed recipe (see ``divo.cli.compose_recipe``).
        run_dir: where the run's files go (created).
        replay_buffer: optional TorchRL replay buffer to sample training batches from instead
            of the dataset's own; its samples must carry the TED keys (observation, action,
            next/observation, next/reward, next/terminated). Normalisation statistics and the
            evaluation environment still come from ``cfg.dataset.id`` when it is set; with
            ``dataset.id=null`` no evaluation runs, and the statistics are computed from the
            observations the buffer holds.
        obs_stats: ``(mean, std)`` of the observations, used to normalise them in place of the
            dataset's or the buffer's (logged); with or without a replay buffer.
    With ``train.num_seeds=N > 1`` the seeds ``seed .. seed+N-1`` train together in this
    process with stacked weights (:func:`divo.agents.vectorized.train_vectorized`), one complete
    run directory per seed in ``run_dir/seed<k>``; the return value then summarises the seeds.

    Returns:
        The result dictionary also written to ``result.json``.
    """
    validate_config(cfg)
    if cfg.train.get("num_seeds", 1) > 1:
        return train_vectorized(
            cfg,
            run_dir,
            replay_buffer=replay_buffer,
            obs_stats=obs_stats,
            resume=resume,
            trust=trust,
        )
    run_dir = Path(run_dir)
    if resume:
        check_same_run(cfg, run_dir)
    finished = finished_result(cfg, run_dir) if resume else None
    if finished is not None:
        with RunLog(run_dir):  # the console only: a finished run's files are left alone
            _log.info(
                "%s finished its %d steps already; its files are left as they are (pass a "
                "larger train.steps to extend it)",
                run_dir,
                finished["steps"],
            )
        return finished
    with RunLog(run_dir, lock=True) as run_log:  # a second process on run_dir is refused
        return _train(cfg, run_dir, replay_buffer, obs_stats, resume, run_log, trust)


def _train(
    cfg: DictConfig,
    run_dir: Path,
    replay_buffer: ReplayBuffer | None,
    obs_stats: tuple[torch.Tensor, torch.Tensor] | None,
    resume: bool,
    run_log: RunLog,
    trust: Trust = None,
) -> dict[str, Any]:
    """:func:`train` of one seed; nothing is written to ``run_dir`` before ``run_log.commit()``,
    which follows every check."""
    device = resolve_device(cfg.device)
    check_compile_mode(device=device, **compile_options(cfg))
    if device.type == "cpu" and cfg.train.threads:
        torch.set_num_threads(int(cfg.train.threads))
    seed_everything(int(cfg.seed))
    start = time.perf_counter()

    data, behavior_score = load_run_data(cfg, device)
    log_dataset_settings(cfg)
    if data is None and replay_buffer is None:
        raise ConfigError("dataset.id is null and no replay buffer was given; set dataset.id")
    if replay_buffer is None:  # the dataset stays on the device, indices are drawn there
        buffer = DeviceSampler(data.data, cfg.train.batch_size)
        draw = buffer.sample
    else:
        buffer = replay_buffer
        draw = buffer_sampler(replay_buffer, cfg.train.batch_size)  # batches of train.batch_size
    # the data the updates read, identified: a resume and a report check it (a user's buffer
    # by what its storage holds, when it can be read by index)
    if replay_buffer is None:
        fingerprint = data.fingerprint if data is not None else None
    else:
        fingerprint = buffer_fingerprint(replay_buffer)
        _log.info(
            "replay buffer: %d transitions, fingerprint %s (what the updates read and "
            "result.json records%s)",
            len(replay_buffer),
            fingerprint or "none: its storage cannot be read by index",
            "; the data line above names dataset.id's file" if data is not None else "",
        )
    if replay_buffer is not None and len(replay_buffer) == 0:
        raise DatasetError(
            "the replay buffer is empty: extend it with the transitions to train on first"
        )
    probe = draw()
    # a user's buffer may store rewards/flags as [B]: found once here, reshaped at each step
    flat_keys = flat_flag_keys(probe) if replay_buffer is not None else ()
    # and may store them in float64 (or rewards as integers): converted as a dataset's are
    float_keys = other_dtype_keys(probe) if replay_buffer is not None else ()
    check_batch_keys(conform_batch(probe, flat_keys, float_keys))
    if replay_buffer is not None:
        check_buffer_finite(replay_buffer, probe)
        action_range = buffer_action_range(replay_buffer, probe)  # one pass over the storage
        check_buffer_not_constant(replay_buffer, probe, action_range)
        if data is None:
            check_buffer_without_dataset(replay_buffer, probe, action_range)
    obs_dim, act_dim = probe["observation"].shape[-1], probe["action"].shape[-1]
    to_unit_actions = None
    if data is not None:
        if (obs_dim, act_dim) != (data.observation_dim, data.action_dim):
            raise DatasetError(
                f"the replay buffer's samples have observation/action sizes {obs_dim}/{act_dim} "
                f"but dataset {data.dataset_id} has {data.observation_dim}/{data.action_dim}; "
                "pass the matching dataset.id"
            )
        mean, std = data.obs_mean, data.obs_std
        if replay_buffer is not None:  # checked against the dataset's space, as the loader is
            to_unit_actions = buffer_action_transform(
                replay_buffer,
                probe,
                data.dataset_id,
                data.action_low,
                data.action_high,
                data.action_bounds,
                action_range,
            )
    if obs_stats is not None:  # the caller's statistics, whatever the data
        if not cfg.get("normalize_observations", True):
            raise ConfigError(
                f"obs_stats were given, but recipe {cfg.get('recipe')} trains on raw "
                "observations (normalize_observations=false): drop obs_stats, or set "
                "normalize_observations=true"
            )
        mean, std = given_obs_stats(obs_stats, obs_dim)
        _log.info(
            "observations normalised with the obs_stats given%s",
            f" (not those of {data.dataset_id})" if data is not None else "",
        )
    elif data is None:
        stats = buffer_observation_stats(buffer)
        if stats is None:
            warnings.warn(
                "dataset.id is null, no obs_stats were given and the replay buffer's storage "
                "cannot be read by index: observations are not normalised; pass "
                "obs_stats=(mean, std)",
                stacklevel=2,
            )
            stats = torch.zeros(obs_dim), torch.ones(obs_dim)
        else:
            _log.info(
                "observation statistics computed from the replay buffer's %d rows", len(buffer)
            )
        mean, std = stats
    if not cfg.get("normalize_observations", True):  # raw states (e.g. Diffusion-QL's code)
        mean, std = torch.zeros_like(mean), torch.ones_like(std)
    agent = build_agent(
        cfg, observation_dim=obs_dim, action_dim=act_dim, obs_mean=mean, obs_std=std, device=device
    )

    # a buffer holds rewards as the environment paid them: the recipe's reward transform
    reward_map = buffer_reward_map(cfg, data) if replay_buffer is not None else None

    def sample() -> TensorDictBase:
        batch = draw()
        if flat_keys or float_keys:
            batch = conform_batch(batch, flat_keys, float_keys)
        if to_unit_actions is not None or reward_map is not None:
            batch = batch.clone(False)  # a new TensorDict: the buffer's own stays as it is
            if to_unit_actions is not None:
                batch.set("action", to_unit_actions(batch["action"]))
            if reward_map is not None:
                scale, shift = reward_map
                batch.set(("next", "reward"), batch.get(("next", "reward")) * scale + shift)
        return batch if batch.device == device else batch.to(device)

    train_step = TrainStep(agent, sample, device=device, **compile_options(cfg))
    checkpointer = Checkpointer(run_dir, cfg.train.keep_checkpoints)
    acc = MetricAccumulator()
    start_step, last_eval, elapsed_before = 0, None, 0.0
    found = checkpointer.load_latest() if resume else None
    ckpt = None
    if found is not None:
        ckpt_file, ckpt = found
        check_trusted(ckpt, ckpt_file, cfg, spec_json(data), trust)
        check_resumable(ckpt, cfg, obs_dim, act_dim, run_dir, fingerprint)
        agent.load_training_state(ckpt["agent"])
        if ckpt.get("sampler") and hasattr(buffer, "sampler"):
            buffer.sampler.load_state_dict(ckpt["sampler"])
        acc.load_state_dict(ckpt.get("metrics", {}), device)
        start_step, last_eval = int(ckpt["step"]), ckpt.get("last_eval")
        elapsed_before = float(ckpt.get("wall_clock_s", 0.0))
        set_rng_state(ckpt["rng"])  # last: nothing above may draw random numbers after it
    check_steps(cfg, start_step, run_dir)

    # every check passed: from here on the run's files are written (train.log loses what an
    # interrupted run logged after the checkpoint, as metrics.csv loses its rows; a start that
    # left neither a checkpoint nor a result, e.g. killed before its first checkpoint, loses
    # all it logged, as metrics.csv starts again from step 0)
    restart = ckpt is None and not (run_dir / "result.json").exists()
    dropped = run_log.commit(ckpt.get("log_bytes") if ckpt is not None else 0 if restart else None)
    if ckpt is None and dropped:
        _log.info(
            "started again from step 0: the %d line(s) an earlier start logged here (it left no "
            "checkpoint) were taken out of train.log",
            dropped,
        )
    if ckpt is not None:
        _log.info(
            "resumed from step %d (checkpoints/step_%09d.pt)%s",
            start_step,
            start_step,
            f"; the {dropped} line(s) logged after it by the interrupted run were taken out of "
            "train.log"
            if dropped
            else "",
        )
    moved = set_aside_earlier_result(run_dir)
    if moved:
        _log.info("the earlier result of this folder was set aside as %s", " and ".join(moved))
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    logger = MetricsLogger(
        run_dir,
        cfg.logger.backend,
        cfg.logger.project,
        name=f"{cfg.get('recipe')}-s{cfg.seed}",
        resume_step=start_step if ckpt is not None else None,
    )

    def checkpoint(step: int) -> None:
        extra = {
            "observation_dim": obs_dim,
            "action_dim": act_dim,
            "data_fingerprint": fingerprint,
            "sampler": buffer.sampler.state_dict() if hasattr(buffer, "sampler") else None,
            "metrics": acc.state_dict(),
            "last_eval": last_eval,
            "wall_clock_s": elapsed_before + time.perf_counter() - start,
            "log_bytes": run_log.size(),  # where a resume from here cuts train.log
        }
        checkpointer.save(step, agent, cfg, data, extra)

    steps = int(cfg.train.steps)
    eta = Eta(start_step, steps, device, eval_every=int(cfg.train.eval_every))
    if start_step == 0 and cfg.train.get("eval_at_start", False):
        with eta.evaluation():
            evaluate_at_start(agent, data, cfg, device, logger)
    bar, redirect = progress_bar(cfg, start_step, data.dataset_id if data else "")
    agent.train()
    # plain ints: an OmegaConf lookup per step costs more than a CUDA-graph replay
    log_every, eval_every = int(cfg.train.log_every), int(cfg.train.eval_every)
    checkpoint_every = int(cfg.train.checkpoint_every)
    with bar, redirect:
        for step in range(start_step + 1, steps + 1):
            acc.add(train_step())
            bar.update(1)
            eta.update(step)
            row: dict[str, Any] = {}
            if step % log_every == 0 or step == steps:
                row.update(acc.mean())
                check_finite(row, step, checkpointer)
            if step % eval_every == 0 or step == steps:
                with eta.evaluation(step):
                    last_eval = evaluate_into_row(agent, data, cfg, device, step, row)
                agent.train()
                if last_eval is not None:
                    score = last_eval["normalized_score"]
                    bar.set_postfix(
                        score=f"{score:.1f}" if score is not None else "n/a",
                        ret=f"{last_eval['return_mean']:.2f}",
                    )
            if row:
                logger.log(step, row)
            if step % checkpoint_every == 0 or step == steps:
                checkpoint(step)

    save_policy_file(policy_payload(agent, cfg, data, steps), run_dir / "policy.pt")
    wall_clock_s = elapsed_before + time.perf_counter() - start
    result = run_result(
        cfg, data, behavior_score, last_eval, wall_clock_s, device, run_dir, fingerprint
    )
    write_json_atomic(run_dir / "result.json", result, indent=2)
    if data is not None:
        data.close()  # its pooled evaluation environments (OGBench's)
    return result
