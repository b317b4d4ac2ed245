"""``pre``: prune at initialisation, then train the sparse network with its masks fixed from step 0
(random, magnitude, SNIP, GraSP, SynFlow...; data-driven criteria score ``score_batches`` training
batches of ``score_batch_size``).

``prune.pre.controls`` trains the sanity checks of Frankle, Dziugaite, Roy & Carbin 2021 beside the run, each
at the run's per-layer densities (:mod:`benchkit.timing.controls`): ``shuffle`` (the mask permuted within each
layer, on the same initialisation), ``reinit`` (the same mask on a fresh initialisation), ``invert`` (the
lowest-scoring weights of each layer kept instead of the highest) and ``random`` (a random mask). The run and its
controls are logged as ``ctx.levels`` rows with a ``branch`` column (``main`` and the control's name), like the
lottery controls: MLflow metrics ``level_test_acc1`` and ``<control>_level_test_acc1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from benchkit.config import ExperimentConfig
from benchkit.pruning.masks import get_masks, plain_state_dict
from benchkit.timing.base import RunContext, Timing, compression_summary, prunes_anything, register_timing
from benchkit.timing.controls import CONTROLS

LEVEL = 1  # the one pruning step of ``pre``: the index of its rows in ctx.levels (and their MLflow step)


@dataclass
class PreConfig:
    """``prune.pre``: pruning at initialisation."""

    controls: list[str] = field(default_factory=list, metadata={"exclusive": True})  # shuffle | reinit | invert | random


@register_timing("pre", config=PreConfig)
class PruneAtInit(Timing):
    def run(self, ctx: RunContext) -> nn.Module:
        p = ctx.cfg.prune
        model = ctx.build_model()
        init = plain_state_dict(model)
        if prunes_anything(p):
            ctx.prune(model, p.target_compression())
        masks = get_masks(model)
        # Pruned entries of ``weight_orig`` are zero and receive zero gradient: the mask holds.
        history = ctx.fit(model, "train")
        if p.pre.controls:
            ctx.levels.append({"level": LEVEL, "branch": "main", **compression_summary(model, p),
                               "best_step": history.best_step, **ctx.evaluate_splits(model)})
        for control in p.pre.controls:
            branch = CONTROLS[control](ctx, masks, init, LEVEL)
            h = ctx.fit(branch, f"train_{control}", kind=f"control_{control}")
            ctx.levels.append({"level": LEVEL, "branch": control, **compression_summary(branch, p),
                               "best_step": h.best_step, **ctx.evaluate_splits(branch)})
        return model

    def check(self, cfg: ExperimentConfig):
        p, controls = cfg.prune, cfg.prune.pre.controls
        bad = [c for c in controls if c not in CONTROLS]
        if bad:
            yield "prune.pre.controls", f"unknown control {bad[0]!r}; allowed: {', '.join(CONTROLS)}"
        if len(set(controls)) != len(controls):
            yield "prune.pre.controls", f"each control once, got {controls}"
        if controls and not prunes_anything(p):
            yield "prune.pre.controls", ("controls re-draw the run's masks, but this run prunes nothing; set "
                                         "prune.compression or prune.sparsity")
        if controls and p.granularity != "element":
            yield "prune.granularity", (f"the controls {controls} permute, invert or re-draw single weights; "
                                        f"granularity {p.granularity!r} is not supported with them (use element)")
