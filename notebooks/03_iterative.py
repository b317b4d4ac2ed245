# %% [markdown]
# # Iterative magnitude pruning with retraining (Han et al. 2015)
#
# Train, then prune to 12× in 4 rounds, retraining at a tenth of the learning rate after each round, on
# LeNet-300-100 and LeNet-5; per-layer weights remaining against Han et al.'s Tables 2–3. Han et al. set each
# layer's threshold from its weight spread: `global` allocation is the nearest automatic analogue, `uniform` allocation
# keeps the same 8.3% in every layer.
#
# The runs: `BENCHKIT_DATA=../shared/data benchkit sweep experiments/iterative.yaml` (see `results/README.md`
# for the exact command, hardware and wall time). Tables and figures go to `results/iterative/`; the committed
# store `results/studies/mlflow.db` holds every run they are computed from.
#
# **Controls** (the next cell): `TRACKING_URI`, the MLflow store (environment `MLFLOW_TRACKING_URI`; default
# the committed study store `results/studies/mlflow.db`); `EXPERIMENT`, the sweep's `experiment:` name
# (`BENCHKIT_NOTEBOOK_EXPERIMENT`; default `iterative`); `OUTPUT`, the folder for tables, figures and findings
# (`BENCHKIT_NOTEBOOK_OUTPUT`; default `results/<EXPERIMENT>/`). To render this notebook for your own sweep,
# from the repository root:
#
# ```bash
# .venv/bin/python notebooks/render.py 03_iterative --tracking-uri sqlite:///mlflow.db --experiment my-sweep --out results/my-sweep
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
EXPERIMENT = os.environ.get("BENCHKIT_NOTEBOOK_EXPERIMENT") or "iterative"
OUTPUT = Path(os.environ.get("BENCHKIT_NOTEBOOK_OUTPUT") or REPO / "results" / EXPERIMENT)
study = ba.Study(EXPERIMENT, TRACKING_URI, OUTPUT, notebook="03_iterative.py", repo=REPO)
print(f"store: {TRACKING_URI}\nexperiment: {EXPERIMENT}\noutputs: {OUTPUT}")

# %% [markdown]
# ## Runs

# %%
# Han et al. 2015, Table 1 (MNIST): top-1 error (%) dense → pruned, at 12× (see ../shared/REFERENCES.md)
HAN2015_ERROR = {"lenet300": (1.64, 1.59), "lenet5": (0.80, 0.77)}
HAN2015_LAYERS = {"lenet300": ba.HAN2015_LENET300, "lenet5": ba.HAN2015_LENET5}
HAN2015_FLOPS_KEPT = {"lenet5": 16.0}  # Table 3, % of FLOPs kept

study.publish(study.provenance(), "study")
runs = study.runs()
METRICS = [m for m in ("compression_ratio", "theoretical_speedup", "dense_test_acc1", "test_acc1", "params_prunable",
                       "nonzero_prunable", "time_total_s") if m in runs]
ba.save_table(runs[["run_id", *ba.strategy_columns(runs), "seed", *METRICS]], OUTPUT / "runs.csv")
print(f"{len(runs)} finished runs: {sorted(set(zip(runs['model'], runs['allocation'])))}")

# %% [markdown]
# ## Error before and after pruning
# Top-1 test error (%) of the dense network and of the pruned one, mean over seeds; FLOPs kept = 100 / theoretical speedup. Han et al.'s MNIST figures beside.

# %%
agg = ba.aggregate(runs, by=["model", "allocation"], metrics=METRICS)
summary = pd.DataFrame({
    "model": agg["model"], "allocation": agg["allocation"], "n": agg["n"],
    "dense error (%)": 100 - agg["dense_test_acc1_mean"] * 100,
    "pruned error (%)": 100 - agg["test_acc1_mean"] * 100,
    "pruned error std (pp)": agg["test_acc1_std"] * 100,
    "compression (×)": agg["compression_ratio_mean"],
    "non-zero weights": agg["nonzero_prunable_mean"], "of": agg["params_prunable_mean"],
    "FLOPs kept (%)": 100 / agg["theoretical_speedup_mean"],
})
summary["change (pp)"] = summary["pruned error (%)"] - summary["dense error (%)"]
lr = runs.groupby(["model", "allocation"])["train.lr"].agg(lambda v: " ".join(map(str, sorted(set(v)))))
summary["train lr"] = [lr[(m, a)] for m, a in zip(summary["model"], summary["allocation"])]  # LeNet-5 diverges at 0.05
summary["Han et al. error, MNIST (%)"] = summary["model"].map(
    lambda m: f"{HAN2015_ERROR[m][0]:.2f} → {HAN2015_ERROR[m][1]:.2f}" if m in HAN2015_ERROR else "")
study.publish(summary, "summary", floatfmt=".4g")
for _, r in summary.iterrows():
    study.finding(f"{r['model']} · {r['allocation']}: error {r['dense error (%)']:.2f}% → {r['pruned error (%)']:.2f}% "
                  f"({r['change (pp)']:+.2f} pp) at {r['compression (×)']:.1f}×, {r['FLOPs kept (%)']:.1f}% of the FLOPs kept"
                  + (f" (Han et al.: {HAN2015_ERROR[r['model']][0]:.2f} → {HAN2015_ERROR[r['model']][1]:.2f}%"
                     + (f", {HAN2015_FLOPS_KEPT[r['model']]:.0f}% FLOPs" if r["model"] in HAN2015_FLOPS_KEPT else "") + ")"
                     if r["model"] in HAN2015_ERROR else "") + ".")

# %% [markdown]
# ## Round by round
# Accuracy after each prune-and-retrain round (the `level_*` metrics, step = round), per model; dense at 100%.

# %%
levels = ba.load_levels(runs, tracking_uri=TRACKING_URI)
rounds = ba.aggregate(levels, by=["model", "allocation", "level"], metrics=["percent_remaining", "test_acc1"])
study.publish(rounds.rename(columns={"level": "round"}), "rounds")
models = sorted(set(rounds["model"]))
fig = Figure(figsize=(5 * len(models), 3.8), layout="constrained")
for ax, model in zip(np.atleast_1d(fig.subplots(1, len(models))), models):
    dense = runs[runs["model"] == model].groupby("seed")["dense_test_acc1"].mean().mean() * 100
    for allocation, g in rounds[rounds["model"] == model].groupby("allocation"):
        x = np.r_[100.0, g["percent_remaining_mean"]]
        y = np.r_[dense, g["test_acc1_mean"] * 100]
        ax.plot(x, y, marker="o", label=f"{allocation} allocation")
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("Weights remaining (%), log scale")
    ax.set_ylabel("Test top-1 accuracy (%)")
    ax.set_title(f"{model}: accuracy after each round")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
study.show(fig, "rounds")

# %% [markdown]
# ## Weights remaining per layer vs Han et al.
# From each run's `layers.csv` (lowest seed); hatched bars are Han et al.'s Tables 2 (LeNet-300-100) and 3 (LeNet-5).

# %%
rows = []
for model, group in runs.sort_values("seed").drop_duplicates(["model", "allocation"]).groupby("model"):
    tables = study.layer_tables(group, lambda r: f"{r['allocation']} allocation")
    if not tables:
        continue
    ref = HAN2015_LAYERS.get(model)
    for label, t in tables.items():
        rows.append(t.assign(model=model, allocation=label.split()[0],
                             **{"Han et al. density": t["layer"].map(ref or {})}))
    study.show(ba.plot_layer_density(tables, ref, reference_label="Han et al. 2015 (MNIST)",
                                     title=f"{model}: weights kept per layer after iterative pruning"), f"layers_{model}")
if rows:
    layers = pd.concat(rows)
    study.publish(layers[["model", "allocation", "run_id", "layer", "params", "nonzero", "density",
                          "Han et al. density"]], "layers", floatfmt=".3g")
    for (model, allocation), g in layers.dropna(subset=["Han et al. density"]).groupby(["model", "allocation"]):
        parts = ", ".join(f"{r['layer']} {r['density'] * 100:.1f}% (Han {r['Han et al. density'] * 100:.0f}%)"
                          for _, r in g.iterrows())
        study.finding(f"{model} · {allocation} allocation keeps per layer: {parts}.")

# %% [markdown]
# ## Findings
# Every sentence below was computed in this notebook; they are written to `findings.md` beside the tables and figures.

# %%
study.write_findings()
