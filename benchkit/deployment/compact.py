"""Physical compaction: turn masked-out channels into a genuinely smaller dense network.

A channel mask only zeroes numbers; the tensors keep their size and the FLOPs are still spent.
Here the dead channels are removed with Torch-Pruning's dependency graph, which knows which
tensors must shrink together (a conv's output channels, the BatchNorm after it, the next layer's
input channels, both sides of a residual add, the slices of a concat).

A channel index is removed only when **every producer in its coupled group is dead** at that index,
because only then is the channel zero whatever the input:

* Conv/Linear producing it: the weight row and the bias entry are zero;
* BatchNorm: ``gamma`` and ``beta`` are zero (its output is then zero in train and eval mode);
* depthwise conv (its input and output channel are one): kernel and bias zero.

Layers that merely *consume* the channel (the next conv's input channels) impose nothing: a zero
input contributes nothing. Any other parametrised member (LayerNorm, GroupNorm, PReLU, an unwrapped
``nn.Parameter``, grouped or transposed conv, ...) is conservatively treated as alive. A residual
add whose two sides are dead at different indices therefore keeps both sets. Groups that reach the
model output (the final classifier's logits) are never touched. The result is checked: the compact
model must reproduce the masked model's outputs on ``example_inputs``.

Attention heads (:mod:`benchkit.pruning.units`): Torch-Pruning's graph couples the rows of ``q_proj``,
``k_proj`` and ``v_proj`` and the columns of ``out_proj`` through ``scaled_dot_product_attention`` (they
share one index space), so removing a dead head's rows is one group; only whole heads are removed (rows of
a partly dead head stay, or the remaining rows would regroup into the wrong heads), and the module's head
count (``n_head`` / ``num_heads``) is lowered, the head size kept. Torch-Pruning's dependency graph does the
removal; the head count is benchkit's (as Torch-Pruning's own ViT examples set ``num_heads`` after pruning).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import Tensor, nn

from benchkit import latency as _latency
from benchkit.latency import Latency
from benchkit.metrics import (
    Inputs,
    as_tuple,
    batched_shape,
    count_flops,
    dead_channels,
    deepcopy_model,
    dense_size_bytes,
    random_inputs,
)
from benchkit.pruning.layers import prunable_layers
from benchkit.pruning.masks import make_permanent
from benchkit.pruning.units import Attention, attentions


class CompactionError(RuntimeError):
    """The compacted model does not reproduce the masked one (a coupling this module cannot see)."""


@dataclass
class CompactResult:
    """The compact model and what compaction bought. FLOPs are fvcore multiply-adds for one sample
    (``flops_*``: whole model; ``flops_prunable_*``: Conv/Linear layers only); params count all
    parameters; ``channels`` maps each prunable layer to its output channels (before, after)."""

    model: nn.Module
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    flops_prunable_before: int
    flops_prunable_after: int
    channels: dict[str, tuple[int, int]]
    max_abs_diff: float
    latency_masked: Latency | None = field(default=None, repr=False)
    latency_compact: Latency | None = field(default=None, repr=False)

    @property
    def removed(self) -> dict[str, int]:
        """Output channels removed per prunable layer (only layers that lost some)."""
        return {k: b - a for k, (b, a) in self.channels.items() if b != a}

    @property
    def flops_speedup(self) -> float:
        return self.flops_prunable_before / self.flops_prunable_after

    @property
    def latency_speedup(self) -> float | None:
        if self.latency_masked is None or self.latency_compact is None:
            return None
        return self.latency_masked.median_ms / self.latency_compact.median_ms

    def as_dict(self) -> dict[str, int | float | str]:
        """Flat figures for tracking (``compact_*``), latency with its setting when measured."""
        out: dict[str, int | float | str] = {
            "compact_params_before": self.params_before,
            "compact_params_after": self.params_after,
            "compact_flops_before": self.flops_before,
            "compact_flops_after": self.flops_after,
            "compact_flops_prunable_before": self.flops_prunable_before,
            "compact_flops_prunable_after": self.flops_prunable_after,
            "compact_max_abs_diff": self.max_abs_diff,
        }
        if self.latency_masked is not None and self.latency_compact is not None:
            out.update(self.latency_masked.as_dict("latency_masked"))
            out["latency_compact_ms"] = self.latency_compact.median_ms
            out["latency_speedup"] = self.latency_speedup
        return out


# ---------------------------------------------------------------------------------------------
# which entries of a group are dead


def _is_depthwise(conv: nn.modules.conv._ConvNd) -> bool:
    # Torch-Pruning's own test: it then prunes input and output channels as one.
    return conv.groups > 1 and conv.groups == conv.out_channels


def _rows_zero(module: nn.Module, idxs: Tensor) -> Tensor:
    dead = module.weight.detach()[idxs].flatten(1).eq(0).all(dim=1)
    if module.bias is not None:
        dead &= module.bias.detach()[idxs].eq(0)
    return dead


def _is_consumer(item, dg: tp.DependencyGraph) -> bool:
    """The member is a Conv/Linear whose *input* channels are the group's channels."""
    module, handler = item.dep.target.module, item.dep.handler
    if isinstance(module, nn.modules.conv._ConvNd) and _is_depthwise(module):
        return False  # its input channel is its output channel
    in_only = dg.is_in_channel_pruning_fn(handler) and not dg.is_out_channel_pruning_fn(handler)
    return in_only and isinstance(module, nn.modules.conv._ConvNd | nn.Linear)


def _member_dead(item, dg: tp.DependencyGraph) -> Tensor | None:
    """Per-index dead flags of one group member, or ``None`` if it only consumes the channels."""
    module = item.dep.target.module
    idxs = torch.as_tensor(item.idxs, dtype=torch.long)
    unknown = torch.zeros(len(idxs), dtype=torch.bool)
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed or (module.groups > 1 and not _is_depthwise(module)):
            return unknown
        return None if _is_consumer(item, dg) else _rows_zero(module, idxs)
    if isinstance(module, nn.Linear):
        return None if _is_consumer(item, dg) else _rows_zero(module, idxs)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.affine:
            return unknown
        return module.weight.detach()[idxs].eq(0) & module.bias.detach()[idxs].eq(0)
    if isinstance(module, nn.Module) and next(module.parameters(), None) is None:
        return None  # parameter-free op (ReLU, pooling, add, concat, flatten): passes zeros through
    return unknown


def _dead_roots(group, dg: tp.DependencyGraph, n: int) -> Tensor:
    """Root indices dead in every producing member (a root may map to several member indices)."""
    alive = torch.zeros(n, dtype=torch.long)
    for item in group:
        flags = _member_dead(item, dg)
        if flags is None:
            continue
        roots = torch.as_tensor(item.root_idxs, dtype=torch.long)
        alive.index_add_(0, roots, (~flags).long())
    return alive == 0


def _reaches_output(group, dg: tp.DependencyGraph) -> bool:
    """True if the group's channels are (part of) the model output, e.g. the classifier's logits:
    some member other than a consumer is the model's output op or a node nothing reads."""
    return any(
        not _is_consumer(item, dg) and (not item.dep.target.outputs or item.dep.target.type == tp.ops.OPTYPE.OUTPUT)
        for item in group
    )


def _remove_dead_heads(model: nn.Module, dg: tp.DependencyGraph, layer: nn.Module, att: Attention,
                       dead: Tensor) -> None:
    """Remove the heads whose rows are dead in q, k and v (Torch-Pruning's group also takes out_proj's
    columns), then update the attention's head count: the head size stays, the count shrinks. Rows of a
    partly dead head stay (removing them would regroup the others' rows into the wrong heads)."""
    d = att.head_dim
    dead_heads = dead.reshape(-1, d).all(dim=1)
    if bool(dead_heads.all()):
        dead_heads[0] = False  # keep one (all-zero) head: zero-width tensors break most ops
    heads = torch.nonzero(dead_heads).flatten()
    if not heads.numel():
        return
    idxs = (heads[:, None] * d + torch.arange(d)).flatten().tolist()
    prune_out = dg.get_pruner_of_module(layer).prune_out_channels
    group = dg.get_pruning_group(layer, prune_out, idxs)
    if not dg.check_pruning_group(group):
        return
    group.prune()
    module = model.get_submodule(att.name)
    setattr(module, att.head_attr, getattr(module, att.head_attr) - int(heads.numel()))


def _aligned(idxs: list[int], n: int, align: int) -> list[int]:
    """The dead indices to remove so that the channels kept number a multiple of ``align`` (at most
    ``n``): the last dead ones stay, as zero channels."""
    keep = n - len(idxs)
    return idxs[:n - min(n, -(-keep // align) * align)]


def _remove_dead_channels(model: nn.Module, inputs: tuple[Tensor, ...], align: int = 1) -> None:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
    head_rows = {model.get_submodule(n): att for att in attentions(model) for n in att.rows}
    for layer in prunable_layers(model).values():
        if layer not in dg.module2node:
            continue  # never called on these inputs
        prune_out = dg.get_pruner_of_module(layer).prune_out_channels
        n = layer.weight.shape[0]
        group = dg.get_pruning_group(layer, prune_out, list(range(n)))
        if _reaches_output(group, dg):
            continue
        if layer in head_rows:  # q/k/v rows come out a whole head at a time
            _remove_dead_heads(model, dg, layer, head_rows[layer], _dead_roots(group, dg, n))
            continue
        idxs = torch.nonzero(_dead_roots(group, dg, n)).flatten().tolist()
        if len(idxs) == n:
            idxs = idxs[1:]  # keep one (all-zero) channel: zero-width tensors break most ops
        idxs = _aligned(idxs, n, align)
        while idxs:
            group = dg.get_pruning_group(layer, prune_out, idxs)
            if dg.check_pruning_group(group):  # no coupled member may lose all its channels
                group.prune()
                break
            idxs = idxs[:-1]


# ---------------------------------------------------------------------------------------------


def _flatten_outputs(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, Sequence) and not isinstance(out, str):
        return [t for v in out for t in _flatten_outputs(v)]
    return []


@torch.no_grad()
def _max_abs_diff(ref: list[Tensor], model: nn.Module, inputs: tuple[Tensor, ...]) -> float:
    outs = _flatten_outputs(model(*inputs))
    if len(outs) != len(ref) or any(x.shape != y.shape for x, y in zip(outs, ref)):
        return float("inf")
    return max((float((x - y).abs().max()) for x, y in zip(outs, ref)), default=0.0)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compact(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    measure_latency: bool = True,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    align: int = 1,
) -> CompactResult:
    """Physically remove dead output channels/neurons from a copy of ``model`` (see module docstring).

    ``align`` > 1 keeps each layer's channel count a multiple of ``align`` (never above the original) by
    leaving some dead channels in as zeros: the outputs are the same, and a GEMM whose output width is a
    multiple of the SIMD width runs faster (on this project's CPU, 784->72 and 784->80 Linear layers at
    batch 64 took 78 and 81 us, 784->75 took 101 us). Attention heads are not aligned (whole heads only).

    The copy gets its masks made permanent, is compacted on CPU, checked against the masked model
    (outputs in eval mode must agree within ``rtol``/``atol``, else :class:`CompactionError`), then
    moved to the model's device and training mode. Latency of both (``measure_latency``) uses
    :func:`benchkit.latency.measure_latencies` (interleaved) with the given setting (device defaults to the model's).
    """
    if not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be an integer >= 1 (1: exact compaction), got {align!r}")
    inputs = tuple(t.detach().cpu() for t in as_tuple(example_inputs))
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    requires_grad = {name.removesuffix("_orig"): p.requires_grad for name, p in model.named_parameters()}

    masked = deepcopy_model(model).cpu().eval()
    net = make_permanent(deepcopy_model(masked))
    for p in net.parameters():
        p.requires_grad_(True)  # Torch-Pruning traces the graph through autograd
    channels_before = {name: int(m.weight.shape[0]) for name, m in prunable_layers(net).items()}
    params_before = _num_params(net)
    with torch.enable_grad():
        _remove_dead_channels(net, inputs, align)
    net.eval()

    with torch.no_grad():
        ref = _flatten_outputs(masked(*inputs))
    diff = _max_abs_diff(ref, net, inputs)
    scale = max((float(t.abs().max()) for t in ref), default=0.0)
    if not diff <= atol + rtol * scale:
        raise CompactionError(
            f"compacted model differs from the masked one by {diff:.3g} (allowed {atol + rtol * scale:.3g}); "
            "a coupled layer type is not understood. Report the model; metrics without compaction remain valid."
        )

    layer_names = list(channels_before)
    one = tuple(t[:1] for t in inputs)
    flops_masked, flops_compact = count_flops(masked, one), count_flops(net, one)
    channels = {name: (channels_before[name], int(m.weight.shape[0])) for name, m in prunable_layers(net).items()}

    latency_masked = latency_compact = None
    if measure_latency:
        setting = dict(device=device if device is not None else home, batch_size=batch_size, dtype=dtype,
                       threads=threads, warmup=warmup, repeats=repeats)
        # the masked model as deployed: zeros baked in, no prune hook recomputing weight each forward
        deployed = make_permanent(deepcopy_model(masked))
        latency_masked, latency_compact = _latency.measure_latencies([deployed, net], inputs, **setting)

    for name, p in net.named_parameters():
        p.requires_grad_(requires_grad.get(name, True))
    net.to(home).train(model.training)
    return CompactResult(
        model=net,
        params_before=params_before,
        params_after=_num_params(net),
        flops_before=flops_masked.total,
        flops_after=flops_compact.total,
        flops_prunable_before=flops_masked.of(layer_names),
        flops_prunable_after=flops_compact.of(layer_names),
        channels=channels,
        max_abs_diff=diff,
        latency_masked=latency_masked,
        latency_compact=latency_compact,
    )



# ---------------------------------------------------------------------------------------------
# figures built on compaction (one layer above benchkit.metrics, which never imports this module)


def compacted_metrics(model: nn.Module, input_shape: Sequence[int], *, compacted: bool | None = None
                      ) -> dict[str, int | float]:
    """The ``compacted_*`` figures of a run, to merge beside :func:`benchkit.metrics.model_metrics`:
    ``compacted_params`` (all parameters), ``compacted_params_prunable``, ``compacted_flops``
    (prunable layers), ``compacted_flops_total_model``, ``compacted_speedup`` (= dense prunable FLOPs /
    compacted_flops) and ``compacted_size_bytes`` (dense fp32).

    ``compacted=True`` always compacts (a failure raises); the default ``None`` does so only when some
    output channel is entirely dead, and then a failed compaction only warns and returns ``{}`` (the
    keys are absent, never NaN, whenever not computed); ``False`` returns ``{}``.
    """
    auto = compacted is None
    if auto:
        compacted = any(n > 0 for n in dead_channels(model).values())
    if not compacted:
        return {}
    example = random_inputs(model, batched_shape(model, input_shape))
    try:
        result = compact(model, example, measure_latency=False)
    except Exception as err:  # noqa: BLE001 - asked for implicitly: report without compacted_*
        if not auto:
            raise
        warnings.warn(f"compacted_* metrics skipped: compaction failed ({err})", stacklevel=2)
        return {}
    return compacted_figures(result)


def compacted_figures(result: CompactResult) -> dict[str, int | float]:
    """The ``compacted_*`` figures of :func:`compacted_metrics` from a compaction already done."""
    return {
        "compacted_params": result.params_after,
        "compacted_params_prunable": sum(m.weight.numel() for m in prunable_layers(result.model).values()),
        "compacted_flops": result.flops_prunable_after,
        "compacted_flops_total_model": result.flops_after,
        "compacted_speedup": result.flops_prunable_before / result.flops_prunable_after
        if result.flops_prunable_after else math.inf,
        "compacted_size_bytes": dense_size_bytes(result.model),
    }
