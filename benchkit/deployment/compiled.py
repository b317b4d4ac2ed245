"""The whole-model compile step of :func:`benchkit.deployment.core.deploy` (``compile=True``).

Why: a pruned model is small, and a small model in eager PyTorch spends much of its time between
kernels (one dispatch per op, pooling and activations as separate passes over memory), time that the
FLOP theory does not count. ``torch.compile`` (Inductor) fuses those ops into generated C++ loops.
On this project's CPU it took LeNet-5's dense model from 6.2 to 2.5 ms at batch 64 and its 2x
channel-compacted one from 3.0 to 1.0 ms (results/deploy/bench.md).

Honesty: a compiled pruned model is compared with the *compiled dense* model too, never only with
eager dense, so a speedup that compilation alone gives is not credited to pruning
(:attr:`benchkit.deployment.core.Deployment.measured_speedup` divides by the fastest dense runtime).
Each compiled variant is kept only when measured faster, and its outputs are checked like a form's.

Limits, stated: Inductor needs a C++ compiler on CPU (``g++``/``clang``; the variant is then reported
not measured, with the compiler's error); the generated code is specialised to the input shapes and to
the thread count it was compiled under (deploy compiles under its ``threads``); saving writes the
uncompiled module (``torch.export``), which the user compiles again after loading.

A trap this module guards against: every module compiled with ``nn.Module.compile`` shares one code
object in torch's cache, which holds 8 entries by default (``torch._dynamo.config.recompile_limit``); past
it, torch *silently* runs the module eagerly (a logged warning), and a "compiled" timing would be an eager
one. So the first call is made with ``fail_on_recompile_limit_hit`` (the variant is then reported not
measured) and a limit of :data:`RECOMPILE_LIMIT` (deploy compiles up to 16 variants of one model: 4 kinds,
each also channels-last, and each of those with fused convolution stages), and deploy clears torch's
compile caches (:func:`fresh_cache`) before compiling its variants: a process that deploys many models
(the benchmark deploys 30) compiles each of them for real.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from benchkit.latency import num_threads
from benchkit.pruning.masks import deepcopy_model

SUFFIX = "_compiled"  # a compiled variant's name is the eager variant's plus this
RECOMPILE_LIMIT = 32  # compilations of one code object (one model class's forward) between fresh_cache() calls


@torch.no_grad()
def compile_copy(model: nn.Module, xs: tuple[Tensor, ...], threads: int | None) -> tuple[nn.Module | None, str]:
    """``(compiled copy of model, "")`` after one call on ``xs`` (the compilation), or ``(None, why)``.

    ``nn.Module.compile`` (static shapes) on a deep copy, so the eager model stays as it is; compiled
    under ``threads`` because Inductor's CPU kernels keep the thread count they were generated for."""
    compiled = deepcopy_model(model).eval()
    try:
        with num_threads(threads), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True,
                                                               recompile_limit=RECOMPILE_LIMIT):
            compiled.compile(dynamic=False)
            compiled(*xs)
    except Exception as err:  # noqa: BLE001 - no compiler, an unsupported op: the eager model stays
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return None, f"torch.compile failed: {type(err).__name__}: {first[:300]}"
    return compiled, ""


def fresh_cache() -> None:
    """``torch.compiler.reset()``: room for the next compilations in torch's per-code-object cache. Modules
    compiled earlier in this process keep working; each recompiles on its next call."""
    torch.compiler.reset()


def eager_name(variant: str) -> str:
    """``deployed_compiled`` -> ``deployed``; an eager variant's name is its own."""
    return variant.removesuffix(SUFFIX)
