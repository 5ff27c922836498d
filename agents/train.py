"""The training loop: data -> agent -> updates, with evaluation, logging and checkpoints.

``train(cfg, run_dir)`` is the Python API; ``divo train <recipe>`` (``divo.cli``) composes the
recipe with Hydra and calls it with Hydra's output directory.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDictBase
from torchrl.data import ReplayBuffer
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from divo.agents.agent import OfflineAgent
from divo.agents.builder import build_agent
from divo.agents.data import (
    OfflineData,
    buffer_observation_stats,
    check_batch_keys,
    check_buffer_finite,
    conform_batch,
    flat_flag_keys,
    load_offline_data,
)
from divo.agents.evaluate import critic_calibration, evaluate_policy, normalized_score
from divo.agents.logging import MetricAccumulator, MetricsLogger, RunLog, check_backend
from divo.agents.policy_io import POLICY_FORMAT
from divo.agents.runtime import (
    atomic_save,
    device_name,
    load_file,
    load_trusted_file,
    numpy_rng_state,
    resolve_device,
    rng_state,
    seed_everything,
    separate_rng,
    set_rng_state,
)
from divo.agents.step import DeviceSampler, TrainStep, check_compile_mode, compile_options
from divo.agents.trust import Trust, check_config, config_modules, trusted_modules
from divo.errors import CheckpointError, ConfigError, DatasetError, DivoError, UntrustedFileError
from divo.objectives.critic import TwinQ

# v2: every RNG state as plain data, so that a checkpoint loads with weights_only=True
CHECKPOINT_FORMAT = "divo-checkpoint-v2"


_log = logging.getLogger("divo.train")


def _validate(cfg: DictConfig) -> None:
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


def _spec_json(data: OfflineData | None) -> str | None:
    spec = data.eval_env_spec if data is not None else None
    if spec is None:
        return None
    try:
        return spec.to_json()
    except Exception as exc:  # noqa: BLE001 - e.g. a callable in the env kwargs
        warnings.warn(
            f"the environment spec of {data.dataset_id} cannot be saved as JSON ({exc}); "
            "`divo evaluate` will not be able to rebuild it",
            stacklevel=2,
        )
        return None


def policy_payload(agent: OfflineAgent, cfg: DictConfig, data: OfflineData | None, step: int):
    """What ``divo evaluate`` needs to rebuild and run the policy, and nothing of training."""
    return {
        "format": POLICY_FORMAT,
        "recipe": cfg.get("recipe"),
        "step": step,
        "policy_config": agent.policy_config,
        "state_dict": {
            # tensors to the CPU; a module's extra state (e.g. the consistency model's
            # curriculum position) is kept as it is
            k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
            for k, v in agent.policy.state_dict().items()
        },
        "dataset_id": data.dataset_id if data is not None else None,
        "env_spec": _spec_json(data),
        "ref_min_score": data.ref_min_score if data is not None else None,
        "ref_max_score": data.ref_max_score if data is not None else None,
    }


class _Checkpointer:
    """``<run>/checkpoints/step_*.pt``: atomic writes, the newest ``keep`` kept."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.dir = run_dir / "checkpoints"
        self.keep = max(1, keep)

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("step_*.pt"))

    def last_good(self) -> str:
        """Where the last good state is, for an error message: a file that exists, or none."""
        files = self.files()
        return f"last good checkpoint: {files[-1]}" if files else "no checkpoint was written yet"

    def save(self, step: int, agent: OfflineAgent, cfg, data, extra: dict[str, Any]) -> Path:
        bad = agent.non_finite_parameters()
        if bad:  # never overwrite good checkpoints with a diverged model
            raise DivoError(
                f"non-finite parameters ({', '.join(bad[:3])}) at step {step}; lower the learning "
                f"rates or check the data ({self.last_good()})"
            )
        payload = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "agent": agent.training_state(),
            "rng": rng_state(),
            "policy": policy_payload(agent, cfg, data, step),
            **extra,
        }
        path = atomic_save(payload, self.dir / f"step_{step:09d}.pt")
        for old in self.files()[: -self.keep]:
            old.unlink()
        return path

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable checkpoint and its path; a damaged one is skipped with a
        warning, one that holds a pickled object is refused (:func:`load_checkpoint`)."""
        files = self.files()
        for path in reversed(files):
            try:
                return path, load_checkpoint(path)
            except UntrustedFileError:
                raise
            except CheckpointError as exc:
                warnings.warn(f"{exc}; falling back to the previous checkpoint", stacklevel=2)
        if files:
            raise CheckpointError(
                f"no readable checkpoint in {self.dir}; delete the folder to start again"
            )
        return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file of this format, read as plain data (:func:`load_file`)."""
    payload = load_file(path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        if isinstance(found, str) and found.startswith("divo-checkpoint"):
            raise CheckpointError(
                f"{path} is a {found} file, not {CHECKPOINT_FORMAT}; if you trust it, convert "
                f"it with `divo convert {path}`"
            )
        raise CheckpointError(f"{path} is not a divo checkpoint")
    return payload


def check_trusted(
    ckpt: dict, file: Path, cfg: DictConfig, data_spec: str | None, trust: Trust
) -> None:
    """Refuse a checkpoint whose configs name classes, or whose environment spec names entry
    points, that loading its run's files could not run: outside divo, gymnasium and the
    modules trusted here (``trust``, and those ``cfg`` names: its caller chose them)."""
    from divo.agents.policy_io import check_policy_payload

    modules = (*trusted_modules(trust), *config_modules(OmegaConf.to_container(cfg)))
    check_config(ckpt.get("config"), modules, str(file))
    policy = dict(ckpt.get("policy") or {})
    if policy.get("env_spec") == data_spec:  # the environment this run evaluates in anyway
        policy.pop("env_spec", None)
    check_policy_payload(policy, modules, file)


def _check_resumable(ckpt: dict, cfg: DictConfig, obs_dim: int, act_dim: int, where: Path):
    """Refuse a checkpoint that another recipe or other data wrote (before touching files)."""
    saved = ckpt["config"]
    if saved.get("recipe") != cfg.get("recipe"):
        raise CheckpointError(
            f"{where} holds a checkpoint of recipe {saved.get('recipe')!r}, not "
            f"{cfg.get('recipe')!r}; {_resume_hint(saved, where)}"
        )
    dims = (ckpt.get("observation_dim"), ckpt.get("action_dim"))
    if dims != (obs_dim, act_dim):
        raise CheckpointError(
            f"{where} holds a checkpoint for observation/action sizes {dims[0]}/{dims[1]} but "
            f"the data have {obs_dim}/{act_dim}; resume with the dataset it was trained on "
            f"({saved.get('dataset', {}).get('id')}) or use a new run directory"
        )


def _resume_hint(saved: dict, where: Path) -> str:
    """How to go on with a run whose checkpoint this call refused: ``divo train <run>`` only
    when the run's own config.yaml names the checkpoint's recipe (else that command is the one
    refused)."""
    try:
        own = OmegaConf.load(where / "config.yaml").get("recipe")
    except Exception:  # noqa: BLE001 - missing or unreadable: the command would fail too
        own = None
    if own == saved.get("recipe"):
        return f"resume it with `divo train {where}` or use a new run directory"
    return (
        f"its config.yaml no longer matches its checkpoints (recipe {own!r}): use a new run "
        "directory, or delete the checkpoints to start this one again"
    )


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
        )
    trajectories = result.pop("trajectories")
    try:
        result["critic"] = _critic_calibration(agent, data, cfg, trajectories, device)
    except Exception as exc:  # noqa: BLE001 - a diagnostic never costs the score
        warnings.warn(
            f"the critic's check on the evaluation rollouts failed ({type(exc).__name__}: "
            f"{exc}); the score stands",
            stacklevel=2,
        )
        result["critic"] = None
    return result


def _critic_calibration(agent, data, cfg, trajectories, device) -> dict[str, float] | None:
    """min(Q1, Q2) of the online critic on the evaluation rollouts against the discounted
    return in training-reward units (:func:`critic_calibration`); None without a twin critic."""
    critic, normalizer = getattr(agent, "critic", None), getattr(agent, "normalizer", None)
    if not isinstance(critic, TwinQ) or normalizer is None:
        return None
    factor = float(cfg.dataset.reward_scale) * float(data.reward_factor)
    shift = float(cfg.dataset.reward_shift)
    was_training = critic.training
    critic.eval()
    try:
        return critic_calibration(
            trajectories,
            lambda obs, act: critic.min_q(normalizer(obs), act),
            gamma=float(cfg.critic.loss.gamma),
            reward_transform=lambda r: factor * r + shift,
            device=device,
        )
    finally:
        critic.train(was_training)


def _load_data(cfg: DictConfig, device: torch.device) -> tuple[OfflineData | None, float | None]:
    """The recipe's dataset on ``device`` (None with ``dataset.id=null``) and the normalised
    score of its behaviour policy."""
    data, behavior_score = None, None
    if cfg.dataset.get("id") is not None:
        data = load_offline_data(
            cfg.dataset.id,
            device=device,
            batch_size=cfg.train.batch_size,
            reward_scale=cfg.dataset.reward_scale,
            reward_shift=cfg.dataset.reward_shift,
            return_range=cfg.dataset.get("return_range"),
            download=cfg.dataset.get("download", True),
            action_bounds=cfg.dataset.get("action_bounds", "rescale"),
            observation_keys=_observation_keys(cfg),
        )
        behavior_score = normalized_score(
            data.behavior_return, data.ref_min_score, data.ref_max_score
        )
        _log.info(
            "data %s: %d transitions in %d episodes; behaviour: mean episode return %.1f%s",
            data.dataset_id,
            data.num_transitions,
            data.num_episodes,
            data.behavior_return,
            f" (normalized score {behavior_score:.1f})" if behavior_score is not None else "",
        )
        if data.reward_factor != 1.0:  # IQL's reward normalisation
            _log.info(
                "rewards x %.4g (dataset.return_range=%s: max - min episode return rescaled)",
                data.reward_factor,
                cfg.dataset.get("return_range"),
            )
    return data, behavior_score


def _observation_keys(cfg: DictConfig) -> list[str] | None:
    """``dataset.observation_keys`` as a list (a single key may be given bare), or None."""
    keys = cfg.dataset.get("observation_keys")
    if keys is None:
        return None
    return [str(keys)] if isinstance(keys, str) else [str(key) for key in keys]


def _check_finite(row: dict[str, float], step: int, checkpointer: _Checkpointer) -> None:
    bad = [k for k, v in row.items() if not math.isfinite(v)]
    if bad:
        raise DivoError(
            f"non-finite {', '.join(bad)} at step {step}; lower the learning rates or "
            f"check the data ({checkpointer.last_good()})"
        )


def _evaluate_into_row(
    agent, data, cfg, device, step: int, row: dict[str, Any], log: logging.Logger = _log
) -> dict[str, Any] | None:
    """Evaluate (a failure is a warning and ``eval_failed`` in the row), add the scores to the
    metrics row and log them; returns the evaluation (None when none ran)."""
    try:
        last_eval = _evaluate(agent, data, cfg, device)
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
        row.update(last_eval.get("critic") or {})
        score = last_eval["normalized_score"]
        log.info(
            "step %d: normalized score %s (return %.2f +- %.2f over %d episodes)",
            step,
            f"{score:.1f}" if score is not None else "n/a",
            last_eval["return_mean"],
            last_eval["return_std"],
            last_eval["episodes"],
        )
        if last_eval.get("critic"):
            log.info(
                "step %d: critic min Q %.2f, discounted return %.2f on the policy's own steps "
                "(Q - return %+.2f)",
                step,
                last_eval["critic"]["eval_q"],
                last_eval["critic"]["eval_return_to_go"],
                last_eval["critic"]["eval_q_bias"],
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


def _float(text: str | None) -> float | None:
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
    _evaluate_into_row(agent, data, cfg, device, 0, row, log)
    agent.train()
    if row:
        metrics.log(0, row)


def _result(
    cfg: DictConfig,
    data: OfflineData | None,
    behavior_score: float | None,
    last_eval: dict[str, Any] | None,
    wall_clock_s: float,
    device: torch.device,
    run_dir: Path,
) -> dict[str, Any]:
    """The run's ``result.json`` contents."""
    return {
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
        "wall_clock_s": round(wall_clock_s, 3),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "run_dir": str(run_dir),
        # model selection, as Diffusion-QL's paper reports: the best evaluation during training,
        # beside (never instead of) the final policy's numbers above
        "best_during_training": best_evaluation(run_dir),
    }


def check_steps(cfg: DictConfig, start_step: int, run_dir: Path) -> None:
    """Refuse a run whose checkpoint is already past ``train.steps`` (before any write)."""
    steps = int(cfg.train.steps)
    if start_step > steps:
        raise ConfigError(
            f"{run_dir} is already at step {start_step} > train.steps={steps}; pass "
            f"train.steps={start_step} or more to extend it (the run was left as it is)"
        )


def _progress(cfg: DictConfig, start_step: int, what: str):
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
    redirect = (
        logging_redirect_tqdm([logging.root, logging.getLogger("divo")])
        if cfg.train.progress
        else contextlib.nullcontext()
    )
    return bar, redirect


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Eta:
    """Announces the plan of a run (steps, device) before training, and once the first steps'
    rate is known the expected remaining time; warns when a CPU run would take longer than
    ``CPU_WARN_S``. ``update(step)`` is called after every step and costs one clock read."""

    WARMUP_STEPS = 10  # not timed: compilation, allocator and cache warm-up
    MEASURE_STEPS = 200  # the rate is measured over this many steps ...
    MEASURE_S = 3.0  # ... or this many seconds, whichever comes first
    CPU_WARN_S = 3 * 3600.0

    def __init__(
        self, start_step: int, steps: int, device: torch.device, log: logging.Logger = _log
    ) -> None:
        self.start, self.steps, self.device, self.log = start_step, steps, device, log
        self._t0: float | None = None
        self._done = steps - start_step <= self.WARMUP_STEPS
        where = f"{device} ({device_name(device)})"
        if start_step:
            plan = f"steps {start_step + 1}-{steps} ({steps - start_step} to go)"
        else:
            plan = f"{steps} steps"
        log.info("training %s on %s; ETA after the first steps", plan, where)

    def update(self, step: int) -> None:
        if self._done:
            return
        done = step - self.start - self.WARMUP_STEPS
        if done <= 0:
            if done == 0:
                self._t0 = time.perf_counter()
            return
        elapsed = time.perf_counter() - self._t0
        if done < self.MEASURE_STEPS and elapsed < self.MEASURE_S:
            return
        self._done = True
        rate = done / max(elapsed, 1e-9)
        left = (self.steps - step) / rate
        self.log.info(
            "%.0f steps/s: about %s to go (step %d of %d)",
            rate, _duration(left), step, self.steps,
        )  # fmt: skip
        if self.device.type == "cpu" and left > self.CPU_WARN_S:
            warnings.warn(
                f"this CPU run of {self.steps} steps needs about {_duration(left)} more at "
                f"{rate:.0f} steps/s; train on a GPU (device=cuda) or set a smaller train.steps",
                stacklevel=2,
            )


def finished_result(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The stored result of a run in ``run_dir`` that already finished ``cfg``'s steps (its
    result.json, policy.pt and a checkpoint at exactly ``train.steps``), else None."""
    path = run_dir / "result.json"
    steps = int(cfg.train.steps)
    if not (path.is_file() and (run_dir / "policy.pt").is_file()):
        return None
    if not (run_dir / "checkpoints" / f"step_{steps:09d}.pt").is_file():
        return None
    if _Checkpointer(run_dir, 1).files()[-1].name != f"step_{steps:09d}.pt":
        return None  # extended beyond train.steps since: check_steps refuses it
    try:
        result = json.loads(path.read_text())
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    except Exception:  # noqa: BLE001 - unreadable: the normal resume path says what is wrong
        return None

    def what_trains(config: dict) -> dict:  # all but the keys a resume may change
        return {k: v for k, v in config.items() if k not in ("train", "device", "logger")}

    ours = OmegaConf.to_container(cfg, resolve=True)
    same = result.get("steps") == steps and what_trains(saved) == what_trains(ours)
    return result if same else None


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
            ``dataset.id=null`` no evaluation runs, and the statistics are ``obs_stats=(mean,
            std)`` when given, else computed from the observations the buffer holds.
    With ``train.num_seeds=N > 1`` the seeds ``seed .. seed+N-1`` train together in this
    process with stacked weights (:func:`divo.agents.vectorized.train_vectorized`), one complete
    run directory per seed in ``run_dir/seed<k>``; the return value then summarises the seeds.

    Returns:
        The result dictionary also written to ``result.json``.
    """
    _validate(cfg)
    if cfg.train.get("num_seeds", 1) > 1:
        from divo.agents.vectorized import train_vectorized

        return train_vectorized(
            cfg,
            run_dir,
            replay_buffer=replay_buffer,
            obs_stats=obs_stats,
            resume=resume,
            trust=trust,
        )
    run_dir = Path(run_dir)
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
    with RunLog(run_dir) as run_log:
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

    data, behavior_score = _load_data(cfg, device)
    if data is None and replay_buffer is None:
        raise ConfigError("dataset.id is null and no replay buffer was given; set dataset.id")
    if replay_buffer is None:  # the dataset stays on the device, indices are drawn there
        buffer = DeviceSampler(data.data, cfg.train.batch_size)
    else:
        buffer = replay_buffer
    probe = buffer.sample()
    # a user's buffer may store rewards/flags as [B]: found once here, reshaped at each step
    flat_keys = flat_flag_keys(probe) if replay_buffer is not None else ()
    check_batch_keys(conform_batch(probe, flat_keys))
    if replay_buffer is not None:
        check_buffer_finite(replay_buffer, probe)
    obs_dim, act_dim = probe["observation"].shape[-1], probe["action"].shape[-1]
    if data is not None:
        if (obs_dim, act_dim) != (data.observation_dim, data.action_dim):
            raise DatasetError(
                f"the replay buffer's samples have observation/action sizes {obs_dim}/{act_dim} "
                f"but dataset {data.dataset_id} has {data.observation_dim}/{data.action_dim}; "
                "pass the matching dataset.id"
            )
        mean, std = data.obs_mean, data.obs_std
    elif obs_stats is not None:
        mean, std = obs_stats
    else:
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

    def sample() -> TensorDictBase:
        batch = buffer.sample()
        if flat_keys:
            batch = conform_batch(batch, flat_keys)
        return batch if batch.device == device else batch.to(device)

    train_step = TrainStep(agent, sample, device=device, **compile_options(cfg))
    checkpointer = _Checkpointer(run_dir, cfg.train.keep_checkpoints)
    acc = MetricAccumulator()
    start_step, last_eval, elapsed_before = 0, None, 0.0
    found = checkpointer.load_latest() if resume else None
    ckpt = None
    if found is not None:
        ckpt_file, ckpt = found
        check_trusted(ckpt, ckpt_file, cfg, _spec_json(data), trust)
        _check_resumable(ckpt, cfg, obs_dim, act_dim, run_dir)
        agent.load_training_state(ckpt["agent"])
        if ckpt.get("sampler") and hasattr(buffer, "sampler"):
            buffer.sampler.load_state_dict(ckpt["sampler"])
        acc.load_state_dict(ckpt.get("metrics", {}), device)
        start_step, last_eval = int(ckpt["step"]), ckpt.get("last_eval")
        elapsed_before = float(ckpt.get("wall_clock_s", 0.0))
        set_rng_state(ckpt["rng"])  # last: nothing above may draw random numbers after it
    check_steps(cfg, start_step, run_dir)

    run_log.commit()  # every check passed: from here on the run's files are written
    if ckpt is not None:
        _log.info("resumed from step %d (checkpoints/step_%09d.pt)", start_step, start_step)
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
            "sampler": buffer.sampler.state_dict() if hasattr(buffer, "sampler") else None,
            "metrics": acc.state_dict(),
            "last_eval": last_eval,
            "wall_clock_s": elapsed_before + time.perf_counter() - start,
        }
        checkpointer.save(step, agent, cfg, data, extra)

    steps = int(cfg.train.steps)
    eta = Eta(start_step, steps, device)
    if start_step == 0 and cfg.train.get("eval_at_start", False):
        evaluate_at_start(agent, data, cfg, device, logger)
    bar, redirect = _progress(cfg, start_step, data.dataset_id if data else "")
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
                _check_finite(row, step, checkpointer)
            if step % eval_every == 0 or step == steps:
                last_eval = _evaluate_into_row(agent, data, cfg, device, step, row)
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

    atomic_save(policy_payload(agent, cfg, data, steps), run_dir / "policy.pt")
    wall_clock_s = elapsed_before + time.perf_counter() - start
    result = _result(cfg, data, behavior_score, last_eval, wall_clock_s, device, run_dir)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def convert_file(path: str | Path) -> str:
    """Rewrite a policy file or checkpoint of an older divo as plain data in this version's
    format (in place, atomically); returns what was done, for one line of output.

    UNPICKLES the file (``torch.load(weights_only=False)``), which runs whatever it holds: only
    for files the user trusts. A file that already loads as plain data is left as it is.
    """
    path = Path(path)
    try:
        payload = load_file(path)
        if isinstance(payload, dict) and payload.get("format") in (
            POLICY_FORMAT,
            CHECKPOINT_FORMAT,
        ):
            return f"{path}: already plain data ({payload['format']}), left as it is"
    except UntrustedFileError:
        pass
    payload = load_trusted_file(path)
    found = payload.get("format") if isinstance(payload, dict) else None
    if found == "divo-checkpoint-v1":  # v1 kept NumPy's RNG state as a pickled ndarray
        rng = dict(payload["rng"])
        rng["numpy"] = numpy_rng_state(rng["numpy"])
        converted = {**payload, "format": CHECKPOINT_FORMAT, "rng": rng}
    elif found in (POLICY_FORMAT, CHECKPOINT_FORMAT):
        converted = payload
    else:
        raise CheckpointError(
            f"{path} is not a divo policy file or checkpoint (format {found!r}); nothing converted"
        )
    atomic_save(converted, path)  # refuses (and keeps the file) if objects remain
    return f"{path}: {found} -> {converted['format']}, plain data"


def run_files(path: str | Path) -> list[Path]:
    """A file -> itself; a folder -> every policy.pt and checkpoints/step_*.pt under it."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return sorted(path.glob("**/policy.pt")) + sorted(path.glob("**/checkpoints/step_*.pt"))
