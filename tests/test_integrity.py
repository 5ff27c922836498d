"""Damaged, hostile and shared run files: checksums, `divo convert`'s allow-list, train.log on
resume and on a terminal, the ETA, and the lock that keeps a run directory to one process."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEST_BANDIT_SAMPLES
from test_resume import assert_same_training_state, final_state, snapshot

from divo.agents.checkpoints import convert_file
from divo.agents.policy_io import load_policy
from divo.agents.runs import Eta
from divo.agents.train import train
from divo.cli import main
from divo.config import compose_recipe
from divo.errors import CheckpointError, RunInUseError, UntrustedFileError
from divo.files import CHECKSUM_KEY, RunLock, content_sha256, load_file

SHORT = [
    "dataset=bandit",
    "train.steps=6",
    "train.eval_every=3",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "train.eval_episodes=1",
    "train.batch_size=32",
    "train.progress=false",
    "critic.network.hidden=[16,16]",
    "actor.network.hidden=[16,16]",
]


def _one_line_error(args, capsys) -> str:
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("divo: error: "), err
    return err[0]


def _damage(path: Path, size: int = 1024) -> None:
    """Flip ``size`` bytes inside the largest tensor record of a torch file, leaving the zip
    (its headers and directory) intact, as a bad disk sector or a bad copy would."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with path.open("r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
        start = info.header_offset + 30 + int(name_len) + int(extra_len)
        size = min(size, info.file_size)
        f.seek(start)
        data = bytes(b ^ 0xFF for b in f.read(size))
        f.seek(start)
        f.write(data)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("integrity") / "run"
    train(compose_recipe("td3bc", SHORT), run)
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(trained, tmp_path / "run"))


# --- item 3: checksums --------------------------------------------------------------------------


def test_every_file_carries_the_checksum_of_what_it_holds(trained):
    for file in [trained / "policy.pt", *(trained / "checkpoints").glob("step_*.pt")]:
        raw = torch.load(file, weights_only=True)
        rest = {k: v for k, v in raw.items() if k != CHECKSUM_KEY}
        assert raw[CHECKSUM_KEY] == content_sha256(rest)
        assert CHECKSUM_KEY not in load_file(file)  # checked and taken off on loading


def test_a_damaged_policy_file_is_refused_in_one_line(run, capsys):
    assert main(["evaluate", str(run), "--episodes", "1"]) == 0  # intact: it evaluates
    _damage(run / "policy.pt")
    torch.load(run / "policy.pt", weights_only=True)  # the zip still reads: only a check sees it
    line = _one_line_error(["evaluate", str(run), "--episodes", "1"], capsys)
    assert "policy.pt is damaged: its contents do not match the SHA-256 checksum" in line
    with pytest.raises(CheckpointError, match="is damaged"):
        load_policy(run)


def test_a_damaged_newest_checkpoint_falls_back_with_a_warning_in_train_log(run, capsys):
    newest = run / "checkpoints" / "step_000000006.pt"
    _damage(newest)
    with pytest.warns(UserWarning, match="step_000000006.pt is damaged.*falling back"):
        assert main(["train", str(run), "train.steps=8"]) == 0
    log = (run / "train.log").read_text()
    assert "step_000000006.pt is damaged" in log and "falling back" in log
    assert "resumed from step 4" in log.rsplit("falling back", 1)[1]
    # the damaged file was written again by the resumed run; the run reads intact throughout
    assert load_file(newest)["step"] == 6
    steps = [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open())]
    assert steps == sorted(set(steps)) and steps[-1] == 8


@pytest.mark.parametrize("damage", ["torn", "garbage"])
def test_a_damaged_metrics_csv_is_repaired_on_resume_not_kept_or_a_traceback(trained, run, damage):
    """A run killed after its step-4 checkpoint, with the last metrics row cut short ("6", as a
    full disk leaves it) or a garbage row appended: the torn row was kept out of order, the
    garbage one ended the resume in a traceback after train.log was cut. Now the damaged rows
    are dropped with a warning and the resumed run's metrics.csv equals the whole run's."""
    for name in ("step_000000006.pt",):
        (run / "checkpoints" / name).unlink()
    (run / "result.json").unlink()
    (run / "policy.pt").unlink()
    lines = (run / "metrics.csv").read_text().splitlines()
    # torn: the last row cut to "4", a step at the checkpoint's (the old code kept it, twice)
    lines = lines[:-1] + ["4"] if damage == "torn" else [*lines, "garbage,x,y"]
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    stale = run / "checkpoints" / ".step_000000006.pt.abc123.tmp"  # a save a SIGKILL cut short
    stale.write_bytes(b"half")
    if damage == "torn":  # a row up to the checkpoint: dropped, said
        with pytest.warns(UserWarning, match="metrics.csv: .* damaged"):
            assert main(["train", str(run), "--quiet"]) == 0
    else:  # a row past the checkpoint: dropped with the rows the run logs again
        assert main(["train", str(run), "--quiet"]) == 0
    assert (run / "metrics.csv").read_text() == (trained / "metrics.csv").read_text()
    assert not stale.exists()  # removed by the next checkpoint's save


def test_json_written_atomically_has_a_plain_writes_permissions(tmp_path):
    """Through mkstemp a result.json came out 0600: a group's `divo report` could not read it."""
    from divo.files import write_json_atomic

    write_json_atomic(tmp_path / "atomic.json", {"a": 1})
    (tmp_path / "plain.json").write_text("{}")
    modes = [(tmp_path / n).stat().st_mode & 0o777 for n in ("atomic.json", "plain.json")]
    assert modes[0] == modes[1]


def test_a_file_of_this_format_without_its_checksum_is_refused(run, capsys):
    raw = torch.load(run / "policy.pt", weights_only=True)
    del raw[CHECKSUM_KEY]
    torch.save(raw, run / "policy.pt")
    line = _one_line_error(["evaluate", str(run), "--episodes", "1"], capsys)
    assert "is damaged" in line and "has none" in line


def test_files_of_the_previous_version_load_unchecked_and_convert_adds_a_checksum(run, capsys):
    """divo-policy-v1 and divo-checkpoint-v2 files (no checksum) still load; `divo convert`
    rewrites them in this version's format, with a checksum."""
    for file, older in [
        (run / "policy.pt", "divo-policy-v1"),
        (run / "checkpoints" / "step_000000006.pt", "divo-checkpoint-v2"),
    ]:
        raw = torch.load(file, weights_only=True)
        del raw[CHECKSUM_KEY]
        raw["format"] = older
        if "policy" in raw:
            raw["policy"]["format"] = "divo-policy-v1"
        torch.save(raw, file)
    load_policy(run / "policy.pt")
    load_policy(run / "checkpoints" / "step_000000006.pt")
    assert main(["convert", str(run)]) == 0
    out = capsys.readouterr().out
    assert "policy.pt: divo-policy-v1 -> divo-policy-v2, plain data with a checksum" in out
    assert "step_000000006.pt: divo-checkpoint-v2 -> divo-checkpoint-v3" in out
    for file in (run / "policy.pt", run / "checkpoints" / "step_000000006.pt"):
        assert torch.load(file, weights_only=True)[CHECKSUM_KEY]
    _damage(run / "policy.pt")
    with pytest.raises(CheckpointError, match="is damaged"):
        load_policy(run)


def test_an_error_that_ends_a_run_goes_to_train_log(tmp_path, monkeypatch, capsys):
    import divo.agents.train as train_module
    from divo.errors import DivoError

    def diverge(row, step, checkpointer):
        if step == 4:
            raise DivoError(f"non-finite loss_critic at step 4; ({checkpointer.last_good()})")

    monkeypatch.setattr(train_module, "check_finite", diverge)
    run = tmp_path / "run"
    line = _one_line_error(["train", "td3bc", *SHORT, f"hydra.run.dir={run}"], capsys)
    assert "non-finite loss_critic at step 4" in line
    log = (run / "train.log").read_text()
    assert "[ERROR] - error: non-finite loss_critic at step 4" in log
    assert "last good checkpoint: " in log and "step_000000002.pt" in log


def test_an_error_that_ends_stacked_seeds_goes_to_their_train_logs(tmp_path, monkeypatch):
    import divo.agents.vectorized as vectorized
    from divo.errors import DivoError

    def diverge(row, step, checkpointer):
        if step == 4:
            raise DivoError("non-finite loss_critic at step 4")

    monkeypatch.setattr(vectorized, "check_finite", diverge)
    run = tmp_path / "run"
    with pytest.raises(DivoError):
        train(compose_recipe("td3bc", [*SHORT, "train.num_seeds=2"]), run)
    for seed in ("seed0", "seed1"):
        assert "error: non-finite loss_critic at step 4" in (run / seed / "train.log").read_text()


# --- item 4: `divo convert` reads with an allow-list --------------------------------------------


class RunsShell:
    """Unpickling this calls os.system (posix.system): what a hostile file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _hostile(file: Path, marker: Path) -> None:
    """A file of the current format, with its checksum, whose pickle runs a shell command."""
    raw = torch.load(file, weights_only=True)
    raw["last_eval" if "agent" in raw else "ref_min_score"] = RunsShell(f"touch {marker}")
    raw = {k: v for k, v in raw.items() if k != CHECKSUM_KEY}
    raw[CHECKSUM_KEY] = content_sha256({k: v for k, v in raw.items()})
    torch.save(raw, file)


@pytest.mark.parametrize("which", ["policy.pt", "checkpoints/step_000000006.pt"])
def test_convert_refuses_a_hostile_pickle_without_running_it(run, tmp_path, which, capsys):
    marker = tmp_path / "marker"
    file = run / which
    _hostile(file, marker)
    before = file.read_bytes()
    assert "system" in str(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    # loading it is refused, and the refusal does not offer `divo convert`
    args = ["evaluate", str(file), "--episodes", "1"]
    line = _one_line_error(args, capsys)
    assert "holds a pickled Python object (posix.system)" in line or "(nt.system)" in line
    assert "convert" not in line.replace(str(run), "")
    # nor does convert run it: it refuses in one line, and the file stays as it was
    line = _one_line_error(["convert", str(file)], capsys)
    assert "holds a pickled Python object" in line
    assert "convert" not in line.replace(str(run), "")
    with pytest.raises(UntrustedFileError):
        convert_file(file)
    assert not marker.exists()
    assert file.read_bytes() == before


def _as_version_one(path: Path, numpy_module: str | None = None) -> None:
    """A checkpoint as divo-checkpoint-v1 wrote it: NumPy's RNG state pickled as an ndarray,
    no checksum; ``numpy_module``: the module name NumPy 1 pickled ``_reconstruct`` under."""
    ckpt = torch.load(path, weights_only=True)
    del ckpt[CHECKSUM_KEY]
    state = ckpt["rng"]["numpy"]
    ckpt["rng"]["numpy"] = (
        state["kind"],
        state["keys"].numpy().astype(np.uint32),
        state["pos"],
        state["has_gauss"],
        state["cached_gaussian"],
    )
    ckpt["format"] = "divo-checkpoint-v1"
    ckpt["policy"]["format"] = "divo-policy-v1"
    torch.save(ckpt, path)
    if numpy_module is None:
        return
    with zipfile.ZipFile(path) as z:
        records = {i.filename: z.read(i) for i in z.infolist()}
    for name in records:
        if name.endswith("data.pkl"):
            records[name] = records[name].replace(
                b"numpy._core.multiarray\n", f"{numpy_module}\n".encode()
            )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, data)


@pytest.mark.parametrize("numpy_module", [None, "numpy.core.multiarray"])
def test_convert_reads_what_an_older_divo_wrote_and_nothing_more(run, numpy_module, capsys):
    file = run / "checkpoints" / "step_000000006.pt"
    _as_version_one(file, numpy_module)
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    assert f"{numpy_module or 'numpy._core.multiarray'}._reconstruct" in unsafe
    line = _one_line_error(["evaluate", str(file), "--episodes", "1"], capsys)
    assert f"convert it with `divo convert {file}`" in line
    assert main(["convert", str(file)]) == 0
    assert "divo-checkpoint-v1 -> divo-checkpoint-v3" in capsys.readouterr().out
    assert load_file(file)["format"] == "divo-checkpoint-v3"
    assert main(["evaluate", str(file), "--episodes", "1"]) == 0


# --- item 6: the log on a terminal, on resume, and the ETA --------------------------------------


def test_a_log_line_prints_once_beside_the_progress_bar(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*SHORT, "train.progress=true", f"hydra.run.dir={run}"]
    assert main(["train", "td3bc", *args]) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert printed.count("step 3: normalized score") == 1, printed
    assert (run / "train.log").read_text().count("step 3: normalized score") == 1


def test_a_resumed_run_does_not_repeat_what_the_interrupted_one_logged(tmp_path, monkeypatch):
    """Interrupted at step 7 (evaluated at 3 and 6, checkpointed at 4): the resumed run
    evaluates at 6 again, and train.log and metrics.csv hold it once, as an uninterrupted
    run's would."""
    import divo.agents.runs as runs

    overrides = [*SHORT, "train.steps=8", "train.checkpoint_every=4"]
    full, run = tmp_path / "full", tmp_path / "run"
    train(compose_recipe("td3bc", overrides), full)
    update = runs.Eta.update

    def interrupt(self, step):
        if step == 7:
            raise KeyboardInterrupt
        update(self, step)

    monkeypatch.setattr(runs.Eta, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(compose_recipe("td3bc", overrides), run)
    monkeypatch.setattr(runs.Eta, "update", update)
    interrupted = (run / "train.log").read_text()
    assert interrupted.count("step 6: normalized score") == 1
    train(compose_recipe("td3bc", overrides), run)
    log = (run / "train.log").read_text()
    assert log.count("step 6: normalized score") == 1
    assert log.count("step 3: normalized score") == 1
    # the interruption was in train.log, a line after step 4 as well: taken out with the rest
    assert "KeyboardInterrupt" in interrupted and "KeyboardInterrupt" not in log
    assert log.index("resumed from step 4") < log.index("step 6: normalized score")
    assert "line(s) logged after it by the interrupted run were taken out" in log

    def lines(path):
        text = path.read_text()
        found = [ln.split(" - ", 1)[1] for ln in text.splitlines() if " - step " in ln]
        return [ln for ln in found if "normalized score" in ln]

    assert lines(run / "train.log") == lines(full / "train.log")
    rows = [r["step"] for r in csv.DictReader((run / "metrics.csv").open())]
    assert rows == [r["step"] for r in csv.DictReader((full / "metrics.csv").open())]
    assert_same_training_state(final_state(full), final_state(run))


def test_resumed_stacked_seeds_do_not_repeat_what_the_interrupted_run_logged(tmp_path, monkeypatch):
    import divo.agents.runs as runs

    overrides = [*SHORT, "train.steps=8", "train.checkpoint_every=4", "train.num_seeds=2"]
    run = tmp_path / "run"
    update = runs.Eta.update

    def interrupt(self, step):
        if step == 7:
            raise KeyboardInterrupt
        update(self, step)

    monkeypatch.setattr(runs.Eta, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(compose_recipe("td3bc", overrides), run)
    monkeypatch.setattr(runs.Eta, "update", update)
    train(compose_recipe("td3bc", overrides), run)
    for seed in ("seed0", "seed1"):
        log = (run / seed / "train.log").read_text()
        assert log.count("step 6: normalized score") == 1, log
        assert "KeyboardInterrupt" not in log
        rows = [int(r["step"]) for r in csv.DictReader((run / seed / "metrics.csv").open())]
        assert rows == sorted(set(rows))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _eta_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.eta"]


def test_the_eta_counts_the_evaluations_still_to_come(monkeypatch, caplog):
    """1,000 steps at 1 ms, evaluated every 100 steps at 10 s each: about 80 s of evaluations
    are left after the rate is measured, besides under a second of steps."""
    import divo.agents.runs as runs

    clock = _Clock()
    monkeypatch.setattr(runs.time, "perf_counter", clock)
    log = logging.getLogger("test.eta")
    caplog.set_level(logging.INFO, logger="test.eta")
    eta = Eta(0, 1000, torch.device("cpu"), log, eval_every=100)
    with eta.evaluation():  # the untrained policy's, before training (train.eval_at_start)
        clock.now += 10.0
    for step in range(1, 300):
        clock.now += 0.001
        eta.update(step)
        if step % 100 == 0:
            with eta.evaluation(step):
                clock.now += 10.0
    lines = _eta_lines(caplog)
    assert len(lines) == 2 and "ETA after the first steps" in lines[0]
    # measured at step 210 at 1000 steps/s: 0.79 s of steps and 8 evaluations of 10 s left
    assert (
        "1000 steps/s: about 81 s to go (step 210 of 1000, 8 evaluation(s) of about 10 s"
        in (lines[1])
    )


def test_the_eta_without_a_timed_evaluation_gives_the_total_after_the_first(monkeypatch, caplog):
    import divo.agents.runs as runs

    clock = _Clock()
    monkeypatch.setattr(runs.time, "perf_counter", clock)
    log = logging.getLogger("test.eta")
    caplog.set_level(logging.INFO, logger="test.eta")
    eta = Eta(0, 1000, torch.device("cpu"), log, eval_every=100)
    for step in range(1, 101):
        clock.now += 0.05  # 20 steps/s: the rate is known after 3 s, before the first evaluation
        eta.update(step)
        if step % 100 == 0:
            with eta.evaluation(step):
                clock.now += 60.0
    lines = _eta_lines(caplog)
    assert len(lines) == 3
    assert "20 steps/s: about 46 s to go (step " in lines[1]
    assert "plus 10 evaluation(s), timed at the first" in lines[1]
    # after step 100's evaluation (60 s): 45 s of steps and 9 evaluations of 60 s
    assert (
        "evaluations take about 60 s each: about 10 min to go in all (step 100 of 1000)"
        in (lines[2])
    )


def test_the_eta_is_revised_when_evaluations_grow_longer(monkeypatch, caplog):
    """An untrained policy's evaluation is short (its episodes end at once); once the policy
    stays up, evaluations take longer, and the ETA says so once, not after every one."""
    import divo.agents.runs as runs

    clock = _Clock()
    monkeypatch.setattr(runs.time, "perf_counter", clock)
    log = logging.getLogger("test.eta")
    caplog.set_level(logging.INFO, logger="test.eta")
    eta = Eta(0, 1000, torch.device("cpu"), log, eval_every=100)
    with eta.evaluation():
        clock.now += 1.0
    for step in range(1, 501):
        clock.now += 0.001
        eta.update(step)
        if step % 100 == 0:
            with eta.evaluation(step):
                clock.now += 1.0 if step < 300 else 30.0
    lines = _eta_lines(caplog)
    assert len(lines) == 3, lines
    assert "about 9 s to go (step 210 of 1000, 8 evaluation(s) of about 1 s included)" in lines[1]
    # at step 300: 0.7 s of steps and 7 evaluations of 30 s
    assert lines[2] == (
        "ETA revised (evaluations now take about 30 s each): about 4 min to go (step 300 of 1000)"
    )


# --- item 8: one process per run directory ------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
import divo.data.bandit
divo.data.bandit.BANDIT_NUM_SAMPLES = {samples}
import divo.agents.runs as runs
from divo.agents.train import train
from divo.config import compose_recipe

update = runs.Eta.update

def pause(self, step):  # hold the run, and its lock, after step 3 (checkpoint 2 written)
    if step == 3:
        Path({paused!r}).write_text("paused")
        time.sleep(300)
    update(self, step)

runs.Eta.update = pause
train(compose_recipe("td3bc", {overrides!r}), {run!r})
"""


def _hold(run: Path, overrides: list[str], tmp_path: Path) -> subprocess.Popen:
    """A real `train` in another process, paused at step 3 while it holds ``run``."""
    paused = tmp_path / f"paused-{run.name}"
    script = HOLDER.format(
        samples=TEST_BANDIT_SAMPLES, paused=str(paused), overrides=overrides, run=str(run)
    )
    with (tmp_path / f"holder-{run.name}.log").open("w") as out:  # its output, for a failure
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script)],
            env=dict(os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.time() + 120
    while not paused.exists():
        assert proc.poll() is None, "the holding process ended before it paused"
        assert time.time() < deadline, "the holding process did not pause in time"
        time.sleep(0.05)
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_second_process_on_a_run_in_use_is_refused_with_nothing_changed(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _hold(run, [*SHORT, "train.steps=8"], tmp_path)
    try:
        before = snapshot(run)
        line = _one_line_error(["train", str(run), "--quiet"], capsys)
        assert f"{run} is in use by another divo process (pid {holder.pid} on " in line
        assert json.loads((run / ".lock").read_text())["pid"] == holder.pid
        with pytest.raises(RunInUseError, match=f"pid {holder.pid}"):
            train(compose_recipe("td3bc", [*SHORT, "train.steps=8"]), run)
        assert snapshot(run) == before  # nothing changed, the lock file included
        # reading is not writing: `divo evaluate` needs no lock (the step-2 checkpoint)
        assert main(["evaluate", str(run), "--episodes", "1"]) == 0
    finally:
        _kill(holder)
    # SIGKILL released the lock; the file it leaves names a dead process and is taken over
    assert (run / ".lock").exists()
    assert main(["train", str(run), "--quiet"]) == 0
    assert json.loads((run / "result.json").read_text())["steps"] == 8
    assert not (run / ".lock").exists()  # a run that ends gives its folder back


def test_stacked_seeds_hold_the_run_and_every_seed_folder(tmp_path, capsys):
    run = tmp_path / "run"
    stacked = [*SHORT, "train.steps=8", "train.num_seeds=2"]
    holder = _hold(run, stacked, tmp_path)
    try:
        before = snapshot(run)
        for folder in (run, run / "seed1"):
            line = _one_line_error(["train", str(folder), "--quiet"], capsys)
            assert f"(pid {holder.pid} on " in line
        with pytest.raises(RunInUseError, match=f"pid {holder.pid}"):
            train(compose_recipe("td3bc", stacked), run)
        assert snapshot(run) == before
    finally:
        _kill(holder)
    assert main(["train", str(run), "--quiet"]) == 0
    assert not list(run.rglob(".lock"))


def test_a_run_refused_on_its_input_leaves_no_lock_file(tmp_path, capsys):
    run = tmp_path / "run"
    train(compose_recipe("td3bc", SHORT), run)
    (run / ".lock").write_text('{"pid": 1, "host": "elsewhere", "since": "long ago"}\n')
    before = snapshot(run)
    line = _one_line_error(["train", str(run), "train.steps=4"], capsys)
    assert "already at step 6 > train.steps=4" in line
    assert snapshot(run) == before  # a stale lock file of a crashed run is put back as it was
    fresh = tmp_path / "fresh"
    with pytest.raises(CheckpointError):
        with RunLock(fresh):  # a folder that does not exist is not made by the lock
            raise CheckpointError("refused")
    assert not fresh.exists()
