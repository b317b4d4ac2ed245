"""``deploy``: a pruned (masked) model in the fastest form this device runs, chosen by measurement.

    dep = bk.deploy(model, example_inputs, device="cpu", batch_size=64, threads=1)
    dep.model(x)            # torch modules (fused_csr layers call benchkit's compiled op), same outputs
    dep.table()             # per layer: form chosen, why, measured times, theoretical vs measured speedup
    dep.save("model.pt2")   # torch.export archive that torch alone loads (TorchScript when a form cannot export)

Steps: (1) masks are folded into a copy, and BatchNorms into the convolutions before them
(:mod:`benchkit.deployment.fold`); (2) whole dead channels are removed with Torch-Pruning
(:func:`benchkit.deployment.compact.compact`); (3) every prunable layer is timed on its real input at
``batch_size`` in each applicable form of :data:`benchkit.deployment.forms.FORMS` and takes the fastest
one that beats its dense self by ``min_gain`` (:func:`benchkit.deployment.choose.pick`); (4) the whole
model is timed four ways — dense (masks folded), compacted, aligned (compacted, channel counts kept at
multiples of the SIMD width), deployed — and the fastest is kept by the same rule against the fastest
dense variant, so the result is never slower than any dense layout within the timer's resolution; (5) the
outputs are checked against the masked model's. A convolutional model's variants are also timed in channels-last layout
(:mod:`benchkit.deployment.layout`; in the deployed model's twin a convolution stays dense when the dense
layer in that layout beats its chosen form), with each convolution run as a fused stage (its ReLU and 2x2
max-pool included) where that is measured faster (:mod:`benchkit.deployment.stages`), and with
``compile=True`` every variant also compiled
(``torch.compile``, :mod:`benchkit.deployment.compiled`); the dense model's twins are timed too, so the
measured speedup never credits a layout, a fused kernel or the compiler to the pruning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from benchkit.deployment import fold, fused, layout, stages
from benchkit.deployment.choose import LayerReport, MedianTimer, Timer, layer_inputs, pick
from benchkit.deployment.compact import CompactResult, _flatten_outputs, _max_abs_diff, compact
from benchkit.deployment.compiled import SUFFIX, compile_copy, eager_name, fresh_cache
from benchkit.deployment.fold import Folded
from benchkit.deployment.forms import DEFAULT_FORMS, FORMS, Form, portable
from benchkit.latency import with_batch_size
from benchkit.metrics import Inputs, as_tuple, count_flops, dead_channels, effective
from benchkit.pruning.layers import prunable_layers
from benchkit.pruning.masks import deepcopy_model, make_permanent

MODEL = "<model>"  # the timer label of whole-model comparisons


class DeployError(ValueError):
    """Bad arguments (named, with the fix) or a deployed model that does not reproduce the masked one."""


@dataclass
class Deployment:
    """The deployed model and what was measured to choose it.

    ``variant`` is the whole-model form kept (``dense``: masks folded; every variant also has its BatchNorms
    folded unless deploy was told not to, ``fold_note``; ``compacted``: dead channels
    removed, ``aligned``: compacted with channel counts rounded up to a multiple of deploy's ``align``,
    ``deployed``: compacted plus the per-layer forms; each with ``_channels_last`` appended for its
    channels-last twin, then ``_stages`` for the twin whose convolutions run as fused stages where that
    pays, then ``_compiled`` when deploy compiled it; :func:`kind` strips them); ``times_ms`` are the whole-model medians of the variants at ``setting``, and
    ``not_measured`` says why a variant asked for was not timed (e.g. ``torch.compile`` failed).
    ``theoretical_speedup`` is ShrinkBench's (dense / non-zero FLOPs of the prunable layers) and
    ``compacted_theoretical_speedup`` the FLOP ratio after compaction. ``tolerance`` is the output
    agreement required of ``model`` (``max_abs_diff`` is what it got). ``measured_speedup`` divides the
    fastest *dense* runtime measured by the kept variant's time."""

    model: nn.Module
    layers: list[LayerReport]
    variant: str
    reason: str
    times_ms: dict[str, float]
    setting: dict[str, object]
    theoretical_speedup: float
    compacted_theoretical_speedup: float | None
    max_abs_diff: float
    tolerance: float
    example_inputs: tuple[Tensor, ...] = field(repr=False)
    compaction: CompactResult | None = field(default=None, repr=False)
    not_measured: dict[str, str] = field(default_factory=dict)
    eager_model: nn.Module | None = field(default=None, repr=False)  # ``model`` before torch.compile
    fold_note: str = ""  # what :mod:`benchkit.deployment.fold` did to every variant ("" when there was no BatchNorm)
    stage_note: str = ""  # the kept model's fused convolution stages (:mod:`benchkit.deployment.stages`), or why none

    @property
    def dense_ms(self) -> float:
        """The fastest dense runtime measured (any layout; compiled too when deploy compiled): the baseline."""
        return min(v for k, v in self.times_ms.items() if kind(k) == "dense")

    @property
    def measured_speedup(self) -> float:
        """Fastest dense runtime / the kept variant's time: compiling is not credited to pruning."""
        return self.dense_ms / self.times_ms[self.variant]

    @property
    def efficiency(self) -> float:
        return self.measured_speedup / self.theoretical_speedup if self.theoretical_speedup > 0 else math.nan

    @property
    def forms(self) -> dict[str, str]:
        return {r.layer: r.form for r in self.layers}

    @property
    def exportable(self) -> bool:
        """Every chosen form goes through ``torch.export`` (else :meth:`save` uses TorchScript)."""
        return all(FORMS.get(r.form).exportable for r in self.layers)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([r.row() for r in self.layers])

    def summary(self) -> dict[str, float | str]:
        """Flat whole-model figures (``deploy_*``, ``latency_*_ms``) and the setting."""
        out: dict[str, float | str] = {
            "deploy_variant": self.variant,
            "latency_dense_ms": self.dense_ms,  # the baseline: the fastest dense runtime
            "latency_deployed_ms": self.times_ms[self.variant],
            "deploy_theoretical_speedup": self.theoretical_speedup,
            "deploy_measured_speedup": self.measured_speedup,
            "deploy_efficiency": self.efficiency,
            "deploy_max_abs_diff": self.max_abs_diff,
            "deploy_tolerance": self.tolerance,
        }
        if "compacted" in self.times_ms:
            out["latency_compacted_ms"] = self.times_ms["compacted"]
        out.update({f"latency_variant_{k}_ms": v for k, v in self.times_ms.items()})  # every variant timed
        if self.compacted_theoretical_speedup is not None:
            out["deploy_compacted_theoretical_speedup"] = self.compacted_theoretical_speedup
        out.update({f"deploy_{k}": v for k, v in self.setting.items()})
        return out

    def markdown(self) -> str:
        s = self.setting
        lines = [f"deployed as **{self.variant}** ({self.reason}); device {s['device']}, batch {s['batch_size']}, "
                 f"threads {s['threads']}, dtype {s['dtype']}",
                 "",
                 f"whole model: dense {self.times_ms['dense']:.4g} ms, "
                 + ", ".join(f"{k} {v:.4g} ms" for k, v in self.times_ms.items() if k != "dense")
                 + f"; measured speedup {self.measured_speedup:.2f}x, theoretical {self.theoretical_speedup:.2f}x "
                   f"(ShrinkBench), efficiency {self.efficiency:.2f}"
                 + (f"; compacted theoretical {self.compacted_theoretical_speedup:.2f}x, efficiency "
                    f"{self.measured_speedup / self.compacted_theoretical_speedup:.2f}"
                    if self.compacted_theoretical_speedup else "")
                 + "".join(f"; {k} not measured: {v}" for k, v in self.not_measured.items())
                 + (f"; {self.fold_note}" if self.fold_note else "")
                 + (f"; {self.stage_note}" if self.stage_note else ""),
                 "",
                 "| layer | shape | density | form | dense ms | deployed ms | measured x | theoretical x | "
                 "efficiency | why |",
                 "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in self.layers:
            lines.append(f"| {r.layer} | {'x'.join(map(str, r.shape))} | {r.density:.3f} | {r.form} | "
                         f"{r.baseline_ms:.4g} | {r.measured_ms:.4g} | {r.measured_speedup:.2f} | "
                         f"{r.theoretical_speedup:.2f} | {r.efficiency:.2f} | {r.reason.replace('|', '/')} |")
        return "\n".join(lines)

    def save(self, path: str | Path):
        """Write the model so that torch alone loads it back; see
        :func:`benchkit.deployment.save.save_deployed`."""
        from benchkit.deployment.save import save_deployed

        model, swapped = portable(self.eager_model if self.eager_model is not None else self.model)
        saved = save_deployed(model, path, self.example_inputs, exportable=self.exportable, tolerance=self.tolerance)
        if swapped:
            note = (f"{', '.join(swapped)}: benchkit's fused kernel written as its csr twin (F.embedding_bag), "
                    "which torch alone runs")
            saved = replace(saved, note="; ".join(x for x in (saved.note, note) if x))
        return saved


# ---------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeployError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeployError(f"device {device!r} asked for, but torch sees no CUDA device here; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise DeployError(f"device {device!r}: only cpu and cuda are supported")
    return dev


def _density(layer: nn.Module) -> float:
    w = effective(layer)
    return int(torch.count_nonzero(w)) / w.numel()


@torch.no_grad()
def _choose_layer(name: str, layer: nn.Module, x: Tensor, report: LayerReport, forms: Sequence[Form],
                  timer: Timer, device: torch.device, min_gain: float, max_density: float,
                  original: tuple[nn.Module, Tensor] | None, floor: tuple[float, float] = (0.0, 0.0)
                  ) -> nn.Module:
    ref = layer(x)
    fns = {"dense": lambda: layer(x)}
    if original is not None:
        fns["original"] = lambda: original[0](original[1])
    built: dict[str, nn.Module] = {}
    density_now = int(torch.count_nonzero(layer.weight)) / layer.weight.numel()
    for form in forms:
        if form.name == "dense":
            continue
        why = form.check(layer, device)
        if why is None and form.sparse and density_now > max_density:
            why = f"density {density_now:.3f} > max_density {max_density}: a sparse kernel cannot pay"
        if why is None:
            try:
                module = form.build(layer).eval()
                diff = float((module(x) - ref).abs().max()) if ref.numel() else 0.0
            except Exception as err:  # noqa: BLE001 - one form failing must not stop the others
                why = f"failed: {type(err).__name__}: {err}"
            else:
                allowed = _tolerance([form], floor, float(ref.abs().max()) if ref.numel() else 0.0)
                if not diff <= allowed:
                    why = f"output differs from dense by {diff:.3g} > {allowed:.3g}"
        if why is not None:
            report.not_measured[form.name] = why
            continue
        built[form.name] = module
        fns[form.name] = lambda m=module: m(x)
    times = timer(name, fns)
    report.times_ms = {k: float(times[k]) for k in fns}
    candidates = {k: v for k, v in report.times_ms.items() if k != "original"}
    report.form, report.reason = pick(candidates, "dense", min_gain)
    if len(candidates) == 1 and report.not_measured:
        report.reason = "dense: no other form applies (" + "; ".join(
            f"{k}: {v}" for k, v in report.not_measured.items()) + ")"
    return built.get(report.form, layer)


@torch.no_grad()
def _dense_wins_channels_last(name: str, layer: nn.Conv2d, chosen: nn.Module, x: Tensor, report: LayerReport,
                              timer: Timer, min_gain: float) -> bool:
    """Whether, on a channels-last input, the dense convolution in channels-last layout is not beaten by the
    form chosen against the NCHW one (by ``min_gain``): the deployed model's channels-last twin then keeps
    the layer dense. Timed as ``dense_channels_last`` and ``<form>_channels_last`` in ``report.times_ms``."""
    x = x.contiguous(memory_format=torch.channels_last)
    dense, chosen = layout.channels_last_copy(layer), layout.channels_last_copy(chosen)
    base, mine = "dense" + layout.SUFFIX, report.form + layout.SUFFIX
    times = timer(name, {base: lambda: dense(x), mine: lambda: chosen(x)})
    report.times_ms.update({base: float(times[base]), mine: float(times[mine])})
    return pick({base: times[base], mine: times[mine]}, base, min_gain)[0] == base


@torch.no_grad()
def deploy(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    device: str | torch.device = "cpu",
    forms: Sequence[str] | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 20,
    min_gain: float = 0.05,
    max_density: float = 0.9,
    compaction: bool = True,
    align: int = 8,
    channels_last: bool | None = None,
    compile: bool = False,
    fold_batchnorm: bool = True,
    fused_stages: bool = True,
    timer: Timer | None = None,
) -> Deployment:
    """Deploy a pruned (``torch.nn.utils.prune``-masked, or plain) model; see the module docstring.

    ``forms``: names in :data:`~benchkit.deployment.forms.FORMS` to measure (default
    :data:`~benchkit.deployment.forms.DEFAULT_FORMS`; ``dense`` is always measured). ``batch_size``
    (default: the example's) and ``threads`` (default: torch's) are the setting every time is measured
    at. Sparse forms are not tried on layers denser than ``max_density``. ``timer`` replaces the
    default :class:`~benchkit.deployment.choose.MedianTimer` (e.g. a fake one in tests). ``compile``
    also times every whole-model variant under ``torch.compile`` (:mod:`benchkit.deployment.compiled`;
    it clears torch's compile caches first); ``save`` then writes the eager module. ``align`` > 1 also
    times the ``aligned`` variant: the compaction with each layer's channels rounded up to a multiple of
    ``align`` by keeping some dead (zero) channels (:func:`~benchkit.deployment.compact.compact`), because
    GEMMs run faster at widths that fill the vector registers (8 floats with AVX2; 8 or 16 halves on
    tensor cores); the compacted theoretical speedup stays that of the exact compaction. ``channels_last``
    (default: when the model has a Conv2d) also times every variant with its parameters in channels-last
    layout (:mod:`benchkit.deployment.layout`), dense included. ``fold_batchnorm`` folds every BatchNorm that
    only follows a convolution into it, in every variant, dense included (:mod:`benchkit.deployment.fold`).
    ``fused_stages`` (fp32 on CPU, where benchkit's kernels build) also times every variant with its
    convolutions run as fused stages (ReLU and 2x2 max-pool included) where each is measured faster on its
    real input (:mod:`benchkit.deployment.stages`), dense included.

    Returns a :class:`Deployment` whose ``model`` (eval mode, on ``device``, in the model's dtype) gives
    the masked model's outputs (computed in fp32 on CPU) within ``atol + rtol * max|output|`` of the
    loosest form used (fp32 CPU forms: 1e-5 and 1e-4; on CUDA at least 1e-3 and 1e-2, TF32
    convolutions; fp16/bf16 at least 1e-2 and 3e-2), checked here on ``example_inputs``; the caller's
    model is untouched.
    """
    inputs = as_tuple(example_inputs)
    dev = resolve_device(device)
    names = list(dict.fromkeys(["dense", *(forms if forms is not None else DEFAULT_FORMS)]))
    form_objs = [FORMS.get(n) for n in names]  # UnknownNameError lists the registered forms
    batch_size = int(batch_size if batch_size is not None else inputs[0].shape[0])
    if batch_size < 1:
        raise DeployError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= min_gain < 1:
        raise DeployError(f"min_gain must be in [0, 1), got {min_gain}")
    if not prunable_layers(model):
        raise DeployError(f"{type(model).__name__} has no Conv/Linear layer to deploy")
    if threads is not None and threads < 1:
        raise DeployError(f"threads must be >= 1, got {threads}")
    if not isinstance(align, int) or align < 1:
        raise DeployError(f"align must be an integer >= 1 (1: no aligned variant), got {align!r}")
    timer = timer if timer is not None else MedianTimer(dev, threads, warmup, repeats)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    floor = _precision_floor(dtype, dev)
    as32 = tuple(t.detach().cpu().float() if t.is_floating_point() else t.detach().cpu() for t in inputs)
    cpu_inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in as32)  # the model's dtype

    # the reference, the compaction and the FLOP counts work on an fp32 CPU copy; the deployed model
    # runs in the model's dtype on ``device``
    masked = deepcopy_model(model).cpu().float().eval()
    reference = _flatten_outputs(masked(*as32))

    def prepare(variant: nn.Module) -> nn.Module:
        """Every whole-model variant, dense included, with its BatchNorms folded (when asked)."""
        if fold_batchnorm:
            fold.fold_batchnorm(variant.eval())
        return variant

    base = make_permanent(deepcopy_model(masked)).eval()
    folded = fold.fold_batchnorm(base) if fold_batchnorm else Folded()  # the same in every variant
    reports = {name: LayerReport(layer=name, type=type(m).__name__, shape=tuple(m.weight.shape),
                                 deployed_shape=tuple(m.weight.shape), density=_density(m),
                                 theoretical_speedup=math.inf)
               for name, m in prunable_layers(masked).items()}
    for r in reports.values():
        r.theoretical_speedup = 1 / r.density if r.density > 0 else math.inf

    result: CompactResult | None = None
    if compaction and any(n > 0 for n in dead_channels(masked).values()):
        result = compact(masked, as32, measure_latency=False)
    compacted_dense = None
    if result is not None:  # kept as it is: ``Deployment.compaction.model`` is the plain compacted model
        compacted_dense = prepare(deepcopy_model(result.model).eval()).to(dev, dtype)
        result.model.eval().to(dev, dtype)
    net = deepcopy_model(compacted_dense if compacted_dense is not None else base).eval().to(dev, dtype)
    base.to(dev, dtype)
    aligned = _aligned_compaction(masked, as32, result, align)
    if aligned is not None:
        prepare(aligned.eval()).to(dev, dtype)
    xs = tuple(t.to(dev) for t in with_batch_size(cpu_inputs, batch_size))

    net_layers = prunable_layers(net)
    base_layers = prunable_layers(base)
    net_inputs = layer_inputs(net, net_layers, xs)
    base_inputs = layer_inputs(base, base_layers, xs) if result is not None else {}
    channels_last = channels_last if channels_last is not None else layout.applies(base)
    replacements: dict[str, nn.Module] = {}
    dense_in_channels_last: set[str] = set()  # layers the deployed model's channels-last twin keeps dense
    for name, layer in net_layers.items():
        report = reports[name]
        report.deployed_shape = tuple(layer.weight.shape)
        if name not in net_inputs:
            report.reason = "dense: not called on these inputs"
            continue
        original = None
        if result is not None and report.deployed_shape != report.shape and name in base_inputs:
            original = (base_layers[name], base_inputs[name])
        module = _choose_layer(name, layer, net_inputs[name], report, form_objs, timer, dev, min_gain,
                               max_density, original, floor)
        if module is not layer:
            replacements[name] = module
            if channels_last and isinstance(layer, nn.Conv2d) and _dense_wins_channels_last(
                    name, layer, module, net_inputs[name], report, timer, min_gain):
                dense_in_channels_last.add(name)
    for name, module in replacements.items():
        net.set_submodule(name, module)

    variants = {"dense": base, "compacted": compacted_dense, "aligned": aligned,
                "deployed": net if replacements else None}
    variants = {k: v for k, v in variants.items() if v is not None}
    not_measured: dict[str, str] = {}
    diffs: dict[str, float] = {}  # each twin's largest output difference from the variant it was made from
    twins = []
    if channels_last:
        def channels_last_twin(name: str, model: nn.Module) -> tuple[nn.Module, str]:
            twin = layout.channels_last_copy(model)
            if model is net:  # the deployed model: its layers chosen against channels-last dense ones
                for layer in dense_in_channels_last:
                    twin.set_submodule(layer, layout.channels_last_copy(net_layers[layer]))
            return twin, ""
        twins.append((layout.SUFFIX, channels_last_twin))
    stage_why = _stages_apply(base, dev, dtype) if fused_stages else ""
    stage_times: dict[tuple[str, str], dict[str, float]] = {}  # (twin, layer): "stage" and "unfused" ms
    if stage_why is None:
        def stage_twin(name: str, model: nn.Module) -> tuple[nn.Module | None, str]:
            # in the deployed model a convolution given a sparse form is a candidate too, against that form
            dense = {n: net_layers[n] for n in replacements if isinstance(net_layers[n], nn.Conv2d)} if model is net else {}
            twin, times = stages.measured_twin(model, xs, timer, min_gain, name.endswith(layout.SUFFIX), dense,
                                               label=name + stages.SUFFIX)
            stage_times.update({(name + stages.SUFFIX, layer): t for layer, t in times.items()})
            return twin, ""  # None, "": no convolution pays as a stage here, which is not a failure
        twins.append((stages.SUFFIX, stage_twin))
    if compile:
        fresh_cache()  # else past torch's 8 cached compilations a "compiled" variant would silently run eagerly
        twins.append((SUFFIX, lambda name, m: compile_copy(m, xs, threads)))
    for suffix, make in twins:
        made = _twins(variants, suffix, make, xs, floor, reports, diffs)
        not_measured.update({k: v for k, v in made.items() if isinstance(v, str)})
        variants.update({k: v for k, v in made.items() if isinstance(v, nn.Module)})
    times = timer(MODEL, {k: (lambda m=m: m(*xs)) for k, m in variants.items()})
    # the baseline is the fastest dense variant (any layout, compiled too), the one every speedup divides:
    # another variant must beat it by ``min_gain``, so the kept model is never slower than it
    fastest_dense = min((k for k in variants if kind(k) == "dense"), key=lambda k: times[k])
    variant, why = pick({k: times[k] for k in variants}, fastest_dense, min_gain)
    if kind(variant) != "deployed":
        for r in reports.values():
            if r.form != "dense":
                r.reason = f"dense: the whole model with the per-layer forms was not faster ({r.form}: {r.reason})"
                r.form = "dense"
    if kind(variant) == "deployed" and layout.SUFFIX in variant:
        for name in dense_in_channels_last:
            r = reports[name]
            cl = {k: v for k, v in r.times_ms.items() if k.endswith(layout.SUFFIX)}
            r.reason = (f"dense: in channels-last layout the dense layer beats {r.form} ("
                        + ", ".join(f"{k} {v:.4g} ms" for k, v in cl.items()) + ")")
            r.form = "dense"
    staged_layers = _report_stages(variants[eager_name(variant)], eager_name(variant), variant, reports,
                                   stage_times, replacements)
    chosen = variants[variant].eval()
    eager = variants[eager_name(variant)].eval()
    if kind(variant) == "aligned":
        for name, layer in prunable_layers(aligned).items():
            reports[name].deployed_shape = tuple(layer.weight.shape)
    # the eager twin is checked against the masked model on the caller's example; a compiled variant was
    # checked against its eager twin at ``batch_size`` (calling it at another shape would recompile it)
    diff, tolerance = _check_outputs(eager, cpu_inputs, reference, [FORMS.get(r.form) for r in reports.values()],
                                     dev, reports, floor)
    if variant != eager_name(variant):
        diff += diffs[variant]

    flops = count_flops(masked, tuple(t[:1] for t in as32)).by_module
    dense_flops = sum(flops.get(n, 0) for n in reports)
    nonzero_flops = sum(flops.get(n, 0) * r.density for n, r in reports.items())
    theoretical = dense_flops / nonzero_flops if nonzero_flops else math.inf
    compacted_theoretical = None
    if result is not None:
        after = result.flops_prunable_after
        compacted_theoretical = result.flops_prunable_before / after if after else math.inf
    setting = {"device": str(dev), "batch_size": batch_size,
               "threads": int(threads if threads is not None else torch.get_num_threads()),
               "dtype": str(dtype).removeprefix("torch."),
               "warmup": getattr(timer, "warmup", warmup), "repeats": getattr(timer, "repeats", repeats),
               "folded_batchnorm": len(folded.batchnorms)}
    return Deployment(
        model=chosen, layers=list(reports.values()), variant=variant, reason=why,
        times_ms={k: float(times[k]) for k in variants}, setting=setting, theoretical_speedup=theoretical,
        compacted_theoretical_speedup=compacted_theoretical, max_abs_diff=diff, tolerance=tolerance,
        example_inputs=cpu_inputs, compaction=result, not_measured=not_measured,
        eager_model=eager if eager is not chosen else None,
        fold_note=_fold_note(folded),
        stage_note=_stage_note(stage_why, staged_layers),
    )


def _fold_note(folded: Folded) -> str:
    """"" when nothing was folded for want of a BatchNorm (or of being asked)."""
    if folded.why_not:
        return f"BatchNorm not folded: {folded.why_not}"
    if folded.batchnorms:
        return f"{len(folded.batchnorms)} BatchNorm layers folded into the convolutions before them, in every variant"
    return ""


def _stages_apply(base: nn.Module, dev: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` when fused convolution stages can be timed for this model here, else why not ("" when the
    model has no 2-d convolution: nothing to say)."""
    if not any(isinstance(m, nn.Conv2d) for m in base.modules()):
        return ""
    if dev.type != "cpu" or dtype != torch.float32:
        return f"benchkit::conv_stage runs fp32 on CPU (here {str(dtype).removeprefix('torch.')} on {dev.type})"
    return fused.available()


def _report_stages(model: nn.Module, name: str, variant: str, reports: dict[str, LayerReport],
                   stage_times: dict[tuple[str, str], dict[str, float]], replacements: dict[str, nn.Module]
                   ) -> list[str]:
    """The kept model's layers that run as fused stages; their reports say so, with the times measured."""
    layers = [n for n, m in model.named_modules() if isinstance(m, stages.ConvStage) and n in reports]
    for layer in layers:
        module, r, t = model.get_submodule(layer), reports[layer], stage_times.get((name, layer), {})
        timed = f"{t['stage']:.4g} ms vs {t['unfused']:.4g} ms unfused" if t else "not timed"
        what = " with its ReLU" * module.relu + " and 2x2 max-pool" * module.pool
        if kind(variant) == "deployed" and layer in replacements and r.form != "dense":
            r.reason, r.form = f"dense: as a fused stage it beat {r.form} in this model", "dense"
        r.reason += f"; run as a fused stage{what} (benchkit::conv_stage, {timed})"
    return layers


def _stage_note(why: str | None, layers: list[str]) -> str:
    """"" when the model has no convolution (or fusing was not asked)."""
    if why:
        return f"no fused convolution stages: {why}"
    if why is None:
        return (f"{len(layers)} convolutions run as fused stages (benchkit::conv_stage): {', '.join(layers)}" if layers
                else "fused convolution stages (benchkit::conv_stage) were timed; the kept model has none")
    return ""


def _aligned_compaction(masked: nn.Module, inputs: tuple[Tensor, ...], exact: CompactResult | None,
                        align: int) -> nn.Module | None:
    """The compaction with channel counts rounded up to multiples of ``align``, or ``None`` when that is
    the exact compaction or no compaction at all (nothing new to time)."""
    if exact is None or align <= 1:
        return None
    result = compact(masked, inputs, measure_latency=False, align=align)
    after = {k: a for k, (_, a) in result.channels.items()}
    if after == {k: a for k, (_, a) in exact.channels.items()} or all(b == a for b, a in result.channels.values()):
        return None
    return result.model


def kind(variant: str) -> str:
    """The whole-model candidate a variant is a twin of: ``compacted_channels_last_stages_compiled`` ->
    ``compacted``."""
    return eager_name(variant).removesuffix(stages.SUFFIX).removesuffix(layout.SUFFIX)


def _twins(variants: dict[str, nn.Module], suffix: str, make, xs: tuple[Tensor, ...], floor: tuple[float, float],
           reports: dict[str, LayerReport], diffs: dict[str, float]) -> dict[str, nn.Module | str]:
    """Each variant remade by ``make(name, model) -> (twin | None, why)`` (name + ``suffix``: compiled, channels
    last) and checked against it on ``xs``, or the reason it is not measured. ``diffs`` gets each twin's
    largest output difference from the variant it was made from."""
    out: dict[str, nn.Module | str] = {}
    for name, model in variants.items():
        key = name + suffix
        twin, why = make(name, model)
        if twin is None:
            if why:  # "": this variant has no such twin, which is not a failure to report
                out[key] = why
            continue
        want = _flatten_outputs(model(*xs))
        diff = _max_abs_diff(want, twin, xs)  # inf when the outputs' number or shapes differ
        scale = max((float(t.abs().max()) for t in want), default=0.0)
        allowed = _tolerance([FORMS.get(r.form) for r in reports.values()] + [FORMS.get("dense")], floor, scale)
        if not diff <= allowed:
            out[key] = f"{key} outputs differ from {name} by {diff:.3g} > {allowed:.3g}"
            continue
        out[key], diffs[key] = twin, diff
    return out


@torch.no_grad()
def _precision_floor(dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(atol, rtol) below which no output comparison is asked: fp16/bf16 arithmetic, and CUDA, whose
    convolutions run in TF32 by default (``torch.backends.cudnn.allow_tf32``), agree with an fp32 CPU
    reference to about 1e-3 relative, not 1e-6."""
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2, 3e-2
    if device.type == "cuda":
        return 1e-3, 1e-2
    return 0.0, 0.0


def _tolerance(used: Sequence[Form], floor: tuple[float, float], scale: float) -> float:
    """``atol + rtol * scale`` with the loosest of the used forms' and the precision floor's terms."""
    atol = max([floor[0], *(f.atol for f in used)])
    rtol = max([floor[1], *(f.rtol for f in used)])
    return atol + rtol * scale


def _check_outputs(model: nn.Module, inputs: tuple[Tensor, ...], reference: list[Tensor], used: list[Form],
                   device: torch.device, reports: dict[str, LayerReport], floor: tuple[float, float]
                   ) -> tuple[float, float]:
    """(max |deployed - masked|, allowed): see :func:`_tolerance`, with the masked model's largest output."""
    outs = _flatten_outputs(model(*tuple(t.to(device) for t in inputs)))
    scale = max((float(t.abs().max()) for t in reference), default=0.0)
    tolerance = _tolerance(used, floor, scale)
    if len(outs) != len(reference) or any(a.shape != b.shape for a, b in zip(outs, reference)):
        raise DeployError("the deployed model's outputs do not have the masked model's shapes")
    diff = max((float((a.float().cpu() - b.float()).abs().max()) for a, b in zip(outs, reference)), default=0.0)
    if not diff <= tolerance:
        raise DeployError(f"the deployed model differs from the masked one by {diff:.3g} (allowed {tolerance:.3g}); "
                          f"forms: {[(r.layer, r.form) for r in reports.values()]}. Deploy with forms=['dense'] "
                          "and report the model.")
    return diff, tolerance
