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


def test_study_settings_errors_are_one_line(capsys):
    assert main(["study", "bandit", "policies.seeds"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_the_committed_figure_is_linked_from_the_docs():
    assert (ROOT / "docs" / "bandit_study.png").is_file()
    assert "](bandit_study.png)" in (ROOT / "docs" / "bandit_study.md").read_text()
    assert "](docs/bandit_study.md)" in (ROOT / "README.md").read_text()
