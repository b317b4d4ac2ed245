"""GPU checks for issue 19, as one prepared script for a lent CUDA machine (a few minutes on an H100/H200):

  1. a CUDA training epoch of a 2:4-pruned LeNet-300-100 with benchkit.train (masks must hold, the loss
     must be finite);
  2. 2:4 semi-structured Linear (``torch.sparse.to_sparse_semi_structured``) against dense ``F.linear``
     at fp16 and bf16, a few LLM-sized shapes, batch 64 and 4096 tokens: speedup and max |difference|;
  3. ``bk.deploy`` of a 2:4 MLP in fp16 on CUDA: which forms it picks, measured vs theoretical speedup,
     whether the deployed model saves (torch.export, else TorchScript) and loads back with torch alone;
  4. a whole 2:4 GPT (1024 wide) dense vs semi-structured, eager and replayed from a CUDA graph.

Check 2 and 4 time each 2:4 product twice: eager (what ``bk.deploy`` measures and a user's eager model
gets) and replayed from a CUDA graph (the kernels alone: torch 2.11's cuSPARSELt path builds and frees its
matmul descriptors on every eager call, pytorch/pytorch#153825, about 0.7 ms on an H200).

Prints one Markdown table (check | setting | result | status); exit code 0 when every check passed,
1 when one failed, 2 when there is no CUDA device (nothing is checked). ``--device cpu`` runs checks 1
and 3 on the CPU (2:4 kernels are CUDA only: check 2 is skipped, check 3 without them) to smoke-test
this script where no GPU is lent.

    python benchmarks/gpu_check.py                 # on the GPU machine, from the repository root
    python benchmarks/gpu_check.py --device cpu    # smoke test of the script itself
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchkit as bk  # noqa: E402
from benchkit.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from benchkit.latency import time_callables  # noqa: E402

ROWS: list[tuple[str, str, str, str]] = []


def row(check: str, setting: str, result: str, ok: bool | None) -> None:
    ROWS.append((check, setting, result, {True: "ok", False: "FAILED", None: "info"}[ok]))


def median_ms(fns: dict, device: torch.device, repeats: int = 50) -> dict[str, float]:
    times = time_callables(fns, device=device, warmup=10, repeats=repeats)
    return {k: statistics.median(v) for k, v in times.items()}


def two_four_mask(shape: tuple[int, int], device) -> torch.Tensor:
    """Keep 2 of every 4 consecutive inputs, at positions that vary by row."""
    rows, cols = shape
    base = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)
    return base[torch.arange(rows) % 4].repeat(1, cols // 4).to(device)


def check_training(device: torch.device, quick: bool) -> None:
    from benchkit.data import load_data
    from benchkit.models import build_model
    from benchkit.training import train

    samples = 512 if quick else 2048
    data = load_data(DataConfig(name="synthetic", num_samples=samples, input_shape=[1, 28, 28]), batch_size=64)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="lenet300"), data.input_shape, data.num_classes)
    bk.prune(model, granularity="2:4")
    model.to(device)
    start = time.perf_counter()
    history = train(model, data, TrainConfig(lr=0.05, batch_size=64, epochs=1, select_best=False),
                    device=device, epochs=1)
    seconds = time.perf_counter() - start
    losses = [r["train_loss"] for r in history.records if r.get("train_loss") is not None]
    held = all(float(m.weight_orig.detach()[~m.weight_mask.bool()].abs().max()) == 0
               for m in bk.pruning.layers.prunable_layers(model).values())
    where = {p.device.type for p in model.parameters()}
    ok = bool(losses) and all(v == v and abs(v) < 1e6 for v in losses) and held and where == {device.type}
    row("training step", f"lenet300 2:4, synthetic {samples}x1x28x28, batch 64, {device}",
        f"1 epoch {seconds:.2f} s, loss {losses[-1] if losses else float('nan'):.3f}, masks held {held}, "
        f"params on {sorted(where)}", ok)


def graph_ms(fn, calls: int = 20, replays: int = 7, outputs: list | None = None) -> float | str:
    """Per-call GPU time of ``fn`` replayed from a CUDA graph of ``calls`` calls (CUDA events, median of
    ``replays``): the kernels alone, without the CPU work torch does around each call (for cuSPARSELt,
    building and freeing its matmul descriptors on every call: pytorch/pytorch#153825). ``outputs``, when
    given, receives the graph's last output as the replays left it (to check it against eager)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                out = fn()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / calls)
        if outputs is not None:
            outputs.append(out)
        return statistics.median(times)
    except Exception as err:  # noqa: BLE001 - a capture torch refuses is a finding, not a crash
        return f"not capturable ({brief(err)})"


def brief(err: Exception) -> str:
    """An error on one table line: its type and the first 80 characters, whitespace collapsed."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:80]}"


def replayed(graph: dict[str, float | str]) -> str:
    """``graph_ms``'s dense and 2:4 results (times, or why a capture failed) and their ratio."""
    d, s = graph["dense"], graph["2:4"]
    text = ", ".join(f"{k} {v if isinstance(v, str) else f'{v:.4f} ms'}" for k, v in graph.items())
    return text + (f", speedup {d / s:.2f}x" if isinstance(d, float) and isinstance(s, float) else "")


def cutlass(w: torch.Tensor, x: torch.Tensor, dense_ms: float) -> str:
    """torch's other 2:4 backend (CUTLASS, built for sm_8x): its eager time, or why it refused."""
    try:
        from torch.sparse import SparseSemiStructuredTensorCUTLASS

        wc = SparseSemiStructuredTensorCUTLASS.from_dense(w)
        with torch.no_grad():
            F.linear(x, wc)
            ms = median_ms({"cutlass": lambda: F.linear(x, wc)}, x.device, repeats=20)["cutlass"]
        return f"CUTLASS eager {ms:.3f} ms ({dense_ms / ms:.2f}x)"
    except Exception as err:  # noqa: BLE001
        return f"CUTLASS refused ({brief(err)})"


def check_semi_structured(device: torch.device, quick: bool) -> None:
    from torch.sparse import to_sparse_semi_structured

    shapes = [(4096, 4096)] if quick else [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)]
    for dtype in (torch.float16, torch.bfloat16):
        for out_f, in_f in shapes:
            for tokens in (64, 4096):
                torch.manual_seed(0)
                w = torch.randn(out_f, in_f, device=device, dtype=dtype) * two_four_mask((out_f, in_f), device)
                x = torch.randn(tokens, in_f, device=device, dtype=dtype)
                setting = f"{out_f}x{in_f}, {tokens} tokens, {str(dtype).removeprefix('torch.')}"
                try:
                    ws = to_sparse_semi_structured(w)
                    with torch.no_grad():
                        ref, got = F.linear(x, w), F.linear(x, ws)
                        diff = float((got.float() - ref.float()).abs().max())
                        scale = float(ref.float().abs().max())
                        t = median_ms({"dense": lambda w=w, x=x: F.linear(x, w),
                                       "2:4": lambda ws=ws, x=x: F.linear(x, ws)}, device)
                        graph = {"dense": graph_ms(lambda w=w, x=x: F.linear(x, w)),
                                 "2:4": graph_ms(lambda ws=ws, x=x: F.linear(x, ws))}
                    speedup = t["dense"] / t["2:4"]
                    row("2:4 semi-structured vs dense", setting,
                        f"eager: dense {t['dense']:.3f} ms, 2:4 {t['2:4']:.3f} ms, speedup {speedup:.2f}x; "
                        f"CUDA-graph replay (kernels alone): {replayed(graph)}; {cutlass(w, x, t['dense'])}; "
                        f"max|diff| {diff:.3g} (max|y| {scale:.3g})", diff <= 1e-3 + 3e-2 * scale)
                except Exception as err:  # noqa: BLE001 - one row per failure, keep checking
                    row("2:4 semi-structured vs dense", setting, f"{type(err).__name__}: {err}", False)


@torch.no_grad()
def check_whole_model_graphs(device: torch.device, quick: bool) -> None:
    """A 2:4 GPT (deploy study's charlm_wide: Linear layers 1024 to 4096 wide) with every Linear it can take
    as a semi-structured weight, against the same model dense, both fp16: eager, and replayed from a CUDA
    graph (what serving stacks do to remove per-call CPU work). Outputs of both paths are checked."""
    from benchkit.deployment import study
    from benchkit.deployment.forms import FORMS
    from benchkit.pruning.layers import prunable_layers
    from benchkit.pruning.masks import deepcopy_model, make_permanent

    name = "charlm" if quick else "charlm_wide"
    torch.manual_seed(0)
    sm = study.STUDY_MODELS.get(name)()
    why = study.prune_for(sm, "2:4", None)
    if why is not None:
        row("whole model 2:4, CUDA graphs", name, f"not prunable: {why}", False)
        return
    dense = make_permanent(deepcopy_model(sm.model)).eval().to(device, torch.float16)
    sparse = deepcopy_model(dense)
    form, swapped, layers = FORMS.get("semi_structured"), 0, prunable_layers(sparse)
    for lname, layer in layers.items():
        if form.check(layer, device) is None:
            sparse.set_submodule(lname, form.build(layer))
            swapped += 1
    for batch in (1, 64):
        x = sm.inputs(batch)[0].to(device)
        ref = dense(x).float()
        scale = float(ref.abs().max())
        diff = float((sparse(x).float() - ref).abs().max())
        eager = median_ms({"dense": lambda x=x: dense(x), "2:4": lambda x=x: sparse(x)}, device, repeats=20)
        outs: list = []
        graph = {"dense": graph_ms(lambda x=x: dense(x), calls=5, outputs=outs),
                 "2:4": graph_ms(lambda x=x: sparse(x), calls=5, outputs=outs)}
        graph_diff = (float((outs[1].float() - ref).abs().max()) if len(outs) == 2 else float("nan"))
        ok = diff <= 1e-2 + 3e-2 * scale and (len(outs) < 2 or graph_diff <= 1e-2 + 3e-2 * scale)
        row("whole model 2:4, CUDA graphs",
            f"{name} ({swapped} of {len(layers)} Linear layers 2:4), batch {batch} x {x.shape[1]} tokens, float16",
            f"eager: dense {eager['dense']:.3f} ms, 2:4 {eager['2:4']:.3f} ms ({eager['dense'] / eager['2:4']:.2f}x); "
            f"CUDA-graph replay: {replayed(graph)}; max|diff| eager {diff:.3g}, replayed {graph_diff:.3g} "
            f"(max|y| {scale:.3g})", ok)


def check_deploy(device: torch.device, quick: bool) -> None:
    torch.manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    d, h, batch = (256, 512, 64) if quick else (1024, 4096, 256)
    net = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))
    bk.prune(net, granularity="2:4")
    net = net.to(device=device, dtype=dtype)
    x = torch.randn(batch, d, device=device, dtype=dtype)
    forms = ["dense", "semi_structured", "csr"]
    dep = bk.deploy(net, x, device=device, forms=forms, repeats=30, warmup=5)
    chosen = ", ".join(f"{k}:{v}" for k, v in dep.forms.items())
    why = "; ".join(f"{r.layer}: {r.not_measured}" for r in dep.layers if r.not_measured)
    row("bk.deploy 2:4 MLP", f"{d}-{h}-{h}-{d}, batch {batch}, {str(dtype).removeprefix('torch.')}, {device}",
        f"variant {dep.variant}, forms [{chosen}], measured {dep.measured_speedup:.2f}x vs theoretical "
        f"{dep.theoretical_speedup:.2f}x, max|diff| {dep.max_abs_diff:.3g} <= {dep.tolerance:.3g}"
        + (f"; not measured: {why}" if why else ""), True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            saved = dep.save(Path(tmp) / "model")
            loaded = bk.load_deployed(saved.path)
            with torch.no_grad():
                diff = float((loaded(x).float() - dep.model(x).float()).abs().max())
            row("save + load with torch alone", f"{saved.format}, dynamic batch {saved.dynamic_batch}",
                f"{saved.path.name}: max|loaded - deployed| {diff:.3g}" + (f"; {saved.note}" if saved.note else ""),
                True)
        except Exception as err:  # noqa: BLE001
            row("save + load with torch alone", "torch.export, then TorchScript", f"{type(err).__name__}: {err}",
                False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test of this script)")
    p.add_argument("--quick", action="store_true", help="small sizes: one shape per dtype in check 2, a small MLP")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    env = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        env += f", {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})"
        env += f", cuSPARSELt {torch.backends.cusparselt.is_available()}"
    row("environment", "", env, None)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(table())
        print("\nno CUDA device: nothing checked (run on a GPU machine, or --device cpu to smoke-test the script)")
        return 2
    for check in (lambda: check_training(device, args.quick),
                  lambda: check_semi_structured(device, args.quick) if device.type == "cuda" else row(
                      "2:4 semi-structured vs dense", "", "skipped: CUDA only", None),
                  lambda: check_deploy(device, args.quick),
                  lambda: check_whole_model_graphs(device, args.quick) if device.type == "cuda" else row(
                      "whole model 2:4, CUDA graphs", "", "skipped: CUDA only", None)):
        try:
            check()
        except Exception as err:  # noqa: BLE001 - report and go on with the next check
            row("error", "", f"{type(err).__name__}: {err} | {traceback.format_exc(limit=3)!r}", False)
    print(table())
    return 1 if any(r[3] == "FAILED" for r in ROWS) else 0


def table() -> str:
    lines = ["| check | setting | result | status |", "|---|---|---|---|"]
    lines += [f"| {c} | {s} | {r.replace('|', '/')} | {st} |" for c, s, r, st in ROWS]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
