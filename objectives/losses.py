"""DIVO, Diffusion-QL and FQL as TorchRL loss modules (``torchrl.objectives.LossModule``).

Each loss module holds the same parts as the agent of its recipe and computes its losses with
the same stage methods (:mod:`divo.objectives.stages`): a TorchRL training loop and
``divo train`` compute the same numbers. What TorchRL's own losses give, these give too:

* keys in TorchRL's TED layout, renamed with ``set_keys(observation="obs", ...)``;
* ``forward(td)``: a TensorDict of every ``loss_*`` plus detached diagnostics;
* target parameters under ``target_<name>_params`` (online ones under ``<name>_params``),
  moved by TorchRL's ``SoftUpdate``: the loss never updates them itself;
* ``make_value_estimator``: the TD target is one-step (TD0) with true terminals only; its
  ``gamma`` can be set, other estimators are refused.

The update of each method runs its stages in order, each loss stepped before the next stage
reads the network it trained (e.g. DIVO's actor is pulled by the critic after the critic's
step, as in TorchRL's TD3+BC example). ``stages(td, step)`` yields ``(name, losses)`` one stage
at a time: the caller steps optimiser ``name`` on ``losses["loss_<name>"]`` and continues::

    for name, losses in loss_module.stages(batch, step):
        optimizers[name].zero_grad()
        losses[f"loss_{name}"].backward()
        optimizers[name].step()
    if loss_module.updates_targets(step):
        target_updater.step()  # torchrl.objectives.SoftUpdate(loss_module, tau=...)

The parts may be plain modules or ``tensordict.nn.TensorDictModule``s (one input key, one
output key; a TensorDictModule is called with tensors, so its key names do not matter). The
critic must be a :class:`~divo.objectives.critic.TwinQ` and a behaviour model must follow the
behaviour-model protocol (``per_sample_loss``, ``sample``): a TensorDictModule wrapping one is
unwrapped.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase, TensorDictParams
from torch import nn
from torchrl.objectives import LossModule
from torchrl.objectives.utils import ValueEstimators

from divo.objectives.actor import TD3BCActorLoss
from divo.objectives.behavior import WeightedBehaviorLoss
from divo.objectives.critic import TD3CriticLoss, TwinQ
from divo.objectives.diffusion_ql import DiffusionQLActorLoss, DiffusionQLCriticLoss
from divo.objectives.fql import FQLActorLoss, FQLCriticLoss
from divo.objectives.functional import polyak_update
from divo.objectives.keys import DEFAULT_KEYS, NestedKey
from divo.objectives.stages import DiffusionQLStages, DIVOStages, FQLStages
from divo.objectives.value import Advantage, ValueLoss


def _frozen_copy(module: nn.Module) -> nn.Module:
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


def _unwrap(module: nn.Module | None, what: str, *methods: str) -> nn.Module | None:
    """The module the stages call: a TensorDictModule's inner module when the stages need
    ``methods`` of it (the critic's ``q1``, a behaviour model's ``sample``), else itself."""
    if module is None:
        return None
    if isinstance(module, TensorDictModuleBase):
        if len(module.in_keys) != 1 or len(module.out_keys) != 1:
            if not methods:
                raise ValueError(
                    f"the {what} is called with one tensor and returns one: a TensorDictModule "
                    f"with one in_key and one out_key, got {module.in_keys} -> {module.out_keys}"
                )
        if methods:
            module = getattr(module, "module", module)
    missing = [m for m in methods if not callable(getattr(module, m, None))]
    if missing:
        raise TypeError(f"the {what} ({type(module).__name__}) has no {', '.join(missing)}")
    return module


@dataclass
class _TEDKeys:
    """The TED keys the losses read (TorchRL's names), remappable with ``set_keys``.

    Attributes:
        observation: the state s.
        action: the dataset action a, in [-1, 1].
        next_observation: the next state s'.
        reward: the reward r, shape [*B, 1].
        terminated: the TRUE terminal flag (a time-limit truncation is not terminal).
    """

    observation: NestedKey = DEFAULT_KEYS.observation
    action: NestedKey = DEFAULT_KEYS.action
    next_observation: NestedKey = DEFAULT_KEYS.next_observation
    reward: NestedKey = DEFAULT_KEYS.reward
    terminated: NestedKey = DEFAULT_KEYS.terminated


class OfflineLossModule(LossModule):
    """What the three loss modules share: TED keys (``set_keys``), target parameters for
    ``SoftUpdate``, ``forward``, ``stages`` and ``make_value_estimator``."""

    _AcceptedKeys = _TEDKeys
    default_keys = _TEDKeys
    default_value_estimator = ValueEstimators.TD0
    _generator: torch.Generator | None = None
    critic_loss: nn.Module

    def _register_target(self, name: str, online: nn.Module, target: nn.Module) -> None:
        """TorchRL's layout for ``SoftUpdate``: ``<name>_params`` (the online parameters,
        shared with ``online``) and ``target_<name>_params`` (the tensors of ``target``, which
        ``SoftUpdate`` moves in place, so ``target`` follows)."""
        self.__dict__[f"{name}_params"] = TensorDict.from_module(online)
        setattr(
            self,
            f"target_{name}_params",
            TensorDictParams(TensorDict.from_module(target), no_convert=True),
        )
        self._has_update_associated[name] = False

    def named_parameters(self, prefix: str = "", recurse: bool = True):
        """The trainable parameters: the target copies are left out."""
        for name, param in super().named_parameters(prefix=prefix, recurse=recurse):
            if not name.startswith(f"{prefix}.target_" if prefix else "target_"):
                yield name, param

    def _read(self, td: TensorDictBase, *names: str) -> list[torch.Tensor]:
        return [td.get(getattr(self.tensor_keys, name)) for name in names]

    def networks(self) -> dict[str, nn.Module]:
        """Optimiser name -> the network its loss trains (build one optimiser per entry)."""
        raise NotImplementedError  # pragma: no cover - abstract

    _isolating = False  # set by forward: each stage reads the other networks detached

    def _run(self, stage, *args, generator: torch.Generator | None = None) -> dict:
        """``stage(*args)`` with ``generator`` for its random draws; in ``forward``, with
        every network but the stage's own (``<name>_stage`` trains ``name``) detached."""
        self._generator = generator
        swapped = []  # (network, its own parameters while it runs detached)
        try:
            if self._isolating:
                own = stage.__name__.removesuffix("_stage")
                for name, network in self.networks().items():
                    if name != own:
                        detached = TensorDict.from_module(network).detach()
                        swapped.append((network, detached.to_module(network)))
            return stage(*args)
        finally:
            self._generator = None
            for network, params in reversed(swapped):
                params.to_module(network)

    @staticmethod
    def _losses(out: dict) -> TensorDict:
        """A stage's outputs as a TensorDict: ``loss_*`` with their graph, the rest detached."""
        return TensorDict(
            {k: v if k.startswith("loss_") else v.detach() for k, v in out.items()},
            batch_size=[],
        )

    def stages(
        self,
        tensordict: TensorDictBase,
        step: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple[str, TensorDict]]:
        """One update, a stage at a time, in the method's order.

        Yields ``(name, losses)``: ``losses`` holds ``loss_<name>`` (with its graph) and
        detached diagnostics; step optimiser ``name`` on it before asking for the next stage,
        which reads the network as stepped.

        Args:
            tensordict: a sampled TED batch (keys as ``tensor_keys`` names them).
            step: the number of updates done before this one; it decides the delayed stages
                (None: every stage runs, as in ``forward``).
            generator: the generator of the update's random draws (None: torch's global one).
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def updates_targets(self, step: int) -> bool:
        """Whether the target networks move after update ``step`` (0-based)."""
        return True

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        """Every loss of one update computed on ``tensordict`` from the current parameters
        (no stage is stepped in between), with detached diagnostics. Each ``loss_<name>``
        reaches network ``name`` only (the others are read detached, as in TorchRL's
        losses), so the sum of the losses can be back-propagated at once."""
        out = TensorDict({}, batch_size=[])
        self._isolating = True
        try:
            for _, losses in self.stages(tensordict):
                out.update(losses)
        finally:
            self._isolating = False
        return out

    def make_value_estimator(
        self, value_type: ValueEstimators | None = None, **hyperparams: float
    ) -> OfflineLossModule:
        """The TD target is the method's one-step TD0 target (true terminals only).

        Args:
            value_type: None or ``ValueEstimators.TD0``; any other is refused.
            **hyperparams: ``gamma``, the discount of the TD target.

        Returns:
            The loss module.
        """
        if value_type not in (None, ValueEstimators.TD0):
            raise NotImplementedError(
                f"{type(self).__name__} bootstraps one step (TD0); {value_type} is not supported"
            )
        unknown = set(hyperparams) - {"gamma"}
        if unknown:
            raise TypeError(f"TD0 takes gamma only, got {sorted(unknown)}")
        if "gamma" in hyperparams:
            gamma = float(hyperparams["gamma"])
            if not 0.0 <= gamma <= 1.0:
                raise ValueError(f"gamma must be in [0, 1], got {gamma}")
            self.critic_loss.gamma = gamma
        self.value_type = ValueEstimators.TD0
        return self

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass  # the keys are read straight from ``tensor_keys``


class DIVOLoss(DIVOStages, OfflineLossModule):
    """DIVO and every recipe of :class:`~divo.agents.agent.OfflineAgent` as one loss module:
    the weighting, selector and behaviour model are constructor arguments, so DIVO,
    soft_weight, uniform_weight, cvae, consistency, DIVO with a flow, TD3+BC (no behaviour
    model, dataset selector) and IQL (no actor, ``bootstrap: value``) are this class.

    Stages (optimiser names): ``critic`` -> ``value`` -> ``behavior`` -> ``actor`` (every
    ``policy_delay`` updates; the targets move after it). Advantages of the dataset actions are
    computed between value and behaviour, without an optimiser.

    Args:
        actor_network: deterministic actor s -> a in [-1, 1] (None: no actor, e.g. IQL).
        qvalue_network: twin critic (:class:`~divo.objectives.critic.TwinQ`).
        value_network: V(s), needed when the weighting or the selector reads advantages.
        behavior_model: behaviour model (DDPM, CVAE, consistency, flow, ...), or None.
        weighting: weighting scheme of the behaviour loss (PAD's binary weight, exp_awr, ...).
        selector: target selector of the actor's BC term (ADPO, resampling, dataset).
        critic_loss: the TD3 critic loss (default: ``TD3CriticLoss()``).
        actor_loss: the TD3+BC actor loss (default: ``TD3BCActorLoss()``).
        value_loss: V's loss (default with a value network: ``ValueLoss()``, IQL's expectile).
        advantage: how advantages are formed (default with a value network: ``Advantage()``).
        behavior_loss: the weighted behaviour loss (default: ``WeightedBehaviorLoss()``).
        normalizer: observation normaliser applied to s and s' (default: none).
        policy_delay: the actor (and the targets) step every ``policy_delay`` updates.
        behavior_ema: rate of a moving average of the behaviour model (IDQL's sampler), moved
            by :meth:`update_behavior_ema`; None: none.
    """

    actor: nn.Module | None
    critic: TwinQ

    def __init__(
        self,
        actor_network: nn.Module | None,
        qvalue_network: nn.Module,
        *,
        value_network: nn.Module | None = None,
        behavior_model: nn.Module | None = None,
        weighting: nn.Module | None = None,
        selector: nn.Module | None = None,
        critic_loss: TD3CriticLoss | None = None,
        actor_loss: TD3BCActorLoss | None = None,
        value_loss: ValueLoss | None = None,
        advantage: Advantage | None = None,
        behavior_loss: WeightedBehaviorLoss | None = None,
        normalizer: nn.Module | None = None,
        policy_delay: int = 2,
        behavior_ema: float | None = None,
    ) -> None:
        super().__init__()
        has_value = value_network is not None
        self.normalizer = normalizer if normalizer is not None else nn.Identity()
        self.actor = _unwrap(actor_network, "actor")
        self.critic = _unwrap(qvalue_network, "critic", "q1", "min_q")
        self.value = _unwrap(value_network, "value network")
        self.behavior_model = _unwrap(behavior_model, "behaviour model", "per_sample_loss")
        self.weighting = weighting
        self.selector = selector
        self.critic_loss = critic_loss if critic_loss is not None else TD3CriticLoss()
        self.actor_loss = actor_loss if actor_loss is not None else TD3BCActorLoss()
        self.value_loss = value_loss if value_loss is not None or not has_value else ValueLoss()
        self.advantage = advantage if advantage is not None or not has_value else Advantage()
        if behavior_loss is None and behavior_model is not None:
            behavior_loss = WeightedBehaviorLoss()
        self.behavior_loss = behavior_loss
        if int(policy_delay) < 1:
            raise ValueError(f"policy_delay must be >= 1, got {policy_delay}")
        self.policy_delay = int(policy_delay)
        self._check_parts()
        self._register_target("qvalue_network", self.critic, _frozen_copy(self.critic))
        if self.actor is not None:
            self._register_target("actor_network", self.actor, _frozen_copy(self.actor))
        self.behavior_ema = behavior_ema
        self.behavior_model_ema = None
        if behavior_ema is not None:
            if self.behavior_model is None or not 0.0 < behavior_ema <= 1.0:
                raise ValueError("behavior_ema needs a behaviour model and a rate in (0, 1]")
            self.behavior_model_ema = _frozen_copy(self.behavior_model)

    def _register_target(self, name: str, online: nn.Module, target: nn.Module) -> None:
        super()._register_target(name, online, target)
        attribute = {"qvalue_network": "critic_target", "actor_network": "actor_target"}[name]
        self.__dict__[attribute] = target  # the stages call it; its tensors are the targets'

    critic_target: TwinQ
    actor_target: nn.Module | None = None

    @classmethod
    def from_agent(cls, agent) -> DIVOLoss:
        """The loss over an :class:`~divo.agents.agent.OfflineAgent`'s parts, SHARING its
        networks and target copies (a TorchRL loop then trains the agent: its checkpoint,
        ``agent.policy`` and evaluation work as after ``divo train``). The agent's
        optimisers are not used."""
        loss = cls(
            agent.actor,
            agent.critic,
            value_network=agent.value,
            behavior_model=agent.behavior_model,
            weighting=agent.weighting,
            selector=agent.selector,
            critic_loss=agent.critic_loss,
            actor_loss=agent.actor_loss,
            value_loss=agent.value_loss,
            advantage=agent.advantage,
            behavior_loss=agent.behavior_loss,
            normalizer=agent.normalizer,
            policy_delay=agent.policy_delay,
        )
        loss._register_target("qvalue_network", agent.critic, agent.critic_target)
        if agent.actor is not None:
            loss._register_target("actor_network", agent.actor, agent.actor_target)
        if agent.behavior_model_ema is not None:
            loss.behavior_ema = agent.behavior_ema
            loss.behavior_model_ema = agent.behavior_model_ema
        return loss

    def networks(self) -> dict[str, nn.Module]:
        """Optimiser name -> the network its loss trains (build one optimiser per entry)."""
        parts = {
            "critic": self.critic,
            "value": self.value,
            "behavior": self.behavior_model,
            "actor": self.actor,
        }
        return {name: module for name, module in parts.items() if module is not None}

    def updates_targets(self, step: int) -> bool:
        """The targets move after the delayed actor step (every ``policy_delay`` updates)."""
        return (step + 1) % self.policy_delay == 0

    def update_behavior_ema(self) -> None:
        """Move the behaviour model's moving average (when ``behavior_ema`` is set) towards
        the model; call it after the behaviour step of every update."""
        if self.behavior_model_ema is not None:
            polyak_update(
                list(self.behavior_model_ema.parameters()),
                list(self.behavior_model.parameters()),
                self.behavior_ema,
            )

    def stages(self, tensordict, step=None, generator=None):
        """DIVO's update as :meth:`divo.agents.agent.OfflineAgent.run_update` runs it, one
        stage at a time (see :meth:`OfflineLossModule.stages`)."""
        obs, next_obs, action, reward, terminated = self._read(
            tensordict, "observation", "next_observation", "action", "reward", "terminated"
        )
        run = lambda stage, *args: self._run(stage, *args, generator=generator)  # noqa: E731

        # 1. critic: TD3 target with target-policy smoothing, true terminals only
        out = run(self.critic_stage, obs, next_obs, action, reward, terminated)
        obs, y = out.pop("observation"), out.pop("td_target")
        bootstrap = [out.pop(key) for key in ("next_observation", "next_action") if key in out]
        yield "critic", self._losses(out)

        # 2. state value V(s)
        v = q_data = None
        if self.value is not None:
            extra = (reward, terminated, *bootstrap) if bootstrap else ()
            out = run(self.value_stage, obs, action, y, *extra)
            v, q_data = out.pop("state_value"), out.pop("target_q", None)
            yield "value", self._losses(out)

        # 3. advantages of the dataset actions (no optimiser)
        adv = None
        diagnostics = {}
        if self._needs_advantage:
            reuse = (v,) if self.advantage.v_from == "value_step" else ()
            if q_data is not None and self._reuse_target_q:
                out = run(self.target_q_advantage_stage, obs, q_data, *reuse)
            else:
                out = run(self.advantage_stage, obs, action, *reuse)
            adv, v = out.pop("advantage"), out.pop("state_value")
            diagnostics = out

        # 4. behaviour model, weighted by the scheme
        if self.behavior_model is not None:
            if step is not None and hasattr(self.behavior_model, "set_training_step"):
                self.behavior_model.set_training_step(step)
            weight_input = adv if adv is not None else torch.zeros_like(action[..., :1])
            out = run(self.behavior_stage, obs, action, weight_input)
            yield "behavior", self._losses({**diagnostics, **out})
            diagnostics = {}

        # 5. actor (delayed): target from the selector, then the TD3+BC loss
        if self.actor is not None and (step is None or self.updates_targets(step)):
            extra = () if adv is None else (adv, v)
            out = run(self.actor_stage, obs, action, *extra)
            yield "actor", self._losses({**diagnostics, **out})


class DiffusionQLLoss(DiffusionQLStages, OfflineLossModule):
    """Diffusion-QL (the diffusion model IS the policy) as a loss module.

    Stages: ``critic`` (target actions from the EMA policy) -> ``actor`` (diffusion loss + eta
    times the normalised Q of a sample through the whole reverse chain). The critic target
    moves every update (``SoftUpdate``); the EMA policy by :meth:`update_ema`. Diffusion-QL
    clips each step's gradient norm to ``grad_norm`` (0: off): the caller does
    (``torch.nn.utils.clip_grad_norm_``).

    Args:
        actor_network: the generative policy (behaviour-model protocol, differentiable
            ``sample``).
        qvalue_network: twin critic.
        critic_loss: default ``DiffusionQLCriticLoss()``.
        actor_loss: default ``DiffusionQLActorLoss()``.
        normalizer: observation normaliser (default: none).
        ema_decay: decay of the EMA policy.
        ema_every: the EMA moves every ``ema_every`` updates...
        ema_start: ...once ``ema_start`` updates are done.
        grad_norm: max gradient norm of each optimiser step (read by the caller).
    """

    def __init__(
        self,
        actor_network: nn.Module,
        qvalue_network: nn.Module,
        *,
        critic_loss: DiffusionQLCriticLoss | None = None,
        actor_loss: DiffusionQLActorLoss | None = None,
        normalizer: nn.Module | None = None,
        ema_decay: float = 0.995,
        ema_every: int = 5,
        ema_start: int = 1000,
        grad_norm: float = 0.0,
    ) -> None:
        super().__init__()
        self.normalizer = normalizer if normalizer is not None else nn.Identity()
        self.actor = _unwrap(actor_network, "policy", "per_sample_loss", "sample")
        self.critic = _unwrap(qvalue_network, "critic", "q1", "min_q")
        self.critic_loss = critic_loss if critic_loss is not None else DiffusionQLCriticLoss()
        self.actor_loss = actor_loss if actor_loss is not None else DiffusionQLActorLoss()
        self.ema_decay, self.ema_every, self.ema_start = ema_decay, ema_every, ema_start
        self.grad_norm = grad_norm
        self.__dict__["actor_ema"] = _frozen_copy(self.actor)
        self._register_target("qvalue_network", self.critic, _frozen_copy(self.critic))

    def _register_target(self, name: str, online: nn.Module, target: nn.Module) -> None:
        super()._register_target(name, online, target)
        self.__dict__["critic_target"] = target

    @classmethod
    def from_agent(cls, agent) -> DiffusionQLLoss:
        """The loss over a :class:`~divo.agents.diffusion_ql.DiffusionQLAgent`'s parts,
        sharing its networks, EMA policy and critic target."""
        loss = cls(
            agent.actor,
            agent.critic,
            critic_loss=agent.critic_loss,
            actor_loss=agent.actor_loss,
            normalizer=agent.normalizer,
            ema_decay=agent.ema_decay,
            ema_every=agent.ema_every,
            ema_start=agent.ema_start,
            grad_norm=agent.grad_norm,
        )
        loss.__dict__["actor_ema"] = agent.actor_ema
        loss._register_target("qvalue_network", agent.critic, agent.critic_target)
        return loss

    def networks(self) -> dict[str, nn.Module]:
        """Optimiser name -> the network its loss trains."""
        return {"critic": self.critic, "actor": self.actor}

    def update_ema(self, step: int) -> None:
        """After update ``step`` (0-based): move the EMA policy when the schedule says so."""
        if step % self.ema_every == 0 and step >= self.ema_start:
            polyak_update(
                list(self.actor_ema.parameters()),
                list(self.actor.parameters()),
                1.0 - self.ema_decay,
            )

    def stages(self, tensordict, step=None, generator=None):
        """Diffusion-QL's update, one stage at a time: see :meth:`OfflineLossModule.stages`."""
        obs, next_obs, action, reward, terminated = self._read(
            tensordict, "observation", "next_observation", "action", "reward", "terminated"
        )
        out = self._run(
            self.critic_stage, obs, next_obs, action, reward, terminated, generator=generator
        )
        obs = out.pop("observation")
        yield "critic", self._losses(out)
        if step is not None and hasattr(self.actor, "set_training_step"):
            self.actor.set_training_step(step)
        yield "actor", self._losses(self._run(self.actor_stage, obs, action, generator=generator))


class FQLLoss(FQLStages, OfflineLossModule):
    """Flow Q-learning as a loss module.

    Stages: TD target (no optimiser) -> ``actor`` (one-step actor distilled from the flow while
    maximising Q, every ``policy_delay`` updates) -> ``behavior`` (the flow's BC loss) ->
    ``critic``. Each loss reads the other networks as they were before the update (FQL's one
    step on the sum of its losses). The critic target moves every update (``SoftUpdate``).

    Args:
        actor_network: the one-step policy mu(s, z)
            (:class:`~divo.objectives.fql.NoiseConditionedActor`).
        flow: the BC flow (``per_sample_loss``, ``sample_from_noise``).
        qvalue_network: twin critic.
        critic_loss: default ``FQLCriticLoss()``.
        actor_loss: default ``FQLActorLoss()``.
        normalizer: observation normaliser (default: none).
        policy_delay: the actor steps every ``policy_delay`` updates (FQL: 1).
    """

    def __init__(
        self,
        actor_network: nn.Module,
        flow: nn.Module,
        qvalue_network: nn.Module,
        *,
        critic_loss: FQLCriticLoss | None = None,
        actor_loss: FQLActorLoss | None = None,
        normalizer: nn.Module | None = None,
        policy_delay: int = 1,
    ) -> None:
        super().__init__()
        self.normalizer = normalizer if normalizer is not None else nn.Identity()
        self.actor = _unwrap(actor_network, "one-step actor", "act", "draw_noise")
        self.behavior_model = _unwrap(flow, "flow", "per_sample_loss", "sample_from_noise")
        self.critic = _unwrap(qvalue_network, "critic", "q1", "min_q")
        self.critic_loss = critic_loss if critic_loss is not None else FQLCriticLoss()
        self.actor_loss = actor_loss if actor_loss is not None else FQLActorLoss()
        if int(policy_delay) < 1:
            raise ValueError(f"policy_delay must be >= 1, got {policy_delay}")
        self.policy_delay = int(policy_delay)
        self._register_target("qvalue_network", self.critic, _frozen_copy(self.critic))

    def _register_target(self, name: str, online: nn.Module, target: nn.Module) -> None:
        super()._register_target(name, online, target)
        self.__dict__["critic_target"] = target

    @classmethod
    def from_agent(cls, agent) -> FQLLoss:
        """The loss over an :class:`~divo.agents.fql.FQLAgent`'s parts, sharing its networks
        and critic target."""
        loss = cls(
            agent.actor,
            agent.behavior_model,
            agent.critic,
            critic_loss=agent.critic_loss,
            actor_loss=agent.actor_loss,
            normalizer=agent.normalizer,
            policy_delay=agent.policy_delay,
        )
        loss._register_target("qvalue_network", agent.critic, agent.critic_target)
        return loss

    def networks(self) -> dict[str, nn.Module]:
        """Optimiser name -> the network its loss trains."""
        return {"actor": self.actor, "behavior": self.behavior_model, "critic": self.critic}

    def stages(self, tensordict, step=None, generator=None):
        """FQL's update, one stage at a time: see :meth:`OfflineLossModule.stages`."""
        obs, next_obs, action, reward, terminated = self._read(
            tensordict, "observation", "next_observation", "action", "reward", "terminated"
        )
        out = self._run(self.target_stage, obs, next_obs, reward, terminated, generator=generator)
        obs, y = out.pop("observation"), out.pop("td_target")
        if step is None or (step + 1) % self.policy_delay == 0:
            yield "actor", self._losses(self._run(self.actor_stage, obs, generator=generator))
        if step is not None and hasattr(self.behavior_model, "set_training_step"):
            self.behavior_model.set_training_step(step)
        out = self._run(self.behavior_stage, obs, action, generator=generator)
        yield "behavior", self._losses(out)
        yield "critic", self._losses(self._run(self.critic_stage, obs, action, y))


def loss_from_agent(agent) -> DIVOLoss | DiffusionQLLoss | FQLLoss:
    """The TorchRL loss module over an agent built by :func:`divo.agents.builder.build_agent`
    (any recipe), sharing its networks and targets."""
    from divo.agents.agent import OfflineAgent
    from divo.agents.diffusion_ql import DiffusionQLAgent
    from divo.agents.fql import FQLAgent

    for agent_type, loss_type in (
        (OfflineAgent, DIVOLoss),
        (DiffusionQLAgent, DiffusionQLLoss),
        (FQLAgent, FQLLoss),
    ):
        if isinstance(agent, agent_type):
            return loss_type.from_agent(agent)
    raise TypeError(f"no TorchRL loss module for {type(agent).__name__}")


__all__ = ["DIVOLoss", "DiffusionQLLoss", "FQLLoss", "OfflineLossModule", "loss_from_agent"]
