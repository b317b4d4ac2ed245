"""``post``: rounds land exactly on the target compression; fine-tuning learning rates, LR rewinding
and knowledge distillation do what the papers say."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchkit.config import ExperimentConfig
from benchkit.experiment import PruningExperiment
from benchkit.pruning.masks import get_masks, plain_state_dict
from benchkit.timing import base
from benchkit.timing.post import DistillationLoss
from benchkit.validation import load_config

torch.set_num_threads(1)


def tiny(tmp_path, **overrides) -> ExperimentConfig:
    """LeNet-300-100 shrunk to 64-32-16-10 on the 8×8 digits: a full run takes about a second."""
    d = {"data": {"name": "digits"}, "model": {"name": "lenet300", "kwargs": {"hidden": [32, 16]}},
         "train": {"epochs": 2, "lr": 0.05, "batch_size": 64}, "progress": False, "output_dir": str(tmp_path),
         "prune": {"timing": "post"}}
    return load_config(d, overrides)


class TrainSpy:
    """Wraps the trainer the timings call: records each call's phase, keyword arguments, and the
    model's masks/weights before and after."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        real = base.train

        def spy(model, data, cfg, **kwargs):
            call = {"phase": kwargs["desc"], "kwargs": kwargs, "masks": get_masks(model),
                    "before": plain_state_dict(model)}
            self.calls.append(call)
            call["history"] = real(model, data, cfg, **kwargs)
            call["after"] = plain_state_dict(model)
            return call["history"]

        monkeypatch.setattr(base, "train", spy)

    def phase(self, name: str) -> dict:
        (call,) = [c for c in self.calls if c["phase"] == name]
        return call


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_rounds_reach_the_target_compression_exactly(tmp_path, monkeypatch, scope):
    spy = TrainSpy(monkeypatch)
    result = PruningExperiment(tiny(tmp_path, **{"prune.compression": 8, "prune.post.rounds": 3, "prune.scope": scope,
                                                 "prune.post.finetune.epochs": 1})).run()
    total = 64 * 32 + 32 * 16 + 16 * 10
    kept = sum(int(m.sum()) for k, m in result.masks.items() if k.endswith("weight"))
    assert abs(kept - total / 8) <= (1 if scope == "global" else 3)  # one weight of rounding per unit
    assert result.metrics["compression_ratio"] == pytest.approx(total / kept)
    # per round r of n the cumulative compression is C^(r/n): per-round compression C^(1/n)
    for row in result.levels:
        assert row["compression"] == pytest.approx(8 ** (row["round"] / 3), rel=2e-3)
    if scope == "layer":
        for name, mask in result.masks.items():
            assert abs(int(mask.sum()) - mask.numel() / 8) <= 1, name
    assert [c["phase"] for c in spy.calls] == ["dense", "finetune_r1", "finetune_r2", "finetune_r3"]
    # fine-tuning defaults: train.lr / 10, constant schedule, the training optimizer
    ft = spy.phase("finetune_r1")["kwargs"]
    assert ft["lr"] == pytest.approx(0.005) and ft["schedule"] == "constant" and ft["optimizer"] == "sgd"
    assert [r["lr"] for r in result.history if r["phase"] == "finetune_r2"] == pytest.approx([0.005])


def test_one_shot_prunes_the_trained_dense_weights(tmp_path, monkeypatch):
    """One-shot global magnitude on the dense model = torch.nn.utils.prune.global_unstructured."""
    from torch.nn.utils import prune

    spy = TrainSpy(monkeypatch)
    result = PruningExperiment(tiny(tmp_path, **{"prune.compression": 4})).run()
    dense = spy.phase("dense")["after"]
    ref = nn.Sequential()
    for i, name in enumerate(("fc1", "fc2", "fc3")):
        lin = nn.Linear(*reversed(dense[f"{name}.weight"].shape))
        lin.weight.data.copy_(dense[f"{name}.weight"])
        ref.add_module(str(i), lin)
    prune.global_unstructured([(m, "weight") for m in ref], prune.L1Unstructured, amount=0.75)
    for i, name in enumerate(("fc1", "fc2", "fc3")):
        assert torch.equal(result.masks[f"{name}.weight"], ref[i].weight_mask.bool()), name
    assert spy.phase("finetune_r1")["masks"].keys() == result.masks.keys()


def test_lr_rewinding_replays_the_tail_of_the_original_schedule(tmp_path, monkeypatch):
    """Renda et al. 2020: fine-tune t epochs with the original lr schedule from epoch T − t."""
    TrainSpy(monkeypatch)
    cfg = tiny(tmp_path, **{"train.epochs": 4, "train.lr": 0.08, "train.schedule": "step", "train.step_size": 1,
                            "train.gamma": 0.5, "prune.compression": 2, "prune.post.lr_rewind": True,
                            "prune.post.finetune.epochs": 2})
    result = PruningExperiment(cfg).run()
    dense = [r["lr"] for r in result.history if r["phase"] == "dense"]
    tuned = [r["lr"] for r in result.history if r["phase"] == "finetune_r1"]
    assert dense == pytest.approx([0.08 * 0.5 ** e for e in range(4)])  # the step schedule by hand
    assert tuned == pytest.approx([0.08 * 0.5 ** e for e in (2, 3)])  # its last two epochs
    assert tuned == pytest.approx(dense[-2:])


def test_distillation_loss_equals_hand_computed_kd():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 4))
    x, y = torch.randn(6, 5), torch.randint(0, 4, (6,))
    student_logits = torch.randn(6, 4, requires_grad=True)
    T = 3.0
    teacher.eval()
    with torch.no_grad():
        zt = teacher(x).double()
    zs = student_logits.detach().double()
    pt, ps = torch.softmax(zt / T, 1), torch.softmax(zs / T, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()  # KL(p_teacher || p_student), batch mean
    ce = -torch.log_softmax(zs, 1)[torch.arange(6), y].mean()

    teacher.train()  # the loss must put the teacher in eval mode itself (dropout off)
    for alpha in (1.0, 0.0, 0.3):
        loss = DistillationLoss(teacher, temperature=T, alpha=alpha)(student_logits, y, x)
        expected = alpha * T * T * kl + (1 - alpha) * ce
        assert loss.item() == pytest.approx(float(expected), rel=1e-5), alpha
    assert not teacher.training
    loss.backward()
    assert student_logits.grad is not None
    assert all(p.grad is None for p in teacher.parameters())  # no gradient reaches the teacher


def test_distillation_fine_tunes_against_the_dense_teacher(tmp_path, monkeypatch):
    spy = TrainSpy(monkeypatch)
    cfg = tiny(tmp_path, **{"prune.compression": 4, "prune.post.distill.enabled": True, "prune.post.distill.alpha": 1.0,
                            "prune.post.distill.temperature": 2.0})
    PruningExperiment(cfg).run()
    loss_fn = spy.phase("finetune_r1")["kwargs"]["loss_fn"]
    assert isinstance(loss_fn, DistillationLoss) and loss_fn.alpha == 1.0 and loss_fn.temperature == 2.0
    teacher = plain_state_dict(loss_fn.teacher)
    dense = spy.phase("dense")["after"]
    assert all(torch.equal(teacher[k], dense[k]) for k in dense)  # the trained dense net, unpruned
    assert not get_masks(loss_fn.teacher)
    assert "loss_fn" not in spy.phase("dense")["kwargs"]


def test_compression_one_is_the_dense_baseline(tmp_path, monkeypatch):
    spy = TrainSpy(monkeypatch)
    result = PruningExperiment(tiny(tmp_path, **{"prune.compression": 1})).run()
    assert [c["phase"] for c in spy.calls] == ["dense"]
    assert result.metrics["compression_ratio"] == 1.0
    assert result.metrics["test_acc1"] == result.metrics["dense_test_acc1"]
    assert math.isclose(result.metrics["val_acc1"], result.metrics["dense_val_acc1"])


def test_kd_loss_value_used_in_training(tmp_path, monkeypatch):
    """The loss the fine-tuning optimises (and reports) is the KD loss, not cross-entropy."""
    seen = []
    real = DistillationLoss.__call__

    def recording(self, logits, y, x):
        loss = real(self, logits, y, x)
        seen.append((loss.item(), F.cross_entropy(logits, y).item(), len(y)))
        return loss

    monkeypatch.setattr(DistillationLoss, "__call__", recording)
    cfg = tiny(tmp_path, **{"prune.compression": 4, "prune.post.distill.enabled": True, "prune.post.distill.alpha": 1.0,
                            "prune.post.finetune.epochs": 1})
    result = PruningExperiment(cfg).run()
    (record,) = [r for r in result.history if r["phase"] == "finetune_r1"]
    assert len(seen) > 10 and any(abs(kd - ce) > 1e-3 for kd, ce, _ in seen)
    mean_kd = sum(kd * n for kd, _, n in seen) / sum(n for *_, n in seen)
    assert record["train_loss"] == pytest.approx(mean_kd, rel=1e-5)


def test_n_m_one_shot_keeps_n_of_every_m(tmp_path):
    result = PruningExperiment(tiny(tmp_path, **{"prune.granularity": "2:4"})).run()
    for key, mask in result.masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4)  # Linear [out, in]: groups of 4 along `in`
        assert (groups.sum(-1) == 2).all(), key
    assert result.metrics["compression_ratio"] == 2.0
