"""Every notebook (notebooks/NN_name.py, jupytext percent format) executes top to bottom through
notebooks/render.py, the command a user runs for their own sweep, against a small tracking store made here.

What a notebook reads is named in ``KIND`` below: ``sweep`` or ``lottery`` read a store written through
benchkit.tracking with invented numbers (tests/fake_runs.py), whose closed formulas are the expectations
here; a study kind (``granularity``, ``timing``, ``iterative``, ``sparse-training``, ``at-init-sanity``) reads a
tiny *real* sweep of that study's own YAML (experiments/<study>.yaml with overrides: digits or 28×28 synthetic
data, one or two epochs), run the first time a test needs it, so the notebook
meets exactly the metrics, levels and artifacts a real sweep writes. ``render.py NOTEBOOK --tracking-uri
--experiment --out`` points the notebook at the matching experiment and a temporary output folder, so
nothing is written to the repo.

The kernel is this interpreter (``sys.executable -m ipykernel_launcher``) through a kernelspec in a
temporary folder: whatever ``python`` happens to be first on PATH, or whichever ``python3``
kernelspec is installed, the notebook sees the same environment as the tests.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jupytext
import nbformat
import pandas as pd
import pytest
from fake_runs import COMPRESSIONS, DROP, LOTTERY, SWEEP, build_store, lottery_percent

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
FAKE_EXPERIMENTS = {"sweep": SWEEP, "lottery": LOTTERY}
# notebook -> the runs it is executed against
KIND = {"00_quickstart": "sweep", "01_strategies": "sweep", "02_lottery": "lottery", "03_iterative": "iterative",
        "04_granularity": "granularity", "05_timing": "timing", "06_sparse_training": "sparse-training",
        "07_at_init_sanity": "at-init-sanity", "08_lm_pruning": "lm-pruning", "09_vit_pruning": "vit-pruning",
        "10_rethinking": "rethinking", "11_lm_heads": "lm-heads"}

# Tiny real sweeps of the study YAMLs: the same grid, minutes of work cut to seconds.
SYNTHETIC_28 = ["data.name=synthetic", "data.input_shape=[1,28,28]", "data.num_samples=240", "data.val_size=60",
                "train.lr=0.01"]  # LeNet-5 needs 28×28 inputs; digits are 8×8
STUDY_SWEEPS: dict[str, list[str]] = {
    "granularity": [*SYNTHETIC_28, "train.epochs=1", "prune.post.finetune.epochs=1", "seed=0", "latency.repeats=3"],
    "timing": ["data.name=digits", "data.val_size=200", "train.epochs=1", "prune.post.finetune.epochs=1",
               "prune.lottery.levels=2", "prune.during.every=5", "prune.iterations=5", "seed=0"],
    "iterative": [*SYNTHETIC_28, "train.epochs=1", "prune.post.finetune.epochs=1", "seed=0"],
    # every arm at 90%, both allocations; 2 epochs of 3 steps: mask updates at steps 1, 2, 3 (T_end = round(0.75 · 6))
    "sparse-training": [*SYNTHETIC_28, "train.epochs=2", "prune.post.finetune.epochs=1", "prune.dynamic.delta_t=1",
                        "prune.during.every=1", "prune.sparsity=0.9", "seed=0"],
    # both sparsities for seed 0, then seed 1 at 90% (below): intervals where two seeds exist, a cell short of seeds
    "at-init-sanity": ["data.name=digits", "data.val_size=200", "train.epochs=1", "prune.lottery.levels=2",
                       "prune.iterations=5", "seed=0"],
    # a 2-block character GPT on three tiny works written by the store ({texts}); 49 runs, every table of the
    # notebook (OWL, the 300-step fine-tune) included
    "lm-pruning": ["data.root={texts}", "data.val_works=[b]", "data.test_works=[c]", "data.context=16",
                   "model.kwargs={n_layer: 2, n_embd: 16, n_head: 2, dropout: 0.0}", "train.iterations=20",
                   "train.eval_every=10", "train.batch_size=8", "prune.calibration.samples=8", "seed=0"],
    "vit-pruning": [*SYNTHETIC_28, "train.epochs=1", "prune.calibration.samples=16", "seed=0"],
    "rethinking": [*SYNTHETIC_28, "train.epochs=1", "prune.post.finetune.epochs=1", "seed=0"],
    # the same tiny GPT with 4 heads (75% of them leaves one), latency timed 3 times; 13 runs
    "lm-heads": ["data.root={texts}", "data.val_works=[b]", "data.test_works=[c]", "data.context=16",
                 "model.kwargs={n_layer: 2, n_embd: 16, n_head: 4, dropout: 0.0}", "train.iterations=20",
                 "train.eval_every=10", "train.batch_size=8", "latency.repeats=3", "seed=0"],
}
STUDY_MORE: dict[str, list[list[str]]] = {  # further sweeps of the same YAML into the same experiment
    "at-init-sanity": [["data.name=digits", "data.val_size=200", "train.epochs=1", "prune.lottery.levels=2",
                        "prune.iterations=5", "seed=1", "prune.sparsity=0.9"]],
}
STUDY_FILES = {"sparse-training": "sparse_training", "at-init-sanity": "at_init_sanity", "lm-pruning": "lm_pruning",
               "vit-pruning": "vit_pruning", "lm-heads": "lm_heads"}  # experiment -> YAML name
KINDS = {**FAKE_EXPERIMENTS, **{k: k for k in STUDY_SWEEPS}}


def load_render():
    spec = importlib.util.spec_from_file_location("render", NOTEBOOK_DIR / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["render"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


render = load_render()


@dataclass
class StudyStore:
    """One store for the tiny real sweeps of the study YAMLs, each run the first time a test needs it (10–30 s)."""

    root: Path
    finished: dict[str, int] = field(default_factory=dict)  # experiment → finished runs

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def ensure(self, study: str) -> StudyStore:
        from benchkit.analysis import load_runs
        from benchkit.cli import main

        if study not in self.finished:
            common = ["threads=1", "progress=false", f"output_dir={self.root / 'runs'}",
                      f"cache_dir={self.root / 'cache'}"]
            sweep = REPO / "experiments" / f"{STUDY_FILES.get(study, study)}.yaml"
            texts = write_texts(self.root / "texts")
            for overrides in [STUDY_SWEEPS[study], *STUDY_MORE.get(study, [])]:
                overrides = [o.replace("{texts}", str(texts)) for o in overrides]
                assert main(["sweep", str(sweep), *common, *overrides, "--no-plots", "--tracking-uri", self.uri]) == 0
            self.finished[study] = len(load_runs(study, tracking_uri=self.uri))
        return self


def write_texts(folder: Path) -> Path:
    """Three small 'works' for the text dataset: a (training), b (validation), c (test)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = {"a": ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
                   "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"],
             "b": ["Friends, Romans, countrymen, lend me your ears;", "I come to bury Caesar, not to praise him."],
             "c": ["Tomorrow, and tomorrow, and tomorrow,", "Creeps in this petty pace from day to day,"]}
    for stem, text in lines.items():
        (folder / f"{stem}.txt").write_text("\n".join(text * (30 if stem == "a" else 10)) + "\n")
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("notebook-store"))


@pytest.fixture(scope="module")
def study_store(tmp_path_factory) -> StudyStore:
    return StudyStore(tmp_path_factory.mktemp("study-store"))


def run_render(argv: list[str]) -> None:
    """notebooks/render.py as a user runs it (in this process: the kernel is still a separate process)."""
    assert render.main(argv) == 0


# --------------------------------------------------------------------------------------------- sources
def test_every_notebook_is_a_percent_script_with_its_controls_documented_first():
    assert [p.stem for p in NOTEBOOKS] == sorted(KIND), "a new notebook needs its runs named in KIND"
    assert not list(NOTEBOOK_DIR.glob("*.ipynb")), "notebooks/ holds the .py sources; render.py writes .ipynb files"
    for path in NOTEBOOKS:
        nb = jupytext.read(path, fmt="py:percent")
        nbformat.validate(nbformat.v4.upgrade(nb) if nb.nbformat < 4 else nb)
        intro, controls = nb.cells[0], nb.cells[1]
        assert intro.cell_type == "markdown" and intro.source.startswith("# ")
        for name, env in (("TRACKING_URI", "MLFLOW_TRACKING_URI"), ("EXPERIMENT", "BENCHKIT_NOTEBOOK_EXPERIMENT"),
                          ("OUTPUT", "BENCHKIT_NOTEBOOK_OUTPUT")):
            assert f"`{name}`" in intro.source and f"`{env}`" in intro.source, (path.name, name)
            assert re.search(rf"^{name} = .*{env}", controls.source, re.M), (path.name, name)
        command = f"notebooks/render.py {path.stem} --tracking-uri sqlite:///mlflow.db --experiment my-sweep"
        assert command in intro.source, path.name
        assert jupytext.writes(nb, fmt="py:percent") == path.read_text(), f"{path.name}: not in canonical percent form"


def test_render_plans_studies_and_notebooks_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (job,) = render.plan(["strategies"])
    assert (job.notebook.name, job.experiment, job.tracking_uri, job.out) == (
        "01_strategies.py", "strategies", render.STORE, REPO / "results" / "strategies")
    every = render.plan([])
    assert [j.experiment for j in every] == [*render.STUDIES, "fashion-lenet300"] and every[-1].notebook is None
    monkeypatch.chdir(tmp_path)  # relative store and output: from where the command runs, not notebooks/
    (job,) = render.plan(["01_strategies", "--tracking-uri", "sqlite:///mlflow.db", "--experiment", "my-sweep",
                          "--out", "results/my-sweep"])
    assert (job.notebook.stem, job.experiment) == ("01_strategies", "my-sweep")
    assert job.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and job.out == tmp_path / "results" / "my-sweep"
    env = job.env()
    assert (env["MLFLOW_TRACKING_URI"], env["BENCHKIT_NOTEBOOK_EXPERIMENT"], env["BENCHKIT_NOTEBOOK_OUTPUT"]) == (
        job.tracking_uri, "my-sweep", str(job.out))
    assert render.absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert render.absolute_uri("mlruns") == str(tmp_path / "mlruns")


@pytest.mark.parametrize("argv, message", [
    (["nope"], r"unknown study or notebook \['nope'\]; studies: strategies, .*notebooks: 00_quickstart"),
    (["01_strategies"], r"01_strategies needs --experiment"),
    (["strategies", "lottery", "--out", "x"], r"exactly one study or notebook"),
])
def test_render_refuses_bad_arguments_before_running_anything(argv, message, capsys):
    with pytest.raises(render.UsageError, match=message):
        render.plan(argv)
    assert render.main(argv) == 2 and "render.py:" in capsys.readouterr().err


def test_render_of_every_study_skips_the_studies_not_run_yet(store, capsys):
    """`render.py` alone renders every study of the store; a study set up but not run yet is named and skipped
    (the fake store holds none of the studies), while a study named on the command line is always attempted."""
    assert render.main(["--tracking-uri", store.uri]) == 0
    out = capsys.readouterr().out
    for study in [*render.STUDIES, render.REPORT_ONLY]:
        assert f"{study}: skipped, no finished run in {store.uri} (run its sweep first)" in out
    assert all(job.if_present for job in render.plan(["--tracking-uri", store.uri]))
    assert not render.plan(["lm-pruning", "--tracking-uri", store.uri])[0].if_present


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_renders_for_a_sweep(path, request, tmp_path, monkeypatch):
    kind = KIND[path.stem]
    store = request.getfixturevalue("store") if kind in FAKE_EXPERIMENTS else \
        request.getfixturevalue("study_store").ensure(kind)
    out = tmp_path / "out"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_render([path.stem, "--tracking-uri", store.uri, "--experiment", KINDS[kind], "--out", str(out)])
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the controls went to the kernel, not to this process
    nb = nbformat.read(out / "notebook.ipynb", as_version=4)  # the executed notebook, beside its outputs

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    saved = sorted(p.name for p in out.glob("*.png"))
    assert images and len(images) == len(saved), (len(images), saved)
    assert store.uri in "".join(o.get("text", "") for o in outputs)  # it read the store it was given
    if path.stem == "00_quickstart":
        assert {"summary.csv", "summary.md", "tradeoff.png", "layer_density.png", "training_curves.png"} <= {
            p.name for p in out.iterdir()}
        assert "±" in (out / "summary.md").read_text()
    else:
        produced = {p.name for p in out.iterdir()}
        assert {"study.csv", "study.md", "findings.md"} <= produced, produced
        study = pd.read_csv(out / "study.csv")
        assert study.loc[0, "experiment"] == KINDS[kind]
        assert f"Computed by `notebooks/{path.name}` from `{store.uri}`" in (out / "findings.md").read_text()
        CHECKS[path.stem[:2]](out, store)


# Independent expectations per study notebook: fake_runs' closed formulas, or what the tiny sweep's
# config forces whatever the training did (a compression, a 2:4 pattern, a published schedule).
def check_strategies(out: Path, store) -> None:
    study = pd.read_csv(out / "study.csv").iloc[0]
    assert (study["finished"], study["failed"], study["unfinished"]) == (18, 1, 1)
    assert "PARTIAL" in (out / "findings.md").read_text()  # the fake store holds a RUNNING run
    gap = pd.read_csv(out / "global_vs_uniform.csv")  # the fake store logged `prune.scope`: read as allocation
    assert list(gap["criterion"]) == ["magnitude"] * len(COMPRESSIONS)  # random has no uniform runs
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
    uniform = layers[layers["allocation"] == "uniform"]  # the sweep logged scope=layer
    assert (uniform["density"] - 1 / 12).abs().max() < 0.01  # the same 12× in every layer
    assert layers.groupby(["model", "allocation"]).apply(lambda g: g["params"].sum() / g["nonzero"].sum()).to_numpy() \
        == pytest.approx(12, rel=1e-3)
    han = layers.dropna(subset=["Han et al. density"])
    assert set(han["layer"]) == {"fc1", "fc2", "fc3", "conv1", "conv2"}
    rounds = pd.read_csv(out / "rounds.csv")
    assert sorted(set(rounds["round"])) == [1, 2, 3, 4]
    assert rounds[rounds["round"] == 4]["percent_remaining_mean"].to_numpy() == pytest.approx(100 / 12, rel=1e-3)


def check_granularity(out: Path, store) -> None:
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["granularity"]) == ["element", "2:4", "vector", "kernel", "channel"]
    # 2x of the pruned set; channel keeps the output layer's 10 classes whole (1% of the weights), so it is
    # a little under 2x over every prunable layer
    assert summary["compression (×)"].to_numpy() == pytest.approx(2, rel=0.02)
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


def check_sparse_training(out: Path, store) -> None:
    assert len(pd.read_csv(out / "runs.csv")) == store.finished["sparse-training"] == 20  # 2 models × 5 arms × 2
    coverage = pd.read_csv(out / "coverage.csv")
    assert len(coverage) == 4 and (coverage[["static", "SET", "RigL", "AGP", "post"]] == 1).all().all()
    accuracy = pd.read_csv(out / "accuracy.csv")
    assert list(accuracy.columns[3:8]) == ["static", "SET", "RigL", "AGP", "post"] and len(accuracy) == 4
    updates = pd.read_csv(out / "updates.csv")
    # 180 training samples in batches of 60, 2 epochs: T = 6 steps, T_end = round(0.75 · 6) = 4, ΔT = 1
    t_end = round(0.75 * 6)
    assert updates.groupby("run_id")["step"].apply(list).tolist() == [[1, 2, 3]] * 8  # SET and RigL runs
    expected = [0.3 * 0.5 * (1 + math.cos(math.pi * t / t_end)) for t in updates["step"]]  # RigL's cosine decay
    assert updates["drop_fraction"].to_numpy() == pytest.approx(expected, abs=1e-12)
    assert (updates["sparsity"] - 0.9).abs().max() < 1e-5 and (updates["regrown"] <= updates["dropped"]).all()
    flops = pd.read_csv(out / "flops.csv").set_index("model")
    # an all-Linear network's FLOPs are its weights: ERK moves density between layers at no FLOP cost; LeNet-5's
    # convolutions reuse each weight over many positions, and ERK keeps conv1 (few weights) denser
    assert flops.loc["lenet300", "uniform / ERK FLOPs"] == pytest.approx(1.0, abs=1e-3)
    assert flops.loc["lenet5", "uniform / ERK FLOPs"] > 1.2
    assert set(pd.read_csv(out / "differences.csv")["verdict"]) == {"one seed"}  # one seed: no interval
    assert {"accuracy.png", "updates.png", "regrown_alive.csv"} <= {p.name for p in out.iterdir()}


def check_at_init_sanity(out: Path, store) -> None:
    assert len(pd.read_csv(out / "runs.csv")) == store.finished["at-init-sanity"] == 18  # 12 for seed 0, 6 for seed 1
    branches = pd.read_csv(out / "branches.csv")
    pre = branches[branches["timing"] == "pre"]
    assert set(pre["branch"]) == {"main", "shuffle", "reinit", "invert", "random"}
    # every control keeps the run's share of the weights
    assert (pre["percent_remaining"] - (100 - pre["sparsity (%)"])).abs().max() < 1e-9
    controls = pd.read_csv(out / "controls.csv")
    assert controls.groupby("sparsity (%)")["seeds"].apply(list).to_dict() == {90.0: [2] * 5, 98.0: [1] * 5}
    diffs = pd.read_csv(out / "differences.csv")
    assert set(diffs.loc[diffs["sparsity (%)"] == 98.0, "verdict"]) == {"one seed"}
    assert set(diffs.loc[diffs["sparsity (%)"] == 90.0, "verdict"]) <= {"within noise", "lower", "higher"}
    # paired by seed: the mean over seeds of (control − run), from the branch rows
    acc = pre.pivot_table(index=["criterion", "sparsity (%)", "seed"], columns="branch", values="test_acc1")
    for _, r in diffs.iterrows():
        per_seed = acc.loc[(r["criterion"], r["sparsity (%)"])]
        assert r["control − run (pp)"] == pytest.approx(100 * (per_seed[r["control"]] - per_seed["main"]).mean())
    lottery = pd.read_csv(out / "lottery.csv")
    # the lottery's rate comes from the run's sparsity: 1 − (1 − s)^(1/levels), so level k keeps (1 − s)^(k/2)
    for _, r in lottery.iterrows():
        assert r["weights remaining (%)"] == pytest.approx(100 * (1 - r["sparsity (%)"] / 100) ** (r["level"] / 2), abs=0.01)
    assert "INCOMPLETE" in (out / "findings.md").read_text()  # 98% has seed 0 only
    assert {"controls.png", "accuracy.png", "lottery.png", "layer_density.png"} <= {p.name for p in out.iterdir()}


def check_lm_pruning(out: Path, store) -> None:
    methods = ["dense", "magnitude (per layer)", "magnitude (per row)", "Wanda", "SparseGPT"]
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == store.finished["lm-pruning"] == 49  # dense, 4 methods x (4 x 2 allocations + 2 N:M) + 8 tuned
    for name in ("perplexity", "bpc"):  # Wanda's Table 2: methods x (50%, 4:8, 2:4, 60-80%), dense on top
        table = pd.read_csv(out / f"{name}.csv", keep_default_na=False, dtype=str)  # cells are text: "mean ± std"
        assert list(table.columns) == ["method", "50%", "4:8", "2:4", "60%", "70%", "80%", "n"]
        assert list(table["method"]) == methods and (table["n"] == "1").all()
        dense = runs[runs["method"] == "dense"]["test_perplexity" if name == "perplexity" else "test_bpc"].iloc[0]
        assert table.iloc[0]["50%"] == f"{dense:.{2 if name == 'perplexity' else 3}f}"  # one seed: no ± std
        assert (table.iloc[0, 2:7] == "").all()
    owl = pd.read_csv(out / "perplexity_owl.csv", keep_default_na=False)
    assert list(owl.columns) == ["method", "50%", "60%", "70%", "80%", "n"]  # N:M leaves OWL nothing to allocate
    tuned = pd.read_csv(out / "finetune_vs_oneshot.csv")
    assert sorted(set(tuned["pattern"])) == ["2:4", "50%"] and len(tuned) == 8
    # the papers' LLaMA-7B numbers (Wanda, Table 2) relative to their dense 5.68
    paper = pd.read_csv(out / "beside_wanda.csv").set_index("method")
    assert paper.loc["magnitude (per layer)", "2:4 LLaMA-7B (×dense)"] == pytest.approx(42.13 / 5.68)
    assert paper.loc["Wanda", "50% LLaMA-7B (×dense)"] == pytest.approx(7.26 / 5.68)
    assert paper.loc["SparseGPT", "4:8 LLaMA-7B (×dense)"] == pytest.approx(8.61 / 5.68)
    # Wanda keeps int((1 - s) * columns) per row, rounding the pruned count down (its code's `int(W.shape[1] * s)`)
    layers = pd.read_csv(out / "layers.csv")
    uniform = layers[layers["strategy"].str.contains("uniform")].set_index("layer")
    assert uniform.loc["lm_head", "density"] == 1.0  # excluded, as both papers
    for layer, r in uniform.drop(index="lm_head").iterrows():
        fan_in = 64 if layer.endswith("mlp.proj") else 16  # width 16, MLP ratio 4
        assert r["density"] == pytest.approx((fan_in - int(fan_in * 0.8)) / fan_in), layer
    assert {"perplexity_vs_sparsity.png", "layer_density.png"} <= {p.name for p in out.iterdir()}


def check_vit_pruning(out: Path, store) -> None:
    table = pd.read_csv(out / "accuracy.csv", keep_default_na=False)
    assert list(table.columns) == ["method", "50%", "2:4", "70%", "n"]
    assert list(table["method"]) == ["dense", "magnitude (per layer)", "magnitude (per row)", "Wanda", "SparseGPT"]
    assert len(pd.read_csv(out / "runs.csv")) == store.finished["vit-pruning"] == 13
    diffs = pd.read_csv(out / "paired_differences.csv")
    # an N:M group lies inside one output row, so comparing per layer or per row chooses the same 2:4 mask
    same = diffs[(diffs["comparison"] == "magnitude (per row) − magnitude (per layer)") & (diffs["pattern"] == "2:4")]
    assert same["a − b (pp)"].tolist() == [0.0]
    assert set(diffs["n"]) == {1} and not diffs["distinguishable"].any()  # one seed: no interval, nothing told apart


def check_rethinking(out: Path, store) -> None:
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == store.finished["rethinking"] == 6  # lenet5, vgg_small x 2, 4, 8
    assert summary["fine-tuned epochs"].tolist() == [2] * 6  # 1 training + 1 fine-tuning epoch
    assert summary["Scratch-E epochs"].tolist() == [1] * 6  # the dense network's epochs
    # Scratch-B: int(epochs x min(dense/pruned FLOPs, cap 2)); every pruned net here saves more than 2x FLOPs
    assert (summary["FLOPs ratio (×)"] > 2).all() and summary["Scratch-B epochs"].tolist() == [2] * 6
    # the requested share of the prunable weights, a little more where the output layer keeps its 10 classes whole
    kept, asked = summary["weights kept (%)"], 100 / summary["compression (×)"]
    assert (kept >= asked - 1e-9).all() and (kept <= asked * 1.1).all()
    branches = pd.read_csv(out / "branches_long.csv")
    assert sorted(set(branches["branch"])) == ["Scratch-B", "Scratch-E", "dense", "fine-tuned"]
    assert len(branches) == 6 * 4
    diffs = pd.read_csv(out / "paired_differences.csv")
    assert len(diffs) == 2 * 3 * 3 and set(diffs["n"]) == {1}
    wide = branches.pivot_table(index=["model", "compression"], columns="branch", values="test_acc1")
    mine = diffs[diffs["comparison"] == "Scratch-B − fine-tuned"].set_index(["model", "compression (×)"])["a − b (pp)"]
    assert mine.to_numpy() == pytest.approx(((wide["Scratch-B"] - wide["fine-tuned"]) * 100).to_numpy())


def check_lm_heads(out: Path, store) -> None:
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == store.finished["lm-heads"] == 13  # dense, (heads, neurons) x 25/50/75% x (one shot, tuned)
    table = pd.read_csv(out / "perplexity.csv", keep_default_na=False, dtype=str)
    assert list(table.columns) == ["arm", "0%", "25%", "50%", "75%", "n"]
    assert list(table["arm"]) == ["dense", "heads, one shot", "heads, fine-tuned 300 steps", "MLP neurons, one shot",
                                  "MLP neurons, fine-tuned 300 steps"]
    speed = pd.read_csv(out / "size_speed.csv").set_index(["units", "removed"])
    # width 16, 4 heads of 4, MLP 64, 2 blocks, 7744 parameters: compaction removes what the masks select. k heads
    # of a block: q/k/v/out lose 16 x 4k weights each, q/k/v 4k biases; k quarters of the neurons: 16k fc rows
    # (16 weights and a bias each) and 16k proj columns (16 weights each)
    for k, removed in ((1, 25), (2, 50), (3, 75)):
        gone = {"heads": 2 * (4 * 16 * 4 * k + 3 * 4 * k), "MLP neurons": 2 * (16 * k * (16 + 1) + 16 * k * 16)}
        for unit, n in gone.items():
            assert speed.loc[(unit, removed), "params kept (%)"] == pytest.approx(100 * (7744 - n) / 7744), unit
    # the measured speedup is the ratio of the two logged latencies of each run
    one = runs[(runs["arm"] == "heads, one shot") & (runs["removed"] == 50)].iloc[0]
    assert speed.loc[("heads", 50), "measured (×)"] == pytest.approx(one["latency_ms"] / one["latency_compacted_ms"])
    diffs = pd.read_csv(out / "paired_differences.csv")
    assert set(diffs["n"]) == {1} and not diffs["distinguishable"].any()  # one seed: nothing told apart
    assert len(diffs) == 2 * 2 + 2 * 3  # two steps of removal and three fine-tuning pairs, per kind of unit
    assert "heads_neurons.png" in {p.name for p in out.iterdir()}


CHECKS = {"01": check_strategies, "02": check_lottery, "03": check_iterative, "04": check_granularity,
          "05": check_timing, "06": check_sparse_training, "07": check_at_init_sanity, "08": check_lm_pruning,
          "09": check_vit_pruning, "10": check_rethinking, "11": check_lm_heads}


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
def test_quickstart_notebook_on_a_real_digits_sweep(tmp_path, monkeypatch):
    """End to end: `benchkit sweep` writes real runs, render.py renders the notebook for them (about 30 s)."""
    from benchkit.cli import main

    sweep, out = tmp_path / "tiny.yaml", tmp_path / "out"
    sweep.write_text(TINY_SWEEP)
    monkeypatch.chdir(tmp_path)  # a relative store, as the README's command gives it
    assert main(["sweep", str(sweep), "--tracking-uri", "sqlite:///mlflow.db"]) == 0
    run_render(["00_quickstart", "--tracking-uri", "sqlite:///mlflow.db", "--experiment", "tiny-digits", "--out", "out"])
    table = (out / "summary.md").read_text().splitlines()
    assert len(table) == 2 + 2 * 2  # header, rule, criterion × compression
    assert all(line.rstrip().endswith("2 |") for line in table[2:])  # n = 2 seeds per strategy
