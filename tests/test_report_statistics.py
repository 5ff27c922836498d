"""The report's statistics on hand-made data with known answers (issue 32): the exact and the
resampled stratified bootstrap, the t-interval beside it, the minimum detectable effect, and the
labels of runs kept apart in a tagged folder."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

pytest.importorskip("rliable", reason="the report extra is not installed")

from divo.report import (  # noqa: E402
    _exact_size,
    make_report,
    minimum_detectable_effect,
    seeds_to_detect,
    stratified_bootstrap_ci,
    stratified_t_ci,
)
from tests.test_report import DIVO, TD3BC, write_run  # noqa: E402

T975_DF2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2), tables: 4.303
T975_DF4 = 2.7764451051977987  # t.ppf(0.975, 4): 2.776
T80_DF2 = 1.0606601717798212  # t.ppf(0.8, 2): 1.061


def test_exact_bootstrap_of_one_stratum_by_hand():
    """d = (0, 3): resamples {0,0} mean 0 (p 1/4), {0,3} 1.5 (1/2), {3,3} 3 (1/4). The 95% CI
    is [0, 3]; the 50% CI's quantiles 0.25 and 0.75 fall on 0 and 1.5 (inverted CDF)."""
    d = [np.array([0.0, 3.0])]
    assert stratified_bootstrap_ci(d) == (0.0, 3.0, "exact")
    assert stratified_bootstrap_ci(d, ci=0.5) == (0.0, 1.5, "exact")


def test_exact_bootstrap_of_two_strata_by_hand():
    """d1 = d2 = (0, 2): each stratum's mean is 0, 1, 2 with p 1/4, 1/2, 1/4; their mean is
    0, .5, 1, 1.5, 2 with p 1, 4, 6, 4, 1 (/16), CDF .0625 .3125 .6875 .9375 1.
    80% CI: quantile .1 -> 0.5, .9 -> 1.5; 95%: .025 -> 0, .975 -> 2."""
    d = [np.array([0.0, 2.0]), np.array([0.0, 2.0])]
    assert stratified_bootstrap_ci(d, ci=0.8) == (0.5, 1.5, "exact")
    assert stratified_bootstrap_ci(d) == (0.0, 2.0, "exact")
    # 3 seeds on 4 datasets: C(5, 3)^4 = 10^4 distinct resamples, enumerated
    assert _exact_size([np.zeros(3)] * 4) == 10**4
    assert _exact_size([np.zeros(5)] * 4) == 126**4  # over the limit: resampled


def test_resampled_bootstrap_converges_to_the_exact_one():
    d = [np.array([1.0, 4.0, 9.0]), np.array([-2.0, 0.0, 7.0])]
    exact = stratified_bootstrap_ci(d, ci=0.9)
    drawn = stratified_bootstrap_ci(d, ci=0.9, reps=200_000, exact_limit=0)
    assert drawn[2] == "200000 resamples"
    assert drawn[0] == pytest.approx(exact[0], abs=0.2)
    assert drawn[1] == pytest.approx(exact[1], abs=0.2)


def test_t_interval_by_hand():
    """d = (1, 2, 3): mean 2, s 1, SE 1/sqrt(3), df 2: 2 +- 4.3027 / sqrt(3). Two strata
    (1, 2, 3) and (3, 4, 5): mean 3, SE sqrt(1/3 + 1/3) / 2, Welch-Satterthwaite df
    (2/3)^2 / (2 (1/3)^2 / 2) = 4."""
    lo, hi = stratified_t_ci([np.array([1.0, 2.0, 3.0])])
    half = T975_DF2 / math.sqrt(3)
    assert (lo, hi) == pytest.approx((2 - half, 2 + half))
    lo, hi = stratified_t_ci([np.array([1.0, 2.0, 3.0]), np.array([3.0, 4.0, 5.0])])
    half = T975_DF4 * math.sqrt(2 / 3) / 2
    assert (lo, hi) == pytest.approx((3 - half, 3 + half))
    assert all(math.isnan(x) for x in stratified_t_ci([np.array([1.0])]))


def test_with_three_seeds_the_bootstrap_is_far_narrower_than_the_t_interval():
    d = [np.array([1.0, 2.0, 3.0])]
    b_lo, b_hi, _ = stratified_bootstrap_ci(d)
    t_lo, t_hi = stratified_t_ci(d)
    assert (b_lo, b_hi) == (1.0, 3.0)  # the bootstrap cannot leave the observed range
    assert (t_hi - t_lo) / (b_hi - b_lo) == pytest.approx(T975_DF2 / math.sqrt(3), rel=1e-9)


def test_minimum_detectable_effect_by_hand():
    """d = (1, 2, 3), s = 1, 3 seeds: SE = 1 / sqrt(3), df = 2; the MDE is the true difference
    at which a two-sided 5% t-test rejects with probability 0.8 (the noncentral t), above the
    shortcut (t(.975, 2) + t(.8, 2)) SE = 3.0965, whose power is about 0.77; at many seeds both
    near the normal (1.96 + 0.8416) / sqrt(n)."""
    from scipy import stats

    d = [np.array([1.0, 2.0, 3.0])]
    mde3 = minimum_detectable_effect(d, 3)
    se, crit = 1 / math.sqrt(3), stats.t.ppf(0.975, 2)

    def power(effect):
        nc = effect / se
        return stats.nct.sf(crit, 2, nc) + stats.nct.cdf(-crit, 2, nc)

    shortcut = (T975_DF2 + T80_DF2) / math.sqrt(3)
    assert power(mde3) == pytest.approx(0.8, abs=1e-9)
    assert mde3 > shortcut and power(shortcut) == pytest.approx(0.77, abs=0.01)
    assert minimum_detectable_effect(d, 10_000) == pytest.approx(
        (1.959964 + 0.841621) / 100, rel=1e-3
    )
    assert seeds_to_detect(d, mde3) == 3
    assert seeds_to_detect(d, mde3 * (1 + 1e-9)) == 3
    assert seeds_to_detect(d, mde3 * (1 - 1e-9)) == 4
    assert seeds_to_detect(d, 100.0) == 2
    assert seeds_to_detect(d, 1e-3) is None  # past 1000 seeds
    assert math.isnan(minimum_detectable_effect([np.array([1.0])], 3))


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_tables_both_intervals_the_mde_and_tagged_older_runs(tmp_path):
    """divo - td3bc on env/a-v0: 5, -5, 10 (mean 3.333, s 7.638); an older td3bc kept in a
    tagged folder is labelled with its tag and compared through extra_pairs."""
    runs, older = tmp_path / "runs", tmp_path / "older"
    for recipe, table in (("divo", DIVO), ("td3bc", TD3BC)):
        for dataset, scores in table.items():
            for seed, score in enumerate(scores):
                write_run(runs, recipe, dataset, seed, float(score))
    for dataset, scores in TD3BC.items():
        for seed, score in enumerate(scores):
            write_run(older, "td3bc", dataset, seed, float(score) - 1.0, alpha=5.0)
    out = tmp_path / "report"
    with pytest.warns(UserWarning, match="fewer than 5 seeds"):
        make_report(
            [runs, older],
            out,
            compare=["divo", "td3bc"],
            reps=200,  # rliable's aggregate; the paired bootstrap here is enumerated
            figures=False,
            tags={str(older): "(old)"},
            extra_pairs=[["td3bc", "td3bc (old)"]],
        )
    paired = {(r["a"], r["b"], r["dataset"]): r for r in _rows(out / "paired.csv")}
    row = paired[("divo", "td3bc", "env/a-v0")]
    s = float(np.std([5.0, -5.0, 10.0], ddof=1))
    half = T975_DF2 * s / math.sqrt(3)
    assert float(row["t_low"]) == pytest.approx(10 / 3 - half, rel=1e-5)  # csv: 6 digits
    assert float(row["t_high"]) == pytest.approx(10 / 3 + half, rel=1e-5)
    assert (float(row["ci_low"]), float(row["ci_high"]), row["bootstrap"]) == (-5.0, 10.0, "exact")
    # the older td3bc runs are 1 point lower on every seed: td3bc - td3bc (old) = 1 exactly
    old = paired[("td3bc", "td3bc (old)", "env/a-v0")]
    assert float(old["diff_mean"]) == pytest.approx(1.0) and old["a_better"] == "3"
    overall = {(r["a"], r["b"]): r for r in _rows(out / "paired_overall.csv")}
    o = overall[("divo", "td3bc")]
    assert o["bootstrap"] == "exact" and o["seeds"] == "3"
    assert float(o["t_low"]) < float(o["ci_low"]) < float(o["ci_high"]) < float(o["t_high"])
    assert float(o["mde"]) > 0
    text = (out / "report.md").read_text()
    assert "| td3bc - td3bc (old) |" in text and "MDE (seeds)" in text and "t CI" in text


def test_improvement_probability_is_rliables_statistic():
    """The vectorised P(X > Y) + P(X = Y) / 2 equals rliable's per-task Mann-Whitney version,
    ties and identical samples included, on random score matrices [runs, tasks]."""
    from rliable import metrics

    from divo.report import improvement_probability

    rng = np.random.default_rng(0)
    for trial in range(300):
        n, m, tasks = (int(v) for v in rng.integers(1, 6, 3))
        if trial % 2:  # few distinct values: many ties
            x = rng.integers(0, 4, (n, tasks)).astype(float)
            y = rng.integers(0, 4, (m, tasks)).astype(float)
        else:
            x, y = rng.normal(size=(n, tasks)), rng.normal(size=(m, tasks))
        if trial % 5 == 0:
            y = x.copy()  # identical samples: rliable's special case, 0.5
        assert improvement_probability(x, y) == pytest.approx(
            metrics.probability_of_improvement(x, y), abs=1e-12
        )
