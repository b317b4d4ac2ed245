"""What the sweep hands to an executor and what comes back (jobs): plain, picklable data, plus the few
process-wide flags by which a run in flight and the executor's signal handlers agree on when an
interrupt may land. :mod:`benchkit.sweep` (which makes tasks and runs them) and
:mod:`benchkit.executors` (which carries them to processes) both import this module; neither
imports the other's internals, so the two never form an import cycle.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunTask:
    """Everything a worker (process or Ray task) needs to run one config; plain data, picklable.
    The config's ``plugins`` travel inside ``config``: a worker imports them before it builds the config."""

    index: int
    config: dict[str, Any]
    config_hash: str
    run_name: str
    overrides: dict[str, Any]
    experiment_id: str
    tracking_uri: str
    sweep: str
    sweep_file: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    plots: bool = True  # SVG charts as artifacts (benchkit.svgplot: under a millisecond per run)


@dataclass
class RunOutcome:
    index: int
    config_hash: str
    status: str  # finished | failed | killed | skipped
    run_id: str | None = None
    seconds: float = 0.0
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    #: The failure does not depend on the config (a read-only output folder, a full disk, data or a store
    #: that cannot be reached): every remaining run would fail the same way, so the sweep stops.
    repeats: bool = False


class Interrupted(KeyboardInterrupt):
    """A run stopped from outside, with the reason recorded on its MLflow run: Ctrl-C, SIGTERM (a
    scheduler or ``timeout`` ending the sweep), or the sweep process gone. A ``KeyboardInterrupt``,
    so every path that handles Ctrl-C handles these too."""

    def __init__(self, reason: str = "interrupted (Ctrl-C)"):
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


#: Reasons, by the signal that carries them to a pool worker (see ``benchkit.executors``).
SIGINT_REASON = "interrupted (Ctrl-C / SIGINT)"
SIGTERM_REASON = "terminated (SIGTERM)"
ORPHAN_REASON = "the sweep process died"

#: Set once run_tracked has caught an interrupt and is marking its run KILLED: later stop requests must
#: not cut that bookkeeping short (see ``benchkit.executors``).
INTERRUPT_HANDLED = threading.Event()
#: Set while run_tracked creates or closes its run: an interrupt there would leave a RUNNING run nobody
#: marks, so the signal handlers hold it (:func:`hold_interrupt`) instead of raising.
INTERRUPT_DEFERRED = threading.Event()
#: An interrupt held during a deferral; :func:`take_pending_interrupt` hands it over once the run is safe.
INTERRUPT_PENDING = threading.Event()
_PENDING_REASON: list[str] = []


def hold_interrupt(reason: str) -> None:
    """Remember an interrupt that arrived during a deferral (called from a signal handler)."""
    _PENDING_REASON[:] = [reason]
    INTERRUPT_PENDING.set()


def take_pending_interrupt() -> Interrupted | None:
    """The interrupt held during a deferral, if any (cleared): the caller raises it where it is safe."""
    if not INTERRUPT_PENDING.is_set():
        return None
    INTERRUPT_PENDING.clear()
    return Interrupted(_PENDING_REASON[0] if _PENDING_REASON else SIGINT_REASON)


def raise_pending_interrupt() -> None:
    """Raise the interrupt held during a deferral, if any: called where stopping is safe again."""
    pending = take_pending_interrupt()
    if pending is not None:
        raise pending


@contextmanager
def hold_interrupts(raise_held: bool = True) -> Iterator[None]:
    """Hold a stop signal (Ctrl-C, SIGTERM, the sweep's stop request) for the block: the stop signals'
    handlers honour ``INTERRUPT_DEFERRED``. Then raise it (``raise_held``), or leave it pending for
    :func:`raise_pending_interrupt` once what the block received has been passed on.

    Used where a stop in the middle would leave things half done:
    * every tracking-store call (``benchkit.tracking.with_retry``): a stop landing inside SQLAlchemy's
      commit, or inside the rollback that a first stop started (the sweep repeats its request until the run
      stops), left that sqlite connection mid-transaction, still holding the store's write lock, and every
      later write waited on it (the run's own KILLED mark and every other worker's) until the sweep's grace
      period killed them all;
    * the pool's bookkeeping (``benchkit.executors``): handing a worker its task and noting it, receiving
      an outcome and noting it.

    Only on the main thread (the only one Python delivers signals to), and a no-op inside an outer hold
    (which raises the interrupt itself) or while a run marks itself KILLED (stop requests are ignored then)."""
    if (threading.current_thread() is not threading.main_thread() or INTERRUPT_DEFERRED.is_set()
            or INTERRUPT_HANDLED.is_set()):
        yield
        return
    INTERRUPT_DEFERRED.set()
    try:
        yield
    finally:
        INTERRUPT_DEFERRED.clear()
    if raise_held:
        raise_pending_interrupt()


# errno values of failures that have nothing to do with the config: the next run hits them too.
_REPEATING_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM}


def repeats_for_every_run(exc: BaseException) -> bool:
    """Does this failure come from the machine, not the config (so every other run would repeat it)?
    A read-only or full disk, a permission refused, data that is not there, a store that cannot be
    opened. Anything else (a bug in one model, a NaN, an out-of-memory at one size) is the config's."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "repeats_for_every_run", False):  # DataNotFoundError, StoreError
            return True
        if isinstance(exc, OSError) and exc.errno in _REPEATING_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def cores() -> int:
    """CPU cores this process may use (cgroup/affinity aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1
