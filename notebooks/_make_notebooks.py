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
    runs: str = "sweep"  # what the notebook reads, for tests/test_notebooks.py: "sweep" | "lottery"


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

NOTEBOOKS: list[Notebook] = [QUICKSTART]


def main() -> None:
    for nb in NOTEBOOKS:
        path = HERE / nb.filename
        nbformat.write(build(nb), path)
        print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
