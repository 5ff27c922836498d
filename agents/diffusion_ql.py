"""Diffusion-QL (Wang et al., ICLR 2023) as an agent with OfflineAgent's interface.

The generative model (any behaviour-model-protocol module; a DDPM by default) IS the policy. Its
update order, top to bottom in :meth:`DiffusionQLAgent.run_update`, follows the reference code:
critic (target actions from an EMA copy of the policy) -> policy (diffusion loss + eta * the
normalised Q term through the full reverse chain) -> EMA of the policy (every ``ema_every``
updates once ``ema_start`` updates are done) -> Polyak critic target (every update). Gradient
norms are clipped (per optimiser) when ``grad_norm`` > 0.

The deployable policy (``.policy``) samples ``num_samples`` actions from the policy and picks one
by softmax(Q / temperature) over min(Q1', Q2') of the target critic (reference: 50 samples,
temperature 1): a :class:`divo.objectives.ResamplingPolicy`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tensordict import TensorDictBase
from torch import nn

from divo.agents.agent import Stages, TrainableAgent, frozen_copy
from divo.objectives.actor import ObservationNormalizer
from divo.objectives.critic import TwinQ
from divo.objectives.diffusion_ql import DiffusionQLActorLoss, DiffusionQLCriticLoss
from divo.objectives.keys import DEFAULT_KEYS, Keys
from divo.objectives.selectors import ResamplingPolicy
from divo.objectives.stages import DiffusionQLStages


class DiffusionQLAgent(DiffusionQLStages, TrainableAgent):
    """Diffusion policy + twin-Q critic, EMA policy, Polyak critic target; owns its optimisers.

    Args:
        normalizer: observation normaliser (dataset statistics).
        policy: the generative policy (behaviour-model protocol: ``per_sample_loss``,
            differentiable ``sample``).
        critic: twin Q network.
        critic_loss, actor_loss: Diffusion-QL's losses.
        optimizers: ``{"critic": ..., "actor": ...}`` (the builder makes them).
        tau: Polyak rate of the critic target.
        ema_decay, ema_every, ema_start: the EMA policy (used for critic targets).
        grad_norm: max gradient norm of each optimiser step; 0 disables clipping.
        eval_num_samples, eval_temperature, eval_q_head: the deployable picker's settings.
    """

    def __init__(
        self,
        *,
        normalizer: ObservationNormalizer,
        policy: nn.Module,
        critic: TwinQ,
        critic_loss: DiffusionQLCriticLoss,
        actor_loss: DiffusionQLActorLoss,
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        tau: float = 5e-3,
        ema_decay: float = 0.995,
        ema_every: int = 5,
        ema_start: int = 1000,
        grad_norm: float = 0.0,
        eval_num_samples: int = 50,
        eval_temperature: float = 1.0,
        eval_q_head: str = "min",
        keys: Keys = DEFAULT_KEYS,
    ) -> None:
        super().__init__()
        if not 0.0 <= ema_decay <= 1.0 or ema_every < 1 or ema_start < 0 or grad_norm < 0:
            raise ValueError(
                f"bad Diffusion-QL settings: ema_decay {ema_decay} (in [0, 1]), ema_every "
                f"{ema_every} (>= 1), ema_start {ema_start} (>= 0), grad_norm {grad_norm} (>= 0)"
            )
        self.observation_dim = int(normalizer.mean.shape[-1])
        self.normalizer = normalizer
        self.actor = policy
        self.actor_ema = frozen_copy(policy)
        self.critic = critic
        self.critic_target = frozen_copy(critic)
        self.critic_loss = critic_loss
        self.actor_loss = actor_loss
        self.tau = tau
        self.ema_decay = ema_decay
        self.ema_every = ema_every
        self.ema_start = ema_start
        self.grad_norm = grad_norm
        self.eval_settings = {
            "num_samples": eval_num_samples,
            "temperature": eval_temperature,
            "q_head": eval_q_head,
        }
        ResamplingPolicy(normalizer, policy, critic, **self.eval_settings)  # validates settings
        self.keys = keys
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(optimizers or {})
        self.num_updates = 0
        # Hydra config that rebuilds ``self.policy`` from its state_dict (set by the builder)
        self.policy_config: dict | None = None
        self._ema_pairs = (list(self.actor_ema.parameters()), list(self.actor.parameters()))
        self._critic_pairs = (list(self.critic_target.parameters()), list(self.critic.parameters()))
        self._clipped = {"critic": self._critic_pairs[1], "actor": self._ema_pairs[1]}

    @property
    def policy(self) -> ResamplingPolicy:
        """Deployable policy: sample, score with the target critic, pick by softmax(Q)."""
        return ResamplingPolicy(
            self.normalizer, self.actor, self.critic_target, **self.eval_settings
        )

    def measured_grads(self, name: str) -> tuple[list[torch.Tensor], float]:
        """Both optimisers report their gradient norm and clip it to ``grad_norm`` (0: off)."""
        return self._clipped[name], self.grad_norm

    def update_kind(self) -> bool:
        """Whether the next update refreshes the EMA policy (``compile=graph`` replays a
        recorded step of the same kind)."""
        step = self.num_updates
        return step % self.ema_every == 0 and step >= self.ema_start

    def run_update(
        self,
        batch: TensorDictBase,
        stages: Stages,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One Diffusion-QL step on a TED batch; returns detached metrics (no host sync).
        ``stages`` executes the two stages (eagerly for ``update``, or compiled)."""
        k = self.keys
        ema = self.update_kind()  # read before the counter moves
        step = self.num_updates  # updates done before this one (the reference's `self.step`)
        self.num_updates += 1
        metrics: dict[str, torch.Tensor] = {}

        # 1. Critic: y = r + gamma (1 - d) min_i Q_i'(s', a'), a' from the EMA policy
        #    (max-Q backup over several a' when configured).
        out = stages.run(
            self.critic_stage,
            "critic",
            batch.get(k.observation),
            batch.get(k.next_observation),
            batch.get(k.action),
            batch.get(k.reward),
            batch.get(k.terminated),
            generator=generator,
        )
        obs = out.pop("observation")
        metrics.update(out)

        # 2. Policy: diffusion loss + eta * normalised Q of a fresh sample (gradients through
        #    the whole reverse chain). A behaviour model with a noise curriculum is told the step.
        if hasattr(self.actor, "set_training_step"):
            self.actor.set_training_step(step)
        metrics.update(
            stages.run(self.actor_stage, "actor", obs, batch.get(k.action), generator=generator)
        )

        # 3. EMA policy (for critic targets), then the Polyak critic target.
        if ema:
            stages.polyak(self._ema_pairs[0], self._ema_pairs[1], 1.0 - self.ema_decay)
        stages.polyak(self._critic_pairs[0], self._critic_pairs[1], self.tau)
        return metrics
