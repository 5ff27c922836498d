"""The starter datasets shipped with divo (divo/data/shipped): made by `divo data build`, copied
into the local Minari root on first use, and the recipes' default."""

from __future__ import annotations

import zlib

import minari
import numpy as np
import pytest

from divo.data.builtin import SHIPPED_ROOT, ensure_builtin, shipped_datasets
from divo.data.load import load_offline_data
from divo.data.paths import is_local, remove_local

EXPECTED = {
    "divo/hopper/medium-v0",
    "divo/hopper/medium-replay-v0",
    "divo/halfcheetah/medium-v0",
    "divo/halfcheetah/medium-replay-v0",
    "divo/walker2d/medium-replay-v0",  # design data (docs/datasets.md)
}


def test_the_starter_datasets_ship_with_the_package():
    assert EXPECTED <= set(shipped_datasets())
    # the repository stays light: ~25 MB for all of them, compressed (git stores them zlib'd)
    compressed = sum(
        len(zlib.compress(p.read_bytes(), 6)) for p in SHIPPED_ROOT.rglob("*") if p.is_file()
    )
    assert compressed < 30e6


@pytest.mark.parametrize("dataset_id", sorted(EXPECTED))
def test_a_shipped_dataset_installs_on_first_use_with_its_references(dataset_id):
    remove_local(dataset_id)
    assert ensure_builtin(dataset_id) and is_local(dataset_id)
    dataset = minari.load_dataset(dataset_id)
    meta = dataset.storage.metadata
    assert meta["ref_min_score"] < meta["ref_max_score"]
    assert "divo data build" in meta["description"]
    assert meta["divo_build"]["level"] == dataset_id.split("/")[-1].rsplit("-v", 1)[0]
    assert dataset.observation_space.dtype == np.float32
    env = dataset.recover_environment()
    assert env.spec.id in ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5")
    env.close()
    data = load_offline_data(dataset_id)
    assert data.can_evaluate and data.num_transitions == dataset.total_steps
    # the behaviour data lie between the random policy and the expert
    behavior = (
        100
        * (data.behavior_return - data.ref_min_score)
        / (data.ref_max_score - data.ref_min_score)
    )
    assert 0 < behavior < 100


@pytest.mark.parametrize("env", ["hopper", "halfcheetah"])
def test_medium_replay_was_collected_before_the_medium_snapshot(env):
    for dataset_id in (f"divo/{env}/medium-v0", f"divo/{env}/medium-replay-v0"):
        ensure_builtin(dataset_id)
    medium = minari.load_dataset(f"divo/{env}/medium-v0")
    replay = minari.load_dataset(f"divo/{env}/medium-replay-v0")
    # the same SAC run made both: the same references
    assert medium.storage.metadata["ref_max_score"] == replay.storage.metadata["ref_max_score"]
    assert replay.storage.metadata["divo_build"]["medium_step"] == replay.total_steps
    assert (
        medium.storage.metadata["divo_build"]["medium_step"]
        == replay.storage.metadata["divo_build"]["medium_step"]
    )
