"""How much of a narrow conditional distribution does a behaviour model reproduce?

Fits a behaviour model (a group of recipes/behavior_model/ or your own group file, with
overrides) to a = 0.5 s + N(0, sigma^2) per action dimension, s ~ U(-1, 1), and prints the
spread of its samples at nine states against sigma. A generator that reproduces its data
spreads like sigma; one that returns a denoised mean spreads less (docs/method.md, "What K = 5
can represent").

    python examples/sample_spread.py --model ddpm --sigma 0.12            # DIVO's K = 5 DDPM
    python examples/sample_spread.py --model ddpm --sigma 0.12 num_steps=20
    python examples/sample_spread.py --model flow --sigma 0.12            # 10 Euler steps
    python examples/sample_spread.py --model my_recipes/behavior_model/mdn.yaml  # your group file
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from divo.config import recipes_dir


def build_model(group: str, overrides=(), action_dim: int = 2):
    """The shipped ``behavior_model/<group>.yaml`` (or a YAML file of your own with a
    ``_target_``: a plug-in's group file) with ``key=value`` overrides, for a one-dimensional
    state."""
    own = Path(group)
    path = (
        own
        if own.suffix in (".yaml", ".yml")
        else recipes_dir() / "behavior_model" / f"{group}.yaml"
    )
    if not path.is_file():
        raise SystemExit(
            f"no behaviour-model group {group!r}: give a shipped group or a .yaml file"
        )
    cfg = OmegaConf.load(path)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.pop("_partial_", None)
    return instantiate(cfg, observation_dim=1, action_dim=action_dim, _convert_="all")


def sample_spread(
    model, sigma: float, *, steps: int = 4000, lr: float = 3e-4, batch: int = 256, seed: int = 0
) -> dict:
    """Fit ``model`` by Adam on its per-sample loss; returns the mean over nine states of the
    per-state standard deviation of 2,000 samples (averaged over action dimensions), and the
    mean absolute error of the samples' mean against the true mean 0.5 s."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        if hasattr(model, "set_training_step"):
            model.set_training_step(step)
        s = torch.rand(batch, 1, generator=gen) * 2 - 1
        noise = torch.randn(batch, model.action_dim, generator=gen)
        a = (0.5 * s + sigma * noise).clamp(-1, 1)
        loss = model.per_sample_loss(a, s, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        s = torch.linspace(-0.8, 0.8, 9)[:, None]
        x = model.sample(s, 2000, generator=gen)  # [9, 2000, A]
    return {
        "sigma": sigma,
        "sample_std": float(x.std(1).mean()),
        "mean_error": float((x.mean(1) - 0.5 * s).abs().mean()),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="ddpm", help="a recipes/behavior_model/ group, or your own .yaml file"
    )
    parser.add_argument("--sigma", type=float, default=0.12)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="key=value settings of the model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args.model, args.overrides)
    out = sample_spread(model, args.sigma, steps=args.steps)
    print(
        f"{args.model} {' '.join(args.overrides)}: data spread {args.sigma:.3f}, samples "
        f"{out['sample_std']:.3f} per state (mean error {out['mean_error']:.3f})"
    )


if __name__ == "__main__":
    main()
