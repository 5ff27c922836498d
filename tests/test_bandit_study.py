"""`divo study bandit`: one command makes the figure and its numbers (tiny settings here); the
committed figure is linked from the docs (and the docs page from the README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from divo.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_one_command_makes_the_bandit_figure(tmp_path, capsys):
    out = tmp_path / "study.png"
    code = main(
        [
            "study",
            "bandit",
            "--out",
            str(out),
            "--runs",
            str(tmp_path / "runs"),
            "behavior_models.fit.steps=30",
            "behavior_models.num_samples=100",
            "policies.seeds=[0]",
            "policies.num_actions=20",
            "policies.overrides=[train.steps=20,train.eval_every=20,train.eval_episodes=2]",
            "rare.recipes=[divo]",
            "rare.seeds=[0]",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert out.is_file() and out.stat().st_size > 10_000
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert set(numbers["behavior_models"]) == {
        "data",
        "ddpm",
        "consistency",
        "consistency_1call",
        "cvae",
        "gaussian",
        "flow",
    }
    assert numbers["behavior_models"]["data"]["mode_shares"] == pytest.approx([0.25] * 4, abs=1e-3)
    assert set(numbers["policies"]) == {
        "divo",
        "uniform_weight",
        "soft_weight",
        "divo_flow",
        "td3bc",
        "diffusion_ql",
        "iql",
        "idql",
        "fql",
    }
    # a row: a recipe with overrides of its own
    flow_run = (tmp_path / "runs" / "divo_flow-seed0" / "config.yaml").read_text()
    assert "recipe: divo" in flow_run and "FlowMatching" in flow_run
    run = numbers["policies"]["diffusion_ql"]["runs"][0]
    assert run["seed"] == 0 and isinstance(run["normalized_score"], float)
    # part 3: the rare-best bandit's rows, trained on that dataset
    rare = json.loads((tmp_path / "study_rare.json").read_text())
    assert rare["data_mode_shares"][0] == pytest.approx(0.05)
    assert set(rare["policies"]) == {"divo"} and len(rare["policies"]["divo"]["runs"]) == 1
    rare_run = (tmp_path / "runs" / "rare" / "divo-seed0" / "config.yaml").read_text()
    assert "divo/bandit/rare-best-v0" in rare_run


def test_the_rare_part_runs_alone(tmp_path, capsys):
    out = tmp_path / "study.png"
    args = ["study", "bandit", "--out", str(out), "--rare-only", "rare.recipes=[td3bc]"]
    args += ["rare.seeds=[1]", "policies.num_actions=10"]
    args += ["policies.overrides=[train.steps=10,train.eval_every=10,train.eval_episodes=1]"]
    assert main(args) == 0, capsys.readouterr().err
    assert not out.exists()  # parts 1 and 2 did not run
    rare = json.loads((tmp_path / "study_rare.json").read_text())
    assert [r["seed"] for r in rare["policies"]["td3bc"]["runs"]] == [1]
    assert main([*args, "--models-only"]) == 2


def test_study_settings_errors_are_one_line(capsys):
    assert main(["study", "bandit", "policies.seeds"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_the_committed_figure_is_linked_from_the_docs():
    assert (ROOT / "docs" / "bandit_study.png").is_file()
    assert "](bandit_study.png)" in (ROOT / "docs" / "bandit_study.md").read_text()
    assert "](docs/bandit_study.md)" in (ROOT / "README.md").read_text()
