"""ONNX export of a (compacted) model, checked under onnxruntime, timed beside PyTorch.

``torch.onnx.export(..., dynamo=True)`` (torch 2.14's exporter; needs ``onnx`` and ``onnxscript``)
writes one self-contained file (``external_data=False``) with a dynamic batch dimension when the model
allows it. The file is run with onnxruntime's CPU provider at the same thread count as PyTorch; its
outputs must match PyTorch's within ``atol + rtol * max|output|`` (1e-5, 1e-4), and both are timed
interleaved at the same batch size.

Sparse forms are not exported: ONNX has no CSR matmul that onnxruntime's CPU provider runs fast, and
its ``EmbeddingBag`` equivalent would be decomposed into gathers. The compacted model is the one that
ONNX runtimes speed up.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from benchkit.deployment.compact import _flatten_outputs
from benchkit.latency import time_callables, with_batch_size
from benchkit.metrics import Inputs, as_tuple


class OnnxParityError(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's beyond the tolerance."""


@dataclass
class OnnxReport:
    path: Path
    file_bytes: int
    dynamic_batch: bool
    max_abs_diff: float
    tolerance: float
    latency_torch_ms: float | None
    latency_onnxruntime_ms: float | None
    setting: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        out = {"onnx_size_bytes": float(self.file_bytes), "onnx_max_abs_diff": self.max_abs_diff}
        if self.latency_torch_ms is not None and self.latency_onnxruntime_ms is not None:
            out["onnx_latency_torch_ms"] = self.latency_torch_ms
            out["onnx_latency_onnxruntime_ms"] = self.latency_onnxruntime_ms
            out["onnx_speedup_vs_torch"] = self.latency_torch_ms / self.latency_onnxruntime_ms
        return out


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    out = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnxscript

        out["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    return out


def _export(model: nn.Module, xs: tuple[Tensor, ...], path: Path) -> bool:
    names = [f"input_{i}" for i in range(len(xs))]
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, xs, str(path), dynamo=True, external_data=False, input_names=names,
                              dynamic_shapes=tuple({0: "batch"} for _ in xs), verbose=False)
            return True
        except Exception:  # noqa: BLE001 - a model that fixes its batch size: export it static
            torch.onnx.export(model, xs, str(path), dynamo=True, external_data=False, input_names=names,
                              verbose=False)
            return False


@torch.no_grad()
def export_onnx(model: nn.Module, example_inputs: Inputs, path: str | Path, *, batch_size: int | None = None,
                threads: int | None = None, warmup: int = 3, repeats: int = 20, measure_latency: bool = True,
                rtol: float = 1e-4, atol: float = 1e-5) -> OnnxReport:
    """Export ``model`` (CPU, eval mode, a copy) to ``path``, check it under onnxruntime, time both."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("ONNX export needs onnxruntime, onnx and onnxscript: pip install onnxruntime onnx "
                          "onnxscript") from None
    from benchkit.pruning.masks import deepcopy_model, make_permanent

    net = make_permanent(deepcopy_model(model)).cpu().eval()
    inputs = tuple(t.detach().cpu() for t in as_tuple(example_inputs))
    batch_size = int(batch_size if batch_size is not None else inputs[0].shape[0])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = _export(net, with_batch_size(inputs, max(2, batch_size)), path)
    xs = with_batch_size(inputs, batch_size if dynamic else max(2, batch_size))

    options = ort.SessionOptions()
    threads = int(threads if threads is not None else torch.get_num_threads())
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs)}
    got = session.run(None, feed)
    ref = _flatten_outputs(net(*xs))
    scale = max((float(t.abs().max()) for t in ref), default=0.0)
    tolerance = atol + rtol * scale
    if len(got) != len(ref) or any(tuple(g.shape) != tuple(r.shape) for g, r in zip(got, ref)):
        raise OnnxParityError(f"onnxruntime gives outputs of shapes {[g.shape for g in got]}, PyTorch "
                              f"{[tuple(r.shape) for r in ref]}")
    diff = max((float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref)), default=0.0)
    if not diff <= tolerance:
        raise OnnxParityError(f"onnxruntime's outputs differ from PyTorch's by {diff:.3g} (allowed {tolerance:.3g})")

    lat_torch = lat_ort = None
    if measure_latency:
        times = time_callables({"torch": lambda: net(*xs), "onnxruntime": lambda: session.run(None, feed)},
                               threads=threads, warmup=warmup, repeats=repeats)
        lat_torch, lat_ort = (float(statistics.median(times[k])) for k in ("torch", "onnxruntime"))
    return OnnxReport(path=path, file_bytes=path.stat().st_size, dynamic_batch=dynamic, max_abs_diff=diff,
                      tolerance=tolerance, latency_torch_ms=lat_torch, latency_onnxruntime_ms=lat_ort,
                      setting={"batch_size": int(xs[0].shape[0]), "threads": threads, "warmup": warmup,
                               "repeats": repeats, "device": "cpu"},
                      versions=versions())
