# %% [markdown]
# # One-shot pruning of a vision transformer: magnitude, Wanda, SparseGPT
#
# The language-model study's methods on a small vision transformer trained here on Fashion-MNIST: pruned once
# after training from a few calibration images, with no fine-tuning; magnitude compared per layer and per output
# row, Wanda (|W|·‖X‖₂ per row; Sun et al. 2024) and SparseGPT (row-wise OBS reconstruction; Frantar & Alistarh
# 2023) at 50% and 70% unstructured and 2:4, the same sparsity in every block Linear layer. The patch embedding
# and the classifier stay dense, as Wanda's image-classifier code prunes the blocks only.
#
# The runs: `BENCHKIT_DATA=../shared/data benchkit sweep experiments/vit_pruning.yaml` (see `results/README.md`
# for the exact command, hardware and wall time). Tables and figures go to `results/vit-pruning/`; the committed
# store `results/studies/mlflow.db` holds every run they are computed from.
#
# **Controls** (the next cell): `TRACKING_URI`, the MLflow store (environment `MLFLOW_TRACKING_URI`; default
# the committed study store `results/studies/mlflow.db`); `EXPERIMENT`, the sweep's `experiment:` name
# (`BENCHKIT_NOTEBOOK_EXPERIMENT`; default `vit-pruning`); `OUTPUT`, the folder for tables, figures and findings
# (`BENCHKIT_NOTEBOOK_OUTPUT`; default `results/<EXPERIMENT>/`). To render this notebook for your own sweep,
# from the repository root:
#
# ```bash
# .venv/bin/python notebooks/render.py 09_vit_pruning --tracking-uri sqlite:///mlflow.db --experiment my-sweep --out results/my-sweep
# ```

# %%
# %matplotlib inline
import os
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
import warnings

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from benchkit import analysis as ba
from benchkit import verify as bv

warnings.filterwarnings("ignore", category=pd.errors.PerformanceWarning)  # wide runs frames, harmless

# Run from notebooks/ (Jupyter's default) or from the repository root.
REPO = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'results/studies/mlflow.db'}"
EXPERIMENT = os.environ.get("BENCHKIT_NOTEBOOK_EXPERIMENT") or "vit-pruning"
OUTPUT = Path(os.environ.get("BENCHKIT_NOTEBOOK_OUTPUT") or REPO / "results" / EXPERIMENT)
study = ba.Study(EXPERIMENT, TRACKING_URI, OUTPUT, notebook="09_vit_pruning.py", repo=REPO)
print(f"store: {TRACKING_URI}\nexperiment: {EXPERIMENT}\noutputs: {OUTPUT}")

# %% [markdown]
# ## Runs
# Each run is named by its method (criterion and comparison group) and pattern (unstructured sparsity of the
# pruned layers, or N:M); `dense` is the sparsity-0 run of each seed, the model every pruned run of that seed
# starts from.

# %%
study.publish(study.provenance(), "study")
runs = ba.label_runs(study.runs())
METRICS = [m for m in ("sparsity", "compression_ratio", "theoretical_speedup", "dense_test_acc1", "test_acc1",
                       "test_loss", "val_acc1", "time_prune_s", "time_total_s") if m in runs]
ba.save_table(runs[["run_id", "method", "pattern", "seed", *METRICS]], OUTPUT / "runs.csv")
varying = [c for c in ba.strategy_columns(runs) if runs[c].astype(str).nunique() > 1
           and c not in ("criterion", "granularity", "compression", "prune.comparison", "prune.sparsity")]
if varying:
    raise RuntimeError(f"the runs differ in {varying} besides method and pattern: this notebook tabulates one "
                       "setting per (method, pattern); filter the runs or split the sweep")
SEEDS = sorted(runs["seed"].unique().tolist())
dense = runs[runs["method"] == "dense"]
PATTERNS = ba.pattern_order(runs.loc[runs["method"] != "dense", "pattern"])


def first(column: str):
    """The value of a setting the runs share, as text (`benchkit.analysis.shared_setting`)."""
    return ba.shared_setting(runs, column)


kwargs = first("model.kwargs") or {}
study.finding(f"Model: vit, {kwargs.get('n_layer', '?')} blocks of width {kwargs.get('n_embd', '?')}, "
              f"{kwargs.get('n_head', '?')} heads, {(first('params_total') or 0) / 1e3:.0f}K parameters, trained "
              f"{first('train.epochs')} epochs; calibration: {first('prune.calibration.samples')} "
              f"{first('prune.calibration.source')} images; kept dense: {first('prune.exclude') or 'nothing'}.")
print(f"{len(runs)} finished runs; methods {ba.method_order(runs['method'])}; patterns {PATTERNS}; seeds {SEEDS}")

# %% [markdown]
# ## Test accuracy per method and pattern
# Test top-1 (%), mean ± std over seeds, the dense model on top (Wanda's Table 2 layout).

# %%
table = ba.method_table(runs, "test_acc1", scale=100)
study.publish(table, "accuracy")
means = (runs[runs["method"] != "dense"].groupby(["method", "pattern"])["test_acc1"].mean() * 100).reset_index()
d = dense.groupby("seed")["test_acc1"].mean() * 100
study.finding(f"Dense: {d.mean():.2f}" + (f" ± {d.std():.2f}" if len(d) > 1 else "") + "% test top-1 (seeds "
              f"{d.index.tolist()}).")
for p in PATTERNS:
    at = means[means["pattern"] == p].sort_values("test_acc1", ascending=False)
    study.finding(f"{p}: " + ", ".join(f"{r['method']} {r['test_acc1']:.2f}% ({r['test_acc1'] - d.mean():+.2f} pp)"
                                       for _, r in at.iterrows()) + ".")

# %% [markdown]
# ## Paired differences over seeds
# Wanda and SparseGPT against magnitude (per layer, Wanda's baseline) and against each other, seed by seed, with
# 95% t intervals (`benchkit.verify.compare`), in percentage points of test top-1.

# %%
key = runs.assign(point=runs["pattern"])
pairs = [("Wanda", "magnitude (per layer)"), ("SparseGPT", "magnitude (per layer)"),
         ("magnitude (per row)", "magnitude (per layer)"), ("SparseGPT", "Wanda")]
parts = []
for a, b in pairs:
    if {a, b} <= set(key["method"]):
        parts.append(bv.compare(key, {"method": a}, {"method": b}, metric="test_acc1", by="point", scale=100)
                     .assign(comparison=f"{a} − {b}"))
if not parts:  # a study still running: no two methods share a pattern yet
    study.finding("No pair of methods has finished runs at a common pattern yet: no paired differences.")
else:
    diffs = pd.concat(parts, ignore_index=True)
    COMPARISONS = [f"{a} − {b}" for a, b in pairs]
    diffs = diffs.assign(c=diffs["comparison"].map(COMPARISONS.index), p=diffs["point"].map(PATTERNS.index))
    diffs = diffs.sort_values(["c", "p"])
    diffs = diffs[["comparison", "point", "n", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "distinguishable"]].rename(
        columns={"point": "pattern", "mean_a": "a (%)", "mean_b": "b (%)", "diff": "a − b (pp)"})
    study.publish(diffs, "paired_differences", floatfmt=".3g")
    for comp, g in diffs.groupby("comparison", sort=False):
        study.finding(f"{comp}: " + "; ".join(
            f"{r['pattern']} {r['a − b (pp)']:+.2f} pp" + (f" [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]" if r["n"] > 1 else "")
            + ("" if r["distinguishable"] else " (one seed)" if r["n"] < 2 else " (within noise)") for _, r in g.iterrows())
            + ".")
# the language-model papers' shape, transferred: magnitude is the least accurate at every pattern
worst = means.loc[means.groupby("pattern")["test_acc1"].idxmin()].set_index("pattern")["method"]
mag = [p for p in PATTERNS if worst[p].startswith("magnitude")]
study.finding(f"Published shape (magnitude degrades most): magnitude is the least accurate method at {len(mag)} of "
              f"{len(PATTERNS)} patterns" + (f" ({', '.join(mag)})" if mag else "")
              + ("" if len(mag) == len(PATTERNS) else "; elsewhere the least accurate is "
                 + ", ".join(f"{worst[p]} at {p}" for p in PATTERNS if p not in mag)) + ".")

# %% [markdown]
# ## Figure
# Test accuracy per pattern and method (bars: mean, whiskers: ±1 std over seeds; dashed: dense).

# %%
COLORS = {"magnitude (per layer)": "tab:red", "magnitude (per row)": "tab:orange", "Wanda": "tab:blue",
          "SparseGPT": "tab:green"}
agg = ba.aggregate(runs[runs["method"] != "dense"], by=["method", "pattern"], metrics=["test_acc1"])
methods = ba.method_order(agg["method"])
fig = Figure(figsize=(10.5, 4.2), layout="constrained")
ax = fig.subplots()
pos = np.arange(len(PATTERNS))
width = 0.8 / len(methods)
for i, m in enumerate(methods):
    g = agg[agg["method"] == m].set_index("pattern").reindex(PATTERNS)
    bars = ax.bar(pos + (i - (len(methods) - 1) / 2) * width, g["test_acc1_mean"] * 100, width,
                  yerr=g["test_acc1_std"].fillna(0) * 100, capsize=2, color=COLORS.get(m), label=m)
    ax.bar_label(bars, fmt="%.1f", fontsize="x-small", padding=2)
ax.axhline(d.mean(), color="black", linestyle="--", linewidth=1, label="dense")
low = min((agg["test_acc1_mean"] * 100).min(), d.mean())
ax.set_ylim(max(0.0, low - 5), min(100.0, d.mean() + 3))
ax.set_xticks(pos, PATTERNS)
ax.set_xlabel("Sparsity pattern of the blocks' Linear layers")
ax.set_ylabel("Test top-1 accuracy (%)")
fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize="small")
ax.set_title(f"{EXPERIMENT}: one-shot pruning, no fine-tuning (mean ± std over seeds {SEEDS})")
study.show(fig, "accuracy")

# %% [markdown]
# ## Findings
# Every sentence below was computed in this notebook; they are written to `findings.md` beside the tables and figures.

# %%
study.write_findings()
