"""Every shipped recipe composes, instantiates and takes an update; recipe errors are clear."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from divo.agents.builder import build_agent
from divo.config import available_recipes, compose_recipe
from divo.errors import ConfigError

O, A, B = 5, 2, 16  # noqa: E741 - observation size, action size, batch size

EXPECTED = {
    "divo": ("DDPM", "BinaryWeight", "ADPOSelector"),
    "soft_weight": ("DDPM", "ExpAWRWeight", "ADPOSelector"),
    "td3bc": (None, None, "DatasetSelector"),
}


def random_batch(batch: int = B, truncated: bool = False) -> TensorDict:
    return TensorDict(
        {
            "observation": torch.randn(batch, O),
            "action": torch.rand(batch, A) * 2 - 1,
            "next": {
                "observation": torch.randn(batch, O),
                "reward": torch.randn(batch, 1),
                "terminated": torch.zeros(batch, 1, dtype=torch.bool),
                "truncated": torch.full((batch, 1), truncated),
                "done": torch.full((batch, 1), truncated),
            },
        },
        batch_size=[batch],
    )


def make_agent(recipe: str, *overrides: str):
    cfg = compose_recipe(recipe, list(overrides))
    return build_agent(
        cfg, observation_dim=O, action_dim=A, obs_mean=torch.zeros(O), obs_std=torch.ones(O)
    )


def test_shipped_recipes_include_the_three_primaries():
    assert {"divo", "soft_weight", "td3bc"} <= set(available_recipes())


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_composes_instantiates_and_updates(recipe):
    cfg = compose_recipe(recipe)
    assert cfg.recipe == recipe
    agent = make_agent(recipe)
    if recipe in EXPECTED:
        model, weighting, selector = EXPECTED[recipe]
        assert (type(agent.behavior_model).__name__ if agent.behavior_model else None) == model
        assert (type(agent.weighting).__name__ if agent.weighting else None) == weighting
        assert type(agent.selector).__name__ == selector
    before = [p.detach().clone() for p in agent.critic.parameters()]
    for _ in range(2):  # the second step also updates the actor (policy delay 2)
        metrics = agent.update(random_batch())
    # the deployed policy trains: the actor, or (IQL, IDQL: no actor) the behaviour model
    policy_loss = "loss_actor" if agent.actor is not None else "loss_behavior"
    assert "loss_critic" in metrics and policy_loss in metrics
    assert all(torch.isfinite(v).all() for v in metrics.values())
    after = list(agent.critic.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("group", [["dataset=minari"], []])
def test_antmaze_ids_get_the_sparse_navigation_settings_of_method_md(group):
    """gamma 0.995, expectile 0.9, r - 1 and 100 evaluation episodes for Minari's D4RL AntMaze
    ids (with either dataset group); explicit overrides win; locomotion keeps its values."""
    ant = [*group, "dataset.id=D4RL/antmaze/medium-diverse-v1"]
    cfg = compose_recipe("divo", ant)
    assert cfg.critic.loss.gamma == 0.995 and cfg.value.loss.expectile == 0.9
    assert cfg.dataset.reward_shift == -1.0 and cfg.train.eval_episodes == 100
    # scored as D4RL scores AntMaze: the episode ends at the goal, its 0/1 return against 0 and 1
    assert cfg.dataset.eval_env_kwargs == {"continuing_task": False}
    assert list(cfg.dataset.ref_scores) == [0.0, 1.0]
    cfg = compose_recipe("divo", [*ant, "critic.loss.gamma=0.99", "dataset.reward_shift=0"])
    assert cfg.critic.loss.gamma == 0.99 and cfg.dataset.reward_shift == 0.0
    cfg = compose_recipe("divo", [*group, "dataset.id=mujoco/hopper/medium-v0"])
    assert cfg.critic.loss.gamma == 0.99 and cfg.value.loss.expectile == 0.7
    assert cfg.dataset.reward_shift == 0.0 and cfg.train.eval_episodes == 10
    assert cfg.dataset.eval_env_kwargs is None and cfg.dataset.ref_scores is None
    # Diffusion-QL keeps its own gamma (0.99 on every task) and takes its Table 3 row
    dql = compose_recipe("diffusion_ql", ant)
    assert dql.critic.loss.gamma == 0.99 and dql.diffusion_ql.actor_loss.eta == 3.0


def test_divo_defaults_follow_method_md():
    assert compose_recipe("divo").dataset.id == "divo/hopper/medium-replay-v0"  # the default
    assert compose_recipe("divo").actor.loss.alpha == 2.5
    bandit = ["dataset=bandit"]
    assert compose_recipe("divo", bandit).actor.loss.alpha == 0.25  # the bandit's per-task alpha
    # the per-task value follows the dataset id, whichever dataset group set it
    hopper = ["dataset.id=test/hopper/random-v0"]
    assert compose_recipe("divo", hopper).actor.loss.alpha == 2.5
    assert compose_recipe("divo", [*bandit, "actor.loss.alpha=1.0"]).actor.loss.alpha == 1.0
    cfg = compose_recipe("divo", ["dataset=minari", "dataset.id=mujoco/hopper/medium-v0"])
    assert cfg.behavior_model.num_steps == 5 and cfg.behavior_model.schedule == "vp"
    assert cfg.weighting.base == 0.0 and cfg.weighting.eta == 1.0
    assert cfg.selector.rule == "compare"
    assert cfg.critic.tau == 5e-3 and cfg.critic.loss.gamma == 0.99
    assert cfg.actor.policy_delay == 2 and cfg.actor.loss.alpha == 2.5
    assert cfg.train.batch_size == 256 and cfg.behavior.loss.reduction == "mean"


def test_value_option_bootstrap_composes():
    agent = make_agent("divo", "value=bootstrap")
    assert agent.value_loss.objective == "bootstrap"
    agent.update(random_batch())


def test_options_are_overridable_from_the_command_line():
    agent = make_agent(
        "divo", "selector.rule=positive", "selector.mask=three_level", "weighting.base=1"
    )
    assert agent.selector.rule == "positive" and agent.selector.mask == "three_level"
    assert agent.weighting.base == 1.0


def test_unknown_recipe_is_refused_with_the_list():
    with pytest.raises(ConfigError, match="unknown recipe 'divoo'.*did you mean divo"):
        compose_recipe("divoo")


def test_unknown_override_key_is_refused():
    with pytest.raises(ConfigError, match="no key train.stepz.*did you mean train.steps"):
        compose_recipe("divo", ["train.stepz=3"])


def test_missing_dataset_id_is_refused():
    with pytest.raises(ConfigError, match="dataset.id"):
        compose_recipe("divo", ["dataset=minari"])


def test_inconsistent_recipe_is_refused():
    # ADPO needs advantages: removing the value function must fail with a clear message
    with pytest.raises(ConfigError, match="value function"):
        make_agent("divo", "~value")


def test_truncation_never_bootstraps_from_a_zero_state():
    """The critic target of a truncated (not terminated) transition bootstraps from the real
    next state, and the truncated flag itself never enters the target."""
    torch.manual_seed(0)
    agent = make_agent("td3bc", "critic.loss.policy_noise=0.0")
    batch = random_batch(truncated=True)
    loss = agent.critic_loss
    obs_next = batch["next", "observation"]

    def target(next_obs, terminated):
        return loss.target(
            batch["next", "reward"], terminated, next_obs, agent.critic_target, agent.actor_target
        )

    not_term = torch.zeros(B, 1, dtype=torch.bool)
    y = target(obs_next, not_term)
    expected = batch["next", "reward"] + 0.99 * agent.critic_target.min_q(
        obs_next, agent.actor_target(obs_next)
    )
    torch.testing.assert_close(y, expected)
    assert not torch.allclose(y, target(torch.zeros_like(obs_next), not_term))
    # the agent reads only ("next", "terminated"): flipping "truncated" changes nothing
    a1, a2 = make_agent("td3bc"), make_agent("td3bc")
    a2.load_state_dict(a1.state_dict())
    batch_t = random_batch(truncated=True)
    batch_f = batch_t.clone()
    batch_f["next", "truncated"].zero_()
    batch_f["next", "done"].zero_()
    torch.manual_seed(2)
    m1 = a1.update(batch_t)
    torch.manual_seed(2)
    m2 = a2.update(batch_f)
    assert m1["loss_critic"] == m2["loss_critic"]
    for p1, p2 in zip(a1.critic.parameters(), a2.critic.parameters(), strict=True):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize(
    "recipe, alpha",
    [
        (r, 0.03)
        for r in ("divo", "uniform_weight", "soft_weight", "resampling", "consistency", "cvae")
    ]
    + [("td3bc", 0.2)],
)
def test_ogbench_protocol_sets_the_weight_on_q_chosen_on_design_data(recipe, alpha):
    """dataset=ogbench merges protocol/<divo|td3bc>/ogbench.yaml: DIVO and its ablations share
    one weight on Q, td3bc has its own (ReBRAC's cube-single setting); other data keep theirs
    (D4RL's 2.5, the bandit's 0.25), and an explicit override still wins."""
    assert compose_recipe(recipe, ["dataset=ogbench"]).actor.loss.alpha == alpha
    task = ["dataset=ogbench", "dataset.id=scene-play-singletask-task3-v0"]
    assert compose_recipe(recipe, task).actor.loss.alpha == alpha
    assert compose_recipe(recipe).actor.loss.alpha == 2.5
    assert compose_recipe(recipe, ["dataset=bandit"]).actor.loss.alpha == 0.25
    over = compose_recipe(recipe, ["dataset=ogbench", "actor.loss.alpha=2.5"])
    assert over.actor.loss.alpha == 2.5


def test_settings_looked_up_by_dataset_id_are_named_and_a_missing_tuned_entry_warns(caplog):
    """FQL's README sets alpha per environment (300 on the cube tasks); an OGBench id its table
    lacks runs the table's default alpha 10, which must not pass unsaid. An explicit override is
    no lookup, and a table without a default (per_dataset) only logs."""
    from divo.agents.runs import log_dataset_settings
    from divo.config import dataset_settings

    listed = compose_recipe("fql", ["dataset=ogbench"])
    (record,) = dataset_settings(listed)
    assert record["table"] == "fql.tasks" and record["entry"] and record["tuned"]
    assert record["values"]["fql.actor_loss.alpha"] == 300.0

    missing = ["dataset=ogbench", "dataset.id=cube-triple-play-singletask-v0"]
    (record,) = dataset_settings(compose_recipe("fql", missing))
    assert not record["entry"] and record["values"]["fql.actor_loss.alpha"] == 10.0
    with pytest.warns(UserWarning, match=r"fql.tasks has no entry .*fql.actor_loss.alpha=10.0"):
        log_dataset_settings(compose_recipe("fql", missing))

    (record,) = dataset_settings(compose_recipe("fql", [*missing, "fql.actor_loss.alpha=30"]))
    assert "fql.actor_loss.alpha" not in record["values"]

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        caplog.set_level("INFO", logger="divo.train")
        log_dataset_settings(compose_recipe("iql", []))  # per_dataset: the recipe's own beta
        log_dataset_settings(compose_recipe("fql", ["dataset=ogbench"]))
    assert "per_dataset has no entry, the recipe's own (" in caplog.text
    assert "from fql.tasks: " in caplog.text and "fql.actor_loss.alpha=300.0" in caplog.text


def _build(cfg):
    return build_agent(cfg, observation_dim=3, action_dim=2, obs_mean=torch.zeros(3),
                       obs_std=torch.ones(3))  # fmt: skip


@pytest.mark.parametrize(
    ("recipe", "model", "refused"),
    [
        ("idql", "flow", None),  # IDQL over a flow: its ResNet settings leave with its DDPM
        ("idql", "cvae", None),
        ("a2pr", "cvae", None),
        ("fql", "flow", None),
        ("fql", "ddpm", "needs a behaviour model with sample_from_noise"),
        ("a2pr", "ddpm", "needs a behaviour model with reconstruct"),
        ("iql", "ddpm", "has no mode\\(observation\\) to deploy"),
    ],
)
def test_a_baselines_model_swaps_whole(recipe, model, refused):
    """The baselines' models are group options of their own (fql_flow, a2pr_cvae, iql_gaussian,
    idql_ddpm): `behavior_model=<other>` replaces the reference's settings with the model (they
    were merged into the new model and failed as unexpected keyword arguments, e.g. DDPM's
    'layer_norm'); a model the method cannot use is refused with the reason."""
    cfg = compose_recipe(recipe, [f"behavior_model={model}"])
    shipped = compose_recipe("divo", [f"behavior_model={model}"]).behavior_model
    assert cfg.behavior_model == shipped  # the shipped model's own settings, nothing left over
    if refused is None:
        _build(cfg)
    else:
        with pytest.raises(ConfigError, match=refused):
            _build(cfg)
