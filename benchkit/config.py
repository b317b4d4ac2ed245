"""Experiment description as dataclasses (OpenLTH-style hparams), loaded from YAML or dicts.

The config *describes* a run; :mod:`benchkit.experiment` *executes* it. Every key has a default,
unknown keys and wrong types are refused with the dotted key (and YAML line) named, and
``config_hash`` identifies a run for resuming sweeps and caching dense models.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchkit.plugins import PluginError, load_plugins, resolve_specs


class ConfigError(ValueError):
    """A config problem found before any work starts. The message names the key and the fix."""


def _lower(value: Any) -> Any:
    """Registry names are looked up case-insensitively; one spelling keeps ``Layer`` and ``layer`` one
    config (one hash) and lets code compare names literally."""
    return value.lower() if isinstance(value, str) else value


# --------------------------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """Which dataset and how it is split. The validation split is carved from the training set."""

    name: str = "digits"  # digits | mnist | fashion-mnist | cifar10 | cifar100 | imagefolder | synthetic
    root: str | None = None  # data root; else $BENCHKIT_DATA, else the user cache directory
    download: bool = True  # download when missing and online (never for digits/synthetic)
    val_fraction: float = 0.1  # share of the training set held out for validation (selection)
    val_size: int | None = None  # absolute validation size; overrides val_fraction (LTH: 5000)
    split_seed: int = 0  # fixed seed of the train/validation split, independent of the run seed
    train_subset: int | None = None  # use only the first N training examples (after the split)
    augment: bool = True  # standard augmentation where the dataset has one (CIFAR crop+flip)
    num_workers: int = 0  # DataLoader workers for datasets read from files (in-memory tensors need none)
    # synthetic only
    num_samples: int = 512
    num_classes: int = 10
    input_shape: list[int] = field(default_factory=lambda: [1, 8, 8])

    def __post_init__(self) -> None:
        self.name = _lower(self.name)


@dataclass
class ModelConfig:
    """A registry name (lenet300, lenet5, conv2/4/6, resnet20/32/56, vgg11/16) or a torchvision model."""

    name: str = "lenet300"
    num_classes: int | None = None  # default: from the dataset
    in_channels: int | None = None  # default: from the dataset
    init: str = "default"  # default | kaiming_normal | glorot_normal (LTH uses Gaussian Glorot)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Registry names are case-insensitive, torchvision names are not: lowercase only a registry name.
        if isinstance(self.name, str) and self.name != self.name.lower():
            from benchkit.models import MODELS

            if self.name in MODELS:
                self.name = self.name.lower()


@dataclass
class TrainConfig:
    """Optimisation. Length in epochs, or in iterations when ``iterations`` is set."""

    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    batch_size: int = 60
    epochs: int = 10
    iterations: int | None = None
    schedule: str = "constant"  # constant | step | multistep | cosine
    step_size: int = 30  # epochs (or iterations when training by iterations), for `step`
    milestones: list[int] = field(default_factory=list)  # for `multistep`, same unit as step_size
    gamma: float = 0.1
    eval_every: int | None = None  # validate every k iterations; None = every epoch
    select_best: bool = True  # restore the weights of the best validation epoch at the end
    patience: int | None = None  # early stopping on validation loss, in evaluations
    eval_batch_size: int = 1000

    def __post_init__(self) -> None:
        self.optimizer, self.schedule = _lower(self.optimizer), _lower(self.schedule)


@dataclass
class FinetuneConfig:
    """Training after each post-training pruning round (timing ``post`` only: a lottery level retrains
    with ``train`` itself, from its rewind point)."""

    epochs: int = 3
    iterations: int | None = None
    lr: float | None = None  # default: train.lr / 10 (Han et al. 2015)
    optimizer: str | None = None  # default: train.optimizer
    schedule: str | None = None  # default: constant (or the rewound original schedule with lr_rewind)

    def __post_init__(self) -> None:
        self.optimizer, self.schedule = _lower(self.optimizer), _lower(self.schedule)


@dataclass
class DistillConfig:
    """Knowledge distillation from the dense teacher during fine-tuning (Hinton et al. 2015)."""

    enabled: bool = False
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the soft-target term; 1 - alpha on the hard labels


@dataclass
class ScheduleConfig:
    """Gradual pruning while training (timing ``during``): AGP cubic schedule, Zhu & Gupta 2017."""

    start: float = 0.0  # fraction of training where pruning starts (t0)
    end: float = 0.75  # fraction of training where the final sparsity is reached (t0 + n·Δt)
    every: int = 50  # Δt: masks are updated every this many iterations
    initial_sparsity: float = 0.0  # s_i
    soft: bool = False  # soft pruning: pruned weights keep training; masks re-chosen every update


@dataclass
class LotteryConfig:
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020)."""

    levels: int = 5
    rate: float | None = None  # fraction of survivors pruned per level; default 0.2, or derived from compression
    layer_rates: dict[str, float] = field(default_factory=dict)  # per-layer (glob) rates, e.g. {fc3: 0.1}
    rewind_iteration: int = 0  # 0 = rewind to initialisation; k = to the weights after iteration k
    controls: list[str] = field(default_factory=list)  # reinit | random: controls trained at every level


@dataclass
class PruneConfig:
    """What is pruned, how, how much and when."""

    timing: str = "post"  # pre | during | post | lottery
    criterion: str = "magnitude"
    granularity: str = "element"  # element | N:M | vector | kernel | channel
    scope: str = "global"  # global | layer
    compression: float | None = None  # ratio >= 1; None with no sparsity = 1 (dense) except lottery
    sparsity: float | None = None  # alternative to compression, in [0, 1)
    reduce: str = "l1"  # group score reduction: l1 | l2 | mean
    exclude: list[str] = field(default_factory=list)  # module names or globs kept dense
    overrides: dict[str, float] = field(default_factory=dict)  # module name/glob -> compression
    score_batch_size: int = 100  # examples per batch for data-driven criteria (SNIP: one batch of 100)
    score_batches: int = 1
    iterations: int | None = None  # scoring iterations (SynFlow default 100, others 1)
    rounds: int = 1  # post: prune in this many rounds, fine-tuning after each
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lr_rewind: bool = False  # post: fine-tune with the original schedule rewound (Renda et al. 2020)
    distill: DistillConfig = field(default_factory=DistillConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lottery: LotteryConfig = field(default_factory=LotteryConfig)

    def __post_init__(self) -> None:
        for name in ("timing", "criterion", "granularity", "scope", "reduce"):
            setattr(self, name, _lower(getattr(self, name)))

    def target_compression(self) -> float | None:
        """The requested compression ratio, from ``compression`` or ``sparsity`` (None if neither)."""
        if self.sparsity is not None:
            return 1.0 / (1.0 - self.sparsity)
        return self.compression


@dataclass
class LatencyConfig:
    """Measured inference latency of the final model (and of its compacted copy when structured
    pruning left whole channels dead). Off by default: timings are only comparable on a quiet
    machine, and every figure is logged with its setting (batch, threads, repeats, device)."""

    enabled: bool = False
    batch_size: int = 1
    threads: int | None = None  # default: the run's torch threads
    warmup: int = 10
    repeats: int = 100  # timed forward passes per model, interleaved; the median is reported


@dataclass
class ExperimentConfig:
    """One run: data, model, training, pruning and seed. See ../shared/DESIGN.md for the contract."""

    experiment: str = "benchkit"  # MLflow experiment name
    name: str | None = None  # run name (default: derived from the pruning settings)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch intra-op threads (default: torch's choice)
    deterministic: bool = True
    output_dir: str = "runs"  # each run writes to <output_dir>/<config hash>
    cache_dir: str | None = None  # dense-model cache; default $BENCHKIT_CACHE or ~/.cache/benchkit
    progress: bool = True  # epoch progress bar (silent when not attached to a terminal)
    plugins: list[str] = field(default_factory=list)  # modules / .py files imported first (benchkit.plugins)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict[str, Any] | None = None, overrides: dict[str, Any] | list[str] | None = None,
                  *, lines: dict[str, int] | None = None, validate: bool = True) -> ExperimentConfig:
        """Build from a nested dict plus dotted overrides (``{"prune.compression": 8}`` or ``["seed=1"]``)."""
        d = copy.deepcopy(d or {})
        for key, value in _parse_overrides(overrides).items():
            set_dotted(d, key, value)
        _import_plugins(d.get("plugins"), lines or {})  # before anything looks a name up in a registry
        cfg = _build(cls, d, prefix="", lines=lines or {})
        if validate:
            cfg.validate(lines=lines)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> ExperimentConfig:
        """Load one run. A sweep file (with ``base:``) gives its base run, experiment name included."""
        data, lines = load_yaml(path)
        folder = Path(path).resolve().parent
        if "base" in data or "grid" in data:
            base = dict(data.get("base") or {})
            if "experiment" in data:
                base.setdefault("experiment", data["experiment"])
            if isinstance(base.get("plugins"), list) or isinstance(data.get("plugins"), list):
                base["plugins"] = plugin_specs(data.get("plugins"), folder) + plugin_specs(base.get("plugins"), folder)
            lines = {k[len("base."):]: v for k, v in lines.items() if k.startswith("base.")} | \
                {k: v for k, v in lines.items() if k == "plugins"}
            data = base
        elif isinstance(data.get("plugins"), list):
            data["plugins"] = plugin_specs(data["plugins"], folder)
        return cls.from_dict(data, overrides, lines=lines)

    # ------------------------------------------------------------------------------ views
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Flattened dotted keys → values (used as MLflow params)."""
        return flatten(self.to_dict())

    def replace(self, **dotted: Any) -> ExperimentConfig:
        return ExperimentConfig.from_dict(self.to_dict(), {k.replace("__", "."): v for k, v in dotted.items()})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        """Hash of everything that determines the run's outcome (not where it is written or shown)."""
        skip = non_semantic_keys(self)
        d = {k: v for k, v in self.flat().items() if k not in skip}
        return stable_hash(d)

    def validate(self, lines: dict[str, int] | None = None) -> None:
        from benchkit.validation import validate_config

        validate_config(self, lines or {})


# Keys that never change a run's numbers: where it is written, how it is displayed, its labels.
NON_SEMANTIC_KEYS = frozenset(
    {"experiment", "name", "output_dir", "cache_dir", "progress", "data.root", "data.num_workers", "data.download",
     "plugins"}
)


#: Datasets whose ``data.root`` *is* the dataset (an image folder), not just where a torchvision
#: dataset is stored: for them the root is part of the hash, the dense-cache key and the run's label.
ROOT_IS_DATASET = frozenset({"imagefolder"})


def root_is_dataset(name: Any) -> bool:
    return str(name).lower() in ROOT_IS_DATASET


def non_semantic_keys(cfg: ExperimentConfig) -> frozenset[str]:
    """:data:`NON_SEMANTIC_KEYS` for this config (less ``data.root`` where :data:`ROOT_IS_DATASET`)."""
    if root_is_dataset(cfg.data.name):
        return NON_SEMANTIC_KEYS - {"data.root"}
    return NON_SEMANTIC_KEYS


# Free-form dicts: their keys are user names (layer globs such as ``features.0``, model kwargs), not
# config sections, so a dotted key splits only up to them (``prune.overrides.layer1.0.conv1``).
FREE_FORM = ("prune.overrides", "model.kwargs", "prune.lottery.layer_rates")


# --------------------------------------------------------------------------------------------- plugins
def plugin_specs(specs: Any, folder: Path) -> list[str]:
    """A YAML's ``plugins:`` with file paths made absolute relative to the YAML's folder (module names kept)."""
    if not isinstance(specs, list):
        return [] if specs is None else specs  # a wrong type is reported by _build, naming the key
    return resolve_specs([str(s) for s in specs], folder)


def _import_plugins(specs: Any, lines: dict[str, int]) -> None:
    """Import the config's plugins (and the installed entry points) before the config is built."""
    if specs is not None and not (isinstance(specs, list) and all(isinstance(s, str) for s in specs)):
        return  # _build refuses it with the key and line
    try:
        load_plugins(specs or ())
    except PluginError as e:
        raise ConfigError(f"plugins{where('plugins', lines)}: {e}") from None


# --------------------------------------------------------------------------------------------- helpers
def stable_hash(obj: Any, length: int = 16) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v) and _is_section(key):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_section(dotted: str) -> bool:
    """Sections are dataclass fields; free-form dicts (overrides, kwargs, layer_rates) stay whole."""
    return dotted not in FREE_FORM


def split_dotted(key: str) -> list[str]:
    """``key`` split at its dots, except past a :data:`FREE_FORM` prefix: the rest is one dict key
    (``prune.overrides.features.0`` → ``["prune", "overrides", "features.0"]``)."""
    for prefix in FREE_FORM:
        if key.startswith(prefix + ".") and len(key) > len(prefix) + 1:
            return [*prefix.split("."), key[len(prefix) + 1:]]
    return key.split(".")


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = split_dotted(key)
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key!r}: {p!r} is a value, not a section")
        cur = nxt
    cur[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-style numbers: ``1e-3`` and ``-.5`` are floats (YAML 1.1 wants a dot and
    a signed exponent, so ``lr: 1e-3`` was the string '1e-3'), and there are no base-60 numbers
    (``2:4`` stays the N:M granularity, not the integer 124). Everything else as SafeLoader."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"""^(?:[-+]?0b[0-1_]+
                    |[-+]?0[0-7_]+
                    |[-+]?(?:0|[1-9][0-9_]*)
                    |[-+]?0x[0-9a-fA-F_]+)$""", re.X),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """``text`` as YAML with :class:`_Loader` (config files and ``key=value`` overrides alike)."""
    return yaml.load(text, Loader=_Loader)


def _parse_overrides(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. prune.compression=8)")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_yaml(v)
    return out


def load_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse YAML, returning the data and a map dotted key → 1-based line number, for error messages."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}. Fix the syntax there.") from None
    if data is None:
        raise ConfigError(f"{path} is empty; it needs at least a `base:` section or config keys")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    lines: dict[str, int] = {}

    def walk(n: yaml.Node, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                line = k.start_mark.line + 1
                if key in seen:  # YAML would silently keep the last one
                    raise ConfigError(f"{path}: duplicate key {key!r} at lines {seen[key]} and {line}; a mapping "
                                      "holds each key once (the later one would silently win). Fix: keep one "
                                      "(merge their values, e.g. one list for a grid axis)")
                seen[key] = lines[key] = line
                walk(v, key + ".")

    walk(node, "")
    return data, lines


def where(key: str, lines: dict[str, int] | None) -> str:
    if lines and key in lines:
        return f" (line {lines[key]})"
    return ""


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against a simple annotation; returns (ok, coerced value)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is Any:
        return True, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        if isinstance(value, str):
            return True, value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)  # e.g. a bare YAML number where a name is expected
        return False, value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        (arg,) = typing.get_args(tp) or (Any,)
        out = []
        for x in value:
            ok, v = _type_ok(x, arg)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        kt, vt = typing.get_args(tp) or (Any, Any)
        out = {}
        for k, x in value.items():
            ok, v = _type_ok(x, vt)
            if not ok:
                return False, value
            out[str(k)] = v
        return True, out
    return isinstance(value, tp), value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls: type, d: Any, prefix: str, lines: dict[str, int]):
    section = prefix.rstrip(".") or "config"
    if not isinstance(d, dict):
        raise ConfigError(f"{section}{where(section, lines)} must be a mapping of keys, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in d if k not in names]
    if unknown:
        key = prefix + str(unknown[0])
        raise ConfigError(
            f"unknown config key {key!r}{where(key, lines)}; allowed keys in {section}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key + ".", lines)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{key}{where(key, lines)} must be {_type_name(tp)}, got {value!r}")
        kwargs[name] = coerced
    return cls(**kwargs)
