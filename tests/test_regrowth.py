"""Masks that can regrow (issue 15.2): the mask layer replaces a mask instead of only intersecting it,
regrown weights start at zero (or a given value) with their optimiser state reset, the engine can rank every
weight again, and pruned weights stay exactly zero between updates."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

import benchkit as bk
from benchkit.pruning.masks import apply_masks, get_masks, reset_optimizer_state, set_masks


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_apply_intersects_but_set_replaces():
    model = net()
    first = torch.rand(16, 8) > 0.5
    second = torch.rand(16, 8) > 0.5
    apply_masks(model, {"0.weight": first})
    apply_masks(model, {"0.weight": second})
    assert torch.equal(get_masks(model)["0.weight"], first & second)
    regrown = set_masks(model, {"0.weight": second})
    assert torch.equal(get_masks(model)["0.weight"], second)
    assert torch.equal(regrown["0.weight"], second & ~(first & second))


def test_regrown_weights_start_at_zero_or_the_given_value_and_pruned_ones_are_zeroed():
    model = net()
    w = model[0].weight.detach().clone()
    old = torch.rand(16, 8) > 0.5
    new = torch.rand(16, 8) > 0.5
    apply_masks(model, {"0.weight": old})
    set_masks(model, {"0.weight": new})
    orig = model[0].weight_orig.detach()
    assert torch.equal(orig[new & ~old], torch.zeros(int((new & ~old).sum())))  # regrown at zero
    assert torch.equal(orig[new & old], w[new & old])  # survivors keep their values
    assert torch.equal(orig[~new], torch.zeros(int((~new).sum())))  # pruned: exactly zero
    set_masks(model, {"0.weight": torch.ones(16, 8, dtype=torch.bool)}, regrow_value=0.5)
    assert torch.equal(model[0].weight_orig.detach()[~new], torch.full((int((~new).sum()),), 0.5))
    x = torch.randn(3, 8)
    assert torch.equal(model[0](x), nn.functional.linear(x, model[0].weight_orig, model[0].bias))


def test_reset_optimizer_state_zeroes_the_regrown_entries_only():
    model = net()
    apply_masks(model, {"0.weight": torch.rand(16, 8) > 0.5})
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), torch.optim.Adam(model.parameters())):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(5, 8)).square().sum().backward()
            opt.step()
        param = model[0].weight_orig
        before = {k: v.clone() for k, v in opt.state[param].items() if torch.is_tensor(v) and v.shape == param.shape}
        grow = torch.zeros(16, 8, dtype=torch.bool)
        grow[:4] = True
        reset_optimizer_state(opt, model, {"0.weight": grow})
        for k, v in before.items():
            after = opt.state[param][k]
            assert torch.equal(after[grow], torch.zeros(int(grow.sum())))
            assert torch.equal(after[~grow], v[~grow])


def test_prune_with_regrow_ranks_every_weight_again():
    """A gradient criterion scores pruned weights too (dL/dw at w = 0), so regrow=True brings back the
    pruned connections with the largest gradient — what RigL's growth needs — and the result has exactly the
    requested density of all weights, replacing the old mask."""
    model = net()
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    bk.prune(model, compression=4, criterion="random", seed=0)
    old = get_masks(model)
    report = bk.prune(model, compression=4, criterion="gradient", batch=(x, y), regrow=True)
    new = get_masks(model)
    assert any(bool((new[k] & ~old[k]).any()) for k in old)  # some weights came back
    kept = sum(r["kept_after"] for r in report.layers)
    assert kept == round(sum(r["total"] for r in report.layers) / 4)
    # the reference: |dL/dw| at the masked weights (pruned entries 0) for every weight, one global cut
    ref = net()
    w0 = (ref[0].weight * old["0.weight"]).detach().requires_grad_()
    w2 = (ref[2].weight * old["2.weight"]).detach().requires_grad_()
    logits = nn.functional.linear(torch.relu(nn.functional.linear(x, w0, ref[0].bias)), w2, ref[2].bias)
    g0, g2 = torch.autograd.grad(nn.functional.cross_entropy(logits, y), [w0, w2])
    scores = torch.cat([g0.abs().reshape(-1), g2.abs().reshape(-1)])
    cut = torch.sort(scores, stable=True).indices[: scores.numel() - kept]
    expect = torch.ones_like(scores, dtype=torch.bool)
    expect[cut] = False
    got = torch.cat([new["0.weight"].reshape(-1), new["2.weight"].reshape(-1)])
    assert torch.equal(got, expect)


def test_pruned_weights_stay_exactly_zero_between_updates():
    model = net()
    bk.prune(model, compression=3)
    set_masks(model, {"0.weight": torch.rand(16, 8) > 0.3})
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    masks = get_masks(model)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(6, 8)).square().sum().backward()
        opt.step()
        for path, mask in masks.items():
            module = model.get_submodule(path.rpartition(".")[0])
            assert torch.equal(module.weight_orig.detach()[~mask], torch.zeros(int((~mask).sum())))


def test_masks_stay_torch_prune_masks():
    model = net()
    set_masks(model, {"0.weight": torch.rand(16, 8) > 0.5})
    assert tprune.is_pruned(model)
    tprune.remove(model[0], "weight")
    assert not hasattr(model[0], "weight_mask")


def test_set_masks_refuses_a_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        set_masks(net(), {"0.weight": torch.ones(3, 3, dtype=torch.bool)})
