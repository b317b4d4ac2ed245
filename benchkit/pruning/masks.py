"""Masks live in ``torch.nn.utils.prune`` (``<param>_orig`` + ``<param>_mask``) so pruned models work
with PyTorch's own tooling. Masks are keyed by parameter path, e.g. ``"features.0.weight"``.

Pruned entries of ``<param>_orig`` are zeroed when a mask is applied: the forward pass already
multiplies by the mask, and with the stored value at exactly zero neither momentum nor weight decay
(nor Adam) can move it, so the model stays sparse through any amount of training.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import prune


def resolve(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """``"features.0.weight"`` → (the ``features.0`` module, ``"weight"``)."""
    mod_name, _, pname = path.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    return module, pname


def is_masked(module: nn.Module, pname: str = "weight") -> bool:
    return hasattr(module, f"{pname}_mask") and hasattr(module, f"{pname}_orig")


def param_value(module: nn.Module, pname: str = "weight") -> Tensor:
    """The trainable tensor behind a (possibly masked) parameter: ``<p>_orig`` if masked, else ``<p>``."""
    return getattr(module, f"{pname}_orig") if is_masked(module, pname) else getattr(module, pname)


def current_mask(module: nn.Module, pname: str = "weight") -> Tensor | None:
    return getattr(module, f"{pname}_mask").bool() if is_masked(module, pname) else None


def _custom_from_mask(module: nn.Module, pname: str, orig: Tensor, mask: Tensor) -> None:
    """Exactly the reparametrisation ``prune.custom_from_mask`` leaves (``<p>_orig`` parameter, float
    ``<p>_mask`` buffer, ``CustomFromMask`` pre-hook), without its model-sized temporaries (a ones
    tensor, a float-mask product, a masked copy we would overwrite): on VGG-16 this is most of the
    cost of holding masks (benchmarks/bench_global_magnitude.py)."""
    method = prune.CustomFromMask(mask)
    method._tensor_name = pname
    module.register_parameter(f"{pname}_orig", orig)
    del module._parameters[pname]
    module.register_buffer(f"{pname}_mask", mask.to(dtype=orig.dtype))
    module.register_forward_pre_hook(method)


def _target(model: nn.Module, path: str, mask: Tensor) -> tuple[nn.Module, str, Tensor, Tensor]:
    """The module, parameter name, trainable tensor and the mask as a bool tensor laid out like it."""
    module, pname = resolve(model, path)
    orig = param_value(module, pname)
    mask = mask.to(device=orig.device, dtype=torch.bool)
    if mask.shape != orig.shape:
        raise ValueError(f"mask for {path} has shape {tuple(mask.shape)}, parameter has {tuple(orig.shape)}")
    if mask.stride() != orig.stride():
        # a mask built through a permuted view (N:M groups run along the input channels) would
        # hand its layout to weight = orig * mask: a channels-last conv weight that changes which
        # kernel runs and its speed (LeNet-5 conv2: 22% faster on CPU), which is not sparsity
        mask = torch.empty_like(orig, dtype=torch.bool).copy_(mask)
    return module, pname, orig, mask


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Apply boolean masks (True = keep). An existing mask is intersected with the new one, in place,
    so repeated pruning never builds chains of hooks and always compounds."""
    for path, mask in masks.items():
        module, pname, orig, mask = _target(model, path, mask)
        if is_masked(module, pname):
            buf = getattr(module, f"{pname}_mask")
            buf.copy_(buf.bool() & mask)
        else:
            _custom_from_mask(module, pname, orig, mask)
        buf = getattr(module, f"{pname}_mask")
        orig.mul_(buf)
        setattr(module, pname, orig * buf)  # keep the attribute current before the next forward


@torch.no_grad()
def set_masks(model: nn.Module, masks: Mapping[str, Tensor], regrow_value: float = 0.0) -> dict[str, Tensor]:
    """Replace masks (True = keep) instead of intersecting them: entries pruned until now and kept by the new
    mask come back, with ``weight_orig`` set to ``regrow_value`` (0 by default, as RigL and SET regrow);
    newly pruned entries are zeroed. Returns, per path, the entries that came back (for
    :func:`reset_optimizer_state`). Pruned entries stay exactly zero between updates as before."""
    regrown: dict[str, Tensor] = {}
    for path, mask in masks.items():
        module, pname, orig, mask = _target(model, path, mask)
        if not is_masked(module, pname):
            apply_masks(model, {path: mask})
            regrown[path] = torch.zeros_like(mask)
            continue
        buf = getattr(module, f"{pname}_mask")
        back = mask & ~buf.bool()
        orig.masked_fill_(back, regrow_value)
        buf.copy_(mask)
        orig.mul_(buf)
        setattr(module, pname, orig * buf)
        regrown[path] = back
    return regrown


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, entries: Mapping[str, Tensor]) -> None:
    """Zero the optimiser's per-weight state (momentum, Adam moments, ...) at ``entries`` (True = reset) of
    the parameters named by their paths, so regrown weights start fresh as in RigL. Scalar state (Adam's step
    count) is per tensor and left alone."""
    for path, where in entries.items():
        module, pname = resolve(model, path)
        param = param_value(module, pname)
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.masked_fill_(where.to(value.device), 0)


def get_masks(model: nn.Module) -> dict[str, Tensor]:
    """All masks of the model as boolean tensors, keyed by parameter path."""
    out = {}
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            for h in getattr(hook, "_pruning_methods", [hook]):
                pname = getattr(h, "_tensor_name", None)
                if pname and is_masked(module, pname):
                    out[f"{name}.{pname}" if name else pname] = getattr(module, f"{pname}_mask").bool().clone()
    return out


def masked_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    return [(p.rpartition(".")[0], *resolve(model, p)) for p in get_masks(model)]


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold masks into the weights (``prune.remove``): plain parameters with zeros, no hooks."""
    for _, module, pname in masked_modules(model):
        prune.remove(module, pname)
    return model


@torch.no_grad()
def release(model: nn.Module, reinit: Callable[[str, Tensor], Tensor] | None = None) -> nn.Module:
    """Un-prune: optionally give pruned entries fresh values from ``reinit(path, like)``, then drop the
    masks so the whole network trains again."""
    for path, mask in get_masks(model).items():
        module, pname = resolve(model, path)
        prune.remove(module, pname)  # first: remove() writes orig * mask, which would zero fresh values
        if reinit is not None:
            value = getattr(module, pname)
            value.copy_(torch.where(mask, value, reinit(path, value).to(value)))
    return model


@torch.no_grad()
def load_weights(model: nn.Module, state: Mapping[str, Tensor], keep_masks: bool = True) -> None:
    """Load plain weights (keys like ``fc1.weight``) into a possibly masked model, keeping its masks:
    masked parameters receive ``value * mask``. This is how lottery tickets rewind."""
    for name, module in model.named_modules():
        for pname, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            base = pname[: -len("_orig")] if pname.endswith("_orig") else pname
            if pname.endswith("_mask"):
                continue
            key = f"{name}.{base}" if name else base
            if key not in state:
                continue
            target = getattr(module, pname)
            value = state[key].to(target)
            if pname.endswith("_orig") and keep_masks:
                value = value * getattr(module, f"{base}_mask")
                setattr(module, base, value.clone())
            target.copy_(value)


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The effective weights (mask applied) under their plain names, cloned."""
    out = {}
    masks = get_masks(model)
    for key, value in model.state_dict().items():
        if key.endswith("_mask"):
            continue
        if key.endswith("_orig"):
            base = key[: -len("_orig")]
            out[base] = (value * masks[base]).clone()
        else:
            out[key] = value.clone()
    return out


def load_pruned_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """Load a state dict saved from a pruned model into a fresh (unpruned) one: masks are re-created
    from the ``*_mask`` entries first, so the round trip restores masks and weights exactly."""
    masks = {k[: -len("_mask")]: v.bool() for k, v in state.items() if k.endswith("_mask")}
    apply_masks(model, masks)
    model.load_state_dict(dict(state))
    for path in masks:  # refresh the computed attribute
        module, pname = resolve(model, path)
        setattr(module, pname, getattr(module, f"{pname}_orig") * getattr(module, f"{pname}_mask"))
    return model


def deepcopy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on a pruned model after a forward pass with autograd on.

    The ``torch.nn.utils.prune`` pre-hook leaves ``module.weight = weight_orig * weight_mask`` as a
    non-leaf tensor, which ``deepcopy`` refuses. Those attributes are swapped for detached values
    while copying and put back afterwards, so the caller's model is left exactly as it was."""
    swapped = []
    for _, module, pname in masked_modules(model):
        value = getattr(module, pname, None)
        if isinstance(value, Tensor) and not value.is_leaf:
            swapped.append((module, pname, value))
            setattr(module, pname, value.detach())
    try:
        return copy.deepcopy(model)
    finally:
        for module, pname, value in swapped:
            setattr(module, pname, value)
