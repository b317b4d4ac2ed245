"""``pre``: masks are chosen at initialisation and stay fixed from step 0 of training."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import prune

from benchkit.config import ExperimentConfig
from benchkit.data import load_data
from benchkit.experiment import PruningExperiment
from benchkit.models import build_model
from benchkit.pruning.masks import get_masks, plain_state_dict
from benchkit.seeding import seed_everything
from benchkit.timing import base
from benchkit.validation import load_config

torch.set_num_threads(1)
LAYERS = ("fc1", "fc2", "fc3")


def tiny(tmp_path, **overrides) -> ExperimentConfig:
    d = {"data": {"name": "digits"}, "model": {"name": "lenet300", "kwargs": {"hidden": [32, 16]}},
         "train": {"epochs": 2, "lr": 0.05, "batch_size": 64}, "progress": False, "output_dir": str(tmp_path),
         "prune": {"timing": "pre", "compression": 5}}
    return load_config(d, overrides)


class StepWatch:
    """Training spy: masks and weights at the start, and after every optimizer step the masks and
    the largest stored magnitude among the weights pruned at the start."""

    def __init__(self, monkeypatch):
        self.start_masks: dict | None = None
        self.start_weights: dict | None = None
        self.mask_changes = 0
        self.pruned_max: list[float] = []
        self.steps = 0
        real = base.train

        def spy(model, data, cfg, **kwargs):
            self.start_masks, self.start_weights = get_masks(model), plain_state_dict(model)
            kwargs["callbacks"] = [*kwargs.get("callbacks", ()), self]
            return real(model, data, cfg, **kwargs)

        monkeypatch.setattr(base, "train", spy)

    def on_step(self, step, model, optimizer):
        self.steps = step
        masks = get_masks(model)
        self.mask_changes += any(not torch.equal(masks[k], self.start_masks[k]) for k in self.start_masks)
        for key, mask in self.start_masks.items():
            module = model.get_submodule(key.rpartition(".")[0])
            self.pruned_max.append(module.weight_orig.detach()[~mask].abs().max().item())


@pytest.mark.parametrize("criterion", ["magnitude", "random", "snip"])
def test_masks_fixed_from_step_zero(tmp_path, monkeypatch, criterion):
    watch = StepWatch(monkeypatch)
    result = PruningExperiment(tiny(tmp_path, **{"prune.criterion": criterion})).run()
    assert watch.steps > 20 and watch.mask_changes == 0
    assert max(watch.pruned_max) == 0.0  # weights pruned at init are exactly zero throughout
    assert result.masks.keys() == watch.start_masks.keys()
    for key in watch.start_masks:
        assert torch.equal(result.masks[key], watch.start_masks[key])
    assert result.metrics["compression_ratio"] == pytest.approx(5, rel=1e-3)
    assert [r["phase"] for r in result.history] == ["train", "train"]
    assert "dense_test_acc1" not in result.metrics  # no dense model is trained at `pre`


def test_magnitude_at_init_equals_torch_global_unstructured_on_the_initial_weights(tmp_path, monkeypatch):
    watch = StepWatch(monkeypatch)
    cfg = tiny(tmp_path)
    PruningExperiment(cfg).run()
    data = load_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.seed)
    seed_everything(cfg.seed)
    ref = build_model(cfg.model, data)  # the initialisation, rebuilt independently
    prune.global_unstructured([(ref.get_submodule(n), "weight") for n in LAYERS], prune.L1Unstructured,
                              amount=0.8)
    for n in LAYERS:
        assert torch.equal(watch.start_masks[f"{n}.weight"], ref.get_submodule(n).weight_mask.bool())
        mask = watch.start_masks[f"{n}.weight"]
        assert torch.equal(watch.start_weights[f"{n}.weight"][mask], ref.get_submodule(n).weight_orig[mask])


def test_data_driven_criteria_score_the_configured_batches(tmp_path, monkeypatch):
    """SNIP's saliency uses score_batches training batches of score_batch_size, same for the same seed."""
    seen = []
    real = base.prune

    def spy(model, **kwargs):
        seen.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(base, "prune", spy)
    cfg = tiny(tmp_path, **{"prune.criterion": "snip", "prune.score_batch_size": 50, "prune.score_batches": 3,
                            "train.epochs": 1})
    PruningExperiment(cfg).run()
    PruningExperiment(cfg).run()
    first, second = seen
    assert first["score_batches"] == 3 and len(first["loader"]) == 3
    assert all(x.shape[0] == 50 and y.shape == (50,) for x, y in first["loader"])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first["loader"], second["loader"]))
    # the batches come from the training split: every row is a training example
    data = load_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, cfg.seed)
    train_x = data.train.dataset.tensors[0].flatten(1)
    for x, _ in first["loader"]:
        assert all((train_x == row).all(1).any() for row in x.flatten(1))
