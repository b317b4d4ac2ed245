"""The sweep's worker server (``multiprocessing``'s forkserver) imports this module, and only this,
before it forks any pool worker: the collector is turned off first, the modules every run needs are
imported (:func:`benchkit.startup.import_run_modules`), then the heap is frozen and the collector
turned back on (see :mod:`benchkit.startup` for why and what it is worth). The workers neither import
torch themselves nor re-scan those objects, nor copy the pages that scanning would touch.

The server itself runs nothing, so it has nothing to clean up when the sweep ends: it exits without
the interpreter's teardown (~0.45 s of freeing torch, MLflow and scikit-learn, during which it held the
sweep's output pipe open, so anyone reading that pipe waited for it)."""

import atexit
import gc
import os
import signal
import sys

# The server's command line is multiprocessing's ``-c 'from multiprocessing.forkserver import main; ...'``;
# any other process importing this module keeps its normal signals and exit (and exit code).
_IS_SERVER = any("multiprocessing.forkserver import main" in a for a in sys.orig_argv)
if _IS_SERVER:
    # A Ctrl-C reaches the sweep's whole process group. multiprocessing's server ignores SIGINT only once
    # its preload is done, and restores that handler in the workers it forks: ignoring it from the start
    # spares a traceback from the middle of the imports, and a worker is never interrupted before it
    # installs its own handlers. Stopping workers is the sweep's decision (benchkit.executors).
    signal.signal(signal.SIGINT, signal.SIG_IGN)

gc.disable()

from benchkit.startup import import_run_modules  # noqa: E402 - after the collector is off

import_run_modules()

# Forked workers never run atexit handlers: multiprocessing ends them with os._exit.
_SERVER_PID = os.getpid() if _IS_SERVER else None


def _exit_without_teardown() -> None:
    if os.getpid() == _SERVER_PID:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


atexit.register(_exit_without_teardown)
