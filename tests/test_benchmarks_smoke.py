"""The benchmark scripts still run end to end (tiny sizes; timings are not asserted: speed goals live in
benchmarks/ and results/benchmarks.md, never in tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_masked_training_benchmark_runs_every_variant_and_gives_a_verdict():
    r = subprocess.run([sys.executable, "benchmarks/bench_masked_training.py", "--models", "lenet300",
                        "--repeats", "2", "--train-subset", "120", "--batch-size", "60"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| lenet300 |")]
    assert len(rows) == 6  # plain, masked by hand, train dense, train masked, prune hooks, plain again
    assert "2 steps/epoch" in r.stdout
    assert "benchkit.train masked / plain loop dense:" in r.stdout and "noise floor" in r.stdout


@pytest.mark.slow
def test_startup_benchmark_runs_every_variant():
    """Each variant turns its trick off from outside (no switches in the library) and still sweeps."""
    r = subprocess.run([sys.executable, "benchmarks/bench_startup.py", "--runs", "1", "--epochs", "1", "--repeats", "1",
                        "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    for label in ("all tricks", "without gc ", "without preload", "without gc,preload"):
        assert f"workers=2  {label}" in r.stdout, r.stdout
