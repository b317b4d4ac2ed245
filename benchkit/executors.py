"""Where the runs of a sweep execute: in this process, in a pool of local processes, or on Ray.

Every executor takes a picklable ``fn(task) -> outcome`` (``benchkit.sweep.run_tracked``) and yields
outcomes as runs complete; its ``in_process`` says whether the runs execute in the sweep's own process
(then ``run_sweep`` imports what they need up front). ``cancel_pending()`` starts nothing further (the
runs in flight still report). On Ctrl-C or SIGTERM the sweep calls :meth:`interrupted_outcomes`, which
stops the runs in flight so each marks its MLflow run KILLED with the reason, and returns what they
reported. Tasks and outcomes are the plain types of :mod:`benchkit.jobs`; this module never imports
the sweep.

* ``local`` with ``workers=1``: serial, in-process (debuggable, per-run progress bar).
* ``local`` with ``workers=N``: N worker processes sharing the store; torch threads are divided
  among them (``cores // N`` each) so N workers do not oversubscribe the machine. A worker that dies
  (OOM kill, segfault) fails only its own run, marked FAILED in MLflow; a new worker replaces it.
* ``ray``: one Ray task per run with ``num_cpus`` / ``num_gpus`` from the options, against a shared
  MLflow tracking server (or the local sqlite file when the Ray cluster is this one machine; a
  cluster on other machines with a sqlite / file store is refused, see :func:`check_ray_tracking`).
"""

from __future__ import annotations

import _thread
import faulthandler
import ipaddress
import multiprocessing as mp
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchkit.jobs import (
    INTERRUPT_DEFERRED,
    INTERRUPT_HANDLED,
    ORPHAN_REASON,
    SIGINT_REASON,
    SIGTERM_REASON,
    Interrupted,
    RunOutcome,
    RunTask,
    cores,
    hold_interrupt,
    hold_interrupts,
    raise_pending_interrupt,
    repeats_for_every_run,
    take_pending_interrupt,
)
from benchkit.registry import Registry

EXECUTORS: Registry[type] = Registry("executor")
RunFn = Callable[[RunTask], RunOutcome]


def worker_context() -> Any:
    """``forkserver`` preloading ``benchkit.worker_server`` (see :mod:`benchkit.startup`) where the
    platform has it (Linux), else ``spawn``. Forking from the server is safe where forking the sweep
    process would not be: the server has run no torch op (no OpenMP pool) and opened no store connection."""
    if "forkserver" not in mp.get_all_start_methods():  # pragma: no cover - Windows
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["benchkit.worker_server"])
    return ctx


def start_worker_server() -> None:
    """Start the worker server now, so its imports overlap the sweep's planning (call before it)."""
    ctx = worker_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(n)))


# --------------------------------------------------------------------------------------------- stop signals
#: The signal a pool worker receives for each reason the sweep stops it (see _stop_in_flight).
STOP_SIGNALS = {SIGINT_REASON: signal.SIGUSR1, SIGTERM_REASON: signal.SIGTERM}
#: Seconds the in-flight runs get to mark themselves KILLED after a stop request before their workers are
#: killed (the sweep then marks those runs KILLED itself).
STOP_GRACE_S = 30.0
#: A worker prints its threads' stacks (faulthandler) on this signal: sent to a worker that did not stop
#: within STOP_GRACE_S, just before it is killed, so the output says where it was stuck.
DUMP_STACK_SIGNAL = signal.SIGUSR2


@contextmanager
def _stop_signals(on_stop: Callable[[str], bool] | None = None) -> Iterator[None]:
    """In the sweep's own process: Ctrl-C (SIGINT) and SIGTERM raise :class:`Interrupted` with their
    reason, except while a run in this process creates or closes its MLflow run (``INTERRUPT_DEFERRED``),
    where the interrupt is held and acted on right after (an interrupt there would leave a RUNNING run
    that nobody marks), and while a run marks itself KILLED (``INTERRUPT_HANDLED``). ``on_stop(reason)``
    is told first; when it returns True the signal is taken care of (nothing is raised). Only from the
    main thread, where Python delivers signals; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        reason = SIGTERM_REASON if signum == signal.SIGTERM else SIGINT_REASON
        if on_stop is not None and on_stop(reason):
            return
        if INTERRUPT_DEFERRED.is_set():
            hold_interrupt(reason)
        elif not INTERRUPT_HANDLED.is_set():
            raise Interrupted(reason)

    take_pending_interrupt()  # stale ones from an earlier sweep in this process
    INTERRUPT_HANDLED.clear()
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        take_pending_interrupt()


# --------------------------------------------------------------------------------------------- serial
@EXECUTORS.register("serial")
class SerialExecutor:
    """Runs in this process, one after the other. Ctrl-C / SIGTERM: the run in flight is marked KILLED
    with the reason, then the sweep stops."""

    in_process = True  # the runs execute in the sweep's process (run_sweep prepares it for them)

    def __init__(self, workers: int = 1, threads: int | None = None, **_: Any):
        self.threads = threads
        self._killed: list[RunOutcome] = []
        self._cancelled = False

    def run(self, fn: RunFn, tasks: Sequence[RunTask]) -> Iterator[RunOutcome]:
        if self.threads:
            set_torch_threads(self.threads)
        self._cancelled = False
        with _stop_signals():
            for task in tasks:
                if self._cancelled:
                    return
                outcome = fn(task)
                if outcome.status == "killed":  # run_tracked caught the interrupt to mark its run
                    self._killed.append(outcome)
                    raise Interrupted(outcome.error or SIGINT_REASON)
                pending = take_pending_interrupt()
                if pending is not None:  # interrupted while the finished run was being closed: stop here
                    yield outcome
                    raise pending
                yield outcome

    def cancel_pending(self) -> None:
        """Start no further task (the one in flight, if any, finishes)."""
        self._cancelled = True

    def interrupted_outcomes(self) -> list[RunOutcome]:
        return self._killed


# --------------------------------------------------------------------------------------------- process pool
_ACTIVE = threading.Event()  # set in a worker while it runs a task
_STOPPING = threading.Event()  # set when the parent asked this worker to stop
_ORPHANED = threading.Event()  # set by the parent watcher: the sweep process is gone


def _on_stop(signum: int, frame: Any) -> None:
    """The parent's 'stop now' (SIGUSR1 for its Ctrl-C, SIGTERM for its SIGTERM; the parent watcher
    simulates SIGTERM when the sweep died): interrupt the run in flight, which marks itself KILLED with
    the reason, and start no other.

    Sent repeatedly until the run stops: an interrupt that lands inside a finaliser (a DataLoader
    iterator's ``__del__``, say) is swallowed by Python, so one is not enough. Once the run has begun
    marking itself KILLED (``INTERRUPT_HANDLED``), later ones are ignored so that bookkeeping finishes;
    while it is creating or closing its run (``INTERRUPT_DEFERRED``) the request is held and acted on
    as soon as that is done.
    """
    reason = ORPHAN_REASON if _ORPHANED.is_set() else SIGTERM_REASON if signum == signal.SIGTERM else SIGINT_REASON
    _STOPPING.set()
    if not _ACTIVE.is_set() or INTERRUPT_HANDLED.is_set():
        return
    if INTERRUPT_DEFERRED.is_set():
        hold_interrupt(reason)
        return
    raise Interrupted(reason)


def _watch_parent() -> None:
    """If the sweep process dies (even by SIGKILL), stop: mark the run KILLED, then exit — no orphans.

    Waits on multiprocessing's sentinel for the process that started this worker (the sweep, also when
    the worker was forked by the fork server): a pipe whose other end closes when the sweep is gone."""
    parent = mp.parent_process()
    if parent is None:  # pragma: no cover - not started by multiprocessing
        return
    mp_wait([parent.sentinel])
    _ORPHANED.set()
    for _ in range(60):
        if not _ACTIVE.is_set():
            break
        _thread.interrupt_main(signal.SIGTERM)  # runs _on_stop in the main thread
        time.sleep(1.0)
    os._exit(1)


def _drop_swallowed_stop(unraisable: Any) -> None:
    """``sys.unraisablehook`` in a worker: a stop that lands in a finaliser (SQLAlchemy's weakref
    cleanup, a DataLoader iterator's ``__del__``) is swallowed by Python, which would print it as an
    "Exception ignored ... Traceback" although nothing went wrong: the next repeat of the stop signal
    does stop the run (see :func:`_on_stop`). Anything else is reported as usual."""
    if isinstance(unraisable.exc_value, Interrupted):
        return
    sys.__unraisablehook__(unraisable)


def _init_worker(threads: int, environ: dict[str, str]) -> None:
    # the sweep's environment as of this worker's start (a forked worker would otherwise see the fork
    # server's, as of the server's start: BENCHKIT_*, MLFLOW_* set since then would be missed)
    os.environ.clear()
    os.environ.update(environ)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGUSR1, _on_stop)
    sys.unraisablehook = _drop_swallowed_stop
    faulthandler.register(DUMP_STACK_SIGNAL, all_threads=True)  # where a worker that does not stop is stuck
    set_torch_threads(threads)
    threading.Thread(target=_watch_parent, daemon=True, name="benchkit-parent-watch").start()


def _call(fn: RunFn, task: RunTask) -> RunOutcome:
    if _STOPPING.is_set():  # a task that reached the worker after the sweep was interrupted
        return RunOutcome(task.index, task.config_hash, "skipped", error="sweep interrupted")
    _ACTIVE.set()
    try:
        return fn(task)
    except KeyboardInterrupt:  # stopped before the run was claimed: nothing to show, nothing to mark
        raise
    except BaseException:
        traceback.print_exc()  # run_tracked catches run errors: whatever escapes it must be seen
        raise
    finally:
        _ACTIVE.clear()


def _worker_main(conn: Connection, fn: RunFn, threads: int, environ: dict[str, str]) -> None:
    """A pool worker: receive a task, send back its outcome, until told to stop (``None``) or orphaned."""
    _init_worker(threads, environ)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the sweep is gone
            return
        if task is None:
            return
        try:
            outcome = _call(fn, task)
        except KeyboardInterrupt as e:  # stopped before run_tracked could claim a run: nothing to mark
            outcome = RunOutcome(task.index, task.config_hash, "killed", error=str(e) or "interrupted")
        except Exception as e:  # noqa: BLE001 - e.g. the store unreachable: fail this run, keep the worker
            outcome = RunOutcome(task.index, task.config_hash, "failed", error=f"{type(e).__name__}: {e}",
                                 repeats=repeats_for_every_run(e))
        try:
            conn.send(outcome)
        except (OSError, ValueError):
            return


class WorkerDied(RuntimeError):
    """A pool worker process ended abruptly (OOM killer, segfault, ``os._exit``) in the middle of a run."""


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {"SIGKILL": ": killed, e.g. by the out-of-memory killer", "SIGSEGV": ": segmentation fault",
                "SIGBUS": ": bus error", "SIGABRT": ": aborted"}.get(name, "")
        return f"exit code {code}, {name}{hint}"
    return f"exit code {code}"


@dataclass
class _Worker:
    proc: Any  # multiprocessing.context.SpawnProcess
    conn: Connection
    task: RunTask | None = None


@EXECUTORS.register("pool")
class ProcessPoolRunner:
    """``workers`` processes (forked from a clean preloaded server, see :func:`worker_context`; never
    from the sweep process, whose torch and sqlite state must not be shared) sharing the tracking store.

    Each worker runs one task at a time, handed to it over its own pipe, so the sweep always knows
    which run a worker is on. A worker that dies (OOM kill, segfault, ``os._exit``) fails only that
    run: it is marked FAILED in MLflow with the reason, a new worker takes the worker's place, and
    the other runs, in flight or queued, go on undisturbed. (``concurrent.futures`` would instead
    break the whole pool and fail every pending run.)
    """

    in_process = False

    def __init__(self, workers: int = 2, threads: int | None = None, **_: Any):
        self.workers = max(1, int(workers))
        self.threads = threads or max(1, cores() // self.workers)
        self._ctx = worker_context()
        self._fn: RunFn | None = None
        self._queue: deque[RunTask] = deque()
        self._pool: list[_Worker] = []
        self._killed: list[RunOutcome] | None = None
        self._reason = SIGINT_REASON
        self._stopping = self._hurry = False

    # ------------------------------------------------------------------ run
    def run(self, fn: RunFn, tasks: Sequence[RunTask]) -> Iterator[RunOutcome]:
        self._fn, self._queue, self._killed, self._reason = fn, deque(tasks), None, SIGINT_REASON
        with _stop_signals(self._note_reason):
            try:
                self._pool = [self._spawn() for _ in range(min(self.workers, len(self._queue)))]
                while True:
                    raise_pending_interrupt()  # a stop held while an outcome was received, now handed on
                    self._dispatch()
                    busy = [w for w in self._pool if w.task is not None]
                    if not busy:
                        return
                    ready = mp_wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
                    outcomes = [o for o in (self._collect(w, ready) for w in busy) if o is not None]
                    yield from outcomes
            except BaseException:
                # KeyboardInterrupt here, or GeneratorExit: the sweep stopped iterating because an interrupt
                # (or an error) reached it while it handled an outcome. Either way the runs in flight are
                # stopped now, not waited for: _shutdown would otherwise wait for them to finish.
                if self._killed is None:
                    self._killed = self._stop_in_flight()
                raise
            finally:
                self._shutdown()

    def _note_reason(self, reason: str) -> bool:
        """The stop signals' callback: remember why; while already stopping, hurry instead of raising."""
        if self._stopping:
            self._hurry = True
            return True
        self._reason = reason
        return False

    def cancel_pending(self) -> None:
        """Start no further task; the runs in flight finish and are still reported."""
        self._queue.clear()

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self._fn, self.threads, dict(os.environ)),
                                 name="benchkit-worker")
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _dispatch(self) -> None:
        """Hand the next tasks to idle workers, replacing any that died between runs. Handing a task over
        and noting it is one step for a Ctrl-C (:func:`~benchkit.jobs.hold_interrupts`): one landing in
        between left a run that the sweep did not know about, so nobody stopped it and the shutdown killed
        it, RUNNING."""
        for i, w in enumerate(self._pool):
            while self._queue and w.task is None:
                if not w.proc.is_alive():
                    w.proc.join()
                    w.conn.close()
                    w = self._pool[i] = self._spawn()
                with hold_interrupts():
                    task = self._queue.popleft()
                    try:
                        w.conn.send(task)
                        w.task = task
                    except OSError:  # it died before taking the task: a new worker gets it
                        self._queue.appendleft(task)
                        w.proc.join(timeout=5)
                        if w.proc.is_alive():
                            w.proc.kill()

    def _collect(self, w: _Worker, ready: Sequence[Any], status: str = "FAILED",
                 why: str | None = None) -> RunOutcome | None:
        """The worker's outcome if it sent one; if it died in the middle of a run, that run's failure."""
        if w.task is None or (w.conn not in ready and w.proc.sentinel not in ready):
            return None
        try:
            if w.conn.poll():  # an outcome, even from a worker that died right after sending it
                with hold_interrupts(raise_held=False):  # received and noted, or neither; a held stop is
                    outcome = w.conn.recv()             # raised once the outcome is handed on (run's loop)
                    w.task = None
                return outcome
        except (EOFError, OSError):
            pass  # the pipe closed: the worker died (waited for below)
        if w.proc.sentinel not in ready:
            w.proc.join(timeout=5)  # the pipe closed: the process is on its way out
            if w.proc.is_alive():
                return None
        w.proc.join()
        task, w.task = w.task, None
        return self._worker_died(task, w.proc.pid, w.proc.exitcode, status, why)

    def _worker_died(self, task: RunTask, pid: int, exitcode: int | None, status: str,
                     why: str | None = None) -> RunOutcome:
        """Fail the dead worker's run in MLflow (found by its config hash and the worker's pid tag)."""
        reason = f"worker process {pid} {why}" if why else f"worker process {pid} died ({_exit_reason(exitcode)})"
        run_id = None
        try:
            run_id, finished = self._mark_dead_run(task, pid, reason, status)
        except Exception as e:  # noqa: BLE001 - the next sweep sees the run's owner is gone and redoes it
            print(f"benchkit: could not mark the run of {task.config_hash[:8]} {status}: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
            finished = False
        if finished:  # it died after its run was FINISHED: the run is fine
            return RunOutcome(task.index, task.config_hash, "finished", run_id)
        if run_id is None and self._stopping and exitcode == -STOP_SIGNALS.get(self._reason, signal.SIGTERM):
            # a worker just started, stopped by the sweep's signal before it could take it: no run was begun
            return RunOutcome(task.index, task.config_hash, "killed", error=self._reason)
        return RunOutcome(task.index, task.config_hash, "failed" if status == "FAILED" else "killed", run_id,
                          error=reason)

    def _mark_dead_run(self, task: RunTask, pid: int, reason: str, status: str) -> tuple[str | None, bool]:
        from benchkit.tracking import TAG_HOST, TAG_PID, Tracker

        tracker = Tracker.shared(task.tracking_uri)
        host = socket.gethostname()
        mine = [r for r in tracker.runs(task.experiment_id, task.config_hash)
                if r.data.tags.get(TAG_PID) == str(pid) and r.data.tags.get(TAG_HOST, host) == host]
        for r in mine:
            if r.info.status == "RUNNING":
                then = "the sweep went on with a new worker" if status == "FAILED" else "the sweep was stopping"
                exc = WorkerDied(f"{reason} while running config {task.config_hash} ({task.run_name}); {then}")
                tracker.fail_run(r.info.run_id, exc, status=status)
                return r.info.run_id, False
        done = [r for r in mine if r.info.status == "FINISHED"]
        return (done[0].info.run_id, True) if done else (None, False)  # None: died before claiming a run

    # ------------------------------------------------------------------ interrupt / shutdown
    def interrupted_outcomes(self) -> list[RunOutcome]:
        if self._killed is None and any(w.task is not None for w in self._pool):
            self._killed = self._stop_in_flight()
        return self._killed or []

    def _stop_in_flight(self) -> list[RunOutcome]:
        """Start nothing more; signal the busy workers (SIGUSR1 for a Ctrl-C, SIGTERM for a SIGTERM) so
        each in-flight run marks itself KILLED with that reason, and collect what they report.

        Bounded: a worker that has not reported within :data:`STOP_GRACE_S` (or at once, on a second
        Ctrl-C) is killed, and its run is marked KILLED from here. Further interrupts while this runs
        only hurry it; they cannot leave the workers running unwatched."""
        self._queue.clear()
        self._stopping, self._hurry = True, False
        sig = STOP_SIGNALS.get(self._reason, signal.SIGTERM)
        out: list[RunOutcome] = []
        deadline = time.monotonic() + STOP_GRACE_S
        try:
            while True:
                busy = [w for w in self._pool if w.task is not None]
                if not busy:
                    break
                if self._hurry or time.monotonic() >= deadline:
                    if not self._hurry:  # stuck, not hurried: say where before killing it
                        for w in busy:
                            print(f"benchkit: worker process {w.proc.pid} did not stop within {STOP_GRACE_S:g} s; "
                                  "its stacks:", file=sys.stderr, flush=True)
                            try:
                                os.kill(w.proc.pid, DUMP_STACK_SIGNAL)
                            except (ProcessLookupError, TypeError):
                                pass
                        time.sleep(1.0)
                    for w in busy:
                        w.proc.kill()
                    why = ("was killed: the sweep was interrupted again while it stopped" if self._hurry else
                           f"was killed: it did not stop within {STOP_GRACE_S:g} s of the sweep's stop request "
                           f"({self._reason})")
                    for w in busy:
                        w.proc.join(timeout=10)
                        o = self._collect(w, [w.proc.sentinel], status="KILLED", why=why)
                        if o is not None:
                            out.append(o)
                    break
                for w in busy:  # repeated every second: see _on_stop
                    try:
                        os.kill(w.proc.pid, sig)
                    except (ProcessLookupError, TypeError):
                        pass
                ready = mp_wait([w.conn for w in busy] + [w.proc.sentinel for w in busy],
                                timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                for w in busy:
                    o = self._collect(w, ready, status="KILLED")
                    if o is not None:
                        out.append(o)
        finally:
            self._stopping = False
        return out

    def _shutdown(self) -> None:
        """Tell every worker to exit once its run (if any) is over, and wait for them: without limit
        after a normal end (they are idle), at most 10 s in all after a stop (then they are killed)."""
        self._queue.clear()
        for w in self._pool:
            try:
                w.conn.send(None)
            except OSError:
                pass
        try:
            deadline = None if self._killed is None else time.monotonic() + 10
            for w in self._pool:
                w.proc.join(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
                if w.proc.is_alive():  # stopped, and still not gone
                    w.proc.kill()
                    w.proc.join()
        except KeyboardInterrupt:  # Ctrl-C while waiting for the runs in flight: stop them rather than wait
            self._killed = (self._killed or []) + self._stop_in_flight()
            for w in self._pool:
                w.proc.join(timeout=10)
                if w.proc.is_alive():
                    w.proc.kill()
                    w.proc.join()
            raise
        finally:
            for w in self._pool:
                w.conn.close()
            self._pool = []


# --------------------------------------------------------------------------------------------- "local" = serial or pool
def uses_worker_pool(executor: str, workers: int) -> bool:
    """Whether ``get_executor(executor, workers=workers)`` runs configs in pool worker processes."""
    return executor == "pool" or (executor == "local" and int(workers) > 1)


@EXECUTORS.register("local")
def local_executor(workers: int = 1, **kw: Any):
    """``--executor local``: serial for one worker, a process pool for more."""
    return ProcessPoolRunner(workers, **kw) if uses_worker_pool("local", workers) else SerialExecutor(workers, **kw)


# --------------------------------------------------------------------------------------------- ray
class RayStoreError(ValueError):
    """Ray workers on other machines cannot write into a tracking store that is a file on this one."""


def local_file_store(uri: str) -> bool:
    """A sqlite file or an MLflow file store: readable only where the file is (``resolve_tracking_uri`` form)."""
    return uri.startswith(("sqlite:", "file:"))


def _ray_cluster_file() -> str | None:
    """The address ``ray start`` recorded on this machine (what ``address="auto"`` connects to), if any."""
    base = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    try:
        return (Path(base) / "ray" / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def _is_this_machine(host: str) -> bool:
    host = host.strip("[]").lower()
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        if ip.is_loopback or ip.is_unspecified:
            return True
    except ValueError:
        if host in ("localhost", "localhost.localdomain", socket.gethostname().lower()):
            return True
    try:
        import psutil

        mine = {a.address.split("%", 1)[0].lower() for addrs in psutil.net_if_addrs().values() for a in addrs}
    except Exception:  # noqa: BLE001 - unknown: not this machine
        return False
    return host in mine


def ray_address_is_local(address: str | None) -> bool:
    """Does ``--ray-address`` / ``$RAY_ADDRESS`` mean a Ray on this machine? (no address, ``local``,
    ``auto`` with a head started here, ``127.0.0.1:6379``, ``ray://localhost:10001``, this host's name or IPs)."""
    a = (address or "").strip()
    if a.lower() == "auto":
        a = _ray_cluster_file() or ""
    if a.lower() in ("", "local"):
        return True
    host = urlsplit(a if "://" in a else f"//{a}").hostname
    return host is None or _is_this_machine(host)


def check_ray_tracking(address: str | None, tracking_uri: str) -> None:
    """Refuse a Ray cluster on other machines together with a sqlite / file tracking store, before anything runs."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not local_file_store(tracking_uri) or ray_address_is_local(address):
        return
    raise RayStoreError(
        f"--executor ray with the Ray cluster at {address!r} (another machine) cannot track into {tracking_uri}: "
        "that store is a file on this machine, so remote workers would write to their own local files, which "
        "this sweep never sees (and a resume would redo every run). Start a shared tracking server on a machine "
        "every node reaches, e.g. `mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri "
        "sqlite:///mlflow.db --artifacts-destination ./mlartifacts`, and pass --tracking-uri http://HOST:5000 "
        "(or set MLFLOW_TRACKING_URI).")


def _ray_call(fn: RunFn, task: RunTask, threads: int) -> RunOutcome:
    set_torch_threads(threads)
    return fn(task)


@EXECUTORS.register("ray")
class RayExecutor:
    """One Ray task per run. Connects to ``address`` (or ``$RAY_ADDRESS``), else starts a local Ray.

    ``num_cpus`` / ``num_gpus`` reserve resources per run (fractions allowed: 0.5 GPU = two runs per
    GPU); torch inside the task uses ``num_cpus`` threads. ``workers`` caps the runs in flight
    (default: as many as the cluster's resources admit).
    """

    in_process = False

    def __init__(self, workers: int | None = None, num_cpus: float = 1, num_gpus: float = 0,
                 address: str | None = None, threads: int | None = None, **_: Any):
        self.workers = int(workers) if workers and int(workers) > 1 else None
        self.num_cpus, self.num_gpus = float(num_cpus), float(num_gpus)
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.threads = threads or max(1, int(self.num_cpus))
        self._refs: dict[Any, RunTask] = {}
        self._queue: list[RunTask] = []
        self._killed: list[RunOutcome] = []
        self._started_ray = False

    def _connect(self):
        try:
            import ray
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError("--executor ray needs Ray: pip install 'benchkit[ray]'") from e
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=True)
            self._started_ray = True
        return ray

    def run(self, fn: RunFn, tasks: Sequence[RunTask]) -> Iterator[RunOutcome]:
        uri = tasks[0].tracking_uri if tasks else ""
        check_ray_tracking(self.address, uri)
        ray = self._connect()
        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0)(_ray_call)
        self._queue = queue = list(tasks)
        limit = self.workers or len(queue)
        with _stop_signals():
            try:
                if local_file_store(uri):  # a local address, but the cluster may have other machines joined
                    hosts = {n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}
                    if len(hosts) > 1:
                        raise RayStoreError(
                            f"the Ray cluster spans {len(hosts)} machines ({', '.join(sorted(map(str, hosts)))}) "
                            f"but the tracking store {uri} is a file on this one: remote workers would write to "
                            "their own local files. Use a shared `mlflow server` and --tracking-uri "
                            "http://HOST:5000.")
                while queue or self._refs:
                    while queue and len(self._refs) < limit:
                        t = queue.pop(0)
                        self._refs[remote.remote(fn, t, self.threads)] = t
                    done, _ = ray.wait(list(self._refs), num_returns=1)
                    for ref in done:
                        task = self._refs.pop(ref)
                        try:
                            outcome = ray.get(ref)
                        except Exception as e:  # noqa: BLE001 - a lost task fails its run, not the sweep
                            outcome = RunOutcome(task.index, task.config_hash, "failed",
                                                 error=f"ray: {type(e).__name__}: {e}")
                        yield outcome
            except BaseException:  # an interrupt here, or while the sweep handled an outcome (GeneratorExit)
                if self._refs:
                    self._killed = self._stop_in_flight(ray)
                raise
            finally:
                if self._started_ray:
                    ray.shutdown()

    def cancel_pending(self) -> None:
        """Submit no further task; the ones submitted finish and are still reported."""
        self._queue.clear()

    def interrupted_outcomes(self) -> list[RunOutcome]:
        return self._killed

    def _stop_in_flight(self, ray) -> list[RunOutcome]:
        refs = list(self._refs)
        for ref in refs:
            ray.cancel(ref)  # raises KeyboardInterrupt inside the task: run_tracked marks the run KILLED
        out = []
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=60) if refs else ([], [])
        for ref in ready:
            task = self._refs.pop(ref)
            try:
                out.append(ray.get(ref))
            except Exception:  # noqa: BLE001 - TaskCancelledError: the task already marked its run
                out.append(RunOutcome(task.index, task.config_hash, "killed", error="interrupted"))
        return out


def get_executor(name: str, **options: Any):
    return EXECUTORS.get(name)(**options)
