# %% [markdown]
# # Rethinking the value of network pruning: fine-tuning vs training the pruned architecture from scratch
#
# Liu, Sun, Zhou, Huang & Darrell 2019 ("Rethinking the Value of Network Pruning", ICLR) take pruning methods
# whose result is a smaller architecture, such as L1-norm filter pruning (Li et al. 2017), and train that
# architecture from a fresh initialisation: for as many epochs as the dense network (**Scratch-E**) or for the
# same compute (**Scratch-B**: epochs × dense/pruned FLOPs). Their finding: training from scratch matches or beats
# fine-tuning the pruned model, so the inherited weights are not what makes the pruned network good.
#
# Here each run prunes the same fraction of every layer's filters by their L1 norm after training, fine-tunes
# (**fine-tuned**, the run itself), then trains the compacted architecture (Torch-Pruning removes the dead
# channels) from scratch as both controls (`prune.post.controls: [scratch_e, scratch_b]`). The three branches
# are rows of the runs' `levels.csv` with a `branch` column, paired by seed (every branch of a seed starts from
# the same dense network or the same fresh initialisation).
#
# The runs: `BENCHKIT_DATA=../shared/data benchkit sweep experiments/rethinking.yaml` (see `results/README.md`
# for the exact command, hardware and wall time). Tables and figures go to `results/rethinking/`; the committed
# store `results/studies/mlflow.db` holds every run they are computed from.
#
# **Controls** (the next cell): `TRACKING_URI`, the MLflow store (environment `MLFLOW_TRACKING_URI`; default
# the committed study store `results/studies/mlflow.db`); `EXPERIMENT`, the sweep's `experiment:` name
# (`BENCHKIT_NOTEBOOK_EXPERIMENT`; default `rethinking`); `OUTPUT`, the folder for tables, figures and findings
# (`BENCHKIT_NOTEBOOK_OUTPUT`; default `results/<EXPERIMENT>/`). To render this notebook for your own sweep,
# from the repository root:
#
# ```bash
# .venv/bin/python notebooks/render.py 10_rethinking --tracking-uri sqlite:///mlflow.db --experiment my-sweep --out results/my-sweep
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
from benchkit.analysis.runs import TICKET

warnings.filterwarnings("ignore", category=pd.errors.PerformanceWarning)  # wide runs frames, harmless

# Run from notebooks/ (Jupyter's default) or from the repository root.
REPO = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'results/studies/mlflow.db'}"
EXPERIMENT = os.environ.get("BENCHKIT_NOTEBOOK_EXPERIMENT") or "rethinking"
OUTPUT = Path(os.environ.get("BENCHKIT_NOTEBOOK_OUTPUT") or REPO / "results" / EXPERIMENT)
study = ba.Study(EXPERIMENT, TRACKING_URI, OUTPUT, notebook="10_rethinking.py", repo=REPO)
print(f"store: {TRACKING_URI}\nexperiment: {EXPERIMENT}\noutputs: {OUTPUT}")

# %% [markdown]
# ## Runs and branches
# One row per (run, branch) in `levels.csv`: `fine-tuned` is the pruned run after its last fine-tuning round,
# `Scratch-E` / `Scratch-B` its controls; `dense` is the run's dense network before pruning.

# %%
study.publish(study.provenance(), "study")
runs = study.runs()
runs = runs[runs["timing"] == "post"]
levels = ba.load_levels(runs, tracking_uri=TRACKING_URI)
BRANCHES = {"dense": "dense", TICKET: "fine-tuned", "scratch_e": "Scratch-E", "scratch_b": "Scratch-B"}
ORDER = list(BRANCHES.values())
levels["branch"] = levels["branch"].map(lambda b: BRANCHES.get(b, b))
missing = [b for b in ("Scratch-E", "Scratch-B") if b not in set(levels["branch"])]
if missing:
    raise RuntimeError(f"the runs of {EXPERIMENT!r} logged no {' / '.join(missing)} branch: run the sweep with "
                       "prune.post.controls: [scratch_e, scratch_b]")
# the fine-tuned model is the last round's; the controls train the final pruned architecture once
levels = levels.sort_values(["run_id", "branch", "level"]).groupby(["run_id", "branch"]).tail(1)
dense = runs[["run_id", "model", "compression", "seed", "dense_test_acc1"]].rename(
    columns={"dense_test_acc1": "test_acc1"}).assign(branch="dense")
# Training length of each branch, in the unit the runs were trained in (epochs, or iterations when set).
UNIT = "iterations" if runs["train.iterations"].notna().any() else "epochs"
rounds = runs["prune.post.rounds"] if "prune.post.rounds" in runs else 1
tune = runs[f"prune.post.finetune.{UNIT}"].fillna(0) * rounds
runs = runs.assign(**{f"finetune_{UNIT}": tune, f"trained_{UNIT}": runs[f"train.{UNIT}"] + tune})
ft_length = runs.set_index("run_id")[f"trained_{UNIT}"]
levels[UNIT] = np.where(levels["branch"] == "fine-tuned", levels["run_id"].map(ft_length), levels.get(UNIT))
long = pd.concat([dense, levels[["run_id", "model", "compression", "seed", "branch", "test_acc1", UNIT,
                                 *[c for c in ("flops_ratio", "params", "compression_ratio") if c in levels]]]],
                 ignore_index=True)
long = (long.assign(order=long["branch"].map(ORDER.index)).sort_values(["model", "compression", "order", "seed"])
        .drop(columns="order").reset_index(drop=True))
ba.save_table(long, OUTPUT / "branches_long.csv")
METRICS = [m for m in ("compression_ratio", "compacted_speedup", "compacted_params", "params_total", "dense_test_acc1",
                       "test_acc1", "scratch_e_level_test_acc1", "scratch_b_level_test_acc1", "time_total_s") if m in runs]
ba.save_table(runs[["run_id", *ba.strategy_columns(runs), "seed", *METRICS]], OUTPUT / "runs.csv")
MODELS = sorted(set(runs["model"]))
print(f"{len(runs)} finished runs; models {MODELS}; compressions {sorted(runs['compression'].unique().tolist())}; "
      f"seeds {sorted(runs['seed'].unique().tolist())}; training length in {UNIT}")

# %% [markdown]
# ## Fine-tuned vs Scratch-E vs Scratch-B
# Test top-1 (%), mean ± std over seeds, per model and requested channel compression (Liu et al.'s Tables 1–2
# layout). Beside them: the pruned architecture (its parameters and FLOPs after channel removal) and the training
# each branch got (fine-tuned: dense training plus fine-tuning; Scratch-B: the dense length × the FLOPs ratio, capped).

# %%
agg = ba.aggregate(long, by=["model", "compression", "branch"], metrics=["test_acc1", UNIT])
acc = ba.summary_table(agg, ["test_acc1"], by=["model", "compression", "branch"], scale={"test_acc1": 100})
table = acc.pivot(index=["model", "compression"], columns="branch", values="test_acc1")
table = table[[b for b in ORDER if b in table.columns]].add_suffix(" (%)")
length = agg.pivot(index=["model", "compression"], columns="branch", values=f"{UNIT}_mean")
for b in ("fine-tuned", "Scratch-E", "Scratch-B"):
    table[f"{b} {UNIT}"] = length[b]
arch = ba.aggregate(runs, by=["model", "compression"],
                    metrics=[m for m in ("compression_ratio", "compacted_params", "params_total", "compacted_speedup")
                             if m in runs]).set_index(["model", "compression"])
table.insert(0, "weights kept (%)", 100 / arch["compression_ratio_mean"])
if "compacted_params_mean" in arch:
    table.insert(1, "params after removal (%)", 100 * arch["compacted_params_mean"] / arch["params_total_mean"])
if "compacted_speedup_mean" in arch:
    table.insert(2, "FLOPs ratio (×)", arch["compacted_speedup_mean"])
table["n"] = agg.groupby(["model", "compression"])["n"].min()
table = table.reset_index().rename(columns={"compression": "compression (×)"})
table.columns.name = None
study.publish(table, "summary", floatfmt=".3g")
for m in MODELS:
    d = long[(long["model"] == m) & (long["branch"] == "dense")].groupby("seed")["test_acc1"].mean() * 100
    study.finding(f"{m}: dense test top-1 {d.mean():.2f}" + (f" ± {d.std():.2f}" if len(d) > 1 else "")
                  + f"% over seeds {d.index.tolist()}.")
for _, r in table.iterrows():
    study.finding(f"{r['model']} at {r['compression (×)']:g}× ({r['weights kept (%)']:.1f}% of the prunable weights"
                  + (f", {r['FLOPs ratio (×)']:.2f}× fewer FLOPs" if "FLOPs ratio (×)" in r else "")
                  + f"): fine-tuned {r['fine-tuned (%)']}, Scratch-E {r['Scratch-E (%)']}, Scratch-B {r['Scratch-B (%)']} "
                  f"(Scratch-B trained {r[f'Scratch-B {UNIT}']:g} {UNIT}, fine-tuned {r[f'fine-tuned {UNIT}']:g} in all).")

# %% [markdown]
# ## Paired differences over seeds
# Each scratch branch minus the fine-tuned model (and Scratch-B minus Scratch-E), seed by seed, with a 95% t
# interval of the mean difference (`benchkit.verify.compare`); `distinguishable` is False where the interval
# contains 0 (the seeds cannot tell the difference from noise).

# %%
PAIRS = [("Scratch-E", "fine-tuned"), ("Scratch-B", "fine-tuned"), ("Scratch-B", "Scratch-E")]
parts = []
for m in MODELS:
    rows = long[long["model"] == m]
    for a, b in PAIRS:
        cmp = bv.compare(rows, {"branch": a}, {"branch": b}, metric="test_acc1", by="compression", scale=100)
        parts.append(cmp.assign(model=m, comparison=f"{a} − {b}"))
diffs = pd.concat(parts, ignore_index=True)
diffs = diffs[["model", "comparison", "compression", "n", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "p_value",
               "distinguishable"]].rename(columns={"compression": "compression (×)", "mean_a": "a (%)", "mean_b": "b (%)",
                                                   "diff": "a − b (pp)", "ci_low": "CI low", "ci_high": "CI high"})
study.publish(diffs, "paired_differences", floatfmt=".3g")


def interval(r) -> str:
    ci = f" [{r['CI low']:+.2f}, {r['CI high']:+.2f}]" if r["n"] > 1 else " (one seed)"
    return f"{r['a − b (pp)']:+.2f} pp{ci}"


for (m, comp), rows in diffs.groupby(["model", "comparison"], sort=False):
    study.finding(f"{m}, {comp}: " + "; ".join(f"{r['compression (×)']:g}× {interval(r)}" for _, r in rows.iterrows())
                  + (" (95% t intervals over seeds)." if rows["n"].max() > 1 else "."))

# %% [markdown]
# ## Accuracy and differences per compression
# Top: test accuracy of each branch against the requested channel compression (mean, ±1 std band; dashed: dense).
# Bottom: each scratch branch minus the fine-tuned model, with its 95% interval over seeds.

# %%
STYLE = {"fine-tuned": ("tab:blue", "o", "-"), "Scratch-E": ("tab:orange", "s", "--"),
         "Scratch-B": ("tab:green", "^", "-."), "dense": ("black", None, ":")}
fig = Figure(figsize=(5.2 * len(MODELS), 7), layout="constrained")
axes = np.atleast_2d(fig.subplots(2, len(MODELS), squeeze=False))
for j, m in enumerate(MODELS):
    top, bottom = axes[0, j], axes[1, j]
    a = agg[agg["model"] == m]
    for b in ("fine-tuned", "Scratch-E", "Scratch-B"):
        rows = a[a["branch"] == b].sort_values("compression")
        if rows.empty:
            continue
        color, marker, dash = STYLE[b]
        x, y, s = rows["compression"], rows["test_acc1_mean"] * 100, rows["test_acc1_std"].fillna(0) * 100
        top.plot(x, y, color=color, marker=marker, linestyle=dash, label=b)
        top.fill_between(x, y - s, y + s, color=color, alpha=0.15, linewidth=0)
    d = a[a["branch"] == "dense"]["test_acc1_mean"].mean() * 100
    top.axhline(d, color="black", linestyle=":", linewidth=1, label="dense")
    top.set_xscale("log", base=2)
    top.set_xticks(sorted(a["compression"].unique()), [f"{c:g}" for c in sorted(a["compression"].unique())])
    top.set_xlabel("Channel compression requested (×), log₂ scale")
    top.set_ylabel("Test top-1 accuracy (%)")
    top.set_title(m)
    top.grid(True, alpha=0.3)
    top.legend(fontsize="small")
    rows = diffs[(diffs["model"] == m) & diffs["comparison"].str.endswith("fine-tuned")]
    for k, (comp, g) in enumerate(rows.groupby("comparison", sort=False)):
        name = comp.split(" − ")[0]
        color, marker, _ = STYLE[name]
        x = g["compression (×)"] * (1 + 0.04 * (2 * k - 1))  # side by side
        err = np.vstack([g["a − b (pp)"] - g["CI low"], g["CI high"] - g["a − b (pp)"]])
        bottom.errorbar(x, g["a − b (pp)"], yerr=np.nan_to_num(err), color=color, marker=marker, linestyle="none",
                        capsize=3, label=f"{name} − fine-tuned")
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(sorted(a["compression"].unique()), [f"{c:g}" for c in sorted(a["compression"].unique())])
    bottom.set_xlabel("Channel compression requested (×), log₂ scale")
    bottom.set_ylabel("Difference (pp), 95% interval over seeds")
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize="small")
fig.suptitle(f"{EXPERIMENT}: L1-norm channel pruning, fine-tuned vs trained from scratch")
study.show(fig, "rethinking")

# %% [markdown]
# ## Against the paper
# Liu et al. 2019: for methods with a predefined target architecture (L1-norm filter pruning among them), Scratch-B
# matches or beats fine-tuning, and Scratch-E is comparable. The same statements over these runs, point by point
# (the reproduction card `experiments/rethinking.card.yaml` checks them with its own tolerances:
# `benchkit verify rethinking`).

# %%
TOLERANCE = 0.5  # pp: "matches" = no more than this behind, the card's margin for Scratch-B
shape = []
for (m, comp), rows in diffs[diffs["comparison"].str.endswith("fine-tuned")].groupby(["model", "comparison"],
                                                                                    sort=False):
    behind = rows[rows["distinguishable"] & (rows["a − b (pp)"] < 0)]
    ahead = rows[rows["distinguishable"] & (rows["a − b (pp)"] > 0)]
    matches = rows[rows["a − b (pp)"] >= -TOLERANCE]
    shape.append({"model": m, "comparison": comp, "points": len(rows), f"within {TOLERANCE:g} pp or ahead": len(matches),
                  "ahead beyond noise": len(ahead), "behind beyond noise": len(behind)})
    study.finding(f"{m}: {comp.split(' − ')[0]} is no more than {TOLERANCE:g} pp behind fine-tuning or ahead of it at "
                  f"{len(matches)} of {len(rows)} compressions; ahead beyond the seeds' noise at "
                  f"{', '.join(f'{c:g}×' for c in ahead['compression (×)']) or 'none'}, behind beyond it at "
                  f"{', '.join(f'{c:g}×' for c in behind['compression (×)']) or 'none'}.")
shape = pd.DataFrame(shape)
study.publish(shape, "against_the_paper")
held = shape[shape["comparison"].str.startswith("Scratch-B")]
study.finding(f"Published shape (Scratch-B matches or beats fine-tuning): holds within {TOLERANCE:g} pp at "
              f"{int(held[f'within {TOLERANCE:g} pp or ahead'].sum())} of {int(held['points'].sum())} (model, "
              f"compression) points here.")

# %% [markdown]
# ## Findings
# Every sentence below was computed in this notebook; they are written to `findings.md` beside the tables and figures.

# %%
study.write_findings()
