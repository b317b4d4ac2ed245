# %% [markdown]
# # One-shot pruning of a character language model: magnitude, Wanda, SparseGPT and OWL
#
# A small character GPT trained here on Shakespeare's works, pruned once after training from a few calibration
# windows of training text, as Wanda (Sun et al. 2024) and SparseGPT (Frantar & Alistarh 2023) prune LLaMA:
# magnitude compared per layer (Wanda's magnitude baseline) and per output row, Wanda (|W|·‖X‖₂, per row),
# SparseGPT (row-wise OBS reconstruction, survivors updated); 50% unstructured, 4:8 and 2:4, and 60/70/80%
# unstructured; uniform per-layer sparsity as the papers, and OWL's outlier-weighted layer sparsities (Yin et al.
# 2024) for the unstructured ones; a short fine-tune for a subset. `lm_head` stays dense, as in both papers.
# Reported: test perplexity and bits per character over a held-out whole work (the protocol — split, context,
# stride, tokenizer — is logged beside the figures in every run).
#
# The runs: `BENCHKIT_DATA=../shared/data benchkit sweep experiments/lm_pruning.yaml` (see `results/README.md`
# for the exact command, hardware and wall time). Tables and figures go to `results/lm-pruning/`; the committed
# store `results/studies/mlflow.db` holds every run they are computed from.
#
# **Controls** (the next cell): `TRACKING_URI`, the MLflow store (environment `MLFLOW_TRACKING_URI`; default
# the committed study store `results/studies/mlflow.db`); `EXPERIMENT`, the sweep's `experiment:` name
# (`BENCHKIT_NOTEBOOK_EXPERIMENT`; default `lm-pruning`); `OUTPUT`, the folder for tables, figures and findings
# (`BENCHKIT_NOTEBOOK_OUTPUT`; default `results/<EXPERIMENT>/`). To render this notebook for your own sweep,
# from the repository root:
#
# ```bash
# .venv/bin/python notebooks/render.py 08_lm_pruning --tracking-uri sqlite:///mlflow.db --experiment my-sweep --out results/my-sweep
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
from matplotlib.ticker import FuncFormatter

from benchkit import analysis as ba
from benchkit import verify as bv

warnings.filterwarnings("ignore", category=pd.errors.PerformanceWarning)  # wide runs frames, harmless

# Run from notebooks/ (Jupyter's default) or from the repository root.
REPO = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'results/studies/mlflow.db'}"
EXPERIMENT = os.environ.get("BENCHKIT_NOTEBOOK_EXPERIMENT") or "lm-pruning"
OUTPUT = Path(os.environ.get("BENCHKIT_NOTEBOOK_OUTPUT") or REPO / "results" / EXPERIMENT)
study = ba.Study(EXPERIMENT, TRACKING_URI, OUTPUT, notebook="08_lm_pruning.py", repo=REPO)
print(f"store: {TRACKING_URI}\nexperiment: {EXPERIMENT}\noutputs: {OUTPUT}")

# %% [markdown]
# ## Runs, model and evaluation protocol
# Each run is named by its method (criterion and comparison group), pattern (unstructured sparsity of the pruned
# layers, or N:M), allocation (uniform or OWL) and fine-tuning (none, or N steps); `dense` is the sparsity-0 run
# of each seed, the dense model every pruned run of that seed starts from.

# %%
study.publish(study.provenance(), "study")
runs = ba.label_runs(study.runs())
FT = "prune.post.finetune.iterations"
runs["finetune"] = runs[FT].fillna(0).astype(int) if FT in runs else 0
runs["allocation"] = runs["allocation"].where(runs["method"] != "dense", "uniform")
METRICS = [m for m in ("sparsity", "compression_ratio", "theoretical_speedup", "dense_test_perplexity",
                       "test_loss", "test_perplexity", "test_bpc", "val_perplexity", "val_bpc", "time_prune_s",
                       "time_total_s") if m in runs]
ba.save_table(runs[["run_id", "method", "pattern", "allocation", "finetune", "seed", *METRICS]], OUTPUT / "runs.csv")
SEEDS = sorted(runs["seed"].unique().tolist())
TUNED = sorted(set(runs["finetune"]) - {0})



def first(column: str):
    """The value of a setting the runs share, as text (`benchkit.analysis.shared_setting`)."""
    return ba.shared_setting(runs, column)


def size(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


kwargs = first("model.kwargs") or {}
PROTOCOL = {"tokenizer": first("data.tokenizer"), "context": first("test_context") or first("data.context"),
            "stride": first("test_stride"), "validation": first("data.val_works"), "test": first("data.test_works"),
            "test characters scored": first("test_characters"),
            "calibration": f"{first('resolved.prune.calibration.samples') or first('prune.calibration.samples')} "
                           f"windows of {first('resolved.prune.calibration.length')} "
                           f"{first('prune.calibration.source')} characters",
            "kept dense": first("prune.exclude")}
study.finding(f"Model: character GPT, {kwargs.get('n_layer', '?')} layers, width {kwargs.get('n_embd', '?')}, "
              f"{kwargs.get('n_head', '?')} heads, {size(first('params_total') or 0)} parameters; dense training "
              f"{first('train.iterations') or first('train.epochs')} {'steps' if first('train.iterations') else 'epochs'}"
              f". Protocol: " + "; ".join(f"{k} {v}" for k, v in PROTOCOL.items()) + ".")
print(f"{len(runs)} finished runs; methods {ba.method_order(runs['method'])}; patterns "
      f"{ba.pattern_order(runs['pattern'])}; allocations {sorted(set(runs['allocation']))}; fine-tuning steps "
      f"{sorted(set(runs['finetune']))}; seeds {SEEDS}")

# %% [markdown]
# ## Wanda's Table 2, on this model
# Uniform per-layer sparsity, no fine-tuning. Test perplexity (per character) and bits per character, mean ± std
# over seeds; the dense model on top.

# %%
one_shot = runs[(runs["allocation"] == "uniform") & (runs["finetune"] == 0)]
dense = runs[runs["method"] == "dense"]
ppl = ba.method_table(one_shot, "test_perplexity", dense=dense)
bpc = ba.method_table(one_shot, "test_bpc", dense=dense, decimals=3)
study.publish(ppl, "perplexity")
study.publish(bpc, "bpc")
means = (one_shot[one_shot["method"] != "dense"].groupby(["method", "pattern"])[["test_perplexity", "test_bpc"]]
         .mean().reset_index())
dense_ppl = dense.groupby("seed")["test_perplexity"].mean()
dense_bpc = dense.groupby("seed")["test_bpc"].mean()
study.finding(f"Dense: test perplexity {dense_ppl.mean():.3f}" + (f" ± {dense_ppl.std():.3f}" if len(dense_ppl) > 1 else "")
              + f", {dense_bpc.mean():.3f} bits per character (seeds {dense_ppl.index.tolist()}).")
PATTERNS = ba.pattern_order(means["pattern"])
METHODS = ba.method_order(runs["method"])
for p in PATTERNS:
    at = means[means["pattern"] == p].set_index("method")
    order = at.sort_values("test_perplexity")
    study.finding(f"{p}: " + ", ".join(f"{m} {r['test_perplexity']:.3f} ({r['test_bpc']:.3f} bpc)"
                                       for m, r in order.iterrows())
                  + f"; best {order.index[0]}, worst {order.index[-1]} "
                  f"({order['test_perplexity'].iloc[-1] / order['test_perplexity'].iloc[0]:.2f}× its perplexity).")

# %% [markdown]
# ## Beside the paper (LLaMA-7B)
# Perplexity relative to the dense model, here and in Wanda's Table 2 (LLaMA-7B on WikiText-2, word-piece
# perplexity: the absolute numbers are not comparable, the ratios show the shape). Outlier features, which Wanda's
# score is built for, grow with model size (Dettmers et al. 2022), so a model of under a million parameters may
# order the methods differently; what the runs show is reported either way.

# %%
paper = ba.WANDA2024_LLAMA7B
paper_dense = paper["dense"]["dense"]
rows = []
for m in ba.method_order(means["method"]):
    row = {"method": m}
    for p in [p for p in PATTERNS if any(p in v for v in paper.values())]:
        here = means[(means["method"] == m) & (means["pattern"] == p)]["test_perplexity"]
        row[f"{p} here (×dense)"] = here.iloc[0] / dense_ppl.mean() if len(here) else np.nan
        row[f"{p} LLaMA-7B (×dense)"] = paper.get(m, {}).get(p, np.nan) / paper_dense
    rows.append(row)
beside = pd.DataFrame(rows)
study.publish(beside, "beside_wanda", floatfmt=".3g")


def ratio(method: str, pattern: str, source: str) -> float:
    col = f"{pattern} {'here' if source == 'here' else 'LLaMA-7B'} (×dense)"
    r = beside[beside["method"] == method]
    return float(r[col].iloc[0]) if len(r) and col in r else np.nan


for p in [p for p in ("50%", "4:8", "2:4") if p in PATTERNS]:
    here = {m: ratio(m, p, "here") for m in ("magnitude (per layer)", "Wanda", "SparseGPT")}
    there = {m: ratio(m, p, "paper") for m in here}
    worst_here = max(here, key=lambda m: -np.inf if np.isnan(here[m]) else here[m])
    study.finding(f"{p}, perplexity over dense: here magnitude {here['magnitude (per layer)']:.2f}×, Wanda "
                  f"{here['Wanda']:.2f}×, SparseGPT {here['SparseGPT']:.2f}× (worst: {worst_here}); LLaMA-7B "
                  f"{there['magnitude (per layer)']:.2f}×, {there['Wanda']:.2f}×, {there['SparseGPT']:.2f}×.")

# %% [markdown]
# ## The published shape, point by point
# Wanda's Table 2 and SparseGPT's figures: (1) magnitude degrades most; (2) Wanda and SparseGPT are close at 50%;
# (3) the gaps widen at 2:4 and at high sparsity. Paired over seeds (every method of a seed prunes the same dense
# model), test perplexity, 95% t intervals (`benchkit.verify.compare`).

# %%
def noise(r, fmt: str) -> str:
    """Nothing for a difference the seeds tell from 0; else why not (one seed, or within noise), in ``fmt``."""
    return "" if r["distinguishable"] else fmt.format("one seed" if r["n"] < 2 else "within noise")


key = one_shot.assign(point=one_shot["pattern"])
pairs = [("magnitude (per layer)", "Wanda"), ("magnitude (per row)", "Wanda"), ("Wanda", "SparseGPT")]
parts = []
for a, b in pairs:
    if not {a, b} <= set(key["method"]):
        continue
    cmp = bv.compare(key, {"method": a}, {"method": b}, metric="test_perplexity", by="point")
    parts.append(cmp.assign(comparison=f"{a} − {b}"))
shape = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
if len(shape):
    shape["order"] = shape["point"].map(PATTERNS.index)
    shape = shape.sort_values(["comparison", "order"], kind="stable").drop(columns="order")
    shape = shape[["comparison", "point", "n", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "distinguishable"]]
    shape = shape.rename(columns={"point": "pattern", "mean_a": "a", "mean_b": "b", "diff": "a − b"})
    study.publish(shape, "paired_differences", floatfmt=".4g")
    worst = means.loc[means.groupby("pattern")["test_perplexity"].idxmax()].set_index("pattern")["method"]
    mag = [p for p in PATTERNS if worst.get(p, "").startswith("magnitude")]
    study.finding(f"(1) Magnitude has the highest perplexity at {len(mag)} of {len(PATTERNS)} patterns"
                  + (f" ({', '.join(mag)})" if mag else "") + ("; elsewhere the worst is "
                  + ", ".join(f"{worst[p]} at {p}" for p in PATTERNS if p not in mag) if len(mag) < len(PATTERNS) else "")
                  + ".")
    ws = shape[shape["comparison"] == "Wanda − SparseGPT"].set_index("pattern")
    if len(ws):
        rel = (ws["a − b"] / ws["b"] * 100)
        text = ", ".join(f"{p} {rel[p]:+.1f}%" + noise(ws.loc[p], " ({})")
                         for p in PATTERNS if p in ws.index)
        study.finding(f"(2, 3) Wanda − SparseGPT, relative to SparseGPT's perplexity: {text}.")
    spread = means.groupby("pattern")["test_perplexity"].agg(lambda s: s.max() / s.min())
    study.finding("(3) Spread between the best and the worst method (perplexity ratio): "
                  + ", ".join(f"{p} {spread[p]:.2f}×" for p in PATTERNS) + ".")

# %% [markdown]
# ## With OWL (outlier-weighted layer sparsity)
# The unstructured patterns again with OWL's per-layer sparsities instead of the uniform ones (N:M fixes every
# layer's sparsity, so OWL has nothing to allocate there); then OWL − uniform, paired over seeds (negative: OWL
# has the lower perplexity). Yin et al. 2024: little change at 50%, large gains from 70% on.

# %%
owl_runs = runs[(runs["allocation"] == "owl") & (runs["finetune"] == 0)]
if len(owl_runs):
    study.publish(ba.method_table(owl_runs, "test_perplexity", dense=dense), "perplexity_owl")
    study.publish(ba.method_table(owl_runs, "test_bpc", dense=dense, decimals=3), "bpc_owl")
    both = runs[(runs["finetune"] == 0) & runs["pattern"].isin(set(owl_runs["pattern"]))]
    parts = []
    for m in ba.method_order(owl_runs["method"]):
        rows = both[both["method"] == m].assign(point=lambda f: f["pattern"])
        cmp = bv.compare(rows, {"allocation": "owl"}, {"allocation": "uniform"}, metric="test_perplexity", by="point")
        parts.append(cmp.assign(method=m))
    owl = pd.concat(parts, ignore_index=True)
    owl = owl.assign(m=owl["method"].map(METHODS.index), p=owl["point"].map(PATTERNS.index))
    owl = owl.sort_values(["m", "p"]).drop(columns=["m", "p"])
    owl = owl.rename(columns={"point": "pattern", "mean_a": "OWL", "mean_b": "uniform", "diff": "OWL − uniform"})
    owl = owl[["method", "pattern", "n", "uniform", "OWL", "OWL − uniform", "ci_low", "ci_high", "distinguishable"]]
    study.publish(owl, "owl_vs_uniform", floatfmt=".4g")
    for m, g in owl.groupby("method", sort=False):
        study.finding(f"OWL − uniform, {m}: " + ", ".join(
            f"{r['pattern']} {r['OWL − uniform']:+.3f} ({r['OWL − uniform'] / r['uniform'] * 100:+.1f}%"
            + noise(r, ", {}") + ")" for _, r in g.iterrows()) + ".")
    high = owl[owl["pattern"].map(ba.pattern_sparsity) >= 0.7]
    if len(high):
        study.finding(f"At 70% and beyond, OWL lowers the perplexity in {int((high['OWL − uniform'] < 0).sum())} of "
                      f"{len(high)} (method, sparsity) cells, beyond the seeds' noise in "
                      f"{int(((high['OWL − uniform'] < 0) & high['distinguishable']).sum())}.")
else:
    print("no OWL runs in this sweep")

# %% [markdown]
# ## After a short fine-tune
# The subset that was fine-tuned (uniform allocation): one-shot vs fine-tuned perplexity, and fine-tuned −
# one-shot paired over seeds.

# %%
if TUNED:
    tuned = runs[(runs["allocation"] == "uniform") & (runs["finetune"] > 0)]
    subset = one_shot[one_shot["pattern"].isin(set(tuned["pattern"]))]
    study.publish(ba.method_table(tuned, "test_perplexity", dense=dense), "perplexity_finetuned")
    parts = []
    both = pd.concat([subset, tuned]).assign(point=lambda f: f["pattern"])
    for m in ba.method_order(tuned["method"]):
        rows = both[both["method"] == m]
        cmp = bv.compare(rows, {"finetune": TUNED[-1]}, {"finetune": 0}, metric="test_perplexity", by="point")
        parts.append(cmp.assign(method=m))
    ft = pd.concat(parts, ignore_index=True).rename(columns={"point": "pattern", "mean_a": "fine-tuned",
                                                             "mean_b": "one-shot", "diff": "fine-tuned − one-shot"})
    ft = ft.assign(m=ft["method"].map(METHODS.index), p=ft["pattern"].map(PATTERNS.index)).sort_values(["p", "m"])
    ft = ft[["method", "pattern", "n", "one-shot", "fine-tuned", "fine-tuned − one-shot", "ci_low", "ci_high",
             "distinguishable"]]
    study.publish(ft, "finetune_vs_oneshot", floatfmt=".4g")
    for p, g in ft.groupby("pattern", sort=False):
        order = g.sort_values("fine-tuned")
        study.finding(f"Fine-tuned {TUNED[-1]} steps, {p}: " + ", ".join(
            f"{r['method']} {r['one-shot']:.3f} → {r['fine-tuned']:.3f}" for _, r in order.iterrows())
            + f"; the spread between methods goes from {g['one-shot'].max() / g['one-shot'].min():.2f}× to "
            f"{g['fine-tuned'].max() / g['fine-tuned'].min():.2f}×.")
else:
    print("no fine-tuned runs in this sweep")

# %% [markdown]
# ## Perplexity against sparsity
# Each method's test perplexity (log scale) against the sparsity of the pruned layers: uniform allocation solid,
# OWL dashed, N:M patterns as open markers at their 50%; dashed black: dense. Right: bits per character.

# %%
COLORS = {"magnitude (per layer)": "tab:red", "magnitude (per row)": "tab:orange", "Wanda": "tab:blue",
          "SparseGPT": "tab:green"}
MARK = {"4:8": "D", "2:4": "s"}
curves = runs[(runs["finetune"] == 0) & (runs["method"] != "dense")].assign(
    x=lambda f: f["pattern"].map(ba.pattern_sparsity) * 100)
fig = Figure(figsize=(12, 4.6), layout="constrained")
panels = fig.subplots(1, 2)
for ax, metric, label in ((panels[0], "test_perplexity", "Test perplexity (per character), log scale"),
                          (panels[1], "test_bpc", "Test bits per character")):
    agg = ba.aggregate(curves, by=["method", "allocation", "pattern", "x"], metrics=[metric])
    for (m, alloc), g in agg.groupby(["method", "allocation"]):
        color = COLORS.get(m)
        line = g[~g["pattern"].str.contains(":")].sort_values("x")
        if len(line):
            ax.errorbar(line["x"], line[f"{metric}_mean"], yerr=line[f"{metric}_std"].fillna(0), color=color,
                        marker="o", linestyle="-" if alloc == "uniform" else "--", capsize=2,
                        label=f"{m}" + ("" if alloc == "uniform" else f" · {alloc.upper()}"))
        for _, r in g[g["pattern"].str.contains(":")].iterrows():
            ax.errorbar(r["x"] + (1.0 if r["pattern"] == "2:4" else -1.0), r[f"{metric}_mean"],
                        yerr=0 if pd.isna(r[f"{metric}_std"]) else r[f"{metric}_std"], color=color,
                        marker=MARK.get(r["pattern"], "P"), fillstyle="none", linestyle="none", capsize=2)
    base = dense.groupby("seed")[metric].mean().mean()
    ax.axhline(base, color="black", linestyle="--", linewidth=1, label="dense")
    if metric == "test_perplexity":
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("Sparsity of the pruned layers (%)")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
for p, mk in MARK.items():
    panels[1].plot([], [], marker=mk, fillstyle="none", color="gray", linestyle="none", label=f"{p} (at 50%)")
handles, labels = panels[1].get_legend_handles_labels()
fig.legend(handles, labels, loc="outside right upper", fontsize="small")
fig.suptitle(f"{EXPERIMENT}: one-shot pruning of a character GPT (mean ± std over seeds {SEEDS})")
study.show(fig, "perplexity_vs_sparsity")

# %% [markdown]
# ## Where the weights go
# Per-layer density of OWL's allocation at the highest sparsity (lowest seed), beside the uniform one, from the
# runs' `layers.csv` artifacts.

# %%
top = max((p for p in PATTERNS if ":" not in p), key=ba.pattern_sparsity, default=None)
chosen = runs[(runs["pattern"] == top) & (runs["finetune"] == 0) & (runs["method"] == "Wanda")]
chosen = chosen.sort_values("seed").drop_duplicates("allocation")
tables = study.layer_tables(chosen, lambda r: f"Wanda · {r['allocation']} · {top}")
if tables:
    layers = pd.concat([t.assign(strategy=k) for k, t in tables.items()])
    study.publish(layers[["strategy", "run_id", "layer", "params", "nonzero", "density"]], "layers", floatfmt=".3g")
    study.show(ba.plot_layer_density(tables, title=f"Weights kept per layer at {top} (Wanda, seed "
                                                   f"{chosen['seed'].min()})"), "layer_density")
    owl_t = next((t for k, t in tables.items() if "owl" in k), None)
    if owl_t is not None:
        pruned = owl_t[owl_t["density"] < 1]
        study.finding(f"OWL at {top} (Wanda): per-layer density {pruned['density'].min() * 100:.1f}–"
                      f"{pruned['density'].max() * 100:.1f}% over the {len(pruned)} pruned layers (uniform: "
                      f"{(1 - ba.pattern_sparsity(top)) * 100:.0f}% each).")

# %% [markdown]
# ## Findings
# Every sentence below was computed in this notebook; they are written to `findings.md` beside the tables and figures.

# %%
study.write_findings()
