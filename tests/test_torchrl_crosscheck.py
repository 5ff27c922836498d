"""TorchRL as a second implementation: our TD3+BC objectives, given the same networks, parameters,
batch and random draws as TorchRL's own ``TD3BCLoss``, give the same losses and gradients.

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
from torchrl.objectives import TD3BCLoss

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
