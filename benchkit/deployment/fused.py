"""benchkit's own CPU kernels: ``benchkit::csr_linear`` for sparse Linear layers (``csr_linear.cpp``) and
``benchkit::conv_stage`` for a convolution with the ReLU and 2x2 max-pool after it (``conv_stage.cpp``,
used by :mod:`benchkit.deployment.stages`; why it exists is in that file's header).

Why a CSR kernel of our own: every CSR product torch offers computes ``W @ Xᵀ``, so a Linear layer built on
one pays two layout copies around it, and at 512x512 / batch 64 those copies alone bound any such layer
below the speedup a 98%-sparse weight should give (results/deploy/parts.md). This kernel reads ``x`` and
writes ``y`` row-major, transposing one block of samples at a time in cache, with the bias fused.

Both are compiled on first use, as one extension, with ``torch.utils.cpp_extension`` (a C++ compiler and
ninja; 7-25 s on this project's VM, once, then cached under ``~/.cache/torch_extensions`` by source and
flags) for this machine's CPU (``-march=native``; the extension's name carries a hash of the CPU's flags,
so a home folder shared by other CPUs gets its own build, and of the sources and header). Where they
cannot be built, :func:`available` says why and the forms and stages that need them are
reported as not measured; nothing else changes. A model saved by :meth:`Deployment.save` never needs
them: its layers are written as their torch-only twins (``portable()``: the ``csr`` form, which runs on
``F.embedding_bag``; a convolution, ReLU and max-pool), which torch alone runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import torch
from torch import Tensor

SOURCES = [Path(__file__).with_name(f) for f in ("csr_linear.cpp", "conv_stage.cpp")]
HEADERS = [Path(__file__).with_name("simd.h")]  # not in torch's own source hash: in the name's
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "ops": the loaded operators by name, or "error": why they cannot be built
_FAKE: list = []  # the shape function is registered (once per process, whatever _STATE says)


def _cpu_tag() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _source_tag() -> str:
    """A hash of the kernels' sources and header: torch rebuilds an extension when a source changes, but
    not when only a header it includes does."""
    return hashlib.sha1(b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:8]


def available() -> str | None:
    """``None`` when benchkit's operators are ready (built or loaded now if needed), else why not. The answer
    is kept for the process."""
    with _LOCK:
        if "error" in _STATE:
            return str(_STATE["error"])
        if "ops" in _STATE:
            return None
        try:
            from torch.utils.cpp_extension import load

            _ninja_on_path()
            load(name=f"benchkit_kernels_{_cpu_tag()}_{_source_tag()}", sources=[str(p) for p in SOURCES],
                 is_python_module=False,
                 extra_cflags=["-O3", "-march=native"], verbose=False)
            _register_fake()
        except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a failed build: the form is skipped
            text = str(err).strip().splitlines()
            _STATE["error"] = (f"benchkit's kernels could not be built here ({type(err).__name__}: "
                               f"{text[0][:200] if text else ''}); they need a C++ compiler and ninja")
            return str(_STATE["error"])
        _STATE["ops"] = {"csr_linear": torch.ops.benchkit.csr_linear.default,
                          "conv_stage": torch.ops.benchkit.conv_stage.default}
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

    @torch.library.register_fake("benchkit::conv_stage")
    def _(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, pad_h: int, pad_w: int, relu: bool, pool: int,
          channels_last: bool) -> Tensor:
        rows = ((x.shape[2] + 2 * pad_h - weight.shape[2]) // stride + 1) // pool
        cols = ((x.shape[3] + 2 * pad_w - weight.shape[3]) // stride + 1) // pool
        y = x.new_empty((x.shape[0], weight.shape[0], rows, cols))
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def op(name: str = "csr_linear"):
    """``torch.ops.benchkit.<name>.default``, built or loaded first when this process has not done so yet
    (a deployed model copied into another process, say):

    * ``csr_linear(x, crow, col, values, bias, out_features)`` is ``x @ Wᵀ + bias`` for a CSR ``W`` (int32
      ``crow``/``col``, fp32 ``values``), ``x`` 2-D fp32 on CPU;
    * ``conv_stage(x, weight, bias, stride, pad_h, pad_w, relu, pool, channels_last)`` is ``conv2d(x, weight,
      bias, stride, padding)``, ReLU'd when ``relu``, max-pooled 2x2 when ``pool`` is 2 (1: no pool), in
      channels-last layout when ``channels_last``; ``x`` fp32 on CPU, NCHW or channels-last."""
    ops = _STATE.get("ops")
    if ops is None:
        why = available()
        if why is not None:
            raise RuntimeError(f"{why}. A model saved with Deployment.save holds torch-only twins of these layers, "
                               "which need no build.")
        ops = _STATE["ops"]
    return ops[name]
