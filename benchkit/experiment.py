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
from benchkit.latency import run_latency
from benchkit.metrics import layer_metrics, model_metrics
from benchkit.models import build_model
from benchkit.pruning.granularity import GranularityError, get_granularity
from benchkit.pruning.layers import LayerSelectionError, prunable_layers, resolve_patterns
from benchkit.pruning.masks import get_masks
from benchkit.seeding import resolve_device, seed_everything
from benchkit.timing import TIMINGS, RunContext


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

    def history_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)

    def levels_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.levels)


class PruningExperiment:
    """Execute one :class:`ExperimentConfig`. The config is validated here again (cheap), so a
    config assembled by hand is checked before any data loads."""

    def __init__(self, cfg: ExperimentConfig, *, write: bool = True):
        cfg.validate()
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
            layers = layer_metrics(model, data.input_shape)
        if cfg.latency.enabled:
            with ctx.clock("latency"):
                lat = cfg.latency
                metrics.update(run_latency(model, data.input_shape, batch_size=lat.batch_size, threads=lat.threads,
                                           warmup=lat.warmup, repeats=lat.repeats, device=device))
        metrics.update(ctx.metrics)
        ctx.timings["total"] = time.perf_counter() - start
        metrics.update({f"time_{k}_s": float(v) for k, v in ctx.timings.items()})
        result = RunResult(
            config=cfg, config_hash=cfg.config_hash(), metrics=metrics, history=ctx.history, levels=ctx.levels,
            layers=layers, masks=get_masks(model), state_dict={k: v.detach().cpu().clone()
                                                               for k, v in model.state_dict().items()},
            timings=dict(ctx.timings), dense_cache_hit=(bool(ctx.metrics["dense_cache_hit"])
                                                        if "dense_cache_hit" in ctx.metrics else None),
            model=model, resolved=resolved_facts(data, ctx.history),
        )
        if self.write:
            result.output_dir = write_result(result, Path(cfg.output_dir) / result.config_hash)
        return result

    def _preflight(self, ctx: RunContext) -> None:
        """Checks that need the model's layer names, run on a throwaway model before any training."""
        check_layers(ctx.cfg, layer_shapes(ctx.build_model()))


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


def layer_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Weight shape of every prunable layer, by name (what the model-dependent checks need)."""
    return {name: module.weight.shape for name, module in prunable_layers(model).items()}


def check_layers(cfg: ExperimentConfig, shapes: dict[str, torch.Size]) -> None:
    """Raise :class:`ConfigError` if a layer pattern matches no prunable layer or the granularity
    cannot group a pruned layer; ``shapes`` as given by :func:`layer_shapes`."""
    p = cfg.prune
    names = list(shapes)
    for key, patterns in (("prune.exclude", p.exclude), ("prune.overrides", list(p.overrides)),
                          ("prune.lottery.layer_rates", list(p.lottery.layer_rates))):
        try:
            resolve_patterns(patterns, names, key)
        except LayerSelectionError as e:
            raise ConfigError(str(e)) from None
    granularity = get_granularity(p.granularity)
    excluded = set(resolve_patterns(p.exclude, names, "prune.exclude"))
    for name, shape in shapes.items():  # e.g. N:M needs M to divide every pruned layer's input dim
        if name not in excluded:
            try:
                granularity.check_layer(name, shape)
            except GranularityError as e:
                raise ConfigError(f"prune.granularity: {e}") from None


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
                memo[model_key] = layer_shapes(build_model(cfg.model, shape, classes))
        except Exception as e:  # noqa: BLE001 - every run of this model would fail the same way
            memo[model_key] = str(e) if str(e).startswith("model.") else (
                f"model.name: {cfg.model.name!r} cannot be built for data {cfg.data.name!r} (input {list(shape)}, "
                f"{classes} classes): {type(e).__name__}: {e}")
    shapes = memo[model_key]
    if isinstance(shapes, str):
        raise ConfigError(shapes)
    p = cfg.prune
    key = json.dumps([model_key, p.exclude, sorted(p.overrides), sorted(p.lottery.layer_rates), p.granularity],
                     default=str)
    if key not in memo:
        try:
            check_layers(cfg, shapes)
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
