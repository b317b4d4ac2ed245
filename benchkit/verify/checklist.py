"""ShrinkBench's reporting checklist (Blalock et al. 2020, section 7) as rules over any sweep's runs.

    benchkit verify --checklist strategies --tracking-uri sqlite:///results/studies/mlflow.db

Each rule (registry :data:`RULES`) says what it found and, when it fails, what is missing:

* ``operating-points``: every method at >= 5 compressions > 1, spanning 2× to 32×;
* ``both-axes``: compression ratio and theoretical speedup logged by every run;
* ``seeds``: >= 3 seeds at every (method, operating point), with the spread they show;
* ``baselines``: magnitude and random pruning both in the sweep;
* ``equal-budgets``: the same training after pruning for every compared method (:data:`BUDGETS`);
* ``dense-baseline``: the unpruned network's accuracy (dense runs, or ``dense_*`` logged by every run).

A *method* is a combination of the sweep's strategy axes (timing, criterion, granularity, allocation, and any
other config key that varies) without compression and seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from benchkit.config import NON_SEMANTIC_KEYS
from benchkit.registry import Registry
from benchkit.verify.data import current_names

MIN_POINTS, LOW, HIGH, MIN_SEEDS = 5, 2.0, 32.0, 3
AXES = ("model", "data", "timing", "criterion", "granularity", "allocation")
#: budgets, not methods: a sweep whose methods differ in these fails equal-budgets instead of comparing "methods"
BUDGET_KEYS = frozenset({"train.epochs", "train.iterations", "prune.post.finetune.epochs",
                         "prune.post.finetune.iterations"})
ALIASES = frozenset({"prune.criterion", "prune.granularity", "prune.allocation", "prune.timing", "model.name",
                     "data.name", "prune.compression", "prune.sparsity", "seed"}) | NON_SEMANTIC_KEYS


@dataclass
class RuleResult:
    rule: str
    ok: bool
    found: str  # what the runs have
    missing: list[str] = field(default_factory=list)  # what is missing, one line each


@dataclass
class Sweep:
    """The runs a checklist reads (today's param names), with their methods and operating points."""

    runs: pd.DataFrame
    metric: str = "test_acc1"

    def __post_init__(self) -> None:
        self.runs = current_names(self.runs).reset_index(drop=True)
        if self.runs.empty:
            raise ValueError("no runs to check")
        candidates = [c for c in AXES if c in self.runs] + [
            c for c in self.runs.columns if "." in c and not c.startswith(("tags.", "metrics."))
            and c not in ALIASES and c not in BUDGET_KEYS and not c.startswith("prune.collapse.")]
        pruned = self.runs[self._points() > 1.0 + 1e-9]
        self.method_columns = [c for c in candidates if c in pruned and pruned[c].astype(str).nunique(dropna=False) > 1]
        self.runs["method"] = self.runs.apply(
            lambda r: " · ".join(str(r[c]) for c in self.method_columns) or "all runs", axis=1)
        self.runs["point"] = self._points()

    def _points(self) -> pd.Series:
        """The requested compression of each run, else the achieved one."""
        nan = pd.Series(math.nan, index=self.runs.index)
        requested = self.runs["compression"] if "compression" in self.runs else nan
        achieved = self.runs["compression_ratio"] if "compression_ratio" in self.runs else nan
        return requested.where(requested.notna(), achieved).astype(float)

    @property
    def pruned(self) -> pd.DataFrame:
        return self.runs[self.runs["point"] > 1.0 + 1e-9]

    @property
    def dense(self) -> pd.DataFrame:
        return self.runs[~(self.runs["point"] > 1.0 + 1e-9)]


RULES: Registry[Callable[[Sweep], RuleResult]] = Registry("checklist rule")
ORDER = ("operating-points", "both-axes", "seeds", "baselines", "equal-budgets", "dense-baseline")


def _fmt(x: float) -> str:
    return f"{x:g}×"


@RULES.register("operating-points")
def operating_points(sweep: Sweep) -> RuleResult:
    pruned = sweep.pruned
    if pruned.empty:
        return RuleResult("operating-points", False, "no pruned run", ["runs at compressions 2, 4, 8, 16, 32 (>= 5 "
                                                                       "points from 2× to 32×)"])
    missing, spans = [], []
    for method, rows in pruned.groupby("method"):
        pts = sorted(set(rows["point"].round(6)))
        spans.append(len(pts))
        problems = []
        if len(pts) < MIN_POINTS:
            problems.append(f"{len(pts)} point(s), needs >= {MIN_POINTS}")
        if pts[0] > LOW * 1.01:
            problems.append(f"lowest {_fmt(pts[0])}, needs one at <= {_fmt(LOW)}")
        if pts[-1] < HIGH * 0.99:
            problems.append(f"highest {_fmt(pts[-1])}, needs one at >= {_fmt(HIGH)}")
        if problems:
            missing.append(f"{method}: at {', '.join(map(_fmt, pts))}: {'; '.join(problems)}")
    found = (f"{pruned['method'].nunique()} method(s) at {min(spans)}–{max(spans)} compressions > 1 "
             f"({', '.join(map(_fmt, sorted(set(pruned['point'].round(6)))))})")
    return RuleResult("operating-points", not missing, found, missing)


@RULES.register("both-axes")
def both_axes(sweep: Sweep) -> RuleResult:
    missing = []
    for col, what in (("compression_ratio", "compression ratio"), ("theoretical_speedup", "theoretical speedup")):
        if col not in sweep.runs:
            missing.append(f"{what} ({col}) logged by no run")
        elif sweep.runs[col].isna().any():
            missing.append(f"{what} ({col}) missing in {int(sweep.runs[col].isna().sum())} of {len(sweep.runs)} runs")
    have = [c for c in ("compression_ratio", "theoretical_speedup") if c in sweep.runs]
    return RuleResult("both-axes", not missing, f"logged: {', '.join(have) or 'neither'}", missing)


@RULES.register("seeds")
def seeds(sweep: Sweep) -> RuleResult:
    runs = sweep.pruned if len(sweep.pruned) else sweep.runs
    if "seed" not in runs:
        return RuleResult("seeds", False, "no seed column", ["a seed per run (config key `seed`)"])
    groups = runs.groupby(["method", "point"])
    counts = groups["seed"].nunique()
    missing = [f"{m} at {_fmt(p)}: {n} seed(s), needs >= {MIN_SEEDS}" for (m, p), n in counts.items() if n < MIN_SEEDS]
    found = f"{counts.min()}–{counts.max()} seeds per (method, point)"
    if sweep.metric in runs:
        scale = 100.0 if "acc" in sweep.metric else 1.0
        std = groups[sweep.metric].std(ddof=1).dropna() * scale
        if len(std):
            unit = " pp" if scale == 100 else ""
            found += f"; std of {sweep.metric} over seeds {std.min():.2f}–{std.max():.2f}{unit} (median {std.median():.2f})"
    else:
        missing.append(f"metric {sweep.metric!r} (the spread is reported for it): logged by no run")
    return RuleResult("seeds", not missing, found, missing)


@RULES.register("baselines")
def baselines(sweep: Sweep) -> RuleResult:
    pruned = sweep.pruned
    have = set(pruned["criterion"].astype(str).str.lower()) if "criterion" in pruned else set()
    missing = [f"{c} pruning (prune.criterion: {c}) as a baseline" for c in ("magnitude", "random") if c not in have]
    return RuleResult("baselines", not missing, f"criteria: {', '.join(sorted(have)) or 'none'}", missing)


# --------------------------------------------------------------------------------------------- budgets
#: timing -> (run row -> (amount, unit)) of training after the first pruning step: what the pruned network gets
#: to recover. Register one for a new timing: ``BUDGETS.register("mine", lambda r: (r["train.epochs"], "epochs"))``.
BUDGETS: Registry[Callable[[pd.Series], tuple[float, str]]] = Registry("fine-tuning budget")


def _get(r: pd.Series, key: str, default: Any = None) -> Any:
    v = r.get(key, default)
    return default if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _train_length(r: pd.Series) -> tuple[float, str]:
    it = _get(r, "train.iterations")
    return (float(it), "iterations") if it else (float(_get(r, "train.epochs", math.nan)), "epochs")


@BUDGETS.register("post")
def _post_budget(r: pd.Series) -> tuple[float, str]:
    rounds = float(_get(r, "prune.post.rounds", 1))
    it = _get(r, "prune.post.finetune.iterations")
    if it:
        return rounds * float(it), "fine-tuning iterations"
    return rounds * float(_get(r, "prune.post.finetune.epochs", math.nan)), "fine-tuning epochs"


BUDGETS.register("pre", lambda r: _train_length(r))
BUDGETS.register("dynamic", lambda r: _train_length(r))


@BUDGETS.register("during")
def _during_budget(r: pd.Series) -> tuple[float, str]:
    amount, unit = _train_length(r)
    return amount * (1.0 - float(_get(r, "prune.during.start", 0.0))), unit


@BUDGETS.register("lottery")
def _lottery_budget(r: pd.Series) -> tuple[float, str]:
    amount, unit = _train_length(r)
    return amount * float(_get(r, "prune.lottery.levels", math.nan)), unit


@RULES.register("equal-budgets")
def equal_budgets(sweep: Sweep) -> RuleResult:
    pruned = sweep.pruned
    if pruned.empty:
        return RuleResult("equal-budgets", False, "no pruned run", ["pruned runs to compare"])
    per_method: dict[str, set[str]] = {}
    unknown = set()
    for _, r in pruned.iterrows():
        timing = str(r.get("timing", "post"))
        if timing not in BUDGETS:
            unknown.add(timing)
            continue
        amount, unit = BUDGETS.get(timing)(r)
        per_method.setdefault(r["method"], set()).add(f"{amount:g} {unit}")
    missing = [f"timing {t!r} has no budget rule: register one with benchkit.verify.checklist.BUDGETS.register"
               for t in sorted(unknown)]
    budgets = sorted(set().union(*per_method.values())) if per_method else []
    if len(budgets) > 1:
        missing.append("training after pruning differs across methods: " + "; ".join(
            f"{m}: {', '.join(sorted(b))}" for m, b in sorted(per_method.items())))
    return RuleResult("equal-budgets", not missing, f"training after pruning: {', '.join(budgets) or 'unknown'}",
                      missing)


@RULES.register("dense-baseline")
def dense_baseline(sweep: Sweep) -> RuleResult:
    dense = sweep.dense
    logged = [c for c in sweep.runs.columns if c.startswith("dense_") and c.endswith("acc1")]
    pruned = sweep.pruned
    keys = [c for c in ("model", "data") if c in sweep.runs]
    if len(dense):
        have = {tuple(r) for r in dense[keys].astype(str).itertuples(index=False)}
        need = {tuple(r) for r in pruned[keys].astype(str).itertuples(index=False)}
        lacking = sorted(need - have)
        if not lacking:
            return RuleResult("dense-baseline", True, f"{len(dense)} dense run(s) (compression 1)")
    if logged and len(pruned) and pruned[logged].notna().all(axis=1).all():
        return RuleResult("dense-baseline", True, f"every pruned run logs its dense network's {', '.join(logged)}")
    some = (f"; {', '.join(logged)} logged by {int(pruned[logged].notna().all(axis=1).sum())} of {len(pruned)} pruned "
            "runs" if logged and len(pruned) else "; no dense metric logged")
    return RuleResult("dense-baseline", False, f"{len(dense)} dense run(s){some}",
                      ["the unpruned network's accuracy: add prune.compression: 1 to the grid (or log dense_test_acc1)"])


def checklist(runs: pd.DataFrame, metric: str = "test_acc1") -> list[RuleResult]:
    """Every rule of :data:`RULES` over ``runs`` (a :func:`benchkit.analysis.load_runs` frame)."""
    sweep = Sweep(runs, metric)
    names = [*ORDER, *(n for n in RULES.names() if n not in ORDER)]
    return [RULES.get(name)(sweep) for name in names]


def format_checklist(experiment: str, results: list[RuleResult]) -> str:
    lines = [f"ShrinkBench checklist for {experiment!r}:"]
    for r in results:
        lines.append(f"  {'ok  ' if r.ok else 'MISS'}  {r.rule}: {r.found}")
        lines += [f"          missing: {m}" for m in r.missing]
    bad = sum(not r.ok for r in results)
    lines.append(f"  {len(results) - bad} of {len(results)} rules met" + (f"; {bad} missing" if bad else ""))
    return "\n".join(lines)
