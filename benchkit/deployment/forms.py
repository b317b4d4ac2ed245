"""Runnable forms of one pruned Conv/Linear layer, registered by name in :data:`FORMS`.

Every form turns a layer whose mask is already folded into its weight into a plain ``nn.Module`` with
the same inputs and outputs. What was found on torch 2.14 (CPU: AMD EPYC, MKL, AVX2), and why the
forms are what they are:

* ``csr`` stores the weight as CSR (int32 row offsets, int32 column indices, fp32 values) and runs
  ``F.embedding_bag(col, Xᵀ, row_offsets, per_sample_weights=values, mode="sum")``: row ``o`` of the
  output is the weighted sum of the input rows its non-zeros select, which is exactly a CSR matrix
  times a dense matrix, computed by FBGEMM's SpMDM kernel. At batch 64 on one thread it ran a
  1024x1024 layer about 2x faster than ``torch.sparse.mm`` on the same CSR (which calls MKL, whose
  sparse kernels are slow on AMD CPUs) and 4x (AVX2 EPYC) to 6x (AVX-512 EPYC) faster than dense at
  90% sparsity, transposes in and out included (results/deploy/bench.md). Every
  buffer is a dense tensor, so the model goes through ``torch.export`` unchanged.
* ``fused_csr`` (Linear, CPU, fp32): benchkit's own kernel (:mod:`benchkit.deployment.fused`), the
  CSR product with row-major input and output and the bias fused, built on first use with the machine's C++
  compiler. Every torch CSR product computes ``W @ Xᵀ`` and so pays two layout copies that cap a
  512x512 layer at batch 64 near 10x (results/deploy/parts.md); this one does its transposes in cache,
  eight by eight. A saved model holds its ``csr`` twin (:func:`portable`), which torch alone runs.
* ``torch_csr`` and ``torch_bsr<b>``: ``torch.sparse.mm`` on a CSR / BSR (b x b blocks) tensor with
  int32 indices (int64 indices are converted on every call: about 1.3x slower). At batch 1 MKL's CSR
  beats the embedding-bag kernel. The sparse tensor is rebuilt from dense index buffers on each call
  (a view, no copy): ``copy.deepcopy`` refuses sparse CSR buffers, and ``torch.export`` refuses sparse
  tensors in any form (FakeTensor has no ``_sparse_addmm``), so models using these forms are saved
  with TorchScript (:func:`benchkit.deployment.save.save_deployed`).
* ``semi_structured``: a 2:4 Linear weight as ``torch.sparse.to_sparse_semi_structured`` (CUTLASS /
  cuSPARSELt), CUDA only; torch refuses CPU tensors and so does this form, with a clear reason. On an
  H200 with torch 2.11 it never beat dense eagerly (0.09-0.61x): cuSPARSELt rebuilds its matmul
  descriptors on every call (pytorch/pytorch#153825, ~0.7-1 ms of host work) and CUTLASS refuses sm_90;
  replayed from a CUDA graph the kernels ran 1.15-1.59x faster at 4096 tokens (results/deploy/gpu).
* Convolutions use the same kernels on an im2col matrix built from strided views (one copy; torch's
  ``F.unfold`` was 3-10x slower than that copy), with groups == 1 and zero padding only. It pays for
  1x1 convolutions and at high sparsity; the measurement decides, never this module.

Parity with the dense layer: a form's output must agree with the dense layer's on the layer's real
input within ``atol + rtol * max|dense output|`` (fp32 kernels: rtol 1e-4, atol 1e-5; summation order
differs; 2:4 on CUDA computes in TF32/fp16: rtol 1e-2).
"""

from __future__ import annotations

import copy
import warnings
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchkit.deployment import fused as _fused
from benchkit.registry import Registry

SUPPORTED = (nn.Linear, nn.Conv2d)


class FormError(ValueError):
    """A form cannot represent this layer (the message says why and what to use instead)."""


# ---------------------------------------------------------------------------------------------
# kernels: Yᵀ (out, M) = W (out, in) @ Xᵀ (in, M), with Xᵀ feature-major


def _to_sparse(weight2d: Tensor, blocksize: int | None = None) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        w = weight2d.detach()
        return w.to_sparse_csr() if blocksize is None else w.to_sparse_bsr((blocksize, blocksize))


def _csr_parts(weight2d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    csr = _to_sparse(weight2d)
    return (csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
            csr.values().clone())


class EmbeddingBagCsr(nn.Module):
    """CSR weight times a feature-major matrix through ``F.embedding_bag`` (FBGEMM SpMDM on CPU)."""

    def __init__(self, weight2d: Tensor):
        super().__init__()
        crow, col, values = _csr_parts(weight2d)
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        self.register_buffer("values", values)
        self.shape = tuple(weight2d.shape)

    def forward(self, xt: Tensor) -> Tensor:
        return F.embedding_bag(self.col_indices, xt, self.crow_indices, mode="sum",
                               per_sample_weights=self.values, include_last_offset=True)


class TorchSparse(nn.Module):
    """``torch.sparse.mm`` on a CSR or BSR tensor rebuilt (as a view) from int32 index buffers."""

    def __init__(self, weight2d: Tensor, blocksize: int | None = None):
        super().__init__()
        w = weight2d.detach()
        sparse = _to_sparse(w, blocksize)
        self.register_buffer("crow_indices", sparse.crow_indices().to(torch.int32))
        self.register_buffer("col_indices", sparse.col_indices().to(torch.int32))
        self.register_buffer("values", sparse.values().clone())
        self.shape = tuple(w.shape)
        self.blocksize = blocksize

    def forward(self, xt: Tensor) -> Tensor:
        build = torch.sparse_csr_tensor if self.blocksize is None else torch.sparse_bsr_tensor
        w = build(self.crow_indices, self.col_indices, self.values, self.shape, check_invariants=False)
        return torch.sparse.mm(w, xt)


class FusedCsrLinear(nn.Module):
    """``nn.Linear`` semantics (any leading dims) through ``benchkit::csr_linear``: CSR weight, row-major
    input and output, bias fused."""

    def __init__(self, weight2d: Tensor, bias: Tensor | None):
        super().__init__()
        crow, col, values = _csr_parts(weight2d)
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_features, self.in_features = weight2d.shape

    def forward(self, x: Tensor) -> Tensor:
        # kept to the op call: at 512x512 / 98% the whole layer takes about 20 us, and each Python step here
        # (an import, a reshape of a 2-D input) cost a measurable share of it
        op = _fused.op()
        if x.dim() == 2:
            return op(x, self.crow_indices, self.col_indices, self.values, self.bias, self.out_features)
        y = op(x.reshape(-1, self.in_features), self.crow_indices, self.col_indices, self.values, self.bias,
               self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features)

    def portable(self) -> nn.Module:
        """The same layer as the ``csr`` form (``F.embedding_bag``): torch alone runs it."""
        shape = (self.out_features, self.in_features)
        weight = torch.sparse_csr_tensor(self.crow_indices.long(), self.col_indices.long(), self.values, shape)
        return SparseLinear(EmbeddingBagCsr(weight.to_dense()), self.in_features, self.out_features, self.bias)


def portable(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``model``, or a copy whose layers that need benchkit's compiled kernel are replaced by their
    torch-only twins (``portable()``), and the names replaced: what a saved model holds."""
    names = [n for n, m in model.named_modules() if hasattr(m, "portable")]
    if not names:
        return model, []
    out = copy.deepcopy(model)
    for name in names:
        out.set_submodule(name, out.get_submodule(name).portable())
    return out, names


# ---------------------------------------------------------------------------------------------
# layers around a kernel


class SparseLinear(nn.Module):
    """``nn.Linear`` semantics (any leading dims) with the product done by ``kernel``."""

    def __init__(self, kernel: nn.Module, in_features: int, out_features: int, bias: Tensor | None):
        super().__init__()
        self.kernel = kernel
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = self.kernel(x.reshape(-1, self.in_features).t().contiguous())  # (out, M)
        # (M, out) contiguous, as nn.Linear's output is: a transposed view made every op after it slow
        # (measured on the character GPT at batch 64: attention fell off its fused kernel and the deployed
        # model ran 1.6x slower than dense although each of its layers ran 2.3x faster)
        y = y.t().contiguous()
        if self.bias is not None:
            y = y.add_(self.bias)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)


def _im2col(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
            dilation: tuple[int, int]) -> tuple[Tensor, int, int]:
    """(C·kh·kw, N·Ho·Wo) feature-major patches in ``weight.reshape(out, -1)``'s column order."""
    ph, pw = padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    p = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)  # N, C, Ho, Wo, eh, ew
    if dh > 1 or dw > 1:
        p = p[..., ::dh, ::dw]
    n, c, ho, wo = p.shape[:4]
    return p.permute(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, n * ho * wo), ho, wo


class SparseConv2d(nn.Module):
    """``nn.Conv2d`` (groups 1, zero padding) as im2col + ``kernel``; NCHW contiguous output, or channels-last
    with ``channels_last_output`` (set by :func:`benchkit.deployment.layout.channels_last_copy`, as a dense
    convolution with channels-last weights writes its output: the pooling after it runs fast in that layout)."""

    def __init__(self, kernel: nn.Module, conv: nn.Conv2d, bias: Tensor | None):
        super().__init__()
        self.kernel = kernel
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.channels_last_output = False

    def forward(self, x: Tensor) -> Tensor:
        batched = x.dim() == 4
        if not batched:
            x = x.unsqueeze(0)
        cols, ho, wo = _im2col(x, self.kernel_size, self.stride, self.padding, self.dilation)
        y = self.kernel(cols)
        if self.bias is not None:
            y = y + self.bias[:, None]
        y = y.view(self.out_channels, x.shape[0], ho, wo).transpose(0, 1)
        y = y.contiguous(memory_format=torch.channels_last if self.channels_last_output else torch.contiguous_format)
        return y if batched else y.squeeze(0)


# ---------------------------------------------------------------------------------------------
# forms


class Form(ABC):
    """One way to run a layer. ``check`` says why the form cannot take a layer (``None``: it can);
    ``build`` returns the replacement module (on the layer's device)."""

    name: str = ""
    exportable: bool = True  # goes through torch.export (else the model is saved with TorchScript)
    rtol: float = 1e-4
    atol: float = 1e-5
    sparse: bool = True  # a sparse kernel (skipped for layers too dense to pay, see deploy's max_density)

    def check(self, layer: nn.Module, device: torch.device) -> str | None:
        if not isinstance(layer, SUPPORTED):
            return f"{type(layer).__name__} is not supported (only Linear and Conv2d)"
        return None

    @abstractmethod
    def build(self, layer: nn.Module) -> nn.Module: ...

    def tolerance(self, reference: Tensor) -> float:
        return self.atol + self.rtol * float(reference.abs().max()) if reference.numel() else self.atol


FORMS: Registry[Form] = Registry("deploy form")


class DenseForm(Form):
    """The layer as it is (mask folded into the weight): the baseline every other form must beat."""

    name = "dense"
    sparse = False

    def check(self, layer: nn.Module, device: torch.device) -> str | None:
        return None

    def build(self, layer: nn.Module) -> nn.Module:
        return layer


def _conv_reason(conv: nn.Conv2d) -> str | None:
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups})"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding {conv.padding!r} / mode {conv.padding_mode!r} (only numeric zero padding)"
    return None


class KernelForm(Form):
    """A sparse kernel for Linear (directly) and Conv2d (on im2col patches)."""

    def check(self, layer: nn.Module, device: torch.device) -> str | None:
        reason = super().check(layer, device)
        if reason is None and isinstance(layer, nn.Conv2d):
            reason = _conv_reason(layer)
        return reason

    @abstractmethod
    def kernel(self, weight2d: Tensor) -> nn.Module: ...

    def build(self, layer: nn.Module) -> nn.Module:
        w = layer.weight.detach()
        kernel = self.kernel(w.reshape(w.shape[0], -1))
        bias = layer.bias.detach() if layer.bias is not None else None
        if isinstance(layer, nn.Linear):
            out = SparseLinear(kernel, layer.in_features, layer.out_features, bias)
        else:
            out = SparseConv2d(kernel, layer, bias)
        return out.to(w.device)


class CsrForm(KernelForm):
    """CSR through ``F.embedding_bag`` (FBGEMM SpMDM on CPU); exportable."""

    name = "csr"

    def kernel(self, weight2d: Tensor) -> nn.Module:
        return EmbeddingBagCsr(weight2d)


class FusedCsrForm(Form):
    """benchkit's fused CSR kernel for Linear layers on CPU (:class:`FusedCsrLinear`); built on first use."""

    name = "fused_csr"

    def check(self, layer: nn.Module, device: torch.device) -> str | None:
        if not isinstance(layer, nn.Linear):
            return f"{type(layer).__name__}: fused_csr is for Linear layers (convolutions use csr on im2col)"
        if device.type != "cpu" or layer.weight.dtype != torch.float32:
            return f"fused_csr runs fp32 on CPU (here: {layer.weight.dtype} on {device.type})"
        return _fused.available()

    def build(self, layer: nn.Module) -> nn.Module:
        if not isinstance(layer, nn.Linear):
            raise FormError(f"fused_csr takes Linear layers, got {type(layer).__name__}")
        return FusedCsrLinear(layer.weight.detach(), layer.bias).to(layer.weight.device)


class TorchCsrForm(KernelForm):
    """``torch.sparse.mm`` on CSR (MKL on CPU, cuSPARSE on CUDA); TorchScript only."""

    name = "torch_csr"
    exportable = False

    def kernel(self, weight2d: Tensor) -> nn.Module:
        return TorchSparse(weight2d)


class TorchBsrForm(KernelForm):
    """``torch.sparse.mm`` on BSR with square ``blocksize`` blocks; TorchScript only."""

    exportable = False

    def __init__(self, blocksize: int):
        self.blocksize = blocksize
        self.name = f"torch_bsr{blocksize}"

    def check(self, layer: nn.Module, device: torch.device) -> str | None:
        reason = super().check(layer, device)
        if reason is None:
            rows, cols = layer.weight.shape[0], layer.weight[0].numel()
            if rows % self.blocksize or cols % self.blocksize:
                reason = f"weight {rows}x{cols} is not a multiple of {self.blocksize}x{self.blocksize} blocks"
        return reason

    def kernel(self, weight2d: Tensor) -> nn.Module:
        return TorchSparse(weight2d, self.blocksize)


def is_two_four(weight: Tensor) -> bool:
    """At most 2 non-zeros in every 4 consecutive weights along the input dimension (NVIDIA's 2:4)."""
    w = weight.detach().reshape(weight.shape[0], -1)
    if w.shape[1] % 4:
        return False
    return bool((w.reshape(w.shape[0], -1, 4).ne(0).sum(-1) <= 2).all())


class SemiStructuredForm(Form):
    """A 2:4 Linear weight as ``torch.sparse.to_sparse_semi_structured`` (sparse tensor cores), CUDA
    only. The replacement is a plain ``nn.Linear`` whose weight is torch's semi-structured tensor."""

    name = "semi_structured"
    rtol = 1e-2  # fp16 / TF32 tensor-core arithmetic
    atol = 1e-3

    def check(self, layer: nn.Module, device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"2:4 semi-structured kernels need a CUDA device (deploying on {device.type})"
        if not isinstance(layer, nn.Linear):
            return f"{type(layer).__name__}: 2:4 semi-structured is for Linear layers"
        if torch.cuda.get_device_capability(device)[0] < 8:
            return "2:4 sparse tensor cores need compute capability >= 8.0"
        rows, cols = layer.weight.shape
        if rows % 16 or cols % 16:
            return (f"weight {rows}x{cols}: torch's 2:4 kernels take both dimensions in multiples of 16 "
                    "(cuSPARSELt; 32x64 for CUTLASS)")
        if not is_two_four(layer.weight):
            return "the weight is not 2:4 along its input dimension"
        return None

    def build(self, layer: nn.Module) -> nn.Module:
        if not isinstance(layer, nn.Linear):
            raise FormError(f"semi_structured takes Linear layers, got {type(layer).__name__}")
        if layer.weight.device.type != "cuda":
            raise FormError(f"semi_structured needs the layer on a CUDA device, its weight is on "
                            f"{layer.weight.device}: deploy with device='cuda' (torch's 2:4 kernels are CUDA only)")
        if not is_two_four(layer.weight):
            raise FormError("semi_structured needs a 2:4 weight (at most 2 non-zeros in every 4 inputs); "
                            "prune with granularity '2:4'")
        from torch.sparse import to_sparse_semi_structured

        out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        device=layer.weight.device, dtype=layer.weight.dtype)
        out.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
        if layer.bias is not None:
            out.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        return out


for _form in (DenseForm(), CsrForm(), FusedCsrForm(), TorchCsrForm(), TorchBsrForm(4), TorchBsrForm(8), TorchBsrForm(16),
              SemiStructuredForm()):
    FORMS.register(_form.name, _form)

#: what :func:`benchkit.deployment.deploy` measures by default (BSR is opt-in: it never won on this CPU
#: and its im2col timings are long)
DEFAULT_FORMS = ("dense", "csr", "fused_csr", "torch_csr", "semi_structured")
