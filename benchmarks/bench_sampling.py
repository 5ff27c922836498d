"""Time the sampling of each shipped behaviour model and each deployed policy, in one run.

    python benchmarks/bench_sampling.py [--device auto] [--threads 1] [--repeats 200]
                                        [--json out.json]

Hopper-sized (observation 11, action 3), each part as its recipe configures it. Reported, in ms:
one action at batch 1 (what a deployed sampler pays per environment step) and 256 samples (one
per state of a training batch: DIVO's ADPO candidates, FQL's distillation targets), with the
number of network calls per sample and the ratio to DIVO's deterministic actor at batch 1.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
from hydra.utils import instantiate

from divo.agents.runtime import device_name, resolve_device
from divo.config import compose_recipe

OBS, ACT, BATCH = 11, 3, 256

# label -> (recipe, overrides, config key of the part, network calls per sample)
PARTS = {
    "DIVO actor (3 x 256)": ("divo", [], "actor.network", 1),
    "FQL one-step actor (4 x 512)": ("fql", [], "actor.network", 1),
    "DDPM, K = 5 (behavior_model=ddpm)": ("divo", [], "behavior_model", 5),
    "flow, K = 10 (behavior_model=flow)": ("divo", ["behavior_model=flow"], "behavior_model", 10),
    "flow, K = 10, FQL's 4 x 512 network": ("fql", [], "behavior_model", 10),
    "consistency, 2 calls": ("divo", ["behavior_model=consistency"], "behavior_model", 2),
}


def build(recipe: str, overrides: list[str], key: str, device: torch.device) -> torch.nn.Module:
    node = compose_recipe(recipe, ["dataset=bandit", *overrides])
    for part in key.split("."):
        node = node[part]
    torch.manual_seed(0)
    module = instantiate(node, _convert_="all")(observation_dim=OBS, action_dim=ACT)
    return module.to(device).eval()


def sampler(module: torch.nn.Module, key: str, batch: int, device: torch.device):
    obs = torch.randn(batch, OBS, device=device)
    if key == "behavior_model":
        return partial(module.sample, obs, 1)
    return partial(module, obs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: torch.device, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(10):
            fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    rows = {}
    for label, (recipe, overrides, key, calls) in PARTS.items():
        module = build(recipe, overrides, key, device)
        rows[label] = {
            "network_calls": calls,
            "ms_batch_1": time_ms(sampler(module, key, 1, device), device, args.repeats),
            f"ms_batch_{BATCH}": time_ms(
                sampler(module, key, BATCH, device), device, max(args.repeats // 4, 10)
            ),
        }
    base = rows["DIVO actor (3 x 256)"]["ms_batch_1"]
    print(f"{'':38s} calls  batch 1 (ms)  vs actor  batch {BATCH} (ms)")
    for label, r in rows.items():
        r["vs_divo_actor_batch_1"] = r["ms_batch_1"] / base
        print(
            f"{label:38s} {r['network_calls']:5d}  {r['ms_batch_1']:12.3f}  "
            f"{r['vs_divo_actor_batch_1']:7.1f}x  {r[f'ms_batch_{BATCH}']:15.3f}"
        )
    if args.json is not None:
        report = {
            "device": str(device),
            "device_name": device_name(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "parts": rows,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
