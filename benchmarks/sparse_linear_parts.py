"""Where the time of bk.deploy's sparse Linear goes (issue 19's unmet rows: 512x512 at 95/98%, 1024x1024 at 98%).

The deployed layer is: input transposed to feature-major, CSR kernel (``F.embedding_bag``), output transposed
back and the bias added. This times each part alone, the whole deployed layer, the dense layer, and the other
routes torch offers for a CSR weight, all on one thread, batch 64, medians of 7 x 1000 calls. It shows the
bound: the two layout copies alone cost more than 0.3x of the theoretical speedup allows at 98%. The last
columns time the ``fused_csr`` form (benchkit's own kernel, :mod:`benchkit.deployment.fused`), which does
those copies in cache: the route past the bound.

    .venv/bin/python benchmarks/sparse_linear_parts.py           # ~1 min; needs a quiet machine
    .venv/bin/python benchmarks/sparse_linear_parts.py --quick   # smoke test: few calls, NOT a measurement
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchkit.deployment.forms import FORMS  # noqa: E402
from benchkit.latency import cpu_description  # noqa: E402

CALLS, ROUNDS = 1000, 7


def us(fn, calls: int | None = None, rounds: int | None = None) -> float:
    calls, rounds = calls or CALLS, rounds or ROUNDS
    for _ in range(calls // 10):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


@torch.no_grad()
def parts(size: int, sparsity: float) -> dict[str, float]:
    torch.manual_seed(0)
    layer = nn.Linear(size, size)
    w = layer.weight
    w[w.abs() <= w.abs().flatten().kthvalue(int(sparsity * w.numel())).values] = 0
    x = torch.randn(64, size)
    deployed = FORMS.get("csr").build(layer).eval()
    kernel = deployed.kernel
    xt = x.t().contiguous()
    yt = kernel(xt)
    csr, csr_t = w.to_sparse_csr(), w.t().contiguous().to_sparse_csr()
    fused = FORMS.get("fused_csr")
    why = fused.check(layer, torch.device("cpu"))
    if why is not None:
        print(f"fused_csr not measured: {why}", file=sys.stderr)
    fused_layer = fused.build(layer).eval() if why is None else None
    return {"fused_csr": us(lambda: fused_layer(x)) if fused_layer is not None else float("nan"),
            "dense": us(lambda: layer(x)), "deployed": us(lambda: deployed(x)),
            "input T": us(lambda: x.t().contiguous()), "CSR kernel": us(lambda: kernel(xt)),
            "output T + bias": us(lambda: yt.t().contiguous().add_(layer.bias)),
            "sparse.mm(W, xT)": us(lambda: torch.sparse.mm(csr, x.t())),
            "... contiguous": us(lambda: torch.sparse.mm(csr, x.t()).t().contiguous()),
            "x @ Wt_csr": us(lambda: x @ csr_t, calls=max(1, CALLS // 10))}


@torch.no_grad()
def main(argv=None) -> None:
    global CALLS, ROUNDS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20 calls, 1 round: a smoke test, NOT a measurement")
    if p.parse_args(argv).quick:
        CALLS, ROUNDS = 20, 1
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    torch.set_num_threads(1)
    print(f"machine: {cpu_description()}, 1 torch thread, torch {torch.__version__}; batch 64; microseconds\n")
    cols = ["dense", "deployed", "input T", "CSR kernel", "output T + bias", "copies / dense",
            "sparse.mm(W, xT)", "... contiguous", "x @ Wt_csr", "theory x", "deployed x", "bound x", "fused_csr",
            "fused_csr x"]
    print("| layer | sparsity | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for size, sparsity in [(512, 0.9), (512, 0.95), (512, 0.98), (1024, 0.98)]:
        t = parts(size, sparsity)
        copies = t["input T"] + t["output T + bias"]
        row = [t[c] for c in cols[:5]] + [copies / t["dense"]] + [t[c] for c in cols[6:9]]
        row += [1 / (1 - sparsity), t["dense"] / t["deployed"], t["dense"] / copies, t["fused_csr"],
                t["dense"] / t["fused_csr"]]
        print(f"| {size}x{size} | {sparsity} | " + " | ".join(f"{v:.3g}" for v in row) + " |")
    print("\nbound x = dense / (input T + output T + bias): the speedup of a kernel that took no time at all, "
          "behind torch's copies. deployed = the csr form; fused_csr = benchkit's kernel, copies in cache.")


if __name__ == "__main__":
    main()
