"""Imported last by the sweep's worker server (``executors.WORKER_PRELOAD``), after torch, MLflow and
the rest: everything the preload created goes into the permanent GC generation before any worker is
forked. Python's advice for fork without exec (``gc.freeze`` docs): the workers then neither re-scan
those millions of objects in their collections nor copy the pages that scanning would touch, and the
server exits without a final collection over them (2 s on a 2-core machine, during which it held the
sweep's output pipe open)."""

from benchkit.sweep import freeze_long_lived_objects

freeze_long_lived_objects()
