"""Attention's multiply-adds, which fvcore and torch's FlopCounterMode miss (measured with torch 2.14,
fvcore 0.1.5, on CPU):

* ``F.scaled_dot_product_attention`` — QKᵀ and AV — counts 0 in both, with or without gradients:
  fvcore has no handle for ``aten::scaled_dot_product_attention``, and FlopCounterMode none for the
  CPU kernel it dispatches to (``_scaled_dot_product_flash_attention_for_cpu``).
* ``nn.MultiheadAttention`` — fvcore puts its input and output projections (``F.linear`` inside the
  module) on the attention module, so ``out_proj`` counts 0 (the row of a prunable layer!) and the
  attention products count 0 as above; in eval mode under ``no_grad`` the module runs one fused
  ``_native_multi_head_attention`` kernel and both counters see nothing of it at all.

:func:`count_attention` runs the model once, eagerly, and counts these from the shapes that reach
them, whichever kernel runs: every ``scaled_dot_product_attention`` call (seen through a
``TorchFunctionMode``, which intercepts the Python call before any kernel is chosen) and every
``nn.MultiheadAttention`` module (from its forward pre-hook: query/key/value shapes and its settings).
Multiply-adds, like fvcore: QKᵀ is ``L·S·E_qk`` and AV ``L·S·E_v`` per batch-and-head, over the full
``L×S`` score matrix (a causal mask halves the useful work, but dense kernels compute it all).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


@dataclass
class MHACount:
    """Multiply-adds of one ``nn.MultiheadAttention`` call (summed over calls)."""

    in_proj: int = 0  # q, k, v projections (one in_proj_weight: not a prunable layer)
    attention: int = 0  # QKᵀ and AV
    out_proj: int = 0  # the out_proj Linear (a prunable layer whose forward never runs)

    @property
    def total(self) -> int:
        return self.in_proj + self.attention + self.out_proj


@dataclass
class AttentionCount:
    """``sdpa``: QKᵀ + AV multiply-adds of ``scaled_dot_product_attention`` calls by the module that
    made them (outside any ``nn.MultiheadAttention``); ``mha``: each ``nn.MultiheadAttention`` by name."""

    sdpa: dict[str, int] = field(default_factory=dict)
    mha: dict[str, MHACount] = field(default_factory=dict)

    @property
    def attention(self) -> int:
        return sum(self.sdpa.values()) + sum(c.attention for c in self.mha.values())

    @property
    def in_proj(self) -> int:
        return sum(c.in_proj for c in self.mha.values())


def sdpa_macs(query: Tensor, key: Tensor, value: Tensor) -> int:
    """QKᵀ + AV multiply-adds of ``scaled_dot_product_attention(query [..., L, E], key [..., S, E],
    value [..., S, Ev])``: every query row against every key, for each batch and head of the query."""
    rows = math.prod(query.shape[:-1])  # batch · heads · L
    return rows * key.shape[-2] * (query.shape[-1] + value.shape[-1])


def mha_macs(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor) -> MHACount:
    """What one call of ``mha`` multiplies, from its inputs' shapes (batch-first or not, unbatched)."""
    if query.dim() == 3:
        seq_dim = 1 if mha.batch_first else 0
        n, tgt, src = query.shape[1 - seq_dim], query.shape[seq_dim], key.shape[seq_dim]
    else:
        n, tgt, src = 1, query.shape[0], key.shape[0]
    e = mha.embed_dim
    src_attended = src + (mha.bias_k is not None) + bool(mha.add_zero_attn)
    return MHACount(
        in_proj=n * (tgt * e * e + src * mha.kdim * e + src * mha.vdim * e),
        attention=2 * n * tgt * src_attended * e,  # QKᵀ and AV, summed over the heads (heads · head_dim = E)
        out_proj=n * tgt * e * e,
    )


class _SDPACounter(TorchFunctionMode):
    def __init__(self, stack: list[str], sdpa: dict[str, int]):
        super().__init__()
        self.stack, self.sdpa, self.inside_mha = stack, sdpa, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and not self.inside_mha:
            names = ("query", "key", "value")
            q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
            where = self.stack[-1] if self.stack else ""
            self.sdpa[where] = self.sdpa.get(where, 0) + sdpa_macs(q, k, v)
        return func(*args, **kwargs)


@torch.no_grad()
def count_attention(model: nn.Module, inputs: Sequence[Tensor]) -> AttentionCount:
    """Attention multiply-adds of ``model(*inputs)`` (see the module docstring). Runs the model as it
    is (mode, device): callers pass the eval-mode copy they count anyway."""
    out = AttentionCount()
    stack: list[str] = []
    counter = _SDPACounter(stack, out.sdpa)
    handles = []

    def enter(name: str):
        def hook(mod, args, kwargs):
            stack.append(name)
            if isinstance(mod, nn.MultiheadAttention):
                names = ("query", "key", "value")
                q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
                c = mha_macs(mod, q, k, v)
                prev = out.mha.setdefault(name, MHACount())
                prev.in_proj += c.in_proj
                prev.attention += c.attention
                prev.out_proj += c.out_proj
                counter.inside_mha += 1
        return hook

    def leave(name: str):
        def hook(mod, args, output):
            stack.pop()
            if isinstance(mod, nn.MultiheadAttention):
                counter.inside_mha -= 1
        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name), with_kwargs=True))
        handles.append(module.register_forward_hook(leave(name), always_call=True))
    try:
        with counter:
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return out
