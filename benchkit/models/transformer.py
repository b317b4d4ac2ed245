"""Small transformers of benchkit's own: a decoder-only character/byte language model (nanoGPT's
layout) and a vision transformer for 28×28 images.

Both are built from :class:`Block` — pre-LayerNorm, self-attention with separate ``q_proj``,
``k_proj``, ``v_proj`` and ``out_proj`` Linear layers, then an MLP ``fc`` → GELU → ``proj`` — so every
projection is a prunable layer by name (``blocks.0.attn.q_proj``, ``blocks.3.mlp.fc``). Both expose
their blocks (:meth:`pruning_blocks`): one-shot pruning with calibration data (Wanda, SparseGPT)
runs block by block on cached activations, as the authors' code does.

The language model does **not** tie ``lm_head`` to the token embedding by default: a tied matrix is
one parameter seen by two modules, so it would be scored (and counted) twice. ``tie_weights=True``
ties them for those who want nanoGPT's exact model; then pruning ``lm_head`` prunes the embedding too.

Factories follow the registry's signature ``factory(input_shape, num_classes, **kwargs)``: for the
language model ``input_shape`` is ``(context,)`` and ``num_classes`` the vocabulary size (what the
``text`` dataset reports); :attr:`GPT.input_kind` tells :func:`benchkit.models.build_model` so.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from benchkit.models.attention import SelfAttention


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int, dropout: float, bias: bool):
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` (pre-LayerNorm, GPT-2/ViT)."""

    def __init__(self, n_embd: int, n_head: int, *, causal: bool, dropout: float = 0.0, bias: bool = True,
                 mlp_ratio: int = 4):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, causal=causal, dropout=dropout, bias=bias)
        self.resid_drop = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, mlp_ratio * n_embd, dropout, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.resid_drop(self.attn(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


def _init_gpt_style(model: nn.Module, n_layer: int) -> None:
    """GPT-2's initialisation (as nanoGPT): N(0, 0.02) for Linear and Embedding weights, zero biases,
    and N(0, 0.02/sqrt(2·n_layer)) for the projections that write into the residual stream."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("attn.out_proj", "mlp.proj")) else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def _positive(**values: int) -> None:
    for key, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"model.kwargs {key} must be a positive int, got {v!r}")


class GPT(nn.Module):
    """Decoder-only language model: token + position embeddings, ``n_layer`` causal :class:`Block`
    s, a final LayerNorm and ``lm_head``. ``forward(idx [B, T] int64) -> logits [B, T, vocab]``."""

    input_kind = "tokens"  # build_model: input_shape is (context,), num_classes the vocabulary size
    input_dtype = torch.long  # metrics build their example input with this dtype

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, n_layer: int = 4, n_embd: int = 128,
                 n_head: int = 4, dropout: float = 0.0, bias: bool = True, mlp_ratio: int = 4,
                 tie_weights: bool = False):
        super().__init__()
        (context,) = input_shape
        _positive(context=context, vocab_size=num_classes, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                  mlp_ratio=mlp_ratio)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.kwargs dropout must be in [0, 1), got {dropout}")
        self.context, self.vocab_size = context, num_classes
        self.tok_emb = nn.Embedding(num_classes, n_embd)
        self.pos_emb = nn.Embedding(context, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, causal=True, dropout=dropout, bias=bias,
                                          mlp_ratio=mlp_ratio) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, num_classes, bias=False)
        _init_gpt_style(self, n_layer)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2:
            raise ValueError(f"GPT takes token ids of shape [batch, time], got {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context ({self.context})")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def pruning_blocks(self) -> list[nn.Module]:
        """The chain of blocks (each one's output is the next one's input) for block-wise calibration."""
        return list(self.blocks)


class ViT(nn.Module):
    """Vision transformer (Dosovitskiy et al. 2021) for small images: non-overlapping ``patch_size``
    patches embedded by one Linear layer (a Conv2d with stride = kernel = patch is exactly this
    Linear on the flattened patches), a learned class token and position embeddings, ``n_layer``
    bidirectional :class:`Block` s, a final LayerNorm and a Linear ``head`` on the class token."""

    input_rank = 3  # one sample is (C, H, W): metrics batch a shape by this, not by the first layer's type

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, patch_size: int = 4,
                 n_layer: int = 4, n_embd: int = 64, n_head: int = 4, mlp_ratio: int = 2, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        c, h, w = input_shape
        _positive(patch_size=patch_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, mlp_ratio=mlp_ratio)
        if h % patch_size or w % patch_size:
            raise ValueError(f"vit: patch_size={patch_size} must divide the image size {h}x{w} "
                             f"(e.g. 4 or 7 for 28x28)")
        self.patch_size = patch_size
        n_patches = (h // patch_size) * (w // patch_size)
        self.patch_embed = nn.Linear(c * patch_size * patch_size, n_embd, bias=bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.pos_emb = nn.Parameter(torch.zeros(1, n_patches + 1, n_embd))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, causal=False, dropout=dropout, bias=bias,
                                          mlp_ratio=mlp_ratio) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, num_classes, bias=bias)
        _init_gpt_style(self, n_layer)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)

    def patches(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` → ``[B, patches, C·p·p]`` in row-major patch order (channel, then row,
        then column inside a patch, as a Conv2d weight is laid out)."""
        p = self.patch_size
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(self.patches(x))
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = self.drop(torch.cat([cls, tokens], dim=1) + self.pos_emb)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, 0]))

    def pruning_blocks(self) -> list[nn.Module]:
        return list(self.blocks)
