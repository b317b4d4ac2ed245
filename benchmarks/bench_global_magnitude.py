"""Global magnitude masks on torchvision VGG-16 (138M conv+linear weights), three ways in one run:

  torch          torch.nn.utils.prune.global_unstructured(..., L1Unstructured)   (computes and applies masks)
  numpy          ShrinkBench style: params -> numpy, np.abs, concatenate, np.partition threshold,
                 masks in numpy, back to torch bool tensors                       (computes masks)
  benchkit       benchkit.pruning.engine.compute_masks (what bk.prune computes)   (computes masks)
  benchkit+apply bk.prune(...) end to end: masks computed and held by torch.nn.utils.prune

Every method runs in its own subprocess on a fresh VGG-16 built with the same seed, single-threaded
(torch.set_num_threads(1)). Peak extra memory = peak RSS during the call (VmHWM, reset just before it
via /proc/self/clear_refs) minus RSS just before it: torch's allocations are included, unlike
tracemalloc. The masks of every method are compared with each other afterwards.

    .venv/bin/python benchmarks/bench_global_magnitude.py              # print the table
    .venv/bin/python benchmarks/bench_global_magnitude.py --write      # also update results/benchmarks.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "benchmarks.md"
HEADING = "## Global magnitude masks (issue 2)"
METHODS = ["torch", "numpy", "benchkit", "benchkit+apply"]


# ------------------------------------------------------------------------------------------ child side
def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def prunable(model):
    import torch.nn as nn

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def run_torch(model, compression):
    from torch.nn.utils import prune

    layers = prunable(model)
    prune.global_unstructured([(m, "weight") for _, m in layers], prune.L1Unstructured, amount=1 - 1 / compression)
    return lambda: {n: m.weight_mask.bool() for n, m in layers}


def run_numpy(model, compression):
    import numpy as np
    import torch

    layers = prunable(model)
    params = {n: m.weight.detach().cpu().numpy() for n, m in layers}
    importances = {n: np.abs(p) for n, p in params.items()}
    flat = np.concatenate([imp.ravel() for imp in importances.values()])
    k = round((1 - 1 / compression) * flat.size)
    threshold = np.partition(flat, k - 1)[k - 1]  # k-th smallest: everything <= it is pruned
    masks = {n: torch.from_numpy(imp > threshold) for n, imp in importances.items()}
    return lambda: masks


def run_benchkit(model, compression):
    from benchkit.pruning.engine import compute_masks, plan_pruning

    plan = plan_pruning(model, compression=compression, criterion="magnitude", granularity="element", scope="global")
    masks, _ = compute_masks(model, plan)
    return lambda: {k[: -len(".weight")]: v for k, v in masks.items()}


def run_benchkit_apply(model, compression):
    import benchkit as bk

    report = bk.prune(model, compression=compression, criterion="magnitude", granularity="element", scope="global")
    return lambda: {k[: -len(".weight")]: v for k, v in report.masks.items()}


RUNNERS = {"torch": run_torch, "numpy": run_numpy, "benchkit": run_benchkit, "benchkit+apply": run_benchkit_apply}


def child(method: str, compression: float, seed: int, out: str | None) -> None:
    import numpy as np
    import torch
    import torchvision

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = torchvision.models.vgg16(weights=None)
    n_weights = sum(m.weight.numel() for _, m in prunable(model))
    gc.collect()
    base = rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    get_masks = RUNNERS[method](model, compression)
    seconds = time.perf_counter() - t0
    peak = peak_bytes()
    masks = get_masks()
    kept = sum(int(m.sum()) for m in masks.values())
    result = {
        "method": method,
        "seconds": seconds,
        "rss_before": base,
        "peak_extra": peak - base,
        "weights": n_weights,
        "kept": kept,
    }
    if out:
        names = [n for n, _ in prunable(model)]
        flat = torch.cat([masks[n].reshape(-1) for n in names]).numpy()
        np.save(out, np.packbits(flat))
        if method == "numpy":  # how many weights share the threshold value (ties decide the last few)
            w = torch.cat([m.weight_orig.detach().abs().reshape(-1) if hasattr(m, "weight_orig") else
                           m.weight.detach().abs().reshape(-1) for _, m in prunable(model)])
            k = round((1 - 1 / compression) * w.numel())
            t = torch.kthvalue(w, k).values
            result["tied_at_threshold"] = int((w == t).sum())
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ parent side
def run_child(method: str, compression: float, seed: int, out: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", method, "--compression", str(compression), "--seed", str(seed)]
    if out:
        cmd += ["--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{method} failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def mismatches(a: str, b: str) -> int:
    import numpy as np

    x, y = np.load(a), np.load(b)
    return int(np.unpackbits(np.bitwise_xor(x, y)).sum())


def hardware() -> str:
    import torch

    from benchkit.latency import cpu_description

    return (
        f"{os.cpu_count()}-core CPU ({cpu_description()}), no GPU, "
        f"1 thread per method; Python {platform.python_version()}, torch {torch.__version__}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compression", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=3, help="subprocess runs per method (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--write", action="store_true", help=f"replace the '{HEADING}' section of {RESULTS}")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.compression, args.seed, args.out)
        return

    runs: dict[str, list[dict]] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for method in args.methods:
            for r in range(args.repeats):
                out = os.path.join(tmp, f"{method.replace('+', '_')}.npy") if r == 0 else None
                res = run_child(method, args.compression, args.seed, out)
                runs.setdefault(method, []).append(res)
                print(f"{method:<15} run {r + 1}: {res['seconds']:.3f} s, peak extra {res['peak_extra'] / 2**20:.0f} MiB",
                      flush=True)
            files[method] = os.path.join(tmp, f"{method.replace('+', '_')}.npy")
        ref = args.methods[0]
        diff = {m: mismatches(files[ref], files[m]) for m in args.methods}

    first = runs[args.methods[0]][0]
    weights, kept = first["weights"], first["kept"]
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    peak = {m: max(r["peak_extra"] for r in rs) for m, rs in runs.items()}
    weight_mb = weights * 4 / 1e6
    cmd = ".venv/bin/python benchmarks/bench_global_magnitude.py" + (
        f" --compression {args.compression:g}" if args.compression != 8 else "") + (
        f" --repeats {args.repeats}" if args.repeats != 3 else "")
    lines = [
        HEADING,
        "",
        f"Global magnitude masks for torchvision VGG-16 (`vgg16(weights=None)`, seed {args.seed}): "
        f"{weights:,} conv+linear weights ({weight_mb:.0f} MB as float32), compression {args.compression:g}x "
        f"({weights - kept:,} pruned, {kept:,} kept).",
        "",
        f"* hardware: {hardware()}",
        f"* command: `{cmd}` (each method in a fresh subprocess, {args.repeats} runs, median time, max peak)",
        f"* date: {time.strftime('%Y-%m-%d')}; 1-min load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after (the machine is shared, so absolute times are noisy)",
        "",
        "| method | what is timed | median s | runs (s) | peak extra memory (MiB) | mask differences vs "
        f"`{ref}` |",
        "|---|---|---:|---|---:|---:|",
    ]
    what = {
        "torch": "`prune.global_unstructured(L1Unstructured)`: compute + apply",
        "numpy": "ShrinkBench-style numpy: compute masks",
        "benchkit": "`compute_masks` (bk.prune's selection): compute masks",
        "benchkit+apply": "`bk.prune(...)`: compute + apply (masks held by torch.nn.utils.prune)",
    }
    for m in args.methods:
        times = ", ".join(f"{r['seconds']:.2f}" for r in runs[m])
        lines.append(f"| {m} | {what[m]} | {med[m]:.3f} | {times} | {peak[m] / 2**20:.0f} | {diff[m]} |")
    lines.append("")
    ratio_lines = []
    if "torch" in med and "benchkit+apply" in med:
        ratio_lines.append(f"* torch / bk.prune end to end (both compute and apply): **{med['torch'] / med['benchkit+apply']:.1f}x**")
    if "torch" in med and "benchkit" in med:
        ratio_lines.append(f"* torch (compute + apply) / benchkit masks: **{med['torch'] / med['benchkit']:.1f}x**")
    if "numpy" in med and "benchkit" in med:
        ratio_lines.append(f"* numpy / benchkit masks (both compute masks only): **{med['numpy'] / med['benchkit']:.1f}x**")
    lines += ratio_lines
    if "numpy" in runs and "tied_at_threshold" in runs["numpy"][0]:
        lines.append(f"* weights whose |w| equals the threshold value: {runs['numpy'][0]['tied_at_threshold']}"
                     " (ties are the only place the methods may legitimately disagree)")
    lines += goals(med, peak, weights * 4)
    lines.append("")
    section = "\n".join(lines)
    print()
    print(section)
    if args.write:
        write_section(section)
        print(f"\nwrote {RESULTS}")


def goals(med: dict[str, float], peak: dict[str, int], weight_bytes: int) -> list[str]:
    """The issue's targets, checked against this run's numbers."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    out = ["", "Goals (issue 2):", ""]
    if "torch" in med and "benchkit+apply" in med:
        r = med["torch"] / med["benchkit+apply"]
        out.append(f"* >= 20x faster than torch.nn.utils.prune: {verdict(r >= 20)} ({r:.1f}x end to end)")
    if "numpy" in med and "benchkit" in med:
        r = med["numpy"] / med["benchkit"]
        out.append(f"* >= 2x faster than the numpy path: {verdict(r >= 2)} ({r:.1f}x)")
    if "benchkit" in peak:
        mib = peak["benchkit"] / 2**20
        out.append(f"* peak extra memory <= one copy of the weights ({weight_bytes / 2**20:.0f} MiB) while computing "
                   f"the masks: {verdict(peak['benchkit'] <= weight_bytes)} ({mib:.0f} MiB, of which "
                   f"{weight_bytes / 4 / 2**20:.0f} MiB are the bool masks themselves)")
    if "benchkit+apply" in peak:
        mib = peak["benchkit+apply"] / 2**20
        out.append(
            f"* the same for `bk.prune` including holding the masks: {verdict(peak['benchkit+apply'] <= weight_bytes)} "
            f"({mib:.0f} MiB). torch.nn.utils.prune keeps, per layer, a float32 `weight_mask` buffer and the masked "
            f"`weight` tensor next to `weight_orig`: 2 x {weight_bytes / 2**20:.0f} MiB that stay for the model's "
            "lifetime whichever method computed the masks (torch's own global_unstructured peaks far higher)")
    return out


def write_section(section: str) -> None:
    """Replace our section (up to the next '## ' heading) or append it; other sections are kept."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n\n"
    if HEADING in text:
        start = text.index(HEADING)
        nxt = text.find("\n## ", start + len(HEADING))
        end = len(text) if nxt < 0 else nxt + 1
        text = text[:start] + section + ("\n" if nxt >= 0 else "") + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text if text.endswith("\n") else text + "\n")


if __name__ == "__main__":
    main()
