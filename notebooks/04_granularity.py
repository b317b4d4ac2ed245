# %% [markdown]
# # Granularity: what to remove at equal compression
#
# LeNet-5 pruned to one compression for every granularity (the one an N:M pattern fixes: 2× with 2:4 in
# `granularity`, 4× with 1:4 in `granularity-4x`) by global magnitude with L2 group norms, removing single
# weights, N:M blocks along input channels, kernel rows (vector), whole kernels, or whole output channels;
# one-shot after training, then fine-tuning. Coarser units cost accuracy but can be removed physically:
# `compacted_speedup` counts the FLOPs after Torch-Pruning removes dead channels.
#
# The runs: `BENCHKIT_DATA=../shared/data benchkit sweep experiments/granularity.yaml` (see
# `results/README.md` for the exact command, hardware and wall time). Tables and figures go to
# `results/granularity/`; the committed store `results/studies/mlflow.db` holds every run they are computed
# from.
#
# **Controls** (the next cell): `TRACKING_URI`, the MLflow store (environment `MLFLOW_TRACKING_URI`; default
# the committed study store `results/studies/mlflow.db`); `EXPERIMENT`, the sweep's `experiment:` name
# (`BENCHKIT_NOTEBOOK_EXPERIMENT`; default `granularity`); `OUTPUT`, the folder for tables, figures and
# findings (`BENCHKIT_NOTEBOOK_OUTPUT`; default `results/<EXPERIMENT>/`). To render this notebook for your own
# sweep, from the repository root:
#
# ```bash
# .venv/bin/python notebooks/render.py 04_granularity --tracking-uri sqlite:///mlflow.db --experiment my-sweep --out results/my-sweep
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
EXPERIMENT = os.environ.get("BENCHKIT_NOTEBOOK_EXPERIMENT") or "granularity"
OUTPUT = Path(os.environ.get("BENCHKIT_NOTEBOOK_OUTPUT") or REPO / "results" / EXPERIMENT)
study = ba.Study(EXPERIMENT, TRACKING_URI, OUTPUT, notebook="04_granularity.py", repo=REPO)
print(f"store: {TRACKING_URI}\nexperiment: {EXPERIMENT}\noutputs: {OUTPUT}")

# %% [markdown]
# ## Runs

# %%
study.publish(study.provenance(), "study")
runs = study.runs()
ORDER = ["element", "N:M", "vector", "kernel", "channel"]  # fine to coarse; any N:M pattern sits second


def rank(g: str) -> int:
    g = "N:M" if ":" in str(g) else g
    return ORDER.index(g) if g in ORDER else len(ORDER)


runs = runs.assign(order=runs["granularity"].map(rank))
METRICS = [m for m in ("compression_ratio", "model_compression_ratio", "theoretical_speedup", "compacted_speedup",
                       "compacted_params", "params_total", "dense_test_acc1", "test_acc1", "time_total_s") if m in runs]
ba.save_table(runs.sort_values("order")[["run_id", *ba.strategy_columns(runs), "seed", *METRICS]], OUTPUT / "runs.csv")
varying = [c for c in ba.strategy_columns(runs) if runs[c].astype(str).nunique() > 1]
print(f"{len(runs)} finished runs; they differ in {varying}")

# %% [markdown]
# ## Accuracy and cost per granularity
# Achieved compression over the pruned layers; theoretical speedup (dense / non-zero FLOPs); speedup and parameters after physically removing dead channels.

# %%
agg = ba.aggregate(runs, by=["granularity"], metrics=METRICS)
agg = agg.assign(order=agg["granularity"].map(rank))
agg = agg.sort_values("order").reset_index(drop=True)
summary = pd.DataFrame({"granularity": agg["granularity"], "n": agg["n"],
                        "compression (×)": agg["compression_ratio_mean"],
                        "theoretical speedup (×)": agg["theoretical_speedup_mean"]})
if "compacted_speedup_mean" in agg:
    summary["speedup after channel removal (×)"] = agg["compacted_speedup_mean"]
    summary["params after removal"] = agg["compacted_params_mean"]
    summary["of"] = agg["params_total_mean"]
summary["dense test top-1 (%)"] = agg["dense_test_acc1_mean"] * 100
summary["test top-1 (%)"] = agg["test_acc1_mean"] * 100
summary["test std (pp)"] = agg["test_acc1_std"] * 100
summary["change (pp)"] = summary["test top-1 (%)"] - summary["dense test top-1 (%)"]
study.publish(summary, "summary")
for _, r in summary.iterrows():
    extra = (f", {r['speedup after channel removal (×)']:.2f}× after channel removal"
             if pd.notna(r.get("speedup after channel removal (×)")) else "")
    study.finding(f"{r['granularity']}: {r['test top-1 (%)']:.2f}% ({r['change (pp)']:+.2f} pp vs dense) at "
                  f"{r['compression (×)']:.2f}×, theoretical speedup {r['theoretical speedup (×)']:.2f}×{extra}.")

# %% [markdown]
# ## Figure
# Left: test accuracy per granularity (bars: mean, whiskers: ±1 std when there are several seeds; dashed: dense). Right: theoretical speedup and the speedup left after channel removal.

# %%
fig = Figure(figsize=(11, 4), layout="constrained")
ax_acc, ax_speed = fig.subplots(1, 2)
pos = np.arange(len(summary))
several = summary["n"].max() > 1
bars = ax_acc.bar(pos, summary["test top-1 (%)"], yerr=summary["test std (pp)"] if several else None, capsize=3)
ax_acc.axhline(summary["dense test top-1 (%)"].mean(), color="black", linestyle="--", linewidth=1, label="dense")
low = min(summary["test top-1 (%)"].min(), summary["dense test top-1 (%)"].min())
ax_acc.set_ylim(max(0.0, low - 5), min(100.0, summary["dense test top-1 (%)"].max() + 2))
ax_acc.bar_label(bars, fmt="%.2f", fontsize="small", label_type="center", color="white")
ax_acc.set_xticks(pos, summary["granularity"])
ax_acc.set_xlabel("Granularity (unit removed)")
ax_acc.set_ylabel("Test top-1 accuracy (%)")
ax_acc.set_title(f"Accuracy at {summary['compression (×)'].mean():.1f}× compression")
ax_acc.legend(fontsize="small")
speeds = [c for c in ("theoretical speedup (×)", "speedup after channel removal (×)") if c in summary]
width = 0.8 / len(speeds)
for i, col in enumerate(speeds):
    bars = ax_speed.bar(pos + (i - (len(speeds) - 1) / 2) * width, summary[col], width, label=col.replace(" (×)", ""))
    ax_speed.bar_label(bars, fmt="%.2f", fontsize="x-small")
ax_speed.axhline(1, color="black", linewidth=0.8)
ax_speed.set_xticks(pos, summary["granularity"])
ax_speed.set_xlabel("Granularity (unit removed)")
ax_speed.set_ylabel("Speedup (dense FLOPs / FLOPs, ×)")
ax_speed.set_title("FLOP speedup: masked vs physically removed")
ax_speed.legend(fontsize="small")
fig.suptitle(f"{EXPERIMENT}: LeNet-5, global magnitude pruning")
study.show(fig, "granularity")

# %% [markdown]
# ## Where the weights go
# Per-layer density for each granularity, from the runs' `layers.csv`.

# %%
chosen = runs.sort_values(["order", "seed"]).drop_duplicates("granularity")
tables = study.layer_tables(chosen, lambda r: r["granularity"])
if tables:
    layers = pd.concat([t.assign(granularity=k) for k, t in tables.items()])
    study.publish(layers[["granularity", "run_id", "layer", "params", "nonzero", "density", "flops", "flops_nonzero"]],
                  "layers", floatfmt=".3g")
    study.show(ba.plot_layer_density(tables, title="Weights kept per layer, by granularity"), "layer_density")
    for g, t in tables.items():
        cut = t[t["density"] < 1]
        study.finding(f"{g}: weights removed from " + ", ".join(f"{r['layer']} ({(1 - r['density']) * 100:.1f}%)"
                                                                for _, r in cut.iterrows())
                      + f"; kept dense: {', '.join(t.loc[t['density'] >= 1, 'layer']) or 'none'}; the pruned layers hold "
                      f"{cut['flops'].sum() / t['flops'].sum() * 100:.0f}% of the dense FLOPs.")

# %% [markdown]
# ## Measured CPU latency
# Each run timed its final model when it finished (`latency.enabled` in the sweep): the masked model as deployed (zeros baked in, dense kernels) and, where whole channels died, the copy Torch-Pruning compacted, interleaved, median of the repeats. The setting is logged with the figures. Absolute milliseconds depend on the machine and its load; the ratio is the robust figure.

# %%
SETTING = ["latency_batch_size", "latency_threads", "latency_repeats", "latency_warmup"]
if "latency_ms" in runs:
    cols = [c for c in ("latency_ms", "latency_compacted_ms", "latency_speedup", "compacted_speedup") if c in runs]
    lat = ba.aggregate(runs, by=["granularity"], metrics=cols)
    lat = lat.assign(order=lat["granularity"].map(rank))
    lat = lat.sort_values("order").reset_index(drop=True)
    latency = pd.DataFrame({"granularity": lat["granularity"], "n": lat["n"],
                            "masked (ms)": lat["latency_ms_mean"], "std (ms)": lat["latency_ms_std"]})
    if "latency_compacted_ms_mean" in lat:
        latency["after channel removal (ms)"] = lat["latency_compacted_ms_mean"]
        latency["latency speedup (×)"] = lat["latency_speedup_mean"]
        latency["FLOP speedup after removal (×)"] = lat["compacted_speedup_mean"]
    setting = runs[[c for c in SETTING if c in runs]].drop_duplicates()
    study.publish(latency, "latency", floatfmt=".3g")
    where = ", ".join(f"{c.removeprefix('latency_').replace('_', ' ')} {int(v)}" for c, v in setting.iloc[0].items())
    device = ", ".join(sorted(set(runs.get("tags.benchkit.device", pd.Series(["?"])).astype(str))))
    for _, r in latency.iterrows():
        removed = r.get("after channel removal (ms)")
        study.finding(f"{r['granularity']}: measured latency {r['masked (ms)']:.2f} ms masked"
                      + (f" → {removed:.2f} ms after channel removal ({r['latency speedup (×)']:.2f}×; FLOPs "
                         f"{r['FLOP speedup after removal (×)']:.2f}×)" if pd.notna(removed) else
                         " (no whole channel dead: nothing to remove)")
                      + f"; {where}, device {device}.")
    base = latency["masked (ms)"]
    study.finding(f"The masked (dense-kernel) models of every granularity take {base.min():.2f}–{base.max():.2f} ms: "
                  "zeros inside dense tensors buy no time on this CPU; only removed channels do.")
else:
    print("these runs were made without latency.enabled: no measured latency to show")

# %% [markdown]
# ## Findings
# Every sentence below was computed in this notebook; they are written to `findings.md` beside the tables and figures.

# %%
study.write_findings()
