"""The rows a claim reads: one experiment's runs, their rounds/levels and their per-layer tables, loaded once
from an MLflow store through :mod:`benchkit.analysis` and kept for every claim of a card.

Sources (registry :data:`SOURCES`, add your own with ``SOURCES.register(name)``):

* ``runs``: one row per FINISHED run (``benchkit.analysis.load_runs``): params, final metrics, and the
  short strategy columns (``criterion``, ``allocation``, ``compression``, ``seed``...);
* ``levels``: one row per post-training round / lottery level / control branch, from each run's
  ``levels.csv`` artifact, with ``branch`` (``main`` for the run's own rounds) and the run's columns beside;
* ``layers``: one row per prunable layer of each run (``layers.csv``), with the run's columns beside.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

import pandas as pd

from benchkit import analysis as ba
from benchkit.config import current_key
from benchkit.registry import Registry

# --------------------------------------------------------------------------------------------- old names
_SHORT_RENAMES = {"scope": "allocation"}  # short columns of frames built before the config re-layout


def current_names(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with old param columns under today's names and values (:func:`benchkit.config.current_key`:
    ``prune.scope``/``scope`` → ``allocation`` with ``layer`` → ``uniform``, ``prune.finetune.epochs`` →
    ``prune.post.finetune.epochs``...). Runs read by :func:`benchkit.analysis.load_runs` already are; this
    serves frames from elsewhere. Where a run has the new name and another the old one, the columns merge."""
    out = frame.copy()
    for col in list(out.columns):
        old_key = "prune.scope" if col in _SHORT_RENAMES else col
        new_key, _ = current_key(old_key)
        if new_key == old_key:
            continue
        new = _SHORT_RENAMES.get(col, new_key)
        values = out.pop(col).map(lambda v, k=old_key: current_key(k, v)[1] if isinstance(v, str) else v)
        out[new] = values if new not in out else out[new].where(out[new].notna(), values)
    return out


# --------------------------------------------------------------------------------------------- sources
SOURCES: Registry[Callable[[StudyData], pd.DataFrame]] = Registry("claim source")


class StudyData:
    """The frames of one experiment in one store, each loaded on first use."""

    def __init__(self, experiment: str, tracking_uri: str | None = None):
        self.experiment, self.tracking_uri = experiment, tracking_uri
        self._frames: dict[str, pd.DataFrame] = {}

    def frame(self, source: str) -> pd.DataFrame:
        if source not in self._frames:
            self._frames[source] = SOURCES.get(source)(self)
        return self._frames[source]

    @property
    def runs(self) -> pd.DataFrame:
        return self.frame("runs")

    def finished_count(self) -> int:
        """How many FINISHED runs of the experiment the store holds."""
        return len(self.runs)

    def available(self) -> bool:
        """Whether the store holds a FINISHED run of the experiment."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        exp = client.get_experiment_by_name(self.experiment)
        return exp is not None and bool(client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                                           max_results=1))


@SOURCES.register("runs")
def load_study_runs(study: StudyData) -> pd.DataFrame:
    runs = ba.load_runs(study.experiment, tracking_uri=study.tracking_uri)
    if runs.empty:
        raise ValueError(f"experiment {study.experiment!r} in {study.tracking_uri} has no FINISHED run; run its sweep "
                         "first")
    return current_names(runs)


def _per_run_tables(study: StudyData, artifact: str) -> pd.DataFrame:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file read otherwise
    runs = study.runs
    parts = []
    for run_id in runs["run_id"]:
        try:
            table = ba.load_artifact_table(run_id, artifact, tracking_uri=study.tracking_uri)
        except FileNotFoundError:  # a run with no rows of this kind (a static sparse run has no mask updates)
            continue
        if len(table):
            parts.append(table.assign(run_id=run_id))
    if not parts:
        raise ValueError(f"no run of {study.experiment!r} has a {artifact} artifact")
    rows = pd.concat(parts, ignore_index=True)
    # the run's columns beside each row (a row's own value wins: a level's test_acc1 is that level's)
    extra = [c for c in runs.columns if c not in rows.columns and c != "run_id"]
    return rows.merge(runs[["run_id", *extra]], on="run_id", how="left")


@SOURCES.register("levels")
def load_study_levels(study: StudyData) -> pd.DataFrame:
    """Rounds (post), levels and control branches (lottery), updates (during): one row each, from levels.csv."""
    levels = _per_run_tables(study, "levels.csv")
    branch = levels["branch"] if "branch" in levels else pd.Series(math.nan, index=levels.index)
    levels["branch"] = branch.map(lambda b: "main" if b is None or (isinstance(b, float) and math.isnan(b))
                                  else str(b))
    return levels


@SOURCES.register("layers")
def load_study_layers(study: StudyData) -> pd.DataFrame:
    return _per_run_tables(study, "layers.csv")


# --------------------------------------------------------------------------------------------- metrics
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def metric_values(frame: pd.DataFrame, metric: str) -> pd.Series:
    """A column of ``frame``, or an expression over its columns (``theoretical_speedup / compression_ratio``;
    dotted names in backticks: ```prune.post.rounds` * 3``), evaluated by pandas."""
    if metric in frame:
        return pd.to_numeric(frame[metric], errors="coerce").astype(float)
    if _NAME.match(metric):
        raise KeyError(f"no column {metric!r} in these rows; numeric columns: "
                       f"{', '.join(c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c]))}")
    try:
        values = frame.eval(metric, engine="python")
    except Exception as e:  # pandas raises many types for a bad expression
        raise ValueError(f"cannot evaluate {metric!r} over these rows: {type(e).__name__}: {e}") from None
    return pd.Series(values, index=frame.index, dtype=float)


def describe_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
