"""Is a difference real? Paired differences over seeds with a t confidence interval.

Two strategies of one sweep that share a seed start from the same dense network (and see the same data
order), so comparing them seed by seed removes the variation they share: the question is whether the
mean of the per-seed differences is told apart from zero by the spread of those differences. With
n seeds the interval is ``mean ± t_{(1+c)/2, n-1} · s / √n`` (Student's t, s the sample standard
deviation of the differences); a difference whose interval contains 0 is one the seeds cannot tell from
noise. One seed gives a difference but no interval.

>>> from benchkit.verify import compare
>>> compare(runs, {"criterion": "magnitude", "allocation": "global"},
...         {"criterion": "magnitude", "allocation": "uniform"}, metric="test_acc1", by="compression", scale=100)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats


@dataclass(frozen=True)
class PairedDifference:
    """a − b over the seeds both sides have: mean, sample std, t interval and two-sided paired t-test p."""

    n: int
    mean_a: float
    mean_b: float
    mean: float  # mean over seeds of (a − b)
    std: float  # sample standard deviation (ddof=1) of the per-seed differences; NaN for one seed
    low: float  # confidence interval of the mean difference; NaN for one seed
    high: float
    p_value: float
    confidence: float
    seeds: tuple

    @property
    def has_interval(self) -> bool:
        return self.n >= 2

    @property
    def distinguishable(self) -> bool:
        """The interval excludes 0: the seeds tell this difference from noise (never with one seed)."""
        return self.has_interval and (self.low > 0 or self.high < 0)

    def interval_text(self, fmt: str = "+.2f", unit: str = "") -> str:
        """``+0.33 pp [95% CI +0.08, +0.58], n=3`` (``one seed: no interval`` for n = 1)."""
        u = f" {unit}" if unit else ""
        head = f"{self.mean:{fmt}}{u}"
        if not self.has_interval:
            return f"{head} (n=1: no interval)"
        level = f"{self.confidence * 100:g}%"
        note = "" if self.distinguishable else "; the seeds cannot tell it from 0"
        return f"{head} [{level} CI {self.low:{fmt}}, {self.high:{fmt}}], n={self.n}{note}"


def t_interval(values: Any, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of ``values`` with Student's t; low/high NaN for fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    if len(x) == 0:
        raise ValueError("no values to average")
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def paired_difference(a: Mapping | pd.Series, b: Mapping | pd.Series, confidence: float = 0.95) -> PairedDifference:
    """Pair ``a`` and ``b`` (seed → value) on the seeds both have and summarise a − b.

    Seeds present on one side only are left out (pairing needs both); no common seed is an error, since
    then there is nothing to compare."""
    sa, sb = pd.Series(dict(a), dtype=float).dropna(), pd.Series(dict(b), dtype=float).dropna()
    common = sorted(set(sa.index) & set(sb.index), key=_sort_key)
    if not common:
        raise ValueError(f"no seed in common to pair: one side has seeds {sorted(sa.index, key=_sort_key)}, "
                         f"the other {sorted(sb.index, key=_sort_key)}")
    va, vb = sa.loc[common].to_numpy(), sb.loc[common].to_numpy()
    diff = va - vb
    mean, low, high = t_interval(diff, confidence)
    if len(diff) < 2:
        std = p = math.nan
    else:
        std = float(diff.std(ddof=1))
        if std <= 1e-12 * max(1.0, abs(mean)):  # identical differences (up to rounding): no t statistic
            std, low, high = 0.0, mean, mean
            p = 1.0 if mean == 0.0 else 0.0
        else:
            p = float(stats.ttest_rel(va, vb).pvalue)
    return PairedDifference(n=len(diff), mean_a=float(va.mean()), mean_b=float(vb.mean()), mean=mean, std=std,
                            low=low, high=high, p_value=p, confidence=confidence, seeds=tuple(common))


def _sort_key(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float, np.integer, np.floating)) else (1, 0, str(v))


def select(frame: pd.DataFrame, where: Mapping[str, Any]) -> pd.DataFrame:
    """Rows of ``frame`` whose columns equal the given values (a list means any of them)."""
    mask = pd.Series(True, index=frame.index)
    for col, want in where.items():
        if col not in frame:
            raise KeyError(f"no column {col!r}; columns: {', '.join(map(str, frame.columns))}")
        values = want if isinstance(want, (list, tuple, set)) else [want]
        mask &= frame[col].map(lambda v, ws=values: any(same_value(v, w) for w in ws))
    return frame[mask]


def same_value(value: Any, want: Any) -> bool:
    """Card values against run values: numbers within float rounding, names case-insensitively, None = missing."""
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        try:
            return math.isclose(float(value), float(want), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    if want is None:
        return value is None or (isinstance(value, float) and math.isnan(value))
    return str(value).lower() == str(want).lower()


def compare(frame: pd.DataFrame, a: Mapping[str, Any], b: Mapping[str, Any], metric: str = "test_acc1", *,
            by: str | None = "compression", seed: str = "seed", confidence: float = 0.95,
            scale: float = 1.0) -> pd.DataFrame:
    """Paired comparison of two strategies at every operating point they share (one row per point).

    ``a``/``b`` select the rows of each side (column → value); ``by`` is the operating-point column (None:
    one comparison over all rows); ``scale`` multiplies the metric (100 for accuracies in percent, the
    difference then in percentage points). Columns: ``by``, ``n``, ``mean_a``, ``mean_b``, ``diff``,
    ``std``, ``ci_low``, ``ci_high``, ``p_value``, ``distinguishable`` (False: the seeds cannot tell the
    difference from noise)."""
    rows = []
    sa, sb = select(frame, a), select(frame, b)
    if sa.empty or sb.empty:
        raise ValueError(f"no rows for side {'a' if sa.empty else 'b'} ({dict(a) if sa.empty else dict(b)})")
    points = [None] if by is None else sorted(set(sa[by]) & set(sb[by]))
    if not points:
        raise ValueError(f"the two sides share no {by}: {sorted(set(sa[by]))} vs {sorted(set(sb[by]))}")
    for point in points:
        pa = sa if point is None else sa[sa[by] == point]
        pb = sb if point is None else sb[sb[by] == point]
        va, vb = _per_seed(pa, metric, seed, "a", point), _per_seed(pb, metric, seed, "b", point)
        d = paired_difference(va * scale, vb * scale, confidence)
        rows.append({**({by: point} if by else {}), "n": d.n, "mean_a": d.mean_a, "mean_b": d.mean_b,
                     "diff": d.mean, "std": d.std, "ci_low": d.low, "ci_high": d.high, "p_value": d.p_value,
                     "distinguishable": d.distinguishable})
    return pd.DataFrame(rows)


def _per_seed(rows: pd.DataFrame, metric: str, seed: str, side: str, point: Any) -> pd.Series:
    dup = rows[seed][rows[seed].duplicated()]
    if len(dup):
        raise ValueError(f"side {side} has several rows for seed {dup.iloc[0]}"
                         f"{'' if point is None else f' at {point}'}: select one strategy per side")
    return rows.set_index(seed)[metric].astype(float)
