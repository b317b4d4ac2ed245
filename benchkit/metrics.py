"""What a pruned model costs: parameters, non-zeros, FLOPs and storage, per layer and in total.

Definitions (DESIGN.md, ShrinkBench's conventions with the true output sizes):

* a layer's *params* are the elements of its weight; *non-zeros* count the effective weight
  ``weight_orig * weight_mask`` (computed here from ``_orig`` and the mask, never read from the
  ``weight`` attribute, which the ``torch.nn.utils.prune`` pre-hook only refreshes on forward);
* *dense FLOPs* are fvcore's multiply-add count for **one input sample**, so padding, stride,
  groups and dilation are exactly those of the real convolution; *non-zero FLOPs* = dense × density
  (every surviving weight is used once per output position; for Conv/Linear this is an integer);
  a Linear layer on a sequence counts its work for every token of the sample;
* attention (:mod:`benchkit.attention_flops`, which fvcore misses): QKᵀ and AV of every
  ``scaled_dot_product_attention`` and ``nn.MultiheadAttention`` are ``flops_attention``; they and an
  unsplit ``nn.MultiheadAttention``'s ``in_proj`` (a weight that is no prunable layer) are
  ``flops_nonprunable``: work weight sparsity does not remove, so ``theoretical_speedup`` =
  (dense + non-prunable) / (non-zero + non-prunable), which is ShrinkBench's ratio over the prunable
  layers for a network with no attention. ``nn.MultiheadAttention.out_proj`` gets its true count;
* ``compression_ratio`` = prunable weights / non-zero prunable weights, ``sparsity`` = 1 − 1/ratio,
  ``model_compression_ratio`` = all parameters / non-zero parameters (ShrinkBench's reported
  figure: biases and BatchNorm included).

Counts are Python ints and ratios Python floats (``inf`` when nothing survives), so the dicts log
straight into MLflow and compare exactly across runs.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn

from benchkit.attention_flops import AttentionCount, count_attention
from benchkit.pruning.layers import PRUNABLE_TYPES, prunable_layers
from benchkit.pruning.masks import current_mask, deepcopy_model, is_masked, param_value

with warnings.catch_warnings():  # fvcore.nn scripts its losses at import: torch.jit deprecation noise
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis

BYTES_FP32 = 4
BYTES_INDEX = 4  # int32 column indices / row pointers

LAYER_COLUMNS = ["layer", "type", "shape", "params", "nonzero", "density", "flops", "flops_nonzero", "speedup"]


Inputs = Tensor | Sequence[Tensor]


def as_tuple(inputs: Inputs) -> tuple[Tensor, ...]:
    """One tensor or a sequence of tensors → a tuple (what ``model(*inputs)`` needs)."""
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, Sequence) and inputs and all(isinstance(t, Tensor) for t in inputs):
        return tuple(inputs)
    raise TypeError(f"example inputs must be a Tensor or a non-empty sequence of Tensors, got {type(inputs).__name__}")


class NoPrunableLayersError(ValueError):
    """The model has no Conv/Linear layer, so no compression or FLOP figure is defined."""


# ---------------------------------------------------------------------------------------------
# effective weights and counts


@torch.no_grad()
def effective(module: nn.Module, pname: str = "weight") -> Tensor | None:
    """The value the forward pass uses: ``<p>_orig * <p>_mask`` when masked, else the parameter."""
    if is_masked(module, pname):
        return (param_value(module, pname) * current_mask(module, pname)).detach()
    value = getattr(module, pname, None)
    return value.detach() if value is not None else None


def _require_prunable(model: nn.Module) -> dict[str, nn.Module]:
    layers = prunable_layers(model)
    if not layers:
        allowed = ", ".join(t.__name__ for t in PRUNABLE_TYPES)
        raise NoPrunableLayersError(
            f"{type(model).__name__} has no prunable layer ({allowed}); compression and FLOP metrics "
            "are defined over those layers"
        )
    return layers


def nonzero_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer: (weight elements, non-zero effective weights)}`` for every prunable layer."""
    out = {}
    for name, module in _require_prunable(model).items():
        w = effective(module)
        out[name] = (int(w.numel()), int(torch.count_nonzero(w)))
    return out


def dead_channels(model: nn.Module) -> dict[str, int]:
    """Output channels/neurons per prunable layer whose effective weight row *and* bias are all zero.

    Such a channel outputs zero whatever its input, which is what physical compaction can remove
    (if everything it is coupled with is dead too; see :func:`benchkit.deployment.compact.compact`).
    """
    out = {}
    for name, module in _require_prunable(model).items():
        w = effective(module)
        dead = w.flatten(1).eq(0).all(dim=1)
        bias = effective(module, "bias")
        if bias is not None:
            dead &= bias.eq(0)
        out[name] = int(dead.sum())
    return out


def _all_params(model: nn.Module) -> tuple[int, int]:
    """(elements, non-zeros) of every parameter, masked ones counted by their effective value; a parameter
    shared by several modules (tied weights) counts once."""
    total = nonzero = 0
    seen: set[int] = set()
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            base = pname.removesuffix("_orig") if is_masked(module, pname.removesuffix("_orig")) else pname
            value = effective(module, base)
            total += value.numel()
            nonzero += int(torch.count_nonzero(value))
    return total, nonzero


def dense_size_bytes(model: nn.Module) -> int:
    """fp32 bytes of every parameter and buffer (``*_mask`` buffers excluded: they are pruning
    bookkeeping, not part of the deployed network; every element counts 4 bytes)."""
    n = sum(p.numel() for p in model.parameters())
    n += sum(b.numel() for name, b in model.named_buffers() if not name.endswith("_mask"))
    return BYTES_FP32 * n


def sparse_storage_bytes(weight: Tensor) -> tuple[int, str]:
    """Bytes to store a weight in the smaller of two sparse formats, and which one.

    * ``bitmap``: non-zero fp32 values + one bit per element: ``4·nnz + ceil(numel / 8)``;
    * ``csr``: the weight viewed as ``[out, in·k…]``; fp32 values + int32 column indices +
      int32 row pointers: ``4·nnz + 4·nnz + 4·(out + 1)``.

    Ties go to ``bitmap``.
    """
    nnz = int(torch.count_nonzero(weight))
    rows = int(weight.shape[0]) if weight.dim() > 0 else 1
    bitmap = BYTES_FP32 * nnz + math.ceil(weight.numel() / 8)
    csr = (BYTES_FP32 + BYTES_INDEX) * nnz + BYTES_INDEX * (rows + 1)
    return (bitmap, "bitmap") if bitmap <= csr else (csr, "csr")


def sparse_size_bytes(model: nn.Module) -> int:
    """Storage with every prunable weight in :func:`sparse_storage_bytes`'s format and everything
    else (biases, BatchNorm, non-prunable layers, buffers) dense fp32 as in :func:`dense_size_bytes`."""
    size = dense_size_bytes(model)
    for module in _require_prunable(model).values():
        w = effective(module)
        size += sparse_storage_bytes(w)[0] - BYTES_FP32 * w.numel()
    return size


# ---------------------------------------------------------------------------------------------
# FLOPs (fvcore)


@dataclass(frozen=True)
class FlopCount:
    """Multiply-adds of one forward pass: per module (qualified name) and per operator; fvcore's,
    with attention added (``attention``: QKᵀ and AV; ``nonprunable``: those plus the ``in_proj`` of
    unsplit ``nn.MultiheadAttention`` modules)."""

    by_module: dict[str, int]
    by_operator: dict[str, int]
    total: int
    attention: int = 0
    nonprunable: int = 0

    def of(self, names: Sequence[str]) -> int:
        return sum(self.by_module.get(n, 0) for n in names)


@torch.no_grad()
def count_flops(model: nn.Module, inputs: Inputs) -> FlopCount:
    """fvcore counts of ``model(*inputs)`` on a deep copy in eval mode on CPU, so the caller's model
    (its train mode, BatchNorm statistics, device) is untouched. fvcore traces straight through the
    ``torch.nn.utils.prune`` pre-hooks; their elementwise ``mul`` is not a counted operator.
    Attention, which fvcore misses, is counted from a second, eager pass
    (:func:`benchkit.attention_flops.count_attention`, run only when the trace holds an
    ``nn.MultiheadAttention`` or an uncounted ``scaled_dot_product_attention``) and merged in: scaled-dot-product calls on the
    module that makes them; each ``nn.MultiheadAttention`` replaced by its analytic count (whatever
    fvcore saw of it), its ``out_proj`` row included."""
    net = deepcopy_model(model).cpu().float().eval()
    xs = tuple(t.detach().cpu() for t in as_tuple(inputs))
    xs = tuple(t.float() if t.is_floating_point() else t for t in xs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = logging.getLogger("fvcore")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            analysis = FlopCountAnalysis(net, xs)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            by_module = {k: int(v) for k, v in analysis.by_module().items()}
            by_operator = {k: int(v) for k, v in analysis.by_operator().items()}
            total = int(analysis.total())
            fv_mha = {name: dict(analysis.by_module_and_operator().get(name, {}))
                      for name, m in net.named_modules() if isinstance(m, nn.MultiheadAttention)}
            sdpa_seen = any("scaled_dot_product" in op for op in analysis.unsupported_ops())
        finally:
            logger.setLevel(level)
    # the eager pass only where the trace met attention: a CNN's metrics cost what they did
    extra = count_attention(net, xs) if fv_mha or sdpa_seen else AttentionCount()

    def add(name: str, delta: int, operator: str) -> None:
        nonlocal total
        parts = name.split(".") if name else []
        for i in range(len(parts) + 1):  # the module and every ancestor, "" (the model) included
            key = ".".join(parts[:i])
            by_module[key] = by_module.get(key, 0) + delta
        by_operator[operator] = by_operator.get(operator, 0) + delta
        total += delta

    if not any("scaled_dot_product" in op for op in by_operator):  # fvcore counts none today: never twice
        for name, macs in extra.sdpa.items():
            add(name, macs, "scaled_dot_product_attention")
    for name, c in extra.mha.items():
        for op, macs in fv_mha.get(name, {}).items():  # what fvcore saw of it (slow path: F.linear) goes
            add(name, -int(macs), op)
        add(name, c.in_proj + c.out_proj, "linear")
        add(name, c.attention, "multi_head_attention")
        by_module[f"{name}.out_proj"] = c.out_proj  # a prunable layer; its module never runs
    return FlopCount(by_module=by_module, by_operator=by_operator, total=total, attention=extra.attention,
                     nonprunable=extra.attention + extra.in_proj)


def batched_shape(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """``input_shape`` with a leading batch dimension of 1, checked against the first prunable layer:
    ``(C, H, W)`` for a Conv2d network becomes ``(1, C, H, W)``; ``(1, C, H, W)`` is kept. For a
    network starting with Linear (rank is no guide) a shape is kept only if it leads with 1, unless the model
    declares the rank of one sample (``input_rank``, e.g. a vision transformer's 3)."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a sequence of ints like (1, 3, 32, 32), got {input_shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be non-empty positive sizes like (1, 3, 32, 32), got {shape}")
    rank = getattr(model, "input_rank", None)  # a model that declares the rank of one sample (the ViT)
    if isinstance(rank, int) and len(shape) in (rank, rank + 1):
        return (1, *shape) if len(shape) == rank else _batch_one(shape)
    first = next(iter(_require_prunable(model).values()))
    if isinstance(first, nn.Linear):
        # an MLP may flatten images: (784,), (1, 28, 28) and (3, 32, 32) are all sample shapes unless
        # they already lead with the batch dimension 1
        return shape if len(shape) > 1 and shape[0] == 1 else (1, *shape)
    else:
        sample_rank = {nn.Conv1d: 2, nn.Conv2d: 3, nn.Conv3d: 4}.get(type(first), len(shape) - 1)
        if len(shape) == sample_rank:
            return (1, *shape)
        if len(shape) != sample_rank + 1:
            raise ValueError(
                f"input_shape {shape} does not fit {type(first).__name__}: give (C, ...) with {sample_rank} "
                f"dims or (1, C, ...) with {sample_rank + 1}"
            )
    return _batch_one(shape)


def _batch_one(shape: tuple[int, ...]) -> tuple[int, ...]:
    if shape[0] != 1:
        raise ValueError(
            f"input_shape {shape} has batch size {shape[0]}; metrics are per input sample, pass "
            f"{(1, *shape[1:])} (or {shape[1:]})"
        )
    return shape


# ---------------------------------------------------------------------------------------------
# tables


def _layer_rows(layers: dict[str, nn.Module], flops: FlopCount) -> list[dict]:
    rows = []
    for name, module in layers.items():
        w = effective(module)
        params, nonzero = int(w.numel()), int(torch.count_nonzero(w))
        dense = int(flops.by_module.get(name, 0))
        flops_nonzero = dense * nonzero / params
        if dense == 0:
            speedup = math.nan  # the layer is never called on this input
        elif nonzero == 0:
            speedup = math.inf
        else:
            speedup = dense / flops_nonzero
        rows.append({
            "layer": name, "type": type(module).__name__, "shape": tuple(w.shape),
            "params": params, "nonzero": nonzero, "density": nonzero / params,
            "flops": dense, "flops_nonzero": float(flops_nonzero), "speedup": float(speedup),
        })
    return rows


def example_inputs_for(model: nn.Module, input_shape: Sequence[int] | None = None,
                       example_inputs: Inputs | None = None) -> tuple[Tensor, ...]:
    """The one-sample inputs metrics run the model on: ``example_inputs`` as given (a tensor or a tuple,
    batch size 1 in the first dimension, or the second for sequence-first inputs; e.g. token ids), or zeros of ``input_shape`` (with its batch dimension added, see
    :func:`batched_shape`) in the model's ``input_dtype`` (float unless the model declares, as a language
    model does, ``input_dtype = torch.long``). Exactly one of the two."""
    if (input_shape is None) == (example_inputs is None):
        raise ValueError("give exactly one of input_shape= (one sample's shape, e.g. (1, 28, 28)) or "
                         "example_inputs= (a batch-1 tensor or tuple of tensors, e.g. token ids of shape (1, T))")
    if example_inputs is not None:
        xs = as_tuple(example_inputs)
        if 1 not in tuple(xs[0].shape[:2]):  # batch first, or (sequence-first attention) second
            raise ValueError(f"example_inputs must hold one sample (batch size 1): metrics are per input sample; "
                             f"got a first tensor of shape {tuple(xs[0].shape)}, pass x[:1]")
        return xs
    dtype = getattr(model, "input_dtype", torch.float32)
    return (torch.zeros(batched_shape(model, input_shape), dtype=dtype),)


def random_inputs(model: nn.Module, shape: Sequence[int], seed: int = 0) -> Tensor:
    """A random input batch of ``shape`` (batch dimension included) for checks and timings that need
    non-trivial activations: N(0, 1) floats, or for a model that takes token ids (an integer
    ``input_dtype``, as a language model declares) ids drawn uniformly from its vocabulary (``vocab_size``,
    else its first ``nn.Embedding``'s size)."""
    shape = tuple(int(s) for s in shape)
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(model, "input_dtype", torch.float32)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g)
    vocab = getattr(model, "vocab_size", None) or next(
        (m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if vocab is None:
        raise ValueError(f"{type(model).__name__} takes {dtype} inputs but has no vocab_size or nn.Embedding to "
                         "draw token ids from; pass example inputs instead")
    return torch.randint(0, int(vocab), shape, generator=g, dtype=dtype)


def _flops_for(model: nn.Module, xs: tuple[Tensor, ...]) -> FlopCount:
    try:
        return count_flops(model, xs)
    except Exception as err:
        shapes = ", ".join(str(tuple(x.shape)) for x in xs)
        raise ValueError(f"{type(model).__name__} cannot run on an input of shape {shapes} ({err}); "
                         "pass the shape of one sample, e.g. data.input_shape, or example_inputs=") from err


def layer_metrics(model: nn.Module, input_shape: Sequence[int] | None = None, *,
                  example_inputs: Inputs | None = None) -> pd.DataFrame:
    """One row per prunable layer, in definition order: ``layer, type, shape, params, nonzero,
    density, flops, flops_nonzero, speedup`` (FLOPs for one input sample, given by its shape or as
    ``example_inputs``; speedup = dense/non-zero)."""
    layers = _require_prunable(model)
    flops = _flops_for(model, example_inputs_for(model, input_shape, example_inputs))
    return pd.DataFrame(_layer_rows(layers, flops), columns=LAYER_COLUMNS)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else math.inf


def model_metrics(
    model: nn.Module, input_shape: Sequence[int] | None = None, *, example_inputs: Inputs | None = None,
) -> dict[str, int | float]:
    """Whole-model figures (see the module docstring) for one input sample (its shape, or
    ``example_inputs``), in this order:

    ``params_prunable, nonzero_prunable, compression_ratio, sparsity, params_total, nonzero_total,
    model_compression_ratio, flops_dense, flops_nonzero, theoretical_speedup, flops_total_model,
    flops_attention, flops_nonprunable, size_bytes_dense, size_bytes_sparse``; ``flops_dense`` and
    ``flops_nonzero`` are over the prunable layers, ``theoretical_speedup`` adds the non-prunable work
    to both, ``flops_total_model`` is fvcore's whole-model count with attention added (for
    information). Storage formats: see :func:`dense_size_bytes` and :func:`sparse_size_bytes`.

    The figures after physically removing dead channels (``compacted_*``) build on these counters one
    layer up: :func:`benchkit.deployment.compact.compacted_metrics`.
    """
    layers = _require_prunable(model)
    xs = example_inputs_for(model, input_shape, example_inputs)
    flops = _flops_for(model, xs)
    rows = _layer_rows(layers, flops)

    params_prunable = sum(r["params"] for r in rows)
    nonzero_prunable = sum(r["nonzero"] for r in rows)
    params_total, nonzero_total = _all_params(model)
    flops_dense = sum(r["flops"] for r in rows)
    flops_nonzero = float(sum(r["flops_nonzero"] for r in rows))
    compression = _ratio(params_prunable, nonzero_prunable)
    return {
        "params_prunable": params_prunable,
        "nonzero_prunable": nonzero_prunable,
        "compression_ratio": compression,
        "sparsity": float(1.0 - nonzero_prunable / params_prunable),
        "params_total": params_total,
        "nonzero_total": nonzero_total,
        "model_compression_ratio": _ratio(params_total, nonzero_total),
        "flops_dense": flops_dense,
        "flops_nonzero": flops_nonzero,
        "theoretical_speedup": _ratio(flops_dense + flops.nonprunable, flops_nonzero + flops.nonprunable),
        "flops_total_model": flops.total,
        "flops_attention": flops.attention,
        "flops_nonprunable": flops.nonprunable,
        "size_bytes_dense": dense_size_bytes(model),
        "size_bytes_sparse": sparse_size_bytes(model),
    }
