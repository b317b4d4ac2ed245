"""One-shot pruning with calibration data, layer by layer in sequence: Wanda, SparseGPT, and magnitude
with the same per-output comparison groups; OWL's outlier-weighted layer sparsities.

Each method follows its authors' code, read line by line (``tests/test_calibrated.py`` re-implements
that code and compares masks and weights):

* **Wanda** (Sun et al. 2024; locuslab/wanda ``lib/prune.py``, ``lib/layerwrapper.py``): score
  ``|W_ij| · ||X_j||_2`` with ``||X_j||²`` accumulated over every calibration token as their
  ``WrappedGPT.add_batch`` does; unstructured: in each output row the ``int(in · s)`` lowest scores go
  (stable sort); N:M: in every group of M consecutive inputs of a row, the M − N lowest (``topk``).
  No weight update.
* **SparseGPT** (Frantar & Alistarh 2023; IST-DASLab/sparsegpt ``sparsegpt.py``): ``H = 2XXᵀ/n``
  accumulated as their ``add_batch``; dead inputs (``H_jj = 0``) get ``H_jj = 1`` and their weights
  zeroed; damping ``0.01 · mean(diag H)``; the upper Cholesky factor of ``H⁻¹``; columns in lazy
  blocks of 128: unstructured, the block's mask keeps all but the ``int(numel · s) + 1`` lowest
  ``w² / [H⁻¹]²_jj`` (their threshold ``sort(...)[int(numel·s)]`` compared with ``<=``, so ties at
  the threshold go too, and each block prunes one weight more than ``s`` alone would); N:M, the same
  score per group of M columns taken from the *updated* weights; then the OBS update of the
  remaining weights column by column, and of the later blocks at once.
* **magnitude**: ``|W|`` with Wanda's comparison groups (per output row, or N:M), the baseline of the
  Wanda paper; ``comparison="layer"`` gives their ``prune_magnitude``'s whole-layer threshold instead
  (again ``sort(...)[int(numel·s)]`` with ``<=``).
* **Sequential**: as in both papers' code, a model that exposes its blocks (``model.pruning_blocks()``,
  a torchvision ``VisionTransformer``'s encoder layers, or ``blocks=``) is pruned block by block on
  cached activations: the first block's inputs are captured for every calibration batch; for each
  block, its prunable layers' statistics are gathered in one pass of the (still dense) block, those
  layers are pruned, and the pruned block's outputs become the next block's inputs. Prunable layers
  run before the first block (e.g. a patch embedding) are pruned first, those after the last (e.g.
  ``lm_head``) last, each from a pass of the whole model. Without blocks (``blocks=False`` or none
  found) every layer is its own step, in the order the forward pass calls them, its inputs from a
  rerun of the model whose earlier layers are already pruned (the run stops after that layer).
* **OWL** (Yin et al. 2024; luuyin/OWL ``lib/prune_all.py``): per block, the share (in %) of
  ``|W|·||X||`` entries above ``threshold`` (their M, 5) times the block's mean, on the *dense*
  model; those ratios scaled to ``[0, 2λ]`` and shifted to mean density ``1 − s``; a block's layers
  get sparsity ``1 −`` its density (``0.01`` where that is ``<= 0``, as theirs).

Sparsities here are absolute fractions of each layer's weights, as in the papers (not relative to
the survivors of an earlier round). Weights already masked are zero and score lowest; SparseGPT
additionally keeps them pruned (its update would otherwise revive them). A layer given sparsity 0 is
left untouched. Only Linear layers are pruned here (the papers prune the Linear layers of their
blocks): exclude Conv layers, or prune them with :func:`benchkit.pruning.engine.prune`. Updated
weights are written to the layer's weight (``weight_orig`` when it is masked) and masks applied with
:func:`benchkit.pruning.masks.apply_masks`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchkit.pruning.granularity import NM, GranularityError, get_granularity
from benchkit.pruning.layers import prunable_layers, refuse_fused_attention, resolve_patterns
from benchkit.pruning.masks import apply_masks, current_mask, param_value
from benchkit.registry import Registry


class CalibrationError(ValueError):
    """An argument of one-shot calibrated pruning that cannot work; the message names the fix."""


# ============================================================================================ statistics
class InputStats:
    """A Linear layer's input statistics over the calibration tokens, accumulated exactly as the
    authors' code does (batch by batch, running means over the *samples* of each batch):

    * ``scaler_row`` (Wanda's ``WrappedGPT``): the mean over samples of ``||X_j||²`` per input j;
    * ``H`` (SparseGPT's ``add_batch``): ``2/n · Σ XXᵀ`` over the n samples seen.

    A batch ``[B, T, in]`` counts B samples (``[T, in]`` counts one), as theirs does."""

    def __init__(self, columns: int, device: torch.device, *, norms: bool, hessian: bool):
        self.columns = columns
        self.scaler_row = torch.zeros(columns, device=device) if norms else None
        self.H = torch.zeros((columns, columns), device=device) if hessian else None
        self.nsamples_norms = 0
        self.nsamples = 0

    @torch.no_grad()
    def add(self, inp: Tensor) -> None:
        if inp.shape[-1] != self.columns:
            raise CalibrationError(f"input of width {inp.shape[-1]} for a layer of {self.columns} inputs")
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1]))  # [B, T, in] (or more leading dims): every row a token
        inp = inp.t()
        if self.scaler_row is not None:  # locuslab/wanda lib/layerwrapper.py WrappedGPT.add_batch
            self.scaler_row *= self.nsamples_norms / (self.nsamples_norms + tmp)
            self.nsamples_norms += tmp
            x = inp.type(torch.float32)
            self.scaler_row += torch.norm(x, p=2, dim=1) ** 2 / self.nsamples_norms
        if self.H is not None:  # IST-DASLab/sparsegpt sparsegpt.py SparseGPT.add_batch
            self.H *= self.nsamples / (self.nsamples + tmp)
            self.nsamples += tmp
            x = math.sqrt(2 / self.nsamples) * inp.float()
            self.H += x.matmul(x.t())


# ============================================================================================ primitives
def wanda_metric(weight: Tensor, scaler_row: Tensor) -> Tensor:
    """``|W| · sqrt(scaler_row)``: each weight times the L2 norm of its input feature."""
    return torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))


def row_prune_mask(metric: Tensor, sparsity: float) -> Tensor:
    """True where pruned: the ``int(in · sparsity)`` lowest scores of every output row (stable sort)."""
    mask = torch.zeros_like(metric, dtype=torch.bool)
    sort_res = torch.sort(metric, dim=-1, stable=True)
    indices = sort_res[1][:, :int(metric.shape[1] * sparsity)]
    mask.scatter_(1, indices, True)
    return mask


def layer_prune_mask(metric: Tensor, sparsity: float) -> Tensor:
    """True where pruned: every score ``<=`` the ``int(numel · sparsity)``-th smallest of the layer
    (the Wanda repository's ``prune_magnitude``)."""
    thresh = torch.sort(metric.flatten())[0][int(metric.numel() * sparsity)]
    return metric <= thresh


def nm_prune_mask(metric: Tensor, prune_n: int, prune_m: int) -> Tensor:
    """True where pruned: the ``prune_n`` lowest of every ``prune_m`` consecutive inputs of each row
    (``topk(largest=False)`` on each group, as the Wanda repository)."""
    rows, cols = metric.shape
    groups = metric.float().reshape(rows, cols // prune_m, prune_m)
    idx = torch.topk(groups, prune_n, dim=2, largest=False)[1]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


@dataclass
class SparseGPTResult:
    weight: Tensor  # updated weights (float32), zero where pruned
    pruned: Tensor  # bool, True where pruned
    error: float  # the OBS reconstruction loss their code prints: Σ (w − q)² / [H⁻¹]²_jj / 2


@torch.no_grad()
def sparsegpt_prune(weight: Tensor, H: Tensor, sparsity: float = 0.0, *, prune_n: int = 0, prune_m: int = 0,
                    blocksize: int = 128, percdamp: float = 0.01, pruned: Tensor | None = None) -> SparseGPTResult:
    """SparseGPT's ``fasterprune`` on a ``[rows, columns]`` weight with its input Hessian ``H``
    (consumed: pass a copy to keep it). ``prune_n``/``prune_m`` > 0: N:M (``prune_n`` of every ``prune_m``
    pruned; ``sparsity`` unused). ``pruned``: entries that must stay pruned (already masked)."""
    W = weight.detach().clone().float()
    rows, columns = W.shape
    dev = W.device

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    Losses = torch.zeros(rows, device=dev)

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns, device=dev)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H

    all_pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        if prune_n == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        if pruned is not None:
            mask1 |= pruned[:, i1:i2]

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if prune_n != 0 and i % prune_m == 0:
                tmp = W1[:, i:(i + prune_m)] ** 2 / (torch.diag(Hinv1)[i:(i + prune_m)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)

            q = w.clone()
            q[mask1[:, i]] = 0

            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        Losses += torch.sum(Losses1, 1) / 2

        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        all_pruned[:, i1:i2] = mask1

    return SparseGPTResult(W, all_pruned, float(torch.sum(Losses)))


def owl_sparsities(outlier_ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """OWL's layer sparsities from each unit's outlier ratio (in %): the ratios min-max scaled to
    ``[0, 2·lam]``, shifted to mean density ``1 − sparsity``; sparsity = 1 − density, 0.01 where that is
    ``<= 0`` (their code). Equal ratios (their code divides by zero there) give ``sparsity`` everywhere."""
    ratios = np.array(outlier_ratios, dtype=np.float64)
    if ratios.size == 0:
        return []
    if ratios.max() == ratios.min():
        return [float(sparsity)] * int(ratios.size)
    ratios = ((ratios - ratios.min()) * (1 / (ratios.max() - ratios.min()) * lam * 2))
    ratios = ratios - np.mean(ratios) + (1 - sparsity)
    out = [float(1 - r) for r in ratios]
    out = [s if s > 0 else 0.01 for s in out]
    if max(out) >= 1:
        raise CalibrationError(f"OWL with lam={lam} around sparsity {sparsity} asks a layer for sparsity "
                               f"{max(out):.4f} >= 1; lower lam below {1 - sparsity:.4g}")
    return out


def outlier_ratio(metrics: Sequence[Tensor], threshold: float = 5.0) -> float:
    """OWL's ``check_outlier_mean``: % of the entries of the concatenated, flattened ``|W|·||X||``
    above ``threshold`` × their mean."""
    W = torch.cat([torch.flatten(x.cpu()) for x in metrics])
    max_shred = torch.mean(W) * threshold
    return float((W > max_shred).sum().item()) / W.numel() * 100


# ============================================================================================ methods
@dataclass
class LayerDecision:
    """What a method decided for one layer: the pruned entries, and new weights when it updates them."""

    pruned: Tensor
    weight: Tensor | None = None
    error: float | None = None


@dataclass
class Method:
    """A calibrated method: which statistics it needs and how one layer is pruned from them."""

    name: str
    norms: bool  # needs ||X_j||² (Wanda)
    hessian: bool  # needs H (SparseGPT)
    prune: Callable[..., LayerDecision]
    comparisons: tuple[str, ...] = ("row",)


METHODS: Registry[Method] = Registry("calibrated pruning method")


def _select(metric: Tensor, sparsity: float, nm: tuple[int, int] | None, comparison: str) -> Tensor:
    if nm is not None:
        return nm_prune_mask(metric, *nm)
    return row_prune_mask(metric, sparsity) if comparison == "row" else layer_prune_mask(metric, sparsity)


def _magnitude(weight: Tensor, stats: InputStats | None, sparsity: float, nm, comparison: str, **_: Any):
    return LayerDecision(_select(torch.abs(weight), sparsity, nm, comparison))


def _wanda(weight: Tensor, stats: InputStats, sparsity: float, nm, comparison: str, **_: Any):
    return LayerDecision(_select(wanda_metric(weight, stats.scaler_row), sparsity, nm, comparison))


def _sparsegpt(weight: Tensor, stats: InputStats, sparsity: float, nm, comparison: str, *, blocksize: int,
               percdamp: float, already: Tensor | None, **_: Any):
    prune_n, prune_m = nm if nm is not None else (0, 0)
    r = sparsegpt_prune(weight, stats.H, sparsity, prune_n=prune_n, prune_m=prune_m, blocksize=blocksize,
                        percdamp=percdamp, pruned=already)
    stats.H = None  # consumed (their code deletes it too)
    return LayerDecision(r.pruned, r.weight, r.error)


METHODS.register("magnitude", Method("magnitude", False, False, _magnitude, ("row", "layer")))
METHODS.register("wanda", Method("wanda", True, False, _wanda, ("row", "layer")))
METHODS.register("sparsegpt", Method("sparsegpt", False, True, _sparsegpt, ("row",)))


# ============================================================================================ calibration data
class _Stop(Exception):
    """Raised from a hook to end a forward pass early (nothing after that point is needed)."""


Batch = tuple[tuple[Any, ...], dict[str, Any]]


def calibration_batches(calibration: Any, device: torch.device) -> list[Batch]:
    """``(args, kwargs)`` to call the model with, per batch. ``calibration``: a tensor (one batch), or
    an iterable of batches, each a tensor (the input), a tuple/list ``(x, y, ...)`` (``x`` is the input,
    as loaders yield) or a mapping (keyword arguments)."""
    if calibration is None:
        raise CalibrationError("this method needs calibration inputs: pass calibration=<tensor or list of batches> "
                               "(e.g. 128 random windows of the training text)")
    items = [calibration] if isinstance(calibration, Tensor) else list(calibration)
    out: list[Batch] = []
    for item in items:
        if isinstance(item, Tensor):
            out.append(((item.to(device),), {}))
        elif isinstance(item, Mapping):
            out.append(((), {k: v.to(device) if isinstance(v, Tensor) else v for k, v in item.items()}))
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
            out.append(((item[0].to(device),), {}))
        else:
            raise CalibrationError(f"a calibration batch must be a tensor, an (inputs, targets) pair or a mapping, "
                                   f"got {type(item).__name__}")
    if not out:
        raise CalibrationError("calibration holds no batches")
    return out


def _samples(batches: list[Batch]) -> int:
    """Calibration samples: the leading size of each batch's first tensor."""
    n = 0
    for args, kwargs in batches:
        t = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        n += int(t.shape[0]) if t is not None and t.dim() else 1
    return n


# ============================================================================================ blocks and order
def find_blocks(model: nn.Module) -> list[nn.Module] | None:
    """The model's chain of blocks: ``model.pruning_blocks()``, a torchvision ``VisionTransformer``'s
    encoder layers, else None."""
    if callable(getattr(model, "pruning_blocks", None)):
        return list(model.pruning_blocks())
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if type(model).__name__ == "VisionTransformer" and isinstance(layers, nn.Sequential):
        return list(layers)
    return None


def _resolve_blocks(model: nn.Module, blocks: Any) -> list[tuple[str, nn.Module]] | None:
    if blocks is False:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    try:
        if blocks is None:
            mods = find_blocks(model)
            if not mods:
                return None
        elif isinstance(blocks, str):  # a container whose children are the blocks ("blocks", "encoder.layers")
            mods = list(model.get_submodule(blocks).children())
        else:
            mods = [model.get_submodule(b) if isinstance(b, str) else b for b in blocks]
    except AttributeError as e:
        raise CalibrationError(f"blocks: {e}; give a container's name (e.g. 'blocks'), a list of module names, "
                               "or modules") from None
    out = []
    for m in mods:
        if id(m) not in names or not names[id(m)]:
            raise CalibrationError("blocks must be submodules of the model (names or modules)")
        out.append((names[id(m)], m))
    return out


@dataclass
class Stage:
    """One step of the sequential pass: layers whose statistics are gathered together, then pruned."""

    name: str
    layers: list[str]
    block: nn.Module | None = None  # run on cached inputs when set; else the whole model reruns


@torch.no_grad()
def _call_order(model: nn.Module, layers: Mapping[str, nn.Module], blocks: list[tuple[str, nn.Module]] | None,
                batch: Batch) -> tuple[list[str], dict[str, int], list[tuple[str, Tensor, Tensor]]]:
    """One forward pass: the order of first calls of layers and blocks, calls per forward, and each
    block's first input and output (to check the blocks form a chain)."""
    order: list[str] = []
    calls: dict[str, int] = {}
    io: list[tuple[str, Tensor, Tensor]] = []
    handles = []

    def note(name: str, is_block: bool):
        def hook(mod, args, output):
            calls[name] = calls.get(name, 0) + 1
            if name not in order:
                order.append(name)
                if is_block:
                    out = output[0] if isinstance(output, (tuple, list)) else output
                    io.append((name, args[0] if args else None, out))
        return hook

    for name, m in layers.items():
        handles.append(m.register_forward_hook(note(name, False)))
    for name, m in blocks or []:
        handles.append(m.register_forward_hook(note("block:" + name, True)))
    try:
        model(*batch[0], **batch[1])
    finally:
        for h in handles:
            h.remove()
    return order, calls, io


def plan_stages(model: nn.Module, layers: Mapping[str, nn.Module], blocks: list[tuple[str, nn.Module]] | None,
                batch: Batch) -> tuple[list[Stage], dict[str, int]]:
    """The sequential steps (see the module docstring) and each layer's calls per forward pass, from one
    forward pass on ``batch``."""
    order, calls, io = _call_order(model, layers, blocks, batch)
    missing = [n for n in layers if n not in calls]
    if missing:
        raise CalibrationError(f"layers {missing} are not called by the model on the calibration inputs, so they "
                               "have no calibration statistics; exclude them")
    if not blocks:
        return [Stage(n, [n]) for n in order if not n.startswith("block:")], calls
    for name, _ in blocks:
        if calls.get("block:" + name, 0) != 1:
            raise CalibrationError(f"block {name!r} runs {calls.get('block:' + name, 0)} times per forward pass; "
                                   "blocks must form a chain run once each (pass blocks=False to prune layer by layer)")
    block_order = [n for n in order if n.startswith("block:")]
    if block_order != ["block:" + n for n, _ in blocks]:
        raise CalibrationError(f"the blocks run in the order {[n[6:] for n in block_order]}, not as given "
                               f"{[n for n, _ in blocks]}; list them in execution order")
    for (prev, _, out), (name, inp, _) in zip(io, io[1:]):
        if inp is None or out is None or inp.shape != out.shape or not torch.equal(inp, out):
            raise CalibrationError(f"block {name[6:]!r} does not take block {prev[6:]!r}'s output as its input, so "
                                   "cached activations cannot stand in for the model; pass blocks=False to prune "
                                   "layer by layer (each step reruns the model)")
    inside = {n: b for b, _ in blocks for n in layers if n.startswith(b + ".")}
    first, last = order.index(block_order[0]), order.index(block_order[-1])
    pre, post = [], []
    for n in order:
        if n.startswith("block:") or n in inside:
            continue
        i = order.index(n)
        if i < first:
            pre.append(n)
        elif i > last:
            post.append(n)
        else:
            raise CalibrationError(f"layer {n!r} runs between blocks but belongs to none; blocks must form a chain "
                                   "(pass blocks=False to prune layer by layer)")
    stages = [Stage("before blocks", pre)] if pre else []
    for name, block in blocks:
        stages.append(Stage(name, [n for n in layers if inside.get(n) == name], block))
    if post:
        stages.append(Stage("after blocks", post))
    return stages, calls


# ============================================================================================ the sequential pass
@dataclass
class CalibratedReport:
    """What one :func:`prune_calibrated` call did. ``layers``: one dict per pruned layer (``name, stage,
    sparsity`` requested, ``total, kept_before, kept_after, achieved`` sparsity, ``error`` SparseGPT's
    reconstruction loss, ``seconds`` spent choosing the mask and updating the weights, without the
    forward passes). ``masks``: the keep masks applied (True = kept), by parameter path. ``seconds``:
    the whole call."""

    method: str
    granularity: str
    comparison: str
    sparsity: float | None
    layers: list[dict[str, Any]]
    masks: dict[str, Tensor]
    seconds: float
    stages: list[str] = field(default_factory=list)
    blockwise: bool = False
    calibration: dict[str, int] = field(default_factory=dict)  # batches, samples

    @property
    def achieved_sparsity(self) -> float:
        total = sum(r["total"] for r in self.layers)
        return 1.0 - sum(r["kept_after"] for r in self.layers) / total if total else 0.0


def _effective_weight(module: nn.Module) -> Tensor:
    w = param_value(module, "weight").detach()
    mask = current_mask(module, "weight")
    return w * mask if mask is not None else w


def _gather(model: nn.Module, batches: list[Batch], stage: Stage, layers: Mapping[str, nn.Module],
            stats: dict[str, InputStats], calls: dict[str, int] | None) -> None:
    """Whole-model passes accumulating the stage's layers' input statistics; with ``calls``, each pass
    stops once every layer of the stage has run that many times (nothing later is needed)."""
    seen: dict[str, int] = {}

    def hook(name: str):
        def fn(mod, args, output):
            stats[name].add(args[0].detach())
            seen[name] = seen.get(name, 0) + 1
            if calls is not None and all(seen.get(n, 0) >= calls[n] for n in stage.layers):
                raise _Stop
        return fn

    handles = [layers[n].register_forward_hook(hook(n)) for n in stage.layers]
    try:
        for args, kwargs in batches:
            seen.clear()
            try:
                model(*args, **kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


def _capture_block_inputs(model: nn.Module, batches: list[Batch], block: nn.Module) -> list[Batch]:
    """Each batch's ``(args, kwargs)`` as the first block receives them (the forward stops there)."""
    captured: list[Batch] = []

    def hook(mod, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for args, kwargs in batches:
            try:
                model(*args, **kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise CalibrationError("the first block was not reached for every calibration batch")
    return captured


def _run_block(block: nn.Module, inputs: list[Batch], layers: Mapping[str, nn.Module] | None = None,
               names: Sequence[str] = (), stats: dict[str, InputStats] | None = None) -> list[Batch]:
    """Run ``block`` on every cached input (gathering ``stats`` of ``names`` when given); returns the
    next block's inputs: the output (its first element if a tuple) in place of the first argument."""
    handles = []
    if stats is not None:
        def hook(name: str):
            def fn(mod, args, output):
                stats[name].add(args[0].detach())
            return fn
        handles = [layers[n].register_forward_hook(hook(n)) for n in names]
    out: list[Batch] = []
    try:
        for args, kwargs in inputs:
            y = block(*args, **kwargs)
            y = y[0] if isinstance(y, (tuple, list)) else y
            out.append(((y, *args[1:]), kwargs))
    finally:
        for h in handles:
            h.remove()
    return out


def _nm_of(granularity: str) -> tuple[int, int] | None:
    """``(prune_n, prune_m)`` as the authors' code counts (pruned per group) from benchkit's ``N:M``
    (N kept of M), or None for ``element``."""
    g = get_granularity(granularity)
    if isinstance(g, NM):
        return g.m - g.n, g.m
    if g.name != "element":
        raise CalibrationError(f"calibrated pruning supports granularity 'element' or N:M (e.g. '2:4'), got "
                               f"{granularity!r}")
    return None


def _target_layers(model: nn.Module, exclude: Iterable[str]) -> dict[str, nn.Module]:
    refuse_fused_attention(model)
    all_layers = prunable_layers(model)
    excluded = set(resolve_patterns(list(exclude), list(all_layers), "exclude"))
    layers = {n: m for n, m in all_layers.items() if n not in excluded}
    conv = [n for n, m in layers.items() if not isinstance(m, nn.Linear)]
    if conv:
        raise CalibrationError(f"calibrated pruning prunes Linear layers (as the papers' code); {conv} are not: "
                               f"exclude them (exclude={conv!r}) or prune them with benchkit.prune")
    if not layers:
        raise CalibrationError("no layer left to prune after exclusions")
    return layers


def _sparsities(layers: Mapping[str, nn.Module], sparsity: float | None,
                per_layer: Mapping[str, float] | None, nm: tuple[int, int] | None) -> dict[str, float]:
    if nm is not None:
        prune_n, prune_m = nm
        implied = prune_n / prune_m
        if per_layer:
            raise CalibrationError("per-layer sparsities do not combine with N:M, which fixes every layer at "
                                   f"{implied:g}")
        if sparsity is not None and not math.isclose(sparsity, implied):
            raise CalibrationError(f"granularity {prune_m - prune_n}:{prune_m} fixes the sparsity at {implied:g}; "
                                   f"got sparsity={sparsity} (leave it unset)")
        for name, m in layers.items():
            try:
                NM(prune_m - prune_n, prune_m).check_layer(name, m.weight.shape)
            except GranularityError as e:
                raise CalibrationError(str(e)) from None
        return {n: implied for n in layers}
    per_layer = dict(per_layer or {})
    unknown = [n for n in per_layer if n not in layers]
    if unknown:
        raise CalibrationError(f"per-layer sparsities name {unknown}, which are not pruned here; pruned layers: "
                               f"{list(layers)}")
    out = {}
    for n in layers:
        s = per_layer.get(n, sparsity)
        if s is None:
            raise CalibrationError(f"no sparsity for layer {n!r}: pass sparsity= or include it in per-layer sparsities")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise CalibrationError(f"sparsity of layer {n!r} must be a number in [0, 1), got {s!r}")
        out[n] = float(s)
    return out


@torch.no_grad()
def prune_calibrated(model: nn.Module, method: str, *, sparsity: float | None = None,
                     per_layer_sparsities: Mapping[str, float] | None = None, granularity: str = "element",
                     calibration: Any = None, blocks: Any = None, exclude: Iterable[str] = (),
                     comparison: str = "row", blocksize: int = 128, percdamp: float = 0.01) -> CalibratedReport:
    """Prune ``model`` in place, one shot, with ``method`` (``magnitude | wanda | sparsegpt``).

    ``sparsity``: the fraction of each layer's weights pruned (element granularity), or
    ``per_layer_sparsities`` ``{layer: fraction}`` (with ``sparsity`` as the default for the others),
    e.g. from :func:`owl_allocation`; N:M (``granularity="2:4"``) fixes it. ``calibration``: the inputs,
    a tensor or a list of batches (not needed for magnitude). ``blocks``: None finds the model's blocks
    (:func:`find_blocks`), False prunes layer by layer; or the name of the container whose children are
    the blocks (``"blocks"``, ``"encoder.layers"``), or a list of module names or modules. ``exclude``: layer names or globs kept dense
    (the papers keep ``lm_head`` and embeddings dense). ``comparison``: ``row`` (per output) or ``layer``
    (magnitude, Wanda). ``blocksize``, ``percdamp``: SparseGPT's."""
    start = time.perf_counter()
    meth = METHODS.get(method)
    if comparison not in meth.comparisons:
        raise CalibrationError(f"comparison {comparison!r} is not defined for {meth.name}; allowed: "
                               f"{', '.join(meth.comparisons)}")
    nm = _nm_of(granularity)
    if nm is not None and comparison != "row":
        raise CalibrationError("N:M selects within groups of M inputs; comparison must stay 'row'")
    if blocksize < 1 or (nm is not None and blocksize % nm[1]):
        raise CalibrationError(f"blocksize must be a positive multiple of M (the N:M groups must not straddle "
                               f"blocks), got {blocksize}")
    if not 0 <= percdamp:
        raise CalibrationError(f"percdamp must be >= 0, got {percdamp}")
    layers = _target_layers(model, exclude)
    targets = _sparsities(layers, sparsity, per_layer_sparsities, nm)
    device = next(model.parameters()).device
    needs_data = meth.norms or meth.hessian
    batches = calibration_batches(calibration, device) if needs_data else []
    block_list = _resolve_blocks(model, blocks) if needs_data else None

    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    applied: dict[str, Tensor] = {}
    stage_names: list[str] = []

    def prune_stage(stage: Stage, stats: dict[str, InputStats]) -> None:
        for name in stage.layers:
            module = layers[name]
            s = targets[name]
            before = _effective_weight(module)
            kept_before = int(torch.count_nonzero(before))
            decision = None
            tick = time.perf_counter()
            if s > 0 or nm is not None:
                already = current_mask(module, "weight")
                decision = meth.prune(before.float(), stats.get(name), s, nm, comparison, blocksize=blocksize,
                                      percdamp=percdamp, already=None if already is None else ~already)
                keep = ~decision.pruned
                if decision.weight is not None:
                    target = param_value(module, "weight")
                    target.copy_(decision.weight.reshape(target.shape).to(target.dtype))
                apply_masks(model, {f"{name}.weight": keep})
                applied[f"{name}.weight"] = current_mask(module, "weight").clone()
            after = _effective_weight(module)
            total = after.numel()
            kept = int(torch.count_nonzero(after))
            rows.append({"name": name, "stage": stage.name, "sparsity": s, "total": total, "kept_before": kept_before,
                         "kept_after": kept, "achieved": 1 - kept / total,
                         "error": decision.error if decision is not None else None,
                         "seconds": time.perf_counter() - tick})
        stage_names.append(stage.name)

    try:
        if not needs_data:
            prune_stage(Stage("all", list(layers)), {})
        else:
            stages, calls = plan_stages(model, layers, block_list, batches[0])

            def new_stats(names: Sequence[str]) -> dict[str, InputStats]:
                return {n: InputStats(layers[n].in_features, device, norms=meth.norms, hessian=meth.hessian)
                        for n in names}

            cached: list[Batch] | None = None
            for stage in stages:
                stats = new_stats(stage.layers)
                if stage.block is None:
                    _gather(model, batches, stage, layers, stats, calls)
                    prune_stage(stage, stats)
                    continue
                if cached is None:
                    cached = _capture_block_inputs(model, batches, stage.block)
                if stage.layers:  # a block whose layers are all excluded only passes its outputs on
                    _run_block(stage.block, cached, layers, stage.layers, stats)
                    prune_stage(stage, stats)
                cached = _run_block(stage.block, cached)
    finally:
        model.train(was_training)
    return CalibratedReport(
        method=meth.name, granularity=str(get_granularity(granularity)), comparison=comparison, sparsity=sparsity,
        layers=rows, masks=applied, seconds=time.perf_counter() - start, stages=stage_names,
        blockwise=bool(block_list) and needs_data,
        calibration={"batches": len(batches), "samples": _samples(batches)} if batches else {},
    )


# ============================================================================================ OWL
@torch.no_grad()
def owl_allocation(model: nn.Module, calibration: Any, sparsity: float, *, blocks: Any = None,
                   exclude: Iterable[str] = (), threshold: float = 5.0, lam: float = 0.08) -> dict[str, float]:
    """OWL's per-layer sparsities ``{layer: fraction}`` for :func:`prune_calibrated`'s
    ``per_layer_sparsities``: one value per block (every layer of a block gets it), from the dense
    model's ``|W|·||X||`` outlier ratios (see the module docstring). Layers outside the blocks, or
    every layer when the model has none, are units of their own. The model is not changed."""
    if not 0.0 <= sparsity < 1.0:
        raise CalibrationError(f"sparsity must be in [0, 1), got {sparsity}")
    layers = _target_layers(model, exclude)
    device = next(model.parameters()).device
    batches = calibration_batches(calibration, device)
    block_list = _resolve_blocks(model, blocks)
    was_training = model.training
    model.eval()
    units: list[list[str]] = []
    stats: dict[str, InputStats] = {}
    try:
        stages, _ = plan_stages(model, layers, block_list, batches[0])
        loose = Stage("outside blocks", [n for st in stages if st.block is None for n in st.layers])
        if loose.layers:  # nothing is pruned: one pass of the dense model serves them all
            st = {n: InputStats(layers[n].in_features, device, norms=True, hessian=False) for n in loose.layers}
            _gather(model, batches, loose, layers, st, None)
            stats.update(st)
        cached: list[Batch] | None = None
        for stage in stages:  # every unit's statistics come from the dense model
            if stage.block is None:
                units.extend([n] for n in stage.layers)
            else:
                st = {n: InputStats(layers[n].in_features, device, norms=True, hessian=False) for n in stage.layers}
                if cached is None:
                    cached = _capture_block_inputs(model, batches, stage.block)
                cached = _run_block(stage.block, cached, layers, stage.layers, st)
                if stage.layers:
                    units.append(list(stage.layers))
                stats.update(st)
    finally:
        model.train(was_training)
    ratios = [outlier_ratio([wanda_metric(_effective_weight(layers[n]).float(), stats[n].scaler_row) for n in unit],
                            threshold) for unit in units]
    per_unit = owl_sparsities(ratios, sparsity, lam)
    return {n: s for unit, s in zip(units, per_unit) for n in unit}
