"""Model sizes in the formats people ship, measured from files written to disk.

Every format is a ``torch.save`` archive of named tensors (loadable with ``torch.load`` alone; the
layout is documented here). Two figures per file: ``file_bytes`` (its size on disk, zip headers,
pickle and 64-byte storage alignment included) and ``payload_bytes`` (the tensor storages inside it,
read from the archive's ``data/`` entries: the count a format's definition predicts).

* ``dense_fp32``: every parameter and buffer, masks folded in, ``*_mask`` bookkeeping dropped;
* ``sparse_csr``: each prunable weight as ``<name>.crow_indices`` (int32, rows + 1), ``.col_indices``
  (int32, nnz) and ``.values`` (fp32, nnz) of its ``[out, in·k…]`` matrix; the rest as in dense;
* ``sparse_bitmask``: each prunable weight as ``<name>.bitmask`` (one bit per element, packed
  big-endian into uint8: ``ceil(numel / 8)`` bytes) and ``.values`` (fp32, nnz, row-major order);
* ``n_m`` (e.g. 2:4): each prunable weight with at most N non-zeros in every M consecutive weights
  along its input dimension (per kernel position, as benchkit's N:M granularity groups them) as
  ``.values`` (exactly N fp32 per group, zero-padded) and ``.indices`` (each value's position in its
  group, ``ceil(log2 M)`` bits, packed: 2:4 gives ``numel / 8`` bytes, NVIDIA's metadata density);
  weights that are not N:M stay dense;
* ``compacted_fp32``: the dense format of the channel-compacted model (only when channels are dead).
"""

from __future__ import annotations

import math
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from benchkit.metrics import effective
from benchkit.pruning.layers import prunable_layers
from benchkit.pruning.masks import deepcopy_model, make_permanent


@dataclass(frozen=True)
class FileSize:
    format: str
    path: Path
    file_bytes: int
    payload_bytes: int


def payload_bytes(path: str | Path) -> int:
    """Bytes of tensor storage inside a ``torch.save`` archive (its ``data/`` entries)."""
    with zipfile.ZipFile(path) as z:
        return sum(i.file_size for i in z.infolist() if "/data/" in i.filename and not i.filename.endswith("/"))


def _write(tensors: Mapping[str, Tensor], path: Path, fmt: str) -> FileSize:
    # clone: a view would drag its whole base storage into the file
    torch.save({k: v.detach().cpu().clone() for k, v in tensors.items()}, path)
    return FileSize(fmt, path, path.stat().st_size, payload_bytes(path))


def plain_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers under their plain names, masks folded in, mask buffers dropped."""
    net = make_permanent(deepcopy_model(model))
    return {k: v for k, v in net.state_dict().items() if not k.endswith("_mask")}


def _prunable_weights(model: nn.Module) -> dict[str, Tensor]:
    return {f"{name}.weight" if name else "weight": effective(m) for name, m in prunable_layers(model).items()}


def csr_tensors(weight: Tensor) -> dict[str, Tensor]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = weight.reshape(weight.shape[0], -1).to_sparse_csr()
    return {"crow_indices": csr.crow_indices().to(torch.int32), "col_indices": csr.col_indices().to(torch.int32),
            "values": csr.values()}


def bitmask_tensors(weight: Tensor) -> dict[str, Tensor]:
    flat = weight.reshape(-1)
    bits = np.packbits(flat.ne(0).numpy().astype(np.uint8))
    return {"bitmask": torch.from_numpy(bits), "values": flat[flat.ne(0)]}


def _nm_groups(weight: Tensor, m: int) -> Tensor | None:
    """The weight as ``[groups, m]`` rows along its input dimension (per kernel position), or None."""
    w = weight.movedim(1, -1) if weight.dim() > 2 else weight  # [out, *k, in]
    if w.shape[-1] % m:
        return None
    return w.reshape(-1, m)


def nm_tensors(weight: Tensor, n: int, m: int) -> dict[str, Tensor] | None:
    """``values`` (N per group) and packed ``indices`` of an N:M weight, or None if it is not N:M."""
    groups = _nm_groups(weight, m)
    if groups is None or bool((groups.ne(0).sum(1) > n).any()):
        return None
    # the N positions kept per group: non-zeros first (stable, in order), padded with zero positions
    order = torch.argsort(groups.eq(0).to(torch.int8), dim=1, stable=True)[:, :n]
    idx, _ = torch.sort(order, dim=1)
    values = torch.gather(groups, 1, idx)
    bits_per = max(1, math.ceil(math.log2(m)))
    shifts = torch.arange(bits_per - 1, -1, -1)
    bits = (idx.reshape(-1, 1) >> shifts) & 1  # big-endian bits of each index
    packed = np.packbits(bits.reshape(-1).numpy().astype(np.uint8))
    return {"values": values.reshape(-1), "indices": torch.from_numpy(packed)}


def _with_weights(model: nn.Module, encode) -> dict[str, Tensor]:
    tensors = plain_tensors(model)
    for key, w in _prunable_weights(model).items():
        parts = encode(w)
        if parts is None:
            continue
        del tensors[key]
        tensors.update({f"{key}.{k}": v for k, v in parts.items()})
    return tensors


def write_formats(model: nn.Module, folder: str | Path, *, nm: tuple[int, int] = (2, 4),
                  compacted: nn.Module | None = None) -> dict[str, FileSize]:
    """Write ``model`` in every format of the module docstring into ``folder``; return their sizes.
    ``n_m`` is written only if some prunable weight is N:M; ``compacted_fp32`` only with ``compacted``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, m = nm
    if not 0 < n < m:
        raise ValueError(f"nm must be (N, M) with 0 < N < M, got {nm}")
    out = {
        "dense_fp32": _write(plain_tensors(model), folder / "dense_fp32.pt", "dense_fp32"),
        "sparse_csr": _write(_with_weights(model, csr_tensors), folder / "sparse_csr.pt", "sparse_csr"),
        "sparse_bitmask": _write(_with_weights(model, bitmask_tensors), folder / "sparse_bitmask.pt",
                                 "sparse_bitmask"),
    }
    if any(nm_tensors(w, n, m) is not None for w in _prunable_weights(model).values()):
        name = f"n_m_{n}_{m}"
        out["n_m"] = _write(_with_weights(model, lambda w: nm_tensors(w, n, m)), folder / f"{name}.pt", name)
    if compacted is not None:
        out["compacted_fp32"] = _write(plain_tensors(compacted), folder / "compacted_fp32.pt", "compacted_fp32")
    return out


def size_metrics(sizes: Mapping[str, FileSize]) -> dict[str, int]:
    """Flat ``size_file_<format>`` / ``size_payload_<format>`` figures for tracking."""
    out: dict[str, int] = {}
    for key, s in sizes.items():
        out[f"size_file_{key}"] = s.file_bytes
        out[f"size_payload_{key}"] = s.payload_bytes
    return out
