"""Every notebooks/*.ipynb executes top to bottom against a small tracking store made here.

The store is written through benchkit.tracking (tests/fake_runs.py). A notebook names what it reads
in its metadata (``benchkit.runs``: ``sweep`` or ``lottery``, set by notebooks/_make_notebooks.py);
the test points ``MLFLOW_TRACKING_URI`` / ``BENCHKIT_NOTEBOOK_EXPERIMENT`` at the matching fake
experiment and ``BENCHKIT_NOTEBOOK_OUTPUT`` at a temporary folder, so nothing is written to the repo.

The kernel is this interpreter (``sys.executable -m ipykernel_launcher``) through a kernelspec in a
temporary folder: whatever ``python`` happens to be first on PATH, or whichever ``python3``
kernelspec is installed, the notebook sees the same environment as the tests.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nbformat
import pytest
from fake_runs import LOTTERY, SWEEP, build_store
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
FAKE_EXPERIMENTS = {"sweep": SWEEP, "lottery": LOTTERY}
KERNEL = "benchkit-test-python"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("notebook-store"))


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    kernels = tmp_path_factory.mktemp("kernels")
    (kernels / KERNEL).mkdir()
    (kernels / KERNEL / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "benchkit tests", "language": "python",
    }))
    return KernelSpecManager(kernel_dirs=[str(kernels)])


def execute(path: Path, specs: KernelSpecManager, timeout: int = 300) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
    NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def test_there_are_notebooks_and_they_are_generated():
    assert NOTEBOOK_DIR / "00_quickstart.ipynb" in NOTEBOOKS
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.get("benchkit", {}).get("runs") in FAKE_EXPERIMENTS, \
            f"{path.name}: write it with notebooks/_make_notebooks.py (metadata.benchkit.runs names its runs)"
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
            f"{path.name} is committed with outputs; regenerate it with notebooks/_make_notebooks.py"


def test_generator_reproduces_the_committed_notebooks(monkeypatch):
    """The .ipynb files are build products of _make_notebooks.py: a hand edit is caught here."""
    spec = importlib.util.spec_from_file_location("_make_notebooks", NOTEBOOK_DIR / "_make_notebooks.py")
    make = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "_make_notebooks", make)  # dataclasses look their module up there
    spec.loader.exec_module(make)
    assert make.NOTEBOOKS
    for nb in make.NOTEBOOKS:
        committed = (NOTEBOOK_DIR / nb.filename).read_text()
        assert nbformat.writes(make.build(nb)).rstrip("\n") == committed.rstrip("\n"), \
            f"{nb.filename} differs from what _make_notebooks.py writes; run it and commit the result"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, store, kernel_specs, tmp_path, monkeypatch):
    kind = nbformat.read(path, as_version=4).metadata["benchkit"]["runs"]
    out = tmp_path / "out"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.setenv("BENCHKIT_NOTEBOOK_EXPERIMENT", FAKE_EXPERIMENTS[kind])
    monkeypatch.setenv("BENCHKIT_NOTEBOOK_OUTPUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = execute(path, kernel_specs)  # raises CellExecutionError, with the cell and traceback, on any error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    saved = sorted(p.name for p in out.glob("*.png"))
    assert images and len(images) == len(saved), (len(images), saved)
    assert store.uri in "".join(o.get("text", "") for o in outputs)  # it read the store it was given
    if path.name == "00_quickstart.ipynb":
        assert {"summary.csv", "summary.md", "tradeoff.png", "layer_density.png", "training_curves.png"} <= {
            p.name for p in out.iterdir()}
        assert "±" in (out / "summary.md").read_text()


TINY_SWEEP = """
experiment: tiny-digits
base:
  data: {name: digits, train_subset: 400}
  model: {name: lenet300}
  threads: 1
  progress: false
  train: {lr: 0.05, batch_size: 64, epochs: 2}
  prune: {timing: post, finetune: {epochs: 1, lr: 0.005}}
grid:
  prune.criterion: [magnitude, random]
  prune.compression: [2, 8]
  seed: [0, 1]
"""


@pytest.mark.slow
def test_quickstart_notebook_on_a_real_digits_sweep(kernel_specs, tmp_path, monkeypatch):
    """End to end: `benchkit sweep` writes real runs, the notebook reads them back (about 30 s)."""
    from benchkit.cli import main

    sweep, uri, out = tmp_path / "tiny.yaml", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "out"
    sweep.write_text(TINY_SWEEP)
    assert main(["sweep", str(sweep), "--tracking-uri", uri]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("BENCHKIT_NOTEBOOK_EXPERIMENT", "tiny-digits")
    monkeypatch.setenv("BENCHKIT_NOTEBOOK_OUTPUT", str(out))
    execute(NOTEBOOK_DIR / "00_quickstart.ipynb", kernel_specs)
    table = (out / "summary.md").read_text().splitlines()
    assert len(table) == 2 + 2 * 2  # header, rule, criterion × compression
    assert all(line.rstrip().endswith("2 |") for line in table[2:])  # n = 2 seeds per strategy
