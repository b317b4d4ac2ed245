# %% [markdown]
# # Pruning strategies: global vs uniform (layer-wise) allocation, magnitude vs Taylor vs random (ShrinkBench)
#
# Blalock et al. 2020 compare magnitude, gradient-magnitude (|w·g|, here `taylor`) and random pruning, each
# with one global threshold or the same fraction per layer, as accuracy-vs-compression and
# accuracy-vs-theoretical-speedup curves over several seeds. LeNet-300-100, one-shot pruning after training,
# then fine-tuning.
#
# The runs: `BENCHKIT_DATA=../shared/data benchkit sweep experiments/strategies.yaml` (see `results/README.md`
# for the exact command, hardware and wall time). Tables and figures go to `results/strategies/`; the
# committed store `results/studies/mlflow.db` holds every run they are computed from.
#
# **Controls** (the next cell): `TRACKING_URI`, the MLflow store (environment `MLFLOW_TRACKING_URI`; default
# the committed study store `results/studies/mlflow.db`); `EXPERIMENT`, the sweep's `experiment:` name
# (`BENCHKIT_NOTEBOOK_EXPERIMENT`; default `strategies`); `OUTPUT`, the folder for tables, figures and
# findings (`BENCHKIT_NOTEBOOK_OUTPUT`; default `results/<EXPERIMENT>/`). To render this notebook for your own
# sweep, from the repository root:
#
# ```bash
# .venv/bin/python notebooks/render.py 01_strategies --tracking-uri sqlite:///mlflow.db --experiment my-sweep --out results/my-sweep
# ```

# %%
# %matplotlib inline
import os
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
import warnings

import numpy as np
import pandas as pd

from benchkit import analysis as ba

warnings.filterwarnings("ignore", category=pd.errors.PerformanceWarning)  # wide runs frames, harmless

# Run from notebooks/ (Jupyter's default) or from the repository root.
REPO = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'results/studies/mlflow.db'}"
EXPERIMENT = os.environ.get("BENCHKIT_NOTEBOOK_EXPERIMENT") or "strategies"
OUTPUT = Path(os.environ.get("BENCHKIT_NOTEBOOK_OUTPUT") or REPO / "results" / EXPERIMENT)
study = ba.Study(EXPERIMENT, TRACKING_URI, OUTPUT, notebook="01_strategies.py", repo=REPO)
print(f"store: {TRACKING_URI}\nexperiment: {EXPERIMENT}\noutputs: {OUTPUT}")

# %% [markdown]
# ## Runs
# What the store holds for this study, then one row per finished run (`runs.csv`).

# %%
study.publish(study.provenance(), "study")
runs = study.runs()
axes = [c for c in ba.strategy_columns(runs) if runs[c].astype(str).nunique() > 1]
METRICS = [m for m in ("compression_ratio", "theoretical_speedup", "val_acc1", "test_acc1", "dense_test_acc1",
                       "time_total_s") if m in runs]
ba.save_table(runs[["run_id", *ba.strategy_columns(runs), "seed", *METRICS]], OUTPUT / "runs.csv")
print(f"{len(runs)} finished runs; strategies differ in {axes}; seeds {sorted(runs['seed'].unique().tolist())}")

# %% [markdown]
# ## Test accuracy, mean ± std over seeds
# Rows: requested compression; columns: criterion · allocation. Full statistics (achieved compression, speedup, validation accuracy) in `summary.csv`.

# %%
agg = ba.aggregate(runs, metrics=METRICS)
ba.save_table(agg, OUTPUT / "summary.csv")
agg["strategy"] = [ba.describe_strategy({c: r[c] for c in axes if c != "compression"}) for _, r in agg.iterrows()]
acc = ba.summary_table(agg, ["test_acc1"], by=["strategy", "compression"], scale={"test_acc1": 100})
table = acc.pivot(index="compression", columns="strategy", values="test_acc1").reset_index()
table.columns.name = None
table = table.rename(columns={"compression": "compression (×)"})
study.publish(table, "accuracy")
dense = runs.groupby("seed")["dense_test_acc1"].mean() * 100
study.finding(f"Dense {'/'.join(sorted(set(runs['model'])))} test accuracy {dense.mean():.2f} ± {dense.std():.2f}% over "
              f"seeds {dense.index.tolist()} (the common starting point of every pruned run of that seed).")

# %% [markdown]
# ## Accuracy vs compression and vs theoretical speedup
# ShrinkBench's two panels: log₂ x-axes, mean over seeds with a ±1 std band, dense accuracy dashed.

# %%
fig = ba.plot_tradeoffs(runs, "test_acc1",
                       title=f"{EXPERIMENT}: test accuracy after one-shot pruning + fine-tuning (mean ± std over seeds)")
study.show(fig, "tradeoff")
ratio = runs["theoretical_speedup"] / runs["compression_ratio"]
same = bool(np.allclose(ratio, 1.0, atol=1e-3))
study.finding(f"Theoretical speedup / compression ratio over the {len(runs)} runs lies in [{ratio.min():.4f}, "
              f"{ratio.max():.4f}]: " + ("the two x-axes are the same, so no ordering can change between them "
              "(every prunable layer is Linear: one multiply-add per weight per sample)." if same else
              "speedup and compression differ, so strategies can rank differently on the two axes."))

# %% [markdown]
# ## Global vs uniform at equal compression
# Paired by seed (both start from the same dense network): the difference of test accuracy, global threshold
# minus the same fraction per layer (`uniform`, ShrinkBench's layer-wise), in percentage points.

# %%
if {"global", "uniform"} <= set(runs["allocation"]):
    key = [c for c in axes if c != "allocation"]
    paired = runs.pivot_table(index=[*key, "seed"], columns="allocation", values="test_acc1").dropna()
    paired["diff"] = (paired["global"] - paired["uniform"]) * 100
    g = paired.groupby(key)["diff"]
    pairs = pd.DataFrame({"mean (pp)": g.mean(), "std (pp)": g.std(), "seeds": g.size(),
                                "seeds where global wins": g.apply(lambda d: int((d > 0).sum()))}).reset_index()
    study.publish(pairs.rename(columns={"compression": "compression (×)"}), "global_vs_uniform", floatfmt=".2f")
    for crit, rows in pairs[pairs["compression"] > 1].groupby("criterion"):
        ahead = rows[rows["mean (pp)"] > 0]
        clear = rows[rows["mean (pp)"] > rows["std (pp)"].fillna(0)]
        behind = rows[rows["mean (pp)"] < -rows["std (pp)"].fillna(0)]
        top = rows.loc[rows["compression"].idxmax()]
        study.finding(f"{crit}: global − uniform is positive on average at {len(ahead)} of {len(rows)} compressions > 1, "
                      f"by more than one std at {', '.join(f'{c:g}×' for c in clear['compression']) or 'none'}"
                      + (f", negative by more than one std at {', '.join(f'{c:g}×' for c in behind['compression'])}"
                         if len(behind) else "")
                      + f"; at {top['compression']:g}× it is {top['mean (pp)']:+.2f} ± {top['std (pp)']:.2f} pp.")
else:
    print("this sweep has no global/uniform pair to compare")


# %% [markdown]
# ## Global vs uniform at equal theoretical speedup
# Each strategy's mean accuracy is interpolated linearly in log₂(speedup) between its measured points, at
# speedups both allocations reach; ShrinkBench notes that the ranking at equal compression can reverse here.

# %%
def at_speedup(rows: pd.DataFrame, s: float) -> float:
    rows = rows.sort_values("theoretical_speedup_mean")
    return float(np.interp(np.log2(s), np.log2(rows["theoretical_speedup_mean"]), rows["test_acc1_mean"]))


rows = []
if {"global", "uniform"} <= set(runs["allocation"]) and not same:
    for crit, g in agg.groupby("criterion"):
        curves = {a: g[g["allocation"] == a] for a in ("global", "uniform")}
        if any(c.empty for c in curves.values()):
            continue
        top = min(c["theoretical_speedup_mean"].max() for c in curves.values())
        for s in [x for x in (2.0, 3.0, 4.0, 6.0, 8.0, 16.0) if x <= top] + [top]:
            acc = {a: at_speedup(c, s) * 100 for a, c in curves.items()}
            rows.append({"criterion": crit, "speedup (×)": s, "global (%)": acc["global"], "uniform (%)": acc["uniform"],
                         "global − uniform (pp)": acc["global"] - acc["uniform"]})
if rows:
    speed = pd.DataFrame(rows).drop_duplicates(["criterion", "speedup (×)"])
    study.publish(speed, "global_vs_uniform_at_speedup", floatfmt=".2f")
    for crit, g in speed.groupby("criterion"):
        last = g.iloc[-1]
        flips = bool(((g["global − uniform (pp)"] > 0).any()) and (g["global − uniform (pp)"] < 0).any())
        uniform = agg[(agg["criterion"] == crit) & (agg["allocation"] == "uniform")]
        study.finding(f"{crit}, at equal theoretical speedup: at {last['speedup (×)']:.2f}× (the most both allocations "
                      f"reach) global − uniform = {last['global − uniform (pp)']:+.2f} pp"
                      + ("; the sign changes along the curve" if flips else "")
                      + f"; global allocation reaches at most {g['speedup (×)'].max():.2f}× here, uniform "
                      f"{uniform['theoretical_speedup_mean'].max():.2f}×.")
else:
    print("speedup equals compression in every run (or no global/uniform pair): nothing to add to the table above")

# %% [markdown]
# ## Best strategy at each compression
# The highest mean test accuracy, and how far the random control is behind it.

# %%
best = agg.loc[agg.groupby("compression")["test_acc1_mean"].idxmax(), ["compression", "strategy", "n",
                                                                      "test_acc1_mean", "test_acc1_std"]]
if "random" in set(runs["criterion"]):
    rnd = agg[agg["criterion"] == "random"].groupby("compression")["test_acc1_mean"].max()
    best["best random (%)"] = best["compression"].map(rnd) * 100
best[["test_acc1_mean", "test_acc1_std"]] *= 100
best = best.rename(columns={"compression": "compression (×)", "test_acc1_mean": "test top-1 mean (%)",
                            "test_acc1_std": "std (pp)"})
study.publish(best, "best", floatfmt=".2f")
for _, r in best.iterrows():
    if r["compression (×)"] > 1:
        extra = (f", random pruning {r['test top-1 mean (%)'] - r['best random (%)']:.2f} pp behind"
                 if "best random (%)" in r else "")
        study.finding(f"{r['compression (×)']:g}×: best is {r['strategy']} at {r['test top-1 mean (%)']:.2f}%{extra}.")

# %% [markdown]
# ## Where the weights go
# Per-layer density of each strategy's most compressed run (lowest seed), from its `layers.csv` artifact:
# global allocation chooses the per-layer split itself.

# %%
top_c = runs["compression"].max()
chosen = runs[runs["compression"] == top_c].sort_values("seed").drop_duplicates(
    [c for c in axes if c != "compression"])
tables = study.layer_tables(chosen, lambda r: f"{ba.describe_strategy({c: r[c] for c in axes if c != 'compression'})}")
if tables:
    layers = pd.concat([t.assign(strategy=k) for k, t in tables.items()])
    study.publish(layers[["strategy", "run_id", "layer", "params", "nonzero", "density"]], "layers")
    # global allocation's choices span 1–50%: a log axis keeps the small bars readable
    study.show(ba.plot_layer_density(tables, title=f"Weights kept per layer at {top_c:g}× (seed {chosen['seed'].min()})",
                                     log=True), "layer_density")

# %% [markdown]
# ## Findings
# Every sentence below was computed in this notebook; they are written to `findings.md` beside the tables and figures.

# %%
study.write_findings()
