"""`divo study diffusion-ql-toy`: Diffusion-QL on its own toy (the data its public code builds)
and on divo's bandit; what the study measures is checked by hand, and one short run shows the
Q term moving the policy onto the best-paying mode's side of the square."""

from __future__ import annotations

import json

import pytest
import torch

from divo.cli import main
from divo.studies.diffusion_ql_toy import Task, landing, run_cell, study_config


def _paper_task(num_samples: int = 4000) -> Task:
    cfg = study_config([f"tasks.paper.num_samples={num_samples}"])
    return Task("paper", cfg.tasks.paper)


def test_paper_toy_data_is_the_papers_layout():
    task = _paper_task()
    data = task.data
    action, reward = data["action"], data["next", "reward"].squeeze(-1)
    assert action.shape == (4000, 2) and action.abs().max() <= 1.0
    assert data["next", "terminated"].all() and (data["observation"] == 0).all()
    mode = torch.cdist(action, task.centers).argmin(-1)
    assert torch.bincount(mode, minlength=4).tolist() == [1000] * 4  # equal shares
    for k, mean in enumerate([3.0, 0.0, 1.5, 5.0]):  # N(mu_k, 0.5^2) per mode
        assert reward[mode == k].mean().item() == pytest.approx(mean, abs=0.06)
        assert reward[mode == k].std().item() == pytest.approx(0.5, abs=0.04)
    assert task.best == 3 and task.centers[task.best].tolist() == pytest.approx([0.8, -0.8])


def test_landing_shares_and_scores_by_hand():
    cfg = study_config()
    task = _paper_task(400)
    # uniform actions: each quadrant equally likely -> mean reward (3 + 0 + 1.5 + 5) / 4
    assert task.random_reward == pytest.approx(2.375, abs=0.02)
    actions = torch.tensor([[0.8, -0.8], [1.0, -1.0], [0.9, -0.7], [-0.8, 0.8]])
    out = landing(task, actions, cfg)
    assert out["best_nearest"] == 0.75  # three of four in the best mode's quadrant
    assert out["on_best_mode"] == 0.5  # (0.8,-0.8) and (0.9,-0.7) within 0.2; the corner is not
    assert out["at_corner"] == 0.25
    mean = (5 + 5 + 5 + 3) / 4
    assert out["score"] == pytest.approx(
        100 * (mean - task.random_reward) / (5 - task.random_reward), rel=1e-3
    )
    ours = Task("ours", cfg.tasks.ours)  # divo's bandit pays its bumps: the corner pays e^-1
    assert ours.score(torch.tensor([[-0.8, 0.8]])) == pytest.approx(100.0)
    corner = float(ours.reward(torch.tensor([[-1.0, 1.0]])))
    assert corner == pytest.approx(torch.exp(torch.tensor(-1.0)).item(), rel=1e-3)


@pytest.mark.slow
def test_q_term_moves_samples_to_the_best_modes_side():
    """300 steps on the paper's toy: with eta = 1 most samples sit nearest the best mode; with
    eta = 0 (behaviour cloning only) about a quarter do."""
    cfg = study_config(["num_samples=300", "snapshots=1"])
    task = _paper_task()
    shares = {}
    for eta in (0.0, 1.0):
        cfg.variants.recipe.steps = 300
        cfg.variants.recipe.overrides = [f"diffusion_ql.actor_loss.eta={eta}"]
        record = run_cell(cfg, task, "recipe", 0, log=lambda *_: None)
        shares[eta] = record["snapshots"][-1]["best_nearest"]
    assert shares[0.0] < 0.45 and shares[1.0] > 0.8, shares


def test_study_command_keeps_cells_and_skips_them(tmp_path, capsys):
    results, page = tmp_path / "toy", tmp_path / "toy.md"
    argv = [
        "study",
        "diffusion-ql-toy",
        f"results={results}",
        f"page={page}",
        "seeds=[0]",
        "cells=[[ours,recipe],[paper,recipe]]",
        "variants.recipe.steps=4",
        "snapshots=2",
        "num_samples=20",
        "tasks.paper.num_samples=400",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    cells = sorted(p.name for p in (results / "cells").iterdir())
    assert cells == ["ours-recipe-seed0.json", "paper-recipe-seed0.json"]
    record = json.loads((results / "cells" / "ours-recipe-seed0.json").read_text())
    assert [s["step"] for s in record["snapshots"]] == [2, 4]
    assert len(record["snapshots"][0]["q_grid"]) == 41 and record["deployed"]["score"] is not None
    assert set(record["deployed_greedy"]) == set(record["deployed"])  # argmax of the same 50
    text = page.read_text()
    assert "| ours (" in text and "| paper (" in text and "figure.png" in text
    assert (results / "figure.png").stat().st_size > 5_000
    before = (results / "cells" / "ours-recipe-seed0.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    assert "steps" not in capsys.readouterr().out.split("wrote")[0]  # nothing retrained
    assert (results / "cells" / "ours-recipe-seed0.json").stat().st_mtime_ns == before
    # a lost cell is trained again; the page still covers the cells kept from before
    (results / "cells" / "paper-recipe-seed0.json").unlink()
    assert main(argv) == 0
    assert (results / "cells" / "paper-recipe-seed0.json").is_file()
    assert (results / "cells" / "ours-recipe-seed0.json").stat().st_mtime_ns == before
    assert "| ours (" in page.read_text() and "| paper (" in page.read_text()


def test_seed_intervals_are_student_t():
    from divo.studies.diffusion_ql_toy import _mean_ci

    assert _mean_ci([1.0, 2.0, 3.0]) == "2.00 +- 2.48"  # 4.303 x 1 / sqrt(3)
    assert _mean_ci([5.0]) == "5.00" and _mean_ci([]) == "-"


@pytest.mark.parametrize("variant, recipe", [("fql", "fql"), ("divo_flow", "divo")])
def test_fql_and_divo_with_a_flow_model_run_as_cells(variant, recipe):
    """The study's FQL and DIVO-with-flow rows: a cell of each runs through the same driver,
    records its recipe, samples of its policy (FQL's one-step actor, DIVO's flow proposals),
    the critic's grid and its deployed actions; no greedy pick (Diffusion-QL's only)."""
    cfg = study_config(["num_samples=50", "snapshots=1", "grid=5"])
    cfg.variants[variant].steps = 3
    task = Task("ours", cfg.tasks.ours)
    record = run_cell(cfg, task, variant, 0, log=lambda *_: None)
    assert record["recipe"] == recipe and "deployed_greedy" not in record
    snap = record["snapshots"][-1]
    assert len(snap["samples"]) == 50 and len(snap["q_grid"]) == 5
    assert 0.0 <= record["deployed"]["on_best_mode"] <= 1.0
