"""How the overall sparsity is split across layers: the allocation (``prune.allocation``).

An allocation is one of two kinds:

* **joint** — one threshold ranks the groups of every layer together, so the split follows the scores:
  ``global`` (the scores as they are; for structured groups first normalised within each layer, see
  :data:`NORMALIZERS`) and ``lamp`` (layer-adaptive magnitude scores, Lee et al. 2021);
* **per layer** — a density is chosen for each layer from the shapes (and, for ``owl``, calibration data),
  and each layer keeps its best groups up to that density: ``uniform`` (the same density everywhere),
  ``uniform+`` (first layer dense, output layer at most 80% sparse: Gale et al. 2019), ``er`` and ``erk``
  (Erdős–Rényi(-Kernel): Mocanu et al. 2018, Evci et al. 2020), ``owl`` (outlier-weighted from calibration
  activations: Yin et al. 2024).

Densities are absolute (kept / total weights of the layer) and are solved for the *pruned set* — the layers
neither excluded nor overridden (overrides keep their own compression on top, as in RigL's
``custom_sparsity_map``). A layer can never regrow: one already sparser than its share is held where it is
(like RigL's dense layers, but from above) and the others are re-solved, so the pruned set still lands on
the requested overall density.

Register your own with ``@ALLOCATIONS.register("name")`` on a subclass of :class:`Allocation`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from benchkit.pruning.calibrated import owl_allocation
from benchkit.pruning.layers import prunable_layers
from benchkit.registry import Registry

ALLOCATIONS: Registry[Callable[[], Allocation]] = Registry("allocation")


class AllocationError(ValueError):
    """An allocation that cannot reach the requested density (e.g. uniform+ with too few layers)."""


@dataclass(frozen=True)
class LayerBudget:
    """What an allocation knows of one layer of the pruned set."""

    name: str
    shape: tuple[int, ...]  # weight shape [out, in, *kernel]
    kept: int  # surviving weights now
    position: str = "middle"  # "first" / "last" prunable layer of the model (definition order), or "middle"

    @property
    def total(self) -> int:
        return math.prod(self.shape)

    @property
    def density(self) -> float:
        return self.kept / self.total


@dataclass(frozen=True)
class AllocationContext:
    """What a data-driven allocation may read: the model and the calibration inputs."""

    model: object = None  # nn.Module
    calibration: object = None  # a tensor or a list of batches (see benchkit.pruning.calibrated)


class Allocation:
    """Base class. Joint allocations rank all layers together (optionally transforming the group scores
    with :meth:`transform`); the others return per-layer densities from :meth:`densities`."""

    name: str = ""
    joint: bool = False
    needs_data: bool = False  # densities read calibration activations (context.calibration)

    def densities(self, layers: list[LayerBudget], density: float, context: object = None) -> dict[str, float]:
        """Per-layer target density with ``Σ d_l · n_l = density · Σ n_l`` (none above a layer's current one)."""
        raise NotImplementedError

    def transform(self, scores: Tensor, alive: Tensor) -> Tensor:
        """Joint allocations: this layer's group scores as the global ranking compares them (dead: −inf)."""
        return scores


@ALLOCATIONS.register("global")
class Global(Allocation):
    """One threshold across every layer of the pruned set (ShrinkBench's GlobalMagWeight)."""

    name = "global"
    joint = True


@ALLOCATIONS.register("lamp")
class LAMP(Allocation):
    """Layer-adaptive magnitude pruning (Lee et al. 2021): within each layer the scores sorted ascending,
    ``s_u² / Σ_{v ≥ u} s_v²``, then one global threshold. With magnitude scores this is the paper's LAMP
    score; with other criteria or groups, the same normalisation of their scores."""

    name = "lamp"
    joint = True

    def transform(self, scores: Tensor, alive: Tensor) -> Tensor:
        return lamp_scores(scores, alive)


def lamp_scores(scores: Tensor, alive: Tensor) -> Tensor:
    """LAMP of one layer's (group) scores: ``s_u² / Σ_{v ≥ u} s_v²`` over its alive entries sorted ascending
    (ties in index order, so the last of equal scores gets the larger value); dead entries −inf."""
    flat, live = scores.reshape(-1).double(), alive.reshape(-1)
    out = torch.full_like(flat, float("-inf"))
    idx = live.nonzero().reshape(-1)
    if idx.numel():
        sq = flat[idx].square()
        order = torch.sort(sq, stable=True).indices
        sorted_sq = sq[order]
        tail = sorted_sq.flip(0).cumsum(0).flip(0)  # Σ_{v ≥ u}
        value = torch.where(tail > 0, sorted_sq / tail, torch.zeros_like(tail))
        out[idx[order]] = value
    return out.reshape(scores.shape)


@ALLOCATIONS.register("uniform")
class Uniform(Allocation):
    """The same density in every layer (ShrinkBench's LayerMagWeight; the old ``scope: layer``)."""

    name = "uniform"

    def densities(self, layers, density, context=None):
        return {layer.name: min(density, layer.density) for layer in layers}


@ALLOCATIONS.register("uniform+")
class UniformPlus(Allocation):
    """Gale et al. 2019: the first layer dense, the output layer at most 80% sparse, every other layer at
    one density chosen so the pruned set reaches the requested overall density."""

    name = "uniform+"
    max_last_sparsity = 0.8

    def densities(self, layers, density, context=None):
        floors = {}  # lower bounds on density: first dense, last >= 20%
        for layer in layers:
            if layer.position == "first":
                floors[layer.name] = 1.0
            elif layer.position == "last":
                floors[layer.name] = 1.0 - self.max_last_sparsity
        out = solve_scaled(layers, density, {n: 1.0 for n in (x.name for x in layers)}, floors, self.name)
        return out


@ALLOCATIONS.register("er")
class ErdosRenyi(Allocation):
    """Erdős–Rényi (Mocanu et al. 2018): density ∝ (n_in + n_out) / (n_in · n_out), kernel ignored (RigL's
    ``erdos_renyi``); layers whose density would exceed 1 are dense and the rest rescaled."""

    name = "er"
    include_kernel = False

    def densities(self, layers, density, context=None):
        return solve_scaled(layers, density, {x.name: erdos_renyi_scale(x.shape, self.include_kernel)
                                              for x in layers}, {}, self.name)


@ALLOCATIONS.register("erk")
class ErdosRenyiKernel(ErdosRenyi):
    """Erdős–Rényi-Kernel (Evci et al. 2020): density ∝ (n_in + n_out + k_h + k_w) / (n_in · n_out · k_h · k_w)."""

    name = "erk"
    include_kernel = True


@ALLOCATIONS.register("owl")
class OWL(Allocation):
    """Outlier-weighted layer-wise sparsity (Yin et al. 2024; luuyin/OWL): blocks whose ``|W|·||X||`` has more
    outliers (entries above ``threshold`` × the block's mean) keep more weights, within ±``lam`` of the target
    density and with the target as the mean over blocks (:func:`benchkit.pruning.calibrated.owl_allocation`)."""

    name = "owl"
    needs_data = True
    threshold = 5.0
    lam = 0.08

    def densities(self, layers, density, context=None):
        if context is None or context.calibration is None:
            raise AllocationError("allocation 'owl' weighs layers by their calibration activations: pass "
                                  "batch= or loader= (calibration inputs) to prune()")
        names = [x.name for x in layers]
        excluded = [n for n in prunable_layers(context.model) if n not in names]
        sparsity = owl_allocation(context.model, context.calibration, 1.0 - density, exclude=excluded,
                                  threshold=self.threshold, lam=self.lam)
        return {x.name: min(1.0 - sparsity[x.name], x.density) for x in layers}


def erdos_renyi_scale(shape: tuple[int, ...], include_kernel: bool) -> float:
    """The unnormalised ER(K) density of a weight ``[out, in, *kernel]`` (a Linear is ``[out, in]``):
    ``sum(shape) / prod(shape)`` with the kernel, ``(n_in + n_out) / (n_in · n_out)`` without."""
    if include_kernel:
        return sum(shape) / math.prod(shape)
    n_out, n_in = shape[0], shape[1]
    return (n_in + n_out) / (n_in * n_out)


def solve_scaled(layers: list[LayerBudget], density: float, scale: Mapping[str, float],
                 floors: Mapping[str, float], name: str) -> dict[str, float]:
    """Densities ``d_l = clip(ε · scale_l, floor_l, cap_l)`` with ε solved so ``Σ d_l n_l = density Σ n_l``.

    ``cap_l`` is the layer's current density (1 when unpruned: RigL's "would exceed 1, make it dense" rule,
    applied to the layer with the largest scale first, then re-solved, as in their
    ``get_sparsities_erdos_renyi``); ``floor_l`` a minimum some allocations impose (uniform+)."""
    total = sum(x.total for x in layers)
    budget = density * total
    fixed: dict[str, float] = {}
    for x in layers:  # floors that the current masks already violate cannot be honoured: held at the cap
        if floors.get(x.name, 0.0) >= x.density:
            fixed[x.name] = x.density
    while True:
        free = [x for x in layers if x.name not in fixed]
        rest = budget - sum(fixed[x.name] * x.total for x in layers if x.name in fixed)
        if not free:
            break
        free_floor = [x for x in free if x.name in floors]
        divisor = sum(scale[x.name] * x.total for x in free)
        if rest <= 0 or divisor <= 0:
            raise AllocationError(
                f"allocation {name!r} cannot reach density {density:.4g}: the layers it keeps denser "
                f"({', '.join(fixed)}) already hold {sum(fixed[n] * x.total for x in layers for n in [x.name] if n in fixed):.0f} "
                f"of the {budget:.0f} weights allowed; ask for less sparsity or use another allocation")
        eps = rest / divisor
        # a layer whose share exceeds its cap (current density) is held there, the largest scale first (RigL)
        over = [x for x in free if eps * scale[x.name] > x.density + 1e-12]
        if over:
            top = max(scale[x.name] for x in over)
            for x in over:
                if scale[x.name] == top:
                    fixed[x.name] = x.density
            continue
        # a layer below its floor is raised to it
        under = [x for x in free_floor if eps * scale[x.name] < floors[x.name]]
        if under:
            for x in under:
                fixed[x.name] = floors[x.name]
            continue
        for x in free:
            fixed[x.name] = eps * scale[x.name]
        break
    return {x.name: fixed[x.name] for x in layers}


# ------------------------------------------------------------------------------ normalising group scores
def _by_mean(s: Tensor, alive: Tensor) -> Tensor:
    return s / s[alive].abs().mean().clamp_min(1e-30)


def _by_max(s: Tensor, alive: Tensor) -> Tensor:
    return s / s[alive].abs().max().clamp_min(1e-30)


def _by_l2(s: Tensor, alive: Tensor) -> Tensor:
    return s / s[alive].norm().clamp_min(1e-30)


#: How a joint ranking compares the groups of different layers (``prune.normalize``): each layer's alive
#: group scores divided by their mean, max or L2 norm, or turned into LAMP scores; ``none`` ranks the raw
#: reductions, which starves layers with a large fan-in of pruning (a channel's L1 sum grows with it).
NORMALIZERS: dict[str, Callable[[Tensor, Tensor], Tensor] | None] = {
    "auto": None,  # resolved by resolve_normalize
    "none": lambda s, alive: s,
    "mean": _by_mean,
    "max": _by_max,
    "l2": _by_l2,
    "lamp": lamp_scores,
}


def resolve_normalize(normalize: str, allocation: Allocation, single_weight_groups: bool) -> str:
    """``auto`` → ``mean`` (Torch-Pruning's default) where a joint ranking compares groups of several weights,
    ``none`` for single weights (classic global magnitude pruning) and for per-layer allocations."""
    if normalize not in NORMALIZERS:
        raise ValueError(f"unknown normalize {normalize!r}; allowed: {', '.join(NORMALIZERS)}")
    if normalize != "auto":
        return normalize
    return "mean" if allocation.joint and not single_weight_groups and allocation.name == "global" else "none"


def normalized(scores: Tensor, alive: Tensor, normalize: str) -> Tensor:
    """Group scores of one layer normalised by ``normalize`` over its alive groups (dead stay −inf)."""
    fn = NORMALIZERS[normalize]
    if fn is None:
        raise ValueError("resolve 'auto' with resolve_normalize first")
    if not bool(alive.any()):
        return scores
    out = fn(scores.double(), alive)
    return out.masked_fill(~alive, float("-inf"))
