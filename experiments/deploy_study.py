"""Theory vs practice (issue 19): theoretical and measured speedups of element, N:M, kernel and channel
pruning at 50-98% sparsity on LeNet-300-100, LeNet-5 and torchvision's resnet18 (1x28x28 inputs, the
Fashion-MNIST shape; random weights and inputs: speed does not depend on training), batch 1 and 64,
one thread; and the break-even sparsity of each CPU kernel. Writes results/deploy/study.{csv,md} and
break_even.csv. Needs a quiet machine: every figure is a ratio of times measured in the same run.

    .venv/bin/python experiments/deploy_study.py                       # the full study (tens of minutes)
    .venv/bin/python experiments/deploy_study.py --quick --out /tmp/s  # smoke test: tiny grid, NOT a measurement
    .venv/bin/python experiments/deploy_study.py --models lenet5,charlm  # any name in STUDY_MODELS
    python experiments/deploy_study.py --device cuda --dtype float16 --out results/deploy/gpu  # on a GPU:
        # 2:4 semi-structured tensor cores and cuSPARSE CSR against CUDA dense (--kernels for others)

More models: register them in benchkit.deployment.study.STUDY_MODELS (see its docstring), e.g. the
language model of the transformer issue, then pass its name to --models.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from benchkit.deployment import study  # noqa: E402
from benchkit.deployment.forms import FORMS  # noqa: E402
from benchkit.latency import cpu_description  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="lenet300,lenet5,resnet18",
                   help=f"comma-separated names in STUDY_MODELS ({', '.join(study.STUDY_MODELS.names())})")
    p.add_argument("--granularities", default=",".join(study.GRANULARITIES))
    p.add_argument("--sparsities", default=",".join(str(s) for s in study.SPARSITIES))
    p.add_argument("--batches", default=",".join(str(b) for b in study.BATCHES))
    p.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU run: see --dtype)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="the deployed models' dtype (2:4 tensor cores take float16 / bfloat16)")
    p.add_argument("--kernels", default=None,
                   help=f"comma-separated deploy forms to measure beside dense (default {','.join(study.KERNELS)} "
                        f"on cpu, {','.join(study.CUDA_KERNELS)} on cuda)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "results" / "deploy"))
    p.add_argument("--quick", action="store_true", help="LeNet-300-100 only, 2 sparsities, batch 1 and 8, 2 repeats")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    granularities = [g.strip().lower() for g in args.granularities.split(",") if g.strip()]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        models, sparsities, batches, args.repeats, args.warmup = ["lenet300"], [0.5, 0.9], [1, 8], 2, 1
    for name in models:
        study.STUDY_MODELS.get(name)  # an unknown name fails here, listing the registered ones
    if not all(0 < s < 1 for s in sparsities) or not all(b >= 1 for b in batches):
        p.error("sparsities must be in (0, 1) and batches >= 1")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device here")
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()] if args.kernels else None
    for k in kernels or ():
        FORMS.get(k)  # an unknown form fails here, listing the registered ones
    dtype = getattr(torch, args.dtype)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    rows: list[dict] = []
    stopped = ""
    # SIGTERM (e.g. `timeout`) stops the study like Ctrl-C: the rows measured so far are written, marked partial
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        study.run_study(models, granularities=granularities, sparsities=sparsities, batches=batches,
                        kernels=kernels, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                        device=args.device, dtype=dtype, rows=rows)
    except KeyboardInterrupt:
        stopped = f" — PARTIAL: stopped after {len(rows)} rows"
        print(f"stopped: writing the {len(rows)} rows measured so far", file=sys.stderr)
        if not rows:
            return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    df = pd.DataFrame(rows)
    cmd = "python experiments/deploy_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    where = cpu_description()
    if cuda:
        where = (f"{torch.cuda.get_device_name(args.device)} (CUDA {torch.version.cuda}, cuSPARSELt "
                 f"{torch.backends.cusparselt.is_available()}), {args.dtype}; host {where}")
    header = "\n".join([
        f"# Theory vs practice: measured speedups of pruned models on this {'GPU' if cuda else 'CPU'}"
        " (issue 19)", "",
        f"* command: `{cmd.strip()}` ({time.perf_counter() - start:.0f} s)"
        + (" — --quick: a smoke test, NOT a measurement" if args.quick else "") + stopped,
        f"* machine: {where}, {os.cpu_count()} CPUs, {args.threads} torch thread(s), torch "
        f"{torch.__version__}; 1-min load {load:.1f} before, {os.getloadavg()[0]:.1f} after; "
        f"{args.repeats} interleaved calls per candidate after {args.warmup} warm-up, each timed call after an "
        "untimed one of its own (warm caches), medians",
        "* models: random weights, magnitude pruning layer by layer; inputs 1x28x28 (Fashion-MNIST's shape) for "
        "the image models, windows of 128 token ids for charlm",
        "* columns: theoretical_* = FLOP ratios (ShrinkBench's dense/non-zero; after channel compaction), "
        "measured_deployed = dense / bk.deploy's model (whole network), layers_<kernel> = prunable layers' "
        "dense time / their time in that kernel (csr = CSR through F.embedding_bag, fused_csr = benchkit's own "
        "CSR kernel, Linear layers only, torch_csr = torch.sparse.mm on CSR (cuSPARSE on CUDA), torch_bsr8 = "
        "BSR 8x8, semi_structured = 2:4 sparse tensor cores)"])
    for path in study.write(df, args.out, header=header):
        print(f"wrote {path}")
    return 130 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
