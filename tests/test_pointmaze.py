"""PointMaze datasets made by a waypoint planner + PD controller (divo.data.factory.pointmaze)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import gymnasium as gym
import minari
import numpy as np
import pytest

from divo.data.factory import pointmaze
from divo.data.factory.pointmaze import (
    FLAT_OBSERVATION_LAYOUT,
    GOAL,
    MAZES,
    POSITION,
    VELOCITY,
    WaypointController,
    build_pointmaze_dataset,
    collect_pointmaze_episodes,
    evaluate_in_pointmaze,
    make_pointmaze_env,
)
from divo.data.minari_io import float32_box
from divo.errors import DatasetError, install_hint

needs_robotics = pytest.mark.skipif(
    importlib.util.find_spec("gymnasium_robotics") is None,
    reason="gymnasium-robotics is not installed (pip install 'divo-rl[maze]')",
)

TEST_DATASET_ID = "test/pointmaze/umaze-v0"
TEST_STEPS = 2_000
TEST_REF_EPISODES = 3

# Free cells are 0. From (5, 4) to (1, 4) the straight line crosses the walls at (4, 4) and
# (2, 2)-(2, 3); the shortest path (10 moves) runs left along row 5, up column 1 to row 3 and
# then either way round the block at (2, 2)-(2, 3).
SMALL_MAP = [
    [1, 1, 1, 1, 1, 1],
    [1, 0, 0, 0, 0, 1],
    [1, 0, 1, 1, 0, 1],
    [1, 0, 0, 0, 0, 1],
    [1, 0, 1, 1, 1, 1],
    [1, 0, 0, 0, 0, 1],
    [1, 1, 1, 1, 1, 1],
]


def small_maze():
    from gymnasium_robotics.envs.maze.maze_v4 import Maze

    return Maze(SMALL_MAP, maze_size_scaling=1.0, maze_height=0.4)


@pytest.fixture(scope="module")
def built_dataset(minari_root) -> minari.MinariDataset:
    if importlib.util.find_spec("gymnasium_robotics") is None:
        pytest.skip("gymnasium-robotics is not installed")
    return build_pointmaze_dataset(
        "umaze",
        num_steps=TEST_STEPS,
        dataset_id=TEST_DATASET_ID,
        ref_episodes=TEST_REF_EPISODES,
        progress=False,
    )


# --------------------------------------------------------------------------------------------
# Planner and controller


@needs_robotics
def test_planner_path_is_a_shortest_path_around_the_walls():
    controller = WaypointController(small_maze())
    path = controller.shortest_path((5, 4), (1, 4))
    assert path[0] == (5, 4) and path[-1] == (1, 4)
    assert len(path) - 1 == 10  # moves; the wall-crossing straight line would take 4
    assert path[:6] == [(5, 4), (5, 3), (5, 2), (5, 1), (4, 1), (3, 1)]
    assert len(set(path)) == len(path)
    for (r0, c0), (r1, c1) in zip(path, path[1:], strict=False):
        assert abs(r0 - r1) + abs(c0 - c1) == 1  # 4-connected moves
    assert all(SMALL_MAP[r][c] != 1 for r, c in path)  # never through a wall
    assert controller.distances((1, 4))[5, 4] == 10
    assert controller.shortest_path((1, 4), (1, 4)) == [(1, 4)]


@needs_robotics
def test_planner_reports_no_path_into_walls_or_closed_off_cells():
    from gymnasium_robotics.envs.maze.maze_v4 import Maze

    closed = Maze([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [1, 1, 1, 1, 1]], 1.0, 0.4)
    controller = WaypointController(closed)
    assert controller.shortest_path((1, 1), (1, 3)) == []
    assert controller.shortest_path((0, 0), (1, 1)) == []


@needs_robotics
def test_waypoint_is_the_next_cell_centre_then_the_goal():
    maze = small_maze()
    controller = WaypointController(maze)
    start = maze.cell_rowcol_to_xy(np.array([5, 4])) + np.array([0.2, -0.1])
    goal = maze.cell_rowcol_to_xy(np.array([1, 4])) + np.array([0.1, 0.2])
    np.testing.assert_allclose(
        controller.waypoint(start, goal), maze.cell_rowcol_to_xy(np.array([5, 3]))
    )
    near_goal = maze.cell_rowcol_to_xy(np.array([1, 4])) - np.array([0.3, 0.0])
    np.testing.assert_allclose(controller.waypoint(near_goal, goal), goal)
    rng = np.random.default_rng(0)
    for xy in rng.uniform(-3.0, 3.0, size=(200, 2)):  # the controller's cell = the maze's
        assert controller.cell(xy) == tuple(int(v) for v in maze.cell_xy_to_rowcol(xy))


@needs_robotics
def test_controller_action_is_the_clipped_pd_law_on_the_flat_observation():
    maze = small_maze()
    controller = WaypointController(maze, kp=10.0, kd=1.0)
    obs = np.zeros(8)
    obs[POSITION] = maze.cell_rowcol_to_xy(np.array([5, 4])) + np.array([0.0, 0.02])
    obs[GOAL] = maze.cell_rowcol_to_xy(np.array([1, 4]))
    obs[VELOCITY] = [0.5, 0.3]
    waypoint = maze.cell_rowcol_to_xy(np.array([5, 3]))
    expected = np.clip(10.0 * (waypoint - obs[POSITION]) - 1.0 * obs[VELOCITY], -1, 1)
    action = controller(obs)
    assert action.dtype == np.float32 and action.shape == (2,)
    np.testing.assert_allclose(action, expected, rtol=1e-6)
    np.testing.assert_allclose(controller(np.stack([obs, obs])), [expected, expected], rtol=1e-6)


@needs_robotics
def test_flat_observation_layout_is_flatten_observations_order():
    env = make_pointmaze_env("umaze")
    try:
        assert env.observation_space.shape == (8,)
        inner = env.env  # the Dict-observation env under FlattenObservation
        assert list(inner.observation_space.spaces) == [k for k, _ in FLAT_OBSERVATION_LAYOUT]
        dict_obs, _ = inner.reset(seed=3)
        flat = env.observation(dict_obs)
        expected = np.concatenate([dict_obs[key] for key, _ in FLAT_OBSERVATION_LAYOUT])
        np.testing.assert_array_equal(flat, expected)
        np.testing.assert_array_equal(flat[GOAL], dict_obs["desired_goal"])
        np.testing.assert_array_equal(flat[POSITION], dict_obs["observation"][:2])
        np.testing.assert_array_equal(flat[VELOCITY], dict_obs["observation"][2:])
    finally:
        env.close()


@needs_robotics
def test_made_envs_leave_no_maze_file_behind():
    with make_pointmaze_env("umaze") as env:
        path = env.unwrapped.tmp_xml_file_path
        assert not os.path.exists(path)
        env.reset(seed=0)
        env.step(env.action_space.sample())  # the model lives on without its file


@needs_robotics
def test_controller_reaches_fixed_goals_in_most_umaze_evaluation_episodes():
    with make_pointmaze_env("umaze", evaluation=True) as env:
        assert env.spec.max_episode_steps == MAZES["umaze"].eval_steps == 300
        controller = WaypointController.from_env(env)
    result = evaluate_in_pointmaze("umaze", controller, episodes=20, seed=100)
    assert result["success"].mean() >= 0.8  # measured: 100/100 episodes
    random = evaluate_in_pointmaze("umaze", None, episodes=20, seed=100)
    assert random["returns"].mean() < result["returns"].mean()


@needs_robotics
def test_collected_data_reaches_its_goals_in_most_episodes():
    episodes = collect_pointmaze_episodes("umaze", 3_000, seed=0, episode_steps=300)
    assert len(episodes) == 10
    reached = [bool((episode["rewards"] == 1.0).any()) for episode in episodes]
    assert np.mean(reached) >= 0.8  # measured: every episode reaches several goals
    for episode in episodes:
        steps = len(episode["actions"])
        assert episode["observations"].dtype == np.float32
        assert episode["observations"].shape == (steps + 1, 8)
        assert episode["actions"].dtype == np.float32 and episode["actions"].shape == (steps, 2)
        assert np.all(np.abs(episode["actions"]) <= 1.0)
        assert set(np.unique(episode["rewards"])) <= {0.0, 1.0}
        assert not episode["terminations"].any()  # continuing task
        assert episode["truncations"][-1] and not episode["truncations"][:-1].any()


@needs_robotics
def test_collection_is_deterministic_given_the_seed():
    first = collect_pointmaze_episodes("umaze", 700, seed=5, episode_steps=300)
    again = collect_pointmaze_episodes("umaze", 700, seed=5, episode_steps=300)
    other = collect_pointmaze_episodes("umaze", 700, seed=6, episode_steps=300)
    assert [len(e["actions"]) for e in first] == [300, 300, 100]
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(first[0]["observations"], other[0]["observations"])


# --------------------------------------------------------------------------------------------
# The written dataset


@needs_robotics
def test_built_dataset_has_flat_float32_observations_and_references(built_dataset):
    dataset = minari.load_dataset(TEST_DATASET_ID)
    assert dataset.total_steps == TEST_STEPS
    with make_pointmaze_env("umaze") as env:
        assert dataset.observation_space == float32_box(env.observation_space)
    assert dataset.observation_space.shape == (8,)
    assert dataset.action_space == gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    episode = next(iter(dataset.iterate_episodes([0])))
    assert episode.observations.dtype == np.float32
    assert episode.observations.shape == (len(episode.actions) + 1, 8)
    metadata = dataset.storage.metadata
    assert metadata["ref_min_score"] < metadata["ref_max_score"]
    assert metadata["algorithm_name"] == "waypoint-planner+PD"
    assert "FlattenObservation" in metadata["description"]
    assert metadata["requirements"] == [pointmaze.REQUIREMENT]


@needs_robotics
def test_environments_recreated_from_the_dataset_give_the_flat_observation(built_dataset):
    dataset = minari.load_dataset(TEST_DATASET_ID)
    for evaluation, horizon in ((False, MAZES["umaze"].collect_steps), (True, 300)):
        env = dataset.recover_environment(eval_env=evaluation)
        try:
            assert env.observation_space.shape == (8,)
            assert env.spec.max_episode_steps == horizon
            assert env.spec.kwargs["reset_target"] is (not evaluation)
            assert env.spec.kwargs["continuing_task"] is True
            obs, _ = env.reset(seed=0)
            assert obs.shape == (8,)
        finally:
            env.close()
    assert gym.make(dataset.env_spec).observation_space.shape == (8,)


@needs_robotics
def test_recreating_the_environment_needs_no_import(built_dataset, minari_root):
    """A fresh interpreter that imports only minari (neither divo nor gymnasium_robotics)."""
    code = textwrap.dedent(
        f"""
        import json, sys
        import minari
        dataset = minari.load_dataset({TEST_DATASET_ID!r})
        env = dataset.recover_environment(eval_env=True)
        obs, _ = env.reset(seed=0)
        print(json.dumps({{"shape": list(obs.shape), "divo": "divo" in sys.modules}}))
        """
    )
    env = {**os.environ, "MINARI_DATASETS_PATH": str(minari_root)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"shape": [8], "divo": False}


@needs_robotics
def test_loader_reads_the_dataset_with_its_references_and_eval_env(built_dataset):
    from divo.data.load import load_offline_data

    data = load_offline_data(TEST_DATASET_ID, download=False)
    assert data.observation_dim == 8 and data.action_dim == 2
    assert data.ref_min_score < data.ref_max_score
    assert data.eval_env_spec.max_episode_steps == 300
    with data.make_env() as env:
        assert env.observation_space.shape == (8,)


@needs_robotics
def test_evaluation_kwargs_and_references_can_be_given_as_d4rl_scores_a_maze(built_dataset):
    """`dataset.eval_env_kwargs` reach the evaluation environment (not the data's), and
    `dataset.ref_scores` replace the stored references: with continuing_task=False and [0, 1]
    a maze is scored as D4RL scores AntMaze, by the share of episodes that reach the goal.
    Kwargs the environment refuses, or references that are not two returns, are refused."""
    from divo.data.load import load_offline_data
    from divo.errors import DatasetError

    data = load_offline_data(
        TEST_DATASET_ID,
        download=False,
        eval_env_kwargs={"continuing_task": False},
        ref_scores=[0, 1],
    )
    assert (data.ref_min_score, data.ref_max_score, data.ref_source) == (0.0, 1.0, "given")
    assert data.eval_env_spec.kwargs["continuing_task"] is False
    assert data.env_spec.kwargs["continuing_task"] is True  # the data's own, as collected
    with data.make_env() as env:
        assert env.unwrapped.continuing_task is False
    with pytest.raises(DatasetError, match="cannot be made with dataset.eval_env_kwargs"):
        load_offline_data(TEST_DATASET_ID, download=False, eval_env_kwargs={"no_such": 1})
    with pytest.raises(DatasetError, match="must be two numbers"):
        load_offline_data(TEST_DATASET_ID, download=False, ref_scores=[1])


@needs_robotics
def test_building_twice_needs_overwrite_and_gives_the_same_data(built_dataset):
    with pytest.raises(DatasetError, match="already exists.*overwrite=True"):
        build_pointmaze_dataset("umaze", dataset_id=TEST_DATASET_ID, progress=False)
    before = minari.load_dataset(TEST_DATASET_ID)
    first = [e.observations for e in before.iterate_episodes()]
    refs = (before.storage.metadata["ref_min_score"], before.storage.metadata["ref_max_score"])
    build_pointmaze_dataset(
        "umaze",
        num_steps=TEST_STEPS,
        dataset_id=TEST_DATASET_ID,
        ref_episodes=TEST_REF_EPISODES,
        overwrite=True,
        progress=False,
    )
    after = minari.load_dataset(TEST_DATASET_ID)
    for a, b in zip(first, (e.observations for e in after.iterate_episodes()), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (after.storage.metadata["ref_min_score"], after.storage.metadata["ref_max_score"]) == (
        refs
    )


# --------------------------------------------------------------------------------------------
# Errors and the recipe


def test_unknown_maze_is_one_line_naming_the_mazes():
    for call in (
        lambda: build_pointmaze_dataset("large", progress=False),
        lambda: collect_pointmaze_episodes("large", 10),
        lambda: make_pointmaze_env("large"),
    ):
        with pytest.raises(DatasetError, match="unknown maze 'large'; use one of umaze, medium"):
            call()


def test_missing_gymnasium_robotics_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium_robotics", None)  # import -> ImportError
    with pytest.raises(DatasetError, match=re.escape(install_hint("maze"))) as info:
        build_pointmaze_dataset("umaze", progress=False)
    assert "\n" not in str(info.value)


def test_recipe_group_sets_the_sparse_reward_settings():
    from divo.config import compose_recipe

    cfg = compose_recipe("td3bc", ["dataset=pointmaze"])
    assert cfg.dataset.id == "divo/pointmaze/umaze-v0"
    assert (cfg.dataset.reward_scale, cfg.dataset.reward_shift) == (1.0, 0.0)
    assert cfg.dataset.download is False and cfg.dataset.action_bounds == "rescale"
    assert cfg.critic.loss.gamma == 0.995
    assert cfg.train.eval_episodes == 50
    medium = compose_recipe("divo", ["dataset=pointmaze", "dataset.id=divo/pointmaze/medium-v0"])
    assert medium.dataset.id == "divo/pointmaze/medium-v0"


def test_data_pointmaze_command_writes_the_dataset(capsys):
    from divo.cli import main

    args = ["data", "pointmaze", "umaze", "--steps", "1500", "--ref-episodes", "3",
            "--id", "clitest/pointmaze/umaze-v0", "--quiet"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert out["id"] == "clitest/pointmaze/umaze-v0" and out["steps"] == 1500
    assert out["ref_min_score"] < out["ref_max_score"]
    assert main(["data", "pointmaze", "large", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown maze 'large'" in err[0]


# --------------------------------------------------------------------------------------------
# Dict observations, as Minari's D4RL maze datasets store them


DICT_DATASET_ID = "test/dictmaze/umaze-v0"


@pytest.fixture(scope="module")
def dict_dataset(minari_root) -> str:
    """Random-action PointMaze episodes stored with the env's Dict observation space, the way
    Minari's D4RL/pointmaze and D4RL/antmaze datasets are (keys achieved_goal, desired_goal,
    observation)."""
    if importlib.util.find_spec("gymnasium_robotics") is None:
        pytest.skip("gymnasium-robotics is not installed")
    from minari.data_collector import EpisodeBuffer

    make_pointmaze_env("umaze")  # registers gymnasium-robotics' envs
    env = gym.make("PointMaze_UMaze-v3", max_episode_steps=25)
    rng = np.random.default_rng(0)
    buffers = []
    for index in range(3):
        obs, _ = env.reset(seed=index)
        observations = {key: [value] for key, value in obs.items()}
        steps = {"actions": [], "rewards": [], "terminations": [], "truncations": []}
        done = False
        while not done:
            action = rng.uniform(-1.0, 1.0, 2)
            obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in obs.items():
                observations[key].append(value)
            for name, value in zip(steps, (action, reward, terminated, truncated), strict=True):
                steps[name].append(value)
            done = terminated or truncated
        buffers.append(
            EpisodeBuffer(
                id=index,
                observations={key: np.asarray(value) for key, value in observations.items()},
                **{name: np.asarray(value) for name, value in steps.items()},
            )
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            DICT_DATASET_ID, buffers, env=env, algorithm_name="random"
        )
    env.close()
    return DICT_DATASET_ID


@needs_robotics
def test_dict_observations_are_flattened_in_the_evaluation_envs_order(dict_dataset):
    from divo.data.load import load_offline_data

    episode = next(iter(minari.load_dataset(dict_dataset).iterate_episodes()))
    first = episode.observations
    data = load_offline_data(dict_dataset)  # every key, in gymnasium's (sorted) order
    assert data.observation_dim == 8
    expected = np.concatenate(
        [first[k][0] for k in ("achieved_goal", "desired_goal", "observation")]
    )
    np.testing.assert_allclose(data.data["observation"][0].numpy(), expected, rtol=1e-6)
    # the chosen keys, in any order given, come out in the order the wrapped env flattens them
    picked = load_offline_data(dict_dataset, observation_keys=["observation", "desired_goal"])
    assert picked.observation_dim == 6
    expected = np.concatenate([first["desired_goal"][0], first["observation"][0]])
    np.testing.assert_allclose(picked.data["observation"][0].numpy(), expected, rtol=1e-6)
    raw_env = gym.make(picked.env_spec.id, max_episode_steps=25)
    for loaded in (data, picked):
        env = loaded.make_env()
        try:
            flat, _ = env.reset(seed=7)
            raw, _ = raw_env.reset(seed=7)
            keys = ["achieved_goal", "desired_goal", "observation"]
            keys = keys if loaded is data else ["desired_goal", "observation"]
            np.testing.assert_allclose(flat, np.concatenate([raw[k] for k in keys]))
            assert flat.shape == (loaded.observation_dim,)
        finally:
            env.close()
    raw_env.close()


@needs_robotics
def test_bad_observation_keys_are_one_clear_error(dict_dataset, hopper_dataset):
    from divo.data.load import load_offline_data

    with pytest.raises(DatasetError, match=r"no observation key\(s\) 'goal'.*achieved_goal"):
        load_offline_data(dict_dataset, observation_keys=["goal"])
    with pytest.raises(DatasetError, match="non-empty list"):
        load_offline_data(dict_dataset, observation_keys="observation")
    with pytest.raises(DatasetError, match="flat observations.*drop dataset.observation_keys"):
        load_offline_data(hopper_dataset, observation_keys=["observation"])


@needs_robotics
def test_train_and_evaluate_on_dict_observations_from_the_command_line(
    dict_dataset, tmp_path, capsys
):
    from divo.cli import main

    run = tmp_path / "run"
    code = main(
        [
            "train",
            "td3bc",
            "dataset=minari",
            f"dataset.id={dict_dataset}",
            "dataset.observation_keys=[observation,desired_goal]",
            "train.steps=4",
            "train.batch_size=8",
            "train.eval_every=4",
            "train.eval_episodes=1",
            "--quiet",
            f"hydra.run.dir={run}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    # the saved policy carries the flattening wrappers: evaluation needs nothing else
    assert main(["evaluate", str(run), "--episodes", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["episodes"] == 1 and np.isfinite(result["return_mean"])
