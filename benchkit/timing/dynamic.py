"""``dynamic``: sparse from the first step at constant sparsity, dropping and regrowing connections while
training — SET (Mocanu et al. 2018) and RigL (Evci et al. 2020) — with ``static`` (the mask never changes)
as their control. Settings: :class:`DynamicConfig` (``prune.dynamic``).

The initial mask comes from the engine with the run's criterion and allocation at the target compression
(RigL's default is ``criterion: random`` with ``allocation: erk``). Then every ``delta_t`` optimiser steps up
to ``t_end`` × the training steps, in every masked layer of the pruned set, as in the authors' code
(``rigl/rigl_tf2/mask_updaters.py``, ``generic_mask_update``; ``sparse_optimizers_base.py``):

* drop fraction ``f(t) = alpha · (1 + cos(π t / T_end)) / 2`` (their cosine decay, ``T_end = round(t_end · T)``);
* ``n = floor(f · survivors)`` per layer (their ``int32`` cast); the ``survivors − n`` largest ``|w|`` are kept;
* ``n`` connections grow among all the others — the just-dropped included — with the largest score: the
  dense gradient's magnitude (``rigl``: one gradient per update, on a training batch of ``train.batch_size``
  drawn from a seeded stream of its own, w.r.t. the *effective* weight, so pruned entries get one) or a
  seeded uniform draw (``set``);
* ties go to the lower flat index (TensorFlow's ``top_k``, which their code sorts with);
* a connection that is new (grown and not alive before) starts at zero with its optimiser state (momentum,
  Adam moments) zeroed; one dropped and regrown in the same update is simply kept, as in their code
  (``reinit_when_same=False``). Dropped connections are zeroed with their optimiser state too, so pruned
  weights stay exactly zero between updates whatever the training loop does.

Per-layer survivor counts never change, so the sparsity after every update is exactly the initial one.
Differences from the TF code, on purpose: drop candidates are the survivors only (their ``top_k`` runs over
every entry, where a survivor that is exactly zero ties the pruned ones); no ``1e-5`` noise on the drop scores
(their TF2 code has none either); the update runs after the step's optimiser update instead of replacing it.

Recorded: one ``ctx.levels`` row per update (``update``, ``step``, ``drop_fraction``, ``sparsity`` of the
pruned set counted from the masks, total and per layer ``dropped/<layer>`` = n and ``regrown/<layer>`` = the
connections grown that were not alive before, at most n: the rest are just-dropped ones grown back), the same
figures as per-step series in ``ctx.series`` (MLflow metrics ``dynamic/...`` at the training step), and at the
end ``regrown_alive_fraction`` (overall and per layer): of the connections regrown at some update, the share
alive in the final mask. The reported model is the best validation evaluation after the last scheduled
update (the same rule for ``static``, so the three methods select among the same evaluations).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from benchkit.config import ConfigError, ExperimentConfig
from benchkit.pruning.layers import tied_layers
from benchkit.pruning.masks import get_masks, param_value, reset_optimizer_state, resolve, set_masks
from benchkit.seeding import make_generator
from benchkit.tasks import task_of
from benchkit.timing.base import (
    BestAfter,
    RunContext,
    Timing,
    phase_seed,
    pruned_groups,
    prunes_anything,
    register_timing,
)

METHODS = ("static", "set", "rigl")


@dataclass
class DynamicConfig:
    """``prune.dynamic``: sparse training with drop-and-grow mask updates (RigL's defaults)."""

    method: str = field(default="rigl", metadata={"exclusive": True})  # static | set | rigl
    alpha: float = 0.3  # drop fraction at step 0, cosine-decayed to 0 at t_end
    delta_t: int = 100  # optimiser steps between mask updates
    t_end: float = 0.75  # fraction of training after which the mask stays fixed

    def __post_init__(self) -> None:
        self.method = self.method.lower() if isinstance(self.method, str) else self.method


@dataclass(frozen=True)
class DropSchedule:
    """When masks are updated and which fraction of each layer's survivors is dropped (steps count from 1)."""

    alpha: float
    delta_t: int
    end: int  # T_end: last step that may update

    @classmethod
    def from_config(cls, s: DynamicConfig, total_steps: int) -> DropSchedule:
        return cls(alpha=s.alpha, delta_t=s.delta_t, end=round(s.t_end * total_steps))

    def fraction(self, step: int) -> float:
        """RigL's cosine decay: ``alpha · (1 + cos(π · min(t, T_end) / T_end)) / 2``."""
        if self.end <= 0:
            return 0.0
        return self.alpha * 0.5 * (1.0 + math.cos(math.pi * min(step, self.end) / self.end))

    def update_steps(self) -> list[int]:
        """Every ``delta_t``-th step up to ``T_end``, except ``T_end`` itself, where the fraction is 0 (their TF2
        code skips a zero-fraction update too)."""
        return list(range(self.delta_t, self.end, self.delta_t))


# ------------------------------------------------------------------------------------------------ the update
def largest(values: Tensor, k: int) -> Tensor:
    """Mask of the ``k`` largest entries of a 1-D tensor, ties at the threshold to the lower positions: the set
    TensorFlow's ``top_k`` returns (the authors' code sorts with it). The threshold comes from a ``topk`` of the
    smaller side instead of a sort (a stable sort of LeNet-300-100's fc1 cost 24 ms, most of an update)."""
    n = values.numel()
    if k <= 0 or k >= n:
        return torch.full((n,), k > 0, dtype=torch.bool, device=values.device)
    rank_from_bottom = n - k + 1
    threshold = (torch.topk(values, k, sorted=False).values.min() if k <= rank_from_bottom else
                 torch.topk(values, rank_from_bottom, largest=False, sorted=False).values.max())  # k-th largest
    out = values >= threshold
    extra = int(torch.count_nonzero(out)) - k
    if extra > 0:  # ties at the threshold: the higher positions go
        tied = (values == threshold).nonzero().reshape(-1)
        out[tied[tied.numel() - extra:]] = False
    return out


def drop_and_grow(weight: Tensor, alive: Tensor, grow_score: Tensor, fraction: float) -> tuple[Tensor, int]:
    """One layer's new mask and its drop count ``n = floor(fraction · survivors)``: keep the ``survivors − n``
    largest ``|weight|`` among the survivors, grow the ``n`` entries with the largest ``grow_score`` (>= 0) among
    all the others (the just-dropped included); ties to the lower flat index. Same number of survivors."""
    flat_alive = alive.reshape(-1)
    survivors = flat_alive.nonzero().reshape(-1)  # ascending: positions keep their order
    n_ones = survivors.numel()
    n_drop = int(n_ones * fraction)
    if n_drop == 0:
        return alive.clone(), 0
    keep = torch.zeros_like(flat_alive)
    keep[survivors[largest(weight.detach().reshape(-1)[survivors].abs(), n_ones - n_drop)]] = True
    new = keep | largest(grow_score.detach().reshape(-1).masked_fill(keep, -math.inf), n_drop)
    if int(torch.count_nonzero(new)) != n_ones:  # e.g. NaN scores: never let the sparsity drift silently
        raise RuntimeError(f"drop-and-grow kept {int(torch.count_nonzero(new))} connections instead of {n_ones}; "
                           "the weights or grow scores hold NaN (did training diverge?)")
    return new.reshape(alive.shape), n_drop


@torch.no_grad()
def _restore_attributes(saved: list[tuple[nn.Module, str, Any]]) -> None:
    for module, pname, value in saved:
        if value is None:
            module.__dict__.pop(pname, None)
        else:
            module.__dict__[pname] = value


def dense_gradients(model: nn.Module, paths: list[str], batch: tuple[Tensor, Tensor],
                    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> dict[str, Tensor]:
    """dL/dW of the *effective* weights ``W = weight_orig · mask`` at every entry, pruned ones included (RigL's
    grow score), on one batch. The model runs through ``torch.func.functional_call`` with each masked weight
    given as a dense leaf and an all-ones mask, and with copies of its buffers (BatchNorm statistics stay as
    they were); dropout draws come from a forked RNG, so the training's own random stream is untouched."""
    x, y = batch
    inputs: dict[str, Tensor] = {name: buf.clone() for name, buf in model.named_buffers()
                                 if not name.endswith("_mask")}  # BatchNorm statistics: updated on copies
    leaves: dict[str, Tensor] = {}
    saved = []
    for path in paths:
        module, pname = resolve(model, path)
        mask = getattr(module, f"{pname}_mask")
        leaves[path] = (param_value(module, pname).detach() * mask).requires_grad_(True)
        inputs[f"{path}_orig"] = leaves[path]
        inputs[f"{path}_mask"] = torch.ones_like(mask)
        saved.append((module, pname, module.__dict__.get(pname)))  # the prune hook rebinds it during the call
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            loss = loss_fn(functional_call(model, inputs, (x,)), y)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    finally:
        _restore_attributes(saved)
    return {p: (g if g is not None else torch.zeros_like(leaves[p])).detach() for p, g in zip(leaves, grads)}


def batch_stream(dataset: Any, batch_size: int, seed: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled training batches from a generator of their own (the training's order is untouched)."""
    generator = make_generator(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    while True:
        for x, y in loader:
            yield x.to(device), y.to(device)


class MaskUpdater:
    """Training callback: at each scheduled step, drop and grow in every masked layer of ``paths``.

    ``grow`` maps the model to one grow score per path (``None`` for ``static``, which never updates).
    Records one row per update in ``rows`` and the same figures per step in ``series``."""

    def __init__(self, model: nn.Module, paths: list[str], schedule: DropSchedule,
                 grow: Callable[[nn.Module], dict[str, Tensor]] | None, main: list[str]):
        self.paths, self.schedule, self.grow, self.main = paths, schedule, grow, main
        self.steps = set(schedule.update_steps()) if grow is not None else set()
        self.rows: list[dict[str, Any]] = []
        self.series: dict[str, list[tuple[int, float]]] = {}
        self.ever_regrown = {p: torch.zeros_like(get_masks(model)[p]) for p in paths}

    def on_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if step in self.steps:
            self.update(step, model, optimizer)

    @torch.no_grad()
    def update(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Tensor]:
        fraction = self.schedule.fraction(step)
        old = get_masks(model)
        scores = self.grow(model)
        new, dropped = {}, {}
        for path in self.paths:
            module, pname = resolve(model, path)
            new[path], dropped[path] = drop_and_grow(param_value(module, pname), old[path], scores[path], fraction)
        regrown = set_masks(model, new)  # new entries start at 0; dropped ones are zeroed
        changed = {p: new[p] ^ old[p] for p in self.paths}
        if optimizer is not None:
            reset_optimizer_state(optimizer, model, changed)  # fresh state for the new, none for the dropped
        row: dict[str, Any] = {"update": len(self.rows) + 1, "step": step, "drop_fraction": fraction}
        kept = total = 0
        dropped_all = regrown_all = 0
        per_layer = {}
        for path in self.paths:
            layer = path.rpartition(".")[0]
            grown = int(torch.count_nonzero(regrown[path]))
            self.ever_regrown[path] |= regrown[path]
            dropped_all, regrown_all = dropped_all + dropped[path], regrown_all + grown
            per_layer[f"dropped/{layer}"], per_layer[f"regrown/{layer}"] = dropped[path], grown
        for layer in self.main:  # the pruned set, unmasked layers counting as dense
            mask = new.get(f"{layer}.weight", old.get(f"{layer}.weight"))
            w = param_value(model.get_submodule(layer), "weight")
            total += w.numel()
            kept += int(torch.count_nonzero(mask)) if mask is not None else w.numel()
        row.update(sparsity=1.0 - kept / total if total else 0.0, dropped=dropped_all, regrown=regrown_all,
                   **per_layer)
        self.rows.append(row)
        for key, value in row.items():
            if key not in ("update", "step"):
                self.series.setdefault(f"dynamic/{key}", []).append((step, float(value)))
        return changed

    def alive_fractions(self, model: nn.Module) -> dict[str, float]:
        """Of the connections regrown at some update, the share alive in ``model``'s masks (overall and per
        layer; layers that never regrew are left out)."""
        masks = get_masks(model)
        out: dict[str, float] = {}
        ever_all = alive_all = 0
        for path, ever in self.ever_regrown.items():
            n = int(ever.sum())
            if n:
                alive = int((ever & masks[path]).sum())
                out[f"regrown_alive_fraction/{path.rpartition('.')[0]}"] = alive / n
                ever_all, alive_all = ever_all + n, alive_all + alive
        if ever_all:
            out["regrown_alive_fraction"] = alive_all / ever_all
        return out


# ------------------------------------------------------------------------------------------------ the timing
def grow_scorer(method: str, paths: list[str], *, dataset: Any, batch_size: int, seed: int,
                device: torch.device) -> Callable[[nn.Module], dict[str, Tensor]] | None:
    """The grow score of ``method`` per masked path: ``None`` for ``static`` (never updates); a seeded uniform
    draw for ``set``; for ``rigl`` the dense gradient's magnitude on the next batch of a seeded stream."""
    if method == "static":
        return None
    if method == "set":
        generator = make_generator(seed)

        def uniform(model: nn.Module) -> dict[str, Tensor]:
            out = {}
            for p in paths:
                w = param_value(*resolve(model, p))
                out[p] = torch.rand(w.shape, generator=generator, dtype=torch.float64).to(w.device)
            return out

        return uniform
    batches = batch_stream(dataset, batch_size, seed, device)

    def gradient(model: nn.Module) -> dict[str, Tensor]:
        return {p: g.abs() for p, g in dense_gradients(model, paths, next(batches)).items()}

    return gradient


@register_timing("dynamic", config=DynamicConfig)
class DynamicSparse(Timing):
    def preflight(self, ctx: RunContext) -> None:
        s, total = ctx.cfg.prune.dynamic, ctx.total_steps()
        schedule = DropSchedule.from_config(s, total)
        if s.method != "static" and prunes_anything(ctx.cfg.prune) and not schedule.update_steps():
            raise ConfigError(f"prune.dynamic.delta_t: {s.delta_t} steps is more than t_end × training steps = "
                              f"{s.t_end} × {total} = {schedule.end}, so {s.method} would never update the mask; "
                              "lower delta_t or raise t_end (or train longer)")
        model = ctx.build_model()
        main, overridden = pruned_groups(model, ctx.cfg.prune)
        tied = {n: others for n, others in tied_layers(model).items() if n in set(main) | set(overridden)}
        if tied:
            name, others = next(iter(tied.items()))
            raise ConfigError(f"prune.timing: dynamic updates each layer's mask on its own, but layer {name!r} shares "
                              f"its weight with {', '.join(others)}; exclude the tied layers (prune.exclude)")

    def run(self, ctx: RunContext) -> nn.Module:
        cfg, s = ctx.cfg, ctx.cfg.prune.dynamic
        model = ctx.build_model()
        if prunes_anything(cfg.prune):
            ctx.prune(model, cfg.prune.target_compression())
        main, overridden = pruned_groups(model, cfg.prune)
        masks = get_masks(model)
        paths = [f"{n}.weight" for n in main + list(overridden) if f"{n}.weight" in masks]
        total = ctx.total_steps()
        schedule = DropSchedule.from_config(s, total)
        grow = grow_scorer(s.method, paths, dataset=ctx.data.train.dataset, batch_size=cfg.train.batch_size,
                           seed=phase_seed(cfg.seed, f"dynamic_{s.method}"), device=ctx.device) if paths else None
        updater = MaskUpdater(model, paths, schedule, grow, main + list(overridden))
        last = max(schedule.update_steps(), default=0)
        best = BestAfter(model, last, task_of(ctx.data))  # the same evaluations are candidates for every method
        ctx.fit(model, "train", train_cfg=dataclasses.replace(cfg.train, select_best=False),
                callbacks=[updater, best])
        if cfg.train.select_best:
            best.restore()
        ctx.levels.extend(updater.rows)
        for key, points in updater.series.items():
            ctx.series.setdefault(key, []).extend(points)
        ctx.metrics.update(updater.alive_fractions(model))
        ctx.metrics["dynamic_updates"] = float(len(updater.rows))
        return model

    def check(self, cfg: ExperimentConfig):
        p, s = cfg.prune, cfg.prune.dynamic
        if s.method not in METHODS:
            yield "prune.dynamic.method", f"unknown method {s.method!r}; allowed: {', '.join(METHODS)}"
        if isinstance(s.alpha, bool) or not isinstance(s.alpha, (int, float)) or not 0.0 < s.alpha < 1.0:
            yield "prune.dynamic.alpha", f"the initial drop fraction must be in (0, 1), got {s.alpha!r}"
        if isinstance(s.delta_t, bool) or not isinstance(s.delta_t, int) or s.delta_t < 1:
            yield "prune.dynamic.delta_t", f"must be an integer >= 1 (optimiser steps between updates), got {s.delta_t!r}"
        if isinstance(s.t_end, bool) or not isinstance(s.t_end, (int, float)) or not 0.0 < s.t_end <= 1.0:
            yield "prune.dynamic.t_end", f"the fraction of training with mask updates must be in (0, 1], got {s.t_end!r}"
        if p.granularity != "element":
            yield "prune.granularity", (f"timing dynamic drops and grows single weights; granularity {p.granularity!r} "
                                        "is not supported (use element)")
