"""One-shot pruning with calibration data (magnitude, Wanda, SparseGPT) read back as the papers tabulate it:
a run's *method* (criterion and comparison group) and *pattern* (unstructured sparsity or N:M), and Wanda's
Table 2 layout built from a runs frame: rows = methods (dense on top), columns = patterns, cells = mean ± std
over seeds.

>>> runs = runs.assign(method=runs.apply(method_label, axis=1), pattern=runs.apply(pattern_label, axis=1))
>>> method_table(runs, "test_perplexity")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from benchkit.analysis.aggregate import aggregate

DENSE = "dense"
# (criterion, comparison group) -> the name Wanda's tables use; any other pair reads "criterion (per group)"
METHODS: dict[tuple[str, str], str] = {
    ("magnitude", "layer"): "magnitude (per layer)",
    ("magnitude", "row"): "magnitude (per row)",
    ("wanda", "row"): "Wanda",
    ("sparsegpt", "row"): "SparseGPT",
}
METHOD_ORDER = [DENSE, *METHODS.values()]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def is_dense(row: pd.Series | dict) -> bool:
    """A run that pruned nothing: requested sparsity 0 (or compression 1) with no N:M pattern."""
    g = str(row.get("granularity", "element"))
    if ":" in g:
        return False
    s = row.get("prune.sparsity")
    if not _missing(s):
        return float(s) == 0.0
    c = row.get("compression")
    return not _missing(c) and float(c) == 1.0


def method_label(row: pd.Series | dict) -> str:
    """``Wanda``, ``SparseGPT``, ``magnitude (per layer)``...; ``dense`` for a run that pruned nothing."""
    if is_dense(row):
        return DENSE
    criterion = str(row.get("criterion"))
    comparison = row.get("prune.comparison")
    comparison = "auto" if _missing(comparison) else str(comparison)
    return METHODS.get((criterion, comparison), f"{criterion} (per {comparison})")


def pattern_label(row: pd.Series | dict) -> str:
    """``50%`` (unstructured, the requested sparsity of the pruned layers), ``2:4`` / ``4:8`` (N:M), ``dense``."""
    if is_dense(row):
        return DENSE
    g = str(row.get("granularity", "element"))
    if ":" in g:
        return g
    s = row.get("prune.sparsity")
    if _missing(s):
        c = row.get("compression")
        if _missing(c):
            raise ValueError(f"run {row.get('run_id', '?')}: neither prune.sparsity nor compression is set; "
                             "cannot name its sparsity")
        s = 1.0 - 1.0 / float(c)
    text = f"{float(s) * 100:.1f}".rstrip("0").rstrip(".")
    return f"{text}%" if g == "element" else f"{text}% {g}"


def pattern_sparsity(pattern: str) -> float:
    """The fraction of the pruned layers' weights a pattern removes: ``"2:4"`` → 0.5, ``"70%"`` → 0.7."""
    if pattern == DENSE:
        return 0.0
    head = pattern.split()[0]
    if ":" in head:
        n, m = (int(v) for v in head.split(":"))
        return 1.0 - n / m
    return float(head.rstrip("%")) / 100.0


def pattern_order(patterns: Sequence[str]) -> list[str]:
    """Wanda's column order: every pattern at the lowest unstructured sparsity, then N:M (4:8 before 2:4, the
    looser first), then the higher unstructured sparsities, ascending."""
    patterns = [p for p in dict.fromkeys(patterns) if p != DENSE]
    unstructured = sorted((p for p in patterns if ":" not in p), key=pattern_sparsity)
    nm = sorted((p for p in patterns if ":" in p), key=lambda p: (pattern_sparsity(p), -int(p.split(":")[1])))
    if not unstructured:
        return nm
    return [unstructured[0], *nm, *unstructured[1:]]


def method_order(methods: Sequence[str]) -> list[str]:
    """Dense first, then the known methods in Wanda's order, then anything else by name."""
    present = list(dict.fromkeys(methods))
    known = [m for m in METHOD_ORDER if m in present]
    return known + sorted(m for m in present if m not in known)


def label_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with ``method`` and ``pattern`` columns."""
    if runs.empty:
        return runs.assign(method=pd.Series(dtype=object), pattern=pd.Series(dtype=object))
    return runs.assign(method=runs.apply(method_label, axis=1), pattern=runs.apply(pattern_label, axis=1))


def method_table(runs: pd.DataFrame, metric: str, *, scale: float = 1.0, decimals: int = 2,
                 dense: pd.DataFrame | None = None) -> pd.DataFrame:
    """Wanda's Table 2 from labelled runs (:func:`label_runs`): one row per method, one column per pattern, cells
    ``mean ± std`` of ``metric`` × ``scale`` over the seeds, and ``n`` (the fewest seeds in a cell of the row).

    The ``dense`` row comes from ``dense`` (runs that pruned nothing; default: those among ``runs``) and is
    written in the first column, as the paper does. ``runs`` must hold one run per (method, pattern, seed):
    filter the other axes (allocation, fine-tuning) first."""
    if metric not in runs:
        raise KeyError(f"no column {metric!r} in the runs; metrics there: "
                       f"{[c for c in runs.columns if runs[c].dtype.kind == 'f'][:20]}")
    dense = runs[runs["method"] == DENSE] if dense is None else dense.assign(method=DENSE, pattern=DENSE)
    pruned = runs[runs["method"] != DENSE]
    dup = pruned.groupby(["method", "pattern", "seed"]).size()
    if (dup > 1).any():
        key = dup[dup > 1].index[0]
        raise ValueError(f"{dup.max()} runs for method {key[0]!r}, pattern {key[1]!r}, seed {key[2]}: filter the "
                         "runs to one strategy per cell (e.g. one allocation, with or without fine-tuning)")
    patterns = pattern_order(pruned["pattern"])
    rows = []
    if len(dense):
        rows.append(_cells(dense.assign(pattern=patterns[0] if patterns else DENSE), metric, scale, decimals, DENSE))
    for method in method_order(pruned["method"]):
        rows.append(_cells(pruned[pruned["method"] == method], metric, scale, decimals, method))
    table = pd.DataFrame(rows)
    cols = ["method", *[p for p in patterns if p in table], "n"]
    return table.reindex(columns=cols).fillna("")


def format_mean_std(mean: float, std: float, decimals: int = 2) -> str:
    """A table cell: ``mean ± std``; the mean alone where ``std`` is NaN (one seed); empty where ``mean`` is."""
    if pd.isna(mean):
        return ""
    return f"{mean:.{decimals}f}" if pd.isna(std) else f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def mean_std(values: Sequence[float] | pd.Series, decimals: int = 2) -> str:
    """:func:`format_mean_std` of ``values`` (e.g. one metric over seeds), sample std (ddof=1)."""
    v = pd.Series(values, dtype=float).dropna()
    return format_mean_std(v.mean(), v.std(ddof=1), decimals) if len(v) else ""


def _cells(rows: pd.DataFrame, metric: str, scale: float, decimals: int, method: str) -> dict[str, Any]:
    agg = aggregate(rows, by=["pattern"], metrics=[metric])
    out: dict[str, Any] = {"method": method}
    for _, r in agg.iterrows():
        out[r["pattern"]] = format_mean_std(r[f"{metric}_mean"] * scale, r[f"{metric}_std"] * scale, decimals)
    out["n"] = int(agg["n"].min())
    return out
