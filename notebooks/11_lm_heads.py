# %% [markdown]
# # Structured pruning of a character language model: attention heads and MLP neurons, compacted
#
# The character GPT of the one-shot study (`08_lm_pruning`), trained here on Shakespeare's works, with whole units
# removed after training: attention heads (a head's q/k/v rows and its out_proj columns) or MLP hidden neurons (rows
# of `mlp.fc`, whose `mlp.proj` columns then see only zeros), 25/50/75% in every layer, scored by the L2 norm of
# their weights; one shot, and with a short fine-tune. Each pruned model is compacted with Torch-Pruning and timed
# beside the masked one. The published shape is that of head-pruning studies (Michel, Levy & Neubig 2019): a few
# heads can go at a small cost, the cost grows quickly as more go, and fine-tuning recovers part of it.
#
# The runs: `BENCHKIT_DATA=../shared/data benchkit sweep experiments/lm_heads.yaml --workers 1` (see
# `results/README.md` for the exact command, hardware and wall time). Tables and figures go to
# `results/lm-heads/`; the committed store `results/studies/mlflow.db` holds every run they are computed from.
#
# **Controls** (the next cell): `TRACKING_URI`, the MLflow store (environment `MLFLOW_TRACKING_URI`; default
# the committed study store `results/studies/mlflow.db`); `EXPERIMENT`, the sweep's `experiment:` name
# (`BENCHKIT_NOTEBOOK_EXPERIMENT`; default `lm-heads`); `OUTPUT`, the folder for tables, figures and findings
# (`BENCHKIT_NOTEBOOK_OUTPUT`; default `results/<EXPERIMENT>/`). To render this notebook for your own sweep,
# from the repository root:
#
# ```bash
# .venv/bin/python notebooks/render.py 11_lm_heads --tracking-uri sqlite:///mlflow.db --experiment my-sweep --out results/my-sweep
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
EXPERIMENT = os.environ.get("BENCHKIT_NOTEBOOK_EXPERIMENT") or "lm-heads"
OUTPUT = Path(os.environ.get("BENCHKIT_NOTEBOOK_OUTPUT") or REPO / "results" / EXPERIMENT)
study = ba.Study(EXPERIMENT, TRACKING_URI, OUTPUT, notebook="11_lm_heads.py", repo=REPO)
print(f"store: {TRACKING_URI}\nexperiment: {EXPERIMENT}\noutputs: {OUTPUT}")

# %% [markdown]
# ## Runs
# Each run is named by the units it removes (`heads` or `MLP neurons`; `dense` is the sparsity-0 run of each seed,
# the model every pruned run of that seed starts from), the share of them removed in every layer, and its
# fine-tuning (none, or N steps).

# %%
study.publish(study.provenance(), "study")
runs = study.runs()
UNITS = {"head": "heads", "neuron": "MLP neurons"}
FT = "prune.post.finetune.iterations"
runs["dense"] = runs["prune.sparsity"].fillna(0) == 0
runs["units"] = runs["granularity"].map(UNITS).where(~runs["dense"], "dense")
if runs["units"].isna().any():
    raise RuntimeError(f"granularities {sorted(set(runs.loc[runs['units'].isna(), 'granularity']))}: this notebook "
                       f"reads whole-unit pruning ({', '.join(UNITS)}); filter the runs or use 04_granularity")
runs["removed"] = (runs["prune.sparsity"].fillna(0) * 100).round().astype(int)
runs["finetune"] = runs[FT].fillna(0).astype(int) if FT in runs else 0
runs["arm"] = runs["units"] + np.where(runs["finetune"] > 0, ", fine-tuned " + runs["finetune"].astype(str) + " steps",
                                       ", one shot")
runs.loc[runs["dense"], "arm"] = "dense"
METRICS = [m for m in ("compression_ratio", "model_compression_ratio", "compacted_params", "compacted_speedup",
                       "dense_test_perplexity", "test_perplexity", "test_bpc", "val_perplexity", "latency_ms",
                       "latency_compacted_ms", "latency_deployed_ms", "latency_speedup", "deploy_speedup",
                       "time_total_s") if m in runs]
ba.save_table(runs[["run_id", "arm", "removed", "seed", *METRICS]], OUTPUT / "runs.csv")
SEEDS = sorted(runs["seed"].unique().tolist())
ORDER = {"dense": 0, **{u: i + 1 for i, u in enumerate(UNITS.values())}}
ARMS = list(dict.fromkeys(runs.assign(o=runs["units"].map(ORDER)).sort_values(["o", "finetune"])["arm"]))
REMOVED = sorted(set(runs.loc[~runs["dense"], "removed"]))
dense = runs[runs["dense"]]


def first(column: str):
    """The value of a setting the runs share, as text (`benchkit.analysis.shared_setting`)."""
    return ba.shared_setting(runs, column)


kwargs = first("model.kwargs") or {}
study.finding(f"Model: character GPT, {kwargs.get('n_layer', '?')} layers, width {kwargs.get('n_embd', '?')}, "
              f"{kwargs.get('n_head', '?')} heads, {(first('params_total') or 0) / 1e6:.2f}M parameters; test "
              f"perplexity per character on {first('data.test_works')} (context {first('test_context')}, stride "
              f"{first('test_stride')}); latency: batch {first('latency_batch_size')}, {first('latency_threads')} "
              f"thread(s), median of {first('latency_repeats')} calls.")
print(f"{len(runs)} finished runs; arms {ARMS}; removed {REMOVED}%; seeds {SEEDS}")

# %% [markdown]
# ## Test perplexity
# Mean ± std over seeds, per arm and share of the units removed in every layer; the dense model in the first column.

# %%
rows = []
for arm in ARMS:
    part = runs[runs["arm"] == arm]
    row = {"arm": arm}
    for r in ([0] if arm == "dense" else REMOVED):
        row[f"{r}%"] = ba.mean_std(part[part["removed"] == r]["test_perplexity"], 3)
    row["n"] = int(part.groupby("removed")["seed"].nunique().min())
    rows.append(row)
table = pd.DataFrame(rows).reindex(columns=["arm", "0%", *[f"{r}%" for r in REMOVED], "n"]).fillna("")
study.publish(table, "perplexity")
means = runs[~runs["dense"]].groupby(["arm", "units", "finetune", "removed"])["test_perplexity"].mean().reset_index()
d = dense.groupby("seed")["test_perplexity"].mean()
study.finding(f"Dense: test perplexity {ba.mean_std(d, 3)} (seeds {d.index.tolist()}).")
for arm in [a for a in ARMS if a in set(means["arm"])]:
    g = means[means["arm"] == arm]
    study.finding(f"{arm}: " + ", ".join(f"{r['removed']}% removed {r['test_perplexity']:.3f} "
                                         f"({r['test_perplexity'] / d.mean():.2f}× dense)" for _, r in g.iterrows()) + ".")

# %% [markdown]
# ## The published shape, step by step
# Paired over seeds (every arm of a seed prunes the same dense model), test perplexity, 95% t intervals
# (`benchkit.verify.compare`): each further step of removal (one shot), and fine-tuned − one shot at every step.

# %%
key = runs[~runs["dense"]].assign(point=runs["removed"])
parts = []
for unit in [u for u in UNITS.values() if u in set(key["units"])]:
    one = key[(key["units"] == unit) & (key["finetune"] == 0)]
    for lo, hi in zip(REMOVED, REMOVED[1:]):
        sub = one[one["removed"].isin([lo, hi])].assign(point=f"{lo}% → {hi}%")
        if {lo, hi} <= set(sub["removed"]):
            parts.append(bv.compare(sub, {"removed": hi}, {"removed": lo}, metric="test_perplexity", by="point")
                         .assign(comparison=f"{unit}: one step more removed"))
    for steps in sorted(set(key["finetune"]) - {0}):
        both = key[(key["units"] == unit) & key["finetune"].isin([0, steps])]
        if {0, steps} <= set(both["finetune"]):
            parts.append(bv.compare(both, {"finetune": steps}, {"finetune": 0}, metric="test_perplexity", by="point")
                         .assign(comparison=f"{unit}: fine-tuned {steps} steps − one shot",
                                 point=lambda f: f["point"].map("{}% removed".format)))
if parts:
    diffs = pd.concat(parts, ignore_index=True)
    diffs = diffs[["comparison", "point", "n", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "distinguishable"]]
    study.publish(diffs.rename(columns={"mean_a": "a", "mean_b": "b", "diff": "a − b"}), "paired_differences",
                  floatfmt=".4g")
    for comp, g in diffs.groupby("comparison", sort=False):
        study.finding(f"{comp}: " + "; ".join(
            f"{r['point']} {r['diff']:+.3f}" + (f" [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" if r["n"] > 1 else "")
            + ("" if r["distinguishable"] else " (one seed)" if r["n"] < 2 else " (within noise)")
            for _, r in g.iterrows()) + " perplexity.")
else:
    study.finding("No two settings of one kind of unit have finished runs yet: no paired differences.")

# %% [markdown]
# ## Size and speed after compaction
# One-shot runs (fine-tuning changes values, not shapes). Parameters of the compacted model (Torch-Pruning), its
# theoretical speedup (the FLOPs of the whole model, attention's matmuls and `lm_head` included, dense over
# compacted, and of the pruned layers alone), and the measured latency of the masked and the compacted model in the
# same run (median of interleaved calls), with their ratio and its share of the whole-model theory (efficiency).

# %%
one_shot = runs[~runs["dense"] & (runs["finetune"] == 0)].copy()
if "latency_compacted_ms" in one_shot and "compacted_flops_total_model" in one_shot:
    one_shot["params kept (%)"] = 100 * one_shot["compacted_params"] / one_shot["params_total"]
    one_shot["theory, whole model (×)"] = one_shot["flops_total_model"] / one_shot["compacted_flops_total_model"]
    one_shot["theory, pruned layers (×)"] = one_shot["compacted_speedup"]
    one_shot["measured (×)"] = one_shot["latency_ms"] / one_shot["latency_compacted_ms"]
    one_shot["efficiency"] = one_shot["measured (×)"] / one_shot["theory, whole model (×)"]
    cols = ["params kept (%)", "theory, whole model (×)", "theory, pruned layers (×)", "latency_ms",
            "latency_compacted_ms", "measured (×)", "efficiency"]
    speed = (one_shot.groupby(["units", "removed"])[cols].mean().reset_index()
             .rename(columns={"latency_ms": "masked (ms)", "latency_compacted_ms": "compacted (ms)"}))
    study.publish(speed, "size_speed", floatfmt=".3g")
    for _, r in speed.iterrows():
        study.finding(f"{r['units']}, {r['removed']}% removed: {r['params kept (%)']:.1f}% of the parameters kept; "
                      f"theory {r['theory, whole model (×)']:.2f}× (whole model), measured {r['measured (×)']:.2f}× "
                      f"({r['masked (ms)']:.3g} → {r['compacted (ms)']:.3g} ms), efficiency {r['efficiency']:.2f}.")
else:
    speed = pd.DataFrame()
    study.finding("The runs logged no compacted latency (latency.enabled false): no size and speed table.")

# %% [markdown]
# ## Figures
# Left: test perplexity against the share of units removed (mean, whiskers ±1 std over seeds; dashed: dense).
# Right: measured against theoretical (whole-model) speedup of the compacted models; the diagonal is perfect
# efficiency.

# %%
COLORS = {"heads": "tab:blue", "MLP neurons": "tab:orange"}
fig = Figure(figsize=(11, 4.2), layout="constrained")
left, right = fig.subplots(1, 2)
agg = ba.aggregate(runs[~runs["dense"]], by=["units", "finetune", "removed"], metrics=["test_perplexity"])
for (unit, steps), g in agg.groupby(["units", "finetune"]):
    left.errorbar(g["removed"], g["test_perplexity_mean"], yerr=g["test_perplexity_std"].fillna(0), capsize=3,
                  marker="o", color=COLORS.get(unit), linestyle="-" if steps == 0 else ":",
                  label=f"{unit}, " + ("one shot" if steps == 0 else f"fine-tuned {steps} steps"))
left.axhline(d.mean(), color="black", linestyle="--", linewidth=1, label="dense")
left.set_xticks(REMOVED, [f"{r}%" for r in REMOVED])
left.set_xlabel("Units removed in every layer")
left.set_ylabel("Test perplexity per character")
left.legend(fontsize="small")
if len(speed):
    for unit, g in speed.groupby("units"):
        right.plot(g["theory, whole model (×)"], g["measured (×)"], marker="o", color=COLORS.get(unit), label=unit)
        for _, r in g.iterrows():
            right.annotate(f"{r['removed']}%", (r["theory, whole model (×)"], r["measured (×)"]), fontsize="x-small",
                           textcoords="offset points", xytext=(4, -8))
    top = max(speed["theory, whole model (×)"].max(), speed["measured (×)"].max()) * 1.05
    right.plot([1, top], [1, top], color="gray", linewidth=1, linestyle="--", label="measured = theory")
    right.legend(fontsize="small")
right.set_xlabel("Theoretical speedup, whole model (×)")
right.set_ylabel("Measured speedup, compacted vs masked (×)")
fig.suptitle(f"{EXPERIMENT}: seeds {SEEDS}")
study.show(fig, "heads_neurons")

# %% [markdown]
# ## Findings
# Every sentence below was computed in this notebook; they are written to `findings.md` beside the tables and figures.

# %%
study.write_findings()
