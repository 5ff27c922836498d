"""Shared fixtures: a private Minari root for the whole session, and a small Hopper dataset."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import gymnasium as gym
import pytest

try:
    # divo report's rliable imports absl, whose log handler binds the sys.stderr of the moment
    # it is made: inside a test that is pytest's capture of that test, closed afterwards, and
    # a later test's Hydra logging setup flushes every handler (ValueError: I/O operation on
    # a closed file). Make it now and point it at the real stderr.
    import absl.logging

    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__
except ImportError:  # the report extra is optional
    pass

# The built-in bandit dataset holds 4,000 one-step episodes (~8 s to write through Minari);
# tests build it with this many instead (100 per mode).
TEST_BANDIT_SAMPLES = 400
HOPPER_DATASET_ID = "test/hopper/random-v0"
HOPPER_TIME_LIMIT = 50  # short, so that random-policy episodes end by truncation as well
HOPPER_TARGET_STEPS = 3_000


@pytest.fixture(scope="session", autouse=True)
def minari_root(tmp_path_factory: pytest.TempPathFactory):
    """Point MINARI_DATASETS_PATH at a temporary folder (tests never touch ~/.minari), and make
    the built-in bandit dataset small (TEST_BANDIT_SAMPLES) so that its first use is quick."""
    import divo.data.bandit

    root = tmp_path_factory.mktemp("minari")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINARI_DATASETS_PATH", str(root))
        patch.setattr(divo.data.bandit, "BANDIT_NUM_SAMPLES", TEST_BANDIT_SAMPLES)
        yield root


@pytest.fixture(scope="session", autouse=True)
def no_mujoco_log_in_the_checkout():
    """MuJoCo writes its warnings (e.g. a simulation that went unstable under the hostile-input
    tests' actions) to MUJOCO_LOG.TXT in the working directory: one the test session made is
    removed from the checkout at its end (a file that was there before is left alone)."""
    log = Path.cwd() / "MUJOCO_LOG.TXT"
    existed = log.exists()
    yield
    if not existed:
        log.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def restore_log_handlers():
    """Each `divo train` through Hydra configures logging with handlers bound to that test's
    captured streams; drop them afterwards, so that a later test's log lines never go to a
    closed stream."""
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in list(root.handlers):
        if handler not in before:
            root.removeHandler(handler)


@pytest.fixture(scope="session")
def hopper_env_spec():
    """Hopper-v5 with a 50-step time limit (an EnvSpec, as stored with the dataset)."""
    env = gym.make("Hopper-v5", max_episode_steps=HOPPER_TIME_LIMIT)
    spec = env.spec
    env.close()
    return spec


@pytest.fixture(scope="session")
def hopper_episodes(hopper_env_spec):
    from divo.data.minari_io import random_policy_episodes

    env = gym.make(hopper_env_spec)
    try:
        return random_policy_episodes(env, HOPPER_TARGET_STEPS, seed=0, flag_cut_off=False)
    finally:
        env.close()


@pytest.fixture(scope="session")
def hopper_dataset(minari_root, hopper_env_spec, hopper_episodes) -> str:
    """A ~3,000-transition random-policy Hopper-v5 Minari dataset; returns its id.

    Episodes end by termination (the hopper falls), by the 50-step time limit (truncation), and
    the last one is cut off with neither flag. No reference scores are stored, so loaders fall
    back to the D4RL Hopper references.
    """
    from divo.data.minari_io import write_minari_dataset

    write_minari_dataset(
        HOPPER_DATASET_ID,
        hopper_episodes,
        env=hopper_env_spec,
        algorithm_name="uniform-random",
        description="random-policy Hopper-v5 data for divo's tests",
    )
    return HOPPER_DATASET_ID
