"""Measured inference latency, always reported together with the setting that produced it.

A latency figure without its device, batch size, dtype and thread count is not comparable with
anything, so :class:`Latency` carries its :class:`LatencySetting`. The statistic is the median of
``repeats`` timed forward passes after ``warmup`` untimed ones (the median shrugs off the odd
scheduler hiccup on a shared machine, which the mean does not); models being compared are timed
interleaved.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from benchkit.metrics import Inputs, as_tuple, deepcopy_model


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU a timing ran on, e.g. ``AMD EPYC (family 26, model 2; AVX-512)``: the same VM name can
    hide CPU generations whose kernels differ by 2-4x, so every recorded timing names it."""
    info: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "AVX" if "avx" in flags else ""
    family = f"family {info['cpu family']}, model {info['model']}" if "cpu family" in info and "model" in info else ""
    details = "; ".join(p for p in (family, simd) if p)
    name = info.get("model name") or platform.processor() or platform.machine()
    return f"{name} ({details})" if details else name


@dataclass(frozen=True)
class LatencySetting:
    device: str
    batch_size: int
    dtype: str
    threads: int
    warmup: int
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Latency:
    setting: LatencySetting
    median_ms: float
    times_ms: list[float] = field(repr=False)

    def as_dict(self, prefix: str = "latency") -> dict:
        """Flat figures for tracking: ``latency_ms`` plus ``latency_<setting>`` keys."""
        out: dict = {f"{prefix}_ms": self.median_ms}
        out.update({f"{prefix}_{k}": v for k, v in self.setting.as_dict().items()})
        return out


def with_batch_size(inputs: tuple[Tensor, ...], batch_size: int) -> tuple[Tensor, ...]:
    """A batch of ``batch_size`` made of the example's own samples, taken in order and repeated cyclically
    when the example has fewer.

    Why not one sample repeated (as before): data-dependent kernels then time an unrealistically easy
    case. On this project's CPU a 4x channel-compacted LeNet-5 at batch 64 timed 0.74 ms on 64 copies of one
    image and 1.5 ms on 64 different ones: NCHW max-pooling branches on every comparison, and the branch
    predictor learns one repeated sample (a 64x5x24x24 max-pool: 220 us copied, 737 us different)."""
    out = []
    for t in inputs:
        idx = torch.arange(batch_size, device=t.device) % t.shape[0]
        out.append(t.index_select(0, idx))
    return tuple(out)


@contextmanager
def num_threads(n: int | None):
    """torch's intra-op thread count set to ``n`` (``None``: left alone) for the block, then restored."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callables(fns: Mapping[str, Callable[[], object]], *, device: str | torch.device = "cpu",
                   threads: int | None = None, warmup: int = 3, repeats: int = 10,
                   warm: bool = True) -> dict[str, list[float]]:
    """Wall times (ms) of zero-argument callables, ``warmup`` untimed calls each and then ``repeats``
    timed rounds, interleaved round-robin (load from other processes hits every callable alike, so
    their ratios stay meaningful). The device is synchronised around each call.

    ``warm`` (default): in each round a callable's timed call follows one untimed call of its own, so it
    runs with its own weights and buffers in cache, as a model does on batch after batch. Without it
    (``warm=False``) each timed call follows the previous callable's, and a small model is timed after a
    large one evicted it from the caches: a cold-cache figure, which penalises exactly the small pruned
    models being compared (a 98%-sparse 512x512 Linear at batch 64 beside a dense one whose 1 MB weight
    fills the L2 cache: 20.7 us warm, 23.7 us cold on this project's CPU; results/deploy/bench.md and
    bench_cold.md)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = torch.device(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with num_threads(threads):
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        _sync(device)
        for _ in range(repeats):
            for name, fn in fns.items():
                if warm:
                    fn()
                    _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def measure_latency(model: nn.Module, example_inputs: Inputs, **setting) -> Latency:
    """Median wall time of ``model(*inputs)``; see :func:`measure_latencies` for the setting."""
    return measure_latencies([model], example_inputs, **setting)[0]


@torch.no_grad()
def measure_latencies(
    models: Sequence[nn.Module],
    example_inputs: Inputs,
    *,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
) -> list[Latency]:
    """Median wall time of each ``model(*inputs)`` in eval mode, on copies (the callers' models are
    untouched), timed interleaved by :func:`time_callables`.

    ``batch_size`` defaults to the batch of ``example_inputs``; ``threads`` to torch's current setting.
    Floating-point inputs are cast to ``dtype`` together with the models.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    inputs = as_tuple(example_inputs)
    batch_size = int(batch_size if batch_size is not None else inputs[0].shape[0])
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    threads = int(threads if threads is not None else torch.get_num_threads())
    setting = LatencySetting(
        device=str(device), batch_size=batch_size, dtype=str(dtype).removeprefix("torch."),
        threads=threads, warmup=warmup, repeats=repeats,
    )
    nets = [deepcopy_model(m).to(device=device, dtype=dtype).eval() for m in models]
    xs = tuple(
        t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for t in with_batch_size(inputs, batch_size)
    )
    fns = {str(i): (lambda net=net: net(*xs)) for i, net in enumerate(nets)}
    times = time_callables(fns, device=device, threads=threads, warmup=warmup, repeats=repeats)
    return [Latency(setting=setting, median_ms=float(statistics.median(t)), times_ms=t) for t in times.values()]
