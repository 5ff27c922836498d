"""A policy file or checkpoint is data: loading one never runs what the file says.

Each attack writes a marker file if it runs; divo must refuse the file in one line, the marker
must not exist afterwards and (for `divo train <run>`) the run directory must be unchanged. On
code that unpickles files or instantiates any `_target_` these tests fail: the marker appears.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.envs.registration import EnvSpec
from test_resume import assert_same_training_state, final_state, snapshot

from divo.agents.policy_io import load_policy
from divo.agents.train import train
from divo.behavior_models import GaussianBehavior
from divo.cli import main
from divo.config import compose_recipe
from divo.errors import CheckpointError, UntrustedFileError
from divo.files import CHECKSUM_KEY, atomic_save, content_sha256

SHORT = [
    "dataset=bandit",
    "train.steps=4",
    "train.eval_every=4",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "train.eval_episodes=1",
    "train.batch_size=32",
    "train.progress=false",
    "critic.network.hidden=[16,16]",
    "actor.network.hidden=[16,16]",
]


class CreatesFile:
    """Unpickling this object creates ``path`` (what a hostile pickle could do instead)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class MyGaussian(GaussianBehavior):
    """A plugged-in behaviour model, defined outside divo (in this test module)."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 4-step TD3+BC run on the bandit, with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(compose_recipe("td3bc", SHORT), run)
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _read(path: Path) -> dict:
    return torch.load(path, weights_only=True)  # every file divo writes is plain data


def _save(payload: dict, path: Path) -> None:
    """Write an edited file as an attacker would: with the checksum of what it now holds, so
    that what refuses it is the check of its contents, not the checksum."""
    payload = {k: v for k, v in payload.items() if k != CHECKSUM_KEY}
    payload[CHECKSUM_KEY] = content_sha256(payload)
    torch.save(payload, path)


def _one_line_error(args, capsys) -> str:
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("divo: error: "), err
    return err[0]


def _outside_env_module(tmp_path: Path, monkeypatch, marker: Path) -> str:
    """An importable module outside divo and gymnasium whose import creates ``marker``; returns
    the JSON of an environment spec whose entry point is in it."""
    (tmp_path / "outside_env_mod.py").write_text(
        f"open({str(marker)!r}, 'w')\nimport gymnasium\nEnv = gymnasium.Env\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = EnvSpec(id="OutsideEnv-v0", entry_point="outside_env_mod:Env", max_episode_steps=1)
    return spec.to_json()


# --- policy.pt through `divo evaluate` and load_policy -----------------------------------------


def test_every_file_of_a_run_loads_as_plain_data(trained):
    assert _read(trained / "policy.pt")["format"] == "divo-policy-v2"
    for ckpt in (trained / "checkpoints").glob("step_*.pt"):
        assert _read(ckpt)["format"] == "divo-checkpoint-v3"


def test_divo_evaluate_scores_a_run_as_its_own_evaluations_did(tmp_path, capsys):
    """By default `divo evaluate <run>` uses the run's evaluation episodes and seed + 100 (it
    used 10 episodes from seed 100 whatever the run did): a deterministic actor's final
    evaluation is reproduced, for any seed."""
    run = tmp_path / "run"
    train(compose_recipe("td3bc", [*SHORT, "seed=3", "train.eval_episodes=3"]), run)
    result = json.loads((run / "result.json").read_text())
    for path in (run, run / "policy.pt"):
        capsys.readouterr()
        assert main(["evaluate", str(path), "--json"]) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["episodes"] == 3 and again["seed"] == 103
        assert again["return_mean"] == result["return_mean"]
        assert again["normalized_score"] == result["normalized_score"]
    assert main(["evaluate", str(run), "--json", "--episodes", "1", "--seed", "7"]) == 0
    given = json.loads(capsys.readouterr().out)
    assert given["episodes"] == 1 and given["seed"] == 7
    # a config.yaml that is there but unreadable is never silently the defaults (10 from 100)
    (run / "config.yaml").write_text("evil: !!python/name:os.system\n")
    line = _one_line_error(["evaluate", str(run), "--episodes", "1"], capsys)
    assert "config.yaml cannot be read" in line and "--seed" in line
    assert main(["evaluate", str(run), "--json", "--episodes", "1", "--seed", "7"]) == 0
    assert json.loads(capsys.readouterr().out)["return_mean"] == given["return_mean"]
    # a readable config.yaml that is not a divo run's (a policy copied elsewhere): defaults
    (run / "config.yaml").write_text("model: other\n")
    assert main(["evaluate", str(run), "--json", "--episodes", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 100


def test_a_pickled_object_in_a_policy_file_is_refused_and_never_runs(run, tmp_path, capsys):
    marker = tmp_path / "marker"
    payload = _read(run / "policy.pt")
    payload["ref_min_score"] = CreatesFile(marker)
    _save(payload, run / "policy.pt")
    line = _one_line_error(["evaluate", str(run), "--episodes", "1"], capsys)
    assert "holds a pickled Python object (io.open)" in line
    assert "convert" not in line.replace(str(run), "")  # `divo convert` would refuse it too
    with pytest.raises(UntrustedFileError):
        load_policy(run)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("target", "args"),
    [
        ("os.system", ["touch {marker}"]),
        ("builtins.exec", ["open({marker!r}, 'w')"]),
        ("builtins.open", ["{marker}", "w"]),  # not on Hydra's own blocklist
        ("divo.agents.runtime.os.system", ["touch {marker}"]),  # divo's path, not divo's class
        ("divo.files.atomic_save", [{}, "{marker}"]),  # divo's, but not a torch module
    ],
)
def test_a_policy_config_naming_code_is_refused_without_the_call(run, tmp_path, target, args):
    marker = tmp_path / "marker"
    payload = _read(run / "policy.pt")
    fill = [a.format(marker=str(marker)) if isinstance(a, str) else a for a in args]
    payload["policy_config"]["actor"] = {"_target_": target, "_args_": fill}
    _save(payload, run / "policy.pt")
    with pytest.raises(
        UntrustedFileError, match=f"_target_={target} \\(at actor._target_\\)"
    ) as err:
        load_policy(run)
    assert not marker.exists()
    if target.split(".")[0] in ("os", "builtins"):  # never offered as something to trust
        assert "--trust" not in str(err.value) and "do not load it" in str(err.value)


@pytest.mark.parametrize("module", ["os", "builtins", "subprocess.run"])
def test_the_standard_library_is_never_trusted(run, module):
    from divo.errors import ConfigError

    with pytest.raises(ConfigError, match="standard library"):
        load_policy(run, trust=[module])


def test_an_outside_target_names_the_way_to_trust_it(run, capsys):
    payload = _read(run / "policy.pt")
    payload["policy_config"]["actor"]["_target_"] = "my_pkg.models.Actor"
    _save(payload, run / "policy.pt")
    line = _one_line_error(["evaluate", str(run)], capsys)
    assert "names _target_=my_pkg.models.Actor" in line
    assert "--trust my_pkg (trust=['my_pkg'] in Python)" in line


def test_an_interpolation_in_a_policy_config_is_refused(run, tmp_path):
    marker = tmp_path / "marker"
    payload = _read(run / "policy.pt")  # oc.create would build a node with its own _target_
    payload["policy_config"]["actor"] = "${oc.create:{_target_: os.system, _args_: "
    payload["policy_config"]["actor"] += f"['touch {marker}']}}}}"
    _save(payload, run / "policy.pt")
    with pytest.raises(UntrustedFileError, match="holds an interpolation at actor"):
        load_policy(run)
    assert not marker.exists()


def test_an_environment_outside_gymnasium_and_divo_is_refused(run, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker"
    payload = _read(run / "policy.pt")
    payload["env_spec"] = _outside_env_module(tmp_path, monkeypatch, marker)
    _save(payload, run / "policy.pt")
    line = _one_line_error(["evaluate", str(run), "--episodes", "1"], capsys)
    assert "environment OutsideEnv-v0 with entry_point outside_env_mod:Env" in line
    assert "--trust outside_env_mod" in line
    assert not marker.exists()
    # a function inside gymnasium is no environment either
    spec = json.loads(payload["env_spec"])
    spec["entry_point"] = "gymnasium.envs.registration:make"
    payload["env_spec"] = json.dumps(spec)
    _save(payload, run / "policy.pt")
    with pytest.raises(UntrustedFileError, match="make, which is not a gymnasium.core.Env"):
        load_policy(run)


def test_a_wrapper_that_writes_files_is_refused_in_a_files_environment(run, tmp_path):
    """RecordVideo is gymnasium's, so its module is allowed, but it writes videos where the
    file's arguments say: a policy file naming it is refused before any environment is made."""
    payload = _read(run / "policy.pt")
    spec = json.loads(payload["env_spec"])
    spec["additional_wrappers"] = [
        {
            "name": "RecordVideo",
            "entry_point": "gymnasium.wrappers.rendering:RecordVideo",
            "kwargs": {"video_folder": str(tmp_path / "videos")},
        }
    ]
    payload["env_spec"] = json.dumps(spec)
    _save(payload, run / "policy.pt")
    with pytest.raises(UntrustedFileError, match="RecordVideo, which writes files"):
        load_policy(run)
    assert not (tmp_path / "videos").exists()


# --- a checkpoint given to `divo train <run>` ----------------------------------------------


def _newest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*.pt"))[-1]


def test_a_pickled_object_in_a_checkpoint_stops_the_resume(run, tmp_path, capsys):
    marker = tmp_path / "marker"
    ckpt = _read(_newest(run))
    ckpt["last_eval"] = CreatesFile(marker)
    _save(ckpt, _newest(run))
    before = snapshot(run)
    line = _one_line_error(["train", str(run), "train.steps=6", "--quiet"], capsys)
    assert "step_000000004.pt holds a pickled Python object (io.open)" in line
    assert not marker.exists()
    assert snapshot(run) == before  # no fallback to the older checkpoint, no new files


@pytest.mark.parametrize("target", ["os.system", "builtins.open"])
def test_a_run_config_naming_code_is_refused_without_the_call(run, tmp_path, target, capsys):
    marker = tmp_path / "marker"
    config = (run / "config.yaml").read_text()
    selector = "selector:\n  _target_: divo.objectives.DatasetSelector\n"
    assert selector in config
    args = f"  - touch {marker}\n" if target == "os.system" else f"  - {marker}\n  - w\n"
    evil = f"selector:\n  _target_: {target}\n  _args_:\n{args}"
    (run / "config.yaml").write_text(config.replace(selector, evil))
    before = snapshot(run)
    line = _one_line_error(["train", str(run), "train.steps=6", "--quiet"], capsys)
    assert f"config.yaml names _target_={target} (at selector._target_)" in line
    assert not marker.exists()
    assert snapshot(run) == before


@pytest.mark.parametrize("where", ["config", "policy"])
def test_a_checkpoint_naming_code_is_refused(run, tmp_path, where, capsys):
    ckpt = _read(_newest(run))
    evil = {"_target_": "builtins.exec", "_args_": [f"open({str(tmp_path / 'm')!r}, 'w')"]}
    if where == "config":
        ckpt["config"]["selector"] = evil
    else:
        ckpt["policy"]["policy_config"]["actor"] = evil
    _save(ckpt, _newest(run))
    before = snapshot(run)
    line = _one_line_error(["train", str(run), "train.steps=6", "--quiet"], capsys)
    assert "step_000000004.pt names _target_=builtins.exec" in line
    assert snapshot(run) == before


def test_a_checkpoint_with_an_outside_environment_is_refused(run, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker"
    ckpt = _read(_newest(run))
    ckpt["policy"]["env_spec"] = _outside_env_module(tmp_path, monkeypatch, marker)
    _save(ckpt, _newest(run))
    before = snapshot(run)
    line = _one_line_error(["train", str(run), "train.steps=6", "--quiet"], capsys)
    assert "environment OutsideEnv-v0 with entry_point outside_env_mod:Env" in line
    assert not marker.exists()
    assert snapshot(run) == before


# --- plug-ins: their module trusted by name -------------------------------------------------


def test_a_plugged_in_model_loads_once_its_module_is_trusted(tmp_path, capsys):
    """`resampling` deploys a sampler over the behaviour model: policy.pt names the plug-in."""
    run = tmp_path / "run"
    recipe = [
        *SHORT,
        "behavior_model=gaussian",
        f"behavior_model._target_={__name__}.MyGaussian",
        "behavior_model.hidden=[16,16]",
        "value.network.hidden=[16,16]",
    ]
    cfg = compose_recipe("resampling", recipe)
    train(cfg, run)
    target = f"{__name__}.MyGaussian"
    assert _read(run / "policy.pt")["policy_config"]["behavior_model"]["_target_"] == target
    line = _one_line_error(["evaluate", str(run), "--episodes", "1"], capsys)
    assert f"names _target_={target}" in line and f"--trust {__name__}" in line
    assert main(["evaluate", str(run), "--episodes", "1", "--trust", __name__]) == 0
    policy, _ = load_policy(run, trust=[__name__])
    assert isinstance(policy.behavior_model, MyGaussian)
    # resuming: the run's config.yaml names it too; Python callers name it in their cfg
    line = _one_line_error(["train", str(run), "train.steps=6", "--quiet"], capsys)
    assert f"config.yaml names _target_={target}" in line
    assert main(["train", str(run), "train.steps=6", "--quiet", f"--trust={__name__}"]) == 0
    assert train(compose_recipe("resampling", [*recipe, "train.steps=8"]), run)["steps"] == 8


def test_trust_must_name_a_module(run, capsys):
    line = _one_line_error(["evaluate", str(run), "--trust", "my pkg"], capsys)
    assert "trust='my pkg' is not a module name" in line


# --- files of the previous format: `divo convert` -------------------------------------------


def _as_version_one(path: Path) -> None:
    """Rewrite a checkpoint as divo-checkpoint-v1 wrote it (NumPy's RNG state pickled, no
    checksum)."""
    ckpt = _read(path)
    del ckpt[CHECKSUM_KEY]
    ckpt["policy"]["format"] = "divo-policy-v1"
    np_state = ckpt["rng"]["numpy"]
    ckpt["rng"]["numpy"] = (
        np_state["kind"],
        np_state["keys"].numpy().astype(np.uint32),
        np_state["pos"],
        np_state["has_gauss"],
        np_state["cached_gaussian"],
    )
    ckpt["format"] = "divo-checkpoint-v1"
    torch.save(ckpt, path)


def test_old_checkpoints_are_refused_then_converted_and_resume_exactly(tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    train(compose_recipe("td3bc", [*SHORT, "train.steps=6"]), full)
    train(compose_recipe("td3bc", SHORT), part)
    for ckpt in (part / "checkpoints").glob("step_*.pt"):
        _as_version_one(ckpt)
    line = _one_line_error(["train", str(part), "train.steps=6", "--quiet"], capsys)
    assert f"convert it with `divo convert {_newest(part)}`" in line
    assert main(["convert", str(part)]) == 0
    out = capsys.readouterr().out
    assert "step_000000004.pt: divo-checkpoint-v1 -> divo-checkpoint-v3" in out
    assert "policy.pt: already plain data with a checksum" in out
    assert main(["train", str(part), "train.steps=6", "--quiet"]) == 0
    assert_same_training_state(final_state(full), final_state(part))


def test_convert_refuses_an_object_no_divo_wrote_and_keeps_the_file(run, tmp_path, capsys):
    payload = _read(run / "policy.pt")
    payload["ref_min_score"] = np.float64(1.0)  # a NumPy scalar: an object, not plain data
    _save(payload, run / "policy.pt")
    before = (run / "policy.pt").read_bytes()
    line = _one_line_error(["convert", str(run / "policy.pt")], capsys)
    assert "holds a pickled Python object (numpy." in line
    assert "convert" not in line.replace(str(run), "")
    assert (run / "policy.pt").read_bytes() == before


def test_divo_never_writes_a_file_it_would_not_load(tmp_path):
    with pytest.raises(CheckpointError, match="would hold a pickled"):
        atomic_save({"x": CreatesFile(tmp_path / "marker")}, tmp_path / "f.pt")
    assert not (tmp_path / "f.pt").exists() and not (tmp_path / "marker").exists()


def test_evaluate_set_deploys_a_saved_policy_with_one_of_its_settings_changed(tmp_path, capsys):
    """IDQL's trained model deployed with its code's argmax pick or another sample count
    (IDQL's inference sweep), without retraining; bad keys and values are refused in one line."""
    run = tmp_path / "idql"
    small = ["behavior_model.hidden=[16,16]", "value.network.hidden=[16,16]"]
    train(compose_recipe("idql", [*SHORT[:-1], *small]), run)
    policy, meta = load_policy(run, settings={"selection": "argmax", "num_samples": 8})
    assert (policy.selection, policy.num_samples) == ("argmax", 8)
    assert meta["settings"] == {"selection": "argmax", "num_samples": 8}
    assert load_policy(run)[0].selection == "expectile"  # the file itself is unchanged
    capsys.readouterr()
    args = ["evaluate", str(run), "--episodes", "1", "--json"]
    assert main([*args, "--set", "selection=argmax"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"] == {"selection": "argmax"}
    err = _one_line_error([*args, "--set", "temperature=1"], capsys)
    assert "no setting 'temperature'; its settings: expectile, num_samples, selection" in err
    err = _one_line_error([*args, "--set", "selection=greedy"], capsys)
    assert "selection='greedy' is not an IDQL selection" in err
    err = _one_line_error([*args, "--set", "selection=${oc.env:HOME}"], capsys)
    assert "interpolation" in err
    assert "write KEY=VALUE" in _one_line_error([*args, "--set", "argmax"], capsys)


def test_an_actor_policy_has_no_settings_to_change(run, capsys):
    err = _one_line_error(["evaluate", str(run), "--set", "num_samples=4"], capsys)
    assert "has no setting 'num_samples'; its settings: none" in err
