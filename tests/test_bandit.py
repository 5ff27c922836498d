"""The multimodal bandit: environment, behaviour dataset, first-use creation."""

from __future__ import annotations

import gymnasium as gym
import minari
import numpy as np
import pytest

import divo.data.bandit
import divo.data.envs
from divo.data.bandit import (
    BANDIT_DATASET_ID,
    BANDIT_MODE_STD,
    MODE_CENTERS,
    MODE_PAYOFFS,
    MultimodalBanditEnv,
    bandit_episodes,
    bandit_random_return,
    bandit_reward,
    best_action,
    best_mode_index,
)
from divo.data.load import load_offline_data
from divo.data.paths import is_local, minari_root, remove_local, transitions_cache_path

SMALL = 400  # bandit samples for the builder tests


def test_registration_is_idempotent():
    divo.data.envs.register_envs()
    divo.data.envs.register_envs()
    spec = gym.spec(divo.data.envs.BANDIT_ENV_ID)
    assert spec.entry_point == "divo.data.bandit:MultimodalBanditEnv"
    env = gym.make(divo.data.envs.BANDIT_ENV_ID)
    assert isinstance(env.unwrapped, MultimodalBanditEnv)
    env.close()


def test_one_step_episodes():
    env = gym.make(divo.data.envs.BANDIT_ENV_ID)
    observation, _ = env.reset(seed=0)
    assert observation.dtype == np.float32 and observation.shape == (1,)
    assert not observation.any()
    assert env.action_space == gym.spaces.Box(-1, 1, (2,), np.float32)
    next_observation, reward, terminated, truncated, _ = env.step(best_action())
    assert terminated and not truncated
    assert reward == pytest.approx(1.0, abs=1e-6)
    assert next_observation.shape == (1,)
    env.close()


def test_reward_is_highest_at_the_best_centre():
    assert tuple(best_action()) == pytest.approx((-0.8, 0.8))
    assert best_mode_index() == int(np.argmax(MODE_PAYOFFS))
    at_centres = bandit_reward(MODE_CENTERS)
    np.testing.assert_allclose(at_centres, MODE_PAYOFFS, atol=1e-6)
    assert np.argmax(at_centres) == best_mode_index()
    rng = np.random.default_rng(0)
    elsewhere = bandit_reward(rng.uniform(-1, 1, (10_000, 2)))
    assert elsewhere.max() <= at_centres[best_mode_index()] + 1e-6
    assert ((elsewhere >= 0) & (elsewhere <= 1)).all()
    # the env computes the same reward
    env = MultimodalBanditEnv()
    env.reset(seed=0)
    for action in rng.uniform(-1, 1, (5, 2)).astype(np.float32):
        assert env.step(action)[1] == pytest.approx(float(bandit_reward(action)), rel=1e-6)


def test_behaviour_data_is_four_equal_clipped_modes():
    episodes = bandit_episodes(SMALL)
    again = bandit_episodes(SMALL)
    actions = np.concatenate([e["actions"] for e in episodes])
    np.testing.assert_array_equal(actions, np.concatenate([e["actions"] for e in again]))
    assert actions.shape == (SMALL, 2) and np.abs(actions).max() <= 1.0
    nearest = np.argmin(((actions[:, None] - MODE_CENTERS) ** 2).sum(-1), axis=1)
    assert np.bincount(nearest, minlength=4).tolist() == [SMALL // 4] * 4
    spread = actions - MODE_CENTERS[nearest]
    assert spread.std() == pytest.approx(BANDIT_MODE_STD, rel=0.2)
    for episode in episodes[:10]:
        assert episode["observations"].shape == (2, 1)
        assert episode["terminations"].tolist() == [True]
        assert episode["truncations"].tolist() == [False]
        assert episode["rewards"][0] == pytest.approx(float(bandit_reward(episode["actions"][0])))


def test_random_reference_score():
    # analytic: each bump integrates to 2 pi s^2 on the plane; the [-1,1]^2 square keeps
    # (Phi(1) - Phi(-9))^2 of it (the centre is one std from two edges); uniform density 1/4.
    analytic = 1.75 * 2 * np.pi * 0.2**2 * 0.841344746**2 / 4
    assert bandit_random_return() == pytest.approx(analytic, rel=0.01)
    assert bandit_random_return() == bandit_random_return()  # fixed seed


def test_builtin_dataset_is_created_on_first_use():
    remove_local(BANDIT_DATASET_ID)  # another test may have made it already
    assert not is_local(BANDIT_DATASET_ID)
    data = load_offline_data(BANDIT_DATASET_ID)
    assert is_local(BANDIT_DATASET_ID)
    assert BANDIT_DATASET_ID in minari.list_local_datasets()
    assert transitions_cache_path(BANDIT_DATASET_ID).is_file()  # moved in with the dataset
    assert not list(minari_root().glob(".divo-build-*"))  # no scratch left behind
    metadata = minari.load_dataset(BANDIT_DATASET_ID).storage.metadata
    assert metadata["ref_max_score"] == 1.0
    assert metadata["ref_min_score"] == pytest.approx(bandit_random_return())
    assert "Diffusion-QL" in metadata["description"]
    assert (data.ref_min_score, data.ref_max_score) == (metadata["ref_min_score"], 1.0)
    size = divo.data.bandit.BANDIT_NUM_SAMPLES  # made small by conftest's session fixture
    assert data.num_episodes == data.num_transitions == size
    assert (data.observation_dim, data.action_dim) == (1, 2)
    assert data.data["next", "terminated"].all() and not data.data["next", "truncated"].any()
    assert data.can_evaluate
    # a second use reads the stored copy
    assert load_offline_data(BANDIT_DATASET_ID).num_transitions == size


def test_the_rare_best_variant_holds_the_best_mode_in_five_percent_of_the_actions():
    from divo.data.bandit import (
        MODE_CENTERS,
        RARE_BANDIT_DATASET_ID,
        RARE_BEST_SHARE,
        best_mode_index,
        rare_best_shares,
    )

    shares = rare_best_shares()
    assert shares[best_mode_index()] == RARE_BEST_SHARE and abs(shares.sum() - 1) < 1e-12
    data = load_offline_data(RARE_BANDIT_DATASET_ID)
    actions = data.data["action"].numpy()
    nearest = ((actions[:, None, :] - MODE_CENTERS[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(MODE_CENTERS)) / len(actions)
    np.testing.assert_allclose(counts, shares, atol=1.0 / len(actions))
    assert data.ref_max_score == 1.0  # the same bandit, only the data differ
    with pytest.raises(ValueError, match="shares summing to 1"):
        from divo.data.bandit import bandit_episodes

        bandit_episodes(10, mode_shares=np.array([0.5, 0.5, 0.5, 0.0]))
