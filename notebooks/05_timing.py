# %% [markdown]
# # Timing: when to prune, at equal compression
#
# LeNet-300-100 at 10×: pruned at initialisation (random, SNIP, SynFlow), gradually during training (AGP, Zhu
# & Gupta 2017), after training (one shot, or 3 rounds with fine-tuning), or as lottery tickets (5 levels of
# iterative pruning rewound to initialisation). The compute each costs differs: the `epochs` column counts the
# training epochs a run performs.
#
# The runs: `BENCHKIT_DATA=../shared/data benchkit sweep experiments/timing.yaml` (see `results/README.md` for
# the exact command, hardware and wall time). Tables and figures go to `results/timing/`; the committed store
# `results/studies/mlflow.db` holds every run they are computed from.
#
# **Controls** (the next cell): `TRACKING_URI`, the MLflow store (environment `MLFLOW_TRACKING_URI`; default
# the committed study store `results/studies/mlflow.db`); `EXPERIMENT`, the sweep's `experiment:` name
# (`BENCHKIT_NOTEBOOK_EXPERIMENT`; default `timing`); `OUTPUT`, the folder for tables, figures and findings
# (`BENCHKIT_NOTEBOOK_OUTPUT`; default `results/<EXPERIMENT>/`). To render this notebook for your own sweep,
# from the repository root:
#
# ```bash
# .venv/bin/python notebooks/render.py 05_timing --tracking-uri sqlite:///mlflow.db --experiment my-sweep --out results/my-sweep
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

warnings.filterwarnings("ignore", category=pd.errors.PerformanceWarning)  # wide runs frames, harmless

# Run from notebooks/ (Jupyter's default) or from the repository root.
REPO = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'results/studies/mlflow.db'}"
EXPERIMENT = os.environ.get("BENCHKIT_NOTEBOOK_EXPERIMENT") or "timing"
OUTPUT = Path(os.environ.get("BENCHKIT_NOTEBOOK_OUTPUT") or REPO / "results" / EXPERIMENT)
study = ba.Study(EXPERIMENT, TRACKING_URI, OUTPUT, notebook="05_timing.py", repo=REPO)
print(f"store: {TRACKING_URI}\nexperiment: {EXPERIMENT}\noutputs: {OUTPUT}")

# %% [markdown]
# ## Runs

# %%
study.publish(study.provenance(), "study")
runs = study.runs()
axes = [c for c in ba.strategy_columns(runs) if runs[c].astype(str).nunique() > 1]


def label(r) -> str:
    """'pre · snip', 'post · magnitude · 3 rounds', 'lottery · magnitude · 5 levels'."""
    text = ba.describe_strategy({c: r[c] for c in axes if c != "prune.post.rounds"})
    if r["timing"] == "post" and r["prune.post.rounds"] > 1:
        text += f" · {r['prune.post.rounds']} rounds"
    if r["timing"] == "lottery":
        text += f" · {r['prune.lottery.levels']} levels"
    return text


runs["strategy"] = runs.apply(label, axis=1)


def epochs(r) -> float:
    """Training epochs the run performs (the dense network of `post` counted once)."""
    e = r["train.epochs"]
    if r["timing"] == "post":
        return e + r["prune.post.rounds"] * r["prune.post.finetune.epochs"]
    if r["timing"] == "lottery":
        return e * (r["prune.lottery.levels"] + 1) * (1 + len(r.get("prune.lottery.controls") or []))
    return e


runs["epochs"] = runs.apply(epochs, axis=1)
METRICS = [m for m in ("compression_ratio", "theoretical_speedup", "val_acc1", "test_acc1", "dense_test_acc1",
                       "epochs", "time_total_s") if m in runs]
ba.save_table(runs[["run_id", "strategy", *ba.strategy_columns(runs), "seed", *METRICS]], OUTPUT / "runs.csv")
print(f"{len(runs)} finished runs; strategies differ in {axes}; seeds {sorted(runs['seed'].unique().tolist())}")

# %% [markdown]
# ## Accuracy at equal compression
# Mean ± std over seeds; `dense` is the network trained without pruning for the same epochs (logged by the timings that train one).

# %%
agg = ba.aggregate(runs, by=["strategy"], metrics=METRICS)
order = list(dict.fromkeys(runs["strategy"]))
agg = agg.set_index("strategy").loc[order].reset_index()
table = ba.summary_table(agg, ["compression_ratio", "test_acc1", "val_acc1"], by=["strategy"],
                         scale={"test_acc1": 100, "val_acc1": 100},
                         labels={"compression_ratio": "compression (×)", "test_acc1": "test top-1 (%)",
                                 "val_acc1": "val top-1 (%)"})
table["training epochs"] = agg["epochs_mean"].to_numpy()
if "time_total_s_mean" in agg:
    table["wall time per run (min)"] = (agg["time_total_s_mean"] / 60).round(2).to_numpy()
study.publish(table, "summary")
dense = runs.dropna(subset=["dense_test_acc1"]).groupby("seed")["dense_test_acc1"].mean() * 100
best = agg.loc[agg["test_acc1_mean"].idxmax()]
worst = agg.loc[agg["test_acc1_mean"].idxmin()]
study.finding(f"Dense reference (same training, no pruning): {dense.mean():.2f}% (mean over seeds {dense.index.tolist()}).")
for _, r in agg.iterrows():
    study.finding(f"{r['strategy']}: {r['test_acc1_mean'] * 100:.2f}"
                  + (f" ± {r['test_acc1_std'] * 100:.2f}" if r["n"] > 1 else "")
                  + f"% at {r['compression_ratio_mean']:.2f}× ({r['test_acc1_mean'] * 100 - dense.mean():+.2f} pp vs dense), "
                  f"{r['epochs_mean']:g} training epochs.")
study.finding(f"Spread between strategies: {(best['test_acc1_mean'] - worst['test_acc1_mean']) * 100:.2f} pp "
              f"(best {best['strategy']}, worst {worst['strategy']}).")

# %% [markdown]
# ## Figure
# Left: test accuracy per strategy (mean, ±1 std whiskers; dashed: dense). Right: the training epochs each strategy spends.

# %%
fig = Figure(figsize=(12, 4.5), layout="constrained")
ax_acc, ax_cost = fig.subplots(1, 2)
pos = np.arange(len(agg))
bars = ax_acc.barh(pos, agg["test_acc1_mean"] * 100, xerr=agg["test_acc1_std"].fillna(0) * 100, capsize=3)
ax_acc.bar_label(bars, fmt="%.2f", fontsize="small", label_type="center", color="white")
if len(dense):
    ax_acc.axvline(dense.mean(), color="black", linestyle="--", linewidth=1, label="dense")
    ax_acc.legend(fontsize="small", loc="lower right")
low = (agg["test_acc1_mean"] * 100).min()
ax_acc.set_xlim(max(0.0, low - 5), min(100.0, max((agg["test_acc1_mean"] * 100).max(), dense.max() if len(dense) else 0) + 3))
ax_acc.set_yticks(pos, agg["strategy"])
ax_acc.invert_yaxis()
ax_acc.set_xlabel("Test top-1 accuracy (%)")
ax_acc.set_title(f"Accuracy at {agg['compression_ratio_mean'].mean():.1f}× compression")
bars = ax_cost.barh(pos, agg["epochs_mean"], color="tab:gray")
ax_cost.bar_label(bars, fmt="%g", fontsize="small", padding=2)
ax_cost.set_yticks(pos, agg["strategy"])
ax_cost.invert_yaxis()
ax_cost.set_xlabel("Training epochs per run (incl. fine-tuning / retraining)")
ax_cost.set_title("Compute spent")
fig.suptitle(f"{EXPERIMENT}: when to prune (LeNet-300-100)")
study.show(fig, "timing")

# %% [markdown]
# ## The AGP schedule, checked
# The sparsity reached at every mask update of the `during` runs (logged per update) against Zhu & Gupta's formula s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(nΔt))³, computed here from the config.

# %%
during = runs[runs["timing"] == "during"]
if len(during):
    # one `level_*` value per mask update, logged with step = update index
    upd = ba.load_history(during, ["level_step", "level_sparsity", "level_target_sparsity"], tracking_uri=TRACKING_URI)
    upd = (upd.pivot_table(index=["run_id", "seed", "step"], columns="metric", values="value").reset_index()
           .rename(columns={"step": "update", "level_step": "step", "level_sparsity": "sparsity",
                            "level_target_sparsity": "target_sparsity"}))
    def agp_sparsity(step, s_i, s_f, t0, tn):
        return s_f + (s_i - s_f) * (1 - np.clip((step - t0) / (tn - t0), 0, 1)) ** 3

    rows = []
    for run_id, g in upd.groupby("run_id"):
        r = during.set_index("run_id").loc[run_id]
        # s_f from the requested compression; t0 and t0 + nΔt are the first and last update logged
        schedule = (r["prune.during.initial_sparsity"], 1 - 1 / r["compression"], g["step"].min(), g["step"].max())
        rows.append(g.assign(formula=agp_sparsity(g["step"], *schedule)))
    agp = pd.concat(rows)[["run_id", "seed", "update", "step", "target_sparsity", "sparsity", "formula"]]
    ba.save_table(agp, OUTPUT / "agp.csv")
    dev = (agp["sparsity"] - agp["formula"]).abs().max()
    study.finding(f"AGP: over {agp['run_id'].nunique()} run(s) and {len(agp)} mask updates, the achieved sparsity is within "
                  f"{dev:.2e} of Zhu & Gupta's cubic schedule.")
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    first = agp[agp["run_id"] == agp["run_id"].iloc[0]]
    steps = np.linspace(first["step"].min(), first["step"].max(), 200)
    ax.plot(steps, agp_sparsity(steps, *schedule) * 100, color="black", linewidth=1, label="Zhu & Gupta formula")
    for (seed, g), marker in zip(agp.groupby("seed"), "oxs+^v"):
        ax.plot(g["step"], g["sparsity"] * 100, marker, markersize=6 if marker == "o" else 4,
                fillstyle="none", label=f"achieved (seed {seed})")
    ax.set_xlabel("Training iteration")
    ax.set_ylabel("Sparsity of prunable weights (%)")
    ax.set_title("Gradual pruning schedule (AGP)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    study.show(fig, "agp_schedule")

# %% [markdown]
# ## Findings
# Every sentence below was computed in this notebook; they are written to `findings.md` beside the tables and figures.

# %%
study.write_findings()
