"""``lottery``: iterative magnitude pruning with weight rewinding (Frankle & Carbin 2019; Frankle et
al. 2020), with the two controls of the paper.

Level 0 trains the dense network (from the cache when possible). At level L = 1…levels the current
ticket's trained weights lose ``rate`` of their survivors (per layer with ``allocation: uniform``, as in the
paper; ``lottery.layer_rates`` globs give layers their own rate, e.g. the output layer at half the
rate), the survivors are rewound to their values at initialisation (``rewind_iteration: 0``) or
after iteration k of the dense training (captured by a training callback), and the ticket retrains
the rest of the run from there: steps k+1…T, each at the learning rate it had in the dense run
(Frankle et al. 2020; OpenLTH's ``start_step``), so every level trains for as long as the dense
network did after iteration k.
Controls, trained at every level from the ticket's masks (:mod:`benchkit.timing.controls`):

* ``reinit``: the same masks on a fresh initialisation drawn from a different seed;
* ``random``: random masks with the ticket's per-layer sparsities, on the rewound weights;
* ``shuffle``: the ticket's masks permuted within each layer, on the rewound weights (the contrast of Frankle
  et al. 2021: tickets found after training *are* harmed by it, masks found at initialisation are not).

With ``prune.compression`` the rate is derived so that ``levels`` levels reach it
(``rate = 1 − C^(−1/levels)``); otherwise ``lottery.rate`` (default 0.2).

Criterion: ``magnitude`` (IMP) or ``random`` (iterative random pruning with rewinding); scores of
other criteria are not what the lottery-ticket procedure is defined on, so they are refused by
validation (use ``timing: post`` with ``rounds`` for iterative pruning with other criteria).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from benchkit.config import ConfigError, ExperimentConfig
from benchkit.pruning.layers import prunable_layers, resolve_patterns
from benchkit.pruning.masks import get_masks, load_weights, plain_state_dict
from benchkit.timing.base import (
    RunContext,
    Timing,
    compression_summary,
    is_n_m,
    per_layer_values,
    register_timing,
)
from benchkit.timing.controls import control_seed, random_control, reinit_control, shuffle_control

CRITERIA = ("magnitude", "random")
CONTROLS = ("reinit", "random", "shuffle")
DEFAULT_RATE = 0.2


def _exclusive(default: Any = None, factory: Any = None) -> Any:
    meta = {"exclusive": True}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


@dataclass
class LotteryConfig:
    """``prune.lottery``: iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al.
    2020). ``levels`` is a plain setting; the others are refused with other timings."""

    levels: int = 5
    rate: float | None = _exclusive()  # fraction of survivors pruned per level; default 0.2, or from compression
    layer_rates: dict[str, float] = _exclusive(factory=dict)  # per-layer (glob) rates, e.g. {fc3: 0.1}
    rewind_iteration: int = _exclusive(0)  # 0 = rewind to initialisation; k = to the weights after iteration k
    controls: list[str] = _exclusive(factory=list)  # reinit | random | shuffle: controls trained at every level


def lottery_rate(cfg: ExperimentConfig) -> float:
    """Fraction of survivors pruned per level."""
    lt, target = cfg.prune.lottery, cfg.prune.target_compression()
    if lt.rate is not None:
        return lt.rate
    if target is not None:
        return 1.0 - target ** (-1.0 / lt.levels)
    return DEFAULT_RATE


@register_timing("lottery", config=LotteryConfig)
class LotteryTicket(Timing):
    def preflight(self, ctx: RunContext) -> None:
        k, total = ctx.cfg.prune.lottery.rewind_iteration, ctx.total_steps()
        if k >= total:
            raise ConfigError(f"prune.lottery.rewind_iteration: is {k} but training has only {total} steps; "
                              "rewind to an earlier iteration")

    def run(self, ctx: RunContext) -> nn.Module:
        cfg, lt = ctx.cfg, ctx.cfg.prune.lottery
        k = lt.rewind_iteration
        ticket, entry = ctx.dense(capture_steps=[k] if k > 0 else [])
        if k > 0 and k not in entry.checkpoints:
            raise ConfigError(
                f"prune.lottery.rewind_iteration: the dense training stopped early at step "
                f"{entry.history.get('steps')} (train.patience={cfg.train.patience}), before iteration {k}, so there "
                "are no weights to rewind to; rewind to an earlier iteration, or raise or remove train.patience")
        # The dense net started from ctx.build_model() under the run seed: rebuilding gives its init.
        rewind = plain_state_dict(ctx.build_model()) if k == 0 else entry.checkpoints[k]
        dense_metrics = {key[len("dense_"):]: value for key, value in ctx.metrics.items()
                         if key.startswith(("dense_val_", "dense_test_"))}
        ctx.levels.append({"level": 0, "branch": "ticket", **compression_summary(ticket, cfg.prune),
                           "best_step": entry.history.get("best_step"), **dense_metrics})
        rate = lottery_rate(cfg)
        names = list(prunable_layers(ticket))
        excluded = set(resolve_patterns(cfg.prune.exclude, names, "prune.exclude"))
        layer_rates = per_layer_values(lt.layer_rates, names, excluded, "prune.lottery.layer_rates")

        for level in range(1, lt.levels + 1):
            # survivors lose `rate` per level: aim at (1 − rate)^level of the original weights, so
            # rounding never accumulates over levels
            ctx.prune_to(ticket, (1.0 - rate) ** -level, {n: (1.0 - r) ** -level for n, r in layer_rates.items()})
            masks = get_masks(ticket)
            load_weights(ticket, rewind)  # survivors take their rewind values; pruned stay zero
            self._train(ctx, ticket, level, "ticket")
            for control in lt.controls:
                model = CONTROL_BUILDERS[control](ctx, masks, rewind, level)
                self._train(ctx, model, level, control)
        return ticket

    def _train(self, ctx: RunContext, model: nn.Module, level: int, branch: str) -> None:
        phase = f"level_{level}" if branch == "ticket" else f"level_{level}_{branch}"
        # rewound to iteration k, a branch trains the rest of the run: steps k+1..T at their own rates
        history = ctx.fit(model, phase, kind="train" if branch == "ticket" else f"control_{branch}",
                          start_step=ctx.cfg.prune.lottery.rewind_iteration)
        ctx.levels.append({"level": level, "branch": branch, **compression_summary(model, ctx.cfg.prune),
                           "best_step": history.best_step, **ctx.evaluate_splits(model)})

    def check(self, cfg: ExperimentConfig):
        p, lt = cfg.prune, cfg.prune.lottery
        if p.criterion not in CRITERIA:
            yield "prune.criterion", (f"timing lottery prunes by {' or '.join(CRITERIA)} (iterative magnitude "
                                      f"pruning), got {p.criterion!r}; for iterative pruning with other "
                                      "criteria use timing: post with rounds")
        if is_n_m(p.granularity):
            yield "prune.granularity", f"{p.granularity!r} fixes the compression at M/N; it cannot compound over levels"
        if lt.levels < 1:
            yield "prune.lottery.levels", f"must be >= 1, got {lt.levels}"
        if lt.rate is not None:
            if not 0.0 < lt.rate < 1.0:
                yield "prune.lottery.rate", f"must be in (0, 1), got {lt.rate}"
            if p.target_compression() is not None:
                key = "prune.compression" if p.compression is not None else "prune.sparsity"
                yield key, ("timing lottery takes either prune.lottery.rate or a target compression/sparsity "
                            "(the rate is then derived from levels), not both")
        for pattern, r in lt.layer_rates.items():
            if not 0.0 <= r < 1.0:
                yield "prune.lottery.layer_rates", f"rate of {pattern!r} must be in [0, 1), got {r}"
        if p.overrides:
            yield "prune.overrides", ("timing lottery sets per-layer pruning rates with prune.lottery.layer_rates "
                                      "(e.g. {fc3: 0.1}); use that instead of prune.overrides")
        if lt.rewind_iteration < 0:
            yield "prune.lottery.rewind_iteration", f"must be >= 0, got {lt.rewind_iteration}"
        bad = [c for c in lt.controls if c not in CONTROLS]
        if bad:
            yield "prune.lottery.controls", f"unknown control {bad[0]!r}; allowed: {', '.join(CONTROLS)}"
        if "shuffle" in lt.controls and p.granularity != "element":
            yield "prune.lottery.controls", (f"shuffle permutes single weights within a layer; granularity "
                                             f"{p.granularity!r} is not supported with it (use element)")


CONTROL_BUILDERS: dict[str, Any] = {"reinit": reinit_control, "random": random_control, "shuffle": shuffle_control}
__all__ = ["LotteryConfig", "LotteryTicket", "lottery_rate", "control_seed", "CONTROL_BUILDERS"]
