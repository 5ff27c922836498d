"""Recipe (a composed Hydra config) -> agent.

Every part is a config node with a ``_target_``. Parts that need sizes known only at run time
(networks, behaviour models) are ``_partial_: true`` and receive ``observation_dim`` and
``action_dim`` here. A group left out of the recipe (``behavior_model: null``) is absent.
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
from divo.errors import ConfigError
from divo.objectives.actor import ObservationNormalizer


def make(node: Any, what: str, **sizes: int) -> Any:
    """Instantiate a config node; call it with ``sizes`` when it is a partial."""
    if node is None:
        return None
    try:
        obj = instantiate(node, _convert_="all")
        if isinstance(obj, functools.partial):
            obj = obj(**sizes)
    except (InstantiationException, TypeError, ValueError, ImportError) as exc:
        target = node.get("_target_", "?") if isinstance(node, Mapping) else "?"
        msg = str(exc).strip().splitlines()
        raise ConfigError(
            f"cannot build {what} from _target_={target}: {msg[-1] if msg else exc}; check "
            f"the '{what}' settings of the recipe"
        ) from None
    return obj


def _opt(cfg: DictConfig, params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, **OmegaConf.to_container(cfg.optim.adam, resolve=True))


def build_agent(
    cfg: DictConfig,
    *,
    observation_dim: int,
    action_dim: int,
    obs_mean: torch.Tensor,
    obs_std: torch.Tensor,
    device: torch.device | str = "cpu",
) -> OfflineAgent:
    """Instantiate every part the recipe names, its optimisers, and move it to ``device``."""
    sizes = {"observation_dim": observation_dim, "action_dim": action_dim}
    actor = make(cfg.actor.network, "actor.network", **sizes)
    critic = make(cfg.critic.network, "critic.network", **sizes)
    value_cfg = cfg.get("value")
    value = advantage = value_loss = None
    if value_cfg is not None:
        value = make(value_cfg.network, "value.network", observation_dim=observation_dim)
        value_loss = make(value_cfg.loss, "value.loss")
        advantage = make(value_cfg.advantage, "value.advantage")
    behavior_model = make(cfg.get("behavior_model"), "behavior_model", **sizes)
    weighting = make(cfg.get("weighting"), "weighting") if behavior_model is not None else None
    behavior_loss = make(cfg.behavior.loss, "behavior.loss") if behavior_model is not None else None
    selector = make(cfg.selector, "selector")

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
    agent.policy_config = policy_config(
        cfg.actor.network, observation_dim=observation_dim, action_dim=action_dim
    )
    agent.to(device)
    agent.optimizers = {
        "critic": _opt(cfg, agent.critic.parameters(), cfg.critic.lr),
        "actor": _opt(cfg, agent.actor.parameters(), cfg.actor.lr),
    }
    if agent.value is not None:
        agent.optimizers["value"] = _opt(cfg, agent.value.parameters(), value_cfg.lr)
    if agent.behavior_model is not None:
        agent.optimizers["behavior"] = _opt(cfg, agent.behavior_model.parameters(), cfg.behavior.lr)
    return agent


def policy_config(actor_cfg: DictConfig, *, observation_dim: int, action_dim: int) -> dict:
    """A self-contained Hydra config of the deployable policy (normaliser + actor).

    Saved in ``policy.pt`` next to the policy's ``state_dict`` so that ``divo evaluate`` can
    rebuild it with ``hydra.utils.instantiate`` and no training code. Any agent may save another
    policy (e.g. a sampler over a diffusion model) by providing its own config.
    """
    actor = OmegaConf.to_container(actor_cfg, resolve=True)
    actor.pop("_partial_", None)
    actor.update(observation_dim=observation_dim, action_dim=action_dim)
    return {
        "_target_": "divo.objectives.NormalizedPolicy",
        "normalizer": {
            "_target_": "divo.objectives.ObservationNormalizer",
            "mean": [0.0] * observation_dim,  # the saved state_dict holds the real statistics
            "std": [1.0] * observation_dim,
        },
        "actor": actor,
    }
