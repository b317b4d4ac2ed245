"""The sweep's worker server (``multiprocessing``'s forkserver) imports this module, and only this,
before it forks any pool worker: the collector is turned off first, the modules every run needs are
imported (:func:`benchkit.executors.import_run_modules`), then the heap is frozen and the collector
turned back on. Python's advice for fork without exec (``gc.freeze`` docs): the imports skip their
full collections (~1.5 s of the server's ~5 s), and the workers neither re-scan those millions of
objects nor copy the pages that scanning would touch.

The server itself runs nothing, so it has nothing to clean up when the sweep ends: it exits without
the interpreter's teardown (~0.45 s of freeing torch, MLflow and scikit-learn, during which it held the
sweep's output pipe open, so anyone reading that pipe waited for it)."""

import atexit
import gc
import os
import sys

gc.disable()

from benchkit.executors import import_run_modules  # noqa: E402 - after the collector is off

import_run_modules()

# The server's command line is multiprocessing's ``-c 'from multiprocessing.forkserver import main; ...'``;
# any other process importing this module keeps its normal exit (and exit code). Forked workers never
# run atexit handlers: multiprocessing ends them with os._exit.
_SERVER_PID = os.getpid() if any("multiprocessing.forkserver import main" in a for a in sys.orig_argv) else None


def _exit_without_teardown() -> None:
    if os.getpid() == _SERVER_PID:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


atexit.register(_exit_without_teardown)
