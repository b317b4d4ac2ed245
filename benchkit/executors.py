"""Where the runs of a sweep execute: in this process, in a pool of local processes, or on Ray.

Every executor takes a picklable ``fn(task) -> outcome`` (``benchkit.sweep.run_tracked``) and yields
outcomes as runs complete. On Ctrl-C the sweep calls :meth:`interrupted_outcomes`, which stops the
runs in flight so each marks its MLflow run KILLED, and returns what they reported.

* ``local`` with ``workers=1``: serial, in-process (debuggable, per-run progress bar).
* ``local`` with ``workers=N``: N spawned processes sharing the store; torch threads are divided
  among them (``cores // N`` each) so N workers do not oversubscribe the machine.
* ``ray``: one Ray task per run with ``num_cpus`` / ``num_gpus`` from the options, against a shared
  MLflow tracking server (or the local sqlite file when the Ray cluster is this one machine).
"""

from __future__ import annotations

import _thread
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from benchkit.registry import Registry
from benchkit.sweep import INTERRUPT_DEFERRED, INTERRUPT_HANDLED, RunOutcome, RunTask, cores

EXECUTORS: Registry[type] = Registry("executor")
RunFn = Callable[[RunTask], RunOutcome]


def set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(n)))


# --------------------------------------------------------------------------------------------- serial
@EXECUTORS.register("serial")
class SerialExecutor:
    """Runs in this process, one after the other. Ctrl-C: the run in flight is marked KILLED, then stop."""

    def __init__(self, workers: int = 1, threads: int | None = None, **_: Any):
        self.threads = threads
        self._killed: list[RunOutcome] = []

    def run(self, fn: RunFn, tasks: Sequence[RunTask]) -> Iterator[RunOutcome]:
        if self.threads:
            set_torch_threads(self.threads)
        for task in tasks:
            outcome = fn(task)
            if outcome.status == "killed":  # run_tracked swallowed the KeyboardInterrupt to mark the run
                self._killed.append(outcome)
                raise KeyboardInterrupt
            yield outcome

    def interrupted_outcomes(self) -> list[RunOutcome]:
        return self._killed


# --------------------------------------------------------------------------------------------- process pool
_ACTIVE = threading.Event()  # set in a worker while it runs a task
_STOPPING = threading.Event()  # set when the parent asked this worker to stop


def _on_sigterm(signum: int, frame: Any) -> None:
    """The parent's 'stop now': interrupt the run in flight (it marks itself KILLED) and start no other.

    Sent repeatedly until the run stops: an interrupt that lands inside a finaliser (a DataLoader
    iterator's ``__del__``, say) is swallowed by Python, so one is not enough. Once the run has begun
    marking itself KILLED (``INTERRUPT_HANDLED``), later ones are ignored so that bookkeeping finishes;
    while it is creating its run (``INTERRUPT_DEFERRED``) the request waits for the next repeat.
    """
    _STOPPING.set()
    if _ACTIVE.is_set() and not INTERRUPT_HANDLED.is_set() and not INTERRUPT_DEFERRED.is_set():
        raise KeyboardInterrupt


def _watch_parent(parent_pid: int) -> None:
    """If the sweep process dies (even by SIGKILL), stop: mark the run KILLED, then exit — no orphans."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            for _ in range(60):
                if not _ACTIVE.is_set():
                    break
                _thread.interrupt_main(signal.SIGTERM)  # SIGINT is ignored here; SIGTERM's handler interrupts
                time.sleep(1.0)
            os._exit(1)


def _init_worker(threads: int, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    signal.signal(signal.SIGTERM, _on_sigterm)
    set_torch_threads(threads)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="benchkit-parent-watch").start()


def _call(fn: RunFn, task: RunTask) -> RunOutcome:
    if _STOPPING.is_set():  # a task the pool had already queued when the sweep was interrupted
        return RunOutcome(task.index, task.config_hash, "skipped", error="sweep interrupted")
    _ACTIVE.set()
    try:
        return fn(task)
    except BaseException:
        traceback.print_exc()  # run_tracked catches run errors: whatever escapes it must be seen
        raise
    finally:
        _ACTIVE.clear()


@EXECUTORS.register("pool")
class ProcessPoolRunner:
    """``workers`` spawned processes (spawn: no forked torch/sqlite state) sharing the tracking store."""

    def __init__(self, workers: int = 2, threads: int | None = None, **_: Any):
        self.workers = max(1, int(workers))
        self.threads = threads or max(1, cores() // self.workers)
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[Future, RunTask] = {}
        self._killed: list[RunOutcome] = []

    def run(self, fn: RunFn, tasks: Sequence[RunTask]) -> Iterator[RunOutcome]:
        self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                         initializer=_init_worker, initargs=(self.threads, os.getpid()))
        try:
            self._futures = {self._pool.submit(_call, fn, t): t for t in tasks}
            pending = set(self._futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield self._outcome(f)
        except KeyboardInterrupt:
            self._killed = self._stop_in_flight()  # before shutdown, which would wait for the runs to end
            raise
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _outcome(self, f: Future) -> RunOutcome:
        task = self._futures[f]
        try:
            return f.result()
        except Exception as e:  # noqa: BLE001 - a worker that died (OOM, segfault) fails its run, not the sweep
            return RunOutcome(task.index, task.config_hash, "failed", error=f"worker died: {type(e).__name__}: {e}")

    def interrupted_outcomes(self) -> list[RunOutcome]:
        return self._killed

    def _stop_in_flight(self) -> list[RunOutcome]:
        """Cancel queued runs; SIGTERM the workers so each in-flight run marks itself KILLED."""
        for f in self._futures:
            f.cancel()
        running = [f for f in self._futures if not f.done()]
        done: set[Future] = set()
        for _ in range(30):  # repeated: see _on_sigterm
            for proc in list(getattr(self._pool, "_processes", {}).values()):
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, AttributeError):
                    pass
            done, not_done = wait(running, timeout=2)
            if not not_done:
                break
        out = []
        for f in done:
            o = self._outcome(f)
            out.append(o if o.status != "failed" or not o.error.startswith("worker died") else
                       RunOutcome(o.index, o.config_hash, "killed", error="interrupted"))
        return out


# --------------------------------------------------------------------------------------------- "local" = serial or pool
@EXECUTORS.register("local")
def local_executor(workers: int = 1, **kw: Any):
    """``--executor local``: serial for one worker, a process pool for more."""
    return SerialExecutor(workers, **kw) if int(workers) <= 1 else ProcessPoolRunner(workers, **kw)


# --------------------------------------------------------------------------------------------- ray
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

    def __init__(self, workers: int | None = None, num_cpus: float = 1, num_gpus: float = 0,
                 address: str | None = None, threads: int | None = None, **_: Any):
        self.workers = int(workers) if workers and int(workers) > 1 else None
        self.num_cpus, self.num_gpus = float(num_cpus), float(num_gpus)
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.threads = threads or max(1, int(self.num_cpus))
        self._refs: dict[Any, RunTask] = {}
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
        ray = self._connect()
        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0)(_ray_call)
        queue = list(tasks)
        limit = self.workers or len(queue)
        try:
            while queue or self._refs:
                while queue and len(self._refs) < limit:
                    t = queue.pop(0)
                    self._refs[remote.remote(fn, t, self.threads)] = t
                done, _ = ray.wait(list(self._refs), num_returns=1)
                for ref in done:
                    task = self._refs.pop(ref)
                    try:
                        yield ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - a lost task fails its run, not the sweep
                        yield RunOutcome(task.index, task.config_hash, "failed", error=f"ray: {type(e).__name__}: {e}")
        except KeyboardInterrupt:
            self._killed = self._stop_in_flight(ray)
            raise
        finally:
            if self._started_ray:
                ray.shutdown()

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
