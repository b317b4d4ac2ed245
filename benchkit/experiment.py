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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from benchkit.cache import DenseCache, cache_root
from benchkit.config import ConfigError, ExperimentConfig
from benchkit.data import load_data
from benchkit.latency import run_latency
from benchkit.metrics import layer_metrics, model_metrics
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
        cfg = self.cfg
        start = time.perf_counter()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
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
            model=model,
        )
        if self.write:
            result.output_dir = write_result(result, Path(cfg.output_dir) / result.config_hash)
        return result

    def _preflight(self, ctx: RunContext) -> None:
        """Checks that need the model's layer names, run on a throwaway model before any training."""
        p = ctx.cfg.prune
        layers = prunable_layers(ctx.build_model())
        names = list(layers)
        for key, patterns in (("prune.exclude", p.exclude), ("prune.overrides", list(p.overrides)),
                              ("prune.lottery.layer_rates", list(p.lottery.layer_rates))):
            try:
                resolve_patterns(patterns, names, key)
            except LayerSelectionError as e:
                raise ConfigError(str(e)) from None
        granularity = get_granularity(p.granularity)
        excluded = set(resolve_patterns(p.exclude, names, "prune.exclude"))
        for name, module in layers.items():  # e.g. N:M needs M to divide every pruned layer's input dim
            if name not in excluded:
                try:
                    granularity.check_layer(name, module.weight.shape)
                except GranularityError as e:
                    raise ConfigError(f"prune.granularity: {e}") from None


def write_result(result: RunResult, folder: Path) -> Path:
    """``config.yaml, metrics.json, history.csv, levels.csv, layers.csv, model.pt`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(result.config.to_yaml())
    (folder / "metrics.json").write_text(json.dumps(_json_safe(result.metrics), indent=2, sort_keys=True))
    pd.DataFrame(result.history).to_csv(folder / "history.csv", index=False)
    pd.DataFrame(result.levels).to_csv(folder / "levels.csv", index=False)
    result.layers.to_csv(folder / "layers.csv", index=False)
    torch.save(result.state_dict, folder / "model.pt")
    return folder


def _json_safe(metrics: dict[str, float]) -> dict[str, Any]:
    """JSON has no inf/nan: write them as strings ("inf") rather than emitting invalid JSON."""
    return {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else str(v)) for k, v in metrics.items()}
