"""When pruning happens relative to training. ``TIMINGS`` maps a name to a :class:`Timing` class;
register your own with ``@TIMINGS.register("name")`` and select it with ``prune.timing: name``."""

from __future__ import annotations

from benchkit.registry import Registry

TIMINGS: Registry = Registry("timing")

from benchkit.timing.base import RunContext, Timing  # noqa: E402
from benchkit.timing.during import AGPSchedule, GradualPruning  # noqa: E402
from benchkit.timing.lottery import LotteryTicket  # noqa: E402
from benchkit.timing.post import DistillationLoss, PostTraining  # noqa: E402
from benchkit.timing.pre import PruneAtInit  # noqa: E402

__all__ = ["TIMINGS", "Timing", "RunContext", "PruneAtInit", "GradualPruning", "AGPSchedule", "PostTraining",
           "DistillationLoss", "LotteryTicket"]
