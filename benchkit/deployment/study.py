"""Theory versus practice, per granularity and kernel: the study behind ``experiments/deploy_study.py``.

For each registered model (:data:`STUDY_MODELS`), granularity (element, N:M, kernel, channel, and for
transformers attention heads and MLP neurons) and sparsity (50-98%), the model is pruned layer-wise
(magnitude; the classifier is left out of channel pruning, and of N:M where M does not divide its inputs)
and deployed at each batch size with every kernel measured on every layer (``max_density=1``). A
granularity a model has no units of (heads in a CNN), or a sparsity its units cannot reach (90% of 4 heads
keeping one per attention), gives no row. One row per configuration holds:

* ``theoretical_shrinkbench`` (dense / non-zero FLOPs) and, for channel pruning, ``theoretical_compacted``;
* ``measured_deployed``: whole model, dense / what :func:`~benchkit.deployment.core.deploy` kept;
* ``layers_<kernel>``: sum of the prunable layers' dense times / sum of their times in that kernel
  (a layer the kernel cannot take counts as dense; NaN when it takes none): the kernel's own speed,
  choice aside; ``coverage_<kernel>``: the share of the dense time in layers it takes.

:func:`break_even` then gives, per model, granularity, batch and kernel, the lowest sparsity at which
the kernel's layers run at least as fast as dense (linear interpolation between measured sparsities).

Adding a model is one registration, as the character language model of the transformer studies
(``charlm``: experiments/lm_pruning.yaml's GPT, random weights, batches of 128 token ids) is:

    STUDY_MODELS.register("charlm", _language_model())

after which ``--models charlm`` runs it (granularities that do not apply to its layers are skipped).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from benchkit.config import ModelConfig
from benchkit.deployment.core import deploy
from benchkit.metrics import model_metrics
from benchkit.pruning.granularity import GranularityError, get_granularity
from benchkit.pruning.layers import prunable_layers
from benchkit.pruning.selection import CompressionError
from benchkit.pruning.units import StructureError, find_units
from benchkit.registry import Registry

KERNELS = ("csr", "fused_csr", "torch_csr", "torch_bsr8")
#: on a GPU: NVIDIA's 2:4 sparse tensor cores and cuSPARSE CSR. Opt in with ``kernels=``: the
#: embedding-bag CSR (an FBGEMM CPU kernel; on an H200 1.3-50x slower than dense wherever measured,
#: results/deploy/gpu) and BSR (torch's Triton kernels compile per shape)
CUDA_KERNELS = ("semi_structured", "torch_csr")
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
NM = ("2:4", "1:4", "1:8", "1:16")  # 50%, 75%, 87.5%, 93.75%
GRANULARITIES = ("element", "n:m", "kernel", "channel", "head", "neuron")
BATCHES = (1, 64)


@dataclass
class StudyModel:
    """A fresh model and a function giving a batch of its inputs (token ids for a language model)."""

    model: nn.Module
    inputs: Callable[[int], tuple[Tensor, ...]]
    classifier: str | None = None  # left dense by channel pruning (its logits cannot be removed)


STUDY_MODELS: Registry[Callable[[], StudyModel]] = Registry("study model")


def _image_model(name: str, shape: tuple[int, int, int] = (1, 28, 28)) -> Callable[[], StudyModel]:
    def make() -> StudyModel:
        from benchkit.models import build_model

        model = build_model(ModelConfig(name=name), shape, 10)
        last = list(prunable_layers(model))[-1]
        return StudyModel(model, lambda b: (torch.randn(b, *shape),), classifier=last)
    return make


STUDY_MODELS.register("lenet300", _image_model("lenet300"))
STUDY_MODELS.register("lenet5", _image_model("lenet5"))
STUDY_MODELS.register("resnet18", _image_model("resnet18"))  # torchvision's, first conv for 1 channel

CHARLM = {"context": 128, "vocab": 85, "kwargs": {"n_layer": 4, "n_embd": 128, "n_head": 4}}  # lm_pruning.yaml's


def _language_model(**width: int) -> Callable[[], StudyModel]:
    """The character GPT of experiments/lm_pruning.yaml (Shakespeare's 85 characters, context 128), its
    ``n_layer`` / ``n_embd`` / ``n_head`` replaced by ``width``'s."""
    def make() -> StudyModel:
        from benchkit.models import build_model

        context, vocab = CHARLM["context"], CHARLM["vocab"]
        kwargs = {**CHARLM["kwargs"], **width}
        model = build_model(ModelConfig(name="gpt", kwargs=kwargs), (context,), vocab)
        return StudyModel(model, lambda b: (torch.randint(0, vocab, (b, context)),), classifier="lm_head")
    return make


STUDY_MODELS.register("charlm", _language_model())
# GPT-2-medium width: Linear layers of 1024x1024 to 4096x1024, where 2:4 sparse tensor cores can pay on a
# GPU; heavy on one CPU thread (64x charlm's FLOPs)
STUDY_MODELS.register("charlm_wide", _language_model(n_embd=1024, n_head=16))


def _nm_exclusions(model: nn.Module, m: int) -> list[str]:
    gran = get_granularity(f"1:{m}")
    out = []
    for name, layer in prunable_layers(model).items():
        try:
            gran.check_layer(name, layer.weight.shape)
        except GranularityError:
            out.append(name)
    return out


def settings(granularity: str, sparsities: Sequence[float]) -> list[tuple[str, float | None]]:
    """(granularity as benchkit names it, sparsity) pairs: N:M fixes its own sparsity."""
    if granularity == "n:m":
        def level(nm: str) -> float:
            n, m = (int(v) for v in nm.split(":"))
            return 1 - n / m
        return [(nm, None) for nm in NM if min(sparsities) <= level(nm) <= max(sparsities)]
    return [(granularity, s) for s in sparsities]


def prune_for(study: StudyModel, granularity: str, sparsity: float | None) -> str | None:
    """Prune ``study.model`` in place; or say why this setting has nothing to measure on this model (no
    such structure, or a layer too small for the sparsity: LeNet-5's conv1 has 20 kernels, so 98% of them
    per layer would remove it)."""
    import benchkit as bk

    model = study.model
    structure = get_granularity(granularity).structure
    if structure is not None:  # heads / MLP neurons: only where the model has them, at a reachable sparsity
        try:
            find_units(model, structure)
            bk.prune(model, sparsity=sparsity, granularity=granularity, scope="layer")
        except (StructureError, CompressionError) as e:
            return str(e)
        return None
    exclude: list[str] = []
    if granularity == "channel" and study.classifier:
        exclude = [study.classifier]
    if ":" in granularity:
        exclude = _nm_exclusions(model, int(granularity.split(":")[1]))
    if granularity == "kernel" and not any(isinstance(m, nn.Conv2d) for m in prunable_layers(model).values()):
        return "no convolution (a Linear layer's kernel is one weight: the same as element)"
    if len(exclude) == len(prunable_layers(model)):
        return f"no layer whose input size {granularity} divides"
    try:
        bk.prune(model, sparsity=sparsity, granularity=granularity, scope="layer", exclude=exclude)
    except CompressionError as e:
        return str(e)
    return None


def run_study(models: Sequence[str], *, granularities: Sequence[str] = GRANULARITIES,
              sparsities: Sequence[float] = SPARSITIES, batches: Sequence[int] = BATCHES,
              kernels: Sequence[str] | None = None, threads: int = 1, warmup: int = 3, repeats: int = 20,
              device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              progress: Callable[[str], None] | None = print, rows: list[dict] | None = None) -> pd.DataFrame:
    """One row per (model, granularity, sparsity, batch); see the module docstring. On ``device``
    ``cuda`` the models run in ``dtype`` (fp16 / bf16: what 2:4 tensor cores take) and ``kernels``
    defaults to :data:`CUDA_KERNELS`; pruning, FLOPs and the reference outputs stay fp32 on the CPU.
    Each row is appended to ``rows`` (when given) as soon as it is measured, so a caller that is
    interrupted keeps the finished ones."""
    device = torch.device(device)
    if kernels is None:
        kernels = CUDA_KERNELS if device.type == "cuda" else KERNELS
    makers = {name: STUDY_MODELS.get(name) for name in models}  # unknown names fail before any work
    for g in granularities:
        if g not in GRANULARITIES:
            raise ValueError(f"granularity {g!r}: allowed {', '.join(GRANULARITIES)}")
    rows = [] if rows is None else rows
    said: set[tuple[str, str, str]] = set()
    for name, make in makers.items():
        for granularity in granularities:
            for gran, sparsity in settings(granularity, sparsities):
                torch.manual_seed(0)
                study = make()
                why_not = prune_for(study, gran, sparsity)
                if why_not is not None:
                    if progress and (name, gran, why_not) not in said:  # a missing structure: once, not per sparsity
                        said.add((name, gran, why_not))
                        progress(f"{name} {gran} {sparsity if sparsity is not None else ''}: not measured: {why_not}")
                    continue
                sample = study.inputs(1)
                metrics = model_metrics(study.model, tuple(sample[0].shape[1:])) if len(sample) == 1 else {}
                study.model.to(dtype)
                for batch in batches:
                    start = time.perf_counter()
                    dep = deploy(study.model, study.inputs(batch), device=device, threads=threads, warmup=warmup,
                                 repeats=repeats, forms=["dense", *kernels], max_density=1.0)
                    row = {"model": name, "granularity": gran, "target_sparsity": sparsity,
                           "sparsity": metrics.get("sparsity", math.nan), "batch": batch, "device": device.type,
                           "dtype": str(dtype).removeprefix("torch."), "threads": threads,
                           "theoretical_shrinkbench": dep.theoretical_speedup,
                           "theoretical_compacted": dep.compacted_theoretical_speedup or math.nan,
                           "measured_deployed": dep.measured_speedup, "deployed_variant": dep.variant,
                           "efficiency": dep.efficiency}
                    dense_total = sum(r.baseline_ms for r in dep.layers if r.times_ms)
                    for kernel in kernels:
                        covered = sum(r.baseline_ms for r in dep.layers if kernel in r.times_ms)
                        total = sum(r.times_ms.get(kernel, r.baseline_ms) for r in dep.layers if r.times_ms)
                        row[f"layers_{kernel}"] = dense_total / total if covered and total else math.nan
                        row[f"coverage_{kernel}"] = covered / dense_total if dense_total else math.nan
                    rows.append(row)
                    if progress:
                        progress(f"{name} {gran} {sparsity if sparsity is not None else ''} batch {batch}: "
                                 f"measured {dep.measured_speedup:.2f}x vs theoretical {dep.theoretical_speedup:.2f}x "
                                 f"({time.perf_counter() - start:.1f} s)")
    return pd.DataFrame(rows)


def break_even(df: pd.DataFrame, kernels: Sequence[str] | None = None) -> pd.DataFrame:
    """Per model, granularity family, batch and kernel (default: every ``layers_<kernel>`` column): the
    lowest measured sparsity where the kernel's layers are at least as fast as dense, linearly
    interpolated from the point below ("< lowest" when it already pays at the lowest sparsity measured,
    NaN when it never does)."""
    if kernels is None:
        kernels = [c.removeprefix("layers_") for c in df.columns if c.startswith("layers_")]
    rows = []
    fam = df.assign(family=df["granularity"].where(~df["granularity"].str.contains(":"), "n:m"))
    for (model, family, batch), part in fam.groupby(["model", "family", "batch"], sort=False):
        part = part.sort_values("sparsity")
        for kernel in kernels:
            col = f"layers_{kernel}"
            if col not in part:
                continue
            known = part[part[col].notna()]
            s, v = known["sparsity"].tolist(), known[col].tolist()
            if not v:
                continue
            value, note = math.nan, "never reached"
            for i, (si, vi) in enumerate(zip(s, v)):
                if vi >= 1:
                    if i == 0:
                        value, note = si, "at or below the lowest sparsity measured"
                    else:
                        s0, v0 = s[i - 1], v[i - 1]
                        value = s0 + (1 - v0) * (si - s0) / (vi - v0) if vi != v0 else si
                        note = "interpolated"
                    break
            rows.append({"model": model, "granularity": family, "batch": batch, "kernel": kernel,
                         "break_even_sparsity": value, "note": note,
                         "best_speedup": max(v) if v else math.nan})
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    shown = df.copy()
    for c in shown.columns:
        if shown[c].dtype.kind == "f":
            shown[c] = shown[c].map(lambda x: "" if x != x else f"{x:.3g}")
    head = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "|".join("---:" if df[c].dtype.kind in "fi" else "---" for c in df.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in r) + " |" for r in shown.values.tolist()]
    return "\n".join([head, rule, *rows])


def write(df: pd.DataFrame, out: str | Path, *, header: str) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    be = break_even(df)
    df.to_csv(out / "study.csv", index=False)
    be.to_csv(out / "break_even.csv", index=False)
    text = "\n".join([header, "", "## Measured vs theoretical speedup", "", markdown(df), "",
                      "## Break-even sparsity of each kernel (prunable layers, vs dense)", "", markdown(be), ""])
    (out / "study.md").write_text(text)
    return [out / "study.csv", out / "break_even.csv", out / "study.md"]
