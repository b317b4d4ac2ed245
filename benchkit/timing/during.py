"""``during``: gradual pruning while training, with the AGP cubic schedule (Zhu & Gupta 2017)

    s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (nΔt))³   for t ∈ {t0, t0+Δt, …, t0+nΔt},

progress clamped to [0, 1]; ``t0 = start × total steps``, ``t0 + nΔt = end × total steps`` (the last
update lands exactly there even when Δt does not divide the span), masks updated every ``Δt = every``
steps from a training callback. Settings: :class:`DuringConfig` (``prune.during``). Each update prunes the pruned
set to ``s_t`` overall; since the engine compounds on survivors, the target is converted to the
incremental compression relative to the current survivors (:func:`benchkit.timing.base.catch_up`).

``soft: true`` is soft filter pruning (He et al. 2018): each update zeroes the selected weights but
does not freeze them, masks are re-chosen from all weights at every update (the schedule keeps
updating at s_f after ``end``), and the final hard mask is applied when training ends. Because a
soft model is not sparse between updates, best-validation selection does not apply to it; the
reported model is the hard-masked end-of-training model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from benchkit.config import ExperimentConfig
from benchkit.pruning.masks import make_permanent
from benchkit.tasks import task_of
from benchkit.timing.base import (
    BestAfter,
    RunContext,
    Timing,
    is_n_m,
    pruned_groups,
    register_timing,
    weight_density,
    zero_pruned_optimizer_state,
)


@dataclass
class DuringConfig:
    """``prune.during``: the AGP schedule (Zhu & Gupta 2017) and soft pruning (He et al. 2018)."""

    start: float = 0.0  # fraction of training where pruning starts (t0)
    end: float = 0.75  # fraction of training where the final sparsity is reached (t0 + n·Δt)
    every: int = 50  # Δt: masks are updated every this many iterations
    initial_sparsity: float = 0.0  # s_i
    soft: bool = field(default=False, metadata={"exclusive": True})  # pruned weights keep training


@dataclass(frozen=True)
class AGPSchedule:
    """Target sparsity as a function of the training step (steps count from 1; step 0 = init)."""

    initial: float  # s_i
    final: float  # s_f
    start: int  # t0
    end: int  # t0 + nΔt
    every: int  # Δt

    @classmethod
    def from_config(cls, ctx_cfg: ExperimentConfig, total_steps: int, final: float) -> AGPSchedule:
        s = ctx_cfg.prune.during
        return cls(initial=s.initial_sparsity, final=final, start=round(s.start * total_steps),
                   end=round(s.end * total_steps), every=s.every)

    def sparsity(self, step: int) -> float:
        return self.sparsity_for(step, self.final)

    def sparsity_for(self, step: int, final: float) -> float:
        """The schedule towards another final sparsity (an overridden layer's own). Such a layer
        starts at ``min(s_i, final)``: pruning is never undone, so starting above its final would
        leave it over-pruned for good."""
        initial = min(self.initial, final)
        span = self.end - self.start
        progress = 1.0 if span <= 0 else (step - self.start) / span
        progress = min(1.0, max(0.0, progress))
        return final + (initial - final) * (1.0 - progress) ** 3

    def update_steps(self, total_steps: int | None = None) -> list[int]:
        """t0, t0+Δt, … up to ``end`` (always included); with ``total_steps`` (soft pruning) the
        updates continue every Δt until the end of training."""
        last = self.end if total_steps is None else max(self.end, total_steps)
        steps = set(range(self.start, last + 1, self.every)) | {self.end}
        return sorted(s for s in steps if s <= last)


class _ScheduledPruning:
    """The training callback: prune to the scheduled sparsity at each update step."""

    def __init__(self, ctx: RunContext, model: nn.Module, schedule: AGPSchedule, steps: list[int],
                 override_finals: dict[str, float], soft: bool):
        self.ctx, self.model, self.schedule, self.soft = ctx, model, schedule, soft
        self.steps = set(steps)
        self.override_finals = override_finals  # per overridden layer: its own final sparsity

    def on_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        if step in self.steps:
            self.update(step, optimizer)

    def update(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        target = _compression(self.schedule.sparsity(step))
        overrides = {n: _compression(self.schedule.sparsity_for(step, s)) for n, s in self.override_finals.items()}
        self.ctx.prune_to(self.model, target, overrides)
        main, _ = pruned_groups(self.model, self.ctx.cfg.prune)
        kept, total = weight_density(self.model, main)
        self.ctx.levels.append({"update": len(self.ctx.levels) + 1, "step": step,
                                "target_sparsity": self.schedule.sparsity(step), "sparsity": 1 - kept / total})
        if self.soft:
            make_permanent(self.model)  # zeroed, but trainable again: soft pruning
        elif optimizer is not None:
            zero_pruned_optimizer_state(self.model, optimizer)


def _compression(sparsity: float) -> float:
    return 1.0 / (1.0 - sparsity)


@register_timing("during", config=DuringConfig)
class GradualPruning(Timing):
    def run(self, ctx: RunContext) -> nn.Module:
        p = ctx.cfg.prune
        model = ctx.build_model()
        total = ctx.total_steps()
        final = 1.0 - 1.0 / (p.target_compression() or 1.0)
        schedule = AGPSchedule.from_config(ctx.cfg, total, final)
        _, overridden = pruned_groups(model, p)
        override_finals = {n: 1.0 - 1.0 / c for n, c in overridden.items()}
        soft = p.during.soft
        steps = schedule.update_steps(total if soft else None)
        pruner = _ScheduledPruning(ctx, model, schedule, steps, override_finals, soft)
        if 0 in pruner.steps:  # t0 = 0: the initial sparsity applies before the first step
            pruner.update(0, None)
        best = BestAfter(model, schedule.end, task_of(ctx.data))
        callbacks: list[Any] = [pruner] if soft else [pruner, best]
        ctx.fit(model, "train", train_cfg=dataclasses.replace(ctx.cfg.train, select_best=False),
                callbacks=callbacks)
        if not soft and ctx.cfg.train.select_best:
            best.restore()
        # Hard mask at the final sparsity: the soft model's final mask, or (after early stopping
        # before the schedule ended) the remaining pruning; a no-op when the schedule completed.
        ctx.prune_to(model, _compression(final), {n: _compression(s) for n, s in override_finals.items()})
        return model

    def check(self, cfg: ExperimentConfig):
        s = cfg.prune.during
        if not 0.0 <= s.start < s.end <= 1.0:
            yield "prune.during.start", f"start={s.start} and end={s.end} must satisfy 0 <= start < end <= 1"
        if s.every < 1:
            yield "prune.during.every", f"must be >= 1 training steps, got {s.every}"
        final = 1.0 - 1.0 / (cfg.prune.target_compression() or 1.0)
        if not 0.0 <= s.initial_sparsity < 1.0 or s.initial_sparsity > final:
            yield ("prune.during.initial_sparsity",
                   f"must be in [0, final sparsity {final:.4g}], got {s.initial_sparsity}")
        if is_n_m(cfg.prune.granularity):
            yield ("prune.granularity", f"{cfg.prune.granularity!r} fixes the sparsity at M/N, so it cannot be "
                   "reached gradually; use timing pre or post for N:M")
