"""Overhead of training a masked (pruned) model with ``benchkit.train`` versus a hand-written PyTorch loop.

Goal (issue 3): an epoch of ``benchkit.train`` on a model with 90% of its weights masked (via
``benchkit.pruning.masks.apply_masks``, i.e. torch.nn.utils.prune hooks) costs at most 5% more time
than the plain loop ``for x, y in loader: zero_grad; forward; cross-entropy; backward; step`` on the
same dense architecture and the same data.

Measured side by side in one process: the variants are interleaved (order rotated each repeat), each
repeat is one epoch, medians are reported, torch threads are fixed, and validation is off in the
timed part (``data.val = None``, so ``train`` does no evaluation at all). A third variant, ``train``
on the *dense* model, separates the loop's own cost from the cost of the masks; a fourth trains the
masked model through torch.nn.utils.prune's own hooks (``train``'s gradient-masking fast path off).
Wall-clock and process CPU time are both reported: on a shared machine CPU time is the steadier one.

    .venv/bin/python benchmarks/bench_masked_training.py            # Fashion-MNIST if present
    .venv/bin/python benchmarks/bench_masked_training.py --repeats 9 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import benchkit.training
from benchkit.config import DataConfig, ModelConfig, TrainConfig
from benchkit.data import DataBundle, DataNotFoundError, load_data
from benchkit.models import build_model
from benchkit.pruning.layers import prunable_layers
from benchkit.pruning.masks import apply_masks
from benchkit.seeding import seed_everything
from benchkit.training import train

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def plain_epoch(model: nn.Module, loader, lr: float, momentum: float) -> None:
    """The reference: what anyone would write by hand."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
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


def hooks_only(model: nn.Module, data: DataBundle, cfg: TrainConfig) -> None:
    """``train`` with its gradient-masking fast path off: torch.nn.utils.prune's hooks multiply the
    mask in every forward (and autograd again in every backward). Shows what the fast path saves."""
    benchkit.training.GRADIENT_MASKING = False
    try:
        train(model, data, cfg, device="cpu")
    finally:
        benchkit.training.GRADIENT_MASKING = True


def bench(model_name: str, data: DataBundle, repeats: int, sparsity: float, lr: float,
          with_hooks: bool = True) -> dict[str, dict[str, list[float]]]:
    """Per variant: wall-clock and process CPU seconds of each timed epoch."""
    seed_everything(0)
    base = build_model(ModelConfig(name=model_name), data.input_shape, data.num_classes)
    dense_plain, dense_train, masked, hooked = (copy.deepcopy(base) for _ in range(4))
    apply_masks(masked, random_masks(masked, sparsity, seed=0))
    apply_masks(hooked, random_masks(hooked, sparsity, seed=0))
    no_val = dataclasses.replace(data, val=None)  # nothing but the epoch loop is timed
    cfg = TrainConfig(optimizer="sgd", lr=lr, momentum=0.9, epochs=1, select_best=False)

    runs = {
        "plain loop, dense": lambda: plain_epoch(dense_plain, data.train, lr, 0.9),
        "benchkit.train, dense": lambda: train(dense_train, no_val, cfg, device="cpu"),
        f"benchkit.train, {sparsity:.0%} masked": lambda: train(masked, no_val, cfg, device="cpu"),
    }
    if with_hooks:
        runs[f"same, prune hooks only ({sparsity:.0%} masked)"] = lambda: hooks_only(hooked, no_val, cfg)
    names = list(runs)
    for name in names:  # warm-up: allocator, kernels, first-touch of the data
        runs[name]()
    times = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            runs[name]()
            times[name]["cpu"].append(time.process_time() - c0)
            times[name]["wall"].append(time.perf_counter() - w0)
    # sanity: the masked model stayed masked
    for name, module in prunable_layers(masked).items():
        assert module.weight_orig[~module.weight_mask.bool()].abs().max() == 0, name
        assert module.weight[~module.weight_mask.bool()].abs().max() == 0, name
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=60)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--no-hooks-baseline", action="store_true",
                    help="skip the 4th variant (train with torch.nn.utils.prune's multiplying hooks)")
    ap.add_argument("--train-subset", type=int, default=None,
                    help="training examples per epoch (default: the whole 54,000-example training split)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    data, data_name = load(args.train_subset, args.batch_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()},"
          f" {os.cpu_count()} logical CPUs; data {data_name}: {data.sizes['train']} training examples,"
          f" batch {args.batch_size} ({len(data.train)} steps/epoch); {args.repeats} interleaved repeats\n")
    print("| model | variant | wall s/epoch (median) | ratio to plain | CPU s/epoch (median) | ratio to plain |")
    print("|---|---|---:|---:|---:|---:|")
    verdicts = []
    for model_name in args.models:
        times = bench(model_name, data, args.repeats, args.sparsity, args.lr, not args.no_hooks_baseline)
        plain = {k: statistics.median(v) for k, v in times["plain loop, dense"].items()}
        for variant, ts in times.items():
            w, c = statistics.median(ts["wall"]), statistics.median(ts["cpu"])
            print(f"| {model_name} | {variant} | {w:.3f} | {w / plain['wall']:.3f} | {c:.3f} | {c / plain['cpu']:.3f} |")
        masked = times[f"benchkit.train, {args.sparsity:.0%} masked"]
        ratios = {k: statistics.median(masked[k]) / plain[k] for k in ("wall", "cpu")}
        # paired: masked / plain within each repeat (run back to back), so a machine that slows down
        # for a while (other tenants) slows both sides of a pair rather than one side of the medians
        paired = {k: statistics.median(m / p for m, p in zip(masked[k], times["plain loop, dense"][k]))
                  for k in ("wall", "cpu")}
        ok = all(r <= 1.05 for r in ratios.values())
        verdicts.append(f"{model_name}: masked train / plain loop = {ratios['wall']:.3f} wall, {ratios['cpu']:.3f} CPU"
                        f" (paired per repeat: {paired['wall']:.3f} wall, {paired['cpu']:.3f} CPU)"
                        f" -> {'meets' if ok else 'MISSES'} the <= 1.05 goal")
    print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
