"""IQL, IDQL and A2PR as its code runs: each new loss against a computation by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from divo.agents.builder import build_agent
from divo.behavior_models import CVAE
from divo.behavior_models.gaussian import GaussianBehavior
from divo.config import compose_recipe
from divo.objectives import (
    ADPOSelector,
    ExpAWRWeight,
    ExpectileResamplingPolicy,
    TD3CriticLoss,
    ValueLoss,
    WeightedBehaviorLoss,
)
from divo.objectives.selectors import expectile_importance_weights

O, A, B = 3, 2, 8  # noqa: E741


def agent_of(recipe: str, *overrides: str):
    cfg = compose_recipe(recipe, ["critic.network.hidden=[16,16]", *overrides])
    torch.manual_seed(0)
    return build_agent(
        cfg, observation_dim=O, action_dim=A, obs_mean=torch.zeros(O), obs_std=torch.ones(O)
    )


def batch(seed: int = 0):
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "observation": torch.randn(B, O, generator=g),
            "action": torch.rand(B, A, generator=g) * 2 - 1,
            "next": {
                "observation": torch.randn(B, O, generator=g),
                "reward": torch.randn(B, 1, generator=g),
                "terminated": torch.tensor([[True]] + [[False]] * (B - 1)),
                "truncated": torch.zeros(B, 1, dtype=torch.bool),
                "done": torch.tensor([[True]] + [[False]] * (B - 1)),
            },
        },
        batch_size=[B],
    )


# ----- IQL ------------------------------------------------------------------------------------


def test_value_bootstrapped_critic_target_by_hand():
    """bootstrap=value: y = r + gamma (1 - d) V(s'), no next action (and no smoothing noise)."""
    loss = TD3CriticLoss(gamma=0.9, bootstrap="value")
    reward = torch.tensor([[1.0], [2.0], [-1.0]])
    terminated = torch.tensor([[False], [True], [False]])
    next_obs = torch.tensor([[0.5, 0.5], [3.0, 1.0], [-2.0, 0.0]])
    y, next_action = loss.target_and_next_action(
        reward, terminated, next_obs, None, None, value=lambda s: s.sum(-1, keepdim=True)
    )
    torch.testing.assert_close(y, torch.tensor([[1.9], [2.0], [-2.8]]))
    assert next_action is None
    with pytest.raises(ValueError, match="needs a state value"):
        loss.target(reward, terminated, next_obs, None, None)


def test_iql_agent_regresses_q_towards_r_plus_gamma_v_of_the_next_state():
    agent = agent_of("iql")
    data = batch()
    before = copy.deepcopy(agent)
    metrics = agent.update(data)
    with torch.no_grad():
        next_v = before.value(data["next", "observation"])
        y = data["next", "reward"] + 0.99 * (~data["next", "terminated"]).float() * next_v
        q = before.critic(data["observation"], data["action"])
        # a TD3 target (min Q' at a smoothed next action) would give another number
        q_next = before.critic_target.min_q(data["next", "observation"], torch.zeros(B, A))
    torch.testing.assert_close(metrics["td_target_mean"], y.mean())
    assert not torch.allclose(y, data["next", "reward"] + 0.99 * q_next)
    torch.testing.assert_close(metrics["loss_critic"], (q - y).pow(2).mean((1, 2)).sum())


def test_awr_weight_by_hand():
    w = ExpAWRWeight(beta=3.0, w_max=100.0)(torch.tensor([[-1.0], [0.0], [0.5], [2.0]]))
    expected = [math.exp(-3.0), 1.0, math.exp(1.5), 100.0]  # exp(6) = 403 is clipped
    torch.testing.assert_close(w.flatten(), torch.tensor(expected))


def test_iql_policy_loss_is_awr_weighted_log_likelihood_with_the_updated_v():
    """loss = mean_B min(exp(3 A), 100) * -log pi(a | s), A = min Q_target(s, a) - V(s) with V
    after this step's value update (IQL's actor uses the new value), log pi of IQL's Gaussian
    (tanh mean, state-independent std)."""
    agent = agent_of("iql", "behavior_model.hidden=[16,16]", "value.network.hidden=[16,16]")
    data = batch(1)
    for _ in range(2):
        agent.update(batch(7))
    critic_target = copy.deepcopy(agent.critic_target)  # Polyak moves it at the step's end
    policy = copy.deepcopy(agent.behavior_model)  # the behaviour step moves it
    seen = {}
    stage = agent.behavior_stage

    def spy(obs, action, advantage):
        seen["advantage"] = advantage.clone()
        return stage(obs, action, advantage)

    agent.behavior_stage = spy
    metrics = agent.update(data)
    obs, act = data["observation"], data["action"]
    with torch.no_grad():
        adv = critic_target.min_q(obs, act) - agent.value(obs)  # the updated V
        mean, std = policy.distribution_parameters(obs)
        log_pi = torch.distributions.Normal(mean, std).log_prob(act).sum(-1, keepdim=True)
        expected = (torch.exp(3.0 * adv).clamp(max=100.0) * -log_pi).mean()
    torch.testing.assert_close(seen["advantage"], adv)
    torch.testing.assert_close(metrics["loss_behavior"], expected)
    assert torch.allclose(mean.abs().max(), mean.abs().max().clamp(max=1.0))  # tanh mean


def test_iql_deploys_the_gaussian_mean_and_its_lr_decays_by_cosine():
    agent = agent_of("iql", "train.steps=4", "behavior.lr_decay_steps=null")  # compressed
    obs = torch.randn(5, O)
    mean, _ = agent.behavior_model.distribution_parameters(obs)
    torch.testing.assert_close(agent.policy(obs), mean.clamp(-1, 1))
    torch.testing.assert_close(agent.policy(obs), agent.policy(obs))  # deterministic
    rebuilt = instantiate(agent.policy_config, _convert_="all")
    rebuilt.load_state_dict(agent.policy.state_dict())
    torch.testing.assert_close(rebuilt(obs), agent.policy(obs))
    lrs = []
    for _ in range(4):
        agent.update(batch())
        lrs.append(agent.optimizers["behavior"].param_groups[0]["lr"])
    # update t (0-based) of T = 4 uses 3e-4 * 0.5 (1 + cos(pi t / T))
    expected = [3e-4 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    assert lrs == pytest.approx(expected)
    assert agent.optimizers["critic"].param_groups[0]["lr"] == pytest.approx(3e-4)


# ----- IDQL -----------------------------------------------------------------------------------


def test_idql_expectile_importance_weights_by_hand():
    adv = torch.tensor([[-0.5, 0.2, 1.0]])
    w = expectile_importance_weights(adv, 0.7)
    torch.testing.assert_close(w, torch.tensor([[0.3 / 0.5, 0.7 / 0.2, 0.7 / 1.0]]))
    w_code = expectile_importance_weights(adv, 0.7, divide_by_advantage=False)
    torch.testing.assert_close(w_code, torch.tensor([[0.3, 0.7, 0.7]]))


class _Fixed(nn.Module):
    """A behaviour model whose samples are three fixed actions."""

    def __init__(self):
        super().__init__()
        self.actions = torch.tensor([[-1.0], [0.0], [1.0]])

    def sample(self, observation, num_samples=1, generator=None):
        return self.actions.expand(*observation.shape[:-1], 3, 1)


class _QIsAction(nn.Module):
    def forward(self, observation, action):
        return torch.stack([action, action + 1.0])  # min over heads = the action


def test_idql_policy_draws_candidates_in_proportion_to_the_weights():
    """Q = a, V = 0.5: A = (-1.5, -0.5, 0.5) -> w = (0.3/1.5, 0.3/0.5, 0.7/0.5) = (0.2, 0.6,
    1.4): frequencies 0.0909, 0.2727, 0.6364."""
    policy = ExpectileResamplingPolicy(
        nn.Identity(), _Fixed(), _QIsAction(), lambda s: torch.full((*s.shape[:-1], 1), 0.5),
        expectile=0.7, num_samples=3, selection="quantile",
    )  # fmt: skip
    torch.manual_seed(0)
    picks = policy(torch.zeros(40000, 1)).flatten()
    freq = torch.stack([(picks == a).float().mean() for a in (-1.0, 0.0, 1.0)])
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.6, 1.4]) / 2.2, atol=0.01, rtol=0)


def test_idql_selections_expectile_weights_and_argmax():
    """Q = a, V = 0.5 (A = -1.5, -0.5, 0.5): ``expectile`` draws in proportion to (0.3, 0.3,
    0.7); ``argmax`` always takes the largest min Q; the older ``divide_by_advantage=False``
    spelling loads as ``expectile``."""

    def v(s):
        return torch.full((*s.shape[:-1], 1), 0.5)

    def picker(**kw):
        return ExpectileResamplingPolicy(
            nn.Identity(), _Fixed(), _QIsAction(), v, num_samples=3, **kw
        )

    torch.manual_seed(0)
    picks = picker(selection="expectile")(torch.zeros(40000, 1)).flatten()
    freq = torch.stack([(picks == a).float().mean() for a in (-1.0, 0.0, 1.0)])
    torch.testing.assert_close(freq, torch.tensor([0.3, 0.3, 0.7]) / 1.3, atol=0.01, rtol=0)
    assert (picker(selection="argmax")(torch.zeros(50, 1)) == 1.0).all()
    assert picker(divide_by_advantage=False).selection == "expectile"
    assert picker(divide_by_advantage=True).selection == "quantile"
    assert picker(selection="importance").selection == "quantile"  # the form's older name
    with pytest.raises(ValueError, match="selection='greedy' is not an IDQL selection"):
        picker(selection="greedy")


def test_idql_recipe_deploys_the_weighted_picker_saved_whole():
    agent = agent_of("idql", "behavior_model.hidden=[16,16]", "value.network.hidden=[16,16]")
    agent.update(batch())
    policy = agent.policy
    assert isinstance(policy, ExpectileResamplingPolicy) and agent.actor is None
    assert policy.num_samples == 64 and policy.expectile == 0.7
    assert policy.selection == "expectile"  # the weight of the expectile V it trains
    assert policy.critic is agent.critic_target and policy.value is agent.value
    # IDQL samples the moving average of its behaviour model, not the model being trained
    assert policy.behavior_model is agent.behavior_model_ema
    assert "value.net.0.weight" in policy.state_dict()
    rebuilt = instantiate(agent.policy_config, _convert_="all")
    rebuilt.load_state_dict(policy.state_dict())
    obs = torch.randn(4, O)
    torch.manual_seed(3)
    expected = policy(obs)
    torch.manual_seed(3)
    torch.testing.assert_close(rebuilt(obs), expected)


def test_idql_behavior_moving_average_by_hand():
    """After each update the deployed copy is (1 - 0.001) ema + 0.001 model (IDQL's actor_tau,
    optax.incremental_update), starting from the initial model."""
    agent = agent_of("idql", "behavior_model.hidden=[16,16]", "value.network.hidden=[16,16]")
    assert agent.behavior_ema == 1e-3
    name = "network.inp.weight"
    ema = dict(agent.behavior_model_ema.named_parameters())[name].clone()
    for i in range(3):
        agent.update(batch(i))
        model = dict(agent.behavior_model.named_parameters())[name]
        ema = 0.999 * ema + 0.001 * model.detach()
        torch.testing.assert_close(dict(agent.behavior_model_ema.named_parameters())[name], ema)
    assert not torch.equal(ema, dict(agent.behavior_model.named_parameters())[name])
    assert "behavior_model_ema.network.inp.weight" in agent.training_state()["modules"]


def test_behavior_moving_average_is_refused_where_an_actor_is_deployed():
    from divo.errors import ConfigError

    with pytest.raises(ConfigError, match="deploys its actor; set behavior.ema_rate=null"):
        agent_of("divo", "behavior.ema_rate=0.001")
    with pytest.raises(ConfigError, match=r"rate in \(0, 1\]"):
        agent_of("idql", "behavior.ema_rate=2", "behavior_model.hidden=[16,16]")


# ----- A2PR as its code runs ------------------------------------------------------------------


def test_bootstrap_min_value_loss_by_hand():
    value = lambda s: torch.full((s.shape[0], 1), 0.5)  # noqa: E731
    loss = ValueLoss("bootstrap_min")(
        torch.zeros(2, 1),
        value,
        td_target=torch.tensor([[1.0], [3.0]]),
        online_td_target=torch.tensor([[2.0], [0.0]]),
    )["loss_value"]
    torch.testing.assert_close(loss, torch.tensor(((1.0 - 0.5) ** 2 + (0.0 - 0.5) ** 2) / 2))


def test_a2pr_value_regresses_to_the_smaller_of_target_and_online_td_targets():
    agent = agent_of(  # gamma 0.99: its code's default (its README's Hopper preset: 0.995)
        "a2pr", "critic.loss.policy_noise=0", "value.network.hidden=[16,16]",
        "critic.loss.gamma=0.99",
    )  # fmt: skip
    data = batch(2)
    before = copy.deepcopy(agent)
    metrics = agent.update(data)  # update 1: critic, value, behaviour (no actor, no Polyak)
    r, d = data["next", "reward"], (~data["next", "terminated"]).float()
    with torch.no_grad():
        s2 = data["next", "observation"]
        a2 = before.actor_target(s2)
        y_target = r + 0.99 * d * before.critic_target.min_q(s2, a2)
        y_online = r + 0.99 * d * agent.critic.min_q(s2, a2)  # the critic after its step
        v = before.value(data["observation"])
    assert not torch.allclose(y_target, y_online)
    expected = (v - torch.minimum(y_target, y_online)).pow(2).mean()
    torch.testing.assert_close(metrics["loss_value"], expected)


def test_only_the_cvae_reconstruction_is_weighted_under_a2prs_code():
    torch.manual_seed(0)
    obs, act = torch.randn(6, O), torch.rand(6, A) * 2 - 1
    weight = torch.tensor([[0.0], [1.0], [0.0], [1.0], [1.0], [0.0]])
    loss = WeightedBehaviorLoss()
    code = CVAE(O, A, hidden=(16, 16), weight_kl=False)
    described = copy.deepcopy(code)
    described.weight_kl = True
    torch.manual_seed(1)
    recon, kl = code.loss_terms(act, obs)
    torch.manual_seed(1)
    whole, none = described.loss_terms(act, obs)
    assert none is None
    torch.testing.assert_close(whole, recon + kl)
    out = loss(recon, weight, kl)["loss_behavior"]
    torch.testing.assert_close(out, (weight.flatten() * recon).mean() + kl.mean())
    # with every weight 0 the KL still trains (0 if it were weighted too)
    assert loss(recon, torch.zeros(6, 1), kl)["loss_behavior"] > 0
    assert loss(whole, torch.zeros(6, 1))["loss_behavior"] == 0


def test_adpo_select_keeps_the_gradient_of_a_winning_candidate_and_scales_the_mask():
    selector = ADPOSelector(mask="three_level", mask_scale=0.5, candidate="policy_reconstruction")
    cand = torch.tensor([[[0.1, 0.2]], [[0.3, 0.4]], [[0.5, 0.6]]], requires_grad=True)
    cand_adv = torch.tensor([[[1.0]], [[-1.0]], [[0.0]]])
    action = torch.zeros(3, 2)
    act_adv = torch.tensor([[0.5], [0.5], [-0.2]])
    target, mask = selector.select(cand, cand_adv, action, act_adv)
    # compare: rows 0 (1 >= 0.5) and 2 (0 >= -0.2) take the candidate, row 1 the action
    torch.testing.assert_close(target.detach(), torch.tensor([[0.1, 0.2], [0, 0], [0.5, 0.6]]))
    # mask = 0.5 * (1[A_gen >= 0] + 1[A_a > 0])
    torch.testing.assert_close(mask, torch.tensor([[1.0], [0.5], [0.5]]))
    target.sum().backward()
    torch.testing.assert_close(cand.grad, torch.tensor([[[1.0, 1]], [[0, 0]], [[1, 1]]]))
    _, no_grad_mask = selector(cand.detach(), cand_adv, action, act_adv)
    torch.testing.assert_close(no_grad_mask, mask)


def test_a2pr_actor_bc_term_pulls_through_the_reconstruction_of_pi():
    """The actor's gradient includes the path through the candidate dec(s, z(s, pi(s))): with
    the candidate detached the gradient differs (it is what A2PR's code backpropagates)."""
    agent = agent_of("a2pr", "value.network.hidden=[16,16]", "actor.network.hidden=[16,16]")
    data = batch(3)
    agent.update(data)
    obs, act = agent.normalizer(data["observation"]), data["action"]
    with torch.no_grad():  # V lowered by 1: positive advantages, so the BC mask is not 0
        v = agent.value(obs) - 1.0
        adv = agent.advantage(obs, act, agent.advantage_critic, agent.value, state_value=v)

    def actor_grad(detach: bool):
        agent.actor.zero_grad()
        model = agent.behavior_model
        if detach:
            original = model.reconstruct
            model.reconstruct = lambda *a, **k: original(*a, **k).detach()
        torch.manual_seed(5)
        out = agent._reconstruction_actor_stage(obs, act, adv, v)
        if detach:
            del model.reconstruct
        out["loss_actor"].backward()
        return torch.cat([p.grad.flatten() for p in agent.actor.parameters()]), out

    with_path, out = actor_grad(False)
    without, _ = actor_grad(True)
    assert float(out["target_from_model_frac"]) > 0 and float(out["bc_mask_mean"]) > 0
    assert not torch.allclose(with_path, without)


def test_a2pr_recipe_settings_follow_its_code():
    cfg = compose_recipe("a2pr", ["dataset.id=divo/bandit/multimodal-v0"])  # no README preset
    assert list(cfg.critic.network.hidden) == [256] * 4 == list(cfg.value.network.hidden)
    assert list(cfg.actor.network.hidden) == [256] * 3
    assert cfg.behavior.lr == 1e-3 and cfg.selector.mask_scale == 0.5
    assert cfg.value.loss.objective == "bootstrap_min" and not cfg.behavior_model.weight_kl
    assert cfg.selector.candidate == "policy_reconstruction"


def test_reconstruction_candidates_need_a_model_that_reconstructs():
    from divo.errors import ConfigError

    with pytest.raises(ConfigError, match="reconstruct.*behavior_model=cvae"):
        agent_of("divo", "selector.candidate=policy_reconstruction")


def test_gaussian_state_independent_std_is_one_vector():
    model = GaussianBehavior(O, A, hidden=(8,), state_dependent_std=False, tanh_mean=True)
    _, std = model.distribution_parameters(torch.randn(4, O))
    torch.testing.assert_close(std, torch.ones(4, A))  # log-std initialised at 0, as IQL


# ----- Diffusion-QL's departures: the best evaluation beside the final one --------------------


def test_best_evaluation_is_read_from_the_metrics_and_labelled(tmp_path):
    from divo.agents.runs import best_evaluation

    assert best_evaluation(tmp_path) is None
    (tmp_path / "metrics.csv").write_text(
        "step,loss_critic,eval_return_mean,normalized_score\n"
        "100,1.0,,\n200,0.9,5.0,40.0\n300,0.8,9.0,70.0\n400,0.7,7.0,55.0\n"
    )
    best = best_evaluation(tmp_path)
    assert best["step"] == 300 and best["return_mean"] == 9.0 and best["normalized_score"] == 70
    assert "not the final policy" in best["note"]
