"""benchkit's own CPU kernel for sparse Linear layers: ``benchkit::csr_linear`` (``csr_linear.cpp``).

Why a kernel of our own: every CSR product torch offers computes ``W @ Xᵀ``, so a Linear layer built on
one pays two layout copies around it, and at 512x512 / batch 64 those copies alone bound any such layer
below the speedup a 98%-sparse weight should give (results/deploy/parts.md). This kernel reads ``x`` and
writes ``y`` row-major, transposing one block of samples at a time in cache, with the bias fused.

It is compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; 7-25 s on
this project's VM, once, then cached under ``~/.cache/torch_extensions`` by source and flags) for this machine's
CPU (``-march=native``; the extension's name carries a hash of the CPU's flags, so a home folder shared
by other CPUs gets its own build). Where it cannot be built, :func:`available` says why and the form is
reported as not measured; nothing else changes. A model saved by :meth:`Deployment.save` never needs
it: its layers are written as their ``csr`` twin (``F.embedding_bag``), which torch alone runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csr_linear.cpp")
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "op": the loaded operator, or "error": why it cannot be built
_FAKE: list = []  # the shape function is registered (once per process, whatever _STATE says)


def _cpu_tag() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def available() -> str | None:
    """``None`` when ``torch.ops.benchkit.csr_linear`` is ready (built or loaded now if needed), else why
    not. The answer is kept for the process."""
    with _LOCK:
        if "error" in _STATE:
            return str(_STATE["error"])
        if "op" in _STATE:
            return None
        try:
            from torch.utils.cpp_extension import load

            _ninja_on_path()
            load(name=f"benchkit_csr_linear_{_cpu_tag()}", sources=[str(SOURCE)], is_python_module=False,
                 extra_cflags=["-O3", "-march=native"], verbose=False)
            _register_fake()
        except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a failed build: the form is skipped
            text = str(err).strip().splitlines()
            _STATE["error"] = (f"benchkit's fused CSR kernel could not be built here ({type(err).__name__}: "
                               f"{text[0][:200] if text else ''}); it needs a C++ compiler and ninja")
            return str(_STATE["error"])
        _STATE["op"] = torch.ops.benchkit.csr_linear.default
        return None


def _ninja_on_path() -> None:
    """torch looks for ``ninja`` on PATH; the ``ninja`` wheel (a dependency) puts it in the environment's
    bin folder, which is not on PATH when Python is run as ``.venv/bin/python`` without activating."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _register_fake() -> None:
    """Shapes for torch.compile / torch.export tracing (the op itself runs only on real CPU tensors); once
    per process (torch refuses a second registration)."""
    if _FAKE:
        return
    _FAKE.append(True)

    @torch.library.register_fake("benchkit::csr_linear")
    def _(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
        return x.new_empty((x.shape[0], out_features))


def op():
    """``torch.ops.benchkit.csr_linear.default``: ``op(x, crow, col, values, bias, out_features)`` is
    ``x @ Wᵀ + bias`` for a CSR ``W`` (int32 ``crow``/``col``, fp32 ``values``), ``x`` 2-D fp32 on CPU.
    Built or loaded first when this process has not done so yet (a deployed model copied into another
    process, say)."""
    op = _STATE.get("op")
    if op is None:
        why = available()
        if why is not None:
            raise RuntimeError(f"{why}. A model saved with Deployment.save holds the csr twin of these layers, "
                               "which needs no build.")
        op = _STATE["op"]
    return op
