"""The benchmark harness runs end to end and writes its JSON (speed itself is never asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_step_reports_every_recipe_mode_and_ratio(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    args = [
        "--recipes",
        "divo",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--seeds",
        "2",
        "--json",
        str(out),
    ]
    args += ["--modes", "none", "graph", "graph-eager", "--device", "cpu"]
    assert bench.main(args) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "skipping compile=graph: it needs CUDA" in printed
    assert set(report["modes"]) == {"none"}  # graph skipped on a CPU
    runs = report["modes"]["none"]
    assert set(runs) == {"td3bc", "divo"}  # td3bc always joins as the baseline
    assert runs["td3bc"]["cost_vs_td3bc"] == 1.0
    assert runs["divo"]["steps_per_s"] > 0 and runs["divo"]["cost_vs_td3bc"] > 0
    assert {"actor", "DDPM sample"} <= set(report["latency_ms"])
    stacked = report["vectorized"]["recipes"]["none"]["divo"]
    assert stacked["seed_steps_per_s"] == 2 * stacked["steps_per_s"]


def test_bench_report_times_both_statistics_on_the_same_resamples(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_report", BENCH.parent / "bench_report.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "report.json"
    assert bench.main(["--reps", "50", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["seconds"]) == {"rliable", "divo"} and report["speedup"] > 0
    assert report["max_difference"] == 0.0  # the same numbers from both statistics
    assert "largest difference" in capsys.readouterr().out
