"""The TorchRL loss modules (divo.objectives.losses) against the agents `divo train` runs: the
same updates through a TorchRL loop (the example's, for DIVO's recipes) give the same
parameters as the agents' updates and as `divo train` itself; keys are renamed with set_keys;
the example runs with a tiny step budget."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.objectives import SoftUpdate
from torchrl.objectives.utils import ValueEstimators

import divo
from divo.agents.builder import build_agent
from divo.agents.checkpoints import Checkpointer
from divo.agents.runtime import seed_everything
from divo.behavior_models.ddpm import DDPM
from divo.config import compose_recipe
from divo.objectives import (
    ADPOSelector,
    BinaryWeight,
    DeterministicActor,
    StateValue,
    TwinQ,
)
from divo.objectives.losses import DiffusionQLLoss, DIVOLoss, FQLLoss, loss_from_agent

OBS, ACT, BATCH, STEPS = 5, 2, 64, 6
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "torchrl_divo.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("torchrl_divo_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def batches(n: int = STEPS, seed: int = 1) -> list[TensorDict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        terminated = torch.rand(BATCH, 1, generator=g) < 0.1
        out.append(
            TensorDict(
                {
                    "observation": torch.randn(BATCH, OBS, generator=g),
                    "action": torch.rand(BATCH, ACT, generator=g) * 2 - 1,
                    "next": {
                        "observation": torch.randn(BATCH, OBS, generator=g),
                        "reward": torch.randn(BATCH, 1, generator=g),
                        "terminated": terminated,
                        "truncated": torch.zeros(BATCH, 1, dtype=torch.bool),
                        "done": terminated,
                    },
                },
                batch_size=[BATCH],
            )
        )
    return out


def small(recipe: str, *extra: str) -> list[str]:
    """Overrides that make a recipe's networks small (32 x 32)."""
    cfg = compose_recipe(recipe, list(extra))
    out = ["dataset=bandit", "critic.network.hidden=[32,32]", *extra]
    if cfg.get("actor") is not None:
        out.append("actor.network.hidden=[32,32]")
    if cfg.get("value") is not None:
        out.append("value.network.hidden=[32,32]")
    if cfg.get("behavior_model") is not None and "hidden" in cfg.behavior_model:
        out.append("behavior_model.hidden=[32,32]")
    return out


DATA = SimpleNamespace(
    observation_dim=OBS,
    action_dim=ACT,
    obs_mean=torch.linspace(-0.5, 0.5, OBS),
    obs_std=torch.linspace(0.5, 2.0, OBS),
)


def agent_of(cfg):
    torch.manual_seed(0)
    return build_agent(
        cfg,
        observation_dim=OBS,
        action_dim=ACT,
        obs_mean=DATA.obs_mean,
        obs_std=DATA.obs_std,
    )


def assert_same_state(agent_a, agent_b) -> None:
    a, b = agent_a.state_dict(), agent_b.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def train_agent(agent, data) -> None:
    g = torch.Generator().manual_seed(7)
    for batch in data:
        agent.update(batch, generator=g)


# every DIVO-family recipe the issue names, plus TD3+BC, IQL and IDQL (their cosine schedules
# off: a plain Adam loop), A2PR, resampling, and A2PR's pairing and candidate on their own
DIVO_CASES = [
    ("divo",),
    ("soft_weight",),
    ("uniform_weight",),
    ("cvae",),
    ("consistency",),
    ("divo", "behavior_model=flow"),
    ("td3bc",),
    ("iql", "behavior.lr_schedule=null"),
    ("divo", "value=bootstrap"),
    ("cvae", "selector.candidate=policy_reconstruction", "value=bootstrap"),
    ("a2pr",),
    ("resampling",),
    ("idql", "behavior.lr_schedule=null"),  # its behaviour model's moving average too
]


@pytest.mark.parametrize("case", DIVO_CASES, ids=lambda c: "-".join(c))
def test_the_examples_loop_equals_the_agents_updates(example, case):
    """N updates through the example's LossModule loop (TorchRL Adam + SoftUpdate) give the
    parameters, targets and moving averages of N updates of the agent `divo train` steps."""
    recipe, *extra = case
    overrides = small(recipe, *extra)
    data = batches()
    torch.manual_seed(0)
    loss_module, agent_b, cfg = example.make_loss(DATA, recipe, overrides)
    agent_a = agent_of(cfg)
    assert_same_state(agent_a, agent_b)  # same start

    train_agent(agent_a, data)
    optimizers = example.make_optimizers(loss_module, cfg)
    updater = SoftUpdate(loss_module, tau=cfg.critic.tau)
    g = torch.Generator().manual_seed(7)
    for step, batch in enumerate(data):
        example.update(loss_module, optimizers, updater, batch, step, g)
    assert_same_state(agent_a, agent_b)
    # the targets moved (the comparison above is not between two untouched copies)
    online = dict(agent_b.critic.named_parameters())
    moved = [not torch.equal(p, online[n]) for n, p in agent_b.critic_target.named_parameters()]
    assert any(moved)


def test_the_examples_loop_equals_divo_train(example, tmp_path):
    """`divo train` (through divo.train, with the example's replay buffer) and the example's
    TorchRL loop, from the same seed, draw the same batches and noise in the same order and
    end with the same parameters, targets included, after N updates."""
    steps, batch_size, seed = STEPS, 32, 3
    run = [f"train.steps={steps}", "train.eval_every=1000", f"train.checkpoint_every={steps}",
           f"train.log_every={steps}", "train.eval_episodes=1", f"train.batch_size={batch_size}",
           "train.progress=false", f"seed={seed}"]  # fmt: skip
    cfg = divo.compose("divo", [*small("divo"), *run])
    data = divo.load_offline_data(cfg.dataset.id)

    def replay_buffer():
        buffer = TensorDictReplayBuffer(
            storage=LazyTensorStorage(data.num_transitions), batch_size=batch_size
        )
        buffer.extend(data.data)
        return buffer

    divo.train(cfg, tmp_path / "run", replay_buffer=replay_buffer())
    trained = Checkpointer(tmp_path / "run", 1).load_latest()[1]["agent"]["modules"]

    buffer = replay_buffer()
    seed_everything(seed)  # as divo train: seed, a probe batch, the networks, then the updates
    buffer.sample()
    loss_module, agent, _ = example.make_loss(data, "divo", [*small("divo"), *run])
    initial = {k: v.clone() for k, v in agent.state_dict().items()}
    optimizers = example.make_optimizers(loss_module, cfg)
    updater = SoftUpdate(loss_module, tau=cfg.critic.tau)
    for step in range(steps):
        example.update(loss_module, optimizers, updater, buffer.sample(), step)
    state = agent.state_dict()
    assert state.keys() == trained.keys()
    for name in state:
        torch.testing.assert_close(state[name], trained[name], rtol=1e-5, atol=1e-6, msg=name)
    # (the bandit's states are one constant: the first layer gets no gradient)
    assert not torch.equal(state["actor.net.4.weight"], initial["actor.net.4.weight"])


def torchrl_loop(loss_module, optimizers, updater, data, grad_norm: float = 0.0) -> None:
    """The TorchRL loop of Diffusion-QL and FQL: each stage steps its optimiser (gradient norm
    clipped as Diffusion-QL's code does), then the EMA policy and the critic target."""
    g = torch.Generator().manual_seed(7)
    for step, batch in enumerate(data):
        for name, losses in loss_module.stages(batch, step, g):
            optimizers[name].zero_grad()
            losses[f"loss_{name}"].backward()
            if grad_norm > 0:
                params = loss_module.networks()[name].parameters()
                torch.nn.utils.clip_grad_norm_(params, grad_norm)
            optimizers[name].step()
        if isinstance(loss_module, DiffusionQLLoss):
            loss_module.update_ema(step)
        if loss_module.updates_targets(step):
            updater.step()


def adam_like(optimizer: torch.optim.Optimizer, params) -> torch.optim.Adam:
    """A plain Adam with the settings of the agent's (fused) one."""
    group = optimizer.param_groups[0]
    keys = ("lr", "betas", "eps", "weight_decay", "amsgrad")
    return torch.optim.Adam(params, **{k: group[k] for k in keys})


@pytest.mark.parametrize(
    "recipe, extra, loss_type",
    [
        ("fql", (), FQLLoss),
        (
            "diffusion_ql",
            ("diffusion_ql.ema.start=2", "diffusion_ql.ema.every=3", "diffusion_ql.grad_norm=1.0"),
            DiffusionQLLoss,
        ),
    ],
)
def test_diffusion_ql_and_fql_losses_equal_their_agents_updates(recipe, extra, loss_type):
    cfg = compose_recipe(recipe, small(recipe, *extra))
    data = batches()
    agent_a, agent_b = agent_of(cfg), agent_of(cfg)
    loss_module = loss_from_agent(agent_b)
    assert isinstance(loss_module, loss_type)
    train_agent(agent_a, data)
    optimizers = {
        name: adam_like(agent_b.optimizers[name], net.parameters())
        for name, net in loss_module.networks().items()
    }
    updater = SoftUpdate(loss_module, tau=agent_b.tau)
    torchrl_loop(loss_module, optimizers, updater, data, getattr(loss_module, "grad_norm", 0.0))
    assert_same_state(agent_a, agent_b)


@pytest.mark.parametrize(
    "case",
    [
        ("divo",),
        ("cvae", "selector.candidate=policy_reconstruction", "value=bootstrap"),
        ("diffusion_ql",),
        ("fql",),
    ],
    ids=lambda c: "-".join(c),
)
def test_forward_losses_each_reach_their_own_network_so_their_sum_can_be_stepped(case):
    """forward: loss_<name> reaches network <name> only (Diffusion-QL's Q term reads the
    critic, A2PR's reconstruction candidate the behaviour model: detached there), so one
    backward of the sum gives each network the gradient of its own loss."""
    recipe, *extra = case
    loss_module = loss_from_agent(agent_of(compose_recipe(recipe, small(recipe, *extra))))
    params = dict(loss_module.named_parameters())
    batch = batches(1)[0]
    torch.manual_seed(5)
    out = loss_module(batch)
    names = [k for k in out.keys() if k.startswith("loss_")]
    loss_module.zero_grad()
    sum(out[k] for k in names).backward()
    summed = {n: p.grad for n, p in params.items()}

    torch.manual_seed(5)
    again = loss_module(batch)
    for key in names:
        own = {id(p) for p in loss_module.networks()[key.removeprefix("loss_")].parameters()}
        loss_module.zero_grad()
        again[key].backward(retain_graph=True)
        for name, p in params.items():
            if id(p) in own:
                torch.testing.assert_close(p.grad, summed[name], msg=f"{key} -> {name}")
            else:
                assert p.grad is None or not p.grad.any(), f"{key} reaches {name}"
    # the networks hold their own parameters again (the optimisers' references)
    assert {n: id(p) for n, p in loss_module.named_parameters()} == {
        n: id(p) for n, p in params.items()
    }


def direct_divo_loss(**keys) -> DIVOLoss:
    """DIVO's loss from the user's own TensorDictModules (keys named as the user likes)."""
    torch.manual_seed(3)
    observation = keys.get("observation", "observation")
    actor = TensorDictModule(
        DeterministicActor(OBS, ACT, hidden=(16, 16)),
        in_keys=[observation],
        out_keys=[keys.get("action", "action")],
    )
    value = TensorDictModule(
        StateValue(OBS, hidden=(16, 16)), in_keys=[observation], out_keys=["state_value"]
    )
    return DIVOLoss(
        actor,
        TwinQ(OBS, ACT, hidden=(16, 16)),
        value_network=value,
        behavior_model=DDPM(OBS, ACT, hidden=(16, 16)),
        weighting=BinaryWeight(),
        selector=ADPOSelector(),
    )


def renamed(td: TensorDict) -> TensorDict:
    return TensorDict(
        {
            "obs": td["observation"],
            "act": td["action"],
            "next": {
                "obs": td["next", "observation"],
                "rew": td["next", "reward"],
                "term": td["next", "terminated"],
            },
        },
        batch_size=td.batch_size,
    )


def test_set_keys_renames_what_the_loss_reads():
    td = batches(1)[0]
    reference = direct_divo_loss()
    torch.manual_seed(11)
    expected = reference(td)

    loss_module = direct_divo_loss(observation="obs", action="act")
    loss_module.set_keys(
        observation="obs",
        action="act",
        next_observation=("next", "obs"),
        reward=("next", "rew"),
        terminated=("next", "term"),
    )
    assert loss_module.tensor_keys.reward == ("next", "rew")
    torch.manual_seed(11)
    got = loss_module(renamed(td))
    assert set(got.keys()) == set(expected.keys())
    assert {"loss_critic", "loss_value", "loss_behavior", "loss_actor"} <= set(got.keys())
    for key in expected.keys():
        torch.testing.assert_close(got[key], expected[key], msg=key)
    # the diagnostics are detached; the losses carry their graphs
    assert got["loss_actor"].requires_grad and not got["q_mean"].requires_grad

    with pytest.raises(ValueError, match="not an accepted tensordict key"):
        loss_module.set_keys(next_reward="r")
    loss_module.set_keys(reward=None)  # None: back to the default (TED) key
    assert loss_module.tensor_keys.reward == ("next", "reward")


def test_targets_are_torchrl_target_params_moved_by_soft_update():
    loss_module = direct_divo_loss()
    names = {name for name, _ in loss_module.named_children()}
    assert {"target_qvalue_network_params", "target_actor_network_params"} <= names
    trainable = {id(p) for p in loss_module.parameters()}
    targets = loss_module.target_qvalue_network_params.values(True, True)
    assert not any(id(t) in trainable for t in targets)  # optimisers never see the targets

    updater = SoftUpdate(loss_module, tau=0.5)
    with torch.no_grad():
        for p in loss_module.critic.parameters():
            p.add_(1.0)
    before = [t.clone() for t in loss_module.critic_target.parameters()]
    updater.step()
    after = list(loss_module.critic_target.parameters())  # the module the stages call
    for b, a, p in zip(before, after, loss_module.critic.parameters(), strict=True):
        torch.testing.assert_close(a, 0.5 * b + 0.5 * p)


def test_after_a_move_soft_update_still_moves_the_targets_the_stages_read():
    """``.to()`` (a dtype here, a device alike) keeps the target parameters and the target
    networks the stages call one set of tensors."""
    loss_module = direct_divo_loss().to(torch.float64)
    updater = SoftUpdate(loss_module, tau=1.0)  # tau 1: the targets become the online nets
    with torch.no_grad():
        for p in loss_module.actor.parameters():
            p.add_(1.0)
    updater.step()
    for target, online in zip(
        loss_module.actor_target.parameters(), loss_module.actor.parameters(), strict=True
    ):
        assert target.dtype == torch.float64
        torch.testing.assert_close(target, online)


def test_make_value_estimator_sets_the_discount_of_the_one_step_target():
    loss_module = direct_divo_loss()
    assert loss_module.make_value_estimator(gamma=0.9) is loss_module
    assert loss_module.critic_loss.gamma == 0.9
    with pytest.raises(NotImplementedError, match="TD0"):
        loss_module.make_value_estimator(ValueEstimators.TDLambda)


def test_the_example_runs_with_a_tiny_step_budget(example, capsys):
    result = example.main(
        ["--steps", "3", "--batch-size", "32", "--eval-episodes", "1", "--max-episode-steps", "5"]
    )
    assert len(result["returns"]) == 1
    assert {"loss_critic", "loss_behavior"} <= set(result["metrics"])
    assert "normalised score" in capsys.readouterr().out
