"""Shared fixtures: every test gets its own dense-model cache and MLflow store, so tests never
see each other's (or the developer's) state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import benchkit.timing  # noqa: F401  the timings' config sections (prune.post, ...), as bk.load_config does

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path | None:
    """../shared/data beside the checkout (or $BENCHKIT_DATA), if it holds Fashion-MNIST."""
    for cand in (os.environ.get("BENCHKIT_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"):
        if cand and (Path(cand) / "FashionMNIST" / "raw").is_dir():
            return Path(cand)
    return None


@pytest.fixture
def fashion_root() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("Fashion-MNIST not found in ../shared/data or $BENCHKIT_DATA")
    return root


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory, monkeypatch):
    """A private dense cache and tracking store per test; plots without a display."""
    base = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("BENCHKIT_CACHE", str(base / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base / 'mlflow.db'}")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    yield
