"""MLflow tracking: one experiment per sweep, one run per config, identified by its config hash.

Everything a run produced goes to MLflow in a few batched calls (params in chunks of 100, metrics
in chunks of 1000), so tracking costs a small fraction of a run even on a shared sqlite file.
The run's owner (host, pid, process start time) and a heartbeat are written as tags, which is what
lets a re-run sweep tell a run that is still in flight from one whose process died.

The store defaults to MLflow's embedded ``sqlite:///mlflow.db`` in the working directory, so
``benchkit ui`` and plain ``mlflow ui`` in the same folder show the same runs.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import socket
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from benchkit.jobs import hold_interrupts

if TYPE_CHECKING:  # mlflow and torch are imported lazily: `benchkit --help` must stay fast
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from benchkit.config import ExperimentConfig

T = TypeVar("T")

# MLflow's documented limits (mlflow.utils.validation), repeated so importing this module is cheap.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000

TAG_SWEEP = "benchkit.sweep"
TAG_SWEEP_FILE = "benchkit.sweep_file"
TAG_HASH = "benchkit.config_hash"
TAG_OVERRIDES = "benchkit.overrides"
TAG_HOST = "benchkit.host"
TAG_PID = "benchkit.pid"
TAG_PID_START = "benchkit.pid_start"
TAG_HEARTBEAT = "benchkit.heartbeat"
TAG_REPLACES = "benchkit.replaces"
TAG_WITHDRAWN = "benchkit.withdrawn"
TAG_ERROR = "benchkit.error"

#: Final metrics shown first: the report's default columns and the MLflow UI's runs table.
HEADLINE_METRICS = ("compression_ratio", "theoretical_speedup", "val_acc1", "test_acc1")

HEARTBEAT_SECONDS = 30.0
#: A RUNNING run on another host whose heartbeat is older than this is considered dead.
STALE_AFTER_SECONDS = 4 * HEARTBEAT_SECONDS


# --------------------------------------------------------------------------------------------- store
def default_tracking_uri() -> str:
    """``sqlite:///<cwd>/mlflow.db`` — absolute, so worker processes with another cwd agree."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the sqlite file in the working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # make relative sqlite paths absolute now: spawned workers and Ray tasks may run elsewhere
        rel = uri[len("sqlite:///"):]
        uri = f"sqlite:///{Path(rel).resolve()}"
    elif "://" not in uri and not uri.startswith("databricks"):
        uri = Path(uri).resolve().as_uri()  # a plain directory = MLflow file store
    return uri


def retired_name(name: str, experiment_id: str) -> str:
    """The name a deleted experiment keeps in the bin once a new one took its name (see ``ensure_experiment``)."""
    return f"{name}.deleted-{experiment_id}"


def sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):].split("?", 1)[0])
    return None


def _is_transient(exc: BaseException) -> bool:
    """sqlite lock contention is worth a retry. A tracking server's connection errors and 5xx answers
    are not retried here: MLflow's HTTP client already retries those (with backoff, for minutes), and
    retrying its retries turned a dead server into a 250 s wait. Nor are other sqlite errors (a file that
    cannot be opened, a read-only store): they do not go away."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(s in text for s in ("database is locked", "database table is locked", "temporarily unavailable"))


class _RetriedLockErrors(logging.Filter):
    """MLflow logs every sqlite OperationalError with its traceback before raising it. A lock error is
    retried by ``with_retry`` (and raised with its message if it persists), so its traceback is noise
    that reads like a crash in the middle of a sweep's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and _is_transient(exc))


logging.getLogger("mlflow.store.db.utils").addFilter(_RetriedLockErrors())


def with_retry(fn: Callable[..., T], *args: Any, attempts: int = 8, base_delay: float = 0.05, **kwargs: Any) -> T:
    """Call ``fn`` retrying transient store errors with jittered exponential backoff.

    sqlite's busy timeout (MLflow sets 20 s) does not cover every case: a deferred transaction that
    must upgrade its lock fails with "database is locked" at once, which is what parallel workers hit.
    A stop signal arriving during a call is raised when the call returns, never inside it.
    """
    for i in range(attempts):
        try:
            with hold_interrupts():  # a stop is raised when the call returns: see benchkit.jobs.hold_interrupts
                return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - filtered below
            if i == attempts - 1 or not _is_transient(e):
                raise
            time.sleep(base_delay * (2**i) * (0.5 + random.random()))
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------- store checks
class StoreError(RuntimeError):
    """The tracking store cannot be used as given. Found before any run, in a second or so; the message
    names the store, the problem and the fix (MLflow itself would retry for minutes, then print a
    SQLAlchemy or urllib3 traceback)."""

    repeats_for_every_run = True  # a sweep that meets it mid-way stops (benchkit.jobs)


#: URI schemes MLflow's tracking client serves (``mlflow.tracking``'s registry; plugins add theirs through
#: the ``mlflow.tracking_store`` entry point group, read below).
MLFLOW_SCHEMES = frozenset({"", "file", "sqlite", "http", "https", "databricks", "databricks-uc", "uc",
                            "postgresql", "mysql", "mssql"})
SQLITE_HEADER = b"SQLite format 3\x00"
#: Seconds to wait for a tracking server's answer before calling it unreachable.
SERVER_TIMEOUT_S = 5.0


def check_store(uri: str, *, write: bool = True, timeout: float = SERVER_TIMEOUT_S) -> None:
    """Raise :class:`StoreError` if the store at ``uri`` (``resolve_tracking_uri`` form) cannot be used:
    an unknown scheme, a tracking server that does not answer, or a sqlite file that is a directory,
    empty, not SQLite, damaged, not an MLflow store, or (``write``) in a place that cannot be written.
    A sqlite file that does not exist yet is fine when it can be created (``write``)."""
    problem = store_problem(uri, write=write, timeout=timeout)
    if problem:
        raise StoreError(f"tracking store {uri}: {problem}")


def store_problem(uri: str, *, write: bool = True, timeout: float = SERVER_TIMEOUT_S) -> str | None:
    scheme = uri.split("://", 1)[0].split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme not in MLFLOW_SCHEMES and scheme not in _plugin_schemes():
        return (f"unknown kind of store {scheme + '://'!r}; use sqlite:///path/to/mlflow.db (the default), a "
                "folder, or http://host:port of an `mlflow server`")
    if scheme in ("http", "https"):
        return _server_problem(uri, timeout)
    db = sqlite_path(uri)
    if db is not None:
        return _sqlite_problem(db, write)
    if scheme == "file":
        from urllib.request import url2pathname

        folder = Path(url2pathname(urlsplit(uri).path))
        if folder.exists() and not folder.is_dir():
            return f"{folder} is a file, not a folder; an MLflow file store is a folder (or use sqlite:///{folder})"
        if write:
            return unwritable(folder if folder.exists() else _existing_parent(folder))
    return None


def _plugin_schemes() -> set[str]:
    import importlib.metadata

    return {ep.name for ep in importlib.metadata.entry_points(group="mlflow.tracking_store")}


def _server_problem(uri: str, timeout: float) -> str | None:
    """Any HTTP answer means a server is there (MLflow reports auth or version problems itself); no
    answer within ``timeout`` seconds, a refused connection or an unknown host is one line here."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            why = f"no answer within {timeout:g} s"
        else:
            why = getattr(reason, "strerror", None) or str(reason)
        return (f"cannot reach the MLflow tracking server ({why}). Start it (e.g. `mlflow server --host 127.0.0.1 "
                "--port PORT`), or pass the right --tracking-uri")
    return None


def _sqlite_problem(db: Path, write: bool, deep: bool = True) -> str | None:
    if db.is_dir():
        return (f"{db} is a folder, not a database file; name a file in it, e.g. "
                f"--tracking-uri sqlite:///{db / 'mlflow.db'}")
    if not db.exists():
        return unwritable(_existing_parent(db)) if write else None  # reading a store not made yet: nothing
    try:
        with open(db, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as e:
        return f"{db} cannot be read: {e.strerror or e}"
    if not head:
        return (f"{db} is an empty file, not an MLflow store (MLflow would silently turn it into a new, empty "
                "store); delete it to start a new store there, or point --tracking-uri at the store with your runs")
    if head != SQLITE_HEADER:
        return (f"{db} is not an SQLite database (it begins with {head!r}); point --tracking-uri at an MLflow "
                "store, e.g. sqlite:///path/to/mlflow.db")
    if not deep:
        return None
    import sqlite3

    try:
        con = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True, timeout=20)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            check = con.execute("PRAGMA quick_check(1)").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error as e:
        return f"{db} is a damaged SQLite database ({e}); restore it from a copy, or start a new store elsewhere"
    if check != "ok":
        check = " ".join(check.replace("*** in database main ***", "").split())  # one line
        return (f"{db} is a damaged SQLite database (integrity check: {check}); restore it from a copy, or "
                "start a new store elsewhere")
    if not {"experiments", "runs", "alembic_version"} <= tables:
        return (f"{db} is an SQLite database but not an MLflow store (no MLflow tables in it); MLflow would add "
                "its tables to it. Point --tracking-uri at an MLflow store, or at a new file")
    if write:
        return unwritable(db.parent) or (None if os.access(db, os.W_OK) else f"{db} is read-only")
    return None


def _existing_parent(path: Path) -> Path:
    p = path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def unwritable(folder: Path) -> str | None:
    """Why nothing can be created in ``folder`` (tried for real: permissions, a read-only file system,
    a full disk), or None. Used for stores here and for a sweep's output folders."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".benchkit-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write in {folder}: {e.strerror or e}"
    return None


# --------------------------------------------------------------------------------------------- owner
@dataclass(frozen=True)
class Owner:
    """The process that runs a config, so a later sweep can tell whether it is still alive."""

    host: str
    pid: int
    start: float  # process creation time: guards against pid reuse

    @classmethod
    def me(cls) -> Owner:
        import psutil

        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time())

    def tags(self) -> dict[str, str]:
        return {TAG_HOST: self.host, TAG_PID: str(self.pid), TAG_PID_START: f"{self.start:.3f}"}


def run_is_alive(run: Run, *, now: float | None = None) -> bool:
    """Is this RUNNING run still being worked on?

    On this host: its process exists and was created when the run said (pid reuse is caught).
    On another host: its heartbeat tag is recent. Runs without owner tags are taken as dead.
    """
    import psutil

    tags = run.data.tags
    if run.info.status != "RUNNING":
        return False
    host, pid, start = tags.get(TAG_HOST), tags.get(TAG_PID), tags.get(TAG_PID_START)
    if host is None or pid is None:
        return False
    if host == socket.gethostname():
        try:
            proc = psutil.Process(int(pid))
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            return start is None or abs(proc.create_time() - float(start)) < 1.0
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            return False
    beat = float(tags.get(TAG_HEARTBEAT, run.info.start_time / 1000))
    return ((now or time.time()) - beat) < STALE_AFTER_SECONDS


class Heartbeat:
    """A daemon thread that refreshes the run's heartbeat tag while the experiment trains."""

    def __init__(self, tracker: Tracker, run_id: str, every: float = HEARTBEAT_SECONDS):
        self._tracker, self._run_id, self._every = tracker, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="benchkit-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._tracker.client.set_tag(self._run_id, TAG_HEARTBEAT, f"{time.time():.0f}")
            except Exception:  # noqa: BLE001 - a missed heartbeat must never kill the run
                pass


# --------------------------------------------------------------------------------------------- environment
def git_commit(cwd: str | Path | None = None, prefix: str = "mlflow.source.git") -> dict[str, str]:
    """Commit and dirty flag of the git repository at ``cwd`` (the user's study), if it is one."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
        return {f"{prefix}.commit": sha.stdout.strip(), f"{prefix}.dirty": str(bool(dirty.stdout.strip()))}
    except (OSError, subprocess.SubprocessError):
        return {}


def source_tags() -> dict[str, str]:
    """Git state of the working directory and of the benchkit checkout (when installed from one)."""
    tags = git_commit()
    pkg = Path(__file__).resolve().parent.parent
    if (pkg / ".git").exists():
        tags.update(git_commit(pkg, prefix="benchkit.git"))
    return tags


def runtime_tags(device: str) -> dict[str, str]:
    """Versions, device and host of the process that actually ran the config."""
    import torch

    import benchkit
    from benchkit.latency import cpu_description

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "benchkit.version": benchkit.__version__,
        "benchkit.torch_version": torch.__version__,
        "benchkit.device": device,
        "benchkit.threads": str(torch.get_num_threads()),
        "benchkit.hostname": socket.gethostname(),
        "benchkit.cpu": cpu_description(),  # timings and even float results can differ between CPU generations
    }


# --------------------------------------------------------------------------------------------- tracker
def chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _truncate(value: Any, limit: int) -> str:
    s = str(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _finite_number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    try:  # numpy / torch scalars
        return float(v.item()) if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else None
    except (TypeError, ValueError):
        return None


SQLITE_WAL_ENV = "BENCHKIT_SQLITE_WAL"  # "0" keeps sqlite's default rollback journal
_WAL_STORES: set[str] = set()  # real paths of the stores benchkit opened; other sqlite files are left alone


def tune_sqlite_connections(db: Path) -> None:
    """Open MLflow's connections to the sqlite store ``db`` in WAL mode with ``synchronous=NORMAL``.

    In WAL mode readers never block the writer and a commit appends to the log instead of rewriting
    and syncing the database: parallel sweep workers wait less on "database is locked", and each
    run's tracking costs about a quarter less (benchmarks/bench_sweep.py). NORMAL is what SQLite
    recommends with WAL (durable against a crashed process; a power cut may lose the last commits).
    WAL needs the store on a local disk (not NFS); ``BENCHKIT_SQLITE_WAL=0`` turns this off. The mode
    is stored in the file; ``PRAGMA journal_mode=DELETE`` folds the ``-wal`` file back (done before a
    store is committed, see experiments/run_studies.sh). One SQLAlchemy listener serves every store;
    it touches only connections to the files registered here, never other sqlite databases the
    process opens.
    """
    _quiet_closed_cursor_noise()
    if os.environ.get(SQLITE_WAL_ENV, "1") == "0":
        return
    if not _WAL_STORES:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "connect", _wal_on_connect)
    _WAL_STORES.add(os.path.realpath(db))


class _ClosedCursorNoise(logging.Filter):
    """Drops SQLAlchemy's "Error closing cursor" log when the cursor's sqlite connection is already closed.

    A stop (Ctrl-C, SIGTERM) that lands inside a query makes SQLAlchemy invalidate the connection; it
    then tries to close the cursor on it and logs that failure with a traceback. The stop itself is
    raised and handled (the run is marked KILLED); the log is only a traceback printed at the user.
    Any other error while closing a cursor is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        import sqlite3

        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage() == "Error closing cursor" and isinstance(exc, sqlite3.ProgrammingError)
                    and "closed database" in str(exc))


_NOISE_FILTER = _ClosedCursorNoise()


def _quiet_closed_cursor_noise() -> None:
    """Install :class:`_ClosedCursorNoise` on the loggers of SQLAlchemy's pool classes (idempotent)."""
    from sqlalchemy import pool

    for cls in (pool.QueuePool, pool.NullPool, pool.SingletonThreadPool, pool.StaticPool):
        logger = logging.getLogger(f"{cls.__module__}.{cls.__name__}")
        if _NOISE_FILTER not in logger.filters:
            logger.addFilter(_NOISE_FILTER)


def _wal_on_connect(dbapi_connection: Any, _record: Any) -> None:
    import sqlite3

    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    try:
        cursor = dbapi_connection.cursor()
        main = next((row[2] for row in cursor.execute("PRAGMA database_list") if row[1] == "main"), "")
        if main and os.path.realpath(main) in _WAL_STORES:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
    except sqlite3.Error:  # a read-only store: keep its journal as it is
        pass


def _open_lock(db: Path, purpose: str = "") -> Any:
    """A lock file per sqlite store (and ``purpose``): processes and threads of this machine take turns."""
    from filelock import FileLock

    from benchkit.config import stable_hash

    suffix = f"-{purpose}" if purpose else ""
    return FileLock(str(Path(tempfile.gettempdir()) / f"benchkit-store-{stable_hash(str(db.resolve()))}{suffix}.lock"),
                    timeout=300)


_SHARED: dict[str, Tracker] = {}
_SHARED_LOCK = threading.Lock()


class Tracker:
    """A thin, retrying, batching layer over :class:`mlflow.MlflowClient` for benchkit runs."""

    def __init__(self, tracking_uri: str | None = None):
        self.uri = resolve_tracking_uri(tracking_uri)
        self._artifact_uris: dict[str, str] = {}  # run id -> artifact root, for runs this tracker created

    @classmethod
    def shared(cls, tracking_uri: str | None = None) -> Tracker:
        """One tracker (and one opened client) per store in this process: a sweep worker runs many
        configs, and opening the store for each costs a lock, a connection and a query."""
        uri = resolve_tracking_uri(tracking_uri)
        with _SHARED_LOCK:
            if uri not in _SHARED:
                _SHARED[uri] = cls(uri)
            return _SHARED[uri]

    def check(self, *, write: bool = True) -> None:
        """Raise :class:`StoreError` now if the store cannot be used (:func:`check_store`), rather than
        after minutes of MLflow's retries. For a sqlite file, under the lock that serialises creating it,
        so that a store another sweep is creating this very moment is not judged half-made."""
        db = sqlite_path(self.uri)
        if db is None:
            check_store(self.uri, write=write)
            return
        with _open_lock(db):
            check_store(self.uri, write=write)

    @functools.cached_property
    def client(self) -> MlflowClient:
        """Created on first use: opening a sqlite store creates the file, which a dry run must not."""
        from mlflow import MlflowClient

        db = sqlite_path(self.uri)
        if db is None:
            return MlflowClient(self.uri)
        tune_sqlite_connections(db)
        # The first open of a sqlite store creates and migrates its tables; two processes doing that
        # at once collide ("table ... already exists"). Serialise opening with a lock file.
        with _open_lock(db):
            problem = _sqlite_problem(db, write=False, deep=False) if db.exists() else None
            if problem:  # a directory, an empty or a foreign file: MLflow would retry, or adopt it, silently
                raise StoreError(f"tracking store {self.uri}: {problem}")
            db.parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(self.uri)
            with_retry(client.search_experiments, max_results=1)
        return client

    # ------------------------------------------------------------------ experiments
    def artifact_location(self, name: str) -> str | None:
        """Artifacts of a sqlite store live beside the database file (not in whatever cwd a worker has)."""
        from benchkit.config import stable_hash

        db = sqlite_path(self.uri)
        if db is None:
            return None  # file store or server: its own default (a server proxies artifacts)
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
        return (db.parent / "mlartifacts" / f"{slug}-{stable_hash(name, 6)}").as_uri()

    def ensure_experiment(self, name: str) -> str:
        """Experiment id for ``name``, created if needed; race-safe.

        A *deleted* experiment of that name is not brought back: whoever deleted it meant to start over,
        and restoring it restores its runs, so every config would be skipped as FINISHED. MLflow keeps
        the name of a deleted experiment taken until ``mlflow gc`` purges it, and purging is not part of
        its client API (a tracking server does not offer it), so the deleted experiment is moved aside
        with calls that a sqlite store and an ``mlflow server`` both allow: restored, renamed
        ``<name>.deleted-<id>`` (:func:`retired_name`) and deleted again, runs included. It stays in the
        bin as it was, restorable under that name and purged by ``mlflow gc`` as before, and a new
        experiment takes ``name``. :func:`benchkit.sweep.plan_sweep` plans exactly that (every config
        new). On a sqlite store, lookup, move and creation hold a lock file, so two sweeps starting at once
        agree on the new experiment; through a tracking server (no lock to share) a sweep that looks the
        name up during the moment it is restored sees the old runs.
        """
        db = sqlite_path(self.uri)
        if db is None:
            return self._ensure_experiment(name)
        _ = self.client  # opened first, under its own lock
        with _open_lock(db, "experiments"):
            return self._ensure_experiment(name)

    def _ensure_experiment(self, name: str) -> str:
        exp = with_retry(self.client.get_experiment_by_name, name)
        if exp is not None and exp.lifecycle_stage == "deleted":
            self._retire_deleted(exp.experiment_id, name)
            exp = None
        if exp is not None:
            return exp.experiment_id
        try:
            return with_retry(self.client.create_experiment, name, artifact_location=self.artifact_location(name))
        except Exception as e:  # another process created it between our two calls
            exp = with_retry(self.client.get_experiment_by_name, name)
            if exp is None or exp.lifecycle_stage == "deleted":
                raise RuntimeError(f"could not create MLflow experiment {name!r} at {self.uri}: {e}") from e
            return exp.experiment_id

    def _retire_deleted(self, experiment_id: str, name: str, attempts: int = 20) -> None:
        """Move the deleted experiment off ``name`` (restore → rename → delete), one step per state, so two
        sweeps doing it at once both end with it retired: each re-reads the state after a step fails."""
        retired = retired_name(name, experiment_id)
        steps: dict[tuple[str, str], Callable[[], Any]] = {
            (name, "deleted"): lambda: self.client.restore_experiment(experiment_id),
            (name, "active"): lambda: self.client.rename_experiment(experiment_id, retired),
            (retired, "active"): lambda: self.client.delete_experiment(experiment_id),
        }
        error: Exception | None = None
        for _ in range(attempts):
            exp = with_retry(self.client.get_experiment, experiment_id)
            step = steps.get((exp.name, exp.lifecycle_stage))
            if step is None:  # retired (by us or a concurrent sweep), or renamed by someone: the name is free
                return
            try:
                with_retry(step)
            except Exception as e:  # noqa: BLE001 - another sweep took this step first: read the state again
                error = e
                time.sleep(0.05 * (1 + random.random()))
        raise RuntimeError(f"could not move the deleted MLflow experiment {name!r} (id {experiment_id}) aside "
                           f"at {self.uri}: {error}")

    def set_runs_view(self, experiment_id: str, params: Sequence[str] = (),
                      metrics: Sequence[str] = HEADLINE_METRICS) -> None:
        """Make MLflow's UI open this experiment as a machine-learning experiment, with ``params`` and
        ``metrics`` as the runs table's columns (:func:`ui_url` links to that view).

        MLflow 3's UI opens in its GenAI view unless told otherwise (the ``workflowType`` setting, kept in
        the browser, or ``?workflowType=machine_learning`` in the URL) and shows no param or metric column
        by default. A saved view is what its "share" button writes: an experiment tag
        ``mlflow.sharedViewState.<key>`` holding the view as JSON, opened by ``?viewStateShareKey=<key>``.
        ``mlflow.experimentKind`` marks the experiment as machine learning where the UI reads that tag."""
        import json

        columns = [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in metrics]
        state = {"selectedColumns": columns, "runsHiddenMode": "SHOW_ALL"}
        for key, value in ((TAG_EXPERIMENT_KIND, "custom_model_development"),
                           (VIEW_TAG_PREFIX + VIEW_KEY, json.dumps(state))):
            with_retry(self.client.set_experiment_tag, experiment_id, key, value)

    # ------------------------------------------------------------------ runs
    def runs(self, experiment_id: str, config_hash: str | None = None, *, deleted: bool = False) -> list[Run]:
        """All active runs of the experiment (optionally of one config hash; the deleted ones on request),
        every page."""
        from mlflow.entities import ViewType

        filt = f"tags.`{TAG_HASH}` = '{config_hash}'" if config_hash else ""
        view = ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY
        out: list[Run] = []
        token = None
        while True:
            page = with_retry(self.client.search_runs, [experiment_id], filt, view, max_results=1000,
                              page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def start_run(self, experiment_id: str, cfg: ExperimentConfig, *, run_name: str | None,
                  tags: dict[str, str], return_start: bool = False) -> Any:
        """Create a RUNNING run carrying the config's values as params (:func:`applied_params`; what the
        run resolves, such as the data's classes, is added by :meth:`log_result`), ``(run_id, start_ms)``
        on request."""
        run = with_retry(self.client.create_run, experiment_id, run_name=run_name,
                         tags={k: _truncate(v, MAX_TAG_VAL_LENGTH) for k, v in tags.items()})
        run_id = run.info.run_id
        self._artifact_uris[run_id] = run.info.artifact_uri
        self.log_params(run_id, applied_params(cfg))
        return (run_id, run.info.start_time) if return_start else run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _truncate("None" if v is None else v, MAX_PARAM_VAL_LENGTH)) for k, v in params.items()]
        for batch in chunks(items, MAX_PARAMS_PER_BATCH):
            with_retry(self.client.log_batch, run_id, params=list(batch))

    def log_metrics(self, run_id: str, rows: Iterable[tuple[str, float, int]]) -> int:
        """Log ``(key, value, step)`` rows in batches of 1000; non-numeric values are skipped."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = []
        for key, value, step in rows:
            v = _finite_number(value)
            if v is not None:
                items.append(Metric(key, v, ts, int(step)))
        for batch in chunks(items, MAX_METRICS_PER_BATCH):
            with_retry(self.client.log_batch, run_id, metrics=list(batch))
        return len(items)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, _truncate(v, MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for batch in chunks(items, MAX_PARAMS_PER_BATCH):
            with_retry(self.client.log_batch, run_id, tags=list(batch))

    def run_status(self, run_id: str) -> str:
        """The store's status of the run: RUNNING, FINISHED, FAILED, KILLED or SCHEDULED."""
        return with_retry(self.client.get_run, run_id).info.status

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        with_retry(self.client.set_terminated, run_id, status)

    def fail_run(self, run_id: str, exc: BaseException | None = None, status: str = "FAILED") -> None:
        """Mark the run FAILED (or KILLED) with the reason as the ``benchkit.error`` tag and the traceback as
        ``traceback.txt``. The reason and the status are recorded even when the traceback cannot be (an
        artifact folder on a read-only or full disk: the very failure being recorded, often)."""
        tb = "".join(traceback.format_exception(exc)) if exc is not None else traceback.format_exc()
        if isinstance(exc, KeyboardInterrupt):
            error = str(exc) or "interrupted (Ctrl-C / KeyboardInterrupt)"
        else:
            error = f"{type(exc).__name__}: {exc}" if exc is not None else "interrupted"
        try:
            with_retry(self.client.log_text, run_id, tb, "traceback.txt")
        except Exception as e:  # noqa: BLE001 - the reason still goes into the tag below
            error += f" (traceback.txt not stored: {type(e).__name__}: {e})"
        try:
            self.set_tags(run_id, {TAG_ERROR: error})
        finally:
            self.end_run(run_id, status)

    def delete_run(self, run_id: str) -> None:
        with_retry(self.client.delete_run, run_id)

    # ------------------------------------------------------------------ results
    def log_result(self, run_id: str, result: Any, *, plots: bool = True, model: bool = True) -> None:
        """Everything a :class:`~benchkit.experiment.RunResult` holds: what the run resolved (params such as
        ``data.num_classes``), metrics, curves, tables, plots, model."""
        resolved = dict(getattr(result, "resolved", None) or {})
        if resolved:
            self.log_params(run_id, resolved)
        tags = result_tags(result)
        if tags:
            self.set_tags(run_id, tags)
        self.log_metrics(run_id, result_metric_rows(result))
        repo = self.artifact_repository(run_id)
        with tempfile.TemporaryDirectory(prefix="benchkit-artifacts-") as tmp:
            folder = getattr(result, "output_dir", None)
            if folder is not None and Path(folder, "config.yaml").exists():
                # the experiment already wrote config, tables and model.pt: log them as they are
                with_retry(repo.log_artifacts, str(folder))
                if plots:
                    write_plots(result, Path(tmp))
            else:
                write_artifacts(result, Path(tmp), plots=plots, model=model)
            if any(Path(tmp).iterdir()):
                with_retry(repo.log_artifacts, tmp)

    def artifact_repository(self, run_id: str) -> Any:
        """MLflow's artifact repository of the run. For runs this tracker created, the root is known
        from ``create_run``: ``MlflowClient.log_artifacts`` would first reload the whole run (every
        param, tag and metric) from the store to find it, each call — half a run's tracking time."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        uri = self._artifact_uris.get(run_id) or with_retry(self.client.get_run, run_id).info.artifact_uri
        return get_artifact_repository(uri, tracking_uri=self.uri)  # a server's mlflow-artifacts: proxy


# --------------------------------------------------------------------------------------------- params and the UI
#: Tag of the layers a run left (nearly) collapsed (``prune.collapse``), and of what the pruning decided
#: on its own (output layer kept whole, the calibrated method's pass): what a reader of the run should know.
TAG_COLLAPSED = "benchkit.collapsed"
TAG_NOTES = "benchkit.notes"


def result_tags(result: Any) -> dict[str, str]:
    """Tags a run's result carries: its collapsed layers (with why) and the engine's notes (MLflow caps a tag
    at 5,000 characters; longer text is cut with a mark)."""
    tags = {}
    collapsed = getattr(result, "collapsed", None) or {}
    if collapsed:
        tags[TAG_COLLAPSED] = "; ".join(collapsed.values())
    notes = getattr(result, "notes", None) or []
    if notes:
        tags[TAG_NOTES] = "; ".join(notes)
    return {k: v if len(v) <= 5000 else v[:4990] + " [cut]" for k, v in tags.items()}


#: Config keys of the synthetic dataset alone: for any other dataset the run logs what it resolved.
SYNTHETIC_ONLY = ("data.num_samples", "data.num_classes", "data.input_shape")
#: Config keys of the image-folder dataset alone.
IMAGEFOLDER_KEYS = ("data.image_size", "data.mean", "data.std")


def applied_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config's flat values, less those that cannot have applied to this run and would read as what
    it used: the synthetic dataset's own keys for any other dataset (the run logs the classes, input
    shape and split sizes it resolved instead, see :meth:`Tracker.log_result`), and an epoch count that
    an iteration count overrode (``train.epochs`` with ``train.iterations``, the same for fine-tuning)."""
    from benchkit.config import TEXT_KEYS
    from benchkit.pruning.allocation import ALLOCATIONS
    from benchkit.pruning.criteria import CRITERIA

    flat = cfg.flat()
    drop: set[str] = set()
    data = str(flat.get("data.name"))
    if data != "synthetic":
        drop.update(SYNTHETIC_ONLY)
    if data != "text":
        drop.update(TEXT_KEYS)
    if data != "imagefolder":
        drop.update(IMAGEFOLDER_KEYS)
    crit = cfg.prune.criterion
    calibrated = crit in CRITERIA and CRITERIA.get(crit).calibrated
    if not (calibrated or (cfg.prune.allocation in ALLOCATIONS and ALLOCATIONS.get(cfg.prune.allocation).needs_data)):
        drop.update(k for k in flat if k.startswith("prune.calibration."))
    for section in ("train", "prune.post.finetune"):
        if flat.get(f"{section}.iterations") is not None:
            drop.add(f"{section}.epochs")
    return {k: v for k, v in flat.items() if k not in drop}


TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # MLflow UI's shared views (its "share" button)
VIEW_KEY = "benchkit"


def ui_url(base: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment in its machine-learning view, with benchkit's saved columns."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_KEY}")


# --------------------------------------------------------------------------------------------- result → rows
def result_metric_rows(result: Any) -> list[tuple[str, float, int]]:
    """Flatten a RunResult into MLflow ``(key, value, step)`` rows.

    * final metrics at step 0 (``compression_ratio``, ``test_acc1``, ``time_train_s``, ...);
    * per-epoch history as ``<phase>/<metric>`` at the trainer's step (``dense/val_acc1``,
      ``finetune_r1/val_acc1``, ``level_3/val_acc1``), so the UI draws one curve per phase;
    * per round / level / gradual update as ``level_<metric>`` with step = that index
      (``<branch>_level_<metric>`` for the lottery controls, e.g. ``reinit_level_test_acc1``), so the
      UI plots accuracy against the pruning level;
    * per-step series a timing recorded (``dynamic/sparsity`` at each mask update) at their training step.
    """
    metrics = dict(result.metrics or {})
    rows: list[tuple[str, float, int]] = [(k, v, 0) for k, v in metrics.items()]
    if not any(k.startswith("time_") for k in metrics):
        rows += [(f"time_{k}_s", v, 0) for k, v in (getattr(result, "timings", None) or {}).items()]
    rows += history_rows(result.history or [])
    rows += level_rows(getattr(result, "levels", None) or [])
    rows += [(k, v, step) for k, points in (getattr(result, "series", None) or {}).items() for step, v in points]
    return rows


def history_rows(history: Sequence[dict[str, Any]]) -> list[tuple[str, float, int]]:
    rows = []
    for i, rec in enumerate(history):
        phase = str(rec.get("phase", "train"))
        step = rec.get("step")
        step = rec.get("epoch", i) if step is None else step
        for k, v in rec.items():
            if k not in ("phase", "epoch", "step"):
                rows.append((f"{phase}/{k}", v, step))
    return rows


LEVEL_INDEX_KEYS = ("level", "round", "update")
MAIN_BRANCHES = ("ticket", "main", "")


def level_rows(levels: Sequence[dict[str, Any]]) -> list[tuple[str, float, int]]:
    rows = []
    for i, rec in enumerate(levels):
        index_key = next((k for k in LEVEL_INDEX_KEYS if rec.get(k) is not None), None)
        step = rec[index_key] if index_key else i
        branch = str(rec.get("branch") or "")
        prefix = "level" if branch in MAIN_BRANCHES else f"{branch}_level"
        for k, v in rec.items():
            if k not in (index_key, "branch"):
                rows.append((f"{prefix}_{k}", v, step))
    return rows


# --------------------------------------------------------------------------------------------- artifacts
def write_artifacts(result: Any, out: Path, *, plots: bool = True, model: bool = True) -> list[Path]:
    """Write the run's files into ``out``: resolved config, per-layer CSV, curves, plots, pruned model."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    cfg = result.config
    (out / "config.yaml").write_text(cfg.to_yaml() if hasattr(cfg, "to_yaml") else str(cfg))
    written.append(out / "config.yaml")
    layers = getattr(result, "layers", None)
    if layers is not None and len(layers):
        layers.to_csv(out / "layers.csv", index=False)
        written.append(out / "layers.csv")
    if result.history:
        import pandas as pd

        pd.DataFrame(result.history).to_csv(out / "history.csv", index=False)
        written.append(out / "history.csv")
    if getattr(result, "levels", None):
        import pandas as pd

        pd.DataFrame(result.levels).to_csv(out / "levels.csv", index=False)
        written.append(out / "levels.csv")
    if plots:
        written += write_plots(result, out)
    if model and getattr(result, "state_dict", None) is not None:
        import torch

        torch.save(result.state_dict, out / "model.pt")  # masks included (weight_orig + weight_mask)
        written.append(out / "model.pt")
    return written


def write_plots(result: Any, out: Path) -> list[Path]:
    """Training curve (validation accuracy per epoch, one line per phase) and per-layer density bars,
    as small SVG files (:mod:`benchkit.svgplot`: well under a millisecond, where matplotlib took
    50–100 ms per run; MLflow's UI shows SVG like PNG)."""
    from benchkit import svgplot

    written = []
    hist = [r for r in (result.history or []) if r.get("val_acc1") is not None]
    if hist:
        series: dict[str, list[tuple[float, float]]] = {}
        for i, r in enumerate(hist):
            series.setdefault(str(r.get("phase", "train")), []).append((i + 1, float(r["val_acc1"])))
        path = out / "training_curve.svg"
        path.write_text(svgplot.line_chart(series, xlabel="evaluation (all phases, in order)",
                                           ylabel="validation top-1 accuracy", title="training curve"))
        written.append(path)
    layers = getattr(result, "layers", None)
    if layers is not None and len(layers) and "density" in layers:
        cr = (result.metrics or {}).get("compression_ratio")
        title = f"per-layer density, compression {cr:.2f}x" if cr is not None and math.isfinite(cr) else \
            "per-layer density"
        path = out / "layer_density.svg"
        path.write_text(svgplot.bar_chart([str(n) for n in layers["layer"]], [float(d) for d in layers["density"]],
                                          ylabel="density (non-zero / total)", title=title, ymax=1.0))
        written.append(path)
    return written
