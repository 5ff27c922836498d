"""Time the training step of each recipe, in one process and one run, and print ratios.

    python benchmarks/bench_step.py [--recipes divo soft_weight diffusion_ql] [--device auto]
                                    [--modes none default graph graph-eager] [--steps 300]
                                    [--warmup 50]
                                    [--seeds N] [--json out.json]

Data: a synthetic Hopper-sized TED dataset (observation 11, action 3, 100k transitions) on the
training device, sampled by the same device-side sampler and run by the same ``TrainStep`` as
training uses (one per ``compile`` mode), so the numbers measure the whole training step (batch
sampling included), not data loading. Reported:
  * steps/s of each recipe in each mode; its step cost relative to td3bc in the same mode and
    run; each optimised mode's speed-up over the eager (``none``) path of the same recipe;
  * inference latency at batch 1 of each deployable policy (DIVO's actor; Diffusion-QL's
    50 samples scored by the critic) and of one behaviour-model sample: DIVO's test-time
    advantage over a diffusion policy.

``--seeds N`` also times N seeds trained as one agent with stacked weights
(``train.num_seeds=N``, :mod:`divo.agents.vectorized`): seed-steps/s (N x steps/s) and the ratio
against one seed of the same recipe in the same mode (recipes that cannot stack, e.g.
Diffusion-QL, are skipped with a note).

Modes: the ``compile`` modes, and ``graph-eager`` (``compile=graph`` with
``graph_stages=eager``: the eager kernels captured instead of the compiled stages). Modes a device
cannot run (``graph`` without CUDA) are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
from tensordict import TensorDict

from divo.agents.builder import build_agent
from divo.agents.runtime import device_name, resolve_device
from divo.agents.step import COMPILE_MODES, DeviceSampler, TrainStep
from divo.config import available_recipes, compose_recipe
from divo.errors import ConfigError
from divo.objectives.actor import NormalizedPolicy

OBS, ACT, N = 11, 3, 100_000
# benchmark mode -> (compile, graph_stages)
MODES = {m: (m, "compiled") for m in COMPILE_MODES} | {"graph-eager": ("graph", "eager")}


def synthetic_data(device: torch.device) -> TensorDict:
    g = torch.Generator().manual_seed(0)
    td = TensorDict(
        {
            "observation": torch.randn(N, OBS, generator=g),
            "action": torch.rand(N, ACT, generator=g) * 2 - 1,
            "next": {
                "observation": torch.randn(N, OBS, generator=g),
                "reward": torch.randn(N, 1, generator=g),
                "terminated": torch.rand(N, 1, generator=g) < 0.01,
                "truncated": torch.zeros(N, 1, dtype=torch.bool),
                "done": torch.zeros(N, 1, dtype=torch.bool),
            },
        },
        batch_size=[N],
    )
    return td.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, steps: int, warmup: int) -> float:
    """steps/s of ``step()`` after ``warmup`` calls (compilation and graph capture happen
    there); metrics are left on the device, as in training."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps / (time.perf_counter() - start)


def build(recipe: str, device: torch.device, mode: str = "none"):
    torch.manual_seed(0)
    cfg = compose_recipe(recipe, [f"compile={MODES[mode][0]}"])
    agent = build_agent(
        cfg,
        observation_dim=OBS,
        action_dim=ACT,
        obs_mean=torch.zeros(OBS),
        obs_std=torch.ones(OBS),
        device=device,
    )
    return cfg, agent


def time_vectorized(
    recipes: list[str],
    data,
    device,
    num_seeds: int,
    steps: int,
    warmup: int,
    results: dict[str, dict[str, dict]],
) -> dict[str, dict[str, dict]]:
    """Seed-steps/s of ``num_seeds`` seeds stacked in one agent, per recipe and mode, and the
    ratio against one seed's steps/s in the same mode and run (``results``)."""
    from divo.agents.vectorized import build_vectorized_agent

    out: dict[str, dict[str, dict]] = {}
    for mode in results:
        out[mode] = {}
        print(f"\n{num_seeds} seeds with stacked weights (train.num_seeds={num_seeds}) [{mode}]:")
        for recipe in recipes:
            compile_mode, graph_stages = MODES[mode]
            cfg = compose_recipe(recipe, [f"compile={compile_mode}"])
            try:
                vec = build_vectorized_agent(
                    cfg,
                    range(num_seeds),
                    observation_dim=OBS,
                    action_dim=ACT,
                    obs_mean=torch.zeros(OBS),
                    obs_std=torch.ones(OBS),
                    device=device,
                )
            except ConfigError as exc:  # e.g. Diffusion-QL: not an OfflineAgent recipe
                print(f"{recipe:>14}: skipped ({str(exc).split(':')[0]})", flush=True)
                continue
            sampler = DeviceSampler(data, cfg.train.batch_size, num_seeds=num_seeds)
            step = TrainStep(vec, sampler.sample, compile_mode, device, graph_stages=graph_stages)
            sps = time_steps(step, device, steps, warmup)
            seed_sps = num_seeds * sps
            ratio = seed_sps / results[mode][recipe]["steps_per_s"]
            out[mode][recipe] = {
                "steps_per_s": sps,
                "seed_steps_per_s": seed_sps,
                "vs_one_seed": ratio,
                "compiled_stages": step.compiled_stages,
                "uncompiled_stages": step.uncompiled_stages,
            }
            print(
                f"{recipe:>14}: {seed_sps:8.1f} seed-steps/s  ({sps:6.1f} steps/s of all seeds; "
                f"{ratio:.2f}x one seed)",
                flush=True,
            )
    return out


def latency_ms(fn, device, repeats: int = 200) -> float:
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
    parser.add_argument("--recipes", nargs="+", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", nargs="+", default=["none"], choices=list(MODES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=0, help="also time N stacked seeds")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    recipes = args.recipes or [
        r for r in ("td3bc", "divo", "soft_weight", "diffusion_ql") if r in available_recipes()
    ]
    if "td3bc" not in recipes:
        recipes = ["td3bc", *recipes]
    modes = [m for m in args.modes if m != "none"]
    modes = ["none", *modes]
    if device.type != "cuda" and any(MODES[m][0] == "graph" for m in modes):
        print("skipping compile=graph: it needs CUDA", flush=True)
        modes = [m for m in modes if MODES[m][0] != "graph"]
    data = synthetic_data(device)

    results: dict[str, dict[str, dict]] = {m: {} for m in modes}
    latency: dict[str, float] = {}
    for mode in modes:
        for recipe in recipes:
            cfg, agent = build(recipe, device, mode)
            sampler = DeviceSampler(data, cfg.train.batch_size)
            compile_mode, graph_stages = MODES[mode]
            step = TrainStep(agent, sampler.sample, compile_mode, device, graph_stages=graph_stages)
            sps = time_steps(step, device, args.steps, args.warmup)
            results[mode][recipe] = {"steps_per_s": sps, "ms_per_step": 1e3 / sps}
            if mode != "none":  # what ran compiled: a failed compile falls back under graph
                results[mode][recipe]["compiled_stages"] = step.compiled_stages
                results[mode][recipe]["uncompiled_stages"] = step.uncompiled_stages
                if step.uncompiled_stages:
                    print(f"    (ran eagerly: {', '.join(step.uncompiled_stages)})")
            print(
                f"{recipe:>14} [{mode:>11}]: {sps:8.1f} steps/s  ({1e3 / sps:6.2f} ms/step)",
                flush=True,
            )
            if mode != "none":
                continue
            obs1 = torch.zeros(1, OBS, device=device)
            with torch.no_grad():
                policy = agent.policy.eval()
                name = "actor" if isinstance(policy, NormalizedPolicy) else f"{recipe} policy"
                if name not in latency:
                    latency[name] = latency_ms(partial(policy, obs1), device)
                model = getattr(agent, "behavior_model", None)  # Diffusion-QL: the policy
                name = f"{type(model).__name__} sample"
                if model is not None and name not in latency:
                    latency[name] = latency_ms(partial(model.sample, obs1), device)

    for mode in modes:
        base = results[mode]["td3bc"]["ms_per_step"]
        print(f"\nstep cost relative to td3bc [{mode}] (same run):")
        for recipe, r in results[mode].items():
            r["cost_vs_td3bc"] = r["ms_per_step"] / base
            print(f"{recipe:>14}: {r['cost_vs_td3bc']:.2f}x")
    for mode in modes[1:]:
        print(f"\nspeed-up of {mode} over the eager path (none) of the same recipe:")
        for recipe, r in results[mode].items():
            r["speedup_vs_eager"] = r["steps_per_s"] / results["none"][recipe]["steps_per_s"]
            print(f"{recipe:>14}: {r['speedup_vs_eager']:.2f}x")
    print("\ninference latency, batch 1:")
    for name, ms in latency.items():
        print(f"{name:>20}: {ms:.3f} ms")
    for name, ms in latency.items():
        if name != "actor":
            print(f"{name} / actor: {ms / latency['actor']:.1f}x")

    vectorized = None
    if args.seeds > 1:
        vectorized = time_vectorized(
            recipes, data, device, args.seeds, args.steps, args.warmup, results
        )

    report = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "modes": results,
        "latency_ms": latency,
    }
    if vectorized is not None:
        report["vectorized"] = {"num_seeds": args.seeds, "recipes": vectorized}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
