"""One-shot calibrated pruning through ``bk.prune`` and the config (issue 18.3): ``criterion: wanda |
sparsegpt`` (and magnitude per output row) reach :mod:`benchkit.pruning.calibrated` with the allocation's
per-layer sparsities, ``allocation: owl`` weighs layers by calibration activations, and everything that
cannot work is refused before any work. The methods themselves are compared with the authors' code in
tests/test_calibrated.py; here the wiring is compared with direct calls of that module."""

from __future__ import annotations

import pytest
import torch

import benchkit as bk
from benchkit.config import ConfigError
from benchkit.experiment import PruningExperiment
from benchkit.models.transformer import GPT
from benchkit.pruning.calibrated import owl_allocation, prune_calibrated
from benchkit.validation import load_config

X = torch.randint(0, 40, (8, 24), generator=torch.Generator().manual_seed(0))


def gpt():
    torch.manual_seed(0)
    return GPT((24,), 40, n_layer=2, n_embd=32, n_head=4)


@pytest.mark.parametrize("criterion,granularity,comparison", [
    ("wanda", "element", "auto"), ("wanda", "4:8", "auto"), ("sparsegpt", "element", "auto"),
    ("sparsegpt", "2:4", "auto"), ("magnitude", "element", "row"), ("wanda", "element", "layer"),
])
def test_bk_prune_hands_calibrated_criteria_to_the_calibrated_module(criterion, granularity, comparison):
    ours, ref = gpt(), gpt()
    sparsity = 0.5 if granularity == "element" else None
    report = bk.prune(ours, sparsity=sparsity, criterion=criterion, granularity=granularity, allocation="uniform",
                      batch=X, exclude=["lm_head"], comparison=comparison)
    expect = prune_calibrated(ref, criterion, sparsity=sparsity, granularity=granularity, calibration=X,
                              exclude=["lm_head"], comparison="row" if comparison == "auto" else comparison)
    assert set(report.masks) == set(expect.masks)
    assert all(torch.equal(report.masks[k], expect.masks[k]) for k in expect.masks)
    state, ref_state = ours.state_dict(), ref.state_dict()  # SparseGPT's updated weights too
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
    assert report.criterion == criterion and report.achieved_compression == pytest.approx(2.0, rel=0.02)


def test_owl_allocation_gives_the_calibrated_modules_sparsities():
    ours, ref = gpt(), gpt()
    report = bk.prune(ours, sparsity=0.7, criterion="wanda", allocation="owl", batch=X, exclude=["lm_head"])
    per_layer = owl_allocation(gpt(), X, 0.7, exclude=["lm_head"])
    expect = prune_calibrated(ref, "wanda", per_layer_sparsities=per_layer, calibration=X, exclude=["lm_head"])
    assert all(torch.equal(report.masks[k], expect.masks[k]) for k in expect.masks)
    assert len({round(s, 6) for s in per_layer.values()}) == 2  # one sparsity per block, two blocks


@pytest.mark.parametrize("kwargs,message", [
    (dict(criterion="wanda", sparsity=0.5, batch=X), "allocation 'global'.*does not apply.*uniform"),
    (dict(criterion="wanda", sparsity=0.5, allocation="uniform"), "criterion 'wanda' needs data"),
    (dict(criterion="sparsegpt", compression=2, allocation="uniform", batch=X, granularity="channel"),
     "single weights or N:M"),
    (dict(criterion="taylor", compression=2, comparison="row", batch=X, allocation="uniform"),
     "defined for magnitude, wanda and sparsegpt"),
    (dict(criterion="taylor", compression=2, batch=X), "needs labels"),
    (dict(criterion="magnitude", sparsity=0.5, allocation="owl"), "allocation 'owl'.*calibration inputs"),
    (dict(criterion="wanda", sparsity=0.5, allocation="uniform", batch=X, comparison="column"), "unknown comparison"),
])
def test_what_cannot_work_is_refused_before_any_work(kwargs, message):
    model = gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        bk.prune(model, exclude=["lm_head"], **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def lm_config(tmp_path, **overrides):
    base = {"data": {"name": "text", "train_subset": 40000, "eval_subset": 2000, "context": 24},
            "model": {"name": "gpt", "kwargs": {"n_layer": 2, "n_embd": 32, "n_head": 4}},
            "train": {"optimizer": "adamw", "lr": 3e-3, "batch_size": 8, "iterations": 20, "eval_every": 10},
            "progress": False, "output_dir": str(tmp_path / "runs"),
            "prune": {"timing": "post", "criterion": "wanda", "allocation": "uniform", "sparsity": 0.5,
                      "exclude": ["lm_head"], "calibration": {"samples": 8}, "post": {"finetune": {"epochs": 0}}}}
    return load_config(base, overrides)


@pytest.fixture
def shakespeare(fashion_root):
    if not (fashion_root / "shakespeare" / "texts").is_dir():
        pytest.skip("the Shakespeare corpus is not in ../shared/data")
    return fashion_root


def test_a_language_model_run_prunes_with_wanda_and_logs_the_calibration_protocol(tmp_path, shakespeare, monkeypatch):
    monkeypatch.setenv("BENCHKIT_DATA", str(shakespeare))
    result = PruningExperiment(lm_config(tmp_path)).run()
    assert result.resolved["resolved.prune.calibration.samples"] == 8
    assert result.resolved["resolved.prune.calibration.length"] == 24
    layers = result.layers.set_index("layer")
    assert layers.loc["lm_head", "density"] == 1.0
    pruned = layers.drop(index=["lm_head"])
    assert ((pruned["density"] - 0.5).abs() <= 1 / 24).all()
    assert result.metrics["test_loss"] > 0 and "dense_test_loss" in result.metrics
    # the same config and seed give the same masks
    again = PruningExperiment(lm_config(tmp_path / "again")).run()
    assert all(torch.equal(result.masks[k], again.masks[k]) for k in result.masks)
    # the calibration protocol is part of the hash
    assert lm_config(tmp_path, **{"prune.calibration.samples": 16}).config_hash() != lm_config(tmp_path).config_hash()


def test_config_refuses_calibrated_pruning_of_conv_layers_and_global_allocation(tmp_path):
    with pytest.raises(ConfigError, match="prune.allocation.*wanda compares weights within each layer"):
        load_config({"prune": {"criterion": "wanda", "sparsity": 0.5}})
    cfg = load_config({"model": {"name": "lenet5"}, "data": {"name": "digits"},
                       "prune": {"criterion": "wanda", "sparsity": 0.5, "allocation": "uniform"}})
    from benchkit.experiment import plan_preflight

    with pytest.raises(ConfigError, match="prunes Linear layers.*conv1"):
        plan_preflight(cfg)
