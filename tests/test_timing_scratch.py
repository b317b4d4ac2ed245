"""Scratch-E / Scratch-B (Liu et al. 2019): the compacted architecture of a channel-pruned run, freshly initialised,
trained for the dense epochs or for the dense/pruned FLOPs ratio. Expectations: the architecture built by hand from
the masks' alive channels, FLOPs counted by torch's own FlopCounterMode, the authors' epoch formulas, and PyTorch's
default initialisation bound computed from the compacted fan-in."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchkit.config import ConfigError, ModelConfig, TrainConfig
from benchkit.deployment.compact import compact
from benchkit.experiment import PruningExperiment
from benchkit.models import build_model
from benchkit.pruning.engine import prune
from benchkit.pruning.masks import get_masks
from benchkit.seeding import seed_everything
from benchkit.timing.scratch import SCRATCH_LENGTH, reinitialize, scratch_train_config
from benchkit.validation import load_config

torch.set_num_threads(1)
SHAPE = (1, 8, 8)  # the digits


def liu_cifar_epochs(epochs: int, flops_std: float, flops_small: float) -> int:
    """cifar/l1-norm-pruning/main_B.py: ``args.epochs = int(args.epochs * (flops_std / flops_small))``."""
    return int(epochs * (flops_std / flops_small))


def liu_imagenet_epochs(epochs: int, flops_std: float, flops_small: float) -> int:
    """imagenet/l1-norm-pruning/main_B.py: 2× the epochs when the pruned model saves 2× FLOPs or more."""
    ratio = flops_std / flops_small
    return 2 * epochs if ratio >= 2 else int(epochs * ratio)


@pytest.mark.parametrize("ratio", [1.0, 1.3, 1.55, 1.999, 2.0, 3.74, 42.0])
def test_scratch_b_epochs_follow_the_authors_code(ratio):
    for epochs in (10, 90, 160):
        assert SCRATCH_LENGTH["scratch_b"](epochs, ratio, None) == liu_cifar_epochs(epochs, ratio * 1000, 1000)
        assert SCRATCH_LENGTH["scratch_b"](epochs, ratio, 2.0) == liu_imagenet_epochs(epochs, ratio * 1000, 1000)
        assert SCRATCH_LENGTH["scratch_e"](epochs, ratio, 2.0) == epochs


def test_longer_training_stretches_the_step_schedule():
    cfg = TrainConfig(epochs=10, schedule="multistep", milestones=[5, 8], step_size=3)
    out = scratch_train_config(cfg, 2.0)
    assert (out.epochs, out.milestones, out.step_size) == (20, [10, 16], 6)
    assert (cfg.epochs, cfg.milestones) == (10, [5, 8])  # the run's own settings untouched
    it = scratch_train_config(TrainConfig(iterations=1000, epochs=3), 1.5)
    assert (it.iterations, it.epochs) == (1500, 3)


def pruned_lenet5(compression: float = 2.0, seed: int = 0) -> nn.Module:
    seed_everything(seed)
    model = build_model(ModelConfig(name="lenet5"), SHAPE, 10)
    prune(model, compression=compression, criterion="magnitude", granularity="channel", allocation="uniform",
          reduce="l1")
    return model


def alive(masks: dict, name: str) -> int:
    return int(masks[f"{name}.weight"].flatten(1).any(dim=1).sum())


def hand_compacted(masks: dict) -> nn.Sequential:
    """LeNet-5 on 8×8 inputs (padding 2; 2×2 feature map before fc1) with the alive channels only."""
    k1, k2, k3 = alive(masks, "conv1"), alive(masks, "conv2"), alive(masks, "fc1")
    return nn.Sequential(nn.Conv2d(1, k1, 5, padding=2), nn.MaxPool2d(2), nn.Conv2d(k1, k2, 5, padding=2),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(k2 * 4, k3), nn.ReLU(), nn.Linear(k3, 10))


def torch_flops(model: nn.Module) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, *SHAPE))
    return counter.get_total_flops()


def test_the_scratch_model_is_the_compacted_architecture_freshly_initialised():
    model = pruned_lenet5()
    masks = get_masks(model)
    result = compact(model, torch.zeros(4, *SHAPE), measure_latency=False)
    inherited = {k: v.clone() for k, v in result.model.state_dict().items()}
    fresh = reinitialize(result.model, "default", seed=123)
    expected = hand_compacted(masks)
    shapes = [tuple(m.weight.shape) for m in fresh.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert shapes == [tuple(m.weight.shape) for m in expected.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert shapes[0][0] < 20 and shapes[1][:2] == (shapes[1][0], shapes[0][0])  # conv2 lost its dead inputs too
    for name, value in fresh.state_dict().items():
        assert not torch.equal(value, inherited[name]), f"{name} kept its pruned-model values"
    # PyTorch's default init draws Linear weights in ±1/sqrt(fan_in): fan_in of the *compacted* fc1 (100, not 200)
    fc1 = fresh.fc1.weight
    dense_bound, bound = 1 / math.sqrt(200), 1 / math.sqrt(fc1.shape[1])
    assert fc1.shape[1] == 100 and fc1.abs().max() <= bound and fc1.abs().max() > 1.2 * dense_bound
    again = reinitialize(compact(model, torch.zeros(4, *SHAPE), measure_latency=False).model, "default", seed=123)
    other = reinitialize(compact(model, torch.zeros(4, *SHAPE), measure_latency=False).model, "default", seed=7)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), fresh.state_dict().values()))
    assert not torch.equal(other.fc1.weight, fresh.fc1.weight)
    # with a named scheme the compacted layers are redrawn by it (Glorot: std sqrt(2 / (fan_in + fan_out)))
    glorot = reinitialize(compact(model, torch.zeros(4, *SHAPE), measure_latency=False).model, "glorot_normal", 0)
    w = glorot.fc1.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / sum(w.shape)), rel=0.05) and glorot.fc1.bias.abs().sum() == 0


def test_batchnorm_statistics_start_afresh():
    seed_everything(0)
    model = build_model(ModelConfig(name="vgg_small"), SHAPE, 10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.weight.data.fill_(0.5)
    prune(model, compression=2.0, criterion="magnitude", granularity="channel", allocation="uniform", reduce="l1")
    fresh = reinitialize(compact(model, torch.zeros(4, *SHAPE), measure_latency=False).model, "default", 0)
    bns = [m for m in fresh.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m.num_features for m in bns] == [8, 8, 16, 16, 32, 32]  # half of 16-16-32-32-64-64 at 2×
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) and torch.all(m.weight == 1)
               and torch.all(m.running_var == 1) for m in bns)


def config(tmp_path, **overrides):
    d = {"data": {"name": "digits"}, "model": {"name": "lenet5"}, "progress": False, "output_dir": str(tmp_path),
         "train": {"epochs": 1, "lr": 0.01, "batch_size": 64},
         "prune": {"timing": "post", "criterion": "magnitude", "granularity": "channel", "reduce": "l1",
                   "allocation": "uniform", "compression": 2,
                   "post": {"finetune": {"epochs": 1}, "controls": ["scratch_e", "scratch_b"],
                            "scratch_b_cap": None}}}
    return load_config(d, overrides)


def test_a_run_trains_both_controls_on_its_pruned_architecture(tmp_path):
    result = PruningExperiment(config(tmp_path)).run()
    rows = {r.get("branch", "main"): r for r in result.levels}
    assert set(rows) == {"main", "scratch_e", "scratch_b"}
    reference = hand_compacted(result.masks)
    dense = build_model(ModelConfig(name="lenet5"), SHAPE, 10)
    ratio = torch_flops(dense) / torch_flops(reference)
    assert rows["scratch_b"]["flops_ratio"] == pytest.approx(ratio, rel=1e-9)
    assert rows["scratch_e"]["epochs"] == 1 and rows["scratch_b"]["epochs"] == int(1 * ratio) >= 2
    assert rows["scratch_b"]["params"] == sum(p.numel() for p in reference.parameters())
    for branch in ("scratch_e", "scratch_b"):
        assert 0.0 <= rows[branch]["test_acc1"] <= 1.0 and rows[branch]["round"] == 1
        assert rows[branch]["compression_ratio"] == rows["main"]["compression_ratio"]
    # each control trained its own phase, for its own number of epochs
    epochs = {p: sum(1 for h in result.history if h["phase"] == p) for p in ("scratch_e", "scratch_b")}
    assert epochs == {"scratch_e": 1, "scratch_b": rows["scratch_b"]["epochs"]}
    # the run's own model and metrics are still the fine-tuned pruned one's
    assert result.metrics["test_acc1"] == rows["main"]["test_acc1"]
    assert all(torch.equal(m, result.masks[k]) for k, m in get_masks(result.model).items())


@pytest.mark.parametrize("overrides, message", [
    ({"prune.granularity": "element"}, "use granularity: channel"),
    ({"prune.post.controls": ["scratch_c"]}, "unknown control 'scratch_c'"),
    ({"prune.post.scratch_b_cap": 0.5}, "scratch_b_cap: must be >= 1"),
    ({"prune.timing": "lottery", "prune.compression": None, "prune.allocation": "uniform"}, "prune.post.controls"),
])
def test_bad_scratch_settings_are_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **overrides)
