"""The stages of each agent's update, as tensor-in, tensor-out methods shared by the agents
(:mod:`divo.agents`) and the TorchRL loss modules (:mod:`divo.objectives.losses`).

One implementation of each loss: an agent's ``run_update`` runs these stages with its own
optimisers (eagerly, compiled or vectorised), a loss module's ``stages`` hands each stage's
``loss_*`` to the caller's optimiser. A class using a mixin provides the parts the stages read
as attributes (``normalizer``, ``critic``, ``critic_target``, ...) and ``_generator``, the
running update's random generator (None: torch's global one).
"""

from __future__ import annotations

import functools
import inspect

import torch

from divo.objectives.critic import TwinQ
from divo.objectives.functional import td_target as td_target_of


class DIVOStages:
    """The stages of DIVO, its ablations, TD3+BC, IQL and IDQL: critic -> value -> advantage
    -> behaviour model -> actor. Reads ``normalizer``, ``critic``, ``critic_target``,
    ``actor``, ``actor_target``, ``critic_loss``, ``actor_loss``, ``selector``, ``value``,
    ``value_loss``, ``advantage``, ``behavior_model``, ``weighting``, ``behavior_loss``."""

    _generator: torch.Generator | None = None
    _needs_advantage: bool = False
    _reuse_target_q: bool = False

    def _check_parts(self) -> None:
        if self.actor is None:
            self.selector = self.actor_loss = None  # nothing reads them without an actor
        selector = self.selector
        needs_adv = (selector is not None and selector.needs_advantage) or (
            self.weighting is not None and self.weighting.needs_advantage
        )
        has_value = self.value is not None and self.value_loss is not None
        if needs_adv and (not has_value or self.advantage is None):
            raise ValueError("this weighting/selector needs advantages: configure a value function")
        bootstrap = getattr(self.critic_loss, "bootstrap", "policy")
        if bootstrap == "value" and not has_value:
            raise ValueError(
                "critic.loss.bootstrap=value bootstraps from V(s'): configure a value function"
            )
        if bootstrap == "policy" and self.actor is None:
            raise ValueError(
                "the critic's TD3 target needs the target actor, and the recipe has none: set "
                "critic.loss.bootstrap=value (IQL) or configure an actor"
            )
        if (
            has_value
            and self.value_loss.objective == "bootstrap_min"
            and (bootstrap != "policy" or self.actor is None)
        ):
            raise ValueError(
                "value objective bootstrap_min compares the target and online critics at the "
                "TD3 target's next action: it needs critic.loss.bootstrap=policy and an actor"
            )
        if selector is None:
            if self.actor is not None:
                raise ValueError("an actor needs a target selector (e.g. selector=dataset)")
        elif getattr(selector, "candidate", "sample") == "policy_reconstruction":
            if not callable(getattr(self.behavior_model, "reconstruct", None)):
                raise ValueError(
                    "selector.candidate=policy_reconstruction needs a behaviour model with "
                    "reconstruct(observation, action) (behavior_model=cvae)"
                )
        elif selector.num_candidates and self.behavior_model is None:
            raise ValueError(
                f"selector {type(self.selector).__name__} samples candidates: configure a "
                "behaviour model"
            )
        if self.behavior_model is not None and (
            self.weighting is None or self.behavior_loss is None
        ):
            raise ValueError("a behaviour model needs a weighting scheme and a behaviour loss")
        self._needs_advantage = needs_adv
        self._reuse_target_q = False
        if self.advantage is not None and self.value_loss is not None:
            self.advantage.pair_with(self.value_loss.objective)
            # the value step's min Q_target(s, a) is exactly the advantage's Q of the dataset
            # actions when A takes min Q of the target critic (IQL's pairing, the default)
            self._reuse_target_q = (
                self.value_loss.objective == "expectile"
                and bool(self.advantage.uses_target_critic)
                and self.advantage.head == "min"
            )

    @property
    def advantage_critic(self) -> TwinQ:
        """The critic advantages are computed with: the one V is fitted to (see
        :class:`divo.objectives.value.Advantage`): the target critic for IQL's expectile V,
        the online critic for A2PR's bootstrap V."""
        if self.advantage is not None and self.advantage.uses_target_critic:
            return self.critic_target
        return self.critic

    # ------------------------------------------------------------------ stages (tensors in/out)
    def critic_stage(self, observation, next_observation, action, reward, terminated):
        """Normalise the states, compute the TD target y and the critic loss (and, for value
        objective bootstrap_min, return s' and the next action a' of y)."""
        obs = self.normalizer(observation)
        next_obs = self.normalizer(next_observation)
        y, next_action = self.critic_loss.target_and_next_action(
            reward.to(obs.dtype),
            terminated,
            next_obs,
            self.critic_target,
            self.actor_target,
            self._generator,
            value=self.value,
        )
        out = {"observation": obs, "td_target": y, **self.critic_loss(obs, action, y, self.critic)}
        if self.value_loss is not None and self.value_loss.objective == "bootstrap_min":
            out.update(next_observation=next_obs, next_action=next_action)
        return out

    def value_stage(
        self, obs, action, td_target, reward=None, terminated=None, next_obs=None, next_action=None
    ):
        online_y = None
        if next_action is not None:  # bootstrap_min: the online critic's own TD target
            with torch.no_grad():
                online_y = td_target_of(
                    reward.to(obs.dtype),
                    terminated,
                    self.critic.min_q(next_obs, next_action),
                    self.critic_loss.gamma,
                )
        return self.value_loss(
            obs,
            self.value,
            action=action,
            critic_target=self.critic_target,
            td_target=td_target,
            online_td_target=online_y,
        )

    @torch.no_grad()
    def advantage_stage(self, obs, action, state_value=None):
        v = self.value(obs) if state_value is None else state_value
        adv = self.advantage(obs, action, self.advantage_critic, self.value, state_value=v)
        return self._advantage_out(adv, v)

    @torch.no_grad()
    def target_q_advantage_stage(self, obs, target_q, state_value=None):
        """The same advantage under IQL's pairing, whose Q(s, a), min Q_target(s, a), is V's
        target in the value step (the target critic has not moved since): no twin-Q pass."""
        v = self.value(obs) if state_value is None else state_value
        return self._advantage_out(target_q - v, v)

    @staticmethod
    def _advantage_out(adv, v):
        return {
            "advantage": adv,
            "state_value": v,
            "advantage_mean": adv.mean(),
            "advantage_std": adv.std(),
            "advantage_pos_frac": (adv > 0).to(adv.dtype).mean(),
        }

    def behavior_stage(self, obs, action, advantage):
        weight = self.weighting(advantage)
        model = self.behavior_model
        if callable(getattr(model, "loss_terms", None)):  # e.g. the CVAE's unweighted KL term
            per_sample, unweighted = model.loss_terms(action, obs, generator=self._generator)
        else:
            per_sample = model.per_sample_loss(action, obs, generator=self._generator)
            unweighted = None
        out = self.behavior_loss(per_sample, weight, unweighted)
        clip = getattr(self.weighting, "clip", None)
        if clip is not None:  # e.g. exp_awr's w_max: how many weights saturate
            out["weight_clip_frac"] = (weight >= clip).to(weight.dtype).mean()
        return out

    def actor_stage(self, obs, action, advantage=None, state_value=None):
        if getattr(self.selector, "candidate", "sample") == "policy_reconstruction":
            return self._reconstruction_actor_stage(obs, action, advantage, state_value)
        metrics = {}
        candidates = cand_adv = None
        with torch.no_grad():
            if self.selector.num_candidates:
                candidates = self.behavior_model.sample(
                    obs, self.selector.num_candidates, generator=self._generator
                )
                cand_adv = self.advantage(
                    obs, candidates, self.advantage_critic, self.value, state_value=state_value
                )
            if _takes_generator(self.selector):  # a random pick (resampling) draws from it
                target, mask = self.selector(
                    candidates, cand_adv, action, advantage, generator=self._generator
                )
            else:
                target, mask = self.selector(candidates, cand_adv, action, advantage)
            if candidates is not None:
                # the share of BC targets that are model samples, not dataset actions
                metrics["target_from_model_frac"] = (
                    (target != action).any(-1).to(action.dtype).mean()
                )
            if cand_adv is not None and advantage is not None:
                # is the behaviour model better than its data? A of its samples minus A of
                # the dataset actions, at the same states
                metrics["sample_advantage_gap"] = cand_adv.mean() - advantage.mean()
                metrics["bc_mask_mean"] = mask.mean()
        out = self.actor_loss(obs, target, mask, self.actor, self.critic)
        return {**out, **metrics}

    def _reconstruction_actor_stage(self, obs, action, advantage, state_value):
        """A2PR's code: the candidate is the behaviour model's reconstruction of the actor's own
        action, a_gen = dec(s, z), z ~ q(z | s, pi(s)), WITH gradient into pi; it competes with
        the dataset action by advantage (the selector's rule and mask), and the BC term pulls pi
        towards the winner, through a_gen where a_gen wins."""
        pi = self.actor(obs)
        candidate = self.behavior_model.reconstruct(obs, pi, generator=self._generator)
        candidate = candidate.unsqueeze(-2)  # [*B, 1, A]
        cand_adv = self.advantage(
            obs, candidate.detach(), self.advantage_critic, self.value, state_value=state_value
        )
        target, mask = self.selector.select(candidate, cand_adv, action, advantage)
        out = self.actor_loss(obs, target, mask, self.actor, self.critic, pi=pi)
        with torch.no_grad():
            from_model = (target != action).any(-1).to(action.dtype)
            out["target_from_model_frac"] = from_model.mean()
            out["sample_advantage_gap"] = cand_adv.mean() - advantage.mean()
            out["bc_mask_mean"] = mask.mean()
        return out


class DiffusionQLStages:
    """The stages of Diffusion-QL: critic (target actions from the EMA policy) -> policy.
    Reads ``normalizer``, ``actor`` (the policy), ``actor_ema``, ``critic``,
    ``critic_target``, ``critic_loss``, ``actor_loss``."""

    _generator: torch.Generator | None = None

    def _critic_losses(
        self, observation, next_observation, action, reward, terminated, target_policy
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Normalise the states, compute the TD target y (next actions from ``target_policy``)
        and the critic loss: (normalised observation, y, the loss's outputs)."""
        obs = self.normalizer(observation)
        next_obs = self.normalizer(next_observation)
        y = self.critic_loss.target(
            reward.to(obs.dtype),
            terminated,
            next_obs,
            self.critic_target,
            target_policy,
            self._generator,
        )
        return obs, y, self.critic_loss(obs, action, y, self.critic)

    def critic_stage(self, observation, next_observation, action, reward, terminated):
        """Normalise the states, compute the TD target from the EMA policy and the critic loss."""
        obs, _, out = self._critic_losses(
            observation, next_observation, action, reward, terminated, self.actor_ema
        )
        return {"observation": obs, **out}

    def actor_stage(self, obs, action):
        return self.actor_loss(obs, action, self.actor, self.critic, self._generator)


class FQLStages:
    """The stages of FQL: TD target -> one-step actor -> flow BC -> critic. Reads
    ``normalizer``, ``actor`` (mu(s, z)), ``behavior_model`` (the flow), ``critic``,
    ``critic_target``, ``critic_loss``, ``actor_loss``."""

    _generator: torch.Generator | None = None

    @torch.no_grad()
    def target_stage(self, observation, next_observation, reward, terminated):
        """Normalise the states and compute the TD target y."""
        obs = self.normalizer(observation)
        next_obs = self.normalizer(next_observation)
        y = self.critic_loss.target(
            reward.to(obs.dtype),
            terminated,
            next_obs,
            self.critic_target,
            self.actor,
            self._generator,
        )
        return {"observation": obs, "td_target": y}

    def actor_stage(self, obs):
        return self.actor_loss(obs, self.actor, self.behavior_model, self.critic, self._generator)

    def behavior_stage(self, obs, action):
        per_sample = self.behavior_model.per_sample_loss(action, obs, generator=self._generator)
        return {"loss_behavior": per_sample.mean()}

    def critic_stage(self, obs, action, td_target):
        return self.critic_loss(obs, action, td_target, self.critic)


def _takes_generator(module: torch.nn.Module) -> bool:
    """Whether a plug-in's ``forward`` accepts ``generator=`` (the selector protocol does not
    ask for it: only selectors whose pick is random need the update's generator)."""
    return _forward_takes_generator(type(module))


@functools.cache
def _forward_takes_generator(cls: type) -> bool:  # once per class, not at every update
    try:
        return "generator" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False
