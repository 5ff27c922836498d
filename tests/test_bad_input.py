"""Bad input through the command line: one line naming the problem and the fix, exit status 2,
and nothing already on disk altered (an existing run directory is compared byte for byte)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from synthetic import hopper_like_episode, write_hopper_like

from divo.cli import main
from divo.errors import install_hint

FAST = ["--quiet", "dataset=bandit", "train.steps=4", "train.eval_every=2",
        "train.checkpoint_every=2", "train.log_every=2", "train.eval_episodes=1",
        "train.batch_size=8"]  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


EXISTING: list[Path] = []  # the module's finished run, for the cases that name it


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("existing") / "run"
    assert main(["train", "td3bc", *FAST, f"hydra.run.dir={run}"]) == 0
    EXISTING[:] = [run]
    return run


def nan_dataset(dataset_id: str = "bad/hopper/nan-v0") -> str:
    ep = hopper_like_episode(steps=6)
    ep["observations"][2, 3] = np.nan
    return write_hopper_like(dataset_id, [ep])


def wrong_size_dataset() -> str:
    return write_hopper_like("bad/hopper/size-v0", [hopper_like_episode(7, steps=6)], 7)


def inf_reward_dataset() -> str:
    ep = hopper_like_episode(steps=6)
    ep["rewards"][0] = np.inf
    return write_hopper_like("bad/hopper/inf-v0", [ep])


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
            f"dataset.id={wrong_size_dataset()}",
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
            f"dataset.id={write_hopper_like('bad/hopper/empty-v0', [])}",
        ],  # fmt: skip
        "is empty",
    ),
    "unknown logger backend": (
        lambda: ["train", "td3bc", *FAST, "logger.backend=mlflow"],
        "logger.backend='mlflow' is unknown",
    ),
    "logger backend not installed": (
        lambda: ["train", "td3bc", *FAST, "logger.backend=wandb"],
        install_hint("wandb"),
    ),
    "seed not an integer": (lambda: ["train", "td3bc", *FAST, "seed=abc"], "seed='abc' must be"),
    "negative seed": (lambda: ["train", "td3bc", *FAST, "seed=-200"], "seed=-200 must be"),
    "threads not an integer": (
        lambda: ["train", "td3bc", *FAST, "train.threads=abc"],
        "train.threads='abc'",
    ),
    "reward scale not a number": (
        lambda: ["train", "td3bc", *FAST, "dataset.reward_scale=abc"],
        "dataset.reward_scale='abc' must be a finite number",
    ),
    "normalize_observations not a boolean": (
        lambda: ["train", "td3bc", *FAST, "normalize_observations=maybe"],
        "must be true or false",
    ),
    "resume with steps not an integer": (
        lambda: ["train", str(EXISTING[0]), "train.steps=abc"],
        "train.steps='abc' must be a positive integer",
    ),
    "evaluate from a negative seed": (
        lambda: ["evaluate", str(EXISTING[0]), "--seed", "-5"],
        "seed=-5 must be an integer >= 0",
    ),
    "study setting not a list": (
        lambda: ["study", "ogbench", "--dry-run", "datasets=cube-single-play-singletask-v0"],
        "must be a list",
    ),
    "study of an unknown recipe": (
        lambda: ["study", "locomotion", "--dry-run", "recipes=[divoo]"],
        "names no recipe divoo",
    ),
    "unknown data command": (lambda: ["data", "bild"], "(did you mean build?)"),
    "report onto a file": (
        lambda: ["report", str(EXISTING[0].parent), "--out", str(EXISTING[0] / "result.json")],
        "is a file; give a folder",
    ),
    "unknown command": (lambda: ["trian", "divo"], "unknown command 'trian'"),
    "evaluate a folder with no policy": (lambda: ["evaluate", "."], "no policy.pt"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_in_one_line(case, existing_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default run dirs land here, never in the repository
    if case == "logger backend not installed" and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    before = snapshot(existing_run)
    make_args, expected = BAD[case]
    args = make_args()
    resume = args[0] == "train" and Path(args[1]).is_dir()
    if args[0] == "train" and not resume and not any(a.startswith("hydra.run.dir") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'new-run'}")
    code = main(args)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("divo: error: "), err
    assert expected in err[0]
    assert snapshot(existing_run) == before
    # a run that failed on its input leaves no half-made run directory behind
    assert not (tmp_path / "new-run").exists()


def test_cli_prints_divo_warnings_in_one_line():
    """divo's own warnings print as one ``divo: warning:`` line; others keep their location."""
    import warnings

    import gymnasium

    import divo.agents.train as train_module
    from divo.cli import _one_line_warnings

    default = warnings.formatwarning
    with _one_line_warnings():
        ours = warnings.formatwarning("data rescaled", UserWarning, train_module.__file__, 185)
        theirs = warnings.formatwarning("cast", UserWarning, gymnasium.__file__, 3)
    assert ours == "divo: warning: data rescaled\n"
    assert gymnasium.__file__ in theirs and "cast" in theirs
    assert warnings.formatwarning is default


def failing_plugin() -> list[str]:
    return ["behavior_model=custom", "behavior_model._target_=no_such_module.Model"]


REFUSED_IN_DEFAULT_DIRS = {
    "unknown dataset id": (
        ["dataset=minari", "dataset.id=mujoco/hoper/medium-v0", "dataset.download=false"],
        "not found",
    ),
    "NaN data": (
        lambda: ["dataset=minari", f"dataset.id={nan_dataset('bad/hopper/nan-folders-v0')}"],
        "non-finite",
    ),
    "plug-in that fails to build": (failing_plugin, "cannot build behavior_model"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_IN_DEFAULT_DIRS))
def test_a_refused_run_leaves_no_empty_folders(case, tmp_path, capsys, monkeypatch):
    """Without hydra.run.dir, a refused run leaves no runs/<recipe>/<dataset>/ behind; folders
    that were there before stay."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "divo").mkdir(parents=True)  # made by the user before
    overrides, expected = REFUSED_IN_DEFAULT_DIRS[case]
    overrides = overrides() if callable(overrides) else overrides
    assert main(["train", "divo", *FAST, *overrides]) == 2
    assert expected in capsys.readouterr().err
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")] == ["runs", "runs/divo"]


@pytest.mark.parametrize("text", ["train: [steps: 5\n", ""])
def test_resuming_a_run_whose_config_is_damaged_is_one_line(existing_run, text, tmp_path, capsys):
    """A config.yaml that does not parse, or holds no run, is named with the way out, not a
    YAML or OmegaConf traceback; the run's other files are left as they are."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(existing_run, run)
    (run / "config.yaml").write_text(text)
    before = snapshot(run)
    assert main(["train", str(run)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "config.yaml is damaged" in err[0], err
    assert snapshot(run) == before
