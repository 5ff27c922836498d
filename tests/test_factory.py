"""The D4RL-style dataset factory (divo data build) on tiny SAC budgets."""

from __future__ import annotations

import json

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from synthetic import register_push_right

from divo.data.factory.build import BuildSettings, build_datasets, select_snapshots
from divo.data.factory.sac import SACRun, SACSettings, Snapshot, check_env, env_slug, split_episodes
from divo.errors import DatasetError

ENV = register_push_right()  # reward = action, 20 steps: SAC learns it in a few hundred updates
TINY_SAC = SACSettings(
    total_steps=1_000,
    random_steps=200,
    steps_per_batch=200,
    batch_size=64,
    hidden_sizes=(32, 32),
    lr=1e-3,
    snapshot_every=200,
    eval_episodes=3,
)
ALL_LEVELS = ("random", "medium", "expert", "medium-replay", "medium-expert")


def tiny_settings(namespace: str, **overrides) -> BuildSettings:
    values = dict(
        levels=ALL_LEVELS, dataset_size=400, ref_episodes=10, namespace=namespace, num_envs=4
    )
    values.update(overrides)
    return BuildSettings(**values)


def build(tmp_path, namespace: str, **kwargs):
    return build_datasets(
        ENV,
        sac=kwargs.pop("sac", TINY_SAC),
        settings=kwargs.pop("settings", tiny_settings(namespace)),
        seed=kwargs.pop("seed", 0),
        work_dir=tmp_path / namespace,
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny build of every level; returns (report, work dir)."""
    tmp = tmp_path_factory.mktemp("factory")
    return build(tmp, "built"), tmp / "built"


def snap(step: int, ret: float) -> Snapshot:
    return Snapshot(step=step, mean_return=ret, path=f"s{step}.pt")


# ---------------------------------------------------------------------------------------------
# Snapshot selection


def test_expert_is_best_snapshot_and_medium_closest_to_a_third():
    snapshots = [
        snap(0, 5.0),
        snap(10, 100.0),
        snap(20, 310.0),
        snap(30, 900.0),
        snap(40, 1200.0),
        snap(50, 1100.0),
    ]
    chosen = select_snapshots(snapshots)
    assert chosen.expert.step == 40
    assert chosen.medium_target == pytest.approx(400.0)
    assert chosen.medium.step == 20  # |310 - 400| = 90 < |100 - 400|, |900 - 400|


def test_final_expert_and_medium_never_after_the_expert():
    snapshots = [snap(0, 0.0), snap(10, 50.0), snap(20, 900.0), snap(30, 150.0)]
    final = select_snapshots(snapshots, expert="final")
    assert final.expert.step == 30
    assert final.medium.step == 10  # target 50
    best = select_snapshots(snapshots, expert="best")
    assert best.expert.step == 20
    # target 300: 150 (step 30) is closer than 50 (step 10), but it comes after the expert
    assert best.medium.step == 10


def test_selection_ties_and_fraction():
    snapshots = [snap(0, 0.0), snap(10, 200.0), snap(20, 400.0), snap(30, 600.0), snap(40, 600.0)]
    chosen = select_snapshots(snapshots, medium_fraction=0.5)
    assert chosen.expert.step == 40  # a tie on the best return goes to the later snapshot
    assert chosen.medium.step == 10  # target 300: 200 and 400 are equally close -> the earlier
    with pytest.raises(DatasetError, match="no snapshot after its 0 warm-up steps"):
        select_snapshots([snap(0, 1.0)])


def test_warm_up_snapshots_are_the_untrained_policy_and_never_chosen():
    """SAC does not update during its uniform warm-up: snapshots taken within it hold the
    initial policy's weights, and the medium (or expert) is never one of them."""
    snapshots = [snap(0, 0.0), snap(100, 95.0), snap(200, 96.0), snap(300, 10.0), snap(400, 300.0)]
    chosen = select_snapshots(snapshots, random_steps=200)
    assert chosen.expert.step == 400 and chosen.medium.step == 300  # not 200 (96 ~ 300 / 3)
    assert select_snapshots(snapshots).medium.step == 200  # a warm-up snapshot, if unknown
    with pytest.raises(DatasetError, match="after its 400 warm-up steps"):
        select_snapshots(snapshots, random_steps=400)


def test_the_medium_rule_is_refused_when_the_expert_return_is_not_positive():
    """A third of a negative return lies above every snapshot: the rule would pick the expert
    as medium (medium-expert one policy twice). Refused; an expert-only build still works."""
    snapshots = [snap(0, -1400.0), snap(10, -900.0), snap(20, -505.5)]
    with pytest.raises(DatasetError, match="returns -505.5: D4RL's medium rule .* positive"):
        select_snapshots(snapshots)
    assert select_snapshots(snapshots, need_medium=False).expert.step == 20


def test_the_rebuild_command_in_a_description_rebuilds_the_same_settings():
    """Every setting the command line sets is in it, so it parses back to the same build."""
    from divo.data.factory.build import rebuild_command
    from divo.data.factory.cli import build_parser, build_settings

    sac = SACSettings(total_steps=4000, random_steps=1000, snapshot_every=1000, eval_episodes=3,
                      batch_size=64, hidden_sizes=(32, 32))  # fmt: skip
    settings = BuildSettings(
        levels=("medium",),
        dataset_size=1000,
        medium_fraction=0.25,
        expert="final",
        ref_episodes=5,
        namespace="local",
        version=2,
    )
    command = rebuild_command("Pendulum-v1", "medium", sac, settings, 7)
    ns = build_parser().parse_args(command.split()[3:])
    assert build_settings(ns) == (sac, settings) and ns.seed == 7


def test_random_steps_that_the_collector_would_round_up_are_refused():
    """TorchRL's collector plays whole batches of random frames: 500 random steps with batches
    of 1,000 played 1,000 (the record, the warm-up exclusion and the medium-replay description
    said 500)."""
    with pytest.raises(DatasetError, match=r"random_steps \(500\) must be a multiple .* 1000"):
        SACSettings(random_steps=500, steps_per_batch=1000, snapshot_every=1000)
    assert SACSettings(random_steps=0).random_steps == 0
    assert SACSettings(random_steps=2000, steps_per_batch=1000).random_steps == 2000


def test_an_expert_only_build_describes_no_medium_snapshot():
    """With no medium level asked for, the medium rule is not applied: the log line and the
    stored description name no medium snapshot (they printed 'target nan'), and the report's
    JSON holds null, not NaN."""
    from divo.data.factory.build import _describe

    sac = SACSettings(total_steps=4000, random_steps=1000, snapshot_every=1000)
    settings = BuildSettings(levels=("expert",), dataset_size=1000)
    chosen = select_snapshots([snap(0, -1400.0), snap(2000, -505.5)], need_medium=False)
    episodes = [{"actions": np.zeros((10, 1), np.float32)}]
    text = _describe("expert", "Pendulum-v1", sac, settings, 0, chosen, {"episodes": 5}, episodes)
    assert "medium = " not in text and "nan" not in text
    assert "Expert = best snapshot (step 2000, return -505.5). ref_min_score" in text


# ---------------------------------------------------------------------------------------------
# What a build writes


def test_medium_replay_is_exactly_the_transitions_before_the_medium_snapshot(built):
    report, work = built
    medium_step = report["selection"]["medium"]["step"]
    dataset = minari.load_dataset(report["datasets"]["medium-replay"]["id"])
    assert dataset.total_steps == medium_step
    run = SACRun(ENV, TINY_SAC, seed=0, work_dir=work)
    assert run.load_checkpoint()
    stored = run.buffer.storage.get(torch.arange(run.step))
    episodes = list(dataset.iterate_episodes())
    observations = np.concatenate([e.observations[:-1] for e in episodes])
    actions = np.concatenate([e.actions for e in episodes])
    np.testing.assert_array_equal(observations, stored["observation"][:medium_step].numpy())
    np.testing.assert_array_equal(actions, stored["action"][:medium_step].numpy())
    # ... and nothing after it: the next stored transition is not in the dataset
    assert medium_step < run.step


def test_metadata_carries_references_and_scores_normalise(built):
    report, _ = built
    refs = report["references"]
    assert refs["ref_min_score"] < refs["ref_max_score"]
    for level in ALL_LEVELS:
        dataset = minari.load_dataset(report["datasets"][level]["id"])
        meta = dataset.storage.metadata
        assert meta["ref_min_score"] == pytest.approx(refs["ref_min_score"])
        assert meta["ref_max_score"] == pytest.approx(refs["ref_max_score"])
        assert "SAC" in meta["algorithm_name"] or level == "random"
        assert "divo data build" in meta["description"]
        assert dataset.observation_space.dtype == np.float32
        env = dataset.recover_environment()
        assert env.spec.id == ENV
        env.close()
    # the random policy's data scores about 0, the expert's about 1 (Minari returns fractions)
    for level, expected, tolerance in (("random", 0.0, 0.1), ("expert", 1.0, 0.25)):
        dataset = minari.load_dataset(report["datasets"][level]["id"])
        returns = np.array(
            [
                e.rewards.sum()
                for e in dataset.iterate_episodes()
                if e.terminations[-1] or e.truncations[-1]
            ]
        )
        score = float(np.mean(minari.get_normalized_score(dataset, returns)))
        assert abs(score - expected) < tolerance, (level, score)


def test_levels_have_the_requested_sizes_and_medium_expert_concatenates(built):
    report, _ = built
    sizes = {level: report["datasets"][level]["steps"] for level in ALL_LEVELS}
    assert sizes["random"] == sizes["medium"] == sizes["expert"] == 400
    assert sizes["medium-expert"] == 800
    medium = minari.load_dataset(report["datasets"]["medium"]["id"])
    both = minari.load_dataset(report["datasets"]["medium-expert"]["id"])
    first = next(both.iterate_episodes())
    np.testing.assert_array_equal(first.actions, next(medium.iterate_episodes()).actions)


def test_build_is_deterministic_given_seed(built, tmp_path):
    report, _ = built
    again = build(tmp_path, "again", settings=tiny_settings("again", levels=("medium",)))
    assert [s["mean_return"] for s in again["snapshots"]] == [
        s["mean_return"] for s in report["snapshots"]
    ]
    a = minari.load_dataset(report["datasets"]["medium"]["id"])
    b = minari.load_dataset(again["datasets"]["medium"]["id"])
    for x, y in zip(a.iterate_episodes(), b.iterate_episodes(), strict=True):
        np.testing.assert_array_equal(x.observations, y.observations)
        np.testing.assert_array_equal(x.actions, y.actions)


def test_an_interrupted_build_resumes(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = SACRun._update

    def crash_midway(self):
        calls["n"] += 1
        if calls["n"] == 500:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(SACRun, "_update", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, "resumed", settings=tiny_settings("resumed", levels=("medium",)))
    table = json.loads((tmp_path / "resumed" / "snapshots.json").read_text())
    done = table["steps_done"]
    assert 0 < done < TINY_SAC.total_steps
    before = table["snapshots"]
    monkeypatch.setattr(SACRun, "_update", original)
    report = build(tmp_path, "resumed", settings=tiny_settings("resumed", levels=("medium",)))
    steps = [s["step"] for s in report["snapshots"]]
    assert steps == list(range(0, TINY_SAC.total_steps + 1, TINY_SAC.snapshot_every))
    assert report["snapshots"][: len(before)] == before  # the snapshots before the crash kept
    assert minari.load_dataset(report["datasets"]["medium"]["id"]).total_steps == 400
    # a rerun of a finished build keeps its datasets
    again = build(tmp_path, "resumed", settings=tiny_settings("resumed", levels=("medium",)))
    assert again["datasets"]["medium"]["path"] == report["datasets"]["medium"]["path"]


def test_a_dataset_of_another_build_is_not_overwritten_silently(built, tmp_path):
    report, _ = built
    other = SACSettings(**{**TINY_SAC.to_dict(), "hidden_sizes": (16, 16)})
    with pytest.raises(DatasetError, match="--overwrite"):
        build(tmp_path, "built", sac=other, settings=tiny_settings("built", levels=("medium",)))
    # the same SAC run asked for other dataset settings: refused before any training
    with pytest.raises(DatasetError, match=r"other settings \(dataset_size: 400 -> 300\)"):
        build(
            tmp_path, "built", settings=tiny_settings("built", levels=("medium",), dataset_size=300)
        )
    assert not (tmp_path / "built").exists()  # no SAC run started in this work dir


# ---------------------------------------------------------------------------------------------
# Environments the factory cannot handle, and helpers


class _UnboundedEnv(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, True, False, {}


def test_unusable_environments_are_refused_with_the_fix():
    with pytest.raises(DatasetError, match="not a Box"):
        check_env("CartPole-v1")
    gym.register("divo-test/Unbounded-v0", entry_point=_UnboundedEnv)
    with pytest.raises(DatasetError, match="unbounded.*RescaleAction"):
        check_env("divo-test/Unbounded-v0")
    with pytest.raises(DatasetError, match="cannot make environment"):
        check_env("NoSuchEnv-v0")
    with pytest.raises(DatasetError, match="unknown level"):
        BuildSettings(levels=("medium", "great"))


def test_data_build_cli_reports_bad_input_in_one_line(capsys):
    from divo.cli import main

    assert main(["data", "build", "CartPole-v1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a Box" in err[0]
    assert main(["data", "frobnicate"]) == 2


def test_split_episodes_cuts_where_data_is_discontinuous():
    obs = np.arange(12, dtype=np.float32).reshape(6, 2)
    nxt = obs + 2  # consecutive: next of t is obs of t+1 ...
    nxt[2] = [99, 99]  # ... except after step 2 (a resumed run): a cut-off episode
    terminated = np.array([False, False, False, False, True, False])
    truncated = np.zeros(6, dtype=bool)
    episodes = split_episodes(
        observation=obs,
        action=obs[:, :1],
        next_observation=nxt,
        reward=np.ones(6),
        terminated=terminated,
        truncated=truncated,
    )
    assert [len(e["actions"]) for e in episodes] == [3, 2, 1]
    assert episodes[0]["truncations"].tolist() == [False, False, True]
    assert episodes[1]["terminations"].tolist() == [False, True]
    assert episodes[2]["truncations"].tolist() == [True]  # the end of the data
    np.testing.assert_array_equal(episodes[0]["observations"][-1], [99, 99])


def test_env_slug():
    assert env_slug("Hopper-v5") == "hopper"
    assert env_slug(ENV) == "pushright"
    assert env_slug("my_pkg.envs:Fancy_Env-v12") == "fancy-env"


@pytest.mark.parametrize("recipe", ["td3bc", "divo"])
def test_recipes_train_on_a_built_dataset(built, recipe, tmp_path, capsys):
    from test_ablations import tiny_overrides

    from divo.cli import main

    report, _ = built
    run_dir = tmp_path / "run"
    args = tiny_overrides(
        recipe,
        "dataset=minari",
        f"dataset.id={report['datasets']['medium-replay']['id']}",
        "train.steps=60",
        "train.eval_every=60",
        "train.log_every=30",
        "train.checkpoint_every=60",
        "train.eval_episodes=2",
        "train.batch_size=32",
    )
    assert main(["train", recipe, "--quiet", *args, f"hydra.run.dir={run_dir}"]) == 0, (
        capsys.readouterr().err
    )
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 60 and np.isfinite(result["normalized_score"])


@pytest.mark.slow
def test_data_build_on_hopper_through_the_cli_then_train(tmp_path, capsys):
    """The issue's command with a small budget: `divo data build Hopper-v5 --levels
    medium,medium-replay,expert`, then td3bc and divo train on the medium data."""
    from test_ablations import tiny_overrides

    from divo.cli import main

    args = ["data", "build", "Hopper-v5", "--levels", "medium,medium-replay,expert",
            "--sac-steps", "3000", "--random-steps", "1000", "--snapshot-every", "1000",
            "--eval-episodes", "2", "--hidden", "64", "--batch-size", "64", "--size", "1000",
            "--ref-episodes", "5", "--namespace", "clitest", "--work-dir", str(tmp_path / "w"),
            "--quiet"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "clitest/hopper/medium-v0" in out and "ref_max_score" in out
    for level in ("medium", "medium-replay", "expert"):
        dataset = minari.load_dataset(f"clitest/hopper/{level}-v0")
        meta = dataset.storage.metadata
        assert meta["ref_min_score"] < meta["ref_max_score"]
        assert dataset.env_spec.id == "Hopper-v5"
    expert = minari.load_dataset("clitest/hopper/expert-v0")
    returns = [e.rewards.sum() for e in expert.iterate_episodes() if e.terminations[-1]]
    assert np.mean(minari.get_normalized_score(expert, np.array(returns))) > 0.5
    for recipe in ("td3bc", "divo"):
        run_dir = tmp_path / recipe
        overrides = tiny_overrides(
            recipe, "dataset=minari", "dataset.id=clitest/hopper/medium-v0", "train.steps=40",
            "train.eval_every=40", "train.log_every=20", "train.checkpoint_every=40",
            "train.eval_episodes=2", "train.batch_size=32",
        )  # fmt: skip
        assert main(["train", recipe, "--quiet", *overrides, f"hydra.run.dir={run_dir}"]) == 0
        assert json.loads((run_dir / "result.json").read_text())["steps"] == 40
