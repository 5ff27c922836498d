"""Flow matching as a behaviour model, and FQL (flow Q-learning) as a recipe: losses, sampler and
update checked by hand; the recipe's per-environment settings; learning on the 2-D bandit. (The
flow model runs the plug-in contract in tests/test_behavior_models.py, with every shipped model.)"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hydra.utils import instantiate

from divo.agents.builder import build_agent
from divo.behavior_models import FlowMatching
from divo.behavior_models.backbones import EnsembleMLP, mlp
from divo.config import compose_recipe
from divo.objectives import (
    FQLActorLoss,
    FQLCriticLoss,
    NoiseConditionedActor,
    TwinQ,
    WeightedBehaviorLoss,
)

O, A, B = 3, 2, 6  # noqa: E741 - observation size, action size, batch size


# ----- the flow-matching loss -------------------------------------------------------------------


def test_flow_matching_loss_by_hand_per_sample_and_weighted():
    """l(s, a) = mean_A (v(s, x_t, t) - (a - z))^2 with x_t = (1 - t) z + t a, z then t drawn
    from the generator; one loss per transition (any leading dims); a weighting scheme's
    weights multiply it transition by transition."""
    torch.manual_seed(0)
    model = FlowMatching(O, A, hidden=(16, 16))
    obs, action = torch.randn(B, O), torch.rand(B, A) * 2 - 1
    loss = model.per_sample_loss(action, obs, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    z = torch.randn(B, A, generator=g)
    t = torch.rand(B, 1, generator=g)
    x_t = (1 - t) * z + t * action
    v = model.network.net(torch.cat([obs, x_t, t], -1))  # FQL's input order: [s, x, t]
    expected = ((v - (action - z)) ** 2).mean(-1)
    assert loss.shape == (B,)
    torch.testing.assert_close(loss, expected)
    # leading batch dims are kept, each transition its own loss
    loss_2d = model.per_sample_loss(
        action.reshape(2, 3, A), obs.reshape(2, 3, O), generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(loss_2d, expected.reshape(2, 3))
    # PAD's binary weights [1, 0, 1, 0, 1, 1]: the batch mean of w * l, never divided by sum(w)
    w = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0]).unsqueeze(-1)
    out = WeightedBehaviorLoss("mean")(loss, w)
    torch.testing.assert_close(out["loss_behavior"], (expected * w.squeeze(-1)).sum() / B)
    out = WeightedBehaviorLoss("weight_normalized")(loss, w)
    torch.testing.assert_close(out["loss_behavior"], (expected * w.squeeze(-1)).sum() / 4)


def test_the_exact_velocity_of_a_point_mass_has_zero_loss():
    """Data at one action a0: the conditional field v(x, t) = (a0 - x) / (1 - t) equals the
    target a - z on every point of the path, so the loss is 0 for any z and t."""
    model = FlowMatching(O, A, hidden=(8,))
    a0 = torch.tensor([0.3, -0.6])
    model.velocity = lambda s, x, t: (a0 - x) / (1 - t)
    loss = model.per_sample_loss(a0.expand(64, A), torch.randn(64, O))
    assert loss.abs().max() < 1e-5


# ----- the Euler sampler on a 1-D Gaussian target --------------------------------------------


def gaussian_velocity(m: float, s: float):
    """The exact marginal velocity E[a - z | x_t = x] for a ~ N(m, s^2), z ~ N(0, 1), x_t =
    (1 - t) z + t a: m + (t s^2 - (1 - t)) / sigma_t^2 (x - t m), sigma_t^2 = (1 - t)^2 +
    t^2 s^2. Its ODE carries z to m + s z exactly (x - t m = z sigma_t)."""

    def velocity(observation, x, t):
        var = (1 - t) ** 2 + t**2 * s**2
        return m + (t * s**2 - (1 - t)) / var * (x - t * m)

    return velocity


def euler_factor(s: float, steps: int) -> float:
    """Euler's solution of y' = c(t) y from y(0) = 1 with K steps: prod (1 + c(t_i) / K),
    c(t) = (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2), t_i = i / K (y(1) = s exactly)."""
    out = 1.0
    for i in range(steps):
        t = i / steps
        out *= 1 + (t * s**2 - (1 - t)) / ((1 - t) ** 2 + t**2 * s**2) / steps
    return out


@pytest.mark.parametrize("steps", [10, 40])
def test_euler_sampler_on_a_gaussian_target_is_within_euler_error(steps):
    m, s = 0.3, 0.25
    model = FlowMatching(1, 1, num_steps=steps, hidden=(8,), clip_sample=False)
    model.velocity = gaussian_velocity(m, s)
    z = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).unsqueeze(-1)
    out = model.sample_from_noise(torch.zeros(11, 1, dtype=torch.float64), z)
    # exactly Euler's recursion on this field (x_K - m = z * prod(1 + c(t_i) / K)) ...
    torch.testing.assert_close(out, m + z * euler_factor(s, steps), rtol=1e-9, atol=1e-12)
    # ... within Euler's first-order error of the exact transport m + s z: |z| (s - factor),
    # s - factor = 0.049 at K = 10 and 0.013 at K = 40 (~0.5 / K)
    error = (out - (m + s * z)).abs().max().item()
    assert error < 2.5 * 0.6 / steps, error
    assert error > 0.0  # a finite step size is not exact here


def test_euler_error_falls_as_one_over_k():
    m, s = -0.2, 0.4
    z = torch.tensor([[1.5]], dtype=torch.float64)
    errors = []
    for steps in (10, 20, 40):
        model = FlowMatching(1, 1, num_steps=steps, hidden=(8,), clip_sample=False)
        model.velocity = gaussian_velocity(m, s)
        out = model.sample_from_noise(torch.zeros(1, 1, dtype=torch.float64), z)
        errors.append(abs(out.item() - (m + s * 1.5)))
    assert 1.7 < errors[0] / errors[1] < 2.3 and 1.7 < errors[1] / errors[2] < 2.3, errors


def test_sample_is_the_euler_solution_of_its_own_noise_and_clips():
    torch.manual_seed(0)
    model = FlowMatching(O, A, hidden=(16,), num_steps=4)
    obs = torch.randn(5, O)
    samples = model.sample(obs, num_samples=3, generator=torch.Generator().manual_seed(2))
    z = torch.randn(15, A, generator=torch.Generator().manual_seed(2))
    expected = model.sample_from_noise(obs.repeat_interleave(3, 0), z).reshape(5, 3, A)
    torch.testing.assert_close(samples, expected)
    # clip_sample: the Euler solution clipped to [-1, 1]; without it, left as is
    model.velocity = lambda s, x, t: torch.full_like(x, 3.0)
    big = torch.zeros(5, A)
    assert torch.equal(model.sample_from_noise(obs, big), torch.ones(5, A))
    model.clip_sample = False
    torch.testing.assert_close(model.sample_from_noise(obs, big), torch.full((5, A), 3.0))
    with pytest.raises(ValueError, match="noise of shape"):
        model.sample_from_noise(obs, torch.zeros(4, A))


def test_network_options_fqls_layer_norm_and_xavier_init():
    """FQL's MLP: Dense -> gelu -> LayerNorm per hidden layer, weights
    U(+-sqrt(6 / (fan_in + fan_out))), zero biases."""
    torch.manual_seed(0)
    net = mlp(10, 2, (64, 64), "gelu_tanh", layer_norm=True, init="xavier_uniform")
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "GELU", "LayerNorm", "Linear", "GELU", "LayerNorm", "Linear"]
    assert net[1].approximate == "tanh" and net[2].eps == 1e-6
    for layer, (fan_in, fan_out) in zip(net[::3], [(10, 64), (64, 64), (64, 2)], strict=True):
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
        assert not layer.bias.any()
    ens = EnsembleMLP(2, 10, 1, (32,), "gelu_tanh", layer_norm=True, init="xavier_uniform")
    x = torch.randn(7, 10)
    for i in range(2):  # each member: its own LayerNorm scale and shift
        ens.net[2].weight.data[i].fill_(1.0 + i)
        torch.testing.assert_close(ens.member(i, x), ens(x)[i])
    with pytest.raises(ValueError, match="unknown init"):
        mlp(3, 1, (4,), init="he")


def test_critic_detached_params_pass_gradients_to_actions_only():
    q = TwinQ(O, A, hidden=(16, 16), layer_norm=True)
    obs, act = torch.randn(7, O), torch.randn(7, A, requires_grad=True)
    out = q(obs, act, detach_params=True)
    torch.testing.assert_close(out, q(obs, act))
    out.sum().backward()
    assert act.grad.abs().sum() > 0 and all(p.grad is None for p in q.parameters())


# ----- FQL: actor loss, distillation target, critic target -----------------------------------


def fql_parts(seed: int = 0):
    torch.manual_seed(seed)
    actor = NoiseConditionedActor(O, A, hidden=(16, 16))
    flow = FlowMatching(O, A, hidden=(16, 16), num_steps=4)
    critic = TwinQ(O, A, hidden=(16, 16), layer_norm=True, init="xavier_uniform")
    return actor, flow, critic


@pytest.mark.parametrize("normalize", [False, True])
def test_fql_actor_loss_by_hand(normalize):
    """alpha * mean ||mu(s, z) - flow(s, z)||^2 - mean Q(s, clip(mu(s, z))) with the flow's
    Euler solution from the same z, Q the mean of the heads; normalised: the Q term over mean
    |Q| (detached)."""
    actor, flow, critic = fql_parts()
    obs = torch.randn(B, O) * 3
    alpha = 0.7
    out = FQLActorLoss(alpha, normalize)(obs, actor, flow, critic, torch.Generator().manual_seed(4))
    z = torch.randn(B, A, generator=torch.Generator().manual_seed(4))
    mu = actor.net(torch.cat([obs, z], -1))
    target = flow.sample_from_noise(obs, z)
    distill = ((mu - target) ** 2).mean()
    q = critic(obs, mu.clamp(-1, 1)).mean(0)
    q_term = -q.mean() / (q.abs().mean() if normalize else 1.0)
    torch.testing.assert_close(out["loss_actor"], alpha * distill + q_term)
    torch.testing.assert_close(out["actor_distill"], distill)
    torch.testing.assert_close(out["actor_q"], q_term)
    torch.testing.assert_close(out["actor_q_mean"], q.mean())


def test_fql_distillation_target_is_the_flow_of_the_same_noise_without_gradient():
    actor, flow, critic = fql_parts()
    obs = torch.randn(B, O)
    seen = {}
    real_act, real_flow = actor.act, flow.sample_from_noise

    def act(observation, noise):
        seen["actor"] = noise
        return real_act(observation, noise)

    def flow_action(observation, noise):
        seen["flow"] = noise
        seen["flow_grad"] = torch.is_grad_enabled()
        return real_flow(observation, noise)

    actor.act, flow.sample_from_noise = act, flow_action
    out = FQLActorLoss(1.0)(obs, actor, flow, critic)
    assert torch.equal(seen["actor"], seen["flow"]) and not seen["flow_grad"]
    out["loss_actor"].backward()
    # gradients reach the one-step actor only: not the flow (the target), not the critic
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in actor.parameters())
    assert all(p.grad is None for p in flow.parameters())
    assert all(p.grad is None for p in critic.parameters())
    # with alpha = 0 the actor follows dQ/da alone; with a flat critic, the distillation alone
    actor.zero_grad()
    FQLActorLoss(0.0)(obs, actor, flow, critic)["loss_actor"].backward()
    g_q = [p.grad.clone() for p in actor.parameters()]
    actor.zero_grad()
    for p in critic.net.net[-1].parameters():  # zero output layer: Q = 0 everywhere
        p.data.zero_()
    FQLActorLoss(1.0)(obs, actor, flow, critic)["loss_actor"].backward()
    assert any(not torch.allclose(a, p.grad) for a, p in zip(g_q, actor.parameters(), strict=True))


@pytest.mark.parametrize("q_agg", ["mean", "min"])
def test_fql_critic_target_and_loss_by_hand(q_agg):
    """y = r + gamma (1 - d) agg_i Q'_i(s', clip(mu(s', z'))) with z' fresh from the generator;
    loss = mean over heads and batch of (Q_i(s, a) - y)^2."""
    actor, _, critic = fql_parts()
    target_critic = copy.deepcopy(critic)
    for p in target_critic.parameters():
        p.data.add_(0.1)  # the target critic differs from the online one
    loss_fn = FQLCriticLoss(gamma=0.9, q_agg=q_agg)
    reward, next_obs = torch.randn(B, 1), torch.randn(B, O) * 4
    terminated = torch.tensor([[False], [True], [False], [False], [True], [False]])
    y = loss_fn.target(
        reward, terminated, next_obs, target_critic, actor, torch.Generator().manual_seed(9)
    )
    z = torch.randn(B, A, generator=torch.Generator().manual_seed(9))
    a_next = actor.net(torch.cat([next_obs, z], -1)).clamp(-1, 1)
    q_next = target_critic(next_obs, a_next)
    agg = q_next.mean(0) if q_agg == "mean" else q_next.min(0).values
    expected = reward + 0.9 * (~terminated).float() * agg
    torch.testing.assert_close(y, expected)
    assert torch.equal(y[terminated.squeeze(-1)], reward[terminated.squeeze(-1)])
    obs, action = torch.randn(B, O), torch.rand(B, A) * 2 - 1
    out = loss_fn(obs, action, y, critic)
    q = critic(obs, action)
    torch.testing.assert_close(out["loss_critic"], ((q - y) ** 2).mean())
    with pytest.raises(ValueError, match="q_agg"):
        FQLCriticLoss(q_agg="max")


def test_the_deployed_policy_is_the_clipped_one_step_actor_with_fresh_noise():
    actor, _, _ = fql_parts()
    with torch.no_grad():
        actor.net[-1].bias.fill_(5.0)  # mu far outside [-1, 1]: the deployed action is clipped
        obs = torch.randn(4, O)
        torch.manual_seed(3)
        a1 = actor(obs)
        torch.manual_seed(3)
        z = torch.randn(4, A)
        torch.testing.assert_close(a1, actor.act(obs, z).clamp(-1, 1))
        assert torch.equal(a1, torch.ones(4, A))
        actor.net[-1].bias.zero_()
        assert not torch.equal(actor(obs), actor(obs))  # a fresh z per call


# ----- the FQL agent -----------------------------------------------------------------------------


def small_fql(*overrides: str):
    cfg = compose_recipe(
        "fql",
        [
            "critic.network.hidden=[16,16]",
            "actor.network.hidden=[16,16]",
            "behavior_model.hidden=[16,16]",
            "behavior_model.num_steps=3",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    agent = build_agent(
        cfg,
        observation_dim=O,
        action_dim=A,
        obs_mean=torch.zeros(O),
        obs_std=torch.ones(O),
    )
    return cfg, agent


def random_batch(seed: int):
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(seed)
    n = 32
    return TensorDict(
        {
            "observation": torch.randn(n, O, generator=g),
            "action": torch.rand(n, A, generator=g) * 2 - 1,
            "next": {
                "observation": torch.randn(n, O, generator=g),
                "reward": torch.randn(n, 1, generator=g),
                "terminated": torch.rand(n, 1, generator=g) < 0.2,
                "truncated": torch.zeros(n, 1, dtype=torch.bool),
                "done": torch.zeros(n, 1, dtype=torch.bool),
            },
        },
        batch_size=[n],
    )


def test_fql_update_equals_one_step_on_the_sum_of_its_losses():
    """FQL's code computes every loss from one set of parameters and takes one Adam step on
    their sum. The agent's staged update (target -> actor -> flow -> critic -> Polyak) gives the
    same parameters: each loss reads the other networks before their step."""
    _, agent = small_fql()
    ref = copy.deepcopy(agent)
    params = [*ref.actor.parameters(), *ref.behavior_model.parameters(), *ref.critic.parameters()]
    joint = torch.optim.Adam(params, lr=3e-4)  # one Adam over all networks, as FQL's optax.adam
    for step in range(3):
        batch = random_batch(step)
        metrics = agent.update(batch, generator=torch.Generator().manual_seed(10 + step))
        g = torch.Generator().manual_seed(10 + step)
        obs = batch["observation"]
        y = ref.critic_loss.target(
            batch["next", "reward"],
            batch["next", "terminated"],
            batch["next", "observation"],
            ref.critic_target,
            ref.actor,
            g,
        )
        actor_loss = ref.actor_loss(obs, ref.actor, ref.behavior_model, ref.critic, g)
        flow_loss = ref.behavior_model.per_sample_loss(batch["action"], obs, generator=g).mean()
        critic_loss = ref.critic_loss(obs, batch["action"], y, ref.critic)["loss_critic"]
        joint.zero_grad()
        (critic_loss + flow_loss + actor_loss["loss_actor"]).backward()
        joint.step()
        with torch.no_grad():
            for t, o in zip(ref.critic_target.parameters(), ref.critic.parameters(), strict=True):
                t.lerp_(o, 5e-3)
        torch.testing.assert_close(metrics["loss_critic"], critic_loss.detach())
        torch.testing.assert_close(metrics["loss_behavior"], flow_loss.detach())
        torch.testing.assert_close(metrics["loss_actor"], actor_loss["loss_actor"].detach())
    for (name, a), b in zip(agent.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_fql_recipe_follows_fqls_code_and_readme():
    cfg = compose_recipe("fql", ["dataset=minari", "dataset.id=mujoco/hopper/medium-v0"])
    assert cfg.algorithm == "fql" and not cfg.normalize_observations
    assert list(cfg.critic.network.hidden) == [512] * 4 and cfg.critic.network.layer_norm
    assert list(cfg.actor.network.hidden) == [512] * 4 and not cfg.actor.network.layer_norm
    assert list(cfg.behavior_model.hidden) == [512] * 4 and cfg.behavior_model.num_steps == 10
    assert cfg.critic.lr == cfg.actor.lr == cfg.behavior.lr == 3e-4
    assert cfg.train.batch_size == 256 and cfg.critic.tau == 5e-3
    assert cfg.critic.loss.policy_noise == 0.0 and cfg.actor.policy_delay == 1
    # FQL's defaults where its README has no row
    assert (cfg.fql.actor_loss.alpha, cfg.critic.loss.q_agg, cfg.critic.loss.gamma) == (
        10.0,
        "mean",
        0.99,
    )
    assert not cfg.fql.actor_loss.normalize_q_loss

    def settings(dataset_id):
        c = compose_recipe("fql", ["dataset=minari", f"dataset.id={dataset_id}"])
        return c.fql.actor_loss.alpha, c.critic.loss.q_agg, c.critic.loss.gamma

    assert settings("cube-double-play-singletask-task3-v0") == (300.0, "mean", 0.99)
    assert settings("scene-play-singletask-v0") == (300.0, "mean", 0.99)
    assert settings("puzzle-4x4-play-singletask-task1-v0") == (1000.0, "mean", 0.99)
    assert settings("antmaze-giant-navigate-singletask-task5-v0") == (10.0, "min", 0.995)
    assert settings("humanoidmaze-medium-navigate-singletask-v0") == (30.0, "mean", 0.995)
    assert settings("D4RL/antmaze/large-play-v1") == (3.0, "mean", 0.99)  # not the shared 0.995
    assert settings("D4RL/door/cloned-v2") == (30000.0, "min", 0.99)
    assert settings("D4RL/pen/expert-v2") == (3000.0, "min", 0.99)
    over = compose_recipe("fql", ["dataset=bandit", "fql.actor_loss.alpha=2"])
    assert over.fql.actor_loss.alpha == 2.0


def test_fql_refuses_a_behaviour_model_without_a_noise_sampler():
    from divo.errors import ConfigError

    cfg = compose_recipe("fql", ["critic.network.hidden=[8]", "actor.network.hidden=[8]"])
    cfg.behavior_model = {"_target_": "divo.behavior_models.DDPM", "_partial_": True, "hidden": [8]}
    sizes = {"observation_dim": O, "action_dim": A}
    with pytest.raises(ConfigError, match="sample_from_noise.*got DDPM"):
        build_agent(cfg, **sizes, obs_mean=torch.zeros(O), obs_std=torch.ones(O))


def test_fql_policy_file_rebuilds_the_one_step_actor_and_training_state_resumes():
    cfg, agent = small_fql()
    for step in range(2):
        agent.update(random_batch(step))
    policy = instantiate(agent.policy_config)
    policy.load_state_dict(agent.policy.state_dict())
    obs = torch.randn(5, O)
    with torch.no_grad():
        torch.manual_seed(1)
        expected = agent.policy(obs)
        torch.manual_seed(1)
        torch.testing.assert_close(policy(obs), expected)
    # a resumed agent continues exactly
    _, other = small_fql()
    other.load_training_state(copy.deepcopy(agent.training_state()))
    for step in range(2, 4):
        m1 = agent.update(random_batch(step), generator=torch.Generator().manual_seed(step))
        m2 = other.update(random_batch(step), generator=torch.Generator().manual_seed(step))
        assert all(torch.equal(m1[k], m2[k]) for k in m1)
    for a, b in zip(agent.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# ----- learning on the 2-D bandit ----------------------------------------------------------------


def bandit_deployed_actions(recipe: str, seed: int, tmp_path, *overrides: str) -> torch.Tensor:
    """Train ``recipe`` on the bandit and draw 200 actions from its saved policy (the bandit
    study's criterion: the share within 0.2 of the best mode's centre)."""
    from divo.agents.policy_io import load_policy
    from divo.agents.train import train

    run = tmp_path / f"{recipe}-{seed}"
    cfg = compose_recipe(
        recipe, ["dataset=bandit", f"seed={seed}", "train.progress=false", *overrides]
    )
    train(cfg, run)
    policy, _ = load_policy(run)
    torch.manual_seed(seed)
    with torch.no_grad():
        return policy(torch.zeros(200, 1))


def share_on_best_mode(actions: torch.Tensor) -> float:
    from divo.data.bandit import best_action

    best = torch.as_tensor(best_action(), dtype=actions.dtype)
    return ((actions - best).norm(dim=-1) < 0.2).float().mean().item()


@pytest.mark.slow
def test_fql_puts_its_deployed_actions_on_the_best_bandit_mode(tmp_path):
    """FQL's one-step actor (fresh noise per action) leaves the flow's four modes for the
    best-paying one: >= 80% of 200 deployed actions within 0.2 of it on at least 2 of 3 seeds
    (data: 25%). The bandit's row of the recipe (alpha 0.1, critic_init torch); networks of
    2 x 64 instead of FQL's 4 x 512 to fit a CPU test (~20 s a seed): 0.96, 0.93, 0.89 here."""
    small = [f"{part}.hidden=[64,64]" for part in ("critic.network", "actor.network")]
    steps = ["train.steps=2000", "train.eval_every=2000", "train.checkpoint_every=2000"]
    shares = [
        share_on_best_mode(
            bandit_deployed_actions(
                "fql", seed, tmp_path, *small, "behavior_model.hidden=[64,64]", *steps
            )
        )
        for seed in (0, 1, 2)
    ]
    assert sum(s >= 0.8 for s in shares) >= 2, shares


@pytest.mark.slow
def test_divo_with_a_flow_behaviour_model_settles_on_the_best_bandit_mode(tmp_path):
    """`divo train divo behavior_model=flow`: PAD-weighted flow BC, ADPO on its samples; the
    deterministic actor lands within 0.2 of the best mode on at least 2 of 3 seeds (networks
    of 2 x 128, 1,000 steps: ~12 s a seed)."""
    small = [
        f"{part}.hidden=[128,128]"
        for part in ("critic.network", "actor.network", "value.network", "behavior_model")
    ]
    steps = ["train.steps=1000", "train.eval_every=1000", "train.checkpoint_every=1000"]
    shares = [
        share_on_best_mode(
            bandit_deployed_actions("divo", seed, tmp_path, "behavior_model=flow", *small, *steps)
        )
        for seed in (0, 1, 2)
    ]
    assert sum(s == 1.0 for s in shares) >= 2, shares


def test_sampling_benchmark_reports_every_part(tmp_path, capsys):
    """benchmarks/bench_sampling.py (the inference-cost table) runs and reports each part;
    speed itself is never asserted."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sampling.py"
    spec = importlib.util.spec_from_file_location("bench_sampling", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sampling.json"
    assert bench.main(["--repeats", "2", "--device", "cpu", "--json", str(out)]) == 0
    parts = json.loads(out.read_text())["parts"]
    assert set(parts) == set(bench.PARTS)
    for row in parts.values():
        assert row["ms_batch_1"] > 0 and row["ms_batch_256"] > 0
    assert parts["flow, K = 10 (behavior_model=flow)"]["network_calls"] == 10
    assert "flow, K = 10" in capsys.readouterr().out


def test_fql_stacks_seeds_with_per_seed_metrics():
    """train.num_seeds: FQL's stages run vmapped over stacked seeds, each seed its own draws."""
    from divo.agents.vectorized import build_vectorized_agent

    cfg = compose_recipe(
        "fql",
        ["critic.network.hidden=[16]", "actor.network.hidden=[16]", "behavior_model.hidden=[16]"],
    )
    sizes = {"observation_dim": O, "action_dim": A}
    vec = build_vectorized_agent(
        cfg, range(2), **sizes, obs_mean=torch.zeros(O), obs_std=torch.ones(O)
    )
    for step in range(3):
        batch = torch.stack([random_batch(10 * step), random_batch(10 * step + 1)])
        metrics = vec.update(batch)
    assert {"loss_critic", "loss_actor", "loss_behavior", "actor_distill"} <= set(metrics)
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in metrics.values())
    assert not torch.equal(metrics["loss_actor"][0], metrics["loss_actor"][1])
    assert vec.training_state(1)["num_updates"] == 3
    assert vec.policy(0)(torch.zeros(4, O)).shape == (4, A)


def test_divo_with_a_flow_stacks_seeds():
    from divo.agents.vectorized import build_vectorized_agent

    small = [f"{part}.hidden=[16]" for part in ("critic.network", "actor.network", "value.network")]
    cfg = compose_recipe("divo", ["behavior_model=flow", "behavior_model.hidden=[16]", *small])
    sizes = {"observation_dim": O, "action_dim": A}
    vec = build_vectorized_agent(
        cfg, range(2), **sizes, obs_mean=torch.zeros(O), obs_std=torch.ones(O)
    )
    for step in range(2):  # the second step draws the flow's candidates for ADPO
        batch = torch.stack([random_batch(10 * step), random_batch(10 * step + 1)])
        metrics = vec.update(batch)
    assert {"loss_behavior", "loss_actor", "target_from_model_frac"} <= set(metrics)
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in metrics.values())
