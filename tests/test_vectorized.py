"""train.num_seeds: N seeds with stacked weights equal N separate agents where nothing random
remains, start from a single run's weights, write one complete run directory per seed, resume,
and still learn the bandit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from divo.agents.agent import EagerStages
from divo.agents.builder import build_agent
from divo.agents.policy_io import load_policy
from divo.agents.train import train
from divo.agents.vectorized import (
    VectorizedAgent,
    build_vectorized_agent,
    clip_grad_norm_per_seed,
)
from divo.cli import main
from divo.config import compose_recipe
from divo.errors import ConfigError, DatasetError

torch.set_num_threads(1)

OBS, A, B, N = 3, 2, 16, 3
SMALL = [
    "dataset=bandit",
    "critic.network.hidden=[32,32]",
    "actor.network.hidden=[32,32]",
    "critic.loss.policy_noise=0",  # TD3's target smoothing is the only noise of td3bc
]
# IQL, IDQL: no actor (their behaviour model is the policy), nor TD3's target smoothing
ACTORLESS_SMALL = ["dataset=bandit", "critic.network.hidden=[32,32]"]
SIZES = {
    "observation_dim": OBS,
    "action_dim": A,
    "obs_mean": torch.zeros(OBS),
    "obs_std": torch.ones(OBS),
}
SHORT = [
    "dataset=bandit",
    "train.steps=6",
    "train.eval_every=3",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "train.eval_episodes=1",
    "train.batch_size=32",
    "train.progress=false",
]
RUN_FILES = {"config.yaml", "metrics.csv", "policy.pt", "result.json", "train.log", "checkpoints"}


def ted(shape: tuple[int, ...], seed: int) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "observation": torch.randn(*shape, OBS, generator=g),
            "action": torch.rand(*shape, A, generator=g) * 2 - 1,
            "next": {
                "observation": torch.randn(*shape, OBS, generator=g),
                "reward": torch.randn(*shape, 1, generator=g),
                "terminated": torch.rand(*shape, 1, generator=g) < 0.1,
            },
        },
        batch_size=shape,
    )


def separate_and_stacked(recipe: str, overrides=()):
    cfg = compose_recipe(recipe, [*SMALL, *overrides])
    singles = []
    for seed in range(N):
        torch.manual_seed(seed)
        singles.append(build_agent(cfg, **SIZES))
    return singles, build_vectorized_agent(cfg, range(N), **SIZES)


def assert_close_state(vec: VectorizedAgent, singles, atol=1e-6) -> None:
    for i, agent in enumerate(singles):
        got, want = vec.training_state(i), agent.training_state()
        assert got["num_updates"] == want["num_updates"]
        for name, tensor in want["modules"].items():
            torch.testing.assert_close(got["modules"][name], tensor, atol=atol, rtol=1e-5)
        for part, opt in want["optimizers"].items():
            assert set(got["optimizers"][part]["state"]) == set(opt["state"]), part
            for pid, state in opt["state"].items():
                for key, value in state.items():
                    torch.testing.assert_close(
                        got["optimizers"][part]["state"][pid][key], value, atol=atol, rtol=1e-5
                    )


def test_initial_weights_of_seed_i_equal_a_build_with_that_seed():
    cfg = compose_recipe("divo", SMALL)
    vec = build_vectorized_agent(cfg, [5, 6, 7], **SIZES)
    for i, seed in enumerate([5, 6, 7]):
        torch.manual_seed(seed)
        want = build_agent(cfg, **SIZES).state_dict()
        got = vec.seed_agent(i).state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
    assert not torch.equal(
        vec.tensors["actor.net.0.weight"][0], vec.tensors["actor.net.0.weight"][1]
    )


def test_deterministic_stages_match_separate_agents():
    """Critic (no target noise), value and advantage stages with their optimiser steps: the
    stacked losses, metrics and updated parameters are each agent's own, to float32 rounding."""
    singles, vec = separate_and_stacked("divo")
    batch = ted((N, B), seed=1)
    k = vec.agent.keys
    args = [batch.get(key) for key in (k.observation, k.next_observation, k.action)]
    args += [batch.get(k.reward), batch.get(k.terminated)]
    stacked = vec.stages.run(vec.agent.critic_stage, "critic", *args)
    obs, y = stacked["observation"], stacked["td_target"]
    value = vec.stages.run(vec.agent.value_stage, "value", obs, batch.get(k.action), y)
    adv = vec.stages.run(vec.agent.advantage_stage, None, obs, batch.get(k.action))
    for i, agent in enumerate(singles):
        stages = EagerStages(agent)
        one = stages.run(agent.critic_stage, "critic", *(a[i] for a in args))
        for name, v in one.items():
            torch.testing.assert_close(stacked[name][i], v, atol=1e-6, rtol=1e-5)
        one_value = stages.run(agent.value_stage, "value", obs[i], batch.get(k.action)[i], y[i])
        for name, v in one_value.items():
            torch.testing.assert_close(value[name][i], v, atol=1e-6, rtol=1e-5)
        one_adv = stages.run(agent.advantage_stage, None, obs[i], batch.get(k.action)[i])
        for name, v in one_adv.items():
            torch.testing.assert_close(adv[name][i], v, atol=1e-6, rtol=1e-5)
    # Adam's first step moves each weight by ~lr * g / (|g| + eps): where a gradient is near eps,
    # float32 rounding of g (vmapped vs single matmuls) shows up ~100x larger in the weight
    assert_close_state(vec, singles, atol=1e-5)


def test_td3bc_updates_match_separate_agents_when_nothing_is_random():
    singles, vec = separate_and_stacked("td3bc")
    for step in range(6):
        batch = ted((N, B), seed=step)
        metrics = vec.update(batch)
        for i, agent in enumerate(singles):
            for name, v in agent.update(batch[i]).items():
                torch.testing.assert_close(metrics[name][i], v, atol=1e-6, rtol=1e-5)
    assert vec.num_updates == 6
    assert_close_state(vec, singles)


@pytest.mark.parametrize(
    "recipe", ["divo", "soft_weight", "a2pr", "consistency", "resampling", "iql", "idql"]
)
def test_every_offline_recipe_runs_vectorised_with_per_seed_metrics(recipe):
    small = SMALL if compose_recipe(recipe).get("actor") else [*ACTORLESS_SMALL]
    vec = build_vectorized_agent(compose_recipe(recipe, small), range(2), **SIZES)
    for step in range(2):  # the second step updates the actor too
        metrics = vec.update(ted((2, B), seed=step))
    assert ("loss_actor" if vec.agent.actor is not None else "loss_behavior") in metrics
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in metrics.values())
    # seed 1's state loads into seed 0 and back out unchanged
    state = vec.training_state(1)
    vec.load_training_state(0, state)
    again = vec.training_state(0)
    for name, value in state["modules"].items():  # tensors, and a model's extra state
        same = torch.equal(again["modules"][name], value) if torch.is_tensor(value) else None
        assert same or (same is None and again["modules"][name] == value), name


DQL_SMALL = [
    "dataset=bandit",
    "critic.network.hidden=[32,32]",
    "behavior_model.hidden=[32,32]",
    "diffusion_ql.ema.start=1",  # both kinds of update (with and without the EMA refresh)
    "diffusion_ql.ema.every=2",
]


@pytest.mark.parametrize("max_norm", [0.0, 0.5])
def test_per_seed_gradient_clipping_is_torchs_clipping_of_each_seed(max_norm):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(N, 4, 3, generator=g), torch.randn(N, 5, generator=g) * 3, None]
    stacked = [None if t is None else t.clone() for t in grads]
    norms = clip_grad_norm_per_seed(stacked, max_norm)
    assert norms.shape == (N,)
    for i in range(N):
        params = [torch.zeros_like(t[i], requires_grad=True) for t in grads if t is not None]
        for p, t in zip(params, [t for t in grads if t is not None], strict=True):
            p.grad = t[i].clone()
        want = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        torch.testing.assert_close(norms[i], want)
        for p, t in zip(params, [t for t in stacked if t is not None], strict=True):
            torch.testing.assert_close(t[i], p.grad)
    if max_norm:
        assert (norms > max_norm).any()  # the case where clipping acts is covered


def test_diffusion_ql_runs_vectorised_with_per_seed_metrics_and_clipping():
    cfg = compose_recipe("diffusion_ql", [*DQL_SMALL, "diffusion_ql.grad_norm=0.1"])
    vec = build_vectorized_agent(cfg, range(2), **SIZES)
    ema_before = vec.tensors["actor_ema.network.net.0.weight"].clone()
    for step in range(3):
        metrics = vec.update(ted((2, B), seed=step))
    assert {"loss_critic", "loss_actor", "critic_grad_norm", "actor_grad_norm"} <= set(metrics)
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in metrics.values())
    assert not torch.equal(vec.tensors["actor_ema.network.net.0.weight"], ema_before)
    state = vec.training_state(1)
    assert state["num_updates"] == 3
    policy = vec.policy(0)
    assert policy(torch.zeros(4, OBS)).shape == (4, A)


def test_unsupported_settings_are_refused_in_one_line(tmp_path):
    for extra, match in [
        (["train.num_seeds=0"], "positive integer"),
    ]:
        with pytest.raises(ConfigError, match=match):
            train(compose_recipe("td3bc", [*SHORT, *extra]), tmp_path / "run")
    with pytest.raises(ConfigError, match="replay buffer"):
        cfg = compose_recipe("td3bc", [*SHORT, "train.num_seeds=2"])
        train(cfg, tmp_path / "run", replay_buffer=object())


def test_a_refused_stacked_run_changes_nothing_on_disk(tmp_path):
    """A stacked run refused on its input (here a dataset that is not there) leaves no run or
    seed folder behind, and leaves a folder that was already there as it was."""
    cfg = compose_recipe(
        "td3bc", [*SHORT, "train.num_seeds=2", "dataset.id=divo/hopper/missing-v0"]
    )
    with pytest.raises(DatasetError, match="not found"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    kept = tmp_path / "kept"
    (kept / "seed0").mkdir(parents=True)
    (kept / "seed0" / "train.log").write_text("an earlier run's line\n")
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError):
        train(cfg, kept)
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt", "seed0"]
    assert [p.name for p in (kept / "seed0").iterdir()] == ["train.log"]
    assert (kept / "seed0" / "train.log").read_text() == "an earlier run's line\n"


def test_train_writes_one_complete_run_directory_per_seed(tmp_path, capsys):
    run = tmp_path / "run"
    summary = train(compose_recipe("divo", [*SHORT, "seed=3", "train.num_seeds=2"]), run)
    assert summary["seeds"] == [3, 4] and len(summary["results"]) == 2
    assert (run / "config.yaml").is_file()
    policies = []
    for seed in (3, 4):
        d = run / f"seed{seed}"
        assert RUN_FILES <= {p.name for p in d.iterdir()}
        result = json.loads((d / "result.json").read_text())
        assert result["seed"] == seed and result["steps"] == 6 and result["run_dir"] == str(d)
        assert result["normalized_score"] is not None
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(d / "config.yaml")
        assert cfg.seed == seed and cfg.train.num_seeds == 1
        log = (d / "train.log").read_text()
        assert log.index("step 0: normalized score") < log.index("step 6: normalized score")
        assert (d / "metrics.csv").read_text().splitlines()[1].startswith("0,")  # eval_at_start
        ckpt = torch.load(sorted((d / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)
        assert ckpt["step"] == 6 and ckpt["agent"]["num_updates"] == 6
        assert ckpt["config"]["seed"] == seed
        policy, _ = load_policy(d)
        policies.append(policy.state_dict())
    assert any(not torch.equal(v, policies[1][k]) for k, v in policies[0].items())
    # `divo evaluate` reads a seed's directory like a single run's
    assert main(["evaluate", str(run / "seed4"), "--episodes", "1"]) == 0
    # ... and on the whole run, it says which folders to evaluate
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 2
    assert "a run of 2 stacked seeds (seed3, seed4)" in capsys.readouterr().err
    # `divo report` on the parent finds the seeds' runs, not the parent
    from divo.report import find_runs

    runs = find_runs([run])
    assert [r.shown_path for r in runs] == [str(run / "seed3"), str(run / "seed4")]
    # each seed's result.json agrees with its metrics.csv's last evaluation (report's check)
    assert [r.status for r in runs] == ["complete", "complete"], [r.note for r in runs]


def test_seed_k_starts_from_the_weights_of_a_single_run_with_seed_k(tmp_path):
    """With every learning rate 0 nothing moves, so the final policies are the initial ones."""
    frozen = [*SHORT, "critic.lr=0", "actor.lr=0", "train.eval_episodes=0"]
    train(compose_recipe("td3bc", [*frozen, "train.num_seeds=2"]), tmp_path / "vec")
    train(compose_recipe("td3bc", [*frozen, "seed=1"]), tmp_path / "single")
    got = torch.load(tmp_path / "vec" / "seed1" / "policy.pt", weights_only=False)["state_dict"]
    want = torch.load(tmp_path / "single" / "policy.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(got[k], v) for k, v in want.items())


def final_checkpoint(run_dir: Path) -> dict:
    return torch.load(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)


@pytest.mark.parametrize("recipe", ["divo", "diffusion_ql"])
def test_resume_continues_every_seed_exactly(tmp_path, recipe):
    cfg = [*SHORT, "train.num_seeds=2", "train.steps=8", "train.eval_every=4"]
    if recipe == "diffusion_ql":
        cfg += ["diffusion_ql.ema.start=2", "diffusion_ql.ema.every=3", "diffusion_ql.grad_norm=1"]
    train(compose_recipe(recipe, cfg), tmp_path / "whole")
    part = tmp_path / "part"
    train(compose_recipe(recipe, [*cfg, "train.steps=4"]), part)
    # a save round cut short: seed 1 lacks step 4, so both resume from step 2
    (part / "seed1" / "checkpoints" / "step_000000004.pt").unlink()
    # a refused resume (a budget below the step reached) removes nothing, not even seed 0's
    # step-4 checkpoint that the seeds will not resume from
    assert main(["train", str(part), "train.steps=1", "--quiet"]) == 2
    assert (part / "seed0" / "checkpoints" / "step_000000004.pt").is_file()
    with pytest.warns(UserWarning, match="not every seed reached step 4"):
        assert main(["train", str(part), "train.steps=8", "--quiet"]) == 0
    for seed in (0, 1):
        a, b = (
            final_checkpoint(tmp_path / "whole" / f"seed{seed}"),
            final_checkpoint(part / f"seed{seed}"),
        )
        assert a["step"] == b["step"] == 8
        for name, tensor in a["agent"]["modules"].items():
            assert torch.equal(tensor, b["agent"]["modules"][name]), (seed, name)
        rows = (part / f"seed{seed}" / "metrics.csv").read_text().splitlines()
        assert rows == (tmp_path / "whole" / f"seed{seed}" / "metrics.csv").read_text().splitlines()


def test_a_stacked_run_resumes_only_as_it_was_stacked(tmp_path, capsys):
    """Changing train.num_seeds on a resume is refused (it used to retrain from step 0 in the
    top folder, or delete every seed's checkpoints); a seed that went on alone past the others
    (`divo train <run>/seed1`) is not rolled back by resuming them together; and a resume of
    a stacked run says it resumes."""
    run = tmp_path / "run"
    assert main(["train", "td3bc", *SHORT, "train.num_seeds=2", f"hydra.run.dir={run}"]) == 0
    for seeds in ("1", "3"):
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        with pytest.raises(ConfigError, match=rf"train.num_seeds: 2 -> {seeds}"):
            train(compose_recipe("td3bc", [*SHORT, f"train.num_seeds={seeds}"]), run)
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # training a finished stacked run again leaves its files alone (it set each seed's result
    # aside and rewrote it), and says so
    capsys.readouterr()
    # (the top train.log aside: in this process Hydra's handler of the first call still
    # writes to it, as no `divo train <run dir>` process has)
    files = lambda: {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    assert main(["train", str(run)]) == 0
    after = files()
    after[run / "train.log"] = before[run / "train.log"]
    assert after == before
    assert "finished its 6 steps already (all 2 seeds)" in capsys.readouterr().out
    assert main(["train", str(run), "train.steps=8", "--quiet"]) == 0
    assert "has no checkpoint yet" not in capsys.readouterr().out
    # seed 1 goes on alone to step 10; resuming both together would discard its steps 9-10
    assert main(["train", str(run / "seed1"), "train.steps=10", "--quiet"]) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", str(run), "train.steps=12", "--quiet"]) == 2
    assert "seed1 was trained on its own to step 10" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_vectorised_divo_settles_on_the_best_paying_bandit_mode(tmp_path):
    """The learning test of tests/test_train.py with its three seeds in one process (DIVO only:
    TD3+BC's failure on the same seeds is the single-seed test's, and costs CI time)."""
    from divo.data.bandit import best_action

    best = torch.as_tensor(best_action())
    cfg = compose_recipe(
        "divo",
        ["seed=0", "train.num_seeds=3", "dataset=bandit", "train.steps=1500",
         "train.eval_every=1500", "train.progress=false", "train.checkpoint_every=1500"],
    )  # fmt: skip
    summary = train(cfg, tmp_path / "divo")
    scores = [r["normalized_score"] for r in summary["results"]]
    hits = []
    for r in summary["results"]:
        pi, _ = load_policy(Path(r["run_dir"]))
        with torch.no_grad():
            action = pi(torch.zeros(1, 1)).squeeze(0)
        hits.append(bool((action - best).norm() < 0.25))
    assert sum(hits) >= 2, (hits, scores)
    assert sum(scores) / len(scores) > 80, scores


@pytest.mark.slow
def test_compiled_stacked_seeds_match_the_eager_ones():
    """compile=default with train.num_seeds: the vmapped stages go through torch.compile (one
    graph each) and train as the eager vmapped ones do (inductor drawing eager's random
    numbers; float rounding differs)."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from divo.agents.step import DeviceSampler, TrainStep

    data = ted((512,), seed=0)
    runs = []
    for mode in ("none", "default"):
        torch._dynamo.reset()
        counters.clear()
        _, vec = separate_and_stacked("td3bc")
        torch.manual_seed(1)
        step = TrainStep(vec, DeviceSampler(data, B, num_seeds=N).sample, mode)
        with inductor_config.patch(fallback_random=True):
            metrics = [step() for _ in range(20)]
        assert all(v.shape == (N,) for v in metrics[-1].values())
        if mode == "default":  # critic and actor stages, each compiled whole
            assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
            assert step._stages.calls.compiled == {"critic_stage", "actor_stage"}
        runs.append((metrics, {k: v.detach().clone() for k, v in vec.tensors.items()}))
    (m_eager, s_eager), (m_fast, s_fast) = runs
    for a, b in zip(m_eager, m_fast, strict=True):
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)
    for name, value in s_eager.items():
        torch.testing.assert_close(s_fast[name], value, rtol=1e-3, atol=1e-4, msg=name)
