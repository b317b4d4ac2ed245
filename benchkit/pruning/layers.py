"""Which modules are prunable, and name/glob matching for exclusions and overrides."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

# Conv and Linear weights are "prunable" by default (DESIGN: compression_ratio counts these).
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class LayerSelectionError(ValueError):
    """An exclusion or override pattern that matches no prunable module."""


def _weight_param(module: nn.Module) -> object:
    """The tensor behind ``weight`` (``weight_orig`` once torch.nn.utils.prune holds a mask)."""
    return module._parameters.get("weight_orig", module._parameters.get("weight"))


def prunable_layers(model: nn.Module, types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES) -> dict[str, nn.Module]:
    """Prunable modules by qualified name, in definition order (the order every table uses). A weight
    shared by several modules (tied embeddings and output layers) is one layer, under its first name: it is
    counted and scored once and gets one mask (see :func:`tied_layers` for the other names)."""
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, m in model.named_modules(remove_duplicate=False):
        if not name or not isinstance(m, types):
            continue
        w = _weight_param(m)
        if w is None or id(w) in seen:
            continue
        seen.add(id(w))
        out[name] = m
    return out


def tied_layers(model: nn.Module, types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES) -> dict[str, list[str]]:
    """``{layer: [other module names sharing its weight]}`` for the prunable layers whose weight is tied."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if not name or not isinstance(m, types):
            continue
        w = _weight_param(m)
        if w is None:
            continue
        if id(w) in first:
            out.setdefault(first[id(w)], []).append(name)
        else:
            first[id(w)] = name
    return out


def match_layers(pattern: str, names: Iterable[str]) -> list[str]:
    """Names equal to ``pattern``, matching it as a glob (``classifier.*``, ``*.conv1``), or, for the
    name of a container module (``classifier``, ``layer4.1``), every prunable layer inside it."""
    names = list(names)
    if pattern in names:
        return [pattern]
    return [n for n in names if fnmatch.fnmatchcase(n, pattern) or n.startswith(pattern + ".")]


def resolve_patterns(patterns: Iterable[str], names: Iterable[str], what: str) -> list[str]:
    """Expand globs; a pattern matching nothing is an error naming the available layers."""
    names = list(names)
    out: list[str] = []
    for p in patterns:
        hit = match_layers(p, names)
        if not hit:
            raise LayerSelectionError(
                f"{what} {p!r} matches no prunable layer; prunable layers are: {', '.join(names)}"
            )
        out.extend(h for h in hit if h not in out)
    return out


def fused_attention(model: nn.Module) -> list[str]:
    """Names of ``nn.MultiheadAttention`` modules: their q/k/v projections live in one ``in_proj_weight``
    parameter that is no prunable layer, so pruning "every layer" would silently skip them."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]


def refuse_fused_attention(model: nn.Module) -> None:
    """Raise if the model holds ``nn.MultiheadAttention`` (see :func:`fused_attention`), naming the fix."""
    names = fused_attention(model)
    if names:
        raise LayerSelectionError(
            f"{type(model).__name__} has nn.MultiheadAttention at {', '.join(repr(n) or 'the root' for n in names)}: "
            "its q, k and v projections are one in_proj_weight parameter, not prunable layers, and would be "
            "silently left dense. Convert it first: benchkit.models.split_attention(model) gives the same outputs "
            "with separate q_proj/k_proj/v_proj/out_proj Linear layers (torchvision models built by benchkit by "
            "name are converted already)"
        )
