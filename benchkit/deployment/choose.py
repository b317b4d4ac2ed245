"""Choosing a form by measurement: timers, the choice rule, and what each choice reports.

A timer is any callable ``timer(label, {name: fn}) -> {name: ms}`` that times zero-argument callables
(``label`` names the layer, or ``"<model>"`` for whole models). The default, :class:`MedianTimer`,
interleaves them round-robin and reports medians; tests inject a fake one so the choice is
deterministic.

The rule (:func:`pick`): the fastest candidate wins only if it beats the baseline by ``min_gain``
(default 5%), else the baseline stays. A sparse form is therefore never chosen when it measured slower
than the dense layer, and not for a gain inside the timing noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from benchkit.latency import time_callables

Timer = Callable[[str, Mapping[str, Callable[[], object]]], dict[str, float]]


@dataclass
class MedianTimer:
    """Median of ``repeats`` interleaved calls after ``warmup`` untimed ones, in milliseconds."""

    device: torch.device | str = "cpu"
    threads: int | None = None
    warmup: int = 3
    repeats: int = 20

    def __call__(self, label: str, fns: Mapping[str, Callable[[], object]]) -> dict[str, float]:
        with torch.no_grad():
            times = time_callables(fns, device=self.device, threads=self.threads, warmup=self.warmup,
                                   repeats=self.repeats)
        return {name: float(statistics.median(t)) for name, t in times.items()}


def pick(times: Mapping[str, float], baseline: str, min_gain: float) -> tuple[str, str]:
    """``(chosen, why)``: the fastest of ``times`` if it beats ``times[baseline]`` by ``min_gain``
    (``t * (1 + min_gain) <= t_baseline``), else ``baseline``. Non-finite times never win."""
    if baseline not in times or not math.isfinite(times[baseline]):
        raise ValueError(f"the baseline {baseline!r} has no finite time: {dict(times)}")
    base = times[baseline]
    others = {k: v for k, v in times.items() if k != baseline and math.isfinite(v)}
    if not others:
        return baseline, f"{baseline}: no other form to compare"
    best = min(others, key=others.get)
    t = others[best]
    if t * (1 + min_gain) <= base:
        return best, f"{best} {t:.4g} ms vs {baseline} {base:.4g} ms ({base / t:.2f}x)"
    return baseline, (f"{baseline}: fastest other form {best} {t:.4g} ms is not {min_gain:.0%} faster "
                      f"than {baseline} {base:.4g} ms")


@dataclass
class LayerReport:
    """What deploy measured and chose for one prunable layer.

    ``times_ms`` holds ``original`` (the uncompacted dense layer, only when compaction changed it),
    ``dense`` (the layer as it stands after compaction) and every measured form; ``not_measured``
    says why a requested form was not measured. ``theoretical_speedup`` is ShrinkBench's per-layer
    figure (dense FLOPs / non-zero FLOPs = weights / non-zeros of the masked layer)."""

    layer: str
    type: str
    shape: tuple[int, ...]
    deployed_shape: tuple[int, ...]
    density: float
    theoretical_speedup: float
    form: str = "dense"
    reason: str = ""
    times_ms: dict[str, float] = field(default_factory=dict)
    not_measured: dict[str, str] = field(default_factory=dict)

    @property
    def baseline_ms(self) -> float:
        return self.times_ms.get("original", self.times_ms.get("dense", math.nan))

    @property
    def measured_ms(self) -> float:
        return self.times_ms.get(self.form, math.nan)

    @property
    def measured_speedup(self) -> float:
        """Time of the original dense layer / time of the chosen form (same input batch)."""
        return self.baseline_ms / self.measured_ms if self.measured_ms > 0 else math.nan

    @property
    def compacted_speedup(self) -> float:
        """Weights before / after channel compaction (the layer's FLOP ratio: same output positions)."""
        before, after = math.prod(self.shape), math.prod(self.deployed_shape)
        return before / after if after else math.inf

    @property
    def efficiency(self) -> float:
        """Measured / theoretical speedup."""
        return self.measured_speedup / self.theoretical_speedup if self.theoretical_speedup > 0 else math.nan

    def row(self) -> dict:
        out = {"layer": self.layer, "type": self.type, "shape": self.shape, "deployed_shape": self.deployed_shape,
               "density": self.density, "theoretical_speedup": self.theoretical_speedup,
               "compacted_speedup": self.compacted_speedup, "form": self.form,
               "dense_ms": self.baseline_ms, "deployed_ms": self.measured_ms,
               "measured_speedup": self.measured_speedup, "efficiency": self.efficiency, "reason": self.reason}
        out.update({f"{k}_ms": v for k, v in self.times_ms.items() if k not in ("dense", "original")})
        if "original" in self.times_ms:
            out["compacted_dense_ms"] = self.times_ms["dense"]
        return out


@torch.no_grad()
def layer_inputs(model: nn.Module, layers: dict[str, nn.Module], xs: tuple[Tensor, ...]) -> dict[str, Tensor]:
    """Each layer's first positional input on ``model(*xs)``: what a layer's candidates are timed on."""
    seen: dict[str, Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, args[0].detach())
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        model(*xs)
    finally:
        for h in handles:
            h.remove()
    return seen
