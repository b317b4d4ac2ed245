"""Convolutions run as fused stages (``benchkit::conv_stage``: the convolution, its ReLU and the 2x2
max-pool after it in one pass) where each is measured faster, in a whole-model twin that deploy times
beside the others, dense included.

Why: channel pruning leaves narrow convolutions, where oneDNN is least efficient, and the max-pool after
one is a pass over memory that the FLOP theory does not count and that does not shrink with the FLOPs. On
LeNet-5 at 4x layer-wise channel pruning (5 and 12 filters, batch 64, one thread, this project's CPU) the
two convolutions and pools took 0.51 + 0.19 ms, a third of dense's time for a twelfth of its FLOPs; as
stages, 0.10 ms. In resnet18 at 4x the 7x7 stem (3->36 channels) ran 1.33 ms in channels-last and 0.79 ms
as a stage. :mod:`benchkit.deployment.fused`'s ``conv_stage`` is vectorised over 16 samples of the batch,
so it pays at batch 16 and above, not at batch 1, and loses to oneDNN on wide layers. So whether a stage
pays is measured per convolution, in each variant and its layout, on the convolution's real input
(:func:`measured_twin`), and the dense model gets the same twin: a speedup the kernel alone gives is
never credited to pruning.

Chains are found on the ``torch.fx`` graph: a ``Conv2d`` (dilation 1, groups 1, the same stride both
ways, zero padding given as numbers) followed only by ``ReLU`` or ``Identity`` modules (a folded BatchNorm
is one), at most one ``MaxPool2d(2)`` (stride 2, no padding, floor mode, no indices) among them, each the
only user of the one before. ReLU and the max commute (both are monotone), so their order is free. The
module tree is edited, as :mod:`benchkit.deployment.fold` does: the convolution becomes a
:class:`ConvStage`, the modules it absorbed become ``nn.Identity``, so the model keeps its class and its
layer names. A module called elsewhere too (a residual block's ReLU after the add, say) is not absorbed and
its chain stops before it; a functional ``torch.relu`` is not either (editing modules cannot remove it).
Chains that share a module (LeNet-5 calls one pool after both convolutions) are edited together: where one
is kept and another not, the shared module becomes Identity and the other runs its own modules in its
convolution's slot (an ``nn.Sequential``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import Tensor, nn

from benchkit.deployment import fused
from benchkit.deployment.choose import Timer, layer_inputs
from benchkit.pruning.masks import deepcopy_model

SUFFIX = "_stages"  # a twin's name is its variant's plus this


class ConvStage(nn.Module):
    """``Conv2d``, then ``ReLU`` when ``relu``, then ``MaxPool2d(2)`` when ``pool``, through
    ``benchkit::conv_stage``. ``channels_last_output`` makes it write channels-last outputs, as a dense
    convolution with channels-last weights does, for a stage inside a channels-last model (set by
    :func:`measured_twin`, and by :func:`benchkit.deployment.layout.channels_last_copy`). :meth:`portable`
    is the same stage in torch modules."""

    def __init__(self, conv: nn.Conv2d, relu: bool, pool: bool):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride = int(conv.stride[0])
        self.padding = tuple(int(p) for p in conv.padding)
        self.relu, self.pool = relu, pool
        self.channels_last_output = False

    def forward(self, x: Tensor) -> Tensor:
        return fused.op("conv_stage")(x, self.weight, self.bias, self.stride, self.padding[0], self.padding[1],
                                      self.relu, 2 if self.pool else 1, self.channels_last_output)

    def portable(self) -> nn.Module:
        """Conv2d, ReLU and MaxPool2d(2) as fused: what a saved model holds, torch alone runs it."""
        out_channels, in_channels, kh, kw = self.weight.shape
        conv = nn.Conv2d(in_channels, out_channels, (kh, kw), stride=self.stride, padding=self.padding,
                         bias=self.bias is not None).to(self.weight.device)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return nn.Sequential(conv, *([nn.ReLU()] if self.relu else []), *([nn.MaxPool2d(2)] if self.pool else []))

    def extra_repr(self) -> str:
        out_channels, in_channels, kh, kw = self.weight.shape
        return (f"{in_channels}, {out_channels}, kernel_size={(kh, kw)}, stride={self.stride}, "
                f"padding={self.padding}, relu={self.relu}, pool={2 if self.pool else None}")


@dataclass(frozen=True)
class Staged:
    """What :func:`fuse_stages` did: the convolutions now run as stages (by name), or why none could be
    (``""`` when the model has no convolution at all)."""

    convolutions: list[str] = field(default_factory=list)
    why_not: str = ""


#: ``keep(name, unfused, stage) -> bool``: whether the stage replaces ``unfused`` (the convolution and the
#: modules it would absorb, an ``nn.Sequential``); deploy's times both on the convolution's real input
Keep = Callable[[str, nn.Module, ConvStage], bool]


def pooled_only(name: str, unfused: nn.Module, stage: ConvStage) -> bool:
    """The default without measurements: fuse where a max-pool is absorbed, the case the kernel is for."""
    return stage.pool


class _Tracer(torch.fx.Tracer):
    """Every module without children, and every module of deploy's own forms (e.g. a ``fused_csr`` Linear,
    whose forward branches on its input's rank), is one call in the graph: chains are made of modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (super().is_leaf_module(m, qualname) or not any(True for _ in m.children())
                or type(m).__module__.startswith("benchkit.deployment"))


def _conv_fits(conv: nn.Module | None) -> bool:
    return (type(conv) is nn.Conv2d and conv.stride[0] == conv.stride[1] and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.weight.dtype == torch.float32 and conv.weight.device.type == "cpu")


def _pool_fits(pool: nn.Module | None) -> bool:
    def pair(v) -> tuple:
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return (type(pool) is nn.MaxPool2d and pair(pool.kernel_size) == (2, 2)
            and pair(pool.stride if pool.stride is not None else pool.kernel_size) == (2, 2)
            and pair(pool.padding) == (0, 0) and pair(pool.dilation) == (1, 1)
            and not pool.ceil_mode and not pool.return_indices)


def _chain(conv_node: torch.fx.Node, modules: dict[str, nn.Module]) -> list[torch.fx.Node]:
    """The call_module nodes after ``conv_node`` that a stage can absorb: ReLU and Identity modules and at
    most one 2x2 max-pool, each the only user of the node before."""
    chain, node, pooled = [], conv_node, False
    while len(node.users) == 1:
        user = next(iter(node.users))
        module = modules.get(user.target) if user.op == "call_module" else None
        if type(module) in (nn.ReLU, nn.Identity) or not pooled and _pool_fits(module):
            pooled = pooled or _pool_fits(module)
            chain.append(user)
            node = user
        else:
            break
    return chain


def fuse_stages(model: nn.Module, keep: Keep = pooled_only, dense: dict[str, nn.Conv2d] | None = None) -> Staged:
    """Replace, **in place**, each convolution of ``model`` and the ReLU / max-pool modules after it by a
    :class:`ConvStage` where ``keep`` says so; see the module docstring. ``dense`` names the dense
    convolution behind a module that computes one another way (deploy's sparse forms): that module is a
    candidate too, its stage built from the dense layer. ``model`` must be in eval mode."""
    if model.training:
        raise ValueError("fuse_stages needs a model in eval mode (call model.eval() first)")
    dense = dense or {}
    if not dense and not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return Staged()  # nothing to fuse, nothing to say
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure: the model runs unfused
        return Staged(why_not=f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err})"[:300])
    modules = dict(model.named_modules())
    convs = {name: dense.get(name, m) for name, m in modules.items()}
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    chains = {n.target: [m.target for m in _chain(n, modules)] for n in graph.nodes
              if n.op == "call_module" and calls[n.target] == 1 and _conv_fits(convs.get(n.target))}
    # a module may only become Identity when every call of it is absorbed: cut chains at any other until
    # nothing changes (cutting one chain can leave another's module with a call outside)
    while True:
        absorbed = Counter(t for chain in chains.values() for t in chain)
        cut = {conv: chain[:i] for conv, chain in chains.items()
               for i in [next((i for i, t in enumerate(chain) if absorbed[t] != calls[t]), len(chain))]
               if i < len(chain)}
        if not cut:
            break
        chains.update(cut)
    offered = {conv: _stage(convs, modules, conv, chain) for conv, chain in chains.items()}
    kept = {conv for conv, chain in chains.items()
            if keep(conv, nn.Sequential(modules[conv], *(modules[t] for t in chain)), offered[conv])}
    # chains that share a module (LeNet-5 calls one pool after both convolutions) are edited together: once
    # the shared module is Identity, a chain not kept runs its modules inside the convolution's slot instead
    edited = set(kept)
    while True:
        touched = {t for conv in edited for t in chains[conv]}
        more = {conv for conv, chain in chains.items() if conv not in edited and touched.intersection(chain)}
        if not more:
            break
        edited |= more
    for conv in edited:
        chain = chains[conv]
        if conv in kept:
            replacement = offered[conv]  # as keep saw it (and set it: its output layout)
        else:
            replacement = nn.Sequential(modules[conv], *(modules[t] for t in chain))
        model.set_submodule(conv, replacement)
        for t in chain:
            model.set_submodule(t, nn.Identity())
    done = [conv for conv in chains if conv in kept]
    return Staged(convolutions=done, why_not="" if done else "no convolution was faster as a stage")


def _stage(convs: dict[str, nn.Module], modules: dict[str, nn.Module], conv: str, chain: list[str]) -> ConvStage:
    return ConvStage(convs[conv], relu=any(type(modules[t]) is nn.ReLU for t in chain),
                     pool=any(_pool_fits(modules[t]) for t in chain)).to(convs[conv].weight.device)


def measured_twin(model: nn.Module, xs: tuple[Tensor, ...], timer: Timer, min_gain: float, channels_last: bool,
                  dense: dict[str, nn.Conv2d] | None = None, label: str = "") -> tuple[nn.Module | None,
                                                                                      dict[str, dict[str, float]]]:
    """A copy of ``model`` whose convolutions run as stages where each, timed on its real input (from
    ``model(*xs)``) against the modules it replaces, is ``min_gain`` faster; and those times by layer
    (``stage``, ``unfused`` ms). ``None`` when no convolution pays. ``channels_last``: the model runs in
    that layout (its stages write it)."""
    twin = deepcopy_model(model).eval()
    dense = dense or {}
    inputs = layer_inputs(twin, {n: m for n, m in twin.named_modules() if isinstance(m, nn.Conv2d) or n in dense}, xs)
    times: dict[str, dict[str, float]] = {}

    def keep(layer: str, unfused: nn.Module, stage: ConvStage) -> bool:
        x = inputs.get(layer)
        if x is None or x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu":
            return False  # not called, or on what the kernel does not take (an unbatched image, say)
        stage.channels_last_output = channels_last
        times[layer] = timer(f"{label} {layer}".strip(), {"unfused": lambda: unfused(x), "stage": lambda: stage(x)})
        return times[layer]["stage"] * (1 + min_gain) <= times[layer]["unfused"]
    done = fuse_stages(twin, keep, dense).convolutions
    return (twin if done else None), times
