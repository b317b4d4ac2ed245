"""Every notebooks/*.ipynb executes top to bottom against a small tracking store made here.

A notebook names what it reads in its metadata (``benchkit.runs``, set by notebooks/_make_notebooks.py):
``sweep`` or ``lottery`` read a store written through benchkit.tracking with invented numbers
(tests/fake_runs.py), whose closed formulas are the expectations here; a study kind (``granularity``,
``timing``, ``iterative``) reads a tiny *real* sweep of that study's own YAML (experiments/<study>.yaml
with overrides: digits or 28×28 synthetic data, one epoch), so the notebook meets exactly the metrics,
levels and artifacts a real sweep writes. The test points ``MLFLOW_TRACKING_URI`` /
``BENCHKIT_NOTEBOOK_EXPERIMENT`` at the matching experiment and ``BENCHKIT_NOTEBOOK_OUTPUT`` at a
temporary folder, so nothing is written to the repo.

The kernel is this interpreter (``sys.executable -m ipykernel_launcher``) through a kernelspec in a
temporary folder: whatever ``python`` happens to be first on PATH, or whichever ``python3``
kernelspec is installed, the notebook sees the same environment as the tests.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from fake_runs import COMPRESSIONS, DROP, LOTTERY, SWEEP, build_store, lottery_percent
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
FAKE_EXPERIMENTS = {"sweep": SWEEP, "lottery": LOTTERY}
KERNEL = "benchkit-test-python"

# Tiny real sweeps of the study YAMLs: the same grid, minutes of work cut to seconds.
SYNTHETIC_28 = ["data.name=synthetic", "data.input_shape=[1,28,28]", "data.num_samples=240", "data.val_size=60",
                "train.lr=0.01"]  # LeNet-5 needs 28×28 inputs; digits are 8×8
STUDY_SWEEPS: dict[str, list[str]] = {
    "granularity": [*SYNTHETIC_28, "train.epochs=1", "prune.post.finetune.epochs=1", "seed=0", "latency.repeats=3"],
    "timing": ["data.name=digits", "data.val_size=200", "train.epochs=1", "prune.post.finetune.epochs=1",
               "prune.lottery.levels=2", "prune.during.every=5", "prune.iterations=5", "seed=0"],
    "iterative": [*SYNTHETIC_28, "train.epochs=1", "prune.post.finetune.epochs=1", "seed=0"],
}
KINDS = {**FAKE_EXPERIMENTS, **{k: k for k in STUDY_SWEEPS}}


@dataclass
class StudyStore:
    uri: str
    finished: dict[str, int]  # experiment → finished runs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("notebook-store"))


@pytest.fixture(scope="module")
def study_store(tmp_path_factory) -> StudyStore:
    """One store holding a tiny real sweep of each study YAML (about 30 s in all)."""
    from benchkit.analysis import load_runs
    from benchkit.cli import main

    root = tmp_path_factory.mktemp("study-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = ["threads=1", "progress=false", f"output_dir={root / 'runs'}", f"cache_dir={root / 'cache'}"]
    for study, overrides in STUDY_SWEEPS.items():
        assert main(["sweep", str(REPO / "experiments" / f"{study}.yaml"), *common, *overrides,
                     "--no-plots", "--tracking-uri", uri]) == 0, study
    return StudyStore(uri, {s: len(load_runs(s, tracking_uri=uri)) for s in STUDY_SWEEPS})


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
        assert nb.metadata.get("benchkit", {}).get("runs") in KINDS, \
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
def test_notebook_executes(path, request, kernel_specs, tmp_path, monkeypatch):
    kind = nbformat.read(path, as_version=4).metadata["benchkit"]["runs"]
    store = request.getfixturevalue("store" if kind in FAKE_EXPERIMENTS else "study_store")
    out = tmp_path / "out"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.setenv("BENCHKIT_NOTEBOOK_EXPERIMENT", KINDS[kind])
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
    if path.name[:2] in {"01", "02", "03", "04", "05"}:
        produced = {p.name for p in out.iterdir()}
        assert {"study.csv", "study.md", "findings.md"} <= produced, produced
        study = pd.read_csv(out / "study.csv")
        assert study.loc[0, "experiment"] == KINDS[kind]
        CHECKS[path.name[:2]](out, store)


# Independent expectations per study notebook: fake_runs' closed formulas, or what the tiny sweep's
# config forces whatever the training did (a compression, a 2:4 pattern, a published schedule).
def check_strategies(out: Path, store) -> None:
    study = pd.read_csv(out / "study.csv").iloc[0]
    assert (study["finished"], study["failed"], study["unfinished"]) == (18, 1, 1)
    assert "PARTIAL" in (out / "findings.md").read_text()  # the fake store holds a RUNNING run
    gap = pd.read_csv(out / "global_vs_layer.csv")
    assert list(gap["criterion"]) == ["magnitude"] * len(COMPRESSIONS)  # random has no layer-wise runs
    drop = DROP[("magnitude", "layer")] - DROP[("magnitude", "global")]
    for _, row in gap.iterrows():  # paired by seed, so the seed offsets cancel exactly
        assert row["mean (pp)"] == pytest.approx(100 * drop * math.log2(row["compression (×)"]))
    assert {"tradeoff.png", "layer_density.png", "accuracy.md", "runs.csv"} <= {p.name for p in out.iterdir()}


def check_lottery(out: Path, store) -> None:
    levels = pd.read_csv(out / "levels.csv")
    assert list(levels["level"]) == list(range(len(levels)))
    assert levels["weights remaining (%)"].tolist() == pytest.approx([lottery_percent(k) for k in levels["level"]])
    assert "Frankle & Carbin formula (%)" not in levels  # the fake schedule (0.8ⁿ) is not the paper's
    assert {"lottery.png", "layer_density.png", "curves.png"} <= {p.name for p in out.iterdir()}


def check_iterative(out: Path, store) -> None:
    assert len(pd.read_csv(out / "runs.csv")) == store.finished["iterative"] == 4
    layers = pd.read_csv(out / "layers.csv")
    layer = layers[layers["scope"] == "layer"]
    assert (layer["density"] - 1 / 12).abs().max() < 0.01  # the same 12× in every layer
    assert layers.groupby(["model", "scope"]).apply(lambda g: g["params"].sum() / g["nonzero"].sum()).to_numpy() \
        == pytest.approx(12, rel=1e-3)
    han = layers.dropna(subset=["Han et al. density"])
    assert set(han["layer"]) == {"fc1", "fc2", "fc3", "conv1", "conv2"}
    rounds = pd.read_csv(out / "rounds.csv")
    assert sorted(set(rounds["round"])) == [1, 2, 3, 4]
    assert rounds[rounds["round"] == 4]["percent_remaining_mean"].to_numpy() == pytest.approx(100 / 12, rel=1e-3)


def check_granularity(out: Path, store) -> None:
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["granularity"]) == ["element", "2:4", "vector", "kernel", "channel"]
    assert summary["compression (×)"].to_numpy() == pytest.approx(2, rel=0.01)
    layers = pd.read_csv(out / "layers.csv")
    nm = layers[layers["granularity"] == "2:4"].set_index("layer")["density"]
    assert nm["conv1"] == 1.0 and (nm.drop("conv1") == 0.5).all()  # excluded; exactly 2 of every 4
    assert summary.set_index("granularity").loc["channel", "speedup after channel removal (×)"] > 1
    latency = pd.read_csv(out / "latency.csv").set_index("granularity")  # timed by the runs, logged with them
    assert list(latency.index) == list(summary["granularity"]) and (latency["masked (ms)"] > 0).all()
    assert latency["after channel removal (ms)"].notna().tolist() == [False, False, False, False, True]
    assert "batch size 100, threads 1, repeats 3" in (out / "findings.md").read_text()


def check_timing(out: Path, store) -> None:
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == store.finished["timing"] == 7  # one seed pinned: one run per strategy
    assert summary["training epochs"].tolist() == [1, 1, 1, 1, 2, 4, 3]  # post: +1 per round; lottery: 2 levels + dense
    agp = pd.read_csv(out / "agp.csv")
    assert agp["sparsity"].iloc[-1] == pytest.approx(0.9, abs=1e-4)  # 10× reached at the end of the schedule
    assert (agp["sparsity"] - agp["formula"]).abs().max() < 1e-3


CHECKS = {"01": check_strategies, "02": check_lottery, "03": check_iterative, "04": check_granularity,
          "05": check_timing}


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
