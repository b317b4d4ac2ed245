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
  well (:func:`zero_input_channels`): the count an ideal sparse kernel that knew the dead channels
  would pay, an upper bound on what structure buys.

Each weight of a Conv/Linear is used ``layer FLOPs / weight elements`` times per sample (output
positions), so every convention counts surviving weights times that factor.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from benchkit.deployment.compact import CompactResult, compact, compacted_figures
from benchkit.metrics import (
    Inputs,
    as_tuple,
    batched_shape,
    count_flops,
    dead_channels,
    effective,
    random_inputs,
)
from benchkit.pruning.layers import prunable_layers
from benchkit.pruning.masks import deepcopy_model, make_permanent

CONVENTIONS = ("shrinkbench", "compacted", "skip_zero_inputs")


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else math.inf


@torch.no_grad()
def zero_input_channels(model: nn.Module, example_inputs: Inputs, *, probes: int = 4, seed: int = 0
                        ) -> dict[str, Tensor]:
    """Per prunable layer, a bool per input channel/feature (``weight.shape[1]``): True where the
    layer's input is zero whatever the network's input and whatever values its surviving parameters
    take, so every weight on that channel multiplies a zero.

    Found by probing the true dataflow (residual adds, concatenations, pooling, any functional op)
    rather than a graph's coupling groups (Torch-Pruning ties the two sides of a residual add into one
    group, though a block's first conv may read a side that is dead when the sum is not). Probes, each
    on random inputs of the example's shapes:

    1. positive: every surviving parameter replaced by its magnitude, BatchNorm running means set to
       zero, inputs positive. Conv, Linear, BatchNorm, ReLU, pooling, adds and concatenations then
       keep every channel strictly positive unless no surviving weight or bias reaches it, so for
       such networks this probe alone is exact;
    2. the model's own parameters;
    3. the rest: every surviving parameter's sign drawn at random (magnitudes kept).

    A channel is claimed only if it is exactly zero at every position of every probe, so an op that
    turns a dead channel into a live one (``softmax``, ``sigmoid``, a constant shift) shows as live.
    Grouped (non-depthwise) convolutions claim nothing.
    """
    inputs = tuple(t.detach().cpu() for t in as_tuple(example_inputs))
    original = make_permanent(deepcopy_model(model)).cpu().eval()
    layers_original = prunable_layers(original)
    live = {n: torch.zeros(m.weight.shape[1], dtype=torch.bool) for n, m in layers_original.items()}
    called: set[str] = set()
    g = torch.Generator().manual_seed(seed)

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            feats = x.reshape(-1, x.shape[-1]) if isinstance(module, nn.Linear) else x.movedim(1, -1).reshape(
                -1, x.shape[1])
            live[name] |= feats.ne(0).any(dim=0)
            called.add(name)
        return record

    for probe in range(max(probes, 2)):
        net = deepcopy_model(original) if probe != 1 else original
        for p in net.parameters():
            if probe == 0:
                p.abs_()
            elif probe > 1:
                p.mul_(torch.randint(0, 2, p.shape, generator=g).to(p.dtype) * 2 - 1)
        if probe == 0:
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                    m.running_mean.zero_()
        xs = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point() else t
                   for t in inputs)
        if probe == 0:
            xs = tuple(t.abs() + 0.1 if t.is_floating_point() else t for t in xs)
        handles = [m.register_forward_pre_hook(hook(n)) for n, m in prunable_layers(net).items()]
        try:
            net(*xs)
        finally:
            for h in handles:
                h.remove()
    out = {}
    for name, m in layers_original.items():
        grouped = isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1
        out[name] = ~live[name] if name in called and not grouped else torch.zeros_like(live[name])
    return out


@torch.no_grad()
def structured_flops(model: nn.Module, input_shape: Sequence[int], *, result: CompactResult | None = None
                     ) -> dict[str, float]:
    """``structured_flops_dense`` and, for each of :data:`CONVENTIONS`, ``structured_flops_<name>`` and
    ``structured_speedup_<name>`` (= dense / that count). ``result`` reuses a compaction already done."""
    example = random_inputs(model, batched_shape(model, input_shape))
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
    example = random_inputs(model, batched_shape(model, input_shape))
    try:
        result = compact(model, example, measure_latency=False)
    except Exception as err:  # noqa: BLE001 - implied by a dead channel, not asked for: warn, go on
        warnings.warn(f"compacted_* metrics skipped: compaction failed ({err})", stacklevel=2)
        return {}
    out: dict[str, float] = dict(compacted_figures(result))
    out.update(structured_flops(model, input_shape, result=result))
    return out
