"""Recipe (a composed Hydra config) -> agent.

Every part is a config node with a ``_target_``. Parts that need sizes known only at run time
(networks, behaviour models) are ``_partial_: true`` and receive ``observation_dim`` and
``action_dim`` here. A group left out of the recipe (``behavior_model: null``) is absent.

The recipe's top-level ``algorithm`` key picks the agent class (``ALGORITHMS``): ``offline``
(the default when absent: :class:`OfflineAgent`, for DIVO, its ablations and TD3+BC) or
``diffusion_ql`` (:class:`DiffusionQLAgent`). Every agent gets a ``policy_config``: a
self-contained Hydra config that rebuilds its deployable ``policy`` from the policy's
``state_dict`` alone (what ``divo evaluate`` does with ``policy.pt``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from divo.agents.agent import OfflineAgent
from divo.agents.diffusion_ql import DiffusionQLAgent
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
) -> OfflineAgent | DiffusionQLAgent:
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
    actor = make(cfg.actor.network, "actor.network", **sizes)
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
    selector = make(cfg.selector, "selector")
    check_selector(selector, action_dim)

    try:
        agent = OfflineAgent(
            normalizer=ObservationNormalizer(obs_mean, obs_std),
            actor=actor,
            critic=critic,
            critic_loss=make(cfg.critic.loss, "critic.loss"),
            actor_loss=make(cfg.actor.loss, "actor.loss"),
            selector=selector,
            value=value,
            value_loss=value_loss,
            advantage=advantage,
            behavior_model=behavior_model,
            weighting=weighting,
            behavior_loss=behavior_loss,
            tau=cfg.critic.tau,
            policy_delay=cfg.actor.policy_delay,
        )
    except ValueError as exc:
        raise ConfigError(f"recipe {cfg.get('recipe', '?')!r} is inconsistent: {exc}") from None
    picker = cfg.get("evaluation_policy")
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
        )
    agent.to(device)
    agent.optimizers = {
        "critic": _opt(cfg, agent.critic.parameters(), cfg.critic.lr, device),
        "actor": _opt(cfg, agent.actor.parameters(), cfg.actor.lr, device),
    }
    if agent.value is not None:
        agent.optimizers["value"] = _opt(cfg, agent.value.parameters(), value_cfg.lr, device)
    if agent.behavior_model is not None:
        agent.optimizers["behavior"] = _opt(
            cfg, agent.behavior_model.parameters(), cfg.behavior.lr, device
        )
    return agent


def _picker_over_behavior_model(picker: functools.partial, agent: OfflineAgent) -> torch.nn.Module:
    return picker(
        normalizer=agent.normalizer,
        behavior_model=agent.behavior_model,
        critic=agent.advantage_critic,  # the critic the advantages use (see Advantage)
    )


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


ALGORITHMS = {"offline": build_offline_agent, "diffusion_ql": build_diffusion_ql_agent}


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
) -> dict:
    """Self-contained Hydra config of a sample-and-score policy (``ResamplingPolicy``-like:
    normaliser, behaviour model and critic, plus the picker's own settings)."""
    sizes = {"observation_dim": observation_dim, "action_dim": action_dim}
    out = _module_config(picker_cfg)
    out.update(
        normalizer=_normalizer_config(observation_dim),
        behavior_model=_module_config(model_cfg, **sizes),
        critic=_module_config(critic_cfg, **sizes),
    )
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
