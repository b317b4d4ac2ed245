"""Progress bars that stay out of logs: shown on a terminal, silent in CI or when output is piped."""

from __future__ import annotations

import os
import sys
from typing import Any


def interactive(stream: Any = None) -> bool:
    """True on a terminal, unless ``CI`` says we are in continuous integration."""
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        return False
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class SweepProgress:
    """Sweep-level bar: runs done / failed / skipped, remaining and ETA (tqdm's)."""

    def __init__(self, total: int, desc: str = "sweep", enabled: bool | None = None):
        self.counts = {"finished": 0, "failed": 0, "killed": 0, "skipped": 0}
        self.enabled = interactive() if enabled is None else enabled
        self._bar = None
        if self.enabled and total:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, position=0)

    def update(self, outcome: Any) -> None:
        self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(done=self.counts["finished"], failed=self.counts["failed"],
                                  skipped=self.counts["skipped"], refresh=True)

    def write(self, line: str) -> None:
        """Print above the bar (or plainly without one)."""
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
