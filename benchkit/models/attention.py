"""Attention with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` Linear layers.

Pruning works on ``nn.Linear`` and ``nn.Conv*`` modules (``benchkit.pruning.layers``). PyTorch's
``nn.MultiheadAttention`` keeps the three input projections in one ``in_proj_weight`` *parameter*,
which is no Linear layer, and calls ``F.linear`` on its ``out_proj`` weight without running that
module (so its forward hooks, torch.nn.utils.prune's mask hook included, never fire; in eval mode
under ``no_grad`` the whole module runs as one fused kernel). Such a model cannot be pruned by
layer name, nor its FLOPs read per layer.

benchkit therefore **converts** rather than skips: :func:`split_attention` replaces every
``nn.MultiheadAttention`` in a model by a :class:`SplitMultiheadAttention` with the same weights
split into ``q_proj``/``k_proj``/``v_proj`` Linear layers and the same ``out_proj``, computing the same
outputs (up to float rounding: three matmuls instead of one) with the same call signature.
torchvision models built by name (``vit_b_16`` …) are converted when they are built, so their
attention projections are prunable layers like any other. The pruning entry points refuse a model
that still holds an ``nn.MultiheadAttention`` (see ``benchkit.pruning.layers.fused_attention``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``[B, T, C]`` (nanoGPT's layout) through
    ``F.scaled_dot_product_attention``; ``causal`` masks future positions (a decoder)."""

    def __init__(self, n_embd: int, n_head: int, *, causal: bool, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be a multiple of n_head={n_head} (each head gets n_embd/n_head)")
        self.n_head, self.causal, self.dropout = n_head, causal, dropout
        self.q_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.k_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.v_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.out_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        h = self.n_head  # the head size follows from q_proj's width, so removing heads only updates n_head

        def heads(y: Tensor) -> Tensor:
            return y.view(b, t, h, -1).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                           dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, -1))


class SplitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its input projection split into three Linear layers.

    Same constructor arguments and ``forward`` signature (``key_padding_mask``, ``need_weights``,
    ``attn_mask``, ``average_attn_weights``, ``is_causal``, batch-first or sequence-first, unbatched
    inputs) and the same outputs; built from an existing module with :meth:`from_module`. The
    rarely used ``add_bias_kv`` and ``add_zero_attn`` options are not supported (refused)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    @torch.no_grad()
    def from_module(cls, mha: nn.MultiheadAttention) -> SplitMultiheadAttention:
        """The same attention with the same weights (``in_proj_weight`` rows 0:E, E:2E, 2E:3E become
        q, k, v; separate ``q/k/v_proj_weight`` are taken as they are)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True cannot be split "
                             "into q/k/v Linear layers by benchkit; build the model without those options")
        e = mha.embed_dim
        bias = mha.in_proj_bias is not None
        new = cls(e, mha.num_heads, dropout=mha.dropout, bias=bias, kdim=mha.kdim, vdim=mha.vdim,
                  batch_first=mha.batch_first)
        if mha.in_proj_weight is not None:
            weights = mha.in_proj_weight.split(e, dim=0)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        for i, (lin, w) in enumerate(zip((new.q_proj, new.k_proj, new.v_proj), weights)):
            lin.weight.copy_(w)
            if bias:
                lin.bias.copy_(mha.in_proj_bias[i * e:(i + 1) * e])
        new.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
        else:
            new.out_proj.bias = None
        p = mha.in_proj_weight if mha.in_proj_weight is not None else mha.q_proj_weight
        new.to(device=p.device, dtype=p.dtype)
        new.train(mha.training)
        return new

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt = query.shape[:2]
        src = key.shape[1]
        h, d = self.num_heads, self.head_dim
        if is_causal and attn_mask is None:
            raise RuntimeError("need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        q = self.q_proj(query).view(n, tgt, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, src, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, src, h, d).transpose(1, 2)
        bias = _additive_mask(attn_mask, key_padding_mask, n, h, tgt, src, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1)
            if bias is not None:
                scores = scores + bias
            weights = torch.softmax(scores, dim=-1)
            if p > 0:  # as nn.MultiheadAttention: the returned weights are the dropped-out ones
                weights = F.dropout(weights, p)
            y = weights @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        out = self.out_proj(y.transpose(1, 2).reshape(n, tgt, h * d))  # h·d = e until heads are removed
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights


def _additive_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, n: int, h: int, tgt: int, src: int,
                   dtype: torch.dtype) -> Tensor | None:
    """nn.MultiheadAttention's masks as one float mask added to the scores (``-inf`` where a boolean
    mask is True: not allowed to attend), broadcastable to ``[N, H, L, S]``."""

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    out = None
    if attn_mask is not None:
        m = additive(attn_mask)
        m = m.view(1, 1, tgt, src) if m.dim() == 2 else m.view(n, h, tgt, src)
        out = m
    if key_padding_mask is not None:
        m = additive(key_padding_mask).view(n, 1, 1, src)
        out = m if out is None else out + m
    return out


def split_attention(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by a
    :class:`SplitMultiheadAttention` with the same weights; returns the model."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, mha in targets:
        if not name:
            raise ValueError("split_attention converts the attention modules inside a model; convert a bare "
                             "nn.MultiheadAttention with SplitMultiheadAttention.from_module(module)")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, SplitMultiheadAttention.from_module(mha))
    return model
