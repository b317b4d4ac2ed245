"""Transformer units that span layers: attention heads and MLP neurons, found by the model's structure.

A head is not one layer's rows: head ``h`` of an attention with head size ``d`` is rows
``h·d … h·d+d−1`` of ``q_proj``, ``k_proj`` and ``v_proj`` (weights and biases) and the same *columns*
of ``out_proj``. The engine prunes it as one group anchored on ``q_proj`` (:class:`Attention` gives the
stacked view ``[heads, d, in_q + in_k + in_v + out]`` whose rows are the heads, and maps kept heads back
to every member's mask). An MLP neuron is one row of the MLP's first Linear (``fc``): with it and its
bias gone, the second Linear's (``proj``) matching column only ever sees zero.

Structure, not class: an attention is any module with Linear children ``q_proj``, ``k_proj``, ``v_proj``
and ``out_proj`` and an integer head count (``n_head`` as benchkit's :class:`~benchkit.models.attention
.SelfAttention`, or ``num_heads`` as its ``SplitMultiheadAttention`` for torchvision's ViTs and as Hugging
Face's attention modules); an MLP is a module whose only parametrised children are two Linear layers
``width → hidden → width`` (benchkit's ``MLP``, torchvision's ``MLPBlock``). ``nn.MultiheadAttention``
keeps q/k/v in one parameter; :func:`benchkit.models.split_attention` converts it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

HEAD_COUNT_ATTRS = ("n_head", "num_heads")  # where attention modules keep their head count
STRUCTURES = ("attention", "mlp")  # what a granularity's ``structure`` may name


class StructureError(ValueError):
    """A structured granularity that does not apply to a model (no attention, no MLP, a partial exclusion)."""


@dataclass(frozen=True)
class Attention:
    """One attention module: its four projections (layer names), head count and head size."""

    name: str
    q: str
    k: str
    v: str
    out: str
    heads: int
    head_dim: int
    head_attr: str  # the module attribute holding the head count (updated when heads are removed)

    @property
    def layers(self) -> tuple[str, str, str, str]:
        return self.q, self.k, self.v, self.out

    @property
    def rows(self) -> tuple[str, str, str]:
        """The projections whose output rows are the heads (the fourth, ``out``, takes them as columns)."""
        return self.q, self.k, self.v

    def stack(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Per-weight tensors of the four projections (keyed by layer name, weight-shaped) as one
        ``[heads, head_dim, in_q + in_k + in_v + out_features]`` tensor: row ``h`` holds everything of head ``h``."""
        h, d = self.heads, self.head_dim
        parts = [tensors[n].reshape(h, d, -1) for n in self.rows]
        out = tensors[self.out]
        parts.append(out.reshape(out.shape[0], h, d).permute(1, 2, 0))
        return torch.cat(parts, dim=2)

    def unstack(self, stacked: Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
        """Inverse of :meth:`stack`: ``{layer: weight-shaped tensor}``."""
        widths = [shapes[n][1] for n in self.rows] + [shapes[self.out][0]]
        pieces = torch.split(stacked, widths, dim=2)
        out = {n: p.reshape(shapes[n]) for n, p in zip(self.rows, pieces)}
        out[self.out] = pieces[3].permute(2, 0, 1).reshape(shapes[self.out])
        return out

    def masks(self, stacked_alive: Tensor, shapes: Mapping[str, torch.Size], biases: Mapping[str, bool]
              ) -> dict[str, Tensor]:
        """Parameter masks from the stacked survivors: every member's weight, and the q/k/v bias entries of
        heads with no surviving weight (``out_proj``'s bias belongs to its outputs, not to a head)."""
        out = {f"{n}.weight": m for n, m in self.unstack(stacked_alive, shapes).items()}
        head_alive = stacked_alive.reshape(self.heads, -1).any(1)
        rows = head_alive.repeat_interleave(self.head_dim)
        for n in self.rows:
            if biases.get(n):
                out[f"{n}.bias"] = rows.clone()
        return out


@dataclass(frozen=True)
class MLP:
    """A two-layer MLP ``fc`` (width → hidden) then ``proj`` (hidden → width): a neuron is a row of ``fc``."""

    name: str
    fc: str
    proj: str


def _head_count(module: nn.Module) -> tuple[str, int] | None:
    for attr in HEAD_COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return attr, value
    return None


def _weight_shape(module: nn.Module) -> torch.Size:
    w = module._parameters.get("weight_orig", module._parameters.get("weight"))
    return w.shape


def attentions(model: nn.Module) -> list[Attention]:
    """Every attention module of ``model`` with separate q/k/v/out Linear projections (see the module docstring)."""
    found = []
    for name, module in model.named_modules():
        children = {c: getattr(module, c, None) for c in ("q_proj", "k_proj", "v_proj", "out_proj")}
        if not all(isinstance(c, nn.Linear) for c in children.values()):
            continue
        count = _head_count(module)
        if count is None:
            continue
        attr, heads = count
        q, k, v, o = (_weight_shape(children[c]) for c in ("q_proj", "k_proj", "v_proj", "out_proj"))
        width = q[0]
        if k[0] != width or v[0] != width or o[1] != width or width % heads:
            continue  # grouped-query or other layouts: not one head per q/k/v row block
        prefix = f"{name}." if name else ""
        found.append(Attention(name, *(prefix + c for c in ("q_proj", "k_proj", "v_proj", "out_proj")),
                               heads=heads, head_dim=width // heads, head_attr=attr))
    return found


def mlps(model: nn.Module) -> list[MLP]:
    """Every module whose parametrised children are exactly two Linear layers ``width → hidden → width``."""
    found = []
    for name, module in model.named_modules():
        children = list(module.named_children())
        linears = [(n, c) for n, c in children if isinstance(c, nn.Linear)]
        others = [c for _, c in children if not isinstance(c, nn.Linear)]
        if len(linears) != 2 or any(next(c.parameters(), None) is not None for c in others):
            continue
        (fc_name, fc), (proj_name, proj) = linears
        a, b = _weight_shape(fc), _weight_shape(proj)
        if a[0] != b[1] or a[1] != b[0]:
            continue
        prefix = f"{name}." if name else ""
        found.append(MLP(name, prefix + fc_name, prefix + proj_name))
    return found


@dataclass
class Units:
    """What a structured granularity prunes in one model: the scored ``anchors`` (q_proj of each attention,
    fc of each MLP), the ``coupled`` attentions by anchor, and every layer whose weights it masks (``members``)."""

    anchors: list[str]
    coupled: dict[str, Attention]
    members: list[str]

    def anchor_of(self) -> dict[str, str]:
        out = {a: a for a in self.anchors}
        for a, att in self.coupled.items():
            out.update({m: a for m in att.layers})
        return out


def find_units(model: nn.Module, structure: str) -> Units:
    """The units of ``structure`` (``attention`` | ``mlp``) in ``model``; :class:`StructureError` if none."""
    if structure == "attention":
        found = attentions(model)
        if not found:
            fused = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
            hint = (f" It has nn.MultiheadAttention at {', '.join(repr(n) for n in fused)}: convert it with "
                    "benchkit.models.split_attention(model) (torchvision models built by name are converted)."
                    if fused else "")
            raise StructureError(
                f"granularity 'head' prunes attention heads, and {type(model).__name__} has no attention module "
                f"(a module with q_proj/k_proj/v_proj/out_proj Linear layers and an n_head or num_heads count).{hint}")
        return Units([a.q for a in found], {a.q: a for a in found}, [n for a in found for n in a.layers])
    if structure == "mlp":
        found = mlps(model)
        if not found:
            raise StructureError(
                f"granularity 'neuron' prunes the hidden neurons of transformer MLPs, and {type(model).__name__} "
                "has none (a module whose only parametrised children are two Linear layers width -> hidden -> "
                "width); for any layer's output units use granularity 'channel'")
        return Units([m.fc for m in found], {}, [m.fc for m in found])
    raise ValueError(f"unknown structure {structure!r}; allowed: attention, mlp")


def restrict(units: Units, names: list[str], what: str, granularity: str) -> list[str]:
    """Layer names (already resolved from ``prune.exclude`` or overrides) as anchors: a pattern naming the
    attention (``blocks.0.attn``) or all four of its projections names its heads; naming some of them only
    is refused, since a head spans all four. Layers outside the units are dropped (they are not pruned)."""
    chosen = set(names)
    out = []
    for a in units.anchors:
        att = units.coupled.get(a)
        members = att.layers if att is not None else (a,)
        hit = [m for m in members if m in chosen]
        if hit and len(hit) != len(members):
            raise StructureError(
                f"{what} names {', '.join(hit)} but not {', '.join(m for m in members if m not in hit)}: under "
                f"granularity {granularity!r} one unit spans {', '.join(members)}; name the attention "
                f"({att.name!r}) or none of its projections")
        if hit:
            out.append(a)
    return out
