"""Reproduce docs/report_example: a small sweep with the joblib launcher, then `divo report`.

    pip install -e ".[dev]"          # dev pulls the report and joblib extras
    python docs/report_example/make_example.py

1. writes a random-policy Hopper-v5 Minari dataset (``example/hopper/random-v0``, 10,000
   transitions) and the built-in bandit into a temporary MINARI_DATASETS_PATH;
2. runs ``divo train <recipe> -m seed=0,1,2 dataset.id=<bandit>,<hopper> hydra/launcher=local``
   for the recipes divo and td3bc (2 x 2 x 3 = 12 short runs, 2 in parallel);
3. runs ``divo report runs/report-example --compare divo td3bc --out docs/report_example``.

The run directories stay in runs/report-example (not committed). Pass ``--jobs N`` for more
parallel jobs and ``--steps N`` for longer runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import gymnasium as gym

REPO = Path(__file__).resolve().parents[2]
HOPPER_ID = "example/hopper/random-v0"
BANDIT_ID = "divo/bandit/multimodal-v0"


def write_datasets() -> None:
    from divo.data.builtin import ensure_builtin
    from divo.data.minari_io import random_policy_episodes, write_minari_dataset

    env = gym.make("Hopper-v5")  # the standard 1,000-step time limit
    try:
        episodes = random_policy_episodes(env, 10_000, seed=0)
        spec = env.spec
    finally:
        env.close()
    write_minari_dataset(
        HOPPER_ID,
        episodes,
        env=spec,
        algorithm_name="uniform-random",
        description="random-policy Hopper-v5 data for divo's report example",
    )
    ensure_builtin(BANDIT_ID)  # once here, rather than by the first jobs at the same time


def run(command: list[str]) -> None:
    print("+ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="parallel joblib jobs")
    parser.add_argument("--steps", type=int, default=600, help="training steps per run")
    parser.add_argument("--sweep-dir", default="runs/report-example")
    parser.add_argument("--out", default="docs/report_example")
    ns = parser.parse_args()
    sweep = REPO / ns.sweep_dir
    if sweep.exists() and any(sweep.iterdir()):
        sys.exit(f"{sweep} already holds runs; remove it first (the report would mix them in)")

    with tempfile.TemporaryDirectory(prefix="divo-example-minari-") as root:
        os.environ["MINARI_DATASETS_PATH"] = root
        write_datasets()
        for recipe in ("divo", "td3bc"):
            run(
                [
                    "divo",
                    "train",
                    recipe,
                    "-m",
                    "seed=0,1,2",
                    f"dataset.id={BANDIT_ID},{HOPPER_ID}",
                    "hydra/launcher=local",
                    f"hydra.launcher.n_jobs={ns.jobs}",
                    f"hydra.sweep.dir={ns.sweep_dir}",
                    "--quiet",
                    f"train.steps={ns.steps}",
                    f"train.eval_every={max(1, ns.steps // 6)}",
                    f"train.log_every={max(1, ns.steps // 6)}",
                    f"train.checkpoint_every={ns.steps}",
                    "train.eval_episodes=5",
                ]
            )
    run(
        [
            "divo",
            "report",
            ns.sweep_dir,
            "--compare",
            "divo",
            "td3bc",
            "--out",
            ns.out,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
