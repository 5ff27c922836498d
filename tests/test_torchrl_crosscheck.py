"""TorchRL as a second implementation: our TD3+BC and IQL objectives, given the same networks,
parameters, batch and random draws as TorchRL's own ``TD3BCLoss`` and ``IQLLoss``, give the same
losses and gradients.

Where the definitions could differ they are set to agree and the test says how: TorchRL's
default critic distance is smooth-L1, TD3+BC's (and ours) is the squared error, so the TorchRL
loss is built with ``loss_function="l2"``; both sum the twin heads' losses and average over the
batch; both take lambda = alpha / mean |Q1(s, pi(s))| with Q1 the first head.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.objectives import IQLLoss, TD3BCLoss

from divo.objectives.actor import DeterministicActor, TD3BCActorLoss
from divo.objectives.critic import TD3CriticLoss, TwinQ

OBS, ACT, BATCH = 5, 3, 64


class _OneHead(nn.Module):
    """A TwinQ of one head, shaped as TorchRL's Q-value network: (s, a) -> [B, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.twin = TwinQ(OBS, ACT, hidden=(16, 16), num_q=1)

    def forward(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.twin(observation, action)[0]


def _batch(seed: int) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    terminated = torch.rand(BATCH, 1, generator=g) < 0.2
    return TensorDict(
        {
            "observation": torch.randn(BATCH, OBS, generator=g),
            "action": torch.rand(BATCH, ACT, generator=g) * 2 - 1,
            "next": {
                "observation": torch.randn(BATCH, OBS, generator=g),
                "reward": torch.randn(BATCH, 1, generator=g),
                "terminated": terminated,
                "done": terminated,
            },
        },
        batch_size=[BATCH],
    )


def _name(key: str | tuple[str, ...]) -> str:
    """A TorchRL parameter key -> our module's parameter name."""
    name = ".".join(key if isinstance(key, tuple) else (key,))
    return name.removeprefix("module.").removeprefix("twin.")


def _leaves(params: TensorDict):
    return params.items(include_nested=True, leaves_only=True)


def _twin_params_into(loss_params: TensorDict, critic: TwinQ) -> None:
    """Our twin heads' weights [2, ...] into TorchRL's copies of one head [2, 1, ...]."""
    ours = dict(critic.named_parameters())
    for key, value in _leaves(loss_params):
        value.data.copy_(ours[_name(key)].detach().unsqueeze(1))


def _actor_params_into(loss_params: TensorDict, actor: nn.Module) -> None:
    ours = dict(actor.named_parameters())
    for key, value in _leaves(loss_params):
        value.data.copy_(ours[_name(key)].detach())


@pytest.mark.parametrize("seed", [0, 1])
def test_td3bc_losses_and_gradients_equal_torchrls(seed):
    torch.manual_seed(seed)
    actor = DeterministicActor(OBS, ACT, hidden=(16, 16))
    critic = TwinQ(OBS, ACT, hidden=(16, 16), num_q=2)
    actor_target, critic_target = copy.deepcopy(actor), copy.deepcopy(critic)
    with torch.no_grad():  # targets that differ from the online networks
        for p in [*actor_target.parameters(), *critic_target.parameters()]:
            p.add_(0.05 * torch.randn_like(p))

    theirs = TD3BCLoss(
        TensorDictModule(copy.deepcopy(actor), in_keys=["observation"], out_keys=["action"]),
        TensorDictModule(
            _OneHead(), in_keys=["observation", "action"], out_keys=["state_action_value"]
        ),
        bounds=(-1.0, 1.0),
        alpha=2.5,
        policy_noise=0.2,
        noise_clip=0.5,
        loss_function="l2",
    )
    theirs.make_value_estimator(gamma=0.99)
    _twin_params_into(theirs.qvalue_network_params, critic)
    _twin_params_into(theirs.target_qvalue_network_params, critic_target)
    _actor_params_into(theirs.actor_network_params, actor)
    _actor_params_into(theirs.target_actor_network_params, actor_target)

    batch = _batch(seed)
    torch.manual_seed(100 + seed)  # the target-policy noise: one randn of the action's shape
    out = theirs(batch.clone())

    torch.manual_seed(100 + seed)
    critic_loss, actor_loss = TD3CriticLoss(gamma=0.99), TD3BCActorLoss(alpha=2.5)
    y = critic_loss.target(
        batch["next", "reward"],
        batch["next", "terminated"],
        batch["next", "observation"],
        critic_target,
        actor_target,
    )
    ours_critic = critic_loss(batch["observation"], batch["action"], y, critic)["loss_critic"]
    mask = torch.ones(BATCH, 1)
    ours_actor = actor_loss(batch["observation"], batch["action"], mask, actor, critic)
    torch.testing.assert_close(ours_critic, out["loss_qvalue"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_actor["loss_actor"], out["loss_actor"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_actor["lambda"], out["lmbd"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_actor["actor_bc"], out["bc_loss"], rtol=1e-5, atol=1e-6)

    # gradients: the critic's (per head) and the actor's
    ours_critic.backward()
    out["loss_qvalue"].backward()
    ours_grads = dict(critic.named_parameters())
    for key, value in _leaves(theirs.qvalue_network_params):
        assert value.grad is not None, key
        torch.testing.assert_close(
            ours_grads[_name(key)].grad.unsqueeze(1), value.grad, rtol=1e-4, atol=1e-6
        )
    ours_actor["loss_actor"].backward()
    out["loss_actor"].backward()
    ours_grads = dict(actor.named_parameters())
    for key, value in _leaves(theirs.actor_network_params):
        assert value.grad is not None, key
        torch.testing.assert_close(ours_grads[_name(key)].grad, value.grad, rtol=1e-4, atol=1e-6)


class _GaussianParameters(nn.Module):
    """Our IQL policy's (loc, scale), as TorchRL's ProbabilisticActor reads them."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy.distribution_parameters(observation)


def _copy_by_suffix(loss_params: TensorDict, module: nn.Module, *, stacked: bool = False) -> None:
    """Copy our ``module``'s parameters into TorchRL's, matched by the end of their names."""
    ours = dict(module.named_parameters())
    for key, value in _leaves(loss_params):
        name = ".".join(key if isinstance(key, tuple) else (key,))
        match = max((n for n in ours if name == n or name.endswith("." + n)), key=len)
        value.data.copy_(ours[match].detach().unsqueeze(1) if stacked else ours[match].detach())


def _grads_match(loss_params: TensorDict, module: nn.Module, *, stacked: bool = False) -> None:
    ours = dict(module.named_parameters())
    for key, value in _leaves(loss_params):
        name = ".".join(key if isinstance(key, tuple) else (key,))
        match = max((n for n in ours if name == n or name.endswith("." + n)), key=len)
        assert value.grad is not None, key
        grad = ours[match].grad.unsqueeze(1) if stacked else ours[match].grad
        torch.testing.assert_close(grad, value.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_iql_losses_and_gradients_equal_torchrls(seed):
    """IQL as the ``iql`` recipe composes it (expectile V, critic bootstrapped from V(s'), AWR
    policy weighted by min(exp(beta A), 100) with A = min Q_target(s, a) - V(s)) against
    TorchRL's IQLLoss with temperature = beta and the squared-error critic distance."""
    from torchrl.modules import IndependentNormal, ProbabilisticActor

    from divo.behavior_models import GaussianBehavior
    from divo.objectives.behavior import WeightedBehaviorLoss
    from divo.objectives.value import StateValue, ValueLoss
    from divo.objectives.weighting import ExpAWRWeight

    torch.manual_seed(seed)
    policy = GaussianBehavior(OBS, ACT, hidden=(16, 16), state_dependent_std=False, tanh_mean=True)
    with torch.no_grad():
        policy.log_std.copy_(0.3 * torch.randn(ACT))
    value = StateValue(OBS, hidden=(16, 16))
    critic = TwinQ(OBS, ACT, hidden=(16, 16), num_q=2)
    critic_target = copy.deepcopy(critic)
    with torch.no_grad():
        for p in critic_target.parameters():
            p.add_(0.05 * torch.randn_like(p))

    actor = ProbabilisticActor(
        TensorDictModule(
            _GaussianParameters(copy.deepcopy(policy)),
            in_keys=["observation"],
            out_keys=["loc", "scale"],
        ),
        in_keys=["loc", "scale"],
        distribution_class=IndependentNormal,
    )
    theirs = IQLLoss(
        actor,
        TensorDictModule(
            _OneHead(), in_keys=["observation", "action"], out_keys=["state_action_value"]
        ),
        TensorDictModule(copy.deepcopy(value), in_keys=["observation"], out_keys=["state_value"]),
        temperature=3.0,
        expectile=0.7,
        loss_function="l2",
    )
    theirs.make_value_estimator(gamma=0.99)
    _copy_by_suffix(theirs.actor_network_params, policy)
    _copy_by_suffix(theirs.value_network_params, value)
    _twin_params_into(theirs.qvalue_network_params, critic)
    _twin_params_into(theirs.target_qvalue_network_params, critic_target)
    batch = _batch(seed)
    out = theirs(batch.clone())

    obs, act = batch["observation"], batch["action"]
    value_out = ValueLoss("expectile", 0.7)(obs, value, action=act, critic_target=critic_target)
    y = TD3CriticLoss(gamma=0.99, bootstrap="value").target(
        batch["next", "reward"],
        batch["next", "terminated"],
        batch["next", "observation"],
        critic_target,
        None,
        value=lambda s: value(s).detach(),
    )
    critic_out = TD3CriticLoss(gamma=0.99, bootstrap="value")(obs, act, y, critic)
    with torch.no_grad():
        advantage = critic_target.min_q(obs, act) - value(obs)
    weight = ExpAWRWeight(beta=3.0, w_max=100.0)(advantage)
    actor_out = WeightedBehaviorLoss()(policy.per_sample_loss(act, obs), weight)

    torch.testing.assert_close(value_out["loss_value"], out["loss_value"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(critic_out["loss_critic"], out["loss_qvalue"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actor_out["loss_behavior"], out["loss_actor"], rtol=1e-5, atol=1e-6)

    for ours, key, params, module, stacked in (
        (value_out["loss_value"], "loss_value", theirs.value_network_params, value, False),
        (critic_out["loss_critic"], "loss_qvalue", theirs.qvalue_network_params, critic, True),
        (actor_out["loss_behavior"], "loss_actor", theirs.actor_network_params, policy, False),
    ):
        ours.backward()
        out[key].backward(retain_graph=True)
        _grads_match(params, module, stacked=stacked)
