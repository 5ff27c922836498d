"""Time the report's probability-of-improvement bootstrap: rliable's statistic (one SciPy
Mann-Whitney test per task and resample) against divo's (all run pairs at once), over the same
resamples of the same score matrices, in one process and one run.

    python benchmarks/bench_report.py --runs 3 --tasks 4 --reps 2000 --json out.json

Prints and writes the seconds of each, their ratio, and the largest difference between the two
point estimates and interval ends (0: the same numbers). Speed is never asserted in a test
(tests/test_benchmarks.py only checks that this runs and reports every field).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path


def bootstrap(statistic, x, y, *, reps: int, seed: int) -> tuple[float, float, float, float]:
    """rliable's stratified bootstrap of ``statistic(x, y)``: (point, low, high, seconds)."""
    import numpy as np
    from rliable import library

    state = np.random.get_state()
    np.random.seed(seed)  # rliable draws from NumPy's global RNG
    start = time.perf_counter()
    try:
        point, interval = library.get_interval_estimates(
            {"p": [x, y]}, lambda a, b: np.array([statistic(a, b)]), reps=reps
        )
    finally:
        np.random.set_state(state)
    seconds = time.perf_counter() - start
    low, high = np.asarray(interval["p"], dtype=float).reshape(2)
    return float(np.asarray(point["p"]).ravel()[0]), float(low), float(high), seconds


def main(argv: Sequence[str] | None = None) -> int:
    import numpy as np
    from rliable import metrics

    from divo.report import improvement_probability

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="seeds per task (default 3)")
    parser.add_argument("--tasks", type=int, default=4, help="datasets (default 4)")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    x = rng.normal(50.0, 10.0, (args.runs, args.tasks))
    y = rng.normal(45.0, 10.0, (args.runs, args.tasks))
    timed = {
        "rliable": bootstrap(
            metrics.probability_of_improvement, x, y, reps=args.reps, seed=args.seed
        ),
        "divo": bootstrap(improvement_probability, x, y, reps=args.reps, seed=args.seed),
    }
    difference = max(
        abs(a - b) for a, b in zip(timed["rliable"][:3], timed["divo"][:3], strict=True)
    )
    report = {
        "runs": args.runs,
        "tasks": args.tasks,
        "reps": args.reps,
        "seconds": {name: round(t[3], 4) for name, t in timed.items()},
        "speedup": round(timed["rliable"][3] / max(timed["divo"][3], 1e-9), 1),
        "estimates": {name: [round(v, 6) for v in t[:3]] for name, t in timed.items()},
        "max_difference": difference,
    }
    print(
        f"probability of improvement, {args.runs} runs x {args.tasks} tasks, {args.reps} "
        f"resamples: rliable {report['seconds']['rliable']:.2f} s, divo "
        f"{report['seconds']['divo']:.2f} s ({report['speedup']}x); largest difference in "
        f"the point estimate and interval: {difference:.3g}"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
