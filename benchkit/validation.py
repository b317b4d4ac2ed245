"""Value checks on a whole config, across registries, before any data loads or anything trains.

:func:`validate_config` collects every problem and raises one :class:`ConfigError` listing them, each
naming the dotted key, its YAML line when known, and the allowed values or the fix. Types and unknown keys
are checked earlier by :mod:`benchkit.config` (which knows no registry: it sits below them); checks that
need the model (layer globs) run in the experiment's preflight. :func:`load_config` reads and validates.

Decisions documented here:

* A timing's own settings live in its section ``prune.<timing>`` and are checked by the timing's
  ``check``. Fields a section marks ``exclusive`` (``prune.post.rounds``, ``prune.post.lr_rewind``,
  ``prune.post.distill.enabled``, ``prune.during.soft``, ``prune.lottery.rate/layer_rates/
  rewind_iteration/controls``...) are refused when set under another timing: they would be silently
  ignored. The plain settings of a procedure (``prune.post.finetune.*``, ``prune.during.start/end/every``,
  ``prune.lottery.levels``) are accepted with every timing, so one sweep base can serve a ``zip`` over
  timings (``experiments/timing.yaml``); only the active timing's section is logged and hashed.
* ``train.nesterov`` with only adam/adamw, and ``train.milestones`` with no ``multistep`` schedule
  (``train.schedule``, or post's ``prune.post.finetune.schedule``) are refused.
* ``N:M`` fixes the compression at M/N: ``compression`` must be unset or M/N, and it cannot be
  reached gradually (``during``) nor compounded (``lottery``, ``rounds > 1``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchkit.config import ConfigError, ExperimentConfig, PruneConfig, read_run_yaml, where
from benchkit.data import DATASETS
from benchkit.models import INITS, MODELS, torchvision_names
from benchkit.pruning.allocation import ALLOCATIONS, NORMALIZERS
from benchkit.pruning.criteria import CRITERIA
from benchkit.pruning.granularity import REDUCTIONS, get_granularity, signed_reduce_problem
from benchkit.timing import TIMINGS
from benchkit.training import OPTIMIZERS, SCHEDULES

Problem = tuple[str, str]  # (dotted key, what is wrong and how to fix it)
Check = Callable[[ExperimentConfig], Iterator[Problem]]
CHECKS: list[Check] = []

DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def check(fn: Check) -> Check:
    CHECKS.append(fn)
    return fn


def load_config(source: str | Path | dict[str, Any], overrides: dict[str, Any] | list[str] | None = None, *,
                lines: dict[str, int] | None = None) -> ExperimentConfig:
    """Read a config (a YAML path, or a dict) with dotted overrides, and validate it: the one call that
    gives a config ready to run (``bk.load_config("experiments/quickstart.yaml", ["seed=1"])``)."""
    if isinstance(source, dict):
        cfg = ExperimentConfig.from_dict(source, overrides, lines=lines)
    else:
        data, lines = read_run_yaml(source)
        cfg = ExperimentConfig.from_dict(data, overrides, lines=lines)
    validate_config(cfg, lines)
    return cfg


def validate_config(cfg: ExperimentConfig, lines: dict[str, int] | None = None) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg`` (nothing when it is valid)."""
    lines = lines or {}
    problems: list[Problem] = []
    for fn in CHECKS:
        problems.extend(fn(cfg))
    if problems:
        msgs = [f"{key}{where(key, lines)}: {msg}" for key, msg in problems]
        raise ConfigError(msgs[0] if len(msgs) == 1 else "invalid config:\n  - " + "\n  - ".join(msgs))


def _unknown(kind: str, value: Any, allowed: list[str], extra: str = "") -> str:
    return f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}{extra}"


# --------------------------------------------------------------------------------------------- names
@check
def names(cfg: ExperimentConfig) -> Iterator[Problem]:
    if cfg.data.name not in DATASETS:
        yield "data.name", _unknown("dataset", cfg.data.name, DATASETS.names())
    if cfg.model.name not in MODELS and cfg.model.name not in torchvision_names():
        yield "model.name", _unknown("model", cfg.model.name, MODELS.names(),
                                     " (or any torchvision classification model, e.g. resnet18)")
    if cfg.model.init != "default" and cfg.model.init not in INITS:
        yield "model.init", _unknown("init", cfg.model.init, ["default", *INITS.names()])
    finetune = cfg.prune.post.finetune if "post" in PruneConfig.SECTIONS else None
    for key, value in (("train.optimizer", cfg.train.optimizer),
                       ("prune.post.finetune.optimizer", finetune.optimizer if finetune else None)):
        if value is not None and value not in OPTIMIZERS:
            yield key, _unknown("optimizer", value, OPTIMIZERS.names())
    for key, value in (("train.schedule", cfg.train.schedule),
                       ("prune.post.finetune.schedule", finetune.schedule if finetune else None)):
        if value is not None and value not in SCHEDULES:
            yield key, _unknown("schedule", value, SCHEDULES.names())
    if cfg.prune.timing not in TIMINGS:
        yield "prune.timing", _unknown("timing", cfg.prune.timing, TIMINGS.names())
    if cfg.prune.criterion not in CRITERIA:
        yield "prune.criterion", _unknown("criterion", cfg.prune.criterion, CRITERIA.names())
    if cfg.prune.allocation not in ALLOCATIONS:
        yield "prune.allocation", _unknown("allocation", cfg.prune.allocation, ALLOCATIONS.names(),
                                           " (prune.scope: layer is allocation: uniform)")
    if cfg.prune.normalize not in NORMALIZERS:
        yield "prune.normalize", _unknown("normalization", cfg.prune.normalize, list(NORMALIZERS))
    yield from _comparison(cfg)
    if cfg.prune.reduce not in REDUCTIONS:
        yield "prune.reduce", _unknown("reduction", cfg.prune.reduce, list(REDUCTIONS))
    elif cfg.prune.criterion in CRITERIA:
        try:
            gran = get_granularity(cfg.prune.granularity)
        except ValueError:
            gran = None  # reported by _granularity below
        crit = CRITERIA.get(cfg.prune.criterion)
        problem = gran is not None and signed_reduce_problem(cfg.prune.criterion, crit.signed, gran, cfg.prune.reduce)
        if problem:
            yield "prune.reduce", problem
    if not DEVICE.match(str(cfg.device).lower()):
        yield "device", f"invalid device {cfg.device!r}; allowed: auto, cpu, cuda, cuda:N, mps"
    yield from _granularity(cfg)


def _comparison(cfg: ExperimentConfig) -> Iterator[Problem]:
    """Per-row comparison and the calibrated one-shot methods (wanda, sparsegpt) prune within each layer."""
    p = cfg.prune
    if p.comparison not in ("auto", "layer", "row"):
        yield "prune.comparison", _unknown("comparison", p.comparison, ["auto", "layer", "row"])
        return
    if p.criterion not in CRITERIA:
        return
    crit = CRITERIA.get(p.criterion)
    if not (crit.calibrated or p.comparison == "row"):
        return
    if p.comparison == "row" and p.criterion not in ("magnitude", "wanda", "sparsegpt"):
        yield "prune.comparison", f"'row' is defined for magnitude, wanda and sparsegpt, not {p.criterion!r}"
    if p.allocation in ALLOCATIONS and ALLOCATIONS.get(p.allocation).joint:
        yield "prune.allocation", (f"{p.criterion} compares weights within each layer (row by row), so "
                                   f"{p.allocation!r} (one ranking across layers) does not apply; use uniform (the "
                                   "papers) or owl, or another per-layer allocation")
    if p.granularity not in ("element",) and ":" not in str(p.granularity):
        yield "prune.granularity", f"{p.criterion} prunes single weights or N:M groups, not {p.granularity!r}"
    c = p.calibration
    if c.samples < 1:
        yield "prune.calibration.samples", f"must be >= 1, got {c.samples}"
    if c.length is not None and c.length < 1:
        yield "prune.calibration.length", f"must be >= 1 tokens, got {c.length}"


def _granularity(cfg: ExperimentConfig) -> Iterator[Problem]:
    g = cfg.prune.granularity
    try:
        gran = get_granularity(g)
    except ValueError as e:  # UnknownNameError lists the names; GranularityError explains N:M syntax
        yield "prune.granularity", f"{e}"
        return
    fixed = getattr(gran, "compression", None)  # N:M: M/N per layer
    sparsity = cfg.prune.sparsity
    target = None if sparsity is not None and not 0 <= sparsity < 1 else cfg.prune.target_compression()
    if fixed is not None and target is not None and not math.isclose(target, fixed, rel_tol=1e-9):
        key = "prune.compression" if cfg.prune.compression is not None else "prune.sparsity"
        yield key, f"granularity {g!r} fixes the compression at M/N = {fixed:g}; leave it unset or set it to {fixed:g}"


# --------------------------------------------------------------------------------------------- numbers
@check
def compression(cfg: ExperimentConfig) -> Iterator[Problem]:
    p = cfg.prune
    if p.compression is not None and p.sparsity is not None:
        yield "prune.compression", "set either prune.compression or prune.sparsity, not both"
    if p.compression is not None and not (p.compression >= 1.0 and math.isfinite(p.compression)):
        yield "prune.compression", (f"must be a ratio >= 1 (total / non-zero weights; 1 = dense), "
                                    f"got {p.compression}")
    if p.sparsity is not None and not 0.0 <= p.sparsity < 1.0:
        yield "prune.sparsity", f"must be in [0, 1), got {p.sparsity}"
    for pattern, c in p.overrides.items():
        if not (c >= 1.0 and math.isfinite(c)):
            yield "prune.overrides", f"compression of {pattern!r} must be a ratio >= 1, got {c}"
    if p.iterations is not None and p.iterations < 1:
        yield "prune.iterations", f"must be >= 1 scoring iterations, got {p.iterations}"
    needs_data = _criterion_needs_data(p.criterion)
    if needs_data and p.score_batch_size < 1:
        yield "prune.score_batch_size", f"criterion {p.criterion!r} scores on data; must be >= 1"
    if needs_data and p.score_batches < 1:
        yield "prune.score_batches", f"criterion {p.criterion!r} scores on data; must be >= 1"


def _criterion_needs_data(name: str) -> bool:
    return name in CRITERIA and bool(getattr(CRITERIA.get(name), "needs_data", False))


@check
def training(cfg: ExperimentConfig) -> Iterator[Problem]:
    t = cfg.train
    if not t.lr > 0:
        yield "train.lr", f"must be > 0, got {t.lr}"
    if t.iterations is not None and t.iterations < 1:
        yield "train.iterations", f"must be >= 1, got {t.iterations}"
    if t.iterations is None and t.epochs < 1:
        yield "train.epochs", f"must be >= 1, got {t.epochs}"
    for key in ("batch_size", "eval_batch_size"):
        if getattr(t, key) < 1:
            yield f"train.{key}", f"must be >= 1, got {getattr(t, key)}"
    if not 0.0 <= t.momentum < 1.0:
        yield "train.momentum", f"must be in [0, 1), got {t.momentum}"
    if t.weight_decay < 0:
        yield "train.weight_decay", f"must be >= 0, got {t.weight_decay}"
    if t.eval_every is not None and t.eval_every < 1:
        yield "train.eval_every", f"must be >= 1 iterations, got {t.eval_every}"
    if t.patience is not None and t.patience < 1:
        yield "train.patience", f"must be >= 1 evaluations, got {t.patience}"
    optimizers, schedules = _optimizers_used(cfg), _schedules_used(cfg)
    if t.nesterov and optimizers and optimizers <= IGNORE_NESTEROV:
        yield "train.nesterov", (f"only applies to optimizer sgd; {' and '.join(sorted(optimizers))} ignore it: "
                                 "remove train.nesterov or use train.optimizer: sgd")
    elif t.nesterov and t.momentum <= 0:
        yield "train.nesterov", (f"needs train.momentum > 0, got momentum={t.momentum}; set a momentum "
                                 "(e.g. 0.9) or remove train.nesterov")
    if "step" in schedules and t.step_size < 1:
        yield "train.step_size", (f"schedule 'step' needs a step size > 0 (epochs, or iterations when training "
                                  f"by iterations), got {t.step_size}")
    if "multistep" in schedules and not t.milestones:
        yield "train.milestones", "schedule 'multistep' needs milestones, e.g. [80, 120]"
    if t.milestones and "multistep" not in schedules:
        yield "train.milestones", (f"only used by schedule 'multistep', but train.schedule is {t.schedule!r}; "
                                   "remove train.milestones or set train.schedule: multistep")
    d = cfg.data
    if d.val_size is None and not 0.0 <= d.val_fraction < 1.0:
        yield "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}"
    if d.val_size is not None and d.val_size < 0:
        yield "data.val_size", f"must be >= 0, got {d.val_size}"
    if d.image_size < 1:
        yield "data.image_size", f"must be >= 1 pixels, got {d.image_size}"
    for key in ("mean", "std"):
        value = getattr(d, key)
        if value is not None and len(value) != 3:
            yield f"data.{key}", f"needs one value per RGB channel (3), got {value}"
    if d.std is not None and any(v <= 0 for v in d.std):
        yield "data.std", f"must be > 0 per channel, got {d.std}"
    if d.train_subset is not None and d.train_subset < 1:
        yield "data.train_subset", f"must be >= 1 examples, got {d.train_subset}"
    if cfg.threads is not None and cfg.threads < 1:
        yield "threads", f"must be >= 1, got {cfg.threads}"
    lat = cfg.latency
    for key, value, low in (("batch_size", lat.batch_size, 1), ("threads", lat.threads, 1),
                            ("warmup", lat.warmup, 0), ("repeats", lat.repeats, 1)):
        if value is not None and value < low:
            yield f"latency.{key}", f"must be >= {low}, got {value}"


@check
def text_data(cfg: ExperimentConfig) -> Iterator[Problem]:
    """The ``text`` dataset's keys; set on other data they would be silently ignored, so they are refused."""
    from benchkit.config import DataConfig
    from benchkit.textdata import TOKENIZERS

    d, default = cfg.data, DataConfig()
    if d.name != "text":
        for key in ("tokenizer", "context", "stride", "val_works", "test_works", "eval_subset"):
            if getattr(d, key) != getattr(default, key):
                yield f"data.{key}", (f"only applies to data.name 'text', but data.name is {d.name!r}; "
                                      "remove it or use text data")
        return
    if d.tokenizer not in TOKENIZERS:
        yield "data.tokenizer", _unknown("tokenizer", d.tokenizer, TOKENIZERS.names())
    if d.context < 1:
        yield "data.context", f"must be a positive number of tokens, got {d.context}"
    elif d.stride is not None and not 1 <= d.stride <= d.context:
        yield "data.stride", f"must be in [1, data.context={d.context}] tokens, got {d.stride}"
    if d.eval_subset is not None and d.eval_subset < 2:
        yield "data.eval_subset", f"must be >= 2 characters (one token scored needs two), got {d.eval_subset}"
    for key in ("val_works", "test_works"):
        if not getattr(d, key):
            yield f"data.{key}", "must name at least one work (a title or file name) to hold out"


# Built-in optimizers without a Nesterov variant (registered ones may read train.nesterov).
IGNORE_NESTEROV = frozenset({"adam", "adamw"})


def _post_finetune(cfg: ExperimentConfig) -> Any:
    """post's fine-tuning settings when the run is a post run that fine-tunes with its own optimiser/schedule."""
    if cfg.prune.timing != "post" or cfg.prune.post.lr_rewind:
        return None
    return cfg.prune.post.finetune


def _optimizers_used(cfg: ExperimentConfig) -> set[str]:
    """Optimizers the run trains with: train.optimizer, and post's fine-tuning optimizer."""
    used = {cfg.train.optimizer}
    ft = _post_finetune(cfg)
    if ft is not None and ft.optimizer is not None:
        used.add(ft.optimizer)
    return used


def _schedules_used(cfg: ExperimentConfig) -> set[str]:
    """Schedules the run trains with (fine-tuning reads train.step_size/milestones/gamma too)."""
    used = {cfg.train.schedule}
    ft = _post_finetune(cfg)
    if ft is not None and ft.schedule is not None:
        used.add(ft.schedule)
    return used


# --------------------------------------------------------------------------------------------- timings
def exclusive_settings(section: Any, prefix: str) -> Iterator[str]:
    """Dotted keys of ``section``'s fields marked ``exclusive`` that are set away from their default
    (nested sections recursed: ``prune.post.distill.enabled``)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from exclusive_settings(value, f"{prefix}{f.name}.")
        elif f.metadata.get("exclusive"):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value != default:
                yield f"{prefix}{f.name}"


@check
def timing(cfg: ExperimentConfig) -> Iterator[Problem]:
    t = cfg.prune.timing
    for name in PruneConfig.SECTIONS:
        if name == t:
            continue
        for key in exclusive_settings(getattr(cfg.prune, name), f"prune.{name}."):
            yield key, (f"only applies to timing {name}, but prune.timing is {t!r}; remove it or change the timing")
    if t in TIMINGS and not list(compression(cfg)):  # timing checks may rely on a sane target
        yield from TIMINGS.get(t)().check(cfg)
