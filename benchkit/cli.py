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

EXIT_OK, EXIT_FAILED_RUNS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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

    r = sub.add_parser("run", help="run one config (a config YAML, or the base of a sweep file)",
                       description="Run one config and track it in MLflow. A config already FINISHED in the "
                                   "store (same config hash) is not run again.")
    r.add_argument("config", metavar="CONFIG", help="config YAML (a sweep file's `base:` is used)")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. prune.compression=8")
    r.add_argument("--no-plots", action="store_true", help="skip the SVG plot artifacts (training curve, per-layer density)")
    store(r)

    s = sub.add_parser("sweep", help="expand a sweep YAML into runs and execute them (resumable)",
                       description="Expand grid × zip minus exclusions into runs; skip configs already FINISHED, "
                                   "redo FAILED/interrupted ones. Overrides apply to the base (and pin a grid or zip axis).")
    s.add_argument("sweep", metavar="SWEEP.yaml")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the base config")
    s.add_argument("--workers", "-j", type=int, default=1, metavar="N",
                   help="runs in parallel (local: processes sharing the store, torch threads = cores // N)")
    s.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local processes (default) or Ray tasks")
    s.add_argument("--dry-run", action="store_true",
                   help="print the plan (hash, overrides, new / finished-skip / redo / excluded) and exit")
    s.add_argument("--num-cpus", type=float, default=1, help="ray: CPUs reserved per run (default 1)")
    s.add_argument("--num-gpus", type=float, default=0, help="ray: GPUs reserved per run, fractions allowed")
    s.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="ray: cluster address (default $RAY_ADDRESS, else a local Ray)")
    s.add_argument("--no-plots", action="store_true", help="skip the SVG plot artifacts (training curve, per-layer density)")
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
    rep.add_argument("--format", choices=["table", "csv", "markdown"], default="table")
    rep.add_argument("--sort", default=None, metavar="COLUMN", help="sort by this column; descending with a leading minus: --sort=-test_acc1")
    rep.add_argument("--all", action="store_true", help="include FAILED / KILLED / RUNNING runs (default: FINISHED)")
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
                   help="forms to measure (default: dense,csr,torch_csr,semi_structured; see benchkit.FORMS)")
    d.add_argument("--repeats", type=int, default=20, help="timed calls per candidate (default 20)")
    d.add_argument("--warmup", type=int, default=3)
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
                       description="Start `mlflow ui` bound to 127.0.0.1 on the store the other commands use.")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    store(u)
    return p


def _version() -> str:
    from benchkit import __version__

    return __version__


# --------------------------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    import benchkit.timing  # noqa: F401  (registers every timing's settings section before the file is read)
    from benchkit.config import ExperimentConfig
    from benchkit.sweep import PlanEntry, format_plan, plan_notes, plan_sweep
    from benchkit.tracking import Tracker

    cfg = ExperimentConfig.from_yaml(args.config, args.overrides)
    tracker = Tracker(args.tracking_uri)
    overrides = dict(o.split("=", 1) for o in args.overrides if "=" in o)
    entries = plan_sweep([PlanEntry(0, overrides, cfg, cfg.config_hash())], tracker, cfg.experiment)
    print(format_plan(entries, cfg.experiment, tracker.uri, plan_notes(tracker, cfg.experiment)))
    return _execute(entries, cfg.experiment, tracker, workers=1, executor="local", sweep_file=args.config,
                    plots=not args.no_plots)


def cmd_sweep(args: argparse.Namespace) -> int:
    from benchkit.sweep import expand, format_plan, load_sweep, plan_notes, plan_sweep
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
    spec = load_sweep(args.sweep, args.overrides)
    from benchkit.executors import start_worker_server, uses_worker_pool

    if uses_worker_pool(args.executor, args.workers) and not args.dry_run:
        start_worker_server()  # the workers' imports run on another core while the sweep is planned
    entries = expand(spec)  # every config is built and validated here, before anything runs
    tracker = Tracker(args.tracking_uri)
    plan_sweep(entries, tracker, spec.experiment)
    print(format_plan(entries, spec.experiment, tracker.uri, plan_notes(tracker, spec.experiment)))
    if args.dry_run:
        return EXIT_OK
    options: dict[str, Any] = {}
    if args.executor == "ray":
        options = {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus, "address": args.ray_address}
    return _execute(entries, spec.experiment, tracker, workers=args.workers, executor=args.executor,
                    sweep_file=args.sweep, options=options, plots=not args.no_plots)


def _execute(entries, experiment: str, tracker, *, workers: int, executor: str, sweep_file: str | None,
             options: dict[str, Any] | None = None, plots: bool = True) -> int:
    from benchkit.sweep import run_sweep

    todo = sum(e.runnable for e in entries)
    if not todo:
        print("nothing to run: every config is finished, in flight elsewhere or excluded")
        return EXIT_OK
    summary = run_sweep(entries, experiment=experiment, tracker=tracker, executor=executor, workers=workers,
                        sweep_file=sweep_file, executor_options=options, plots=plots)
    parts = [f"{summary.count(s)} {s}" for s in ("finished", "failed", "killed", "skipped") if summary.count(s)]
    if summary.skipped:
        parts.append(f"{summary.skipped} not run (finished before / duplicate / in flight)")
    if summary.excluded:
        parts.append(f"{summary.excluded} excluded")
    print(f"{experiment}: " + ", ".join(parts or ["no runs"]) + f"  [{tracker.uri}]")
    if summary.interrupted:
        print("interrupted: the run(s) in flight are marked KILLED; run the same command again to resume")
        return EXIT_INTERRUPTED
    if summary.count("failed"):
        print("failed runs carry their traceback as the artifact traceback.txt; "
              f"list them with: benchkit report -e {experiment} --all --filter \"attributes.status = 'FAILED'\"")
        return EXIT_FAILED_RUNS
    return EXIT_OK


HEADLINE_METRICS = ("compression_ratio", "theoretical_speedup", "val_acc1", "test_acc1")
HIDDEN_PARAMS = ("output_dir", "cache_dir", "progress", "data.root", "name", "experiment")


def cmd_report(args: argparse.Namespace) -> int:
    import mlflow
    import pandas as pd

    from benchkit.tracking import resolve_tracking_uri

    uri = require_store(resolve_tracking_uri(args.tracking_uri))
    client = mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    if args.experiment:
        missing = [n for n in args.experiment if client.get_experiment_by_name(n) is None]
        if missing:
            names = [e.name for e in client.search_experiments()]
            raise _usage(f"no experiment {missing[0]!r} in {uri}; experiments there: {', '.join(names) or 'none'}")
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
    print(render(table, args.format))
    return EXIT_OK


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


def select_columns(df, columns: str | None):
    import pandas as pd

    if df is None or len(df) == 0:
        return pd.DataFrame()
    if columns:
        # once each: two names of one column (run, name) would make a table that cannot be rendered
        cols = list(dict.fromkeys(resolve_column(df, c) for c in columns.split(",") if c.strip()))
    else:
        params = [c for c in df.columns if c.startswith("params.") and _short(c) not in HIDDEN_PARAMS
                  and df[c].astype(str).nunique(dropna=False) > 1]
        metrics = [f"metrics.{m}" for m in HEADLINE_METRICS if f"metrics.{m}" in df.columns]
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

    from benchkit.deployment.artifacts import deploy_checkpoint

    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise _usage("--batch-size, --repeats and --threads must be >= 1, --warmup >= 0")
    source = Path(args.source)
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent) / "deploy"
    forms = [f.strip() for f in args.forms.split(",") if f.strip()] if args.forms else None
    deploy_checkpoint(source, out, config=args.config, device=args.device, batch_size=args.batch_size,
                      threads=args.threads, forms=forms, warmup=args.warmup, repeats=args.repeats,
                      onnx=not args.no_onnx, sizes=not args.no_sizes)
    print((out / "deploy_report.md").read_text(), end="")
    print(f"written to {out}")
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from benchkit.tracking import resolve_tracking_uri, sqlite_path

    uri = require_store(resolve_tracking_uri(args.tracking_uri))
    if uri.startswith(("http://", "https://")):
        raise _usage(f"{uri} is already a tracking server: open it in a browser")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    db = sqlite_path(uri)
    if db is not None:
        cmd += ["--default-artifact-root", str(db.parent / "mlartifacts")]
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=10)
        return EXIT_OK


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
        print(f"benchkit {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # MLflow filter syntax and friends: say it plainly, no traceback wall
        if type(e).__name__ == "MlflowException" and args.command == "report":
            print(f"benchkit report: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise


def entry() -> None:
    """The ``benchkit`` console script: :func:`main` with the cyclic garbage collector off until the
    runs start (``run_sweep`` freezes the heap and turns it back on: importing torch, MLflow and
    scikit-learn creates millions of long-lived objects and no garbage, yet pays full collections over
    them, a quarter of the import time), then exit without the interpreter's final collection (about
    1.2 s on a 2-core machine, paid by every command after its last line was printed). Objects alive
    now are frozen out of that collection; atexit handlers, file and database closing run as usual."""
    gc.disable()
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    entry()
