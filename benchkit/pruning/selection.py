"""Selection within a unit of layers that share one threshold (the units come from the allocation,
:mod:`benchkit.pruning.allocation`): the lowest-scoring groups are pruned until the requested fraction of the
unit's surviving weights is gone. Two interchangeable selection routines do that:

* ``prune_lowest`` — the reference: concatenate, stable-sort, cut. Handles groups of any size.
* ``keep_above_streaming`` — for single-weight groups (``element``) on big models: a strided sample
  brackets the k-th smallest value, one pass per layer keeps everything above the bracket and collects
  the few values inside it, which are then sorted exactly. No model-sized concatenation, no model-sized
  float temporary. It returns exactly the masks ``prune_lowest`` does (tested).

Shared rules: the number of groups pruned is ``round(fraction * surviving groups)`` (the rounding of
``torch.nn.utils.prune``); ties go to the earlier weight (layer order, then flat index); unless
``allow_collapse``, every layer keeps its best group, and asking for more than that allows is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


class CompressionError(ValueError):
    """The requested compression cannot be reached (e.g. it would remove whole layers)."""


@dataclass
class Groups:
    """One layer's groups as a scope sees them (flat, in group order)."""

    name: str
    scores: Tensor  # [G] group score (ignored where not alive)
    alive: Tensor  # [G] bool: the group still has a surviving weight
    sizes: Tensor  # [G] surviving weights per group


def n_to_prune(fraction: float, n: int) -> int:
    """Same rounding as torch.nn.utils.prune._compute_nparams_toprune."""
    return round(fraction * n)


@dataclass
class LayerCount:
    """Surviving groups of one layer, enough to decide feasibility before any scoring."""

    name: str
    groups: int  # alive groups
    weights: int  # alive weights
    min_size: int  # smallest / largest alive group (in surviving weights)
    max_size: int


def check_feasible(counts: list[LayerCount], fraction: float, allow_collapse: bool, unit: str = "group") -> None:
    """Refuse, before any scoring, a fraction that would prune some layer to nothing."""
    live = [c for c in counts if c.groups]
    if fraction <= 0 or allow_collapse or not live:
        return
    what = ", ".join(c.name for c in live) if len(live) <= 6 else f"{len(live)} layers"
    sizes = {c.min_size for c in live} | {c.max_size for c in live}
    if len(sizes) == 1:
        n_groups = sum(c.groups for c in live)
        k, most = n_to_prune(fraction, n_groups), n_groups - len(live)
        if k > most:
            raise CompressionError(
                f"cannot prune {k} of the {n_groups} surviving {unit}s of {what} (compression "
                f"{1 / (1 - fraction):.4g}x of the survivors): at most {most} can go without pruning a layer to "
                f"nothing. Ask for less compression, exclude the smallest layers, or pass allow_layer_collapse=True"
            )
    else:
        # Unequal groups: which group a layer keeps depends on the scores, so only the best case is
        # known here (each layer keeps its smallest group). Beyond it the request is impossible whatever
        # the scores, and is refused before scoring, with prune_lowest's tolerance (one group); between
        # it and the worst case, prune_lowest decides once the scores are known.
        total = sum(c.weights for c in live)
        most = total - sum(c.min_size for c in live)
        if fraction * total - most > max(c.max_size for c in live):
            raise CompressionError(
                f"cannot prune {fraction * total:.0f} of the {total} surviving weights of {what} (compression "
                f"{1 / (1 - fraction):.4g}x of the survivors) in whole {unit}s without pruning a layer to nothing "
                f"(at most about {most}). Ask for less compression, exclude the smallest layers, or pass "
                f"allow_layer_collapse=True"
            )


def prune_lowest(groups: list[Groups], fraction: float, allow_collapse: bool = False) -> dict[str, Tensor]:
    """Reference selection: keep flags ``[G]`` per layer after pruning ``fraction`` of the survivors.

    Equal-sized groups: prune ``round(fraction * alive groups)`` of them. Unequal sizes (kernels of
    different layers, partly pruned groups): prune in score order until the pruned weight count is
    nearest to ``fraction * alive weights`` — within one group of the target."""
    live = [(i, g) for i, g in enumerate(groups) if bool(g.alive.any())]
    keep = {g.name: g.alive.clone() for g in groups}
    if not live or fraction <= 0:
        return keep
    dev = live[0][1].scores.device
    scores = torch.cat([g.scores[g.alive].to(dev, torch.float64) for _, g in live])
    sizes = torch.cat([g.sizes[g.alive].to(dev, torch.int64) for _, g in live])
    index = [g.alive.nonzero().reshape(-1).to(dev) for _, g in live]
    layer = torch.cat([torch.full_like(ix, j) for j, ix in enumerate(index)])
    index = torch.cat(index)
    order = torch.sort(scores, stable=True).indices  # ascending; ties in concatenation order
    candidate = torch.ones_like(order, dtype=torch.bool)
    if not allow_collapse:  # each layer's best group (last in the order) is not a candidate
        last = torch.full((len(live),), -1, dtype=torch.int64, device=dev)
        last.scatter_reduce_(0, layer[order], torch.arange(len(order), device=dev), reduce="amax")
        candidate[last] = False
    cand = order[candidate]
    if bool((sizes == sizes[0]).all()):
        k = n_to_prune(fraction, len(scores))
        if k > len(cand):
            raise CompressionError(
                f"cannot prune {k} of {len(scores)} surviving groups without pruning a layer to nothing "
                f"(at most {len(cand)}); lower the compression or pass allow_layer_collapse=True"
            )
    else:
        target = fraction * float(sizes.sum())
        cum = torch.cat([torch.zeros(1, dtype=torch.float64, device=dev), sizes[cand].cumsum(0).to(torch.float64)])
        k = int(torch.argmin((cum - target).abs()))  # first minimum: the smaller count on a tie
        if target - float(cum[-1]) > float(sizes.max()):
            raise CompressionError(
                f"cannot prune {target:.0f} of {int(sizes.sum())} surviving weights without pruning a layer "
                f"to nothing (at most {int(cum[-1])}); lower the compression or pass allow_layer_collapse=True"
            )
    pruned = cand[:k]
    for j, (_, g) in enumerate(live):
        sel = index[pruned[layer[pruned] == j]]
        keep[g.name][sel.to(g.alive.device)] = False
    return keep


def _bracket(sample: Tensor, k: int, n: int, widen: int) -> tuple[float, float]:
    """Values around the k-th smallest of n, estimated from a sample (−inf/inf when unsure)."""
    m = sample.numel()
    if m == 0 or widen >= 3:
        return -math.inf, math.inf
    q = k / n
    centre = q * m
    margin = (6.0 * math.sqrt(m * q * (1 - q)) + 32) * 8**widen
    lo_i, hi_i = math.floor(centre - margin), math.ceil(centre + margin)
    lo = float(torch.kthvalue(sample, lo_i + 1).values) if lo_i >= 0 else -math.inf
    hi = float(torch.kthvalue(sample, hi_i + 1).values) if hi_i < m else math.inf
    return lo, hi


def _flatnonzero(mask: Tensor) -> Tensor:
    if mask.device.type == "cpu":  # numpy's flatnonzero is ~8x faster than torch.nonzero on CPU
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().reshape(-1)


@torch.no_grad()
def keep_above_streaming(
    values: list[Tensor],
    alive: list[Tensor | None],
    k: int,
    absolute: bool = False,
    chunk: int = 1 << 20,
    sample_size: int = 1 << 20,
) -> list[Tensor]:
    """Keep masks that prune the ``k`` lowest alive entries of ``values`` (of ``|values|`` when
    ``absolute``) jointly, ties to the earlier entry. Each layer is read in chunks through reusable
    buffers, so memory beyond the bool masks is a few chunks plus the boundary values, and |w| is never
    materialised for the whole model. ``alive[i]`` is None for a layer with nothing pruned yet."""
    flats = [v.detach().reshape(-1) for v in values]
    alives = [a.reshape(-1) if a is not None else None for a in alive]
    n_alive = sum(int(torch.count_nonzero(a)) if a is not None else f.numel() for f, a in zip(flats, alives))
    if not 0 <= k <= n_alive:
        raise ValueError(f"cannot prune {k} of {n_alive} entries")
    if k == 0:
        return [
            a.clone().reshape(v.shape) if a is not None else torch.ones(v.shape, dtype=torch.bool, device=v.device)
            for v, a in zip(values, alives)
        ]
    total = sum(f.numel() for f in flats)
    stride = max(1, total // sample_size)
    parts = []
    for f, a in zip(flats, alives):
        s = f[::stride].abs() if absolute else f[::stride]
        parts.append(s[a[::stride]] if a is not None else s)
    sample = torch.cat([p.to(torch.float64) for p in parts])
    largest = max(f.numel() for f in flats)
    dtype = torch.promote_types(flats[0].dtype, torch.float32)
    for widen in range(4):
        lo, hi = _bracket(sample, k, n_alive, widen)
        keeps, b_vals, b_where = [], [], []
        n_keep = 0
        for i, (f, a) in enumerate(zip(flats, alives)):
            keep = torch.empty(f.shape, dtype=torch.bool, device=f.device)
            size = min(chunk, largest)
            vbuf = torch.empty(size, dtype=f.dtype if f.is_floating_point() else dtype, device=f.device)
            ibuf = torch.empty(size, dtype=torch.bool, device=f.device)
            for start in range(0, f.numel(), chunk):
                c = f[start : start + chunk]
                n = c.numel()
                v = torch.abs(c, out=vbuf[:n]) if absolute else c
                kc, inside = keep[start : start + n], ibuf[:n]
                torch.gt(v, hi, out=kc)
                torch.ge(v, lo, out=inside)
                if a is not None:
                    ac = a[start : start + n]
                    kc &= ac
                    inside &= ac
                inside ^= kc  # lo <= v <= hi (and alive)
                idx = _flatnonzero(inside)
                if idx.numel():
                    idx = idx.to(f.device)
                    b_vals.append(v[idx].to(torch.float64))
                    b_where.append(torch.stack([torch.full_like(idx, i), idx + start]))
            n_keep += int(torch.count_nonzero(keep))  # bool.sum() would make an int64 copy
            keeps.append(keep)
        n_inside = sum(int(b.numel()) for b in b_vals)
        n_below = n_alive - n_keep - n_inside
        if n_below <= k <= n_below + n_inside:
            break
    else:
        raise ValueError("scores contain NaN: cannot rank them")
    r = k - n_below  # boundary entries to prune: the r smallest, earlier entry first on ties
    if n_inside:
        vals, where = torch.cat(b_vals), torch.cat(b_where, dim=1)
        pruned = torch.zeros_like(vals, dtype=torch.bool)
        if r:
            t = torch.kthvalue(vals, r).values
            pruned = vals < t
            ties = (vals == t).nonzero().reshape(-1)
            pruned[ties[: r - int(torch.count_nonzero(pruned))]] = True
        survivors = where[:, ~pruned]
        for i, keep in enumerate(keeps):
            keep[survivors[1][survivors[0] == i]] = True
    return [keep.reshape(v.shape) for keep, v in zip(keeps, values)]
