"""Average runs over seeds: one row per strategy with mean, standard deviation and count.

ShrinkBench's point: a single seed is not a result. Every figure and table goes through
:func:`aggregate`, which groups runs that differ *only* in their seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pandas as pd

from benchkit.analysis.runs import CONFIG_COLUMNS, metric_columns, param_columns
from benchkit.config import NON_SEMANTIC_KEYS, root_is_dataset

# The sweep axes, in the order a reader scans a table.
STRATEGY_COLUMNS = ("model", "data", "timing", "criterion", "granularity", "allocation", "compression")
# Params that never make two runs different strategies.
SEED_KEYS = frozenset({"seed"})
_ALIASED = frozenset({"prune.criterion", "prune.granularity", "prune.allocation", "prune.timing", "model.name",
                      "data.name", "prune.compression", "prune.sparsity"})


def _hashable(series: pd.Series) -> pd.Series:
    """Lists/dicts (``prune.exclude``, ``prune.overrides``) grouped by their text form."""
    if series.map(lambda v: isinstance(v, (list, dict, set))).any():
        return series.map(lambda v: repr(v) if isinstance(v, (list, dict, set)) else v)
    return series


def _varies(series: pd.Series) -> bool:
    return _hashable(series).astype(str).nunique(dropna=False) > 1


def strategy_columns(runs: pd.DataFrame) -> list[str]:
    """Columns that tell strategies apart: the sweep axes, plus any other config key that varies.

    Including every varying param (except the seed and keys that never change a result) means
    two configs that differ in, say, ``prune.finetune.epochs`` are never averaged together.
    """
    cols = [c for c in STRATEGY_COLUMNS if c in runs]
    skip = NON_SEMANTIC_KEYS
    datasets = runs["data"] if "data" in runs else runs.get("data.name")
    if datasets is not None and datasets.map(root_is_dataset).any():
        skip = skip - {"data.root"}  # an image folder's root is the dataset itself
    for c in param_columns(runs):
        if c in SEED_KEYS or c in skip or c in _ALIASED or c in CONFIG_COLUMNS:
            continue
        if _varies(runs[c]):
            cols.append(c)
    if "experiment" in runs and _varies(runs["experiment"]):
        cols.insert(0, "experiment")
    return cols


def aggregate(
    runs: pd.DataFrame,
    by: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    *,
    seed: str = "seed",
) -> pd.DataFrame:
    """Mean, sample standard deviation (ddof=1) and count of ``metrics`` over the runs of each group.

    ``by`` defaults to :func:`strategy_columns`; ``metrics`` to every metric column. Output columns:
    ``by``..., ``n`` (runs in the group), then ``<metric>_mean``, ``<metric>_std`` per metric.
    ``std`` is NaN for a single run. A group holding the same seed twice means ``by`` misses an axis
    that varies: that is warned about, since those runs are then averaged as if they were seeds.
    """
    by = list(strategy_columns(runs) if by is None else by)
    metrics = list(metric_columns(runs) if metrics is None else metrics)
    missing = [c for c in [*by, *metrics] if c not in runs]
    if missing:
        raise KeyError(f"columns {missing} are not in the runs frame; available: {list(runs.columns)}")
    if runs.empty:
        raise ValueError("no runs to aggregate (did the filter or status='FINISHED' remove them all?)")
    keys = pd.DataFrame({c: _hashable(runs[c]) for c in by}, index=runs.index)
    grouped = runs[metrics].groupby([keys[c] for c in by], dropna=False, sort=True) if by else None
    if grouped is None:
        out = pd.DataFrame({"n": [len(runs)]})
        for m in metrics:
            out[f"{m}_mean"] = [runs[m].mean()]
            out[f"{m}_std"] = [runs[m].std(ddof=1)]
        return out
    out = grouped.size().rename("n").to_frame()
    for m in metrics:
        out[f"{m}_mean"] = grouped[m].mean()
        out[f"{m}_std"] = grouped[m].std(ddof=1)
    if seed in runs:
        dup = runs.groupby([keys[c] for c in by], dropna=False)[seed].agg(lambda s: s.duplicated().any())
        if dup.any():
            warnings.warn(
                f"{int(dup.sum())} group(s) contain the same {seed} more than once: a varying column is "
                f"missing from by={by}; those runs are averaged as if they were different seeds",
                stacklevel=2,
            )
    return out.reset_index()
