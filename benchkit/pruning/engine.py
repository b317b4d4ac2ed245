"""``bk.prune``: score, group, allocate, select, mask — the one entry point every timing strategy uses.

    report = bk.prune(model, compression=8, criterion="magnitude", granularity="element", allocation="global",
                      batch=(x, y), exclude=["classifier.*"], overrides={"conv1": 2.0})

The call is split in two so that everything the user can get wrong is refused before any work:
``plan_pruning`` checks every argument against the model (names, numbers, N:M divisibility, data,
feasibility) and ``compute_masks`` does the scoring and selection. ``prune`` runs both, applies the masks
with ``torch.nn.utils.prune`` (via ``masks.apply_masks``) and returns a ``PruneReport``.

Compression is relative to the current survivors, so rounds compound (2x then 2x = 4x), and already
pruned weights score −inf — unless ``regrow=True``: then every weight is a candidate again (scored on its
stored value), compression is relative to all weights, and the new masks *replace* the old ones (entries
that come back start at zero). Iterative criteria (SynFlow) are re-scored ``iterations`` times on an
exponential schedule, each round pruning the same fraction of the survivors.

The allocation (:mod:`benchkit.pruning.allocation`) decides how the overall sparsity splits across the
layers of the pruned set: one joint ranking (``global``, ``lamp``) or a density per layer (``uniform``,
``uniform+``, ``er``, ``erk``). Structured granularities never remove the output layer's units (its rows
are the classes) unless ``keep_outputs=False``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass, field
from numbers import Real

import torch
from torch import Tensor, nn

from benchkit.pruning.allocation import (
    ALLOCATIONS,
    Allocation,
    AllocationContext,
    AllocationError,
    LayerBudget,
    normalized,
    resolve_normalize,
)
from benchkit.pruning.calibrated import CalibrationError, prune_calibrated
from benchkit.pruning.criteria import CRITERIA, Criterion, Magnitude, ScoringData
from benchkit.pruning.granularity import (
    NM,
    Element,
    Granularity,
    GranularityError,
    check_reduce,
    get_granularity,
    signed_reduce_problem,
)
from benchkit.pruning.graph import following_batchnorm
from benchkit.pruning.layers import prunable_layers, resolve_patterns, tied_layers
from benchkit.pruning.masks import (
    apply_masks,
    current_mask,
    deepcopy_model,
    is_masked,
    make_permanent,
    param_value,
    resolve,
    set_masks,
)
from benchkit.pruning.selection import (
    CompressionError,
    Groups,
    LayerCount,
    check_feasible,
    keep_above_streaming,
    n_to_prune,
    prune_lowest,
)
from benchkit.pruning.units import Attention, StructureError, Units, find_units, restrict

# Selection units with at least this many surviving weights use the streaming threshold (element
# granularity); smaller ones use the reference sort. Both give identical masks; tests flip this.
STREAMING_MIN_ELEMENTS = 1 << 16


class PruneError(ValueError):
    """An argument of ``prune`` that cannot work; the message names it and the allowed values."""


@dataclass
class Part:
    """A selection unit: layers sharing one threshold and one target compression."""

    names: list[str]
    compression: float
    role: str  # "pruned" (the scope's set) | "override"

    @property
    def sparsity(self) -> float:
        return 1.0 - 1.0 / self.compression


@dataclass
class PrunePlan:
    """Everything ``compute_masks`` needs, validated."""

    criterion: Criterion
    criterion_name: str
    granularity: Granularity
    allocation: Allocation
    allocation_name: str
    normalize: str  # resolved: none | mean | max | l2 | lamp
    reduce: str
    iterations: int
    allow_layer_collapse: bool
    data: ScoringData | None
    requested_compression: float
    parts: list[Part]
    layers: dict[str, nn.Module]  # every prunable layer, definition order
    excluded: list[str]
    followers: dict[str, str] = field(default_factory=dict)  # layer -> following BatchNorm (channel)
    regrow: bool = False  # every weight a candidate again; masks replaced
    comparison: str = "layer"  # element scores compared per layer (or per allocation unit) or per output row
    kept_outputs: list[str] = field(default_factory=list)  # output layers spared by a structured granularity
    tied: dict[str, list[str]] = field(default_factory=dict)  # layer -> other modules sharing its weight
    units: Units | None = None  # structured granularities (head, neuron): the units the model holds

    @property
    def scope_name(self) -> str:  # the old name of the allocation axis
        return self.allocation_name

    @property
    def calibrated(self) -> bool:
        """Pruned by :mod:`benchkit.pruning.calibrated` (Wanda, SparseGPT, per-row magnitude), layer by layer."""
        return self.criterion.calibrated or self.comparison == "row"

    @property
    def scored(self) -> list[str]:
        inside = {n for p in self.parts for n in p.names}
        return [n for n in self.layers if n in inside]

    @property
    def coupled(self) -> dict[str, Attention]:
        """Scored anchors whose groups span several layers (a head: q/k/v rows and out_proj columns)."""
        if self.units is None:
            return {}
        return {n: self.units.coupled[n] for n in self.scored if n in self.units.coupled}

    @property
    def measured(self) -> list[str]:
        """Every layer the criterion scores: the scored layers and the other members of coupled groups."""
        members = {m for att in self.coupled.values() for m in att.layers} | set(self.scored)
        return [n for n in self.layers if n in members]


@dataclass
class PruneReport:
    """What one ``prune`` call did. ``achieved_compression`` is over the pruned set (non-excluded,
    non-overridden layers, weights only) relative to the survivors before the call, like the request;
    ``overall_compression`` is total weights / survivors of that set after it (rounds compounded)."""

    criterion: str
    granularity: str
    allocation: str
    requested_compression: float
    achieved_compression: float
    layers: list[dict]
    masks: dict[str, Tensor]
    seconds: float
    overall_compression: float = float("nan")
    iterations: int = 1
    normalize: str = "none"
    notes: list[str] = field(default_factory=list)  # what the call decided on its own (outputs kept, ...)

    @property
    def scope(self) -> str:  # the old name of the allocation axis
        return self.allocation

    def collapsed(self, min_units: int = 1, min_relative_density: float = 0.05) -> list[dict]:
        """Rows of pruned layers left (nearly) collapsed: fewer than ``min_units`` output units with a
        surviving weight, or a density under ``min_relative_density`` × the pruned set's overall density."""
        pruned = [r for r in self.layers if r["role"] != "excluded"]
        kept, total = sum(r["kept_after"] for r in pruned), sum(r["total"] for r in pruned)
        overall = kept / total if total else 0.0
        return [r for r in pruned if r["units_alive"] < min_units or r["density"] < min_relative_density * overall]

    def __str__(self) -> str:
        lines = [
            f"pruned {self.criterion}/{self.granularity}/{self.allocation}: requested {self.requested_compression:.4g}x, "
            f"achieved {self.achieved_compression:.4g}x (overall {self.overall_compression:.4g}x) in {self.seconds:.3f}s"
        ]
        for r in self.layers:
            lines.append(
                f"  {r['name']:<30} {r['role']:<8} {r['kept_before']:>10} -> {r['kept_after']:>10} of {r['total']:>10}"
                f"  ({r['compression']:.3g}x)"
            )
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ validation
def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise PruneError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _check_compression(name: str, value: object) -> float:
    c = _number(name, value)
    if not (math.isfinite(c) and c >= 1):
        raise PruneError(
            f"{name} must be a finite ratio >= 1 (e.g. 8 keeps 1 in 8 of the surviving weights), got {value!r}"
        )
    return c


def target_compression(compression: object, sparsity: object) -> float | None:
    """``compression`` or ``sparsity`` (not both) → compression ratio of the survivors."""
    if compression is not None and sparsity is not None:
        raise PruneError(
            f"give compression or sparsity, not both (got compression={compression!r}, sparsity={sparsity!r}; "
            "compression = 1 / (1 - sparsity))"
        )
    if sparsity is not None:
        s = _number("sparsity", sparsity)
        if not 0 <= s < 1:
            raise PruneError(
                f"sparsity must be in [0, 1) (the fraction of surviving weights to prune), got {sparsity!r}"
            )
        return 1.0 / (1.0 - s)
    if compression is not None:
        return _check_compression("compression", compression)
    return None


def _criterion(criterion: str | Criterion | type[Criterion]) -> tuple[Criterion | type[Criterion], str]:
    """The criterion class (or a ready instance) and its name; instantiated only after validation, so a
    refused call does not even draw the random criterion's seed from the global RNG."""
    if isinstance(criterion, Criterion):
        return criterion, criterion.name or type(criterion).__name__.lower()
    if isinstance(criterion, type) and issubclass(criterion, Criterion):
        return criterion, criterion.name or criterion.__name__.lower()
    return CRITERIA.get(criterion), str(criterion).lower()  # unknown name -> error listing the registered ones


def _scoring_data(batch, loader, loss_fn, score_batches, input_shape) -> ScoringData | None:
    if batch is not None and loader is not None:
        raise PruneError("give batch=(x, y) or loader=..., not both")
    if torch.is_tensor(batch):  # inputs only (calibration windows of token ids, images): no labels
        if batch.dim() == 0:
            raise PruneError("batch must hold examples along its first dimension, got a scalar")
        return ScoringData(batch=(batch, None), loss_fn=loss_fn, max_batches=score_batches, input_shape=input_shape)
    if batch is not None:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(torch.is_tensor(t) for t in batch)):
            raise PruneError(f"batch must be a pair of tensors (x, y) or a tensor of inputs, got {type(batch).__name__}")
        batch = (batch[0], batch[1])
        if batch[0].dim() == 0 or batch[1].dim() == 0 or len(batch[0]) != len(batch[1]):
            raise PruneError(f"batch=(x, y) needs one label per example: x has shape {tuple(batch[0].shape)}, "
                             f"y has shape {tuple(batch[1].shape)}")
    if loader is not None:
        if not isinstance(loader, Iterable):
            raise PruneError(f"loader must be an iterable of (x, y) batches (e.g. a DataLoader), got "
                             f"{type(loader).__name__}")
        if isinstance(loader, Sized) and len(loader) == 0:
            raise PruneError("loader has no batches; give a non-empty loader or batch=(x, y)")
    if isinstance(score_batches, bool) or not isinstance(score_batches, int) or score_batches < 1:
        raise PruneError(f"score_batches must be an integer >= 1, got {score_batches!r}")
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
    if batch is None and loader is None and input_shape is None:
        return None
    return ScoringData(batch=batch, loader=loader, loss_fn=loss_fn, max_batches=score_batches, input_shape=input_shape)


def count(mask: Tensor) -> int:
    """Number of True entries (``count_nonzero``: ~15x faster than ``bool.sum()``, no int64 copy)."""
    return int(torch.count_nonzero(mask))


def _alive(module: nn.Module) -> Tensor | None:
    """Current weight mask (None = nothing pruned yet)."""
    return current_mask(module, "weight")


def _counts(name: str, module: nn.Module, gran: Granularity, alive: Tensor | None = None) -> LayerCount:
    """Surviving groups of a layer (``alive``: the stacked survivors of a coupled group instead)."""
    alive = _alive(module) if alive is None else alive
    w = param_value(module, "weight")
    if isinstance(gran, Element):  # no per-group tensors for the 100M-weight case
        n = count(alive) if alive is not None else w.numel()
        return LayerCount(name, n, n, 1, 1)
    sizes = gran.alive_sizes(alive if alive is not None else torch.ones_like(w, dtype=torch.bool))
    sizes = sizes[sizes > 0]
    if not sizes.numel():
        return LayerCount(name, 0, 0, 0, 0)
    return LayerCount(name, sizes.numel(), int(sizes.sum()), int(sizes.min()), int(sizes.max()))


def _stacked_alive(layers: Mapping[str, nn.Module], att: Attention) -> Tensor:
    """The current survivors of an attention's four projections in its stacked (per-head) view."""
    alive = {}
    for n in att.layers:
        mask = _alive(layers[n])
        alive[n] = mask if mask is not None else torch.ones_like(param_value(layers[n], "weight"), dtype=torch.bool)
    return att.stack(alive)


def _allocation(allocation: str | Allocation | None, scope: str | None) -> tuple[Allocation, str]:
    """The allocation object and its name; ``scope`` is the old name of the axis (``layer`` = ``uniform``)."""
    if scope is not None:
        if allocation not in (None, "global"):
            raise PruneError(f"give allocation= or its old name scope=, not both (got allocation={allocation!r}, "
                             f"scope={scope!r})")
        allocation = {"layer": "uniform"}.get(str(scope).lower(), str(scope).lower())
    allocation = "global" if allocation is None else allocation
    if isinstance(allocation, Allocation):
        return allocation, allocation.name or type(allocation).__name__.lower()
    return ALLOCATIONS.get(allocation)(), str(allocation).lower()


def _budgets(names: list[str], layers: dict[str, nn.Module], order: list[str], regrow: bool) -> list[LayerBudget]:
    out = []
    for n in names:
        w = param_value(layers[n], "weight")
        alive = None if regrow else _alive(layers[n])
        position = "first" if n == order[0] else "last" if n == order[-1] else "middle"
        out.append(LayerBudget(n, tuple(w.shape), count(alive) if alive is not None else w.numel(), position))
    return out


def plan_pruning(
    model: nn.Module,
    compression: float | None = None,
    *,
    sparsity: float | None = None,
    criterion: str | Criterion | type[Criterion] = "magnitude",
    granularity: str | Granularity = "element",
    allocation: str | Allocation | None = None,
    scope: str | None = None,
    normalize: str = "auto",
    batch: tuple[Tensor, Tensor] | None = None,
    loader: Iterable | None = None,
    exclude: Iterable[str] | str = (),
    overrides: Mapping[str, float] | None = None,
    reduce: str = "l1",
    iterations: int | None = None,
    loss_fn=None,
    seed: int | None = None,
    allow_layer_collapse: bool = False,
    score_batches: int = 1,
    input_shape: tuple[int, ...] | None = None,
    keep_outputs: bool = True,
    regrow: bool = False,
    comparison: str = "auto",
) -> PrunePlan:
    """Check every argument against ``model`` and return the plan; raises before any scoring."""
    if not isinstance(model, nn.Module):
        raise PruneError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = prunable_layers(model)
    if not layers:
        raise PruneError(f"{type(model).__name__} has no prunable layers (Conv1d/2d/3d or Linear)")
    names = list(layers)

    comp = target_compression(compression, sparsity)
    crit, crit_name = _criterion(criterion)
    gran = get_granularity(granularity)
    alloc, alloc_name = _allocation(allocation, scope)
    single = gran.within_group or all(gran.group_size(param_value(m, "weight").shape) == 1 for m in layers.values())
    try:
        normalize = resolve_normalize(str(normalize).lower(), alloc, single)
    except ValueError as e:
        raise PruneError(str(e)) from None
    comparison = crit.comparison if str(comparison).lower() == "auto" else str(comparison).lower()
    if comparison not in ("layer", "row"):
        raise PruneError(f"unknown comparison {comparison!r}; allowed: auto, layer, row")
    calibrated = crit.calibrated or comparison == "row"
    if calibrated:
        what = crit_name if crit.calibrated else f"{crit_name} with comparison='row'"
        if crit_name not in ("magnitude", "wanda", "sparsegpt"):
            raise PruneError(f"comparison='row' (per output row) is defined for magnitude, wanda and sparsegpt, not "
                             f"{crit_name!r}")
        if alloc.joint:
            raise PruneError(f"{what} compares weights within each layer (row by row), so allocation "
                             f"{alloc_name!r}, one ranking across layers, does not apply: use allocation 'uniform' "
                             "(the papers) or 'owl' (or another per-layer allocation)")
        if not isinstance(gran, (Element, NM)):
            raise PruneError(f"{what} prunes single weights or N:M groups; granularity {gran.name!r} is not "
                             "supported (use 'element' or e.g. '2:4')")
        if regrow:
            raise PruneError(f"{what} prunes once from calibration data; regrow=True does not apply")
    check_reduce(reduce)
    problem = signed_reduce_problem(crit_name, crit.signed, gran, reduce)
    if problem:
        raise PruneError(problem)
    for flag, value in (("allow_layer_collapse", allow_layer_collapse), ("keep_outputs", keep_outputs),
                        ("regrow", regrow)):
        if not isinstance(value, bool):
            raise PruneError(f"{flag} must be True or False, got {value!r}")

    # exclusions and overrides (patterns matching nothing are errors, raised by resolve_patterns)
    if isinstance(exclude, str):
        exclude = [exclude]
    excluded = resolve_patterns(list(exclude or ()), names, "exclusion")
    units = None
    if gran.structure is not None:  # heads / MLP neurons: only their anchors are scored, the rest left alone
        try:
            units = find_units(model, gran.structure)
            skipped = restrict(units, excluded, "exclusion", gran.name)
        except StructureError as e:
            raise PruneError(str(e)) from None
        excluded = [n for n in names if n not in units.anchors or n in skipped]
    kept_outputs: list[str] = []
    if gran.removes_outputs and keep_outputs and names[-1] not in excluded and units is None:
        # the output layer's rows are the classes (tokens): removing one silently deletes an output
        kept_outputs = [names[-1]]
    if overrides is not None and not isinstance(overrides, Mapping):
        raise PruneError(f"overrides must map layer names/globs to compressions, e.g. {{'conv1': 2.0}}; got {overrides!r}")
    override_of: dict[str, float] = {}
    for pattern, value in dict(overrides or {}).items():
        c = _check_compression(f"override {pattern!r}", value)
        hits = resolve_patterns([pattern], names, "override")
        if units is not None:  # a pattern naming any projection of an attention sets its heads' compression
            anchor_of = units.anchor_of()
            outside = [n for n in hits if n not in anchor_of]
            if outside:
                raise PruneError(f"override {pattern!r} names {', '.join(outside)}, which granularity {gran.name!r} "
                                 f"does not prune (it prunes {', '.join(units.anchors)} and their coupled layers)")
            hits = list(dict.fromkeys(anchor_of[n] for n in hits))
        for n in hits:
            if n in excluded:
                raise PruneError(f"layer {n!r} is both excluded and overridden (override {pattern!r}); choose one")
            if n in override_of and override_of[n] != c:
                raise PruneError(f"layer {n!r} gets two different override compressions: {override_of[n]} and {c}")
            if n in kept_outputs:  # an explicit override of the output layer asks for its units
                raise PruneError(f"layer {n!r} is the output layer, whose {gran.name} units are the model's "
                                 f"outputs; pass keep_outputs=False to prune them (override {pattern!r})")
            override_of[n] = c
    excluded_all = excluded + [n for n in kept_outputs if n not in excluded]

    # N:M fixes the compression of every layer at M/N
    if isinstance(gran, NM):
        if comp is not None and not math.isclose(comp, gran.compression, rel_tol=1e-9):
            raise PruneError(
                f"granularity {gran.name} fixes each layer's compression at M/N = {gran.compression:.4g}; "
                f"got compression {comp:.4g} (pass compression=None or {gran.compression:.4g})"
            )
        for n, c in override_of.items():
            if not math.isclose(c, gran.compression, rel_tol=1e-9):
                raise PruneError(
                    f"granularity {gran.name} fixes each layer's compression at {gran.compression:.4g}; override "
                    f"for {n!r} asks {c:.4g} (exclude the layer instead, or drop the override)"
                )
        comp = gran.compression
    if comp is None:
        raise PruneError("give compression= (a ratio >= 1, e.g. 8) or sparsity= (a fraction in [0, 1))")
    problems = []
    for n in names:
        if n not in excluded_all:
            try:
                gran.check_layer(n, param_value(layers[n], "weight").shape)
            except GranularityError as e:
                problems.append(str(e))
    if problems:  # every layer that does not fit, at once
        raise GranularityError(problems[0] if len(problems) == 1 else
                               f"{len(problems)} layers do not fit granularity {gran.name}:\n  - " + "\n  - ".join(problems))

    # iterations and data
    iters = crit.default_iterations if iterations is None else iterations
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise PruneError(f"iterations must be an integer >= 1, got {iterations!r}")
    data = _scoring_data(batch, loader, loss_fn, score_batches, input_shape)
    if data is not None and data.batch is not None and data.batch[1] is None and crit.needs_data and not calibrated:
        raise PruneError(f"criterion {crit_name!r} computes a loss and needs labels: pass batch=(x, y) or loader=...")
    if (crit.needs_data or alloc.needs_data) and (data is None or not data.has_examples):
        if not crit.needs_data:
            raise PruneError(f"allocation {alloc_name!r} weighs layers by their activations: pass batch= or loader= "
                             "(calibration inputs)")
        no_data = ", ".join(n for n in CRITERIA.names() if not CRITERIA.get(n).needs_data)
        raise PruneError(
            f"criterion {crit_name!r} needs data: pass batch=(x, y) or loader=... "
            f"(criteria that need none: {no_data})"
        )
    if crit.needs_input_shape and data is None:
        raise PruneError(
            f"criterion {crit_name!r} is data-free but needs the input shape: pass input_shape=(C, H, W), "
            "or batch=(x, y) / loader=... to take it from"
        )

    # selection units: the allocation splits the pruned set; overridden layers keep their own compression
    main = [n for n in names if n not in excluded_all and n not in override_of]
    if not main and not override_of:
        why = " (the output layer is kept: keep_outputs)" if kept_outputs else ""
        raise PruneError(f"every prunable layer is excluded{why}: nothing to prune")
    context = AllocationContext(model, _calibration(data) if alloc.needs_data else None)
    parts = _allocate(alloc, alloc_name, main, layers, names, comp, regrow, isinstance(gran, NM), context)
    parts += [Part([n], c, "override") for n, c in override_of.items()]

    # feasibility (from shapes and current masks only)
    if not gran.within_group and not regrow:
        coupled = units.coupled if units is not None else {}
        for part in parts:
            counts = [_counts(n, layers[n], gran, _stacked_alive(layers, coupled[n]) if n in coupled else None)
                      for n in part.names]
            check_feasible(counts, part.sparsity, allow_layer_collapse, unit=gran.name or "group")

    plan = PrunePlan(
        criterion=crit if isinstance(crit, Criterion) else crit(seed=seed),
        criterion_name=crit_name,
        granularity=gran,
        allocation=alloc,
        allocation_name=alloc_name,
        normalize=normalize,
        reduce=reduce,
        iterations=iters,
        allow_layer_collapse=allow_layer_collapse,
        data=data,
        requested_compression=comp,
        parts=parts,
        layers=layers,
        excluded=excluded_all,
        regrow=regrow,
        kept_outputs=kept_outputs,
        tied=tied_layers(model),
        comparison=comparison,
        units=units,
    )
    if gran.masks_following:  # only affine BatchNorms have entries to mask
        plan.followers = {
            n: bn for n, bn in following_batchnorm(model, plan.scored).items() if model.get_submodule(bn).affine
        }
    return plan


def _calibration(data: ScoringData | None) -> list | None:
    """The inputs of the scoring/calibration batches (what calibrated methods and OWL read), or None."""
    if data is None or not data.has_examples:
        return None
    if data.batch is not None:
        return [data.batch[0]]
    out = []
    for item in data.loader:  # batches of inputs, or (inputs, targets, ...) as loaders yield
        if len(out) >= data.max_batches:
            break
        out.append(item if torch.is_tensor(item) else item[0])
    return out


def _allocate(alloc: Allocation, name: str, main: list[str], layers: dict[str, nn.Module], order: list[str],
              comp: float, regrow: bool, n_m: bool, context: AllocationContext | None = None) -> list[Part]:
    """The allocation's selection units for the pruned set ``main`` at ``comp`` (relative to its survivors):
    one joint part, or one part per layer with the compression that takes it to its allocated density."""
    if not main:
        return []
    if alloc.joint or n_m:  # N:M fixes every layer at M/N whatever the allocation
        return [Part(list(main), comp, "pruned")]
    budgets = _budgets(main, layers, order, regrow)
    kept, total = sum(b.kept for b in budgets), sum(b.total for b in budgets)
    target = kept / total / comp  # overall density of the pruned set after this call
    try:
        densities = alloc.densities(budgets, target, context)
    except (AllocationError, CalibrationError) as e:
        raise PruneError(str(e)) from None
    parts = []
    for b in budgets:
        d = densities[b.name]
        if not 0.0 <= d <= 1.0 + 1e-9:
            raise PruneError(f"allocation {name!r} gave layer {b.name!r} density {d:.4g}; a density is in [0, 1]")
        c = (b.kept / b.total) / d if d > 0 else math.inf
        parts.append(Part([b.name], max(1.0, c), "pruned"))
    return parts


# ------------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def scoring_copy(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """A deep copy with every mask folded into plain parameters and ``masks`` applied on top, so a
    criterion can run, cast or modify it freely and the user's model is untouched."""
    work = make_permanent(deepcopy_model(model))
    for path, mask in masks.items():
        module, pname = resolve(work, path)
        getattr(module, pname).mul_(mask.to(getattr(module, pname).device))
    return work


def _scores(model: nn.Module, plan: PrunePlan, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    crit = plan.criterion
    work = scoring_copy(model, masks) if crit.runs_model else model
    layers = {n: work.get_submodule(n) for n in plan.measured}
    scores = crit.scores(work, layers, plan.data)
    out = {}
    for n in plan.measured:
        shape = param_value(plan.layers[n], "weight").shape
        s = scores.get(n)
        if s is None or tuple(s.shape) != tuple(shape):
            got = "nothing" if s is None else f"shape {tuple(s.shape)}"
            raise ValueError(f"criterion {plan.criterion_name!r} returned {got} for layer {n!r}; expected {tuple(shape)}")
        s = s.detach()
        if not s.is_floating_point() or s.dtype in (torch.float16, torch.bfloat16):
            s = s.float()
        if bool(torch.isnan(s).any()):
            raise ValueError(f"criterion {plan.criterion_name!r} returned NaN scores for layer {n!r}")
        out[n] = s
    return out


# ------------------------------------------------------------------------------------------ selection
def _select_elements(
    names: list[str],
    values: list[Tensor],
    alive: list[Tensor | None],
    fraction: float,
    allow_collapse: bool,
    absolute: bool = False,
) -> dict[str, Tensor]:
    """Element granularity: streaming threshold for big units, reference sort otherwise (same masks).
    ``alive[i]`` is None for a layer with nothing pruned yet."""
    n_alive = sum(count(a) if a is not None else v.numel() for v, a in zip(values, alive))
    k = n_to_prune(fraction, n_alive)
    if n_alive >= STREAMING_MIN_ELEMENTS:
        keeps = keep_above_streaming(values, alive, k, absolute=absolute)
        collapsed = any(
            (a is None or count(a) > 0) and count(kp) == 0 for a, kp in zip(alive, keeps)
        )
        if allow_collapse or not collapsed:
            return dict(zip(names, keeps))
    masks = [a if a is not None else torch.ones_like(v, dtype=torch.bool) for v, a in zip(values, alive)]
    groups = [
        Groups(n, (v.detach().abs() if absolute else v.detach()).reshape(-1), a.reshape(-1), a.reshape(-1).long())
        for n, v, a in zip(names, values, masks)
    ]
    keep = prune_lowest(groups, fraction, allow_collapse)
    return {n: keep[n].reshape(v.shape) for n, v in zip(names, values)}


def _select_groups(
    plan: PrunePlan, names: list[str], scores: dict[str, Tensor], alive: dict[str, Tensor], fraction: float
) -> dict[str, Tensor]:
    gran = plan.granularity
    joint = len(names) > 1
    groups = []
    for n in names:
        gs = gran.group_scores(scores[n], alive[n], plan.reduce)
        sizes = gran.alive_sizes(alive[n])
        if joint:  # one ranking across layers: each layer's group scores as the allocation compares them
            gs = _comparable(plan, gs, sizes > 0)
        groups.append(Groups(n, gs, sizes > 0, sizes))
    keep = prune_lowest(groups, fraction, plan.allow_layer_collapse)
    return {n: gran.expand(keep[n], alive[n].shape) & alive[n] for n in names}


def _comparable(plan: PrunePlan, scores: Tensor, alive: Tensor) -> Tensor:
    """One layer's (group) scores as a joint ranking compares them: the allocation's transform (LAMP) or
    the normalisation of ``plan.normalize``."""
    if plan.allocation.joint and type(plan.allocation).transform is not Allocation.transform:
        return plan.allocation.transform(scores, alive)
    if plan.normalize != "none":
        return normalized(scores, alive, plan.normalize)
    return scores


def _following_masks(plan: PrunePlan, names: list[str], alive: dict[str, Tensor]) -> dict[str, Tensor]:
    """Bias and following-BatchNorm masks for the dead output channels (channel granularity)."""
    out = {}
    for n in names:
        module = plan.layers[n]
        channel_alive = alive[n].reshape(alive[n].shape[0], -1).any(1)
        if is_masked(module, "bias") or getattr(module, "bias", None) is not None:
            out[f"{n}.bias"] = channel_alive
        if n in plan.followers:
            out[f"{plan.followers[n]}.weight"] = channel_alive
            out[f"{plan.followers[n]}.bias"] = channel_alive
    return out


def compute_masks(model: nn.Module, plan: PrunePlan) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Masks (True = keep) for every scored layer's weight — plus bias/BatchNorm for channel, and the same
    mask for every module tied to a layer's weight — and the surviving weights per layer before the call.
    Does not modify ``model``."""
    gran = plan.granularity
    coupled = plan.coupled
    weights = {n: param_value(plan.layers[n], "weight") for n in plan.measured}
    existing = {n: _alive(plan.layers[n]) for n in plan.measured}  # None: nothing pruned yet
    before = {n: count(m) if m is not None else weights[n].numel() for n, m in existing.items()}
    if plan.regrow:  # every weight is a candidate again
        existing = {n: None for n in plan.measured}
    parts = [p for p in plan.parts if p.sparsity > 0 or plan.regrow]
    if not parts:
        return {}, before
    plain_ranking = not (plan.allocation.joint and type(plan.allocation).transform is not Allocation.transform) \
        and plan.normalize == "none"
    if type(plan.criterion) is Magnitude and isinstance(gran, Element) and plan.iterations == 1 and plain_ranking:
        # fast path: |w| is taken chunk by chunk inside the selection, never for the whole model
        masks = {}
        for p in parts:
            values, alive_p = [weights[n] for n in p.names], [existing[n] for n in p.names]
            keep = _select_elements(p.names, values, alive_p, p.sparsity, plan.allow_layer_collapse, absolute=True)
            masks.update({f"{n}.weight": keep[n] for n in p.names})
        return _with_tied(plan, masks), before
    alive = {
        n: m.clone() if m is not None else torch.ones_like(weights[n], dtype=torch.bool) for n, m in existing.items()
    }
    # a coupled group's anchor holds the stacked survivors of all its layers (one row per head)
    shapes = {n: w.shape for n, w in weights.items()}
    biases = {n: is_masked(plan.layers[n], "bias") or getattr(plan.layers[n], "bias", None) is not None
              for n in plan.measured}
    for a, att in coupled.items():
        alive[a] = att.stack(alive)
        for m in att.layers[1:]:
            del alive[m]

    def element_masks(layers: Iterable[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for n in layers:
            if n in coupled:
                out.update(coupled[n].masks(alive[n], shapes, biases))
            else:
                out[f"{n}.weight"] = alive[n]
        return out

    start = {id(p): sum(count(alive[n]) for n in p.names) for p in parts}
    extras: dict[str, Tensor] = {}
    names = [n for n in plan.scored if any(n in p.names for p in parts)]
    n_iter = plan.iterations
    for step in range(1, n_iter + 1):
        current = element_masks(list(alive)) | extras
        scores = _scores(model, plan, current)
        for a, att in coupled.items():
            scores[a] = att.stack(scores)
        if isinstance(gran, NM):
            n_keep = gran.n if n_iter == 1 else min(gran.m, max(gran.n, round(gran.m * (gran.n / gran.m) ** (step / n_iter))))
            for n in names:
                alive[n] = gran.keep_within(scores[n], alive[n], n_keep)
        else:
            for p in parts:
                if n_iter == 1:
                    fraction = p.sparsity
                else:
                    target = start[id(p)] * (1.0 / p.compression) ** (step / n_iter)
                    cur = sum(count(alive[n]) for n in p.names)
                    fraction = max(0.0, 1.0 - target / cur) if cur else 0.0
                if isinstance(gran, Element):
                    values = [scores[n] for n in p.names]
                    if len(p.names) > 1 and not plain_ranking:
                        values = [_comparable(plan, v, alive[n]) for v, n in zip(values, p.names)]
                    keep = _select_elements(
                        p.names, values, [alive[n] for n in p.names], fraction, plan.allow_layer_collapse,
                    )
                else:
                    keep = _select_groups(plan, p.names, scores, alive, fraction)
                alive.update(keep)
        if gran.masks_following:  # the next round scores a network whose dead channels are fully dead
            extras = _following_masks(plan, names, alive)
    masks = element_masks(names)
    masks.update(extras)
    return _with_tied(plan, masks), before


def _with_tied(plan: PrunePlan, masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """The masks plus the same weight mask for every other module that shares a layer's weight tensor."""
    for n, others in plan.tied.items():
        mask = masks.get(f"{n}.weight")
        if mask is not None:
            masks.update({f"{o}.weight": mask for o in others})
    return masks


# ------------------------------------------------------------------------------------------ entry point
def prune(
    model: nn.Module,
    compression: float | None = None,
    *,
    sparsity: float | None = None,
    criterion: str | Criterion | type[Criterion] = "magnitude",
    granularity: str | Granularity = "element",
    allocation: str | Allocation | None = None,
    scope: str | None = None,
    normalize: str = "auto",
    batch: tuple[Tensor, Tensor] | None = None,
    loader: Iterable | None = None,
    exclude: Iterable[str] | str = (),
    overrides: Mapping[str, float] | None = None,
    reduce: str = "l1",
    iterations: int | None = None,
    loss_fn=None,
    seed: int | None = None,
    allow_layer_collapse: bool = False,
    score_batches: int = 1,
    input_shape: tuple[int, ...] | None = None,
    keep_outputs: bool = True,
    regrow: bool = False,
    comparison: str = "auto",
) -> PruneReport:
    """Prune ``model`` in place (masks held by ``torch.nn.utils.prune``) and report what was done.

    ``compression`` (ratio >= 1) or ``sparsity`` (in [0, 1)) is relative to the current survivors of the
    pruned set (to all its weights with ``regrow=True``, which also replaces the masks instead of
    intersecting them); ``allocation`` splits it across layers (``global`` default; ``scope`` is its old
    name: ``layer`` = ``uniform``); ``normalize`` says how a joint ranking compares groups of different layers
    (``auto``: ``mean`` for groups of several weights under ``global``, else ``none``); ``overrides`` maps
    layer names/globs to their own compression; ``exclude`` leaves layers untouched; ``keep_outputs`` spares
    the output layer's units under structured granularities. ``loss_fn(logits, y)`` defaults to
    cross-entropy. ``score_batches`` batches of ``loader`` are scored (``batch`` is one batch; a tensor of
    inputs without labels serves the methods that need no loss). ``input_shape`` (one example) serves data-free
    SynFlow.

    ``criterion="wanda" | "sparsegpt"`` (and ``comparison="row"``, magnitude per output row) prune one shot
    from calibration inputs (``batch``/``loader``), layer by layer in sequence — each layer's inputs come from
    the model whose earlier layers are already pruned — with a per-layer allocation (``uniform`` as in the
    papers, or ``owl``); SparseGPT also updates the surviving weights (:mod:`benchkit.pruning.calibrated`)."""
    t0 = time.perf_counter()
    plan = plan_pruning(
        model,
        compression,
        sparsity=sparsity,
        criterion=criterion,
        granularity=granularity,
        allocation=allocation,
        scope=scope,
        normalize=normalize,
        batch=batch,
        loader=loader,
        exclude=exclude,
        overrides=overrides,
        reduce=reduce,
        iterations=iterations,
        loss_fn=loss_fn,
        seed=seed,
        allow_layer_collapse=allow_layer_collapse,
        score_batches=score_batches,
        input_shape=input_shape,
        keep_outputs=keep_outputs,
        regrow=regrow,
        comparison=comparison,
    )
    if plan.calibrated:
        return _prune_calibrated(model, plan, t0)
    masks, before = compute_masks(model, plan)
    if plan.regrow:
        set_masks(model, masks)
    else:
        apply_masks(model, masks)
    return build_report(plan, masks, before, time.perf_counter() - t0)


def _prune_calibrated(model: nn.Module, plan: PrunePlan, t0: float) -> PruneReport:
    """Hand the plan's layers and their absolute sparsities to :func:`prune_calibrated`."""
    before = {n: count(m) if (m := _alive(plan.layers[n])) is not None else param_value(plan.layers[n], "weight").numel()
              for n in plan.scored}
    nm = isinstance(plan.granularity, NM)
    per_layer = {}
    for part in plan.parts:
        for n in part.names:
            total = param_value(plan.layers[n], "weight").numel()
            per_layer[n] = 0.0 if nm else max(0.0, 1.0 - before[n] / total / part.compression)
    exclude = [n for n in plan.layers if n not in per_layer]
    method = plan.criterion_name if plan.criterion.calibrated else "magnitude"
    calibration = _calibration(plan.data) if plan.criterion.needs_data else None
    try:
        report = prune_calibrated(model, method, per_layer_sparsities=None if nm else per_layer,
                                  granularity=plan.granularity.name, calibration=calibration, exclude=exclude,
                                  comparison=plan.comparison, sparsity=None if nm else 0.0)
    except CalibrationError as e:
        raise PruneError(str(e)) from None
    masks = dict(report.masks)
    out = build_report(plan, masks, before, time.perf_counter() - t0)
    out.notes.append(f"{method}: {'block by block' if report.blockwise else 'layer by layer'} on "
                     f"{report.calibration.get('samples', 0)} calibration samples")
    return out


def score(
    model: nn.Module,
    criterion: str | Criterion | type[Criterion] = "magnitude",
    *,
    batch: tuple[Tensor, Tensor] | None = None,
    loader: Iterable | None = None,
    exclude: Iterable[str] | str = (),
    loss_fn=None,
    seed: int | None = None,
    score_batches: int = 1,
    input_shape: tuple[int, ...] | None = None,
) -> dict[str, Tensor]:
    """The criterion's element scores (higher = more important) of every non-excluded prunable layer, from one
    scoring pass on the model as it is (a masked weight scores on its zeroed value), as ``prune`` ranks them
    with ``iterations=1``; the model is not modified. For controls and analyses that need the scores
    themselves (e.g. keeping the *lowest*-scoring weights, Frankle et al. 2021)."""
    plan = plan_pruning(model, 1.0, criterion=criterion, batch=batch, loader=loader, exclude=exclude,
                        loss_fn=loss_fn, seed=seed, score_batches=score_batches, input_shape=input_shape,
                        iterations=1, allow_layer_collapse=True)
    return _scores(model, plan, {})


def _units_alive(module: nn.Module, mask: Tensor | None) -> int:
    """Output units (rows) of a layer with at least one surviving weight."""
    rows = param_value(module, "weight").shape[0]
    return rows if mask is None else int(mask.reshape(rows, -1).any(1).sum())


def build_report(plan: PrunePlan, masks: Mapping[str, Tensor], before: Mapping[str, int], seconds: float) -> PruneReport:
    role = {n: p.role for p in plan.parts for n in p.names}
    for a, att in plan.coupled.items():  # a head's q/k/v/out are pruned with it
        role.update({m: role[a] for m in att.layers})
    rows = []
    for n, module in plan.layers.items():
        w = param_value(module, "weight")
        total = w.numel()
        mask = masks.get(f"{n}.weight")
        if mask is None:
            mask = _alive(module)
        kept_after = count(mask) if mask is not None else total
        kept_before = before.get(n, kept_after)
        rows.append(
            {
                "name": n,
                "shape": tuple(w.shape),
                "total": total,
                "kept_before": kept_before,
                "kept_after": kept_after,
                "density": kept_after / total,
                "compression": total / kept_after if kept_after else math.inf,
                "units": int(w.shape[0]),
                "units_alive": _units_alive(module, mask),
                "role": role.get(n, "kept output" if n in plan.kept_outputs else "excluded"),
            }
        )
    main = [r for r in rows if r["role"] == "pruned"] or [r for r in rows if r["role"] == "override"]
    k_before, k_after = sum(r["kept_before"] for r in main), sum(r["kept_after"] for r in main)
    total = sum(r["total"] for r in main)
    reference = total if plan.regrow else k_before
    notes = [f"output layer {n!r} kept whole: its {plan.granularity.name} units are the model's outputs "
             "(keep_outputs=False prunes them)" for n in plan.kept_outputs]
    if plan.units is not None:
        n = len(plan.units.anchors)
        what = {"attention": f"the heads of {n} attention modules", "mlp": f"the hidden neurons of {n} MLPs"}
        notes.append(f"granularity {plan.granularity.name!r} prunes {what.get(plan.granularity.structure, 'units')}; "
                     "the other layers are left as they are")
    return PruneReport(
        criterion=plan.criterion_name,
        granularity=plan.granularity.name,
        allocation=plan.allocation_name,
        requested_compression=plan.requested_compression,
        achieved_compression=reference / k_after if k_after else math.inf,
        layers=rows,
        masks=dict(masks),
        seconds=seconds,
        overall_compression=total / k_after if k_after else math.inf,
        iterations=plan.iterations,
        normalize=plan.normalize,
        notes=notes,
    )


__all__ = [
    "CompressionError",
    "PruneError",
    "PrunePlan",
    "PruneReport",
    "build_report",
    "compute_masks",
    "plan_pruning",
    "prune",
    "score",
    "scoring_copy",
]
