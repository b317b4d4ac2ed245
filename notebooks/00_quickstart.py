# %% [markdown]
# # Quickstart: pruning strategies on digits
#
# Reads back the runs of the quickstart sweep from MLflow and compares the strategies the way ShrinkBench
# does: accuracy against compression ratio and against theoretical speedup, averaged over seeds (mean ± std).
#
# Produce the runs first, from the repository root:
#
# ```bash
# .venv/bin/benchkit sweep experiments/quickstart.yaml
# ```
#
# **Controls** (the next cell): `TRACKING_URI`, the MLflow store (environment `MLFLOW_TRACKING_URI`; default
# `mlflow.db` in the repository root); `EXPERIMENT`, the sweep's `experiment:` name
# (`BENCHKIT_NOTEBOOK_EXPERIMENT`; default `quickstart`); `OUTPUT`, the folder for tables, figures and
# findings (`BENCHKIT_NOTEBOOK_OUTPUT`; default `results/<EXPERIMENT>/`). To render this notebook for your own
# sweep, from the repository root:
#
# ```bash
# .venv/bin/python notebooks/render.py 00_quickstart --tracking-uri sqlite:///mlflow.db --experiment my-sweep --out results/my-sweep
# ```

# %%
# %matplotlib inline
import os
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
from IPython.display import Markdown, display

from benchkit import analysis as ba

# Run from notebooks/ (Jupyter's default) or from the repository root.
REPO = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'mlflow.db'}"
EXPERIMENT = os.environ.get("BENCHKIT_NOTEBOOK_EXPERIMENT") or "quickstart"
OUTPUT = Path(os.environ.get("BENCHKIT_NOTEBOOK_OUTPUT") or REPO / "results" / EXPERIMENT)
OUTPUT.mkdir(parents=True, exist_ok=True)
print(f"store: {TRACKING_URI}\nexperiment: {EXPERIMENT}\noutputs: {OUTPUT}")

# %% [markdown]
# ## Runs
# One row per finished run: the sweep axes, then final metrics and every config key.

# %%
runs = ba.load_runs(EXPERIMENT, tracking_uri=TRACKING_URI)
axes = [c for c in ba.strategy_columns(runs) if runs[c].astype(str).nunique() > 1]
print(f"{len(runs)} finished runs; strategies differ in {axes}; seeds {sorted(runs['seed'].unique().tolist())}")
runs[[*ba.strategy_columns(runs), "seed", "compression_ratio", "theoretical_speedup", "test_acc1"]].head(10)

# %% [markdown]
# ## Mean ± std over seeds
# Accuracies in %; `compression ratio` is the achieved one (prunable weights / non-zero weights), `speedup` the theoretical FLOP ratio.

# %%
metrics = [m for m in ("compression_ratio", "theoretical_speedup", "val_acc1", "test_acc1") if m in runs]
agg = ba.aggregate(runs, metrics=metrics)
table = ba.summary_table(
    agg, metrics, by=axes or None,
    scale={m: 100 for m in metrics if "acc" in m},
    labels={"compression_ratio": "compression (×)", "theoretical_speedup": "speedup (×)",
            "val_acc1": "val top-1 (%)", "test_acc1": "test top-1 (%)"},
)
ba.save_table(agg, OUTPUT / "summary.csv")
ba.save_table(table, OUTPUT / "summary.md")
display(Markdown(ba.to_markdown(table)))

# %% [markdown]
# ## Accuracy vs compression and vs theoretical speedup
# Log₂ x-axes; bands are ±1 std over seeds; the dashed line is the dense model (mean over seeds).

# %%
fig = ba.plot_tradeoffs(runs, "test_acc1", title=f"{EXPERIMENT}: test accuracy vs compression and speedup")
fig.savefig(OUTPUT / "tradeoff.png", dpi=150)
display(fig)

# %% [markdown]
# ## Where the weights go
# Per-layer density of the most compressed run (first seed) of each strategy, from its `layers.csv` artifact.

# %%
compressed = runs[runs["compression_ratio"] > 1]
strategy = [c for c in ba.strategy_columns(compressed) if c != "compression"]
top = (compressed.sort_values(["compression_ratio", "seed"], ascending=[False, True])
       .drop_duplicates(strategy).sort_values(strategy))
layers = {
    f"{ba.describe_strategy({c: r[c] for c in axes if c != 'compression'})} ({r['compression_ratio']:.1f}×)":
    ba.load_layers(r["run_id"], tracking_uri=TRACKING_URI)
    for _, r in top.iterrows()
}
fig = ba.plot_layer_density(layers, title="Weights kept per layer at the highest compression")
fig.savefig(OUTPUT / "layer_density.png", dpi=150)
display(fig)

# %% [markdown]
# ## Training curves
# Validation accuracy and loss per phase (dense training, then fine-tuning) for each strategy at its highest compression, mean ± std over seeds.

# %%
keys = [*strategy, "compression"]
chosen = runs.merge(top[keys], on=keys)
history = ba.load_history(chosen, ["val_acc1", "val_loss"], tracking_uri=TRACKING_URI)
fig = ba.plot_training_curves(history)
fig.savefig(OUTPUT / "training_curves.png", dpi=150)
display(fig)
