"""One pruning run, end to end: validate → seed → data → timing (train and prune) → final
evaluation → metrics → output folder.

>>> cfg = ExperimentConfig.from_yaml("experiments/quickstart.yaml")
>>> result = PruningExperiment(cfg).run()
>>> result.metrics["compression_ratio"], result.metrics["test_acc1"]

The final model is whatever the timing returns: its weights were chosen on the validation split
(best epoch of the last training phase); the test split is evaluated only after training phases,
for reporting.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from benchkit.cache import DenseCache, cache_root
from benchkit.config import ConfigError, ExperimentConfig
from benchkit.data import known_shape, load_data
from benchkit.deployment.flops import channel_metrics
from benchkit.deployment.report import run_figures
from benchkit.metrics import layer_metrics, model_metrics
from benchkit.models import build_model
from benchkit.pruning.criteria import CRITERIA
from benchkit.pruning.granularity import GranularityError, get_granularity
from benchkit.pruning.layers import LayerSelectionError, prunable_layers, resolve_patterns
from benchkit.pruning.masks import get_masks
from benchkit.pruning.units import STRUCTURES, StructureError, Units, find_units, restrict
from benchkit.seeding import resolve_device, seed_everything
from benchkit.timing import TIMINGS, RunContext
from benchkit.timing.base import prunes_anything
from benchkit.validation import validate_config


@dataclass
class RunResult:
    """Everything a run produced; what tracking logs and analysis reads back."""

    config: ExperimentConfig
    config_hash: str
    metrics: dict[str, float]  # flat final metrics (see module docstring of benchkit.experiment)
    history: list[dict[str, Any]]  # per-epoch rows with a ``phase`` column
    levels: list[dict[str, Any]]  # per post round / lottery level (+ controls) / gradual update
    layers: pd.DataFrame  # per-layer table (benchkit.metrics.layer_metrics)
    masks: dict[str, torch.Tensor]
    state_dict: dict[str, torch.Tensor]  # the pruned model's state dict, masks included
    timings: dict[str, float]  # seconds per phase kind (dense, prune, finetune, train, eval, total)
    output_dir: Path | None = None
    dense_cache_hit: bool | None = None  # None: the timing uses no dense model
    #: What the run resolved that the config does not say (logged as params): the data's classes, input
    #: shape and split sizes, and the steps its first training phase (the `train` section) really took.
    resolved: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)  # the final model (not serialised)
    notes: list[str] = field(default_factory=list)  # what the pruning decided on its own (logged as a tag)
    collapsed: dict[str, str] = field(default_factory=dict)  # layer -> why it counts as nearly collapsed
    resolved: dict[str, Any] = field(default_factory=dict)  # settings resolved at run time (logged as params)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # per-step figures (MLflow steps)

    def history_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)

    def levels_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.levels)


class PruningExperiment:
    """Execute one :class:`ExperimentConfig`. The config is validated here again (cheap), so a
    config assembled by hand is checked before any data loads."""

    def __init__(self, cfg: ExperimentConfig, *, write: bool = True):
        validate_config(cfg)
        self.cfg = cfg
        self.write = write

    def run(self) -> RunResult:
        """Execute the run. ``threads`` applies to this run only: the process's count is restored after."""
        threads = torch.get_num_threads()
        try:
            if self.cfg.threads:
                torch.set_num_threads(self.cfg.threads)
            return self._run()
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def _run(self) -> RunResult:
        cfg = self.cfg
        start = time.perf_counter()
        device = resolve_device(cfg.device)
        seed_everything(cfg.seed, cfg.deterministic)
        data = load_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.seed)
        ctx = RunContext(cfg=cfg, data=data, device=device, cache=DenseCache(cache_root(cfg)))
        timing = TIMINGS.get(cfg.prune.timing)()
        self._preflight(ctx)
        timing.preflight(ctx)

        model = timing.run(ctx)

        metrics: dict[str, float] = {}
        metrics.update(ctx.evaluate_splits(model))
        with ctx.clock("metrics"):
            metrics.update({k: float(v) for k, v in model_metrics(model, data.input_shape).items()})
            metrics.update({k: float(v) for k, v in channel_metrics(model, data.input_shape).items()})
            layers = layer_metrics(model, data.input_shape)
        if cfg.latency.enabled:  # theory beside practice: the final model deployed and timed (benchkit.deployment)
            with ctx.clock("latency"):
                lat = cfg.latency
                figures, per_layer = run_figures(model, data.input_shape, batch_size=lat.batch_size,
                                                 threads=lat.threads, warmup=lat.warmup, repeats=lat.repeats,
                                                 device=device)
                metrics.update(figures)
                layers = layers.merge(per_layer, on="layer", how="left")
        metrics.update(ctx.metrics)
        metrics["collapsed_layers"] = float(len(ctx.collapsed))
        ctx.timings["total"] = time.perf_counter() - start
        metrics.update({f"time_{k}_s": float(v) for k, v in ctx.timings.items()})
        result = RunResult(
            config=cfg, config_hash=cfg.config_hash(), metrics=metrics, history=ctx.history, levels=ctx.levels,
            layers=layers, masks=get_masks(model), state_dict={k: v.detach().cpu().clone()
                                                               for k, v in model.state_dict().items()},
            timings=dict(ctx.timings), dense_cache_hit=(bool(ctx.metrics["dense_cache_hit"])
                                                        if "dense_cache_hit" in ctx.metrics else None),
            model=model, notes=sorted(ctx.notes), collapsed=dict(ctx.collapsed),
            resolved=resolved_params(cfg, resolved_facts(data, ctx.history), ctx.resolved),
            series={k: list(v) for k, v in ctx.series.items()},
        )
        if self.write:
            result.output_dir = write_result(result, Path(cfg.output_dir) / result.config_hash)
        return result

    def _preflight(self, ctx: RunContext) -> None:
        """Checks that need the model's layer names, run on a throwaway model before any training."""
        model = ctx.build_model()
        check_layers(ctx.cfg, layer_shapes(model), layer_structure(model))


def resolved_facts(data: Any, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Facts of the run that its config leaves open: the loaded data's classes, input shape and split
    sizes, and the optimizer steps of its first training phase (iterations or epochs, early stopping
    included), from the history records' step counter."""
    out: dict[str, Any] = {"data.num_classes": int(data.num_classes), "data.input_shape": list(data.input_shape)}
    out.update({f"data.{split}_samples": int(n) for split, n in data.sizes.items()})
    first = history[0].get("phase") if history else None
    steps = [r["step"] for r in history if r.get("phase") == first and r.get("step") is not None]
    if steps:
        out["train.steps"] = int(max(steps))
    return out


def resolved_params(cfg: ExperimentConfig, facts: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The params a run adds once it ran: facts its config leaves open (:func:`resolved_facts`), and settings
    resolved at run time (``auto`` normalisation, the calibration windows' length...). A setting that is also
    a config param (logged as asked, e.g. ``prune.normalize: auto``) is logged as ``resolved.<key>``: MLflow
    keeps a param's first value, and what was asked and what ran are both worth reading."""
    flat = cfg.flat()
    return {**facts, **{f"resolved.{k}" if k in flat else k: v for k, v in settings.items()}}


def layer_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Weight shape of every prunable layer, by name (what the model-dependent checks need)."""
    return {name: module.weight.shape for name, module in prunable_layers(model).items()}


def layer_structure(model: nn.Module) -> dict[str, Units | str]:
    """For each structure a granularity can be bound to (``attention``: head, ``mlp``: neuron), the model's
    units, or why it has none (what the model-dependent checks need besides the shapes)."""
    out: dict[str, Units | str] = {}
    for structure in STRUCTURES:
        try:
            out[structure] = find_units(model, structure)
        except StructureError as e:
            out[structure] = str(e)
    return out


def check_layers(cfg: ExperimentConfig, shapes: dict[str, torch.Size],
                 structure: dict[str, Units | str] | None = None) -> None:
    """Raise :class:`ConfigError` if a layer pattern matches no prunable layer, every prunable layer is
    excluded from a run that prunes, or the granularity cannot group some pruned layers (all of them named
    at once); ``shapes`` as given by :func:`layer_shapes`, ``structure`` by :func:`layer_structure` (a head or
    neuron granularity needs the model to hold attention modules or MLPs, and exclusions of whole ones)."""
    p = cfg.prune
    names = list(shapes)
    for key, patterns in (("prune.exclude", p.exclude), ("prune.overrides", list(p.overrides)),
                          *_section_patterns(cfg)):
        try:
            resolve_patterns(patterns, names, key)
        except LayerSelectionError as e:
            raise ConfigError(str(e)) from None
    excluded = set(resolve_patterns(p.exclude, names, "prune.exclude"))
    if names and excluded >= set(names) and prunes_anything(p):
        raise ConfigError(f"prune.exclude: {p.exclude} excludes every prunable layer ({', '.join(names)}), so the "
                          "run would prune nothing and report compression 1; exclude fewer layers, or run the dense "
                          "baseline with prune.compression: 1")
    if p.criterion in CRITERIA and (CRITERIA.get(p.criterion).calibrated or p.comparison == "row"):
        conv = [n for n, shape in shapes.items() if n not in excluded and len(shape) != 2]
        if conv:
            raise ConfigError(f"prune.exclude: {p.criterion} prunes Linear layers (as the papers' code); exclude "
                              f"the others: {conv}")
    granularity = get_granularity(p.granularity)
    if granularity.structure is not None and structure is not None and prunes_anything(p):
        units = structure[granularity.structure]
        if isinstance(units, str):
            raise ConfigError(f"prune.granularity: {units}")
        try:
            restrict(units, sorted(excluded), "prune.exclude", granularity.name)
        except StructureError as e:
            raise ConfigError(str(e)) from None  # names prune.exclude
    problems = []
    for name, shape in shapes.items():  # e.g. N:M needs M to divide every pruned layer's input dim
        if name not in excluded:
            try:
                granularity.check_layer(name, shape)
            except GranularityError as e:
                problems.append(str(e))
    if problems:
        raise ConfigError("prune.granularity: " + (problems[0] if len(problems) == 1 else
                          f"{len(problems)} layers do not fit {p.granularity!r}:\n  - " + "\n  - ".join(problems)))


def _section_patterns(cfg: ExperimentConfig) -> list[tuple[str, list[str]]]:
    """Layer globs of the active timing's section (its dict-valued settings, e.g. lottery.layer_rates)."""
    section = cfg.prune.settings
    if section is None:
        return []
    return [(f"prune.{cfg.prune.timing}.{k}", list(v)) for k, v in vars(section).items() if isinstance(v, dict)]


def plan_preflight(cfg: ExperimentConfig, memo: dict[str, Any] | None = None) -> None:
    """The experiment's model-dependent preflight without loading data (sweep planning): raise
    :class:`ConfigError` for a model that cannot be built (e.g. an unknown ``model.kwargs`` key),
    a layer pattern that matches nothing, or a granularity a layer does not fit. Skipped for data
    whose shape is only known once loaded. ``memo`` keeps results across configs: each distinct
    (data shape, model, layer patterns, granularity) is checked once."""
    known = known_shape(cfg.data)
    if known is None:
        return
    shape, classes = known
    classes = 1000 if classes is None else classes  # stand-in, see benchkit.data.KNOWN_SHAPES
    memo = {} if memo is None else memo
    model_key = json.dumps(["model", shape, classes, asdict(cfg.model)], sort_keys=True, default=str)
    if model_key not in memo:
        try:
            with torch.random.fork_rng(devices=[]):  # a throwaway model: leave the caller's RNG alone
                model = build_model(cfg.model, shape, classes)
                memo[model_key] = (layer_shapes(model), layer_structure(model))
        except Exception as e:  # noqa: BLE001 - every run of this model would fail the same way
            memo[model_key] = str(e) if str(e).startswith("model.") else (
                f"model.name: {cfg.model.name!r} cannot be built for data {cfg.data.name!r} (input {list(shape)}, "
                f"{classes} classes): {type(e).__name__}: {e}")
    built = memo[model_key]
    if isinstance(built, str):
        raise ConfigError(built)
    shapes, structure = built
    p = cfg.prune
    key = json.dumps([model_key, p.exclude, sorted(p.overrides), _section_patterns(cfg), p.granularity,
                      prunes_anything(p), p.criterion, p.comparison], default=str)
    if key not in memo:
        try:
            check_layers(cfg, shapes, structure)
            memo[key] = None
        except ConfigError as e:
            memo[key] = str(e)
    if memo[key] is not None:
        raise ConfigError(memo[key])


def write_result(result: RunResult, folder: Path) -> Path:
    """``config.yaml, metrics.json, history.csv, levels.csv, layers.csv, model.pt`` in ``folder``; a run
    with no rounds or levels (``pre``, a dense baseline) has no ``levels.csv``: an empty file is no CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(result.config.to_yaml())
    (folder / "metrics.json").write_text(json.dumps(_json_safe(result.metrics), indent=2, sort_keys=True))
    for name, rows in (("history.csv", result.history), ("levels.csv", result.levels)):
        if rows:
            pd.DataFrame(rows).to_csv(folder / name, index=False)
        else:
            (folder / name).unlink(missing_ok=True)
    result.layers.to_csv(folder / "layers.csv", index=False)
    torch.save(result.state_dict, folder / "model.pt")
    return folder


def _json_safe(metrics: dict[str, float]) -> dict[str, Any]:
    """JSON has no inf/nan: write them as strings ("inf") rather than emitting invalid JSON."""
    return {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else str(v)) for k, v in metrics.items()}
