"""``post``: train dense (or take it from the cache), prune one-shot or in ``prune.post.rounds``,
fine-tune after each round. Settings: :class:`PostConfig` (``prune.post``).

Round r of n prunes to the cumulative compression ``C^(r/n)`` of the target C (per-round
compression ``C^(1/n)``, i.e. per-round fraction ``1 − (1 − s)^(1/n)``), converted to the
engine's incremental compression, so rounding never drifts and round n lands exactly on C.

Fine-tuning uses ``finetune.epochs``/``iterations`` at ``finetune.lr`` (default ``train.lr / 10``,
Han et al. 2015) with a constant schedule, unless

* ``lr_rewind`` (Renda et al. 2020): fine-tune for t epochs with the *original* optimizer, lr and
  schedule replayed from epoch T − t (``train(schedule_offset=T − t)``);
* ``distill.enabled`` (Hinton et al. 2015): the loss is
  ``α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α)·CE(z_s, y)`` with the dense model as the
  teacher, in eval mode and without gradients.

``controls: [scratch_e, scratch_b]`` (channel granularity) also trains the final pruned architecture from a fresh
initialisation, for as long as the dense training or for the same compute (Liu et al. 2019;
:mod:`benchkit.timing.scratch`), logged as rows of their own ``branch`` beside the last round.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchkit.config import ExperimentConfig
from benchkit.timing.base import (
    RunContext,
    Timing,
    compression_summary,
    is_n_m,
    pruned_groups,
    prunes_anything,
    register_timing,
)
from benchkit.timing.scratch import check_controls, run_scratch_controls


@dataclass
class FinetuneConfig:
    """Training after each pruning round."""

    epochs: int = 3
    iterations: int | None = None
    lr: float | None = None  # default: train.lr / 10 (Han et al. 2015)
    optimizer: str | None = None  # default: train.optimizer
    schedule: str | None = None  # default: constant (or the rewound original schedule with lr_rewind)

    def __post_init__(self) -> None:
        self.optimizer = self.optimizer.lower() if isinstance(self.optimizer, str) else self.optimizer
        self.schedule = self.schedule.lower() if isinstance(self.schedule, str) else self.schedule


@dataclass
class DistillConfig:
    """Knowledge distillation from the dense teacher during fine-tuning (Hinton et al. 2015)."""

    enabled: bool = field(default=False, metadata={"exclusive": True})
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the soft-target term; 1 - alpha on the hard labels


@dataclass
class PostConfig:
    """``prune.post``: rounds of pruning, each followed by fine-tuning. ``finetune`` is a plain setting of the
    procedure (a sweep base may set it for a zip over timings); the others are refused with other timings."""

    rounds: int = field(default=1, metadata={"exclusive": True})
    lr_rewind: bool = field(default=False, metadata={"exclusive": True})  # Renda et al. 2020
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # Liu et al. 2019: the pruned architecture trained from scratch, scratch_e (same epochs) / scratch_b (same FLOPs)
    controls: list[str] = field(default_factory=list, metadata={"exclusive": True})
    scratch_b_cap: float | None = field(default=2.0, metadata={"exclusive": True})  # max Scratch-B / dense epochs


class DistillationLoss:
    """``loss_fn(logits, y, x)`` for :func:`benchkit.training.train`: soft targets from a frozen teacher."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def __call__(self, logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
        self.teacher.eval()  # whatever the caller did to the student, the teacher stays in eval mode
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        t = self.temperature
        # KL(p_teacher || p_student), averaged over the batch; T² keeps gradient scale (Hinton et al.)
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                      reduction="batchmean", log_target=True)
        loss = self.alpha * t * t * kd
        if self.alpha < 1.0:
            loss = loss + (1.0 - self.alpha) * F.cross_entropy(logits, y)
        return loss


@register_timing("post", config=PostConfig)
class PostTraining(Timing):
    def run(self, ctx: RunContext) -> nn.Module:
        p, post = ctx.cfg.prune, ctx.cfg.prune.post
        model, _ = ctx.dense()
        if not prunes_anything(p):
            return model  # the dense baseline of a sweep (compression 1)
        teacher = copy.deepcopy(model) if post.distill.enabled else None
        target = p.target_compression()
        _, overridden = pruned_groups(model, p)
        for r in range(1, post.rounds + 1):
            if is_n_m(p.granularity):  # N:M fixes its own compression; one round only (validated)
                ctx.prune(model, target)
            else:
                fraction = r / post.rounds
                ctx.prune_to(model, (target or 1.0) ** fraction, {n: c ** fraction for n, c in overridden.items()})
            row: dict[str, Any] = {"round": r, **compression_summary(model, p)}
            history = self.finetune(ctx, model, f"finetune_r{r}", teacher)
            row["best_step"] = history.best_step if history is not None else None
            row.update(ctx.evaluate_splits(model))
            ctx.levels.append(row)
        run_scratch_controls(ctx, model, post.controls, post.scratch_b_cap, {"round": post.rounds})
        return model

    def finetune(self, ctx: RunContext, model: nn.Module, phase: str, teacher: nn.Module | None):
        """Fine-tune after a round (None when ``finetune`` asks for no training at all)."""
        cfg, p = ctx.cfg, ctx.cfg.prune.post
        ft = p.finetune
        if not ft.iterations and not ft.epochs:
            return None
        kwargs: dict[str, Any] = {"epochs": None if ft.iterations else ft.epochs, "iterations": ft.iterations}
        if p.lr_rewind:  # replay the tail of the original schedule, original optimizer and lr
            length = ft.iterations or ft.epochs
            total = cfg.train.iterations or cfg.train.epochs
            kwargs.update(lr=cfg.train.lr, optimizer=cfg.train.optimizer, schedule=cfg.train.schedule,
                          schedule_offset=total - length)
        else:
            kwargs.update(lr=ft.lr if ft.lr is not None else cfg.train.lr / 10,
                          optimizer=ft.optimizer or cfg.train.optimizer, schedule=ft.schedule or "constant")
        if teacher is not None:
            kwargs["loss_fn"] = DistillationLoss(teacher, p.distill.temperature, p.distill.alpha)
        return ctx.fit(model, phase, kind="finetune", **kwargs)

    def check(self, cfg: ExperimentConfig):
        p = cfg.prune.post
        yield from check_controls(p.controls, p.scratch_b_cap, cfg.prune.granularity)
        if p.rounds < 1:
            yield "prune.post.rounds", f"must be >= 1, got {p.rounds}"
        if p.rounds > 1 and is_n_m(cfg.prune.granularity):
            yield "prune.post.rounds", (f"granularity {cfg.prune.granularity!r} fixes the compression at M/N in one "
                                        "step; use rounds: 1")
        ft = p.finetune
        if ft.iterations is not None and ft.iterations < 1:
            yield "prune.post.finetune.iterations", (f"must be >= 1, got {ft.iterations}; for no fine-tuning leave "
                                                     "it unset and set prune.post.finetune.epochs: 0")
        if ft.epochs < 0:
            yield "prune.post.finetune.epochs", f"must be >= 0 (0 = no fine-tuning), got {ft.epochs}"
        if ft.lr is not None and ft.lr <= 0:
            yield "prune.post.finetune.lr", f"must be > 0, got {ft.lr}"
        if p.lr_rewind:
            by_iter_train, by_iter_ft = cfg.train.iterations is not None, ft.iterations is not None
            if by_iter_train != by_iter_ft:
                yield ("prune.post.finetune.iterations" if by_iter_ft else "prune.post.finetune.epochs",
                       "lr_rewind replays the original schedule, so fine-tuning must use the same unit as "
                       "training (both epochs or both iterations)")
            else:
                length, total = (ft.iterations, cfg.train.iterations) if by_iter_ft else (ft.epochs, cfg.train.epochs)
                if length > total:
                    yield ("prune.post.finetune.iterations" if by_iter_ft else "prune.post.finetune.epochs",
                           f"lr_rewind replays the last {length} of {total} training steps/epochs; "
                           f"it can be at most {total}")
            for key in ("lr", "optimizer", "schedule"):
                if getattr(ft, key) is not None:
                    yield (f"prune.post.finetune.{key}", "lr_rewind uses the original training "
                           f"{key}; remove prune.post.finetune.{key} or set prune.post.lr_rewind: false")
        d = p.distill
        if d.enabled:
            if d.temperature <= 0:
                yield "prune.post.distill.temperature", f"must be > 0, got {d.temperature}"
            if not 0.0 <= d.alpha <= 1.0:
                yield "prune.post.distill.alpha", f"must be in [0, 1], got {d.alpha}"
