"""The claim vocabulary of a reproduction card: each kind is a small check over a study's runs.

Every claim selects rows (``where``: column → value, a list of values, or ``{"<=": 21.2}``), reads one
``metric`` (a column or an expression over columns) scaled by ``scale`` and, where it compares, two sides
``a`` and ``b`` (more filters, optionally their own ``metric`` or ``source``). At each operating point of
``at`` (values of the ``x`` column; the nearest one present within ``x_tolerance``, or interpolated in log₂ x
with ``interpolate``) each side gives one value per seed, and the two sides are paired by seed
(:func:`benchkit.verify.stats.paired_difference`). Kinds (registry :data:`CLAIM_KINDS`):

=============  ==================================================================================
``ordering``   a − b > ``margin`` at every point (``significant``: its t interval above it too)
``gap``        a − b (or a / b with ``ratio``) within [``min``, ``max``] (``significant``: interval too)
``within``     |a − b| ≤ ``tolerance`` and/or ≤ ``k_std`` × the seeds' pooled standard deviation
``threshold``  the mean over seeds of a within [``min``, ``max``]
``bounds``     every selected row of a within [``min``, ``max``]
``spread``     the standard deviation over seeds of a within [``min``, ``max``]
``crossing``   walking along x, a falls below b for good at an x within ``between``
``trend``      along x, a (or a − b with ``b``) only falls (``decreasing``) or only rises, within ``tolerance``
``best``       at every point, the best group of ``among`` matches ``expect``
=============  ==================================================================================

A new kind is one class and one registration::

    @dataclass
    class AboveChance:
        a: dict = field(default_factory=dict)
        classes: int = 10

    @register_claim("above_chance", AboveChance)
    def above_chance(claim, ctx):
        ...  # return a list of Check
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from benchkit.registry import Registry
from benchkit.verify.data import StudyData, describe_value, metric_values
from benchkit.verify.stats import PairedDifference, paired_difference, same_value, t_interval


class ClaimError(ValueError):
    """A claim cannot be evaluated on these rows (a card problem, or runs missing from the store)."""


class MissingRuns(ClaimError):
    """The rows a claim needs are not in the store (yet): in a study still running, the claim waits."""


# --------------------------------------------------------------------------------------------- claim
@dataclass
class Claim:
    """What every claim has; ``settings`` holds its kind's own fields (a dataclass of :data:`CLAIM_KINDS`)."""

    id: str
    says: str  # the claim in words (the paper's, or what the runs show)
    kind: str
    settings: Any = None
    where: dict[str, Any] = field(default_factory=dict)
    metric: str = "test_acc1"
    scale: float = 1.0  # 100: fractions shown as percent (differences in percentage points)
    unit: str = ""  # of a value ("%"); a difference of "%" values is in "pp"
    digits: int = 2
    source: str = "runs"
    x: str = "compression"
    x_unit: str = "×"
    at: Any = None  # operating points: a list, one value, {">=": 8} (every x present that satisfies it), or None
    x_tolerance: float = 0.05  # relative distance to the nearest x present that still counts as the point
    interpolate: bool = False  # in log2(x) between a seed's points (for metric axes such as speedup)
    reduce: str | None = None  # "mean": average several rows of one seed at a point (else that is an error)
    seed: str = "seed"
    confidence: float = 0.95
    known_difference: str | None = None  # why the runs here differ from the paper on this claim

    @property
    def diff_unit(self) -> str:
        return "pp" if self.unit == "%" else self.unit

    def value(self, v: float) -> str:
        sep = "" if self.unit in ("", "%", "×") else " "
        return f"{v:.{self.digits}f}{sep}{self.unit}" if math.isfinite(v) else "n/a"

    def delta(self, v: float) -> str:
        u = f" {self.diff_unit}" if self.diff_unit else ""
        return f"{v:+.{self.digits}f}{u}"

    def point(self, x: Any) -> str:
        if x is None:
            return "all"
        return str(x) if isinstance(x, str) else f"{float(x):.3g}{self.x_unit}"


@dataclass
class Check:
    """One point of a claim: whether it holds there, the numbers in full, and a short form for tables."""

    point: str
    ok: bool
    text: str
    short: str = ""


# --------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ClaimKind:
    name: str
    settings: type
    evaluate: Callable[[Claim, ClaimContext], list[Check]]
    requirement: Callable[[Claim], str]
    check: Callable[[Any], str | None]  # settings -> what is wrong with them (None: fine), asked when a card is read


CLAIM_KINDS: Registry[ClaimKind] = Registry("claim kind")


def register_claim(name: str, settings: type, requirement: Callable[[Claim], str] | None = None,
                   check: Callable[[Any], str | None] | None = None):
    """Decorator: ``evaluate(claim, ctx) -> list[Check]`` becomes claim kind ``name`` with its settings dataclass,
    the sentence saying what it requires, and ``check(settings)`` naming a setting problem before anything is read."""
    if not dataclasses.is_dataclass(settings):
        raise TypeError(f"the settings of claim kind {name!r} must be a dataclass, got {settings!r}")

    def add(fn: Callable[[Claim, ClaimContext], list[Check]]):
        CLAIM_KINDS.register(name, ClaimKind(name, settings, fn, requirement or (lambda c: ""),
                                             check or (lambda s: None)))
        return fn

    return add


def _needs_bounds(s: Any) -> str | None:
    return None if s.min is not None or s.max is not None else "needs min and/or max"


def _needs_direction(s: Any) -> str | None:
    return None if s.direction in ("increasing", "decreasing") else \
        f"direction must be increasing or decreasing, got {s.direction!r}"


# --------------------------------------------------------------------------------------------- rows
OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": same_value,
    "!=": lambda v, w: not same_value(v, w),
}


def _matches(value: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return all(_compare(value, op, w) for op, w in want.items())
    if isinstance(want, (list, tuple, set)):
        return any(same_value(value, w) for w in want)
    return same_value(value, want)


def _compare(value: Any, op: str, want: Any) -> bool:
    if op not in OPERATORS:
        raise ClaimError(f"unknown comparison {op!r}; use one of {', '.join(OPERATORS)}")
    if op in ("==", "!="):
        return OPERATORS[op](value, want)
    try:
        return bool(OPERATORS[op](float(value), float(want)))
    except (TypeError, ValueError):
        return False


@dataclass
class Side:
    label: str
    rows: pd.DataFrame
    metric: str
    source: str
    at: Any = None  # a point of its own (e.g. the dense level 0), whatever point the claim is at


class ClaimContext:
    """Rows and per-seed values for the claims of one card, over one :class:`StudyData`."""

    def __init__(self, study: StudyData):
        self.study = study

    # ------------------------------------------------------------------ selection
    def side(self, claim: Claim, spec: dict[str, Any] | None = None, name: str = "a") -> Side:
        """The rows of one side: the claim's ``where`` and the side's own filters; the side's reserved keys
        ``metric``, ``source``, ``label`` and ``at`` (a point of its own) override the claim's."""
        spec = dict(spec or {})
        source = spec.pop("source", None) or claim.source
        metric = spec.pop("metric", None) or claim.metric
        label = spec.pop("label", None)
        fixed = spec.pop("at", None)
        frame = self.study.frame(source)
        where = {**claim.where, **spec}
        missing = [c for c in where if c not in frame]
        if missing:
            raise ClaimError(f"side {name}: no column {missing[0]!r} in the {source} rows of {self.study.experiment!r}"
                             f"; columns: {', '.join(map(str, frame.columns))}")
        mask = pd.Series(True, index=frame.index)
        for col, want in where.items():
            mask &= frame[col].map(lambda v, w=want: _matches(v, w))
        rows = frame[mask]
        if rows.empty:
            raise MissingRuns(f"side {name}: no {source} row of {self.study.experiment!r} matches {where}")
        if label is None:
            label = " · ".join(_describe(v) if isinstance(v, (str, list, tuple)) else f"{k.rsplit('.', 1)[-1]} {v}"
                               for k, v in spec.items() if not isinstance(v, dict)) or (
                metric if metric != claim.metric else f"the {source}")
        return Side(label=label, rows=rows, metric=metric, source=source, at=fixed)

    def points(self, claim: Claim, sides: Sequence[Side]) -> list[Any]:
        """The operating points of ``claim.at`` (None: one comparison over all selected rows)."""
        at = claim.at
        if at is None:
            return [None]
        if isinstance(at, dict):  # every x present on all sides that satisfies the condition
            present = None
            for s in [s for s in sides if s.at is None]:
                xs = {float(v) for v in self.x_values(claim, s).dropna()}
                present = xs if present is None else present & xs
            found = sorted(x for x in present or () if all(_compare(x, op, w) for op, w in at.items()))
            if not found:
                raise MissingRuns(f"no {claim.x} value shared by the sides satisfies {at}")
            return found
        return list(at) if isinstance(at, (list, tuple)) else [at]

    def x_values(self, claim: Claim, side: Side) -> pd.Series:
        """The claim's x column on a side's rows, as numbers."""
        if claim.x not in side.rows:
            raise ClaimError(f"no column {claim.x!r} (the claim's x) in the {side.source} rows")
        return pd.to_numeric(side.rows[claim.x], errors="coerce")

    def values(self, claim: Claim, side: Side, point: Any) -> tuple[pd.Series, Any]:
        """Seed → value of ``side`` at ``point`` (and the x actually used: the nearest one present; None for a
        side with a point of its own)."""
        if side.at is not None:
            return self._values(claim, side, side.at)[0], None
        return self._values(claim, side, point)

    def _values(self, claim: Claim, side: Side, point: Any) -> tuple[pd.Series, Any]:
        rows = side.rows
        if claim.seed not in rows:
            raise ClaimError(f"no seed column {claim.seed!r} in the {side.source} rows")
        y = metric_values(rows, side.metric) * claim.scale
        if point is None:
            return self._per_seed(claim, side, rows, y, None), None
        if isinstance(point, str):  # a categorical axis (x: model): the rows of that value
            if claim.x not in rows:
                raise ClaimError(f"no column {claim.x!r} (the claim's x) in the {side.source} rows")
            at = rows[claim.x].map(lambda v: same_value(v, point))
            if not at.any():
                raise MissingRuns(f"side {side.label}: no row with {claim.x} = {point!r}")
            return self._per_seed(claim, side, rows[at], y[at], point), point
        x = self.x_values(claim, side)
        if claim.interpolate:
            return self._interpolated(claim, side, rows, x, y, float(point)), float(point)
        used = self.nearest(claim, side, x, float(point))
        at = np.isclose(x, used, rtol=1e-9, atol=0.0)
        return self._per_seed(claim, side, rows[at], y[at], point), used

    def nearest(self, claim: Claim, side: Side, x: pd.Series, point: float) -> float:
        """The x value present closest to ``point`` (relative distance), if within ``claim.x_tolerance``."""
        xs = np.unique(x.dropna().to_numpy(dtype=float))
        if len(xs) == 0:
            raise MissingRuns(f"side {side.label}: no {claim.x} values")
        best = float(xs[np.argmin(np.abs(xs - point) / max(abs(point), 1e-12))])
        if abs(best - point) > claim.x_tolerance * abs(point):
            raise MissingRuns(f"side {side.label}: no {claim.x} near {point:g} (within {claim.x_tolerance:.0%}); "
                             f"present: {', '.join(f'{v:g}' for v in xs)}")
        return best

    def _per_seed(self, claim: Claim, side: Side, rows: pd.DataFrame, y: pd.Series, point: Any) -> pd.Series:
        seeds = rows[claim.seed]
        counts = seeds.value_counts()
        if (counts > 1).any() and claim.reduce != "mean":
            dup = rows[seeds == counts.index[counts > 1][0]]
            varying = [c for c in dup.columns if dup[c].astype(str).nunique() > 1
                       and not c.startswith(("tags.", "run_", "start_", "end_")) and c not in ("run_id", "config_hash")]
            where = "" if point is None else f" at {claim.point(point)}"
            raise ClaimError(f"side {side.label} has {counts.max()} rows for seed {counts.index[counts > 1][0]}{where}; "
                             f"select one with more filters (columns that differ: {', '.join(varying[:8])}) or "
                             "set reduce: mean to average them")
        return y.groupby(seeds).mean()

    def _interpolated(self, claim: Claim, side: Side, rows: pd.DataFrame, x: pd.Series, y: pd.Series,
                      point: float) -> pd.Series:
        out, short = {}, []
        for seed, idx in rows.groupby(claim.seed).groups.items():
            xs, ys = x.loc[idx].to_numpy(float), y.loc[idx].to_numpy(float)
            order = np.argsort(xs)
            xs, ys = xs[order], ys[order]
            if len(np.unique(xs)) != len(xs):
                raise ClaimError(f"side {side.label}, seed {seed}: several rows at one {claim.x}; interpolation needs "
                                 "one curve per seed (add filters)")
            if not xs[0] * (1 - 1e-9) <= point <= xs[-1] * (1 + 1e-9):
                short.append(f"seed {seed} reaches {xs[0]:g}–{xs[-1]:g}")
                continue
            out[seed] = float(np.interp(np.log2(point), np.log2(xs), ys))
        if short:
            raise ClaimError(f"side {side.label}: {claim.x} {point:g} is outside the range of "
                             f"{'; '.join(short)}; choose points every seed reaches")
        return pd.Series(out, dtype=float)

    def paired(self, claim: Claim, a: Side, b: Side, point: Any) -> tuple[PairedDifference, str]:
        va, xa = self.values(claim, a, point)
        vb, xb = self.values(claim, b, point)
        try:
            d = paired_difference(va, vb, claim.confidence)
        except ValueError as e:
            raise MissingRuns(f"{claim.point(point)}: {e}") from None
        return d, _used(claim, point, xa, xb)


def _describe(v: Any) -> str:
    return "/".join(map(describe_value, v)) if isinstance(v, (list, tuple)) else describe_value(v)


def _used(claim: Claim, point: Any, *used: Any) -> str:
    """' (at 13.46%)' when the nearest x present is not exactly the point asked for."""
    if point is None or isinstance(point, str):
        return ""
    off = sorted({claim.point(u) for u in used if u is not None and not isinstance(u, str)} - {claim.point(point)})
    return f" (at {', '.join(off)})" if off else ""


def _bounds_text(lo: float | None, hi: float | None, fmt: Callable[[float], str]) -> str:
    if lo is None and hi is None:
        return "(no bounds)"
    if lo is not None and hi is not None:
        return f"in [{fmt(lo)}, {fmt(hi)}]"
    return f">= {fmt(lo)}" if lo is not None else f"<= {fmt(hi)}"


def _within(v: float, lo: float | None, hi: float | None) -> bool:
    return math.isfinite(v) and (lo is None or v >= lo) and (hi is None or v <= hi)


def _need_bounds(claim: Claim, lo: Any, hi: Any) -> None:
    if lo is None and hi is None:
        raise ClaimError(f"claim {claim.id!r} ({claim.kind}) needs min and/or max")


# --------------------------------------------------------------------------------------------- kinds
@dataclass
class Pair:
    a: dict[str, Any] = field(default_factory=dict)
    b: dict[str, Any] = field(default_factory=dict)


@dataclass
class OrderingSettings(Pair):
    margin: float = 0.0
    significant: bool = False


def _ordering_requirement(c: Claim) -> str:
    s = c.settings
    return (f"a − b > {c.delta(s.margin)} at every point"
            + (f", its {c.confidence:.0%} interval too" if s.significant else ""))


@register_claim("ordering", OrderingSettings, _ordering_requirement)
def ordering(claim: Claim, ctx: ClaimContext) -> list[Check]:
    s: OrderingSettings = claim.settings
    a, b = ctx.side(claim, s.a, "a"), ctx.side(claim, s.b, "b")
    checks = []
    for p in ctx.points(claim, [a, b]):
        d, used = ctx.paired(claim, a, b, p)
        ok = d.mean > s.margin and (not s.significant or (d.has_interval and d.low > s.margin))
        checks.append(Check(claim.point(p) + used, ok,
                            f"{a.label} {claim.value(d.mean_a)} vs {b.label} {claim.value(d.mean_b)}: "
                            f"{d.interval_text(f'+.{claim.digits}f', claim.diff_unit)}",
                            _short(claim, d)))
    return checks


def _short(claim: Claim, d: PairedDifference) -> str:
    if not d.has_interval:
        return claim.delta(d.mean)
    tail = "" if d.distinguishable else ", within noise"
    return f"{claim.delta(d.mean)} [{d.low:+.{claim.digits}f}, {d.high:+.{claim.digits}f}{tail}]"


@dataclass
class GapSettings(Pair):
    min: float | None = None
    max: float | None = None
    ratio: bool = False  # a / b per seed instead of a − b
    significant: bool = False


def _gap_requirement(c: Claim) -> str:
    s = c.settings
    what = "a / b" if s.ratio else "a − b"
    fmt = (lambda v: f"{v:.2f}") if s.ratio else c.delta
    return f"{what} {_bounds_text(s.min, s.max, fmt)}" + (f", its {c.confidence:.0%} interval too" if s.significant else "")


@register_claim("gap", GapSettings, _gap_requirement, _needs_bounds)
def gap(claim: Claim, ctx: ClaimContext) -> list[Check]:
    s: GapSettings = claim.settings
    _need_bounds(claim, s.min, s.max)
    a, b = ctx.side(claim, s.a, "a"), ctx.side(claim, s.b, "b")
    checks = []
    for p in ctx.points(claim, [a, b]):
        if s.ratio:
            va, xa = ctx.values(claim, a, p)
            vb, xb = ctx.values(claim, b, p)
            common = sorted(set(va.index) & set(vb.index))
            if not common:
                raise MissingRuns(f"{claim.point(p)}: the sides share no seed")
            r = va.loc[common] / vb.loc[common]
            mean, lo, hi = t_interval(r, claim.confidence)
            ok = _within(mean, s.min, s.max) and (not s.significant or (_within(lo, s.min, s.max)
                                                                      and _within(hi, s.min, s.max)))
            ci = f" [{claim.confidence:.0%} CI {lo:.2f}, {hi:.2f}]" if len(r) > 1 else ""
            text = (f"{a.label} {claim.value(va.loc[common].mean())} / {b.label} {claim.value(vb.loc[common].mean())}"
                    f": ratio {mean:.2f}{ci} (mean of the per-seed ratios), n={len(r)}")
            checks.append(Check(claim.point(p) + _used(claim, p, xa, xb), ok, text, f"ratio {mean:.2f}{ci}"))
            continue
        d, used = ctx.paired(claim, a, b, p)
        ok = _within(d.mean, s.min, s.max) and (not s.significant or (
            d.has_interval and _within(d.low, s.min, s.max) and _within(d.high, s.min, s.max)))
        checks.append(Check(claim.point(p) + used, ok,
                            f"{a.label} {claim.value(d.mean_a)} vs {b.label} {claim.value(d.mean_b)}: "
                            f"{d.interval_text(f'+.{claim.digits}f', claim.diff_unit)}", _short(claim, d)))
    return checks


@dataclass
class WithinSettings(Pair):
    tolerance: float | None = None  # |a − b| at most this (in the claim's unit)
    k_std: float | None = None  # |a − b| at most k × the pooled standard deviation over seeds of a and b


def _within_requirement(c: Claim) -> str:
    s = c.settings
    parts = ([f"|a − b| <= {c.delta(s.tolerance).lstrip('+')}"] if s.tolerance is not None else []) + (
        [f"|a − b| <= {s.k_std:g} × the pooled std over seeds"] if s.k_std is not None else [])
    return " and ".join(parts)


@register_claim("within", WithinSettings, _within_requirement,
                lambda s: None if s.tolerance is not None or s.k_std is not None else "needs tolerance and/or k_std")
def within(claim: Claim, ctx: ClaimContext) -> list[Check]:
    s: WithinSettings = claim.settings
    if s.tolerance is None and s.k_std is None:
        raise ClaimError(f"claim {claim.id!r} (within) needs tolerance and/or k_std")
    a, b = ctx.side(claim, s.a, "a"), ctx.side(claim, s.b, "b")
    checks = []
    for p in ctx.points(claim, [a, b]):
        va, xa = ctx.values(claim, a, p)
        vb, xb = ctx.values(claim, b, p)
        d = paired_difference(va, vb, claim.confidence)
        ok, notes = True, []
        if s.tolerance is not None:
            ok &= abs(d.mean) <= s.tolerance
            notes.append(f"tolerance {claim.delta(s.tolerance).lstrip('+')}")
        if s.k_std is not None:
            seeds = list(d.seeds)
            pooled = math.sqrt((va.loc[seeds].var(ddof=1) + vb.loc[seeds].var(ddof=1)) / 2) if d.n > 1 else math.nan
            ok &= math.isfinite(pooled) and abs(d.mean) <= s.k_std * pooled
            notes.append(f"{s.k_std:g} × pooled std = {s.k_std * pooled:.{claim.digits}f}")
        checks.append(Check(claim.point(p) + _used(claim, p, xa, xb), bool(ok),
                            f"{a.label} {claim.value(d.mean_a)} vs {b.label} {claim.value(d.mean_b)}: "
                            f"{d.interval_text(f'+.{claim.digits}f', claim.diff_unit)} ({'; '.join(notes)})",
                            _short(claim, d)))
    return checks


@dataclass
class SingleSettings:
    a: dict[str, Any] = field(default_factory=dict)
    min: float | None = None
    max: float | None = None


def _threshold_requirement(c: Claim) -> str:
    return f"mean over seeds {_bounds_text(c.settings.min, c.settings.max, c.value)} at every point"


def _per_point(claim: Claim, ctx: ClaimContext, describe: Callable[[Any, Any, Any], tuple[float, str, str]]) -> list[Check]:
    """One check per operating point of side ``a``: ``describe(side, values over seeds)`` gives the number held
    against the claim's bounds, the text that decided it and its short form."""
    s: SingleSettings = claim.settings
    _need_bounds(claim, s.min, s.max)
    a = ctx.side(claim, s.a, "a")
    checks = []
    for p in ctx.points(claim, [a]):
        v, used = ctx.values(claim, a, p)
        number, text, short = describe(a, v, p)
        checks.append(Check(claim.point(p) + _used(claim, p, used), _within(number, s.min, s.max), text, short))
    return checks


@register_claim("threshold", SingleSettings, _threshold_requirement, _needs_bounds)
def threshold(claim: Claim, ctx: ClaimContext) -> list[Check]:
    def describe(a, v, p):
        mean = float(v.mean())
        spread = f" ± {v.std(ddof=1):.{claim.digits}f}" if len(v) > 1 else ""
        return mean, f"{a.label} {claim.value(mean)}{spread} (n={len(v)})", claim.value(mean)

    return _per_point(claim, ctx, describe)


def _bounds_requirement(c: Claim) -> str:
    return f"every selected row {_bounds_text(c.settings.min, c.settings.max, lambda v: f'{v:g}')}"


@register_claim("bounds", SingleSettings, _bounds_requirement, _needs_bounds)
def bounds(claim: Claim, ctx: ClaimContext) -> list[Check]:
    s: SingleSettings = claim.settings
    _need_bounds(claim, s.min, s.max)
    a = ctx.side(claim, s.a, "a")
    rows = a.rows
    if claim.at is not None:
        x = ctx.x_values(claim, a)
        keep = np.zeros(len(rows), dtype=bool)
        for p in ctx.points(claim, [a]):
            keep |= np.isclose(x.to_numpy(float), ctx.nearest(claim, a, x, float(p)), rtol=1e-9, atol=0.0)
        rows = rows[keep]
    y = metric_values(rows, a.metric) * claim.scale
    bad = y[~y.map(lambda v: _within(v, s.min, s.max))]
    text = (f"{len(y)} rows of {a.label}: {a.metric} from {_num(y.min())} to {_num(y.max())}"
            + (f"; {len(bad)} outside, e.g. {_num(bad.iloc[0])}" if len(bad) else ""))
    return [Check("every row", bad.empty, text, f"{_num(y.min())} to {_num(y.max())} over {len(y)} rows")]


def _num(v: float) -> str:
    """Plain for ordinary magnitudes (1.0000), scientific for tiny or huge ones (1.84e-06)."""
    return "0" if v == 0 else (f"{v:.4f}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}")


def _spread_requirement(c: Claim) -> str:
    return f"std over seeds {_bounds_text(c.settings.min, c.settings.max, c.value)} at every point"


@register_claim("spread", SingleSettings, _spread_requirement, _needs_bounds)
def spread(claim: Claim, ctx: ClaimContext) -> list[Check]:
    def describe(a, v, p):
        if len(v) < 2:
            raise MissingRuns(f"{claim.point(p)}: a spread needs at least 2 seeds, {a.label} has {len(v)}")
        sd = float(v.std(ddof=1))
        return (sd, f"{a.label}: std {claim.value(sd)} over {len(v)} seeds (mean {claim.value(float(v.mean()))})",
                f"std {claim.value(sd)}")

    return _per_point(claim, ctx, describe)


@dataclass
class CrossingSettings(Pair):
    between: list[float] = field(default_factory=list)  # the crossing x must lie in this range
    direction: str = "increasing"  # walk x upwards (compression) or downwards ("decreasing": % remaining)


def _crossing_requirement(c: Claim) -> str:
    s = c.settings
    lo, hi = sorted(s.between) if len(s.between) == 2 else (math.nan, math.nan)
    return f"walking x {s.direction}, a stays below b from an x in [{c.point(lo)}, {c.point(hi)}] on"


@register_claim("crossing", CrossingSettings, _crossing_requirement,
                lambda s: "needs between: [low, high], the x range of the crossing" if len(s.between) != 2
                else _needs_direction(s))
def crossing(claim: Claim, ctx: ClaimContext) -> list[Check]:
    s: CrossingSettings = claim.settings
    if len(s.between) != 2:
        raise ClaimError(f"claim {claim.id!r} (crossing) needs between: [low, high], the x range of the crossing")
    if s.direction not in ("increasing", "decreasing"):
        raise ClaimError(f"claim {claim.id!r}: direction must be increasing or decreasing, got {s.direction!r}")
    a, b = ctx.side(claim, s.a, "a"), ctx.side(claim, s.b, "b")
    if claim.at is None:
        xs = sorted(set(ctx.x_values(claim, a).dropna().round(9)) & set(ctx.x_values(claim, b).dropna().round(9)))
    else:
        xs = [float(p) for p in ctx.points(claim, [a, b])]
    xs = sorted(xs, reverse=s.direction == "decreasing")
    if len(xs) < 2:
        raise MissingRuns(f"a crossing needs at least 2 points along {claim.x}; the sides share {xs}")
    diffs = [ctx.paired(claim, a, b, x)[0].mean for x in xs]
    below_from = None
    for i in range(len(xs) - 1, -1, -1):
        if diffs[i] < 0:
            below_from = xs[i]
        else:
            break
    lo, hi = sorted(s.between)
    along = ", ".join(f"{claim.point(x)} {claim.delta(d)}" for x, d in zip(xs, diffs))
    if below_from is None:
        return [Check("crossing", False, f"{a.label} is not below {b.label} at the last point; a − b along "
                                          f"{claim.x}: {along}", "no crossing")]
    ok = lo * (1 - 1e-9) <= below_from <= hi * (1 + 1e-9)
    return [Check("crossing", ok, f"{a.label} below {b.label} from {claim.point(below_from)} on; a − b along "
                                  f"{claim.x}: {along}", f"below from {claim.point(below_from)}")]


@dataclass
class TrendSettings:
    a: dict[str, Any] = field(default_factory=dict)
    b: dict[str, Any] | None = None  # with b: the trend of a − b (paired by seed)
    direction: str = "decreasing"  # along increasing x
    tolerance: float = 0.0  # a step against the direction up to this much still counts


def _trend_requirement(c: Claim) -> str:
    s = c.settings
    what = "a − b" if s.b is not None else "the mean of a"
    slack = f" (steps against it up to {c.delta(s.tolerance).lstrip('+')} allowed)" if s.tolerance else ""
    return f"{what} {'falls' if s.direction == 'decreasing' else 'rises'} at every step along {c.x}{slack}"


@register_claim("trend", TrendSettings, _trend_requirement, _needs_direction)
def trend(claim: Claim, ctx: ClaimContext) -> list[Check]:
    s: TrendSettings = claim.settings
    if s.direction not in ("increasing", "decreasing"):
        raise ClaimError(f"claim {claim.id!r}: direction must be increasing or decreasing, got {s.direction!r}")
    a = ctx.side(claim, s.a, "a")
    b = ctx.side(claim, s.b, "b") if s.b is not None else None
    sides = [a] if b is None else [a, b]
    if claim.at is None:
        xs = sorted(set.intersection(*({float(v) for v in ctx.x_values(claim, x).dropna()} for x in sides if x.at is None)))
    else:
        xs = sorted(float(p) for p in ctx.points(claim, sides))
    if len(xs) < 2:
        raise MissingRuns(f"a trend needs at least 2 points along {claim.x}, got {xs}")
    values = [ctx.paired(claim, a, b, x)[0].mean if b is not None else float(ctx.values(claim, a, x)[0].mean())
              for x in xs]
    sign = -1.0 if s.direction == "decreasing" else 1.0
    against = [(xs[i], xs[i + 1]) for i in range(len(xs) - 1)
               if sign * (values[i + 1] - values[i]) < -s.tolerance]
    fmt = claim.delta if b is not None else claim.value
    text = ", ".join(f"{claim.point(x)} {fmt(v)}" for x, v in zip(xs, values))
    if against:
        text += "; against the trend: " + ", ".join(f"{claim.point(u)} → {claim.point(v)}" for u, v in against)
    return [Check("trend", not against, text, f"{fmt(values[0])} at {claim.point(xs[0])} to {fmt(values[-1])} at "
                                              f"{claim.point(xs[-1])}")]


@dataclass
class BestSettings:
    among: list[str] = field(default_factory=list)  # the columns whose combinations compete
    expect: dict[str, Any] = field(default_factory=dict)  # what the winner must be
    lowest: bool = False  # the lowest value wins (errors, losses)


def _best_requirement(c: Claim) -> str:
    s = c.settings
    return (f"the {'lowest' if s.lowest else 'highest'} mean over {' × '.join(s.among)} has "
            + ", ".join(f"{k} = {v}" for k, v in s.expect.items()) + " at every point")


@register_claim("best", BestSettings, _best_requirement,
                lambda s: None if s.among and s.expect else "needs among: [columns] and expect: {column: value}")
def best(claim: Claim, ctx: ClaimContext) -> list[Check]:
    s: BestSettings = claim.settings
    if not s.among or not s.expect:
        raise ClaimError(f"claim {claim.id!r} (best) needs among: [columns] and expect: {{column: value}}")
    pool = ctx.side(claim, {}, "rows")
    missing = [c for c in s.among if c not in pool.rows]
    if missing:
        raise ClaimError(f"no column {missing[0]!r} to rank by")
    groups = {}
    for key, rows in pool.rows.groupby(list(s.among), dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        label = " · ".join(describe_value(k) for k in key)
        groups[label] = (dict(zip(s.among, key)), Side(label, rows, pool.metric, pool.source))
    checks = []
    for p in ctx.points(claim, [g[1] for g in groups.values()]):
        means = {}
        for label, (_, side) in groups.items():
            try:
                means[label] = float(ctx.values(claim, side, p)[0].mean())
            except ClaimError:
                continue  # this group has no run at this point
        ranked = sorted(means, key=means.get, reverse=not s.lowest)
        top = ranked[0]
        key = groups[top][0]
        ok = all(_matches(key.get(col), want) for col, want in s.expect.items())
        text = f"best {top} {claim.value(means[top])}"
        if len(ranked) > 1:
            d, _ = ctx.paired(claim, groups[top][1], groups[ranked[1]][1], p)
            text += f"; next {ranked[1]} {claim.value(means[ranked[1]])}, best − next " + d.interval_text(
                f"+.{claim.digits}f", claim.diff_unit)
        checks.append(Check(claim.point(p), ok, text, top))
    return checks
