"""Sweeps through Hydra launcher plugins: the shipped launcher configs (recipes/hydra/launcher)
compose with their plugins, and two-job multiruns of tiny jobs run end to end through
`divo train -m` with joblib, with the SLURM config on submitit's local executor, and on a real
local Ray cluster (`ray start --head`). Each test skips, naming the extra to install, where its
plugin is missing."""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from divo.cli import main
from divo.config import recipes_dir

# launcher config -> (plugin module, extra, the plugin's launcher class)
LAUNCHERS = {
    "local": ("hydra_plugins.hydra_joblib_launcher", "joblib", "JoblibLauncher"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm", "SlurmLauncher"),
    "ray_cluster": ("hydra_plugins.hydra_ray_launcher", "ray", "RayLauncher"),
}
TINY = [
    "--quiet",
    "train.steps=4",
    "train.eval_every=2",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.eval_episodes=2",
    "train.batch_size=16",
    "critic.network.hidden=[32,32]",
    "actor.network.hidden=[32,32]",
]


def has_plugin(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def skip_without(name: str):
    module, extra, _ = LAUNCHERS[name]
    return pytest.mark.skipif(
        not has_plugin(module),
        reason=f"{module} is not installed (pip install -e '.[{extra}]')",
    )


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_configs_name_their_plugin(name):
    """Each shipped config extends the plugin's own config (readable without the plugin)."""
    path = recipes_dir() / "hydra" / "launcher" / f"{name}.yaml"
    cfg = yaml.safe_load(path.read_text())
    plugin_config = {"local": "joblib", "slurm": "submitit_slurm", "ray_cluster": "ray"}[name]
    assert cfg["defaults"] == [plugin_config, "_self_"]


def _hydra_cfg(args: list[str], capsys) -> dict:
    code = main(["train", "td3bc", "--cfg", "hydra", *args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return yaml.safe_load(out.out)["hydra"]


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=skip_without(n)) for n in sorted(LAUNCHERS)],
)
def test_launcher_config_composes_with_its_plugin(name, capsys):
    launcher = _hydra_cfg([f"hydra/launcher={name}"], capsys)["launcher"]
    assert launcher["_target_"].endswith(LAUNCHERS[name][2])
    if name == "local":
        assert launcher["n_jobs"] == -1 and launcher["prefer"] == "processes"
    elif name == "slurm":
        assert launcher["cpus_per_task"] == 2 and launcher["gpus_per_node"] == 1
        assert launcher["timeout_min"] == 240 and launcher["array_parallelism"] == 64
    else:
        assert launcher["ray"]["init"]["address"] == "auto"
        # (else the plugin's 75 MB default makes ray.init refuse to join a running cluster)
        assert launcher["ray"]["init"]["object_store_memory"] is None
        assert launcher["ray"]["remote"] == {"num_cpus": 1, "num_gpus": 0}


@skip_without("slurm")
def test_slurm_launcher_takes_overrides(capsys):
    launcher = _hydra_cfg(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.setup=['source ~/venv/bin/activate']",
        ],
        capsys,
    )["launcher"]
    assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 0
    assert launcher["setup"] == ["source ~/venv/bin/activate"]
    # the plugin's own configs work as well
    plain = _hydra_cfg(["hydra/launcher=submitit_local"], capsys)["launcher"]
    assert plain["_target_"].endswith("LocalLauncher")


@pytest.mark.slow
@skip_without("local")
def test_joblib_multirun_runs_two_jobs_in_parallel(tmp_path, capsys):
    from divo.data.builtin import ensure_builtin

    # Written here with the session's small bandit (conftest); the worker processes then find
    # it under MINARI_DATASETS_PATH instead of each building the full-size one.
    ensure_builtin("divo/bandit/multimodal-v0")
    sweep = tmp_path / "sweep"
    args = ["train", "td3bc", "-m", "seed=0,1", "dataset=bandit", "hydra/launcher=local",
            "hydra.launcher.n_jobs=2"]  # fmt: skip
    code = main([*args, *TINY, f"hydra.sweep.dir={sweep}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "Joblib.Parallel(n_jobs=2" in out.out + out.err
    results = sorted(sweep.rglob("result.json"))
    assert [p.parent.relative_to(sweep).as_posix() for p in results] == [
        "td3bc/divo-bandit-multimodal-v0/seed0",
        "td3bc/divo-bandit-multimodal-v0/seed1",
    ]
    for path in results:
        result = json.loads(path.read_text())
        assert result["steps"] == 4 and result["normalized_score"] is not None


@skip_without("local")
def test_failed_jobs_in_joblib_workers_set_the_exit_status(tmp_path, capsys):
    """Jobs run in worker processes: their failures still reach the parent's exit status."""
    args = ["train", "td3bc", "-m", "dataset=bandit", "train.steps=0,-1", "hydra/launcher=local",
            "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}"]  # fmt: skip
    assert main(args) == 2
    # (each worker prints its own one-line error; the parent sums them up)
    assert "2 job(s) of the sweep failed" in capsys.readouterr().err
    assert not list(tmp_path.glob(".divo-failures-*"))  # the record is gone with the sweep


@skip_without("local")
def test_a_sweeps_failures_go_through_its_sweep_folder(tmp_path, capsys, monkeypatch):
    """SLURM and Ray jobs run on other machines, which share the sweep folder, not /tmp: the
    failures record lives in the sweep folder that the parent pins (hydra.sweep.dir resolved
    once), and nothing goes through /tmp."""
    made = _record_temporary_files(monkeypatch)
    monkeypatch.chdir(tmp_path)
    args = ["train", "td3bc", "-m", "dataset=bandit", "train.steps=0,-1", "hydra/launcher=local",
            "hydra.launcher.n_jobs=2"]  # fmt: skip
    assert main(args) == 2
    assert "2 job(s) of the sweep failed" in capsys.readouterr().err
    sweeps = list((tmp_path / "runs" / "multirun").iterdir())
    assert len(sweeps) == 1 and (sweeps[0] / "multirun.yaml").is_file()  # Hydra's, pinned
    assert [p.parent for p in made] == [sweeps[0].resolve()]
    assert not made[0].exists()  # read by the parent, then removed


def _record_temporary_files(monkeypatch) -> list[Path]:
    """The files tempfile.mkstemp makes from now on (the failures record among them)."""
    made = []
    mkstemp = tempfile.mkstemp

    def recorded(*args, **kwargs):
        fd, path = mkstemp(*args, **kwargs)
        made.append(Path(path))
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", recorded)
    return made


def test_a_sweep_folder_naming_a_job_value_is_read_once_with_a_root_the_jobs_share(
    tmp_path, monkeypatch
):
    """hydra.sweep.dir is read here once: a folder that names no job value is pinned (its
    ${now} read once), one that names a job's value keeps that for the jobs and gives the
    folder every job's folder lies under for the failures record, never /tmp."""
    from divo.cli import _sweep_folders

    monkeypatch.chdir(tmp_path)
    pinned, record = _sweep_folders("td3bc", ["seed=0,1", "dataset=bandit"])
    assert pinned.startswith("runs/multirun/") and "${" not in pinned
    assert record == (tmp_path / pinned).resolve()

    shared = tmp_path / "shared"
    by_steps = [f"hydra.sweep.dir={shared}/${{now:%Y}}/steps${{train.steps}}", "train.steps=4,-1"]
    pinned, record = _sweep_folders("td3bc", ["dataset=bandit", *by_steps])
    year = str(datetime.date.today().year)
    assert pinned == f"{shared}/{year}/steps${{train.steps}}"  # ${now} read, the job value kept
    assert record == (shared / year).resolve()

    # known to the job only (Hydra sets it at launch): the part before it
    by_num = f"hydra.sweep.dir={shared}/sweep/job${{hydra.job.num}}"
    pinned, record = _sweep_folders("td3bc", ["dataset=bandit", "seed=0,1", by_num])
    assert pinned == f"{shared}/sweep/job${{hydra.job.num}}" and record == shared / "sweep"


TINY_UNSWEPT = [a for a in TINY if not a.startswith("train.steps=")]


def _one_failed_job_by_steps(root: Path) -> list[str]:
    """A two-job sweep whose folder names a job value (train.steps), one job refused."""
    return ["train", "td3bc", "-m", "train.steps=4,-1", "dataset=bandit", *TINY_UNSWEPT,
            f"hydra.sweep.dir={root}/steps${{train.steps}}"]  # fmt: skip


def _assert_one_failed_job_recorded_under(root: Path, err: str, made: list[Path]) -> None:
    assert "1 job(s) of the sweep failed" in err
    failed = root / "steps-1" / SEED_DIRS[0] / "train.steps=-1"
    assert f"  {failed}: train.steps=-1 must be" in err  # the failed job, named by its folder
    records = [p for p in made if p.name.startswith(".divo-failures-")]
    assert [p.parent for p in records] == [root.resolve()]  # under the sweep's root, not /tmp
    assert not records[0].exists()  # read by the parent, then removed
    assert _run_dirs(root / "steps4") == [f"{SEED_DIRS[0]}/train.steps=4"]  # the other ran


def _run_dirs(sweep: Path) -> list[str]:
    return [p.parent.relative_to(sweep).as_posix() for p in sorted(sweep.rglob("result.json"))]


SEED_DIRS = ["td3bc/divo-bandit-multimodal-v0/seed0", "td3bc/divo-bandit-multimodal-v0/seed1"]
SLURM_ON_CPU = ["hydra/launcher=slurm", "hydra.launcher.partition=cpu",
                "hydra.launcher.gpus_per_node=0", "hydra.launcher.timeout_min=10"]  # fmt: skip


def _submit_locally(monkeypatch) -> None:
    """submitit's local executor in place of sbatch: the plugin's SlurmLauncher runs as on a
    cluster (each job pickled, run in a process of its own, its result collected)."""
    import submitit

    class LocalAutoExecutor(submitit.AutoExecutor):
        def __init__(self, folder, cluster=None, **kwargs):
            assert cluster == "slurm", cluster  # the launcher asked for SLURM
            super().__init__(folder, cluster="local", **kwargs)

    monkeypatch.setattr(submitit, "AutoExecutor", LocalAutoExecutor)


@pytest.mark.slow
@skip_without("slurm")
def test_slurm_config_runs_a_sweep_on_submitits_local_executor(tmp_path, capsys, monkeypatch):
    """hydra/launcher=slurm end to end, with submitit's local executor in place of sbatch: the
    plugin's SlurmLauncher builds the executor from slurm.yaml (its SLURM-only keys checked
    against submitit's SLURM executor as slurm_<key>), pickles each job and collects the
    results exactly as on a cluster; only the submission runs local processes."""
    from divo.data.builtin import ensure_builtin

    _submit_locally(monkeypatch)
    ensure_builtin("divo/bandit/multimodal-v0")  # the session's small bandit, for the jobs
    sweep = tmp_path / "sweep"
    args = ["train", "td3bc", "-m", "seed=0,1", "dataset=bandit", *SLURM_ON_CPU]  # fmt: skip
    code = main([*args, *TINY, f"hydra.sweep.dir={sweep}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "Submitit 'slurm' sweep output dir" in out.out + out.err
    assert _run_dirs(sweep) == SEED_DIRS
    for path in sweep.rglob("result.json"):
        assert json.loads(path.read_text())["steps"] == 4
    # each job ran in its own submitit process, which logged into the launcher's folder
    assert len(list((sweep / ".submitit").rglob("*_log.out"))) == 2


@pytest.mark.slow
@skip_without("slurm")
def test_a_failed_job_of_a_sweep_whose_folder_names_a_job_value_on_submitit(
    tmp_path, capsys, monkeypatch
):
    """SLURM through submitit's local executor: the jobs run in processes of their own; the
    failed job's record goes through the sweep's root, which cluster nodes share."""
    from divo.data.builtin import ensure_builtin

    _submit_locally(monkeypatch)
    ensure_builtin("divo/bandit/multimodal-v0")
    made = _record_temporary_files(monkeypatch)
    root = tmp_path / "shared"
    assert main([*_one_failed_job_by_steps(root), *SLURM_ON_CPU]) == 2
    _assert_one_failed_job_recorded_under(root, capsys.readouterr().err, made)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def ray_head():
    """A real one-node Ray cluster: `ray start --head` with 2 CPUs, no dashboard and a small
    object store, in a process group of its own; yields its address, then stops that group
    (never `ray stop`, which stops every Ray process on the machine)."""
    ray_cli = Path(sys.executable).with_name("ray")
    # Ray's socket paths live under --temp-dir and must stay short: not pytest's tmp_path
    temp_dir = tempfile.mkdtemp(prefix="divo-ray-", dir="/tmp")
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [str(ray_cli), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
               f"--ray-client-server-port={_free_port()}", "--num-cpus=2", "--num-gpus=0",
               "--include-dashboard=false", "--object-store-memory=100000000",
               f"--temp-dir={temp_dir}", "--disable-usage-stats"]  # fmt: skip
    start = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the head's processes (gcs, raylet, workers) share its group
    )
    try:
        log, _ = start.communicate(timeout=120)
        assert start.returncode == 0, f"ray start --head failed:\n{log[-3000:]}"
        yield f"127.0.0.1:{port}"
    finally:
        start.kill()  # (only if it never came up)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(start.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _process_group_alive(start.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if _process_group_alive(start.pid):
            os.killpg(start.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@skip_without("ray_cluster")
def test_ray_cluster_sweep_runs_two_jobs_on_a_running_cluster(ray_head, tmp_path):
    """`divo train ... -m hydra/launcher=ray_cluster`, as typed, against a running cluster
    found through RAY_ADDRESS (the shipped config's address: auto): both jobs run as Ray tasks
    in the cluster's worker processes and write their run directories."""
    from divo.data.builtin import ensure_builtin

    ensure_builtin("divo/bandit/multimodal-v0")  # the workers find it via MINARI_DATASETS_PATH
    sweep = tmp_path / "sweep"
    divo_cli = Path(sys.executable).with_name("divo")
    command = [str(divo_cli), "train", "td3bc", "-m", "seed=0,1", "dataset=bandit",
               "hydra/launcher=ray_cluster", *TINY, f"hydra.sweep.dir={sweep}"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_head, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "Ray Launcher is launching 2 jobs" in out
    assert "Connected to Ray cluster" in out and "Started a local Ray instance" not in out
    # the jobs' lines come back from the cluster's workers, prefixed with the task's name
    assert out.count("(_run_job pid=") >= 2
    assert _run_dirs(sweep) == SEED_DIRS
    for path in sweep.rglob("result.json"):
        result = json.loads(path.read_text())
        assert result["steps"] == 4 and result["normalized_score"] is not None


@pytest.mark.slow
@skip_without("ray_cluster")
def test_a_failed_job_of_a_sweep_whose_folder_names_a_job_value_on_a_ray_cluster(
    ray_head, tmp_path, capsys, monkeypatch
):
    """The same sweep on a running Ray cluster: the jobs run in the cluster's worker
    processes; the failed job's record goes through the sweep's root."""
    import ray

    from divo.data.builtin import ensure_builtin

    ensure_builtin("divo/bandit/multimodal-v0")
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    made = _record_temporary_files(monkeypatch)
    root = tmp_path / "shared"
    try:
        code = main([*_one_failed_job_by_steps(root), "hydra/launcher=ray_cluster"])
    finally:
        ray.shutdown()
    assert code == 2
    _assert_one_failed_job_recorded_under(root, capsys.readouterr().err, made)


@skip_without("ray_cluster")
@pytest.mark.parametrize("through", ["override", "RAY_ADDRESS"])
def test_a_ray_cluster_that_cannot_be_reached_is_one_line_naming_its_address(
    through, tmp_path, capsys, monkeypatch
):
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    args = ["train", "td3bc", "-m", "seed=0,1", "dataset=bandit", "hydra/launcher=ray_cluster",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    if through == "override":
        args.append(f"hydra.launcher.ray.init.address={address}")
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("divo: error: cannot connect to the Ray cluster at " + address)
    assert ("RAY_ADDRESS" if through == "RAY_ADDRESS" else "ray.init.address") in err[0]
    assert not (tmp_path / "sweep").exists()  # nothing launched, nothing left
