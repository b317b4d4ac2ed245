"""Saving a deployed model so that torch alone loads it back (no benchkit, no model class).

* ``.pt2``: a ``torch.export`` archive, ``torch.export.load(path).module()``; the batch dimension is
  exported dynamic when the model allows it. Every form whose buffers are dense tensors exports
  (dense, compacted, ``csr``).
* ``.ts``: TorchScript (``torch.jit.trace``), ``torch.jit.load(path)``, used only when a chosen form
  holds torch.sparse tensors, which ``torch.export`` refuses in torch 2.14 (``torch_csr``,
  ``torch_bsr*``). TorchScript is deprecated upstream; it is the one format that runs them.

The file is read back and its outputs compared with the model's before the path is returned.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from benchkit.deployment.compact import _flatten_outputs, _max_abs_diff
from benchkit.latency import with_batch_size


class SaveError(RuntimeError):
    """No format could write the model (each format's reason is in the message)."""


@dataclass(frozen=True)
class Saved:
    path: Path
    format: str  # "torch.export" | "torchscript"
    dynamic_batch: bool
    note: str = ""

    def load(self) -> nn.Module:
        return load_deployed(self.path)


def load_deployed(path: str | Path) -> nn.Module:
    """``torch.export.load(path).module()`` for ``.pt2``, ``torch.jit.load(path)`` for ``.ts``: torch only."""
    path = Path(path)
    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module()
    if path.suffix == ".ts":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
            return torch.jit.load(str(path))
    raise ValueError(f"{path}: expected a .pt2 (torch.export) or .ts (TorchScript) file")


def _export(model: nn.Module, xs: tuple[Tensor, ...], path: Path) -> bool:
    """torch.export with a dynamic batch dimension, else static shapes; returns whether dynamic."""
    batch = torch.export.Dim("batch")
    try:
        ep = torch.export.export(model, xs, dynamic_shapes=tuple({0: batch} for _ in xs))
        dynamic = True
    except Exception:  # noqa: BLE001 - the model specialises on its batch size: export it static
        ep = torch.export.export(model, xs)
        dynamic = False
    torch.export.save(ep, str(path))
    return dynamic


def _script(model: nn.Module, xs: tuple[Tensor, ...], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer notices
        traced = torch.jit.trace(model, xs, check_trace=False)
        torch.jit.save(traced, str(path))


def save_deployed(model: nn.Module, path: str | Path, example_inputs: tuple[Tensor, ...], *,
                  exportable: bool = True, tolerance: float = 1e-5) -> Saved:
    """Write ``model`` to ``path`` (its suffix is set to ``.pt2`` or ``.ts`` by the format used) and
    check that the file, loaded with torch alone, gives the model's outputs within ``tolerance`` on a
    batch of a different size than the one it was traced with (when the batch is dynamic)."""
    model = model.eval()
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    xs = tuple(t.to(device) for t in with_batch_size(example_inputs, 2))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reasons = []
    if exportable:
        target = path.with_suffix(".pt2")
        try:
            dynamic = _export(model, xs, target)
            saved = Saved(target, "torch.export", dynamic)
        except Exception as err:  # noqa: BLE001 - fall back to TorchScript, keep the reason
            reasons.append(f"torch.export: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            saved = None
    else:
        reasons.append("torch.export: a chosen form holds torch.sparse tensors, which torch.export refuses")
        saved = None
    if saved is None:
        target = path.with_suffix(".ts")
        try:
            _script(model, xs, target)
            saved = Saved(target, "torchscript", True, note="; ".join(reasons))
        except Exception as err:  # noqa: BLE001
            reasons.append(f"TorchScript: {type(err).__name__}: {err}")
            raise SaveError("the deployed model could not be saved: " + "; ".join(reasons)) from err
    check = tuple(t.to(device) for t in with_batch_size(example_inputs, 3 if saved.dynamic_batch else 2))
    with torch.no_grad():
        reference = _flatten_outputs(model(*check))
    diff = _max_abs_diff(reference, load_deployed(saved.path), check)  # inf when shapes differ
    if not diff <= tolerance:
        raise SaveError(f"{saved.path} loads back with outputs {diff:.3g} away from the model's (allowed {tolerance:.3g})")
    return saved
