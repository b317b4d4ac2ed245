"""Write the notebooks in this folder from code, so they stay reviewable as diffs and never carry
stale outputs. Run: ``.venv/bin/python notebooks/_make_notebooks.py`` (then execute them in Jupyter,
or let tests/test_notebooks.py run them against a generated store).

Every notebook starts with the same setup cell: the tracking store comes from ``MLFLOW_TRACKING_URI``,
the experiment from ``BENCHKIT_NOTEBOOK_EXPERIMENT`` and the output folder from
``BENCHKIT_NOTEBOOK_OUTPUT``, each with a default that points at the study's committed store. To add
a study notebook, append a ``Notebook(...)`` to ``NOTEBOOKS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


@dataclass
class Notebook:
    filename: str
    title: str
    intro: str
    experiment: str  # default MLflow experiment (the sweep's `experiment:` name)
    store: str  # default store, relative to the repository root: "mlflow.db" or a folder under results/
    output: str  # default output folder for tables and figures, relative to the repository root
    cells: list  # (kind, source) pairs after the setup cell; kind is "md" or "code"
    # What the notebook reads, for tests/test_notebooks.py: "sweep" | "lottery" (fake runs) or a study
    # kind ("granularity" | "timing" | "iterative": a tiny real sweep of that study's YAML).
    runs: str = "sweep"


def setup_source(nb: Notebook) -> str:
    store = f'f"sqlite:///{{REPO / {nb.store!r}}}"' if nb.store.endswith(".db") else f"str(REPO / {nb.store!r})"
    return f'''%matplotlib inline
import os
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
from IPython.display import Markdown, display

from benchkit import analysis as ba

# Run from notebooks/ (Jupyter's default) or from the repository root.
REPO = Path.cwd().resolve().parent if Path.cwd().name == "notebooks" else Path.cwd().resolve()
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or {store}
EXPERIMENT = os.environ.get("BENCHKIT_NOTEBOOK_EXPERIMENT", {nb.experiment!r})
OUTPUT = Path(os.environ.get("BENCHKIT_NOTEBOOK_OUTPUT") or REPO / {nb.output!r})
OUTPUT.mkdir(parents=True, exist_ok=True)
print(f"store: {{TRACKING_URI}}\\nexperiment: {{EXPERIMENT}}\\noutputs: {{OUTPUT}}")'''


def build(nb: Notebook) -> nbformat.NotebookNode:
    cells = [new_markdown_cell(f"# {nb.title}\n\n{nb.intro}"), new_code_cell(setup_source(nb))]
    for kind, source in nb.cells:
        cells.append(new_markdown_cell(source) if kind == "md" else new_code_cell(source))
    for i, cell in enumerate(cells):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating gives a byte-identical file
    notebook = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "benchkit": {"experiment": nb.experiment, "runs": nb.runs},
    })
    nbformat.validate(notebook)
    return notebook


# --------------------------------------------------------------------------------------------- notebooks
QUICKSTART = Notebook(
    filename="00_quickstart.ipynb",
    title="Quickstart: pruning strategies on digits",
    intro=(
        "Reads back the runs of the quickstart sweep from MLflow and compares the strategies the way "
        "ShrinkBench does: accuracy against compression ratio and against theoretical speedup, averaged "
        "over seeds (mean ± std).\n\nProduce the runs first, from the repository root:\n\n"
        "```bash\n.venv/bin/benchkit sweep experiments/quickstart.yaml\n```"
    ),
    experiment="quickstart",
    store="mlflow.db",
    output="results/quickstart",
    cells=[
        ("md", "## Runs\nOne row per finished run: the sweep axes, then final metrics and every config key."),
        ("code", '''runs = ba.load_runs(EXPERIMENT, tracking_uri=TRACKING_URI)
axes = [c for c in ba.strategy_columns(runs) if runs[c].astype(str).nunique() > 1]
print(f"{len(runs)} finished runs; strategies differ in {axes}; seeds {sorted(runs['seed'].unique().tolist())}")
runs[[*ba.strategy_columns(runs), "seed", "compression_ratio", "theoretical_speedup", "test_acc1"]].head(10)'''),
        ("md", "## Mean ± std over seeds\nAccuracies in %; `compression ratio` is the achieved one "
               "(prunable weights / non-zero weights), `speedup` the theoretical FLOP ratio."),
        ("code", '''metrics = [m for m in ("compression_ratio", "theoretical_speedup", "val_acc1", "test_acc1") if m in runs]
agg = ba.aggregate(runs, metrics=metrics)
table = ba.summary_table(
    agg, metrics, by=axes or None,
    scale={m: 100 for m in metrics if "acc" in m},
    labels={"compression_ratio": "compression (×)", "theoretical_speedup": "speedup (×)",
            "val_acc1": "val top-1 (%)", "test_acc1": "test top-1 (%)"},
)
ba.save_table(agg, OUTPUT / "summary.csv")
ba.save_table(table, OUTPUT / "summary.md")
display(Markdown(ba.to_markdown(table)))'''),
        ("md", "## Accuracy vs compression and vs theoretical speedup\nLog₂ x-axes; bands are ±1 std over "
               "seeds; the dashed line is the dense model (mean over seeds)."),
        ("code", '''fig = ba.plot_tradeoffs(runs, "test_acc1", title=f"{EXPERIMENT}: test accuracy vs compression and speedup")
fig.savefig(OUTPUT / "tradeoff.png", dpi=150)
display(fig)'''),
        ("md", "## Where the weights go\nPer-layer density of the most compressed run (first seed) of each "
               "strategy, from its `layers.csv` artifact."),
        ("code", '''compressed = runs[runs["compression_ratio"] > 1]
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
display(fig)'''),
        ("md", "## Training curves\nValidation accuracy and loss per phase (dense training, then fine-tuning) "
               "for each strategy at its highest compression, mean ± std over seeds."),
        ("code", '''keys = [*strategy, "compression"]
chosen = runs.merge(top[keys], on=keys)
history = ba.load_history(chosen, ["val_acc1", "val_loss"], tracking_uri=TRACKING_URI)
fig = ba.plot_training_curves(history)
fig.savefig(OUTPUT / "training_curves.png", dpi=150)
display(fig)'''),
    ],
)

# --------------------------------------------------------------------------------------------- studies
# The study notebooks share a setup: tables go out as CSV (full precision) and Markdown, figures as
# PNG, and every sentence of findings.md is computed from the runs (no number is typed by hand).
STUDY_HELPERS = r'''import warnings

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

warnings.filterwarnings("ignore", category=pd.errors.PerformanceWarning)  # wide runs frames, harmless
FINDINGS: list[str] = []


def publish(table: pd.DataFrame, name: str, floatfmt: str = ".4g") -> None:
    """The table as OUTPUT/<name>.csv (full precision) and .md, and shown here."""
    ba.save_table(table, OUTPUT / f"{name}.csv")
    ba.save_table(table, OUTPUT / f"{name}.md", floatfmt=floatfmt)
    display(Markdown(ba.to_markdown(table, floatfmt=floatfmt)))


def show(fig: Figure, name: str) -> None:
    fig.savefig(OUTPUT / f"{name}.png", dpi=150)
    display(fig)


def finding(text: str) -> None:
    """One sentence of findings.md; its numbers are computed from the runs in this notebook."""
    FINDINGS.append(text)
    print(text)


def provenance(experiment: str) -> pd.DataFrame:
    """Runs per status, seeds and wall-clock span of the study, read from the store itself."""
    every = ba.load_runs(experiment, tracking_uri=TRACKING_URI, status=None)
    done = every[every["status"] == "FINISHED"]
    if done.empty:
        raise RuntimeError(f"no FINISHED runs of {experiment!r} in {TRACKING_URI}; run the sweep first "
                           f"(statuses there: {every['status'].value_counts().to_dict()})")
    counts = every["status"].value_counts()
    row = {"experiment": experiment, "finished": int(counts.get("FINISHED", 0)),
           "failed": int(counts.get("FAILED", 0)), "unfinished": int(len(every) - counts.get("FINISHED", 0)
                                                                    - counts.get("FAILED", 0)),
           "seeds": " ".join(map(str, sorted(done["seed"].unique().tolist()))),
           "first start (UTC)": f"{done['start_time'].min():%Y-%m-%d %H:%M}",
           "last end (UTC)": f"{done['end_time'].max():%Y-%m-%d %H:%M}",
           "span (min)": (done["end_time"].max() - done["start_time"].min()).total_seconds() / 60}
    if "time_total_s" in done:
        row["sum of run times (min)"] = done["time_total_s"].sum() / 60
    if row["unfinished"]:
        finding(f"PARTIAL: {row['unfinished']} run(s) of '{experiment}' were not finished when this was "
                "rendered; only the finished ones are analysed.")
    if row["failed"]:
        failed = every[every["status"] == "FAILED"]
        differ = [c for c in ba.param_columns(every) if c != "seed"
                  and set(failed[c].astype(str)) != set(done[c].astype(str))]
        settings = "; ".join(f"{c} = {', '.join(sorted(set(failed[c].astype(str))))}" for c in differ)
        finding(f"{row['failed']} FAILED run(s) of '{experiment}' are in the store and left out of every table "
                f"(tracebacks: their traceback.txt artifact)" + (f"; their settings: {settings}" if settings else "") + ".")
    return pd.DataFrame([row])


def layer_tables(chosen: pd.DataFrame, label) -> dict[str, pd.DataFrame]:
    """label(row) → that run's layers.csv artifact; runs whose artifacts are not at hand are named."""
    tables = {}
    for _, r in chosen.iterrows():
        try:
            tables[label(r)] = ba.load_layers(r["run_id"], tracking_uri=TRACKING_URI).assign(run_id=r["run_id"])
        except (FileNotFoundError, OSError) as e:
            print(f"no layers.csv for run {r['run_id']} ({type(e).__name__}): per-layer tables are run "
                  "artifacts, stored beside the tracking store that wrote them (mlartifacts/)")
    return tables


def density_figure(fig: Figure, log: bool = False) -> Figure:
    """A per-layer density chart sized for a README, legend beside the bars (log y for tiny densities)."""
    fig.set_size_inches(11, 4.5)
    ax = fig.axes[0]
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    if log:
        ax.set_yscale("log")
        ax.set_ylim(0.5, 150)
        ax.set_ylabel("Density (% of weights kept), log scale")
    return fig


def write_findings(notebook: str) -> None:
    lines = [f"# Findings: {EXPERIMENT}", "",
             f"Computed by `notebooks/{notebook}` from `{TRACKING_URI.replace(f'sqlite:///{REPO}/', 'sqlite:///')}` "
             f"(experiment `{EXPERIMENT}`; store path relative to the repository root).", "",
             *[f"- {f}" for f in FINDINGS]]
    (OUTPUT / "findings.md").write_text("\n".join(lines) + "\n")
    display(Markdown("\n".join(lines)))'''

FINDINGS_CELL = ("md", "## Findings\nEvery sentence below was computed in this notebook; they are written to "
                       "`findings.md` beside the tables and figures.")


def study(filename: str, title: str, intro: str, experiment: str, runs: str, cells: list) -> Notebook:
    return Notebook(
        filename=filename, title=title, intro=intro, experiment=experiment,
        store="results/studies/mlflow.db", output=f"results/{experiment}", runs=runs,
        cells=[("code", STUDY_HELPERS), *cells, FINDINGS_CELL, ("code", f"write_findings({filename!r})")],
    )


def sweep_intro(text: str, experiment: str) -> str:
    return (f"{text}\n\nThe runs: `BENCHKIT_DATA=../shared/data benchkit sweep experiments/{experiment}.yaml` "
            "(see `results/README.md` for the exact command, hardware and wall time). Tables and figures go "
            f"to `results/{experiment}/`; the committed store `results/studies/mlflow.db` holds every run "
            "they are computed from.")


STRATEGIES = study(
    "01_strategies.ipynb",
    "Pruning strategies: global vs layer-wise, magnitude vs Taylor vs random (ShrinkBench)",
    sweep_intro(
        "Blalock et al. 2020 compare magnitude, gradient-magnitude (|w·g|, here `taylor`) and random pruning, "
        "each with one global threshold or the same fraction per layer, as accuracy-vs-compression and "
        "accuracy-vs-theoretical-speedup curves over several seeds. LeNet-300-100, one-shot pruning after "
        "training, then fine-tuning.", "strategies"),
    "strategies", "sweep",
    [
        ("md", "## Runs\nWhat the store holds for this study, then one row per finished run (`runs.csv`)."),
        ("code", r'''display(Markdown(ba.to_markdown(study_table := provenance(EXPERIMENT))))
ba.save_table(study_table, OUTPUT / "study.csv")
ba.save_table(study_table, OUTPUT / "study.md")
runs = ba.load_runs(EXPERIMENT, tracking_uri=TRACKING_URI)
axes = [c for c in ba.strategy_columns(runs) if runs[c].astype(str).nunique() > 1]
METRICS = [m for m in ("compression_ratio", "theoretical_speedup", "val_acc1", "test_acc1", "dense_test_acc1",
                       "time_total_s") if m in runs]
ba.save_table(runs[["run_id", *ba.strategy_columns(runs), "seed", *METRICS]], OUTPUT / "runs.csv")
print(f"{len(runs)} finished runs; strategies differ in {axes}; seeds {sorted(runs['seed'].unique().tolist())}")'''),
        ("md", "## Test accuracy, mean ± std over seeds\nRows: requested compression; columns: criterion · scope. "
               "Full statistics (achieved compression, speedup, validation accuracy) in `summary.csv`."),
        ("code", r'''agg = ba.aggregate(runs, metrics=METRICS)
ba.save_table(agg, OUTPUT / "summary.csv")
agg["strategy"] = [ba.describe_strategy({c: r[c] for c in axes if c != "compression"}) for _, r in agg.iterrows()]
acc = ba.summary_table(agg, ["test_acc1"], by=["strategy", "compression"], scale={"test_acc1": 100})
table = acc.pivot(index="compression", columns="strategy", values="test_acc1").reset_index()
table.columns.name = None
table = table.rename(columns={"compression": "compression (×)"})
publish(table, "accuracy")
dense = runs.groupby("seed")["dense_test_acc1"].mean() * 100
finding(f"Dense {'/'.join(sorted(set(runs['model'])))} test accuracy {dense.mean():.2f} ± {dense.std():.2f}% over "
        f"seeds {dense.index.tolist()} (the common starting point of every pruned run of that seed).")'''),
        ("md", "## Accuracy vs compression and vs theoretical speedup\nShrinkBench's two panels: log₂ x-axes, "
               "mean over seeds with a ±1 std band, dense accuracy dashed."),
        ("code", r'''fig = ba.plot_tradeoffs(runs, "test_acc1",
                       title=f"{EXPERIMENT}: test accuracy after one-shot pruning + fine-tuning (mean ± std over seeds)")
show(fig, "tradeoff")
ratio = runs["theoretical_speedup"] / runs["compression_ratio"]
same = bool(np.allclose(ratio, 1.0, atol=1e-3))
finding(f"Theoretical speedup / compression ratio over the {len(runs)} runs lies in [{ratio.min():.4f}, "
        f"{ratio.max():.4f}]: " + ("the two x-axes are the same, so no ordering can change between them "
        "(every prunable layer is Linear: one multiply-add per weight per sample)." if same else
        "speedup and compression differ, so strategies can rank differently on the two axes."))'''),
        ("md", "## Global vs layer-wise at equal compression\nPaired by seed (both start from the same dense "
               "network): the difference of test accuracy, global minus layer-wise, in percentage points."),
        ("code", r'''if {"global", "layer"} <= set(runs["scope"]):
    key = [c for c in axes if c != "scope"]
    paired = runs.pivot_table(index=[*key, "seed"], columns="scope", values="test_acc1").dropna()
    paired["diff"] = (paired["global"] - paired["layer"]) * 100
    g = paired.groupby(key)["diff"]
    scope_table = pd.DataFrame({"mean (pp)": g.mean(), "std (pp)": g.std(), "seeds": g.size(),
                                "seeds where global wins": g.apply(lambda d: int((d > 0).sum()))}).reset_index()
    publish(scope_table.rename(columns={"compression": "compression (×)"}), "global_vs_layer", floatfmt=".2f")
    for crit, rows in scope_table[scope_table["compression"] > 1].groupby("criterion"):
        ahead = rows[rows["mean (pp)"] > 0]
        clear = rows[rows["mean (pp)"] > rows["std (pp)"].fillna(0)]
        behind = rows[rows["mean (pp)"] < -rows["std (pp)"].fillna(0)]
        top = rows.loc[rows["compression"].idxmax()]
        finding(f"{crit}: global − layer-wise is positive on average at {len(ahead)} of {len(rows)} compressions > 1, "
                f"by more than one std at {', '.join(f'{c:g}×' for c in clear['compression']) or 'none'}"
                + (f", negative by more than one std at {', '.join(f'{c:g}×' for c in behind['compression'])}"
                   if len(behind) else "")
                + f"; at {top['compression']:g}× it is {top['mean (pp)']:+.2f} ± {top['std (pp)']:.2f} pp.")
else:
    print("this sweep has no global/layer pair to compare")'''),
        ("md", "## Global vs layer-wise at equal theoretical speedup\nEach strategy's mean accuracy is "
               "interpolated linearly in log₂(speedup) between its measured points, at speedups both scopes "
               "reach; ShrinkBench notes that the ranking at equal compression can reverse here."),
        ("code", r'''def at_speedup(rows: pd.DataFrame, s: float) -> float:
    rows = rows.sort_values("theoretical_speedup_mean")
    return float(np.interp(np.log2(s), np.log2(rows["theoretical_speedup_mean"]), rows["test_acc1_mean"]))


rows = []
if {"global", "layer"} <= set(runs["scope"]) and not same:
    for crit, g in agg.groupby("criterion"):
        curves = {sc: g[g["scope"] == sc] for sc in ("global", "layer")}
        if any(c.empty for c in curves.values()):
            continue
        top = min(c["theoretical_speedup_mean"].max() for c in curves.values())
        for s in [x for x in (2.0, 3.0, 4.0, 6.0, 8.0, 16.0) if x <= top] + [top]:
            acc = {sc: at_speedup(c, s) * 100 for sc, c in curves.items()}
            rows.append({"criterion": crit, "speedup (×)": s, "global (%)": acc["global"], "layer (%)": acc["layer"],
                         "global − layer (pp)": acc["global"] - acc["layer"]})
if rows:
    speed = pd.DataFrame(rows).drop_duplicates(["criterion", "speedup (×)"])
    publish(speed, "global_vs_layer_at_speedup", floatfmt=".2f")
    for crit, g in speed.groupby("criterion"):
        last = g.iloc[-1]
        flips = bool(((g["global − layer (pp)"] > 0).any()) and (g["global − layer (pp)"] < 0).any())
        finding(f"{crit}, at equal theoretical speedup: at {last['speedup (×)']:.2f}× (the most both scopes reach) "
                f"global − layer-wise = {last['global − layer (pp)']:+.2f} pp"
                + ("; the sign changes along the curve" if flips else "")
                + f"; global scope reaches at most {g['speedup (×)'].max():.2f}× here, layer-wise "
                f"{agg[(agg['criterion'] == crit) & (agg['scope'] == 'layer')]['theoretical_speedup_mean'].max():.2f}×.")
else:
    print("speedup equals compression in every run (or no global/layer pair): nothing to add to the table above")'''),
        ("md", "## Best strategy at each compression\nThe highest mean test accuracy, and how far the random "
               "control is behind it."),
        ("code", r'''best = agg.loc[agg.groupby("compression")["test_acc1_mean"].idxmax(), ["compression", "strategy", "n",
                                                                      "test_acc1_mean", "test_acc1_std"]]
if "random" in set(runs["criterion"]):
    rnd = agg[agg["criterion"] == "random"].groupby("compression")["test_acc1_mean"].max()
    best["best random (%)"] = best["compression"].map(rnd) * 100
best[["test_acc1_mean", "test_acc1_std"]] *= 100
best = best.rename(columns={"compression": "compression (×)", "test_acc1_mean": "test top-1 mean (%)",
                            "test_acc1_std": "std (pp)"})
publish(best, "best", floatfmt=".2f")
for _, r in best.iterrows():
    if r["compression (×)"] > 1:
        extra = (f", random pruning {r['test top-1 mean (%)'] - r['best random (%)']:.2f} pp behind"
                 if "best random (%)" in r else "")
        finding(f"{r['compression (×)']:g}×: best is {r['strategy']} at {r['test top-1 mean (%)']:.2f}%{extra}.")'''),
        ("md", "## Where the weights go\nPer-layer density of each strategy's most compressed run (lowest seed), "
               "from its `layers.csv` artifact: global scope chooses the per-layer split itself."),
        ("code", r'''top_c = runs["compression"].max()
chosen = runs[runs["compression"] == top_c].sort_values("seed").drop_duplicates(
    [c for c in axes if c != "compression"])
tables = layer_tables(chosen, lambda r: f"{ba.describe_strategy({c: r[c] for c in axes if c != 'compression'})}")
if tables:
    layers = pd.concat([t.assign(strategy=k) for k, t in tables.items()])
    publish(layers[["strategy", "run_id", "layer", "params", "nonzero", "density"]], "layers")
    # global scope's choices span 1–50%: a log axis keeps the small bars readable
    show(density_figure(ba.plot_layer_density(
        tables, title=f"Weights kept per layer at {top_c:g}× (seed {chosen['seed'].min()})"), log=True), "layer_density")'''),
    ],
)

LOTTERY = study(
    "02_lottery.ipynb",
    "Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin 2019)",
    sweep_intro(
        "LeNet-300-100: train, prune 20% of each layer's survivors (output layer 10%), rewind the survivors "
        "to their initial values, repeat. At every level two controls train the same masks from a new random "
        "initialisation (`reinit`) and random masks with the same per-layer sparsity (`random`). Compared "
        "with the paper's Figures 3–4: accuracy and early-stopping iteration against weights remaining.",
        "lottery"),
    "lottery", "lottery",
    [
        ("md", "## Runs and levels\nOne row per (run, branch, level) in `levels_long.csv`, with run ids."),
        ("code", r'''display(Markdown(ba.to_markdown(study_table := provenance(EXPERIMENT))))
ba.save_table(study_table, OUTPUT / "study.csv")
ba.save_table(study_table, OUTPUT / "study.md")
runs = ba.load_runs(EXPERIMENT, tracking_uri=TRACKING_URI)
runs = runs[runs["timing"] == "lottery"]
levels = ba.load_levels(runs, tracking_uri=TRACKING_URI)
ba.save_table(levels.drop(columns=["start_time", "end_time"], errors="ignore"), OUTPUT / "levels_long.csv")
BRANCHES = [b for b in ("ticket", "reinit", "random") if b in set(levels["branch"])]
print(f"{len(runs)} lottery run(s), seeds {sorted(runs['seed'].unique().tolist())}; branches {BRANCHES}; "
      f"levels 0–{levels['level'].max()}")'''),
        ("md", "## Accuracy per level\nTest accuracy (%) and early-stopping iteration (best validation "
               "accuracy) of the ticket and its controls, mean ± std over seeds (a single value for one seed). "
               "For the paper's LeNet-300-100 schedule the published weights-remaining formula is shown beside ours."),
        ("code", r'''Q = [q for q in ("percent_remaining", "test_acc1", "val_acc1", "best_step") if q in levels]
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
publish(table, "levels", floatfmt=".3g")'''),
        ("md", "## Tickets and controls over pruning levels\nLeft: test accuracy; right: the iteration of best "
               "validation accuracy. Reversed log x-axis, 100% (dense) on the left."),
        ("code", r'''fig = ba.plot_lottery(levels, "test_acc1", "best_step" if "best_step" in levels else None,
                     title=f"{EXPERIMENT}: winning tickets vs random reinitialisation and random pruning")
fig.set_size_inches(13, 4.8)
for ax in fig.axes:
    ax.tick_params(axis="x", labelrotation=60)  # one tick per level: keep neighbours apart
show(fig, "lottery")'''),
        ("md", "## Against the paper's claims\nThe level closest to each percentage the paper quotes."),
        ("code", r'''per = agg.set_index(["branch", "level"])
t = per.loc["ticket"]
dense_acc, dense_stop = t.loc[0, "test_acc1_mean"] * 100, t.loc[0].get("best_step_mean", np.nan)


def nearest(percent: float) -> int:
    return int((t["percent_remaining_mean"] - percent).abs().idxmin())


best = int(t["test_acc1_mean"].idxmax())
finding(f"Dense network (level 0): {dense_acc:.2f}% test accuracy. Best ticket: {t.loc[best, 'test_acc1_mean'] * 100:.2f}% "
        f"at {t.loc[best, 'percent_remaining_mean']:.1f}% weights remaining (level {best}), "
        f"{t.loc[best, 'test_acc1_mean'] * 100 - dense_acc:+.2f} pp over dense.")
for paper_pct, claim in ((13.5, "paper: > +0.3 pp over dense"), (3.6, "paper: back to the dense level")):
    k = nearest(paper_pct)
    finding(f"Ticket at {t.loc[k, 'percent_remaining_mean']:.1f}% remaining (level {k}; {claim} at {paper_pct}%): "
            f"{t.loc[k, 'test_acc1_mean'] * 100:.2f}%, {t.loc[k, 'test_acc1_mean'] * 100 - dense_acc:+.2f} pp vs dense.")
for b in BRANCHES[1:]:
    c = per.loc[b]
    above = c[c["test_acc1_mean"] * 100 >= dense_acc]
    deepest = int(c.index.max())
    gap = (t.loc[deepest, "test_acc1_mean"] - c.loc[deepest, "test_acc1_mean"]) * 100
    below_from = int(above.index.max()) + 1 if len(above) else int(c.index.min())
    stays = (f"below the dense accuracy at every level from {c.loc[below_from, 'percent_remaining_mean']:.1f}% "
             f"remaining (level {below_from}) on" if below_from <= deepest else "never below dense at the sparsest level")
    finding(f"{ba.figures.BRANCH_LABELS.get(b, b)}: at or above dense at {len(above)} of {len(c)} levels, {stays}; "
            f"at the sparsest level ({c.loc[deepest, 'percent_remaining_mean']:.1f}%) ticket − control = {gap:+.2f} pp.")
if "random" in BRANCHES:
    k = nearest(10.7)
    finding(f"Ticket vs random pruning at {t.loc[k, 'percent_remaining_mean']:.1f}% remaining (paper, 10.7%: 98.3 vs 97.5): "
            f"{t.loc[k, 'test_acc1_mean'] * 100:.2f} vs {per.loc[('random', k), 'test_acc1_mean'] * 100:.2f}%.")
if "best_step_mean" in t and np.isfinite(dense_stop):
    k = nearest(21.1)
    every = runs["train.eval_every"].iloc[0] if "train.eval_every" in runs else None
    finding(f"Early-stopping iteration: dense {dense_stop:.0f}, ticket at {t.loc[k, 'percent_remaining_mean']:.1f}% "
            f"{t.loc[k, 'best_step_mean']:.0f} ({(1 - t.loc[k, 'best_step_mean'] / dense_stop) * 100:.0f}% earlier; paper: "
            f"38% earlier at 21%); validation every {every} iterations, last iteration "
            f"{levels['best_step'].max():.0f} here.")
    sparse = [k for k in t.index if k > 0 and t.loc[k, "percent_remaining_mean"] <= 21.2]
    if sparse:
        means = {b: per.loc[b].loc[[k for k in sparse if k in per.loc[b].index], "best_step_mean"].mean()
                 for b in BRANCHES}
        finding(f"Early-stopping iteration averaged over the {len(sparse)} levels at ≤ 21.1% remaining (levels "
                f"{min(sparse)}–{max(sparse)}): " + ", ".join(f"{ba.figures.BRANCH_LABELS.get(b, b)} {v:.0f}"
                                                             for b, v in means.items())
                + f" (dense {dense_stop:.0f}); single levels are noisy, the average is the steadier comparison.")
if paper_schedule:
    diff = (table["weights remaining (%)"] - table["Frankle & Carbin formula (%)"]).abs().max()
    finding(f"Weights remaining per level match the paper's formula within {diff:.3f} percentage points.")'''),
        ("md", "## Per-layer density at the last level\nFrom the `layers.csv` artifact of each run, beside "
               "the schedule's expectation (1 − rate)^levels per layer (rounding aside)."),
        ("code", r'''from fnmatch import fnmatch

last = int(levels["level"].max())
tables = layer_tables(runs.sort_values("seed").head(1), lambda r: f"ticket, level {last} (seed {r['seed']})")
if tables:
    (label, layers), = tables.items()
    expected = [(1 - next((v for k, v in (layer_rates or {}).items() if fnmatch(n, k)), rate or 0.2)) ** last
                for n in layers["layer"]]
    layers = layers.assign(**{"expected density": expected})
    publish(layers[["run_id", "layer", "params", "nonzero", "density", "expected density"]], "layers")
    show(density_figure(ba.plot_layer_density({label: layers}, dict(zip(layers["layer"], expected)),
                                              reference_label=f"(1 − rate)^{last}",
                                              title="Weights kept per layer, last level"), log=True), "layer_density")'''),
        ("md", "## Training curves per level\nValidation accuracy during the training of the ticket at a few "
               "levels (first run), iterations counted from the rewind point."),
        ("code", r'''history = ba.load_history(runs.sort_values("seed").head(1), ["val_acc1"], tracking_uri=TRACKING_URI)
wanted = {f"level_{k}" for k in sorted({last // 3, 2 * last // 3, last}) if k}
history = history[history["phase"].isin({"dense"} | wanted)]
pct = t["percent_remaining_mean"].to_dict()
history["phase"] = history["phase"].map(
    lambda p: f"level {int(p.split('_')[1]):02d} ({pct.get(int(p.split('_')[1]), np.nan):.1f}%)" if p.startswith("level_")
    else "dense (100%)")
fig = ba.plot_training_curves(history, hue=[], title="Winning-ticket training curves (validation)")
show(fig, "curves")'''),
    ],
)

HAN_ERRORS = '''# Han et al. 2015, Table 1 (MNIST): top-1 error (%) dense → pruned, at 12× (see ../shared/REFERENCES.md)
HAN2015_ERROR = {"lenet300": (1.64, 1.59), "lenet5": (0.80, 0.77)}
HAN2015_LAYERS = {"lenet300": ba.HAN2015_LENET300, "lenet5": ba.HAN2015_LENET5}
HAN2015_FLOPS_KEPT = {"lenet5": 16.0}  # Table 3, % of FLOPs kept'''

ITERATIVE = study(
    "03_iterative.ipynb",
    "Iterative magnitude pruning with retraining (Han et al. 2015)",
    sweep_intro(
        "Train, then prune to 12× in 4 rounds, retraining at a tenth of the learning rate after each round, on "
        "LeNet-300-100 and LeNet-5; per-layer weights remaining against Han et al.'s Tables 2–3. Han et al. set "
        "each layer's threshold from its weight spread: `global` scope is the nearest automatic analogue, "
        "`layer` scope keeps the same 8.3% in every layer.", "iterative"),
    "iterative", "iterative",
    [
        ("md", "## Runs"),
        ("code", HAN_ERRORS + "\n\n" + r'''display(Markdown(ba.to_markdown(study_table := provenance(EXPERIMENT))))
ba.save_table(study_table, OUTPUT / "study.csv")
ba.save_table(study_table, OUTPUT / "study.md")
runs = ba.load_runs(EXPERIMENT, tracking_uri=TRACKING_URI)
METRICS = [m for m in ("compression_ratio", "theoretical_speedup", "dense_test_acc1", "test_acc1", "params_prunable",
                       "nonzero_prunable", "time_total_s") if m in runs]
ba.save_table(runs[["run_id", *ba.strategy_columns(runs), "seed", *METRICS]], OUTPUT / "runs.csv")
print(f"{len(runs)} finished runs: {sorted(set(zip(runs['model'], runs['scope'])))}")'''),
        ("md", "## Error before and after pruning\nTop-1 test error (%) of the dense network and of the pruned "
               "one, mean over seeds; FLOPs kept = 100 / theoretical speedup. Han et al.'s MNIST figures beside."),
        ("code", r'''agg = ba.aggregate(runs, by=["model", "scope"], metrics=METRICS)
summary = pd.DataFrame({
    "model": agg["model"], "scope": agg["scope"], "n": agg["n"],
    "dense error (%)": 100 - agg["dense_test_acc1_mean"] * 100,
    "pruned error (%)": 100 - agg["test_acc1_mean"] * 100,
    "pruned error std (pp)": agg["test_acc1_std"] * 100,
    "compression (×)": agg["compression_ratio_mean"],
    "non-zero weights": agg["nonzero_prunable_mean"], "of": agg["params_prunable_mean"],
    "FLOPs kept (%)": 100 / agg["theoretical_speedup_mean"],
})
summary["change (pp)"] = summary["pruned error (%)"] - summary["dense error (%)"]
lr = runs.groupby(["model", "scope"])["train.lr"].agg(lambda v: " ".join(map(str, sorted(set(v)))))
summary["train lr"] = [lr[(m, sc)] for m, sc in zip(summary["model"], summary["scope"])]  # LeNet-5 diverges at 0.05
summary["Han et al. error, MNIST (%)"] = summary["model"].map(
    lambda m: f"{HAN2015_ERROR[m][0]:.2f} → {HAN2015_ERROR[m][1]:.2f}" if m in HAN2015_ERROR else "")
publish(summary, "summary", floatfmt=".4g")
for _, r in summary.iterrows():
    finding(f"{r['model']} · {r['scope']}: error {r['dense error (%)']:.2f}% → {r['pruned error (%)']:.2f}% "
            f"({r['change (pp)']:+.2f} pp) at {r['compression (×)']:.1f}×, {r['FLOPs kept (%)']:.1f}% of the FLOPs kept"
            + (f" (Han et al.: {HAN2015_ERROR[r['model']][0]:.2f} → {HAN2015_ERROR[r['model']][1]:.2f}%"
               + (f", {HAN2015_FLOPS_KEPT[r['model']]:.0f}% FLOPs" if r["model"] in HAN2015_FLOPS_KEPT else "") + ")"
               if r["model"] in HAN2015_ERROR else "") + ".")'''),
        ("md", "## Round by round\nAccuracy after each prune-and-retrain round (the `level_*` metrics, step = "
               "round), per model; dense at 100%."),
        ("code", r'''levels = ba.load_levels(runs, tracking_uri=TRACKING_URI)
rounds = ba.aggregate(levels, by=["model", "scope", "level"], metrics=["percent_remaining", "test_acc1"])
publish(rounds.rename(columns={"level": "round"}), "rounds")
models = sorted(set(rounds["model"]))
fig = Figure(figsize=(5 * len(models), 3.8), layout="constrained")
for ax, model in zip(np.atleast_1d(fig.subplots(1, len(models))), models):
    dense = runs[runs["model"] == model].groupby("seed")["dense_test_acc1"].mean().mean() * 100
    for scope, g in rounds[rounds["model"] == model].groupby("scope"):
        x = np.r_[100.0, g["percent_remaining_mean"]]
        y = np.r_[dense, g["test_acc1_mean"] * 100]
        ax.plot(x, y, marker="o", label=f"{scope} scope")
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("Weights remaining (%), log scale")
    ax.set_ylabel("Test top-1 accuracy (%)")
    ax.set_title(f"{model}: accuracy after each round")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
show(fig, "rounds")'''),
        ("md", "## Weights remaining per layer vs Han et al.\nFrom each run's `layers.csv` (lowest seed); hatched "
               "bars are Han et al.'s Tables 2 (LeNet-300-100) and 3 (LeNet-5)."),
        ("code", r'''rows = []
for model, group in runs.sort_values("seed").drop_duplicates(["model", "scope"]).groupby("model"):
    tables = layer_tables(group, lambda r: f"{r['scope']} scope")
    if not tables:
        continue
    ref = HAN2015_LAYERS.get(model)
    for label, t in tables.items():
        rows.append(t.assign(model=model, scope=label.split()[0],
                             **{"Han et al. density": t["layer"].map(ref or {})}))
    show(density_figure(ba.plot_layer_density(tables, ref, reference_label="Han et al. 2015 (MNIST)",
                                              title=f"{model}: weights kept per layer after iterative pruning")),
         f"layers_{model}")
if rows:
    layers = pd.concat(rows)
    publish(layers[["model", "scope", "run_id", "layer", "params", "nonzero", "density", "Han et al. density"]],
            "layers", floatfmt=".3g")
    for (model, scope), g in layers.dropna(subset=["Han et al. density"]).groupby(["model", "scope"]):
        parts = ", ".join(f"{r['layer']} {r['density'] * 100:.1f}% (Han {r['Han et al. density'] * 100:.0f}%)"
                          for _, r in g.iterrows())
        finding(f"{model} · {scope} scope keeps per layer: {parts}.")'''),
    ],
)

GRANULARITY = study(
    "04_granularity.ipynb",
    "Granularity: what to remove at equal compression",
    sweep_intro(
        "LeNet-5 pruned to one compression for every granularity (the one an N:M pattern fixes: 2× with 2:4 in "
        "`granularity`, 4× with 1:4 in `granularity-4x`) by global magnitude with L2 group norms, removing "
        "single weights, N:M blocks along input channels, kernel rows (vector), whole kernels, or whole output "
        "channels; one-shot after training, then fine-tuning. Coarser units cost accuracy but can be removed "
        "physically: `compacted_speedup` counts the FLOPs after Torch-Pruning removes dead channels.",
        "granularity"),
    "granularity", "granularity",
    [
        ("md", "## Runs"),
        ("code", r'''display(Markdown(ba.to_markdown(study_table := provenance(EXPERIMENT))))
ba.save_table(study_table, OUTPUT / "study.csv")
ba.save_table(study_table, OUTPUT / "study.md")
runs = ba.load_runs(EXPERIMENT, tracking_uri=TRACKING_URI)
ORDER = ["element", "N:M", "vector", "kernel", "channel"]  # fine to coarse; any N:M pattern sits second


def rank(g: str) -> int:
    g = "N:M" if ":" in str(g) else g
    return ORDER.index(g) if g in ORDER else len(ORDER)


runs = runs.assign(order=runs["granularity"].map(rank))
METRICS = [m for m in ("compression_ratio", "model_compression_ratio", "theoretical_speedup", "compacted_speedup",
                       "compacted_params", "params_total", "dense_test_acc1", "test_acc1", "time_total_s") if m in runs]
ba.save_table(runs.sort_values("order")[["run_id", *ba.strategy_columns(runs), "seed", *METRICS]], OUTPUT / "runs.csv")
varying = [c for c in ba.strategy_columns(runs) if runs[c].astype(str).nunique() > 1]
print(f"{len(runs)} finished runs; they differ in {varying}")'''),
        ("md", "## Accuracy and cost per granularity\nAchieved compression over the pruned layers; theoretical "
               "speedup (dense / non-zero FLOPs); speedup and parameters after physically removing dead channels."),
        ("code", r'''agg = ba.aggregate(runs, by=["granularity"], metrics=METRICS)
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
publish(summary, "summary")
for _, r in summary.iterrows():
    extra = (f", {r['speedup after channel removal (×)']:.2f}× after channel removal"
             if pd.notna(r.get("speedup after channel removal (×)")) else "")
    finding(f"{r['granularity']}: {r['test top-1 (%)']:.2f}% ({r['change (pp)']:+.2f} pp vs dense) at "
            f"{r['compression (×)']:.2f}×, theoretical speedup {r['theoretical speedup (×)']:.2f}×{extra}.")'''),
        ("md", "## Figure\nLeft: test accuracy per granularity (bars: mean, whiskers: ±1 std when there are several "
               "seeds; dashed: dense). Right: theoretical speedup and the speedup left after channel removal."),
        ("code", r'''fig = Figure(figsize=(11, 4), layout="constrained")
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
show(fig, "granularity")'''),
        ("md", "## Where the weights go\nPer-layer density for each granularity, from the runs' `layers.csv`."),
        ("code", r'''chosen = runs.sort_values(["order", "seed"]).drop_duplicates("granularity")
tables = layer_tables(chosen, lambda r: r["granularity"])
if tables:
    layers = pd.concat([t.assign(granularity=k) for k, t in tables.items()])
    publish(layers[["granularity", "run_id", "layer", "params", "nonzero", "density", "flops", "flops_nonzero"]],
            "layers", floatfmt=".3g")
    show(density_figure(ba.plot_layer_density(tables, title="Weights kept per layer, by granularity")), "layer_density")
    for g, t in tables.items():
        cut = t[t["density"] < 1]
        finding(f"{g}: weights removed from " + ", ".join(f"{r['layer']} ({(1 - r['density']) * 100:.1f}%)"
                                                          for _, r in cut.iterrows())
                + f"; kept dense: {', '.join(t.loc[t['density'] >= 1, 'layer']) or 'none'}; the pruned layers hold "
                f"{cut['flops'].sum() / t['flops'].sum() * 100:.0f}% of the dense FLOPs.")'''),
        ("md", "## Measured CPU latency\nEach run timed its final model when it finished (`latency.enabled` in "
               "the sweep): the masked model as deployed (zeros baked in, dense kernels) and, where whole channels "
               "died, the copy Torch-Pruning compacted, interleaved, median of the repeats. The setting is logged "
               "with the figures. Absolute milliseconds depend on the machine and its load; the ratio is the robust "
               "figure."),
        ("code", r'''SETTING = ["latency_batch_size", "latency_threads", "latency_repeats", "latency_warmup"]
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
    publish(latency, "latency", floatfmt=".3g")
    where = ", ".join(f"{c.removeprefix('latency_').replace('_', ' ')} {int(v)}" for c, v in setting.iloc[0].items())
    device = ", ".join(sorted(set(runs.get("tags.benchkit.device", pd.Series(["?"])).astype(str))))
    for _, r in latency.iterrows():
        removed = r.get("after channel removal (ms)")
        finding(f"{r['granularity']}: measured latency {r['masked (ms)']:.2f} ms masked"
                + (f" → {removed:.2f} ms after channel removal ({r['latency speedup (×)']:.2f}×; FLOPs "
                   f"{r['FLOP speedup after removal (×)']:.2f}×)" if pd.notna(removed) else
                   " (no whole channel dead: nothing to remove)")
                + f"; {where}, device {device}.")
    base = latency["masked (ms)"]
    finding(f"The masked (dense-kernel) models of every granularity take {base.min():.2f}–{base.max():.2f} ms: "
            "zeros inside dense tensors buy no time on this CPU; only removed channels do.")
else:
    print("these runs were made without latency.enabled: no measured latency to show")'''),
    ],
)

TIMING = study(
    "05_timing.ipynb",
    "Timing: when to prune, at equal compression",
    sweep_intro(
        "LeNet-300-100 at 10×: pruned at initialisation (random, SNIP, SynFlow), gradually during training "
        "(AGP, Zhu & Gupta 2017), after training (one shot, or 3 rounds with fine-tuning), or as lottery tickets "
        "(5 levels of iterative pruning rewound to initialisation). The compute each costs differs: the "
        "`epochs` column counts the training epochs a run performs.", "timing"),
    "timing", "timing",
    [
        ("md", "## Runs"),
        ("code", r'''display(Markdown(ba.to_markdown(study_table := provenance(EXPERIMENT))))
ba.save_table(study_table, OUTPUT / "study.csv")
ba.save_table(study_table, OUTPUT / "study.md")
runs = ba.load_runs(EXPERIMENT, tracking_uri=TRACKING_URI)
axes = [c for c in ba.strategy_columns(runs) if runs[c].astype(str).nunique() > 1]


def label(r) -> str:
    """'pre · snip', 'post · magnitude · 3 rounds', 'lottery · magnitude · 5 levels'."""
    text = ba.describe_strategy({c: r[c] for c in axes if c != "prune.rounds"})
    if r["timing"] == "post" and r["prune.rounds"] > 1:
        text += f" · {r['prune.rounds']} rounds"
    if r["timing"] == "lottery":
        text += f" · {r['prune.lottery.levels']} levels"
    return text


runs["strategy"] = runs.apply(label, axis=1)


def epochs(r) -> float:
    """Training epochs the run performs (the dense network of `post` counted once)."""
    e = r["train.epochs"]
    if r["timing"] == "post":
        return e + r["prune.rounds"] * r["prune.finetune.epochs"]
    if r["timing"] == "lottery":
        return e * (r["prune.lottery.levels"] + 1) * (1 + len(r.get("prune.lottery.controls") or []))
    return e


runs["epochs"] = runs.apply(epochs, axis=1)
METRICS = [m for m in ("compression_ratio", "theoretical_speedup", "val_acc1", "test_acc1", "dense_test_acc1",
                       "epochs", "time_total_s") if m in runs]
ba.save_table(runs[["run_id", "strategy", *ba.strategy_columns(runs), "seed", *METRICS]], OUTPUT / "runs.csv")
print(f"{len(runs)} finished runs; strategies differ in {axes}; seeds {sorted(runs['seed'].unique().tolist())}")'''),
        ("md", "## Accuracy at equal compression\nMean ± std over seeds; `dense` is the network trained without "
               "pruning for the same epochs (logged by the timings that train one)."),
        ("code", r'''agg = ba.aggregate(runs, by=["strategy"], metrics=METRICS)
order = list(dict.fromkeys(runs["strategy"]))
agg = agg.set_index("strategy").loc[order].reset_index()
table = ba.summary_table(agg, ["compression_ratio", "test_acc1", "val_acc1"], by=["strategy"],
                         scale={"test_acc1": 100, "val_acc1": 100},
                         labels={"compression_ratio": "compression (×)", "test_acc1": "test top-1 (%)",
                                 "val_acc1": "val top-1 (%)"})
table["training epochs"] = agg["epochs_mean"].to_numpy()
if "time_total_s_mean" in agg:
    table["wall time per run (min)"] = (agg["time_total_s_mean"] / 60).round(2).to_numpy()
publish(table, "summary")
dense = runs.dropna(subset=["dense_test_acc1"]).groupby("seed")["dense_test_acc1"].mean() * 100
best = agg.loc[agg["test_acc1_mean"].idxmax()]
worst = agg.loc[agg["test_acc1_mean"].idxmin()]
finding(f"Dense reference (same training, no pruning): {dense.mean():.2f}% (mean over seeds {dense.index.tolist()}).")
for _, r in agg.iterrows():
    finding(f"{r['strategy']}: {r['test_acc1_mean'] * 100:.2f}"
            + (f" ± {r['test_acc1_std'] * 100:.2f}" if r["n"] > 1 else "")
            + f"% at {r['compression_ratio_mean']:.2f}× ({r['test_acc1_mean'] * 100 - dense.mean():+.2f} pp vs dense), "
            f"{r['epochs_mean']:g} training epochs.")
finding(f"Spread between strategies: {(best['test_acc1_mean'] - worst['test_acc1_mean']) * 100:.2f} pp "
        f"(best {best['strategy']}, worst {worst['strategy']}).")'''),
        ("md", "## Figure\nLeft: test accuracy per strategy (mean, ±1 std whiskers; dashed: dense). Right: the "
               "training epochs each strategy spends."),
        ("code", r'''fig = Figure(figsize=(12, 4.5), layout="constrained")
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
show(fig, "timing")'''),
        ("md", "## The AGP schedule, checked\nThe sparsity reached at every mask update of the `during` runs "
               "(logged per update) against Zhu & Gupta's formula s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(nΔt))³, "
               "computed here from the config."),
        ("code", r'''during = runs[runs["timing"] == "during"]
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
        schedule = (r["prune.schedule.initial_sparsity"], 1 - 1 / r["compression"], g["step"].min(), g["step"].max())
        rows.append(g.assign(formula=agp_sparsity(g["step"], *schedule)))
    agp = pd.concat(rows)[["run_id", "seed", "update", "step", "target_sparsity", "sparsity", "formula"]]
    ba.save_table(agp, OUTPUT / "agp.csv")
    dev = (agp["sparsity"] - agp["formula"]).abs().max()
    finding(f"AGP: over {agp['run_id'].nunique()} run(s) and {len(agp)} mask updates, the achieved sparsity is within "
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
    show(fig, "agp_schedule")'''),
    ],
)

NOTEBOOKS: list[Notebook] = [QUICKSTART, STRATEGIES, LOTTERY, ITERATIVE, GRANULARITY, TIMING]


def main() -> None:
    for nb in NOTEBOOKS:
        path = HERE / nb.filename
        nbformat.write(build(nb), path)
        print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
