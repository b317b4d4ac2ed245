"""Structured FLOP counts under three named conventions, side by side.

For a channel-pruned network "how many multiply-adds are left" has three common answers, and papers
mix them up. All three count fvcore multiply-adds of the prunable (Conv/Linear) layers for one sample:

* ``shrinkbench``: dense FLOPs x weight density per layer (ShrinkBench's ``theoretical_speedup``, the
  figure ``benchkit.metrics`` reports). A removed output channel saves its own row only; the next
  layer still pays for the zero input channel it receives.
* ``compacted``: the FLOPs of the network Torch-Pruning actually builds after removing dead channels
  (:func:`benchkit.deployment.compact.compact`): the next layer's input work for a removed channel is
  gone too, but a channel coupled to a live one (a residual add whose other side is alive) stays,
  dense, whole.
* ``skip_zero_inputs``: every non-zero weight that only ever multiplies a zero input is skipped as
  well (:func:`benchkit.deployment.compact.zero_input_channels`): the count an ideal sparse kernel
  that knew the dead channels would pay, an upper bound on what structure buys.

Each weight of a Conv/Linear is used ``layer FLOPs / weight elements`` times per sample (output
positions), so every convention counts surviving weights times that factor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from benchkit.deployment.compact import CompactResult, compact, compacted_figures, zero_input_channels
from benchkit.metrics import batched_shape, count_flops, dead_channels, effective
from benchkit.pruning.layers import prunable_layers

CONVENTIONS = ("shrinkbench", "compacted", "skip_zero_inputs")


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else math.inf


@torch.no_grad()
def structured_flops(model: nn.Module, input_shape: Sequence[int], *, result: CompactResult | None = None
                     ) -> dict[str, float]:
    """``structured_flops_dense`` and, for each of :data:`CONVENTIONS`, ``structured_flops_<name>`` and
    ``structured_speedup_<name>`` (= dense / that count). ``result`` reuses a compaction already done."""
    shape = batched_shape(model, input_shape)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    layers = prunable_layers(model)
    per_module = count_flops(model, example).by_module
    zero_in = zero_input_channels(model, example)
    result = result if result is not None else compact(model, example, measure_latency=False)

    dense = shrink = skip = 0.0
    for name, module in layers.items():
        w = effective(module)
        flops = per_module.get(name, 0)
        per_weight = flops / w.numel()
        nonzero = w.ne(0)
        dense += flops
        shrink += per_weight * int(nonzero.sum())
        live = ~zero_in[name]
        skip += per_weight * int(nonzero.transpose(0, 1)[live].sum())
    counts = {"shrinkbench": shrink, "compacted": float(result.flops_prunable_after), "skip_zero_inputs": skip}
    out: dict[str, float] = {"structured_flops_dense": float(dense)}
    for name in CONVENTIONS:
        out[f"structured_flops_{name}"] = float(counts[name])
    for name in CONVENTIONS:
        out[f"structured_speedup_{name}"] = _ratio(dense, counts[name])
    return out


def channel_metrics(model: nn.Module, input_shape: Sequence[int]) -> dict[str, float]:
    """What a run logs about channel structure, only when some output channel is entirely dead:
    the ``compacted_*`` figures and the three :func:`structured_flops` conventions from one
    compaction. ``{}`` when no channel is dead; a compaction that fails warns and returns ``{}``."""
    if not any(n > 0 for n in dead_channels(model).values()):
        return {}
    import warnings

    shape = batched_shape(model, input_shape)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    try:
        result = compact(model, example, measure_latency=False)
    except Exception as err:  # noqa: BLE001 - implied by a dead channel, not asked for: warn, go on
        warnings.warn(f"compacted_* metrics skipped: compaction failed ({err})", stacklevel=2)
        return {}
    out: dict[str, float] = dict(compacted_figures(result))
    out.update(structured_flops(model, input_shape, result=result))
    return out
