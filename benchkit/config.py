"""Experiment description as dataclasses (OpenLTH-style hparams), loaded from YAML or dicts.

The config *describes* a run; :mod:`benchkit.experiment` *executes* it. Every key has a default,
unknown keys and wrong types are refused with the dotted key (and YAML line) named, and
``config_hash`` identifies a run for resuming sweeps and caching dense models.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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

    name: str = "digits"  # digits | mnist | fashion-mnist | cifar10 | cifar100 | imagefolder | synthetic | text
    root: str | None = None  # data root; else $BENCHKIT_DATA, else the user cache directory (text: the folder)
    download: bool = True  # download when missing and online (never for digits/synthetic)
    val_fraction: float = 0.1  # share of the training set held out for validation (selection)
    val_size: int | None = None  # absolute validation size; overrides val_fraction (LTH: 5000)
    split_seed: int = 0  # fixed seed of the train/validation split, independent of the run seed
    train_subset: int | None = None  # use only the first N training examples (after the split); text: characters
    augment: bool = True  # standard augmentation where the dataset has one (CIFAR crop+flip)
    num_workers: int = 0  # DataLoader workers for datasets read from files (in-memory tensors need none)
    # imagefolder only: images are resized to image_size (shorter side to image_size·8/7, then a center crop;
    # training: a random resized crop) and normalised with mean/std per channel (default: ImageNet's)
    image_size: int = 224
    mean: list[float] | None = None
    std: list[float] | None = None
    # synthetic only
    num_samples: int = 512
    num_classes: int = 10
    input_shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    # text only (benchkit.textdata): held-out whole works, tokenizer, window length, evaluation stride
    tokenizer: str = "char"  # char (training works' characters + an unknown symbol) | byte (256 UTF-8 bytes)
    context: int = 128  # tokens per training window, per evaluation window, and the model's context
    stride: int | None = None  # evaluation windows start every `stride` tokens; default context // 2
    val_works: list[str] = field(default_factory=lambda: ["Julius Caesar"])  # titles or file names
    test_works: list[str] = field(default_factory=lambda: ["Macbeth"])
    eval_subset: int | None = None  # only the first N characters of each held-out split (tests)

    def __post_init__(self) -> None:
        self.name, self.tokenizer = _lower(self.name), _lower(self.tokenizer)


@dataclass
class ModelConfig:
    """A registry name (lenet300, lenet5, conv2/4/6, resnet20/32/56, vgg11/16) or a torchvision model."""

    name: str = "lenet300"
    num_classes: int | None = None  # default: from the dataset
    in_channels: int | None = None  # default: from the dataset
    init: str = "default"  # default | kaiming_normal | glorot_normal (LTH uses Gaussian Glorot)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Registry names are case-insensitive and torchvision's are all lowercase: one spelling, one hash.
        self.name, self.init = _lower(self.name), _lower(self.init)


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


# How the overall sparsity is split across layers (benchkit.pruning.allocation) and how global structured
# pruning compares groups of different layers (benchkit.pruning.granularity). Defined here so the config can
# be read without importing the pruning code; validation checks the names against the registries.


@dataclass
class CollapseConfig:
    """When a pruned layer counts as (nearly) collapsed: it keeps fewer than ``min_units`` output units (whole
    rows alive) or a density below ``min_relative_density`` × the pruned set's overall density. Such layers are
    reported (a warning, the ``collapsed_layers`` metric and the ``benchkit.collapsed`` tag); ``strict`` refuses
    the run instead."""

    min_units: int = 1
    min_relative_density: float = 0.05
    strict: bool = False


@dataclass
class CalibrationConfig:
    """The calibration inputs of one-shot methods that read activations (criteria ``wanda``, ``sparsegpt``;
    allocation ``owl``): ``samples`` examples drawn with the run's seed from ``source`` — ``train`` (the
    training split) or, for text, a folder of .txt files read with the run's tokenizer. Text examples are
    windows of ``length`` tokens (default ``data.context``). Logged and hashed: the protocol is part of the result."""

    samples: int = 128
    length: int | None = None
    source: str = "train"


@dataclass
class PruneConfig:
    """What is pruned, how, how much and when. The settings of one timing live in its own section
    ``prune.<timing>`` (``prune.post``, ``prune.during``, ``prune.lottery``, ...), declared beside the timing's
    code and registered with :func:`register_section`; only the active timing's section is logged and hashed."""

    #: timing name -> the dataclass of its settings (filled by the timings as they are imported)
    SECTIONS: ClassVar[dict[str, type]] = {}

    timing: str = "post"  # pre | during | post | lottery | dynamic (registry benchkit.timing.TIMINGS)
    criterion: str = "magnitude"
    granularity: str = "element"  # element | N:M | vector | kernel | channel | head | neuron
    allocation: str = "global"  # global | uniform | uniform+ | er | erk | lamp | owl
    normalize: str = "auto"  # global ranking of groups: none | mean | max | l2 | lamp; auto = mean for groups
    comparison: str = "auto"  # element scores compared per layer or per output row; auto = row for wanda
    compression: float | None = None  # ratio >= 1; None with no sparsity = 1 (dense) except lottery
    sparsity: float | None = None  # alternative to compression, in [0, 1)
    reduce: str = "l1"  # group score reduction: l1 | l2 | mean
    exclude: list[str] = field(default_factory=list)  # module names or globs kept dense
    overrides: dict[str, float] = field(default_factory=dict)  # module name/glob -> compression
    keep_outputs: bool = True  # structured granularities never remove the output layer's units (classes)
    score_batch_size: int = 100  # examples per batch for data-driven criteria (SNIP: one batch of 100)
    score_batches: int = 1
    iterations: int | None = None  # scoring iterations (SynFlow default 100, others 1)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)

    def __post_init__(self) -> None:
        for name in ("timing", "criterion", "granularity", "allocation", "normalize", "comparison", "reduce"):
            setattr(self, name, _lower(getattr(self, name)))
        for name, cls in self.SECTIONS.items():
            if name not in self.__dict__:
                self.__dict__[name] = cls()

    def __getattr__(self, name: str) -> Any:  # only reached for attributes that do not exist
        if not name.startswith("_") and name not in type(self).SECTIONS:
            known = ", ".join(sorted(type(self).SECTIONS)) or "none registered yet (import benchkit.timing)"
            raise AttributeError(f"PruneConfig has no setting or timing section {name!r}; timing sections: {known}")
        raise AttributeError(name)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and _prune_dict(self) == _prune_dict(other)  # sections included

    def target_compression(self) -> float | None:
        """The requested compression ratio, from ``compression`` or ``sparsity`` (None if neither)."""
        if self.sparsity is not None:
            return 1.0 / (1.0 - self.sparsity)
        return self.compression

    @property
    def settings(self) -> Any:
        """The active timing's own section (``prune.<timing>``), or None if it declares none."""
        return self.__dict__.get(self.timing)


#: The timings benchkit ships. Their sections register when :mod:`benchkit.timing` is imported (the config
#: sits below the timings and imports none); the name alone lets a too-early read say what to import.
BUILT_IN_TIMINGS = frozenset({"pre", "during", "post", "lottery", "dynamic"})


def register_section(timing: str, cls: type) -> type:
    """Declare ``cls`` (a dataclass) as the settings of ``timing``: it becomes ``prune.<timing>`` in every
    config. Called by :func:`benchkit.timing.base.register_timing`; a plugin timing gets its section this way."""
    name = timing.lower()
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"the settings of timing {timing!r} must be a dataclass, got {cls!r}")
    if name in {f.name for f in dataclasses.fields(PruneConfig)}:
        raise ValueError(f"timing {timing!r} cannot own a section named like the prune setting prune.{name}")
    old = PruneConfig.SECTIONS.get(name)
    if old is not None and old is not cls:
        raise ValueError(f"timing {timing!r} already has the settings section {old.__module__}.{old.__qualname__}; "
                         f"{cls.__module__}.{cls.__qualname__} cannot replace it")
    PruneConfig.SECTIONS[name] = cls
    return cls


def _prune_dict(p: PruneConfig) -> dict[str, Any]:
    d = {f.name: dataclasses.asdict(getattr(p, f.name)) if dataclasses.is_dataclass(getattr(p, f.name))
         else copy.deepcopy(getattr(p, f.name)) for f in dataclasses.fields(p)}
    for name in sorted(type(p).SECTIONS):
        d[name] = dataclasses.asdict(p.__dict__[name])
    return d


def exclusive_fields(cls: type) -> list[str]:
    """Fields of a timing section marked ``metadata={"exclusive": True}``: set away from their default under
    another timing they are refused (they would be silently ignored). The other fields are plain settings of
    the timing's procedure, accepted with every timing so one sweep base can serve a zip over timings."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("exclusive")]


@dataclass
class LatencyConfig:
    """Measured inference latency, theory beside practice: the final model is deployed
    (:func:`benchkit.deployment.core.deploy`: dead channels removed, sparse kernels where they measure
    faster) and timed per layer and whole against its dense self. Off by default: timings are only
    comparable on a quiet machine, and every figure is logged with its setting (batch, threads, repeats,
    device)."""

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
                  *, lines: dict[str, int] | None = None) -> ExperimentConfig:
        """Build from a nested dict plus dotted overrides (``{"prune.compression": 8}`` or ``["seed=1"]``).

        This checks structure and types only (unknown keys, wrong types, renamed keys); the values are checked
        against the registries by :func:`benchkit.validation.validate_config` — :func:`benchkit.load_config`
        does both, and :class:`benchkit.PruningExperiment` validates before it runs anything."""
        lines = dict(lines or {})
        d = rename_legacy(copy.deepcopy(d or {}), lines)
        for key, value in _parse_overrides(overrides).items():
            key, value = rename_legacy_key(key, value)
            set_dotted(d, key, value)
        _import_plugins(d.get("plugins"), lines)  # before anything looks a name up in a registry
        return _build(cls, d, prefix="", lines=lines)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> ExperimentConfig:
        """Load one run (structure and types; see :meth:`from_dict`). A sweep file (with ``base:``) gives its
        base run, experiment name included."""
        data, lines = read_run_yaml(path)
        return cls.from_dict(data, overrides, lines=lines)

    # ------------------------------------------------------------------------------ views
    def to_dict(self) -> dict[str, Any]:
        """Every setting, every timing's section included (what ``config.yaml`` holds; round-trips)."""
        d = dataclasses.asdict(self)
        d["prune"] = _prune_dict(self.prune)
        return d

    def flat(self) -> dict[str, Any]:
        """Flattened dotted keys → values of what the run uses: the prune sections of other timings, which
        cannot change this run, are left out. These are the MLflow params and what the hash covers."""
        d = self.to_dict()
        active = self.prune.timing
        d["prune"] = {k: v for k, v in d["prune"].items() if k not in PruneConfig.SECTIONS or k == active}
        return flatten(d)

    def replace(self, **dotted: Any) -> ExperimentConfig:
        return ExperimentConfig.from_dict(self.to_dict(), {k.replace("__", "."): v for k, v in dotted.items()})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        """Hash of everything that determines the run's outcome (not where it is written or shown)."""
        skip = non_semantic_keys(self)
        d = {k: v for k, v in self.flat().items() if k not in skip}
        return stable_hash(d)


def read_run_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A run file's config dict and line map; a sweep file (``base:``/``grid:``) gives its base run. Plugin
    paths are made absolute relative to the file (``plugins: [./my_criterion.py]``)."""
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
    return data, lines


# --------------------------------------------------------------------------------------------- renamed keys
#: Keys of earlier releases → their spelling now (a timing's settings moved into its section; ``scope``
#: became ``allocation``). Old YAML keeps working: the keys are translated when read (with a warning), and
#: :mod:`benchkit.analysis` translates the params of runs stored under the old names.
RENAMED_KEYS: dict[str, str] = {
    "prune.scope": "prune.allocation",
    "prune.rounds": "prune.post.rounds",
    "prune.lr_rewind": "prune.post.lr_rewind",
    "prune.finetune": "prune.post.finetune",
    "prune.distill": "prune.post.distill",
    "prune.schedule": "prune.during",
}
#: Values that changed with their key: ``scope: layer`` is ``allocation: uniform``.
RENAMED_VALUES: dict[str, dict[Any, Any]] = {"prune.scope": {"layer": "uniform"}}


def current_key(key: str, value: Any = None) -> tuple[str, Any]:
    """``(key, value)`` in today's spelling (unchanged when the key is current), silently: what a reader of
    stored runs needs (:mod:`benchkit.analysis`, :mod:`benchkit.verify`)."""
    for old, new in RENAMED_KEYS.items():
        if key == old or key.startswith(old + "."):
            if key == old and old in RENAMED_VALUES and isinstance(value, (str, list)):
                mapping = RENAMED_VALUES[old]
                value = [mapping.get(_lower(v), v) for v in value] if isinstance(value, list) else \
                    mapping.get(_lower(value), value)
            return new + key[len(old):], value
    return key, value


def rename_legacy_key(key: str, value: Any = None) -> tuple[str, Any]:
    """:func:`current_key`, with a warning when the key was renamed (a config being read: the user should
    update the file)."""
    new_key, new_value = current_key(key, value)
    if new_key != key:
        old = next(o for o in RENAMED_KEYS if key == o or key.startswith(o + "."))
        _warn_renamed(old, RENAMED_KEYS[old])
    return new_key, new_value


def rename_legacy(d: dict[str, Any], lines: dict[str, int] | None = None) -> dict[str, Any]:
    """A nested config dict with renamed keys moved to today's place (``lines`` updated to match). Giving a
    setting under both its old and its new name is refused."""
    prune = d.get("prune")
    if not isinstance(prune, dict):
        return d
    for old in RENAMED_KEYS:
        leaf = old.split(".", 1)[1]
        if leaf not in prune:
            continue
        value = prune.pop(leaf)
        new, value = rename_legacy_key(old, value)
        parts = new.split(".")[1:]
        cur = prune
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
            if not isinstance(cur, dict):
                raise ConfigError(f"{new}: {old} (its old name) cannot be moved into a value")
        if parts[-1] in cur:
            raise ConfigError(f"{old}{where(old, lines)} and {new} are the same setting (the old and the new name); "
                              f"keep {new}")
        cur[parts[-1]] = value
        if lines is not None:
            for k in [k for k in lines if k == old or k.startswith(old + ".")]:
                lines[new + k[len(old):]] = lines.pop(k)
    return d


def _warn_renamed(old: str, new: str) -> None:
    """Python's warning filter shows each distinct message once per process."""
    warnings.warn(f"config key {old!r} is now {new!r} (read as such; update the file to silence this)",
                  FutureWarning, stacklevel=4)


# Keys that never change a run's numbers: where it is written, how it is displayed, its labels.
NON_SEMANTIC_KEYS = frozenset(
    {"experiment", "name", "output_dir", "cache_dir", "progress", "data.root", "data.num_workers", "data.download",
     "plugins"}
)


#: Datasets whose ``data.root`` *is* the dataset (an image folder, a folder of texts), not just where a
#: torchvision dataset is stored: for them the root is part of the hash, the dense-cache key and the run's label.
ROOT_IS_DATASET = frozenset({"imagefolder", "text"})

#: Keys only the ``text`` dataset reads: for every other dataset they are left out of the hash, so
#: configs written before they existed keep their hashes (and their finished runs and cached models).
TEXT_KEYS = frozenset({"data.tokenizer", "data.context", "data.stride", "data.val_works", "data.test_works",
                       "data.eval_subset"})


def root_is_dataset(name: Any) -> bool:
    return str(name).lower() in ROOT_IS_DATASET


def non_semantic_keys(cfg: ExperimentConfig) -> frozenset[str]:
    """:data:`NON_SEMANTIC_KEYS` for this config (less ``data.root`` where :data:`ROOT_IS_DATASET`, plus
    :data:`TEXT_KEYS` for data that is not text)."""
    keys = NON_SEMANTIC_KEYS if cfg.data.name == "text" else NON_SEMANTIC_KEYS | TEXT_KEYS
    if root_is_dataset(cfg.data.name):
        return keys - {"data.root"}
    return keys


# Free-form dicts: their keys are user names (layer globs such as ``features.0``, model kwargs), not
# config sections, so a dotted key splits only up to them (``prune.overrides.layer1.0.conv1``).
FREE_FORM = ("prune.overrides", "model.kwargs")


def free_form_keys() -> tuple[str, ...]:
    """:data:`FREE_FORM` plus every dict-valued setting of a timing section (``prune.lottery.layer_rates``)."""
    extra = [f"prune.{name}.{f.name}" for name, cls in PruneConfig.SECTIONS.items()
             for f in dataclasses.fields(cls) if typing.get_origin(typing.get_type_hints(cls)[f.name]) is dict]
    return FREE_FORM + tuple(extra)


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
    return dotted not in free_form_keys()


def split_dotted(key: str) -> list[str]:
    """``key`` split at its dots, except past a :func:`free_form_keys` prefix: the rest is one dict key
    (``prune.overrides.features.0`` → ``["prune", "overrides", "features.0"]``)."""
    for prefix in free_form_keys():
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
    sections: dict[str, type] = getattr(cls, "SECTIONS", {})  # PruneConfig: the timings' own sections
    unknown = [k for k in d if k not in names and k not in sections]
    unregistered = [k for k in unknown if sections is PruneConfig.SECTIONS and k in BUILT_IN_TIMINGS]
    if unregistered:
        key = prefix + str(unregistered[0])
        raise ConfigError(f"{key}{where(key, lines)} is the settings section of timing {unregistered[0]!r}, which "
                          "registers it when benchkit.timing is imported: read configs with benchkit.load_config "
                          "(or use benchkit.ExperimentConfig), or import benchkit.timing first")
    if unknown:
        key = prefix + str(unknown[0])
        allowed = sorted(names | set(sections))
        close = difflib.get_close_matches(str(unknown[0]), allowed, n=1)
        hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown config key {key!r}{where(key, lines)}{hint}; allowed keys in {section}: {', '.join(allowed)}"
        )
    built_sections = {name: _build(sections[name], value if value is not None else {}, prefix + name + ".", lines)
                      for name, value in d.items() if name in sections}
    kwargs = {}
    for name, value in d.items():
        if name in sections:
            continue
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key + ".", lines)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{key}{where(key, lines)} must be {_type_name(tp)}, got {value!r}")
        kwargs[name] = coerced
    obj = cls(**kwargs)
    obj.__dict__.update(built_sections)
    return obj
