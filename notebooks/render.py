"""Render notebooks: execute them top to bottom and keep their tables, figures, findings.md and the executed
notebook (``notebook.ipynb``, outputs included) in an output folder.

    .venv/bin/python notebooks/render.py                      # every study, committed store -> results/<study>/
                                                              # (studies not run yet are skipped, and named)
    .venv/bin/python notebooks/render.py strategies lottery   # some studies
    .venv/bin/python notebooks/render.py 01_strategies --tracking-uri sqlite:///mlflow.db --experiment my-sweep \\
        --out results/my-sweep                                # a notebook for your own sweep

The notebooks are jupytext percent-format scripts (``notebooks/NN_name.py``): edit them as Python, open them in
Jupyter through jupytext. Their controls are the first code cell's ``TRACKING_URI``, ``EXPERIMENT`` and
``OUTPUT``, read from ``MLFLOW_TRACKING_URI``, ``BENCHKIT_NOTEBOOK_EXPERIMENT`` and ``BENCHKIT_NOTEBOOK_OUTPUT``;
this script sets them for the kernel (this interpreter, through a kernelspec in a temporary folder) from its
options. ``--tracking-uri`` defaults to ``$MLFLOW_TRACKING_URI``, else the committed study store; ``--out`` to
``results/<experiment>``; a relative sqlite path or folder is taken from the current directory. The
fashion-lenet300 acceptance sweep has no notebook: its table is ``benchkit report`` on the store.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
STORE = f"sqlite:///{REPO / 'results' / 'studies' / 'mlflow.db'}"
# experiment -> the notebook that renders it
STUDIES = {
    "strategies": "01_strategies",
    "strategies-lenet5": "01_strategies",
    "lottery": "02_lottery",
    "iterative": "03_iterative",
    "granularity": "04_granularity",
    "granularity-4x": "04_granularity",
    "timing": "05_timing",
    "sparse-training": "06_sparse_training",
    "at-init-sanity": "07_at_init_sanity",
    "lm-pruning": "08_lm_pruning",
    "vit-pruning": "09_vit_pruning",
    "rethinking": "10_rethinking",
    "lm-heads": "11_lm_heads",
}
REPORT_ONLY = "fashion-lenet300"
KERNEL = "benchkit-render"


@dataclass
class Job:
    notebook: Path | None  # None: a study rendered by `benchkit report` alone
    experiment: str
    tracking_uri: str
    out: Path
    if_present: bool = False  # part of "every study": skipped (and said so) while the store holds no run of it

    def env(self) -> dict[str, str]:
        """The kernel's environment: the notebook's three controls set, figures drawn off-screen."""
        return {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri, "BENCHKIT_NOTEBOOK_EXPERIMENT": self.experiment,
                "BENCHKIT_NOTEBOOK_OUTPUT": str(self.out), "MPLBACKEND": "Agg"}


class UsageError(ValueError):
    pass


def notebooks() -> dict[str, Path]:
    """Notebook name (``01_strategies``) -> its source file."""
    return {p.stem: p for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))}


def absolute_uri(uri: str) -> str:
    """A relative sqlite path or store folder made absolute from the current directory (the kernel runs in
    notebooks/, where a relative path would point elsewhere). URIs of servers and absolute paths pass as they are."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return f"file:{Path(uri[len('file:'):]).resolve()}"
    if "://" not in uri and not uri.startswith("file:"):
        return str(Path(uri).resolve())
    return uri


def plan(argv: list[str]) -> list[Job]:
    """What to render for these command-line arguments (see the module docstring); bad input is refused with
    the allowed names before anything runs."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="notebooks/render.py")
    ap.add_argument("targets", nargs="*", metavar="STUDY_OR_NOTEBOOK",
                    help=f"a study ({', '.join([*STUDIES, REPORT_ONLY])}) or a notebook "
                         f"({', '.join(notebooks())}); default: every study")
    ap.add_argument("--tracking-uri", help="the MLflow store (default: $MLFLOW_TRACKING_URI, else the committed "
                                           "study store results/studies/mlflow.db)")
    ap.add_argument("--experiment", help="the MLflow experiment (the sweep's `experiment:` name); needed with a "
                                         "notebook name, optional with one study")
    ap.add_argument("--out", help="the output folder (default: results/<experiment>)")
    args = ap.parse_args(argv)
    targets = args.targets or [*STUDIES, REPORT_ONLY]
    known = notebooks()
    unknown = [t for t in targets if t not in STUDIES and t != REPORT_ONLY and t.removesuffix(".py") not in known]
    if unknown:
        raise UsageError(f"unknown study or notebook {unknown}; studies: {', '.join([*STUDIES, REPORT_ONLY])}; "
                         f"notebooks: {', '.join(known)}")
    if (args.experiment or args.out) and len(targets) != 1:
        raise UsageError("--experiment and --out name one rendering: give exactly one study or notebook with them")
    uri = absolute_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or STORE)
    jobs = []
    for target in targets:
        if target in STUDIES or target == REPORT_ONLY:
            notebook = known[STUDIES[target]] if target in STUDIES else None
            experiment = args.experiment or target
        else:
            notebook = known[target.removesuffix(".py")]
            if not args.experiment:
                raise UsageError(f"rendering the notebook {notebook.stem} needs --experiment (the sweep's "
                                 "`experiment:` name), e.g. --experiment my-sweep")
            experiment = args.experiment
        out = Path(args.out).resolve() if args.out else REPO / "results" / experiment
        jobs.append(Job(notebook, experiment, uri, out, if_present=not args.targets))
    return jobs


def kernel_specs(folder: Path):
    from jupyter_client.kernelspec import KernelSpecManager

    (folder / KERNEL).mkdir(parents=True, exist_ok=True)
    (folder / KERNEL / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "benchkit render", "language": "python"}))
    return KernelSpecManager(kernel_dirs=[str(folder)])


def read(path: Path):
    """The notebook of a percent-format script, cells numbered so renders differ only where outputs do."""
    import jupytext

    nb = jupytext.read(path, fmt="py:percent")
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"
    nb.metadata.pop("jupytext", None)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def render(job: Job, specs, timeout: int = 1800) -> Path:
    """Execute ``job.notebook`` with its controls set; the executed notebook goes to ``out/notebook.ipynb``."""
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    job.out.mkdir(parents=True, exist_ok=True)
    nb = read(job.notebook)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
    NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute(env=job.env())
    nbformat.write(nb, job.out / "notebook.ipynb")
    return job.out


def report(job: Job) -> Path:
    """A study without a notebook: its runs as `benchkit report` prints them, Markdown and CSV."""
    job.out.mkdir(parents=True, exist_ok=True)
    columns = ("mlflow.runName,run_id,prune.compression,compression_ratio,theoretical_speedup,dense_val_acc1,dense_test_acc1,"
               "val_acc1,test_acc1,time_total_s")
    for fmt, name in (("markdown", "runs.md"), ("csv", "runs.csv")):
        text = subprocess.run([sys.executable, "-m", "benchkit.cli", "report", "-e", job.experiment, "--tracking-uri",
                               job.tracking_uri, "-c", columns, "--sort", "prune.compression", "--format", fmt],
                              check=True, capture_output=True, text=True).stdout
        (job.out / name).write_text(text)
    return job.out


def has_runs(job: Job) -> bool:
    """Whether the store holds a FINISHED run of the job's experiment (a study set up but not run yet has none)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=job.tracking_uri)
    exp = client.get_experiment_by_name(job.experiment)
    return exp is not None and bool(client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                                       max_results=1))


def main(argv: list[str]) -> int:
    try:
        jobs = plan(argv)
    except UsageError as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        specs = kernel_specs(Path(tmp))
        for job in jobs:
            if job.if_present and not has_runs(job):
                print(f"{job.experiment}: skipped, no finished run in {job.tracking_uri} (run its sweep first)")
                continue
            out = render(job, specs) if job.notebook is not None else report(job)
            where = out.relative_to(REPO) if out.is_relative_to(REPO) else out
            print(f"{job.experiment}: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
