"""What a batch's loss is and what an evaluation reports, per kind of task.

A :class:`~benchkit.data.DataBundle` names its task (``bundle.task``) and its loaders may carry one
too (``loader.task``); :func:`task_of` reads either, defaulting to ``classification``, so
:func:`benchkit.training.train` and :func:`benchkit.training.evaluate` stay one loop for every task.

* ``classification``: logits ``[B, classes]``, labels ``[B]``; cross-entropy, top-1/top-5 accuracy.
* ``language_model``: logits ``[B, T, vocab]``, next-token targets ``[B, T]`` with
  ``-100`` where a position is not scored; loss in nats per scored token, perplexity, bits per
  character, next-token top-1/top-5 accuracy, and the evaluation protocol (``context``, ``stride``,
  ``tokens``, ``characters``) beside the numbers. The loader's ``protocol`` also names the split and
  its works (see :class:`benchkit.textdata.SlidingWindows`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchkit.registry import Registry
from benchkit.seeding import resolve_device

IGNORE_INDEX = -100


class Task:
    """``loss(logits, y, x) -> scalar`` for training; ``evaluate(model, loader, device) -> {name: number}``;
    ``selection``: the validation metric best-checkpoint selection (``train.select_best``) keeps the best of,
    and whether higher (``max``) or lower (``min``) is better."""

    name = ""
    selection: tuple[str, str] = ("acc1", "max")

    def better(self, metrics: dict[str, float], best: float | None) -> bool:
        """True when ``metrics`` (one evaluation) beats the best selection value so far (None: none yet)."""
        key, mode = self.selection
        value = metrics[key]
        return best is None or (value > best if mode == "max" else value < best)

    def loss(self, logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        raise NotImplementedError


TASKS: Registry[type[Task]] = Registry("task")


def task_of(obj: Any) -> Task:
    """The task of a DataBundle or a loader (its ``task`` attribute), ``classification`` by default."""
    return TASKS.get(getattr(obj, "task", None) or "classification")()


def _eval_mode(fn):
    """Run ``fn(model, loader, device)`` in eval mode without gradients, restoring the model's mode."""

    @torch.no_grad()
    def wrapper(self, model: nn.Module, loader: Any, device: str | torch.device = "auto") -> dict[str, float]:
        dev = resolve_device(device)
        was_training = model.training
        model.eval()
        try:
            return fn(self, model, loader, dev)
        finally:
            model.train(was_training)

    return wrapper


@TASKS.register("classification")
class Classification(Task):
    name = "classification"

    def loss(self, logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
        return F.cross_entropy(logits, y)

    @_eval_mode
    def evaluate(self, model: nn.Module, loader: Any, dev: torch.device) -> dict[str, float]:
        """Mean cross-entropy and top-1/top-5 accuracy (fractions); top-5 is top-k for k < 5 classes."""
        loss_sum, correct1, correct5, n = 0.0, 0, 0, 0
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == y.unsqueeze(1)
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            n += y.shape[0]
        if n == 0:
            raise ValueError("evaluate() got an empty loader")
        return {"loss": loss_sum / n, "acc1": correct1 / n, "acc5": correct5 / n}


@TASKS.register("language_model")
class LanguageModel(Task):
    name = "language_model"
    # the papers' figure is perplexity; next-token top-1 moves in coarse steps and can rise while it worsens
    selection = ("loss", "min")

    def loss(self, logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """Mean next-token cross-entropy over the scored positions (targets ``-100`` are skipped)."""
        if logits.dim() != 3:
            raise ValueError(f"a language model's logits must be [batch, time, vocab], got {tuple(logits.shape)}")
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)

    @_eval_mode
    def evaluate(self, model: nn.Module, loader: Any, dev: torch.device) -> dict[str, float]:
        """Loss (nats/token), perplexity, bits per character, next-token top-1/top-5 over the scored
        tokens, with the protocol beside them. Bits per character use ``loader.characters`` (the
        characters the scored tokens hold); without it, one character per token."""
        nats, tokens, correct1, correct5 = 0.0, 0, 0, 0
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            logits = model(x)
            scored = y != IGNORE_INDEX
            lg, tg = logits[scored], y[scored]
            nats += F.cross_entropy(lg.double(), tg, reduction="sum").item()
            top = lg.topk(min(5, lg.shape[-1]), dim=-1).indices
            hits = top == tg.unsqueeze(1)
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            tokens += int(scored.sum())
        if tokens == 0:
            raise ValueError("evaluate() scored no tokens: the loader is empty")
        characters = getattr(loader, "characters", None) or tokens
        loss = nats / tokens
        out = {"loss": loss, "perplexity": math.exp(loss), "bpc": nats / math.log(2) / characters,
               "acc1": correct1 / tokens, "acc5": correct5 / tokens, "tokens": tokens, "characters": characters}
        for key in ("context", "stride"):
            if hasattr(loader, key):
                out[key] = getattr(loader, key)
        return out
