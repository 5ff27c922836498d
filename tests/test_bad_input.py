"""Bad input through the command line: one line naming the problem and the fix, exit status 2,
and nothing already on disk altered (an existing run directory is compared byte for byte)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from divo.cli import main
from divo.datasets import write_minari_dataset

FAST = ["--quiet", "train.steps=4", "train.eval_every=2", "train.checkpoint_every=2",
        "train.log_every=2", "train.eval_episodes=1", "train.batch_size=8"]  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("existing") / "run"
    assert main(["train", "td3bc", *FAST, f"hydra.run.dir={run}"]) == 0
    return run


def episode(obs_dim: int = 11, steps: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "observations": rng.standard_normal((steps + 1, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
        "rewards": rng.standard_normal(steps),
        "terminations": np.eye(steps, dtype=bool)[-1],
        "truncations": np.zeros(steps, dtype=bool),
    }


def write(dataset_id: str, episodes: list[dict], obs_dim: int = 11) -> str:
    box = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
    write_minari_dataset(dataset_id, episodes, env="Hopper-v5", observation_space=box)
    return dataset_id


def nan_dataset() -> str:
    ep = episode()
    ep["observations"][2, 3] = np.nan
    return write("bad/hopper/nan-v0", [ep])


def inf_reward_dataset() -> str:
    ep = episode()
    ep["rewards"][0] = np.inf
    return write("bad/hopper/inf-v0", [ep])


BAD = {
    "unknown recipe": (lambda: ["train", "divoo"], "unknown recipe 'divoo'"),
    "unknown override key": (lambda: ["train", "divo", "train.stepz=3"], "train.stepz=3"),
    "zero steps": (lambda: ["train", "td3bc", *FAST, "train.steps=0"], "train.steps=0"),
    "negative steps": (lambda: ["train", "td3bc", *FAST, "train.steps=-5"], "train.steps=-5"),
    "missing dataset id": (lambda: ["train", "td3bc", "dataset=minari"], "dataset.id"),
    "mistyped dataset id": (
        lambda: [
            "train",
            "td3bc",
            *FAST,
            "dataset=minari",
            "dataset.id=mujoco/hoper/medium-v0",
            "dataset.download=false",
        ],  # fmt: skip
        "mujoco/hoper/medium-v0' not found",
    ),
    "observation size mismatch": (
        lambda: [
            "train",
            "td3bc",
            *FAST,
            "dataset=minari",
            f"dataset.id={write('bad/hopper/size-v0', [episode(7)], 7)}",
        ],  # fmt: skip
        "observations of size 7",
    ),
    "NaN in observations": (
        lambda: ["train", "td3bc", *FAST, "dataset=minari", f"dataset.id={nan_dataset()}"],
        "non-finite values (NaN/inf): 1 in observations",
    ),
    "inf in rewards": (
        lambda: ["train", "td3bc", *FAST, "dataset=minari", f"dataset.id={inf_reward_dataset()}"],
        "1 in rewards",
    ),
    "empty dataset": (
        lambda: [
            "train",
            "td3bc",
            *FAST,
            "dataset=minari",
            f"dataset.id={write('bad/hopper/empty-v0', [])}",
        ],  # fmt: skip
        "is empty",
    ),
    "unknown command": (lambda: ["trian", "divo"], "unknown command 'trian'"),
    "evaluate a folder with no policy": (lambda: ["evaluate", "."], "no policy.pt"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_in_one_line(case, existing_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default run dirs land here, never in the repository
    before = snapshot(existing_run)
    make_args, expected = BAD[case]
    args = make_args()
    if args[0] == "train" and not any(a.startswith("hydra.run.dir") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'new-run'}")
    code = main(args)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("divo: error: "), err
    assert expected in err[0]
    assert snapshot(existing_run) == before
    # a run that failed on its input leaves no half-made run directory behind
    assert not (tmp_path / "new-run").exists()
