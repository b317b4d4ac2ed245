"""Criteria against hand-computed expectations on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import benchkit as bk
from benchkit.pruning.criteria import (
    CRITERIA,
    SNIP,
    Activation,
    Criterion,
    Gradient,
    GraSP,
    Random,
    ScoringData,
    SynFlow,
    Taylor,
)
from benchkit.pruning.engine import compute_masks, plan_pruning, scoring_copy

torch.set_num_threads(1)


def softmax_regression(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(5, 3)


def batch(n: int = 8, d: int = 5, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def ce_weight_grad(layer: nn.Linear, x, y):
    """Closed form: dCE/dW = (softmax(Wx + b) - onehot(y))^T x / B."""
    p = torch.softmax(x @ layer.weight.detach().T + layer.bias.detach(), dim=1)
    return (p - F.one_hot(y, p.shape[1]).float()).T @ x / len(x)


def test_gradient_and_taylor_match_closed_form_softmax_regression():
    model = nn.Sequential(softmax_regression())
    x, y = batch()
    g = ce_weight_grad(model[0], x, y)
    layers = {"0": model[0]}
    data = ScoringData(batch=(x, y))
    got_g = Gradient().scores(model, layers, data)["0"]
    got_t = Taylor().scores(model, layers, data)["0"]
    torch.testing.assert_close(got_g, g.abs(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_t, (model[0].weight.detach() * g).abs(), rtol=1e-5, atol=1e-7)


def test_several_batches_equal_one_big_batch():
    model = nn.Sequential(softmax_regression())
    x, y = batch(n=12)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    big = Taylor().scores(model, {"0": model[0]}, ScoringData(batch=(x, y)))["0"]
    two = Taylor().scores(model, {"0": model[0]}, ScoringData(loader=loader, max_batches=2))["0"]
    first = Taylor().scores(model, {"0": model[0]}, ScoringData(loader=loader, max_batches=1))["0"]
    torch.testing.assert_close(two, big, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(first, big)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


def test_snip_is_normalised_taylor_on_one_batch():
    model = mlp()
    x, y = batch(n=10, d=6, classes=4)
    layers = {"0": model[0], "2": model[2]}
    loader = [(x, y), (x.flip(0) * 2, y.flip(0))]
    snip = SNIP().scores(model, layers, ScoringData(batch=(x, y)))
    taylor = Taylor().scores(model, layers, ScoringData(batch=(x, y)))
    total = sum(float(t.sum()) for t in taylor.values())
    assert sum(float(s.sum()) for s in snip.values()) == pytest.approx(1.0)
    for n in layers:
        torch.testing.assert_close(snip[n], taylor[n] / total)
    # with two scoring batches SNIP is |w ⊙ g| of the mean loss over both (hand-computed here), normalised
    both = SNIP().scores(model, layers, ScoringData(loader=loader, max_batches=2))
    model.zero_grad()
    loss = sum(nn.functional.cross_entropy(model(bx), by) for bx, by in loader) / 2
    loss.backward()
    expected = {n: (m.weight * m.weight.grad).abs().detach() for n, m in layers.items()}
    norm = sum(float(e.sum()) for e in expected.values())
    for n in layers:
        torch.testing.assert_close(both[n], expected[n] / norm)
    a, b = mlp(), mlp()
    ra = bk.prune(a, compression=3, criterion="snip", batch=(x, y))
    rb = bk.prune(b, compression=3, criterion="taylor", batch=(x, y))
    assert all(torch.equal(ra.masks[k], rb.masks[k]) for k in ra.masks)


def test_grasp_matches_explicit_hessian_gradient_product():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = batch(n=6, d=3, classes=2, seed=5)
    names = ["0.weight", "2.weight"]
    shapes = [model.get_parameter(n).shape for n in names]
    sizes = [s.numel() for s in shapes]
    theta = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])

    def loss(flat):
        params = dict(zip(names, (p.reshape(s) for p, s in zip(flat.split(sizes), shapes))))
        return F.cross_entropy(functional_call(model, params, (x,)) / 200.0, y)

    H = torch.autograd.functional.hessian(loss, theta)
    leaf = theta.clone().requires_grad_(True)
    g = torch.autograd.grad(loss(leaf), leaf)[0]
    expected = (theta * (H @ g)).split(sizes)
    work = copy.deepcopy(model)
    got = GraSP().scores(work, {"0": work[0], "2": work[2]}, ScoringData(batch=(x, y)))
    for (n, e), s in zip(zip(["0", "2"], expected), shapes):
        torch.testing.assert_close(got[n], e.reshape(s), rtol=1e-4, atol=1e-12)
    assert got["0"].abs().max() > 0


def test_grasp_prunes_the_highest_published_scores():
    """Published rule: S = -theta*Hg, remove the largest S. Ours keeps the largest -S: same masks."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = batch(n=16, d=6, classes=3, seed=2)
    work = copy.deepcopy(model)
    imp = GraSP().scores(work, {"0": work[0], "2": work[2]}, ScoringData(batch=(x, y)))
    published = torch.cat([-imp["0"].reshape(-1), -imp["2"].reshape(-1)])
    k = round(0.75 * published.numel())
    removed = torch.zeros_like(published, dtype=torch.bool)
    removed[torch.topk(published, k).indices] = True
    report = bk.prune(model, compression=4, criterion="grasp", batch=(x, y), allow_layer_collapse=True)
    ours = torch.cat([~report.masks["0.weight"].reshape(-1), ~report.masks["2.weight"].reshape(-1)])
    assert torch.equal(ours, removed)


def linear_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))


def test_synflow_single_iteration_matches_hand_formula():
    model = linear_net()
    w1, w2 = model[0].weight.detach().double().abs(), model[1].weight.detach().double().abs()
    # R = 1^T |W2| |W1| 1  =>  dR/dW1[j,i] = sum_k |W2[k,j]|,  dR/dW2[k,j] = sum_i |W1[j,i]|
    exp1 = w1 * w2.sum(0)[:, None]
    exp2 = w2 * w1.sum(1)[None, :]
    work = copy.deepcopy(model)
    got = SynFlow().scores(work, {"0": work[0], "1": work[1]}, ScoringData(input_shape=(4,)))
    torch.testing.assert_close(got["0"], exp1)
    torch.testing.assert_close(got["1"], exp2)
    # and the engine prunes by exactly that ranking with one iteration
    report = bk.prune(model, compression=2, criterion="synflow", iterations=1, input_shape=(4,))
    flat = torch.cat([exp1.reshape(-1), exp2.reshape(-1)])
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, round(0.5 * flat.numel()), largest=False).indices] = False
    assert torch.equal(torch.cat([report.masks["0.weight"].reshape(-1), report.masks["1.weight"].reshape(-1)]), keep)


def test_synflow_uses_abs_state_double_eval_and_ones_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(-1, 1)
    model.train()
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    for p in ref.parameters():
        p.requires_grad_(True)
    ref(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    work = copy.deepcopy(model)
    got = SynFlow().scores(work, {"0": work[0], "2": work[2]}, ScoringData(input_shape=(3,)))
    torch.testing.assert_close(got["0"], (ref[0].weight * ref[0].weight.grad).detach().abs())
    torch.testing.assert_close(got["2"], (ref[2].weight * ref[2].weight.grad).detach().abs())


def test_activation_matches_hand_computed_mean_abs_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x, y = batch(n=7, d=4, classes=2)
    hidden = torch.relu(x @ model[0].weight.detach().T + model[0].bias.detach())
    got = Activation().scores(model, {"0": model[0], "2": model[2]}, ScoringData(batch=(x, y)))
    torch.testing.assert_close(got["0"], model[0].weight.detach().abs() * x.abs().mean(0))
    torch.testing.assert_close(got["2"], model[2].weight.detach().abs() * hidden.abs().mean(0))


def test_activation_conv_averages_batch_and_space_and_handles_groups():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, groups=2)
    x = torch.randn(5, 4, 6, 6)
    got = Activation().scores(nn.Sequential(conv), {"0": conv}, ScoringData(batch=(x, torch.zeros(5))))["0"]
    a = x.abs().mean(dim=(0, 2, 3))  # per input channel
    expected = torch.empty_like(conv.weight)
    for o in range(6):
        grp = o // 3  # 3 outputs per group, 2 inputs per group
        for i in range(2):
            expected[o, i] = conv.weight[o, i].detach().abs() * a[grp * 2 + i]
    torch.testing.assert_close(got, expected)


def test_random_is_uniform_and_seeded():
    layer = nn.Linear(50, 40)
    a = Random(seed=1).scores(None, {"l": layer}, None)["l"]
    b = Random(seed=1).scores(None, {"l": layer}, None)["l"]
    c = Random(seed=2).scores(None, {"l": layer}, None)["l"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= float(a.min()) and float(a.max()) < 1 and abs(float(a.mean()) - 0.5) < 0.03
    torch.manual_seed(5)
    d = Random().scores(None, {"l": layer}, None)["l"]
    torch.manual_seed(5)
    e = Random().scores(None, {"l": layer}, None)["l"]
    assert torch.equal(d, e)


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 5),
    )
    return net


@pytest.mark.parametrize("name", [n for n in CRITERIA.names() if not CRITERIA.get(n).calibrated])
@pytest.mark.parametrize("train", [True, False])
def test_scoring_leaves_mode_and_state_untouched(name, train):
    model = bn_net().train(train)
    bk.prune(model, compression=2)  # start from an already-pruned model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 5, (8,))
    plan = plan_pruning(model, compression=2, criterion=name, batch=(x, y), iterations=2)
    masks, _ = compute_masks(model, plan)
    assert masks and model.training is train
    assert all(m.training is train for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_scoring_copy_folds_masks_and_is_independent():
    model = bn_net()
    bk.prune(model, compression=4)
    model(torch.randn(2, 3, 4, 4)).sum().backward()  # masked attributes now carry autograd history
    work = scoring_copy(model, {})
    assert isinstance(work[0].weight, nn.Parameter) and not hasattr(work[0], "weight_mask")
    torch.testing.assert_close(work[0].weight, model[0].weight.detach())
    with torch.no_grad():
        work[0].weight.add_(1)
    assert not torch.equal(work[0].weight, model[0].weight)


def test_user_criterion_registers_without_touching_core():
    @CRITERIA.register("test_neg_magnitude")
    class NegMagnitude(Criterion):
        runs_model = False

        def scores(self, model, layers, data):
            return {n: -m.weight.detach().abs() for n, m in layers.items()}

    try:
        model = mlp()
        w = model[0].weight.detach().abs().clone()
        report = bk.prune(model, compression=2, criterion="test_neg_magnitude", scope="layer")
        kept = w[report.masks["0.weight"]]
        pruned = w[~report.masks["0.weight"]]
        assert float(kept.max()) <= float(pruned.min())  # it kept the smallest: the custom score was used
    finally:
        CRITERIA._items.pop("test_neg_magnitude")


@pytest.mark.parametrize("name", [n for n in CRITERIA.names() if CRITERIA.get(n).calibrated])
@pytest.mark.parametrize("train", [True, False])
def test_calibrated_pruning_leaves_mode_and_buffers_untouched(name, train):
    """Wanda/SparseGPT run calibration batches through the model: BatchNorm statistics and the train/eval
    mode must be as they were; only the pruned weights change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4))
    model.train(train)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    bk.prune(model, sparsity=0.5, criterion=name, allocation="uniform", batch=(x, y))
    assert all(m.training is train for m in model.modules())
    for k, v in model.named_buffers():
        if k in buffers:
            assert torch.equal(v, buffers[k]), k
    assert float(model[0].weight_mask.mean()) == pytest.approx(0.5, abs=1 / 64)  # SparseGPT: sorted[k] <= thresh
