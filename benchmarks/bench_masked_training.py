"""What training a pruned model with ``benchkit.train`` costs over a hand-written PyTorch loop on the dense model.

Goal (issue 15): an epoch of ``benchkit.train`` on LeNet-300-100 with 90% of its weights masked
(``apply_masks``: torch.nn.utils.prune hooks, pruned entries zeroed after every step) costs at most ~10% more
CPU time than ``for x, y in loader: zero_grad; forward; cross-entropy; backward; step`` on the dense model,
same data, same optimiser.

Design: N blocks of four epochs, plain, masked, masked, plain (ABBA), each on a fresh copy of one initial
model. The mirrored order cancels a machine whose speed drifts linearly within a block; a block's ratio is
(masked + masked) / (plain + plain) process CPU time. Reported: the median block ratio with a 95% bootstrap
interval, and the fastest epoch of each side (the least disturbed). Validation is off in the timed epochs
(``data.val = None``), torch threads are fixed. Run it on a quiet machine; ``--optimizer adam`` puts Adam on
both sides instead of SGD with momentum 0.9.

    .venv/bin/python benchmarks/bench_masked_training.py --blocks 25
    .venv/bin/python benchmarks/bench_masked_training.py --model lenet5 --optimizer adam --blocks 25
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchkit.config import DataConfig, ModelConfig, TrainConfig
from benchkit.data import DataBundle, DataNotFoundError, load_data
from benchkit.latency import cpu_description
from benchkit.models import build_model
from benchkit.pruning.layers import prunable_layers
from benchkit.pruning.masks import apply_masks
from benchkit.seeding import seed_everything
from benchkit.training import train

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GOAL = 1.10


def plain_epoch(model: nn.Module, loader, optimizer: str, lr: float) -> None:
    """The reference: what anyone would write by hand."""
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def random_masks(model: nn.Module, sparsity: float, seed: int) -> dict[str, torch.Tensor]:
    """Exactly round(sparsity·n) weights masked in every prunable layer, chosen at random."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, module in prunable_layers(model).items():
        n = module.weight.numel()
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=g)[: round(sparsity * n)]] = False
        masks[f"{name}.weight"] = keep.view_as(module.weight)
    return masks


def load(train_subset: int | None, batch_size: int) -> tuple[DataBundle, str]:
    root = os.environ.get("BENCHKIT_DATA") or str(SHARED_DATA)
    try:
        cfg = DataConfig(name="fashion-mnist", root=root, download=False, train_subset=train_subset)
        return load_data(cfg, batch_size), "fashion-mnist"
    except DataNotFoundError:
        cfg = DataConfig(name="synthetic", num_samples=60000, input_shape=[1, 28, 28], train_subset=train_subset)
        return load_data(cfg, batch_size), "synthetic 1x28x28"


def epochs(model_name: str, data: DataBundle, sparsity: float, optimizer: str, lr: float
           ) -> tuple[Callable[[], float], Callable[[], float]]:
    """(plain epoch, masked ``train`` epoch), each timing one epoch on a fresh copy of one initial model."""
    seed_everything(0)
    base = build_model(ModelConfig(name=model_name), data.input_shape, data.num_classes)
    masks = random_masks(base, sparsity, seed=0)
    no_val = dataclasses.replace(data, val=None)
    cfg = TrainConfig(optimizer=optimizer, lr=lr, momentum=0.9, epochs=1, select_best=False)

    def plain() -> float:
        model = copy.deepcopy(base)
        c0 = time.process_time()
        plain_epoch(model, data.train, optimizer, lr)
        return time.process_time() - c0

    def masked() -> float:
        model = copy.deepcopy(base)
        apply_masks(model, masks)
        c0 = time.process_time()
        train(model, no_val, cfg, device="cpu")
        seconds = time.process_time() - c0
        for name, module in prunable_layers(model).items():  # sanity: pruned weights stayed exactly zero
            assert not module.weight_orig[~masks[f"{name}.weight"]].any(), name
        return seconds

    return plain, masked


def bootstrap_median(values: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """Median and a 95% bootstrap interval for it."""
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return statistics.median(values), boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lenet300")
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    ap.add_argument("--lr", type=float, default=None, help="default 0.01 for SGD, 0.0012 for Adam")
    ap.add_argument("--blocks", type=int, default=25, help="ABBA blocks (plain, masked, masked, plain)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=60)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--train-subset", type=int, default=None,
                    help="training examples per epoch (default: the whole 54,000-example training split)")
    args = ap.parse_args()
    lr = args.lr if args.lr is not None else (0.0012 if args.optimizer == "adam" else 0.01)

    torch.set_num_threads(args.threads)
    data, data_name = load(args.train_subset, args.batch_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {cpu_description()},"
          f" {os.cpu_count()} logical CPUs; {args.model}, {args.sparsity:.0%} masked; data {data_name}:"
          f" {data.sizes['train']} training examples, batch {args.batch_size} ({len(data.train)} steps/epoch);"
          f" {args.optimizer} lr {lr:g}; {args.blocks} ABBA blocks")
    plain, masked = epochs(args.model, data, args.sparsity, args.optimizer, lr)
    plain(), masked()  # warm-up: allocator, kernels, first touch of the data
    blocks, plains, maskeds = [], [], []
    for _ in range(args.blocks):
        a1 = plain()
        b1, b2 = masked(), masked()
        a2 = plain()
        blocks.append((b1 + b2) / (a1 + a2))
        plains += [a1, a2]
        maskeds += [b1, b2]
    mid, lo, hi = bootstrap_median(blocks)
    verdict = "meets" if hi <= GOAL else ("at the edge of" if mid <= GOAL else "MISSES")
    print(f"plain loop, dense: {statistics.median(plains):.4f} s/epoch CPU (median), fastest {min(plains):.4f}")
    print(f"benchkit.train, masked: {statistics.median(maskeds):.4f} s/epoch CPU (median), fastest {min(maskeds):.4f}")
    print(f"masked train / plain loop: {mid:.3f} median of blocks (95% CI {lo:.3f}-{hi:.3f}), fastest epochs"
          f" {min(maskeds) / min(plains):.3f} -> {verdict} the <= {GOAL:.2f} goal")
    print("blocks: " + " ".join(f"{r:.3f}" for r in blocks))


if __name__ == "__main__":
    main()
