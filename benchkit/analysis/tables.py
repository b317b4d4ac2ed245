"""Tables for papers and READMEs: ``mean ± std`` summaries, CSV and GitHub Markdown export.

Markdown is written here rather than through ``DataFrame.to_markdown`` so that no extra package
(``tabulate``) is needed to publish a result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _cell(value: Any, floatfmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        return format(float(value), floatfmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame, *, floatfmt: str = ".4g", index: bool = False) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned, floats formatted with ``floatfmt``."""
    if index:
        df = df.reset_index()
    header = [_cell(str(c), floatfmt) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    rows = [[_cell(v, floatfmt) for v in row] for row in df.itertuples(index=False, name=None)]
    widths = [max([len(h), 3, *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w)
                                 for c, w, num in zip(cells, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else (":" + "-" * (w + 1))
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)]) + "\n"


def save_table(df: pd.DataFrame, path: str | Path, *, floatfmt: str = ".4g") -> Path:
    """Write ``df`` as CSV (``.csv``, full precision) or Markdown (``.md``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".md":
        path.write_text(to_markdown(df, floatfmt=floatfmt))
    else:
        raise ValueError(f"save_table writes .csv or .md files, got {path.name!r}")
    return path


def summary_table(
    agg: pd.DataFrame,
    metrics: Sequence[str],
    *,
    by: Sequence[str] | None = None,
    decimals: int = 2,
    scale: dict[str, float] | None = None,
    labels: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Paper-style table from :func:`aggregate` output: one ``mean ± std`` text column per metric.

    ``scale`` multiplies a metric before formatting (e.g. ``{"test_acc1": 100}`` for percent);
    a single run (no std) prints its mean alone; ``n`` is kept so the reader sees the seed count.
    """
    missing = [m for m in metrics if f"{m}_mean" not in agg]
    if missing:
        raise KeyError(f"{missing} have no _mean column; aggregate(...) them first "
                       f"(available: {[c[:-5] for c in agg.columns if c.endswith('_mean')]})")
    stats = {c for m in metrics for c in (f"{m}_mean", f"{m}_std")}
    by = [c for c in agg.columns if c not in stats and not c.endswith(("_mean", "_std")) and c != "n"] \
        if by is None else list(by)
    out = agg[by].copy()
    for m in metrics:
        k = (scale or {}).get(m, 1.0)
        mean, std = agg[f"{m}_mean"] * k, agg[f"{m}_std"] * k
        out[(labels or {}).get(m, m)] = [
            "" if pd.isna(a) else (f"{a:.{decimals}f}" if pd.isna(s) else f"{a:.{decimals}f} ± {s:.{decimals}f}")
            for a, s in zip(mean, std)
        ]
    if "n" in agg:
        out["n"] = agg["n"].to_numpy()
    return out.reset_index(drop=True)
