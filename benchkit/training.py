"""The training loop every timing shares: dense training, fine-tuning after pruning, gradual pruning
(through callbacks) and lottery-ticket rounds.

Selection uses the validation split only; ``train`` never sees the test loader. Pruned models
(``torch.nn.utils.prune``: ``weight_orig`` + ``weight_mask``) need nothing special: the optimiser
runs over ``model.parameters()``, masked entries get zero gradient through the mask, and since
:func:`benchkit.pruning.masks.apply_masks` zeroes them in ``weight_orig`` too, neither momentum nor
weight decay can revive them.

Learning-rate schedules are functions of elapsed *units* — epochs when training by epochs,
iterations when training by iterations. ``schedule_offset`` starts the schedule that many units in,
which is how learning-rate rewinding (Renda et al. 2020) fine-tunes with the tail of the original
schedule: ``train(..., epochs=k, schedule_offset=E - k)`` replays the last k of E epochs' rates.
"""

from __future__ import annotations

import bisect
import copyreg
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader

from benchkit.config import ConfigError, TrainConfig
from benchkit.registry import Registry
from benchkit.seeding import resolve_device
from benchkit.tasks import task_of

# Train masked parameters by masking their gradients instead of re-multiplying weight_orig by the mask
# in every forward (see _GradientMasking). Results are identical; set False to use the prune hooks as they are.
GRADIENT_MASKING = True


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
    best_step: int | None = None  # step of the best validation accuracy (the restored one with select_best)
    best_val_acc1: float | None = None
    best_val_loss: float | None = None
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

    ``select_best`` restores the best-validation-accuracy state (masks included) among evaluations
    made since the masks last changed, so a callback that prunes during training is never undone.

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
    model.to(dev)
    opt = OPTIMIZERS.get(optimizer or cfg.optimizer)(model.parameters(), cfg, base_lr)
    multiplier = SCHEDULES.get(schedule or cfg.schedule)(cfg, schedule_offset + length)
    loss_fn = loss_fn or task_of(data).loss  # classification: default_loss
    val_loader = data.val
    on_step = [cb.on_step for cb in callbacks if hasattr(cb, "on_step")]
    on_eval = [cb.on_eval for cb in callbacks if hasattr(cb, "on_eval")]
    bar = _progress_bar(progress, total_steps - start_step, desc)

    history = History()
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
                history.best_val_loss, evals_without_improvement = None, 0
            if history.best_val_acc1 is None or metrics["acc1"] > history.best_val_acc1:
                history.best_val_acc1, history.best_step = metrics["acc1"], step
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
        if masking is not None and on_eval:
            masking.sync()
        if bar is not None:
            bar.set_postfix({k: f"{record[k]:.4f}" for k in ("train_loss", "val_acc1") if record[k] is not None})

    # with no callbacks nothing can look for the prune hooks while the loop runs: they are set aside
    masking = _GradientMasking(model, opt, detach_hooks=not callbacks) if GRADIENT_MASKING else None
    step_fn = masking.step if masking is not None and masking.entries else opt.step
    model.train()
    try:
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
                step_fn()  # with masks: their gradients are zeroed first (see _GradientMasking.step)
                step += 1
                running.add(loss, logits, y)
                for fn in on_step:
                    fn(step, model, opt)
                if masking is not None and on_step:
                    masking.sync(full=False)
                if bar is not None:
                    bar.update(1)
                if (cfg.eval_every is not None and step % cfg.eval_every == 0) or step == total_steps:
                    evaluate_now()
                if stop or step >= total_steps or step == resumed_epoch_end:
                    break
            if cfg.eval_every is None and last_eval != step:
                evaluate_now()
    finally:
        if masking is not None:
            masking.close()
        if bar is not None:
            bar.close()

    if cfg.select_best and best_state is not None and history.best_step != step:
        model.load_state_dict(best_state)
        _refresh_masked_weights(model)
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


@torch.no_grad()
def _refresh_masked_weights(model: nn.Module) -> None:
    """After loading a state dict, recompute ``weight = weight_orig * weight_mask`` so code that reads
    the attribute before the next forward sees the restored values."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            base = name[: -len("_mask")]
            if name.endswith("_mask") and hasattr(module, f"{base}_orig"):
                setattr(module, base, getattr(module, f"{base}_orig") * buf)


def _progress_bar(progress: bool, total: int, desc: str):
    """An epoch bar on a terminal; none in CI or when stderr is piped (the rule of benchkit.progress)."""
    from benchkit.progress import interactive

    if not progress or not interactive(sys.stderr):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------- masked training
@dataclass
class _MaskedParam:
    module: nn.Module
    name: str  # "weight", "bias", ...
    hook_id: int
    hook: prune.BasePruningMethod
    base_class: type
    orig: nn.Parameter
    mask: Tensor
    version: int  # the mask buffer's in-place version counter when last synchronised
    grad_hook: Any = None  # handle of the post-accumulate-grad hook that masks the gradient (with callbacks)
    hook_order: list[int] | None = None  # the module's pre-hook ids when the hook was set aside (detach_hooks)


class _GradientMasking:
    """Masked training without re-multiplying every masked weight in every forward.

    ``torch.nn.utils.prune`` recomputes ``weight = weight_orig * weight_mask`` before each forward, and
    autograd multiplies the gradient by the mask again on the way back: two weight-sized passes and
    allocations per step, about 20% of an epoch of LeNet-300-100 on a CPU. When ``weight_orig`` is
    already zero at every masked entry (as :func:`benchkit.pruning.masks.apply_masks` leaves it), that
    product *is* ``weight_orig``. So while ``train`` runs, the prune hook exposes ``weight_orig`` itself
    as ``weight``, and :meth:`step` zeroes the masked gradients in place before the optimiser uses them:
    bit-identical numbers. Masked entries get exactly zero gradient, so momentum, weight decay and Adam
    keep them at zero. For torch's SGD, Adam and AdamW on a CPU, a masked step of benchkit's own
    (:func:`_masked_sgd_step`, :func:`_masked_adam_step`) reproduces torch's step bit for bit and saves the
    rest of the cost.

    The hooks stay registered (only their class is swapped for a subclass), so ``get_masks``,
    ``apply_masks``, ``prune.remove`` and ``state_dict`` work as usual inside callbacks. A mask changed
    in place by a callback is noticed through the buffer's version counter: newly masked entries are
    zeroed in ``weight_orig`` and in the optimiser state. A parameter whose hook is removed or whose mask
    is replaced, whose ``weight_orig`` holds values under its mask, or whose mask is not 0/1, keeps the
    ordinary hook.

    ``detach_hooks`` (used when ``train`` has no callbacks, so nothing can look for the hooks) goes one
    step further: the prune hooks are taken off the modules for the duration and ``weight`` is bound
    to ``weight_orig`` once, so a forward runs through ``nn.Module``'s hook-free fast path. ``close``
    puts every hook back in its place.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, detach_hooks: bool = False):
        self.opt = opt
        self.detach_hooks = detach_hooks
        # with callbacks, gradients are masked as backward writes them: a callback's own backward (and step)
        # must see masked gradients too; the optimiser step then has nothing left to mask
        self.grad_hooks = not detach_hooks
        self.sparse = any(getattr(m, "sparse", False) is True for m in model.modules())  # sparse embedding grads
        self.entries: list[_MaskedParam] = []
        try:
            for module in model.modules():
                order = list(module._forward_pre_hooks)  # restored as it was, whatever is set aside
                for hook_id, hook in list(module._forward_pre_hooks.items()):
                    self._take_over(module, hook_id, hook, order)
        except BaseException:
            self.close()
            raise
        self._refresh()

    def _refresh(self) -> None:
        self.masks = {} if self.grad_hooks else {e.orig: e.mask for e in self.entries}  # left to mask in step
        in_opt = {id(p) for g in self.opt.param_groups for p in g["params"]}
        self.outside = {p: m for p, m in self.masks.items() if id(p) not in in_opt}  # no step masks these
        self.masked_step = None if self.sparse else _masked_step_for(self.opt)
        self.settings = _settings(self.opt)

    def step(self) -> None:
        """The optimiser's step on gradients with every masked entry zeroed."""
        for orig, mask in self.masks.items() if self.masked_step is None else self.outside.items():
            if orig.grad is not None:
                orig.grad.mul_(mask)
        if self.masked_step is not None:
            self.masked_step(self.opt, self.masks)
        else:
            self.opt.step()

    @torch.no_grad()
    def _take_over(self, module: nn.Module, hook_id: int, hook: Any, order: list[int]) -> None:
        if not isinstance(hook, prune.BasePruningMethod) or hook._tensor_name is None:
            return
        name = hook._tensor_name
        orig, mask = module._parameters.get(f"{name}_orig"), module._buffers.get(f"{name}_mask")
        if orig is None or mask is None or mask.shape != orig.shape or mask.dtype != orig.dtype:
            return
        if not _binary(mask) or not torch.equal(orig * mask, orig):
            return  # a soft mask, or values under the mask: only the multiplying hook gives the product
        base = getattr(type(hook), "_aliased_base", type(hook))
        hook.__class__ = _aliased_class(base)
        entry = _MaskedParam(module, name, hook_id, hook, base, orig, mask, mask._version)
        self.entries.append(entry)
        if self.grad_hooks:
            entry.grad_hook = orig.register_post_accumulate_grad_hook(_grad_masker(mask))
        if self.detach_hooks:
            entry.hook_order = order
            del module._forward_pre_hooks[hook_id]
            hook(module, ())  # binds weight to weight_orig, as the aliased hook would before each forward

    @torch.no_grad()
    def sync(self, full: bool = True) -> None:
        """Catch up with callbacks that changed masks or the optimiser (called after callbacks run). ``full=False``
        (after every step's callbacks) re-decides the optimiser's step only when masks, step hooks or the
        settings of its param groups changed: a cheap comparison, where deciding costs ~17 µs."""
        kept = []
        for e in self.entries:
            m = e.module
            hook_gone = e.hook_order is None and m._forward_pre_hooks.get(e.hook_id) is not e.hook
            if (hook_gone or m._buffers.get(f"{e.name}_mask") is not e.mask
                    or m._parameters.get(f"{e.name}_orig") is not e.orig):
                self._restore(e)
                continue
            if e.mask._version != e.version:
                if not _binary(e.mask):
                    self._restore(e)
                    continue
                e.orig.mul_(e.mask)
                for state in self.opt.state.get(e.orig, {}).values():
                    if torch.is_tensor(state) and state.shape == e.orig.shape:
                        state.mul_(e.mask)
                e.version = e.mask._version
            kept.append(e)
        if full or len(kept) != len(self.entries) or _settings(self.opt) != self.settings:
            self.entries = kept
            self._refresh()

    def close(self) -> None:
        for e in self.entries:
            self._restore(e)
        self.entries = []

    @staticmethod
    @torch.no_grad()
    def _restore(e: _MaskedParam) -> None:
        if e.grad_hook is not None:
            e.grad_hook.remove()
        if e.hook_order is not None:  # put the set-aside hook back where it was among the module's hooks
            hooks = e.module._forward_pre_hooks
            hooks[e.hook_id] = e.hook
            rank = {hook_id: i for i, hook_id in enumerate(e.hook_order)}
            for hook_id in sorted(hooks, key=lambda h: rank.get(h, len(rank))):
                hooks.move_to_end(hook_id)
        e.hook.__class__ = e.base_class
        if e.module._forward_pre_hooks.get(e.hook_id) is e.hook:
            setattr(e.module, e.name, e.hook.apply_mask(e.module))  # a proper product again


def _binary(mask: Tensor) -> bool:
    return torch.equal(mask, mask.bool().to(mask.dtype))


# Masked optimiser steps: each reproduces one torch optimiser's own CPU step (its single-tensor code path) bit for
# bit on gradients with the masked entries zeroed, and saves what masking would otherwise cost. Keyed by the exact
# optimiser class; (whether a param group takes that code path, the step).
MaskedStep = Callable[[torch.optim.Optimizer, dict[Tensor, Tensor]], None]
_MASKED_STEPS: dict[type, tuple[Callable[[dict[str, Any]], bool], MaskedStep]] = {}


def _masked_step_for(opt: torch.optim.Optimizer) -> MaskedStep | None:
    """The masked step for ``opt`` if ``opt.step()`` would run the single-tensor code it reproduces: float32 or
    float64 CPU tensors, float hyperparameters, no foreach, fused, capturable or differentiable mode, no AMP
    scaling and no step hooks. Otherwise None: gradients are masked and ``opt.step()`` runs."""
    known = _MASKED_STEPS.get(type(opt))
    if (known is None or "step" in vars(opt) or _step_hooks(opt)
            or getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None):
        return None
    group_ok, step = known
    for g in opt.param_groups:
        if (g.get("foreach") or g.get("fused") or g.get("capturable") or g.get("differentiable") or g.get("maximize")
                or any(torch.is_tensor(v) for k, v in g.items() if k != "params") or not group_ok(g)):
            return None
        if not all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) and p.layout == torch.strided
                   for p in g["params"]):
            return None
        if not _agrees_with_torch(type(opt), step, {k: v for k, v in g.items() if k != "params"},
                                  {p.dtype for p in g["params"]}):
            return None
    return step


def _grad_masker(mask: Tensor) -> Callable[[Tensor], None]:
    def hook(param: Tensor) -> None:
        param.grad.mul_(mask)

    return hook


def _settings(opt: torch.optim.Optimizer) -> tuple:
    """What decides whether a masked step reproduces ``opt.step()``, cheap to compare every step: each
    group's size and settings (lr only as float or tensor: schedules change its value, the steps read it
    live), whether ``step`` was replaced on the instance, and whether step hooks are registered."""
    return ("step" in vars(opt), _step_hooks(opt), tuple(
        (len(g["params"]), torch.is_tensor(g["lr"]),
         tuple((k, id(v) if torch.is_tensor(v) else v) for k, v in g.items() if k not in ("params", "lr")))
        for g in opt.param_groups))


def _step_hooks(opt: torch.optim.Optimizer) -> bool:
    from torch.optim import optimizer as base

    return bool(opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
                or base._global_optimizer_pre_hooks or base._global_optimizer_post_hooks)


_AGREES: dict[tuple, bool] = {}


def _agrees_with_torch(cls: type, step: MaskedStep, hyper: dict[str, Any], dtypes: set[torch.dtype]) -> bool:
    """Once per process and setting: does ``step`` give what ``cls.step()`` gives on masked gradients, bit for
    bit? Six steps on a small problem with masked, always-zero and tiny gradients. It guards the reproduction
    against another torch version whose optimiser code differs from the one it was written against."""
    key = (cls, tuple(sorted((k, repr(v)) for k, v in hyper.items() if k != "lr")), tuple(sorted(map(str, dtypes))))
    if key not in _AGREES:
        g = torch.Generator().manual_seed(0)
        ok = True
        for dtype in sorted(dtypes, key=str):
            init = torch.randn(515, generator=g, dtype=dtype)
            mask = (torch.rand(515, generator=g) > 0.7).to(dtype)
            init.mul_(mask)
            ours, ref = nn.Parameter(init.clone()), nn.Parameter(init.clone())
            our_opt, ref_opt = cls([ours]), cls([ref])
            our_opt.param_groups[0].update(hyper, lr=1e-2)  # any lr: the key leaves it out, and 0 would test nothing
            ref_opt.param_groups[0].update(hyper, lr=1e-2)
            for t in range(6):
                grad = torch.randn(515, generator=g, dtype=dtype) * 10.0 ** (-25 * (t % 2))
                grad[:40] = 0
                ours.grad, ref.grad = grad.clone(), grad * mask
                step(our_opt, {ours: mask})
                ref_opt.step()
            ok = ok and torch.equal(ours, ref) and all(
                torch.equal(v, ref_opt.state[ref][k]) for k, v in our_opt.state[ours].items())
        _AGREES[key] = ok
    return _AGREES[key]


def _masked_grads(params: Iterable[Tensor], masks: dict[Tensor, Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    """(param, its gradient with the masked entries zeroed in place) for every param that has a gradient."""
    for p in params:
        grad = p.grad
        if grad is None:
            continue
        mask = masks.get(p)
        if mask is not None:
            grad.mul_(mask)
        yield p, grad


_ONES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


@torch.no_grad()
def _masked_sgd_step(opt: torch.optim.SGD, masks: dict[Tensor, Tensor]) -> None:
    """torch's single-tensor SGD step (``torch.optim.sgd._single_tensor_sgd``) with each masked
    gradient zeroed first, op for op, except that the momentum update ``buf.mul_(μ).add_(grad)`` is one
    ``addcmul`` pass: ``grad + (μ·buf)·1`` rounds exactly as ``μ·buf`` then ``+ grad`` (no fused
    multiply-add can contract ``μ·buf``, whose product feeds a multiply by 1). The pass it saves pays for
    the mask's, so masked training costs about what dense training does."""
    for group in opt.param_groups:
        weight_decay, momentum, lr, nesterov = group["weight_decay"], group["momentum"], group["lr"], group["nesterov"]
        for p, grad in _masked_grads(group["params"], masks):
            if weight_decay != 0:
                grad = grad.add(p, alpha=weight_decay)
            if momentum != 0:
                state = opt.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = grad.detach().clone()
                else:
                    key = (buf.device, buf.dtype)
                    one = _ONES.get(key)
                    if one is None:
                        one = _ONES[key] = torch.ones((), device=buf.device, dtype=buf.dtype)
                    torch.addcmul(grad, buf, one, value=momentum, out=buf)
                grad = grad.add(buf, alpha=momentum) if nesterov else buf
            p.add_(grad, alpha=-lr)


_MASKED_STEPS[torch.optim.SGD] = (lambda g: g["dampening"] == 0, _masked_sgd_step)

_INVISIBLE: dict[tuple[torch.dtype, float, float], bool] = {}
_TINY = {dtype: torch.finfo(dtype).tiny for dtype in (torch.float32, torch.float64)}  # smallest normal numbers


def _zero_floor_invisible(dtype: torch.dtype, beta2: float, eps: float) -> bool:
    """Whether Adam's ``denom = sqrt(v) / sqrt(1 - β2^t) + eps`` is the same for every v in [0, tiny]
    (tiny: the smallest normal number), at every step t. It is where it holds for v = tiny at t = 1 (the
    smallest bias correction, with 0 <= β2 < 1): denom only grows with v and shrinks with t. Checked with
    torch's own ops, over enough elements to take the vectorised path and its tail."""
    key = (dtype, beta2, eps)
    if key not in _INVISIBLE:
        ok = 0 <= beta2 < 1
        if ok:
            correction = (1 - beta2) ** 0.5
            at_tiny = (torch.full((67,), _TINY[dtype], dtype=dtype).sqrt() / correction).add_(eps)
            at_zero = (torch.zeros(67, dtype=dtype).sqrt() / correction).add_(eps)
            ok = torch.equal(at_tiny, at_zero)
        _INVISIBLE[key] = ok
    return _INVISIBLE[key]


@torch.no_grad()
def _masked_adam_step(opt: torch.optim.Adam, masks: dict[Tensor, Tensor]) -> None:
    """torch's single-tensor Adam/AdamW step (``torch.optim.adam._single_tensor_adam``, state made as its
    ``_init_group`` makes it) with each masked gradient zeroed first, op for op but in the denominator.
    There the square root is taken of ``max(v, tiny)``: torch's CPU ``sqrt`` is ~7× slower on zeros than on
    other numbers (735 vs 105 µs for a 300×784 tensor here), and a masked weight's second moment is zero
    forever, so masked Adam paid 1.5× a dense epoch of LeNet-300-100 for it. Where ``eps`` swamps
    ``sqrt(tiny)`` (checked per dtype, β2 and eps by :func:`_zero_floor_invisible`; true for every usual
    setting) the denominator, and so every weight, is unchanged; elsewhere the plain ``sqrt`` runs. The
    division and ``+ eps`` then run in place in that temporary, where torch allocates a second one."""
    for group in opt.param_groups:
        beta1, beta2 = group["betas"]
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        decoupled = group.get("decoupled_weight_decay", False)
        for p, grad in _masked_grads(group["params"], masks):
            state = opt.state[p]
            if len(state) == 0:
                scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                state["step"] = torch.tensor(0.0, dtype=scalar, device="cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
            step_t += 1
            if weight_decay != 0:
                if decoupled:
                    p.mul_(1 - lr * weight_decay)
                else:
                    grad = grad.add(p, alpha=weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = step_t.item()
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            floor = _TINY.get(exp_avg_sq.dtype) if _zero_floor_invisible(exp_avg_sq.dtype, beta2, eps) else None
            root = exp_avg_sq.sqrt() if floor is None else exp_avg_sq.clamp_min(floor).sqrt_()
            denom = root.div_(bias_correction2_sqrt).add_(eps)  # in place: one temporary instead of torch's two
            p.addcdiv_(exp_avg, denom, value=-step_size)


def _adam_group_ok(g: dict[str, Any]) -> bool:
    return not g["amsgrad"] and not any(torch.is_tensor(b) for b in g["betas"])


_MASKED_STEPS[torch.optim.Adam] = (_adam_group_ok, _masked_adam_step)
_MASKED_STEPS[torch.optim.AdamW] = (_adam_group_ok, _masked_adam_step)


_ALIASED: dict[type, type] = {}


def _aliased_class(base: type) -> type:
    """A subclass of a pruning method whose hook exposes ``<name>_orig`` as ``<name>`` (no multiply).
    Copies and pickles of it turn back into ``base``, so nothing outside ``train`` ever keeps it."""
    if base not in _ALIASED:

        def __call__(self, module: nn.Module, inputs: Any) -> None:
            module.__dict__[self._tensor_name] = module._parameters[self._tensor_name + "_orig"]

        def __reduce_ex__(self, protocol: int):
            return copyreg.__newobj__, (base,), self.__dict__

        _ALIASED[base] = type(f"Aliased{base.__name__}", (base,),
                              {"__call__": __call__, "__reduce_ex__": __reduce_ex__, "_aliased_base": base})
    return _ALIASED[base]
