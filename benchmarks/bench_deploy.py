"""What bk.deploy buys on this CPU, as ratios measured in one run (issue 19's goals):

  (a) sparse Linear: one Linear layer (>= 512x512) at >= 90% unstructured sparsity, batch 64, one
      thread. Timed interleaved: dense (zeros in place), ``torch.sparse.mm`` on a CSR copy alone
      (``W.to_sparse_csr()``, what anyone would try first), and the model bk.deploy returns.
      Goals: deployed speedup >= 0.3 x theoretical (1 / density), and >= the bare CSR's.
  (b) channel-compacted models (layer-wise channel pruning, 2x and 4x): dense vs deployed.
      Goal: measured speedup >= 0.7 x the compacted theoretical one (FLOPs before / after compaction).

  (a) and (b) have two rows per case: ``runtime eager`` (bk.deploy's default, against the fastest eager
  dense model: NCHW, or channels-last for a convolutional one, or either with its convolutions run as
  fused stages where measured faster, BatchNorms folded as deploy folds them, or the model as given) and ``runtime
  compiled`` (``bk.deploy(compile=True)``, against the fastest of those and their compiled twins, timed in
  the same interleaved run: neither the compiler's, the fused kernel's, the folding's nor the layout's gain
  is credited to pruning).
  (c) never slower: element-wise pruned LeNet-300-100 and LeNet-5 at 0-98% sparsity, batch 1 and 64:
      deployed / dense time (the faster dense layout), against the noise floor (a second copy of the
      dense model timed in the same interleaved run). Goal: deployed <= dense x (1 + max(5%, noise)).

Every comparison runs its candidates round-robin (``benchkit.latency.time_callables``) in ``--rounds``
rounds and reports medians; timings need a quiet machine. Each timed call follows an untimed call of the
same candidate (warm caches, as a model runs batch after batch); ``--cold`` times each call right after
another candidate's instead, so a small pruned model is timed after the dense one evicted it from the caches.

    .venv/bin/python benchmarks/bench_deploy.py                   # full sizes
    .venv/bin/python benchmarks/bench_deploy.py --quick           # smoke test: tiny sizes, few repeats
    .venv/bin/python benchmarks/bench_deploy.py --out results/deploy/bench.md
    .venv/bin/python benchmarks/bench_deploy.py --cold --out results/deploy/bench_cold.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchkit as bk  # noqa: E402
from benchkit.config import ModelConfig  # noqa: E402
from benchkit.deployment import fused, layout  # noqa: E402
from benchkit.deployment.choose import MedianTimer  # noqa: E402
from benchkit.deployment.compiled import compile_copy, fresh_cache  # noqa: E402
from benchkit.deployment.fold import fold_batchnorm  # noqa: E402
from benchkit.deployment.stages import measured_twin  # noqa: E402
from benchkit.latency import cpu_description, time_callables  # noqa: E402
from benchkit.models import build_model  # noqa: E402
from benchkit.pruning.masks import deepcopy_model, make_permanent  # noqa: E402

WARM = True  # --cold: each timed call right after another candidate's (see benchkit.latency.time_callables)


def medians(fns: dict, rounds: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median over ``rounds`` x ``repeats`` interleaved calls (ms)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, v in time_callables(fns, threads=1, warmup=warmup, repeats=repeats, warm=WARM).items():
            times[k] += v
    return {k: statistics.median(v) for k, v in times.items()}


def bare_csr(csr: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A Linear layer as anyone would first write it with torch.sparse: ``W.to_sparse_csr()`` (int64
    indices, MKL on CPU) times the transposed input."""
    return torch.sparse.mm(csr, x.t()).t() + bias


def dense_copy(model: nn.Module) -> nn.Module:
    return make_permanent(deepcopy_model(model)).eval()


def deploys_dense(dense: nn.Module, x: torch.Tensor, args) -> dict[str, nn.Module]:
    """The dense models deploy itself times: BatchNorms folded into the convolutions (``dense folded`` when
    there were any, else the model as given, ``dense``), also in channels-last layout for a convolutional
    model, and each of those with its convolutions run as fused stages where deploy's rule keeps them
    (``stages``: each measured faster on its real input, :func:`benchkit.deployment.stages.measured_twin`)."""
    folded = deepcopy_model(dense)
    base, name = (folded, "dense folded") if fold_batchnorm(folded).batchnorms else (dense, "dense")
    models = {name: base}
    if layout.applies(base):
        models[f"{name} channels_last"] = layout.channels_last_copy(base)
    if layout.applies(base) and fused.available() is None:
        timer = MedianTimer("cpu", 1, args.warmup, args.repeats)
        for k, m in list(models.items()):
            staged, _ = measured_twin(m, (x,), timer, 0.05, channels_last=k.endswith("channels_last"))
            if staged is not None:
                models[f"{k} stages"] = staged
    return models


def dense_peers(dense: nn.Module, x: torch.Tensor, args) -> dict:
    """The dense model as given, and the dense models deploy times (:func:`deploys_dense`) eager and compiled
    (``torch.compile``, the same compile step deploy uses): a deployed model is measured against the fastest
    dense one of its runtime, so neither the compiler, the folding nor the layout is credited to pruning."""
    models = deploys_dense(dense, x, args)
    peers = {"dense": partial(dense, x), **{k: partial(m, x) for k, m in models.items()}}
    fresh_cache()  # the deploy calls before compiled up to 16 variants: room for these (see compiled.py)
    for k, m in models.items():
        compiled, why = compile_copy(m, (x,), threads=1)
        if compiled is None:
            print(f"{k} compiled: not measured ({why})", file=sys.stderr)
        else:
            peers[f"{k} compiled"] = partial(compiled, x)
    return peers


def runtimes(net: nn.Module, x: torch.Tensor, args) -> dict[str, bk.deployment.Deployment]:
    """bk.deploy eager, and with ``compile=True``."""
    return {"eager": bk.deploy(net, x, threads=1, repeats=args.repeats, warmup=args.warmup),
            "compiled": bk.deploy(net, x, threads=1, repeats=args.repeats, warmup=args.warmup, compile=True)}


def baseline(t: dict[str, float], runtime: str) -> float:
    """Eager rows against the fastest eager dense model; compiled rows against the fastest dense one."""
    return min(v for k, v in t.items() if k.startswith("dense") and (runtime != "eager" or "compiled" not in k))


@torch.no_grad()
def bench_linear(sizes: list[int], sparsities: list[float], batch: int, args) -> list[dict]:
    rows = []
    for n in sizes:
        for s in sparsities:
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(n, n))
            bk.prune(net, sparsity=s, scope="layer")
            dense = dense_copy(net)
            w, b = dense[0].weight.detach(), dense[0].bias.detach()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                csr = w.to_sparse_csr()  # what torch gives by default: int64 indices
            x = torch.randn(batch, n)
            deps = runtimes(net, x, args)
            fns = {**dense_peers(dense, x, args), "torch.sparse.mm CSR": partial(bare_csr, csr, b, x),
                   **{f"deployed {k}": partial(d.model, x) for k, d in deps.items()}}
            t = medians(fns, args.rounds, args.repeats, args.warmup)
            theory = 1 / (1 - s)
            for runtime, dep in deps.items():
                base, mine = baseline(t, runtime), t[f"deployed {runtime}"]
                speedup = base / mine
                rows.append({"layer": f"{n}x{n}", "sparsity": s, "batch": batch, "runtime": runtime,
                             "form": dep.forms["0"] + (" (compiled)" if dep.variant.endswith("_compiled") else ""),
                             "dense ms": base, "CSR ms": t["torch.sparse.mm CSR"], "deployed ms": mine,
                             "theoretical x": theory, "CSR x": base / t["torch.sparse.mm CSR"],
                             "deployed x": speedup, "deployed / theory": speedup / theory,
                             "deployed / CSR": t["torch.sparse.mm CSR"] / mine,
                             "goal": "met" if speedup >= 0.3 * theory and mine <= t["torch.sparse.mm CSR"]
                             else "not met"})
    return rows


def channel_models(quick: bool) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)  # the same networks every run (the channels a residual add keeps depend on them)
    out = [("lenet5", build_model(ModelConfig(name="lenet5"), (1, 28, 28), 10), (1, 28, 28)),
           ("lenet300", build_model(ModelConfig(name="lenet300"), (1, 28, 28), 10), (1, 28, 28))]
    if not quick:
        out.append(("resnet18 (torchvision, 3x32x32)", build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10),
                    (3, 32, 32)))
    return out


@torch.no_grad()
def bench_channels(batch: int, args) -> list[dict]:
    rows = []
    for compression in (2, 4):
        for name, fresh, shape in channel_models(args.quick):
            torch.manual_seed(0)
            net = deepcopy_model(fresh)
            exclude = [list(bk.pruning.layers.prunable_layers(net))[-1]]  # the classifier keeps its logits
            bk.prune(net, compression=compression, granularity="channel", scope="layer", exclude=exclude)
            x = torch.randn(batch, *shape)
            deps = runtimes(net, x, args)
            fns = {**dense_peers(dense_copy(net), x, args), **{f"deployed {k}": partial(d.model, x) for k, d in deps.items()}}
            t = medians(fns, args.rounds, args.repeats, args.warmup)
            for runtime, dep in deps.items():
                theory = dep.compacted_theoretical_speedup or 1.0
                base, mine = baseline(t, runtime), t[f"deployed {runtime}"]
                speedup = base / mine
                rows.append({"model": name, "channels": f"{compression}x layer-wise", "batch": batch,
                             "runtime": runtime, "variant": dep.variant, "dense ms": base, "deployed ms": mine,
                             "compacted theoretical x": theory, "ShrinkBench x": dep.theoretical_speedup,
                             "measured x": speedup, "measured / compacted theory": speedup / theory,
                             "goal": "met" if speedup >= 0.7 * theory else "not met"})
    return rows


@torch.no_grad()
def bench_never_slower(sparsities: list[float], batches: list[int], args) -> list[dict]:
    rows = []
    for name in ("lenet300", "lenet5"):
        for s in sparsities:
            torch.manual_seed(0)
            net = build_model(ModelConfig(name=name), (1, 28, 28), 10)
            if s > 0:
                bk.prune(net, sparsity=s, scope="layer")
            for batch in batches:
                x = torch.randn(batch, 1, 28, 28)
                dep = bk.deploy(net, x, threads=1, repeats=args.repeats, warmup=args.warmup)
                dense, again = dense_copy(net), dense_copy(net)
                fns = {"dense": partial(dense, x), "dense again": partial(again, x), "deployed": partial(dep.model, x),
                       **{k: partial(m, x) for k, m in deploys_dense(dense, x, args).items()}}  # the baseline: the fastest
                t = medians(fns, args.rounds, args.repeats, args.warmup)
                noise = abs(t["dense again"] / t["dense"] - 1)
                base = min(v for k, v in t.items() if k.startswith("dense") and k != "dense again")
                ratio = t["deployed"] / base
                rows.append({"model": name, "sparsity": s, "batch": batch, "variant": dep.variant,
                             "forms": ",".join(sorted(set(dep.forms.values()))), "dense ms": base,
                             "deployed ms": t["deployed"], "deployed / dense": ratio, "noise": noise,
                             "goal": "met" if ratio <= 1 + max(0.05, noise) else "not met"})
    return rows


def table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if isinstance(rows[0][c], float) else "---"
                                                         for c in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and repeats: a smoke test, not a measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None, help="also write the Markdown report here")
    p.add_argument("--cold", action="store_true",
                   help="time each call right after another candidate's (cold caches) instead of after an "
                        "untimed call of its own (warm, the default)")
    args = p.parse_args(argv)
    global WARM
    WARM = not args.cold
    torch.set_num_threads(1)
    if args.quick:
        args.rounds, args.repeats, args.warmup = 1, 2, 1
    load = os.getloadavg()[0]
    start = time.perf_counter()
    linear = bench_linear([512] if args.quick else [512, 1024, 2048], [0.9] if args.quick else [0.9, 0.95, 0.98],
                          64, args)
    channels = bench_channels(8 if args.quick else 64, args)
    never = bench_never_slower([0.0, 0.9] if args.quick else [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98],
                               [1, 8] if args.quick else [1, 64], args)
    report = "\n".join([
        "## bk.deploy: measured speedups (issue 19)", "",
        f"* machine: {cpu_description()}, {os.cpu_count()} CPUs, 1 torch thread; "
        f"torch {torch.__version__}; 1-min load {load:.1f} before, {os.getloadavg()[0]:.1f} after; "
        f"{args.rounds} rounds x {args.repeats} interleaved calls per candidate, medians, "
        + ("warm (each timed call after an untimed one of its own)" if WARM
           else "cold (each timed call right after another candidate's)")
        + (" (--quick: NOT a measurement)" if args.quick else ""),
        f"* command: `python benchmarks/bench_deploy.py{' --quick' if args.quick else ''}"
        f"{' --cold' if args.cold else ''}` "
        f"({time.perf_counter() - start:.0f} s)", "",
        "### (a) sparse Linear, batch 64: deployed >= 0.3x theoretical and >= bare torch.sparse.mm CSR", "",
        table(linear), "",
        "### (b) channel-compacted models: measured >= 0.7x compacted theoretical", "", table(channels), "",
        "### (c) never slower than dense (within max(5%, noise floor))", "", table(never), ""])
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
