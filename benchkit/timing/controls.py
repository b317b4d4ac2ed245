"""Control branches trained beside a run, at the run's per-layer densities: the sanity checks of Frankle &
Carbin 2019 (lottery tickets) and of Frankle, Dziugaite, Roy & Carbin 2021 ("Pruning neural networks at
initialization: why are we missing the mark?").

Each builder takes the run's masks (True = keep) and the weights the run's network starts training from
(``start``: the initialisation for ``pre``, the rewind point for ``lottery``) and returns a fresh masked model:

* ``shuffle``: each layer's mask randomly permuted within the layer (same count per layer), on ``start``;
* ``reinit``: the same masks on a fresh initialisation drawn with another seed;
* ``invert``: each layer keeps its *lowest*-scoring weights under the run's criterion, as many as the run
  keeps, on ``start`` (the scores of one scoring pass on the initial network, from :func:`benchkit.pruning.
  engine.score`: for iterative SynFlow, its first iteration's scores);
* ``random``: a random mask with the same count per layer, on ``start`` (drawn by the engine's ``random``
  criterion; for element masks it has the distribution of ``shuffle``, with its own seed).

Every draw comes from a generator seeded by ``(run seed, control, level)``: the same seed gives the same
branches. Controls work on single-weight (element) masks: a permutation or an inversion of a structured mask
would not be a mask of that granularity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from benchkit.config import stable_hash
from benchkit.pruning.engine import score
from benchkit.pruning.layers import prunable_layers
from benchkit.pruning.masks import apply_masks, load_weights
from benchkit.timing.base import RunContext

Builder = Callable[[RunContext, Mapping[str, Tensor], Mapping[str, Tensor], int], nn.Module]


def control_seed(seed: int, control: str, level: int) -> int:
    """A seed for a control branch, distinct from the run seed and from every other branch."""
    return int(stable_hash([seed, control, level], length=8), 16)


def weight_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The masks of prunable layers' weights that prune something (the ones a control re-draws)."""
    out = {}
    for name in prunable_layers(model):
        mask = masks.get(f"{name}.weight")
        if mask is not None and int(mask.sum()) < mask.numel():
            out[f"{name}.weight"] = mask
    return out


def shuffled(mask: Tensor, generator: torch.Generator) -> Tensor:
    """``mask`` with its entries randomly permuted (same shape, same number kept)."""
    flat = mask.reshape(-1)
    return flat[torch.randperm(flat.numel(), generator=generator).to(flat.device)].reshape(mask.shape)


def keep_lowest(scores: Tensor, count: int) -> Tensor:
    """A mask keeping the ``count`` lowest ``scores`` (ties: the lower flat index is kept)."""
    flat = scores.reshape(-1).to(torch.float64)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.sort(flat, stable=True).indices[:count]] = True
    return keep.reshape(scores.shape)


def _on_start(ctx: RunContext, start: Mapping[str, Tensor]) -> nn.Module:
    model = ctx.build_model()
    load_weights(model, start)
    return model


def shuffle_control(ctx: RunContext, masks: Mapping[str, Tensor], start: Mapping[str, Tensor], level: int) -> nn.Module:
    model = _on_start(ctx, start)
    generator = torch.Generator().manual_seed(control_seed(ctx.cfg.seed, "shuffle", level))
    apply_masks(model, {p: shuffled(m, generator) for p, m in weight_masks(model, masks).items()})
    return model


def reinit_control(ctx: RunContext, masks: Mapping[str, Tensor], start: Mapping[str, Tensor], level: int) -> nn.Module:
    model = ctx.build_model(seed=control_seed(ctx.cfg.seed, "reinit", level))
    apply_masks(model, dict(masks))
    return model


def invert_control(ctx: RunContext, masks: Mapping[str, Tensor], start: Mapping[str, Tensor], level: int) -> nn.Module:
    model = _on_start(ctx, start)
    scores = criterion_scores(ctx, model)
    apply_masks(model, {p: keep_lowest(scores[p.rpartition(".")[0]], int(m.sum()))
                        for p, m in weight_masks(model, masks).items()})
    return model


def random_control(ctx: RunContext, masks: Mapping[str, Tensor], start: Mapping[str, Tensor], level: int) -> nn.Module:
    model = _on_start(ctx, start)
    per_layer = {p.rpartition(".")[0]: m.numel() / max(int(m.sum()), 1) for p, m in weight_masks(model, masks).items()}
    if per_layer:
        ctx.prune(model, 1.0, per_layer, criterion="random", allocation="uniform",
                  seed=control_seed(ctx.cfg.seed, "random", level))
    return model


def criterion_scores(ctx: RunContext, model: nn.Module) -> dict[str, Tensor]:
    """The run's criterion scores of ``model``, on the run's scoring batches and seed (as ``ctx.prune`` scores)."""
    p = ctx.cfg.prune
    kwargs: dict[str, Any] = {"input_shape": tuple(ctx.data.input_shape)}
    batches = ctx.scoring_batches()
    if batches:
        kwargs.update(loader=batches, score_batches=len(batches))
    was_training = model.training
    with ctx.clock("prune"):
        out = score(model, p.criterion, exclude=list(p.exclude), seed=ctx.cfg.seed, **kwargs)
    model.train(was_training)
    return out


CONTROLS: dict[str, Builder] = {"shuffle": shuffle_control, "reinit": reinit_control, "invert": invert_control,
                                "random": random_control}
