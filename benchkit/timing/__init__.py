"""When pruning happens relative to training. ``TIMINGS`` maps a name to a :class:`Timing` class;
add your own with ``@register_timing("name", config=Settings)`` (see :mod:`benchkit.timing.base`) and
select it with ``prune.timing: name``. Importing this package registers the built-in timings and their
config sections."""

from __future__ import annotations

from benchkit.timing.base import TIMINGS, RunContext, Timing, register_timing
from benchkit.timing.during import AGPSchedule, DuringConfig, GradualPruning
from benchkit.timing.dynamic import DropSchedule, DynamicConfig, DynamicSparse
from benchkit.timing.lottery import LotteryConfig, LotteryTicket
from benchkit.timing.post import DistillationLoss, DistillConfig, FinetuneConfig, PostConfig, PostTraining
from benchkit.timing.pre import PreConfig, PruneAtInit

__all__ = ["TIMINGS", "Timing", "RunContext", "register_timing", "PruneAtInit", "PreConfig", "GradualPruning",
           "AGPSchedule", "DuringConfig", "PostTraining", "PostConfig", "FinetuneConfig", "DistillConfig",
           "DistillationLoss", "LotteryTicket", "LotteryConfig", "DynamicSparse", "DynamicConfig", "DropSchedule"]
