"""How a pruned model trains: torch's own prune hooks, plus pruned entries set back to zero after every
optimiser step. One mechanism for every optimiser and device, exact by construction:

* forward: the ``torch.nn.utils.prune`` hook computes ``weight = weight_orig * weight_mask``, so autograd
  hands ``weight_orig`` the gradient ``grad_weight * mask``: exactly zero at pruned entries, and the
  plain gradient (times one) at survivors. Survivors therefore follow the plain optimiser, bit for bit
  what a hand-written loop that masks its gradients gets.
* after ``optimizer.step()``: :func:`zero_pruned` multiplies each ``weight_orig`` by its mask. Whatever the
  optimiser did at pruned entries (weight decay, momentum left over from before a callback pruned them, a
  non-elementwise update rule) is undone, so pruned weights are exactly zero after every step.

Masks are read afresh at every step, so a callback that prunes mid-training (timing ``during``) or
replaces a mask (dynamic sparse training: regrown entries start from the zero stored in ``weight_orig``;
the caller resets their optimiser state) needs nothing from the loop. Masks are 0/1, as torch's prune
methods make them.

This module is *not* part of the dense-cache key (:mod:`benchkit.cache`): its functions are no-ops on a
model without masks, which ``tests/test_training.py`` checks, so editing it never retrains cached dense
models.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune


def pruned_parameters(model: nn.Module) -> Iterator[tuple[nn.Module, str, Tensor, Tensor]]:
    """``(module, name, <name>_orig, <name>_mask)`` for every parameter under a prune mask, read from the
    modules as they are now (a mask added, replaced or removed by a callback is seen at once)."""
    for module in model.modules():
        for buffer_name, mask in module._buffers.items():  # 3x faster than named_buffers(): runs every step
            if mask is not None and buffer_name.endswith("_mask"):
                name = buffer_name[: -len("_mask")]
                orig = module._parameters.get(f"{name}_orig")
                if orig is not None:
                    yield module, name, orig, mask


def check_masks(model: nn.Module) -> None:
    """Refuse masks that are not 0/1 before training starts: :func:`zero_pruned` multiplies by the mask, so a
    soft mask (0.5) would shrink its weights at every step."""
    for module, name, _, mask in pruned_parameters(model):
        if not torch.equal(mask, mask.bool().to(mask.dtype)):
            owner = next((n for n, m in model.named_modules() if m is module), "?")
            raise ValueError(
                f"{owner + '.' if owner else ''}{name}_mask holds values other than 0 and 1: benchkit trains pruned "
                "models with 0/1 masks (torch.nn.utils.prune's own methods make them). Scale the weights "
                "themselves instead of the mask.")


@torch.no_grad()
def zero_pruned(model: nn.Module) -> None:
    """Set every pruned entry of every ``<name>_orig`` to exactly zero (survivors are multiplied by one)."""
    for _, _, orig, mask in pruned_parameters(model):
        orig.mul_(mask)


def keep_pruned_at_zero(model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """Run :func:`zero_pruned` after every ``optimizer.step()`` (train's own and any a callback takes), through
    torch's step post-hook. Returns the hook's handle (``.remove()`` it when training ends)."""

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        zero_pruned(model)

    return optimizer.register_step_post_hook(hook)


@torch.no_grad()
def refresh_masked_weights(model: nn.Module) -> None:
    """Recompute ``weight = weight_orig * weight_mask`` now (the prune hook does it before each forward),
    so code that reads the attribute after a state dict was loaded sees the loaded values."""
    for module, name, orig, mask in pruned_parameters(model):
        setattr(module, name, orig * mask)



# torch's optimisers whose update of an entry reads only that entry's gradient and state: what happens at a
# pruned entry (then set back to zero) cannot reach a survivor, so the fast path may leave its gradient unmasked.
# Exact types: a subclass may override step with anything.
ELEMENTWISE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
                          torch.optim.Adagrad, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax)


@contextmanager
def masked_training(model: nn.Module, optimizer: torch.optim.Optimizer, *, private: bool = False) -> Iterator[None]:
    """What ``train`` wraps its loop in: :func:`keep_pruned_at_zero` for the whole loop and, when ``private``
    (no callback can see the model until the loop ends), the one fast path, :func:`skip_mask_multiply`."""
    handle = keep_pruned_at_zero(model, optimizer)
    try:
        if private:
            with skip_mask_multiply(model, mask_grads=type(optimizer) not in ELEMENTWISE_OPTIMIZERS):
                yield
        else:
            yield
    finally:
        handle.remove()


@contextmanager
def skip_mask_multiply(model: nn.Module, mask_grads: bool = True) -> Iterator[None]:
    """The one special path, isolated here and taken only while nothing but ``train``'s own loop touches the
    model: each masked ``weight`` *is* ``weight_orig`` (whose pruned entries are exactly zero, kept so by
    :func:`keep_pruned_at_zero`) instead of torch's hook computing ``weight_orig * weight_mask`` before every
    forward. Forward values are the hook's bit for bit, and so is every survivor after every step
    (``tests/test_training.py``). With ``mask_grads`` the gradient is masked in place as backward writes it;
    without (torch's element-wise optimisers, :data:`ELEMENTWISE_OPTIMIZERS`) pruned entries keep their
    gradient and optimiser state, which only they read, and are zeroed after the step like the rest.
    What it saves: the hook's multiply in forward and backward, and with Adam the zero second moments of
    pruned entries, whose square root is several times slower than a non-zero one on x86 CPUs. Measured on
    masked LeNet-300-100 against a plain dense loop (benchmarks/bench_masked_training.py, results/benchmarks.md):
    see the figures recorded there for SGD and Adam. Parameters under anything but one 0/1 torch prune
    method keep their hook. Hooks come back, in their order, when the block ends."""
    zero_pruned(model)  # pruned entries of *_orig zero now (the first step would make them so anyway)
    entries = []
    try:
        for module, name, orig, mask in pruned_parameters(model):
            hooks = module._forward_pre_hooks
            mine = [hid for hid, h in hooks.items()
                    if isinstance(h, prune.BasePruningMethod) and getattr(h, "_tensor_name", None) == name]
            if len(mine) != 1 or isinstance(hooks[mine[0]], prune.PruningContainer):
                continue
            order = list(hooks)
            hook = hooks.pop(mine[0])
            grad_hook = orig.register_post_accumulate_grad_hook(_mask_grad(mask)) if mask_grads else None
            entries.append((module, name, orig, mask, mine[0], hook, order, grad_hook))
            module.__dict__[name] = orig  # the attribute the hook would have set, without the product
        yield
    finally:
        for module, name, orig, mask, hid, hook, order, grad_hook in reversed(entries):
            if grad_hook is not None:
                grad_hook.remove()
            hooks = module._forward_pre_hooks
            hooks[hid] = hook
            rank = {h: i for i, h in enumerate(order)}
            for h in sorted(hooks, key=lambda k: rank.get(k, len(rank))):
                hooks.move_to_end(h)
            with torch.no_grad():
                setattr(module, name, orig * mask)


def _mask_grad(mask: Tensor):
    def hook(param: Tensor) -> None:
        param.grad.mul_(mask)

    return hook
