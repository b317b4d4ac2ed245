# %% [markdown]
# # Sanity checks for pruning at initialisation (Frankle, Dziugaite, Roy & Carbin 2021)
#
# "Pruning neural networks at initialization: why are we missing the mark?": SNIP, GraSP, SynFlow, magnitude
# at initialisation and random pruning (one global ranking), each trained beside four controls at the run's
# per-layer densities — the mask shuffled within each layer (`shuffle`), the same mask on a fresh
# initialisation (`reinit`), the lowest-scoring weights kept instead of the highest (`invert`), a random mask
# (`random`) — at 90% and 98% sparsity. The contrast: lottery tickets (iterative magnitude pruning, 5 levels,
# survivors rewound to initialisation) with their `shuffle` and `reinit` controls at every level. Published
# shape: the at-init methods are unharmed by shuffling and reinitialisation (what they find is a per-layer
# density, not a mask), inversion hurts SNIP and SynFlow but not GraSP, and the tickets found by training *are*
# hurt by shuffling. Every control is compared with its own run seed by seed (paired differences with 95%
# t intervals): a difference whose interval holds 0 is one the seeds cannot tell from noise.
#
# The runs: `BENCHKIT_DATA=../shared/data benchkit sweep experiments/at_init_sanity.yaml --workers 2` (see
# `results/README.md` for the exact command, hardware and wall time). Tables and figures go to
# `results/at-init-sanity/`; the committed store `results/studies/mlflow.db` holds every run they are computed
# from.
#
# **Controls** (the next cell): `TRACKING_URI`, the MLflow store (environment `MLFLOW_TRACKING_URI`; default
# the committed study store `results/studies/mlflow.db`); `EXPERIMENT`, the sweep's `experiment:` name
# (`BENCHKIT_NOTEBOOK_EXPERIMENT`; default `at-init-sanity`); `OUTPUT`, the folder for tables, figures and
# findings (`BENCHKIT_NOTEBOOK_OUTPUT`; default `results/<EXPERIMENT>/`). To render this notebook for your own
# sweep, from the repository root:
#
# ```bash
# .venv/bin/python notebooks/render.py 07_at_init_sanity --tracking-uri sqlite:///mlflow.db --experiment my-sweep --out results/my-sweep
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
from benchkit.sweep import combinations, load_sweep
from benchkit.verify import StudyData, compare

warnings.filterwarnings("ignore", category=pd.errors.PerformanceWarning)  # wide runs frames, harmless

# Run from notebooks/ (Jupyter's default) or from the repository root.
REPO = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'results/studies/mlflow.db'}"
EXPERIMENT = os.environ.get("BENCHKIT_NOTEBOOK_EXPERIMENT") or "at-init-sanity"
OUTPUT = Path(os.environ.get("BENCHKIT_NOTEBOOK_OUTPUT") or REPO / "results" / EXPERIMENT)
study = ba.Study(EXPERIMENT, TRACKING_URI, OUTPUT, notebook="07_at_init_sanity.py", repo=REPO)
print(f"store: {TRACKING_URI}\nexperiment: {EXPERIMENT}\noutputs: {OUTPUT}")

# %% [markdown]
# ## Runs and branches
# One row per (run, branch) from each run's `levels.csv` — the rows `benchkit verify at_init_sanity` reads: a
# pruning-at-init run has its own branch (`main`) and one per control, a lottery run one row per level and branch
# (`ticket`, `shuffle`, `reinit`). `runs.csv` has one row per run; `branches.csv` every branch row.

# %%
study.publish(study.provenance(), "study")
runs = study.runs()
runs["sparsity (%)"] = (runs["prune.sparsity"] * 100).round(1)
levels = StudyData(EXPERIMENT, TRACKING_URI).frame("levels")
levels["sparsity (%)"] = (levels["prune.sparsity"] * 100).round(1)
levels["test top-1 (%)"] = levels["test_acc1"] * 100
CRITERIA = [c for c in ("snip", "grasp", "synflow", "magnitude", "random") if c in set(runs.loc[runs["timing"] == "pre", "criterion"])]
CRITERIA += sorted(set(runs.loc[runs["timing"] == "pre", "criterion"]) - set(CRITERIA))
CONTROLS = [c for c in ("shuffle", "reinit", "invert", "random") if c in set(levels["branch"])]
SPARSITIES = sorted(runs["sparsity (%)"].unique())
SEEDS = sorted(runs["seed"].unique().tolist())
pre = levels[levels["timing"] == "pre"]
lottery = levels[levels["timing"] == "lottery"]
ba.save_table(runs[["run_id", "timing", "criterion", "sparsity (%)", "seed", "compression_ratio", "test_acc1", "val_acc1",
                    "time_total_s"]], OUTPUT / "runs.csv")
ba.save_table(levels[["run_id", "timing", "criterion", "sparsity (%)", "seed", "branch", "level", "percent_remaining",
                      "test_acc1", "val_acc1", "best_step"]], OUTPUT / "branches.csv")
print(f"{len(runs)} finished runs ({(runs['timing'] == 'pre').sum()} at init, {(runs['timing'] == 'lottery').sum()} "
      f"lottery); criteria {CRITERIA}; controls {CONTROLS}; sparsities {SPARSITIES} %; seeds {SEEDS}")

# Which cells have every seed: a study still running (or with failed runs) is reported, not hidden.
cells = runs.groupby(["timing", "criterion", "sparsity (%)"])["seed"].agg(lambda s: sorted(s.tolist()))
expected = [("pre", c, s) for c in CRITERIA for s in SPARSITIES] + [
    ("lottery", c, s) for c in sorted(set(runs.loc[runs["timing"] == "lottery", "criterion"])) for s in SPARSITIES]
short = {k: cells.get(k, []) for k in expected if len(cells.get(k, [])) < len(SEEDS)}
if short:
    study.finding("INCOMPLETE: " + "; ".join(
        f"{t} · {c} at {s:g}% has seed(s) {seeds or 'none'} of {SEEDS}" for (t, c, s), seeds in short.items())
        + " — those cells are compared on the seeds they have.")
else:
    study.finding(f"Every cell ({len(expected)}: {len(CRITERIA)} at-init criteria and the lottery contrast, at "
                  f"{', '.join(f'{s:g}' for s in SPARSITIES)}% sparsity) has every seed present in the store, {SEEDS}.")

# The sweep file's full grid, when the file is at hand: how far the study has come.
for f in sorted(set(runs["tags.benchkit.sweep_file"].dropna()) if "tags.benchkit.sweep_file" in runs else []):
    if (REPO / f).is_file():
        planned = len(combinations(load_sweep(REPO / f)))
        study.finding(f"{f} plans {planned} runs (its full grid, before any command-line pin); "
                      f"{int((runs['tags.benchkit.sweep_file'] == f).sum())} of its runs have finished in this store.")

# %% [markdown]
# ## Accuracy of every run and its controls
# Test top-1 (%), mean ± std over seeds, per criterion and sparsity: the run's own mask (`main`) and the four
# controls, all at the run's per-layer densities and trained the same way. The dense reference is the lottery runs'
# level 0 (the same network trained the same 10 epochs, no pruning).

# %%
BRANCHES = ["main", *CONTROLS]
agg = ba.aggregate(pre, by=["sparsity (%)", "criterion", "branch"], metrics=["test_acc1"])
table = agg.pivot_table(index=["sparsity (%)", "criterion"], columns="branch", values="test_acc1_mean", aggfunc="first", dropna=False)
sds = agg.pivot_table(index=["sparsity (%)", "criterion"], columns="branch", values="test_acc1_std", aggfunc="first", dropna=False)
ns = agg.pivot_table(index=["sparsity (%)", "criterion"], columns="branch", values="n", aggfunc="first", dropna=False)
order = [(s, c) for s in SPARSITIES for c in CRITERIA if (s, c) in table.index]
shown = pd.DataFrame(index=pd.MultiIndex.from_tuples(order, names=["sparsity (%)", "criterion"]))
for b in BRANCHES:
    if b in table:
        shown[b] = [("" if pd.isna(table.loc[k, b]) else f"{table.loc[k, b] * 100:.2f}"
                     + ("" if pd.isna(sds.loc[k, b]) else f" ± {sds.loc[k, b] * 100:.2f}")) for k in order]
shown["seeds"] = [int(ns.loc[k, "main"]) if "main" in ns and pd.notna(ns.loc[k, "main"]) else 0 for k in order]
shown = shown.reset_index()
study.publish(shown, "controls")
off = (pre["percent_remaining"] - (100 - pre["sparsity (%)"])).abs().max()
study.finding(f"Every branch of every run at initialisation ({len(pre)} rows) keeps the run's share of the weights "
              f"within {off:.1e} percentage points: the controls change which weights survive, not how many.")
dense = lottery[(lottery["branch"] == "ticket") & (lottery["level"] == 0)].groupby("seed")["test_acc1"].mean() * 100
if len(dense):
    study.finding(f"Dense reference (lottery level 0, same 10-epoch training): {dense.mean():.2f}% test accuracy "
                  f"(mean over seeds {dense.index.tolist()}).")
for (s, c) in order:
    if "main" in table and pd.notna(table.loc[(s, c), "main"]):
        own = table.loc[(s, c), "main"] * 100
        rel = f" ({own - dense.mean():+.2f} pp vs dense)" if len(dense) else ""
        study.finding(f"{c} at init, {s:g}% sparse: {own:.2f}%{rel}; controls " + ", ".join(
            f"{b} {table.loc[(s, c), b] * 100:.2f}%" for b in CONTROLS if b in table and pd.notna(table.loc[(s, c), b]))
            + f" (means over {int(ns.loc[(s, c), 'main'])} seed(s)).")

# %% [markdown]
# ## Paired differences: control − run, seed by seed
# For every criterion, sparsity and control: the control's test accuracy minus the run's own, paired by seed, with
# the 95% t interval (`benchkit.verify.compare`). `verdict`: *lower* / *higher* when the interval excludes 0,
# *within noise* when it does not, *one seed* when there is no interval yet.

# %%
def verdict(row) -> str:
    if row["n"] < 2:
        return "one seed"
    if not row["distinguishable"]:
        return "within noise"
    return "lower" if row["diff"] < 0 else "higher"


rows, gaps = [], []
for c in CRITERIA:
    for b in CONTROLS:
        try:
            d = compare(pre, {"criterion": c, "branch": b}, {"criterion": c, "branch": "main"}, metric="test_acc1",
                        by="sparsity (%)", scale=100)
        except ValueError as e:  # a control or a cell not run (yet)
            gaps.append(f"{c} · {b}: {e}")
            continue
        rows.append(d.assign(criterion=c, control=b))
diffs = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
    columns=["sparsity (%)", "criterion", "control", "n", "mean_a", "mean_b", "diff", "ci_low", "ci_high",
             "distinguishable"])
diffs["verdict"] = diffs.apply(verdict, axis=1) if len(diffs) else []
diffs = diffs.sort_values(["sparsity (%)", "criterion", "control"], key=lambda s: s.map(
    {**{c: i for i, c in enumerate(CRITERIA)}, **{b: i for i, b in enumerate(CONTROLS)}}) if s.name != "sparsity (%)"
    else s).reset_index(drop=True)
published = diffs.rename(columns={"mean_a": "control (%)", "mean_b": "run (%)", "diff": "control − run (pp)",
                                  "ci_low": "95% CI low", "ci_high": "95% CI high", "n": "seeds"})
study.publish(published[["sparsity (%)", "criterion", "control", "seeds", "run (%)", "control (%)", "control − run (pp)",
                         "95% CI low", "95% CI high", "p_value", "verdict"]], "differences", floatfmt=".3g")
for g in gaps:
    print("not compared:", g)

# %% [markdown]
# ## Against the paper's shape
# Each published statement, cell by cell: which differences the seeds resolve, which they cannot tell from noise.

# %%
AT_INIT = [c for c in ("snip", "grasp", "synflow", "magnitude") if c in CRITERIA]


def cells_text(frame: pd.DataFrame) -> str:
    return ", ".join(f"{r['criterion']} {r['sparsity (%)']:g}% {r['diff']:+.2f} pp"
                     + (f" [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]" if r["n"] > 1 else " (one seed)")
                     for _, r in frame.iterrows())


for control, expectation in (("shuffle", "unharmed"), ("reinit", "unharmed")):
    d = diffs[(diffs["control"] == control) & diffs["criterion"].isin(AT_INIT)]
    if d.empty:
        study.finding(f"{control}: no at-init run has this control yet (paper: {expectation}).")
        continue
    lower, higher = d[d["verdict"] == "lower"], d[d["verdict"] == "higher"]
    noise = d[d["verdict"].isin(["within noise", "one seed"])]
    study.finding(f"{control} (paper: at-init methods {expectation}): {len(d) - len(lower)} of {len(d)} at-init cells "
                  f"show no drop the seeds resolve" + (f"; resolved drops: {cells_text(lower)}" if len(lower) else "")
                  + (f"; resolved gains: {cells_text(higher)}" if len(higher) else "")
                  + (f"; within noise: {cells_text(noise)}" if len(noise) else "") + ".")
for c, expectation in (("snip", "hurts"), ("synflow", "hurts"), ("grasp", "does not hurt (as well or better)")):
    d = diffs[(diffs["control"] == "invert") & (diffs["criterion"] == c)]
    if d.empty:
        study.finding(f"invert · {c}: not run yet (paper: inversion {expectation}).")
        continue
    study.finding(f"invert · {c} (paper: inversion {expectation}): " + "; ".join(
        f"{r['sparsity (%)']:g}%: {r['diff']:+.2f} pp"
        + (f" [95% CI {r['ci_low']:+.2f}, {r['ci_high']:+.2f}], {r['verdict']}" if r["n"] > 1 else ", one seed")
        for _, r in d.iterrows()) + ".")
d = diffs[(diffs["control"] == "random") & diffs["criterion"].isin(AT_INIT)]
if len(d):
    higher = d[d["verdict"] == "higher"]
    lower = d[d["verdict"] == "lower"]
    study.finding(f"A random mask at the run's per-layer densities against the run's own mask: {len(lower)} of {len(d)} "
                  f"at-init cells resolved lower, {len(higher)} resolved higher, {len(d) - len(lower) - len(higher)} within "
                  "noise or one seed" + (f" (lower: {cells_text(lower)})" if len(lower) else "") + ".")
resolved = diffs[diffs["verdict"].isin(["lower", "higher"])]
study.finding(f"Of {len(diffs)} control − run differences, {len(resolved)} are told from noise by the seeds; "
              f"{(diffs['verdict'] == 'within noise').sum()} are within noise and {(diffs['verdict'] == 'one seed').sum()} "
              "have one seed (no interval).")

# %% [markdown]
# ## The contrast: lottery tickets and their controls
# Test top-1 per level (weights remaining), ticket against its shuffled mask and against a fresh initialisation,
# paired by seed at each level. Shuffling a ticket keeps each layer's density but loses the mask found by training.

# %%
if lottery.empty:
    print("no lottery runs in this experiment")
    lt = pd.DataFrame()
else:
    lagg = ba.aggregate(lottery, by=["sparsity (%)", "level", "branch"], metrics=["percent_remaining", "test_acc1"])
    lt = lagg.pivot_table(index=["sparsity (%)", "level"], columns="branch", values="test_acc1_mean", aggfunc="first", dropna=False)
    lt = (lt[[b for b in ("ticket", "shuffle", "reinit") if b in lt] + [b for b in lt if b not in ("ticket", "shuffle", "reinit")]]
          * 100).round(2)
    lt.insert(0, "weights remaining (%)", lagg[lagg["branch"] == "ticket"].set_index(["sparsity (%)", "level"])[
        "percent_remaining_mean"].reindex(lt.index).round(2))
    lt["seeds"] = lagg[lagg["branch"] == "ticket"].set_index(["sparsity (%)", "level"])["n"].reindex(lt.index)
    lt = lt.reset_index()
    lrows = []
    for s in sorted(lottery["sparsity (%)"].unique()):
        for b in [b for b in ("shuffle", "reinit") if b in set(lottery["branch"])]:
            sub = lottery[(lottery["sparsity (%)"] == s) & (lottery["level"] > 0)]
            try:
                d = compare(sub, {"branch": b}, {"branch": "ticket"}, metric="test_acc1", by="level", scale=100)
            except ValueError as e:
                print(f"lottery {s:g}% · {b}: {e}")
                continue
            lrows.append(d.assign(**{"sparsity (%)": s, "control": b}))
    ldiffs = pd.concat(lrows, ignore_index=True) if lrows else pd.DataFrame()
    if len(ldiffs):
        pct = lagg[lagg["branch"] == "ticket"].set_index(["sparsity (%)", "level"])["percent_remaining_mean"]
        ldiffs["weights remaining (%)"] = [pct.get((s, k), np.nan) for s, k in zip(ldiffs["sparsity (%)"], ldiffs["level"])]
        ldiffs["verdict"] = ldiffs.apply(verdict, axis=1)
        study.publish(ldiffs.rename(columns={"mean_a": "control (%)", "mean_b": "ticket (%)", "diff": "control − ticket (pp)",
                                             "ci_low": "95% CI low", "ci_high": "95% CI high", "n": "seeds"})[
            ["sparsity (%)", "level", "weights remaining (%)", "control", "seeds", "ticket (%)", "control (%)",
             "control − ticket (pp)", "95% CI low", "95% CI high", "verdict"]], "lottery_differences", floatfmt=".3g")
        PAPER = {"shuffle": "Frankle et al. 2021: tickets are harmed by shuffling",
                 "reinit": "Frankle & Carbin 2019: tickets beat their reinitialisation"}
        for (s, b), g in ldiffs.groupby(["sparsity (%)", "control"]):
            last = g.loc[g["level"].idxmax()]
            study.finding(f"Lottery run to {s:g}% sparsity, {b} − ticket ({PAPER.get(b, 'control')}): "
                          f"resolved lower at {(g['verdict'] == 'lower').sum()} of {len(g)} levels; at the last level "
                          f"({last['weights remaining (%)']:.1f}% remaining) {last['diff']:+.2f} pp"
                          + (f" [95% CI {last['ci_low']:+.2f}, {last['ci_high']:+.2f}]" if last["n"] > 1 else " (one seed)")
                          + f", ticket {last['mean_b']:.2f}% vs {b} {last['mean_a']:.2f}%.")
    study.publish(lt, "lottery", floatfmt=".4g")

# %% [markdown]
# ## Figures
# Left panels: control − run (pp) per criterion and control, 95% interval whiskers (none for a single seed), one
# panel per sparsity; the lottery ticket's controls at its last level are the last rows. A point left of 0 with its
# whisker clear of 0 is a drop the seeds resolve.

# %%
COLORS = {"shuffle": "tab:blue", "reinit": "tab:orange", "invert": "tab:red", "random": "tab:gray"}
forest = diffs.assign(label=diffs["criterion"])
if len(lottery) and len(lrows):
    lastlv = ldiffs.loc[ldiffs.groupby(["sparsity (%)", "control"])["level"].idxmax()]
    forest = pd.concat([forest, lastlv.assign(label="lottery ticket (last level)")], ignore_index=True)
if len(forest):
    labels = list(dict.fromkeys([*[c for c in CRITERIA if c in set(forest["label"])], *forest["label"]]))
    fig = Figure(figsize=(6 * len(SPARSITIES), 1.2 + 0.55 * len(labels) * 1.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(SPARSITIES), sharey=True))
    for ax, s in zip(axes, SPARSITIES):
        part = forest[forest["sparsity (%)"] == s]
        for j, b in enumerate(CONTROLS):
            g = part[part["control"] == b]
            y = np.array([labels.index(v) for v in g["label"]]) + (j - (len(CONTROLS) - 1) / 2) * 0.18
            err = np.vstack([(g["diff"] - g["ci_low"]).fillna(0), (g["ci_high"] - g["diff"]).fillna(0)])
            ax.errorbar(g["diff"], y, xerr=err, fmt="o", color=COLORS.get(b), capsize=2, markersize=4, label=b)
        ax.axvline(0, color="black", linewidth=1)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.set_xlabel("Control − run, test top-1 (pp)")
        ax.set_title(f"{s:g}% sparse")
        ax.grid(True, axis="x", alpha=0.3)
        lo = part["ci_low"].fillna(part["diff"]).min()
        if np.isfinite(lo) and lo < -15:  # a collapsed cell (e.g. magnitude at 98%) would squash the rest
            ax.set_xscale("symlog", linthresh=2)
    axes[0].legend(fontsize="small", loc="lower left")
    fig.suptitle(f"{EXPERIMENT}: do the controls hurt? (paired by seed, 95% intervals)")
    study.show(fig, "controls")

# %% [markdown]
# Accuracy of each branch (mean, ±1 std whiskers), per criterion, beside the dense reference (dashed).

# %%
fig = Figure(figsize=(6 * len(SPARSITIES), 4.5), layout="constrained")
axes = np.atleast_1d(fig.subplots(1, len(SPARSITIES), sharey=True))
for ax, s in zip(axes, SPARSITIES):
    here = [c for c in CRITERIA if (s, c) in table.index]
    pos = np.arange(len(here))
    width = 0.8 / len(BRANCHES)
    bars = {}
    for j, b in enumerate(BRANCHES):
        if b not in table:
            continue
        m = np.array([table.loc[(s, c), b] for c in here], dtype=float) * 100
        e = np.array([sds.loc[(s, c), b] for c in here], dtype=float) * 100
        ax.bar(pos + (j - (len(BRANCHES) - 1) / 2) * width, m, width, yerr=np.nan_to_num(e), capsize=2,
               label=b, color=COLORS.get(b, "tab:green"))
        bars[b] = m
    if len(dense):
        ax.axhline(dense.mean(), color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xticks(pos, here)
    ax.set_title(f"{s:g}% sparse")
    ax.set_ylabel("Test top-1 accuracy (%)")
    ax.grid(True, axis="y", alpha=0.3)
    values = table.to_numpy(dtype=float) * 100
    floor = max(0.0, np.nanmin(np.where(values > 50, values, np.nan)) - 5) if (values > 50).any() else 0.0
    ax.set_ylim(floor, np.nanmax(values) + 2)
    for b, m in bars.items():  # a collapsed branch (near chance) is below the floor: say its value
        for i in np.flatnonzero(m < floor):
            ax.text(pos[i] + (BRANCHES.index(b) - (len(BRANCHES) - 1) / 2) * width, floor + 0.3, f"{m[i]:.1f}", rotation=90,
                    ha="center", va="bottom", fontsize="x-small")
axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
fig.suptitle(f"{EXPERIMENT}: runs and their controls (bars below the axis floor collapsed to near chance)")
study.show(fig, "accuracy")

# %% [markdown]
# Lottery tickets and their controls over the levels, one panel per lottery run's target sparsity (mean, ±1 std
# band; reversed log axis of weights remaining, the dense level 0 at 100%).

# %%
if len(lottery):
    LSTYLE = {"ticket": ("tab:green", "-"), "shuffle": ("tab:blue", "--"), "reinit": ("tab:orange", ":")}
    targets = sorted(lottery["sparsity (%)"].unique())
    fig = Figure(figsize=(6 * len(targets), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(targets), sharey=True))
    for ax, s in zip(axes, targets):
        part = lagg[lagg["sparsity (%)"] == s]
        for b, g in part.groupby("branch"):
            g = g.sort_values("level")
            if b != "ticket":  # the controls start from the ticket's dense level 0
                g = pd.concat([part[(part["branch"] == "ticket") & (part["level"] == 0)], g])
            color, dash = LSTYLE.get(b, ("tab:gray", "-."))
            x, m, e = g["percent_remaining_mean"], g["test_acc1_mean"] * 100, g["test_acc1_std"].fillna(0) * 100
            ax.plot(x, m, marker="o", color=color, linestyle=dash, label=ba.figures.BRANCH_LABELS.get(b, b))
            ax.fill_between(x, m - e, m + e, color=color, alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ticks = np.unique(np.round(part["percent_remaining_mean"], 1))
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize="small")
        ax.minorticks_off()
        ax.set_xlim(ticks.max() * 1.15, ticks.min() / 1.15)
        ax.set_xlabel("Weights remaining (%), log scale")
        ax.set_ylabel("Test top-1 accuracy (%)")
        ax.set_title(f"lottery run to {s:g}% sparsity")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="lower left")
    fig.suptitle(f"{EXPERIMENT}: lottery tickets against their shuffled and reinitialised masks")
    study.show(fig, "lottery")

# %% [markdown]
# ## What the at-init methods choose: per-layer densities
# The controls keep each layer's density, so a method's per-layer densities are what the controls leave of it. From
# `layers.csv` of the first seed's run per criterion at the highest sparsity.

# %%
top_s = max(SPARSITIES)
chosen = runs[(runs["timing"] == "pre") & (runs["sparsity (%)"] == top_s)].sort_values("seed").drop_duplicates("criterion")
chosen = chosen.set_index("criterion").reindex([c for c in CRITERIA if c in set(chosen["criterion"])]).reset_index()
tables = study.layer_tables(chosen, lambda r: f"{r['criterion']} (seed {r['seed']})")
if tables:
    long = pd.concat([t.assign(run=k) for k, t in tables.items()], ignore_index=True)
    study.publish(long[["run", "layer", "params", "nonzero", "density"]], "layers", floatfmt=".4g")
    study.show(ba.plot_layer_density(tables, title=f"Weights kept per layer at {top_s:g}% sparsity", log=True), "layer_density")
    for k, t in tables.items():
        study.finding(f"Per-layer density at {top_s:g}%, {k}: " + ", ".join(
            f"{r['layer']} {r['density'] * 100:.3g}% ({int(r['nonzero'])} of {int(r['params'])})" for _, r in t.iterrows())
            + ".")

# %% [markdown]
# ## Findings
# Every sentence below was computed in this notebook; they are written to `findings.md` beside the tables and figures.

# %%
study.write_findings()
