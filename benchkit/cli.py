"""``benchkit`` command line: run one config, run a sweep, tabulate runs, open the MLflow UI.

    benchkit run experiments/quickstart.yaml train.epochs=2
    benchkit sweep experiments/quickstart.yaml --workers 2
    benchkit sweep experiments/quickstart.yaml --dry-run
    benchkit report --experiment quickstart --filter "params.prune.criterion = 'magnitude'" --format markdown
    benchkit deploy runs/<hash> --batch-size 64 --threads 1
    benchkit verify strategies            (a reproduction card's claims, checked against the runs)
    benchkit ui

Torch, MLflow and Ray are imported inside the commands, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import difflib
import gc
import os
import sys
from collections.abc import Sequence
from typing import Any

from benchkit.tracking import HEADLINE_METRICS

EXIT_OK, EXIT_FAILED_RUNS, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


# --------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchkit",
        description="Run, track and compare neural-network pruning experiments (MLflow-backed).",
        epilog="Runs go to MLflow: --tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here.",
    )
    p.add_argument("--version", action="version", version=f"benchkit {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def store(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--tracking-uri", metavar="URI", default=None,
                        help="MLflow store: sqlite:///path.db, a directory, or http://host:port of an mlflow server "
                             "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)")
        sp.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (default: one line naming the problem)")

    def plugins(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import this module (or ./file.py) first, so its criteria, models, timings... can "
                             "be named in the config; repeatable. Also `plugins:` in the YAML, and installed "
                             "`benchkit.plugins` entry points (docs/plugins.md)")

    r = sub.add_parser("run", help="run one config (a config YAML, or the base of a sweep file)",
                       description="Run one config and track it in MLflow. A config already FINISHED in the "
                                   "store (same config hash) is not run again.")
    r.add_argument("config", metavar="CONFIG", help="config YAML (a sweep file's `base:` is used)")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. prune.compression=8")
    r.add_argument("--no-plots", action="store_true", help="skip the SVG plot artifacts (training curve, per-layer density)")
    plugins(r)
    store(r)

    s = sub.add_parser("sweep", help="expand a sweep YAML into runs and execute them (resumable)",
                       description="Expand grid × zip minus exclusions into runs; skip configs already FINISHED, "
                                   "redo FAILED/interrupted ones. Overrides apply to the base (and pin a grid or zip "
                                   "axis); --only runs part of the plan.")
    s.add_argument("sweep", metavar="SWEEP.yaml")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the base config")
    s.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="run part of the plan: these values of a grid axis, or the zip rows whose column has this "
                        "value (e.g. --only model.name=lenet300; a list: seed=[0,1]); repeatable")
    s.add_argument("--workers", "-j", type=int, default=1, metavar="N",
                   help="runs in parallel (local: processes sharing the store, at most one per core, torch "
                        "threads = cores // N)")
    s.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local processes (default) or Ray tasks")
    s.add_argument("--dry-run", action="store_true",
                   help="print the plan (hash, overrides, new / finished-skip / redo / excluded) and exit")
    s.add_argument("--num-cpus", type=float, default=1, help="ray: CPUs reserved per run (default 1)")
    s.add_argument("--num-gpus", type=float, default=0, help="ray: GPUs reserved per run, fractions allowed")
    s.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="ray: cluster address (default $RAY_ADDRESS, else a local Ray)")
    s.add_argument("--no-plots", action="store_true", help="skip the SVG plot artifacts (training curve, per-layer density)")
    plugins(s)
    store(s)

    rep = sub.add_parser("report", help="table of runs read back from MLflow",
                         description="Tabulate runs from MLflow. Columns may be given as params.x / metrics.x / "
                                     "tags.x or bare names (prune.criterion, test_acc1).")
    rep.add_argument("--experiment", "-e", action="append", metavar="NAME",
                     help="experiment name (repeatable; default: every experiment)")
    rep.add_argument("--filter", "-f", default="", metavar="EXPR",
                     help="MLflow filter, e.g. \"params.prune.criterion = 'magnitude' and metrics.test_acc1 > 0.9\"")
    rep.add_argument("--columns", "-c", default=None, metavar="A,B,...",
                     help="columns to show (default: run name, status, params that vary, headline metrics)")
    rep.add_argument("--format", choices=["table", "csv", "markdown"], default=None,
                     help="table (default), csv or markdown")
    rep.add_argument("--sort", default=None, metavar="COLUMN", help="sort by this column; descending with a leading minus: --sort=-test_acc1")
    rep.add_argument("--all", action="store_true", help="include FAILED / KILLED / RUNNING runs (default: FINISHED)")
    rep.add_argument("--aggregate", "-a", action="store_true",
                     help="one row per strategy and operating point (runs that differ only in their seed): n, and "
                          "mean ± std of each metric (-c names the metrics; default: the headline ones)")
    rep.add_argument("--decimals", type=int, default=4, metavar="N", help="--aggregate: decimals of mean ± std")
    rep.add_argument("--output", "-o", default=None, metavar="FILE",
                     help="write the table to FILE (.md, .csv or .txt; the suffix picks the format unless --format "
                          "is given) instead of printing it")
    store(rep)

    d = sub.add_parser("deploy", help="turn a run's pruned model into its fastest runnable form, with a report",
                       description="Deploy a run's final model (run folder with model.pt + config.yaml, or a "
                                   "model.pt): per-layer forms chosen by measurement, saved for torch alone to load, "
                                   "with per-layer theory vs practice, file sizes and an ONNX check.")
    d.add_argument("source", metavar="RUN_DIR|MODEL.pt")
    d.add_argument("--config", default=None, help="config YAML (default: config.yaml beside the checkpoint)")
    d.add_argument("--out", "-o", default=None, help="output folder (default: <run folder>/deploy)")
    d.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    d.add_argument("--batch-size", type=int, default=64, help="batch every time is measured at (default 64)")
    d.add_argument("--threads", type=int, default=None, help="torch threads while timing (default: torch's)")
    d.add_argument("--forms", default=None, metavar="A,B,...",
                   help="forms to measure (default: dense,csr,fused_csr,torch_csr,semi_structured; see benchkit.FORMS)")
    d.add_argument("--repeats", type=int, default=20, help="timed calls per candidate (default 20)")
    d.add_argument("--warmup", type=int, default=3)
    d.add_argument("--compile", action="store_true",
                   help="also time each whole model (dense included) under torch.compile and keep the fastest; "
                        "needs a C++ compiler on CPU")
    d.add_argument("--align", type=int, default=8, metavar="N",
                   help="also time the compacted model with channel counts rounded up to multiples of N (zero "
                        "channels kept; faster GEMM widths); 1 turns it off (default 8)")
    d.add_argument("--no-fold-batchnorm", action="store_true",
                   help="keep BatchNorm layers as they are (default: each one that only follows a convolution is "
                        "folded into it, in every variant timed, dense included)")
    d.add_argument("--no-fused-stages", action="store_true",
                   help="do not time the twins whose convolutions run as fused stages with their ReLU and 2x2 "
                        "max-pool (benchkit::conv_stage; default: timed for every variant, dense included, each "
                        "convolution kept as a stage only where measured faster)")
    d.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and onnxruntime check")
    d.add_argument("--no-sizes", action="store_true", help="skip writing the storage formats")
    v = sub.add_parser("verify", help="check a study's reproduction card (or the ShrinkBench checklist) against runs",
                       description="Evaluate the claims of experiments/<STUDY>.card.yaml on the study's runs and print, "
                                   "per claim, PASS / FAIL / KNOWN (a listed difference) with the numbers that decided "
                                   "it; exit status 1 on a failed claim. --checklist: ShrinkBench's reporting rules.")
    v.add_argument("studies", nargs="*", metavar="STUDY",
                   help="a card (experiments/<STUDY>.card.yaml, by study or experiment name, or its path); with "
                        "--checklist, an MLflow experiment")
    v.add_argument("--all", action="store_true", help="every card in --cards")
    v.add_argument("--cards", default="experiments", metavar="DIR", help="where the cards are (default: experiments)")
    v.add_argument("--markdown", action="store_true",
                   help="print each card's agree/differ text as Markdown (between <!-- verify:NAME --> markers)")
    v.add_argument("--write", metavar="FILE", default=None,
                   help="with --markdown: replace the marked blocks of FILE (e.g. results/README.md)")
    v.add_argument("--checklist", action="store_true",
                   help="ShrinkBench's reporting checklist on the runs of each STUDY (an experiment name)")
    v.add_argument("--metric", default="test_acc1", help="--checklist: the metric whose seed spread is reported")
    v.add_argument("--quiet", "-q", action="store_true", help="print only the points that fail")
    store(v)

    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the same store",
                       description="Start `mlflow ui` bound to 127.0.0.1 on the store the other commands use, and "
                                   "print each experiment's link: its runs in MLflow's machine-learning view, with "
                                   "the sweep's axes and headline metrics as columns.")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    u.add_argument("--experiment", "-e", action="append", metavar="NAME",
                   help="print the link to this experiment's runs (default: every experiment in the store)")
    store(u)
    return p


def _version() -> str:
    from benchkit import __version__

    return __version__


# --------------------------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    from benchkit.tracking import Tracker

    tracker = Tracker(args.tracking_uri)
    tracker.check()  # a dead server or a broken store: one line now, before torch is even imported

    import benchkit.timing  # noqa: F401  (registers every timing's settings section before the file is read)
    from benchkit.config import ExperimentConfig
    from benchkit.plugins import load_plugins, resolve_specs
    from benchkit.sweep import PlanEntry, format_plan, plan_notes, plan_sweep, preflight

    load_plugins(args.plugin)  # before the config names what they register
    cfg = ExperimentConfig.from_yaml(args.config, args.overrides)
    cfg.plugins = list(dict.fromkeys([*cfg.plugins, *resolve_specs(args.plugin)]))  # logged with the run
    overrides = dict(o.split("=", 1) for o in args.overrides if "=" in o)
    entries = plan_sweep([PlanEntry(0, overrides, cfg, cfg.config_hash())], tracker, cfg.experiment)
    print(format_plan(entries, cfg.experiment, tracker.uri, plan_notes(tracker, cfg.experiment)), flush=True)
    preflight(entries, tracker, cfg.experiment)
    return _execute(entries, cfg.experiment, tracker, workers=1, executor="local", sweep_file=args.config,
                    plots=not args.no_plots)


def cmd_sweep(args: argparse.Namespace) -> int:
    from benchkit.jobs import cores
    from benchkit.plugins import load_plugins, resolve_specs
    from benchkit.sweep import expand, format_plan, load_sweep, plan_notes, plan_sweep, preflight
    from benchkit.tracking import Tracker

    if args.workers < 1:
        raise _usage(f"--workers must be >= 1, got {args.workers}")
    if args.executor == "ray":  # a store the Ray workers cannot reach: refuse before anything is read or run
        from benchkit.executors import RayStoreError, check_ray_tracking
        from benchkit.tracking import resolve_tracking_uri

        try:
            check_ray_tracking(args.ray_address, resolve_tracking_uri(args.tracking_uri))
        except RayStoreError as e:
            raise _usage(str(e)) from None
    elif args.workers > cores():
        print(f"note: --workers {args.workers} but this machine gives the sweep {cores()} core(s): running "
              f"{cores()} worker(s); more would only take turns on the same cores", flush=True)
        args.workers = cores()
    tracker = Tracker(args.tracking_uri)
    tracker.check(write=not args.dry_run)  # a dead server or a broken store: one line now, not minutes later
    load_plugins(args.plugin)  # before the sweep file names what they register
    spec = load_sweep(args.sweep, args.overrides, only=args.only)
    if args.plugin:  # carried by every run's config, so that every worker imports them too
        spec.base["plugins"] = list(dict.fromkeys([*spec.base.get("plugins", []), *resolve_specs(args.plugin)]))
    from benchkit.executors import start_worker_server, uses_worker_pool

    if uses_worker_pool(args.executor, args.workers) and not args.dry_run:
        start_worker_server()  # the workers' imports run on another core while the sweep is planned
    entries = expand(spec)  # every config is built and validated here, before anything runs
    plan_sweep(entries, tracker, spec.experiment)
    print(format_plan(entries, spec.experiment, tracker.uri, plan_notes(tracker, spec.experiment)), flush=True)
    if args.dry_run:
        return EXIT_OK
    preflight(entries, tracker, spec.experiment, local=args.executor != "ray")
    options: dict[str, Any] = {}
    if args.executor == "ray":
        options = {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus, "address": args.ray_address}
    return _execute(entries, spec.experiment, tracker, workers=args.workers, executor=args.executor,
                    sweep_file=args.sweep, options=options, plots=not args.no_plots)


def _execute(entries, experiment: str, tracker, *, workers: int, executor: str, sweep_file: str | None,
             options: dict[str, Any] | None = None, plots: bool = True) -> int:
    from benchkit.executors import uses_worker_pool
    from benchkit.jobs import SIGTERM_REASON, cores
    from benchkit.sweep import run_sweep

    todo = sum(e.runnable for e in entries)
    if not todo:
        print("nothing to run: every config is finished, in flight elsewhere or excluded")
        return EXIT_OK
    if uses_worker_pool(executor, workers):
        n = min(workers, todo)
        threads = max(1, cores() // workers)
        print(f"{todo} run{'s' * (todo != 1)} on {n} worker process{'es' * (n != 1)}, {threads} torch "
              f"thread{'s' * (threads != 1)} each", flush=True)
    summary = run_sweep(entries, experiment=experiment, tracker=tracker, executor=executor, workers=workers,
                        sweep_file=sweep_file, executor_options=options, plots=plots)
    _ignore_late_ctrl_c()  # the runs are over: the summary prints whatever else is pressed
    parts = [f"{summary.count(s)} {s}" for s in ("finished", "failed", "killed", "skipped") if summary.count(s)]
    if summary.skipped:
        parts.append(f"{summary.skipped} not run (finished before / duplicate / in flight)")
    if summary.not_started:
        parts.append(f"{summary.not_started} not started")
    if summary.excluded:
        parts.append(f"{summary.excluded} excluded")
    print(f"{experiment}: " + ", ".join(parts or ["no runs"]) + f"  [{tracker.uri}]")
    if summary.interrupted:
        print(f"{summary.interrupt_reason or 'interrupted'}: the run(s) in flight are marked KILLED; run the same "
              "command again to resume")
        return EXIT_TERMINATED if summary.interrupt_reason == SIGTERM_REASON else EXIT_INTERRUPTED
    if summary.stopped:
        print(f"stopped: {summary.stopped}\nFix that, then run the same command again: finished runs are kept.",
              file=sys.stderr)
        return EXIT_FAILED_RUNS
    if summary.count("failed"):
        print("\n".join(failure_lines(summary, experiment)))
        return EXIT_FAILED_RUNS
    return EXIT_OK


def failure_lines(summary, experiment: str, limit: int = 10) -> list[str]:
    """The failed runs by name (index, config hash, MLflow run id, first line of the error), then where
    their tracebacks are. Named here, not only through a store query: a run the store still shows
    RUNNING (``sweep.confirm_finished``) is not FAILED there."""
    failed = sorted((o for o in summary.outcomes if o.status == "failed"), key=lambda o: o.index)
    lines = [f"failed: #{o.index} {o.config_hash[:8]} run {o.run_id or '-'}: "
             f"{(o.error or 'no error recorded').strip().splitlines()[0][:200]}" for o in failed[:limit]]
    if len(failed) > limit:
        lines.append(f"... and {len(failed) - limit} more")
    lines.append("failed runs carry their traceback as the artifact traceback.txt; list those the store marks "
                 f"FAILED with: benchkit report -e {experiment} --all --filter \"attributes.status = 'FAILED'\"")
    return lines


HIDDEN_PARAMS = ("output_dir", "cache_dir", "progress", "data.root", "name", "experiment", "plugins")


def cmd_report(args: argparse.Namespace) -> int:
    import mlflow
    import pandas as pd

    from benchkit.tracking import Tracker

    tracker = Tracker(args.tracking_uri)
    uri = require_store(tracker.uri)
    tracker.check(write=False)
    client = mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    if args.experiment:
        missing = [n for n in args.experiment if client.get_experiment_by_name(n) is None]
        if missing:
            names = [e.name for e in client.search_experiments()]
            raise _usage(f"no experiment {missing[0]!r} in {uri}; experiments there: {', '.join(names) or 'none'}")
    fmt = args.format or _format_of(args.output)
    if args.aggregate:
        table = aggregated_table(uri, args.experiment or [e.name for e in client.search_experiments()],
                                 args.filter, args.columns, fmt, args.decimals, HEADLINE_METRICS)
    else:
        if args.experiment:
            df = mlflow.search_runs(experiment_names=args.experiment, filter_string=args.filter)
        else:
            df = mlflow.search_runs(search_all_experiments=True, filter_string=args.filter)
        if len(df) and not args.all:
            df = df[df["status"] == "FINISHED"]
        table = select_columns(df, args.columns)
    if args.sort and len(table):  # no runs (yet, or after the filter): nothing to sort, "(no runs)"
        col = resolve_column(table, args.sort.lstrip("-"))
        numeric = pd.to_numeric(table[col], errors="coerce")  # params are strings: sort 10 after 4
        key = (lambda c: numeric) if numeric.notna().all() else None
        table = table.sort_values(col, ascending=not args.sort.startswith("-"), key=key)
    text = render(table, fmt)
    if args.output:
        from pathlib import Path

        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {len(table)} row{'s' * (len(table) != 1)} to {out}")
    else:
        print(text)
    return EXIT_OK


def _format_of(output: str | None) -> str:
    suffix = output.rsplit(".", 1)[-1].lower() if output and "." in output else ""
    return {"md": "markdown", "markdown": "markdown", "csv": "csv"}.get(suffix, "table")


def aggregated_table(uri: str, experiments: list[str], filter_string: str, columns: str | None, fmt: str,
                     decimals: int, headline: Sequence[str]):
    """Runs that differ only in their seed, as one row each: the strategy columns (the sweep's axes and
    any other config key that varies), ``n`` and each metric's mean ± std (CSV: ``<m>_mean, <m>_std``).
    Built on :mod:`benchkit.analysis` (what the notebooks use), FINISHED runs only."""
    import pandas as pd

    from benchkit import analysis as ba

    if not experiments:
        return pd.DataFrame()
    runs = ba.load_runs(experiments, tracking_uri=uri, filter_string=filter_string)
    if runs.empty:
        return pd.DataFrame()
    known = ba.metric_columns(runs)
    if columns:
        metrics = []
        for name in (c.strip() for c in columns.split(",") if c.strip()):
            name = name[len("metrics."):] if name.startswith("metrics.") else name
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3)
                hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
                raise _usage(f"--aggregate averages metrics, and {name!r} is not one of these runs' metrics{hint}")
            metrics.append(name)
    else:
        metrics = [m for m in headline if m in known]
    agg = ba.aggregate(runs, metrics=metrics)
    if fmt == "csv":
        return agg
    return ba.summary_table(agg, metrics, decimals=decimals)


#: MLflow columns the table shows under a name of their own; ``-c`` and ``--sort`` take that name too.
TABLE_NAMES = {"tags.mlflow.runName": "run", "tags.benchkit.config_hash": "hash"}
#: More names for them. ``name`` is the run name (the config's ``name`` when it has one); ``params.name`` is the param.
COLUMN_ALIASES = {"run_name": "run", "name": "run", "config_hash": "hash"}


def require_store(uri: str) -> str:
    """The store a read-only command (report, ui) reads: MLflow creates a missing sqlite file on opening,
    so a mistyped path or the wrong folder would show an empty store, made on the spot, as "(no runs)"."""
    from benchkit.tracking import sqlite_path

    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise _usage(f"no MLflow store at {db}: run a sweep first (`benchkit sweep SWEEP.yaml` creates it), "
                     "or pass --tracking-uri (or set $MLFLOW_TRACKING_URI) to the store that holds the runs")
    return uri


def resolve_column(df, name: str) -> str:
    """The column of ``df`` (MLflow's ``params.x``/``metrics.x``/``tags.x`` columns, or a table already
    renamed by :func:`select_columns`) that ``name`` means: as written, a table name or alias, else the
    bare name of a param, metric or tag."""
    name = name.strip()
    short = COLUMN_ALIASES.get(name, name)
    long = {v: k for k, v in TABLE_NAMES.items()}.get(short)
    for cand in (name, long, short, f"params.{name}", f"metrics.{name}", f"tags.{name}"):
        if cand in df.columns:
            return cand
    known = sorted({*(_short(c) for c in df.columns), *TABLE_NAMES.values(), *COLUMN_ALIASES})
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else \
        "columns are run, status, hash and the runs' params, metrics and tags (params.x / metrics.x / tags.x or x)"
    raise _usage(f"no column {name!r}; {hint}")


def _short(col: str) -> str:
    for prefix in ("params.", "metrics.", "tags."):
        if col.startswith(prefix):
            return col[len(prefix):]
    return col


def select_columns(df, columns: str | None, headline: Sequence[str] = HEADLINE_METRICS):
    import pandas as pd

    if df is None or len(df) == 0:
        return pd.DataFrame()
    if columns:
        # once each: two names of one column (run, name) would make a table that cannot be rendered
        cols = list(dict.fromkeys(resolve_column(df, c) for c in columns.split(",") if c.strip()))
    else:
        params = [c for c in df.columns if c.startswith("params.") and _short(c) not in HIDDEN_PARAMS
                  and df[c].astype(str).nunique(dropna=False) > 1]
        metrics = [f"metrics.{m}" for m in headline if f"metrics.{m}" in df.columns]
        head = [c for c in ("tags.mlflow.runName", "status", "tags.benchkit.config_hash") if c in df.columns]
        cols = head + params + metrics
    out = df[cols].copy()
    out.columns = [TABLE_NAMES.get(c, _short(c)) for c in cols]
    return out.reset_index(drop=True)


def render(df, fmt: str) -> str:
    if df is None or len(df) == 0:
        return "(no runs)"
    if fmt == "csv":
        return df.to_csv(index=False).rstrip("\n")
    shown = df.copy()
    for c in shown.columns:
        if shown[c].dtype.kind == "f":
            shown[c] = shown[c].map(lambda v: "" if v != v else f"{v:.4g}")
    shown = shown.fillna("").astype(str)
    if fmt == "markdown":
        head = "| " + " | ".join(shown.columns) + " |"
        rule = "|" + "|".join("---:" if df[c].dtype.kind in "fi" else "---" for c in df.columns) + "|"
        rows = ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in shown.values.tolist()]
        return "\n".join([head, rule, *rows])
    return shown.to_string(index=False)


def cmd_deploy(args: argparse.Namespace) -> int:
    from pathlib import Path

    import benchkit.timing  # noqa: F401  (a run's config.yaml holds every timing's section: register them first)
    from benchkit.deployment.artifacts import deploy_checkpoint

    if (args.batch_size < 1 or args.repeats < 1 or args.warmup < 0 or args.align < 1
            or (args.threads is not None and args.threads < 1)):
        raise _usage("--batch-size, --repeats, --align and --threads must be >= 1, --warmup >= 0")
    source = Path(args.source)
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent) / "deploy"
    forms = [f.strip() for f in args.forms.split(",") if f.strip()] if args.forms else None
    deploy_checkpoint(source, out, config=args.config, device=args.device, batch_size=args.batch_size,
                      threads=args.threads, forms=forms, warmup=args.warmup, repeats=args.repeats,
                      onnx=not args.no_onnx, sizes=not args.no_sizes, compile=args.compile, align=args.align,
                      fold_batchnorm=not args.no_fold_batchnorm, fused_stages=not args.no_fused_stages)
    print((out / "deploy_report.md").read_text(), end="")
    print(f"written to {out}")
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from benchkit.tracking import Tracker, sqlite_path

    tracker = Tracker(args.tracking_uri)
    uri = require_store(tracker.uri)
    if uri.startswith(("http://", "https://")):
        raise _usage(f"{uri} is already a tracking server: open it in a browser")
    tracker.check(write=False)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    db = sqlite_path(uri)
    if db is not None:
        cmd += ["--default-artifact-root", str(db.parent / "mlartifacts")]
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base = f"http://{host}:{args.port}"
    proc = subprocess.Popen(cmd)  # first: the server starts while the links are worked out
    try:
        print(f"MLflow UI for {uri} at {base} (Ctrl-C to stop)", flush=True)
        for name, url in experiment_links(tracker, base, args.experiment):
            print(f"  {name}: {url}", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=10)
        return EXIT_OK
    except BaseException:  # e.g. an --experiment that is not in the store: no server left behind
        proc.terminate()
        proc.wait(timeout=10)
        raise


def experiment_links(tracker, base: str, names: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(name, link) per experiment: its runs in MLflow's machine-learning view with benchkit's columns
    (:meth:`Tracker.set_runs_view`). An experiment from an older benchkit gets that view now, its axes read
    from its runs' ``benchkit.overrides`` tags (where the store can be written; else the link still opens
    the machine-learning view)."""
    import json

    from benchkit.tracking import TAG_OVERRIDES, VIEW_KEY, VIEW_TAG_PREFIX, ui_url

    client = tracker.client
    if names:
        exps = []
        for n in names:
            exp = client.get_experiment_by_name(n)
            if exp is None:
                known = [e.name for e in client.search_experiments()]
                raise _usage(f"no experiment {n!r} in {tracker.uri}; experiments there: {', '.join(known) or 'none'}")
            exps.append(exp)
    else:
        exps = [e for e in client.search_experiments() if e.name != "Default" or client.search_runs([e.experiment_id],
                                                                                                   max_results=1)]
    out = []
    for exp in exps:
        if VIEW_TAG_PREFIX + VIEW_KEY not in exp.tags:
            axes: list[str] = []
            for run in tracker.runs(exp.experiment_id):
                for key in json.loads(run.data.tags.get(TAG_OVERRIDES) or "{}"):
                    if key not in axes:
                        axes.append(key)
            try:
                tracker.set_runs_view(exp.experiment_id, params=axes)
            except Exception:  # noqa: BLE001 - a read-only store: the link still opens the right view
                pass
        out.append((exp.name, ui_url(base, exp.experiment_id)))
    return out


def cmd_verify(args: argparse.Namespace) -> int:
    from benchkit.verify.command import run

    return run(args)


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "report": cmd_report, "ui": cmd_ui, "deploy": cmd_deploy,
            "verify": cmd_verify}


class _UsageError(Exception):
    pass


def _usage(msg: str) -> _UsageError:
    return _UsageError(msg)


def _deploy_errors() -> tuple[type[Exception], ...]:
    """Bad deploy arguments (an unknown form, no CUDA) are usage errors, not tracebacks."""
    if "benchkit.deployment.core" not in sys.modules:
        return ()
    from benchkit.deployment.core import DeployError
    from benchkit.registry import UnknownNameError

    return DeployError, UnknownNameError


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options (`sweep x.yaml --dry-run seed=1`): argparse's
    # positional nargs="*" stops at the first option, so collect the stragglers here.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from benchkit.config import ConfigError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, _UsageError, *_deploy_errors()) as e:
        if getattr(args, "debug", False):
            raise
        print(f"benchkit {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        from benchkit.jobs import SIGTERM_REASON

        print(str(e) or "interrupted", file=sys.stderr)
        return EXIT_TERMINATED if str(e) == SIGTERM_REASON else EXIT_INTERRUPTED
    except Exception as e:  # the store, the data, a plugin, a folder: one line naming it, no traceback wall
        if getattr(args, "debug", False) or not _plain_error(e, args.command):
            raise
        print(f"benchkit {args.command}: error: {e}", file=sys.stderr)
        print("(run again with --debug for the full traceback)", file=sys.stderr)
        return EXIT_USAGE


def _plain_error(e: BaseException, command: str) -> bool:
    """Errors about the user's setup, which a traceback would only bury: the store (StoreError), a plugin,
    the data, a folder or device checked before any run, a filesystem error, MLflow's own messages."""
    from benchkit.plugins import PluginError

    names = {"StoreError", "PreflightError", "DataNotFoundError", "RayStoreError"}
    if isinstance(e, (PluginError, OSError)) or type(e).__name__ in names:
        return True
    return type(e).__name__ == "MlflowException"


def entry() -> None:
    """The ``benchkit`` console script: :func:`main` with the cyclic garbage collector off until the
    runs start (``run_sweep`` freezes the heap and turns it back on: importing torch, MLflow and
    scikit-learn creates millions of long-lived objects and no garbage, yet pays full collections over
    them, a quarter of the import time), then exit without the interpreter's final collection (about
    1.2 s on a 2-core machine, paid by every command after its last line was printed). Objects alive
    now are frozen out of that collection; atexit handlers, file and database closing run as usual."""
    global _LATE_CTRL_C_IGNORED
    _LATE_CTRL_C_IGNORED = True
    gc.disable()
    try:
        code = main()
    except KeyboardInterrupt:  # a second Ctrl-C while the first one was being reported
        code = EXIT_INTERRUPTED
    _ignore_late_ctrl_c()
    gc.freeze()
    sys.exit(code)


#: Set by :func:`entry` (the console script, never a caller of :func:`main` in its own process): once the
#: runs are over, a further Ctrl-C (an impatient second press) has nothing left to stop, so it is ignored
#: rather than cutting the summary short or ending the process by SIGINT with a traceback.
_LATE_CTRL_C_IGNORED = False


def _ignore_late_ctrl_c() -> None:
    import signal
    import threading

    if _LATE_CTRL_C_IGNORED and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    entry()
