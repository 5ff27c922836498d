"""The ablation grid: resampling selector and picker, Diffusion-QL (losses, agent, recipe), the
builder's dispatch, and saved pickers rebuilt from their policy files alone."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
from hydra.utils import instantiate
from test_recipes import random_batch
from torch import nn

from divo.agents.builder import build_agent
from divo.agents.diffusion_ql import DiffusionQLAgent
from divo.behavior_models import DDPM
from divo.cli import main
from divo.config import available_recipes, compose_recipe
from divo.errors import ConfigError
from divo.objectives import (
    DiffusionQLActorLoss,
    DiffusionQLCriticLoss,
    ObservationNormalizer,
    ResamplingPolicy,
    ResamplingSelector,
    TwinQ,
)
from divo.objectives.diffusion_ql import normalized_q_loss
from divo.objectives.selectors import resample_index

O, A = 5, 2  # noqa: E741 - observation and action sizes of test_recipes.random_batch

TINY = {  # network sizes small enough for unit tests
    "critic.network.hidden": "[16,16]",
    "actor.network.hidden": "[16,16]",
    "value.network.hidden": "[16,16]",
    "behavior_model.hidden": "[16,16]",
}


def tiny_overrides(recipe: str, *extra: str) -> list[str]:
    """Shrink every network the recipe has (keys it lacks are skipped)."""
    cfg = compose_recipe(recipe)
    out = []
    for key, value in TINY.items():
        node = cfg
        for part in key.split(".")[:-1]:
            node = node.get(part) if node is not None else None
        if node is not None and key.split(".")[-1] in node:
            out.append(f"{key}={value}")
    return [*out, *extra]


def make_agent(recipe: str, *overrides: str):
    cfg = compose_recipe(recipe, tiny_overrides(recipe, *overrides))
    return build_agent(
        cfg, observation_dim=O, action_dim=A, obs_mean=torch.zeros(O), obs_std=torch.ones(O)
    )


# ----- resampling ---------------------------------------------------------------------------


def test_resample_index_greedy_and_softmax_frequencies():
    scores = torch.tensor([[0.0, 1.0, 2.0]])
    assert resample_index(scores, 0.0).tolist() == [2]
    g = torch.Generator().manual_seed(0)
    idx = resample_index(scores.expand(40_000, 3), 0.5, g)
    freq = torch.bincount(idx, minlength=3).float() / idx.numel()
    torch.testing.assert_close(freq, torch.softmax(scores[0] / 0.5, -1), atol=0.01, rtol=0)
    # any batch shape; a very unlikely candidate stays (almost) never drawn
    skewed = torch.tensor([0.0, 0.0, -30.0]).expand(2, 20_000, 3)
    idx = resample_index(skewed, 1.0, g)
    assert idx.shape == (2, 20_000) and not (idx == 2).any()
    assert abs((idx == 0).float().mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="temperature"):
        resample_index(scores, -1.0)


def test_resampling_selector_by_hand():
    cands = torch.tensor(
        [[[0.1, 0.1], [0.5, -0.5], [0.9, 0.9]], [[0.2, 0.0], [0.3, 0.0], [0.4, 0.0]]]
    )
    adv = torch.tensor([[[0.0], [3.0], [1.0]], [[-1.0], [-2.0], [-0.5]]])
    action = torch.zeros(2, 2)
    target, mask = ResamplingSelector(num_candidates=3, temperature=0.0)(cands, adv, action, None)
    torch.testing.assert_close(target, torch.tensor([[0.5, -0.5], [0.4, 0.0]]))
    assert mask.eq(1).all() and mask.shape == (2, 1)
    # the dataset action never competes, even when every candidate's advantage is negative
    assert not (target == action).all(-1).any()


class _FixedCandidates(nn.Module):
    """A stand-in behaviour model: the same N candidates for every state; records its input."""

    def __init__(self, candidates: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("candidates", candidates)
        self.seen: list[torch.Tensor] = []

    def sample(self, observation, num_samples=1, generator=None):
        self.seen.append(observation)
        return self.candidates[:num_samples].expand(*observation.shape[:-1], num_samples, -1)


class _QIsFirstCoordinate(nn.Module):
    """A stand-in twin critic: Q1(s, a) = a_0, Q2(s, a) = -a_0."""

    def forward(self, observation, action):
        return torch.stack([action[..., :1], -action[..., :1]])


def test_resampling_policy_normalizes_then_picks_by_q():
    cands = torch.tensor([[0.2, 0.0], [0.9, 0.1], [-0.5, 0.3]])
    model = _FixedCandidates(cands)
    normalizer = ObservationNormalizer(torch.full((O,), 1.0), torch.full((O,), 2.0))
    policy = ResamplingPolicy(normalizer, model, _QIsFirstCoordinate(), 3, 0.0, "q1")
    obs = torch.full((4, O), 3.0)
    out = policy(obs)
    assert out.shape == (4, A)
    torch.testing.assert_close(out, cands[1].expand(4, A))  # argmax Q1 = argmax a_0
    torch.testing.assert_close(model.seen[0], torch.ones(4, O))  # (3 - 1) / 2
    policy.q_head = "min"  # min(a_0, -a_0) = -|a_0|: the candidate closest to a_0 = 0
    torch.testing.assert_close(policy(obs), cands[0].expand(4, A))


# ----- Diffusion-QL -------------------------------------------------------------------------


def test_normalized_q_loss_by_hand():
    q = torch.tensor([[[1.0], [3.0]], [[-2.0], [4.0]]])  # Q1 = (1, 3), Q2 = (-2, 4)
    # flip False: -mean Q1 / mean|Q2| = -2 / 3; flip True: -mean Q2 / mean|Q1| = -1 / 2
    assert normalized_q_loss(q, torch.tensor(False)).item() == pytest.approx(-2 / 3)
    assert normalized_q_loss(q, torch.tensor(True)).item() == pytest.approx(-1 / 2)
    q = q.clone().requires_grad_(True)
    normalized_q_loss(q, torch.tensor(False)).backward()
    # the denominator is detached: only Q1 gets a gradient, -1 / (B * mean|Q2|) each
    torch.testing.assert_close(q.grad[0], torch.full((2, 1), -1 / (2 * 3)))
    assert q.grad[1].eq(0).all()


def test_diffusion_ql_critic_target_by_hand_with_and_without_max_q_backup():
    cands = torch.tensor([[0.5, 0.0], [-0.8, 0.0], [0.1, 0.0]])
    policy = _FixedCandidates(cands)
    reward, terminated = torch.tensor([[1.0], [2.0]]), torch.tensor([[False], [True]])
    next_obs = torch.zeros(2, O)
    plain = DiffusionQLCriticLoss(gamma=0.5, max_q_backup=False)
    y = plain.target(reward, terminated, next_obs, _QIsFirstCoordinate(), policy)
    # one next action, the first candidate: min(0.5, -0.5) = -0.5
    torch.testing.assert_close(y, torch.tensor([[1.0 - 0.25], [2.0]]))
    backup = DiffusionQLCriticLoss(gamma=0.5, max_q_backup=True, num_backup_samples=3)
    y = backup.target(reward, terminated, next_obs, _QIsFirstCoordinate(), policy)
    # max over samples per head: Q1 -> 0.5, Q2 = -a_0 -> 0.8; then min over heads: 0.5
    torch.testing.assert_close(y, torch.tensor([[1.0 + 0.25], [2.0]]))


def test_diffusion_ql_actor_gradient_flows_through_all_reverse_steps():
    """The Q term backpropagates into every one of the K denoising calls of the sample. If
    the chain were detached anywhere (or sampled under no_grad), early steps would get none.

    (Without x0 clipping: with it, the first step's predicted x0 = 12.5 x - 12.4 eps (K = 5, VP)
    is clipped to [-1, 1] almost everywhere, so that step's gradient is ~0 by design, as in the
    reference code.)"""
    torch.manual_seed(0)
    K = 5
    policy = DDPM(O, A, num_steps=K, hidden=(16,), clip_denoised=False)
    critic = TwinQ(O, A, hidden=(16,))
    calls: list[tuple[list[int], torch.Tensor]] = []

    def record(module, inputs, output):
        output.retain_grad()
        calls.append((inputs[1].tolist(), output))

    policy.network.register_forward_hook(record)
    obs, action = torch.randn(8, O), torch.rand(8, A) * 2 - 1
    loss = DiffusionQLActorLoss(eta=1.0)(obs, action, policy, critic)
    assert len(calls) == 1 + K  # one call for the diffusion loss, K for the reverse chain
    loss["loss_actor"].backward()  # the chain's calls get gradient from the Q term only
    chain = calls[1:]
    assert [ks[0] for ks, _ in chain] == list(reversed(range(K)))
    for ks, out in chain:
        assert out.grad is not None and out.grad.abs().sum() > 0, f"no gradient at step {ks[0]}"


def test_diffusion_ql_loss_is_diffusion_loss_plus_eta_times_q_term():
    torch.manual_seed(0)
    policy, critic = DDPM(O, A, hidden=(16,)), TwinQ(O, A, hidden=(16,))
    obs, action = torch.randn(8, O), torch.rand(8, A) * 2 - 1
    out = DiffusionQLActorLoss(eta=2.5)(
        obs, action, policy, critic, torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(out["loss_actor"], out["actor_bc"] + 2.5 * out["actor_q"])
    g = torch.Generator().manual_seed(1)
    bc = policy.per_sample_loss(action, obs, generator=g).mean()
    torch.testing.assert_close(out["actor_bc"], bc)


def test_builder_dispatches_on_algorithm_and_keeps_offline_by_default():
    agent = make_agent("diffusion_ql")
    assert isinstance(agent, DiffusionQLAgent) and isinstance(agent.actor, DDPM)
    assert set(agent.optimizers) == {"critic", "actor"}
    assert type(make_agent("divo")).__name__ == "OfflineAgent"
    with pytest.raises(ConfigError, match="unknown algorithm='sac'"):
        make_agent("td3bc", "+algorithm=sac")


def test_diffusion_ql_per_task_settings_follow_table_3_and_overrides_win():
    def dql(dataset_id, *extra):
        cfg = compose_recipe(
            "diffusion_ql", ["dataset=minari", f"dataset.id={dataset_id}", *extra]
        ).diffusion_ql
        return cfg.lr, cfg.actor_loss.eta, cfg.critic_loss.max_q_backup, cfg.grad_norm

    assert dql("D4RL/antmaze/medium-play-v1") == (1e-3, 2.0, True, 2.0)
    assert dql("D4RL/antmaze/large-play-v1") == (3e-4, 4.5, True, 10.0)
    assert dql("mujoco/walker2d/medium-v0") == (3e-4, 1.0, False, 1.0)
    assert dql("D4RL/pen/human-v2") == (3e-5, 0.15, False, 7.0)
    assert dql("my/own/data-v0") == (3e-4, 1.0, False, 0.0)  # not in the table: defaults
    assert dql("D4RL/antmaze/large-play-v1", "diffusion_ql.actor_loss.eta=7")[1] == 7.0
    cfg = compose_recipe("diffusion_ql")
    assert cfg.diffusion_ql.ema.decay == 0.995 and cfg.diffusion_ql.ema.start == 1000
    assert cfg.diffusion_ql.evaluation.num_samples == 50
    assert cfg.behavior_model.num_steps == 5 and list(cfg.critic.network.hidden) == [256] * 3


def test_diffusion_ql_ema_starts_late_and_critic_target_moves_every_update():
    agent = make_agent("diffusion_ql", "diffusion_ql.ema.start=3", "diffusion_ql.ema.every=2")
    ema0 = [p.clone() for p in agent.actor_ema.parameters()]
    tgt0 = [p.clone() for p in agent.critic_target.parameters()]

    def ema_moved():
        pairs = zip(ema0, agent.actor_ema.parameters(), strict=True)
        return any(not torch.equal(a, b) for a, b in pairs)

    for _ in range(3):  # updates 0, 1, 2 (reference numbering): before ema.start
        metrics = agent.update(random_batch())
    assert not ema_moved()
    pairs = zip(tgt0, agent.critic_target.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    agent.update(random_batch())  # update 3: odd, no EMA step
    assert not ema_moved()
    agent.update(random_batch())  # update 4: >= start and even
    assert ema_moved()
    assert {"loss_critic", "loss_actor", "actor_bc", "actor_q", "actor_grad_norm"} <= set(metrics)


def test_diffusion_ql_grad_norm_clipping_is_applied():
    agent = make_agent("diffusion_ql", "diffusion_ql.grad_norm=1e-6")
    before = [p.clone() for p in agent.critic.parameters()]
    agent.update(random_batch())
    # Adam's first step moves each weight by ~lr whatever the gradient scale: check the clip by
    # the optimiser's first moment instead, which is (1 - beta1) * clipped gradient
    opt = agent.optimizers["critic"]
    m = torch.cat([opt.state[p]["exp_avg"].flatten() for p in agent.critic.parameters()])
    assert m.norm().item() == pytest.approx(0.1 * 1e-6, rel=1e-3)
    pairs = zip(before, agent.critic.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("recipe", ["diffusion_ql", "consistency"])
def test_training_state_resumes_exactly(recipe):
    torch.manual_seed(0)
    a1 = make_agent(recipe)
    for _ in range(3):
        a1.update(random_batch())
    state = copy.deepcopy(a1.training_state())  # as torch.save / torch.load would give it
    a2 = make_agent(recipe)
    a2.load_training_state(state)
    batch = random_batch()
    torch.manual_seed(5)
    m1 = a1.update(batch)
    torch.manual_seed(5)
    m2 = a2.update(batch)
    for key in m1:
        torch.testing.assert_close(m1[key], m2[key])
    for p1, p2 in zip(a1.parameters(), a2.parameters(), strict=True):
        torch.testing.assert_close(p1, p2)


# ----- pickers and curricula inside the agents ----------------------------------------------


@pytest.mark.parametrize("recipe", ["resampling", "diffusion_ql", "consistency"])
def test_saved_policy_rebuilds_from_its_config_and_state_dict_alone(recipe):
    agent = make_agent(recipe)
    agent.update(random_batch())
    policy = agent.policy
    rebuilt = instantiate(agent.policy_config, _convert_="all")
    rebuilt.load_state_dict(policy.state_dict())
    assert type(rebuilt) is type(policy)
    obs = torch.randn(6, O) * 3
    torch.manual_seed(1)
    expected = policy(obs)
    torch.manual_seed(1)
    torch.testing.assert_close(rebuilt(obs), expected)
    if recipe != "consistency":
        assert isinstance(policy, ResamplingPolicy)
        assert "normalizer.mean" in policy.state_dict()


@pytest.mark.parametrize("recipe", ["resampling", "diffusion_ql"])
def test_deployed_consistency_model_saves_with_its_extra_state(recipe, tmp_path):
    """A deployed sampler over the consistency model carries non-tensor extra state (its
    curriculum position): policy.pt keeps it and `divo evaluate`'s loader rebuilds the policy."""
    from divo.agents.checkpoints import policy_payload, save_policy_file
    from divo.agents.policy_io import load_policy

    agent = make_agent(recipe, "behavior_model=consistency")
    agent.update(random_batch())
    cfg = compose_recipe(recipe, ["behavior_model=consistency"])
    save_policy_file(policy_payload(agent, cfg, None, 1), tmp_path / "policy.pt")
    policy, _ = load_policy(tmp_path / "policy.pt", torch.device("cpu"))
    obs = torch.randn(6, O)
    torch.manual_seed(1)
    expected = agent.policy(obs)
    torch.manual_seed(1)
    torch.testing.assert_close(policy(obs), expected)


def test_resampling_recipe_deploys_the_picker_and_can_deploy_the_actor():
    agent = make_agent("resampling")
    assert isinstance(agent.policy, ResamplingPolicy)
    assert agent.policy.num_samples == agent.selector.num_candidates == 32
    assert agent.policy.behavior_model is agent.behavior_model
    plain = make_agent("resampling", "evaluation_policy=null")
    assert type(plain.policy).__name__ == "NormalizedPolicy"


def test_agents_advance_the_consistency_curriculum():
    agent = make_agent("consistency", "train.steps=800")
    model = agent.behavior_model
    assert model.num_noise_levels == 11
    for _ in range(3):
        agent.update(random_batch())
    assert model.num_noise_levels == 11  # updates 0..2 of 800: first stage
    agent.num_updates = 250
    agent.update(random_batch())
    assert model.num_noise_levels == 41  # iCT: stage 250 // 100 = 2 -> 10 * 4 + 1
    dql = make_agent("diffusion_ql", "behavior_model=consistency", "train.steps=800")
    dql.num_updates = 700
    dql.update(random_batch())
    assert dql.actor.num_noise_levels == 1281


def test_consistency_sampling_cost_is_configurable_per_recipe():
    cfg = compose_recipe("consistency", ["behavior_model.sample_sigmas=[80.0]"])
    assert list(cfg.behavior_model.sample_sigmas) == [80.0]
    assert math.isclose(compose_recipe("consistency").behavior_model.sample_sigmas[1], 0.3)


# ----- every recipe trains end to end ---------------------------------------------------------

GRID_RECIPES = sorted(set(available_recipes()))


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["bandit", "hopper"])
@pytest.mark.parametrize("recipe", GRID_RECIPES)
def test_every_recipe_trains_a_few_hundred_steps_and_its_policy_file_evaluates(
    recipe, dataset, hopper_dataset, tmp_path, capsys
):
    """`divo train <recipe>` for 200 steps with tiny networks on the bandit and on a local
    Hopper Minari dataset, then `divo evaluate` rebuilds the deployed policy from policy.pt."""
    data = (
        ["dataset=minari", f"dataset.id={hopper_dataset}"]
        if dataset == "hopper"
        else ["dataset=bandit"]
    )
    steps = [
        "train.steps=200",
        "train.eval_every=200",
        "train.log_every=100",
        "train.checkpoint_every=200",
        "train.eval_episodes=2",
        "train.batch_size=64",
    ]
    run_dir = tmp_path / "run"
    args = ["train", recipe, "--quiet", *tiny_overrides(recipe, *data, *steps)]
    assert main([*args, f"hydra.run.dir={run_dir}"]) == 0, capsys.readouterr().err
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 200 and math.isfinite(result["return_mean"])
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 100, 200]  # 0: train.eval_at_start
    composed = compose_recipe(recipe)  # IQL, IDQL: no actor, their behaviour model is the policy
    actorless = composed.get("actor") is None and composed.get("algorithm") is None
    policy_loss = "loss_behavior" if actorless else "loss_actor"
    assert all(math.isfinite(float(rows[-1][k])) for k in ("loss_critic", policy_loss))
    capsys.readouterr()
    assert main(["evaluate", str(run_dir), "--episodes", "2", "--seed", "100", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["recipe"] == recipe and math.isfinite(evaluated["return_mean"])
    # deterministic ones replay exactly (fql: its one-step actor draws a fresh noise per action)
    if recipe not in ("resampling", "diffusion_ql", "idql", "fql"):
        assert evaluated["return_mean"] == pytest.approx(result["return_mean"])
