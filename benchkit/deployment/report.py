"""A run's theory-versus-practice figures (``latency.enabled``): the final model deployed on the run's
device, timed per layer and whole, beside the theoretical speedups.

Whole-model keys (floats, with the setting: ``latency_batch_size``, ``latency_threads``,
``latency_warmup``, ``latency_repeats``; the device is the run's ``benchkit.device`` tag):

* ``latency_ms``: the final model with masks folded into dense kernels (zeros cost as much as weights);
* ``latency_compacted_ms`` and ``latency_speedup`` (= latency_ms / latency_compacted_ms) when whole
  channels are dead and Torch-Pruning removed them;
* ``latency_deployed_ms``: what :func:`benchkit.deployment.core.deploy` kept (never slower than
  ``latency_ms`` beyond its ``min_gain`` rule), ``deploy_speedup`` = latency_ms / latency_deployed_ms,
  ``deploy_efficiency`` = deploy_speedup / theoretical_speedup (ShrinkBench's), and
  ``deploy_compacted_efficiency`` = deploy_speedup / compacted_speedup when compacted.

Per layer (merged into the run's layer table): ``deploy_form``, ``deploy_reason``,
``latency_dense_ms``, ``latency_deployed_ms``, ``measured_speedup`` and ``efficiency`` (against the
layer's theoretical ``speedup``).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn

from benchkit.deployment.core import Deployment, deploy
from benchkit.metrics import batched_shape, random_inputs

LAYER_COLUMNS = ["layer", "deploy_form", "deploy_reason", "latency_dense_ms", "latency_deployed_ms",
                 "measured_speedup", "efficiency"]


def deployment_metrics(dep: Deployment) -> dict[str, float]:
    s = dep.setting
    out = {"latency_ms": dep.times_ms["dense"], "latency_deployed_ms": dep.times_ms[dep.variant],
           "deploy_speedup": dep.measured_speedup, "deploy_efficiency": dep.efficiency,
           "latency_batch_size": float(s["batch_size"]), "latency_threads": float(s["threads"]),
           "latency_warmup": float(s["warmup"]), "latency_repeats": float(s["repeats"])}
    if "compacted" in dep.times_ms:
        out["latency_compacted_ms"] = dep.times_ms["compacted"]
        out["latency_speedup"] = dep.times_ms["dense"] / dep.times_ms["compacted"]
    if dep.compacted_theoretical_speedup:
        out["deploy_compacted_efficiency"] = dep.measured_speedup / dep.compacted_theoretical_speedup
    return {k: float(v) for k, v in out.items()}


def deployment_layers(dep: Deployment) -> pd.DataFrame:
    rows = [{"layer": r.layer, "deploy_form": r.form, "deploy_reason": r.reason, "latency_dense_ms": r.baseline_ms,
             "latency_deployed_ms": r.measured_ms, "measured_speedup": r.measured_speedup, "efficiency": r.efficiency}
            for r in dep.layers]
    return pd.DataFrame(rows, columns=LAYER_COLUMNS)


def run_figures(model: nn.Module, input_shape: Sequence[int], *, batch_size: int = 1, threads: int | None = None,
                warmup: int = 10, repeats: int = 100, device: str | torch.device = "cpu",
                forms: Sequence[str] | None = None) -> tuple[dict[str, float], pd.DataFrame]:
    """Deploy ``model`` on a random input of ``input_shape`` (one sample's, batched to ``batch_size``)
    and return (whole-model metrics, per-layer table); see the module docstring."""
    example = random_inputs(model, (batch_size, *batched_shape(model, input_shape)[1:]))
    dep = deploy(model, example, device=device, batch_size=batch_size, threads=threads, warmup=warmup,
                 repeats=repeats, forms=forms)
    return deployment_metrics(dep), deployment_layers(dep)
