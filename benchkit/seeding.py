"""Reproducibility: one call seeds every random number generator a run touches, and one helper
turns the config's ``device`` string into a ``torch.device``.

Same config + seed → same masks and metrics is a product promise, so :func:`seed_everything` is
called before the model is built (the initial weights are part of the run's seed) and data order
comes from a generator seeded separately in :mod:`benchkit.data`.
"""

from __future__ import annotations

import os
import random
import re

import numpy as np
import torch

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device).

    ``deterministic`` also asks torch for deterministic kernels (cuDNN included). ``warn_only``
    keeps ops without a deterministic implementation usable: they warn instead of failing a run.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before the first matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.deterministic = False
        torch.use_deterministic_algorithms(False)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; explicit names are checked up front
    so a run asking for a missing GPU fails before any work, not in the middle of training."""
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if not _DEVICE_PATTERN.match(name):
        raise ValueError(f"device {device!r} is not valid; allowed: auto, cpu, cuda, cuda:N, mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use device: auto or cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available; use device: auto or cpu")
    return torch.device(name)


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator with its own stream, so data order does not depend on how many random
    numbers model construction happened to draw."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g
