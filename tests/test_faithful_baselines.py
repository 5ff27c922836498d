"""IQL, IDQL and A2PR at their references' settings (issue 32): the learning-rate horizon of the
reference run, IDQL's implicit-policy weight in both forms by hand, its batch, A2PR's README
presets per task family."""

from __future__ import annotations

import math

import pytest
import torch

from divo.agents.builder import build_agent, lr_schedule_record
from divo.config import compose_recipe
from divo.objectives.selectors import implicit_policy_weights

O, A = 3, 2  # noqa: E741


def _agent(recipe: str, *overrides: str):
    cfg = compose_recipe(
        recipe,
        ["critic.network.hidden=[16,16]", "value.network.hidden=[16,16]", *overrides],
    )
    torch.manual_seed(0)
    agent = build_agent(
        cfg, observation_dim=O, action_dim=A, obs_mean=torch.zeros(O), obs_std=torch.ones(O)
    )
    return cfg, agent


def optax_cosine_decay(init_value: float, decay_steps: int, count: int) -> float:
    """optax.cosine_decay_schedule(init_value, decay_steps) at optimiser count ``count`` (alpha
    0), as IQL's learner.py and IDQL's ddpm_iql_learner.py build their actor's rate: the value
    the reference's Adam uses for its update number ``count`` (0-based)."""
    count = min(count, decay_steps)
    return init_value * 0.5 * (1.0 + math.cos(math.pi * count / decay_steps))


@pytest.mark.parametrize(
    ("recipe", "reference_steps"),
    [("iql", 1_000_000), ("idql", 3_000_000)],  # IQL max_steps; IDQL decay_steps=int(3e6)
)
def test_rate_at_step_k_is_the_reference_runs_rate_at_step_k(recipe, reference_steps):
    """A 30k-step cell is a 30k-step snapshot of the reference run: the behaviour optimiser's
    rate at update k equals the reference's at its update k, for k within and past the run."""
    cfg, agent = _agent(recipe, "train.steps=30000", "behavior_model.hidden=[16,16]")
    schedule = agent.lr_schedules["behavior"]
    for k in (0, 1, 2, 15_000, 29_999, 30_000, reference_steps // 2, reference_steps, 10**7):
        expected = optax_cosine_decay(3e-4, reference_steps, k)
        assert 3e-4 * schedule(k) == pytest.approx(expected, rel=1e-12, abs=1e-18)
    # the number: at step 30,000 IQL's rate is above 99.7% of its start
    assert schedule(30_000) > 0.997
    assert lr_schedule_record(cfg) == {
        "behavior": {
            "schedule": "cosine",
            "decay_steps": reference_steps,
            "horizon": "set",
            "final_rate_fraction": round(optax_cosine_decay(1.0, reference_steps, 29_999), 6),
        }
    }


def test_the_optimiser_runs_the_reference_rate_update_by_update():
    """The rate the behaviour optimiser actually uses in updates 0, 1, 2 (IQL, horizon 1M)."""
    from tests.test_baselines import batch

    _, agent = _agent("iql", "train.steps=30000", "behavior_model.hidden=[16,16]")
    lrs = []
    for i in range(3):
        agent.update(batch(i))
        lrs.append(agent.optimizers["behavior"].param_groups[0]["lr"])
    assert lrs == pytest.approx([optax_cosine_decay(3e-4, 1_000_000, k) for k in range(3)])


def test_compressed_schedule_stays_possible_and_is_labelled():
    cfg, agent = _agent(
        "iql", "train.steps=30000", "behavior.lr_decay_steps=null", "behavior_model.hidden=[16]"
    )
    schedule = agent.lr_schedules["behavior"]
    assert schedule(15_000) == pytest.approx(0.5)
    assert schedule(30_000) == pytest.approx(0.0, abs=1e-15)
    record = lr_schedule_record(cfg)["behavior"]
    assert record["horizon"] == "compressed into the run"
    assert record["decay_steps"] == 30_000 and record["final_rate_fraction"] == 0.0
    assert lr_schedule_record(compose_recipe("divo")) == {}  # no schedule, nothing to label


def test_idql_weights_in_both_forms_by_hand():
    """tau 0.7, A = (-0.5, 0.2, 1.0, -2.0):
    expectile form |tau - 1[A < 0]|        = (0.3, 0.7, 0.7, 0.3);
    quantile form  |tau - 1[A < 0]| / |A|  = (0.6, 3.5, 0.7, 0.15)."""
    adv = torch.tensor([[-0.5, 0.2, 1.0, -2.0]])
    torch.testing.assert_close(
        implicit_policy_weights(adv, 0.7, "expectile"), torch.tensor([[0.3, 0.7, 0.7, 0.3]])
    )
    torch.testing.assert_close(
        implicit_policy_weights(adv, 0.7, "quantile"), torch.tensor([[0.6, 3.5, 0.7, 0.15]])
    )
    # A = 0 exactly: not negative, so tau; the quantile form floors |A| at eps
    zero = torch.zeros(1, 1)
    assert implicit_policy_weights(zero, 0.7, "expectile").item() == pytest.approx(0.7)
    assert implicit_policy_weights(zero, 0.7, "quantile", eps=1e-3).item() == pytest.approx(700)
    with pytest.raises(ValueError, match="form='importance' is not an implicit-policy weight"):
        implicit_policy_weights(adv, 0.7, "importance")


def test_idql_recipe_matches_its_code_batch_and_weight():
    cfg = compose_recipe("idql")
    assert cfg.train.batch_size == 512  # IDQL launcher: batch_size 512
    assert cfg.evaluation_policy.selection == "expectile"  # the V it trains is an expectile
    assert cfg.behavior.lr_decay_steps == 3_000_000


@pytest.mark.parametrize(
    ("dataset", "alpha", "vae_weight", "mask", "discount"),
    [  # A2PR README: its commands for halfcheetah-, hopper- and walker2d-medium-v2
        ("divo/halfcheetah/medium-replay-v0", 40.0, 1.0, 1.0, 0.99),
        ("divo/hopper/medium-v0", 2.5, 1.0, 0.4, 0.995),
        ("divo/walker2d/medium-v0", 2.5, 1.5, 1.0, 0.99),
        ("divo/bandit/multimodal-v0", 2.5, 1.0, 0.5, 0.99),  # not listed: its code's defaults
    ],
)
def test_a2pr_presets_per_task_family(dataset, alpha, vae_weight, mask, discount):
    cfg = compose_recipe("a2pr", [f"dataset.id={dataset}"])
    got = (
        cfg.actor.loss.alpha,
        cfg.weighting.eta,
        cfg.selector.mask_scale,
        cfg.critic.loss.gamma,
    )
    assert got == (alpha, vae_weight, mask, discount)


def test_iql_on_ogbench_runs_as_fql_code_base_runs_it():
    """dataset=ogbench merges protocol/iql/ogbench.yaml over the iql recipe: FQL's IQL (4 x 512
    gelu networks, LayerNorm in the critic and value, expectile 0.9, a constant lr, AWR inverse
    temperature 1 on cube-single and the code default 10 elsewhere); other data keep IQL's own
    settings, and an explicit override still wins."""
    own = compose_recipe("iql")
    assert (own.critic.network.hidden, own.value.loss.expectile, own.weighting.beta) == (
        [256, 256],
        0.7,
        3.0,
    )
    assert own.behavior.lr_schedule == "cosine" and not own.value.network.layer_norm
    og = compose_recipe("iql", ["dataset=ogbench"])
    for net in (og.critic.network, og.value.network):
        assert list(net.hidden) == [512] * 4 and net.layer_norm and net.activation == "gelu_tanh"
    assert list(og.behavior_model.hidden) == [512] * 4
    assert og.value.loss.expectile == 0.9 and og.behavior.lr_schedule is None
    assert og.normalize_observations is False and own.normalize_observations is not False
    assert og.weighting.beta == 1.0  # the default task, cube-single
    for task in ("cube-single-play-singletask-task4-v0", "scene-play-singletask-v0"):
        beta = compose_recipe("iql", ["dataset=ogbench", f"dataset.id={task}"]).weighting.beta
        assert beta == (1.0 if task.startswith("cube-single") else 10.0)
    over = compose_recipe(
        "iql", ["dataset=ogbench", "weighting.beta=3", "value.loss.expectile=0.7"]
    )
    assert (over.weighting.beta, over.value.loss.expectile) == (3, 0.7)
    # the LayerNorm value network is built and runs
    _, agent = _agent("iql", "dataset=ogbench", "train.steps=10")
    assert any(isinstance(m, torch.nn.LayerNorm) for m in agent.value.modules())
