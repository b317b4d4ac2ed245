"""``pre``: prune at initialisation, then train the sparse network with its masks fixed from step 0
(random, magnitude, SNIP, GraSP, SynFlow...; data-driven criteria score ``score_batches`` training
batches of ``score_batch_size``)."""

from __future__ import annotations

from torch import nn

from benchkit.timing.base import RunContext, Timing, prunes_anything, register_timing


@register_timing("pre")
class PruneAtInit(Timing):
    def run(self, ctx: RunContext) -> nn.Module:
        model = ctx.build_model()
        if prunes_anything(ctx.cfg.prune):
            ctx.prune(model, ctx.cfg.prune.target_compression())
        # Pruned entries of ``weight_orig`` are zero and receive zero gradient: the mask holds.
        ctx.fit(model, "train")
        return model
