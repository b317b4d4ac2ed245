"""A convolution and the 2x2 max-pool after it run as one stage (``benchkit::conv_pool``), in a whole-model
twin that deploy times beside the others, dense included.

Why: channel pruning leaves narrow convolutions, where oneDNN is least efficient, and the max-pool after
each is a pass over memory that the FLOP theory does not count and that does not shrink with the FLOPs.
On LeNet-5 at 4x layer-wise channel pruning (5 and 12 filters, batch 64, one thread, this project's
CPU) the two convolutions and pools took 0.51 + 0.19 ms, a third of dense's time for a twelfth of its
FLOPs. :mod:`benchkit.deployment.fused`'s ``conv_pool`` computes a convolution, its bias, a ReLU and the
2x2 max-pool in one pass, vectorised over 16 samples of the batch (so it pays at batch 16 and above and
loses at batch 1, and the measurement decides). The dense model gets the same twin, so a speedup the
kernel alone gives is never credited to pruning.

Chains are found on the ``torch.fx`` graph: a ``Conv2d`` (stride 1, dilation 1, groups 1, zero padding
given as numbers) whose output goes only through ``ReLU`` or ``Identity`` modules (a folded BatchNorm is
one) to a ``MaxPool2d(2)`` (stride 2, no padding, floor mode, no indices), and optionally through a ReLU
after it. ReLU and the max commute (both are monotone), so the order is free. The module tree is edited,
as :mod:`benchkit.deployment.fold` does: the convolution becomes a :class:`ConvPool2d`, the modules it
absorbed become ``nn.Identity``, so the model keeps its class and its layer names. A module called
elsewhere too (a shared ReLU, say) is not absorbed, and its chain stops before it; a functional
``torch.relu`` is not either (it cannot be removed by editing modules), and it runs as before.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import Tensor, nn

from benchkit.deployment import fused

SUFFIX = "_stages"  # a twin's name is its variant's plus this


class ConvPool2d(nn.Module):
    """``MaxPool2d(2)(ReLU(Conv2d(x)))`` (ReLU when ``relu``) through ``benchkit::conv_pool``. Its weight
    and bias are the convolution's (fp32, NCHW); :meth:`portable` is the same stage in torch modules."""

    def __init__(self, conv: nn.Conv2d, relu: bool):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.padding = tuple(int(p) for p in conv.padding)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        return fused.op("conv_pool")(x, self.weight, self.bias, self.padding[0], self.padding[1], self.relu)

    def portable(self) -> nn.Module:
        """Conv2d, ReLU (when fused) and MaxPool2d(2): what a saved model holds, torch alone runs it."""
        out_channels, in_channels, kh, kw = self.weight.shape
        conv = nn.Conv2d(in_channels, out_channels, (kh, kw), padding=self.padding, bias=self.bias is not None)
        conv = conv.to(self.weight.device)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return nn.Sequential(conv, *([nn.ReLU()] if self.relu else []), nn.MaxPool2d(2))

    def extra_repr(self) -> str:
        out_channels, in_channels, kh, kw = self.weight.shape
        return f"{in_channels}, {out_channels}, kernel_size={(kh, kw)}, padding={self.padding}, relu={self.relu}, pool=2"


@dataclass(frozen=True)
class Staged:
    """What :func:`fuse_conv_pool` did: the convolutions now fused with their pools (by name), or why none
    could be (``""`` when the model has no max-pool at all)."""

    convolutions: list[str] = field(default_factory=list)
    why_not: str = ""


class _Tracer(torch.fx.Tracer):
    """Every module without children, and every module of deploy's own forms (e.g. a ``fused_csr`` Linear,
    whose forward branches on its input's rank), is one call in the graph: chains are made of modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (super().is_leaf_module(m, qualname) or not any(True for _ in m.children())
                or type(m).__module__.startswith("benchkit.deployment"))


def _conv_fits(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.weight.dtype == torch.float32 and conv.weight.device.type == "cpu")


def _pool_fits(pool: nn.Module) -> bool:
    def pair(v) -> tuple:
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return (type(pool) is nn.MaxPool2d and pair(pool.kernel_size) == (2, 2)
            and pair(pool.stride if pool.stride is not None else pool.kernel_size) == (2, 2)
            and pair(pool.padding) == (0, 0) and pair(pool.dilation) == (1, 1)
            and not pool.ceil_mode and not pool.return_indices)


def _chain(conv_node: torch.fx.Node, modules: dict[str, nn.Module]) -> list[torch.fx.Node]:
    """The call_module nodes after ``conv_node`` that the stage can absorb, up to and including the pool
    and any ReLU/Identity after it; empty when no pool is reached."""
    chain, node, pooled = [], conv_node, False
    while len(node.users) == 1:
        user = next(iter(node.users))
        module = modules.get(user.target) if user.op == "call_module" else None
        if type(module) in (nn.ReLU, nn.Identity):
            chain.append(user)
        elif not pooled and module is not None and _pool_fits(module):
            chain.append(user)
            pooled = True
        else:
            break
        node = user
    return chain if pooled else []


def fuse_conv_pool(model: nn.Module) -> Staged:
    """Fuse, **in place**, every convolution → (ReLU) → 2x2 max-pool chain of ``model`` into a
    :class:`ConvPool2d`; see the module docstring. ``model`` must be in eval mode."""
    if model.training:
        raise ValueError("fuse_conv_pool needs a model in eval mode (call model.eval() first)")
    if not any(isinstance(m, nn.MaxPool2d) for m in model.modules()):
        return Staged()  # nothing to fuse, nothing to say
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure: the model runs unfused
        return Staged(why_not=f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err})"[:300])
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    chains = {n: _chain(n, modules) for n in graph.nodes
              if n.op == "call_module" and calls[n.target] == 1 and _conv_fits(modules.get(n.target))}
    # a module may only become Identity when every call of it is absorbed: cut chains at any other until
    # nothing changes (cutting one chain can leave another's module with a call outside)
    while True:
        absorbed = Counter(m.target for chain in chains.values() for m in chain)
        cut = {}
        for conv_node, chain in chains.items():
            keep = next((i for i, m in enumerate(chain) if absorbed[m.target] != calls[m.target]), len(chain))
            if keep < len(chain):
                pooled = any(_pool_fits(modules[m.target]) for m in chain[:keep])
                cut[conv_node] = chain[:keep] if pooled else []
        if not cut:
            break
        chains.update(cut)
    fused_names = []
    for conv_node, chain in chains.items():
        if not chain:
            continue
        relu = any(type(modules[m.target]) is nn.ReLU for m in chain)
        model.set_submodule(conv_node.target, ConvPool2d(modules[conv_node.target], relu))
        for m in chain:
            model.set_submodule(m.target, nn.Identity())
        fused_names.append(conv_node.target)
    return Staged(convolutions=fused_names, why_not="" if fused_names else "no convolution followed by a 2x2 max-pool")

