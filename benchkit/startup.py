"""Process start-up: import what a run needs with the cyclic garbage collector off, then freeze it.

Importing torch, MLflow, SQLAlchemy and scikit-learn allocates about a million long-lived objects
and no garbage, yet with the collector on it pays full collections over all of them. Measured on
the 2-core development machine (busy; smoke level, benchmarks/bench_startup.py has the whole-sweep
comparison): importing :data:`WORKER_PRELOAD` took 9.3-9.4 s of CPU with the collector on and
6.5-6.8 s with it off, and the process's exit (the interpreter's final collection over that heap)
another 1.9 s against 0.5 s once the heap is frozen. Every ``benchkit`` command and every pool worker
pays that, so this is felt by users, not only by a micro-benchmark, and it stays: Python's own advice
for a heap that lives as long as the process (``gc.freeze`` docs), applied in three places:

* the ``benchkit`` command (:func:`benchkit.cli.entry`) imports and plans with the collector off, and
  :func:`freeze_heap` turns it back on before the first run (``benchkit.sweep.run_sweep``);
* a serial sweep imports what its first run would import lazily up front (:func:`import_run_modules`);
* the worker server (``benchkit.worker_server``) does the same before it forks any pool worker, so the
  workers neither import torch themselves nor re-scan (and copy) the server's pages.

Garbage the runs create is collected as usual: the collector is only ever off during imports.
"""

from __future__ import annotations

import gc
import importlib

# Modules a run needs. Pool workers fork from a server process that imported these once
# (``forkserver``, see benchkit/worker_server.py), instead of each spawned worker importing torch,
# MLflow and SQLAlchemy itself (~4 s of CPU per worker on a 2-core machine: more than a small run).
# ``torch._dynamo`` is imported lazily by the first optimiser a process builds (``Optimizer.__init__``
# is wrapped in ``torch._disable_dynamo``): another 1.2-1.7 s in every worker's first run unless here.
WORKER_PRELOAD = ("benchkit.sweep", "benchkit.experiment", "benchkit.tracking", "benchkit.deployment.compact",
                  "mlflow.store.tracking.sqlalchemy_store", "sklearn.datasets", "sklearn.model_selection",
                  "fvcore.nn", "torch._dynamo")

_HEAP_FROZEN = False


def freeze_heap() -> None:
    """Move what is alive now out of the cyclic collector's sight, once per process, and leave the
    collector on. A process that imported with the collector off has made no garbage worth a
    collection first; one that ran with it on pays one (so nothing collectable is frozen)."""
    global _HEAP_FROZEN
    if not _HEAP_FROZEN:
        if gc.isenabled():
            gc.collect()
        gc.freeze()
        gc.enable()
        _HEAP_FROZEN = True


def import_run_modules() -> None:
    """Import :data:`WORKER_PRELOAD` with the collector off, then :func:`freeze_heap`, and load the
    installed ``benchkit.plugins`` entry points (so forked workers inherit them too)."""
    from benchkit.plugins import load_entry_point_plugins

    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in WORKER_PRELOAD:
            try:
                importlib.import_module(name)
            except ImportError:  # an optional piece missing: the run that needs it says so itself
                pass
        try:
            load_entry_point_plugins()
        except Exception:  # noqa: BLE001 - a broken plugin is reported by the command that needs it
            pass
    finally:
        if enabled:
            gc.enable()
    freeze_heap()
