"""Pruning time of Wanda vs SparseGPT (and magnitude) on the same language model and calibration data.

Each method prunes a fresh copy of one benchkit GPT (same seed, same weights) with
:func:`benchkit.pruning.calibrated.prune_calibrated` at 50% unstructured (or ``--granularity 2:4``),
``lm_head`` kept dense as in the papers, block by block on the same calibration windows. Methods are
run interleaved (round robin, ``--repeats`` rounds) in one process with a fixed thread count, and
the median is reported, twice: the whole call (calibration forward passes included) and the
pruning steps alone (the per-layer "seconds" of the report: metric, mask and, for SparseGPT, the
Hessian inverse and OBS update), the figure the Wanda paper's pruning-time table compares.

    .venv/bin/python benchmarks/bench_oneshot.py                       # the default model (~0.8M parameters)
    .venv/bin/python benchmarks/bench_oneshot.py --n-layer 1 --n-embd 32 --samples 4 --repeats 1   # smoke

Timings need a quiet machine; the printed ratio is SparseGPT / Wanda (how many times slower).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchkit.config import ModelConfig  # noqa: E402
from benchkit.latency import cpu_description  # noqa: E402
from benchkit.models import build_model  # noqa: E402
from benchkit.pruning.calibrated import prune_calibrated  # noqa: E402

METHODS = ["magnitude", "wanda", "sparsegpt"]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=85)
    ap.add_argument("--samples", type=int, default=128, help="calibration windows (the papers use 128)")
    ap.add_argument("--batch", type=int, default=16, help="calibration windows per forward pass")
    ap.add_argument("--granularity", default="element")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CUDA timings synchronise after each call)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kwargs = {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head}
    model = build_model(ModelConfig(name="gpt", kwargs=kwargs), (args.context,), args.vocab).eval().to(args.device)
    params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, args.vocab, (args.samples, args.context), generator=torch.Generator().manual_seed(1))
    calibration = list(tokens.split(args.batch))
    sparsity = 0.5 if args.granularity == "element" else None

    total: dict[str, list[float]] = {m: [] for m in METHODS}
    steps: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:  # interleaved: drifts of the machine hit every method alike
            net = copy.deepcopy(model)
            report = prune_calibrated(net, method, sparsity=sparsity, granularity=args.granularity,
                                      calibration=calibration, exclude=["lm_head"])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            total[method].append(report.seconds)
            steps[method].append(sum(r["seconds"] for r in report.layers))

    out = {m: {"total_s": statistics.median(total[m]), "pruning_s": statistics.median(steps[m])} for m in METHODS}
    print(f"GPT {args.n_layer}x{args.n_embd} ({params:,} parameters), context {args.context}, "
          f"{args.samples} calibration windows in batches of {args.batch}, {args.granularity}, "
          f"median of {args.repeats}, {args.threads} thread(s), {args.device}, torch {torch.__version__}, "
          f"{cpu_description()}")
    print("| method | whole call (s) | pruning steps (s) |")
    print("|---|---|---|")
    for m in METHODS:
        print(f"| {m} | {out[m]['total_s']:.4f} | {out[m]['pruning_s']:.4f} |")
    w, s = out["wanda"], out["sparsegpt"]
    print(f"sparsegpt / wanda: whole call {s['total_s'] / w['total_s']:.2f}x, "
          f"pruning steps {s['pruning_s'] / max(w['pruning_s'], 1e-12):.2f}x")
    return out


if __name__ == "__main__":
    main()
