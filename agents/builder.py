"""Recipe (a composed Hydra config) -> agent.

Every part is a config node with a ``_target_``. Parts that need sizes known only at run time
(networks, behaviour models) are ``_partial_: true`` and receive ``observation_dim`` and
``action_dim`` here. A group left out of the recipe (``behavior_model: null``) is absent.

The recipe's top-level ``algorithm`` key picks the agent class (``ALGORITHMS``): ``offline``
(the default when absent: :class:`OfflineAgent`, for DIVO, its ablations and TD3+BC),
``diffusion_ql`` (:class:`DiffusionQLAgent`) or ``fql`` (:class:`FQLAgent`). Every agent gets a
``policy_config``: a self-contained Hydra config that rebuilds its deployable ``policy`` from the
policy's ``state_dict`` alone (what ``divo evaluate`` does with ``policy.pt``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from divo.agents.agent import OfflineAgent, cosine_decay
from divo.agents.diffusion_ql import DiffusionQLAgent
from divo.agents.fql import FQLAgent
from divo.agents.step import optimizer_options
from divo.behavior_models.base import check_behavior_model
from divo.errors import ConfigError
from divo.objectives import check_selector, check_weighting
from divo.objectives.actor import ObservationNormalizer


def make(node: Any, what: str, *, keep_partial: bool = False, **sizes: int) -> Any:
    """Instantiate a config node; call it with ``sizes`` when it is a partial (unless
    ``keep_partial``: then return the partial, for parts built from other parts later)."""
    if node is None:
        return None
    try:
        obj = instantiate(node, _convert_="all", **({"_partial_": True} if keep_partial else {}))
        if isinstance(obj, functools.partial) and not keep_partial:
            obj = obj(**sizes)
    except (InstantiationException, TypeError, ValueError, ImportError) as exc:
        target = node.get("_target_", "?") if isinstance(node, Mapping) else "?"
        msg = str(exc).strip().splitlines()
        raise ConfigError(
            f"cannot build {what} from _target_={target}: {msg[-1] if msg else exc}; check "
            f"the '{what}' settings of the recipe"
        ) from None
    return obj


def _behavior_model(cfg: DictConfig, observation_dim: int, action_dim: int) -> Any:
    """The recipe's behaviour model (None without one), checked against the protocol."""
    model = make(
        cfg.get("behavior_model"),
        "behavior_model",
        observation_dim=observation_dim,
        action_dim=action_dim,
    )
    if model is not None:
        check_behavior_model(model, observation_dim, action_dim)
    return model


def _opt(cfg: DictConfig, params, lr: float, device: torch.device | str) -> torch.optim.Optimizer:
    """Adam over ``params``: fused (one kernel per step on CPU and CUDA; 3-4x faster than the
    foreach path for our networks on a CPU core), capturable under ``compile=graph``; keyword
    arguments in ``optim.adam`` win."""
    options = {"fused": True, **optimizer_options(cfg.get("compile", "none"), torch.device(device))}
    chosen = OmegaConf.to_container(cfg.optim.adam, resolve=True)
    options.update({k: v for k, v in chosen.items() if v is not None})
    if options.get("foreach") and chosen.get("fused") is None:
        options.pop("fused")  # foreach asked for: not fused
    try:
        return torch.optim.Adam(params, lr=lr, **options)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot build Adam with {options} ({exc}); check optim.adam") from None


def build_agent(
    cfg: DictConfig,
    *,
    observation_dim: int,
    action_dim: int,
    obs_mean: torch.Tensor,
    obs_std: torch.Tensor,
    device: torch.device | str = "cpu",
) -> OfflineAgent | DiffusionQLAgent | FQLAgent:
    """Instantiate the agent of the recipe's ``algorithm``, its parts and optimisers, on
    ``device``."""
    algorithm = cfg.get("algorithm") or "offline"
    if algorithm not in ALGORITHMS:
        raise ConfigError(
            f"unknown algorithm={algorithm!r} in recipe {cfg.get('recipe', '?')!r}; choose one "
            f"of {', '.join(ALGORITHMS)}"
        )
    return ALGORITHMS[algorithm](
        cfg,
        observation_dim=observation_dim,
        action_dim=action_dim,
        obs_mean=obs_mean,
        obs_std=obs_std,
        device=device,
    )


def build_offline_agent(
    cfg: DictConfig,
    *,
    observation_dim: int,
    action_dim: int,
    obs_mean: torch.Tensor,
    obs_std: torch.Tensor,
    device: torch.device | str = "cpu",
) -> OfflineAgent:
    """DIVO, its ablations and TD3+BC: instantiate every part the recipe names, its
    optimisers, and move it to ``device``."""
    sizes = {"observation_dim": observation_dim, "action_dim": action_dim}
    actor_cfg = cfg.get("actor")  # null: no actor (IQL, IDQL deploy the behaviour model)
    actor = make(actor_cfg.network, "actor.network", **sizes) if actor_cfg is not None else None
    critic = make(cfg.critic.network, "critic.network", **sizes)
    value_cfg = cfg.get("value")
    value = advantage = value_loss = None
    if value_cfg is not None:
        value = make(value_cfg.network, "value.network", observation_dim=observation_dim)
        value_loss = make(value_cfg.loss, "value.loss")
        advantage = make(value_cfg.advantage, "value.advantage")
    behavior_model = _behavior_model(cfg, **sizes)
    weighting = make(cfg.get("weighting"), "weighting") if behavior_model is not None else None
    if weighting is not None:
        check_weighting(weighting)
    behavior_loss = make(cfg.behavior.loss, "behavior.loss") if behavior_model is not None else None
    selector = make(cfg.get("selector"), "selector") if actor is not None else None
    if selector is not None:
        check_selector(selector, action_dim)

    try:
        agent = OfflineAgent(
            normalizer=ObservationNormalizer(obs_mean, obs_std),
            actor=actor,
            critic=critic,
            critic_loss=make(cfg.critic.loss, "critic.loss"),
            actor_loss=make(actor_cfg.loss, "actor.loss") if actor is not None else None,
            selector=selector,
            value=value,
            value_loss=value_loss,
            advantage=advantage,
            behavior_model=behavior_model,
            weighting=weighting,
            behavior_loss=behavior_loss,
            tau=cfg.critic.tau,
            behavior_ema=cfg.behavior.get("ema_rate") if behavior_model is not None else None,
            # without an actor the targets move every update (IQL, IDQL)
            policy_delay=actor_cfg.policy_delay if actor is not None else 1,
        )
    except ValueError as exc:
        raise ConfigError(f"recipe {cfg.get('recipe', '?')!r} is inconsistent: {exc}") from None
    picker = cfg.get("evaluation_policy")
    if picker is None and actor is None:
        raise ConfigError(
            f"recipe {cfg.get('recipe', '?')!r} has no actor and no evaluation_policy: nothing "
            "to deploy; set evaluation_policy (e.g. divo.objectives.BehaviorModePolicy)"
        )
    if picker is None and agent.behavior_model_ema is not None:
        raise ConfigError(
            f"recipe {cfg.get('recipe', '?')!r}: behavior.ema_rate keeps a moving average of the "
            "behaviour model for a deployed sampler (evaluation_policy), and this recipe deploys "
            "its actor; set behavior.ema_rate=null"
        )
    if picker is None:
        agent.policy_config = policy_config(
            cfg.actor.network, observation_dim=observation_dim, action_dim=action_dim
        )
    else:  # deploy e.g. IDQL-style resampling over the behaviour model instead of the actor
        if behavior_model is None:
            raise ConfigError(
                f"recipe {cfg.get('recipe', '?')!r}: evaluation_policy samples from the "
                "behaviour model; configure one (e.g. behavior_model=ddpm)"
            )
        agent.policy_factory = functools.partial(
            _picker_over_behavior_model, make(picker, "evaluation_policy", keep_partial=True)
        )
        try:
            agent.policy  # noqa: B018 - build it once so bad settings fail here, not at evaluation
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cannot build evaluation_policy: {exc}") from None
        agent.policy_config = picker_policy_config(
            picker,
            cfg.behavior_model,
            cfg.critic.network,
            observation_dim=observation_dim,
            action_dim=action_dim,
            value_cfg=value_cfg.network if _picker_needs(picker, "value") else None,
        )
    agent.to(device)
    agent.optimizers = {"critic": _opt(cfg, agent.critic.parameters(), cfg.critic.lr, device)}
    if agent.actor is not None:
        agent.optimizers["actor"] = _opt(cfg, agent.actor.parameters(), actor_cfg.lr, device)
    if agent.value is not None:
        agent.optimizers["value"] = _opt(cfg, agent.value.parameters(), value_cfg.lr, device)
    if agent.behavior_model is not None:
        agent.optimizers["behavior"] = _opt(
            cfg, agent.behavior_model.parameters(), cfg.behavior.lr, device
        )
    agent.lr_schedules = _lr_schedules(cfg, agent.optimizers)
    return agent


LR_SCHEDULES = ("cosine",)


def _lr_schedules(cfg: DictConfig, optimizers: Mapping[str, Any]) -> dict:
    """``<part>.lr_schedule`` of each part with an optimiser (null: a constant rate;
    ``cosine``: decay to 0 over ``<part>.lr_decay_steps``, default ``train.steps``)."""
    out = {}
    for part in optimizers:
        node = cfg.get(part)
        kind = node.get("lr_schedule") if node is not None else None
        if kind is None:
            continue
        if kind not in LR_SCHEDULES:
            raise ConfigError(
                f"{part}.lr_schedule={kind!r} is not a schedule; choose null or "
                f"{', '.join(LR_SCHEDULES)}"
            )
        steps = int(node.get("lr_decay_steps") or cfg.train.steps)
        if steps < 1:
            raise ConfigError(f"{part}.lr_decay_steps must be >= 1, got {steps}")
        out[part] = functools.partial(cosine_decay, steps=steps)
    return out


def lr_schedule_record(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """What each scheduled learning rate ran, for ``result.json``: per part with an
    ``lr_schedule``, its kind, the horizon it decays over (``decay_steps``; from
    ``lr_decay_steps``, or the run's ``train.steps`` when that is null), where the horizon came
    from (``horizon``: ``set`` or ``compressed into the run``) and the fraction of the starting
    rate the run's last update used (``final_rate_fraction``)."""
    out = {}
    run_steps = int(cfg.train.steps)
    for part in ("critic", "actor", "value", "behavior"):
        node = cfg.get(part)
        kind = node.get("lr_schedule") if isinstance(node, Mapping) else None
        if kind is None:
            continue
        set_steps = node.get("lr_decay_steps")
        steps = int(set_steps or run_steps)
        out[part] = {
            "schedule": str(kind),
            "decay_steps": steps,
            "horizon": "set" if set_steps else "compressed into the run",
            "final_rate_fraction": round(cosine_decay(max(run_steps - 1, 0), steps), 6),
        }
    return out


def _picker_needs(picker: Any, what: str, default: bool = False) -> bool:
    """Whether the evaluation policy's class asks for part ``what`` (its ``needs_<what>``
    attribute; ``default`` when it has none)."""
    target = picker.get("_target_") if isinstance(picker, Mapping) else None
    try:
        cls = get_class(target) if target else None
    except Exception:  # an unknown _target_ fails later, with the builder's message
        return default
    return bool(getattr(cls, f"needs_{what}", default))


def _picker_over_behavior_model(picker: functools.partial, agent: OfflineAgent) -> torch.nn.Module:
    parts = {"normalizer": agent.normalizer, "behavior_model": agent.deployed_behavior_model}
    if getattr(picker.func, "needs_critic", True):
        parts["critic"] = agent.advantage_critic  # the critic the advantages use (see Advantage)
    if getattr(picker.func, "needs_value", False):
        if agent.value is None:
            raise ValueError(
                f"{picker.func.__name__} weighs candidates by A = Q - V: configure a value"
            )
        parts["value"] = agent.value
    return picker(**parts)


def build_diffusion_ql_agent(
    cfg: DictConfig,
    *,
    observation_dim: int,
    action_dim: int,
    obs_mean: torch.Tensor,
    obs_std: torch.Tensor,
    device: torch.device | str = "cpu",
) -> DiffusionQLAgent:
    """Diffusion-QL: ``behavior_model`` is the policy; ``diffusion_ql`` holds its settings."""
    sizes = {"observation_dim": observation_dim, "action_dim": action_dim}
    dql = cfg.diffusion_ql
    policy = _behavior_model(cfg, **sizes)
    if policy is None:
        raise ConfigError(
            "diffusion_ql needs a behavior_model (the policy); e.g. behavior_model=ddpm"
        )
    critic = make(cfg.critic.network, "critic.network", **sizes)
    try:
        agent = DiffusionQLAgent(
            normalizer=ObservationNormalizer(obs_mean, obs_std),
            policy=policy,
            critic=critic,
            critic_loss=make(dql.critic_loss, "diffusion_ql.critic_loss"),
            actor_loss=make(dql.actor_loss, "diffusion_ql.actor_loss"),
            tau=cfg.critic.tau,
            ema_decay=dql.ema.decay,
            ema_every=dql.ema.every,
            ema_start=dql.ema.start,
            grad_norm=dql.grad_norm,
            eval_num_samples=dql.evaluation.num_samples,
            eval_temperature=dql.evaluation.temperature,
            eval_q_head=dql.evaluation.q_head,
        )
    except ValueError as exc:
        raise ConfigError(f"recipe {cfg.get('recipe', '?')!r} is inconsistent: {exc}") from None
    agent.policy_config = picker_policy_config(
        {"_target_": "divo.objectives.ResamplingPolicy", **agent.eval_settings},
        cfg.behavior_model,
        cfg.critic.network,
        observation_dim=observation_dim,
        action_dim=action_dim,
    )
    agent.to(device)
    agent.optimizers = {
        "critic": _opt(cfg, agent.critic.parameters(), cfg.critic.lr, device),
        "actor": _opt(cfg, agent.actor.parameters(), dql.lr, device),
    }
    return agent


def build_fql_agent(
    cfg: DictConfig,
    *,
    observation_dim: int,
    action_dim: int,
    obs_mean: torch.Tensor,
    obs_std: torch.Tensor,
    device: torch.device | str = "cpu",
) -> FQLAgent:
    """FQL: ``behavior_model`` is the BC flow, ``actor`` the one-step policy mu(s, z) (deployed),
    ``critic.loss`` FQL's critic loss and ``fql.actor_loss`` its actor loss."""
    sizes = {"observation_dim": observation_dim, "action_dim": action_dim}
    flow = _behavior_model(cfg, **sizes)
    if flow is None or not callable(getattr(flow, "sample_from_noise", None)):
        name = type(flow).__name__ if flow is not None else "none"
        raise ConfigError(
            f"recipe {cfg.get('recipe', '?')!r} distils a flow into its one-step actor: it needs "
            f"a behaviour model with sample_from_noise(observation, noise) (behavior_model=flow), "
            f"got {name}"
        )
    actor_cfg = cfg.actor
    actor = make(actor_cfg.network, "actor.network", **sizes)
    if not callable(getattr(actor, "act", None)):
        raise ConfigError(
            f"actor.network {type(actor).__name__} has no act(observation, noise): FQL's actor "
            "is divo.objectives.NoiseConditionedActor"
        )
    critic = make(cfg.critic.network, "critic.network", **sizes)
    try:
        agent = FQLAgent(
            normalizer=ObservationNormalizer(obs_mean, obs_std),
            actor=actor,
            flow=flow,
            critic=critic,
            critic_loss=make(cfg.critic.loss, "critic.loss"),
            actor_loss=make(cfg.fql.actor_loss, "fql.actor_loss"),
            tau=cfg.critic.tau,
            policy_delay=actor_cfg.policy_delay,
        )
    except ValueError as exc:
        raise ConfigError(f"recipe {cfg.get('recipe', '?')!r} is inconsistent: {exc}") from None
    agent.policy_config = policy_config(
        actor_cfg.network, observation_dim=observation_dim, action_dim=action_dim
    )
    agent.to(device)
    agent.optimizers = {
        "critic": _opt(cfg, agent.critic.parameters(), cfg.critic.lr, device),
        "actor": _opt(cfg, agent.actor.parameters(), actor_cfg.lr, device),
        "behavior": _opt(cfg, agent.behavior_model.parameters(), cfg.behavior.lr, device),
    }
    agent.lr_schedules = _lr_schedules(cfg, agent.optimizers)
    return agent


ALGORITHMS = {
    "offline": build_offline_agent,
    "diffusion_ql": build_diffusion_ql_agent,
    "fql": build_fql_agent,
}


def _module_config(node: Any, **sizes: int) -> dict:
    """A resolved config node without ``_partial_``, with the run-time sizes filled in."""
    out = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    out.pop("_partial_", None)
    out.update(sizes)
    return out


def _normalizer_config(observation_dim: int) -> dict:
    return {
        "_target_": "divo.objectives.ObservationNormalizer",
        "mean": [0.0] * observation_dim,  # the saved state_dict holds the real statistics
        "std": [1.0] * observation_dim,
    }


def picker_policy_config(
    picker_cfg: Any,
    model_cfg: DictConfig,
    critic_cfg: DictConfig,
    *,
    observation_dim: int,
    action_dim: int,
    value_cfg: DictConfig | None = None,
) -> dict:
    """Self-contained Hydra config of a sample-and-score policy (``ResamplingPolicy``-like:
    normaliser, behaviour model, critic unless the picker's class says ``needs_critic =
    False``, the value network when ``value_cfg`` is given, plus the picker's own settings)."""
    sizes = {"observation_dim": observation_dim, "action_dim": action_dim}
    out = _module_config(picker_cfg)
    out.update(
        normalizer=_normalizer_config(observation_dim),
        behavior_model=_module_config(model_cfg, **sizes),
    )
    if _picker_needs(picker_cfg, "critic", default=True):
        out["critic"] = _module_config(critic_cfg, **sizes)
    if value_cfg is not None:
        out["value"] = _module_config(value_cfg, observation_dim=observation_dim)
    return out


def policy_config(actor_cfg: DictConfig, *, observation_dim: int, action_dim: int) -> dict:
    """A self-contained Hydra config of the deployable policy (normaliser + actor).

    Saved in ``policy.pt`` next to the policy's ``state_dict`` so that ``divo evaluate`` can
    rebuild it with ``hydra.utils.instantiate`` and no training code. Any agent may save another
    policy (e.g. a sampler over a diffusion model) by providing its own config.
    """
    return {
        "_target_": "divo.objectives.NormalizedPolicy",
        "normalizer": _normalizer_config(observation_dim),
        "actor": _module_config(actor_cfg, observation_dim=observation_dim, action_dim=action_dim),
    }
