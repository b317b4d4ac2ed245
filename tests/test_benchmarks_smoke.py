"""The benchmark scripts still run end to end (tiny sizes; timings are not asserted: speed goals live in
benchmarks/ and results/benchmarks.md, never in tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_masked_training_benchmark_runs_its_blocks_and_gives_a_verdict():
    r = subprocess.run([sys.executable, "benchmarks/bench_masked_training.py", "--blocks", "2",
                        "--train-subset", "120", "--batch-size", "60"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "2 steps/epoch" in r.stdout and "2 ABBA blocks" in r.stdout
    assert "masked train / plain loop:" in r.stdout and "goal" in r.stdout
    assert len(r.stdout.split("blocks: ")[1].split()) == 2  # one ratio per block


def test_oneshot_benchmark_times_every_method_and_prints_the_ratio():
    r = subprocess.run([sys.executable, "benchmarks/bench_oneshot.py", "--n-layer", "1", "--n-embd", "16",
                        "--context", "8", "--samples", "4", "--batch", "2", "--repeats", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert [line.split("|")[1].strip() for line in r.stdout.splitlines() if line.startswith("| ") and "method" not in
            line] == ["magnitude", "wanda", "sparsegpt"]
    assert "sparsegpt / wanda: whole call" in r.stdout



def test_dst_overhead_benchmark_runs_both_arms_and_gives_a_verdict():
    r = subprocess.run([sys.executable, "benchmarks/bench_dst.py", "--models", "lenet300", "--blocks", "1",
                        "--train-subset", "240", "--batch-size", "60", "--delta-t", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| lenet300 |")]
    assert len(rows) == 1 and rows[0].split("|")[2].strip() == "2"  # 4 steps/epoch, an update every 2
    assert "rigl / static wall time" in r.stdout and "1.10 goal" in r.stdout


@pytest.mark.slow
def test_startup_benchmark_runs_every_variant():
    """Each variant turns its trick off from outside (no switches in the library) and still sweeps."""
    r = subprocess.run([sys.executable, "benchmarks/bench_startup.py", "--runs", "1", "--epochs", "1", "--repeats", "1",
                        "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    for label in ("all tricks", "without gc ", "without preload", "without gc,preload"):
        assert f"workers=2  {label}" in r.stdout, r.stdout


def test_sparse_linear_parts_prints_every_part_and_the_bound():
    r = subprocess.run([sys.executable, "benchmarks/sparse_linear_parts.py", "--quick"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 512x512") or line.startswith("| 1024")]
    assert [row.split(" | ")[1] for row in rows] == ["0.9", "0.95", "0.98", "0.98"]
    assert all(len(row.split(" | ")) == 16 for row in rows) and "bound x = dense /" in r.stdout
    assert not any("nan" in row for row in rows), rows  # benchkit's fused kernel was built and timed too
