"""Scratch-E and Scratch-B: controls of post-training structured pruning from Liu et al. 2019, "Rethinking the
value of network pruning". The pruned run's architecture, trained from a fresh initialisation instead of from the
inherited weights:

* the final pruned model's dead channels are removed for good (:func:`benchkit.deployment.compact.compact`,
  Torch-Pruning), giving the smaller dense architecture the pruning chose;
* every layer of that architecture is initialised afresh (each layer's ``reset_parameters``, so fan-in dependent
  defaults use the *compacted* layer's fan-in, then ``model.init`` when it names a scheme), from a seed of its own;
* it trains with the run's training settings (optimizer, learning rate, schedule) for

  - ``scratch_e``: as many epochs (or iterations) as the dense training;
  - ``scratch_b``: the same compute, epochs × FLOPs(dense) / FLOPs(pruned), truncated to an integer as in the
    authors' code (``int(epochs * flops_std / flops_small)``), and capped at ``scratch_b_cap`` × epochs (their
    ImageNet code doubles the epochs when the pruned model saves more than 2× FLOPs; ``None``: no cap, as in
    their CIFAR code). Step and multi-step schedules stretch with it (their decays sit at fixed fractions of
    training).

FLOPs are fvcore counts of one sample over the whole model (every layer, as the authors' ``count_model_param_flops``).
Models whose constructor draws its own initialisation (``resnet20``…, torchvision models) get PyTorch's layer
defaults here unless ``model.init`` names a scheme.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchkit.config import TrainConfig
from benchkit.deployment.compact import CompactResult, compact
from benchkit.models import initialize
from benchkit.seeding import seed_everything
from benchkit.timing.base import RunContext, compression_summary, phase_seed

#: control name -> (dense epochs or iterations, FLOPs ratio dense/pruned, cap) -> epochs or iterations of its training
SCRATCH_LENGTH: dict[str, Callable[[int, float, float | None], int]] = {
    "scratch_e": lambda length, ratio, cap: length,
    "scratch_b": lambda length, ratio, cap: int(length * (ratio if cap is None else min(ratio, cap))),
}
SCRATCH_CONTROLS = tuple(SCRATCH_LENGTH)


@dataclass
class ScratchArchitecture:
    """The compacted architecture of a pruned model, freshly initialised, and what compaction measured."""

    model: nn.Module
    compacted: CompactResult

    @property
    def flops_ratio(self) -> float:
        """Dense / pruned FLOPs of the whole model (one sample)."""
        return self.compacted.flops_before / self.compacted.flops_after


def example_batch(ctx: RunContext, size: int = 16) -> torch.Tensor:
    """Inputs to trace and check the compaction with: the first validation (else test) examples."""
    loader = ctx.data.val if ctx.data.val is not None else ctx.data.test
    x, _ = next(iter(loader))
    return x[:size]


@torch.no_grad()
def reinitialize(model: nn.Module, init: str = "default", seed: int = 0, deterministic: bool = True) -> nn.Module:
    """Draw every parameter of ``model`` afresh, in place: each module's own ``reset_parameters`` (PyTorch's
    defaults, from the module's current shape), then the ``model.init`` scheme when it is not ``default``."""
    seed_everything(seed, deterministic)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return initialize(model, init)


def scratch_architecture(ctx: RunContext, pruned: nn.Module, seed: int) -> ScratchArchitecture:
    """``pruned`` with its dead channels removed, every layer initialised afresh from ``seed``."""
    result = compact(pruned, example_batch(ctx).to(ctx.device), measure_latency=False)
    model = reinitialize(result.model, ctx.cfg.model.init, seed, ctx.cfg.deterministic).to(ctx.device)
    return ScratchArchitecture(model=model, compacted=result)


def scratch_train_config(train: TrainConfig, factor: float) -> TrainConfig:
    """``train`` with its length and step-schedule points stretched by ``factor`` (Scratch-B trains longer, its
    learning-rate decays at the same fractions of training)."""
    out = copy.deepcopy(train)
    if factor == 1.0:
        return out
    if out.iterations is not None:
        out.iterations = max(1, int(out.iterations * factor))
    else:
        out.epochs = max(1, int(out.epochs * factor))
    out.step_size = max(1, round(out.step_size * factor))
    out.milestones = [max(1, round(m * factor)) for m in out.milestones]
    return out


def run_scratch_controls(ctx: RunContext, pruned: nn.Module, controls: list[str], cap: float | None,
                         index: dict[str, Any]) -> None:
    """Train each control on the pruned model's architecture and log it as a ``ctx.levels`` row with its ``branch``
    (``index`` holds the row's position, e.g. ``{"round": 3}``)."""
    if not controls:
        return
    p, train = ctx.cfg.prune, ctx.cfg.train
    arch = scratch_architecture(ctx, pruned, phase_seed(ctx.cfg.seed, "scratch_init"))
    fresh = {k: v.detach().clone() for k, v in arch.model.state_dict().items()}
    summary = compression_summary(pruned, p)
    length = train.iterations if train.iterations is not None else train.epochs
    for name in controls:
        n = SCRATCH_LENGTH[name](length, arch.flops_ratio, cap)
        cfg = scratch_train_config(train, n / length)
        model = arch.model
        model.load_state_dict(fresh)  # E and B start from the same initialisation
        history = ctx.fit(model, name, kind=f"control_{name}", train_cfg=cfg)
        unit = "iterations" if train.iterations is not None else "epochs"
        ctx.levels.append({**index, "branch": name, **summary, unit: n, "flops_ratio": arch.flops_ratio,
                           "flops": float(arch.compacted.flops_after), "params": float(arch.compacted.params_after),
                           "best_step": history.best_step, **ctx.evaluate_splits(model)})


def check_controls(controls: list[str], cap: float | None, granularity: str) -> list[tuple[str, str]]:
    """Config problems of the scratch controls, as (key, message)."""
    problems = []
    bad = [c for c in controls if c not in SCRATCH_LENGTH]
    if bad:
        problems.append(("prune.post.controls", f"unknown control {bad[0]!r}; allowed: {', '.join(SCRATCH_CONTROLS)}"))
    if controls and str(granularity) != "channel":
        problems.append(("prune.post.controls", (
            f"scratch controls train the architecture that pruning leaves once dead channels are removed; with "
            f"granularity {granularity!r} no channel dies, so it would be the dense network: use granularity: channel")))
    if cap is not None and not (math.isfinite(cap) and cap >= 1.0):
        problems.append(("prune.post.scratch_b_cap", f"must be >= 1 (a multiple of the training length) or null "
                                                     f"(no cap), got {cap}"))
    return problems

