"""``during``: the sparsity follows the AGP cubic schedule at every update (Zhu & Gupta 2017), and
soft pruning zeroes without freezing (He et al. 2018)."""

from __future__ import annotations

import pytest
import torch

from benchkit.config import ExperimentConfig
from benchkit.experiment import PruningExperiment
from benchkit.pruning.masks import get_masks
from benchkit.timing import base
from benchkit.timing.during import AGPSchedule
from benchkit.validation import load_config

torch.set_num_threads(1)
LAYERS = ("fc1", "fc2", "fc3")
TOTAL = 64 * 32 + 32 * 16 + 16 * 10  # prunable weights of the tiny 64-32-16-10 network


def tiny(tmp_path, **overrides) -> ExperimentConfig:
    d = {"data": {"name": "digits"}, "model": {"name": "lenet300", "kwargs": {"hidden": [32, 16]}},
         "train": {"epochs": 3, "lr": 0.05, "batch_size": 64}, "progress": False, "output_dir": str(tmp_path),
         "prune": {"timing": "during", "sparsity": 0.9, "schedule": {"start": 0.1, "end": 0.7, "every": 4}}}
    return load_config(d, overrides)


def agp(t: int, s_i: float, s_f: float, t0: int, span: int) -> float:
    """Zhu & Gupta's formula, written out independently of the implementation."""
    progress = min(1.0, max(0.0, (t - t0) / span))
    return s_f + (s_i - s_f) * (1 - progress) ** 3


def test_schedule_formula_by_hand():
    s = AGPSchedule(initial=0.0, final=0.9, start=10, end=50, every=10)
    assert s.update_steps() == [10, 20, 30, 40, 50]
    # (1 - 1/4)^3 = 27/64, (1 - 1/2)^3 = 1/8, (1 - 3/4)^3 = 1/64
    expected = [0.0, 0.9 - 0.9 * 27 / 64, 0.9 - 0.9 / 8, 0.9 - 0.9 / 64, 0.9]
    assert [s.sparsity(t) for t in s.update_steps()] == pytest.approx(expected)
    assert s.sparsity(0) == 0.0 and s.sparsity(500) == pytest.approx(0.9)  # clamped
    odd = AGPSchedule(initial=0.2, final=0.8, start=0, end=25, every=10)
    assert odd.update_steps() == [0, 10, 20, 25]  # the last update lands on `end`
    assert odd.update_steps(total_steps=47) == [0, 10, 20, 25, 30, 40]  # soft: keeps updating


class SparsityRecorder:
    """Training callback reading the sparsity of the masks after every step."""

    def __init__(self):
        self.by_step: dict[int, float] = {}
        self.masks_by_step: dict[int, dict] = {}

    def on_step(self, step, model, optimizer):
        masks = get_masks(model)
        kept = sum(int(masks[f"{n}.weight"].sum()) if f"{n}.weight" in masks else
                   model.get_submodule(n).weight.numel() for n in LAYERS)
        self.by_step[step] = 1 - kept / TOTAL
        self.masks_by_step[step] = masks


def spy_train(monkeypatch, recorder) -> None:
    real = base.train

    def spy(model, data, cfg, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", ()), recorder]  # after the pruner
        return real(model, data, cfg, **kwargs)

    monkeypatch.setattr(base, "train", spy)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_sparsity_follows_the_cubic_schedule(tmp_path, monkeypatch, scope):
    rec = SparsityRecorder()
    spy_train(monkeypatch, rec)
    cfg = tiny(tmp_path, **{"prune.scope": scope})
    result = PruningExperiment(cfg).run()
    total_steps = max(rec.by_step)
    t0, end = round(0.1 * total_steps), round(0.7 * total_steps)
    updates = sorted(set(range(t0, end + 1, 4)) | {end})
    assert [r["step"] for r in result.levels] == updates
    tol = 3 / TOTAL if scope == "layer" else 1 / TOTAL  # rounding: one weight per selection unit
    for t in updates:
        assert rec.by_step[t] == pytest.approx(agp(t, 0.0, 0.9, t0, end - t0), abs=tol), t
    # between updates the masks do not change, and they only ever shrink
    steps = sorted(rec.by_step)
    for a, b in zip(steps, steps[1:]):
        if b not in updates:
            assert rec.by_step[b] == rec.by_step[a]
        assert rec.by_step[b] >= rec.by_step[a]
    assert rec.by_step[total_steps] == pytest.approx(0.9, abs=tol)
    assert result.metrics["sparsity"] == pytest.approx(0.9, abs=tol)
    # best-validation selection never picks a checkpoint from before the final sparsity
    assert result.metrics["compression_ratio"] == pytest.approx(10, rel=0.01)


@pytest.mark.parametrize("fc3_compression", [1.25, 1.0])
def test_an_overridden_layer_follows_its_own_schedule_and_never_starts_above_its_final(tmp_path, monkeypatch,
                                                                                      fc3_compression):
    """With initial_sparsity 0.5, a layer overridden to 20% sparsity (or kept dense) starts at its own
    final, not at 0.5: pruning is never undone, so starting higher would over-prune it for good."""
    rec = SparsityRecorder()
    spy_train(monkeypatch, rec)
    cfg = tiny(tmp_path, **{"prune.overrides": {"fc3": fc3_compression}, "prune.during.initial_sparsity": 0.5,
                            "prune.during.start": 0.0})
    result = PruningExperiment(cfg).run()
    final = 1 - 1 / fc3_compression
    fc3 = [1 - float(m["fc3.weight"].float().mean()) if "fc3.weight" in m else 0.0
           for _, m in sorted(rec.masks_by_step.items())]
    assert max(fc3) == pytest.approx(final, abs=1 / 160)  # 160 weights in fc3: one weight of rounding
    fc3_mask = result.masks.get("fc3.weight")
    assert (1 - float(fc3_mask.float().mean()) if fc3_mask is not None else 0.0) == pytest.approx(final, abs=1 / 160)
    # the other layers still start at the initial sparsity and reach the target
    main = sum(int(result.masks[f"{n}.weight"].sum()) for n in ("fc1", "fc2")) / (64 * 32 + 32 * 16)
    assert 1 - main == pytest.approx(0.9, abs=2 / (64 * 32 + 32 * 16))
    assert result.levels[0]["step"] == 0 and result.levels[0]["target_sparsity"] == pytest.approx(0.5)


def test_pruned_weights_stay_zero_after_each_hard_update(tmp_path, monkeypatch):
    """Momentum must not revive pruned weights: their stored values stay exactly zero."""
    seen = []

    class Check:
        def on_step(self, step, model, optimizer):
            for name in LAYERS:
                module = model.get_submodule(name)
                if hasattr(module, "weight_mask"):
                    pruned = module.weight_orig[~module.weight_mask.bool()]
                    seen.append(pruned.detach().abs().sum().item())

    spy_train(monkeypatch, Check())
    PruningExperiment(tiny(tmp_path)).run()
    assert seen and max(seen) == 0.0


def test_soft_pruning_zeroes_without_freezing(tmp_path, monkeypatch):
    rec = SparsityRecorder()
    zeros: dict[int, float] = {}
    values: dict[int, torch.Tensor] = {}

    class Weights:
        def on_step(self, step, model, optimizer):
            zeros[step] = sum(int((model.get_submodule(n).weight == 0).sum()) for n in LAYERS) / TOTAL
            values[step] = model.fc1.weight.detach().clone()

    real = base.train

    def spy(model, data, cfg, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", ()), rec, Weights()]
        return real(model, data, cfg, **kwargs)

    monkeypatch.setattr(base, "train", spy)
    result = PruningExperiment(tiny(tmp_path, **{"prune.during.soft": True})).run()
    total_steps = max(values)
    t0, end = round(0.1 * total_steps), round(0.7 * total_steps)
    updates = [r["step"] for r in result.levels]
    assert all(not masks for masks in rec.masks_by_step.values())  # nothing is frozen during training
    for t in updates:  # each update zeroes the scheduled fraction of all weights...
        assert zeros[t] == pytest.approx(agp(t, 0.0, 0.9, t0, end - t0), abs=1 / TOTAL), t
    first = updates[1]
    zeroed = values[first] == 0
    assert zeroed.any() and (values[first + 1][zeroed] != 0).all()  # ...which train again at once
    assert zeros[first + 1] < 0.01
    # masks keep being re-selected at the final sparsity after `end`, until the end of training
    assert updates[-1] > end and all(zeros[t] == pytest.approx(0.9, abs=1 / TOTAL) for t in updates if t >= end)
    # the final, hard mask is at the target sparsity
    assert result.metrics["sparsity"] == pytest.approx(0.9, abs=1 / TOTAL)
    assert set(result.masks) >= {f"{n}.weight" for n in LAYERS}
