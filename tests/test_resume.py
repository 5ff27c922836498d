"""Exact resume, checkpoint fallback, refusal of foreign checkpoints, evaluation failures."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from divo.agents.train import train
from divo.cli import main
from divo.config import compose_recipe
from divo.errors import CheckpointError, ConfigError

SHORT = [
    "dataset=bandit",
    "train.steps=6",
    "train.eval_every=3",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "train.eval_episodes=1",
    "train.batch_size=32",
    "train.progress=false",
]


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def final_state(run_dir: Path) -> dict:
    ckpt = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    return torch.load(ckpt, weights_only=False)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for name, tensor in a["agent"]["modules"].items():
        assert torch.equal(tensor, b["agent"]["modules"][name]), name
    for part, opt in a["agent"]["optimizers"].items():
        for pid, state in opt["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b["agent"]["optimizers"][part]["state"][pid][key]), (
                    part,
                    key,
                )


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    cfg = compose_recipe("td3bc", SHORT)
    run = tmp_path / "run"
    train(cfg, run)
    ckpts = sorted((run / "checkpoints").glob("*.pt"))
    assert [p.name for p in ckpts] == ["step_000000004.pt", "step_000000006.pt"]
    ckpts[-1].write_bytes(b"not a checkpoint")
    cfg = compose_recipe("td3bc", [*SHORT, "train.steps=8"])
    with pytest.warns(UserWarning, match="step_000000006.pt.*falling back"):
        result = train(cfg, run)
    assert result["steps"] == 8
    steps = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [0, 2, 3, 4, 6, 8]  # rows after step 4 were dropped and written again


@pytest.mark.parametrize("recipe", ["divo", "idql"])  # idql: dropout, a moving-average model
def test_resume_continues_exactly_like_an_uninterrupted_run(recipe, tmp_path):
    """In-process version of the kill test: stop at step 4 (as if killed), resume to 6."""
    full, part = tmp_path / "full", tmp_path / "part"
    # idql's cosine decays over a fixed horizon (its reference's 3M steps); a short one here
    extra = ["behavior.lr_decay_steps=6"] if recipe == "idql" else []
    train(compose_recipe(recipe, [*SHORT, *extra]), full)
    train(compose_recipe(recipe, [*SHORT, *extra, "train.steps=4"]), part)
    train(compose_recipe(recipe, [*SHORT, *extra]), part)
    assert_same_training_state(final_state(full), final_state(part))
    if recipe == "idql":
        assert any(
            k.startswith("behavior_model_ema.") for k in final_state(full)["agent"]["modules"]
        )

    def losses(run):  # the stopped run also evaluated at its last step (4): compare losses
        import csv

        with (run / "metrics.csv").open() as f:
            return [
                {k: v for k, v in r.items() if k.startswith("loss_")} for r in csv.DictReader(f)
            ]

    assert losses(full) == losses(part)


@pytest.mark.parametrize("recipe", ["resampling", "divo"])
def test_evaluations_draw_no_training_randomness(recipe, tmp_path, capsys):
    """The step-0 evaluation (train.eval_at_start) and the evaluations during training leave the
    training RNG stream alone: a run with them ends with exactly the parameters of one that
    evaluates only at the end. `resampling` deploys a sampler over its behaviour model, so its
    evaluations do draw random numbers; DIVO's deterministic actor does not."""
    quiet, many = tmp_path / "final-only", tmp_path / "every-step"
    overrides = [*SHORT, "train.checkpoint_every=6"]
    train(
        compose_recipe(recipe, [*overrides, "train.eval_at_start=false", "train.eval_every=6"]),
        quiet,
    )
    code = main(["train", recipe, *overrides, "train.eval_every=1", f"hydra.run.dir={many}"])
    assert code == 0
    assert_same_training_state(final_state(quiet), final_state(many))
    for key in ("torch", "numpy"):  # and the stream goes on from the same place
        a, b = final_state(quiet)["rng"][key], final_state(many)["rng"][key]
        assert torch.equal(a, b) if key == "torch" else torch.equal(a["keys"], b["keys"])

    # step 0 is the untrained policy, in metrics.csv, train.log and on the console
    import csv

    with (many / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert rows[0]["normalized_score"] != "" and rows[0]["loss_critic"] == ""
    with (quiet / "metrics.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4, 6]
    out = capsys.readouterr().out
    log = (many / "train.log").read_text()
    for text in (out, log):
        assert text.index("step 0: normalized score") < text.index("step 1: normalized score")
    # it is never the run's result (the final evaluation's), nor the best during training
    result = json.loads((many / "result.json").read_text())
    assert result["normalized_score"] == pytest.approx(float(rows[-1]["normalized_score"]))
    from divo.agents.runs import best_evaluation

    (many / "metrics.csv").write_text(
        "step,eval_return_mean,normalized_score\n0,9.0,90.0\n3,2.0,20.0\n6,1.0,10.0\n"
    )
    assert best_evaluation(many)["step"] == 3


def test_cli_resumes_a_run_directory_and_extends_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "td3bc", "--quiet", *SHORT, f"hydra.run.dir={run}"]) == 0
    assert main(["train", str(run), "train.steps=10"]) == 0
    assert json.loads((run / "result.json").read_text())["steps"] == 10
    assert main(["train", "td3bc", f"resume={run}", "train.steps=12"]) == 0
    assert json.loads((run / "result.json").read_text())["steps"] == 12
    assert "note:" not in capsys.readouterr().out  # td3bc has no learning-rate schedule


def test_an_interrupted_extension_leaves_no_result_of_the_old_budget(tmp_path, monkeypatch):
    """Extending a finished run sets its result.json and policy.pt aside first: an extension
    stopped half-way used to leave the old budget's result under a config.yaml of the new one,
    which `divo report` read as a finished run of the new budget."""
    import divo.agents.runs as runs_module
    from divo.report import find_runs

    run = tmp_path / "run"
    train(compose_recipe("td3bc", SHORT), run)
    real = runs_module.evaluate_policy

    def stop_late(*args, **kwargs):
        if stop_late.calls == 1:  # the extension's last evaluation, before its result
            raise KeyboardInterrupt
        stop_late.calls += 1
        return real(*args, **kwargs)

    stop_late.calls = 0
    monkeypatch.setattr(runs_module, "evaluate_policy", stop_late)
    longer = compose_recipe("td3bc", [*SHORT, "train.steps=12"])
    with pytest.raises(KeyboardInterrupt):
        train(longer, run)
    assert not (run / "result.json").exists() and not (run / "policy.pt").exists()
    assert json.loads((run / "result_at_step_6.json").read_text())["steps"] == 6
    assert (run / "policy_at_step_6.pt").is_file()
    (found,) = find_runs([run])
    assert found.status == "incomplete"
    monkeypatch.setattr(runs_module, "evaluate_policy", real)
    assert train(longer, run)["steps"] == 12
    assert json.loads((run / "result.json").read_text())["steps"] == 12


def test_a_resume_may_not_change_the_batch_size(tmp_path):
    """train.* may change on a resume (steps, evaluation, checkpoints), but not the batch size:
    it changes the updates, and the run's config.yaml would name only the new one."""
    run = tmp_path / "run"
    train(compose_recipe("td3bc", SHORT), run)
    before = snapshot(run)
    bigger = compose_recipe("td3bc", [*SHORT, "train.steps=8", "train.batch_size=64"])
    with pytest.raises(ConfigError, match=r"train.batch_size: 32 -> 64.*but train.batch_size"):
        train(bigger, run)
    assert snapshot(run) == before
    assert train(compose_recipe("td3bc", [*SHORT, "train.steps=8"]), run)["steps"] == 8


def test_a_config_edited_since_the_checkpoint_is_refused(tmp_path, capsys):
    """The checkpoint holds the config it was trained with: a config.yaml edited (or swapped)
    since, say another seed or actor alpha, is refused on resume instead of going on under
    settings the run never started with (it resumed silently, labelled with the new ones)."""
    run = tmp_path / "run"
    train(compose_recipe("td3bc", SHORT), run)
    text = (run / "config.yaml").read_text()
    for old, new, shown in [
        ("seed: 0", "seed: 5", "seed: 0 -> 5"),
        ("alpha: 0.25", "alpha: 7.5", "actor.loss.alpha: 0.25 -> 7.5"),
    ]:
        assert old in text
        (run / "config.yaml").write_text(text.replace(old, new))
        before = snapshot(run)
        capsys.readouterr()
        assert main(["train", str(run), "train.steps=8"]) == 2
        err = capsys.readouterr().err
        assert "trained with other settings than its config.yaml now says" in err
        assert shown in err and snapshot(run) == before
    (run / "config.yaml").write_text(text)
    assert main(["train", str(run), "train.steps=8", "--quiet"]) == 0


def test_extending_a_run_says_how_its_cosine_schedule_moves(tmp_path, capsys):
    """IQL's policy lr compressed into train.steps (lr_decay_steps=null): extending a finished
    6-step run to 12 restarts it at the factor of step 6 of 12 (0.5), and the note says how to
    keep the old schedule."""
    run = tmp_path / "run"
    small = ["behavior_model.hidden=[16]", "value.network.hidden=[16]"]
    small.append("behavior.lr_decay_steps=null")
    assert main(["train", "iql", "--quiet", *SHORT, *small, f"hydra.run.dir={run}"]) == 0
    capsys.readouterr()
    assert main(["train", str(run), "train.steps=12"]) == 0
    assert (
        "note: behavior.lr_schedule=cosine decays over train.steps, now 12 instead of 6: at step "
        "6 its learning-rate factor goes from 0.00 to 0.50, as in a run planned for 12 steps; "
        "behavior.lr_decay_steps=6 keeps the schedule it had"
    ) in capsys.readouterr().out


def _one_line_error(args, capsys) -> str:
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("divo: error: "), err
    return err[0]


def test_foreign_checkpoints_are_refused_and_nothing_changes(tmp_path, hopper_dataset, capsys):
    run = tmp_path / "run"
    train(compose_recipe("td3bc", SHORT), run)  # bandit: observation size 1
    before = snapshot(run)
    line = _one_line_error(["train", "divo", f"resume={run}"], capsys)
    assert "recipe 'td3bc', not 'divo'" in line
    line = _one_line_error(["train", str(run), "critic.lr=1.0"], capsys)
    assert "cannot change critic.lr=1.0" in line
    # the same recipe on data of another observation size
    on_hopper = [o for o in SHORT if not o.startswith("dataset=")]
    cfg = compose_recipe("td3bc", [*on_hopper, "dataset=minari", f"dataset.id={hopper_dataset}"])
    with pytest.raises(ConfigError, match="other settings .*dataset.id: 'divo/bandit"):
        train(cfg, run)  # refused on its config.yaml before any checkpoint is read
    assert snapshot(run) == before
    (run / "config.yaml").rename(tmp_path / "config.yaml")  # and without it, on the checkpoint
    with pytest.raises(
        CheckpointError, match="observation/action sizes 1/2 but the data have 11/3"
    ):
        train(cfg, run)
    (tmp_path / "config.yaml").rename(run / "config.yaml")
    assert snapshot(run) == before


def test_a_resume_on_regenerated_data_is_refused_and_nothing_changes(
    tmp_path, hopper_env_spec, hopper_episodes, capsys
):
    """A run's checkpoints remember the fingerprint of the transitions they trained on: after
    the dataset is written again with other rewards, resuming is refused (one line, files
    untouched); with the original data back, the same command resumes."""
    import minari

    from divo.data.load import load_offline_data
    from divo.data.minari_io import write_minari_dataset

    dataset_id = "test/fingerprint/hopper-v0"

    def write(reward_factor: float) -> None:
        if dataset_id in minari.list_local_datasets():
            minari.delete_dataset(dataset_id)
        episodes = [dict(ep, rewards=ep["rewards"] * reward_factor) for ep in hopper_episodes[:20]]
        write_minari_dataset(dataset_id, episodes, env=hopper_env_spec)

    write(1.0)
    on_it = [o for o in SHORT if not o.startswith("dataset=")]
    on_it += ["dataset=minari", f"dataset.id={dataset_id}", "train.steps=4"]
    run = tmp_path / "run"
    result = train(compose_recipe("td3bc", on_it), run)
    original = load_offline_data(dataset_id).fingerprint
    assert result["data_fingerprint"] == original and original.startswith("sha256:")
    assert f"fingerprint {original}" in (run / "train.log").read_text()

    write(2.0)  # the same id, the same sizes, other rewards
    assert load_offline_data(dataset_id).fingerprint != original
    before = snapshot(run)
    line = _one_line_error(["train", str(run), "train.steps=6"], capsys)
    assert "was trained on other data than dataset 'test/fingerprint/hopper-v0'" in line
    assert original[:19] in line and "Restore the data" in line
    assert snapshot(run) == before
    line = _one_line_error(["evaluate", str(run), "--critic", "--episodes", "1"], capsys)
    assert "was trained on other data than test/fingerprint/hopper-v0 holds now" in line

    write(1.0)
    assert main(["train", str(run), "train.steps=6"]) == 0
    assert json.loads((run / "result.json").read_text())["data_fingerprint"] == original


def test_evaluation_failure_does_not_stop_training(tmp_path, monkeypatch):
    import divo.agents.runs as runs_module

    def broken(*args, **kwargs):
        raise RuntimeError("simulator crashed")

    monkeypatch.setattr(runs_module, "evaluate_policy", broken)
    with pytest.warns(UserWarning, match="evaluation at step 3 failed.*simulator crashed"):
        result = train(compose_recipe("td3bc", SHORT), tmp_path / "run")
    assert result["steps"] == 6 and result["normalized_score"] is None
    assert "eval_failed" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert (tmp_path / "run" / "checkpoints" / "step_000000006.pt").is_file()


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(tmp_path, hopper_dataset):
    """A training process is killed with SIGKILL at a random point; `divo train <run dir>`
    resumes it; on CPU with a fixed seed the final parameters and optimiser states equal those
    of an uninterrupted run of the same length."""
    tiny = [
        "behavior_model.hidden=[32,32]",
        "critic.network.hidden=[32,32]",
        "actor.network.hidden=[32,32]",
        "value.network.hidden=[32,32]",
    ]
    args = [
        "divo", "train", "divo", "--quiet", "dataset=minari", f"dataset.id={hopper_dataset}",
        "train.steps=400", "train.checkpoint_every=20", "train.log_every=10",
        "train.eval_every=200", "train.eval_episodes=1", "train.batch_size=64", "seed=3", *tiny,
    ]  # fmt: skip
    cmd = [sys.executable, "-c", "import sys; from divo.cli import main; sys.exit(main())"]
    env = dict(os.environ)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([*cmd, *args[1:], f"hydra.run.dir={ref}"], env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip

    rng = random.Random()
    wait_for = rng.randint(1, 12)  # checkpoints to see before the kill
    proc = subprocess.Popen([*cmd, *args[1:], f"hydra.run.dir={killed}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list((killed / "checkpoints").glob("step_*.pt"))) >= min(wait_for, 2):
            newest = max(int(p.stem[5:]) for p in (killed / "checkpoints").glob("step_*.pt"))
            if newest >= 20 * wait_for:
                break
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "result.json").exists()

    subprocess.run([*cmd, "train", str(killed), "--quiet"], env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    assert_same_training_state(final_state(ref), final_state(killed))
    ref_rows = (ref / "metrics.csv").read_text()
    assert ref_rows == (killed / "metrics.csv").read_text()


def _forget_hydra_logging(before: list) -> None:
    """What a new `divo` process starts with: no logging handlers from an earlier command."""
    import logging

    root = logging.getLogger()
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
        handler.close()


def test_a_resumed_run_logs_the_resume_and_its_evaluations(tmp_path, capsys):
    """train.log and the console of `divo train <run dir>` say where the run resumed and carry
    the evaluations after it, and the damaged-checkpoint warning lands in train.log too."""
    import logging

    run = tmp_path / "run"
    before = list(logging.getLogger().handlers)
    assert main(["train", "td3bc", *SHORT, "train.steps=4", f"hydra.run.dir={run}"]) == 0
    _forget_hydra_logging(before)
    capsys.readouterr()
    assert main(["train", str(run), "train.steps=6"]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 4" in out and "step 6: normalized score" in out
    log = (run / "train.log").read_text()
    assert log.count("step 3: normalized score") == 1  # before the resume, not repeated
    assert log.index("step 3: normalized") < log.index("resumed from step 4")
    assert log.index("resumed from step 4") < log.index("step 6: normalized score")
    # a damaged newest checkpoint: the fallback warning is in train.log as well
    (run / "checkpoints" / "step_000000006.pt").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="falling back"):
        assert main(["train", str(run), "train.steps=8"]) == 0
    log = (run / "train.log").read_text()
    assert "step_000000006.pt" in log and "falling back to the previous checkpoint" in log
    assert "resumed from step 4" in log.rsplit("falling back", 1)[1]
    assert "step 8: normalized score" in log


def test_a_refused_resume_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    train(compose_recipe("td3bc", SHORT), run)
    before = snapshot(run)
    line = _one_line_error(["train", str(run), "train.steps=4"], capsys)
    assert "already at step 6 > train.steps=4" in line
    assert snapshot(run) == before  # config.yaml still says steps: 6
    assert main(["train", str(run)]) == 0  # the plain resume still works


def test_resuming_a_finished_run_leaves_its_files_and_prints_its_result(tmp_path, capsys):
    import logging

    run = tmp_path / "run"
    before = list(logging.getLogger().handlers)
    assert main(["train", "td3bc", *SHORT, f"hydra.run.dir={run}"]) == 0
    _forget_hydra_logging(before)
    result = json.loads((run / "result.json").read_text())
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", str(run)]) == 0
    out = capsys.readouterr().out
    assert snapshot(run) == before
    assert "finished its 6 steps already" in out
    assert f"after 6 steps in {result['wall_clock_s']:.1f} s -> {result['run_dir']}" in out


def test_the_resume_hint_never_names_the_refused_command(tmp_path, capsys):
    """A run whose config.yaml no longer matches its checkpoints: `divo train <run>` is refused,
    and the hint does not suggest that same command."""
    run = tmp_path / "run"
    train(compose_recipe("td3bc", SHORT), run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("recipe: td3bc", "recipe: divo"))
    line = _one_line_error(["train", str(run), "train.steps=8"], capsys)
    assert "holds a checkpoint of recipe 'td3bc', not 'divo'" in line
    assert f"divo train {run}`" not in line


def test_result_names_a_run_under_the_working_directory_relative_to_it(
    tmp_path, monkeypatch, capsys
):
    """result.json is committed with users' runs: a run folder under the working directory is
    named relative to it (no machine's path), one elsewhere as given."""
    import logging

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = list(logging.getLogger().handlers)
    assert main(["train", "td3bc", *SHORT, f"hydra.run.dir={work / 'runs' / 'a'}"]) == 0
    _forget_hydra_logging(before)
    assert json.loads((work / "runs/a/result.json").read_text())["run_dir"] == "runs/a"
    elsewhere = tmp_path / "elsewhere"
    result = train(compose_recipe("td3bc", SHORT), elsewhere)
    assert result["run_dir"] == str(elsewhere)
    assert json.loads((elsewhere / "result.json").read_text())["run_dir"] == str(elsewhere)


def test_a_run_started_again_from_step_0_keeps_no_lines_of_the_earlier_start(tmp_path, capsys):
    """A run killed before its first checkpoint leaves train.log lines and no checkpoint;
    `divo train <run dir>` starts it again from step 0, and its train.log reads like one
    uninterrupted run's (metrics.csv starts again too), saying what it took out."""
    import logging

    run = tmp_path / "run"
    before = list(logging.getLogger().handlers)
    assert main(["train", "td3bc", *SHORT, f"hydra.run.dir={run}"]) == 0
    _forget_hydra_logging(before)
    for name in ("result.json", "policy.pt"):  # as a start killed before its first checkpoint
        (run / name).unlink()
    for ckpt in (run / "checkpoints").glob("*.pt"):
        ckpt.unlink()
    assert (run / "train.log").read_text().count("step 3: normalized score") == 1
    capsys.readouterr()
    assert main(["train", str(run)]) == 0
    _forget_hydra_logging(before)
    log = (run / "train.log").read_text()
    assert log.count("step 3: normalized score") == 1
    assert "started again from step 0" in log
    assert log.count("step 6: normalized score") == 1
    steps = [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps, key=int) and len(steps) == len(set(steps))
