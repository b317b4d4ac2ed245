"""The unit that is removed: a weight, an N:M slot, a kernel row, a kernel, or a whole output channel.

Every granularity is a reversible *group view* of a weight ``[out, in, *k]`` as a 2-D ``[groups, size]``
tensor (a Linear weight is a 1×1 conv). The engine reduces element scores over the second axis, ranks
groups, and maps the kept groups back with ``ungroup``. N:M is the one granularity that selects *inside*
each group (keep the N best of M) instead of ranking groups against each other.

A researcher adds a granularity without touching the core::

    @GRANULARITIES.register("row")
    class Row(Granularity):
        def group(self, t): ...
        def ungroup(self, g, shape): ...
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from torch import Tensor

from benchkit.registry import Registry, UnknownNameError

GRANULARITIES: Registry[Callable[[], Granularity]] = Registry("granularity")

# Group score = reduction of its (surviving) element scores. Pruned elements contribute nothing.
REDUCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "l1": lambda s, alive: (s.abs() * alive).sum(1),
    "l2": lambda s, alive: (s.square() * alive).sum(1).sqrt(),
    "mean": lambda s, alive: (s * alive).sum(1) / alive.sum(1).clamp_min(1),
}


class GranularityError(ValueError):
    """A granularity that cannot be applied to a layer (e.g. N:M with M not dividing the input dim)."""


def check_reduce(reduce: str) -> str:
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduce {reduce!r}; allowed: {', '.join(REDUCTIONS)}")
    return reduce


SIGNED_REDUCTIONS = ("mean",)  # reductions that keep the sign of element scores


def signed_reduce_problem(criterion: str, signed: bool, granularity: Granularity, reduce: str) -> str | None:
    """Why ``reduce`` cannot group a signed criterion's scores (None when it can): a norm takes absolute
    values, and for GraSP the sign is what decides which groups go."""
    if not signed or isinstance(granularity, (Element, NM)) or reduce in SIGNED_REDUCTIONS:  # no groups reduced
        return None
    return (f"criterion {criterion!r} gives signed scores, and reduce={reduce!r} takes their absolute value, "
            f"which discards the sign that decides what {criterion} removes; use reduce='mean' "
            f"(or an element or N:M granularity)")


def as_conv(shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
    """``(out, in, prod(kernel))``: a Linear ``[out, in]`` is a 1×1 conv."""
    if len(shape) < 2:
        raise GranularityError(f"expected a weight of at least 2 dims [out, in, *kernel], got shape {tuple(shape)}")
    return shape[0], shape[1], math.prod(shape[2:])


class Granularity:
    """Groups of a weight tensor. Subclasses implement ``group`` / ``ungroup`` (inverse views)."""

    name: str = ""
    #: True when the granularity picks survivors inside each group (N:M) rather than ranking groups.
    within_group: bool = False
    #: True when a dead group is a whole output channel, so the bias and following BatchNorm die with it.
    masks_following: bool = False
    #: True when a group is a whole output unit: on the output layer that is a class (a token), so the
    #: engine spares the output layer unless asked (``keep_outputs=False``).
    removes_outputs: bool = False
    #: The model structure whose units this granularity removes (``attention``: heads, ``mlp``: hidden
    #: neurons; see :mod:`benchkit.pruning.units`), or None for every prunable layer. Other layers are left
    #: as they are.
    structure: str | None = None

    def group_size(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Weights per group of a layer of this shape (1: the groups are single weights)."""
        return int(self.group(torch.empty(tuple(shape), device="meta")).shape[1])

    def group(self, t: Tensor) -> Tensor:  # [out, in, *k] -> [groups, size]
        raise NotImplementedError

    def ungroup(self, g: Tensor, shape: torch.Size) -> Tensor:  # [groups, size] -> shape
        raise NotImplementedError

    def check_layer(self, name: str, shape: torch.Size) -> None:
        """Raise ``GranularityError`` if this layer cannot be grouped (checked before any work)."""
        as_conv(shape)

    def group_scores(self, scores: Tensor, alive: Tensor, reduce: str) -> Tensor:
        """One score per group from the element scores of its survivors; −inf for dead groups."""
        s = self.group(scores.masked_fill(~alive, 0))
        a = self.group(alive)
        # A group of one weight is that weight: no norm, so signed scores (GraSP) keep their sign.
        out = REDUCTIONS[reduce](s, a) if s.shape[1] > 1 else s[:, 0].clone()
        return out.masked_fill(~a.any(1), float("-inf"))

    def alive_sizes(self, alive: Tensor) -> Tensor:
        """Number of surviving elements in each group."""
        return self.group(alive).sum(1)

    def expand(self, group_keep: Tensor, shape: torch.Size) -> Tensor:
        """Group keep flags ``[groups]`` → element mask of ``shape``."""
        size = math.prod(shape) // group_keep.numel()
        return self.ungroup(group_keep[:, None].expand(-1, size), shape)

    def __str__(self) -> str:
        return self.name


@GRANULARITIES.register("element")
class Element(Granularity):
    """Unstructured: each weight is its own group (the reduction is the identity)."""

    name = "element"

    def group(self, t: Tensor) -> Tensor:
        return t.reshape(-1, 1)

    def ungroup(self, g: Tensor, shape: torch.Size) -> Tensor:
        return g.reshape(shape)


@GRANULARITIES.register("vector")
class Vector(Granularity):
    """One row of a k×k kernel, ``w[o, i, r, :]`` (the last kernel axis; a single weight for Linear)."""

    name = "vector"

    def group(self, t: Tensor) -> Tensor:
        return t.reshape(-1, t.shape[-1] if t.dim() > 2 else 1)

    def ungroup(self, g: Tensor, shape: torch.Size) -> Tensor:
        return g.reshape(shape)


@GRANULARITIES.register("kernel")
class Kernel(Granularity):
    """One whole kernel ``w[o, i]``: an input–output channel pair (a single weight for Linear)."""

    name = "kernel"

    def group(self, t: Tensor) -> Tensor:
        out, inp, k = as_conv(t.shape)
        return t.reshape(out * inp, k)

    def ungroup(self, g: Tensor, shape: torch.Size) -> Tensor:
        return g.reshape(shape)


@GRANULARITIES.register("channel")
class Channel(Granularity):
    """One output filter / neuron ``w[o]``; its bias and the BatchNorm entry that follows die with it."""

    name = "channel"
    masks_following = True
    removes_outputs = True

    def group(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], -1)

    def ungroup(self, g: Tensor, shape: torch.Size) -> Tensor:
        return g.reshape(shape)


@GRANULARITIES.register("head")
class Head(Granularity):
    """One attention head: its rows of ``q_proj``, ``k_proj`` and ``v_proj`` (weights and biases) and its
    columns of ``out_proj``. The engine scores it on the stacked view of the four projections
    (:meth:`benchkit.pruning.units.Attention.stack`, ``[heads, head_dim, ...]``), whose rows are the heads;
    only attention modules are pruned, at least one head kept in each unless ``allow_layer_collapse``."""

    name = "head"
    structure = "attention"

    def group(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], -1)

    def ungroup(self, g: Tensor, shape: torch.Size) -> Tensor:
        return g.reshape(shape)


@GRANULARITIES.register("neuron")
class Neuron(Channel):
    """One hidden neuron of a transformer MLP: a row (and bias entry) of its first Linear ``fc``, whose
    matching column of the second Linear ``proj`` then only sees zero (compaction removes both). The same
    masks as ``channel`` with every layer but the MLPs' first excluded; the output layer is never one."""

    name = "neuron"
    structure = "mlp"
    removes_outputs = False


class NM(Granularity):
    """At most N non-zeros in every M consecutive weights along the input dimension, at each kernel
    position (groups ``w[o, i0:i0+M, r, c]``), as NVIDIA's 2:4 sparse tensor cores expect."""

    within_group = True

    def __init__(self, n: int, m: int):
        if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 2:
            raise GranularityError(f"N:M needs integers 1 <= N < M, got {n}:{m}")
        if n >= m:
            raise GranularityError(f"N:M needs N < M (keep N of every M weights), got {n}:{m}; e.g. 2:4")
        self.n, self.m = n, m
        self.name = f"{n}:{m}"

    @property
    def compression(self) -> float:
        return self.m / self.n

    def check_layer(self, name: str, shape: torch.Size) -> None:
        _, inp, _ = as_conv(shape)
        if inp % self.m:
            raise GranularityError(
                f"N:M granularity {self.name}: M={self.m} does not divide the input dimension of layer {name!r} "
                f"(in={inp}, weight shape {tuple(shape)}); exclude the layer (exclude=[{name!r}]) or choose an M "
                f"that divides {inp}"
            )

    def group(self, t: Tensor) -> Tensor:
        out, inp, k = as_conv(t.shape)
        return t.reshape(out, inp, k).transpose(1, 2).reshape(-1, self.m)

    def ungroup(self, g: Tensor, shape: torch.Size) -> Tensor:
        out, inp, k = as_conv(shape)
        return g.reshape(out, k, inp).transpose(1, 2).reshape(shape)

    def keep_within(self, scores: Tensor, alive: Tensor, keep: int | None = None) -> Tensor:
        """Element mask keeping the ``keep`` (default N) best survivors of every group of M.

        Ties are broken by position: among equal scores the earlier weight is pruned first, the same
        rule the global/layer selection uses."""
        keep = self.n if keep is None else keep
        s = self.group(scores.masked_fill(~alive, float("-inf")))
        order = torch.sort(s, dim=1, stable=True).indices  # ascending; dead first
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(self.m, device=s.device).expand_as(order))
        kept = (rank >= self.m - keep) & self.group(alive)
        return self.ungroup(kept, scores.shape)


GRANULARITIES.register("n:m", NM)

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def get_granularity(spec: str | Granularity) -> Granularity:
    """``"element" | "vector" | "kernel" | "channel" | "head" | "neuron" | "N:M"`` (e.g. ``"2:4"``) or a
    registered name."""
    if isinstance(spec, Granularity):
        return spec
    match = _NM.match(str(spec))
    if match:
        return NM(int(match.group(1)), int(match.group(2)))
    if str(spec).lower() == "n:m":
        raise GranularityError("N:M granularity needs numbers, e.g. '2:4' (keep 2 of every 4 weights)")
    try:
        factory = GRANULARITIES.get(spec)
    except UnknownNameError as e:
        raise UnknownNameError(f"{e}; N:M takes numbers, e.g. '2:4'") from None
    return factory()
