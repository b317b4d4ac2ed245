"""Measured inference latency, always reported together with the setting that produced it.

A latency figure without its device, batch size, dtype and thread count is not comparable with
anything, so :class:`Latency` carries its :class:`LatencySetting`. The statistic is the median of
``repeats`` timed forward passes after ``warmup`` untimed ones (the median shrugs off the odd
scheduler hiccup on a shared machine, which the mean does not); models being compared are timed
interleaved.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from benchkit.metrics import Inputs, as_tuple, deepcopy_model


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
    """The first sample of every input repeated ``batch_size`` times along dim 0."""
    return tuple(t[:1].repeat(batch_size, *([1] * (t.dim() - 1))) for t in inputs)


@contextmanager
def _num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    untouched). Timed runs are interleaved round-robin, so load from other processes on a shared
    machine hits every model alike and their ratio stays meaningful.

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
    times: list[list[float]] = [[] for _ in nets]
    with _num_threads(threads):
        for net in nets:
            for _ in range(warmup):
                net(*xs)
        _sync(device)
        for _ in range(repeats):
            for net, t in zip(nets, times):
                start = time.perf_counter()
                net(*xs)
                _sync(device)
                t.append((time.perf_counter() - start) * 1e3)
    return [Latency(setting=setting, median_ms=float(statistics.median(t)), times_ms=t) for t in times]


def run_latency(model: nn.Module, input_shape: Sequence[int], *, batch_size: int = 1, threads: int | None = None,
                warmup: int = 10, repeats: int = 100, device: str | torch.device = "cpu") -> dict[str, float]:
    """A run's latency figures: ``latency_ms`` of the final model as deployed (masks made permanent,
    dense kernels: unstructured zeros cost the same as weights), and, when whole output channels are
    dead, ``latency_compacted_ms`` of the copy Torch-Pruning compacts and ``latency_speedup`` (their
    ratio; timed interleaved). The setting goes along: ``latency_batch_size``, ``latency_threads``,
    ``latency_warmup``, ``latency_repeats`` (the device is the run's ``benchkit.device`` tag)."""
    from benchkit.metrics import batched_shape, dead_channels
    from benchkit.pruning.compact import compact
    from benchkit.pruning.masks import make_permanent

    shape = batched_shape(model, input_shape)
    example = torch.randn((batch_size, *shape[1:]), generator=torch.Generator().manual_seed(0))
    nets = [make_permanent(deepcopy_model(model))]
    if any(n > 0 for n in dead_channels(model).values()):
        nets.append(compact(model, example[:1], measure_latency=False).model)
    timed = measure_latencies(nets, example, device=device, batch_size=batch_size, threads=threads,
                              warmup=warmup, repeats=repeats)
    setting = timed[0].setting
    out = {"latency_ms": timed[0].median_ms, "latency_batch_size": float(setting.batch_size),
           "latency_threads": float(setting.threads), "latency_warmup": float(setting.warmup),
           "latency_repeats": float(setting.repeats)}
    if len(timed) > 1:
        out["latency_compacted_ms"] = timed[1].median_ms
        out["latency_speedup"] = timed[0].median_ms / timed[1].median_ms
    return out
