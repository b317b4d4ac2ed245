# %% [markdown]
# # Sparse training: static, SET and RigL against pruning, at equal training steps
#
# Evci, Gale, Menick, Castro & Elsen 2020 (RigL) and Mocanu et al. 2018 (SET): a network sparse from the first
# step, on a random mask, whose connections are dropped (smallest magnitudes) and regrown (SET: at random; RigL:
# largest dense-gradient magnitude) at constant sparsity every ΔT = 100 steps, with a cosine-decayed drop
# fraction (α = 0.3) until 75% of training; `static` keeps its initial mask (the control). Against them: gradual
# magnitude pruning during training (AGP, Zhu & Gupta 2017) and one-shot magnitude pruning after training with
# fine-tuning (`post`), each in the same number of training steps. At 80/90/95/98% sparsity, with uniform or ERK
# layer allocation, on LeNet-300-100 and LeNet-5 (Fashion-MNIST, 3 seeds). Published shape: RigL ≥ SET ≥ static
# at equal steps; ERK above uniform at high sparsity, at more FLOPs; RigL close to pruning during training.
# Orderings are compared seed by seed (paired differences, 95% t intervals): a difference whose interval holds 0
# is one the seeds cannot tell from noise.
#
# The runs: `BENCHKIT_DATA=../shared/data benchkit sweep experiments/sparse_training.yaml --workers 2` (see
# `results/README.md` for the exact command, hardware and wall time). Tables and figures go to
# `results/sparse-training/`; the committed store `results/studies/mlflow.db` holds every run they are computed
# from.
#
# **Controls** (the next cell): `TRACKING_URI`, the MLflow store (environment `MLFLOW_TRACKING_URI`; default
# the committed study store `results/studies/mlflow.db`); `EXPERIMENT`, the sweep's `experiment:` name
# (`BENCHKIT_NOTEBOOK_EXPERIMENT`; default `sparse-training`); `OUTPUT`, the folder for tables, figures and
# findings (`BENCHKIT_NOTEBOOK_OUTPUT`; default `results/<EXPERIMENT>/`). To render this notebook for your own
# sweep, from the repository root:
#
# ```bash
# .venv/bin/python notebooks/render.py 06_sparse_training --tracking-uri sqlite:///mlflow.db --experiment my-sweep --out results/my-sweep
# ```

# %%
# %matplotlib inline
import itertools
import os
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
import warnings

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from benchkit import analysis as ba
from benchkit.sweep import combinations, load_sweep
from benchkit.verify import compare

warnings.filterwarnings("ignore", category=pd.errors.PerformanceWarning)  # wide runs frames, harmless

# Run from notebooks/ (Jupyter's default) or from the repository root.
REPO = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'results/studies/mlflow.db'}"
EXPERIMENT = os.environ.get("BENCHKIT_NOTEBOOK_EXPERIMENT") or "sparse-training"
OUTPUT = Path(os.environ.get("BENCHKIT_NOTEBOOK_OUTPUT") or REPO / "results" / EXPERIMENT)
study = ba.Study(EXPERIMENT, TRACKING_URI, OUTPUT, notebook="06_sparse_training.py", repo=REPO)
print(f"store: {TRACKING_URI}\nexperiment: {EXPERIMENT}\noutputs: {OUTPUT}")

# %% [markdown]
# ## Runs, arms and coverage
# An *arm* is how the sparse network comes about: `static`, `SET`, `RigL` (timing `dynamic`), `AGP` (timing
# `during`), `post` (timing `post`). A *cell* is model × arm × sparsity × allocation; `coverage.csv` counts the seeds
# each cell has, so a study still running (or with failed runs) says what is missing instead of hiding it.

# %%
study.publish(study.provenance(), "study")
runs = study.runs()
DYNAMIC = {"static": "static", "set": "SET", "rigl": "RigL"}


def arm(r) -> str:
    if r["timing"] == "dynamic":
        return DYNAMIC.get(str(r["prune.dynamic.method"]), str(r["prune.dynamic.method"]))
    return {"during": "AGP", "post": "post"}.get(r["timing"], r["timing"])


def epochs(r) -> float:
    """Training epochs of the run; post's fine-tuning counts inside the budget."""
    return r["train.epochs"] + (r["prune.post.finetune.epochs"] if r["timing"] == "post" else 0)


runs["arm"] = runs.apply(arm, axis=1)
runs["sparsity (%)"] = (runs["prune.sparsity"] * 100).round(1)
runs["epochs"] = runs.apply(epochs, axis=1)
ARMS = [a for a in ("static", "SET", "RigL", "AGP", "post") if a in set(runs["arm"])]
ARMS += sorted(set(runs["arm"]) - set(ARMS))
MODELS = [m for m in ("lenet300", "lenet5") if m in set(runs["model"])] + sorted(set(runs["model"]) - {"lenet300", "lenet5"})
ALLOCATIONS = [a for a in ("uniform", "erk") if a in set(runs["allocation"])] + sorted(
    set(runs["allocation"]) - {"uniform", "erk"})
SPARSITIES = sorted(runs["sparsity (%)"].unique())
SEEDS = sorted(runs["seed"].unique().tolist())
KEYS = ["model", "allocation", "sparsity (%)", "arm"]
METRICS = [m for m in ("test_acc1", "val_acc1", "compression_ratio", "theoretical_speedup", "flops_nonzero", "flops_dense",
                       "regrown_alive_fraction", "dynamic_updates", "epochs", "time_total_s") if m in runs]
ba.save_table(runs[["run_id", *KEYS, "timing", "criterion", "seed", *METRICS]], OUTPUT / "runs.csv")
print(f"{len(runs)} finished runs; models {MODELS}; arms {ARMS}; allocations {ALLOCATIONS}; sparsities {SPARSITIES} %; "
      f"seeds {SEEDS}")

seeds_per_cell = runs.groupby(KEYS)["seed"].nunique()
grid = pd.MultiIndex.from_tuples(list(itertools.product(MODELS, ALLOCATIONS, SPARSITIES, ARMS)), names=KEYS)
coverage = seeds_per_cell.reindex(grid, fill_value=0).rename("seeds").reset_index()
study.save(coverage.pivot_table(index=KEYS[:3], columns="arm", values="seeds", aggfunc="first")[ARMS].reset_index(), "coverage")
missing = coverage[coverage["seeds"] == 0]
partial = coverage[(coverage["seeds"] > 0) & (coverage["seeds"] < len(SEEDS))]


def cell_list(frame: pd.DataFrame, limit: int = 12) -> str:
    items = [f"{r['model']} · {r['arm']} · {r['allocation']} · {r['sparsity (%)']:g}%" for _, r in frame.iterrows()]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


if len(missing) or len(partial):
    study.finding(f"INCOMPLETE: of the {len(coverage)} cells formed by the values present ({len(MODELS)} models × "
                  f"{len(ALLOCATIONS)} allocations × {len(SPARSITIES)} sparsities × {len(ARMS)} arms), "
                  f"{len(coverage) - len(missing) - len(partial)} have all {len(SEEDS)} seeds, {len(partial)} fewer"
                  + (f" ({cell_list(partial)})" if len(partial) else "") + f", {len(missing)} none"
                  + (f" ({cell_list(missing)})" if len(missing) else "")
                  + "; comparisons use the seeds both sides have (coverage.csv).")
else:
    study.finding(f"Every cell ({len(coverage)}: {len(MODELS)} models × {len(ALLOCATIONS)} allocations × {len(SPARSITIES)} "
                  f"sparsities × {len(ARMS)} arms) has every seed present in the store, {SEEDS}.")

# The sweep file's full grid, when the file is at hand: how far the study has come.
for f in sorted(set(runs["tags.benchkit.sweep_file"].dropna()) if "tags.benchkit.sweep_file" in runs else []):
    if (REPO / f).is_file():
        planned = len(combinations(load_sweep(REPO / f)))
        study.finding(f"{f} plans {planned} runs (its full grid, before any command-line pin); "
                      f"{int((runs['tags.benchkit.sweep_file'] == f).sum())} of its runs have finished in this store.")
budget = runs.groupby(["model", "arm"])["epochs"].agg(lambda s: sorted(set(s)))
for m in MODELS:
    study.finding(f"{m}: training epochs per arm (post's dense epochs and fine-tuning counted together): " + ", ".join(
        f"{a} {'/'.join(f'{e:g}' for e in budget[(m, a)])}" for a in ARMS if (m, a) in budget.index) + ".")

# %% [markdown]
# ## Accuracy per model, allocation and sparsity
# Test top-1 (%), mean ± std over seeds, one column per arm; `speedup` is the theoretical speedup of the static
# runs' masks (dense / non-zero FLOPs; the allocation decides it, every arm prunes to the same per-layer
# densities, SET's below-mask count aside, see below); `n` the fewest seeds of the row's arms.

# %%
agg = ba.aggregate(runs, by=KEYS, metrics=METRICS)
mean = agg.pivot_table(index=KEYS[:3], columns="arm", values="test_acc1_mean", aggfunc="first", dropna=False)
std = agg.pivot_table(index=KEYS[:3], columns="arm", values="test_acc1_std", aggfunc="first", dropna=False)
count = agg.pivot_table(index=KEYS[:3], columns="arm", values="n", aggfunc="first", dropna=False)
speed = agg.pivot_table(index=KEYS[:3], columns="arm", values="theoretical_speedup_mean", aggfunc="first", dropna=False)
rows = [k for k in itertools.product(MODELS, ALLOCATIONS, SPARSITIES) if k in mean.index]
table = pd.DataFrame(index=pd.MultiIndex.from_tuples(rows, names=KEYS[:3]))
for a in ARMS:
    if a in mean:
        table[a] = ["" if pd.isna(mean.loc[k, a]) else f"{mean.loc[k, a] * 100:.2f}"
                    + ("" if pd.isna(std.loc[k, a]) else f" ± {std.loc[k, a] * 100:.2f}") for k in rows]
reference = "static" if "static" in speed else ARMS[0]
table["speedup (×)"] = [speed.loc[k, reference] if pd.notna(speed.loc[k, reference]) else speed.loc[k].median()
                        for k in rows]
table["n"] = [int(count.loc[k].min()) if count.loc[k].notna().all() else int(count.loc[k].fillna(0).min()) for k in rows]
table = table.reset_index()
study.publish(table, "accuracy", floatfmt=".3g")
for m in MODELS:
    for alloc in ALLOCATIONS:
        part = agg[(agg["model"] == m) & (agg["allocation"] == alloc)]
        if part.empty:
            continue
        study.finding(f"{m}, {alloc}: " + "; ".join(
            f"{s:g}%: " + ", ".join(f"{r['arm']} {r['test_acc1_mean'] * 100:.2f}" for _, r in
                                    part[part["sparsity (%)"] == s].set_index("arm").reindex(ARMS).dropna(subset=["n"]).reset_index().iterrows())
            for s in SPARSITIES if (part["sparsity (%)"] == s).any()) + " (% test top-1, means over seeds).")
if "dense_test_acc1" in runs and runs["dense_test_acc1"].notna().any():
    post_dense = runs.dropna(subset=["dense_test_acc1"]).groupby(["model", "seed"])["dense_test_acc1"].mean().groupby("model").mean()
    for m, v in post_dense.items():
        ep = runs[(runs["model"] == m) & (runs["arm"] == "post")]["train.epochs"]
        study.finding(f"{m}: the dense network the post runs prune ({ep.iloc[0] if len(ep) else '?'} epochs) reaches "
                      f"{v * 100:.2f}% test accuracy.")

# %% [markdown]
# ## Figures: accuracy against sparsity and against FLOPs
# One column per model. Top: test accuracy against sparsity; bottom: against the theoretical speedup (dense /
# non-zero FLOPs, log₂ axis) — ERK keeps small, FLOP-heavy layers denser, so at equal sparsity it buys accuracy
# with FLOPs, and the bottom row compares the allocations at equal FLOPs. One colour per arm, solid for ERK, dashed
# for uniform; mean over seeds with a ±1 std band.

# %%
COLORS = dict(zip(["static", "SET", "RigL", "AGP", "post"], ["tab:gray", "tab:blue", "tab:red", "tab:green", "tab:purple"]))
DASH = {"erk": "-", "uniform": "--"}
fig = Figure(figsize=(6.5 * len(MODELS), 8.5), layout="constrained")
grid_axes = np.array(fig.subplots(2, len(MODELS), squeeze=False))
for j, m in enumerate(MODELS):
    top, bottom = grid_axes[0, j], grid_axes[1, j]
    for a, alloc in itertools.product(ARMS, ALLOCATIONS):
        g = agg[(agg["model"] == m) & (agg["arm"] == a) & (agg["allocation"] == alloc)].sort_values("sparsity (%)")
        if g.empty:
            continue
        y, e = g["test_acc1_mean"] * 100, g["test_acc1_std"].fillna(0) * 100
        style = {"color": COLORS.get(a), "linestyle": DASH.get(alloc, ":")}
        for ax, x in ((top, [SPARSITIES.index(v) for v in g["sparsity (%)"]]), (bottom, g["theoretical_speedup_mean"])):
            ax.plot(x, y, marker="o", markersize=4, label=f"{a} · {alloc}", **style)
            ax.fill_between(x, y - e, y + e, color=style["color"], alpha=0.1, linewidth=0)
    top.set_xticks(range(len(SPARSITIES)), [f"{v:g}" for v in SPARSITIES])
    top.set_xlabel("Sparsity (%)")
    bottom.set_xscale("log", base=2)
    bottom.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
    bottom.set_xlabel(ba.axis_label("theoretical_speedup", log2=True))
    top.set_title(m)
    for ax in (top, bottom):
        ax.set_ylabel("Test top-1 accuracy (%)")
        ax.grid(True, alpha=0.3)
handles, labels = grid_axes[0, 0].get_legend_handles_labels()
fig.legend(handles, labels, loc="outside right upper", fontsize="small")
fig.suptitle(f"{EXPERIMENT}: accuracy at equal training steps, against sparsity and against FLOPs")
study.show(fig, "accuracy")

# %% [markdown]
# ## Paired differences: the published orderings, seed by seed
# a − b in test top-1 (pp) at every sparsity, per model and allocation (for ERK − uniform: per arm), with the 95%
# t interval over the seeds both sides have. `verdict`: *a > b* / *a < b* when the interval excludes 0, *within
# noise* when it does not, *one seed* when there is no interval.

# %%
ORDERINGS = [("RigL", "SET"), ("SET", "static"), ("RigL", "static"), ("RigL", "AGP"), ("RigL", "post"), ("AGP", "post")]


def verdict(r) -> str:
    if r["n"] < 2:
        return "one seed"
    if not r["distinguishable"]:
        return "within noise"
    return "a > b" if r["diff"] > 0 else "a < b"


pairs, skipped = [], []
for m, alloc, (a, b) in itertools.product(MODELS, ALLOCATIONS, ORDERINGS):
    try:
        d = compare(runs, {"model": m, "allocation": alloc, "arm": a}, {"model": m, "allocation": alloc, "arm": b},
                    metric="test_acc1", by="sparsity (%)", scale=100)
    except ValueError as e:
        skipped.append(f"{m} · {alloc} · {a} − {b}: {e}")
        continue
    pairs.append(d.assign(model=m, comparison=f"{a} − {b}", allocation=alloc))
if {"erk", "uniform"} <= set(ALLOCATIONS):
    for m, a in itertools.product(MODELS, ARMS):
        try:
            d = compare(runs, {"model": m, "arm": a, "allocation": "erk"}, {"model": m, "arm": a, "allocation": "uniform"},
                        metric="test_acc1", by="sparsity (%)", scale=100)
        except ValueError as e:
            skipped.append(f"{m} · {a} · erk − uniform: {e}")
            continue
        pairs.append(d.assign(model=m, comparison="ERK − uniform", allocation=a))
COLUMNS = ["model", "comparison", "allocation", "sparsity (%)", "n", "mean_a", "mean_b", "diff", "ci_low", "ci_high",
           "p_value", "distinguishable"]
diffs = pd.concat(pairs, ignore_index=True)[COLUMNS] if pairs else pd.DataFrame(columns=COLUMNS)
diffs["verdict"] = diffs.apply(verdict, axis=1) if len(diffs) else []
study.publish(diffs.rename(columns={"allocation": "allocation / arm", "n": "seeds", "mean_a": "a (%)", "mean_b": "b (%)",
                                    "diff": "a − b (pp)", "ci_low": "95% CI low", "ci_high": "95% CI high"})
              .drop(columns="distinguishable"), "differences", floatfmt=".3g")
for s in skipped:
    print("not compared:", s)


def summary(frame: pd.DataFrame) -> str:
    return (f"a > b resolved in {(frame['verdict'] == 'a > b').sum()}, a < b resolved in {(frame['verdict'] == 'a < b').sum()}, "
            f"within noise in {(frame['verdict'] == 'within noise').sum()}, one seed in {(frame['verdict'] == 'one seed').sum()}"
            f" of {len(frame)} cells; mean a − b {frame['diff'].mean():+.2f} pp (range {frame['diff'].min():+.2f} to "
            f"{frame['diff'].max():+.2f})")


PAPER = {"RigL − SET": "RigL ≥ SET", "SET − static": "SET ≥ static", "RigL − static": "RigL ≥ static",
         "RigL − AGP": "RigL close to AGP", "RigL − post": "pruning after training as a further reference",
         "AGP − post": "the two pruning baselines"}
for comp in dict.fromkeys(diffs["comparison"]):
    for m in MODELS:
        d = diffs[(diffs["comparison"] == comp) & (diffs["model"] == m)]
        if d.empty:
            continue
        if comp == "ERK − uniform":
            for s in SPARSITIES:
                ds = d[d["sparsity (%)"] == s]
                if len(ds):
                    study.finding(f"{m}, ERK − uniform at {s:g}% (Evci et al.: ERK above uniform at high sparsity), per arm: "
                                  + ", ".join(f"{r['allocation']} {r['diff']:+.2f} pp"
                                              + (f" [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]" if r["n"] > 1 else " (one seed)")
                                              for _, r in ds.iterrows()) + ".")
            continue
        study.finding(f"{m}, {comp} ({PAPER.get(comp, '')}): {summary(d)}.")

# %% [markdown]
# ERK's price in FLOPs: the theoretical speedup of each allocation's masks at each sparsity (static runs), and what
# ERK − uniform costs or gains per factor of FLOPs.

# %%
if {"erk", "uniform"} <= set(ALLOCATIONS):
    flops = agg[agg["arm"] == reference].pivot_table(index=["model", "sparsity (%)"], columns="allocation",
                                                      values="theoretical_speedup_mean", aggfunc="first", dropna=False)
    flops = flops[[a for a in ALLOCATIONS if a in flops]].rename(columns=lambda a: f"{a} speedup (×)")
    if {"erk speedup (×)", "uniform speedup (×)"} <= set(flops.columns):
        flops["uniform / ERK FLOPs"] = flops["uniform speedup (×)"] / flops["erk speedup (×)"]
        study.publish(flops.reset_index(), "flops", floatfmt=".3g")
        for m in MODELS:
            if m in flops.index.get_level_values(0):
                f = flops.loc[m].dropna(subset=["uniform / ERK FLOPs"])
                if not f.empty:  # both allocations present at some sparsity
                    study.finding(f"{m}: ERK's masks keep " + ", ".join(
                        f"{r['uniform / ERK FLOPs']:.2f}× the non-zero FLOPs of uniform at {s:g}%" for s, r in f.iterrows())
                        + f" (theoretical speedup of the {reference} runs' masks).")

# %% [markdown]
# ## The mask updates of SET and RigL
# From each dynamic run's `levels.csv`, one row per update: step, drop fraction, sparsity of the pruned set counted
# from the masks after the update, connections dropped, and regrown (grown that were not alive before: a
# just-dropped connection grown back is not counted). The drop fraction is checked against RigL's cosine schedule
# α(1 + cos(π t / T_end))/2 with T_end = round(t_end × T), T the run's last training step (its last logged
# evaluation). `regrown_alive_fraction`: of the connections regrown at some update, the share alive at the end.

# %%
dyn = runs[runs["arm"].isin(["SET", "RigL"])]
parts, absent = [], []
for _, r in dyn.iterrows():
    try:
        lv = ba.load_artifact_table(r["run_id"], "levels.csv", tracking_uri=TRACKING_URI)
    except (FileNotFoundError, OSError):
        absent.append(r["run_id"])
        continue
    parts.append(lv.assign(**{k: r[k] for k in ["run_id", *KEYS, "seed", "prune.dynamic.alpha", "prune.dynamic.t_end",
                                                "prune.dynamic.delta_t", "prune.sparsity"]}))
updates = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
if absent:
    print(f"{len(absent)} dynamic run(s) without levels.csv: {absent[:5]}")
if len(updates):
    last_step = ba.load_history(dyn[dyn["run_id"].isin(updates["run_id"].unique())], ["val_acc1"], phases=["train"],
                                tracking_uri=TRACKING_URI).groupby("run_id")["step"].max()
    updates["T"] = updates["run_id"].map(last_step)
    t_end = (updates["prune.dynamic.t_end"] * updates["T"]).round()
    updates["formula"] = updates["prune.dynamic.alpha"] * 0.5 * (1 + np.cos(np.pi * np.minimum(updates["step"], t_end) / t_end))
    updates["new / dropped"] = updates["regrown"] / updates["dropped"].where(updates["dropped"] > 0)
    layer_cols = sorted(c for c in updates.columns if c.startswith(("dropped/", "regrown/")))
    ba.save_table(updates[["run_id", *KEYS, "seed", "update", "step", "T", "drop_fraction", "formula", "sparsity",
                           "prune.sparsity", "dropped", "regrown", "new / dropped", *layer_cols]], OUTPUT / "updates.csv")
    dev_frac = (updates["drop_fraction"] - updates["formula"]).abs().max()
    spread = updates.groupby("run_id")["sparsity"].agg(lambda s: s.max() - s.min()).max()
    dev_sparsity = (updates["sparsity"] - updates["prune.sparsity"]).abs().max()
    study.finding(f"Mask updates: {len(updates)} over {updates['run_id'].nunique()} SET/RigL runs; the drop fraction is "
                  f"within {dev_frac:.1e} of RigL's cosine schedule at every update; the sparsity after an update differs "
                  f"from the run's other updates by at most {spread:.1e} and from the target by at most {dev_sparsity:.1e} "
                  "(each layer's count is a whole number of weights).")
    per = updates.groupby(["model", "arm"]).agg(updates=("update", "size"), runs=("run_id", "nunique"),
                                              new_share=("new / dropped", "mean"))
    for (m, a), r in per.iterrows():
        study.finding(f"{m} · {a}: {r['updates'] / r['runs']:.0f} updates per run; on average {r['new_share'] * 100:.1f}% of "
                      "the connections dropped at an update are replaced by connections that were not alive before "
                      "(the rest are just-dropped ones grown back).")
    if "regrown_alive_fraction" in dyn:
        alive = ba.aggregate(dyn.dropna(subset=["regrown_alive_fraction"]), by=["model", "arm", "allocation", "sparsity (%)"],
                             metrics=["regrown_alive_fraction"])
        study.publish(ba.summary_table(alive, ["regrown_alive_fraction"], by=["model", "arm", "allocation", "sparsity (%)"],
                                       scale={"regrown_alive_fraction": 100},
                                       labels={"regrown_alive_fraction": "regrown connections alive at the end (%)"}),
                      "regrown_alive")
        for (m, a), g in alive.groupby(["model", "arm"]):
            study.finding(f"{m} · {a}: {g['regrown_alive_fraction_mean'].min() * 100:.1f}–"
                          f"{g['regrown_alive_fraction_mean'].max() * 100:.1f}% of the regrown connections are alive at the "
                          f"end of training (over {len(g)} allocation × sparsity cells).")

    # SET grows at random: connections it grows that never receive a gradient (inputs that are always 0, dead
    # units) stay at exactly 0, so the non-zero count is below the mask's (the masks' sparsity is exact, above).
    below = dyn.assign(gap=dyn["compression_ratio"] / (1 / (1 - dyn["prune.sparsity"])) - 1)
    gap = below.groupby(["model", "arm"])["gap"].agg(["mean", "max"])
    study.finding("Non-zero weights against the mask: compression ratio counted from non-zero weights exceeds the "
                  "mask's by " + ", ".join(f"{m} · {a} {r['mean'] * 100:.2f}% on average (at most {r['max'] * 100:.2f}%)"
                                           for (m, a), r in gap.iterrows())
                  + " (a grown connection starts at 0 and stays there while no gradient reaches it: RigL grows only "
                  "connections with the largest gradients, SET grows at random).")

# %%
if len(updates):
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    ax_f, ax_n, ax_s = fig.subplots(1, 3)
    first = updates.sort_values(["seed", "sparsity (%)"]).drop_duplicates(["model", "arm"])["run_id"]
    for run_id in first:
        g = updates[updates["run_id"] == run_id].sort_values("step")
        r = g.iloc[0]
        label = f"{r['model']} · {r['arm']} ({r['allocation']}, {r['sparsity (%)']:g}%, seed {r['seed']})"
        color, dash = COLORS.get(r["arm"]), "-" if r["model"] == MODELS[0] else "--"
        ax_f.plot(g["step"], g["drop_fraction"], marker="o", markersize=3, color=color, linestyle="none", label=label)
        steps = np.linspace(0, r["prune.dynamic.t_end"] * r["T"], 200)
        ax_f.plot(steps, r["prune.dynamic.alpha"] * 0.5 * (1 + np.cos(np.pi * steps / (r["prune.dynamic.t_end"] * r["T"]))),
                  color="black", linewidth=0.8)
        ax_n.plot(g["step"], g["dropped"], color=color, linestyle=dash, label=f"{label}: dropped")
        ax_n.plot(g["step"], g["regrown"], color=color, linestyle=dash, marker=".", label=f"{label}: new")
        ax_s.plot(g["step"], (g["sparsity"] - g["prune.sparsity"]) * 1e6, color=color, linestyle=dash, marker=".", label=label)
    ax_f.set_title("Drop fraction (points) vs cosine schedule (line)")
    ax_f.set_xlabel("Training step")
    ax_f.set_ylabel("Fraction of survivors dropped")
    ax_n.set_title("Connections dropped (line) and new (dots) per update")
    ax_n.set_xlabel("Training step")
    ax_n.set_ylabel("Connections")
    ax_n.set_yscale("log")
    ax_s.set_title("Sparsity after each update − target")
    ax_s.set_xlabel("Training step")
    ax_s.set_ylabel("Sparsity − target (× 1e-6)")
    for ax in (ax_f, ax_n, ax_s):
        ax.grid(True, alpha=0.3)
    fig.legend(*ax_f.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize="small")
    fig.suptitle(f"{EXPERIMENT}: SET and RigL mask updates (first seed of each model and method)")
    study.show(fig, "updates")

# %% [markdown]
# ## Findings
# Every sentence below was computed in this notebook; they are written to `findings.md` beside the tables and figures.

# %%
study.write_findings()
