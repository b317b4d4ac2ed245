"""What every timing shares: the run context (data, device, history, phase clocks), the dense
model (trained once, then cached), scoring batches for data-driven criteria, and the conversion of
"reach overall compression C" into the *incremental* compression that :func:`benchkit.prune`
expects (it compounds on the current survivors).

A timing is one file and one registration: a class registered with :func:`register_timing` (in
:data:`TIMINGS`) with ``run(ctx) -> nn.Module`` returning the final pruned model (weights selected on the
validation split), the dataclass of its own settings (``config=``, which becomes the config section
``prune.<name>``, read as ``ctx.cfg.prune.<name>``), an optional ``check(cfg)`` yielding ``(dotted key,
problem)`` pairs that :func:`benchkit.validation.validate_config` reports before any work starts, and an
optional ``preflight(ctx)`` for checks that need the loaded data (run before any training)::

    @dataclass
    class MySettings:
        warmup: int = 100

    @register_timing("mine", config=MySettings)
    class Mine(Timing):
        def run(self, ctx): ...

Reproducibility: the model is built right after seeding (:meth:`RunContext.build_model`), and every
training phase reseeds from (seed, phase name), so a phase never depends on whether an earlier
one ran in this process or came from the dense cache.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from benchkit.cache import DenseCache, DenseEntry, dense_key_material
from benchkit.config import ConfigError, ExperimentConfig, PruneConfig, register_section, stable_hash
from benchkit.models import build_model
from benchkit.pruning.allocation import ALLOCATIONS
from benchkit.pruning.criteria import CRITERIA
from benchkit.pruning.engine import PruneReport, prune
from benchkit.pruning.granularity import get_granularity
from benchkit.pruning.layers import prunable_layers, resolve_patterns
from benchkit.pruning.masks import get_masks, plain_state_dict
from benchkit.pruning.units import find_units, restrict
from benchkit.registry import Registry
from benchkit.seeding import make_generator, seed_everything
from benchkit.tasks import Task, task_of
from benchkit.textdata import external_tokens, random_windows
from benchkit.training import History, evaluate, train

TIMINGS: Registry[type[Timing]] = Registry("timing")


def register_timing(name: str, config: type | None = None):
    """Class decorator: register a :class:`Timing` under ``name``; ``config`` (a dataclass) is its settings
    section ``prune.<name>``, so a new timing needs no edit anywhere else."""

    def add(cls: type[Timing]) -> type[Timing]:
        TIMINGS.register(name, cls)
        cls.name = name.lower()
        if config is not None:
            register_section(name, config)
            cls.Config = config
        return cls

    return add


class CollapseError(RuntimeError):
    """A pruned layer collapsed under ``prune.collapse.strict``."""


class CollapseWarning(UserWarning):
    """A pruned layer kept fewer units or weights than ``prune.collapse`` allows (reported, not refused)."""


class Timing:
    """When pruning happens relative to training. Subclasses implement :meth:`run`."""

    name = "timing"
    Config: type | None = None  # the dataclass of the settings section prune.<name>, if any

    def run(self, ctx: RunContext) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def check(self, cfg: ExperimentConfig) -> Iterator[tuple[str, str]]:
        """Timing-specific config problems as ``(dotted key, message)``; none by default."""
        return iter(())

    def preflight(self, ctx: RunContext) -> None:
        """Checks that need the data or model (e.g. step counts), run before any training."""


# --------------------------------------------------------------------------------------------- context
@dataclass
class RunContext:
    """Everything a timing needs, and where it records what happened (history, levels, clocks)."""

    cfg: ExperimentConfig
    data: Any  # benchkit.data.DataBundle
    device: torch.device
    cache: DenseCache | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    levels: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    metrics: dict[str, float] = field(default_factory=dict)  # extra run metrics (dense_*, cache hit)
    notes: set[str] = field(default_factory=set)  # decisions the engine took on its own (logged as a tag)
    collapsed: dict[str, str] = field(default_factory=dict)  # layer -> why it counts as collapsed (last call)
    resolved: dict[str, Any] = field(default_factory=dict)  # settings resolved at run time (logged as params)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # name -> (training step, value)
    _clock_stack: list[float] = field(default_factory=list, repr=False)
    _evaluations: dict[tuple[int, str], tuple[tuple, dict[str, float]]] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------------------- building blocks
    def build_model(self, seed: int | None = None) -> nn.Module:
        """A freshly initialised model; seeding right before construction makes the init a pure
        function of the seed (the lottery ticket's rewind point and the dense cache rely on it)."""
        seed_everything(self.cfg.seed if seed is None else seed, self.cfg.deterministic)
        return build_model(self.cfg.model, self.data).to(self.device)

    @contextmanager
    def clock(self, kind: str) -> Iterator[None]:
        """Accumulate wall time under ``time_<kind>_s`` (rounds and levels add up per kind). Clocks
        are exclusive: time inside a nested clock (evaluation inside dense training) counts there only."""
        start = time.perf_counter()
        self._clock_stack.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            nested = self._clock_stack.pop()
            self.timings[kind] += elapsed - nested
            if self._clock_stack:
                self._clock_stack[-1] += elapsed

    def fit(self, model: nn.Module, phase: str, *, kind: str = "train", train_cfg=None, **kwargs: Any) -> History:
        """Train ``model`` and append its per-epoch records to the run history under ``phase``.

        Every phase starts from RNG state derived from (seed, phase) — global generators and the
        training loader's shuffling generator — so a phase's data order and dropout never depend on
        what ran before it in this process (e.g. whether the dense model came from the cache)."""
        self.reseed(phase)
        with self.clock(kind):
            history = train(model, self.data, train_cfg or self.cfg.train, device=self.device,
                            progress=self.cfg.progress, desc=phase, **kwargs)
        self.history.extend({**r, "phase": phase} for r in history.records)
        return history

    def reseed(self, phase: str) -> None:
        seed = phase_seed(self.cfg.seed, phase)
        seed_everything(seed, self.cfg.deterministic)
        generator = getattr(self.data.train, "generator", None)
        if generator is not None:
            generator.manual_seed(seed)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Loss/top-1/top-5 (language models: loss, perplexity, bits per character) on ``val`` or ``test``.
        Only ever called outside training, so test numbers are reported and never feed a selection. The same
        model unchanged since its last evaluation on the split (every parameter and buffer the same storage at
        the same version) is not evaluated again: a post-training run's last round and the run's final
        figures are one evaluation (a language model's held-out work costs ~20 s a pass on one core)."""
        state = _state_fingerprint(model)
        memo = self._evaluations.get((id(model), split))
        if memo is not None and memo[0] == state:
            return dict(memo[1])
        with self.clock("eval"):
            result = {k: float(v) for k, v in evaluate(model, getattr(self.data, split), self.device).items()}
        self._evaluations[(id(model), split)] = (state, result)
        return dict(result)

    def evaluate_splits(self, model: nn.Module, prefix: str = "") -> dict[str, float]:
        out = {}
        for split in ("val", "test"):
            if getattr(self.data, split) is None:  # data.val_fraction 0: no validation split
                continue
            out.update({f"{prefix}{split}_{k}": v for k, v in self.evaluate(model, split).items()})
        return out

    def total_steps(self) -> int:
        """Optimizer steps of the main training run (iterations, or epochs × batches per epoch)."""
        t = self.cfg.train
        return t.iterations if t.iterations is not None else t.epochs * len(self.data.train)

    # ---------------------------------------------------------------------------- pruning
    def scoring_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """``score_batches`` training batches of ``score_batch_size`` for data-driven criteria, drawn
        with a generator seeded from the run seed (same seed → same batches → same masks)."""
        p = self.cfg.prune
        if not _needs_data(CRITERIA.get(p.criterion)):
            return None
        loader = DataLoader(self.data.train.dataset, batch_size=p.score_batch_size, shuffle=True,
                            generator=make_generator(self.cfg.seed))
        return [(x.to(self.device), y.to(self.device)) for x, y in itertools.islice(loader, p.score_batches)]

    def calibration_inputs(self) -> list[torch.Tensor]:
        """``prune.calibration.samples`` inputs for the one-shot methods that read activations (Wanda,
        SparseGPT, OWL), drawn with a generator seeded from the run seed: for text, windows of
        ``calibration.length`` tokens (default ``data.context``) at random starts of the training text (or of
        the .txt files of ``calibration.source``), as both papers sample their calibration set; for images,
        random training examples. In batches of at most 32."""
        c = self.cfg.prune.calibration
        generator = make_generator(phase_seed(self.cfg.seed, "calibration"))
        if self.data.task == "language_model":
            length = c.length or self.cfg.data.context
            tokens = self.data.train.tokens if c.source == "train" else external_tokens(c.source, self.data)
            x = random_windows(tokens, c.samples, length, generator)
            self.resolved.update({"prune.calibration.length": length})
        else:
            if c.source != "train":
                raise ConfigError(f"prune.calibration.source: {c.source!r} — image data calibrates on 'train' only")
            dataset = self.data.train.dataset
            rows = torch.randperm(len(dataset), generator=generator)[: c.samples]
            x = torch.stack([dataset[int(i)][0] for i in rows])
        self.resolved.update({"prune.calibration.samples": int(x.shape[0])})
        return [chunk.to(self.device) for chunk in x.split(32)]

    def prune(self, model: nn.Module, compression: float | None, overrides: dict[str, float] | None = None,
              *, criterion: str | None = None, allocation: str | None = None, seed: int | None = None,
              regrow: bool = False) -> PruneReport:
        """One call of the engine with the run's criterion/granularity/allocation/exclusions. Layers the
        call leaves (nearly) collapsed are reported (``prune.collapse``), or refused when it is strict."""
        p = self.cfg.prune
        criterion = criterion or p.criterion
        crit, alloc = CRITERIA.get(criterion), ALLOCATIONS.get(allocation or p.allocation)
        data_kw: dict[str, Any] = {"input_shape": tuple(self.data.input_shape)}  # data-free SynFlow
        if criterion == p.criterion and _needs_data(crit) and not crit.calibrated:
            batches = self.scoring_batches()  # (x, y) pairs: a loss is computed (OWL reads their inputs)
        elif crit.calibrated or alloc.needs_data:
            batches = self.calibration_inputs()
        else:
            batches = None
        if batches:
            data_kw.update(loader=batches, score_batches=len(batches))
        if compression is None and not is_n_m(p.granularity):
            compression = 1.0  # only overridden layers are pruned
        was_training = model.training
        with self.clock("prune"):
            report = prune(model, compression=compression, criterion=criterion, granularity=p.granularity,
                           allocation=allocation or p.allocation, normalize=p.normalize, exclude=list(p.exclude),
                           overrides=dict(p.overrides if overrides is None else overrides), reduce=p.reduce,
                           iterations=p.iterations, seed=self.cfg.seed if seed is None else seed,
                           keep_outputs=p.keep_outputs, regrow=regrow, comparison=p.comparison, **data_kw)
        model.train(was_training)
        self.note_report(report)
        return report

    def note_report(self, report: PruneReport) -> None:
        """Record what a pruning call decided on its own (outputs kept, normalisation) and the layers it left
        (nearly) collapsed; with ``prune.collapse.strict`` a collapsed layer stops the run."""
        c = self.cfg.prune.collapse
        self.notes.update(report.notes)
        self.resolved["prune.normalize"] = report.normalize
        collapsed = report.collapsed(c.min_units, c.min_relative_density)
        for row in collapsed:
            what = (f"layer {row['name']!r} is nearly collapsed: {row['kept_after']} of {row['total']} weights, "
                    f"{row['units_alive']} of {row['units']} output units alive")
            if c.strict:
                raise CollapseError(f"{what} (prune.collapse.strict). Lower the compression, exclude the layer, "
                                    "use another allocation, or set prune.collapse.strict: false to only report it")
            if row["name"] not in self.collapsed:
                warnings.warn(what, CollapseWarning, stacklevel=2)
            self.collapsed[row["name"]] = what

    def prune_to(self, model: nn.Module, target: float, override_targets: dict[str, float] | None = None,
                 **kwargs: Any) -> PruneReport | None:
        """Prune until the pruned set reaches overall compression ``target`` (and each overridden
        layer its own target), whatever pruning happened before. ``None`` if nothing to prune."""
        compression, overrides = catch_up(model, self.cfg.prune, target, override_targets)
        if compression <= 1.0 and all(c <= 1.0 for c in overrides.values()):
            return None
        return self.prune(model, compression, overrides, **kwargs)

    # ---------------------------------------------------------------------------- dense model
    def dense(self, capture_steps: Iterable[int] = ()) -> tuple[nn.Module, DenseEntry]:
        """The trained dense model, from the cache when an identical one was trained before. Its
        history joins the run as phase ``dense``; its val/test metrics become ``dense_*``.
        ``capture_steps``: weights after these training steps are kept too (lottery rewinding)."""
        capture_steps = sorted(set(capture_steps))

        def create() -> DenseEntry:
            model = self.build_model()
            capture = CaptureWeights(model, capture_steps)
            history = self.fit(model, "dense", kind="dense", callbacks=[capture])
            return DenseEntry(state_dict=plain_state_dict(model), history=dataclasses.asdict(history),
                              metrics=self.evaluate_splits(model, "dense_"), checkpoints=capture.states)

        def usable(entry: DenseEntry) -> bool:
            """Has every requested checkpoint, or stopped early before it: retraining the same key
            would stop at the same step again (the caller reports the missing checkpoint)."""
            ended = entry.history.get("steps") if entry.history.get("stopped_early") else None
            return all(s in entry.checkpoints or (ended is not None and s > ended) for s in capture_steps)

        with self.clock("dense"):
            if self.cache is None:
                entry = create()
            else:  # the key (an image folder's fingerprint stats every file) only where a cache is read
                entry = self.cache.get_or_create(dense_key_material(self.cfg, self.device.type), create, usable)
        if entry.hit:  # the fresh-training path already recorded its history
            self.history.extend({**r, "phase": "dense"} for r in entry.history["records"])
        model = self.build_model()
        model.load_state_dict(entry.state_dict)
        self.metrics.update(entry.metrics)
        self.metrics["dense_cache_hit"] = float(entry.hit)
        return model, entry


def _state_fingerprint(model: nn.Module) -> tuple:
    """Where and at which version every parameter and buffer is: any in-place change (a training step,
    pruning, a loaded state dict) bumps a tensor's version; a replaced tensor has another storage."""
    return tuple((name, t.data_ptr(), t._version, tuple(t.shape))
                 for name, t in model.state_dict(keep_vars=True).items()) + (str(next(model.parameters()).device),)


def phase_seed(seed: int, phase: str) -> int:
    """A seed for one training phase of a run, e.g. (0, "finetune_r2")."""
    return int(stable_hash([seed, phase], length=8), 16)


def _needs_data(criterion: Any) -> bool:
    return bool(getattr(criterion, "needs_data", False))


class CaptureWeights:
    """Training callback keeping a copy of the plain weights right after the given steps."""

    def __init__(self, model: nn.Module, steps: Iterable[int]):
        self.model, self.steps = model, set(steps)
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if step in self.steps:
            self.states[step] = {k: v.detach().cpu() for k, v in plain_state_dict(model).items()}


class BestAfter:
    """Best-validation selection restricted to evaluations at or after ``step`` (gradual pruning:
    an earlier, less sparse checkpoint must never be selected), by the task's selection (top-1 accuracy,
    or a language model's loss). Restore with :meth:`restore`."""

    def __init__(self, model: nn.Module, step: int, task: Task | None = None):
        self.model, self.step = model, step
        self.task = task if task is not None else task_of(None)
        self.best, self.best_step, self.state = None, None, None

    def on_eval(self, step: int, record: dict[str, Any]) -> None:
        key = self.task.selection[0]
        value = record.get(f"val_{key}")
        if step >= self.step and value is not None and self.task.better({key: value}, self.best):
            self.best, self.best_step = value, step
            self.state = copy.deepcopy(self.model.state_dict())

    def restore(self) -> int | None:
        if self.state is not None:
            self.model.load_state_dict(self.state)
        return self.best_step


@torch.no_grad()
def zero_pruned_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum/Adam moments at pruned entries, so a pruned weight's stored value stays exactly
    zero (the forward pass masks it anyway; this keeps ``_orig`` honest for rewinding and release)."""
    for path, mask in get_masks(model).items():
        mod_name, _, pname = path.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        param = getattr(module, f"{pname}_orig")
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.mul_(mask.to(value.device))


# --------------------------------------------------------------------------------------------- targets
def pruned_groups(model: nn.Module, p: PruneConfig) -> tuple[list[str], dict[str, float]]:
    """Layer names of the jointly-pruned set, and each overridden layer with its compression."""
    names = list(prunable_layers(model))
    excluded = set(resolve_patterns(p.exclude, names, "prune.exclude"))
    gran = get_granularity(p.granularity)
    if gran.structure is not None:
        return _unit_groups(model, p, gran.structure, gran.name, names, excluded)
    if p.keep_outputs and gran.removes_outputs:
        excluded.add(names[-1])  # as the engine does: the output layer's units are the outputs
    overrides = per_layer_values(p.overrides, names, excluded, "prune.overrides")
    main = [n for n in names if n not in excluded and n not in overrides]
    return main, overrides


def _unit_groups(model: nn.Module, p: PruneConfig, structure: str, granularity: str, names: list[str],
                 excluded: set[str]) -> tuple[list[str], dict[str, float]]:
    """:func:`pruned_groups` for heads and MLP neurons, as the engine prunes them: the pruned set is every
    layer of the units pruned jointly (a head's q/k/v/out shrink together), overrides are keyed by each
    unit's anchor (q_proj, fc), whichever of its layers the pattern names."""
    units = find_units(model, structure)
    skipped = set(restrict(units, sorted(excluded), "prune.exclude", granularity))
    anchor_of = units.anchor_of()
    overrides: dict[str, float] = {}
    for pattern, value in p.overrides.items():
        for name in resolve_patterns([pattern], names, "prune.overrides"):
            anchor = anchor_of.get(name)
            if anchor is not None and anchor not in skipped:
                overrides.setdefault(anchor, float(value))
    members = {a: units.coupled[a].layers if a in units.coupled else (a,) for a in units.anchors}
    main = [m for a in units.anchors if a not in skipped and a not in overrides for m in members[a]]
    return main, overrides


def per_layer_values(by_glob: dict[str, float], names: list[str], excluded: set[str], key: str) -> dict[str, float]:
    """Layer glob → value (``prune.overrides``, ``lottery.layer_rates``) resolved to layer names, the first
    matching glob winning. A glob also matching excluded layers skips them: ``fc*`` with ``exclude: [fc3]``
    means the fc layers that are pruned."""
    values: dict[str, float] = {}
    for pattern, v in by_glob.items():
        for name in resolve_patterns([pattern], names, key):
            if name not in excluded:
                values.setdefault(name, float(v))
    return values


def weight_density(model: nn.Module, names: Iterable[str]) -> tuple[int, int]:
    """(surviving weights, total weights) over the given layers, from their masks."""
    masks = get_masks(model)
    layers = prunable_layers(model)
    kept = total = 0
    for name in names:
        weight = layers[name].weight
        total += weight.numel()
        mask = masks.get(f"{name}.weight")
        kept += int(mask.sum()) if mask is not None else weight.numel()
    return kept, total


def catch_up(model: nn.Module, p: PruneConfig, target: float,
             override_targets: dict[str, float] | None = None) -> tuple[float, dict[str, float]]:
    """Incremental compressions that take the current model to overall ``target`` over the pruned set
    (the allocation then splits it: per-layer allocations aim every layer at its share of ``1/target``) and
    each layer of ``override_targets`` (default: the config's overrides) to its own overall target. Because
    the engine prunes ``round(s · survivors)``, asking for ``c = target · kept / total`` removes exactly
    ``kept − total/target`` weights: no drift over rounds."""
    main, overridden = pruned_groups(model, p)
    targets = dict(overridden if override_targets is None else override_targets)
    main = [n for n in main if n not in targets]
    overrides: dict[str, float] = {}
    for name, layer_target in targets.items():
        kept, total = weight_density(model, [name])
        overrides[name] = max(1.0, layer_target * kept / total)
    kept, total = weight_density(model, main)
    return (max(1.0, target * kept / total) if total else 1.0), overrides


def is_n_m(granularity: str) -> bool:
    """``"2:4"``-style granularities fix the compression themselves (M/N per layer)."""
    return ":" in str(granularity)


def prunes_anything(p: PruneConfig) -> bool:
    """False for the dense baseline (no compression, no overrides, not N:M)."""
    target = p.target_compression()
    return is_n_m(p.granularity) or bool(p.overrides) or (target is not None and target > 1.0)


def compression_summary(model: nn.Module, p: PruneConfig) -> dict[str, float]:
    """Compression of the jointly pruned set, and compression/percent remaining over all prunable
    weights (the figure LTH plots)."""
    main, _ = pruned_groups(model, p)
    kept, total = weight_density(model, main)
    all_kept, all_total = weight_density(model, prunable_layers(model))
    return {"compression": total / kept if kept else float("inf"),
            "compression_ratio": all_total / all_kept if all_kept else float("inf"),
            "percent_remaining": 100.0 * all_kept / all_total}
