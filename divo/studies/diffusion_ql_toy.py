"""Diffusion-QL on its own toy: where its policy's samples land, and why.

``divo study diffusion-ql-toy [key=value ...] [--page-only]`` trains the ``diffusion_ql``
recipe on two four-mode 2-D bandits, Diffusion-QL's own toy (rewards drawn per mode, as its
public code builds it) and divo's bandit (reward bumps around each mode centre), under several
settings (``recipes/study/diffusion_ql_toy.yaml``). Each (task, variant, seed) cell is trained
step by step through :class:`divo.agents.step.TrainStep`; at evenly spaced snapshot steps it
records

* where the policy's own samples land: the share whose nearest mode is the best-paying one, the
  share on the best mode (within ``on_mode_radius`` of its centre) and the share at a corner of
  the action square, with their mean reward;
* the critic's min(Q1, Q2) over a lattice of the action square (what the Q term climbs);

and at the end the same shares for the deployed policy (Diffusion-QL's: 50 samples, one drawn by
softmax(Q)). A variant may name another ``recipe`` (FQL, DIVO with a flow model): its samples
are what that recipe's policy samples (:func:`policy_samples`), its deployed policy its own.
A finished cell's numbers go to ``<results>/cells/<task>-<variant>-seed<k>.json`` and are not
recomputed by a later call; the page (``docs/diffusion_ql_toy.md``), a figure and a JSON file of
the table are rewritten after every cell.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from divo.files import write_json_atomic
from divo.studies.runner import run_cells, study_arguments, study_settings

STUDY_CONFIG = "study/diffusion_ql_toy.yaml"


def study_config(overrides: Sequence[str] = ()) -> Any:
    """The study's settings (``recipes/study/diffusion_ql_toy.yaml``) with dot-list overrides
    applied; unknown keys are refused."""
    return study_settings(STUDY_CONFIG, overrides)


# ------------------------------------------------------------------------------------- tasks
class Task:
    """A four-mode bandit: its data (TED TensorDict), mode centres and the reward of actions."""

    def __init__(self, name: str, spec: Any) -> None:
        import numpy as np
        import torch

        self.name = name
        self.label = str(spec.label)
        if spec.get("dataset"):
            from divo.data.bandit import MODE_CENTERS, MODE_PAYOFFS
            from divo.data.load import load_offline_data

            self.data = load_offline_data(str(spec.dataset)).data
            self.centers = torch.as_tensor(MODE_CENTERS)
            self.mode_values = torch.as_tensor(MODE_PAYOFFS)
            self.per_mode = False
        else:
            self.centers = torch.tensor(list(spec.centers), dtype=torch.float32)
            self.mode_values = torch.tensor(list(spec.reward_means), dtype=torch.float32)
            self.data = paper_toy_data(
                int(spec.num_samples),
                self.centers,
                self.mode_values,
                reward_std=float(spec.reward_std),
                mode_std=float(spec.mode_std),
                seed=int(spec.data_seed),
            )
            self.per_mode = True
        self.best = int(self.mode_values.argmax())
        # score 0 = a uniform random action, 100 = the best mode's centre
        rng = np.random.default_rng(12345)
        uniform = torch.as_tensor(rng.uniform(-1, 1, (200_000, 2)), dtype=torch.float32)
        self.random_reward = float(self.reward(uniform).mean())
        self.best_reward = float(self.reward(self.centers[self.best : self.best + 1]).mean())

    def reward(self, actions):
        """Expected reward of actions [n, 2]: divo's bandit pays its reward bumps; the paper's
        toy pays the mean reward of the nearest mode (its data give rewards per mode only)."""
        import torch

        if not self.per_mode:
            from divo.data.bandit import bandit_reward

            return torch.as_tensor(bandit_reward(actions.numpy()))
        return self.mode_values[torch.cdist(actions, self.centers).argmin(-1)]

    def score(self, actions) -> float:
        mean = float(self.reward(actions).mean())
        return 100.0 * (mean - self.random_reward) / (self.best_reward - self.random_reward)


def paper_toy_data(num_samples, centers, reward_means, *, reward_std, mode_std, seed):
    """Diffusion-QL's toy data as a TED TensorDict (one-step episodes, a constant zero state):
    actions equally from the modes, N(centre, mode_std^2) clipped to [-1, 1]; rewards
    N(mean of the mode, reward_std^2)."""
    import torch
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(seed)
    mode = torch.arange(num_samples) % len(centers)
    mode = mode[torch.randperm(num_samples, generator=g)]
    action = (centers[mode] + mode_std * torch.randn(num_samples, 2, generator=g)).clamp(-1, 1)
    reward = reward_means[mode] + reward_std * torch.randn(num_samples, generator=g)
    obs = torch.zeros(num_samples, 1)
    done = torch.ones(num_samples, 1, dtype=torch.bool)
    return TensorDict(
        {
            "observation": obs,
            "action": action,
            "next": {
                "observation": obs.clone(),
                "reward": reward[:, None],
                "terminated": done,
                "truncated": torch.zeros_like(done),
                "done": done.clone(),
            },
        },
        batch_size=[num_samples],
    )


def landing(task: Task, actions, cfg: Any) -> dict[str, float]:
    """Where actions [n, 2] land: nearest mode = best, on the best mode, at a corner; score."""
    import torch

    dist = torch.cdist(actions, task.centers)
    nearest = dist.argmin(-1)
    corner = (actions.abs() > float(cfg.corner)).all(-1)
    return {
        "best_nearest": float((nearest == task.best).float().mean()),
        "on_best_mode": float((dist[:, task.best] < float(cfg.on_mode_radius)).float().mean()),
        "at_corner": float(corner.float().mean()),
        "score": task.score(actions),
    }


# ------------------------------------------------------------------------------------- cells
def cell_path(cfg: Any, task: str, variant: str, seed: int) -> Path:
    return Path(cfg.results) / "cells" / f"{task}-{variant}-seed{seed}.json"


def run_cell(cfg: Any, task: Task, variant: str, seed: int, log=print) -> dict:
    """Train one cell and return its record (snapshots of samples, critic lattice, shares).
    Runs on one CPU thread (small networks: fastest, and leaves the other cores alone)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_cell(cfg, task, variant, seed, log)
    finally:
        torch.set_num_threads(threads)


def _run_cell(cfg: Any, task: Task, variant: str, seed: int, log=print) -> dict:
    import torch

    from divo.agents.builder import build_agent
    from divo.agents.step import DeviceSampler, TrainStep
    from divo.config import compose_recipe

    spec = cfg.variants[variant]
    steps = int(spec.steps)
    overrides = ["dataset=bandit", f"seed={seed}", "device=cpu", *list(spec.overrides)]
    name = str(spec.get("recipe", "diffusion_ql"))
    recipe = compose_recipe(name, overrides)
    torch.manual_seed(seed)
    agent = build_agent(
        recipe, observation_dim=1, action_dim=2, obs_mean=torch.zeros(1), obs_std=torch.ones(1)
    )
    sampler = DeviceSampler(task.data, int(recipe.train.batch_size))
    step = TrainStep(agent, sampler.sample, mode="none")
    n = int(cfg.snapshots)
    at = sorted({max(1, round(steps * (i + 1) / n)) for i in range(n)})
    lattice = torch.linspace(-1, 1, int(cfg.grid))
    grid = torch.cartesian_prod(lattice, lattice)  # [(x0, y0), (x0, y1), ...]: row = x
    draw = torch.Generator().manual_seed(10_000 + seed)
    snapshots, start = [], time.perf_counter()
    for i in range(1, steps + 1):
        metrics = step()
        if i not in at:
            continue
        with torch.no_grad():
            samples = policy_samples(agent, int(cfg.num_samples), draw).reshape(-1, 2)
            q = (
                agent.critic(torch.zeros(len(grid), 1), grid)
                .min(0)
                .values.reshape(len(lattice), -1)
            )
            best_centre = task.centers[task.best : task.best + 1]
            q_best = float(agent.critic(torch.zeros(1, 1), best_centre).min(0).values)
        arg = int(q.argmax())
        snap = {
            "step": i,
            **landing(task, samples, cfg),
            "q_at_best_centre": q_best,
            "q_max": float(q.max()),
            "q_argmax": [round(float(v), 3) for v in grid[arg]],
            # how far the policy is from the data: the BC term (Diffusion-QL), the
            # distillation term (FQL), None for DIVO (its actor's BC is on its targets)
            "actor_bc": next(
                (float(metrics[k]) for k in ("actor_bc", "actor_distill") if k in metrics), None
            ),
            "samples": [[round(float(x), 3), round(float(y), 3)] for x, y in samples[:200]],
            "q_grid": [[round(float(v), 3) for v in row] for row in q],
        }
        snapshots.append(snap)
        log(
            f"    step {i}: nearest-best {snap['best_nearest']:.2f}, on best mode "
            f"{snap['on_best_mode']:.2f}, at a corner {snap['at_corner']:.2f}, score "
            f"{snap['score']:.1f}; Q(best centre) {q_best:.2f}, max Q {snap['q_max']:.2f} at "
            f"{snap['q_argmax']} [{time.perf_counter() - start:.0f} s]"
        )
    with torch.no_grad():
        deployed = agent.policy(torch.zeros(int(cfg.num_samples), 1))
    record = {
        "task": task.name,
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "overrides": list(spec.overrides),
        "snapshots": snapshots,
        "deployed": landing(task, deployed, cfg),
        "deployed_samples": [[round(float(x), 3), round(float(y), 3)] for x, y in deployed[:200]],
        "seconds": round(time.perf_counter() - start, 1),
    }
    if name != "diffusion_ql":
        return {**record, "recipe": name}
    from divo.objectives.selectors import ResamplingPolicy

    settings = {**agent.eval_settings, "temperature": 0.0}
    greedy = ResamplingPolicy(agent.normalizer, agent.actor, agent.critic_target, **settings)
    with torch.no_grad():
        deployed_greedy = greedy(torch.zeros(int(cfg.num_samples), 1))
    record["deployed_greedy"] = landing(task, deployed_greedy, cfg)  # argmax Q of the 50
    return record


def policy_samples(agent: Any, n: int, generator: Any) -> Any:
    """``n`` draws of what the recipe's policy samples at the bandit's one state: Diffusion-QL's
    diffusion policy, FQL's one-step actor (fresh noise each), and for DIVO (a deterministic
    actor) the behaviour model whose samples guide it."""
    import torch

    obs = torch.zeros(n, 1)
    sample = getattr(agent.actor, "sample", None)
    if sample is not None:
        return sample(obs, generator=generator)
    return agent.behavior_model.sample(obs[:1], n, generator=generator)[0]


def cell_done(cfg: Any, task: str, variant: str, seed: int) -> dict | None:
    path = cell_path(cfg, task, variant, seed)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("steps") == int(cfg.variants[variant].steps) else None


# -------------------------------------------------------------------------------------- page
# two-sided 95% Student-t quantiles by degrees of freedom (few seeds: wider than 1.96)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _mean_ci(values: Sequence[float]) -> str:
    """``mean +- half-width`` of a Student-t 95% interval over seeds (the mean alone for one)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return f"{v.mean():.2f}" if len(v) else "-"
    half = T95.get(len(v) - 1, 1.96) * v.std(ddof=1) / np.sqrt(len(v))
    return f"{v.mean():.2f} +- {half:.2f}"


def summary_rows(cfg: Any, records: list[dict]) -> list[dict]:
    """One row per (task, variant): final shares per seed and their mean with a Student-t 95% CI."""
    rows = []
    for task, variant in cfg.cells:
        runs = [r for r in records if r["task"] == task and r["variant"] == variant]
        if not runs:
            continue
        final = [r["snapshots"][-1] for r in runs]
        rows.append(
            {
                "task": task,
                "variant": variant,
                "seeds": [r["seed"] for r in runs],
                "steps": runs[0]["steps"],
                **{
                    key: [round(f[key], 1 if key == "score" else 3) for f in final]
                    for key in ("best_nearest", "on_best_mode", "at_corner", "score")
                },
                "deployed_score": [round(r["deployed"]["score"], 1) for r in runs],
                "deployed_on_best_mode": [round(r["deployed"]["on_best_mode"], 3) for r in runs],
                "greedy_score": [
                    round(r["deployed_greedy"]["score"], 1) for r in runs if "deployed_greedy" in r
                ],
                "q_corner_minus_centre": [
                    round(f["q_max"] - f["q_at_best_centre"], 3) for f in final
                ],
            }
        )
    return rows


def make_figure(cfg: Any, tasks: dict[str, Task], records: list[dict], path: Path) -> None:
    """One row per (task, variant), seed 0 (else the first seed): the critic's min Q over the
    action square with the policy's samples at each snapshot, then the deployed actions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = []
    for task, variant in cfg.cells:
        runs = sorted(
            (r for r in records if r["task"] == task and r["variant"] == variant),
            key=lambda r: r["seed"],
        )
        if runs:
            rows.append(runs[0])
    if not rows:
        return
    ncols = max(len(r["snapshots"]) for r in rows) + 1
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(2.3 * ncols, 2.4 * len(rows)), squeeze=False
    )
    lattice = np.linspace(-1, 1, int(cfg.grid))
    for ax_row, record in zip(axes, rows, strict=True):
        task = tasks[record["task"]]
        centers = task.centers.numpy()
        for ax, snap in zip(ax_row, record["snapshots"], strict=False):
            q = np.asarray(snap["q_grid"])
            ax.contourf(lattice, lattice, q.T, levels=14, cmap="viridis")  # q[x, y]
            s = np.asarray(snap["samples"])
            ax.scatter(s[:, 0], s[:, 1], s=3, color="tab:red", alpha=0.5, rasterized=True)
            ax.scatter(centers[:, 0], centers[:, 1], marker="+", color="w", s=30)
            ax.set_title(
                f"step {snap['step']}: on best {snap['on_best_mode']:.2f}, corner "
                f"{snap['at_corner']:.2f}\nscore {snap['score']:.0f}; "
                f"Q {q.min():.2f} to {q.max():.2f}",
                fontsize=7,
            )
        ax = ax_row[len(record["snapshots"])]
        d = np.asarray(record["deployed_samples"])
        ax.scatter(centers[:, 0], centers[:, 1], marker="+", color="k", s=30)
        ax.scatter(d[:, 0], d[:, 1], s=5, color="tab:purple", alpha=0.5, rasterized=True)
        dep = record["deployed"]
        how = {"fql": "one-step actor", "divo": "DIVO's actor"}.get(
            record.get("recipe", "diffusion_ql"), "softmax Q of 50"
        )
        ax.set_title(
            f"deployed ({how})\non best {dep['on_best_mode']:.2f}, score {dep['score']:.0f}",
            fontsize=7,
        )
        for extra in ax_row[len(record["snapshots"]) + 1 :]:
            extra.axis("off")
        ax_row[0].set_ylabel(
            f"{record['task']} / {record['variant']}\nseed {record['seed']}", fontsize=8
        )
        for a in ax_row:
            a.set_xlim(-1.05, 1.05)
            a.set_ylim(-1.05, 1.05)
            a.set_aspect("equal")
            a.set_xticks([-1, 0, 1])
            a.set_yticks([-1, 0, 1])
            a.tick_params(labelsize=6)
    fig.suptitle(
        "Diffusion-QL on four-mode bandits: the critic's min(Q1, Q2) over the action square "
        "(colour) and the policy's samples (red) during training; white +: mode centres",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_page(cfg: Any, tasks: dict[str, Task] | None = None, log=print) -> Path:
    """Rewrite the figure, the table's JSON and the page from the finished cells."""
    results = Path(cfg.results)
    records = [
        r
        for task, variant in cfg.cells
        for seed in cfg.seeds
        if (r := cell_done(cfg, task, variant, int(seed))) is not None
    ]
    tasks = dict(tasks or {})
    for name in {r["task"] for r in records} - set(tasks):
        tasks[name] = Task(name, cfg.tasks[name])
    figure = results / "figure.png"
    make_figure(cfg, tasks, records, figure)
    rows = summary_rows(cfg, records)
    write_json_atomic(results / "summary.json", rows)
    page = Path(cfg.page)
    rel = lambda p: Path(p).resolve().relative_to(page.parent.resolve())  # noqa: E731
    lines = [
        "# Diffusion-QL on its own toy",
        "",
        "Generated by `divo study diffusion-ql-toy` (settings: "
        "`recipes/study/diffusion_ql_toy.yaml`; per-cell numbers: "
        f"`{results}/cells/`). Shares are over {cfg.num_samples} samples of the policy "
        "itself at the last step, per seed, with the mean +- a Student-t 95% CI over seeds. "
        "Score: 0 = a uniform random action, 100 = the best mode's centre (the paper's toy "
        "pays a sample its nearest mode's mean reward; divo's bandit its reward bumps). "
        "`deployed`: the recipe's deployed policy (Diffusion-QL: 50 samples, one drawn by "
        "softmax(Q); FQL: its one-step actor with fresh noise; DIVO: its deterministic actor); "
        "`argmax`: Diffusion-QL's same 50 samples, the one with the largest Q. The samples "
        "are the policy's own (FQL: its one-step actor's; DIVO: its behaviour model's, the "
        "candidates its actor is guided towards).",
        "",
        "| task | variant | steps | nearest mode = best | on the best mode (< 0.2) | at a corner "
        "| score (samples) | score (deployed) | score (argmax) | max Q - Q(best centre) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            f"{row['task']} ({cfg.tasks[row['task']].label})",
            f"{row['variant']} ({cfg.variants[row['variant']].label})",
            str(row["steps"]),
        ]
        for key in (
            "best_nearest",
            "on_best_mode",
            "at_corner",
            "score",
            "deployed_score",
            "greedy_score",
            "q_corner_minus_centre",
        ):
            values = row[key]
            listed = ", ".join(f"{v:g}" for v in values)
            cells.append(f"{_mean_ci(values)} ({listed})" if values else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![Diffusion-QL on the toys]({rel(figure)})", ""]
    notes = results / "notes.md"
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    page.write_text("\n".join(lines))
    log(f"divo study diffusion-ql-toy: wrote {page} ({len(records)} cells)")
    return page


def run_study(overrides: Sequence[str] = (), page_only: bool = False, log=print) -> list[dict]:
    """Run every missing cell (task, variant, seed), rewriting the page after each."""
    cfg = study_config(overrides)
    tasks: dict[str, Task] = {}
    records = []
    todo = []
    for task_name, variant in cfg.cells:
        for seed in (int(s) for s in cfg.seeds):
            done = cell_done(cfg, task_name, variant, seed)
            if done is not None:
                records.append(done)
            elif not page_only:
                todo.append((task_name, variant, seed))

    def run_one(cell: tuple[str, str, int]) -> tuple[bool, str]:
        task_name, variant, seed = cell
        if task_name not in tasks:
            tasks[task_name] = Task(task_name, cfg.tasks[task_name])
        log(f"  {task_name} / {variant} / seed {seed}: {cfg.variants[variant].steps} steps")
        record = run_cell(cfg, tasks[task_name], variant, seed, log)
        write_json_atomic(cell_path(cfg, task_name, variant, seed), record)
        records.append(record)
        return True, f"{task_name} / {variant} / seed {seed}: done"

    run_cells(todo, run_one, lambda: write_page(cfg, tasks, log), jobs=1, log=log)
    write_page(cfg, None, log)
    return records


def study_command(argv: Sequence[str]) -> int:
    """``divo study diffusion-ql-toy [key=value ...] [--page-only]``."""
    ns = study_arguments(
        "divo study diffusion-ql-toy",
        "Diffusion-QL on its own toy and on divo's bandit; finished cells are kept and skipped.",
        argv,
        STUDY_CONFIG,
    )
    run_study(ns.overrides, page_only=ns.page_only)
    return 0
