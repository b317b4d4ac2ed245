"""What the study notebooks (notebooks/0*_*.py) share: where a study reads its runs and where its tables,
figures and findings go, so a notebook holds only its analysis.

>>> study = Study("strategies", "sqlite:///results/studies/mlflow.db", "results/strategies", notebook="01_strategies.py")
>>> study.publish(study.provenance(), "study")   # OUTPUT/study.csv (full precision) and .md, shown in the notebook
>>> runs = study.runs()                          # FINISHED runs, params under today's names
>>> study.show(fig, "tradeoff")                  # OUTPUT/tradeoff.png
>>> study.finding("Dense test accuracy ...")     # one sentence of OUTPUT/findings.md, computed from the runs
>>> study.write_findings()

Every sentence of ``findings.md`` goes through :meth:`Study.finding`, so no number there is typed by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from benchkit.analysis.runs import load_layers, load_runs, param_columns
from benchkit.analysis.tables import save_table, to_markdown


def _display(obj: Any) -> None:
    """Show ``obj`` in a notebook (IPython's display), print it elsewhere."""
    try:
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython comes with Jupyter
        print(obj)
    else:
        display(obj)


def _markdown(text: str) -> Any:
    try:
        from IPython.display import Markdown
    except ImportError:  # pragma: no cover
        return text
    return Markdown(text)


@dataclass
class Study:
    """One study's store, experiment and output folder (created), and the findings collected so far."""

    experiment: str
    tracking_uri: str
    output: Path | str
    notebook: str = ""  # the notebook's file name, for the provenance line of findings.md
    repo: Path | str | None = None  # a store under this folder is named relative to it in findings.md
    findings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        self.output.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ reading
    def runs(self, status: str | None = "FINISHED", **kwargs: Any) -> pd.DataFrame:
        """:func:`benchkit.analysis.load_runs` of this study's experiment and store."""
        return load_runs(self.experiment, tracking_uri=self.tracking_uri, status=status, **kwargs)

    def provenance(self) -> pd.DataFrame:
        """One row: runs per status, seeds and wall-clock span of the study, read from the store itself. Unfinished
        and failed runs become findings (they are left out of every table); no finished run is an error."""
        every = self.runs(status=None)
        done = every[every["status"] == "FINISHED"]
        if done.empty:
            raise RuntimeError(f"no FINISHED runs of {self.experiment!r} in {self.tracking_uri}; run the sweep first "
                               f"(statuses there: {every['status'].value_counts().to_dict()})")
        counts = every["status"].value_counts()
        finished, failed = int(counts.get("FINISHED", 0)), int(counts.get("FAILED", 0))
        row = {"experiment": self.experiment, "finished": finished, "failed": failed,
               "unfinished": int(len(every) - finished - failed),
               "seeds": " ".join(map(str, sorted(done["seed"].unique().tolist()))),
               "first start (UTC)": f"{done['start_time'].min():%Y-%m-%d %H:%M}",
               "last end (UTC)": f"{done['end_time'].max():%Y-%m-%d %H:%M}",
               "span (min)": (done["end_time"].max() - done["start_time"].min()).total_seconds() / 60}
        if "time_total_s" in done:
            row["sum of run times (min)"] = done["time_total_s"].sum() / 60
        if row["unfinished"]:
            self.finding(f"PARTIAL: {row['unfinished']} run(s) of '{self.experiment}' were not finished when this was "
                         "rendered; only the finished ones are analysed.")
        if failed:
            bad = every[every["status"] == "FAILED"]
            differ = [c for c in param_columns(every) if c != "seed"
                      and set(bad[c].astype(str)) != set(done[c].astype(str))]
            settings = "; ".join(f"{c} = {', '.join(sorted(set(bad[c].astype(str))))}" for c in differ)
            self.finding(f"{failed} FAILED run(s) of '{self.experiment}' are in the store and left out of every table "
                         "(tracebacks: their traceback.txt artifact)" + (f"; their settings: {settings}" if settings
                                                                           else "") + ".")
        return pd.DataFrame([row])

    def layer_tables(self, chosen: pd.DataFrame, label: Callable[[pd.Series], str]) -> dict[str, pd.DataFrame]:
        """``label(row)`` → that run's ``layers.csv`` (with its ``run_id``); runs whose artifacts are not at hand
        are named and skipped."""
        tables = {}
        for _, r in chosen.iterrows():
            try:
                tables[label(r)] = load_layers(r["run_id"], tracking_uri=self.tracking_uri).assign(run_id=r["run_id"])
            except (FileNotFoundError, OSError) as e:
                print(f"no layers.csv for run {r['run_id']} ({type(e).__name__}): per-layer tables are run "
                      "artifacts, stored beside the tracking store that wrote them (mlartifacts/)")
        return tables

    # ------------------------------------------------------------------ writing
    def save(self, table: pd.DataFrame, name: str, floatfmt: str = ".4g") -> None:
        """``OUTPUT/<name>.csv`` (full precision) and ``.md``."""
        save_table(table, self.output / f"{name}.csv")
        save_table(table, self.output / f"{name}.md", floatfmt=floatfmt)

    def publish(self, table: pd.DataFrame, name: str, floatfmt: str = ".4g") -> None:
        """:meth:`save` the table, and show it here."""
        self.save(table, name, floatfmt)
        _display(_markdown(to_markdown(table, floatfmt=floatfmt)))

    def show(self, fig: Any, name: str) -> None:
        """``OUTPUT/<name>.png`` at 150 dpi, and the figure shown here."""
        fig.savefig(self.output / f"{name}.png", dpi=150)
        _display(fig)

    def finding(self, text: str) -> None:
        """One sentence of ``findings.md``; its numbers are computed from the runs in the notebook."""
        self.findings.append(text)
        print(text)

    def store_label(self) -> str:
        """The store as findings.md names it: a sqlite file under ``repo`` relative to it."""
        if self.repo is not None:
            prefix = f"sqlite:///{Path(self.repo).resolve()}/"
            if self.tracking_uri.startswith(prefix):
                return "sqlite:///" + self.tracking_uri[len(prefix):]
        return self.tracking_uri

    def write_findings(self) -> Path:
        """``OUTPUT/findings.md``: where the numbers come from, then every finding, one bullet each."""
        lines = [f"# Findings: {self.experiment}", "",
                 f"Computed by `notebooks/{self.notebook}` from `{self.store_label()}` (experiment `{self.experiment}`"
                 + ("; store path relative to the repository root" if self.store_label() != self.tracking_uri else "")
                 + ").", "", *[f"- {f}" for f in self.findings]]
        path = self.output / "findings.md"
        path.write_text("\n".join(lines) + "\n")
        _display(_markdown("\n".join(lines)))
        return path
