"""MLflow → pandas: runs, metric histories, lottery levels and per-layer tables as tidy frames.

Everything goes through MLflow's own client (``MlflowClient.search_runs``, ``get_metric_history``,
``download_artifacts``), so any tracking store MLflow can read — the local ``sqlite:///mlflow.db``,
a ``file:`` folder or a tracking server — works the same way.

A runs frame has one row per run and three kinds of columns, told apart by name alone so the
distinction survives any pandas operation:

* run columns: ``experiment, run_id, run_name, status, start_time, end_time, sweep, config_hash``
  and the short strategy names (``criterion, granularity, allocation, timing, compression, model, data,
  seed``; ``compression`` is the *requested* ratio, the achieved one is the ``compression_ratio``
  metric);
* params: every flattened config key, dotted (``prune.post.finetune.epochs``), typed back from MLflow's
  strings (numbers, bools, ``None``, lists and dicts), under today's names: runs logged before a key was
  renamed are read with the new name (:data:`RENAMED_PARAMS`), so one analysis reads old and new stores;
* metrics: the final value of every metric logged to the run (``test_acc1``, ``compression_ratio``...).
"""

from __future__ import annotations

import ast
import math
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import RunStatus, ViewType

from benchkit.config import RENAMED_KEYS, ExperimentConfig, current_key
from benchkit.config import RENAMED_VALUES as CONFIG_RENAMED_VALUES

# Config keys renamed since runs were logged (round 2's config rework): one table, the config's own
# (benchkit.config.RENAMED_KEYS: an old key also renames every key under it; RENAMED_VALUES: the 'layer' scope
# is the 'uniform' allocation). Runs from any store reach pandas under today's names.
RENAMED_PARAMS: dict[str, str] = RENAMED_KEYS
RENAMED_VALUES: dict[str, dict[Any, Any]] = CONFIG_RENAMED_VALUES

# Dotted config key → short column name. ``compression`` is derived (see ``_requested_compression``).
SHORT_NAMES: dict[str, str] = {
    "prune.criterion": "criterion",
    "prune.granularity": "granularity",
    "prune.allocation": "allocation",
    "prune.timing": "timing",
    "model.name": "model",
    "data.name": "data",
    "seed": "seed",
}
# Tags written by benchkit.tracking, shown under short names.
TAG_NAMES: dict[str, str] = {
    "benchkit.sweep": "sweep",
    "benchkit.config_hash": "config_hash",
    "mlflow.runName": "run_name",
    "mlflow.parentRunId": "parent_run_id",
}
RUN_COLUMNS = ("experiment", "run_id", "run_name", "status", "start_time", "end_time", "sweep", "config_hash")
CONFIG_COLUMNS = ("model", "data", "timing", "criterion", "granularity", "allocation", "compression", "seed")
# Top-level (undotted) config keys: they are params too.
TOP_LEVEL_KEYS = frozenset(k for k, v in ExperimentConfig().to_dict().items() if not isinstance(v, dict))
STATUSES = tuple(RunStatus.to_string(s) for s in RunStatus.all_status())


# --------------------------------------------------------------------------------------------- params
def parse_param(text: str | None) -> Any:
    """Turn an MLflow param string back into the Python value it was logged from.

    MLflow stores ``str(value)``: ``"8.0"`` → 8.0, ``"3"`` → 3, ``"True"`` → True, ``"None"`` → None,
    ``"['fc3']"`` → ['fc3']. Anything that is not a Python literal (``"magnitude"``, ``"2:4"``)
    stays a string.
    """
    if text is None or not isinstance(text, str):
        return text
    s = text.strip()
    if s in {"nan", "inf", "-inf"}:
        return float(s)
    try:
        value = ast.literal_eval(s)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    if isinstance(value, (bool, int, float, list, dict, tuple)) or value is None:
        return value
    return text  # e.g. a quoted string literal or bytes: keep what was logged


def current_param(key: str, value: Any) -> tuple[str, Any]:
    """The name and value a logged param has in today's config (:func:`benchkit.config.current_key`):
    ``("prune.scope", "layer")`` → ``("prune.allocation", "uniform")``."""
    return current_key(key, value)


def _current_params(logged: dict[str, str]) -> dict[str, Any]:
    """Logged params parsed and under today's names; a key logged under both names keeps the new one."""
    params = {}
    for key, text in logged.items():
        name, value = current_param(key, parse_param(text))
        if name != key and name in logged:
            continue
        params[name] = value
    return params


def _typed_column(values: pd.Series) -> pd.Series:
    """Give a column of parsed params a proper dtype: int64/float64 when every value is a number."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        if len(present) == len(values) and all(isinstance(v, int) for v in present):
            return values.astype("int64")
        return pd.to_numeric(values.map(lambda v: math.nan if v is None else v), errors="raise").astype("float64")
    if present and len(present) == len(values) and all(isinstance(v, bool) for v in present):
        return values.astype(bool)
    return values.astype(object)


def is_param_column(name: str) -> bool:
    """Params are the dotted config keys and the top-level ones (``seed``, ``device``...)."""
    return (("." in name and not name.startswith("tags.")) or name in TOP_LEVEL_KEYS) and name not in RUN_COLUMNS


def param_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if is_param_column(c)]


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric columns that are neither run/config columns nor params: the logged metrics."""
    skip = set(RUN_COLUMNS) | set(CONFIG_COLUMNS)
    return [
        c for c in df.columns
        if c not in skip and not is_param_column(c) and not c.startswith("tags.")
        and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
    ]


def _requested_compression(params: dict[str, Any]) -> float | None:
    """The compression a run asked for, from ``prune.compression`` or ``prune.sparsity``."""
    sparsity = params.get("prune.sparsity")
    if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
        return 1.0 / (1.0 - sparsity)
    compression = params.get("prune.compression")
    if isinstance(compression, (int, float)) and not isinstance(compression, bool):
        return float(compression)
    return None


# --------------------------------------------------------------------------------------------- runs
def _client(tracking_uri: str | None) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def _experiments(client: MlflowClient, names: str | Sequence[str]) -> list:
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("load_runs needs at least one experiment name")
    found, missing = [], []
    for name in names:
        exp = client.get_experiment_by_name(name)
        (found if exp is not None else missing).append(exp if exp is not None else name)
    if missing:
        known = sorted(e.name for e in client.search_experiments(view_type=ViewType.ALL, max_results=1000))
        raise ValueError(
            f"no MLflow experiment named {', '.join(map(repr, missing))} in {client.tracking_uri}; "
            f"experiments there: {', '.join(map(repr, known)) or '(none)'}. Set tracking_uri (or "
            "MLFLOW_TRACKING_URI) to the store the sweep wrote to."
        )
    return found


def load_runs(
    experiments: str | Sequence[str],
    *,
    tracking_uri: str | None = None,
    filter_string: str = "",
    status: str | None = "FINISHED",
    include_deleted: bool = False,
    max_results: int | None = None,
) -> pd.DataFrame:
    """One row per run of the named MLflow experiment(s), params typed back, final metrics as floats.

    ``status`` keeps runs in that state only (``FINISHED`` by default, so crashed or running configs
    never reach a plot); ``None`` keeps all. ``filter_string`` is MLflow's search syntax on the names
    and values as the store holds them (a store written before a rename holds the old ones), e.g.
    ``"params.`prune.allocation` = 'global' and metrics.compression_ratio > 4"``.
    """
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)} or None (all runs), got {status!r}")
    if max_results is not None and max_results < 1:
        raise ValueError(f"max_results must be a positive number of runs or None (all), got {max_results}")
    client = _client(tracking_uri)
    exps = _experiments(client, experiments)
    names = {e.experiment_id: e.name for e in exps}
    clauses = [filter_string.strip()] if filter_string.strip() else []  # MLflow: AND only, no parentheses
    if status is not None:
        clauses.append(f"attributes.status = '{status}'")
    view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY

    runs, token = [], None
    while True:
        page_size = 1000 if max_results is None else min(1000, max_results - len(runs))
        page = client.search_runs(list(names), " and ".join(clauses), view, page_size,
                                  ["attributes.start_time ASC"], token)
        runs.extend(page)
        token = page.token
        if not token or (max_results is not None and len(runs) >= max_results):
            break
    return runs_frame(runs, names)


def shared_setting(runs: pd.DataFrame, column: str) -> Any:
    """The value of a setting the runs share, for a sentence: the first logged one (a dense run logs no
    calibration, so ``None`` values are skipped), a whole float as int, a list as comma-separated text;
    ``None`` when no run logged it."""
    values = runs[column].dropna() if column in runs else []
    if not len(values):
        return None
    v = values.iloc[0]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v


def runs_frame(runs: Iterable, experiment_names: dict[str, str] | None = None) -> pd.DataFrame:
    """Build the tidy frame from ``mlflow.entities.Run`` objects (see the module docstring)."""
    rows, param_keys, metric_keys, tag_keys = [], set(), set(), set()
    for run in runs:
        info, data = run.info, run.data
        params = _current_params(data.params)
        row: dict[str, Any] = {
            "experiment": (experiment_names or {}).get(info.experiment_id, info.experiment_id),
            "run_id": info.run_id,
            "status": info.status,
            "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True) if info.start_time else pd.NaT,
            "end_time": pd.to_datetime(info.end_time, unit="ms", utc=True) if info.end_time else pd.NaT,
        }
        for tag, value in data.tags.items():
            if tag in TAG_NAMES:
                row[TAG_NAMES[tag]] = value
            elif not tag.startswith("mlflow."):
                row[f"tags.{tag}"] = value
                tag_keys.add(f"tags.{tag}")
        row.setdefault("run_name", info.run_name)
        for key, short in SHORT_NAMES.items():
            if key in params:
                row[short] = params[key]
        row["compression"] = _requested_compression(params)
        for key, value in params.items():
            if key not in row:  # `seed` is both a param and a short name; `experiment` is the MLflow one
                row[key] = value
                param_keys.add(key)
        for key, value in data.metrics.items():
            name = key if key not in row else f"metrics.{key}"
            row[name] = float(value)
            metric_keys.add(name)
        rows.append(row)

    extra_run = [c for c in TAG_NAMES.values() if c not in RUN_COLUMNS and any(c in r for r in rows)]
    columns = [*RUN_COLUMNS, *extra_run, *CONFIG_COLUMNS,
               *sorted(metric_keys), *sorted(param_keys), *sorted(tag_keys)]
    df = pd.DataFrame(rows, columns=columns)
    for col in [c for c in df.columns if c in CONFIG_COLUMNS or c in param_keys]:
        if len(df):
            df[col] = _typed_column(df[col])
    df["compression"] = df["compression"].astype("float64")  # None (not requested) → NaN
    for col in metric_keys:
        df[col] = df[col].astype("float64")
    return df.reset_index(drop=True)


# --------------------------------------------------------------------------------------------- histories
def _run_ids(runs: pd.DataFrame | Sequence[str] | str) -> list[str]:
    if isinstance(runs, str):
        return [runs]
    if isinstance(runs, pd.DataFrame):
        if "run_id" not in runs:
            raise ValueError("the runs frame has no run_id column; pass the frame load_runs returned")
        return list(runs["run_id"])
    return list(runs)


def load_history(
    runs: pd.DataFrame | Sequence[str] | str,
    metrics: Sequence[str] = ("val_acc1", "val_loss"),
    *,
    phases: Sequence[str] | None = None,
    tracking_uri: str | None = None,
) -> pd.DataFrame:
    """Per-step values of ``metrics`` for each run: columns ``run_id, key, phase, metric, step, value``.

    benchkit.tracking logs a run's curves as ``<phase>/<metric>`` (``dense/val_acc1``,
    ``finetune_r1/val_loss``, ``level_3_reinit/val_acc1``) with step = optimizer iteration in that
    phase; asking for ``val_acc1`` collects it from every phase (or only ``phases``). An exact key
    (``dense/val_acc1``) works too; an unprefixed key counts only where the run logged no phased
    curve of that metric (otherwise it is the run's final value at step 0). Given a runs frame,
    its run and config columns are joined on, so curves group by strategy like final metrics.
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    client = _client(tracking_uri)
    rows = []
    for run_id in _run_ids(runs):
        logged = client.get_run(run_id).data.metrics
        phased = {k.rpartition("/")[2] for k in logged if "/" in k}
        for key in logged:
            phase, _, metric = key.rpartition("/")
            wanted = key in metrics if "/" in key else (key in metrics and key not in phased)
            if not (wanted or (phase and metric in metrics)) or (phases is not None and phase not in phases):
                continue
            for m in client.get_metric_history(run_id, key):
                rows.append({"run_id": run_id, "key": key, "phase": phase, "metric": metric,
                             "step": int(m.step), "value": float(m.value), "timestamp": m.timestamp})
    columns = ["run_id", "key", "phase", "metric", "step", "value", "timestamp"]
    hist = pd.DataFrame(rows, columns=columns)
    if hist.empty:
        raise ValueError(f"none of the runs logged a history for {list(metrics)}"
                         f"{f' in phases {list(phases)}' if phases is not None else ''}; metric keys look like "
                         "'<phase>/<metric>' (e.g. 'dense/val_acc1'): see load_runs(...).columns")
    hist = hist.sort_values(["run_id", "key", "step", "timestamp"]).drop_duplicates(["run_id", "key", "step"],
                                                                                      keep="last")
    if isinstance(runs, pd.DataFrame):
        keep = [c for c in (*RUN_COLUMNS, *CONFIG_COLUMNS) if c in runs and c != "run_id"]
        hist = hist.merge(runs[["run_id", *keep]], on="run_id", how="left")
    return hist.reset_index(drop=True)


# Per-level metrics (benchkit.tracking.level_rows), logged with step = level (or round):
# `level_<quantity>` or `ticket_level_<quantity>` for the ticket, `<control>_level_<quantity>` for each
# control (reinit, random). Curves (`level_3/val_acc1`) contain a slash and are not level metrics.
LEVEL_KEY = re.compile(r"^(?:(?P<branch>[a-z0-9_]+?)_)?level_(?P<quantity>[^/]+)$")  # branch: reinit, scratch_b
TICKET = "ticket"


def level_keys(columns: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Metric name → (branch, quantity) for every lottery level metric among ``columns``."""
    out = {}
    for c in columns:
        m = LEVEL_KEY.match(c)
        if m:
            out[c] = (m["branch"] or TICKET, m["quantity"])
    return out


def load_levels(runs: pd.DataFrame, *, tracking_uri: str | None = None) -> pd.DataFrame:
    """Lottery levels, one row per (run, branch, level): the ticket and its controls (reinit, random).

    Columns: the run/config columns, ``branch``, ``level``, and one column per logged quantity
    (``percent_remaining``, ``test_acc1``, ``val_acc1``, ``best_step``...). A control that does not
    log its own ``percent_remaining`` gets the ticket's at the same level (controls are pruned to
    the same per-layer sparsity).
    """
    keys = level_keys(runs.columns)
    if not keys:
        raise ValueError("no level_* metrics in these runs: select lottery runs (timing == 'lottery'), "
                         "which log level_percent_remaining, level_test_acc1, ... with step = level")
    client = _client(tracking_uri)
    records: dict[tuple[str, str, int], dict[str, Any]] = {}
    for run_id, logged in zip(runs["run_id"], runs[list(keys)].notna().to_numpy()):
        for (key, (branch, quantity)), present in zip(keys.items(), logged):
            if not present:
                continue
            for m in client.get_metric_history(run_id, key):
                rec = records.setdefault((run_id, branch, int(m.step)),
                                         {"run_id": run_id, "branch": branch, "level": int(m.step)})
                rec[quantity] = float(m.value)
    levels = pd.DataFrame(list(records.values()))
    if "percent_remaining" not in levels:
        raise ValueError("the lottery runs logged no level_percent_remaining; it places each level on the x-axis")
    ticket = levels[levels.branch == TICKET].set_index(["run_id", "level"])["percent_remaining"]
    missing = levels["percent_remaining"].isna()
    if missing.any():
        idx = pd.MultiIndex.from_frame(levels.loc[missing, ["run_id", "level"]])
        levels.loc[missing, "percent_remaining"] = ticket.reindex(idx).to_numpy()
    keep = [c for c in (*RUN_COLUMNS, *CONFIG_COLUMNS) if c in runs and c != "run_id"]
    # A level quantity named like a run column (`level_compression` → `compression`, the level's own
    # ratio) keeps its prefix, so the run's requested `compression` still groups strategies.
    levels = levels.rename(columns={c: f"level_{c}" for c in keep if c in levels})
    levels = levels.merge(runs[["run_id", *keep]], on="run_id", how="left")
    return levels.sort_values(["run_id", "branch", "level"]).reset_index(drop=True)


# --------------------------------------------------------------------------------------------- artifacts
def load_artifact_table(run_id: str, path: str = "layers.csv", *, tracking_uri: str | None = None) -> pd.DataFrame:
    """A CSV artifact of a run (``layers.csv``, ``levels.csv``, ``history.csv``) as a DataFrame."""
    client = _client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        moved = _moved_artifact(client, run_id, path)
        if moved is not None:
            return pd.read_csv(moved)
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception as e:  # MLflow raises different types per artifact store
            listed = [f.path for f in client.list_artifacts(run_id)]
            raise FileNotFoundError(
                f"run {run_id} has no artifact {path!r} ({type(e).__name__}); its artifacts: {listed}"
            ) from e
        try:
            return pd.read_csv(Path(local))
        except pd.errors.EmptyDataError:  # runs logged before empty tables were skipped: an empty file
            return pd.DataFrame()


def _moved_artifact(client: MlflowClient, run_id: str, path: str) -> Path | None:
    """The artifact of a sqlite store that was copied or cloned elsewhere (a committed results store).

    MLflow records absolute ``file://`` artifact URIs; benchkit puts a sqlite store's artifacts in
    ``mlartifacts/`` beside the database, so when the recorded folder is gone the same relative path
    under the database's folder is the artifact. None when the recorded location still exists.
    """
    from urllib.parse import unquote, urlparse

    from benchkit.tracking import sqlite_path

    db = sqlite_path(client.tracking_uri)
    uri = client.get_run(run_id).info.artifact_uri or ""
    if db is None or not uri.startswith("file:") or "/mlartifacts/" not in uri:
        return None
    recorded = Path(unquote(urlparse(uri).path))
    if recorded.exists():
        return None
    candidate = db.parent / "mlartifacts" / uri.split("/mlartifacts/", 1)[1] / path
    return candidate if candidate.exists() else None


def load_layers(run_id: str, *, tracking_uri: str | None = None) -> pd.DataFrame:
    """The per-layer table (layer, type, shape, params, nonzero, density, flops, ...) of one run."""
    return load_artifact_table(run_id, "layers.csv", tracking_uri=tracking_uri)
