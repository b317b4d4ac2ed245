"""bk.prune end to end: equality with torch.nn.utils.prune, exact compression, scopes, exclusions,
overrides, compounding rounds, errors before work, determinism, persistence and training."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

import benchkit as bk
from benchkit.pruning import engine
from benchkit.pruning.granularity import get_granularity
from benchkit.pruning.masks import get_masks, load_pruned_state_dict
from benchkit.pruning.selection import Groups, keep_above_streaming, prune_lowest

torch.set_num_threads(1)


def gaussian_weights(model: nn.Module) -> nn.Module:
    """Tie-free weights: distinct magnitudes (a random permutation of 1..N, scaled) with random signs,
    so global and per-layer rankings are unambiguous."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    total = sum(m.weight.numel() for m in layers)
    magnitudes = (torch.randperm(total).double() + 1) / total * 0.3
    signs = torch.randint(0, 2, (total,)) * 2 - 1
    with torch.no_grad():
        for m, chunk, sign in zip(layers, magnitudes.split([m.weight.numel() for m in layers]),
                                  signs.split([m.weight.numel() for m in layers])):
            m.weight.copy_((chunk * sign).reshape(m.weight.shape))
    return model


def lenet_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return gaussian_weights(nn.Sequential(
        nn.Flatten(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 10)
    ))


def small_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return gaussian_weights(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ))


MODELS = {"mlp": (lenet_mlp, ["1", "3", "5"], (4, 1, 8, 8)), "conv": (small_convnet, ["0", "3", "8"], (4, 3, 6, 6))}


def assert_tie_free(model, names):
    w = torch.cat([model.get_submodule(n).weight.detach().abs().reshape(-1) for n in names])
    assert w.unique().numel() == w.numel()


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("compression", [2, 3.7, 8, 30])
@pytest.mark.parametrize("streaming", [True, False])
def test_global_magnitude_equals_torch_global_unstructured(arch, compression, streaming, monkeypatch):
    monkeypatch.setattr(engine, "STREAMING_MIN_ELEMENTS", 0 if streaming else 10**12)
    build, names, _ = MODELS[arch]
    ours, ref = build(), build()
    assert_tie_free(ours, names)
    report = bk.prune(ours, compression=compression, scope="global")
    params = [(ref.get_submodule(n), "weight") for n in names]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=1 - 1 / compression)
    for n in names:
        assert torch.equal(report.masks[f"{n}.weight"], ref.get_submodule(n).weight_mask.bool())
        assert torch.equal(ours.get_submodule(n).weight, ref.get_submodule(n).weight)
    total = sum(ref.get_submodule(n).weight.numel() for n in names)
    assert report.achieved_compression == pytest.approx(total / (total - round((1 - 1 / compression) * total)))


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("streaming", [True, False])
def test_layer_magnitude_equals_torch_l1_unstructured(arch, sparsity, streaming, monkeypatch):
    monkeypatch.setattr(engine, "STREAMING_MIN_ELEMENTS", 0 if streaming else 10**12)
    build, names, _ = MODELS[arch]
    ours, ref = build(1), build(1)
    report = bk.prune(ours, sparsity=sparsity, scope="layer")
    for n in names:
        tprune.l1_unstructured(ref.get_submodule(n), "weight", amount=sparsity)
        assert torch.equal(report.masks[f"{n}.weight"], ref.get_submodule(n).weight_mask.bool())


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_two_rounds_match_torch_two_rounds(scope):
    ours, ref = small_convnet(2), small_convnet(2)
    names = ["0", "3", "8"]
    for _ in range(2):
        bk.prune(ours, compression=2, scope=scope)
        if scope == "global":
            tprune.global_unstructured([(ref.get_submodule(n), "weight") for n in names], tprune.L1Unstructured, amount=0.5)
        else:
            for n in names:
                tprune.l1_unstructured(ref.get_submodule(n), "weight", amount=0.5)
    for n in names:
        assert torch.equal(ours.get_submodule(n).weight_mask.bool(), ref.get_submodule(n).weight_mask.bool())


GRANULARITIES = ["element", "vector", "kernel", "channel"]


def group_size(granularity: str, shape) -> int:
    gran = get_granularity(granularity)
    return gran.group(torch.zeros(shape)).shape[1]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("compression", [2, 5])
def test_achieved_compression_within_one_group_per_layer(granularity, scope, compression):
    model = small_convnet(3)
    names = ["0", "3", "8"]
    report = bk.prune(model, compression=compression, granularity=granularity, scope=scope, keep_outputs=False,
                      normalize="none")
    s = 1 - 1 / compression
    rows = {r["name"]: r for r in report.layers}
    sizes = {n: group_size(granularity, rows[n]["shape"]) for n in names}
    if scope == "layer":
        for n in names:
            pruned = rows[n]["kept_before"] - rows[n]["kept_after"]
            assert abs(pruned - s * rows[n]["kept_before"]) <= sizes[n], n
    else:
        before = sum(rows[n]["kept_before"] for n in names)
        pruned = before - sum(rows[n]["kept_after"] for n in names)
        assert abs(pruned - s * before) <= max(sizes.values())
    assert report.achieved_compression == pytest.approx(compression, rel=0.1)


@pytest.mark.parametrize("granularity", GRANULARITIES + ["2:4"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_rounds_compound(granularity, scope):
    model = small_convnet(4)
    names = ["0", "3", "8"] if granularity != "2:4" else ["3", "8"]
    exclude = ["0"] if granularity == "2:4" else []
    compression = None if granularity == "2:4" else 2
    kw = dict(granularity=granularity, scope=scope, exclude=exclude, keep_outputs=False)
    r1 = bk.prune(model, compression=compression, **kw)
    r2 = bk.prune(model, compression=compression, **kw)
    rows = {r["name"]: r for r in r2.layers}
    total = sum(rows[n]["total"] for n in names)
    kept = sum(rows[n]["kept_after"] for n in names)
    tol = sum(group_size("element" if granularity == "2:4" else granularity, rows[n]["shape"]) for n in names)
    if granularity == "2:4":  # N:M is a fixed pattern: a second round keeps the same 2 of every 4
        assert kept == total // 2 and r2.achieved_compression == 1
    else:
        assert abs(kept - total / 4) <= tol
        assert r1.achieved_compression == pytest.approx(2, rel=0.1)
        assert r2.overall_compression == pytest.approx(4, rel=0.15)
    assert all(torch.equal(r2.masks[k] & r1.masks[k], r2.masks[k]) for k in r1.masks)  # survivors only


def test_exclusions_and_overrides_are_honoured():
    model = lenet_mlp(5)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in ["1", "3", "5"]}
    report = bk.prune(model, compression=4, exclude=["5"], overrides={"1": 2.0})
    rows = {r["name"]: r for r in report.layers}
    assert rows["5"]["role"] == "excluded" and "5.weight" not in report.masks
    assert torch.equal(model[5].weight, before["5"]) and not hasattr(model[5], "weight_mask")
    assert rows["1"]["role"] == "override" and rows["1"]["kept_after"] == 64 * 40 - round(0.5 * 64 * 40)
    ref = lenet_mlp(5)
    tprune.l1_unstructured(ref[1], "weight", amount=0.5)
    assert torch.equal(report.masks["1.weight"], ref[1].weight_mask.bool())
    assert rows["3"]["kept_after"] == 40 * 24 - round(0.75 * 40 * 24)
    assert report.achieved_compression == pytest.approx(4, rel=1e-3)


def test_glob_patterns_resolve():
    model = lenet_mlp()
    report = bk.prune(model, compression=2, exclude=["[13]"], scope="layer")
    assert set(report.masks) == {"5.weight"}


def test_a_container_name_selects_the_layers_inside_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 3))
    report = bk.prune(model, compression=2, scope="layer", exclude=["0"])
    assert set(report.masks) == {"1.weight"}
    report = bk.prune(model, compression=2, scope="layer", overrides={"0": 4.0}, exclude=["1"])
    assert {r["name"]: r["compression"] for r in report.layers} == pytest.approx({"0.0": 4.0, "0.2": 4.0, "1": 2.0})
    with pytest.raises(ValueError, match="'0.1' matches no prunable layer"):  # the ReLU holds no layer
        bk.prune(model, compression=2, exclude=["0.1"])


def test_global_scope_never_collapses_a_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    with torch.no_grad():
        model[1].weight.mul_(1e-3)  # global magnitude would take the whole small layer first
    report = bk.prune(model, sparsity=0.9)
    assert int(report.masks["1.weight"].sum()) == 1
    assert sum(int(m.sum()) for m in report.masks.values()) == 120 - round(0.9 * 120)
    assert int(report.masks["0.weight"].sum()) == 11


def test_allow_layer_collapse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    with torch.no_grad():
        model[1].weight.mul_(1e-3)
    report = bk.prune(model, sparsity=0.9, allow_layer_collapse=True)
    assert int(report.masks["1.weight"].sum()) == 0


# ---------------------------------------------------------------------------------------------- errors
def err_model():
    return lenet_mlp()


X, Y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))

ERRORS = [
    (dict(compression=2, criterion="foo"), "unknown criterion 'foo'; allowed: activation, gradient, grasp, magnitude"),
    (dict(compression=2, granularity="blocks"), "unknown granularity 'blocks'; allowed: channel, element, head, kernel"),
    (dict(compression=2, scope="local"), "unknown allocation 'local'; allowed: er, erk, global, lamp, owl, uniform"),
    (dict(compression=2, allocation="lamp", scope="layer"), "give allocation= or its old name scope=, not both"),
    (dict(compression=2, normalize="median"), "unknown normalize 'median'; allowed: auto, none, mean, max, l2, lamp"),
    (dict(compression=0.5), "compression must be a finite ratio >= 1"),
    (dict(compression=float("inf")), "compression must be a finite ratio >= 1"),
    (dict(compression="8"), "compression must be a number"),
    (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
    (dict(compression=2, sparsity=0.5), "give compression or sparsity, not both"),
    (dict(), "give compression="),
    (dict(granularity="3:5"), r"M=5 does not divide the input dimension of layer '1' \(in=64"),
    (dict(granularity="4:4"), "N < M"),
    (dict(granularity="6:4"), "N < M"),
    (dict(granularity="2:4", compression=8), r"fixes each layer's compression at M/N = 2"),
    (dict(granularity="2:4", sparsity=0.75), r"fixes each layer's compression at M/N = 2"),
    (dict(granularity="2:4", overrides={"1": 4}), "override for '1' asks 4"),
    (dict(compression=2, criterion="taylor"), "criterion 'taylor' needs data: pass batch=\\(x, y\\) or loader="),
    (dict(compression=2, criterion="snip", input_shape=(1, 8, 8)), "criterion 'snip' needs data"),
    (dict(compression=2, criterion="synflow"), "needs the input shape: pass input_shape="),
    (dict(compression=2, exclude=["conv*"]), "exclusion 'conv\\*' matches no prunable layer; prunable layers are: 1, 3, 5"),
    (dict(compression=2, overrides={"fc9": 2}), "override 'fc9' matches no prunable layer"),
    (dict(compression=2, overrides={"1": 0.5}), "override '1' must be a finite ratio >= 1"),
    (dict(compression=2, overrides={"1": 2}, exclude=["1"]), "both excluded and overridden"),
    (dict(compression=2, exclude=["*"]), "every prunable layer is excluded"),
    (dict(compression=1e6), "without pruning a layer to nothing"),
    (dict(compression=30, granularity="channel", scope="layer", keep_outputs=False), "surviving channels of 5"),
    (dict(compression=2, granularity="channel", overrides={"5": 2}), "'5' is the output layer.*keep_outputs=False"),
    (dict(compression=2, batch=(X,)), r"batch must be a pair of tensors \(x, y\)"),
    (dict(compression=2, batch=(X, Y), loader=[(X, Y)]), "not both"),
    (dict(compression=2, iterations=0), "iterations must be an integer >= 1"),
    (dict(compression=2, reduce="max"), "unknown reduce 'max'; allowed: l1, l2, mean"),
    (dict(compression=2, score_batches=0), "score_batches must be an integer >= 1"),
    (dict(compression=2, criterion="taylor", batch=(X, Y[:3])), "one label per example"),
    (dict(compression=2, criterion="taylor", loader=[]), "loader has no batches"),
    (dict(compression=2, criterion="taylor", loader=5), "loader must be an iterable"),
    (dict(compression=2, criterion="grasp", granularity="channel", batch=(X, Y)), "signed scores.*reduce='mean'"),
]


@pytest.mark.parametrize("kwargs,message", ERRORS, ids=[m[:40] for _, m in ERRORS])
def test_bad_input_is_refused_before_any_work(kwargs, message, monkeypatch):
    model = err_model()
    state = copy.deepcopy(model.state_dict())
    monkeypatch.setattr(engine, "compute_masks", lambda *a, **k: pytest.fail("work started before validation"))
    with pytest.raises(ValueError, match=message):
        bk.prune(model, **kwargs)
    assert get_masks(model) == {}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_collapse_error_suggests_the_fix_and_allow_lifts_it():
    model = err_model()
    with pytest.raises(ValueError, match="allow_layer_collapse=True"):
        bk.prune(model, compression=30, granularity="channel", scope="layer", keep_outputs=False)
    report = bk.prune(model, compression=30, granularity="channel", scope="layer", allow_layer_collapse=True,
                      keep_outputs=False)
    assert int(report.masks["5.weight"].sum()) == 0


# ---------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("criterion", ["random", "synflow", "magnitude", "taylor"])
def test_same_seed_same_masks(criterion):
    kw = dict(compression=4, criterion=criterion, batch=(X, Y), iterations=5 if criterion == "synflow" else None)
    a = bk.prune(lenet_mlp(), seed=7, **kw).masks
    b = bk.prune(lenet_mlp(), seed=7, **kw).masks
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if criterion == "random":
        c = bk.prune(lenet_mlp(), seed=8, **kw).masks
        assert not all(torch.equal(a[k], c[k]) for k in a)
        torch.manual_seed(3)
        d = bk.prune(lenet_mlp(), **kw).masks
        torch.manual_seed(3)
        e = bk.prune(lenet_mlp(), **kw).masks
        assert all(torch.equal(d[k], e[k]) for k in d)


def test_synflow_iterations_follow_exponential_schedule(monkeypatch):
    fractions = []
    real = engine._select_elements

    def spy(names, values, alive, fraction, allow, absolute=False):
        fractions.append(fraction)
        return real(names, values, alive, fraction, allow, absolute)

    monkeypatch.setattr(engine, "_select_elements", spy)
    model = lenet_mlp()
    report = bk.prune(model, compression=8, criterion="synflow", iterations=3, input_shape=(1, 8, 8))
    assert len(fractions) == 3
    assert fractions == pytest.approx([0.5, 0.5, 0.5], abs=2e-3)  # 8^(1/3) = 2x of the survivors each round
    assert report.achieved_compression == pytest.approx(8, rel=1e-3)
    assert report.iterations == 3


@pytest.mark.parametrize("criterion", ["gradient", "activation", "grasp", "snip", "random", "synflow"])
@pytest.mark.parametrize("granularity", ["element", "kernel", "channel", "2:4"])
def test_every_criterion_with_every_granularity(criterion, granularity):
    model = small_convnet(6)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))
    kw = dict(compression=None if granularity == "2:4" else 3, exclude=["0"] if granularity == "2:4" else [])
    if criterion == "grasp" and granularity in ("kernel", "channel"):
        kw["reduce"] = "mean"  # signed scores: a norm would discard the sign (refused, see ERRORS)
    report = bk.prune(model, criterion=criterion, granularity=granularity, batch=(x, y), iterations=2, **kw)
    assert math.isfinite(report.achieved_compression)
    assert report.achieved_compression == pytest.approx(2 if granularity == "2:4" else 3, rel=0.15)
    model(x)  # still runs


# ---------------------------------------------------------------------------------------------- persistence, training
@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_pruned_model_survives_state_dict_round_trip(granularity):
    model = small_convnet(7)
    bk.prune(model, compression=4, granularity=granularity, scope="layer")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = small_convnet(99)
    load_pruned_state_dict(fresh, torch.load(buf))
    a, b = get_masks(model), get_masks(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 6, 6)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_masked_weights_stay_zero_through_sgd_with_momentum_and_weight_decay(granularity):
    model = small_convnet(8)
    report = bk.prune(model, compression=4, granularity=granularity)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(5):
        x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 10, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for path, mask in report.masks.items():
        mod_name, _, pname = path.rpartition(".")
        module = model.get_submodule(mod_name)
        assert bool((getattr(module, f"{pname}_orig")[~mask] == 0).all()), path
        model(torch.randn(1, 3, 6, 6))
        assert bool((getattr(module, pname)[~mask] == 0).all()), path
        assert bool((getattr(module, f"{pname}_orig")[mask] != 0).any()), path


# ---------------------------------------------------------------------------------------------- fast path == reference
def reference_keep(values, alive, k, allow=True):
    groups = [Groups(str(i), v.reshape(-1), a.reshape(-1), a.reshape(-1).long()) for i, (v, a) in enumerate(zip(values, alive))]
    n = sum(int(a.sum()) for a in alive)
    fraction = k / n
    assert round(fraction * n) == k
    keep = prune_lowest(groups, fraction, allow)
    return [keep[str(i)].reshape(v.shape) for i, v in enumerate(values)]


@pytest.mark.parametrize("seed", range(6))
def test_streaming_threshold_equals_reference_sort_with_ties_and_masks(seed):
    g = torch.Generator().manual_seed(seed)
    values = [torch.randint(0, 50, s, generator=g).float() for s in [(30, 20), (7,), (5, 4, 3, 3), (200,)]]
    alive = [torch.rand(v.shape, generator=g) > 0.3 for v in values]
    n = sum(int(a.sum()) for a in alive)
    for k in [0, 1, n // 3, n // 2, n - 1, n]:
        for sample_size in [16, 1 << 20]:  # tiny samples force bracket misses and retries
            fast = keep_above_streaming(values, alive, k, chunk=97, sample_size=sample_size)
            ref = reference_keep(values, alive, k)
            assert all(torch.equal(f, r) for f, r in zip(fast, ref)), (k, sample_size)
            assert sum(int(f.sum()) for f in fast) == n - k


@pytest.mark.parametrize("criterion", ["magnitude", "random", "taylor"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_engine_fast_path_equals_generic_path(criterion, scope, monkeypatch):
    def build():
        model = small_convnet(9)
        with torch.no_grad():  # coarse values: many ties
            for n in ["0", "3", "8"]:
                w = model.get_submodule(n).weight
                w.copy_((w * 20).round() / 20)
        bk.prune(model, compression=1.5, criterion="random", seed=0)  # already-pruned start
        return model

    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))
    results = []
    for threshold in (0, 10**12):  # streaming everywhere / reference sort everywhere
        monkeypatch.setattr(engine, "STREAMING_MIN_ELEMENTS", threshold)
        results.append(bk.prune(build(), compression=3, criterion=criterion, scope=scope, seed=1, batch=(x, y)).masks)
    fast, ref = results
    assert fast.keys() == ref.keys() and all(torch.equal(fast[k], ref[k]) for k in fast)


def test_fast_path_falls_back_when_a_layer_would_collapse(monkeypatch):
    monkeypatch.setattr(engine, "STREAMING_MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    with torch.no_grad():
        model[1].weight.mul_(1e-3)
    report = bk.prune(model, sparsity=0.9)
    assert int(report.masks["1.weight"].sum()) == 1


def test_apply_masks_leaves_the_same_state_as_torch_custom_from_mask():
    """masks.apply_masks registers fresh masks without torch's temporaries; the result must be the
    module state prune.custom_from_mask leaves (and torch's own tools must keep working on it)."""
    from benchkit.pruning.masks import apply_masks

    ours, ref = small_convnet(10), small_convnet(10)
    mask = torch.rand(ours[3].weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    apply_masks(ours, {"3.weight": mask})
    tprune.custom_from_mask(ref[3], "weight", mask)
    with torch.no_grad():
        ref[3].weight_orig.mul_(ref[3].weight_mask)
    a, b = ours[3].state_dict(), ref[3].state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert [type(h) for h in ours[3]._forward_pre_hooks.values()] == [tprune.CustomFromMask]
    assert torch.equal(ours[3].weight, ref[3].weight)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(ours(x), ref(x))
    tprune.l1_unstructured(ours[3], "weight", amount=0.5)  # torch combines it into a PruningContainer
    tprune.l1_unstructured(ref[3], "weight", amount=0.5)
    assert torch.equal(ours[3].weight_mask, ref[3].weight_mask)
    tprune.remove(ours[3], "weight")
    assert isinstance(ours[3].weight, nn.Parameter) and torch.equal(ours[3].weight, ref[3].weight)


def test_make_permanent_and_release_with_reinit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    bk.prune(model, compression=2, scope="layer")
    masks = get_masks(model)
    permanent = bk.make_permanent(copy.deepcopy(model))
    assert get_masks(permanent) == {} and not list(permanent.buffers())
    for path, mask in masks.items():
        w = permanent.get_submodule(path.rpartition(".")[0]).weight
        assert isinstance(w, nn.Parameter) and torch.count_nonzero(w[~mask]) == 0
        assert torch.equal(w[mask], model.get_submodule(path.rpartition(".")[0]).weight_orig[mask])

    kept = {p: model.get_submodule(p.rpartition(".")[0]).weight_orig.detach().clone() for p in masks}
    bk.release(model, reinit=lambda path, like: torch.full_like(like, 7.0))
    assert get_masks(model) == {}
    for path, mask in masks.items():
        w = model.get_submodule(path.rpartition(".")[0]).weight
        assert isinstance(w, nn.Parameter) and w.requires_grad
        assert torch.equal(w[mask], kept[path][mask])  # survivors untouched
        assert (w[~mask] == 7.0).all()  # pruned entries take the fresh values
