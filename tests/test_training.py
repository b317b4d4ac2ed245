"""train() / evaluate(): schedules against torch's own schedulers, equality with a hand-written loop,
seeding, selection, early stopping, masked training, callbacks and the test-split firewall."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

import benchkit.training as training
from benchkit.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from benchkit.data import load_data
from benchkit.models import build_model
from benchkit.pruning.masks import apply_masks, get_masks, make_permanent, plain_state_dict
from benchkit.registry import UnknownNameError
from benchkit.seeding import resolve_device, seed_everything
from benchkit.training import OPTIMIZERS, evaluate, train

torch.set_num_threads(1)

SYNTH = DataConfig(name="synthetic", num_samples=200, input_shape=[1, 4, 4], val_fraction=0.2)  # 160 train


def synth(batch_size: int = 16, seed: int = 0):
    return load_data(SYNTH, batch_size, eval_batch_size=64, seed=seed)  # 10 steps per epoch


def mlp(data, seed: int = 0) -> nn.Module:
    seed_everything(seed)
    return build_model(ModelConfig(name="lenet300", kwargs={"hidden": (32, 16)}), data.input_shape, data.num_classes)


def random_masks(model: nn.Module, sparsity: float = 0.9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{n}.weight": torch.rand(m.weight.shape, generator=g) >= sparsity
            for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def weights_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def strip_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


class Raising:
    """A loader that fails the test if anything iterates it."""

    def __iter__(self):
        raise AssertionError("the test split was touched during training")

    def __len__(self):
        return 1


# --------------------------------------------------------------------------------------------- schedules
def lrs_by_epoch(history):
    return [r["lr"] for r in history.records]


def torch_lrs(make_scheduler, n: int, lr: float = 0.1) -> list[float]:
    """The rates torch's scheduler gives for units 0..n-1, computed independently of benchkit."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule, kwargs, make", [
    ("constant", {}, lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0)),
    ("step", {"step_size": 3, "gamma": 0.5}, lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5)),
    ("multistep", {"milestones": [2, 5], "gamma": 0.1},
     lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5], 0.1)),
    ("cosine", {}, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8)),
])
def test_schedules_match_torch_schedulers_per_epoch(schedule, kwargs, make):
    data = synth()
    cfg = TrainConfig(lr=0.1, epochs=8, schedule=schedule, select_best=False, **kwargs)
    h = train(mlp(data), data, cfg, device="cpu")
    assert lrs_by_epoch(h) == pytest.approx(torch_lrs(make, 8), rel=1e-12, abs=1e-15)


def test_schedule_unit_is_iterations_when_training_by_iterations():
    data = synth()
    cfg = TrainConfig(lr=0.1, iterations=12, eval_every=1, schedule="step", step_size=5, gamma=0.1,
                      select_best=False)
    h = train(mlp(data), data, cfg, device="cpu")
    assert [r["step"] for r in h.records] == list(range(1, 13))
    assert lrs_by_epoch(h) == pytest.approx([0.1] * 5 + [0.01] * 5 + [0.001] * 2)


def test_schedule_offset_replays_the_tail_of_the_original_schedule():
    """Learning-rate rewinding: fine-tuning 4 epochs at offset 6 reproduces epochs 7–10 of a 10-epoch run."""
    data = synth()
    for schedule in ("cosine", "multistep"):
        cfg = TrainConfig(lr=0.1, epochs=10, schedule=schedule, milestones=[5, 8], select_best=False)
        full = lrs_by_epoch(train(mlp(data), data, cfg, device="cpu"))
        tail = lrs_by_epoch(train(mlp(data), data, cfg, device="cpu", epochs=4, schedule_offset=6))
        assert tail == pytest.approx(full[6:], rel=1e-12)
    assert full[6:] == pytest.approx([0.01, 0.01, 0.001, 0.001])  # multistep by hand: ×0.1 at 5 and at 8


def test_lr_and_optimizer_overrides_and_optimizer_settings():
    params = [nn.Parameter(torch.zeros(2))]
    sgd = OPTIMIZERS.get("sgd")(params, TrainConfig(momentum=0.8, nesterov=True, weight_decay=1e-3), 0.05)
    assert isinstance(sgd, torch.optim.SGD)
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.05, 0.8, True, 1e-3)
    assert type(OPTIMIZERS.get("adam")(params, TrainConfig(), 1e-3)) is torch.optim.Adam
    adamw = OPTIMIZERS.get("adamw")(params, TrainConfig(weight_decay=0.01), 1e-3)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["weight_decay"] == 0.01
    data = synth()
    h = train(mlp(data), data, TrainConfig(lr=0.1, epochs=1), device="cpu", lr=0.003, optimizer="adam")
    assert h.records[0]["lr"] == 0.003


def test_bad_settings_are_refused_before_training():
    data = synth()
    with pytest.raises(ConfigError, match="epochs"):
        train(mlp(data), data, TrainConfig(epochs=0), device="cpu")
    with pytest.raises(ConfigError, match="milestones"):
        train(mlp(data), data, TrainConfig(schedule="multistep"), device="cpu")
    with pytest.raises(UnknownNameError, match="adamw"):
        train(mlp(data), data, TrainConfig(optimizer="rmsprop"), device="cpu")
    with pytest.raises(ValueError, match="cuda"):
        resolve_device("cuda:7") if not torch.cuda.is_available() else resolve_device("tpu")


# --------------------------------------------------------------------------------------------- the loop itself
def test_train_equals_a_hand_written_pytorch_loop():
    """Same init, same batches (same seeded loader), SGD with momentum, Nesterov and weight decay."""
    cfg = TrainConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, epochs=3, select_best=False)
    data = synth(seed=3)
    ours = mlp(data)
    train(ours, data, cfg, device="cpu")

    data = synth(seed=3)
    ref = mlp(data)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for _ in range(3):
        for x, y in data.train:
            opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            opt.step()
    assert weights_equal(ours, ref)


def test_seeded_training_twice_is_identical():
    def run():
        data = synth(seed=1)
        model = mlp(data, seed=1)
        h = train(model, data, TrainConfig(lr=0.05, epochs=3, optimizer="adam"), device="cpu")
        return model, h

    (m1, h1), (m2, h2) = run(), run()
    assert weights_equal(m1, m2)
    assert strip_seconds(h1.records) == strip_seconds(h2.records)
    assert (h1.best_step, h1.best_val_acc1) == (h2.best_step, h2.best_val_acc1)
    data = synth(seed=2)  # another data-order seed gives another run
    m3 = mlp(data, seed=1)
    train(m3, data, TrainConfig(lr=0.05, epochs=3, optimizer="adam"), device="cpu")
    assert not weights_equal(m1, m3)


def test_records_steps_epochs_and_eval_every():
    data = synth()  # 10 steps per epoch
    h = train(mlp(data), data, TrainConfig(lr=0.05, iterations=25), device="cpu")
    assert [(r["step"], r["epoch"]) for r in h.records] == [(10, 1), (20, 2), (25, 2.5)]
    assert h.steps == 25
    h = train(mlp(data), data, TrainConfig(lr=0.05, epochs=2, eval_every=4), device="cpu")
    assert [r["step"] for r in h.records] == [4, 8, 12, 16, 20]
    r = h.records[0]
    assert set(r) == {"phase", "epoch", "step", "lr", "train_loss", "train_acc1", "val_loss", "val_acc1",
                      "val_acc5", "seconds"}
    assert r["phase"] == "train" and 0 <= r["train_acc1"] <= 1 and 0 <= r["val_acc1"] <= r["val_acc5"] <= 1


def test_callbacks_see_every_step_and_every_evaluation():
    class Recorder:
        def __init__(self):
            self.steps, self.evals = [], []

        def on_step(self, step, model, optimizer):
            assert isinstance(optimizer, torch.optim.Optimizer)
            self.steps.append(step)

        def on_eval(self, step, record):
            self.evals.append((step, record["val_acc1"]))

    data = synth()
    rec = Recorder()
    h = train(mlp(data), data, TrainConfig(lr=0.05, epochs=2), device="cpu", callbacks=[rec, object()])
    assert rec.steps == list(range(1, 21))
    assert rec.evals == [(r["step"], r["val_acc1"]) for r in h.records]


def test_loss_fn_replaces_cross_entropy():
    calls = []

    def zero_loss(logits, y, x):  # a loss with zero gradient: plain SGD must not move anything
        calls.append(x.shape)
        return 0.0 * F.cross_entropy(logits, y)

    data = synth()
    model = mlp(data)
    before = copy.deepcopy(model)
    h = train(model, data, TrainConfig(lr=0.1, momentum=0.0, epochs=1), device="cpu", loss_fn=zero_loss)
    assert len(calls) == 10 and calls[0] == (16, 1, 4, 4)
    assert h.records[0]["train_loss"] == 0.0
    assert weights_equal(model, before)


def test_train_never_touches_the_test_split():
    data = dataclasses.replace(synth(), test=Raising())
    train(mlp(data), data, TrainConfig(lr=0.05, epochs=2, patience=5), device="cpu")


def test_no_validation_split_means_no_evaluation():
    data = dataclasses.replace(synth(), val=None)
    h = train(mlp(data), data, TrainConfig(lr=0.05, epochs=2), device="cpu")
    assert [r["val_acc1"] for r in h.records] == [None, None]
    assert h.best_step is None and not h.restored_best


# --------------------------------------------------------------------------------------------- selection
def test_select_best_restores_the_best_validation_weights():
    class Snapshots:
        def __init__(self, model, total):
            self.model, self.total, self.states = model, total, {}

        def on_step(self, step, model, optimizer):
            if step == self.total:  # wreck the final weights: the last evaluation cannot be the best
                with torch.no_grad():
                    for p in model.parameters():
                        p.copy_(torch.randn_like(p) * 10)

        def on_eval(self, step, record):
            self.states[step] = copy.deepcopy(self.model.state_dict())

    data = synth()
    model = mlp(data)
    snaps = Snapshots(model, 40)
    h = train(model, data, TrainConfig(lr=0.05, epochs=4), device="cpu", callbacks=[snaps])
    accs = [r["val_acc1"] for r in h.records]
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))  # first occurrence of the maximum
    assert h.best_step == h.records[best]["step"] != 40 and h.best_val_acc1 == accs[best]
    assert h.restored_best
    assert all(torch.equal(v, snaps.states[h.best_step][k]) for k, v in model.state_dict().items())
    assert evaluate(model, data.val, "cpu")["acc1"] == h.best_val_acc1

    model = mlp(data)  # select_best=False keeps the final (wrecked) weights
    snaps = Snapshots(model, 40)
    train(model, data, TrainConfig(lr=0.05, epochs=4, select_best=False), device="cpu", callbacks=[snaps])
    assert all(torch.equal(v, snaps.states[40][k]) for k, v in model.state_dict().items())


def test_patience_stops_when_validation_loss_stops_improving():
    data = synth()
    h = train(mlp(data), data, TrainConfig(lr=0.05, epochs=10, patience=2), device="cpu", lr=0.0)
    assert len(h.records) == 3 and h.stopped_early and h.steps == 30  # best at eval 1, no gain at 2 and 3


# --------------------------------------------------------------------------------------------- masked models
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_masked_model_stays_masked_through_momentum_and_weight_decay(optimizer):
    data = synth()
    model = mlp(data)
    masks = random_masks(model)
    apply_masks(model, masks)
    before = plain_state_dict(model)
    cfg = TrainConfig(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-2, momentum=0.9,
                      weight_decay=5e-3, epochs=3)
    train(model, data, cfg, device="cpu")
    after_masks = get_masks(model)
    assert after_masks.keys() == masks.keys()
    for path, mask in masks.items():
        module = model.get_submodule(path.rpartition(".")[0])
        assert torch.equal(after_masks[path], mask)
        assert torch.count_nonzero(module.weight_orig[~mask]) == 0  # stored values exactly zero
        assert torch.count_nonzero(module.weight[~mask]) == 0
        assert not torch.equal(module.weight[mask], before[path][mask])  # the survivors trained
    assert type(model.fc1._forward_pre_hooks[next(iter(model.fc1._forward_pre_hooks))]) is prune.CustomFromMask


class Drifting(torch.optim.Optimizer):
    """An optimiser of the user's own that moves every entry, zero gradient or not (a stand-in for update
    rules that are not elementwise in the gradient): only re-masking after its step keeps pruned weights at 0."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad + 0.01 * p.grad.norm(), alpha=-group["lr"])


# Optimisers under test, with settings that would move a zero weight if anything could: weight decay and
# momentum everywhere they exist. RMSprop, Adagrad and Drifting are not in benchkit's registry.
EXACT_OPTIMISERS = {  # name: (lr, factory); train sets the group's lr, the reference loop keeps it
    "sgd momentum": (0.05, lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9)),
    "sgd nesterov, weight decay": (0.05, lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True,
                                                                        weight_decay=5e-3)),
    "adam, L2": (1e-2, lambda ps, lr: torch.optim.Adam(ps, lr=lr, weight_decay=1e-2)),
    "adamw": (1e-2, lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1)),
    "rmsprop": (1e-3, lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, momentum=0.5, weight_decay=1e-3)),
    "adagrad": (0.05, lambda ps, lr: torch.optim.Adagrad(ps, lr=lr, weight_decay=1e-3)),
    "a custom optimiser that moves every entry": (0.05, lambda ps, lr: Drifting(ps, lr)),
}
PRUNE_AT, REGROW_AT = 4, 7  # steps after which the events below happen


def _events(model: nn.Module) -> dict[int, tuple[str, dict[str, torch.Tensor]]]:
    """What happens to the masks mid-training: at PRUNE_AT fc2 loses half of its survivors (what timing
    ``during`` does), at REGROW_AT fc1's mask is *replaced* by another one that regrows some pruned entries
    and prunes some kept ones (dynamic sparse training)."""
    g = torch.Generator().manual_seed(7)
    return {PRUNE_AT: ("prune", {"fc2.weight": torch.rand(model.fc2.weight.shape, generator=g) >= 0.5}),
            REGROW_AT: ("replace", {"fc1.weight": torch.rand(model.fc1.weight.shape, generator=g) >= 0.9})}


@torch.no_grad()
def _reset_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> None:
    """The caller's part of regrowing: the regrown entries' optimiser state starts from zero."""
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value[where] = 0


class _MaskEvents:
    """Callback: apply the events of :func:`_events` to a pruned model through its prune buffers."""

    def __init__(self, events):
        self.events = events

    @torch.no_grad()
    def on_step(self, step, model, optimizer):
        if step not in self.events:
            return
        kind, masks = self.events[step]
        if kind == "prune":
            apply_masks(model, masks)
        else:
            for path, mask in masks.items():
                module = model.get_submodule(path.rpartition(".")[0])
                _reset_state(optimizer, module.weight_orig, mask & (module.weight_mask == 0))
                module.weight_mask = mask.to(module.weight_orig.dtype)  # a new buffer: the mask is replaced


class _Snapshots:
    """Callback: the stored weights (``_orig`` where masked) and masks after every step."""

    def __init__(self):
        self.weights, self.masks = [], []

    def on_step(self, step, model, optimizer):
        self.weights.append({k.removesuffix("_orig"): v.clone() for k, v in model.state_dict().items()
                             if not k.endswith("_mask")})
        self.masks.append(get_masks(model))


def hand_masked_loop(model: nn.Module, batches, make_opt, masks: dict[str, torch.Tensor], events) -> list[dict]:
    """The reference: a plain model kept pruned by hand, as anyone would write it. Weights are zeroed under
    the mask, gradients are multiplied by it before each step, weights once more after it."""
    by_param = {model.get_parameter(k): m.float() for k, m in masks.items()}
    opt = make_opt(list(model.parameters()))
    with torch.no_grad():
        for p, m in by_param.items():
            p.mul_(m)
    snapshots = []
    for step, (x, y) in enumerate(batches, start=1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for p, m in by_param.items():
            p.grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for p, m in by_param.items():
                p.mul_(m)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        if step in events:
            kind, new = events[step]
            with torch.no_grad():
                for path, mask in new.items():
                    p = model.get_parameter(path)
                    if kind == "prune":
                        by_param[p] = by_param.get(p, torch.ones_like(p)) * mask
                    else:
                        _reset_state(opt, p, mask & (by_param[p] == 0))
                        by_param[p] = mask.float()
                    p.mul_(by_param[p])
    return snapshots


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(EXACT_OPTIMISERS))
def test_masked_training_is_a_hand_masked_loop_bit_for_bit_for_every_optimiser(name, device, monkeypatch):
    """``train`` on a pruned model against a plain loop that keeps a plain copy pruned by hand (mask the
    gradient, step, mask the weight), with a callback that prunes mid-training and one that replaces a mask
    (regrowth, optimiser state of regrown entries reset): after every step, pruned entries are exactly zero
    and every stored weight equals the reference's bit for bit."""
    data = synth()
    batches = [(x.to(device), y.to(device)) for x, y in data.train]
    data = dataclasses.replace(data, train=batches, val=None)  # one fixed data order for both
    model = mlp(data).to(device)
    reference = copy.deepcopy(model)
    masks = {k: m.to(device) for k, m in random_masks(model, 0.8).items()}
    events = {step: (kind, {k: m.to(device) for k, m in new.items()}) for step, (kind, new) in _events(model).items()}
    apply_masks(model, masks)
    lr, factory = EXACT_OPTIMISERS[name]
    monkeypatch.setitem(OPTIMIZERS._items, "under_test", lambda params, cfg, lr: factory(params, lr))
    snaps = _Snapshots()
    train(model, data, TrainConfig(optimizer="under_test", lr=lr, epochs=1, select_best=False), device=device,
          callbacks=[snaps, _MaskEvents(events)])
    expected = hand_masked_loop(reference, batches, lambda ps: factory(ps, lr), masks, events)

    assert len(snaps.weights) == len(expected) == len(batches) > REGROW_AT
    for step, (ours, ref, step_masks) in enumerate(zip(snaps.weights, expected, snaps.masks), start=1):
        assert ours.keys() == ref.keys()
        for key in ref:
            assert torch.equal(ours[key], ref[key]), (step, key)
        for path, mask in step_masks.items():
            assert not ours[path][~mask].any(), (step, path)  # pruned entries exactly zero after the step
    # the events happened, and did something: fc2 lost half its survivors, fc1 regrew entries that trained
    assert snaps.masks[PRUNE_AT - 1]["fc2.weight"].sum() > snaps.masks[PRUNE_AT]["fc2.weight"].sum()
    regrown = events[REGROW_AT][1]["fc1.weight"] & ~masks["fc1.weight"]
    assert regrown.any() and not snaps.weights[REGROW_AT - 1]["fc1.weight"][regrown].any()
    assert snaps.weights[-1]["fc1.weight"][regrown].any()
    assert not torch.equal(snaps.weights[-1]["fc3.weight"], snaps.weights[0]["fc3.weight"])  # survivors trained


def test_entries_pruned_mid_training_stay_zero_although_momentum_would_move_them(monkeypatch):
    """Why the mask is re-applied after each step: entries pruned by a callback keep their momentum in the
    optimiser's state (benchkit does not touch it), so the step moves them; they are zero again right after."""
    data = synth()
    model = mlp(data)
    initial = random_masks(model, 0.5)
    apply_masks(model, initial)
    extra = _events(model)[PRUNE_AT]
    captured = {}

    class Capture:
        def on_step(self, step, model, optimizer):
            captured["opt"] = optimizer

    train(model, data, TrainConfig(lr=0.05, momentum=0.9, epochs=1, select_best=False), device="cpu",
          callbacks=[_MaskEvents({PRUNE_AT: extra}), Capture()])
    newly = initial["fc2.weight"] & ~extra[1]["fc2.weight"]
    momentum = captured["opt"].state[model.fc2.weight_orig]["momentum_buffer"]
    assert newly.any() and momentum[newly].any()  # newly pruned entries still carry momentum
    assert not model.fc2.weight_orig[newly].any()


def test_a_callbacks_own_backward_and_step_see_masked_gradients_and_zeros():
    """A callback that takes its own training step (an auxiliary loss): the gradient it sees is zero under the
    mask (autograd through the prune hook), and its own ``optimizer.step()`` is followed by re-masking."""
    class OwnStep:
        def __init__(self, data):
            self.x, self.y = next(iter(data.train))
            self.grads_under_mask, self.weights_under_mask = [], []

        def on_step(self, step, model, optimizer):
            optimizer.zero_grad()
            F.cross_entropy(model(self.x), self.y).backward()
            pruned = model.fc1.weight_mask == 0
            self.grads_under_mask.append(float(model.fc1.weight_orig.grad[pruned].abs().sum()))
            optimizer.step()
            self.weights_under_mask.append(float(model.fc1.weight_orig.detach()[pruned].abs().sum()))

    data = synth()
    model = mlp(data)
    apply_masks(model, random_masks(model))
    own = OwnStep(data)
    train(model, data, TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-2, epochs=1), device="cpu", callbacks=[own])
    assert len(own.grads_under_mask) == 10 and set(own.grads_under_mask) == {0.0}
    assert set(own.weights_under_mask) == {0.0}


def test_prune_hooks_stay_in_place_while_callbacks_can_see_the_model_and_come_back_after_the_fast_path():
    """With callbacks, torch's hooks stay on (a callback may read or change the model mid-step); without,
    train skips the mask's multiply (the one fast path) and puts every hook back, in order, afterwards."""
    for callbacks, hooked in (([_Snapshots()], True), ((), False)):
        data = synth()
        model = mlp(data)
        apply_masks(model, random_masks(model))
        hooks_before = {n: list(m._forward_pre_hooks.items()) for n, m in model.named_modules()}
        seen = []

        def loss_fn(logits, y, x, model=model, hooks_before=hooks_before, seen=seen):
            seen.append({n: list(m._forward_pre_hooks.items()) for n, m in model.named_modules()} == hooks_before)
            return F.cross_entropy(logits, y)

        train(model, data, TrainConfig(lr=0.05, momentum=0.9, epochs=2), device="cpu", loss_fn=loss_fn,
              callbacks=callbacks)
        assert seen and all(s == hooked for s in seen)
        assert {n: list(m._forward_pre_hooks.items()) for n, m in model.named_modules()} == hooks_before
        for module in (model.fc1, model.fc2, model.fc3):
            assert torch.equal(module.weight, module.weight_orig * module.weight_mask)  # current after select_best


@pytest.mark.parametrize("name", list(EXACT_OPTIMISERS))
def test_the_fast_path_without_callbacks_is_the_hand_masked_loop_bit_for_bit(name, monkeypatch):
    data = synth()
    batches = list(data.train)
    data = dataclasses.replace(data, train=batches, val=None)
    model = mlp(data)
    reference = copy.deepcopy(model)
    masks = random_masks(model, 0.8)
    apply_masks(model, masks)
    lr, factory = EXACT_OPTIMISERS[name]
    monkeypatch.setitem(OPTIMIZERS._items, "under_test", lambda params, cfg, lr: factory(params, lr))
    train(model, data, TrainConfig(optimizer="under_test", lr=lr, epochs=2, select_best=False), device="cpu")
    expected = hand_masked_loop(reference, batches + batches, lambda ps: factory(ps, lr), masks, {})
    ours = plain_state_dict(model)
    for key, value in expected[-1].items():
        assert torch.equal(ours[key], value), key


def test_a_mask_with_values_other_than_zero_and_one_is_refused_before_training():
    data = synth()
    model = mlp(data)
    soft = torch.ones_like(model.fc2.weight)
    soft[:, 0] = 0.5
    prune.custom_from_mask(model.fc2, "weight", soft)
    with pytest.raises(ValueError, match=r"fc2\.weight_mask holds values other than 0 and 1"):
        train(model, data, TrainConfig(epochs=1), device="cpu", loss_fn=lambda *a: pytest.fail("trained"))


def test_a_masked_sparse_embedding_trains_and_stays_masked():
    """Sparse gradients (nn.Embedding(sparse=True)) go through the prune hook and torch's own step."""
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8, sparse=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, idx):
            return self.fc(self.emb(idx).mean(1))

    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randint(0, 50, (64, 5), generator=g), torch.randint(0, 3, (64,), generator=g)),
                        batch_size=16)
    data = dataclasses.replace(synth(), train=loader, val=None)
    torch.manual_seed(0)
    model = Bag()
    mask = torch.rand(50, 8, generator=torch.Generator().manual_seed(2)) > 0.5
    apply_masks(model, {"emb.weight": mask})
    before = model.emb.weight_orig.clone()
    train(model, data, TrainConfig(lr=0.1, momentum=0.9, epochs=2, select_best=False), device="cpu")
    assert not model.emb.weight_orig[~mask].any()
    assert not torch.equal(model.emb.weight_orig[mask], before[mask])


def test_masked_training_functions_leave_a_model_without_masks_untouched():
    """The contract that keeps benchkit/masked_training.py out of the dense-cache key: on a model without
    masks every function is a no-op (same tensors, same values, same attributes)."""
    from benchkit import masked_training

    data = synth()
    model = mlp(data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    attrs = {n: dict(vars(m)) for n, m in model.named_modules()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert list(masked_training.pruned_parameters(model)) == []
    masked_training.check_masks(model)
    masked_training.zero_pruned(model)
    masked_training.refresh_masked_weights(model)
    masked_training.keep_pruned_at_zero(model, opt).remove()
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    assert all(after[k] is tensors[k] and torch.equal(after[k], before[k]) for k in before)
    assert {n: dict(vars(m)) for n, m in model.named_modules()} == attrs


def test_callbacks_that_prune_or_unprune_during_training():
    """Gradual-pruning-like callbacks: masks tightened in place mid-training, then masks removed (soft
    pruning: the zeroed weights train again)."""
    class Pruner:
        def __init__(self, extra):
            self.extra = extra

        def on_step(self, step, model, optimizer):
            if step == 5:
                apply_masks(model, self.extra)
            if step == 25:
                make_permanent(model)

    def run(epochs: int):
        data = synth()
        model = mlp(data)
        apply_masks(model, random_masks(model, 0.5, seed=0))
        pruner = Pruner(random_masks(model, 0.5, seed=1))
        cfg = TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-3, epochs=epochs, select_best=False)
        train(model, data, cfg, device="cpu", callbacks=[pruner])
        return model, pruner

    model, pruner = run(2)
    combined = {k: random_masks(model, 0.5, 0)[k] & pruner.extra[k] for k in pruner.extra}
    for path, mask in combined.items():
        assert torch.equal(get_masks(model)[path], mask)
        module = model.get_submodule(path.rpartition(".")[0])
        assert torch.count_nonzero(module.weight_orig[~mask]) == 0  # momentum did not revive them

    released, _ = run(3)
    assert get_masks(released) == {}
    assert torch.count_nonzero(released.fc1.weight[~combined["fc1.weight"]]) > 0  # trainable again


def test_select_best_only_considers_weights_after_the_last_mask_change():
    class PruneAt:
        def on_step(self, step, model, optimizer):
            if step == 30:
                apply_masks(model, random_masks(model, 0.99))

    data = synth()
    h = train(mlp(data), data, TrainConfig(lr=0.05, epochs=5), device="cpu", callbacks=[PruneAt()])
    assert h.best_step >= 30


# --------------------------------------------------------------------------------------------- evaluate
def test_evaluate_against_hand_computed_values():
    logits_table = torch.tensor([
        [5.0, 4, 3, 2, 1, 0, 0],  # label 0: top-1 hit
        [5.0, 4, 3, 2, 1, 0, 0],  # label 4: top-5 hit only
        [5.0, 4, 3, 2, 1, 0, 0],  # label 6: miss
        [0.0, 0, 0, 0, 0, 0, 9],  # label 6: top-1 hit
    ])
    labels = torch.tensor([0, 4, 6, 6])

    class Table(nn.Module):
        def forward(self, idx):
            return logits_table[idx]

    loader = DataLoader(TensorDataset(torch.arange(4), labels), batch_size=3)
    out = evaluate(Table(), loader, "cpu")
    assert out["acc1"] == 0.5 and out["acc5"] == 0.75
    assert out["loss"] == pytest.approx(F.cross_entropy(logits_table, labels).item(), rel=1e-6)
    m = Table().train()
    evaluate(m, loader, "cpu")
    assert m.training  # mode restored


def test_seed_everything_resets_all_generators():
    import random

    import numpy as np

    seed_everything(5)
    a = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(5)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert torch.are_deterministic_algorithms_enabled()
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="allowed"):
        resolve_device("gpu0")
    assert math.isfinite(a[1])


def test_divergence_stops_the_run_naming_the_step_and_learning_rate():
    data = synth()
    model = mlp(data)
    with pytest.raises(training.TrainingDiverged, match=r"training loss is (nan|inf) at step 10 \(lr 1e\+06\).*train\.lr"):
        train(model, data, TrainConfig(lr=1e6, momentum=0.9, epochs=3), device="cpu")


class LrPerStep:
    """Callback: the learning rate each optimizer step ran at, by step."""

    def __init__(self):
        self.lr: dict[int, float] = {}

    def on_step(self, step, model, optimizer):
        self.lr[step] = optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("unit", ["iterations", "epochs"])
def test_start_step_runs_the_rest_of_the_run_at_the_rates_of_the_full_run(unit):
    """Resuming at step k (lottery rewinding, OpenLTH's start_step): steps k+1..T only, each at the
    learning rate it has in the full run; by epochs, k mid-epoch finishes that epoch's batches."""
    data = synth()  # 10 steps per epoch
    if unit == "iterations":
        cfg = TrainConfig(lr=0.08, iterations=40, schedule="step", step_size=10, gamma=0.5, select_best=False)
    else:
        cfg = TrainConfig(lr=0.08, epochs=4, schedule="step", step_size=1, gamma=0.5, select_best=False)
    full, resumed = LrPerStep(), LrPerStep()
    train(mlp(data), data, cfg, device="cpu", callbacks=[full])
    history = train(mlp(data), data, cfg, device="cpu", callbacks=[resumed], start_step=17)
    assert sorted(full.lr) == list(range(1, 41))
    assert sorted(resumed.lr) == list(range(18, 41))  # 23 steps: the rest of epoch 2, then epochs 3 and 4
    assert all(resumed.lr[s] == full.lr[s] for s in resumed.lr)
    assert resumed.lr[18] == pytest.approx(0.04) and resumed.lr[40] == pytest.approx(0.01)
    assert history.steps == 40 and [r["step"] for r in history.records] == [20, 30, 40]  # epochs end where they did
    with pytest.raises(ValueError, match="start_step"):
        train(mlp(data), data, cfg, device="cpu", start_step=40)
