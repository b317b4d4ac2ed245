"""Overhead of training a masked (pruned) model with ``benchkit.train`` versus a hand-written PyTorch loop.

Goal (issue 3): an epoch of ``benchkit.train`` on a model with 90% of its weights masked (via
``benchkit.pruning.masks.apply_masks``, i.e. torch.nn.utils.prune hooks) costs at most 5% more time
than the plain loop ``for x, y in loader: zero_grad; forward; cross-entropy; backward; step`` on the
same dense architecture and the same data.

Measured side by side in one process: the variants are interleaved (order rotated each repeat), each
repeat is one epoch on fresh copies of one initial model, torch threads are fixed, and validation is
off in the timed part (``data.val = None``, so ``train`` does no evaluation at all). Variants besides
the two the goal compares: the plain loop keeping the masked model masked by hand (``grad.mul_(mask)``
before each step: the least any masked training can do), ``train`` on the *dense* model (the loop's own
cost), ``train`` through torch.nn.utils.prune's own hooks (``train``'s gradient-masking fast path off),
and a second copy of the plain loop, whose ratio to the first is the noise floor of the machine.
Reported per variant: median wall-clock and process CPU time; the verdict uses CPU time (the steadier
one on a shared machine), both as a ratio of medians and as the median of per-repeat ratios (each
repeat's epochs run seconds apart) with a 95% bootstrap interval. ``--abba N`` then times the goal's
two variants alone in N mirrored blocks (plain, masked, masked, plain), which cancels linear drift of the
machine's speed within a block; when it runs, the verdict is its median and interval. ``--optimizer adam``
puts Adam on both sides instead of SGD with momentum 0.9 (the lottery-ticket recipe for LeNet-300-100).

    .venv/bin/python benchmarks/bench_masked_training.py            # Fashion-MNIST if present
    .venv/bin/python benchmarks/bench_masked_training.py --repeats 9 --threads 1
    .venv/bin/python benchmarks/bench_masked_training.py --models lenet300 --repeats 5 --abba 25
    .venv/bin/python benchmarks/bench_masked_training.py --models lenet300 --optimizer adam --abba 25
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def plain_optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """What a hand-written loop would build: SGD with momentum 0.9 or Adam, torch's defaults otherwise."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def plain_epoch(model: nn.Module, loader, lr: float, optimizer: str = "sgd",
                grad_masks: dict[nn.Parameter, torch.Tensor] | None = None) -> None:
    """The reference: what anyone would write by hand. With ``grad_masks``, the same loop keeping a
    pruned model pruned by hand: the masked gradients are zeroed before the step."""
    opt = plain_optimizer(model, optimizer, lr)
    model.train()
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if grad_masks:
            for p, m in grad_masks.items():
                p.grad.mul_(m)
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


PLAIN, PLAIN_AGAIN = "plain loop, dense", "plain loop, dense (a second copy: the noise floor)"
HAND, MASKED = "plain loop, {sparsity:.0%} masked by hand (grad.mul_(mask) before the step)", "benchkit.train, {sparsity:.0%} masked"


Variant = tuple[Callable[[], Any], Callable[[Any], None]]  # (make a fresh model, train it one epoch)


def make_variants(model_name: str, data: DataBundle, sparsity: float, lr: float, optimizer: str = "sgd",
                  with_hooks: bool = True) -> dict[str, Variant]:
    """Every variant, by name, on one initial model and its masks (see the module docstring)."""
    base, masks, no_val, cfg = setup(model_name, data, sparsity, lr, optimizer)

    def masked_copy() -> nn.Module:
        return masked_model(base, masks)

    def hand_masked_copy() -> tuple[nn.Module, dict[nn.Parameter, torch.Tensor]]:
        model = copy.deepcopy(base)
        by_param = {}
        with torch.no_grad():
            for path, mask in masks.items():
                weight = model.get_parameter(path)
                by_param[weight] = mask.to(weight.dtype)
                weight.mul_(by_param[weight])
        return model, by_param

    variants: dict[str, Variant] = {
        PLAIN: (lambda: copy.deepcopy(base), lambda m: plain_epoch(m, data.train, lr, optimizer)),
        HAND.format(sparsity=sparsity):
            (hand_masked_copy, lambda mm: plain_epoch(mm[0], data.train, lr, optimizer, grad_masks=mm[1])),
        "benchkit.train, dense": (lambda: copy.deepcopy(base), lambda m: train(m, no_val, cfg, device="cpu")),
        MASKED.format(sparsity=sparsity): (masked_copy, lambda m: train(m, no_val, cfg, device="cpu")),
    }
    if with_hooks:
        variants[f"same, prune hooks only ({sparsity:.0%} masked)"] = (masked_copy, lambda m: hooks_only(m, no_val, cfg))
    variants[PLAIN_AGAIN] = variants[PLAIN]
    return variants


def bench(model_name: str, data: DataBundle, repeats: int, sparsity: float, lr: float,
          with_hooks: bool = True, optimizer: str = "sgd") -> dict[str, dict[str, list[float]]]:
    """Per variant: wall-clock and process CPU seconds of each timed epoch.

    Every repeat trains fresh copies of one initial model (masks re-applied), so no variant keeps a
    lucky or unlucky placement of its tensors in memory for the whole benchmark; a second copy of the
    plain loop shows how far two identical variants drift apart on this machine."""
    variants = make_variants(model_name, data, sparsity, lr, optimizer, with_hooks)
    names = list(variants)
    for name in names:  # warm-up: allocator, kernels, first-touch of the data
        make, run = variants[name]
        run(make())
    times = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        models = {name: variants[name][0]() for name in names}
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            variants[name][1](models[name])
            times[name]["cpu"].append(time.process_time() - c0)
            times[name]["wall"].append(time.perf_counter() - w0)
        # sanity: the masked model stayed masked
        for name, module in prunable_layers(models[MASKED.format(sparsity=sparsity)]).items():
            assert module.weight_orig[~module.weight_mask.bool()].abs().max() == 0, name
            assert module.weight[~module.weight_mask.bool()].abs().max() == 0, name
    return times


def setup(model_name: str, data: DataBundle, sparsity: float, lr: float, optimizer: str = "sgd"
          ) -> tuple[nn.Module, dict[str, torch.Tensor], DataBundle, TrainConfig]:
    """One initial model, its random masks, the data without validation (nothing but the epoch loop is
    timed) and the one-epoch config (SGD with momentum 0.9, or Adam) every ``train`` variant uses."""
    seed_everything(0)
    base = build_model(ModelConfig(name=model_name), data.input_shape, data.num_classes)
    masks = random_masks(base, sparsity, seed=0)
    no_val = dataclasses.replace(data, val=None)
    return base, masks, no_val, TrainConfig(optimizer=optimizer, lr=lr, momentum=0.9, epochs=1, select_best=False)


def masked_model(base: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(base)
    apply_masks(model, masks)
    return model


def abba(model_name: str, data: DataBundle, blocks: int, sparsity: float, lr: float,
         optimizer: str = "sgd") -> tuple[list[float], list[float], list[float]]:
    """The goal's two variants alone, in ABBA blocks: plain, masked ``train``, masked ``train``, plain.

    Per block, (masked + masked) / (plain + plain) CPU time. The four epochs run back to back, and the
    mirrored order cancels a machine whose speed drifts linearly over the block, which rotating six
    variants cannot: on a shared VM whose speed moves by 20-40% within minutes, this is the estimate
    of the goal's ratio that drift moves least. Returns the per-block ratios, then every plain and every
    masked epoch's CPU seconds."""
    variants = make_variants(model_name, data, sparsity, lr, optimizer, with_hooks=False)

    def timed(name: str) -> Callable[[], float]:
        make, run = variants[name]

        def epoch() -> float:
            model = make()
            c0 = time.process_time()
            run(model)
            return time.process_time() - c0

        return epoch

    plain, masked = timed(PLAIN), timed(MASKED.format(sparsity=sparsity))

    plain(), masked()  # warm-up
    per_block, plains, maskeds = [], [], []
    for _ in range(blocks):
        a1 = plain()
        b1, b2 = masked(), masked()
        a2 = plain()
        per_block.append((b1 + b2) / (a1 + a2))
        plains += [a1, a2]
        maskeds += [b1, b2]
    return per_block, plains, maskeds


def paired(a: list[float], b: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """Median of the per-repeat ratios a/b and a 95% bootstrap interval for it."""
    ratios = [x / y for x, y in zip(a, b)]
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]


def ratios(times: dict[str, dict[str, list[float]]], a: str, b: str) -> tuple[float, float, float, float]:
    """CPU time of variant a over variant b: ratio of medians, then the paired median and its interval."""
    return (statistics.median(times[a]["cpu"]) / statistics.median(times[b]["cpu"]),
            *paired(times[a]["cpu"], times[b]["cpu"]))


def describe(r: tuple[float, float, float, float]) -> str:
    med, mid, lo, hi = r
    return f"{med:.3f} (ratio of medians), {mid:.3f} paired per repeat (95% CI {lo:.3f}-{hi:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=60)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                    help="both sides: SGD with momentum 0.9 (default) or Adam (the lottery-ticket LeNet-300 recipe)")
    ap.add_argument("--lr", type=float, default=None, help="default 0.01 for SGD, 0.0012 for Adam")
    ap.add_argument("--no-hooks-baseline", action="store_true",
                    help="skip the 4th variant (train with torch.nn.utils.prune's multiplying hooks)")
    ap.add_argument("--abba", type=int, default=0, metavar="N",
                    help="then N ABBA blocks of the goal's two variants alone (plain, masked, masked, plain)")
    ap.add_argument("--train-subset", type=int, default=None,
                    help="training examples per epoch (default: the whole 54,000-example training split)")
    args = ap.parse_args()
    if args.lr is None:
        args.lr = 0.0012 if args.optimizer == "adam" else 0.01

    torch.set_num_threads(args.threads)
    data, data_name = load(args.train_subset, args.batch_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()},"
          f" {os.cpu_count()} logical CPUs; data {data_name}: {data.sizes['train']} training examples,"
          f" batch {args.batch_size} ({len(data.train)} steps/epoch); {args.optimizer} lr {args.lr:g};"
          f" {args.repeats} interleaved repeats\n")
    print("| model | variant | wall s/epoch (median) | ratio to plain | CPU s/epoch (median) | ratio to plain |")
    print("|---|---|---:|---:|---:|---:|")
    verdicts = []
    for model_name in args.models:
        times = bench(model_name, data, args.repeats, args.sparsity, args.lr, not args.no_hooks_baseline,
                      args.optimizer)
        plain = {k: statistics.median(v) for k, v in times[PLAIN].items()}
        for variant, ts in times.items():
            w, c = statistics.median(ts["wall"]), statistics.median(ts["cpu"])
            print(f"| {model_name} | {variant} | {w:.3f} | {w / plain['wall']:.3f} | {c:.3f} | {c / plain['cpu']:.3f} |")
        # paired: each repeat's masked epoch over the same repeat's plain epoch (seconds apart), so a
        # machine that slows down for a while slows both sides of a pair, not one side of the medians
        masked, hand = MASKED.format(sparsity=args.sparsity), HAND.format(sparsity=args.sparsity)
        goal = ratios(times, masked, PLAIN)
        ok = goal[0] <= 1.05 and goal[1] <= 1.05  # ratio of medians and paired median
        verdict = "" if args.abba else f" -> {'meets' if ok else 'MISSES'} the <= 1.05 goal"
        verdicts += [f"{model_name}, CPU time ({args.optimizer}):",
                     f"  benchkit.train masked / plain loop dense: {describe(goal)}{verdict}",
                     f"  benchkit.train masked / plain loop masked by hand: {describe(ratios(times, masked, hand))}",
                     f"  noise floor, plain loop / its second copy: {describe(ratios(times, PLAIN_AGAIN, PLAIN))}"]
        if args.abba:
            # the verdict when ABBA blocks ran: their median is the estimate drift moves least
            blocks, plains, maskeds = abba(model_name, data, args.abba, args.sparsity, args.lr, args.optimizer)
            mid, lo, hi = paired(blocks, [1.0] * len(blocks))
            verdict = ("meets" if hi <= 1.05 else "meets, interval reaching past 1.05,") if mid <= 1.05 else "MISSES"
            verdicts += [f"  ABBA, {len(blocks)} blocks of plain/masked/masked/plain: masked train / plain loop"
                         f" {mid:.3f} median (95% CI {lo:.3f}-{hi:.3f}) -> {verdict} the <= 1.05 goal",
                         f"    fastest epoch of each (least disturbed): {min(maskeds):.3f} s / {min(plains):.3f} s ="
                         f" {min(maskeds) / min(plains):.3f}; blocks " + " ".join(f"{r:.3f}" for r in blocks)]
    print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
