# %% [markdown]
# # Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin 2019)
#
# LeNet-300-100: train, prune 20% of each layer's survivors (output layer 10%), rewind the survivors to their
# initial values, repeat. At every level two controls train the same masks from a new random initialisation
# (`reinit`) and random masks with the same per-layer sparsity (`random`). Compared with the paper's Figures
# 3–4: accuracy and early-stopping iteration against weights remaining.
#
# The runs: `BENCHKIT_DATA=../shared/data benchkit sweep experiments/lottery.yaml` (see `results/README.md`
# for the exact command, hardware and wall time). Tables and figures go to `results/lottery/`; the committed
# store `results/studies/mlflow.db` holds every run they are computed from.
#
# **Controls** (the next cell): `TRACKING_URI`, the MLflow store (environment `MLFLOW_TRACKING_URI`; default
# the committed study store `results/studies/mlflow.db`); `EXPERIMENT`, the sweep's `experiment:` name
# (`BENCHKIT_NOTEBOOK_EXPERIMENT`; default `lottery`); `OUTPUT`, the folder for tables, figures and findings
# (`BENCHKIT_NOTEBOOK_OUTPUT`; default `results/<EXPERIMENT>/`). To render this notebook for your own sweep,
# from the repository root:
#
# ```bash
# .venv/bin/python notebooks/render.py 02_lottery --tracking-uri sqlite:///mlflow.db --experiment my-sweep --out results/my-sweep
# ```

# %%
# %matplotlib inline
import os
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
import warnings
from fnmatch import fnmatch

import numpy as np
import pandas as pd

from benchkit import analysis as ba

warnings.filterwarnings("ignore", category=pd.errors.PerformanceWarning)  # wide runs frames, harmless

# Run from notebooks/ (Jupyter's default) or from the repository root.
REPO = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'results/studies/mlflow.db'}"
EXPERIMENT = os.environ.get("BENCHKIT_NOTEBOOK_EXPERIMENT") or "lottery"
OUTPUT = Path(os.environ.get("BENCHKIT_NOTEBOOK_OUTPUT") or REPO / "results" / EXPERIMENT)
study = ba.Study(EXPERIMENT, TRACKING_URI, OUTPUT, notebook="02_lottery.py", repo=REPO)
print(f"store: {TRACKING_URI}\nexperiment: {EXPERIMENT}\noutputs: {OUTPUT}")

# %% [markdown]
# ## Runs and levels
# One row per (run, branch, level) in `levels_long.csv`, with run ids.

# %%
study.publish(study.provenance(), "study")
runs = study.runs()
runs = runs[runs["timing"] == "lottery"]
levels = ba.load_levels(runs, tracking_uri=TRACKING_URI)
ba.save_table(levels.drop(columns=["start_time", "end_time"], errors="ignore"), OUTPUT / "levels_long.csv")
BRANCHES = [b for b in ("ticket", "reinit", "random") if b in set(levels["branch"])]
print(f"{len(runs)} lottery run(s), seeds {sorted(runs['seed'].unique().tolist())}; branches {BRANCHES}; "
      f"levels 0–{levels['level'].max()}")

# %% [markdown]
# ## Accuracy per level
# Test accuracy (%) and early-stopping iteration (best validation accuracy) of the ticket and its controls, mean ± std over seeds (a single value for one seed). For the paper's LeNet-300-100 schedule the published weights-remaining formula is shown beside ours.

# %%
Q = [q for q in ("percent_remaining", "test_acc1", "val_acc1", "best_step") if q in levels]
agg = ba.aggregate(levels, by=["branch", "level"], metrics=Q)
acc = ba.summary_table(agg, ["test_acc1"], by=["branch", "level"], scale={"test_acc1": 100})
stop = ba.summary_table(agg, ["best_step"], by=["branch", "level"], decimals=0)
table = agg[agg["branch"] == "ticket"][["level", "percent_remaining_mean"]].rename(
    columns={"percent_remaining_mean": "weights remaining (%)"}).reset_index(drop=True)
rate = runs["prune.lottery.rate"].iloc[0] if "prune.lottery.rate" in runs else None
layer_rates = runs["prune.lottery.layer_rates"].iloc[0] if "prune.lottery.layer_rates" in runs else {}
paper_schedule = (set(runs["model"]) == {"lenet300"} and rate in (None, 0.2) and layer_rates == {"fc3": 0.1})
if paper_schedule:
    table["Frankle & Carbin formula (%)"] = [ba.lth_lenet300_percent_remaining(int(table["level"].max()))[int(k)]
                                             for k in table["level"]]
for name, frame, what in (("test top-1 (%)", acc, "test_acc1"), ("early-stop iteration", stop, "best_step")):
    for b in BRANCHES:
        col = frame[frame["branch"] == b].set_index("level")[what]
        table[f"{ba.figures.BRANCH_LABELS.get(b, b)}: {name}"] = table["level"].map(col).fillna("")
study.publish(table, "levels", floatfmt=".3g")

# %% [markdown]
# ## Tickets and controls over pruning levels
# Left: test accuracy; right: the iteration of best validation accuracy. Reversed log x-axis, 100% (dense) on the left.

# %%
fig = ba.plot_lottery(levels, "test_acc1", "best_step" if "best_step" in levels else None,
                     title=f"{EXPERIMENT}: winning tickets vs random reinitialisation and random pruning")
fig.set_size_inches(13, 4.8)
for ax in fig.axes:
    ax.tick_params(axis="x", labelrotation=60)  # one tick per level: keep neighbours apart
study.show(fig, "lottery")

# %% [markdown]
# ## Against the paper's claims
# The level closest to each percentage the paper quotes.

# %%
per = agg.set_index(["branch", "level"])
t = per.loc["ticket"]
dense_acc, dense_stop = t.loc[0, "test_acc1_mean"] * 100, t.loc[0].get("best_step_mean", np.nan)


def nearest(percent: float) -> int:
    return int((t["percent_remaining_mean"] - percent).abs().idxmin())


best = int(t["test_acc1_mean"].idxmax())
study.finding(f"Dense network (level 0): {dense_acc:.2f}% test accuracy. Best ticket: {t.loc[best, 'test_acc1_mean'] * 100:.2f}% "
              f"at {t.loc[best, 'percent_remaining_mean']:.1f}% weights remaining (level {best}), "
              f"{t.loc[best, 'test_acc1_mean'] * 100 - dense_acc:+.2f} pp over dense.")
for paper_pct, claim in ((13.5, "paper: > +0.3 pp over dense"), (3.6, "paper: back to the dense level")):
    k = nearest(paper_pct)
    study.finding(f"Ticket at {t.loc[k, 'percent_remaining_mean']:.1f}% remaining (level {k}; {claim} at {paper_pct}%): "
                  f"{t.loc[k, 'test_acc1_mean'] * 100:.2f}%, {t.loc[k, 'test_acc1_mean'] * 100 - dense_acc:+.2f} pp vs dense.")
for b in BRANCHES[1:]:
    c = per.loc[b]
    above = c[c["test_acc1_mean"] * 100 >= dense_acc]
    deepest = int(c.index.max())
    gap = (t.loc[deepest, "test_acc1_mean"] - c.loc[deepest, "test_acc1_mean"]) * 100
    below_from = int(above.index.max()) + 1 if len(above) else int(c.index.min())
    stays = (f"below the dense accuracy at every level from {c.loc[below_from, 'percent_remaining_mean']:.1f}% "
             f"remaining (level {below_from}) on" if below_from <= deepest else "never below dense at the sparsest level")
    study.finding(f"{ba.figures.BRANCH_LABELS.get(b, b)}: at or above dense at {len(above)} of {len(c)} levels, {stays}; "
                  f"at the sparsest level ({c.loc[deepest, 'percent_remaining_mean']:.1f}%) ticket − control = {gap:+.2f} pp.")
if "random" in BRANCHES:
    k = nearest(10.7)
    study.finding(f"Ticket vs random pruning at {t.loc[k, 'percent_remaining_mean']:.1f}% remaining (paper, 10.7%: 98.3 vs 97.5): "
                  f"{t.loc[k, 'test_acc1_mean'] * 100:.2f} vs {per.loc[('random', k), 'test_acc1_mean'] * 100:.2f}%.")
if "best_step_mean" in t and np.isfinite(dense_stop):
    k = nearest(21.1)
    every = runs["train.eval_every"].iloc[0] if "train.eval_every" in runs else None
    study.finding(f"Early-stopping iteration: dense {dense_stop:.0f}, ticket at {t.loc[k, 'percent_remaining_mean']:.1f}% "
                  f"{t.loc[k, 'best_step_mean']:.0f} ({(1 - t.loc[k, 'best_step_mean'] / dense_stop) * 100:.0f}% earlier; paper: "
                  f"38% earlier at 21%); validation every {every} iterations, last iteration "
                  f"{levels['best_step'].max():.0f} here.")
    sparse = [k for k in t.index if k > 0 and t.loc[k, "percent_remaining_mean"] <= 21.2]
    if sparse:
        means = {b: per.loc[b].loc[[k for k in sparse if k in per.loc[b].index], "best_step_mean"].mean()
                 for b in BRANCHES}
        study.finding(f"Early-stopping iteration averaged over the {len(sparse)} levels at ≤ 21.1% remaining (levels "
                      f"{min(sparse)}–{max(sparse)}): " + ", ".join(f"{ba.figures.BRANCH_LABELS.get(b, b)} {v:.0f}"
                                                                   for b, v in means.items())
                      + f" (dense {dense_stop:.0f}); single levels are noisy, the average is the steadier comparison.")
if paper_schedule:
    diff = (table["weights remaining (%)"] - table["Frankle & Carbin formula (%)"]).abs().max()
    study.finding(f"Weights remaining per level match the paper's formula within {diff:.3f} percentage points.")

# %% [markdown]
# ## Per-layer density at the last level
# From the `layers.csv` artifact of each run, beside the schedule's expectation (1 − rate)^levels per layer (rounding aside).

# %%
last = int(levels["level"].max())
tables = study.layer_tables(runs.sort_values("seed").head(1), lambda r: f"ticket, level {last} (seed {r['seed']})")
if tables:
    (label, layers), = tables.items()
    expected = [(1 - next((v for k, v in (layer_rates or {}).items() if fnmatch(n, k)), rate or 0.2)) ** last
                for n in layers["layer"]]
    layers = layers.assign(**{"expected density": expected})
    study.publish(layers[["run_id", "layer", "params", "nonzero", "density", "expected density"]], "layers")
    study.show(ba.plot_layer_density({label: layers}, dict(zip(layers["layer"], expected)),
                                     reference_label=f"(1 − rate)^{last}", title="Weights kept per layer, last level",
                                     log=True), "layer_density")

# %% [markdown]
# ## Training curves per level
# Validation accuracy during the training of the ticket at a few levels (first run), iterations counted from the rewind point.

# %%
history = ba.load_history(runs.sort_values("seed").head(1), ["val_acc1"], tracking_uri=TRACKING_URI)
wanted = {f"level_{k}" for k in sorted({last // 3, 2 * last // 3, last}) if k}
history = history[history["phase"].isin({"dense"} | wanted)]
pct = t["percent_remaining_mean"].to_dict()
history["phase"] = history["phase"].map(
    lambda p: f"level {int(p.split('_')[1]):02d} ({pct.get(int(p.split('_')[1]), np.nan):.1f}%)" if p.startswith("level_")
    else "dense (100%)")
fig = ba.plot_training_curves(history, hue=[], title="Winning-ticket training curves (validation)")
study.show(fig, "curves")

# %% [markdown]
# ## Findings
# Every sentence below was computed in this notebook; they are written to `findings.md` beside the tables and figures.

# %%
study.write_findings()
