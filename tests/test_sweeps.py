"""A sweep trains every value it names, each job in a folder of its own; no route into an
existing run folder (a sweep's subdir, ``hydra.run.dir``, the Python API) resumes a run of other
settings as if it were this one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_launchers import skip_without
from test_resume import snapshot

from divo.agents.train import train
from divo.cli import is_swept, main
from divo.config import compose_recipe
from divo.errors import ConfigError

TINY = [
    "--quiet",
    "dataset=bandit",
    "train.steps=4",
    "train.eval_every=4",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.eval_episodes=1",
]


def test_which_override_values_sweep():
    assert is_swept("2.5,7.5") and is_swept("range(0,3)") and is_swept("choice(a,b)")
    assert is_swept("ddpm,cvae")
    assert not is_swept("2.5") and not is_swept("[1,2]") and not is_swept("'a,b'")
    assert not is_swept("{a: 1, b: 2}")


def _actor_weights(run: Path) -> torch.Tensor:
    payload = torch.load(run / "policy.pt", weights_only=True)
    state = payload.get("state_dict") or payload["payload"]["state_dict"]
    return torch.cat([v.flatten() for k, v in sorted(state.items()) if v.is_floating_point()])


def _sweep_runs(sweep: Path) -> dict[str, Path]:
    return {
        p.parent.relative_to(sweep).as_posix(): p.parent for p in sorted(sweep.rglob("result.json"))
    }


def _check_two_alpha_runs(sweep: Path) -> None:
    runs = _sweep_runs(sweep)
    base = "td3bc/divo-bandit-multimodal-v0/seed0"
    assert sorted(runs) == [f"{base}/actor.loss.alpha=2.5", f"{base}/actor.loss.alpha=7.5"]
    for name, run in runs.items():
        alpha = float(name.rsplit("=", 1)[1])
        assert OmegaConf.load(run / "config.yaml").actor.loss.alpha == alpha
    low, high = (_actor_weights(runs[k]) for k in sorted(runs))
    assert not torch.equal(low, high)  # two models were trained, not one twice


def test_a_sweep_over_a_hyperparameter_trains_every_value(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    code = main(
        ["train", "td3bc", "-m", "actor.loss.alpha=2.5,7.5", *TINY, f"hydra.sweep.dir={sweep}"]
    )
    assert code == 0, capsys.readouterr().err
    _check_two_alpha_runs(sweep)


@pytest.mark.slow
@skip_without("local")
def test_a_joblib_sweep_over_a_hyperparameter_trains_every_value(tmp_path, capsys):
    from divo.data.builtin import ensure_builtin

    ensure_builtin("divo/bandit/multimodal-v0")  # the session's small bandit, for the workers
    sweep = tmp_path / "sweep"
    args = ["train", "td3bc", "-m", "actor.loss.alpha=2.5,7.5", "hydra/launcher=local",
            "hydra.launcher.n_jobs=2", *TINY, f"hydra.sweep.dir={sweep}"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    _check_two_alpha_runs(sweep)


def test_a_seed_sweep_keeps_its_folders(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert main(["train", "td3bc", "-m", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}"]) == 0
    assert sorted(_sweep_runs(sweep)) == [
        "td3bc/divo-bandit-multimodal-v0/seed0",
        "td3bc/divo-bandit-multimodal-v0/seed1",
    ]


def test_run_dir_at_a_finished_run_with_another_hyperparameter_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "td3bc", *TINY, f"hydra.run.dir={run}"]) == 0
    before = snapshot(run)
    code = main(["train", "td3bc", *TINY, "actor.loss.alpha=7.5", f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "holds a run with other settings (actor.loss.alpha: 0.25 -> 7.5)" in err
    assert snapshot(run) == before  # nothing changed on disk
    # the same settings, or only train.* changed, still resume/extend it
    assert main(["train", "td3bc", *TINY, f"hydra.run.dir={run}"]) == 0


def test_a_refused_run_in_an_existing_folder_leaves_hydras_files_as_they_were(tmp_path, capsys):
    """Refused after Hydra started the job (a budget below the step reached), the run's
    .hydra/ files said train.steps of the refused command and train.log had its lines."""
    run = tmp_path / "run"
    assert main(["train", "td3bc", *TINY, f"hydra.run.dir={run}"]) == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert main(["train", "td3bc", *TINY, "train.steps=1", f"hydra.run.dir={run}"]) == 2
    assert "already at step" in capsys.readouterr().err
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_a_run_that_fails_after_it_started_keeps_its_log(tmp_path, capsys, monkeypatch):
    """Only a refusal is undone: a run that was accepted and then failed (a non-finite loss)
    keeps the train.log it wrote, its error line included, in a folder made beforehand."""
    from divo.errors import DivoError

    def diverged(row, step, checkpointer):
        raise DivoError(f"non-finite loss_critic at step {step}")

    monkeypatch.setattr("divo.agents.train.check_finite", diverged)
    run = tmp_path / "run"
    run.mkdir()  # as a batch script makes it
    assert main(["train", "td3bc", *TINY, f"hydra.run.dir={run}"]) == 2
    log = (run / "train.log").read_text()
    assert "error: " in log and "non-finite loss_critic" in log
    assert (run / ".hydra" / "config.yaml").is_file()


@pytest.mark.parametrize("under", ["", "sub"])
def test_run_dir_onto_a_file_is_refused_in_one_line(tmp_path, capsys, under):
    taken = tmp_path / "afile"
    taken.write_text("mine")
    run = taken / under if under else taken
    code = main(["train", "td3bc", *TINY, f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{taken} is a file, not a folder" in err and "Traceback" not in err
    assert taken.read_text() == "mine" and sorted(tmp_path.iterdir()) == [taken]


def test_the_python_api_refuses_another_runs_folder_too(tmp_path):
    short = [o for o in TINY if o != "--quiet"]
    train(compose_recipe("td3bc", short), tmp_path / "run")
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match="other settings"):
        train(compose_recipe("td3bc", [*short, "seed=3"]), tmp_path / "run")
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize(
    "bad, said",
    [
        ("train.stepz=3,4", "did you mean train.steps?"),
        ("+train.step=100", "no setting train.step"),
        ("weighting=binary,expawr", "did you mean exp_awr?"),
    ],
)
def test_a_sweep_is_checked_like_a_single_run_before_any_job_starts(
    bad, said, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "divo", "-m", bad, "seed=0,1", *TINY])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and said in err[0], err
    assert not list(tmp_path.iterdir())  # no stray multirun folder


def test_a_sweeps_summary_names_each_failed_job(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    code = main(["train", "td3bc", "-m", "train.batch_size=0,8", *TINY, f"hydra.sweep.dir={sweep}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "1 job(s) of the sweep failed:" in err
    failed = err.split("1 job(s) of the sweep failed:")[1].strip().splitlines()
    assert len(failed) == 1 and "train.batch_size=0" in failed[0]
    assert "must be a positive integer" in failed[0]
    assert len(_sweep_runs(sweep)) == 1  # the other job ran
