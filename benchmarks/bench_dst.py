"""Overhead of RigL's mask updates over static sparse training (timing ``dynamic``), in the same process.

Goal (issue 17): training with RigL at ``delta_t = 100`` costs at most 10% more time than static sparse training
of the same network (Evci et al. 2020: RigL's cost is close to static sparse training's; one dense gradient
every ΔT steps).

Both arms run ``benchkit.train`` for one epoch on fresh copies of one initial masked model (random ERK mask at
``--sparsity``, as RigL starts), validation off, with the timing's own callback (:class:`benchkit.timing.
dynamic.MaskUpdater`): for ``static`` it never updates, for ``rigl`` it updates every ``delta_t`` steps through
the whole epoch (``t_end`` = the epoch's end: the worst case, a real run stops at 75%), each update drawing one
batch for the dense gradient, ranking every layer and resetting optimiser state. The arms run in ABBA blocks
(static, rigl, rigl, static), which cancels a machine whose speed drifts linearly within a block; reported: the
median of the per-block ratios of wall time and of process CPU time with a 95% bootstrap interval, the fastest
epoch of each arm, and the cost of one update timed around the update itself (its share of a RigL epoch is the
overhead with the epoch-to-epoch noise taken out).

    .venv/bin/python benchmarks/bench_dst.py                       # Fashion-MNIST if present, 9 blocks
    .venv/bin/python benchmarks/bench_dst.py --models lenet300 lenet5 --blocks 15 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchkit.config import DataConfig, ModelConfig, TrainConfig
from benchkit.data import DataBundle, DataNotFoundError, load_data
from benchkit.latency import cpu_description
from benchkit.models import build_model
from benchkit.pruning.engine import prune
from benchkit.pruning.masks import deepcopy_model, get_masks
from benchkit.seeding import seed_everything
from benchkit.timing.dynamic import DropSchedule, MaskUpdater, grow_scorer
from benchkit.training import train

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load(train_subset: int | None, batch_size: int) -> tuple[DataBundle, str]:
    root = os.environ.get("BENCHKIT_DATA") or str(SHARED_DATA)
    try:
        cfg = DataConfig(name="fashion-mnist", root=root, download=False, train_subset=train_subset)
        return load_data(cfg, batch_size), "fashion-mnist"
    except DataNotFoundError:
        cfg = DataConfig(name="synthetic", num_samples=60000, input_shape=[1, 28, 28], train_subset=train_subset)
        return load_data(cfg, batch_size), "synthetic 1x28x28"


def initial_model(model_name: str, data: DataBundle, sparsity: float) -> nn.Module:
    seed_everything(0)
    model = build_model(ModelConfig(name=model_name), data.input_shape, data.num_classes)
    prune(model, sparsity=sparsity, criterion="random", allocation="erk", seed=0)
    return model


class TimedUpdater(MaskUpdater):
    """The timing's own callback, with the wall time spent inside its updates added up."""

    seconds = 0.0

    def update(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return super().update(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


def epoch(base: nn.Module, data: DataBundle, cfg: TrainConfig, method: str,
          delta_t: int) -> tuple[float, float, int, float]:
    """One epoch of ``method`` on a fresh copy of ``base``: (wall s, CPU s, mask updates, wall s inside the
    updates). The last is timed around each update itself, so it does not carry the epoch-to-epoch noise that
    a difference of two epochs' times does."""
    model = deepcopy_model(base)
    paths = list(get_masks(model))
    steps = len(data.train)
    schedule = DropSchedule(alpha=0.3, delta_t=delta_t, end=steps + 1)  # an update at every multiple of delta_t
    grow = grow_scorer(method, paths, dataset=data.train.dataset, batch_size=cfg.batch_size, seed=1,
                       device=torch.device("cpu"))
    updater = TimedUpdater(model, paths, schedule, grow, [p.rpartition(".")[0] for p in paths])
    w0, c0 = time.perf_counter(), time.process_time()
    train(model, data, cfg, device="cpu", callbacks=[updater])
    return time.perf_counter() - w0, time.process_time() - c0, len(updater.rows), updater.seconds


def bootstrap(ratios: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["lenet300"])
    ap.add_argument("--blocks", type=int, default=9, help="ABBA blocks (static, rigl, rigl, static)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=60)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--delta-t", type=int, default=100)
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    ap.add_argument("--train-subset", type=int, default=None,
                    help="training examples per epoch (default: the whole 54,000-example training split)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data, data_name = load(args.train_subset, args.batch_size)
    data = dataclasses.replace(data, val=None)  # only the training loop is timed
    lr = 0.0012 if args.optimizer == "adam" else 0.01
    cfg = TrainConfig(optimizer=args.optimizer, lr=lr, momentum=0.9, epochs=1, select_best=False,
                      batch_size=args.batch_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {cpu_description()},"
          f" {os.cpu_count()} logical CPUs; data {data_name}: {len(data.train)} steps/epoch at batch {args.batch_size};"
          f" {args.optimizer}; sparsity {args.sparsity:.0%} (random ERK mask); RigL every {args.delta_t} steps;"
          f" {args.blocks} ABBA blocks\n")
    print("| model | updates/epoch | static s/epoch (wall, median) | rigl s/epoch (wall, median) | rigl/static wall"
          " (median of blocks, 95% CI) | rigl/static CPU (median of blocks, 95% CI) | per update ms (timed) |"
          " updates' share of a rigl epoch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for name in args.models:
        base = initial_model(name, data, args.sparsity)
        epoch(base, data, cfg, "static", args.delta_t), epoch(base, data, cfg, "rigl", args.delta_t)  # warm-up
        walls: dict[str, list[float]] = {"static": [], "rigl": []}
        cpus: dict[str, list[float]] = {"static": [], "rigl": []}
        wall_ratio, cpu_ratio = [], []
        updates = 0
        update_share, update_seconds = [], []  # per rigl epoch: time inside the updates (/ its wall time)
        for _ in range(args.blocks):
            block = {}
            for method in ("static", "rigl", "rigl", "static"):
                w, c, n, u = epoch(base, data, cfg, method, args.delta_t)
                if method == "rigl":
                    update_share.append(u / w)
                    update_seconds.append(u)
                walls[method].append(w)
                cpus[method].append(c)
                block.setdefault(method, []).append((w, c))
                updates = max(updates, n)
            wall_ratio.append(sum(w for w, _ in block["rigl"]) / sum(w for w, _ in block["static"]))
            cpu_ratio.append(sum(c for _, c in block["rigl"]) / sum(c for _, c in block["static"]))
        wmid, wlo, whi = bootstrap(wall_ratio)
        cmid, clo, chi = bootstrap(cpu_ratio)
        ws, wr = statistics.median(walls["static"]), statistics.median(walls["rigl"])
        share = statistics.median(update_share)
        per_update = 1000 * statistics.median(update_seconds) / updates if updates else float("nan")
        print(f"| {name} | {updates} | {ws:.3f} | {wr:.3f} | {wmid:.3f} ({wlo:.3f}-{whi:.3f}) |"
              f" {cmid:.3f} ({clo:.3f}-{chi:.3f}) | {per_update:.2f} | {share:.1%} |")
        verdict = "meets" if wmid <= 1.10 else "MISSES"
        verdicts.append(f"{name}: rigl / static wall time {wmid:.3f} (95% CI {wlo:.3f}-{whi:.3f}) -> {verdict} the"
                        f" <= 1.10 goal; fastest epochs {min(walls['rigl']):.3f} s / {min(walls['static']):.3f} s ="
                        f" {min(walls['rigl']) / min(walls['static']):.3f}; the updates themselves take {share:.1%} of a rigl"
                        f" epoch; blocks "
                        + " ".join(f"{r:.3f}" for r in wall_ratio))
    print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
