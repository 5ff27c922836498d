"""Flow Q-learning (FQL: Park, Li, Levine, ICML 2025) as an agent with OfflineAgent's interface.

Three networks and a target critic: a flow-matching BC model of the data (``behavior_model``,
trained by its unweighted loss alone), a one-step noise-conditioned actor mu(s, z) distilled from
it while maximising Q, and a twin critic (its Polyak copy moves every update). The losses are in
:mod:`divo.objectives.fql`.

FQL's code computes all its losses from one set of parameters and takes one Adam step on their
sum; the losses touch disjoint parameters and Adam is element-wise, so that step equals one Adam
step per network, provided each loss reads the others' parameters as they were before the
update. :meth:`FQLAgent.run_update` orders its stages so that they do: the TD target first (the
one-step actor before its step), then the actor (the flow and the critic before theirs), then
the flow, then the critic.

The deployed policy (``.policy``) is the one-step actor behind the observation normaliser: a
fresh z ~ N(0, I) per action, clipped to [-1, 1] (FQL's ``sample_actions``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tensordict import TensorDictBase
from torch import nn

from divo.agents.agent import Stages, TrainableAgent, frozen_copy
from divo.objectives.actor import NormalizedPolicy, ObservationNormalizer
from divo.objectives.critic import TwinQ
from divo.objectives.fql import FQLActorLoss, FQLCriticLoss, NoiseConditionedActor
from divo.objectives.keys import DEFAULT_KEYS, Keys
from divo.objectives.stages import FQLStages


class FQLAgent(FQLStages, TrainableAgent):
    """One-step actor + flow BC model + twin critic with a Polyak target; owns its optimisers.

    Args:
        normalizer: observation normaliser (dataset statistics, or identity for raw states).
        actor: the one-step policy mu(s, z).
        flow: the BC flow (``per_sample_loss`` and ``sample_from_noise(observation, noise)``).
        critic: twin Q network.
        critic_loss, actor_loss: FQL's losses.
        optimizers: ``{"critic": ..., "actor": ..., "behavior": ...}`` (the builder makes them).
        tau: Polyak rate of the critic target.
        policy_delay: the actor steps every ``policy_delay`` updates (FQL: 1, every update).
    """

    def __init__(
        self,
        *,
        normalizer: ObservationNormalizer,
        actor: NoiseConditionedActor,
        flow: nn.Module,
        critic: TwinQ,
        critic_loss: FQLCriticLoss,
        actor_loss: FQLActorLoss,
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        tau: float = 5e-3,
        policy_delay: int = 1,
        keys: Keys = DEFAULT_KEYS,
    ) -> None:
        super().__init__()
        if not 0.0 < tau <= 1.0 or int(policy_delay) < 1:
            raise ValueError(
                f"bad FQL settings: tau {tau} (in (0, 1]), policy_delay {policy_delay} (>= 1)"
            )
        if not callable(getattr(flow, "sample_from_noise", None)):
            raise ValueError(
                f"FQL distils the flow's action for a given noise: behaviour model "
                f"{type(flow).__name__} has no sample_from_noise(observation, noise); use "
                "behavior_model=flow"
            )
        self.observation_dim = int(normalizer.mean.shape[-1])
        self.normalizer = normalizer
        self.actor = actor
        self.behavior_model = flow
        self.critic = critic
        self.critic_target = frozen_copy(critic)
        self.critic_loss = critic_loss
        self.actor_loss = actor_loss
        self.tau = tau
        self.policy_delay = int(policy_delay)
        self.keys = keys
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(optimizers or {})
        self.num_updates = 0
        # Hydra config that rebuilds ``self.policy`` from its state_dict (set by the builder)
        self.policy_config: dict | None = None
        self._critic_pairs = (list(self.critic_target.parameters()), list(self.critic.parameters()))

    @property
    def policy(self) -> NormalizedPolicy:
        """Deployable policy: normaliser + one-step actor (fresh noise per action, clipped)."""
        return NormalizedPolicy(self.normalizer, self.actor)

    # ------------------------------------------------------------------ the update, top to bottom
    def run_update(
        self,
        batch: TensorDictBase,
        stages: Stages,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One FQL step on a TED batch; returns detached metrics (no host sync).

        Order: TD target -> (every ``policy_delay`` updates) one-step actor -> flow BC ->
        critic -> Polyak critic target. Each loss reads the other networks as they were before
        this update, as in FQL's single step on the sum of its losses."""
        k = self.keys
        self.num_updates += 1
        metrics: dict[str, torch.Tensor] = {}

        # 1. TD target, no gradient: y = r + gamma (1 - d) agg_i Q'_i(s', clip(mu(s', z'))),
        #    z' ~ N(0, I) fresh, agg = mean or min over the target heads (q_agg).
        out = stages.run(
            self.target_stage,
            None,
            batch.get(k.observation),
            batch.get(k.next_observation),
            batch.get(k.reward),
            batch.get(k.terminated),
            generator=generator,
        )
        obs, y = out.pop("observation"), out.pop("td_target")
        metrics.update(out)

        # 2. One-step actor: alpha * ||mu(s, z) - flow(s, z)||^2 - Q(s, clip(mu(s, z))), the
        #    flow's action from the same z without gradient, Q the critic before its step.
        if self.num_updates % self.policy_delay == 0:
            metrics.update(stages.run(self.actor_stage, "actor", obs, generator=generator))

        # 3. Flow BC: the flow-matching loss of the dataset actions, unweighted batch mean.
        if hasattr(self.behavior_model, "set_training_step"):
            self.behavior_model.set_training_step(self.num_updates - 1)
        action = batch.get(k.action)
        metrics.update(
            stages.run(self.behavior_stage, "behavior", obs, action, generator=generator)
        )

        # 4. Critic: mean over heads and batch of (Q_i(s, a) - y)^2.
        metrics.update(stages.run(self.critic_stage, "critic", obs, action, y))

        # 5. Polyak critic target, every update.
        stages.polyak(self._critic_pairs[0], self._critic_pairs[1], self.tau)
        return metrics
