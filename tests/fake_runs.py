"""A small MLflow store of fake-but-consistent benchkit runs, written through benchkit.tracking.

The runs go through the real ``Tracker`` (params from ``ExperimentConfig.flat()``, metrics from
``result_metric_rows``, ``layers.csv``/``history.csv``/``levels.csv`` from ``write_artifacts``), so
the analysis tests read exactly what a sweep writes; only the numbers are invented, by the closed
formulas below, which the tests use as their independent expectation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

import benchkit.timing  # noqa: F401  (registers the timings' sections: prune.post, prune.lottery, ...)
from benchkit.config import ExperimentConfig
from benchkit.tracking import TAG_HASH, TAG_SWEEP, Tracker

SWEEP = "fake-strategies"
LOTTERY = "fake-lottery"
STRATEGIES = [("magnitude", "global"), ("magnitude", "layer"), ("random", "global")]
COMPRESSIONS = [2.0, 4.0, 8.0]
SEEDS = [0, 1]
LEVELS = 3
CONTROLS = ("reinit", "random")
LAYERS = [("fc1", 64 * 300), ("fc2", 300 * 100), ("fc3", 100 * 10)]
DROP = {("magnitude", "global"): 0.01, ("magnitude", "layer"): 0.02, ("random", "global"): 0.08}


def final_acc(criterion: str, scope: str, compression: float, seed: int) -> float:
    """Accuracy falls linearly in log2(compression); seeds differ by a known offset."""
    return 0.95 - DROP[(criterion, scope)] * math.log2(compression) + 0.01 * seed


def achieved(compression: float, seed: int) -> float:
    return compression * (1.0 + 0.01 * seed)


def speedup(scope: str, compression: float, seed: int) -> float:
    """Global pruning spares the FLOP-heavy layers less, so its speedup is higher at equal compression."""
    return achieved(compression, seed) * (1.25 if scope == "global" else 0.75)


def dense_acc1(seed: int) -> float:
    return 0.96 + 0.004 * seed


def density(layer_index: int, compression: float) -> float:
    return min(1.0, (layer_index + 1) / compression)


def curve(phase: str, step: int, seed: int) -> float:
    """Validation accuracy along training: rises with the step, per phase."""
    base = 0.5 if phase == "dense" else 0.8
    return base + 0.01 * step + 0.001 * seed


def lottery_percent(level: int) -> float:
    return 100.0 * 0.8**level


def lottery_acc(branch: str, level: int, seed: int) -> float:
    gain = {"ticket": 0.005, "reinit": -0.01, "random": -0.02}[branch]
    return 0.97 + (gain * level if level else 0.0) + 0.002 * seed


def lottery_best_step(branch: str, level: int, seed: int) -> int:
    return 1000 - (100 * level if branch == "ticket" else -50 * level) + 10 * seed


@dataclass
class FakeStore:
    uri: str
    root: Path
    run_ids: dict[tuple, str] = field(default_factory=dict)  # (criterion, scope, compression, seed) → id
    lottery_ids: dict[int, str] = field(default_factory=dict)
    failed_id: str = ""
    running_id: str = ""


def _result(cfg: ExperimentConfig, metrics: dict[str, float], history: list[dict[str, Any]],
            layers: pd.DataFrame, levels: list[dict[str, Any]] | None = None) -> SimpleNamespace:
    return SimpleNamespace(config=cfg, config_hash=cfg.config_hash(), metrics=metrics, history=history,
                           levels=levels or [], layers=layers, timings={"total": 1.0}, state_dict=None, masks=None)


def _layers(compression: float) -> pd.DataFrame:
    rows = []
    for i, (name, params) in enumerate(LAYERS):
        d = density(i, compression)
        rows.append({"layer": name, "type": "Linear", "shape": "[]", "params": params,
                     "nonzero": round(params * d), "density": d, "flops": params,
                     "flops_nonzero": params * d, "speedup": 1 / d})
    return pd.DataFrame(rows)


def _history(seed: int, steps: int = 3) -> list[dict[str, Any]]:
    return [{"phase": phase, "epoch": s, "step": s, "val_acc1": curve(phase, s, seed),
             "val_loss": 1.0 - curve(phase, s, seed), "train_loss": 1.0 / s}
            for phase in ("dense", "finetune_r1") for s in range(1, steps + 1)]


def _start(tracker: Tracker, exp_id: str, cfg: ExperimentConfig, sweep: str) -> str:
    return tracker.start_run(exp_id, cfg, run_name=cfg.name,
                             tags={TAG_SWEEP: sweep, TAG_HASH: cfg.config_hash()})


def build_store(root: Path, *, with_lottery: bool = True) -> FakeStore:
    root.mkdir(parents=True, exist_ok=True)
    store = FakeStore(uri=f"sqlite:///{root / 'mlflow.db'}", root=root)
    tracker = Tracker(store.uri)
    exp = tracker.ensure_experiment(SWEEP)
    base = {"experiment": SWEEP, "data": {"name": "digits"}, "model": {"name": "lenet300"},
            "prune": {"timing": "post"}, "progress": False}
    for criterion, scope in STRATEGIES:
        for compression in COMPRESSIONS:
            for seed in SEEDS:
                allocation = {"layer": "uniform"}.get(scope, scope)
                cfg = ExperimentConfig.from_dict(base, {"prune.criterion": criterion, "prune.allocation": allocation,
                                                        "prune.compression": compression, "seed": seed})
                metrics = {
                    "compression_ratio": achieved(compression, seed),
                    "sparsity": 1 - 1 / achieved(compression, seed),
                    "theoretical_speedup": speedup(scope, compression, seed),
                    "test_acc1": final_acc(criterion, scope, compression, seed),
                    "val_acc1": final_acc(criterion, scope, compression, seed) + 0.001,
                    "dense_test_acc1": dense_acc1(seed),
                }
                run_id = _start(tracker, exp, cfg, SWEEP)
                tracker.log_result(run_id, _result(cfg, metrics, _history(seed), _layers(compression)),
                                   plots=False, model=False)
                tracker.end_run(run_id)
                store.run_ids[(criterion, scope, compression, seed)] = run_id
    # a crashed and a still-running config: never part of a FINISHED analysis
    for status, seed in (("FAILED", 7), ("RUNNING", 8)):
        cfg = ExperimentConfig.from_dict(base, {"seed": seed, "prune.compression": 2.0})
        run_id = _start(tracker, exp, cfg, SWEEP)
        tracker.log_metrics(run_id, [("test_acc1", 0.0, 0)])
        if status == "FAILED":
            tracker.end_run(run_id, "FAILED")
            store.failed_id = run_id
        else:
            store.running_id = run_id

    if with_lottery:
        lexp = tracker.ensure_experiment(LOTTERY)
        for seed in SEEDS:
            cfg = ExperimentConfig.from_dict(
                {**base, "experiment": LOTTERY, "prune": {"timing": "lottery", "scope": "layer",
                                                          "lottery": {"levels": LEVELS, "controls": list(CONTROLS)}}},
                {"seed": seed})
            levels = []
            for level in range(LEVELS + 1):
                for branch in ("ticket", *CONTROLS):
                    if level == 0 and branch != "ticket":
                        continue
                    levels.append({"level": level, "branch": branch, "percent_remaining": lottery_percent(level),
                                   "compression_ratio": 100 / lottery_percent(level),
                                   "best_step": lottery_best_step(branch, level, seed),
                                   "test_acc1": lottery_acc(branch, level, seed),
                                   "val_acc1": lottery_acc(branch, level, seed) - 0.001})
            metrics = {"compression_ratio": 100 / lottery_percent(LEVELS), "test_acc1": lottery_acc("ticket", LEVELS, seed)}
            run_id = _start(tracker, lexp, cfg, LOTTERY)
            tracker.log_result(run_id, _result(cfg, metrics, _history(seed), _layers(2.0), levels),
                               plots=False, model=False)
            tracker.end_run(run_id)
            store.lottery_ids[seed] = run_id
    return store


def log_fake_runs(uri: str, experiment: str, runs: list[tuple[dict[str, Any], dict[str, float]]],
                  base: dict[str, Any] | None = None) -> list[str]:
    """Finished runs of ``experiment`` with the params of ``base`` + each run's dotted overrides and the given final
    metrics, and nothing else (no artifacts): the quickest store a checklist or a card can read."""
    tracker = Tracker(uri)
    exp = tracker.ensure_experiment(experiment)
    base = {"experiment": experiment, "data": {"name": "digits"}, "model": {"name": "lenet300"}, "progress": False,
            **(base or {})}
    ids = []
    for overrides, metrics in runs:
        cfg = ExperimentConfig.from_dict(base, overrides)
        run_id = _start(tracker, exp, cfg, experiment)
        tracker.log_metrics(run_id, [(k, v, 0) for k, v in metrics.items()])
        tracker.end_run(run_id)
        ids.append(run_id)
    return ids
