"""benchkit: run, track and compare neural-network pruning experiments.

>>> import benchkit as bk
>>> report = bk.prune(model, compression=8, criterion="magnitude", allocation="global")
>>> bk.layer_metrics(model, input_shape=(1, 1, 28, 28))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names → the module that defines them. Imported lazily so `import benchkit` stays fast and
# the CLI can print --help without loading torch-heavy modules.
_EXPORTS = {
    "prune": "benchkit.pruning.engine",
    "PruneReport": "benchkit.pruning.engine",
    "CRITERIA": "benchkit.pruning.criteria",
    "GRANULARITIES": "benchkit.pruning.granularity",
    "ALLOCATIONS": "benchkit.pruning.allocation",
    "apply_masks": "benchkit.pruning.masks",
    "set_masks": "benchkit.pruning.masks",
    "reset_optimizer_state": "benchkit.pruning.masks",
    "get_masks": "benchkit.pruning.masks",
    "make_permanent": "benchkit.pruning.masks",
    "release": "benchkit.pruning.masks",
    "load_pruned_state_dict": "benchkit.pruning.masks",
    "compact": "benchkit.deployment.compact",
    "compacted_metrics": "benchkit.deployment.compact",
    "deploy": "benchkit.deployment.core",
    "Deployment": "benchkit.deployment.core",
    "FORMS": "benchkit.deployment.forms",
    "load_deployed": "benchkit.deployment.save",
    "prune_calibrated": "benchkit.pruning.calibrated",
    "owl_allocation": "benchkit.pruning.calibrated",
    "split_attention": "benchkit.models",
    "layer_metrics": "benchkit.metrics",
    "model_metrics": "benchkit.metrics",
    "MODELS": "benchkit.models",
    "build_model": "benchkit.models",
    "DATASETS": "benchkit.data",
    "load_data": "benchkit.data",
    "TIMINGS": "benchkit.timing",
    "ExperimentConfig": "benchkit.config",
    "ConfigError": "benchkit.config",
    "load_config": "benchkit.validation",
    "validate_config": "benchkit.validation",
    "PruningExperiment": "benchkit.experiment",
    "RunResult": "benchkit.experiment",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


# Configs name timings whose settings sections register when the timings are imported: whoever reaches
# a config through the package gets them (benchkit.config itself sits below the timings and imports none).
_NEEDS_TIMINGS = {"ExperimentConfig", "PruningExperiment", "load_config", "validate_config", "TIMINGS"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        if name in _NEEDS_TIMINGS:
            importlib.import_module("benchkit.timing")
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'benchkit' has no attribute {name!r}")
