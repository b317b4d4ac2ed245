"""Layer-wise sparsity allocation (``prune.allocation``) and the normalised global ranking of groups:
ER/ERK against the RigL authors' ``get_sparsities_erdos_renyi`` re-implemented here, LAMP against its
formula computed by hand, uniform+ against Gale et al.'s rule, and global channel pruning that spreads over
the layers of a resnet18 instead of starving them by fan-in."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import benchkit as bk
from benchkit.pruning.allocation import (
    ALLOCATIONS,
    LayerBudget,
    erdos_renyi_scale,
    lamp_scores,
)
from benchkit.pruning.layers import prunable_layers


def rigl_erdos_renyi(shapes: dict[str, tuple[int, ...]], default_sparsity: float, include_kernel: bool,
                     custom: dict[str, float] | None = None) -> dict[str, float]:
    """google-research/rigl, rigl/sparse_utils.py ``get_sparsities_erdos_renyi`` line by line (TF kernels
    are [kh, kw, in, out]; here the shapes are torch's [out, in, kh, kw], so ``n_in, n_out`` are read
    accordingly; ``sum``/``prod`` of the shape do not depend on the order)."""
    custom = custom or {}
    is_eps_valid = False
    dense_layers: set[str] = set()
    while not is_eps_valid:
        divisor = 0
        rhs = 0
        raw_probabilities = {}
        for name, shape in shapes.items():
            n_param = np.prod(shape)
            n_zeros = int(np.floor(default_sparsity * n_param))
            if name in dense_layers:
                rhs -= n_zeros
            elif name in custom:
                pass
            else:
                n_ones = n_param - n_zeros
                rhs += n_ones
                if include_kernel:
                    raw_probabilities[name] = np.sum(shape) / np.prod(shape)
                else:
                    n_out, n_in = shape[0], shape[1]
                    raw_probabilities[name] = (n_in + n_out) / (n_in * n_out)
                divisor += raw_probabilities[name] * n_param
        eps = rhs / divisor
        max_prob = np.max(list(raw_probabilities.values()))
        if max_prob * eps > 1:
            is_eps_valid = False
            for name, raw in raw_probabilities.items():
                if raw == max_prob:
                    dense_layers.add(name)
        else:
            is_eps_valid = True
    out = {}
    for name in shapes:
        if name in custom:
            out[name] = custom[name]
        elif name in dense_layers:
            out[name] = 0.0
        else:
            out[name] = 1.0 - eps * raw_probabilities[name]
    return out


def lenet5() -> nn.Module:
    return bk.build_model(bk.ExperimentConfig.from_dict({"model": {"name": "lenet5"}}).model, (1, 28, 28), 10)


def budgets(model: nn.Module) -> list[LayerBudget]:
    layers = prunable_layers(model)
    names = list(layers)
    return [LayerBudget(n, tuple(m.weight.shape), m.weight.numel(),
                        "first" if n == names[0] else "last" if n == names[-1] else "middle")
            for n, m in layers.items()]


@pytest.mark.parametrize("allocation", ["er", "erk"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.98])
def test_erdos_renyi_densities_equal_rigls_code(allocation, sparsity):
    model = lenet5()
    shapes = {n: tuple(m.weight.shape) for n, m in prunable_layers(model).items()}
    ref = rigl_erdos_renyi(shapes, sparsity, include_kernel=allocation == "erk")
    ours = ALLOCATIONS.get(allocation)().densities(budgets(model), 1 - sparsity)
    for name in shapes:  # rigl floors the zero counts: within one weight of the layer
        assert ours[name] == pytest.approx(1 - ref[name], abs=2 / math.prod(shapes[name])), name
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(ours[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx((1 - sparsity) * total)


def test_erk_makes_layers_dense_that_would_exceed_density_one_and_rescales_the_rest():
    """LeNet-5's first conv (20x1x5x5 = 500 weights) has ERK scale (20+1+5+5)/500 = 0.062, far above the fc
    layers': at 50% sparsity its share exceeds 1, so it is dense and the others share the rest."""
    model = lenet5()
    b = budgets(model)
    d = ALLOCATIONS.get("erk")().densities(b, 0.5)
    shapes = {x.name: x.shape for x in b}
    first = next(iter(shapes))
    assert d[first] == 1.0
    # by hand: the other layers' density is eps * scale with eps solving the budget without the dense layer
    total = sum(math.prod(s) for s in shapes.values())
    rest = 0.5 * total - math.prod(shapes[first])
    others = [n for n in shapes if n != first and d[n] < 1]
    dense = [n for n in shapes if d[n] == 1.0]
    rest = 0.5 * total - sum(math.prod(shapes[n]) for n in dense)
    eps = rest / sum(erdos_renyi_scale(shapes[n], True) * math.prod(shapes[n]) for n in others)
    for n in others:
        assert d[n] == pytest.approx(eps * erdos_renyi_scale(shapes[n], True))
        assert d[n] < 1


def test_erk_scale_is_the_papers_formula():
    assert erdos_renyi_scale((50, 20, 5, 5), True) == pytest.approx((20 + 50 + 5 + 5) / (20 * 50 * 5 * 5))
    assert erdos_renyi_scale((50, 20, 5, 5), False) == pytest.approx((20 + 50) / (20 * 50))
    assert erdos_renyi_scale((10, 500), True) == pytest.approx(510 / 5000)


def test_prune_with_erk_reaches_the_allocated_density_in_every_layer():
    torch.manual_seed(0)
    model = lenet5()
    expect = ALLOCATIONS.get("erk")().densities(budgets(model), 0.1)
    report = bk.prune(model, sparsity=0.9, criterion="magnitude", allocation="erk")
    assert report.allocation == "erk"
    for row in report.layers:
        assert abs(row["kept_after"] - expect[row["name"]] * row["total"]) <= 1, row["name"]
    kept, total = sum(r["kept_after"] for r in report.layers), sum(r["total"] for r in report.layers)
    assert abs(kept - 0.1 * total) <= len(report.layers)


def test_a_second_call_aims_at_the_densities_of_the_compounded_target():
    """Rounds compound: 2x then 2x is ERK at 4x overall, each layer at its ERK density for 25%."""
    torch.manual_seed(0)
    model = lenet5()
    bk.prune(model, compression=2, allocation="erk")
    report = bk.prune(model, compression=2, allocation="erk")
    expect = ALLOCATIONS.get("erk")().densities(budgets(lenet5()), 0.25)
    for row in report.layers:
        assert abs(row["kept_after"] - expect[row["name"]] * row["total"]) <= 1, row["name"]


def test_lamp_scores_by_hand():
    w = torch.tensor([3.0, -1.0, 2.0, 0.5])
    alive = torch.tensor([True, True, True, False])
    # alive |w|² ascending: 1, 4, 9 -> tails 14, 13, 9 -> scores 1/14, 4/13, 9/9
    expect = torch.tensor([1.0, 1 / 14, 4 / 13, float("-inf")], dtype=torch.float64)
    assert torch.allclose(lamp_scores(w, alive), expect)


def test_lamp_allocation_prunes_the_lowest_lamp_scores_globally():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    weights = {n: m.weight.detach().clone() for n, m in prunable_layers(model).items()}
    report = bk.prune(model, compression=3, allocation="lamp")
    # reference: LAMP per layer by its definition, then one global cut of round(2/3 * n) weights
    scores = []
    for name, w in weights.items():
        flat = w.reshape(-1).double().square()
        for i, v in enumerate(flat):
            scores.append((float(v / flat[flat >= v].sum()), name, i))
    scores.sort(key=lambda t: t[0])
    k = round((1 - 1 / 3) * sum(w.numel() for w in weights.values()))
    pruned = {(name, i) for _, name, i in scores[:k]}
    for name, w in weights.items():
        mask = report.masks[f"{name}.weight"].reshape(-1)
        assert [not mask[i] for i in range(w.numel())] == [(name, i) in pruned for i in range(w.numel())]


def test_uniform_plus_keeps_the_first_layer_dense_and_the_output_layer_at_most_80_percent_sparse():
    torch.manual_seed(0)
    model = lenet5()
    report = bk.prune(model, sparsity=0.95, allocation="uniform+")
    rows = {r["name"]: r for r in report.layers}
    names = list(rows)
    assert rows[names[0]]["kept_after"] == rows[names[0]]["total"]
    assert rows[names[-1]]["density"] == pytest.approx(0.2, abs=1 / rows[names[-1]]["total"])
    middle = [rows[n]["density"] for n in names[1:-1]]
    assert max(middle) - min(middle) < 2e-3  # one density for the others
    kept = sum(r["kept_after"] for r in rows.values())
    total = sum(r["total"] for r in rows.values())
    assert abs(kept - 0.05 * total) <= len(rows)


def test_uniform_plus_refuses_a_density_it_cannot_reach():
    model = nn.Sequential(nn.Linear(100, 10), nn.ReLU(), nn.Linear(10, 10))  # the first layer is 91% of it
    with pytest.raises(ValueError, match="uniform\\+.*cannot reach"):
        bk.prune(model, sparsity=0.95, allocation="uniform+")


def test_uniform_is_the_old_layer_scope():
    torch.manual_seed(0)
    a, b = lenet5(), lenet5()
    b.load_state_dict(a.state_dict())
    ra = bk.prune(a, compression=4, allocation="uniform")
    rb = bk.prune(b, compression=4, scope="layer")
    assert rb.allocation == "uniform" and rb.scope == "uniform"
    assert all(torch.equal(ra.masks[k], rb.masks[k]) for k in ra.masks)


def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def channels_alive(report, name: str) -> tuple[int, int]:
    row = next(r for r in report.layers if r["name"] == name)
    return row["units_alive"], row["units"]


def test_global_channel_pruning_spreads_over_resnet18_when_normalised():
    """Issue 17.3: un-normalised L1 channel sums grow with the fan-in, so at 1.5x global channel pruning the
    early layers lose all but one channel and layer4 keeps everything. With the default (mean-normalised)
    ranking every layer keeps a real share of its channels."""
    raw = bk.prune(resnet18(), compression=1.5, granularity="channel", normalize="none", exclude=["fc"])
    starved = [r["name"] for r in raw.layers if r["role"] == "pruned" and r["units_alive"] <= 1]
    assert "conv1" in starved and len(starved) >= 5  # the review's finding, reproduced
    fair = bk.prune(resnet18(), compression=1.5, granularity="channel", exclude=["fc"])
    assert fair.normalize == "mean"
    shares = [r["units_alive"] / r["units"] for r in fair.layers if r["role"] == "pruned"]
    assert min(shares) > 0.25 and max(shares) < 1.0
    assert fair.achieved_compression == pytest.approx(1.5, rel=0.02)


@pytest.mark.parametrize("normalize", ["max", "l2", "lamp"])
def test_every_normalisation_ranks_groups_by_their_normalised_scores(normalize):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    weights = {n: m.weight.detach().clone() for n, m in prunable_layers(model).items()}
    report = bk.prune(model, compression=2, granularity="channel", normalize=normalize)
    assert report.normalize == normalize
    # reference: L1 row norms, normalised within each pruned layer, one global cut by weight count
    rows = []
    for name in ("0", "2"):
        s = weights[name].abs().sum(1).double()
        if normalize == "max":
            s = s / s.max()
        elif normalize == "l2":
            s = s / s.norm()
        else:
            s = lamp_scores(s, torch.ones_like(s, dtype=torch.bool))
        rows += [(float(v), name, i, weights[name].shape[1]) for i, v in enumerate(s)]
    rows.sort(key=lambda t: t[0])  # stable: ties keep layer, then index order
    best = {n: max((r for r in rows if r[1] == n), key=lambda r: r[0]) for n in ("0", "2")}
    candidates = [r for r in rows if r is not best[r[1]]]  # each layer keeps its best group
    target = 0.5 * sum(weights[n].numel() for n in ("0", "2"))
    cum = np.cumsum([0] + [r[3] for r in candidates])
    k = int(np.argmin(np.abs(cum - target)))
    pruned = {(n, i) for _, n, i, _ in candidates[:k]}
    for name in ("0", "2"):
        alive = report.masks[f"{name}.weight"].any(1)
        assert [not bool(a) for a in alive] == [(name, i) in pruned for i in range(len(alive))], name
    assert bool(report.masks.get("4.weight", torch.ones(1, dtype=torch.bool)).all())  # outputs kept


def test_channel_pruning_keeps_the_output_layers_classes():
    torch.manual_seed(0)
    model = bk.build_model(bk.ExperimentConfig.from_dict({}).model, (1, 8, 8), 10)
    report = bk.prune(model, compression=4, granularity="channel", allocation="uniform")
    rows = {r["name"]: r for r in report.layers}
    assert rows["fc3"]["units_alive"] == 10 and rows["fc3"]["role"] == "kept output"
    assert any("fc3" in note for note in report.notes)
    out = bk.prune(bk.build_model(bk.ExperimentConfig.from_dict({}).model, (1, 8, 8), 10), compression=4,
                   granularity="channel", allocation="uniform", keep_outputs=False)
    assert {r["name"]: r for r in out.layers}["fc3"]["units_alive"] < 10


def test_collapsed_layers_are_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 5))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)  # tiny: global magnitude all but empties it
    report = bk.prune(model, compression=8)
    collapsed = report.collapsed(min_units=1, min_relative_density=0.05)
    assert [r["name"] for r in collapsed] == ["2"]
    assert report.collapsed(min_units=1, min_relative_density=0.0) == []  # it still has a live unit
    assert [r["name"] for r in report.collapsed(min_units=6, min_relative_density=0.0)] == ["2"]


def test_tied_weights_are_one_layer_with_one_mask():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight  # tied, like an embedding and its output projection
    model = nn.Sequential(a, nn.ReLU(), b, nn.ReLU(), nn.Linear(6, 3))
    assert list(prunable_layers(model)) == ["0", "4"]
    totals = bk.model_metrics(model, (6,))
    assert totals["params_total"] == 36 + 6 + 6 + 18 + 3  # the shared 6x6 counted once
    report = bk.prune(model, compression=2)
    assert torch.equal(model[0].weight_mask, model[2].weight_mask)
    assert model[0].weight_orig is model[2].weight_orig
    x = torch.randn(4, 6)
    assert torch.equal(model[2](x), x @ (model[0].weight_orig * model[0].weight_mask).T + model[2].bias)
    assert {r["name"] for r in report.layers} == {"0", "4"}
