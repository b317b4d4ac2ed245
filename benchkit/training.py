"""The training loop every timing shares: dense training, fine-tuning after pruning, gradual pruning
(through callbacks) and lottery-ticket rounds.

Selection uses the validation split only; ``train`` never sees the test loader. Pruned models
(``torch.nn.utils.prune``: ``weight_orig`` + ``weight_mask``) train through torch's own hooks, and
pruned entries are set back to exactly zero after every optimiser step
(:mod:`benchkit.masked_training`), whatever the optimiser.

Learning-rate schedules are functions of elapsed *units* — epochs when training by epochs,
iterations when training by iterations. ``schedule_offset`` starts the schedule that many units in,
which is how learning-rate rewinding (Renda et al. 2020) fine-tunes with the tail of the original
schedule: ``train(..., epochs=k, schedule_offset=E - k)`` replays the last k of E epochs' rates.
"""

from __future__ import annotations

import bisect
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from benchkit.config import ConfigError, TrainConfig
from benchkit.masked_training import check_masks, masked_training, refresh_masked_weights
from benchkit.registry import Registry
from benchkit.seeding import resolve_device
from benchkit.tasks import task_of


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: the run stops with the step and learning rate named."""

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (logits, y, x) -> scalar loss
Multiplier = Callable[[int], float]  # elapsed units -> factor on the base learning rate

# --------------------------------------------------------------------------------------------- optimizers
OPTIMIZERS: Registry[Callable[[Iterable[nn.Parameter], TrainConfig, float], torch.optim.Optimizer]] = Registry(
    "optimizer"
)


@OPTIMIZERS.register("sgd")
def _sgd(params, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.nesterov and cfg.momentum <= 0:
        raise ConfigError(f"train.nesterov needs train.momentum > 0, got momentum={cfg.momentum}")
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def _adam(params, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)  # L2 added to the gradient


@OPTIMIZERS.register("adamw")
def _adamw(params, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)  # decoupled decay


# --------------------------------------------------------------------------------------------- schedules
SCHEDULES: Registry[Callable[[TrainConfig, int], Multiplier]] = Registry("schedule")


@SCHEDULES.register("constant")
def _constant(cfg: TrainConfig, total: int) -> Multiplier:
    return lambda t: 1.0


@SCHEDULES.register("step")
def _step(cfg: TrainConfig, total: int) -> Multiplier:
    """× gamma every ``step_size`` units (torch's StepLR)."""
    if cfg.step_size < 1:
        raise ConfigError(f"train.step_size must be a positive number of units, got {cfg.step_size}")
    return lambda t: cfg.gamma ** (t // cfg.step_size)


@SCHEDULES.register("multistep")
def _multistep(cfg: TrainConfig, total: int) -> Multiplier:
    """× gamma at each milestone (torch's MultiStepLR): the rate of unit t is gamma^#(milestones <= t)."""
    if not cfg.milestones:
        raise ConfigError("train.schedule 'multistep' needs train.milestones, e.g. [80, 120]")
    milestones = sorted(cfg.milestones)
    return lambda t: cfg.gamma ** bisect.bisect_right(milestones, t)


@SCHEDULES.register("cosine")
def _cosine(cfg: TrainConfig, total: int) -> Multiplier:
    """Half a cosine from the base rate to 0 over the whole run (torch's CosineAnnealingLR, T_max=total)."""
    return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / max(total, 1)))


# --------------------------------------------------------------------------------------------- history
@dataclass
class History:
    """What happened during one ``train`` call. ``records`` has one dict per evaluation."""

    records: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None  # step of the best validation value (the restored one with select_best)
    best_val_acc1: float | None = None  # validation top-1 at best_step
    best_val_loss: float | None = None  # lowest validation loss (what patience watches)
    selected_by: str = "val_acc1"  # what best_step is best in: the task's selection (val_loss for a language model)
    best_selection: float | None = None  # its value at best_step
    seconds: float = 0.0
    steps: int = 0
    stopped_early: bool = False
    restored_best: bool = False

    @property
    def final(self) -> dict[str, Any]:
        return self.records[-1] if self.records else {}


def default_loss(logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
    return F.cross_entropy(logits, y)


# --------------------------------------------------------------------------------------------- evaluation
def evaluate(model: nn.Module, loader: DataLoader, device: str | torch.device = "auto") -> dict[str, float]:
    """The loader's task's evaluation (:mod:`benchkit.tasks`), in eval mode without gradients. For
    classification: mean cross-entropy and top-1/top-5 accuracy (fractions in [0, 1]; top-5 becomes top-k
    with k = number of classes when there are fewer than 5); for language models see
    :class:`benchkit.tasks.LanguageModel` (``loss``, ``perplexity``, ``bpc``, ``acc1``, ``acc5`` and the
    protocol)."""
    return task_of(loader).evaluate(model, loader, device)


# --------------------------------------------------------------------------------------------- training
def train(
    model: nn.Module,
    data: Any,
    cfg: TrainConfig,
    *,
    device: str | torch.device = "auto",
    epochs: int | None = None,
    iterations: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    schedule: str | None = None,
    schedule_offset: int = 0,
    start_step: int = 0,
    loss_fn: LossFn | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = False,
    desc: str = "train",
) -> History:
    """Train ``model`` on ``data.train``, validating on ``data.val``; returns a :class:`History`.

    Length: ``iterations`` if given, else ``epochs``; with neither, ``cfg.iterations`` or else
    ``cfg.epochs``. ``lr``/``optimizer``/``schedule`` override the config (fine-tuning uses this).
    ``data.val = None`` turns validation off (no selection, no early stopping). Validation runs
    every epoch, or every ``cfg.eval_every`` iterations, and at the last step.

    ``select_best`` restores the state (masks included) with the best validation value by the task's
    selection (:attr:`benchkit.tasks.Task.selection`: top-1 accuracy for classification, loss for a language
    model) among evaluations made since the masks last changed, so a callback that prunes during training is
    never undone.

    ``start_step`` resumes this training length at that step, as lottery-ticket rewinding to iteration
    k retrains (Frankle et al. 2020; OpenLTH's ``start_step``): only steps k+1… run, with the learning
    rate each has in the full run; the epoch holding step k runs its remaining batches, so epochs end
    and evaluate where they do in the full run; steps and callbacks count from k.
    """
    dev = resolve_device(device)
    length, by_iterations = _length(cfg, epochs, iterations)
    steps_per_epoch = len(data.train)
    if steps_per_epoch == 0:
        raise ValueError("the training loader is empty")
    if schedule_offset < 0:
        raise ValueError(f"schedule_offset must be >= 0, got {schedule_offset}")
    if cfg.eval_every is not None and cfg.eval_every < 1:
        raise ConfigError(f"train.eval_every must be a positive number of iterations, got {cfg.eval_every}")
    if cfg.patience is not None and cfg.patience < 1:
        raise ConfigError(f"train.patience must be a positive number of evaluations, got {cfg.patience}")
    total_steps = length if by_iterations else length * steps_per_epoch
    if not 0 <= start_step < total_steps:
        raise ValueError(f"start_step must be in [0, {total_steps}) for this training length, got {start_step}")
    base_lr = cfg.lr if lr is None else lr
    check_masks(model)
    model.to(dev)
    opt = OPTIMIZERS.get(optimizer or cfg.optimizer)(model.parameters(), cfg, base_lr)
    multiplier = SCHEDULES.get(schedule or cfg.schedule)(cfg, schedule_offset + length)
    task = task_of(data)
    loss_fn = loss_fn or task.loss  # classification: default_loss
    val_loader = data.val
    on_step = [cb.on_step for cb in callbacks if hasattr(cb, "on_step")]
    on_eval = [cb.on_eval for cb in callbacks if hasattr(cb, "on_eval")]
    bar = _progress_bar(progress, total_steps - start_step, desc)

    history = History(selected_by=f"val_{task.selection[0]}")
    start = time.perf_counter()
    best_state: dict[str, Tensor] | None = None
    best_masks = _mask_signature(model)
    evals_without_improvement = 0
    running = _RunningMetrics()
    step = last_eval = start_step
    epoch = start_step // steps_per_epoch
    # resumed mid-epoch: that epoch ends after its remaining batches, so epochs (and the evaluations at
    # their ends) fall where they do in the full run. Other epochs run the loader to its end: breaking
    # early would skip the sampler's last draw and shift every later data order.
    resumed_epoch_end = (epoch + 1) * steps_per_epoch if start_step % steps_per_epoch else None
    stop = False

    def set_lr(unit: int) -> float:
        value = base_lr * multiplier(unit + schedule_offset)
        for group in opt.param_groups:
            group["lr"] = value
        return value

    def evaluate_now() -> None:
        nonlocal best_state, best_masks, evals_without_improvement, stop, last_eval
        train_loss, train_acc1 = running.summary()
        if train_loss is not None and not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"{desc}: the training loss is {train_loss} at step {step} (lr {opt.param_groups[0]['lr']:g}): "
                "training diverged and every later number would be meaningless. Lower the learning rate "
                "(train.lr, or prune.finetune.lr for fine-tuning) or add weight decay / gradient care.")
        record: dict[str, Any] = {
            "phase": desc,
            "epoch": epoch if step % steps_per_epoch == 0 else round(step / steps_per_epoch, 4),
            "step": step,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_acc1": train_acc1,
            "val_loss": None, "val_acc1": None, "val_acc5": None,
        }
        last_eval = step
        if val_loader is not None:
            metrics = evaluate(model, val_loader, dev)
            record.update(val_loss=metrics["loss"], val_acc1=metrics["acc1"], val_acc5=metrics["acc5"])
            masks_now = _mask_signature(model)
            if masks_now != best_masks:  # a callback pruned: earlier weights are no longer candidates
                best_masks, history.best_val_acc1, history.best_step, best_state = masks_now, None, None, None
                history.best_val_loss, history.best_selection, evals_without_improvement = None, None, 0
            if task.better(metrics, history.best_selection):
                history.best_val_acc1, history.best_step = metrics["acc1"], step
                history.best_selection = metrics[task.selection[0]]
                if cfg.select_best:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if history.best_val_loss is None or metrics["loss"] < history.best_val_loss:
                history.best_val_loss, evals_without_improvement = metrics["loss"], 0
            else:
                evals_without_improvement += 1
                if cfg.patience is not None and evals_without_improvement >= cfg.patience:
                    stop = history.stopped_early = True
        record["seconds"] = time.perf_counter() - start
        history.records.append(record)
        for fn in on_eval:
            fn(step, record)
        if bar is not None:
            bar.set_postfix({k: f"{record[k]:.4f}" for k in ("train_loss", "val_acc1") if record[k] is not None})

    model.train()
    # pruned weights exactly zero after every step; with no callbacks, the mask's multiply is skipped
    try:
        with masked_training(model, opt, private=not callbacks):
            while step < total_steps and not stop:
                if not by_iterations:
                    set_lr(epoch)
                epoch += 1
                for x, y in data.train:
                    if by_iterations:
                        set_lr(step)
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    opt.zero_grad()  # before the forward: last step's gradients are freed before new activations
                    logits = model(x)
                    loss = loss_fn(logits, y, x)
                    loss.backward()
                    opt.step()
                    step += 1
                    running.add(loss, logits, y)
                    for fn in on_step:
                        fn(step, model, opt)
                    if bar is not None:
                        bar.update(1)
                    if (cfg.eval_every is not None and step % cfg.eval_every == 0) or step == total_steps:
                        evaluate_now()
                    if stop or step >= total_steps or step == resumed_epoch_end:
                        break
                if cfg.eval_every is None and last_eval != step:
                    evaluate_now()
    finally:
        if bar is not None:
            bar.close()

    if cfg.select_best and best_state is not None and history.best_step != step:
        model.load_state_dict(best_state)
        refresh_masked_weights(model)
        history.restored_best = True
    history.steps = step
    history.seconds = time.perf_counter() - start
    return history


class _RunningMetrics:
    """Training loss and top-1 since the last evaluation. A step only keeps references (the detached
    loss, the argmax, the labels); the reductions run at evaluation time, so the loop pays one small
    op per step and never waits for the GPU."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []
        self.sizes: list[int] = []
        self.preds: list[Tensor] = []
        self.labels: list[Tensor] = []

    def add(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        self.losses.append(loss.detach())
        self.sizes.append(y.shape[0])
        if y.dim() == 1:  # class labels (a custom loss may train on other targets)
            self.preds.append(logits.argmax(1))
            self.labels.append(y)

    def summary(self) -> tuple[float | None, float | None]:
        """(mean loss weighted by batch size, top-1 accuracy), then start over."""
        if not self.sizes:
            return None, None
        losses = torch.stack(self.losses).double()
        weights = torch.tensor(self.sizes, dtype=torch.float64, device=losses.device)
        loss = (losses * weights).sum().item() / sum(self.sizes)
        acc = None
        if self.preds:
            acc = (torch.cat(self.preds) == torch.cat(self.labels)).sum().item() / sum(len(p) for p in self.preds)
        self.__init__()
        return loss, acc


def _length(cfg: TrainConfig, epochs: int | None, iterations: int | None) -> tuple[int, bool]:
    """(length, by_iterations): explicit arguments win over the config; iterations win over epochs."""
    if iterations is not None:
        length, by_iterations, key = iterations, True, "iterations"
    elif epochs is not None:
        length, by_iterations, key = epochs, False, "epochs"
    elif cfg.iterations is not None:
        length, by_iterations, key = cfg.iterations, True, "train.iterations"
    else:
        length, by_iterations, key = cfg.epochs, False, "train.epochs"
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ConfigError(f"{key} must be a positive int, got {length!r}")
    return length, by_iterations


def _mask_signature(model: nn.Module) -> tuple[tuple[str, int], ...]:
    """Kept count per prune mask: changes whenever a callback prunes (cheap enough per evaluation)."""
    return tuple((name, int(buf.count_nonzero())) for name, buf in model.named_buffers() if name.endswith("_mask"))


def _progress_bar(progress: bool, total: int, desc: str):
    """An epoch bar on a terminal; none in CI or when stderr is piped (the rule of benchkit.progress)."""
    from benchkit.progress import interactive

    if not progress or not interactive(sys.stderr):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
