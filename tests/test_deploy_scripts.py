"""The deploy benchmark, the GPU check and the theory-vs-practice study still run end to end (tiny sizes;
no timing is asserted: the figures need a quiet machine and are the coordinator's to measure)."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_deploy_benchmark_quick_prints_the_three_tables(tmp_path):
    r = run("benchmarks/bench_deploy.py", "--quick", "--out", str(tmp_path / "bench.md"))
    assert r.returncode == 0, r.stderr[-3000:]
    text = (tmp_path / "bench.md").read_text()
    assert "NOT a measurement" in text
    for heading in ("(a) sparse Linear", "(b) channel-compacted", "(c) never slower"):
        assert heading in text
    assert "| 512x512 | 0.9 | 64 |" in text and "| lenet5 | 2x layer-wise |" in text
    assert text.count("| lenet300 | 0.9 |") == 2  # batch 1 and 8


def test_gpu_check_says_so_without_cuda_and_smoke_runs_on_cpu():
    import torch

    if not torch.cuda.is_available():
        r = run("benchmarks/gpu_check.py")
        assert r.returncode == 2 and "no CUDA device" in r.stdout
    r = run("benchmarks/gpu_check.py", "--device", "cpu", "--quick")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    checks = [line.split(" | ")[0].removeprefix("| ") for line in rows[1:]]
    assert checks == ["environment", "training step", "2:4 semi-structured vs dense", "bk.deploy 2:4 MLP",
                      "save + load with torch alone", "whole model 2:4, CUDA graphs"]
    assert "masks held True" in r.stdout and "FAILED" not in r.stdout


def test_study_quick_writes_csv_and_markdown(tmp_path):
    r = run("experiments/deploy_study.py", "--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(tmp_path / "study.csv")
    assert set(df["granularity"]) == {"element", "2:4", "1:4", "1:8", "channel"}  # kernel: no conv in LeNet-300
    assert set(df["batch"]) == {1, 8} and set(df["model"]) == {"lenet300"}
    element = df[df["granularity"] == "element"].set_index(["target_sparsity", "batch"])
    assert element["theoretical_shrinkbench"].tolist() == pytest.approx([2, 2, 10, 10])
    channel = df[df["granularity"] == "channel"]
    assert (channel["theoretical_compacted"] > 1).all() and df.loc[df["granularity"] != "channel",
                                                                   "theoretical_compacted"].isna().all()
    # BSR 8x8 takes none of LeNet-300's layers (300, 100 and 10 rows): no figure rather than "as fast as dense"
    assert (df["coverage_torch_bsr8"] == 0).all() and df["layers_torch_bsr8"].isna().all()
    assert (df["coverage_csr"] == 1).all() and (df["layers_csr"] > 0).all()
    be = pd.read_csv(tmp_path / "break_even.csv")
    assert set(be["kernel"]) == {"csr", "fused_csr", "torch_csr"}
    assert (df["coverage_fused_csr"] == 1).all()  # every LeNet-300 layer is a Linear layer
    assert set(be["granularity"]) == {"element", "n:m", "channel"}
    md = (tmp_path / "study.md").read_text()
    assert "NOT a measurement" in md and "## Break-even sparsity" in md


def test_break_even_interpolates_between_measured_sparsities():
    from benchkit.deployment.study import break_even

    df = pd.DataFrame({"model": "m", "granularity": "element", "batch": 1, "sparsity": [0.5, 0.7, 0.9],
                       "layers_csr": [0.5, 0.8, 1.6], "layers_torch_csr": [1.2, 2.0, 3.0],
                       "layers_torch_bsr8": [0.2, 0.3, 0.4]})
    be = break_even(df).set_index("kernel")
    assert be.loc["csr", "break_even_sparsity"] == pytest.approx(0.7 + 0.2 * 0.2 / 0.8)  # 0.75
    assert be.loc["torch_csr", "break_even_sparsity"] == 0.5
    assert be.loc["torch_csr", "note"].startswith("at or below")
    assert math.isnan(be.loc["torch_bsr8", "break_even_sparsity"]) and be.loc["torch_bsr8", "note"] == "never reached"


def test_study_refuses_unknown_models_before_work():
    r = run("experiments/deploy_study.py", "--models", "lenet300,nosuchmodel", timeout=120)
    assert r.returncode != 0 and "unknown study model 'nosuchmodel'" in r.stderr and "charlm" in r.stderr


def test_study_keeps_the_rows_measured_before_a_stop(tmp_path, monkeypatch):
    """A study stopped by Ctrl-C or SIGTERM (a time limit) writes the rows it finished, marked PARTIAL."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import deploy_study

    from benchkit.deployment import study

    real = study.run_study

    def stop_after_first_row(*args, rows, **kwargs):
        def progress(msg: str) -> None:
            if rows:
                raise KeyboardInterrupt
        return real(*args, rows=rows, progress=progress, **kwargs)

    monkeypatch.setattr(study, "run_study", stop_after_first_row)
    before = signal.getsignal(signal.SIGTERM)
    rc = deploy_study.main(["--quick", "--out", str(tmp_path), "--granularities", "element"])
    assert rc == 130
    df = pd.read_csv(tmp_path / "study.csv")
    assert len(df) == 1 and df.loc[0, "granularity"] == "element" and df.loc[0, "batch"] == 1
    assert "PARTIAL: stopped after 1 rows" in (tmp_path / "study.md").read_text()
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back


def test_study_runs_in_the_asked_dtype_and_says_where():
    from benchkit.deployment.study import run_study

    rows: list[dict] = []
    df = run_study(["lenet300"], granularities=["element"], sparsities=[0.9], batches=[2], kernels=["csr"],
                   repeats=1, warmup=0, dtype=torch.float16, progress=None, rows=rows)
    assert len(rows) == 1 and df.loc[0, "dtype"] == "float16" and df.loc[0, "device"] == "cpu"
    assert df.loc[0, "theoretical_shrinkbench"] == pytest.approx(10)
    assert list(df.columns).count("layers_csr") == 1 and "layers_torch_csr" not in df
