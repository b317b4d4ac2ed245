"""Sweeps: a YAML grid → a plan of runs → executed, resumable, one MLflow run per config hash.

A sweep file is a base config plus axes::

    experiment: quickstart
    base: {data: {name: digits}, train: {epochs: 1}}
    grid:                                  # cartesian product over dotted keys
      prune.criterion: [magnitude, random]
      prune.compression: [2, 8]
    zip:                                   # axes that move together (same length)
      prune.timing: [post, lottery]
      train.epochs: [2, 4]
    exclude:                               # combinations refused on purpose, with the reason
      - match: {prune.criterion: random, prune.timing: lottery}
        reason: "IMP is magnitude pruning by definition"

Combinations that validation refuses are excluded too, each with validation's reason in the plan.
A grid value refused in *every* combination is a typo, not an incompatibility: the file is refused,
naming the key and line. Resuming is by config hash (the ``benchkit.config_hash`` tag): configs
already FINISHED are skipped, FAILED / KILLED / dead RUNNING ones are redone, and the store ends up
with exactly one FINISHED run per hash (see :func:`run_tracked`). A deleted experiment is started over,
not restored with its old runs (see :func:`plan_sweep`).
"""

from __future__ import annotations

import difflib
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchkit.config import (
    ConfigError,
    ExperimentConfig,
    flatten,
    free_form_keys,
    load_yaml,
    plugin_specs,
    rename_legacy_key,
    set_dotted,
    where,
)
from benchkit.executors import get_executor
from benchkit.jobs import (
    INTERRUPT_DEFERRED,
    INTERRUPT_HANDLED,
    RunOutcome,
    RunTask,
    raise_pending_interrupt,
    repeats_for_every_run,
)
from benchkit.plugins import PluginError, load_plugins
from benchkit.startup import freeze_heap, import_run_modules
from benchkit.tracking import (
    TAG_HASH,
    TAG_HEARTBEAT,
    TAG_OVERRIDES,
    TAG_REPLACES,
    TAG_SWEEP,
    TAG_SWEEP_FILE,
    TAG_WITHDRAWN,
    Heartbeat,
    Owner,
    Tracker,
    retired_name,
    run_is_alive,
    runtime_tags,
    sqlite_path,
    unwritable,
)

if TYPE_CHECKING:
    from mlflow.entities import Experiment, Run

SWEEP_KEYS = {
    "experiment": "MLflow experiment name (default: the file name)",
    "description": "free text",
    "base": "the config every run starts from",
    "grid": "dotted key -> list of values (cartesian product)",
    "zip": "dotted key -> list of values, all the same length, moving together",
    "exclude": "list of {match: {key: value}, reason: text}",
    "plugins": "modules or .py files (relative to this file) imported first: your own criteria, models, ...",
}


# --------------------------------------------------------------------------------------------- spec
@dataclass
class SweepSpec:
    """A parsed sweep file: base dict, axes and exclusions, with the line of every key."""

    experiment: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    zip: dict[str, list[Any]]
    exclude: list[dict[str, Any]]
    lines: dict[str, int] = field(default_factory=dict)
    path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def config_keys() -> set[str]:
    """Every dotted config key, the sections of every timing included (importing the timings registers them:
    the CLI reads a sweep file before anything else imported them)."""
    import benchkit.timing  # noqa: F401

    return set(flatten(ExperimentConfig().to_dict()))


def check_key(key: str, where_: str, lines: dict[str, int], line_key: str) -> None:
    """A dotted key must name a config value (or an entry of a free-form dict such as prune.overrides)."""
    keys = config_keys()
    key, _ = rename_legacy_key(key)  # an old spelling (prune.scope) reads as today's (prune.allocation)
    if key in keys or any(key.startswith(f + ".") for f in free_form_keys()):
        return
    if key == "experiment":
        raise ConfigError(f"{where_} key 'experiment'{where(line_key, lines)}: a sweep is one MLflow experiment; "
                          "set `experiment:` at the top of the file instead")
    close = difflib.get_close_matches(key, sorted(keys), n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
        f"; config keys are e.g. {', '.join(sorted(keys)[:8])}, ... (see benchkit/config.py)"
    raise ConfigError(f"{where_} key {key!r}{where(line_key, lines)} is not a config key{hint}")


def _axes(section: str, raw: Any, lines: dict[str, int]) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}{where(section, lines)} must be a mapping of dotted key -> list of values, "
                          f"got {raw!r}")
    if not raw:
        raise ConfigError(f"{section}{where(section, lines)} is empty; give at least one `dotted.key: [values]` "
                          "(or use `benchkit run` for a single config)")
    out = {}
    for key, values in raw.items():
        key = str(key)
        lk = f"{section}.{key}"
        check_key(key, section, lines, lk)
        if not isinstance(values, list):
            raise ConfigError(f"{lk}{where(lk, lines)} must be a list of values (e.g. [{values!r}]), "
                              f"got {type(values).__name__} {values!r}")
        if not values:
            raise ConfigError(f"{lk}{where(lk, lines)} has no values; give at least one or remove the key")
        out[key] = values
    return out


def load_sweep(path: str | Path, overrides: dict[str, Any] | list[str] | None = None,
               only: dict[str, Any] | list[str] | None = None) -> SweepSpec:
    """Parse and check a sweep file. Every problem names the key and its line; nothing runs before.

    ``overrides`` set base keys and pin an axis to one value (every zip row gets it); ``only`` selects part
    of the plan: the values of a grid axis, or the rows of a zip whose column has that value (its other
    columns moving with it, e.g. ``model.name=lenet300`` of a zip of models and their learning rates)."""
    from benchkit.config import _parse_overrides

    data, lines = load_yaml(path)
    _load_sweep_plugins(data, Path(path).resolve().parent, lines)  # before any name is looked up
    unknown = [k for k in data if k not in SWEEP_KEYS]
    if unknown:
        k = str(unknown[0])
        if k in config_keys() or k in {f.split(".")[0] for f in config_keys()}:
            hint = f"; config keys go under `base:` (base.{k})"
        else:
            hint = "; allowed: " + ", ".join(f"{n} ({d})" for n, d in SWEEP_KEYS.items())
        raise ConfigError(f"{path}: unknown sweep key {k!r}{where(k, lines)}{hint}")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: base{where('base', lines)} must be a mapping of config keys, got {base!r}")
    grid = _axes("grid", data.get("grid"), lines)
    zipped = _axes("zip", data.get("zip"), lines)
    if not grid and not zipped:
        raise ConfigError(f"{path}: a sweep needs a non-empty `grid:` (or `zip:`) of dotted keys -> lists of "
                          "values; for a single config use `benchkit run`")
    both = set(grid) & set(zipped)
    if both:
        k = sorted(both)[0]
        raise ConfigError(f"{path}: {k!r} is both a grid axis{where('grid.' + k, lines)} and a zip axis"
                          f"{where('zip.' + k, lines)}; keep one")
    lengths = {k: len(v) for k, v in zipped.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"{path}: zip{where('zip', lines)} axes must have the same length, got "
                          + ", ".join(f"{k}: {n}{where('zip.' + k, lines)}" for k, n in lengths.items()))
    exclude = _excludes(data.get("exclude"), lines)
    experiment = str(data.get("experiment") or base.get("experiment") or Path(path).stem)
    ov = _parse_overrides(overrides)
    _refuse_dead_exclusions(exclude, grid, zipped, base, ov, lines)
    for k in ov:  # pin the axis: an override that an axis value replaced would silently do nothing, and
        # the plan label, run name and overrides tag are built from the axis values, so they must be the run's
        if k in grid:
            grid[k] = [ov[k]]
        elif k in zipped:
            zipped[k] = [ov[k]] * len(zipped[k])  # rows made identical are duplicates, run once
    grid, zipped = _select(grid, zipped, _parse_overrides(only) if only else {}, path)
    return SweepSpec(experiment, base, grid, zipped, exclude, lines, str(path), ov)


def _select(grid: dict[str, list[Any]], zipped: dict[str, list[Any]], only: dict[str, Any],
            path: str | Path) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Keep the part of the plan that ``only`` names (``--only key=value``); a key that is no axis, or a value
    its axis does not have, is refused, naming what there is."""
    for k, want in only.items():
        wanted = want if isinstance(want, list) else [want]
        axis = grid.get(k, zipped.get(k))
        if axis is None:
            raise ConfigError(f"{path}: --only {k}: not a grid or zip axis of this sweep; axes: "
                              + ", ".join([*grid, *zipped]))
        keep = [i for i, v in enumerate(axis) if any(_same_value(v, w) for w in wanted)]
        if not keep:
            raise ConfigError(f"{path}: --only {k}={want}: no such value on the axis; it has "
                              + ", ".join(map(str, dict.fromkeys(map(str, axis)))))
        if k in grid:
            grid[k] = [axis[i] for i in keep]
        else:
            zipped = {key: [vs[i] for i in keep] for key, vs in zipped.items()}
    return grid, zipped


def _load_sweep_plugins(data: dict[str, Any], folder: Path, lines: dict[str, int]) -> None:
    """Import the file's ``plugins:`` (top level, or under ``base:``) and keep them in the base config, paths
    made absolute, so that every run's config names them and every worker imports them too."""
    top, base = data.get("plugins"), data.get("base")
    nested = base.get("plugins") if isinstance(base, dict) else None
    for key, specs in (("plugins", top), ("base.plugins", nested)):
        if specs is not None and not (isinstance(specs, list) and all(isinstance(x, str) for x in specs)):
            raise ConfigError(f"{key}{where(key, lines)} must be a list of module names or .py paths, got {specs!r}")
    if top is None and nested is None:
        return
    specs = plugin_specs(top or [], folder) + [s for s in plugin_specs(nested or [], folder) if s not in (top or [])]
    try:
        load_plugins(specs)
    except PluginError as e:
        key = "plugins" if top is not None else "base.plugins"
        raise ConfigError(f"{key}{where(key, lines)}: {e}") from None
    data["base"] = {**(base or {}), "plugins": list(dict.fromkeys(specs))}


def _same_value(have: Any, want: Any) -> bool:
    return have == want or str(have) == str(want)


def _refuse_dead_exclusions(exclude: list[dict[str, Any]], grid: dict[str, list[Any]], zipped: dict[str, list[Any]],
                            base: dict[str, Any], overrides: dict[str, Any], lines: dict[str, int]) -> None:
    """An exclusion whose value can never occur (not a value of its grid/zip axis, or not the base's
    value for a key that no axis varies) excludes nothing, silently: most likely a typo. Refused with
    the values it could have meant. Checked against the file's axes, before a command-line override pins one."""
    fixed: dict[str, Any] | None = None
    for i, rule in enumerate(exclude):
        for key, want in rule["match"].items():
            axis = grid.get(key, zipped.get(key))
            if axis is None:
                if fixed is None:
                    d = json.loads(json.dumps(base, default=str))
                    for k, v in overrides.items():
                        set_dotted(d, k, v)
                    base_lines = {k[len("base."):]: n for k, n in lines.items() if k.startswith("base.")}
                    fixed = ExperimentConfig.from_dict(d, lines=base_lines).flat()
                values = [fixed.get(key, _lookup_free_form(fixed, key))]
            else:
                values = axis
            literal = not isinstance(want, list) or any(isinstance(v, list) for v in values)
            dead = [w for w in ([want] if literal else want) if not any(_same_value(v, w) for v in values)]
            if not dead:
                continue
            close = difflib.get_close_matches(str(dead[0]), [str(v) for v in values], n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            if axis is not None:
                section = "grid" if key in grid else "zip"
                what = (f"{dead[0]!r} is not a value of the {section} axis {key} "
                        f"({', '.join(repr(v) for v in values)})")
            else:
                what = (f"{dead[0]!r} is not the value of any combination: no grid or zip axis varies {key}, and "
                        f"the base has {key} = {values[0]!r}")
            raise ConfigError(f"exclude[{i}].match{where('exclude', lines)}: {key}: {what}, so the rule would "
                              f"exclude nothing{hint}")


def _excludes(raw: Any, lines: dict[str, int]) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"exclude{where('exclude', lines)} must be a list of {{match: {{key: value}}, "
                          f"reason: text}}, got {raw!r}")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) - {"match", "reason"} or not isinstance(item.get("match"), dict):
            raise ConfigError(f"exclude[{i}]{where('exclude', lines)} must be {{match: {{key: value}}, "
                              f"reason: text}}, got {item!r}")
        if not item.get("reason"):
            raise ConfigError(f"exclude[{i}]{where('exclude', lines)} needs a `reason:` saying why the "
                              "combination is excluded")
        if not item["match"]:  # matches every combination: surely not meant
            raise ConfigError(f"exclude[{i}]{where('exclude', lines)} has an empty `match:`, which would exclude "
                              "every combination; name the key(s) and value(s) to exclude, e.g. "
                              "{match: {prune.timing: lottery, prune.criterion: snip}, reason: ...}")
        for key in item["match"]:
            check_key(str(key), f"exclude[{i}].match", lines, "exclude")
        out.append({"match": {str(k): v for k, v in item["match"].items()}, "reason": str(item["reason"])})
    return out


# --------------------------------------------------------------------------------------------- expansion
@dataclass
class PlanEntry:
    """One combination of the sweep and what the sweep will do with it."""

    index: int
    overrides: dict[str, Any]
    config: ExperimentConfig | None
    config_hash: str | None
    status: str = "new"  # new | finished-skip | redo | running | excluded | duplicate
    reason: str = ""
    run_ids: list[str] = field(default_factory=list)  # existing runs with this hash

    @property
    def runnable(self) -> bool:
        return self.status in ("new", "redo")

    def label(self) -> str:
        return " ".join(f"{k}={_fmt(v)}" for k, v in self.overrides.items()) or "(base)"


def _fmt(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def run_name(cfg: ExperimentConfig, overrides: dict[str, Any]) -> str:
    """The config's ``name``, else its varying values (``criterion=random compression=8``): what a table row needs."""
    from benchkit.config import non_semantic_keys

    if cfg.name:
        return cfg.name
    skip = non_semantic_keys(cfg)  # an image folder's root names its dataset: shown
    shown = {k: v for k, v in overrides.items() if k not in skip}
    shorts = [k.split(".")[-1] for k in shown]
    parts = [f"{k if shorts.count(k.split('.')[-1]) > 1 else k.split('.')[-1]}={_fmt(v)}" for k, v in shown.items()]
    p = cfg.prune
    return " ".join(parts) or f"{p.timing} {p.criterion} {p.granularity} {p.allocation} x{p.target_compression() or 1:g}"


def combinations(spec: SweepSpec) -> list[dict[str, Any]]:
    """Grid (cartesian, in file order) × zip (moving together), as override dicts."""
    grid_items = [[(k, v) for v in vs] for k, vs in spec.grid.items()]
    zip_len = len(next(iter(spec.zip.values()))) if spec.zip else 1
    zip_rows = [{k: vs[i] for k, vs in spec.zip.items()} for i in range(zip_len)]
    out = []
    for combo in itertools.product(*grid_items):
        for z in zip_rows:
            out.append({**dict(combo), **z})
    return out


def _matches(flat: dict[str, Any], match: dict[str, Any]) -> bool:
    for key, want in match.items():
        key, want = rename_legacy_key(key, want)
        have = flat.get(key, _lookup_free_form(flat, key))
        if isinstance(want, list) and not isinstance(have, list):
            if not any(_same_value(have, w) for w in want):
                return False
        elif not _same_value(have, want):
            return False
    return True


def _same_value(have: Any, want: Any) -> bool:
    """A config value against one written in a sweep file or on the command line (``2`` matches ``"2"``)."""
    return have == want or str(have) == str(want)


def _lookup_free_form(flat: dict[str, Any], key: str) -> Any:
    for f in free_form_keys():
        if key.startswith(f + ".") and isinstance(flat.get(f), dict):
            return flat[f].get(key[len(f) + 1:])
    return None


def expand(spec: SweepSpec) -> list[PlanEntry]:
    """All combinations as configs, with explicit and validation exclusions and duplicates marked.

    Type errors and unknown keys abort (the file is wrong); validation refusals exclude the one
    combination, and so do the experiment's model-dependent checks (model kwargs, layer patterns,
    granularity), run on a throwaway model without loading data (:func:`~benchkit.experiment.plan_preflight`);
    a grid value refused wherever it appears aborts too (most likely a typo).
    """
    from benchkit.experiment import plan_preflight
    from benchkit.validation import validate_config

    base_lines = {k[len("base."):]: v for k, v in spec.lines.items() if k.startswith("base.")}
    axis_lines = {k: spec.lines.get(f"grid.{k}", spec.lines.get(f"zip.{k}")) for k in [*spec.grid, *spec.zip]}
    lines = {**base_lines, **{k: v for k, v in axis_lines.items() if v}}
    base = dict(spec.base)
    base["experiment"] = spec.experiment
    entries: list[PlanEntry] = []
    seen: dict[str, int] = {}
    preflight_memo: dict[str, Any] = {}  # one throwaway model per distinct data shape and model config
    for i, combo in enumerate(combinations(spec)):
        d = json.loads(json.dumps(base, default=str)) if _jsonable(base) else dict(base)
        for k, v in {**combo, **{k: v for k, v in spec.overrides.items() if k not in combo}}.items():
            set_dotted(d, k, v)
        cfg = ExperimentConfig.from_dict(d, lines=lines)  # type errors / unknown keys: abort
        entry = PlanEntry(i, combo, cfg, cfg.config_hash())
        flat = cfg.flat()
        rule = next((x for x in spec.exclude if _matches(flat, x["match"])), None)
        if rule is not None:
            entry.status, entry.reason = "excluded", f"excluded: {rule['reason']}"
        else:
            try:
                validate_config(cfg, lines)
                plan_preflight(cfg, preflight_memo)
            except ConfigError as e:
                entry.status, entry.reason = "excluded", f"invalid: {e}"
        if entry.status != "excluded":
            if entry.config_hash in seen:
                entry.status, entry.reason = "duplicate", f"same config as #{seen[entry.config_hash]}"
            else:
                seen[entry.config_hash] = i
        entries.append(entry)
    _refuse_dead_values(spec, entries)
    return entries


def _jsonable(d: Any) -> bool:
    try:
        json.dumps(d)
        return True
    except TypeError:
        return False


def _refuse_dead_values(spec: SweepSpec, entries: list[PlanEntry]) -> None:
    invalid = [e for e in entries if e.reason.startswith("invalid:")]
    if not invalid:
        return
    alive = [e for e in entries if not e.reason.startswith("invalid:")]
    if not alive and not any(e.reason.startswith("excluded:") for e in entries):
        raise ConfigError(f"every combination of the sweep is refused; the first: {invalid[0].reason[9:]}")
    for section, axes in (("grid", spec.grid), ("zip", spec.zip)):
        for key, values in axes.items():
            for v in values:
                with_v = [e for e in entries if e.overrides.get(key) == v]
                if with_v and all(e.reason.startswith("invalid:") for e in with_v):
                    lk = f"{section}.{key}"
                    raise ConfigError(f"{lk}{where(lk, spec.lines)}: value {v!r} is refused in every combination: "
                                      f"{with_v[0].reason[9:]}")


# --------------------------------------------------------------------------------------------- plan against the store
@dataclass
class HashState:
    """What the store holds for one config hash."""

    finished: list[Run]
    alive: list[Run]
    stale: list[Run]  # FAILED, KILLED, or RUNNING with a dead owner: to redo

    @classmethod
    def of(cls, runs: Iterable[Run]) -> HashState:
        runs = sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))
        fin = [r for r in runs if r.info.status == "FINISHED"]
        alive = [r for r in runs if r.info.status in ("RUNNING", "SCHEDULED") and run_is_alive(r)]
        stale = [r for r in runs if r not in fin and r not in alive]
        return cls(fin, alive, stale)


def plan_sweep(entries: list[PlanEntry], tracker: Tracker | None, experiment: str) -> list[PlanEntry]:
    """Set each entry's status from the store: finished-skip, running (elsewhere), redo or new.

    Reads only: a dry run on a store that does not exist yet creates nothing. A deleted experiment
    counts as absent, every config new: the sweep starts over in a new experiment of that name and
    leaves the deleted one, old runs included, in the bin (:meth:`Tracker.ensure_experiment`).
    """
    exp = _stored_experiment(tracker, experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        return entries
    by_hash: dict[str, list[Run]] = {}
    for r in tracker.runs(exp.experiment_id):
        h = r.data.tags.get(TAG_HASH)
        if h:
            by_hash.setdefault(h, []).append(r)
    for e in entries:
        if e.status not in ("new",) or e.config_hash not in by_hash:
            continue
        state = HashState.of(by_hash[e.config_hash])
        e.run_ids = [r.info.run_id for r in by_hash[e.config_hash]]
        if state.finished:
            e.status, e.reason = "finished-skip", f"run {state.finished[0].info.run_id[:8]}"
        elif state.alive:
            r = state.alive[0]
            e.status = "running"
            e.reason = f"in flight elsewhere: run {r.info.run_id[:8]} pid {r.data.tags.get('benchkit.pid')}"
        else:
            e.status = "redo"
            e.reason = ", ".join(f"{r.info.run_id[:8]} {_why_stale(r)}" for r in state.stale)
    return entries


def _stored_experiment(tracker: Tracker | None, experiment: str) -> Experiment | None:
    """The store's experiment of that name, deleted or not; ``None`` without opening (creating) a missing store."""
    if tracker is None:
        return None
    db = sqlite_path(tracker.uri)
    if db is not None and not db.exists():
        return None
    return tracker.client.get_experiment_by_name(experiment)


def plan_notes(tracker: Tracker | None, experiment: str) -> list[str]:
    """What the plan's lines do not say about the store: a deleted experiment is started over."""
    exp = _stored_experiment(tracker, experiment)
    if exp is None or exp.lifecycle_stage != "deleted":
        return []
    old = len(tracker.runs(exp.experiment_id, deleted=True))
    return [f"experiment {experiment!r} was deleted: starting over, {old} old run{'s' * (old != 1)} ignored "
            f"(the deleted experiment stays in MLflow's bin as "
            f"{retired_name(experiment, exp.experiment_id)!r})"]


def _why_stale(r: Run) -> str:
    return "interrupted (RUNNING, owner gone)" if r.info.status == "RUNNING" else r.info.status


def format_plan(entries: Sequence[PlanEntry], experiment: str, uri: str, notes: Sequence[str] = ()) -> str:
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.status] = counts.get(e.status, 0) + 1
    head = (f"sweep {experiment!r} -> {uri}: {len(entries)} combinations; "
            + ", ".join(f"{n} {s}" for s, n in counts.items()))
    lines = [head, *(f"  note: {n}" for n in notes)]
    for e in entries:
        h = e.config_hash or "-" * 16
        line = f"  #{e.index:<3} {h}  {e.status:<13}  {e.label()}"
        if e.reason:
            line += f"  [{e.reason}]"
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- before any run
class PreflightError(RuntimeError):
    """A problem every run of the plan would meet (the data missing offline, no GPU for ``device: cuda``,
    a folder that cannot be written): found once, before any run, instead of failing each run in turn."""


def preflight(entries: Sequence[PlanEntry], tracker: Tracker | None, experiment: str, *,
              local: bool = True) -> None:
    """Check, once per distinct value among the runnable entries, what no single config can see wrong:
    the data is on disk (or downloads now, once: not once per run), the device exists and the output
    folder can be written (these only when the runs execute on this machine, ``local``: a Ray cluster's
    nodes have their own), and the store's artifact folder can be written. Raises :class:`PreflightError`
    (or the data's own ``DataNotFoundError``, whose message says where it looked and what to do).
    Whatever only some runs touch (the dense-model cache: timings that train a dense model) is left to
    the runs: the first that fails on it stops the sweep (``RunOutcome.repeats``)."""
    from benchkit.data import DATASETS, on_disk
    from benchkit.seeding import resolve_device

    configs = [e.config for e in entries if e.runnable and e.config is not None]
    seen: set[str] = set()

    def once(key: str) -> bool:
        new = key not in seen
        seen.add(key)
        return new

    for cfg in configs if local else ():  # a Ray cluster's nodes have their own data, devices and disks
        if once(json.dumps(["data", cfg.data.__dict__], sort_keys=True, default=str)) and on_disk(cfg.data) is False:
            DATASETS.get(cfg.data.name)(cfg.data)  # downloads it now (data.download), or says why it cannot
        if once(f"device {cfg.device}"):
            try:
                resolve_device(cfg.device)
            except ValueError as e:
                raise PreflightError(f"device: {e}") from None
        folder = Path(cfg.output_dir)
        if once(f"folder {folder.resolve()}"):
            problem = _cannot_write(folder)
            if problem:
                raise PreflightError(f"output_dir {folder}: {problem}; every run writes there, so none would "
                                     "finish. Point it at a writable folder")
    artifacts = _artifact_folder(tracker, experiment) if configs else None
    if artifacts is not None:
        problem = _cannot_write(artifacts)
        if problem:
            raise PreflightError(f"the store's artifact folder {artifacts}: {problem}; every run logs its files "
                                 "there. Use a store in a writable place (--tracking-uri)")


def _cannot_write(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder`` (made if missing), tried for real, or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot write there ({e.strerror or e})"
    return unwritable(folder)


def _artifact_folder(tracker: Tracker | None, experiment: str) -> Path | None:
    """The local folder the experiment's artifacts go to (an existing experiment's own location, else
    where :meth:`Tracker.ensure_experiment` will put it); None for a server's or a remote store."""
    if tracker is None:
        return None
    exp = _stored_experiment(tracker, experiment)
    location = exp.artifact_location if exp is not None and exp.lifecycle_stage == "active" else \
        tracker.artifact_location(experiment)
    if not location or not location.startswith("file:"):
        return None
    from urllib.parse import urlsplit
    from urllib.request import url2pathname

    return Path(url2pathname(urlsplit(location).path))


# --------------------------------------------------------------------------------------------- one run, tracked
SUMMARY_METRICS = ("compression_ratio", "val_acc1", "test_acc1")


def run_tracked(task: RunTask) -> RunOutcome:
    """Run one config into MLflow, at most once per hash.

    1. Create our RUNNING run (the claim), then look at the hash's other runs: if one is FINISHED,
       or RUNNING in a live process and claimed before ours, withdraw ours (KILLED, tagged
       ``benchkit.withdrawn``, deleted) and skip — the earliest claim wins, so two sweeps racing on
       one store never both train a config. Dead RUNNING runs are marked KILLED.
    2. Train; log everything; FINISHED. Exceptions → FAILED with traceback.txt (``repeats`` set when
       the failure is the machine's, not the config's); Ctrl-C / SIGTERM → KILLED with the reason.
    3. Delete superseded FAILED/KILLED runs of the hash (their ids go into ``benchkit.replaces``).

    Interrupts are held while the run is being created or closed (``benchkit.jobs``): one landing
    there would leave a RUNNING run that nobody marks.
    """
    from benchkit.experiment import PruningExperiment

    t0 = time.time()
    INTERRUPT_HANDLED.clear()
    raise_pending_interrupt()  # the stop request came between two runs: claim nothing
    tracker = Tracker.shared(task.tracking_uri)
    exp_id, h = task.experiment_id, task.config_hash
    cfg = ExperimentConfig.from_dict(task.config)  # imports the config's plugins first
    if cfg.config_hash() != h:
        raise RuntimeError(f"config hash changed in transit: {cfg.config_hash()} != {h}")
    tags = {**task.tags, TAG_SWEEP: task.sweep, TAG_HASH: h, TAG_OVERRIDES: json.dumps(task.overrides, default=str),
            TAG_HEARTBEAT: f"{time.time():.0f}", **Owner.me().tags(), **runtime_tags(cfg.device)}
    if cfg.threads:  # the experiment sets these for its run; runtime_tags read the process's count before that
        tags["benchkit.threads"] = str(cfg.threads)
    if task.sweep_file:
        tags[TAG_SWEEP_FILE] = task.sweep_file
    # Claim first, then look: one search settles both "already done" and "someone else is on it".
    INTERRUPT_DEFERRED.set()
    try:
        run_id, started = tracker.start_run(exp_id, cfg, run_name=task.run_name, tags=tags, return_start=True)
    except BaseException:
        INTERRUPT_DEFERRED.clear()
        raise
    try:  # entered with the deferral still on: from here on, every interrupt marks this run KILLED
        INTERRUPT_DEFERRED.clear()
        raise_pending_interrupt()  # interrupted while the run was being created: it is ours to mark KILLED
        others = [r for r in tracker.runs(exp_id, h) if r.info.run_id != run_id]
        state = HashState.of(others)
        earlier_alive = [r for r in state.alive if (r.info.start_time, r.info.run_id) < (started, run_id)]
        if state.finished or earlier_alive:
            r = (state.finished or earlier_alive)[0]
            why = "already FINISHED" if state.finished else "in flight elsewhere"
            withdraw_claim(tracker, run_id, f"{why}: run {r.info.run_id}")
            return RunOutcome(task.index, h, "skipped", r.info.run_id, error=why)
        stale = list(state.stale)
        for r in stale:
            if r.info.status == "RUNNING":
                tracker.end_run(r.info.run_id, "KILLED")
        if stale:
            tracker.set_tags(run_id, {TAG_REPLACES: ",".join(r.info.run_id for r in stale)})
        with Heartbeat(tracker, run_id):
            result = PruningExperiment(cfg).run()
            tracker.log_result(run_id, result, plots=task.plots)
        INTERRUPT_DEFERRED.set()  # trained and logged: an interrupt now stops the sweep after this run is FINISHED
    except KeyboardInterrupt as e:
        INTERRUPT_HANDLED.set()  # further stop requests must not cut the bookkeeping short
        INTERRUPT_DEFERRED.clear()
        unrecorded = _record_failure(tracker, run_id, e, "KILLED")
        return RunOutcome(task.index, h, "killed", run_id, time.time() - t0, (str(e) or "interrupted") + unrecorded)
    except Exception as e:  # noqa: BLE001 - a failing config must not stop the sweep
        INTERRUPT_DEFERRED.clear()
        unrecorded = _record_failure(tracker, run_id, e, "FAILED")
        return RunOutcome(task.index, h, "failed", run_id, time.time() - t0, f"{type(e).__name__}: {e}{unrecorded}",
                          repeats=repeats_for_every_run(e) or bool(unrecorded))
    try:
        tracker.end_run(run_id, "FINISHED")
        if stale or state.alive:  # a later claimant yields to us; only these cases can leave extra runs
            _settle(tracker, exp_id, h)
    finally:
        INTERRUPT_DEFERRED.clear()  # an interrupt held meanwhile stays pending: the executor stops the sweep
    metrics = {k: float(result.metrics[k]) for k in SUMMARY_METRICS if k in (result.metrics or {})}
    return RunOutcome(task.index, h, "finished", run_id, time.time() - t0, metrics=metrics)


def _record_failure(tracker: Tracker, run_id: str, exc: BaseException, status: str) -> str:
    """Mark the run FAILED / KILLED; if even that is impossible (the store went read-only, say), say so
    in the outcome instead of raising from the handler of the first error (two tracebacks, no reason)."""
    try:
        tracker.fail_run(run_id, exc, status=status)
        return ""
    except Exception as e:  # noqa: BLE001
        return f" (and the run could not be marked {status}: {type(e).__name__}: {e})"


def withdraw_claim(tracker: Tracker, run_id: str, why: str) -> None:
    """A claim that lost to another run of its hash: closed (KILLED, with the winner named), then
    deleted. Deleted alone it would sit in MLflow's trash as RUNNING forever."""
    tracker.set_tags(run_id, {TAG_WITHDRAWN: why})
    tracker.end_run(run_id, "KILLED")
    tracker.delete_run(run_id)


def _settle(tracker: Tracker, exp_id: str, h: str) -> None:
    """Leave exactly one FINISHED run for the hash (the first to finish) and no superseded failures."""
    state = HashState.of(tracker.runs(exp_id, h))
    keep = min(state.finished, key=lambda r: (r.info.end_time or 0, r.info.run_id), default=None)
    for r in state.finished:
        if r is not keep:
            tracker.delete_run(r.info.run_id)
    if keep is not None:
        for r in state.stale:
            if r.info.status in ("FAILED", "KILLED"):
                tracker.delete_run(r.info.run_id)


# --------------------------------------------------------------------------------------------- sweep driver
@dataclass
class SweepSummary:
    outcomes: list[RunOutcome]
    skipped: int
    excluded: int
    interrupted: bool = False
    interrupt_reason: str = ""  # e.g. "interrupted (Ctrl-C / SIGINT)", "terminated (SIGTERM)"
    stopped: str = ""  # why the sweep stopped early: a failure that every remaining run would repeat
    not_started: int = 0  # runs never started because the sweep stopped early

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def ok(self) -> bool:
        return not self.interrupted and not self.stopped and self.count("failed") == 0 and self.count("killed") == 0


def make_tasks(entries: Sequence[PlanEntry], *, experiment_id: str, tracking_uri: str, sweep: str,
               sweep_file: str | None, tags: dict[str, str], progress: bool, plots: bool = True) -> list[RunTask]:
    tasks = []
    for e in entries:
        if not e.runnable:
            continue
        d = e.config.to_dict()
        if not progress:
            d["progress"] = False  # parallel runs would garble per-run bars; non-semantic: same hash
        tasks.append(RunTask(e.index, d, e.config_hash, run_name(e.config, e.overrides), e.overrides,
                             experiment_id, tracking_uri, sweep, sweep_file, tags, plots))
    return tasks


def run_sweep(entries: list[PlanEntry], *, experiment: str, tracker: Tracker, executor: str = "local",
              workers: int = 1, sweep_file: str | None = None, executor_options: dict[str, Any] | None = None,
              on_outcome: Callable[[RunOutcome, RunTask], None] | None = None, verbose: bool = True,
              plots: bool = True, view: dict[str, Any] | None = None,
              run_fn: Callable[[RunTask], RunOutcome] = run_tracked) -> SweepSummary:
    """Execute the runnable entries of a plan. The experiment is created here, once, before any worker starts.

    A run that fails for a reason every other run would meet too (``RunOutcome.repeats``: a read-only
    output folder, a full disk, a store that cannot be written) stops the sweep: nothing new starts,
    the runs in flight finish, and :attr:`SweepSummary.stopped` says why. ``view``: the experiment's
    MLflow UI view (:func:`benchkit.tracking.Tracker.set_runs_view`), default the sweep's axes."""
    from benchkit.progress import SweepProgress
    from benchkit.tracking import source_tags

    exp_id = tracker.ensure_experiment(experiment)
    tracker.set_runs_view(exp_id, **(view if view is not None else sweep_view(entries)))
    tags = source_tags()
    per_run_bar = workers == 1 and executor == "local"  # the trainer hides its bar off a terminal
    tasks = make_tasks(entries, experiment_id=exp_id, tracking_uri=tracker.uri, sweep=experiment,
                       sweep_file=sweep_file, tags=tags, progress=per_run_bar, plots=plots)
    by_index = {t.index: t for t in tasks}
    skipped = sum(e.status in ("finished-skip", "running", "duplicate") for e in entries)
    excluded = sum(e.status == "excluded" for e in entries)
    outcomes: list[RunOutcome] = []
    ex = get_executor(executor, workers=workers, **(executor_options or {}))
    if ex.in_process:
        import_run_modules()  # runs here: what the first would import lazily, imported now, collector off
    else:
        freeze_heap()  # runs elsewhere: the collector back on if the command turned it off
    bar = SweepProgress(len(tasks), desc=experiment)
    interrupted, reason, stopped = False, "", ""
    try:
        for outcome in ex.run(run_fn, tasks):
            outcomes.append(outcome)
            bar.update(outcome)
            if verbose:
                bar.write(describe(outcome, by_index[outcome.index], len(outcomes), len(tasks)))
            if on_outcome:
                on_outcome(outcome, by_index[outcome.index])
            if outcome.repeats and not stopped:
                stopped = (f"run #{outcome.index} failed with an error that every run would repeat, so the sweep "
                           f"stopped: {outcome.error}")
                ex.cancel_pending()
    except KeyboardInterrupt as e:
        interrupted, reason = True, str(e) or "interrupted (Ctrl-C / SIGINT)"
        for outcome in ex.interrupted_outcomes():
            outcomes.append(outcome)
    finally:
        bar.close()
    for o in confirm_finished(tracker, outcomes):
        print(f"run #{o.index} {o.run_id}: {o.error}", file=sys.stderr)
    not_started = len(tasks) - len({o.index for o in outcomes}) if stopped else 0
    return SweepSummary(outcomes, skipped, excluded, interrupted, reason, stopped, not_started)


def confirm_finished(tracker: Tracker, outcomes: list[RunOutcome]) -> list[RunOutcome]:
    """Re-read the store's status of every run the sweep saw finish; one the store does not show
    FINISHED (seen once: a run logged in full but left RUNNING) becomes ``failed`` with the reason, so
    the sweep does not exit "successfully" over it. Re-running the sweep redoes such a run. Returns
    the outcomes changed."""
    changed = []
    for o in outcomes:
        if o.status != "finished" or not o.run_id:
            continue
        try:
            status = tracker.run_status(o.run_id)
        except Exception as e:  # noqa: BLE001 - unreadable is unconfirmed, said as such
            status = f"unreadable ({type(e).__name__}: {e})"
        if status != "FINISHED":
            o.status = "failed"
            o.error = (f"the run reported finished but the store shows it {status}; "
                       "run the same command again to redo it")
            changed.append(o)
    return changed


def sweep_view(entries: Sequence[PlanEntry]) -> dict[str, Any]:
    """What the MLflow UI should show for this sweep: its axes (the keys its combinations vary) as param
    columns, ordered as in the file."""
    axes: list[str] = []
    for e in entries:
        for k in e.overrides:
            if k not in axes:
                axes.append(k)
    return {"params": axes}


def describe(o: RunOutcome, task: RunTask, k: int, n: int) -> str:
    """One log line per completed run: ``[3/8] finished  #2 1a2b3c4d  criterion=random ...  test_acc1=0.91``."""
    line = f"[{k}/{n}] {o.status:<8} #{o.index:<3} {o.config_hash[:8]}  {task.run_name}"
    if o.metrics:
        line += "  " + " ".join(f"{m}={v:.4g}" for m, v in o.metrics.items())
    if o.seconds:
        line += f"  ({o.seconds:.1f}s)"
    if o.error and o.status != "finished":
        line += f"  {o.error}"
    return line
