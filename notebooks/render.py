"""Render the study notebooks against the committed store into results/<experiment>/.

    .venv/bin/python notebooks/render.py                       # every study
    .venv/bin/python notebooks/render.py strategies lottery    # some experiments

Each notebook runs top to bottom (nbclient, this interpreter as the kernel) with
``MLFLOW_TRACKING_URI`` at ``results/studies/mlflow.db`` (or the environment's), the experiment and
output folder set per study; its tables, figures and ``findings.md`` land in ``results/<experiment>/``,
and the executed notebook beside them as ``notebook.ipynb`` (outputs included, for reading on the web).
The fashion-lenet300 acceptance sweep has no notebook: its table is ``benchkit report`` on the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
STORE = f"sqlite:///{REPO / 'results' / 'studies' / 'mlflow.db'}"
# experiment -> the notebook that renders it
STUDIES = {
    "strategies": "01_strategies.ipynb",
    "strategies-lenet5": "01_strategies.ipynb",
    "lottery": "02_lottery.ipynb",
    "iterative": "03_iterative.ipynb",
    "granularity": "04_granularity.ipynb",
    "granularity-4x": "04_granularity.ipynb",
    "timing": "05_timing.ipynb",
}
KERNEL = "benchkit-render"


def kernel_specs(folder: Path) -> KernelSpecManager:
    (folder / KERNEL).mkdir(parents=True)
    (folder / KERNEL / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "benchkit render", "language": "python"}))
    return KernelSpecManager(kernel_dirs=[str(folder)])


def render(experiment: str, uri: str, specs: KernelSpecManager) -> Path:
    out = REPO / "results" / experiment
    out.mkdir(parents=True, exist_ok=True)
    path = REPO / "notebooks" / STUDIES[experiment]
    os.environ.update(MLFLOW_TRACKING_URI=uri, BENCHKIT_NOTEBOOK_EXPERIMENT=experiment,
                      BENCHKIT_NOTEBOOK_OUTPUT=str(out), MPLBACKEND="Agg")
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
    NotebookClient(nb, km=km, timeout=1800, resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, out / "notebook.ipynb")
    return out


def report(experiment: str, uri: str) -> Path:
    """A study without a notebook: its runs as `benchkit report` prints them, Markdown and CSV."""
    out = REPO / "results" / experiment
    out.mkdir(parents=True, exist_ok=True)
    columns = ("mlflow.runName,run_id,prune.compression,compression_ratio,theoretical_speedup,dense_val_acc1,dense_test_acc1,"
               "val_acc1,test_acc1,time_total_s")
    for fmt, name in (("markdown", "runs.md"), ("csv", "runs.csv")):
        text = subprocess.run([sys.executable, "-m", "benchkit.cli", "report", "-e", experiment, "--tracking-uri", uri,
                               "-c", columns, "--sort", "prune.compression", "--format", fmt],
                              check=True, capture_output=True, text=True).stdout
        (out / name).write_text(text)
    return out


def main(argv: list[str]) -> int:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or STORE
    chosen = argv or [*STUDIES, "fashion-lenet300"]
    unknown = [e for e in chosen if e not in STUDIES and e != "fashion-lenet300"]
    if unknown:
        print(f"unknown study {unknown}; known: {', '.join([*STUDIES, 'fashion-lenet300'])}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        specs = kernel_specs(Path(tmp))
        for experiment in chosen:
            out = report(experiment, uri) if experiment == "fashion-lenet300" else render(experiment, uri, specs)
            print(f"{experiment}: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
