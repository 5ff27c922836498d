"""The 2-D bandit study: which behaviour models recover four modes, where policies' actions land.

``divo study bandit [key=value ...] [--out docs/bandit_study.png] [--runs DIR [--reuse-runs]]``
makes one figure (and a JSON file of its numbers next to it). Settings:
``recipes/study/bandit.yaml``; any of them can be overridden with ``key=value`` (OmegaConf
dot-list syntax).

1. Behaviour models (DDPM, consistency model with 2 and with 1 network call, CVAE, Gaussian) are
   fitted to Diffusion-QL's four-mode data with their own per-sample losses, the same optimiser
   and budget for each; the figure shows their samples and the share of samples that land on
   each mode (within ``coverage_radius`` of its centre).
2. Offline-RL recipes (DIVO, TD3+BC, Diffusion-QL) are trained on the bandit, whose modes pay
   1.0 / 0.5 / 0.25 / 0.0, through the ordinary training entry point; the deployed policy of
   each run is rebuilt from its ``policy.pt`` and its actions are plotted over the reward map.
3. The rare-best bandit (``rare``): DIVO and its ablations trained on the variant whose best
   mode holds 5% of the actions; scores and where the deployed actions land, in a JSON file of
   its own (``<out>_rare.json``; ``--rare-only`` runs this part alone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from divo.errors import ConfigError
from divo.studies.runner import study_arguments, study_settings

STUDY_CONFIG = "study/bandit.yaml"


def study_config(overrides: Sequence[str] = ()) -> Any:
    """The study's settings (``recipes/study/bandit.yaml``) with dot-list overrides applied;
    unknown keys are refused."""
    return study_settings(STUDY_CONFIG, overrides)


def four_mode_data(num_samples: int, seed: int):
    """The bandit's behaviour actions [num_samples, 2] (float32 tensor), as in its dataset."""
    import numpy as np
    import torch

    from divo.data.bandit import bandit_episodes

    episodes = bandit_episodes(num_samples, seed=seed)
    return torch.as_tensor(np.concatenate([e["actions"] for e in episodes]))


def mode_coverage(samples, radius: float = 0.2) -> list[float]:
    """Share of ``samples`` [n, 2] within ``radius`` of each mode centre (MODE_CENTERS order).

    A perfect model of the bandit data gives ~0.25 for each mode; a sample between modes counts
    for none."""
    import torch

    from divo.data.bandit import MODE_CENTERS

    dist = torch.cdist(samples.float(), torch.as_tensor(MODE_CENTERS))
    nearest = dist.min(dim=-1)
    near = nearest.values < radius
    return [((nearest.indices == k) & near).float().mean().item() for k in range(len(MODE_CENTERS))]


def behavior_model_config(cfg: Any, name: str, **overrides: Any) -> dict:
    """The shipped ``behavior_model/<group>.yaml`` of study model ``name`` with the study's and
    the caller's overrides, as a plain dict ready for ``hydra.utils.instantiate``."""
    from omegaconf import OmegaConf

    from divo.config import recipes_dir

    spec = cfg.behavior_models.models[name]
    base = OmegaConf.load(recipes_dir() / "behavior_model" / f"{spec.group}.yaml")
    merged = OmegaConf.merge(base, spec.get("overrides") or {}, overrides)
    merged = OmegaConf.to_container(merged, resolve=False)
    # group files may interpolate recipe keys (e.g. ${train.steps}); the study's overrides
    # replace those, and any left over is resolved against the study config
    out = OmegaConf.to_container(OmegaConf.merge(cfg, {"_model": merged}), resolve=True)["_model"]
    out.pop("_partial_", None)
    return out


def fit_behavior_model(model_cfg: dict, data, *, steps: int, batch_size: int, lr: float, seed: int):
    """Fit a behaviour model to actions ``data`` [n, A] (one constant zero observation) by
    minimising the batch mean of its per-sample loss with Adam; returns the model (eval mode)."""
    import torch
    from hydra.utils import instantiate

    torch.manual_seed(seed)
    model = instantiate(model_cfg, observation_dim=1, action_dim=data.shape[-1], _convert_="all")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    obs = torch.zeros(batch_size, 1)
    for step in range(steps):
        if hasattr(model, "set_training_step"):  # the caller owns curricula (see consistency.py)
            model.set_training_step(step)
        idx = torch.randint(len(data), (batch_size,), generator=generator)
        loss = model.per_sample_loss(data[idx], obs, generator=generator).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def run_behavior_models(cfg: Any, log=print) -> dict[str, dict]:
    """Part 1: fit every study model; returns name -> {label, samples [n, 2], coverage}."""
    import torch

    bm = cfg.behavior_models
    data = four_mode_data(cfg.data.num_samples, cfg.data.seed)
    fitted, results = {}, {"data": {"label": f"data ({len(data)} actions)", "samples": data}}
    results["data"]["coverage"] = mode_coverage(data, bm.coverage_radius)
    for name, spec in bm.models.items():
        start = time.perf_counter()
        if spec.get("same_as"):
            model = fitted[spec.same_as]
        else:
            model = fit_behavior_model(
                behavior_model_config(cfg, name),
                data,
                steps=bm.fit.steps,
                batch_size=bm.fit.batch_size,
                lr=bm.fit.lr,
                seed=bm.fit.seed,
            )
            fitted[name] = model
        saved = {k: getattr(model, k) for k in (spec.get("sample_overrides") or {})}
        for key, value in (spec.get("sample_overrides") or {}).items():
            setattr(model, key, list(value) if not isinstance(value, (int, float)) else value)
        with torch.no_grad():
            samples = model.sample(
                torch.zeros(1, 1), bm.num_samples, torch.Generator().manual_seed(bm.fit.seed)
            )[0]
        for key, value in saved.items():
            setattr(model, key, value)
        coverage = mode_coverage(samples, bm.coverage_radius)
        results[name] = {"label": spec.label, "samples": samples, "coverage": coverage}
        log(
            f"  {spec.label:24s} share of samples on each mode "
            f"{' '.join(f'{c:.3f}' for c in coverage)} (sum {sum(coverage):.3f}) "
            f"[{time.perf_counter() - start:.0f} s]"
        )
    return results


def run_policies(
    cfg: Any,
    runs_dir: Path,
    log=print,
    reuse: bool = False,
    *,
    recipes: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    dataset_overrides: Sequence[str] = ("dataset=bandit",),
) -> dict[str, dict]:
    """Part 2: train each recipe on the bandit per seed; draw actions from the deployed policy.

    With ``reuse``, a run folder that already holds result.json and policy.pt is not retrained
    (replotting after a change of the figure only). ``recipes``, ``seeds`` and
    ``dataset_overrides`` default to part 2's (``policies``, the four-mode bandit); part 3
    passes the rare-best bandit's."""
    import logging

    import torch

    from divo.agents.policy_io import load_policy
    from divo.agents.train import train
    from divo.config import compose_recipe
    from divo.data.bandit import best_action

    logging.getLogger("torchrl").setLevel(logging.WARNING)  # its per-storage INFO lines
    pol = cfg.policies
    best = torch.as_tensor(best_action())
    out: dict[str, dict] = {}
    rows = pol.get("rows") or {}
    for name in pol.recipes if recipes is None else recipes:
        row = rows.get(name) or {}
        recipe = row.get("recipe", name)
        entry = {"label": pol.labels.get(name, name), "seeds": []}
        for seed in pol.seeds if seeds is None else seeds:
            start = time.perf_counter()
            overrides = [*dataset_overrides, *(row.get("overrides") or []), *pol.overrides,
                         f"seed={seed}", "train.progress=false"]  # fmt: skip
            run_dir = runs_dir / f"{name}-seed{seed}"
            if reuse and (run_dir / "result.json").is_file() and (run_dir / "policy.pt").is_file():
                result = json.loads((run_dir / "result.json").read_text())  # trained before
            else:
                result = train(compose_recipe(recipe, overrides), run_dir)
            policy, _ = load_policy(run_dir)
            torch.manual_seed(seed)
            with torch.no_grad():
                actions = policy(torch.zeros(pol.num_actions, 1))
            on_best = (actions - best).norm(dim=-1) < cfg.behavior_models.coverage_radius
            entry["seeds"].append(
                {
                    "seed": seed,
                    "actions": actions,
                    "normalized_score": result["normalized_score"],
                    "return_mean": result["return_mean"],
                    "on_best_mode": on_best.float().mean().item(),
                    "mode_shares": mode_coverage(actions, cfg.behavior_models.coverage_radius),
                }
            )
            log(
                f"  {entry['label']:13s} seed {seed}: normalized score "
                f"{result['normalized_score']:.1f}, {on_best.float().mean().item():.0%} of its "
                f"actions on the best mode [{time.perf_counter() - start:.0f} s]"
            )
        out[name] = entry
    return out


def _scatter_panel(ax, title: str, reward_map=None) -> None:
    from divo.data.bandit import MODE_CENTERS, MODE_PAYOFFS

    if reward_map is not None:
        xs, ys, zs = reward_map
        ax.contourf(xs, ys, zs, levels=12, cmap="Greys", alpha=0.45)
    for (cx, cy), pay in zip(MODE_CENTERS, MODE_PAYOFFS, strict=True):
        ax.text(0.62 * cx, 0.62 * cy, f"r={pay:g}", ha="center", va="center", fontsize=7)
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-1.05, 1.05)
    ax.set_aspect("equal")
    ax.set_xticks([-1, 0, 1])
    ax.set_yticks([-1, 0, 1])
    ax.set_title(title, fontsize=9)


def make_figure(models: dict, policies: dict | None, cfg: Any, path: Path) -> None:
    """Two rows: behaviour-model samples; the reward map and each method's actions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from divo.data.bandit import bandit_reward

    grid = np.linspace(-1, 1, 121)
    xx, yy = np.meshgrid(grid, grid)
    zz = bandit_reward(np.stack([xx, yy], -1))
    ncols = max(len(models), 1 + len(policies or {}))
    nrows = 2 if policies else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (_name, entry) in zip(axes[0], models.items(), strict=False):
        s = entry["samples"].numpy()
        ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.3, color="tab:blue", rasterized=True)
        cov = entry["coverage"]
        _scatter_panel(ax, f"{entry['label']}\non modes: " + " ".join(f"{c:.2f}" for c in cov))
    for ax in axes[0][len(models) :]:
        ax.axis("off")
    if policies:
        ax = axes[1][0]
        data = models["data"]["samples"].numpy()
        ax.scatter(data[:, 0], data[:, 1], s=2, alpha=0.15, color="tab:blue", rasterized=True)
        _scatter_panel(ax, "reward map and data", (xx, yy, zz))
        colors = plt.get_cmap("tab10")
        for ax, (_recipe, entry) in zip(axes[1][1:], policies.items(), strict=False):
            scores = []
            for i, run in enumerate(entry["seeds"]):
                a = run["actions"].numpy()
                one_point = np.allclose(a, a[:1], atol=1e-4)  # a deterministic actor
                ax.scatter(
                    a[:1, 0] if one_point else a[:, 0],
                    a[:1, 1] if one_point else a[:, 1],
                    s=70 / (1 + i) if one_point else 4,  # shrinking: coinciding seeds stay visible
                    alpha=0.9,
                    color=colors(i),
                    label=f"seed {run['seed']}",
                    edgecolors="k" if one_point else "none",
                    linewidths=0.3,
                    zorder=3,
                )
                scores.append(run["normalized_score"])
            _scatter_panel(
                ax,
                f"{entry['label']}: score {np.mean(scores):.0f}\n"
                f"(per seed {', '.join(f'{s:.0f}' for s in scores)})",
                (xx, yy, zz),
            )
            ax.legend(fontsize=6, loc="lower left", handletextpad=0.1, markerscale=0.6)
        for ax in axes[1][1 + len(policies) :]:
            ax.axis("off")
    fig.suptitle(
        "Four-mode bandit: samples of behaviour models fitted to the data (top; share of samples "
        "within 0.2 of each mode,\n(-.8,.8) (.8,-.8) (.8,.8) (-.8,-.8)) and actions of trained "
        "policies (bottom; normalised score, 100 = best mode)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _policy_numbers(policies: dict | None) -> dict:
    """Each trained row's label and per-seed numbers (the drawn actions left out)."""
    return {
        name: {
            "label": e["label"],
            "runs": [
                {
                    k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in run.items()
                    if k != "actions"
                }
                for run in e["seeds"]
            ],
        }
        for name, e in (policies or {}).items()
    }


def _numbers(
    models: dict, policies: dict | None, cfg: Any, seconds: float, reused_runs: bool
) -> dict:
    from omegaconf import OmegaConf

    return {
        "settings": OmegaConf.to_container(cfg, resolve=True),
        "behavior_models": {
            name: {"label": e["label"], "mode_shares": [round(c, 4) for c in e["coverage"]]}
            for name, e in models.items()
        },
        "policies": _policy_numbers(policies),
        "wall_clock_s": round(seconds, 1),
        "reused_runs": reused_runs,  # True: the policies were trained by an earlier call
    }


def run_rare(cfg: Any, runs_dir: Path, log=print, reuse: bool = False) -> dict:
    """Part 3: DIVO and its ablations on the rare-best bandit; their numbers (no figure)."""
    from omegaconf import OmegaConf

    from divo.data.bandit import rare_best_shares

    rare = cfg.rare
    start = time.perf_counter()
    log(f"divo study bandit: training on the rare-best bandit ({rare.dataset})")
    policies = run_policies(
        cfg,
        runs_dir,
        log,
        reuse,
        recipes=list(rare.recipes),
        seeds=list(rare.seeds),
        dataset_overrides=("dataset=bandit", f"dataset.id={rare.dataset}"),
    )
    return {
        "settings": OmegaConf.to_container(rare, resolve=True),
        "data_mode_shares": [round(float(x), 4) for x in rare_best_shares()],
        "policies": _policy_numbers(policies),
        "wall_clock_s": round(time.perf_counter() - start, 1),
    }


@contextlib.contextmanager
def _runs_folder(runs_dir: str | Path | None, name: str = "") -> Iterator[Path]:
    """Where a part's training runs go: ``runs_dir/name`` (kept), or a temporary folder
    removed afterwards when no ``runs_dir`` was given."""
    if runs_dir is not None:
        yield Path(runs_dir) / name
        return
    with tempfile.TemporaryDirectory(prefix="divo-bandit-study-") as tmp:
        yield Path(tmp)


def run_study(
    overrides: Sequence[str] = (),
    out: str | Path = "docs/bandit_study.png",
    runs_dir: str | Path | None = None,
    skip_policies: bool = False,
    log=print,
    reuse_runs: bool = False,
    rare_only: bool = False,
) -> dict:
    """Run the parts, write the figure to ``out`` and its numbers to ``out`` with .json, and
    part 3's numbers to ``<out>_rare.json`` (``rare_only``: part 3 alone)."""
    import torch

    cfg = study_config(overrides)
    out = Path(out)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: one thread is fastest and leaves cores to others
    try:
        if rare_only or not skip_policies:
            with _runs_folder(runs_dir, "rare") as folder:
                rare = run_rare(cfg, folder, log, reuse=reuse_runs)
            rare_out = out.with_name(out.stem + "_rare.json")
            rare_out.parent.mkdir(parents=True, exist_ok=True)
            rare_out.write_text(json.dumps(rare, indent=2) + "\n")
            log(f"divo study bandit: wrote {rare_out}")
            if rare_only:
                return rare
        log("divo study bandit: fitting behaviour models to the four-mode data")
        models = run_behavior_models(cfg, log)
        policies = None
        if not skip_policies:
            log("divo study bandit: training policies on the bandit")
            with _runs_folder(runs_dir) as folder:
                policies = run_policies(cfg, folder, log, reuse=reuse_runs)
    finally:
        torch.set_num_threads(threads)
    make_figure(models, policies, cfg, out)
    numbers = _numbers(models, policies, cfg, time.perf_counter() - start, reuse_runs)
    out.with_suffix(".json").write_text(json.dumps(numbers, indent=2) + "\n")
    log(f"divo study bandit: wrote {out} and {out.with_suffix('.json')}")
    return numbers


def study_command(argv: Sequence[str]) -> int:
    """``divo study bandit [key=value ...] [--out PNG] [--runs DIR] [--models-only]
    [--reuse-runs]``."""

    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", default="docs/bandit_study.png", help="figure path (.png)")
        parser.add_argument("--runs", default=None, help="keep the training runs in this folder")
        parser.add_argument(
            "--models-only", action="store_true", help="fit the behaviour models only (part 1)"
        )
        parser.add_argument(
            "--reuse-runs",
            action="store_true",
            help="with --runs: do not retrain runs already there (replot only)",
        )
        parser.add_argument(
            "--rare-only",
            action="store_true",
            help="run part 3 alone (the rare-best bandit's rows; <out>_rare.json)",
        )

    ns = study_arguments(
        "divo study bandit",
        "The 2-D bandit: where each behaviour model's samples land, and each recipe's policy.",
        argv,
        STUDY_CONFIG,
        options,
    )
    if ns.page_only:
        raise ConfigError(
            "divo study bandit has no cells to keep: it reruns its figure; drop --page-only"
        )
    if ns.reuse_runs and ns.runs is None:
        raise ConfigError("--reuse-runs needs --runs DIR (the folder of earlier runs)")
    if ns.rare_only and ns.models_only:
        raise ConfigError("--rare-only and --models-only run different parts: pass one of them")
    run_study(
        ns.overrides,
        ns.out,
        ns.runs,
        ns.models_only,
        reuse_runs=ns.reuse_runs,
        rare_only=ns.rare_only,
    )
    return 0
