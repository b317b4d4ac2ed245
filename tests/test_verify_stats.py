"""Paired differences over seeds: the t interval and p-value against scipy's own functions and hand arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from benchkit.verify.stats import compare, paired_difference, t_interval


def test_paired_difference_matches_the_t_interval_and_scipys_paired_test():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    b = {0: 0.5, 1: 1.6, 2: 2.4, 3: 3.55}
    d = paired_difference(a, b, confidence=0.95)
    diffs = np.array([0.5, 0.4, 0.6, 0.45])
    # by hand: mean 0.4875, s = sqrt(sum((d - mean)^2) / 3), half width t_{0.975, 3} * s / sqrt(4)
    s = math.sqrt(((diffs - 0.4875) ** 2).sum() / 3)
    half = 3.182446305284263 * s / 2.0  # t_{0.975, 3}
    assert d.n == 4 and d.seeds == (0, 1, 2, 3)
    assert d.mean == pytest.approx(0.4875)
    assert d.std == pytest.approx(s)
    assert (d.low, d.high) == pytest.approx((0.4875 - half, 0.4875 + half))
    assert (d.low, d.high) == pytest.approx(stats.t.interval(0.95, 3, loc=diffs.mean(), scale=stats.sem(diffs)))
    assert d.p_value == pytest.approx(stats.ttest_rel([1, 2, 3, 4], [0.5, 1.6, 2.4, 3.55]).pvalue)
    assert d.mean_a == pytest.approx(2.5) and d.mean_b == pytest.approx(2.0125)
    assert d.distinguishable  # the interval is above 0
    assert d.interval_text("+.2f", "pp") == f"+0.49 pp [95% CI {0.4875 - half:+.2f}, {0.4875 + half:+.2f}], n=4"


def test_a_difference_inside_the_noise_is_marked():
    d = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 1.0, 2: 3.2})
    assert d.low < 0 < d.high and not d.distinguishable
    assert d.interval_text().endswith("the seeds cannot tell it from 0")
    wider = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 1.0, 2: 3.2}, confidence=0.99)
    assert wider.high - wider.low > d.high - d.low


def test_pairs_only_the_seeds_both_sides_have():
    d = paired_difference({0: 5.0, 1: 6.0, 2: 7.0}, {1: 1.0, 2: 3.0, 7: 100.0})
    assert d.seeds == (1, 2) and d.mean == pytest.approx(4.5)
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_one_seed_gives_a_difference_but_no_interval():
    d = paired_difference({0: 0.9}, {0: 0.8})
    assert d.n == 1 and d.mean == pytest.approx(0.1)
    assert math.isnan(d.low) and math.isnan(d.high) and not d.distinguishable
    assert "n=1: no interval" in d.interval_text()


def test_identical_differences_have_a_point_interval():
    d = paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})
    assert (d.low, d.high, d.std) == (1.0, 1.0, 0.0) and d.p_value == 0.0 and d.distinguishable
    same = paired_difference({0: 2.0, 1: 3.0}, {0: 2.0, 1: 3.0})
    assert same.mean == 0.0 and same.p_value == 1.0 and not same.distinguishable


def test_t_interval_refuses_a_bad_confidence():
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], confidence=95)


def test_compare_gives_one_paired_row_per_operating_point():
    rows = []
    for c in (2.0, 8.0):
        for seed in (0, 1, 2):
            rows.append({"allocation": "global", "compression": c, "seed": seed, "acc": 0.9 - 0.01 * c + 0.001 * seed})
            rows.append({"allocation": "uniform", "compression": c, "seed": seed,
                         "acc": 0.9 - 0.02 * c + 0.001 * seed + (0.002 if seed == 1 else 0.0)})
    out = compare(pd.DataFrame(rows), {"allocation": "global"}, {"allocation": "uniform"}, metric="acc",
                  by="compression", scale=100)
    assert out["compression"].tolist() == [2.0, 8.0] and out["n"].tolist() == [3, 3]
    # per-seed differences in pp: 0.01·c·100 minus 0.2 for seed 1
    for c, row in zip((2.0, 8.0), out.itertuples()):
        diffs = np.array([c, c - 0.2, c])
        lo, hi = stats.t.interval(0.95, 2, loc=diffs.mean(), scale=stats.sem(diffs))
        assert row.diff == pytest.approx(diffs.mean()) and (row.ci_low, row.ci_high) == pytest.approx((lo, hi))
        assert row.distinguishable
    with pytest.raises(ValueError, match="several rows for seed"):
        compare(pd.DataFrame(rows), {"allocation": ["global", "uniform"]}, {"allocation": "uniform"}, metric="acc")
