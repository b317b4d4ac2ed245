"""``benchkit deploy``: a run folder (or checkpoint) in, the deployed model and its report out.

Writes into ``out``:

* ``deployed.pt2`` (``torch.export``; ``deployed.ts`` when a chosen form needs TorchScript): load with
  ``torch.export.load(path).module()`` / ``torch.jit.load(path)``, no benchkit needed;
* ``deploy_layers.csv`` (per layer: form, why, measured times, theoretical and measured speedup,
  efficiency), ``deploy_report.md`` (the same, readable) and ``deploy.json`` (whole-model figures, the
  setting, the saved format, sizes and the ONNX check);
* ``formats/``: the model in each storage format of :mod:`benchkit.deployment.sizes`;
* ``model.onnx``: the compacted model (or the dense one when no channel is dead), checked under
  onnxruntime and timed beside PyTorch.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchkit.config import ConfigError, ExperimentConfig
from benchkit.deployment.core import Deployment, deploy, resolve_device
from benchkit.deployment.flops import channel_metrics
from benchkit.deployment.forms import FORMS
from benchkit.deployment.sizes import size_metrics, write_formats
from benchkit.metrics import random_inputs


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in d.items()}


def resolve_source(source: str | Path, config: str | Path | None = None) -> tuple[Path, Path]:
    """(checkpoint, config) from a run folder (``model.pt`` + ``config.yaml``) or a checkpoint file
    (with ``config.yaml`` beside it, or ``config``)."""
    source = Path(source)
    if source.is_dir():
        checkpoint = source / "model.pt"
        config = Path(config) if config else source / "config.yaml"
    else:
        checkpoint = source
        config = Path(config) if config else source.parent / "config.yaml"
    if not checkpoint.is_file():
        raise ConfigError(f"no checkpoint at {checkpoint}: pass a run folder (with model.pt and config.yaml, as "
                          "`benchkit run` writes under output_dir/<hash>) or a model.pt file")
    if not config.is_file():
        raise ConfigError(f"no config at {config}: the model is rebuilt from the run's config.yaml; pass --config")
    return checkpoint, config


def load_model(checkpoint: Path, config: Path) -> tuple[nn.Module, tuple[int, ...], ExperimentConfig]:
    """The pruned model of a run (masks restored from the checkpoint) and one sample's input shape."""
    from benchkit.data import known_shape, load_data
    from benchkit.models import build_model
    from benchkit.pruning.masks import load_pruned_state_dict

    cfg = ExperimentConfig.from_yaml(config)
    known = known_shape(cfg.data)
    if known is not None and known[1] is not None:
        shape, classes = known
    else:  # only the data knows (an image folder): load it once for its shape and classes
        bundle = load_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.seed)
        shape, classes = bundle.input_shape, bundle.num_classes
    model = build_model(cfg.model, shape, classes)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    load_pruned_state_dict(model, state)
    return model.eval(), tuple(int(s) for s in shape), cfg


def deploy_checkpoint(source: str | Path, out: str | Path, *, config: str | Path | None = None,
                      device: str = "cpu", batch_size: int = 64, threads: int | None = None,
                      forms: Sequence[str] | None = None, warmup: int = 3, repeats: int = 20,
                      onnx: bool = True, sizes: bool = True, compile: bool = False, align: int = 8,
                      fold_batchnorm: bool = True, fused_stages: bool = True) -> dict[str, Any]:
    """Deploy a run's final model and write the files of the module docstring; returns deploy.json's
    content."""
    for name in forms or ():
        FORMS.get(name)  # an unknown form is refused before anything loads (the error lists them)
    resolve_device(device)
    checkpoint, config_path = resolve_source(source, config)
    model, shape, _ = load_model(checkpoint, config_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    example = random_inputs(model, (batch_size, *shape))
    dep: Deployment = deploy(model, example, device=device, batch_size=batch_size, threads=threads, forms=forms,
                             warmup=warmup, repeats=repeats, compile=compile, align=align,
                             fold_batchnorm=fold_batchnorm, fused_stages=fused_stages)
    saved = dep.save(out / "deployed")
    dep.table().to_csv(out / "deploy_layers.csv", index=False)
    report: dict[str, Any] = {"source": str(checkpoint), "config": str(config_path), "input_shape": list(shape),
                              **dep.summary(), "saved": str(saved.path), "saved_format": saved.format,
                              "saved_dynamic_batch": saved.dynamic_batch, "saved_note": saved.note,
                              "forms": dep.forms, "not_measured": dep.not_measured}
    report.update(channel_metrics(model, shape))
    compacted = dep.compaction.model if dep.compaction is not None else None
    if sizes:
        report.update(size_metrics(write_formats(model, out / "formats", compacted=compacted)))
    if onnx and importlib.util.find_spec("onnxruntime") is None:
        onnx = False
        report["onnx_skipped"] = "onnxruntime is not installed: pip install onnxruntime onnx onnxscript"
    if onnx:
        from benchkit.deployment.onnx_export import export_onnx

        target = compacted if compacted is not None else model
        rep = export_onnx(target, example[:2], out / "model.onnx", batch_size=batch_size, threads=threads,
                          warmup=warmup, repeats=repeats)
        report.update(rep.as_dict())
        report["onnx_versions"] = rep.versions
    (out / "deploy.json").write_text(json.dumps(_json_safe(report), indent=2, default=str))
    lines = [f"# deploy: {checkpoint}", "", dep.markdown(), "", f"saved: {saved.path.name} ({saved.format}"
             + (f"; {saved.note}" if saved.note else "") + ")"]
    if sizes:
        lines += ["", "| format | file bytes | tensor bytes |", "|---|---:|---:|"]
        lines += [f"| {k.removeprefix('size_file_')} | {v} | {report['size_payload_' + k.removeprefix('size_file_')]} |"
                  for k, v in report.items() if k.startswith("size_file_")]
    if onnx:
        lines += ["", f"ONNX: {report['onnx_size_bytes']:.0f} bytes, max |onnxruntime - torch| "
                      f"{report['onnx_max_abs_diff']:.3g}, onnxruntime {report['onnx_latency_onnxruntime_ms']:.4g} ms "
                      f"vs torch {report['onnx_latency_torch_ms']:.4g} ms ({report['onnx_versions']})"]
    if "onnx_skipped" in report:
        lines += ["", f"ONNX: skipped ({report['onnx_skipped']})"]
    (out / "deploy_report.md").write_text("\n".join(lines) + "\n")
    return report
