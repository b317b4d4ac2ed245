"""train() / evaluate(): schedules against torch's own schedulers, equality with a hand-written loop,
seeding, selection, early stopping, masked training, callbacks and the test-split firewall."""

from __future__ import annotations

import collections
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


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gradient_masking_gives_exactly_the_prune_hook_results(optimizer, monkeypatch):
    """The fast path (mask the gradient, no per-forward multiply) against torch.nn.utils.prune's hooks."""
    def run(fast: bool):
        monkeypatch.setattr(training, "GRADIENT_MASKING", fast)
        data = synth()
        model = mlp(data)
        prune.l1_unstructured(model.fc2, "weight", amount=0.5)  # a torch-made mask with orig kept intact
        apply_masks(model, random_masks(model))
        h = train(model, data, TrainConfig(optimizer=optimizer, lr=0.02, weight_decay=1e-3, epochs=3), device="cpu")
        return model, h

    stepped = []  # the optimiser of each call of benchkit's masked step (train's, or its check against torch's)
    monkeypatch.setitem(training._MASKED_STEPS, torch.optim.SGD, (lambda g: g["dampening"] == 0, lambda opt, m: (
        stepped.append(id(opt)), training._masked_sgd_step(opt, m))))
    monkeypatch.setitem(training._MASKED_STEPS, torch.optim.Adam, (lambda g: not g["amsgrad"], lambda opt, m: (
        stepped.append(id(opt)), training._masked_adam_step(opt, m))))
    monkeypatch.setattr(training, "_AGREES", {})
    (fast, hf), (slow, hs) = run(True), run(False)
    assert collections.Counter(stepped).most_common(1)[0][1] == hf.steps  # train took benchkit's masked step
    assert weights_equal(fast, slow)
    assert strip_seconds(hf.records) == strip_seconds(hs.records)
    x = next(iter(synth().val))[0]
    assert torch.equal(fast(x), slow(x))


MASKED_STEP_CASES = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "sgd nesterov, L2": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "sgd no momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.0, weight_decay=1e-3),
    "sgd odd momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.123456789),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1.2e-3),
    "adam L2, betas": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-3),
    "adam eps 1e-30": lambda ps: torch.optim.Adam(ps, lr=1e-3, eps=1e-30),  # float32: sqrt(tiny) not swamped
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(MASKED_STEP_CASES))
def test_masked_optimizer_steps_are_torchs_own_steps_bit_for_bit(case, dtype):
    """benchkit's masked steps (SGD with the mask folded into the momentum update, Adam with the square root
    floored at the smallest normal number) against masking the gradients and calling torch's own step:
    every weight and every state tensor equal bit for bit over 60 steps, with a learning rate that changes,
    gradients from 1e-30 (whose squares underflow to 0 or subnormals) to 1e9, entries whose gradient is
    always 0 besides the masked ones, and a parameter without gradient. One rounding of its own (a fused
    multiply-add for ``μ·buf + grad``, a floor that reached the denominator) would show here."""
    g = torch.Generator().manual_seed(0)
    shapes = [(300, 784), (300,), (10, 7), (5,)]
    init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    masks = {0: (torch.rand(shapes[0], generator=g) > 0.9).to(dtype), 2: (torch.rand(shapes[2], generator=g) > 0.5).to(dtype)}
    for i, m in masks.items():
        init[i].mul_(m)
    dead = torch.rand(shapes[0], generator=g) > 0.8  # kept entries whose gradient is always exactly 0

    def build():
        params = [nn.Parameter(t.clone()) for t in init]
        return params, MASKED_STEP_CASES[case](params)

    (ours, our_opt), (ref, ref_opt) = build(), build()
    step = training._masked_step_for(our_opt)
    assert step is (training._masked_sgd_step if case.startswith("sgd") else training._masked_adam_step)
    our_masks = {ours[i]: m for i, m in masks.items()}
    grads = torch.Generator().manual_seed(1)
    for t in range(60):
        for group in (our_opt.param_groups[0], ref_opt.param_groups[0]):
            group["lr"] = MASKED_STEP_CASES[case]([nn.Parameter(torch.zeros(1))]).defaults["lr"] * 0.97 ** t
        for a, b in zip(ours[:3], ref[:3]):  # the last parameter never gets a gradient
            scale = 10.0 ** torch.randint(-30, 10, (), generator=grads).item()
            a.grad = torch.randn(a.shape, generator=grads, dtype=dtype) * scale
            if a.shape == dead.shape:
                a.grad[dead] = 0
            b.grad = a.grad.clone()
        for i, m in masks.items():
            ref[i].grad.mul_(m)
        step(our_opt, our_masks)
        ref_opt.step()
        for a, b in zip(ours, ref):
            a.grad = b.grad = None
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
        ours_state, ref_state = our_opt.state[a], ref_opt.state[b]
        assert ours_state.keys() == ref_state.keys()
        for key in ref_state:
            assert ours_state[key].dtype == ref_state[key].dtype and torch.equal(ours_state[key], ref_state[key]), key
    assert torch.count_nonzero(ours[0][masks[0] == 0]) == 0
    assert not torch.equal(ours[0], init[0])
    if "adam" in case:  # which square root ran: floored, except where eps does not swamp sqrt(tiny)
        group = our_opt.param_groups[0]
        floored = training._zero_floor_invisible(dtype, group["betas"][1], group["eps"])
        assert floored == (case != "adam eps 1e-30" or dtype == torch.float64)


def test_masked_steps_are_taken_only_where_they_are_torchs_own_code_path():
    params = [nn.Parameter(torch.zeros(3))]
    sgd, adam = training._masked_sgd_step, training._masked_adam_step
    assert training._masked_step_for(torch.optim.SGD(params, lr=0.1, momentum=0.9)) is sgd
    assert training._masked_step_for(torch.optim.AdamW(params)) is adam
    for other in (torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.1),
                  torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=True),
                  torch.optim.SGD(params, lr=0.1, maximize=True),
                  torch.optim.SGD(params, lr=torch.tensor(0.1)),
                  torch.optim.Adam(params, amsgrad=True),
                  torch.optim.Adam(params, betas=(torch.tensor(0.9), torch.tensor(0.999))),
                  torch.optim.Adam(params, foreach=True),
                  torch.optim.RMSprop(params),
                  torch.optim.SGD([nn.Parameter(torch.zeros(3, dtype=torch.float16))], lr=0.1)):
        assert training._masked_step_for(other) is None
    hooked = torch.optim.SGD(params, lr=0.1)
    handle = hooked.register_step_post_hook(lambda *args: None)
    assert training._masked_step_for(hooked) is None
    handle.remove()
    assert training._masked_step_for(hooked) is sgd


def test_a_masked_step_that_disagrees_with_torchs_own_is_not_taken(monkeypatch):
    """The once-per-process check against torch's step (what guards another torch version): a step that
    forgets the masks is caught, and train falls back to masking the gradients and calling opt.step()."""
    monkeypatch.setattr(training, "_AGREES", {})
    sizes = []  # parameter size of each call: the check's own 515-element problem, or train's model
    monkeypatch.setitem(training._MASKED_STEPS, torch.optim.SGD, (lambda g: True, lambda opt, m: (
        sizes.append(opt.param_groups[0]["params"][0].numel()), training._masked_sgd_step(opt, {}))))
    assert training._masked_step_for(torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)) is None
    data = synth()
    model = mlp(data)
    masks = random_masks(model)
    apply_masks(model, masks)
    train(model, data, TrainConfig(lr=0.05, momentum=0.9, epochs=1), device="cpu")
    assert sizes and set(sizes) == {515}  # checked, never used for training
    assert torch.count_nonzero(model.fc1.weight_orig[~masks["fc1.weight"]]) == 0


def test_a_step_hook_registered_by_a_callback_sees_torchs_own_steps_from_then_on():
    """benchkit's masked step bypasses opt.step(), so a step hook would never fire: from the step a callback
    registers one, training goes back to opt.step() (and stays bit-identical to torch's hooks)."""
    fired = []

    class HookAt:
        def on_step(self, step, model, optimizer):
            if step == 4:
                optimizer.register_step_post_hook(lambda opt, args, kwargs: fired.append(1))

    def run(fast: bool):
        training.GRADIENT_MASKING = fast
        try:
            data = synth()
            model = mlp(data)
            apply_masks(model, random_masks(model))
            h = train(model, data, TrainConfig(lr=0.05, momentum=0.9, epochs=2), device="cpu", callbacks=[HookAt()])
        finally:
            training.GRADIENT_MASKING = True
        return model, h

    fast, h = run(True)
    assert len(fired) == h.steps - 4
    slow, _ = run(False)
    assert weights_equal(fast, slow)


class _SetAt:
    """Callback: at step 3, change the optimiser (a setting the masked steps do not reproduce)."""

    def __init__(self, change):
        self.change = change

    def on_step(self, step, model, optimizer):
        if step == 3:
            self.change(optimizer)


class _OwnBackward:
    """Callback: its own backward and step, as a second-order or auxiliary-loss callback might do."""

    def __init__(self, data):
        self.x, self.y = next(iter(data.train))
        self.seen_under_mask = []

    def on_step(self, step, model, optimizer):
        optimizer.zero_grad()
        F.cross_entropy(model(self.x), self.y).backward()
        self.seen_under_mask.append(float(model.fc1.weight_orig.grad[model.fc1.weight_mask == 0].abs().sum()))
        optimizer.step()


@pytest.mark.parametrize("case", ["dampening", "maximize", "adam maximize", "group added", "own backward", "step replaced",
                                  "param outside the optimiser"])
def test_masked_training_stays_torchs_when_callbacks_or_factories_change_the_optimiser(case, monkeypatch):
    """Found by review: each case used to drift from the reference (torch's prune hooks and opt.step())."""
    def run(fast: bool):
        monkeypatch.setattr(training, "GRADIENT_MASKING", fast)
        data = synth()
        model = mlp(data)
        apply_masks(model, random_masks(model))
        extra = nn.Parameter(torch.ones(3))
        extra.grad = torch.full((3,), 0.5)  # for the added group: a constant gradient
        callbacks = {
            "dampening": [_SetAt(lambda o: o.param_groups[0].update(dampening=0.5))],
            "maximize": [_SetAt(lambda o: o.param_groups[0].update(maximize=True))],
            "adam maximize": [_SetAt(lambda o: o.param_groups[0].update(maximize=True))],
            "group added": [_SetAt(lambda o: o.add_param_group({"params": [extra], "dampening": 0.5}))],
            "own backward": [_OwnBackward(data)],
        }.get(case, [])
        optimizer = "adam" if case.startswith("adam") else "sgd"
        if case == "step replaced":  # an optimiser factory that clips gradients inside step()
            def clipping(params, cfg, lr):
                opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
                plain_step = opt.step
                opt.step = lambda: (nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1e-3), plain_step())
                return opt
            monkeypatch.setitem(OPTIMIZERS._items, "clipping", clipping)
            optimizer = "clipping"
        if case == "param outside the optimiser":  # fc1 masked but frozen by the factory
            monkeypatch.setitem(OPTIMIZERS._items, "frozen_fc1", lambda params, cfg, lr: torch.optim.SGD(
                [p for p in model.parameters() if p is not model.fc1.weight_orig], lr=lr, momentum=0.9))
            optimizer = "frozen_fc1"
        train(model, data, TrainConfig(optimizer=optimizer, lr=0.05 if optimizer != "adam" else 1e-2, epochs=1,
                                       select_best=False), device="cpu", callbacks=callbacks)
        return model, extra, callbacks

    (fast, extra_fast, cb_fast), (slow, extra_slow, _) = run(True), run(False)
    assert weights_equal(fast, slow)
    assert torch.equal(extra_fast, extra_slow)
    assert torch.equal(fast.fc1.weight_orig.grad, slow.fc1.weight_orig.grad)  # what the user sees afterwards
    if case == "own backward":
        assert cb_fast[0].seen_under_mask and set(cb_fast[0].seen_under_mask) == {0.0}


def test_a_sparse_embedding_trains_through_torchs_own_step(monkeypatch):
    """Sparse gradients (nn.Embedding(sparse=True)) are not the strided tensors the masked steps handle."""
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

    def run(fast: bool):
        monkeypatch.setattr(training, "GRADIENT_MASKING", fast)
        torch.manual_seed(0)
        model = Bag()
        apply_masks(model, {"fc.weight": torch.rand(3, 8, generator=torch.Generator().manual_seed(1)) > 0.5})
        prune.custom_from_mask(model.emb, "weight", torch.rand(50, 8, generator=torch.Generator().manual_seed(2)) > 0.5)
        with torch.no_grad():
            model.emb.weight_orig.mul_(model.emb.weight_mask)
        train(model, data, TrainConfig(lr=0.1, momentum=0.9, epochs=2, select_best=False), device="cpu")
        return model

    assert weights_equal(run(True), run(False))


def test_without_callbacks_the_prune_hooks_are_set_aside_during_training_and_put_back():
    """No callback can look for them, so the modules run hook-free; afterwards every hook is back, in
    its place among the module's other hooks, as the torch class, with weight = weight_orig * mask."""
    data = synth()
    model = mlp(data)
    marker = model.fc1.register_forward_pre_hook(lambda module, inputs: None)  # a user's hook in between
    prune.random_unstructured(model.fc1, "bias", amount=0.5)
    with torch.no_grad():
        model.fc1.bias_orig.mul_(model.fc1.bias_mask)  # zero under the mask: the fast path takes it too
    apply_masks(model, random_masks(model))
    last = model.fc1.register_forward_pre_hook(lambda module, inputs: None)  # and one after the prune hooks
    before = {name: list(m._forward_pre_hooks.items()) for name, m in model.named_modules()}
    seen = []

    def loss_fn(logits, y, x):
        seen.append({name: len(m._forward_pre_hooks) for name, m in model.named_modules() if m._forward_pre_hooks})
        assert model.fc1.weight is model.fc1.weight_orig  # bound once, no per-forward multiply
        return F.cross_entropy(logits, y)

    train(model, data, TrainConfig(lr=0.05, momentum=0.9, epochs=1), device="cpu", loss_fn=loss_fn)
    assert seen and all(s == {"fc1": 2} for s in seen)  # only the user's hooks stayed on during the loop
    after = {name: list(m._forward_pre_hooks.items()) for name, m in model.named_modules()}
    assert after == before
    assert [type(h) for h in model.fc1._forward_pre_hooks.values()][1:3] == [prune.RandomUnstructured,
                                                                             prune.CustomFromMask]
    for module in (model.fc1, model.fc2):
        assert torch.equal(module.weight, module.weight_orig * module.weight_mask)
        assert module.weight is not module.weight_orig
    marker.remove()
    last.remove()


def test_a_soft_mask_keeps_torchs_multiplying_hook(monkeypatch):
    """A mask with values other than 0/1 is not a 0/1 gate on the gradient: a column at 0.5 whose weights
    start at zero (so weight == weight_orig at first) must still get half the gradient and train."""
    def run(fast: bool):
        monkeypatch.setattr(training, "GRADIENT_MASKING", fast)
        data = synth()
        model = mlp(data)
        soft = torch.ones_like(model.fc1.weight)
        soft[:, 0] = 0.5
        prune.custom_from_mask(model.fc1, "weight", soft)
        with torch.no_grad():
            model.fc1.weight_orig[:, 0] = 0
        train(model, data, TrainConfig(lr=0.05, epochs=2), device="cpu")
        return model

    fast, slow = run(True), run(False)
    assert fast.fc1.weight_orig[:, 0].abs().sum() > 0
    assert weights_equal(fast, slow)


def test_callbacks_that_prune_or_unprune_during_training():
    """Gradual-pruning-like callbacks: masks tightened in place mid-training, then masks removed."""
    class Pruner:
        def __init__(self, extra):
            self.extra = extra

        def on_step(self, step, model, optimizer):
            if step == 5:
                apply_masks(model, self.extra)
                assert type(copy.deepcopy(model).fc1._forward_pre_hooks.popitem()[1]) is prune.CustomFromMask
            if step == 25:
                make_permanent(model)  # soft pruning: zeroed weights may grow back

    def run(fast: bool, stop_at_25: bool, monkeypatch):
        monkeypatch.setattr(training, "GRADIENT_MASKING", fast)
        data = synth()
        model = mlp(data)
        apply_masks(model, random_masks(model, 0.5, seed=0))
        pruner = Pruner(random_masks(model, 0.5, seed=1))
        cfg = TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-3, epochs=2 if not stop_at_25 else 3,
                          select_best=False)
        train(model, data, cfg, device="cpu", callbacks=[pruner])
        return model, pruner

    with pytest.MonkeyPatch.context() as mp:
        fast, pruner = run(True, False, mp)
        slow, _ = run(False, False, mp)
    combined = {k: random_masks(fast, 0.5, 0)[k] & pruner.extra[k] for k in pruner.extra}
    for path, mask in combined.items():
        assert torch.equal(get_masks(fast)[path], mask)
        module = fast.get_submodule(path.rpartition(".")[0])
        assert torch.count_nonzero(module.weight_orig[~mask]) == 0  # momentum did not revive them
    pf, ps = plain_state_dict(fast), plain_state_dict(slow)
    assert all(torch.equal(pf[k], ps[k]) for k in pf)  # same effective weights as the prune hooks

    with pytest.MonkeyPatch.context() as mp:
        released, _ = run(True, True, mp)
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
