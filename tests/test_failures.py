"""Failures that are the same for every run surface in seconds, once, in one line, before any run: a dead
tracking server, a store that cannot be opened, data missing offline, a missing GPU, a folder that cannot
be written; a failure that would repeat for every run stops the sweep; SIGTERM is recorded as SIGTERM; a
claim that loses the race is closed, not left RUNNING in the trash; --workers is capped at the cores."""

from __future__ import annotations

import errno
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.entities import ViewType

from benchkit.cli import main
from benchkit.config import ExperimentConfig
from benchkit.jobs import RunTask
from benchkit.tracking import TAG_HASH, Tracker

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess,
                                                                                         float]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "benchkit.cli", *args], capture_output=True, text=True, cwd=cwd,
                         env={**os.environ, "PYTHONPATH": path, "CI": "true", **(env or {})}, timeout=timeout)
    return out, time.perf_counter() - t0


def write_sweep(tmp_path: Path, extra_base: str = "", grid: str = "seed: [0, 1, 2]", name: str = "fail") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(textwrap.dedent(f"""\
        experiment: {name}
        base:
          data: {{name: synthetic, num_samples: 64, input_shape: [1, 4, 4]}}
          model: {{name: lenet300}}
          train: {{epochs: 1, batch_size: 32}}
          prune: {{timing: pre, compression: 2}}
          output_dir: {tmp_path / 'runs'}
        """) + textwrap.indent(textwrap.dedent(extra_base), "  ") + f"grid:\n  {grid}\n")
    return p


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder nothing can be created in: chmod 555 for a normal user; root ignores modes, so for root a
    folder of sysfs (read-only for everyone)."""
    if os.geteuid() != 0:
        d = tmp_path / "read-only"
        d.mkdir()
        d.chmod(0o555)
        return d
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
        os.close(fd)
        os.unlink(probe)
    except OSError:
        return Path("/sys")
    pytest.skip("no folder here that root cannot write")


def one_line_error(err: str) -> str:
    """The error line (the --debug hint may follow); no traceback."""
    assert "Traceback" not in err, err
    lines = [x for x in err.strip().splitlines() if "--debug" not in x]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------------- the store
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_tracking_server_is_one_line_naming_it_within_seconds(tmp_path):
    """Nothing listens on the port: MLflow would retry for about 250 s and print 114 lines."""
    uri = f"http://127.0.0.1:{free_port()}"
    sweep = write_sweep(tmp_path)
    for command in (["sweep", str(sweep)], ["run", str(sweep)], ["report"]):
        out, seconds = cli(*command, "--tracking-uri", uri, cwd=tmp_path)
        line = one_line_error(out.stderr)
        assert out.returncode == 2 and seconds < 10, (seconds, out.stderr)  # the bound
        assert uri in line and "cannot reach the MLflow tracking server" in line
    assert not (tmp_path / "runs").exists()


def _store_in_one_file(path: Path, monkeypatch, runs: int = 0) -> None:
    """A real MLflow store whose every byte is in ``path`` (rollback journal, not WAL)."""
    monkeypatch.setenv("BENCHKIT_SQLITE_WAL", "0")
    tracker = Tracker(f"sqlite:///{path}")
    exp = tracker.ensure_experiment("x")
    for i in range(runs):
        tracker.start_run(exp, ExperimentConfig(seed=i), run_name=f"r{i}", tags={})


def _corrupt_store(path: Path, monkeypatch) -> None:
    _store_in_one_file(path, monkeypatch, runs=20)  # enough rows for several pages
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:4 * page] = b"\xff" * (3 * page)  # pages 2-4: b-tree pages with garbage headers
    path.write_bytes(bytes(data))


def bad_stores(tmp_path: Path, monkeypatch) -> dict[str, tuple[str, str, str]]:
    """name -> (uri, the path the message must name, the problem it must state)."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes, not a database\n")
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    corrupt = tmp_path / "corrupt.db"
    _corrupt_store(corrupt, monkeypatch)
    ro = unwritable_dir(tmp_path)
    return {
        "read-only folder": (f"sqlite:///{ro / 'mlflow.db'}", str(ro), "cannot write in"),
        "a folder as the path": (f"sqlite:///{folder}", str(folder), "is a folder, not a database file"),
        "not sqlite": (f"sqlite:///{text}", str(text), "is not an SQLite database"),
        "unknown scheme": ("foo://bar", "foo://bar", "unknown kind of store 'foo://'"),
        "corrupt sqlite": (f"sqlite:///{corrupt}", str(corrupt), "is a damaged SQLite database"),
        "empty file": (f"sqlite:///{empty}", str(empty), "is an empty file, not an MLflow store"),
        "sqlite but not MLflow": (f"sqlite:///{foreign}", str(foreign), "not an MLflow store"),
    }


def test_a_store_that_cannot_be_opened_is_one_line_naming_file_and_problem(tmp_path, monkeypatch):
    stores = bad_stores(tmp_path, monkeypatch)
    sweep = write_sweep(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for name, (uri, path, problem) in stores.items():
        out, seconds = cli("sweep", str(sweep), "--tracking-uri", uri, cwd=tmp_path)
        line = one_line_error(out.stderr)
        assert out.returncode == 2 and seconds < 10, (name, seconds, out.stderr)  # the bound
        assert path in line and problem in line, (name, line)
    # nothing was created or changed: the empty file is not turned into a store, no run started
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not (tmp_path / "runs").exists()
    # the traceback on request; read-only commands see the same problems
    uri, path, problem = stores["corrupt sqlite"]
    out, _ = cli("sweep", str(sweep), "--tracking-uri", uri, "--debug", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" in out.stderr and "StoreError" in out.stderr
    for command in (["report"], ["ui", "--port", str(free_port())]):
        out, _ = cli(*command, "--tracking-uri", uri, cwd=tmp_path)
        assert out.returncode == 2 and problem in one_line_error(out.stderr)


# --------------------------------------------------------------------------------------------- found once, before any run
def runs_in(tmp_path: Path, uri: str, experiment: str) -> list:
    if not (tmp_path / "mlflow.db").exists():
        return []
    client = Tracker(uri).client  # waits (lock) while a sweep is creating the store
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)


def test_data_missing_offline_is_one_message_before_any_run(tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    sweep = write_sweep(tmp_path, grid="data.name: [fashion-mnist, mnist]", extra_base="seed: 0\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out, _ = cli("sweep", str(sweep), "--tracking-uri", uri, "--workers", "2", "data.download=false",
                 f"data.root={empty}", cwd=tmp_path, env={"BENCHKIT_DATA": str(empty), "XDG_CACHE_HOME": str(empty)})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("not found") == 1 and "dataset 'fashion-mnist' not found" in out.stderr
    assert str(empty) in out.stderr and runs_in(tmp_path, uri, "fail") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_refused_before_any_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out, _ = cli("sweep", str(write_sweep(tmp_path)), "--tracking-uri", uri, "device=cuda", cwd=tmp_path)
    line = one_line_error(out.stderr)
    assert out.returncode == 2 and "device 'cuda' requested but CUDA is not available" in line
    assert runs_in(tmp_path, uri, "fail") == []


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_run(tmp_path):
    ro = unwritable_dir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out, _ = cli("sweep", str(write_sweep(tmp_path)), "--tracking-uri", uri, f"output_dir={ro / 'runs'}",
                 cwd=tmp_path)
    line = one_line_error(out.stderr)
    assert out.returncode == 2 and f"output_dir {ro / 'runs'}: cannot write there" in line
    assert runs_in(tmp_path, uri, "fail") == []


# --------------------------------------------------------------------------------------------- during the sweep
@pytest.mark.parametrize("traceback_too", [False, True])
def test_a_failure_that_every_run_would_repeat_stops_the_sweep_with_one_message(tmp_path, monkeypatch, capsys,
                                                                                traceback_too):
    """The disk turns read-only mid-sweep (simulated where the run writes its files, and, second case, where
    the store writes traceback.txt too): the run is FAILED with the reason as its tag, nothing else starts."""
    import benchkit.experiment

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "runs"))

    monkeypatch.setattr(benchkit.experiment, "write_result", read_only)
    if traceback_too:
        monkeypatch.setattr(mlflow.MlflowClient, "log_text", read_only)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sweep", str(write_sweep(tmp_path)), "--tracking-uri", uri, "--no-plots"]) == 1
    out, err = capsys.readouterr()
    assert "1 failed, 2 not started" in out
    assert "stopped: run #0 failed with an error that every run would repeat" in err and "Read-only file system" in err
    (run,) = runs_in(tmp_path, uri, "fail")
    assert run.info.status == "FAILED"
    reason = run.data.tags["benchkit.error"]
    assert reason.startswith("OSError: [Errno 30] Read-only file system")
    assert ("traceback.txt not stored" in reason) == traceback_too


def test_a_claim_that_loses_is_closed_before_it_is_deleted(tmp_path):
    """Two sweeps on one store: the later claim of a hash withdraws. Deleted while RUNNING, it used to stay
    RUNNING in MLflow's trash forever."""
    from benchkit.sweep import run_tracked

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    exp = tracker.ensure_experiment("race")
    cfg = ExperimentConfig.from_dict({"data": {"name": "synthetic", "num_samples": 64}, "output_dir": str(tmp_path)})
    h = cfg.config_hash()
    winner = tracker.start_run(exp, cfg, run_name="first", tags={TAG_HASH: h})
    tracker.end_run(winner, "FINISHED")
    outcome = run_tracked(RunTask(0, cfg.to_dict(), h, "second", {}, exp, uri, "race"))
    assert outcome.status == "skipped" and outcome.run_id == winner
    (claim,) = tracker.runs(exp, h, deleted=True)
    assert claim.info.status == "KILLED" and claim.info.lifecycle_stage == "deleted"
    assert claim.data.tags["benchkit.withdrawn"] == f"already FINISHED: run {winner}"


def test_sigterm_is_recorded_as_sigterm(tmp_path):
    """`timeout` or a scheduler ends the command with SIGTERM: the run in flight is KILLED with that reason
    (not a KeyboardInterrupt), and the exit code says so (128 + 15)."""
    p = write_sweep(tmp_path, grid="seed: [0]")
    p.write_text(p.read_text().replace("epochs: 1,", "epochs: 100000,"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "benchkit.cli", "run", str(p), "--tracking-uri", uri],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": path})
    try:
        for _ in range(600):
            time.sleep(0.2)
            runs = runs_in(tmp_path, uri, "fail") if (tmp_path / "mlflow.db").exists() else []
            if runs and runs[0].info.status == "RUNNING" and (tmp_path / "runs").exists():
                break
        else:
            pytest.fail("the run never started")
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out
    assert "terminated (SIGTERM): the run(s) in flight are marked KILLED" in out
    (run,) = runs_in(tmp_path, uri, "fail")
    assert run.info.status == "KILLED" and run.data.tags["benchkit.error"] == "terminated (SIGTERM)"


def test_more_workers_than_cores_are_capped_with_a_note(tmp_path, capsys):
    cores = len(os.sched_getaffinity(0))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sweep", str(write_sweep(tmp_path, grid="seed: [0, 1]")), "--workers", "100",
                 "--tracking-uri", uri, "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert f"note: --workers 100 but this machine gives the sweep {cores} core(s): running {cores} worker(s)" in out
    n = min(cores, 2)
    assert f"2 runs on {n} worker process{'es' * (n != 1)}, {max(1, cores // cores)} torch thread each" in out
    assert len({r.data.tags["benchkit.pid"] for r in runs_in(tmp_path, uri, "fail")}) <= cores


def test_the_store_check_leaves_a_store_being_created_alone(tmp_path, monkeypatch):
    """Two sweeps starting on a new store: the check waits for the other's creation (the same lock), so it
    never judges a half-made file (empty, or without MLflow's tables yet)."""
    from benchkit.tracking import _open_lock

    made = tmp_path / "made.db"
    _store_in_one_file(made, monkeypatch)
    db = tmp_path / "mlflow.db"
    code = "import sys; from benchkit.tracking import Tracker; Tracker(sys.argv[1]).check(); print('ok')"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    with _open_lock(db):  # "another process" is creating the store at db right now
        db.write_bytes(b"")
        waiting = subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{db}"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": path})
        time.sleep(3)
        assert waiting.poll() is None  # waiting for the lock, not refusing the empty file
        db.write_bytes(made.read_bytes())  # creation done
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and out.strip() == "ok", err
