"""N independent seeds of one recipe trained as one agent with stacked weights.

Every parameter and buffer of the N agents is stacked along a leading seed dimension (a
:class:`tensordict.TensorDict` of ``[N, ...]`` tensors). :class:`VectorizedStages` runs each stage
of the agent's ``run_update`` (:class:`OfflineAgent`: DIVO, its ablations, TD3+BC;
:class:`DiffusionQLAgent`; :class:`FQLAgent`) through
``torch.func.vmap(..., randomness="different")`` with seed ``i``'s slice swapped into one
template agent (``params.to_module``): one batched call per stage for all seeds, each seed
drawing its own random numbers.

Gradients: the stage's loss is summed over seeds and backpropagated once. Seeds share no
parameters, so each seed's slice receives exactly its own gradient. One Adam per part over the
stacked tensors is N independent Adams (Adam is element-wise, and every seed has taken the same
number of steps). Gradient-norm clipping (Diffusion-QL's ``grad_norm``) is per seed, as in a
single run. Polyak updates act on the stacked target/online tensors. Metrics come back per seed,
shape ``[N]``.

Checkpoints and policies are per seed: :meth:`VectorizedAgent.seed_agent` writes seed ``i``'s
slice (parameters, buffers, optimiser states) into the template agent and returns it, so a seed's
checkpoint and ``policy.pt`` are exactly those of a single run.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tensordict import TensorDict, TensorDictBase

from divo.agents.agent import (
    StageCalls,
    Stages,
    TrainableAgent,
    apply_lr_schedule,
    split_loss,
)
from divo.agents.checkpoints import (
    Checkpointer,
    check_resumable,
    check_trusted,
    load_checkpoint,
    policy_payload,
    save_policy_file,
    spec_json,
)
from divo.agents.logging import (
    MetricAccumulator,
    MetricsLogger,
    RunLog,
    drop_interrupted_lines,
    error_record,
    file_handler_for,
    log_size,
    mark_after_start,
)
from divo.agents.runs import (
    Eta,
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
)
from divo.agents.runtime import (
    resolve_device,
    seed_everything,
    set_rng_state,
)
from divo.agents.step import DeviceSampler, TrainStep, check_compile_mode, compile_options
from divo.agents.trust import Trust
from divo.data.batches import check_batch_keys
from divo.errors import ConfigError, DivoError, first_line
from divo.files import RunLock, write_json_atomic

MULTIRUN_HINT = "use train.num_seeds=1 (or a multirun: `divo train <recipe> -m seed=0,1,2`)"


class VectorizedStages(Stages):
    """Runs each stage vmapped over the seeds of a :class:`VectorizedAgent`; ``wrap`` (e.g.
    torch.compile) wraps the vmapped stage (see :class:`divo.agents.agent.StageCalls`)."""

    def __init__(
        self,
        vec: VectorizedAgent,
        wrap: Callable | None = None,
        on_wrap_error: Callable[[str, Exception], None] | None = None,
    ) -> None:
        self.vec = vec
        self.calls = StageCalls(wrap, on_wrap_error)
        self._vmapped: dict[str, Callable] = {}

    def run(self, stage, optimizer, *args, generator=None) -> dict[str, torch.Tensor]:
        if generator is not None:
            raise ConfigError(f"vectorised seeds draw from the global generator; {MULTIRUN_HINT}")
        vec = self.vec
        agent = vec.agent
        name = stage.__name__
        if name not in self._vmapped:
            self._vmapped[name] = _vmapped_stage(stage, agent)
        try:
            out = self.calls(name, self._vmapped[name], (vec.state, *args))
        except RuntimeError as exc:
            text = str(exc)
            if "vmap" not in text.lower() and "batch" not in text.lower():
                raise
            raise ConfigError(
                f"train.num_seeds={vec.num_seeds}: {stage.__name__} of recipe "
                f"{vec.recipe!r} cannot run under torch.func.vmap ({first_line(exc)}); "
                f"{MULTIRUN_HINT}"
            ) from exc
        loss, out = split_loss(out)
        if optimizer is not None:
            opt = vec.optimizers[optimizer]
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()  # seeds share nothing: each slice gets its own gradient
            measured = agent.measured_grads(optimizer)
            if measured is not None:  # e.g. Diffusion-QL: each seed's norm, clipped per seed
                params, max_norm = measured
                grads = [vec.tensors[vec._name_of[id(p)]].grad for p in params]
                out[f"{optimizer}_grad_norm"] = clip_grad_norm_per_seed(grads, max_norm)
            apply_lr_schedule(agent, optimizer, opt)  # every seed is at the same update
            opt.step()
        return out

    def polyak(self, target, online, tau: float) -> None:
        names = self.vec._name_of
        flat = self.vec.tensors
        super().polyak(
            [flat[names[id(t)]] for t in target], [flat[names[id(o)]] for o in online], tau
        )


def _vmapped_stage(stage: Callable, agent: TrainableAgent) -> Callable:
    """``stage`` vmapped over the seeds: (stacked state, *args) -> stacked outputs, each seed's
    slice swapped into the template ``agent``."""

    def call(state: TensorDictBase, *stage_args):
        with state.to_module(agent):
            return stage(*stage_args)

    return torch.func.vmap(call, randomness="different")


@torch.no_grad()
def clip_grad_norm_per_seed(grads: Sequence[torch.Tensor | None], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for each seed of stacked gradients ``[N, ...]``: the
    norm over every tensor of seed ``i``'s slices, and those slices scaled by
    ``min(1, max_norm / (norm + 1e-6))`` when ``max_norm`` > 0. Returns the norms ``[N]``."""
    grads = [g for g in grads if g is not None]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
    if max_norm > 0:
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
    return norms


class VectorizedAgent:
    """N agents of the same recipe (:class:`OfflineAgent`, :class:`DiffusionQLAgent` or
    :class:`FQLAgent`), trained together with stacked weights.

    Args:
        agents: N agents built from the same recipe (same parts and sizes), e.g. by
            :func:`build_vectorized_agent`. Their current parameters, buffers and optimiser
            settings become the N slices; ``agents[0]`` is kept as the template the stages run in
            (its own parameters stop requiring grad: train it through this object only).
        recipe: the recipe's name, for error messages.

    ``update(batch)`` takes a ``[N, B]`` batch (seed ``i`` trains on ``batch[i]``) and returns
    per-seed metrics ``[N]``.
    """

    def __init__(self, agents: Sequence[TrainableAgent], recipe: str | None = None) -> None:
        if not agents:
            raise ValueError("VectorizedAgent needs at least one agent")
        for a in agents:
            if not isinstance(a, TrainableAgent) or type(a).run_update is TrainableAgent.run_update:
                raise ConfigError(
                    f"train.num_seeds > 1 stacks agents whose update runs as stages (run_update); "
                    f"recipe {recipe!r} builds {type(a).__name__}: {MULTIRUN_HINT}"
                )
        self.recipe = recipe
        self.num_seeds = len(agents)
        self.agent = agents[0]
        template = self.agent
        names = [n for n, _ in template.named_parameters()]
        buffer_names = [n for n, _ in template.named_buffers()]
        self._trainable = {n for n, p in template.named_parameters() if p.requires_grad}
        # the stacked tensors train, not the template's own (swapping seeds in and out leaves
        # them without gradient anyway; set once, so compiled stages see one state throughout)
        template.requires_grad_(False)
        self._template_tensors: dict[str, torch.Tensor] = {
            **dict(template.named_parameters()),
            **dict(template.named_buffers()),
        }
        self._name_of = {id(t): n for n, t in self._template_tensors.items()}
        sources = [{**dict(a.named_parameters()), **dict(a.named_buffers())} for a in agents]
        for src in sources:
            if list(src) != names + buffer_names or any(
                src[n].shape != t.shape for n, t in self._template_tensors.items()
            ):
                raise ValueError("the agents to stack must be built from the same recipe and sizes")
        flat = {}
        for name in names + buffer_names:
            stacked = torch.stack([src[name].detach() for src in sources]).clone()
            flat[name] = stacked.requires_grad_(name in self._trainable)
        # the TensorDict holds the very tensors of ``self.tensors`` (optimisers step them in place)
        self.state: TensorDictBase = TensorDict(flat, batch_size=[self.num_seeds]).unflatten_keys(
            "."
        )
        self.tensors: dict[str, torch.Tensor] = flat
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._opt_names: dict[str, list[str]] = {}
        for part, opt in template.optimizers.items():
            if len(opt.param_groups) != 1:
                raise ConfigError(
                    f"optimiser {part!r} has several parameter groups; {MULTIRUN_HINT}"
                )
            group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
            part_names = [self._name_of[id(p)] for p in opt.param_groups[0]["params"]]
            self._opt_names[part] = part_names
            self.optimizers[part] = type(opt)([flat[n] for n in part_names], **group)
        self.stages = VectorizedStages(self)
        for i, a in enumerate(agents):  # optimiser states already present (e.g. loaded ones)
            if any(o.state for o in a.optimizers.values()):
                self._read_optimizers(a, i)

    # ------------------------------------------------------------------ training
    @property
    def num_updates(self) -> int:
        return self.agent.num_updates

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self.agent.num_updates = int(value)

    @property
    def policy_delay(self) -> int:
        return int(getattr(self.agent, "policy_delay", 1))

    def update_kind(self) -> bool:
        """The next update's kind (every seed's: they share the step counter)."""
        return self.agent.update_kind()

    @property
    def behavior_model(self) -> torch.nn.Module | None:
        """The template's behaviour model (its structure; the weights are the stacked ones)."""
        return getattr(self.agent, "behavior_model", None)

    def update(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        """One training step of every seed on a ``[N, B]`` batch; per-seed metrics ``[N]``."""
        return self.run_update(batch, self.stages)

    def run_update(self, batch: TensorDictBase, stages: Stages) -> dict[str, torch.Tensor]:
        """:meth:`update` with the stages of :meth:`make_stages` (e.g. compiled ones)."""
        if batch.batch_dims != 2 or batch.batch_size[0] != self.num_seeds:
            raise ValueError(
                f"a vectorised update needs a [{self.num_seeds}, B] batch, got {batch.batch_size}"
            )
        return self.agent.run_update(batch, stages)

    def make_stages(
        self,
        wrap: Callable | None = None,
        on_wrap_error: Callable[[str, Exception], None] | None = None,
    ) -> VectorizedStages:
        """Vmapped stages, each vmapped stage wrapped by ``wrap`` (e.g. torch.compile)."""
        return VectorizedStages(self, wrap, on_wrap_error)

    def train(self, mode: bool = True) -> VectorizedAgent:
        self.agent.train(mode)
        return self

    def non_finite_seeds(self) -> list[int]:
        """Seeds (indices) whose parameters hold NaN/inf (one device sync)."""
        bad = torch.zeros(self.num_seeds, dtype=torch.bool, device=self._device())
        for t in self.tensors.values():
            if t.is_floating_point():
                bad |= ~torch.isfinite(t.detach()).flatten(1).all(1)
        return [i for i, b in enumerate(bad.tolist()) if b]

    def _device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    # ------------------------------------------------------------------ per-seed views
    @torch.no_grad()
    def seed_agent(self, index: int) -> TrainableAgent:
        """The template agent holding seed ``index``'s parameters, buffers, optimiser states and
        step counter: take its ``policy``, ``training_state()`` or checkpoint it. It is shared by
        all seeds: valid until the next ``seed_agent`` call or update."""
        for name, t in self.tensors.items():
            self._template_tensors[name].copy_(t[index])
        agent = self.agent
        for part, opt in self.optimizers.items():
            single = agent.optimizers[part]
            single.state.clear()
            for p_single, name in zip(_params(single), self._opt_names[part], strict=True):
                stacked = self.tensors[name]
                state = opt.state.get(stacked)
                if state:
                    single.state[p_single] = {
                        k: v[index].clone() if _per_seed(v, stacked) else v.clone()
                        for k, v in state.items()
                    }
        return agent

    def policy(self, index: int) -> torch.nn.Module:
        """Seed ``index``'s deployable policy (a module over the shared template: use it before
        the next ``seed_agent``/``policy`` call)."""
        return self.seed_agent(index).policy

    def training_state(self, index: int) -> dict:
        """Seed ``index``'s training state, in the format of a single agent's ``training_state``."""
        return copy.deepcopy(self.seed_agent(index).training_state())

    def load_training_state(self, index: int, state: Mapping) -> None:
        """Load a single agent's training state (e.g. a checkpoint of a single run) into seed
        ``index``. Every seed must end up at the same ``num_updates``."""
        agent = self.agent
        agent.load_training_state(state)
        with torch.no_grad():
            for name, t in self.tensors.items():
                t[index].copy_(self._template_tensors[name])
        self._read_optimizers(agent, index)

    @torch.no_grad()
    def _read_optimizers(self, agent: TrainableAgent, index: int) -> None:
        for part, opt in self.optimizers.items():
            single = agent.optimizers[part]
            for p_single, name in zip(_params(single), self._opt_names[part], strict=True):
                stacked = self.tensors[name]
                state = single.state.get(p_single)
                if not state:
                    opt.state.pop(stacked, None)
                    continue
                target = opt.state.setdefault(stacked, {})
                for k, v in state.items():
                    if torch.is_tensor(v) and v.shape == stacked.shape[1:] and v.dim() > 0:
                        if k not in target:
                            target[k] = torch.zeros_like(stacked)
                        target[k][index].copy_(v)
                    else:  # the step count: the same for every seed
                        target[k] = v.clone() if torch.is_tensor(v) else v
        self.agent.num_updates = agent.num_updates


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return opt.param_groups[0]["params"]


def _per_seed(value, stacked: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == stacked.shape


STACKABLE_ALGORITHMS = ("offline", "diffusion_ql", "fql")


def _check_stackable(cfg: DictConfig) -> None:
    if (cfg.get("algorithm") or "offline") not in STACKABLE_ALGORITHMS:
        raise ConfigError(
            f"train.num_seeds > 1 vectorises the algorithms {STACKABLE_ALGORITHMS}; recipe "
            f"{cfg.get('recipe')!r} has algorithm={cfg.get('algorithm')}: {MULTIRUN_HINT}"
        )


def build_vectorized_agent(
    cfg: DictConfig,
    seeds: Sequence[int],
    *,
    observation_dim: int,
    action_dim: int,
    obs_mean: torch.Tensor,
    obs_std: torch.Tensor,
    device: torch.device | str = "cpu",
    before_build: Callable[[int], None] | None = None,
) -> VectorizedAgent:
    """Build one agent per seed with ``build_agent`` after ``before_build(seed)`` (default
    ``torch.manual_seed(seed)``), so seed ``i``'s initial weights are those of a single build
    with that seed, and stack them."""
    from divo.agents.builder import build_agent

    _check_stackable(cfg)
    agents = []
    for seed in seeds:
        if before_build is None:
            torch.manual_seed(int(seed))
        else:
            before_build(int(seed))
        agents.append(
            build_agent(
                cfg,
                observation_dim=observation_dim,
                action_dim=action_dim,
                obs_mean=obs_mean,
                obs_std=obs_std,
                device=device,
            )
        )
    return VectorizedAgent(agents, recipe=cfg.get("recipe"))


# ---------------------------------------------------------------------------------- training
class SeedMetricAccumulator(MetricAccumulator):
    """A :class:`MetricAccumulator` of per-seed metrics ``[N]``: means and checkpoint states
    per seed."""

    def mean_per_seed(self, num_seeds: int) -> list[dict[str, float]]:
        """Each seed's means since the last call (one device -> host transfer), then reset."""
        if not self._sums:
            return [{} for _ in range(num_seeds)]
        names = list(self._sums)
        values = torch.stack([self._sums[n] for n in names]).cpu().tolist()  # [metrics][seeds]
        out = [
            {n: values[j][i] / self._counts[n] for j, n in enumerate(names)}
            for i in range(num_seeds)
        ]
        self._sums.clear()
        self._counts.clear()
        return out

    def seed_state_dict(self, index: int) -> dict:
        """Seed ``index``'s partial sums, as a single run's accumulator saves them."""
        return {
            "sums": {k: v[index].detach().cpu() for k, v in self._sums.items()},
            "counts": dict(self._counts),
        }

    def load_seed_states(self, states: Sequence[Mapping], device: torch.device | str) -> None:
        sums = [s.get("sums", {}) for s in states]
        self._sums = {k: torch.stack([s[k] for s in sums]).to(device) for k in sums[0]}
        self._counts = dict(states[0].get("counts", {}))


def _seed_config(cfg: DictConfig, seed: int) -> DictConfig:
    """Seed ``seed``'s config: the recipe as a single run with that seed would have it."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.seed = seed
        out.train.num_seeds = 1
    return out


def _checkpoint_steps(checkpointer) -> set[int]:
    return {int(p.stem.split("_")[1]) for p in checkpointer.files()}


def _load_common_checkpoints(
    checkpointers, check
) -> tuple[tuple[int, list[dict]] | None, list[Path]]:
    """The newest step every seed has a readable checkpoint of, and those checkpoints, each
    passed to ``check(payload, file)`` (it raises to refuse); and the files of newer steps (a
    save round cut short), which the caller removes once every check has passed (a refused
    resume changes nothing). A file refused as untrusted stops everything."""
    from divo.errors import CheckpointError, UntrustedFileError

    steps = [_checkpoint_steps(c) for c in checkpointers]
    if not any(steps):
        return None, []
    common = sorted(set.intersection(*steps), reverse=True)
    found = None
    for step in common:
        try:
            files = [c.dir / f"step_{step:09d}.pt" for c in checkpointers]
            payloads = [load_checkpoint(f) for f in files]
            for payload, file in zip(payloads, files, strict=True):
                check(payload, file)
        except UntrustedFileError:
            raise
        except CheckpointError as exc:
            warnings.warn(f"{exc}; falling back to the previous checkpoint", stacklevel=3)
            continue
        found = step, payloads
        break
    newest = found[0] if found else 0
    for c in checkpointers:
        seed_dir = c.dir.parent
        alone = _trained_alone_past(seed_dir, newest)
        if alone is not None:
            raise CheckpointError(
                f"{seed_dir} was trained on its own to step {alone} (its result.json), past "
                f"step {newest}, the newest every seed checkpointed: resuming the seeds together "
                f"would discard that. Go on with each seed on its own (`divo train {seed_dir}`), "
                f"or move {seed_dir.name}'s newer checkpoints aside (nothing was changed)"
            )
    stale = [
        c.dir / f"step_{step:09d}.pt"
        for c, have in zip(checkpointers, steps, strict=True)
        for step in sorted(have)
        if step > newest
    ]
    if found is None and any(common or steps):
        warnings.warn(
            "no step that every seed checkpointed is readable; training starts from step 0",
            stacklevel=3,
        )
    return found, stale


def _remove_stale_checkpoints(stale: list[Path]) -> None:
    """Checkpoints of a step not every seed reached (a save round cut short): removed once the
    resume is accepted, so the seeds go on from one step."""
    for file in stale:
        step = int(file.stem.split("_")[-1])
        warnings.warn(f"removing {file}: not every seed reached step {step}", stacklevel=3)
        file.unlink(missing_ok=True)


def _trained_alone_past(seed_dir: Path, step: int) -> int | None:
    """The step a seed's folder holds a single run's result of beyond ``step`` (``divo train
    <run>/seed<k>`` went on with it alone, to the end of its budget), else None. The stacked
    run's own results say ``stacked_seeds``."""
    for result in sorted(seed_dir.glob("result*.json")):
        try:
            payload = json.loads(result.read_text())
            steps = int(payload.get("steps"))
        except Exception:  # noqa: BLE001 - unreadable: not evidence either way
            continue
        if steps > step and "stacked_seeds" not in payload:
            return steps
    return None


class _SeedLogs:
    """``<seed dir>/train.log`` for each seed, in the format of Hydra's job log: shared lines
    (the data) go to every seed's file, ``loggers[i]`` lines to seed ``i``'s only (and, like
    every ``divo.train`` line, to the console and the parent's ``train.log``)."""

    FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"

    def __init__(self, seed_dirs: Sequence[Path], seeds: Sequence[int], run_dir: Path) -> None:
        self.shared = logging.getLogger("divo.train")
        # the run's own train.log, when Hydra's job log writes it (its size before this run)
        self.parent = file_handler_for(run_dir / "train.log", self.shared)
        self.parent_size = log_size(run_dir / "train.log") if self.parent is not None else None
        self.loggers = [logging.getLogger(f"divo.train.seed{s}") for s in seeds]
        self.handlers = []
        self.accepted = False  # set once every check passed, before the run writes its files
        # each log's size before this run (None: it did not exist), for :meth:`undo`
        self.sizes = {
            d / "train.log": (d / "train.log").stat().st_size
            if (d / "train.log").is_file()
            else None
            for d in seed_dirs
        }
        for d in seed_dirs:
            d.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(d / "train.log")
            handler.setFormatter(logging.Formatter(self.FORMAT))
            handler.setLevel(logging.INFO)
            self.handlers.append(handler)
        for h in self.handlers:
            self.shared.addHandler(h)
        self._level = self.shared.level
        if self.shared.getEffectiveLevel() > logging.INFO:  # e.g. outside Hydra's logging setup
            self.shared.setLevel(logging.INFO)
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._show_warning

    def _show_warning(self, message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        """A warning of the run (e.g. a damaged checkpoint skipped) goes to the train.log files
        as well as the console."""
        self._showwarning(message, category, filename, lineno, file, line)
        self.to_files(
            logging.LogRecord(
                "py.warnings", logging.WARNING, filename, lineno, str(message), None, None
            )
        )

    def to_files(self, record: logging.LogRecord) -> None:
        """``record`` into every seed's train.log and the run's own (Hydra's), not the console."""
        for h in (*self.handlers, *([self.parent] if self.parent is not None else [])):
            h.handle(record)

    def drop_interrupted_lines(self, ckpts: Sequence[Mapping]) -> int:
        """What the logs hold past the checkpoints a resume starts from (lines an interrupted
        run wrote after them) is taken out, as from a single run's train.log; returns how many
        lines of the seeds' logs were."""
        dropped = 0
        for (path, size), ckpt in zip(self.sizes.items(), ckpts, strict=True):
            dropped += drop_interrupted_lines(path, ckpt.get("log_bytes"), size)
        if self.parent is not None:
            offset = ckpts[0].get("run_log_bytes")
            drop_interrupted_lines(self.parent.baseFilename, offset, self.parent_size)
        return dropped

    def per_seed(self) -> None:
        for log, h in zip(self.loggers, self.handlers, strict=True):
            self.shared.removeHandler(h)
            log.addHandler(h)

    def close(self) -> None:
        warnings.showwarning = self._showwarning
        for log, h in zip(self.loggers, self.handlers, strict=True):
            self.shared.removeHandler(h)
            log.removeHandler(h)
            h.close()
        self.shared.setLevel(self._level)

    def undo(self) -> None:
        """Close, and take back every line this run wrote: a log it created is deleted, one
        that was there is cut back to its old length (a refused run changes nothing)."""
        self.close()
        for path, size in self.sizes.items():
            if size is None:
                path.unlink(missing_ok=True)
            elif path.is_file():
                with path.open("r+b") as f:
                    f.truncate(size)
        parent = Path(self.parent.baseFilename) if self.parent is not None else None
        if parent is not None and self.parent_size is not None and parent.is_file():
            self.parent.flush()
            with parent.open("r+b") as f:  # the run's own (Hydra's) log, as it was
                f.truncate(self.parent_size)


def train_vectorized(
    cfg: DictConfig,
    run_dir: str | Path,
    *,
    replay_buffer=None,
    obs_stats=None,
    resume: bool = True,
    trust: Trust = None,
) -> dict[str, Any]:
    """``train.num_seeds=N``: seeds ``seed .. seed+N-1`` trained together with stacked weights.

    ``run_dir`` gets the recipe's ``config.yaml`` (with ``train.num_seeds=N``: ``divo train
    <run_dir>`` resumes every seed) and one run directory per seed, ``run_dir/seed<k>``, holding
    exactly what a single run with ``seed=k`` writes (its ``config.yaml`` has ``seed=k`` and
    ``num_seeds=1``, so ``divo evaluate`` and ``divo train <run_dir>/seed<k>`` work on it alone).
    Seed ``k``'s initial weights equal those of a single run with ``seed=k``; its batches, noise
    and diffusion draws come from one shared process stream (different from a single run's, the
    same in distribution). Evaluation uses seed ``k + 100`` as a single run does.

    Returns a summary: ``results`` (each seed's result.json), ``seeds``, and the mean over seeds
    of ``return_mean``/``normalized_score`` (``return_std``: their spread over seeds).
    ``trust``: as for :func:`divo.agents.train.train`.
    """
    n = int(cfg.train.num_seeds)
    if replay_buffer is not None or obs_stats is not None:
        raise ConfigError(
            f"train.num_seeds={n} samples the dataset of dataset.id per seed; an external replay "
            f"buffer trains one seed at a time: {MULTIRUN_HINT}"
        )
    _check_stackable(cfg)
    if cfg.dataset.get("id") is None:
        raise ConfigError(f"dataset.id is null; train.num_seeds={n} trains on a dataset: set it")
    run_dir = Path(run_dir)
    seeds = [int(cfg.seed) + i for i in range(n)]
    seed_dirs = [run_dir / f"seed{s}" for s in seeds]
    cfgs = [_seed_config(cfg, s) for s in seeds]
    if resume:  # a folder of other settings (train.num_seeds included) is refused
        check_same_run(cfg, run_dir)
        finished = [finished_result(c, d) for c, d in zip(cfgs, seed_dirs, strict=True)]
        if all(result is not None for result in finished):
            with RunLog(run_dir):  # the console only: a finished run's files are left alone
                logging.getLogger("divo.train").info(
                    "%s finished its %d steps already (all %d seeds); its files are left as "
                    "they are (pass a larger train.steps to extend it)",
                    run_dir,
                    int(cfg.train.steps),
                    n,
                )
            return _summary(cfg, finished, run_dir)
    device = resolve_device(cfg.device)
    check_compile_mode(device=device, **compile_options(cfg))
    if device.type == "cpu" and cfg.train.threads:
        torch.set_num_threads(int(cfg.train.threads))
    new_dirs = [d for d in (run_dir, *seed_dirs) if not d.exists()]

    def remove_new_dirs() -> None:
        for d in reversed(new_dirs):  # seed folders first, then the run's own
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()

    # the run and each seed's folder (`divo train <run>/seed<k>` resumes one seed alone) are
    # held by this process; one another process holds is refused with nothing changed
    lock = RunLock(run_dir, *seed_dirs)
    try:
        lock.acquire(create=True)
    except DivoError:
        remove_new_dirs()
        raise
    try:
        logs = _SeedLogs(seed_dirs, seeds, run_dir)
        try:
            return _train_seeds(
                cfg, cfgs, run_dir, seed_dirs, seeds, device, resume, trust, logs, lock
            )
        except BaseException as exc:
            if logs.accepted:  # an error that ends the run: in train.log too
                mark_after_start(exc)
                logs.to_files(error_record(exc))
            elif isinstance(exc, DivoError):  # refused on its input (data, recipe, checkpoint)
                logs.undo()  # no trace
                lock.release()
                remove_new_dirs()
            raise
        finally:
            logs.close()
    finally:
        lock.release()


def _train_seeds(cfg, cfgs, run_dir, seed_dirs, seeds, device, resume, trust, logs, lock):
    n = len(seeds)
    start = time.perf_counter()
    seed_everything(seeds[0])
    data, behavior_score = load_run_data(cfg, device)
    log_dataset_settings(cfg)
    logs.per_seed()
    batch_size = int(cfg.train.batch_size)
    obs_dim, act_dim = data.observation_dim, data.action_dim

    def before_build(seed: int) -> None:
        # what a single run with this seed draws before building its agent: seeding, then the
        # probe batch (so the initial weights are that run's)
        seed_everything(seed)
        check_batch_keys(DeviceSampler(data.data, batch_size).sample())

    vec = build_vectorized_agent(
        cfg,
        seeds,
        observation_dim=obs_dim,
        action_dim=act_dim,
        obs_mean=data.obs_mean,
        obs_std=data.obs_std,
        device=device,
        before_build=before_build,
    )
    seed_everything(seeds[0])  # the shared stream of every seed's batches and noise
    sampler = DeviceSampler(data.data, batch_size, num_seeds=n)
    checkpointers = [Checkpointer(d, cfg.train.keep_checkpoints) for d in seed_dirs]
    acc = SeedMetricAccumulator()
    start_step, last_evals, elapsed_before = 0, [None] * n, [0.0] * n
    data_spec = spec_json(data)

    def check(payload: dict, file: Path) -> None:
        check_trusted(payload, file, cfg, data_spec, trust)

    found, stale = _load_common_checkpoints(checkpointers, check) if resume else (None, [])
    if found is not None:
        start_step, ckpts = found
        for c, seed_cfg, d in zip(ckpts, cfgs, seed_dirs, strict=True):
            check_resumable(c, seed_cfg, obs_dim, act_dim, d, data.fingerprint)
        for i, c in enumerate(ckpts):
            vec.load_training_state(i, c["agent"])
        acc.load_seed_states([c.get("metrics", {}) for c in ckpts], device)
        last_evals = [c.get("last_eval") for c in ckpts]
        elapsed_before = [float(c.get("wall_clock_s", 0.0)) for c in ckpts]
        set_rng_state(ckpts[0]["rng"])  # last: nothing above may draw random numbers after it
    check_steps(cfg, start_step, run_dir)

    logs.accepted = True  # every check passed: from here on the run writes its files
    lock.commit()
    _remove_stale_checkpoints(stale)
    if found is not None:
        dropped = logs.drop_interrupted_lines(ckpts)
        logs.shared.info(
            "resumed from step %d%s",
            start_step,
            f"; the {dropped} line(s) the seeds' interrupted run logged after it were taken "
            "out of their train.log files"
            if dropped
            else "",
        )
    for folder in (run_dir, *seed_dirs):
        moved = set_aside_earlier_result(folder)
        if moved:
            logs.shared.info(
                "the earlier result of %s was set aside as %s", folder, " and ".join(moved)
            )
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    loggers = []
    for seed_cfg, d in zip(cfgs, seed_dirs, strict=True):
        OmegaConf.save(seed_cfg, d / "config.yaml", resolve=True)
        loggers.append(
            MetricsLogger(
                d,
                cfg.logger.backend,
                cfg.logger.project,
                name=f"{cfg.get('recipe')}-s{seed_cfg.seed}",
                resume_step=start_step if found is not None else None,
            )
        )

    def checkpoint(step: int) -> None:
        # every seed's file first, then the pruning: a cut-short round never leaves a seed
        # without the previous common step
        for i, c in enumerate(checkpointers):
            extra = {
                "observation_dim": obs_dim,
                "action_dim": act_dim,
                "data_fingerprint": data.fingerprint,
                "sampler": None,
                "metrics": acc.seed_state_dict(i),
                "last_eval": last_evals[i],
                "wall_clock_s": elapsed_before[i] + time.perf_counter() - start,
                # where a resume from here cuts the seed's train.log and the run's own
                "log_bytes": log_size(seed_dirs[i] / "train.log"),
                "run_log_bytes": log_size(run_dir / "train.log"),
            }
            keep, c.keep = c.keep, c.keep + 1
            try:
                c.save(step, vec.seed_agent(i), cfgs[i], data, extra)
            finally:
                c.keep = keep
        for c in checkpointers:
            for old in c.files()[: -c.keep]:
                old.unlink()

    train_step = TrainStep(vec, sampler.sample, device=device, **compile_options(cfg))
    steps = int(cfg.train.steps)
    eta = Eta(start_step, steps, device, logs.shared, eval_every=int(cfg.train.eval_every))
    if start_step == 0 and cfg.train.get("eval_at_start", False):
        with eta.evaluation():
            for i in range(n):
                evaluate_at_start(
                    vec.seed_agent(i), data, cfgs[i], device, loggers[i], logs.loggers[i]
                )
        vec.train()
    bar, redirect = progress_bar(cfg, start_step, f"{data.dataset_id} x{n} seeds")
    vec.train()
    log_every, eval_every = int(cfg.train.log_every), int(cfg.train.eval_every)
    checkpoint_every = int(cfg.train.checkpoint_every)
    with bar, redirect:
        for step in range(start_step + 1, steps + 1):
            acc.add(train_step())
            bar.update(1)
            eta.update(step)
            rows: list[dict[str, Any]] = [{} for _ in seeds]
            if step % log_every == 0 or step == steps:
                for i, means in enumerate(acc.mean_per_seed(n)):
                    rows[i].update(means)
                    check_finite(rows[i], step, checkpointers[i])
            if step % eval_every == 0 or step == steps:
                with eta.evaluation(step):
                    for i in range(n):
                        last_evals[i] = evaluate_into_row(
                            vec.seed_agent(i), data, cfgs[i], device, step, rows[i], logs.loggers[i]
                        )
                vec.train()
                scores = [e["normalized_score"] for e in last_evals if e is not None]
                if scores and all(s is not None for s in scores):
                    bar.set_postfix(score=f"{sum(scores) / len(scores):.1f}")
            for logger, row in zip(loggers, rows, strict=True):
                if row:
                    logger.log(step, row)
            if step % checkpoint_every == 0 or step == steps:
                checkpoint(step)

    results = []
    for i, d in enumerate(seed_dirs):
        payload = policy_payload(vec.seed_agent(i), cfgs[i], data, steps)
        save_policy_file(payload, d / "policy.pt")
        wall = elapsed_before[i] + time.perf_counter() - start
        result = run_result(
            cfgs[i], data, behavior_score, last_evals[i], wall, device, d, data.fingerprint
        )
        result["stacked_seeds"] = seeds  # trained beside these (a single run has no such key)
        write_json_atomic(d / "result.json", result, indent=2)
        results.append(result)
    if data is not None:
        data.close()  # its pooled evaluation environments (OGBench's)
    return _summary(cfg, results, run_dir)


def _summary(cfg: DictConfig, results: list[dict], run_dir: Path) -> dict[str, Any]:
    """One dictionary over the seeds, with the keys of a single run's result (means over
    seeds; ``return_std`` is the spread of the seeds' mean returns)."""
    returns = [r["return_mean"] for r in results if r["return_mean"] is not None]
    scores = [r["normalized_score"] for r in results if r["normalized_score"] is not None]
    seeds = [r["seed"] for r in results]
    mean = sum(returns) / len(returns) if returns else None
    # what every seed's result says alike (recipe, data, steps, ...); what differs per seed
    # (its best evaluation, critic check, schedules, ...) stays in ``results`` only
    alike = {k: v for k, v in results[0].items() if all(r.get(k) == v for r in results[1:])}
    summary = {
        **alike,
        "seed": f"{seeds[0]}..{seeds[-1]}",
        "seeds": seeds,
        "return_mean": mean,
        "return_std": float(torch.tensor(returns).std(unbiased=False)) if returns else None,
        "normalized_score": sum(scores) / len(scores) if len(scores) == len(results) else None,
        "episodes": sum(r["episodes"] for r in results),
        "wall_clock_s": max(r["wall_clock_s"] for r in results),
        "run_dir": str(run_dir),
        "results": results,
    }
    if "success_rate" in results[0]:  # goal-reaching data: the seeds' mean success rate
        rates = [r["success_rate"] for r in results]
        ok = all(rate is not None for rate in rates)
        summary["success_rate"] = sum(rates) / len(rates) if ok else None
    return summary
