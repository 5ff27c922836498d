"""OGBench singletask data: read exactly as OGBench's own loader reads them, generated here by
OGBench's oracles (resumable, never half-written), and scored as success rates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

ogbench = pytest.importorskip("ogbench")

from divo.agents.evaluate import evaluate_policy  # noqa: E402
from divo.cli import main  # noqa: E402
from divo.data import load_offline_data  # noqa: E402
from divo.data import ogbench as reader  # noqa: E402
from divo.data.factory import ogbench as factory  # noqa: E402
from divo.errors import DatasetError  # noqa: E402

STEPS = 6  # stored steps per hand-made trajectory (5 transitions once paired)


def _task_env(env_name: str):
    env = gym.make(env_name)
    env.reset()
    return env


def _hand_made(directory: Path, name: str, env_name: str, rng: np.random.Generator) -> None:
    """Two trajectories per file in OGBench's layout; some stored states solve the task of
    ``env_name`` (the cube on its target / every button in its target state), others do not."""
    env = _task_env(env_name)
    unwrapped = env.unwrapped
    nq = unwrapped._data.qpos.size
    nv = unwrapped._data.qvel.size
    obs_dim = env.observation_space.shape[0]
    env.close()
    for suffix in ("", "-val"):
        n = 2 * STEPS
        qpos = rng.normal(0.0, 0.3, (n, nq)).astype(np.float32)
        data = {
            "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, 5)).astype(np.float32),
            "terminals": np.zeros(n, dtype=bool),
            "qpos": qpos,
            "qvel": rng.normal(size=(n, nv)).astype(np.float32),
        }
        data["terminals"][[STEPS - 1, n - 1]] = True
        if "cube" in env_name:
            target = unwrapped._data.mocap_pos.copy()[0]
            for row in (1, 2, STEPS + 4):  # solved states, one inside each trajectory
                data["qpos"][row, 14:17] = target + 0.01
        else:
            buttons = unwrapped._target_button_states.copy()
            states = rng.integers(0, 2, (n, buttons.size))
            for row in (0, STEPS + 2):
                states[row] = buttons
            data["button_states"] = states.astype(np.int64)
        np.savez_compressed(directory / f"{name}{suffix}.npz", **data)


@pytest.mark.parametrize(
    "dataset_id",
    [
        "cube-single-play-singletask-v0",  # the default task (task 2)
        "cube-single-play-singletask-task4-v0",
        "puzzle-3x3-noisy-singletask-task1-v0",
    ],
)
def test_read_matches_ogbench_own_loader(tmp_path, dataset_id):
    ident = reader.parse_id(dataset_id)
    _hand_made(tmp_path, ident.dataset_name, ident.env_name, np.random.default_rng(0))
    data = load_offline_data(dataset_id, data_dir=str(tmp_path), files="hosted", generate=False)
    _, theirs, _ = ogbench.make_env_and_datasets(
        dataset_id, dataset_path=str(tmp_path / f"{ident.dataset_name}.npz")
    )
    ours = data.data
    np.testing.assert_array_equal(ours["observation"].numpy(), theirs["observations"])
    np.testing.assert_array_equal(ours["next", "observation"].numpy(), theirs["next_observations"])
    np.testing.assert_array_equal(ours["action"].numpy(), theirs["actions"])
    np.testing.assert_array_equal(ours["next", "reward"].numpy()[:, 0], theirs["rewards"])
    terminated = ours["next", "terminated"].numpy()[:, 0]
    truncated = ours["next", "truncated"].numpy()[:, 0]
    np.testing.assert_array_equal(terminated, theirs["masks"] == 0)
    np.testing.assert_array_equal(truncated, (theirs["terminals"] == 1) & (theirs["masks"] == 1))
    assert terminated.any() and (~terminated).any()  # the files exercise both cases
    assert not (terminated & truncated).any()
    assert data.num_episodes == 2 and data.num_transitions == 2 * (STEPS - 1)
    assert data.score == "success" and "OGBench's file" in data.provenance
    assert data.eval_env_spec.id == ident.env_name


def test_misspelt_ids_are_refused_with_the_valid_ids():
    with pytest.raises(DatasetError, match="Did you mean 'cube-single-play-singletask-v0'"):
        reader.parse_id("cube-singel-play-singletask-v0")
    with pytest.raises(DatasetError, match=r"-task1\.\.-task5.*puzzle-3x3"):
        reader.parse_id("cube-single-play-singletask-task7-v0")
    assert reader.looks_like_ogbench("scene-play-singletask-v0")
    assert not reader.looks_like_ogbench("mujoco/hopper/medium-v0")
    assert len(reader.valid_ids()) == len(set(reader.valid_ids())) == 9 * 2 * 6


def test_missing_files_are_refused_with_the_ways_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVO_OGBENCH_DIR", str(tmp_path / "generated"))
    with pytest.raises(DatasetError, match=r"divo data ogbench scene.*download=true"):
        load_offline_data(
            "scene-play-singletask-v0",
            data_dir=str(tmp_path / "hosted"),
            generate=False,
            download=False,
        )
    assert not (tmp_path / "generated").exists()


def _tiny(**kw) -> factory.OGBenchGeneration:
    settings = dict(env="cube-single", episodes=2, val_episodes=1, episode_steps=121)
    return factory.OGBenchGeneration(**{**settings, **kw})


def test_generation_resumes_to_the_same_files_and_never_leaves_half_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(factory, "CHUNK_EPISODES", 1)
    whole = factory.generate_ogbench_dataset(_tiny(), tmp_path / "a", progress=False)
    assert whole["oracle_subtasks_finished"] >= 2  # a pick-and-place takes ~50 steps
    assert 0 < whole["oracle_subtask_success_rate"] <= 1

    real = factory.collect_episode

    def interrupted(env, oracles, settings, episode):
        if episode == 2:
            raise KeyboardInterrupt
        return real(env, oracles, settings, episode)

    monkeypatch.setattr(factory, "collect_episode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        factory.generate_ogbench_dataset(_tiny(), tmp_path / "b", progress=False)
    names = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert names == [".cube-single-play-v0.partial"]  # nothing under the final names
    monkeypatch.setattr(factory, "collect_episode", real)
    logged = []
    factory.generate_ogbench_dataset(_tiny(), tmp_path / "b", progress=False, log=logged.append)
    assert any("resuming" in line and "2 of 3" in line for line in logged)
    for suffix in ("", "-val"):
        with (
            np.load(tmp_path / "a" / f"cube-single-play-v0{suffix}.npz") as a,
            np.load(tmp_path / "b" / f"cube-single-play-v0{suffix}.npz") as b,
        ):
            assert sorted(a.files) == sorted(b.files)
            assert {"observations", "actions", "terminals", "qpos", "qvel"} <= set(a.files)
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])
    with np.load(tmp_path / "a" / "cube-single-play-v0.npz") as train:
        assert train["observations"].shape == (2 * 121, 28)
        assert train["terminals"].sum() == 2 and train["terminals"][-1]
        assert np.abs(train["actions"]).max() <= 1.0
    assert not (tmp_path / "b" / ".cube-single-play-v0.partial").exists()
    mode = (tmp_path / "b" / "cube-single-play-v0.npz").stat().st_mode & 0o777
    assert mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044  # readable as any new file
    with pytest.raises(DatasetError, match="--overwrite"):
        factory.generate_ogbench_dataset(_tiny(), tmp_path / "b", progress=False)


def test_parallel_workers_write_the_files_one_worker_writes(tmp_path, monkeypatch):
    """Episodes are seeded from (seed, episode) alone: chunks simulated on two spawned
    processes give the same arrays as one process, and a resume on workers finishes a
    generation one worker started."""
    monkeypatch.setattr(factory, "CHUNK_EPISODES", 1)
    factory.generate_ogbench_dataset(_tiny(), tmp_path / "one", progress=False)
    logged = []
    factory.generate_ogbench_dataset(
        _tiny(), tmp_path / "two", progress=False, workers=2, log=logged.append
    )
    assert any("3 chunks of up to 1 episodes on 2 workers" in line for line in logged)
    for suffix in ("", "-val"):
        with (
            np.load(tmp_path / "one" / f"cube-single-play-v0{suffix}.npz") as a,
            np.load(tmp_path / "two" / f"cube-single-play-v0{suffix}.npz") as b,
        ):
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])
    one = json.loads((tmp_path / "one" / "cube-single-play-v0.divo.json").read_text())
    two = json.loads((tmp_path / "two" / "cube-single-play-v0.divo.json").read_text())
    assert one["oracle_subtasks_finished"] == two["oracle_subtasks_finished"]
    assert one["machine"]["processor"] and "numpy" in one["machine"]  # which machine made it
    with pytest.raises(DatasetError, match="workers must be a whole number >= 1"):
        factory.generate_ogbench_dataset(_tiny(), tmp_path / "three", workers=0)
    assert not (tmp_path / "three").exists()


def test_generated_files_load_and_a_different_partial_is_discarded(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVO_OGBENCH_DIR", str(tmp_path))
    partial = tmp_path / ".cube-single-play-v0.partial"
    partial.mkdir()
    (partial / "settings.json").write_text(json.dumps({"seed": 123}))
    (partial / "chunk-000000-000010.npz").write_bytes(b"stale")
    logged = []
    factory.generate_ogbench_dataset(_tiny(), tmp_path, progress=False, log=logged.append)
    assert any("discarding" in line for line in logged)
    data = load_offline_data("cube-single-play-singletask-v0", files="generated", generate=False)
    assert data.num_transitions == 2 * 120 and data.observation_dim == 28
    assert "divo-generated" in data.provenance and "2 episodes" in data.provenance
    assert data.data["next", "truncated"].sum() + data.data["next", "terminated"].sum() >= 2


class _GoalEnv(gym.Env):
    """Succeeds at step ``goal`` (drawn from the reset seed) when ``goal`` is even; else the
    episode is cut at step 6."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.goal = 0, int(self.np_random.integers(2, 6))
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        success = self.goal % 2 == 0 and self.t >= self.goal
        truncated = self.t >= 6 and not success
        obs = np.full(1, self.t / 6, np.float32)
        return obs, float(success) - 1.0, success, truncated, {"success": success}


def test_success_rate_is_the_score_and_reused_envs_give_the_same_episodes():
    def policy(obs):
        return torch.zeros(len(obs), 1)

    goals = []
    for i in range(7):
        env = _GoalEnv()
        env.reset(seed=3 + i)
        goals.append(env.goal)
    expected = np.mean([g % 2 == 0 for g in goals])
    assert 0 < expected < 1  # the seeds give both outcomes

    fresh = evaluate_policy(policy, _GoalEnv, episodes=7, seed=3, score="success")
    assert fresh["success_rate"] == pytest.approx(expected)
    assert fresh["normalized_score"] == pytest.approx(100 * expected)
    pool = [_GoalEnv() for _ in range(3)]  # waves of 3, 3 and 1 episodes
    reused = evaluate_policy(policy, _GoalEnv, episodes=7, seed=3, score="success", envs=pool)
    assert reused["lengths"] == fresh["lengths"] and reused["returns"] == fresh["returns"]
    assert reused["success_rate"] == fresh["success_rate"]
    by_return = evaluate_policy(policy, _GoalEnv, episodes=7, seed=3)  # D4RL's score: none
    assert by_return["normalized_score"] is None
    assert by_return["success_rate"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="reports none"):
        evaluate_policy(
            lambda o: torch.zeros(len(o), 1),
            lambda: gym.make("Pendulum-v1"),
            episodes=1,
            score="success",
        )


def test_reused_ogbench_envs_replay_fresh_ones_exactly():
    reader.require_ogbench()
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (30, 5)).astype(np.float32)

    def rollout(env, seed):
        obs = [env.reset(seed=seed)[0]]
        for a in actions:
            obs.append(env.step(a)[0])
        return np.stack(obs)

    env = gym.make("cube-single-singletask-v0")
    first = rollout(env, 7)
    rollout(env, 8)  # another episode in between
    again = rollout(env, 7)
    env.close()
    np.testing.assert_array_equal(first, again)


def test_train_on_generated_data_reports_success_and_refuses_a_misspelt_task(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("DIVO_OGBENCH_DIR", str(tmp_path / "generated"))
    monkeypatch.chdir(tmp_path)
    factory.generate_ogbench_dataset(
        _tiny(episode_steps=101), tmp_path / "generated", progress=False
    )
    # the pooled evaluation environments are closed with the data (training closes them)
    data = load_offline_data("cube-single-play-singletask-v0", generate=False)
    pool = data.evaluation_envs(3)
    assert len(pool) == 3 and data.evaluation_envs(3) == pool  # made once, reused
    closed = []
    for env in pool:
        env.close = lambda closed=closed: closed.append(1)
    data.close()
    assert len(closed) == 3 and data._envs == []
    bad = tmp_path / "bad"
    code = main(
        [
            "train",
            "td3bc",
            "dataset=ogbench",
            "dataset.id=cube-single-play-singletask-task9-v0",
            "train.steps=20",
            f"hydra.run.dir={bad}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("divo: error:")]
    assert len(lines) == 1 and "Valid ids" in lines[0] and "task5" in lines[0]
    assert not bad.exists()
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "td3bc",
            "--quiet",
            "dataset=ogbench",
            "train.steps=20",
            "train.eval_every=20",
            "train.log_every=10",
            "train.eval_episodes=2",
            "train.eval_at_start=false",
            f"hydra.run.dir={run}",
        ]
    )
    assert code == 0
    result = json.loads((run / "result.json").read_text())
    assert result["success_rate"] in (0.0, 0.5, 1.0)
    assert result["normalized_score"] == pytest.approx(100 * result["success_rate"])
    assert result["episode_length_mean"] <= 200
    assert "divo-generated" in result["data_provenance"]
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"eval_success_rate", "eval_episode_length_mean", "eval_return_mean"} <= set(header)
    # episodes that run into the 200-step limit leave the exact critic check nothing at gamma
    # 0.99; the one-sided check (OGBench's reward is at most 0) covers every step
    assert {"eval_q_all", "eval_return_to_go_max", "eval_q_bias_min"} <= set(header)
    assert isinstance(result["critic_overestimation"], list)
    assert "success in" in (run / "train.log").read_text()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--episodes", "3"]) == 0  # scored as training scored it
    out = capsys.readouterr().out
    assert "success in" in out and "of 3 episodes" in out


def test_a_failed_download_falls_back_to_generating(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DIVO_OGBENCH_DIR", str(tmp_path / "generated"))

    def offline(names, dataset_dir):
        raise OSError("no network here")

    monkeypatch.setattr(ogbench, "download_datasets", offline)
    monkeypatch.setattr(factory, "generation_settings", lambda *args, **kw: _tiny())
    ident = reader.parse_id("cube-single-play-singletask-v0")
    hosted = str(tmp_path / "hosted")
    with pytest.raises(DatasetError, match="downloading them failed.*no network"):
        reader.find_files(ident, data_dir=hosted, download=True, generate=False)
    with caplog.at_level("WARNING", logger="divo"):
        found = reader.find_files(ident, data_dir=hosted, download=True)
    assert found.source == "generated" and found.train.is_file()
    assert "generating it here instead" in caplog.text


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickled", "nan"])
def test_damaged_or_hostile_files_are_refused_in_one_line(tmp_path, damage):
    ident = reader.parse_id("cube-single-play-singletask-v0")
    _hand_made(tmp_path, ident.dataset_name, ident.env_name, np.random.default_rng(1))
    train = tmp_path / f"{ident.dataset_name}.npz"
    if damage == "garbage":
        train.write_bytes(b"not a zip file at all")
    elif damage == "truncated":
        train.write_bytes(train.read_bytes()[:200])
    else:
        with np.load(train) as stored:
            arrays = {key: stored[key] for key in stored.files}
        if damage == "pickled":  # an object array: loading it would unpickle (run code)
            arrays["observations"] = np.array([object()] * len(arrays["actions"]), dtype=object)
        else:
            arrays["observations"][3, 0] = np.nan
        np.savez(train, **arrays)
    match = "non-finite" if damage == "nan" else "cannot be read"
    with pytest.raises(DatasetError, match=match):
        load_offline_data(ident.dataset_id, data_dir=str(tmp_path), files="hosted", download=False)


def test_generated_files_are_never_taken_for_hosted_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVO_OGBENCH_DIR", str(tmp_path / "elsewhere"))
    hosted = tmp_path / "hosted"  # generated into OGBench's own folder by mistake
    factory.generate_ogbench_dataset(_tiny(), hosted, progress=False)
    ident = reader.parse_id("cube-single-play-singletask-v0")
    found = reader.find_files(ident, data_dir=str(hosted), generate=False)
    assert found.source == "generated" and "divo-generated" in found.describe()
    with pytest.raises(DatasetError, match="not found"):  # files=hosted: only OGBench's own
        reader.find_files(ident, data_dir=str(hosted), files="hosted", generate=False)


def test_parallel_progress_moves_with_each_finished_chunk():
    """The progress callback runs as each chunk finishes, not once all have (a generation on
    workers showed 0% for its whole half hour), and a worker's error still comes out."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    release, seen = threading.Event(), []

    def slow() -> tuple[int, int]:
        assert release.wait(10), "the fast chunk was never reported"
        return 1, 20

    def report(episodes: int, steps: int) -> None:
        seen.append(steps)
        release.set()  # the slow chunk may finish only after the fast one was reported

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {pool.submit(slow), pool.submit(lambda: (1, 10))}
        factory._report_as_done(futures, report)
    assert seen == [10, 20]

    def broken() -> tuple[int, int]:
        raise DatasetError("worker failed")

    with ThreadPoolExecutor(max_workers=1) as pool, pytest.raises(DatasetError, match="worker"):
        factory._report_as_done({pool.submit(broken)}, report)
