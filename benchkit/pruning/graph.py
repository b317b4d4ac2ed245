"""Which BatchNorm directly follows each conv/linear layer, so channel pruning can silence it too.

Killing output channel o of a conv zeroes its pre-BN activation, but BatchNorm then adds
``beta - gamma * mean / std``: the channel is only dead if gamma[o] and beta[o] are masked as well.

We read the dataflow with ``torch.fx``. When the whole model cannot be traced (data-dependent control
flow) we trace, instead, the sub-module that directly contains each layer (a ResNet block, a VGG
``features``), and for an untraceable ``nn.Sequential`` we use its order, which *is* its dataflow. We never
pair by mere definition order: masking the wrong BatchNorm would damage a live channel, while missing
one only leaves a dead channel's BN offset in place — so a layer we cannot place gets no BN mask.
"""

from __future__ import annotations

import warnings

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm


def out_features(module: nn.Module) -> int:
    return module.weight.shape[0]


def _fx_followers(model: nn.Module, names: list[str]) -> dict[str, str]:
    graph = fx.symbolic_trace(model).graph
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    out = {}
    for name in names:
        nodes = calls.get(name, [])
        if len(nodes) != 1:  # called never or several times: no single "following" BN
            continue
        layer = model.get_submodule(name)
        bns = []
        for user in nodes[0].users:
            if user.op != "call_module" or user.args[:1] != (nodes[0],):
                continue
            mod = model.get_submodule(str(user.target))
            if isinstance(mod, _BatchNorm) and len(calls[str(user.target)]) == 1:
                if mod.num_features == out_features(layer):
                    bns.append(str(user.target))
        if len(bns) == 1:
            out[name] = bns[0]
    return out


def _sequential_followers(seq: nn.Sequential, prefix: str, names: list[str]) -> dict[str, str]:
    children = list(seq.named_children())
    out = {}
    for (n, m), (nxt_name, nxt) in zip(children, children[1:]):
        full = f"{prefix}{n}"
        if full in names and isinstance(nxt, _BatchNorm) and nxt.num_features == out_features(m):
            out[full] = f"{prefix}{nxt_name}"
    return out


def _local_followers(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Per-parent fallback: trace (or read the order of) each module that directly holds a layer."""
    by_parent: dict[str, list[str]] = {}
    for n in names:
        by_parent.setdefault(n.rpartition(".")[0], []).append(n)
    out = {}
    for parent_name, members in by_parent.items():
        parent = model.get_submodule(parent_name) if parent_name else model
        prefix = f"{parent_name}." if parent_name else ""
        local = [m[len(prefix) :] for m in members]
        try:
            found = _fx_followers(parent, local)
            out.update({prefix + k: prefix + v for k, v in found.items()})
        except Exception:  # noqa: BLE001
            if isinstance(parent, nn.Sequential):
                out.update(_sequential_followers(parent, prefix, members))
    return out


def following_batchnorm(model: nn.Module, names: list[str]) -> dict[str, str]:
    """``{layer name: name of the BatchNorm fed directly by that layer}`` for the given layers."""
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return {}
    try:
        return _fx_followers(model, names)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "use the fallback"
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {e}); pairing layers with "
            "BatchNorms inside each traceable sub-module / nn.Sequential instead (layers outside them get no "
            "BatchNorm mask)",
            stacklevel=3,
        )
        return _local_followers(model, names)
