"""Paper-style figures from runs frames: trade-off curves, per-layer densities, lottery levels,
training curves. Every function returns a ``matplotlib.figure.Figure``.

Figures are built with ``matplotlib.figure.Figure`` directly, not through ``pyplot``: they work
under any backend (Agg on servers), never pile up in pyplot's global figure list inside sweeps,
and show in Jupyter with ``display(fig)`` or as a cell's last expression.

Accuracies are drawn in percent: a column whose values all lie in [0, 1] is taken to hold
fractions and is multiplied by 100 (the axis label says %).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

from benchkit.analysis.aggregate import aggregate, strategy_columns
from benchkit.analysis.runs import TICKET

LABELS: dict[str, str] = {
    "compression_ratio": "Compression ratio (prunable weights / non-zero, ×)",
    "model_compression_ratio": "Compression ratio, all parameters (×)",
    "theoretical_speedup": "Theoretical speedup (dense / non-zero FLOPs, ×)",
    "compacted_speedup": "Speedup after channel removal (×)",
    "sparsity": "Sparsity (fraction of prunable weights zero)",
    "flops_nonzero": "Non-zero FLOPs (multiply-adds per sample)",
    "percent_remaining": "Weights remaining (%)",
    "best_step": "Early-stopping iteration",
    "density": "Density (% of weights kept)",
    "step": "Step",
}
_NAMES = {"acc1": "top-1 accuracy", "acc5": "top-5 accuracy", "loss": "loss (cross-entropy)"}
_SPLITS = {"val": "Validation", "test": "Test", "train": "Training", "dense_val": "Dense validation",
           "dense_test": "Dense test"}
_ACCURACY = re.compile(r"acc\d*$")
BRANCH_LABELS = {TICKET: "winning ticket", "reinit": "random reinitialisation", "random": "random pruning"}
BRANCH_STYLES = {TICKET: "-", "reinit": "--", "random": ":"}
# Line styles for many strategies: colour tells the first hue column's values apart, marker and dash the
# rest, so 18 strategies (6 criteria × 3 allocations) are 18 distinguishable lines.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
DASHES = ("-", "--", ":", "-.")
LEGEND_INSIDE = 6  # more entries than this go beside the panels, where they hide no data


# --------------------------------------------------------------------------------------------- helpers
def is_accuracy(metric: str) -> bool:
    return bool(_ACCURACY.search(metric))


def percent_factor(metric: str, *columns: pd.Series) -> float:
    """100 for an accuracy stored as a fraction (all values in [0, 1]), else 1."""
    if not is_accuracy(metric):
        return 1.0
    values = pd.concat([pd.Series(c, dtype="float64") for c in columns]).dropna()
    return 100.0 if len(values) and values.between(0, 1).all() else 1.0


def axis_label(metric: str, *, log2: bool = False) -> str:
    """Human axis label with units for a metric name (``test_acc1`` → 'Test top-1 accuracy (%)')."""
    if metric in LABELS:
        label = LABELS[metric]
    else:
        split, _, what = metric.rpartition("_")
        if what in _NAMES and (split in _SPLITS or not split):
            label = f"{_SPLITS.get(split, '')} {_NAMES[what]}".strip()
            label = label[0].upper() + label[1:]
            if is_accuracy(metric):
                label += " (%)"
        else:
            label = metric
    return f"{label}, log₂ scale" if log2 else label


def describe_strategy(values: Mapping[str, object]) -> str:
    """Legend text of one strategy: 'magnitude · global' (named params show as key=value)."""
    parts = []
    for col, v in values.items():
        if col in {"criterion", "granularity", "allocation", "timing", "model", "data", "experiment", "phase", "run_id"}:
            parts.append(str(v))
        else:
            parts.append(f"{col.rsplit('.', 1)[-1]}={v}")
    return " · ".join(parts) or "all runs"


def _axes(ax: Axes | None, ncols: int = 1, width: float = 5.0, height: float = 3.8) -> tuple[Figure, list[Axes]]:
    if ax is not None:
        if ncols != 1:
            raise ValueError("this figure has several panels; leave ax=None to get a new figure")
        return ax.figure, [ax]
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, list(np.atleast_1d(fig.subplots(1, ncols)))


def _log2_axis(ax: Axes) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _hue(runs: pd.DataFrame, hue: Sequence[str] | None, exclude: Sequence[str]) -> list[str]:
    if hue is not None:
        missing = [c for c in hue if c not in runs]
        if missing:
            raise KeyError(f"hue columns {missing} are not in the frame; available: {list(runs.columns)}")
        return list(hue)
    return [c for c in strategy_columns(runs)
            if c not in exclude and runs[c].astype(str).nunique(dropna=False) > 1]


def _groups(agg: pd.DataFrame, hue: list[str]):
    """(label, rows) per strategy, in a stable order."""
    if not hue:
        shared = {c: agg[c].iloc[0] for c in ("criterion", "granularity", "allocation", "timing") if c in agg}
        yield describe_strategy(shared), agg
        return
    for key, rows in agg.groupby(hue, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        yield describe_strategy(dict(zip(hue, key))), rows


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def line_styles(keys: Sequence[tuple]) -> dict[tuple, dict[str, object]]:
    """``{key: {color, marker, linestyle}}`` for strategy keys (tuples of hue values), unique per key: the
    first value picks the colour, the remaining values the marker and dash. One hue column: colours (tab10,
    or tab20 past 10), and markers and dashes change with each round of the palette."""
    keys = list(dict.fromkeys(keys))
    firsts = list(dict.fromkeys(k[0] if k else None for k in keys))
    rests = list(dict.fromkeys(k[1:] for k in keys))
    styles = {}
    if len(rests) > 1:
        colors = _colors(len(firsts))
        for k in keys:
            j = rests.index(k[1:])
            styles[k] = {"color": colors[firsts.index(k[0])], "marker": MARKERS[j % len(MARKERS)],
                         "linestyle": DASHES[(j // len(MARKERS) + j) % len(DASHES)]}
    else:
        colors = _colors(len(keys))
        palette = 10 if len(keys) <= 10 else 20
        for i, k in enumerate(keys):
            turn = i // palette
            styles[k] = {"color": colors[i], "marker": MARKERS[turn % len(MARKERS)],
                         "linestyle": DASHES[turn % len(DASHES)]}
    return styles


def _legend_outside(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend for all panels, beside them (constrained layout makes room), in as many columns as keep
    it no taller than the figure allows; the panels' own legends are dropped."""
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    rows = max(1, int(fig.get_figheight() * 72 / 14))  # small font: ~14 pt per entry
    fig.legend(handles, labels, loc="outside right upper", fontsize="small", ncols=-(-len(labels) // rows))


def _baseline(runs: pd.DataFrame, column: str) -> float:
    """Dense accuracy averaged per seed first, so seeds with more runs do not weigh more."""
    for col in ("model", "data"):
        if col in runs and runs[col].astype(str).nunique() > 1:
            raise ValueError(f"a dense baseline needs one {col}, the runs have {sorted(runs[col].astype(str).unique())}; "
                             "filter the runs or pass baseline=None")
    values = runs[[c for c in ("seed", column) if c in runs]].dropna(subset=[column])
    if values.empty:
        raise ValueError(f"baseline column {column!r} holds no values")
    return float(values.groupby("seed")[column].mean().mean() if "seed" in values else values[column].mean())


# --------------------------------------------------------------------------------------------- trade-off
def plot_tradeoff(
    runs: pd.DataFrame,
    x: str = "compression_ratio",
    y: str = "test_acc1",
    *,
    hue: Sequence[str] | None = None,
    baseline: str | None = "auto",
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Accuracy against compression (or speedup), one line per strategy, mean ± std over seeds.

    ShrinkBench's figure: each point is one requested compression, placed at the mean *achieved*
    ``x`` and mean ``y`` over seeds, with a ±1 std band in ``y``; log₂ x-axis; the dense model's
    accuracy (``dense_<y>``, averaged over seeds) as a horizontal dashed line.
    """
    for col in (x, y):
        if col not in runs:
            raise KeyError(f"{col!r} is not a column of the runs frame; metrics there: "
                           f"{[c for c in runs.columns if runs[c].dtype.kind == 'f']}")
    hue = _hue(runs, hue, exclude=("compression",))
    by = list(dict.fromkeys([*hue, *[c for c in strategy_columns(runs) if c not in hue]]))
    agg = aggregate(runs, by=by, metrics=[x, y])
    if baseline == "auto":
        baseline = f"dense_{y}" if f"dense_{y}" in runs and runs[f"dense_{y}"].notna().any() else None
    k = percent_factor(y, runs[y], *([runs[baseline]] if baseline else []))

    own = ax is None
    fig, (ax,) = _axes(ax)
    groups = list(_groups(agg, hue))
    styles = line_styles([tuple(rows[hue].iloc[0]) if hue else () for _, rows in groups])
    for label, rows in groups:
        rows = rows.sort_values(f"{x}_mean")
        xm, ym = rows[f"{x}_mean"].to_numpy(), rows[f"{y}_mean"].to_numpy() * k
        ys = rows[f"{y}_std"].fillna(0).to_numpy() * k
        (line,) = ax.plot(xm, ym, label=label, markersize=5, **styles[tuple(rows[hue].iloc[0]) if hue else ()])
        ax.fill_between(xm, ym - ys, ym + ys, color=line.get_color(), alpha=0.15 if len(groups) > 6 else 0.2,
                        linewidth=0)
    if baseline:
        ax.axhline(_baseline(runs, baseline) * k, color="black", linestyle="--", linewidth=1, label="dense")
    _log2_axis(ax)
    ax.set_xlabel(axis_label(x, log2=True))
    ax.set_ylabel(axis_label(y))
    ax.set_title(title if title is not None else f"{axis_label(y).split(' (')[0]} vs {x.replace('_', ' ')}")
    ax.grid(True, which="major", alpha=0.3)
    if len(groups) + bool(baseline) <= LEGEND_INSIDE:
        ax.legend(fontsize="small")
    elif own:
        _legend_outside(fig, [ax])
    else:  # an axes of the caller's: the legend goes beside it, the caller's layout makes room
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    return fig


def plot_tradeoffs(
    runs: pd.DataFrame,
    y: str = "test_acc1",
    xs: Sequence[str] = ("compression_ratio", "theoretical_speedup"),
    *,
    hue: Sequence[str] | None = None,
    baseline: str | None = "auto",
    title: str | None = None,
) -> Figure:
    """Side-by-side trade-offs against each of ``xs`` (ShrinkBench: compression and speedup can rank
    strategies differently). Panels share one style per strategy; past a few strategies their legend
    stands beside the panels, and the figure widens for it instead of squeezing them."""
    fig, axes = _axes(None, ncols=len(xs))
    for ax, x in zip(axes, xs):
        plot_tradeoff(runs, x, y, hue=hue, baseline=baseline, ax=ax, title=f"vs {axis_label(x).split(' (')[0].lower()}")
    labels = axes[0].get_legend_handles_labels()[1]
    if len(labels) > LEGEND_INSIDE:
        rows = max(1, int(fig.get_figheight() * 72 / 14))
        columns = -(-len(labels) // rows)
        fig.set_figwidth(fig.get_figwidth() + columns * (0.9 + 0.075 * max(map(len, labels))))
        _legend_outside(fig, axes)
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------------------- layers
BAR_INCHES = 0.16  # thickness of one bar: above the bar labels' font, so labels never overlap


def plot_layer_density(
    layers: pd.DataFrame | Mapping[str, pd.DataFrame],
    reference: Mapping[str, float] | Sequence[float] | None = None,
    *,
    reference_label: str = "reference",
    ax: Axes | None = None,
    title: str | None = None,
    log: bool = False,
) -> Figure:
    """Horizontal bars of the share of weights kept per layer, for one or several runs, beside a reference.

    ``layers`` is a run's ``layers.csv`` (columns ``layer`` and ``density`` in [0, 1]) or a mapping
    label → such table, drawn as grouped bars in layer order, top to bottom. ``reference`` gives published
    densities, keyed by layer name or as a list in layer order (e.g. ``HAN2015_LENET300``). The figure
    grows with the number of layers and series (``BAR_INCHES`` per bar), so a 54-layer ResNet is as
    readable as LeNet; ``log`` puts density on a log axis, for densities of a few percent.
    """
    tables = {"this run": layers} if isinstance(layers, pd.DataFrame) else dict(layers)
    if not tables:
        raise ValueError("no per-layer tables to plot")
    for label, t in tables.items():
        missing = {"layer", "density"} - set(t.columns)
        if missing:
            raise KeyError(f"per-layer table {label!r} lacks {sorted(missing)}; expected layers.csv columns "
                           "(layer, type, shape, params, nonzero, density, ...)")
    names = list(dict.fromkeys(n for t in tables.values() for n in t["layer"]))
    series = {label: t.set_index("layer")["density"].reindex(names).to_numpy(dtype=float) * 100
              for label, t in tables.items()}
    if reference is not None:
        if isinstance(reference, Mapping):
            unknown = [k for k in reference if k not in names]
            if unknown:
                raise KeyError(f"reference layers {unknown} are not among the run's layers {names}; key the "
                               "reference by these names, or pass a list of densities in layer order")
            ref = np.array([reference.get(n, np.nan) for n in names], dtype=float)
        else:
            if len(reference) != len(names):
                raise ValueError(f"reference has {len(reference)} densities for {len(names)} layers {names}")
            ref = np.asarray(reference, dtype=float)
        series[reference_label] = ref * 100

    group = 0.8  # of a layer's row; the rest separates layers
    legend_rows = -(-len(series) // 3) if len(series) > 1 else 0
    own = ax is None
    # title, axis label and ticks take ~1.7 in; then one legend row per 3 series, and the bars
    height = 1.7 + 0.25 * legend_rows + len(names) * len(series) * BAR_INCHES / group
    fig, (ax,) = _axes(ax, width=8.0, height=max(3.0, height))
    pos = np.arange(len(names))
    thickness = group / len(series)
    for i, (label, values) in enumerate(series.items()):
        hatch = "//" if (reference is not None and label == reference_label) else None
        bars = ax.barh(pos + (i - (len(series) - 1) / 2) * thickness, values, thickness, label=label, hatch=hatch)
        ax.bar_label(bars, fmt="%.3g", fontsize="x-small", padding=2)
    ax.set_yticks(pos, names, fontsize="small")
    ax.set_ylim(len(names) - 0.5, -0.5)  # first layer on top
    ax.set_ylabel("Layer")
    if log:
        ax.set_xscale("log")
        ax.set_xlim(0.5, 300)  # room for the labels right of a 100% bar
        ax.set_xlabel(axis_label("density") + ", log scale")
    else:
        ax.set_xlim(0, 115)
        ax.set_xlabel(axis_label("density"))
    ax.xaxis.grid(True, alpha=0.3)
    ax.set_title(title if title is not None else "Weights kept per layer")
    if legend_rows and own:  # above the bars, out of their way however many layers there are
        fig.legend(*ax.get_legend_handles_labels(), loc="outside upper center", ncols=min(3, len(series)),
                   fontsize="small", frameon=False)
    elif legend_rows:
        ax.legend(fontsize="small")
    return fig


# --------------------------------------------------------------------------------------------- lottery
def _percent_axis(ax: Axes, percents: np.ndarray) -> None:
    """Log x-axis running from 100% (dense) down to the sparsest level, ticked at the levels."""
    ax.set_xscale("log")
    ticks = np.unique(np.round(percents[np.isfinite(percents)], 1))
    ax.xaxis.set_major_locator(NullLocator())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize="small")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(ticks.max() * 1.15, ticks.min() / 1.15)


def plot_lottery(
    levels: pd.DataFrame,
    y: str = "test_acc1",
    early_stop: str | None = "best_step",
    *,
    hue: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Lottery tickets and their controls over pruning levels (Frankle & Carbin 2019, Figs. 3–4).

    ``levels`` comes from :func:`load_levels`. Left: ``y`` against weights remaining; right: the
    early-stopping iteration (``early_stop``; None drops the panel). Each branch (ticket, reinit,
    random) is a line of means over seeds with a ±1 std band, x on a reversed log axis (100 → 1 %).
    """
    quantities = [q for q in (y, early_stop) if q]
    missing = [q for q in ["branch", "level", "percent_remaining", *quantities] if q not in levels]
    if missing:
        raise KeyError(f"levels frame lacks {missing}; build it with load_levels(runs) "
                       f"(it has {list(levels.columns)})")
    hue = _hue(levels, hue, exclude=("compression",))
    hue = [c for c in hue if c not in {"branch", "level"}]
    agg = aggregate(levels, by=[*hue, "branch", "level"], metrics=["percent_remaining", *quantities])
    fig, axes = _axes(None, ncols=len(quantities))
    k = percent_factor(y, levels[y])
    for ax, q in zip(axes, quantities):
        scale = k if q == y else 1.0
        order = list(BRANCH_LABELS)
        groups = sorted(_groups(agg, [*hue, "branch"]), key=lambda g: (
            tuple(map(str, g[1][hue].iloc[0])), order.index(b) if (b := g[1]["branch"].iloc[0]) in order else len(order)))
        for _label, rows in groups:
            branch = rows["branch"].iloc[0]
            strategy = describe_strategy(dict(zip(hue, rows[hue].iloc[0]))) if hue else ""
            rows = rows.sort_values("level")
            xm = rows["percent_remaining_mean"].to_numpy()
            ym = rows[f"{q}_mean"].to_numpy() * scale
            ys = rows[f"{q}_std"].fillna(0).to_numpy() * scale
            ok = np.isfinite(ym)
            text = BRANCH_LABELS.get(branch, branch) + (f" ({strategy})" if strategy else "")
            (line,) = ax.plot(xm[ok], ym[ok], marker="o", linestyle=BRANCH_STYLES.get(branch, "-"), label=text)
            ax.fill_between(xm[ok], (ym - ys)[ok], (ym + ys)[ok], color=line.get_color(), alpha=0.2, linewidth=0)
        _percent_axis(ax, agg["percent_remaining_mean"].to_numpy())
        ax.set_xlabel(axis_label("percent_remaining") + ", log scale")
        ax.set_ylabel(axis_label(q))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_title("Accuracy of tickets and controls")
    if early_stop:
        axes[-1].set_title("Early-stopping iteration (best validation)")
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------------------- training
def plot_training_curves(
    history: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    *,
    hue: Sequence[str] | None = None,
    step_label: str = "Iteration (optimizer steps in the phase)",
    title: str | None = None,
) -> Figure:
    """Curves from :func:`load_history`: one panel per metric, one line per phase and strategy,
    mean ± std over seeds at each step (per run when the frame carries no config columns)."""
    for col in ("metric", "phase", "step", "value"):
        if col not in history:
            raise KeyError(f"history frame lacks {col!r}; build it with load_history(runs, metrics)")
    metrics = list(dict.fromkeys(history["metric"])) if metrics is None else list(metrics)
    unknown = [m for m in metrics if m not in set(history["metric"])]
    if unknown:
        raise KeyError(f"no history for {unknown}; the frame holds {sorted(set(history['metric']))}")
    if hue is None:
        hue = _hue(history, None, exclude=())
        if not hue and "seed" not in history:
            hue = ["run_id"]
    lines = [*hue, "phase"] if history["phase"].astype(str).nunique() > 1 else list(hue)
    fig, axes = _axes(None, ncols=len(metrics))
    for ax, metric in zip(axes, metrics):
        rows = history[history["metric"] == metric]
        k = percent_factor(metric, rows["value"])
        agg = aggregate(rows.rename(columns={"value": metric}), by=[*lines, "step"], metrics=[metric])
        for label, g in _groups(agg, lines):
            g = g.sort_values("step")
            xm, ym = g["step"].to_numpy(), g[f"{metric}_mean"].to_numpy() * k
            ys = g[f"{metric}_std"].fillna(0).to_numpy() * k
            (line,) = ax.plot(xm, ym, marker="." if len(xm) < 30 else None, label=label)
            ax.fill_between(xm, ym - ys, ym + ys, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(step_label)
        ax.set_ylabel(axis_label(metric))
        ax.set_title(axis_label(metric).split(" (")[0])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------------------- MLflow
def log_figure(fig: Figure, run_id: str, name: str, *, tracking_uri: str | None = None) -> str:
    """Store ``fig`` as an artifact of ``run_id`` (PNG unless ``name`` ends in .svg/.pdf/.jpg);
    returns the artifact path."""
    from mlflow import MlflowClient

    path = PurePosixPath(name)
    if path.suffix.lower() not in {".png", ".svg", ".pdf", ".jpg", ".jpeg"}:
        path = path.with_name(path.name + ".png")
    MlflowClient(tracking_uri=tracking_uri).log_figure(run_id, fig, str(path), save_kwargs={"dpi": 150})
    return str(path)
