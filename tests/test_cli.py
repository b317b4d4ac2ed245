"""The `benchkit` command end to end on digits: help, run, report, resume after SIGKILL, two workers, ui."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from benchkit.cli import main
from benchkit.config import ExperimentConfig
from benchkit.tracking import Tracker
from benchkit.validation import load_config

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchkit.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)


def write_sweep(tmp_path: Path, grid: str, experiment: str = "cli", extra_base: str = "") -> Path:
    p = tmp_path / f"{experiment}.yaml"
    p.write_text(textwrap.dedent(f"""\
        experiment: {experiment}
        base:
          data: {{name: digits}}
          model: {{name: lenet300}}
          train: {{epochs: 1, batch_size: 64, lr: 0.05}}
          prune: {{timing: post, compression: 2, finetune: {{epochs: 1, lr: 0.005}}}}
          output_dir: {tmp_path / 'runs'}
        {extra_base}""") + textwrap.dedent(grid))
    return p


def search(uri: str, experiment: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment], run_view_type=mlflow.entities.ViewType.ACTIVE_ONLY)


# --------------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", [[], ["run"], ["sweep"], ["report"], ["ui"]])
def test_every_command_has_fast_help_without_torch(command):
    code = ("import sys\nfrom benchkit.cli import main\ntry:\n    main(sys.argv[1:] + ['--help'])\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'mlflow', 'ray', 'pandas') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "usage: benchkit" in out.stdout
    assert "--tracking-uri" in out.stdout or not command
    assert time.perf_counter() - t0 < 5


# --------------------------------------------------------------------------------------------- run + report
def test_run_then_report_reads_it_back(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = write_sweep(tmp_path, "grid:\n  seed: [0]\n")
    out = cli("run", str(p), "prune.compression=4", "--tracking-uri", uri)
    assert out.returncode == 0, out.stderr
    df = search(uri, "cli")
    assert len(df) == 1 and df["status"][0] == "FINISHED"
    cfg = load_config(p, ["prune.compression=4"])
    assert df["tags.benchkit.config_hash"][0] == cfg.config_hash() and df["params.prune.compression"][0] == "4.0"

    assert df["tags.mlflow.runName"][0] == "compression=4"

    assert main(["run", str(p), "prune.compression=4", "--tracking-uri", uri]) == 0  # finished: not run twice
    assert "finished-skip" in capsys.readouterr().out and len(search(uri, "cli")) == 1

    assert main(["report", "--tracking-uri", uri, "--experiment", "cli", "--format", "csv",
                 "--columns", "run_name,prune.compression,compression_ratio,test_acc1,hash"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(table.columns) == ["run", "prune.compression", "compression_ratio", "test_acc1", "hash"]
    assert table["compression_ratio"][0] == pytest.approx(4.0, rel=1e-3)
    assert table["test_acc1"][0] == pytest.approx(df["metrics.test_acc1"][0])
    assert table["hash"][0] == cfg.config_hash()


def test_report_filters_and_formats(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = write_sweep(tmp_path, "grid:\n  prune.criterion: [magnitude, random]\n  prune.compression: [4, 16]\n")
    assert main(["sweep", str(p), "--tracking-uri", uri]) == 0
    capsys.readouterr()
    # params are stored as text: sorting by one still orders numbers as numbers (4 before 16)
    assert main(["report", "--tracking-uri", uri, "-e", "cli", "-c", "prune.compression", "--format", "csv",
                 "--sort", "prune.compression"]) == 0
    assert [float(v) for v in capsys.readouterr().out.split()[1:]] == [4, 4, 16, 16]
    assert main(["report", "--tracking-uri", uri, "-e", "cli", "--filter", "params.prune.criterion = 'magnitude'",
                 "--format", "markdown", "--sort=-compression_ratio"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    # default columns: name, status, hash, the params that vary among the selected runs, headline metrics
    assert header[:4] == ["run", "status", "hash", "prune.compression"] and "prune.criterion" not in header
    assert "test_acc1" in header and "compression_ratio" in header and lines[1].startswith("|---")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    ratios = [float(r[header.index("compression_ratio")]) for r in rows]
    assert len(rows) == 2 and ratios == sorted(ratios, reverse=True) and ratios[0] == pytest.approx(16, rel=1e-3)

    assert main(["report", "--tracking-uri", uri, "-e", "cli", "--format", "table"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 5  # header + 4 runs
    # mistakes are named, with what exists
    assert main(["report", "--tracking-uri", uri, "-e", "nope"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err
    assert main(["report", "--tracking-uri", uri, "--columns", "test_acc9"]) == 2
    assert "no column 'test_acc9'" in capsys.readouterr().err
    assert main(["report", "--tracking-uri", uri, "--filter", "params.x ==== 1"]) == 2
    assert "error" in capsys.readouterr().err


def test_report_and_ui_refuse_a_store_that_does_not_exist_and_do_not_create_it(tmp_path, monkeypatch, capsys):
    """Opening a missing sqlite file creates an empty store: a wrong folder or a typo would read as '(no runs)'."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"ui started a server: {a}"))
    assert main(["report"]) == 2  # the default store, sqlite:///mlflow.db here
    err = capsys.readouterr().err
    assert f"no MLflow store at {tmp_path / 'mlflow.db'}" in err and "run a sweep first" in err
    assert "--tracking-uri" in err
    for command in (["report", "-e", "x"], ["ui"]):
        assert main([*command, "--tracking-uri", "sqlite:///nope.db"]) == 2
        assert f"no MLflow store at {tmp_path / 'nope.db'}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_report_columns_take_the_names_the_table_shows(tmp_path, capsys):
    """Every header of the default table is a valid -c / --sort name; `name` is the run name; an unknown
    column is answered with close matches, not the list of every column."""
    from benchkit.tracking import TAG_HASH

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    exp = tracker.ensure_experiment("cols")
    for i, criterion in enumerate(["magnitude", "random"]):
        cfg = load_config({"prune": {"criterion": criterion}})
        run_id = tracker.start_run(exp, cfg, run_name=f"criterion={criterion}", tags={TAG_HASH: cfg.config_hash()})
        tracker.log_metrics(run_id, [("test_acc1", 0.5 + i / 4, 0)])
        tracker.end_run(run_id)

    def report(*args: str) -> pd.DataFrame:
        assert main(["report", "--tracking-uri", uri, "--format", "csv", *args]) == 0
        return pd.read_csv(io.StringIO(capsys.readouterr().out))

    default = report("--sort", "run")
    assert list(default.columns) == ["run", "status", "hash", "prune.criterion", "test_acc1"]
    assert list(default["run"]) == ["criterion=magnitude", "criterion=random"]
    for col in default.columns:  # one at a time, and all at once: the default table again
        assert list(report("-c", col).columns) == [col]
    pd.testing.assert_frame_equal(report("-c", ",".join(default.columns), "--sort", "run"), default)
    for name in ("name", "run_name"):  # the run name (the config's name when it has one), once
        assert report("-c", f"run,{name}", "--sort=-" + name)["run"].tolist() == default["run"][::-1].tolist()
    assert report("-c", "params.name")["name"].isna().all()  # the config's own `name` param stays reachable

    assert main(["report", "--tracking-uri", uri, "-c", "run,test_acc9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no column 'test_acc9'; did you mean 'test_acc1'" in err and "prune.granularity" not in err
    assert len(err) < 300, err
    assert main(["report", "--tracking-uri", uri, "--sort", "zzzqqq"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no column 'zzzqqq'" in err and len(err) < 300, err
    # a filter that leaves no runs: "(no runs)", whatever --sort names
    assert main(["report", "--tracking-uri", uri, "--filter", "params.`prune.criterion` = 'snip'",
                 "--sort=-test_acc1"]) == 0
    assert capsys.readouterr().out.strip() == "(no runs)"


# --------------------------------------------------------------------------------------------- resume after kill -9
def test_sweep_killed_with_sigkill_resumes_to_exactly_one_finished_run_per_config(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = write_sweep(tmp_path, "grid:\n  prune.criterion: [magnitude, random]\n  prune.compression: [2, 4]\n",
                    experiment="killed")
    # dense training is cached after the first run, so give the fine-tuning enough epochs (a few seconds)
    # that the poller reliably sees a run in flight
    p.write_text(p.read_text().replace("finetune: {epochs: 1,", "finetune: {epochs: 40,"))
    proc = subprocess.Popen([sys.executable, "-m", "benchkit.cli", "sweep", str(p), "--tracking-uri", uri],
                            cwd=REPO, stdout=open(tmp_path / "sweep.log", "w"), stderr=subprocess.STDOUT)
    client = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            time.sleep(0.2)
            if client is None and (tmp_path / "mlflow.db").exists():
                client = Tracker(uri).client  # waits while the sweep creates the store's tables
            exp = client.get_experiment_by_name("killed") if client else None
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if any(r.info.status == "FINISHED" for r in runs) and any(r.info.status == "RUNNING" for r in runs):
                break
        else:
            pytest.fail("the sweep never had a finished and a running run")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    runs = client.search_runs([exp.experiment_id])
    finished_before = {r.info.run_id for r in runs if r.info.status == "FINISHED"}
    assert 1 <= len(finished_before) < 4 and any(r.info.status == "RUNNING" for r in runs)

    dry = cli("sweep", str(p), "--tracking-uri", uri, "--dry-run")
    plan = dry.stdout.splitlines()[1:]  # one line per config after the summary line
    assert sum(" finished-skip " in line for line in plan) == len(finished_before)
    assert sum(" redo " in line and "interrupted" in line for line in plan) == 1

    out = cli("sweep", str(p), "--tracking-uri", uri)
    assert out.returncode == 0, out.stderr
    df = search(uri, "killed")
    base = load_config(p)
    planned = {base.replace(prune__criterion=c, prune__compression=k).config_hash()
               for c in ("magnitude", "random") for k in (2, 4)}
    assert sorted(df["tags.benchkit.config_hash"]) == sorted(planned)  # each config exactly once
    assert set(df["status"]) == {"FINISHED"}
    assert finished_before <= set(df["run_id"])  # finished runs were skipped, not redone
    # the interrupted run was marked KILLED, then superseded by its redo (kept in MLflow's trash)
    redone = df[df["tags.benchkit.replaces"].notna()]
    assert len(redone) >= 1
    for old in ",".join(redone["tags.benchkit.replaces"]).split(","):
        gone = client.get_run(old)
        assert gone.info.lifecycle_stage == "deleted" and gone.info.status == "KILLED"


# --------------------------------------------------------------------------------------------- parallel
def test_two_workers_lose_no_run(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = write_sweep(tmp_path, "grid:\n  prune.criterion: [magnitude, random]\n  prune.compression: [2, 4]\n"
                    "  prune.scope: [global, layer]\n", experiment="parallel")
    assert main(["sweep", str(p), "--workers", "2", "--tracking-uri", uri]) == 0
    df = search(uri, "parallel")
    assert len(df) == 8 and set(df["status"]) == {"FINISHED"} and df["tags.benchkit.config_hash"].is_unique
    assert df["tags.benchkit.pid"].nunique() == 2  # two worker processes shared the work
    cores = len(os.sched_getaffinity(0))
    assert set(df["tags.benchkit.threads"]) == {str(max(1, cores // 2))}
    assert (df["metrics.test_acc1"] > 0).all()
    assert "8 finished" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- ui
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_same_store_on_localhost(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = write_sweep(tmp_path, "grid:\n  seed: [0]\n", experiment="shown")
    assert main(["run", str(p), "--tracking-uri", uri]) == 0
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchkit.cli", "ui", "--port", str(port), "--tracking-uri", uri],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        body = None
        for _ in range(120):
            time.sleep(0.5)
            try:
                url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=shown"
                body = urllib.request.urlopen(url, timeout=2).read().decode()
                break
            except OSError:
                if proc.poll() is not None:
                    break
        assert body is not None, "the UI never answered"
        assert '"shown"' in body and '"experiment_id"' in body
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_workers_mark_their_runs_killed_and_exit_when_the_sweep_is_sigkilled(tmp_path):
    import psutil

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = write_sweep(tmp_path, "grid:\n  seed: [0, 1, 2]\n", experiment="orphans")
    p.write_text(p.read_text().replace("epochs: 1,", "epochs: 5000,"))  # runs long enough to be caught
    proc = subprocess.Popen([sys.executable, "-m", "benchkit.cli", "sweep", str(p), "--workers", "2",
                             "--tracking-uri", uri], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client, runs = None, []
    try:
        for _ in range(600):
            time.sleep(0.2)
            if client is None and (tmp_path / "mlflow.db").exists():
                client = Tracker(uri).client
            exp = client.get_experiment_by_name("orphans") if client else None
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if sum(r.info.status == "RUNNING" for r in runs) == 2:
                break
        else:
            pytest.fail("two runs never ran at once")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    pids = {int(r.data.tags["benchkit.pid"]) for r in runs}
    deadline = time.time() + 60
    while time.time() < deadline and any(psutil.pid_exists(pid) for pid in pids):
        time.sleep(0.5)
    assert not any(psutil.pid_exists(pid) for pid in pids), "worker processes outlived the sweep"
    statuses = [client.get_run(r.info.run_id).info.status for r in runs]
    assert statuses == ["KILLED", "KILLED"]
    text = Path(client.download_artifacts(runs[0].info.run_id, "traceback.txt", str(tmp_path))).read_text()
    assert "Interrupted: the sweep process died" in text  # the reason, not a bare KeyboardInterrupt
    assert {client.get_run(r.info.run_id).data.tags["benchkit.error"] for r in runs} == {"the sweep process died"}


def test_ctrl_c_stops_the_workers_and_marks_their_runs_killed(tmp_path):
    import psutil

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = write_sweep(tmp_path, "grid:\n  seed: [0, 1, 2]\n", experiment="ctrl-c")
    p.write_text(p.read_text().replace("epochs: 1,", "epochs: 5000,"))  # runs long enough to be caught
    proc = subprocess.Popen([sys.executable, "-m", "benchkit.cli", "sweep", str(p), "--workers", "2",
                             "--tracking-uri", uri], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    client, runs = None, []
    try:
        for _ in range(600):
            time.sleep(0.2)
            if client is None and (tmp_path / "mlflow.db").exists():
                client = Tracker(uri).client
            exp = client.get_experiment_by_name("ctrl-c") if client else None
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if sum(r.info.status == "RUNNING" for r in runs) == 2:
                break
        else:
            pytest.fail("two runs never ran at once")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole process group
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, out
    assert "2 killed" in out and "run the same command again to resume" in out
    after = client.search_runs([exp.experiment_id])
    assert sorted(r.info.status for r in after) == ["KILLED", "KILLED"]  # the queued third run never started
    assert {r.data.tags["benchkit.error"] for r in after} == {"interrupted (Ctrl-C / SIGINT)"}
    pids = {int(r.data.tags["benchkit.pid"]) for r in runs}
    assert not any(psutil.pid_exists(pid) for pid in pids), "worker processes outlived the sweep"


# --------------------------------------------------------------------------------------------- aggregate report
def test_report_aggregates_over_seeds_and_writes_the_paper_table(tmp_path, capsys):
    """Three seeds per strategy and operating point: n, mean and sample std (statistics.stdev) of each metric,
    FINISHED runs only; --output writes the table (the suffix picks Markdown or CSV)."""
    import statistics

    from benchkit.tracking import TAG_HASH

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    exp = tracker.ensure_experiment("agg")
    accs = {("magnitude", 2): [0.90, 0.92, 0.97], ("magnitude", 4): [0.85, 0.86, 0.90], ("random", 2): [0.70, 0.74]}
    for (criterion, compression), values in accs.items():
        for seed, acc in enumerate(values):
            cfg = ExperimentConfig.from_dict({"prune": {"criterion": criterion, "compression": compression}, "seed": seed})
            run_id = tracker.start_run(exp, cfg, run_name=f"{criterion}-{compression}-{seed}",
                                       tags={TAG_HASH: cfg.config_hash()})
            tracker.log_metrics(run_id, [("test_acc1", acc, 0), ("compression_ratio", compression * 1.001, 0)])
            tracker.end_run(run_id)
    failed = tracker.start_run(exp, ExperimentConfig.from_dict({"seed": 9}), run_name="failed", tags={})
    tracker.log_metrics(failed, [("test_acc1", 0.0, 0)])
    tracker.end_run(failed, "FAILED")

    assert main(["report", "--tracking-uri", uri, "-e", "agg", "--aggregate", "-c", "test_acc1", "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    got = {(r.criterion, r.compression): (r.n, r.test_acc1_mean, r.test_acc1_std) for r in table.itertuples()}
    assert got.keys() == accs.keys()
    for key, values in accs.items():
        n, mean, std = got[key]
        assert n == len(values) and mean == pytest.approx(statistics.mean(values))
        assert std == pytest.approx(statistics.stdev(values))

    out = tmp_path / "tables" / "agg.md"
    assert main(["report", "--tracking-uri", uri, "-e", "agg", "--aggregate", "--output", str(out)]) == 0
    assert "wrote 3 rows" in capsys.readouterr().out
    lines = out.read_text().strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert {"criterion", "compression", "n", "test_acc1", "compression_ratio"} <= set(header)
    rows = {(r[header.index("criterion")], r[header.index("compression")]): r
            for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    row = rows[("magnitude", "2")]
    mean, std = statistics.mean(accs[("magnitude", 2)]), statistics.stdev(accs[("magnitude", 2)])
    assert row[header.index("test_acc1")] == f"{mean:.4f} ± {std:.4f}" and row[header.index("n")] == "3"
    assert main(["report", "--tracking-uri", uri, "-e", "agg", "--aggregate", "-c", "test_acc9"]) == 2
    assert "did you mean 'test_acc1'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- the UI's view
def test_a_sweep_opens_in_mlflows_machine_learning_view_with_its_axes_as_columns(tmp_path, capsys, monkeypatch):
    """MLflow 3 opens an experiment in its GenAI view with no param or metric column. benchkit saves a
    view (the UI's own 'shared view' tag) with the sweep's axes and headline metrics as columns and links
    to it in the machine-learning view; `benchkit ui` prints that link, also for an older experiment."""
    import json

    from benchkit.sweep import expand, load_sweep, plan_sweep, run_sweep
    from benchkit.tracking import TAG_OVERRIDES

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = write_sweep(tmp_path, "grid:\n  prune.criterion: [magnitude, random]\nzip:\n  seed: [0]\n", experiment="view")
    tracker = Tracker(uri)
    run_sweep(plan_sweep(expand(load_sweep(p)), tracker, "view"), experiment="view", tracker=tracker, verbose=False,
              run_fn=lambda task: __import__("benchkit.jobs").jobs.RunOutcome(task.index, task.config_hash, "skipped"))
    exp = tracker.client.get_experiment_by_name("view")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    state = json.loads(exp.tags["mlflow.sharedViewState.benchkit"])
    assert state["selectedColumns"] == ["params.`prune.criterion`", "params.`seed`", "metrics.`compression_ratio`",
                                        "metrics.`theoretical_speedup`", "metrics.`val_acc1`", "metrics.`test_acc1`"]

    old = tracker.client.create_experiment("older")  # made before benchkit saved views
    run = tracker.client.create_run(old, tags={TAG_OVERRIDES: json.dumps({"prune.scope": "layer", "seed": 1})})
    tracker.client.set_terminated(run.info.run_id)

    class FakeServer:  # `mlflow ui` itself is exercised by test_ui_serves_the_same_store_on_localhost
        def __init__(self, cmd, **kwargs):
            self.cmd = cmd

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeServer)
    assert main(["ui", "--tracking-uri", uri, "--port", "5123"]) == 0
    out = capsys.readouterr().out
    for name in ("view", "older"):
        eid = tracker.client.get_experiment_by_name(name).experiment_id
        assert (f"  {name}: http://127.0.0.1:5123/#/experiments/{eid}/runs?workflowType=machine_learning"
                f"&viewStateShareKey=benchkit") in out
    older = json.loads(tracker.client.get_experiment(old).tags["mlflow.sharedViewState.benchkit"])
    assert older["selectedColumns"][:2] == ["params.`prune.scope`", "params.`seed`"]


def test_the_installed_mlflow_ui_reads_the_view_benchkit_saves():
    """The names benchkit's link and tags rely on, in the MLflow UI bundle installed here: the URL
    parameters (workflowType=machine_learning, viewStateShareKey), the shared-view tag prefix, the
    experiment kind and the column keys. An MLflow upgrade that renames one fails here, not in a browser."""
    import mlflow

    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    text = "".join(p.read_text(errors="ignore") for p in bundle.glob("*.js"))
    for needle in ('"viewStateShareKey"', '"mlflow.sharedViewState."', 'e.get("workflowType")',
                   'MACHINE_LEARNING="machine_learning"', 'CUSTOM_MODEL_DEVELOPMENT="custom_model_development"',
                   '"mlflow.experimentKind"', "selectedColumns", 'e+".`"+t+"`"', 'PARAMS:"params"', 'METRICS:"metrics"',
                   '"/experiments/:experimentId/runs"', "createHashRouter"):
        assert needle in text, needle
