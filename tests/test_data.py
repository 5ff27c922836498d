"""agents/data.py and divo/datasets.py: Minari -> TED TensorDict, checks, statistics."""

from __future__ import annotations

import functools
import json
import warnings

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from minari.data_collector import EpisodeBuffer
from synthetic import hopper_like_episode, write_hopper_like
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

from divo.data.batches import OBS_STD_EPS, check_batch_keys
from divo.data.checks import D4RL_REFERENCE_SCORES
from divo.data.load import load_offline_data
from divo.data.minari_io import write_minari_dataset
from divo.data.paths import transitions_cache_path
from divo.data.transitions import read_transitions
from divo.errors import DatasetError


@pytest.fixture(scope="module")
def hopper_data(hopper_dataset):
    return load_offline_data(hopper_dataset)


def test_ted_keys_shapes_dtypes(hopper_data, hopper_episodes):
    data = hopper_data.data
    n = sum(len(e["actions"]) for e in hopper_episodes)
    assert hopper_data.num_transitions == n == data.batch_size[0]
    assert hopper_data.num_episodes == len(hopper_episodes)
    assert (hopper_data.observation_dim, hopper_data.action_dim) == (11, 3)
    expected = {
        "observation": ((n, 11), torch.float32),
        "action": ((n, 3), torch.float32),
        ("next", "observation"): ((n, 11), torch.float32),
        ("next", "reward"): ((n, 1), torch.float32),
        ("next", "terminated"): ((n, 1), torch.bool),
        ("next", "truncated"): ((n, 1), torch.bool),
        ("next", "done"): ((n, 1), torch.bool),
    }
    for key, (shape, dtype) in expected.items():
        assert data[key].shape == shape, key
        assert data[key].dtype == dtype, key
    done = data["next", "terminated"] | data["next", "truncated"]
    assert torch.equal(data["next", "done"], done)
    check_batch_keys(data)


def test_truncation_keeps_the_real_next_state(hopper_data, hopper_episodes):
    data = hopper_data.data
    truncated = data["next", "truncated"].squeeze(-1)
    terminated = data["next", "terminated"].squeeze(-1)
    assert truncated.any() and terminated.any()
    assert not (truncated & terminated).any()
    # Every truncated transition is an episode's last step; its next observation is the stored
    # observation T (the state after the step), not a zeroed placeholder.
    ends = np.cumsum([len(e["actions"]) for e in hopper_episodes]) - 1
    checked = 0
    for episode, end in zip(hopper_episodes, ends, strict=True):
        if truncated[end]:
            expected = torch.from_numpy(episode["observations"][-1])
            assert torch.equal(data["next", "observation"][end], expected)
            assert data["next", "observation"][end].abs().sum() > 0
            checked += 1
    assert checked >= 2
    # Next observations are the following stored observations inside an episode too.
    first = hopper_episodes[0]
    steps = len(first["actions"])
    assert torch.equal(
        data["next", "observation"][:steps], torch.from_numpy(first["observations"][1:])
    )
    assert torch.equal(data["observation"][:steps], torch.from_numpy(first["observations"][:-1]))


def test_cut_off_last_step_is_marked_truncated(hopper_data, hopper_episodes):
    last = hopper_episodes[-1]
    assert not last["terminations"][-1] and not last["truncations"][-1]  # cut by the collector
    assert hopper_data.data["next", "truncated"][-1].item()
    assert not hopper_data.data["next", "terminated"][-1].item()


def test_time_limit_truncations_are_not_terminal(hopper_data, hopper_episodes):
    ends = np.cumsum([len(e["actions"]) for e in hopper_episodes]) - 1
    truncated = hopper_data.data["next", "truncated"].squeeze(-1).numpy()
    terminated = hopper_data.data["next", "terminated"].squeeze(-1).numpy()
    time_limited = [
        end
        for e, end in zip(hopper_episodes, ends, strict=True)
        if e["truncations"][-1] and not e["terminations"][-1]
    ]
    assert time_limited, "the fixture must contain time-limit truncations"
    assert truncated[time_limited].all() and not terminated[time_limited].any()
    # + the cut-off last episode; nothing else is truncated
    assert truncated.sum() == len(time_limited) + 1
    # A step flagged both (the hopper fell exactly at the time limit) is terminal: no bootstrap.
    both = [
        end
        for e, end in zip(hopper_episodes, ends, strict=True)
        if e["truncations"][-1] and e["terminations"][-1]
    ]
    assert terminated[both].all() and not truncated[both].any()


def test_reward_transform(hopper_dataset, hopper_data):
    shifted = load_offline_data(hopper_dataset, reward_scale=2.0, reward_shift=-1.0)
    expected = 2.0 * hopper_data.data["next", "reward"] - 1.0
    torch.testing.assert_close(shifted.data["next", "reward"], expected)


def test_return_range_rescales_rewards_like_iql(hopper_dataset, hopper_data, hopper_episodes):
    """IQL's locomotion normalisation: r x 1000 / (max - min episode return), by hand."""
    returns = np.array([e["rewards"].astype(np.float64).sum() for e in hopper_episodes])
    factor = 1000.0 / (returns.max() - returns.min())
    raw = hopper_data.data["next", "reward"]
    for setting in (1000.0, "locomotion"):  # the fixture's data come from Hopper-v5
        scaled = load_offline_data(hopper_dataset, return_range=setting, reward_shift=-1.0)
        torch.testing.assert_close(scaled.data["next", "reward"], (factor * raw - 1.0).float())
        assert scaled.behavior_return == pytest.approx(hopper_data.behavior_return)  # as stored
        assert scaled.reward_factor == pytest.approx(factor) and hopper_data.reward_factor == 1.0
    with pytest.raises(DatasetError, match="return_range='iql' is unknown"):
        load_offline_data(hopper_dataset, return_range="iql")


def test_return_range_locomotion_leaves_other_data_alone():
    """'locomotion' is IQL's rule: only HalfCheetah, Hopper and Walker2d data are rescaled."""
    bandit = load_offline_data("divo/bandit/multimodal-v0")
    same = load_offline_data("divo/bandit/multimodal-v0", return_range="locomotion")
    torch.testing.assert_close(same.data["next", "reward"], bandit.data["next", "reward"])
    assert same.reward_factor == 1.0


def test_normalisation_statistics(hopper_data, hopper_episodes):
    obs = np.concatenate([e["observations"][:-1] for e in hopper_episodes]).astype(np.float64)
    assert hopper_data.obs_mean.dtype == torch.float32 and hopper_data.obs_mean.shape == (11,)
    np.testing.assert_allclose(hopper_data.obs_mean.numpy(), obs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        hopper_data.obs_std.numpy(), obs.std(0) + OBS_STD_EPS, rtol=1e-5, atol=1e-6
    )


def test_reference_scores_fall_back_to_d4rl_and_say_so(hopper_dataset):
    """A dataset storing no references is scored against D4RL's for its environment's name,
    which were measured on other data and another environment version: the loader warns, and
    the source travels with the data (result.json ``ref_source``)."""
    with pytest.warns(UserWarning, match="stores no reference returns: .* D4RL Hopper-v2's"):
        data = load_offline_data(hopper_dataset)
    assert (data.ref_min_score, data.ref_max_score) == D4RL_REFERENCE_SCORES["Hopper"]
    assert data.ref_source == "D4RL Hopper-v2"


def test_minari_datasets_with_known_reference_caveats_are_named():
    """Minari's AntMaze references are a continuing task's (not D4RL's success rate) and its
    pen references were measured in 100-step episodes: a run on them is told."""
    from divo.data.checks import reference_warnings

    stored = (0.0, 1.0, "dataset")
    (antmaze,) = reference_warnings("D4RL/antmaze/large-play-v1", stored, None)
    assert "continuing task" in antmaze and "do not set the two side by side" in antmaze
    (pen,) = reference_warnings("D4RL/pen/cloned-v2", stored, None)
    assert "100-step episodes" in pen and "#303" in pen
    assert reference_warnings("mujoco/hopper/medium-v0", stored, None) == []


def test_replay_buffer_samples_ted_batches(hopper_data):
    buffer = hopper_data.replay_buffer(batch_size=32)
    assert len(buffer) == hopper_data.num_transitions
    batch = buffer.sample()
    assert batch.batch_size == (32,)
    check_batch_keys(batch)
    assert batch["next", "reward"].shape == (32, 1)
    assert "index" not in hopper_data.data.keys()  # the loaded data is not modified
    assert hopper_data.replay_buffer().sample().batch_size == (256,)


def test_make_env_matches_dataset(hopper_data):
    env = hopper_data.make_env()
    try:
        assert env.observation_space.shape == (hopper_data.observation_dim,)
        assert env.spec.max_episode_steps == 50
    finally:
        env.close()


def test_cache_equals_minari_read(hopper_dataset):
    dataset = minari.load_dataset(hopper_dataset)
    assert transitions_cache_path(hopper_dataset).is_file()  # primed by write_minari_dataset
    cached = read_transitions(dataset)
    fresh = read_transitions(dataset, use_cache=False)
    assert cached.keys() == fresh.keys()
    for key in fresh:
        np.testing.assert_array_equal(cached[key], fresh[key], err_msg=key)
        assert cached[key].dtype == fresh[key].dtype, key


def test_stale_cache_is_rebuilt():
    dataset_id = write_hopper_like("test/cache/stale-v0", [hopper_like_episode()])
    dataset = minari.load_dataset(dataset_id)
    assert len(read_transitions(dataset)["reward"]) == 5
    extra = hopper_like_episode(steps=3, seed=1)
    dataset.update_dataset_from_buffer(
        [
            EpisodeBuffer(
                observations=extra["observations"],
                actions=extra["actions"],
                rewards=extra["rewards"],
                terminations=extra["terminations"],
                truncations=extra["truncations"],
            )
        ]
    )
    again = read_transitions(minari.load_dataset(dataset_id))
    assert len(again["reward"]) == 8
    np.testing.assert_array_equal(again["reward"][5:], extra["rewards"])


def test_check_batch_keys_names_missing_keys():
    td = TensorDict({"observation": torch.zeros(4, 3), "action": torch.zeros(4, 2)}, [4])
    with pytest.raises(DatasetError) as info:
        check_batch_keys(td)
    message = str(info.value)
    assert "next/observation" in message and "next/reward" in message
    assert "next/terminated" in message and "\n" not in message


def test_mistyped_id_lists_available_ids(hopper_dataset):
    with pytest.raises(DatasetError) as info:
        load_offline_data("test/hopper/randon-v0")
    message = str(info.value)
    assert "test/hopper/randon-v0" in message
    assert hopper_dataset in message  # listed, and suggested as a close match
    assert "Did you mean" in message and "MINARI_DATASETS_PATH" in message
    assert "\n" not in message
    with pytest.raises(DatasetError, match="malformed"):
        load_offline_data("hopper", download=False)


def test_built_in_data_load_on_a_machine_without_a_minari_root(tmp_path, monkeypatch):
    """A fresh install has no ~/.minari/datasets: the built-ins (the README's first command)
    must create it when they publish, now that a lookup no longer does."""
    root = tmp_path / "fresh" / "datasets"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    assert load_offline_data("divo/bandit/multimodal-v0").num_transitions > 0
    assert load_offline_data("divo/hopper/medium-v0").num_transitions == 100_000
    assert (root / "divo" / "bandit").is_dir()


@pytest.mark.parametrize("download", [False, True])
def test_refused_lookup_creates_no_minari_root(tmp_path, monkeypatch, download):
    """A refusal changes nothing on disk: Minari's own path helper creates the local root, so a
    lookup of a missing id used to leave MINARI_DATASETS_PATH's folder behind (and a failed
    download its parents)."""
    root = tmp_path / "a" / "b"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))

    def no_network(dataset_id, download=False):
        from minari.storage.datasets_root_dir import get_dataset_path

        get_dataset_path(dataset_id)  # creates the root, as Minari's download does first
        raise ConnectionError("no network")

    monkeypatch.setattr(minari, "load_dataset", no_network)
    with pytest.raises(DatasetError, match="not found"):
        load_offline_data("someone/hopper/expert-v0", download=download)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "stored, match",
    [
        ((-150.0, -1500.0), "expert's reference return must be above"),  # reversed
        ((-100.0, -100.0), "expert's reference return must be above"),  # equal: was a traceback
        ((None, 3000.0), "stores ref_max_score but not ref_min_score"),  # was dropped silently
    ],
)
def test_stored_references_that_cannot_score_are_refused(stored, match):
    """Reversed references scored an improving policy lower (return -1375 -> -1133, score 90.8
    -> 72.8); equal ones ended in a traceback; half a pair was ignored without a word. Each is
    refused at load, naming the fix; given references replace them."""
    low, high = stored
    name = f"test/hopper/refs{abs(hash(stored)) % 10**6}-v0"
    box = gym.spaces.Box(-np.inf, np.inf, (11,), np.float32)
    episodes = [hopper_like_episode(11)]
    with pytest.raises(DatasetError, match="ref_"):  # divo's writer refuses them up front
        write_minari_dataset(name, episodes, env="Hopper-v5", observation_space=box,
                             ref_min_score=low, ref_max_score=high)  # fmt: skip
    dataset = write_minari_dataset(name, episodes, env="Hopper-v5", observation_space=box)
    dataset.storage.update_metadata(  # as another writer may store them
        {k: v for k, v in (("ref_min_score", low), ("ref_max_score", high)) if v is not None}
    )
    with pytest.raises(DatasetError, match=match) as info:
        load_offline_data(name)
    assert "dataset.ref_scores=[random, expert]" in str(info.value)
    data = load_offline_data(name, ref_scores=[-1500, -150])
    assert (data.ref_min_score, data.ref_max_score, data.ref_source) == (-1500, -150, "given")
    with pytest.raises(DatasetError, match="must be above"):
        load_offline_data(name, ref_scores=[-150, -1500])


def test_nested_dict_observations_have_the_evaluation_environments_layout():
    """A nested Dict declared out of key order (z before a): the data were flattened by sorted
    key, FlattenObservation in the evaluation environment follows the declared order, so the
    policy was evaluated on permuted features with no check firing (the sizes agree)."""
    from minari.data_collector import EpisodeBuffer
    from synthetic import register_nested_dict

    env_id = register_nested_dict()
    env = gym.make(env_id)
    buffers = []
    for index in range(2):
        obs, _ = env.reset(seed=index)
        steps = [obs]
        for _ in range(3):
            obs, *_ = env.step(env.action_space.sample())
            steps.append(obs)
        observations = {
            "goal": np.stack([o["goal"] for o in steps]),
            "state": {k: np.stack([o["state"][k] for o in steps]) for k in ("z", "a")},
        }
        buffers.append(EpisodeBuffer(id=index, observations=observations,
                                     actions=np.zeros((3, 1), np.float32), rewards=np.zeros(3),
                                     terminations=np.zeros(3, bool),
                                     truncations=np.array([False, False, True])))  # fmt: skip
    minari.create_dataset_from_buffers("test/nested/dict-v0", buffers, env=env_id,
                                       algorithm_name="random")  # fmt: skip
    data = load_offline_data("test/nested/dict-v0")
    with data.make_env() as eval_env:
        first, _ = eval_env.reset(seed=0)
    np.testing.assert_array_equal(data.data["observation"][0].numpy(), first)
    np.testing.assert_array_equal(first, [-5.0, -6.0, 100.0, 1.0, 2.0])  # goal, z, a


def test_observation_size_mismatch_is_refused():
    dataset_id = write_hopper_like("test/hopper/wrong-size-v0", [hopper_like_episode(7)], 7)
    with pytest.raises(DatasetError, match=r"observations of size 7 .*Hopper-v5"):
        load_offline_data(dataset_id)


def test_non_finite_values_are_refused():
    episode = hopper_like_episode(steps=6)
    episode["observations"][2, 3] = np.nan
    episode["observations"][4, 0] = np.inf
    episode["rewards"][1] = np.nan
    dataset_id = write_hopper_like("test/hopper/nan-v0", [episode])
    with pytest.raises(DatasetError) as info:
        load_offline_data(dataset_id)
    message = str(info.value)
    assert "2 in observations" in message and "1 in rewards" in message
    assert "actions" not in message and "clean" in message


def test_empty_dataset_is_refused():
    dataset_id = write_hopper_like("test/hopper/empty-v0", [])
    with pytest.raises(DatasetError, match="empty"):
        load_offline_data(dataset_id)


def test_actions_outside_bounds_are_clipped_with_a_warning():
    episode = hopper_like_episode(steps=4)
    episode["actions"][0] = [1.5, 0.0, -2.0]
    episode["actions"][2, 1] = 1.2
    dataset_id = write_hopper_like("test/hopper/wide-actions-v0", [episode])
    with pytest.warns(UserWarning, match=r"2 of 4 actions \(3 entries\) lie outside"):
        data = load_offline_data(dataset_id)
    assert data.data["action"].abs().max() <= 1.0
    assert data.data["action"][0].tolist() == [1.0, 0.0, -1.0]
    with pytest.raises(DatasetError, match="2 of 4 actions lie outside the action space"):
        load_offline_data(dataset_id, action_bounds="refuse")


def _pendulum_dataset(dataset_id: str) -> str:
    """Pendulum-v1 acts in [-2, 2]: a dataset of its own actions, stored as they are."""
    env = gym.make("Pendulum-v1", max_episode_steps=20)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    observations, actions, rewards = [obs], [], []
    for _ in range(20):
        action = rng.uniform(-2, 2, size=(1,)).astype(np.float32)
        obs, reward, *_ = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward)
    episode = {
        "observations": np.asarray(observations, np.float32),
        "actions": np.asarray(actions, np.float32),
        "rewards": np.asarray(rewards),
        "terminations": np.zeros(20, bool),
        "truncations": np.eye(20, dtype=bool)[-1],
    }
    write_minari_dataset(dataset_id, [episode], env=env.spec)
    return dataset_id


def test_action_space_other_than_unit_box_is_rescaled_or_refused():
    dataset_id = _pendulum_dataset("test/pendulum/wide-v0")
    with pytest.raises(DatasetError, match=r"bounded by \[-2.0, 2.0\].*action_bounds=rescale"):
        load_offline_data(dataset_id, action_bounds="refuse")
    with pytest.warns(UserWarning, match="rescaled linearly onto"):
        data = load_offline_data(dataset_id)
    raw = read_transitions(minari.load_dataset(dataset_id))["action"]
    torch.testing.assert_close(data.data["action"], torch.as_tensor(raw) / 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # RescaleAction's float64-bounds cast warning is dropped
        env = data.make_env()
    try:
        assert env.action_space.low.tolist() == [-1.0] and env.action_space.high.tolist() == [1.0]
        # the wrapper survives the JSON round trip that saved policies use
        again = gym.make(gym.envs.registration.EnvSpec.from_json(data.eval_env_spec.to_json()))
        assert again.action_space.high.tolist() == [1.0]
        again.close()
    finally:
        env.close()


def test_actions_declared_in_other_units_than_the_environments_are_refused():
    """Pendulum's actions normalised to [-1, 1] before writing, with Pendulum as the
    environment: a policy trained on them would use half the torque where it is evaluated. The
    declared bounds are checked against the environment's, so this stops in one line."""
    env = gym.make("Pendulum-v1", max_episode_steps=20)
    obs, _ = env.reset(seed=0)
    episode = {
        "observations": np.asarray([obs] * 21, np.float32),
        "actions": np.zeros((20, 1), np.float32),
        "rewards": np.zeros(20),
        "terminations": np.zeros(20, bool),
        "truncations": np.eye(20, dtype=bool)[-1],
    }
    unit = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    write_minari_dataset("test/pendulum/unit-v0", [episode], env=env.spec, action_space=unit)
    with pytest.raises(DatasetError, match=r"declares actions in \[-1, 1\] but its environment "
                       r"Pendulum-v1 acts in \[-2, 2\]"):  # fmt: skip
        load_offline_data("test/pendulum/unit-v0")


def test_degenerate_bounds_bad_shapes_and_unflagged_ends_are_said():
    """An action dimension with low == high is refused (its rescale was 0/0: NaN actions); an
    episode's actions or rewards of the wrong shape are refused before anything is written (a
    corrected retry is not blocked by a half-written dataset); many episodes ending with neither
    flag are read as truncated, with a warning."""
    from divo.data.paths import is_local

    episode = hopper_like_episode(steps=4)
    flat = dict(episode, actions=episode["actions"][:, 0])
    with pytest.raises(DatasetError, match=r"actions of shape \(4,\); write \[T, 3\]"):
        write_hopper_like("test/shapes/flat-v0", [flat])
    assert not is_local("test/shapes/flat-v0")
    write_hopper_like("test/shapes/flat-v0", [episode])  # the corrected retry goes through

    box = gym.spaces.Box(np.array([-1, 0, -1], np.float32), np.array([1, 0, 1], np.float32))
    write_minari_dataset(
        "test/shapes/degenerate-v0",
        [hopper_like_episode(steps=4)],
        env=None,
        observation_space=gym.spaces.Box(-np.inf, np.inf, (11,), np.float32),
        action_space=box,
    )
    with pytest.raises(DatasetError, match=r"upper bound is not above its lower one in "
                       r"dimension\(s\) \[1\]"):  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no environment: no evaluation
            load_offline_data("test/shapes/degenerate-v0")

    open_ends = []
    for seed in range(5):
        e = hopper_like_episode(steps=3, seed=seed)
        e["terminations"] = np.zeros(3, bool)
        open_ends.append(e)
    write_hopper_like("test/shapes/open-v0", open_ends)
    with pytest.warns(UserWarning, match="5 of 5 episodes end with neither termination nor"):
        data = load_offline_data("test/shapes/open-v0")
    assert bool(data.data["next", "truncated"][[2, 5, 8, 11, 14]].all())


def test_non_box_space_is_refused():
    episode = hopper_like_episode(steps=3)
    episode["actions"] = np.array([0, 1, 2])
    buffer = EpisodeBuffer(
        observations=episode["observations"],
        actions=episode["actions"],
        rewards=episode["rewards"],
        terminations=episode["terminations"],
        truncations=episode["truncations"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            "test/discrete/actions-v0",
            [buffer],
            observation_space=gym.spaces.Box(-np.inf, np.inf, (11,), np.float32),
            action_space=gym.spaces.Discrete(3),
        )
    with pytest.raises(DatasetError, match="action space Discrete.*not support"):
        load_offline_data("test/discrete/actions-v0")


def test_unmakeable_environment_warns_and_disables_evaluation():
    dataset_id = write_hopper_like("test/hopper/lost-env-v0", [hopper_like_episode()])
    metadata_path = minari.load_dataset(dataset_id).storage.data_path / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    spec = json.loads(metadata["env_spec"])
    spec["id"], spec["entry_point"] = "Gone-v0", "no_such_module_divo:GoneEnv"
    metadata["env_spec"] = json.dumps(spec)
    metadata_path.write_text(json.dumps(metadata))
    with pytest.warns(UserWarning, match="cannot be made"):
        data = load_offline_data(dataset_id)
    assert data.env_spec is None and not data.can_evaluate
    assert data.num_transitions == 5
    with pytest.raises(DatasetError, match="evaluat"):
        data.make_env()


def test_nested_dict_observations_flatten_as_gymnasium_flattens_them():
    """Dict observations (nested, as Minari's Kitchen goals) become the columns gymnasium's
    FilterObservation + FlattenObservation give, step for step."""
    from divo.data.transitions import flatten_observations, observation_key_order

    box = functools.partial(gym.spaces.Box, -1.0, 1.0, dtype=np.float32)
    space = gym.spaces.Dict(
        {"observation": box((3,)), "goal": gym.spaces.Dict({"z": box((1,)), "b": box((2, 2))})}
    )
    space.seed(0)
    samples = [space.sample() for _ in range(4)]
    stacked = {
        "observation": np.stack([o["observation"] for o in samples]),
        "goal": {k: np.stack([o["goal"][k] for o in samples]) for k in ("z", "b")},
    }
    keys = observation_key_order(space)
    assert keys == ["goal", "observation"]
    expected = np.stack([gym.spaces.flatten(space, o) for o in samples])
    np.testing.assert_array_equal(flatten_observations(stacked, keys), expected)
    assert expected.shape == (4, 8)


def _buffer_of(td) -> TensorDictReplayBuffer:
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(len(td)), batch_size=8)
    rb.extend(td)
    return rb


def test_a_users_buffer_is_checked_against_the_datasets_action_space(tmp_path, monkeypatch):
    """A buffer of Pendulum's raw actions ([-2, 2]) trains on the [-1, 1] the policy acts in
    (rescaled, said in a warning), as the loader's own copy does; actions outside the space are
    refused; refuse policy refuses the raw units."""
    from divo.agents.train import train
    from divo.config import compose_recipe

    dataset_id = _pendulum_dataset("test/pendulum/buffer-v0")
    with pytest.warns(UserWarning, match="rescaled linearly"):
        data = load_offline_data(dataset_id)
    raw = data.data.clone()
    raw["action"] = raw["action"] * 2.0  # the dataset's own units, as a user's buffer holds them
    short = ["dataset=minari", f"dataset.id={dataset_id}", "train.steps=2", "train.eval_every=2",
             "train.log_every=1", "train.eval_episodes=1", "train.batch_size=8"]  # fmt: skip
    seen = []
    import divo.agents.agent as agent_module

    original = agent_module.OfflineAgent.update

    def spy(self, batch, *args, **kwargs):
        seen.append(batch["action"].abs().max().item())
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(agent_module.OfflineAgent, "update", spy)
    with pytest.warns(UserWarning, match=r"units of dataset .* rescaled linearly onto \[-1, 1\]"):
        train(compose_recipe("td3bc", short), tmp_path / "raw", replay_buffer=_buffer_of(raw))
    assert seen and max(seen) <= 1.0  # the agent saw unit actions, never raw ones
    # the loader's (already rescaled) copy is used as it is, with a note
    with pytest.warns(UserWarning, match="taken as already rescaled"):
        train(
            compose_recipe("td3bc", short), tmp_path / "unit", replay_buffer=_buffer_of(data.data)
        )
    far = data.data.clone()
    far["action"] = far["action"] * 5.0
    with pytest.raises(DatasetError, match="outside both \\[-1, 1\\] and dataset"):
        train(compose_recipe("td3bc", short), tmp_path / "far", replay_buffer=_buffer_of(far))
    assert not (tmp_path / "far").exists()
    refuse = compose_recipe("td3bc", [*short, "dataset.action_bounds=refuse"])
    with pytest.raises(DatasetError):
        train(refuse, tmp_path / "refused", replay_buffer=_buffer_of(raw))


def test_a_dataset_is_published_whole_or_not_at_all():
    """`divo data build` and `pointmaze` write through publish_dataset: the dataset appears only
    once written with its metadata (reference scores, build record). A write that fails half-way
    (here after the episodes, before the metadata) leaves no dataset that would load as whole
    with another dataset's references."""
    from divo.data.paths import is_local, publish_dataset

    name = "test/published/whole-v0"

    def interrupted():
        write_hopper_like(name, [hopper_like_episode(steps=8)])
        raise KeyboardInterrupt  # before its metadata is written

    with pytest.raises(KeyboardInterrupt):
        publish_dataset(name, interrupted)
    assert not is_local(name)

    def whole():
        write_hopper_like(name, [hopper_like_episode(steps=8)])
        refs = {"ref_min_score": -1.0, "ref_max_score": 9.0}
        minari.load_dataset(name).storage.update_metadata(refs)

    publish_dataset(name, whole)
    assert is_local(name) and minari.load_dataset(name).storage.metadata["ref_min_score"] == -1.0
    data = load_offline_data(name)  # its own references, not D4RL's Hopper ones
    assert (data.ref_min_score, data.ref_max_score) == (-1.0, 9.0)

    # an overwrite replaces the old dataset only once the new one is whole
    with pytest.raises(KeyboardInterrupt):
        publish_dataset(name, interrupted, replace=True)
    assert minari.load_dataset(name).storage.metadata["ref_min_score"] == -1.0  # still there

    def other():
        write_hopper_like(name, [hopper_like_episode(steps=5)])
        minari.load_dataset(name).storage.update_metadata(
            {"ref_min_score": -2.0, "ref_max_score": 7.0}
        )

    publish_dataset(name, other, replace=True)
    assert minari.load_dataset(name).storage.metadata["ref_min_score"] == -2.0
    assert minari.load_dataset(name).total_steps == 5
