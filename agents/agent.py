"""The offline agent: every network, target copy and optimiser, and its update order.

One class serves DIVO, its ablations and TD3+BC: which parts exist is decided by the recipe
(see :mod:`divo.agents.builder`). The update order is written out, top to bottom, in
:meth:`OfflineAgent.run_update`; each stage it runs (critic, value, advantage, behaviour model,
actor) is a method of :class:`divo.objectives.stages.DIVOStages`, which the TorchRL loss module
:class:`divo.objectives.losses.DIVOLoss` runs too: one implementation of each loss.
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Callable, Mapping

import torch
from tensordict import TensorDictBase
from torch import nn

from divo.objectives.actor import NormalizedPolicy, ObservationNormalizer, TD3BCActorLoss
from divo.objectives.behavior import WeightedBehaviorLoss
from divo.objectives.critic import TD3CriticLoss, TwinQ
from divo.objectives.functional import polyak_update
from divo.objectives.keys import DEFAULT_KEYS, Keys
from divo.objectives.selectors import TargetSelector
from divo.objectives.stages import DIVOStages
from divo.objectives.value import Advantage, StateValue, ValueLoss
from divo.objectives.weighting import WeightingScheme

# Optimiser settings that say how a step runs, not what it computes: a checkpoint never sets them.
EXECUTION_OPTIONS = ("foreach", "fused", "capturable", "differentiable")


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off: a target or EMA network."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


class TrainableAgent(nn.Module):
    """What the training loop needs of every agent beyond ``update`` and ``policy``:
    the checkpoint state and the parameter guard. Subclasses set ``optimizers`` and keep
    ``num_updates`` as a Python int."""

    optimizers: dict[str, torch.optim.Optimizer]
    num_updates: int
    _generator: torch.Generator | None = None  # the running update's generator, for its stages
    # optimiser name -> factor of its base learning rate at update t (0-based), e.g. IQL's
    # cosine decay of its policy's lr; set by the builder (see :func:`cosine_decay`)
    lr_schedules: Mapping[str, Callable[[int], float]] = types.MappingProxyType({})

    def update(
        self, batch: TensorDictBase, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """One training step on a TED batch, each stage run eagerly; returns detached metrics
        (no host sync)."""
        return self.run_update(batch, EagerStages(self), generator)

    def run_update(
        self,
        batch: TensorDictBase,
        stages: Stages,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The update, top to bottom, with each stage executed by ``stages``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def make_stages(
        self,
        wrap: Callable | None = None,
        on_wrap_error: Callable[[str, Exception], None] | None = None,
    ) -> Stages:
        """The executor of this agent's stages, each wrapped by ``wrap`` (e.g. torch.compile;
        see :class:`StageCalls`)."""
        return EagerStages(self, wrap, on_wrap_error)

    def measured_grads(self, name: str) -> tuple[list[torch.Tensor], float] | None:
        """The parameters whose gradient norm the step of optimiser ``name`` reports (metric
        ``<name>_grad_norm``) and clips to the returned max norm (0: no clipping), or None:
        neither (the default)."""
        return None

    def _step(self, name: str, loss: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Backward, the gradient norm (clipped) where :meth:`measured_grads` asks for it, and
        the step of optimiser ``name``; returns the norm as a metric, if any."""
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        measured = self.measured_grads(name)
        extra = None
        if measured is not None:
            params, max_norm = measured
            norm = nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
            extra = {f"{name}_grad_norm": norm.detach()}
        apply_lr_schedule(self, name, opt)
        opt.step()
        return extra

    def update_kind(self) -> bool:
        """Which host-side branch the next update takes: here, whether it updates the actor
        (every ``policy_delay`` updates). ``compile=graph`` records one CUDA graph per kind and
        replays the one each step needs, so an agent whose update branches on the host on
        anything else must return it here (any hashable value)."""
        return (self.num_updates + 1) % int(getattr(self, "policy_delay", 1)) == 0

    def non_finite_parameters(self) -> list[str]:
        """Names of parameters holding NaN/inf (one device sync; call it rarely)."""
        names, params = zip(*self.named_parameters(), strict=True)
        finite = torch.stack([torch.isfinite(p).all() for p in params]).cpu().tolist()
        return [n for n, ok in zip(names, finite, strict=True) if not ok]

    def training_state(self) -> dict:
        """Everything the update reads: parameters, target/EMA copies, buffers, optimiser
        states and the step counter."""
        return {
            "modules": self.state_dict(),
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "num_updates": self.num_updates,
        }

    def load_training_state(self, state: Mapping) -> None:
        """Restore :meth:`training_state`. The optimisers keep how they run (fused, foreach,
        capturable: this run's choices, e.g. a CPU checkpoint resumed under ``compile=graph``);
        only their state is loaded."""
        self.load_state_dict(state["modules"])
        self.num_updates = int(state["num_updates"])
        for name, opt in self.optimizers.items():
            how = [{k: g.get(k) for k in EXECUTION_OPTIONS if k in g} for g in opt.param_groups]
            opt.load_state_dict(state["optimizers"][name])
            for group, options in zip(opt.param_groups, how, strict=True):
                group.update(options)
                on_device = bool(group.get("fused") or group.get("capturable"))
                for p in group["params"]:
                    step = opt.state.get(p, {}).get("step")
                    if torch.is_tensor(step):  # fused/capturable Adam counts on the device
                        device = p.device if on_device else torch.device("cpu")
                        opt.state[p]["step"] = step.to(device=device, dtype=torch.float32)


def cosine_decay(update: int, steps: int) -> float:
    """Cosine decay of a learning rate to 0 over ``steps`` updates (optax's
    ``cosine_decay_schedule``, as IQL and IDQL use it): 0.5 (1 + cos(pi min(t, T) / T))."""
    return 0.5 * (1.0 + math.cos(math.pi * min(update, steps) / steps))


def apply_lr_schedule(agent: TrainableAgent, name: str, opt: torch.optim.Optimizer) -> None:
    """Set the learning rate of optimiser ``name`` for the update in progress (the agent's
    ``num_updates`` counts it already) from its schedule, if it has one; the base rate is kept
    in each group's ``initial_lr`` (saved with the optimiser's state)."""
    schedule = agent.lr_schedules.get(name)
    if schedule is None:
        return
    factor = schedule(agent.num_updates - 1)
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


class OfflineAgent(DIVOStages, TrainableAgent):
    """TD3+BC-based agent with an optional value function and an optional behaviour model.

    Parts (all ``nn.Module``):
      normalizer, critic (+ critic_target): always;
      actor (+ actor_target), actor_loss, selector: unless the recipe has no actor (IQL, IDQL:
      the behaviour model is deployed through ``policy_factory``; the targets move every
      ``policy_delay`` updates all the same);
      value + value_loss + advantage: when the weighting or the selector needs advantages;
      behavior_model + weighting + behavior_loss: when the recipe has a behaviour model;
      behavior_model_ema: its exponential moving average (rate ``behavior_ema`` per update),
      when a deployed behaviour model samples from one (IDQL: 0.001).
    ``optimizers`` maps part name -> optimiser; the agent owns them so that checkpoints are whole.
    """

    def __init__(
        self,
        *,
        normalizer: ObservationNormalizer,
        actor: nn.Module | None,
        critic: TwinQ,
        critic_loss: TD3CriticLoss,
        actor_loss: TD3BCActorLoss | None,
        selector: TargetSelector | None,
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        value: StateValue | None = None,
        value_loss: ValueLoss | None = None,
        advantage: Advantage | None = None,
        behavior_model: nn.Module | None = None,
        weighting: WeightingScheme | None = None,
        behavior_loss: WeightedBehaviorLoss | None = None,
        tau: float = 5e-3,
        policy_delay: int = 2,
        keys: Keys = DEFAULT_KEYS,
        behavior_ema: float | None = None,
    ) -> None:
        super().__init__()
        self.observation_dim = int(normalizer.mean.shape[-1])
        self.normalizer = normalizer
        self.actor = actor
        self.actor_target = frozen_copy(actor) if actor is not None else None
        self.critic = critic
        self.critic_target = frozen_copy(critic)
        self.value = value
        self.behavior_model = behavior_model
        self.behavior_ema = behavior_ema
        self.behavior_model_ema = None
        if behavior_ema is not None:
            if behavior_model is None or not 0.0 < behavior_ema <= 1.0:
                raise ValueError(
                    f"behavior.ema_rate={behavior_ema} needs a behaviour model and a rate in "
                    "(0, 1] (IDQL: 0.001), or null for no moving average"
                )
            self.behavior_model_ema = frozen_copy(behavior_model)
            self._ema_pairs = (
                list(self.behavior_model_ema.parameters()),
                list(behavior_model.parameters()),
            )
        self.critic_loss = critic_loss
        self.actor_loss = actor_loss
        self.value_loss = value_loss
        self.advantage = advantage
        self.weighting = weighting
        self.behavior_loss = behavior_loss
        self.selector = selector
        self.tau = tau
        self.policy_delay = policy_delay
        self.keys = keys
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(optimizers or {})
        self.num_updates = 0  # a Python int: reading it never syncs with the device
        # Hydra config that rebuilds ``self.policy`` from its state_dict (set by the builder)
        self.policy_config: dict | None = None
        # Optional: builds the deployable policy from the agent's parts instead of normaliser +
        # actor (e.g. IDQL-style resampling over the behaviour model); set by the builder.
        self.policy_factory: Callable[[OfflineAgent], nn.Module] | None = None
        self._check_parts()
        actors = (self.actor_target, self.actor) if actor is not None else (nn.Identity(),) * 2
        self._target_pairs = (
            list(self.critic_target.parameters()) + list(actors[0].parameters()),
            list(self.critic.parameters()) + list(actors[1].parameters()),
        )

    @property
    def deployed_behavior_model(self) -> nn.Module | None:
        """The behaviour model a deployed sampler draws from: its moving average when
        ``behavior_ema`` is set (IDQL samples its EMA copy), else the trained model itself."""
        if self.behavior_model_ema is not None:
            return self.behavior_model_ema
        return self.behavior_model

    @property
    def policy(self) -> nn.Module:
        """The deployable policy (raw observation -> action): normaliser + actor, unless the
        builder set a ``policy_factory``."""
        if self.policy_factory is not None:
            return self.policy_factory(self)
        return NormalizedPolicy(self.normalizer, self.actor)

    # ------------------------------------------------------------------ the update, top to bottom
    def run_update(
        self,
        batch: TensorDictBase,
        stages: Stages,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training step on a TED batch; returns detached metrics (no host sync).

        Order: critic -> value -> advantages of dataset actions -> behaviour model (and its
        moving average, if any) ->
        (every ``policy_delay`` steps) candidates -> target selection -> actor -> Polyak targets.
        Each stage is executed by ``stages``: eagerly (:class:`EagerStages`, what ``update``
        uses), compiled, or vectorised over stacked seeds (:mod:`divo.agents.vectorized`). Every
        stage is a method (from :class:`~divo.objectives.stages.DIVOStages`) whose arguments
        and results are tensors only."""
        k = self.keys
        obs = batch.get(k.observation)
        next_obs = batch.get(k.next_observation)
        action = batch.get(k.action)
        reward = batch.get(k.reward)
        terminated = batch.get(k.terminated)
        self.num_updates += 1
        metrics: dict[str, torch.Tensor] = {}

        # 1. Critic: TD3 target with target-policy smoothing, true terminals only.
        out = stages.run(
            self.critic_stage,
            "critic",
            obs,
            next_obs,
            action,
            reward,
            terminated,
            generator=generator,
        )
        obs, y = out.pop("observation"), out.pop("td_target")
        # for value objective bootstrap_min: s' and the next action a' of the TD target
        bootstrap = [out.pop(key) for key in ("next_observation", "next_action") if key in out]
        metrics.update(out)

        # 2. State value V(s): expectile of min Q_target(s, a) (IQL), A2PR's bootstrap target y,
        #    or (A2PR's code) the smaller of y and the online critic's own TD target.
        v = q_data = None
        if self.value is not None:
            extra = (reward, terminated, *bootstrap) if bootstrap else ()
            out = stages.run(self.value_stage, "value", obs, action, y, *extra)
            v = out.pop("state_value")  # this pass's V(s), before the value's optimiser step
            q_data = out.pop("target_q", None)  # expectile: V's target, min Q_target(s, a)
            metrics.update(out)

        # 3. Advantage of the dataset actions, A(s, a) = Q(s, a) - V(s), detached, with Q from
        #    the critic V is fitted to (expectile: min Q_target, as IQL; bootstrap: the online
        #    Q1 just updated, as A2PR) and V(s) from the value step or evaluated again
        #    (``v_from: updated``); V(s) is kept for the candidates' advantages. Under IQL's
        #    pairing Q(s, a) is V's own target from step 2 (the target critic has not moved).
        adv = None
        if self._needs_advantage:
            reuse = (v,) if self.advantage.v_from == "value_step" else ()
            if q_data is not None and self._reuse_target_q:
                out = stages.run(self.target_q_advantage_stage, None, obs, q_data, *reuse)
            else:
                out = stages.run(self.advantage_stage, None, obs, action, *reuse)
            adv, v = out.pop("advantage"), out.pop("state_value")
            metrics.update(out)

        # 4. Behaviour model: per-sample loss weighted by the scheme (PAD: 1[A > 0]).
        if self.behavior_model is not None:
            if hasattr(self.behavior_model, "set_training_step"):  # e.g. a noise curriculum
                self.behavior_model.set_training_step(self.num_updates - 1)
            weight_input = adv if adv is not None else torch.zeros_like(action[..., :1])
            out = stages.run(
                self.behavior_stage, "behavior", obs, action, weight_input, generator=generator
            )
            metrics.update(out)
            if self.behavior_model_ema is not None:  # the copy a deployed sampler draws from
                stages.polyak(self._ema_pairs[0], self._ema_pairs[1], self.behavior_ema)

        # 5. Actor (delayed): target from the selector, then TD3+BC loss; then Polyak targets
        #    (every ``policy_delay`` updates, with or without an actor).
        if self.num_updates % self.policy_delay == 0:
            if self.actor is not None:
                extra = () if adv is None else (adv, v)
                out = stages.run(
                    self.actor_stage, "actor", obs, action, *extra, generator=generator
                )
                metrics.update(out)
            stages.polyak(self._target_pairs[0], self._target_pairs[1], self.tau)
        return metrics


class Stages:
    """How an agent's ``run_update`` executes its stages. ``run(stage, optimizer, *args)``
    calls ``stage(*args)`` (a dict of tensors), takes an optimiser step on its ``loss_*`` entry
    when ``optimizer`` names one, and returns the other entries detached."""

    def run(self, stage, optimizer: str | None, *args, generator=None) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract

    def polyak(self, target, online, tau: float) -> None:
        polyak_update(target, online, tau)


def split_loss(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The stage's ``loss_*`` entry (at most one), and every entry detached for the metrics."""
    losses = [k for k in out if k.startswith("loss_")]
    if len(losses) > 1:
        raise ValueError(f"a stage returns one loss, got {losses}")
    loss = out[losses[0]] if losses else None
    return loss, {name: v.detach() for name, v in out.items()}


def _own_code(fn: Callable, name: str) -> Callable:
    """A function calling ``fn``, with a code object of its own. torch.compile keeps compiled
    graphs (and their recompilation budget, 8 by default) per code object: without this, every
    agent's ``critic_stage`` would share one cache, and the ninth agent compiled in a process
    (a Hydra multirun, the benchmark) would silently run eagerly."""

    def stage(*args):
        return fn(*args)

    code = stage.__code__.replace(co_name=name)
    return types.FunctionType(code, stage.__globals__, name, None, stage.__closure__)


class StageCalls:
    """Calls stage functions, each wrapped once by ``wrap`` (e.g. ``torch.compile``) when set.

    ``on_wrap_error(name, exc)``: when set, a stage whose wrapped form fails on its first call
    (where ``torch.compile`` compiles) is reported to it and runs unwrapped from then on (stages
    are pure functions of their tensors, so calling one again is safe); without it the error
    propagates. ``compiled``: the stages whose wrapped form has run; ``unwrapped``: those that
    fell back.
    """

    def __init__(
        self,
        wrap: Callable | None = None,
        on_wrap_error: Callable[[str, Exception], None] | None = None,
    ) -> None:
        self.wrap = wrap
        self.on_wrap_error = on_wrap_error
        self._wrapped: dict[str, Callable] = {}
        self.compiled: set[str] = set()
        self.unwrapped: set[str] = set()

    def __call__(self, name: str, fn: Callable, args: tuple):
        if self.wrap is None or name in self.unwrapped:
            return fn(*args)
        if name not in self._wrapped:
            self._wrapped[name] = self.wrap(_own_code(fn, name))
        if name in self.compiled or self.on_wrap_error is None:
            out = self._wrapped[name](*args)
        else:
            try:
                out = self._wrapped[name](*args)
            except Exception as exc:
                self.on_wrap_error(name, exc)
                self.unwrapped.add(name)
                return fn(*args)
        self.compiled.add(name)
        return out


class EagerStages(Stages):
    """Plain PyTorch: each stage runs as written (or as ``wrap`` makes it, see
    :class:`StageCalls`), then backward and the optimiser step."""

    def __init__(
        self,
        agent: TrainableAgent,
        wrap: Callable | None = None,
        on_wrap_error: Callable[[str, Exception], None] | None = None,
    ) -> None:
        self.agent = agent
        self.calls = StageCalls(wrap, on_wrap_error)

    def run(self, stage, optimizer, *args, generator=None):
        self.agent._generator = generator
        try:
            loss, out = split_loss(self.calls(stage.__name__, stage, args))
        finally:
            self.agent._generator = None
        if optimizer is not None:
            out.update(self.agent._step(optimizer, loss) or {})
        return out
