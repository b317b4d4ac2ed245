"""Granularities: N:M invariant, whole groups, channel masks carrying bias and BatchNorm."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

import benchkit as bk
from benchkit.pruning.granularity import NM, GranularityError, get_granularity
from benchkit.pruning.graph import following_batchnorm

torch.set_num_threads(1)


def check_nm(weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> None:
    """Every M consecutive weights along `in`, at each kernel position: <= N kept, and they are the top N."""
    out, inp = weight.shape[:2]
    w4 = mask.reshape(out, inp, -1)
    s4 = scores.reshape(out, inp, -1)
    for o in range(out):
        for k in range(w4.shape[2]):
            for start in range(0, inp, m):
                kept = w4[o, start : start + m, k]
                sc = s4[o, start : start + m, k]
                assert int(kept.sum()) == n
                assert float(sc[kept].min()) >= float(sc[~kept].max())


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_nm_keep_within_on_random_tensors(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    for shape in [(6, 16), (4, 8, 3, 3), (3, 8, 5)]:
        scores = torch.rand(shape, generator=g)
        alive = torch.ones(shape, dtype=torch.bool)
        mask = NM(n, m).keep_within(scores, alive)
        check_nm(scores, scores, mask, n, m)


def test_nm_prunes_among_survivors():
    gran = NM(2, 4)
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]])
    alive = torch.tensor([[False, True, True, True, True, True, True, True]])
    mask = gran.keep_within(scores, alive)
    assert mask.tolist() == [[False, True, True, False, False, False, True, True]]
    one = torch.tensor([[True, False, False, False]])
    assert gran.keep_within(torch.ones(1, 4), one).tolist() == one.tolist()  # fewer than N: all stay


def test_nm_ties_prune_the_earlier_weight():
    mask = NM(2, 4).keep_within(torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool))
    assert mask.tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("spec", ["2:4", "1:4", "3:8"])
def test_nm_on_real_linear_and_conv_layers(spec):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 2 * 2, 8))
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in ["0", "3"]}
    report = bk.prune(model, granularity=spec, keep_outputs=False)
    n, m = map(int, spec.split(":"))
    assert report.requested_compression == pytest.approx(m / n)
    assert report.achieved_compression == pytest.approx(m / n)
    for name, w in weights.items():
        check_nm(w, w.abs(), report.masks[f"{name}.weight"], n, m)
        assert torch.count_nonzero(model.get_submodule(name).weight) == w.numel() * n // m


@pytest.mark.parametrize("spec", ["2:4", "element", "vector", "kernel", "channel"])
def test_masked_weights_keep_the_dense_memory_layout(spec):
    # the N:M mask is built through a permuted view; had its layout leaked into weight = orig * mask,
    # the conv weight would turn channels-last and time differently for a reason that is not sparsity
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 2 * 2, 8))
    strides = {n: model.get_submodule(n).weight.stride() for n in ["0", "3"]}
    bk.prune(model, granularity=spec, compression=2, keep_outputs=False)
    bk.prune(model, granularity=spec, compression=2, keep_outputs=False)  # the second round intersects the held mask
    for name, stride in strides.items():
        module = model.get_submodule(name)
        assert module.weight_orig.stride() == module.weight_mask.stride() == module.weight.stride() == stride
        assert module.weight.is_contiguous()


def test_nm_groups_run_along_input_at_each_kernel_position():
    gran = NM(2, 4)
    w = torch.arange(2 * 8 * 3 * 3, dtype=torch.float32).reshape(2, 8, 3, 3)
    groups = gran.group(w)
    assert groups.shape == (2 * 9 * 2, 4)
    # first group: w[0, 0:4, 0, 0]
    assert groups[0].tolist() == w[0, 0:4, 0, 0].tolist()
    assert groups[1].tolist() == w[0, 4:8, 0, 0].tolist()
    assert groups[2].tolist() == w[0, 0:4, 0, 1].tolist()
    assert torch.equal(gran.ungroup(groups, w.shape), w)


def test_granularity_parsing_and_errors():
    assert get_granularity("2:4").name == "2:4"
    assert get_granularity(" 1 : 8 ").compression == 8
    with pytest.raises(GranularityError, match="N < M"):
        get_granularity("4:4")
    with pytest.raises(GranularityError, match="N < M"):
        get_granularity("5:4")
    with pytest.raises(GranularityError, match="1 <= N < M"):
        get_granularity("0:4")
    with pytest.raises(KeyError, match="allowed: channel, element, head, kernel, n:m, neuron, vector.*2:4"):
        get_granularity("block")
    with pytest.raises(GranularityError, match=r"layer 'fc'.*in=10"):
        NM(2, 4).check_layer("fc", torch.Size([3, 10]))


def conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10),
    )


@pytest.mark.parametrize(
    "granularity,view",
    [
        ("vector", lambda t: t.reshape(-1, t.shape[-1]) if t.dim() == 4 else t.reshape(-1, 1)),
        ("kernel", lambda t: t.reshape(t.shape[0] * t.shape[1], -1)),
        ("channel", lambda t: t.reshape(t.shape[0], -1)),
    ],
)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_structured_masks_are_whole_groups(granularity, view, scope):
    model = conv_model()
    report = bk.prune(model, compression=3, granularity=granularity, scope=scope, keep_outputs=False, normalize="none")
    for name in ["0", "3", "8"]:
        groups = view(report.masks[f"{name}.weight"])
        assert bool((groups.all(1) | ~groups.any(1)).all()), f"{granularity} mask of {name} splits a group"
        assert bool((~groups.any(1)).any()) or name == "8" and granularity != "channel"


def test_vector_is_a_kernel_row():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[[[1.0, 1, 1], [5, 5, 5], [3, 3, 3]]]]))
    report = bk.prune(model, compression=3, granularity="vector", allow_layer_collapse=True)
    assert report.masks["0.weight"][0, 0].tolist() == [[False] * 3, [True] * 3, [False] * 3]


def test_channel_mask_matches_torch_ln_structured():
    for compression in [2, 4]:
        model = conv_model(1)
        ref = conv_model(1)
        report = bk.prune(model, compression=compression, granularity="channel", scope="layer", reduce="l1",
                          keep_outputs=False)
        for name in ["0", "3", "8"]:
            tprune.ln_structured(ref.get_submodule(name), "weight", amount=1 - 1 / compression, n=1, dim=0)
            assert torch.equal(report.masks[f"{name}.weight"], ref.get_submodule(name).weight_mask.bool())


@pytest.mark.parametrize("reduce", ["l1", "l2", "mean"])
def test_group_reduction(reduce):
    layer = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 0, 0], [1, 1, 1], [2, 2, 0], [0.5, 0.5, 0.5]]))
    # l1: 3, 3, 4, 1.5 ; l2: 3, 1.73, 2.83, 0.87 ; mean: 1, 1, 1.33, 0.5
    expected_drop = {"l1": [0, 3], "l2": [1, 3], "mean": [0, 3]}[reduce]  # ties (l1, mean): earlier row goes
    report = bk.prune(nn.Sequential(layer), compression=2, granularity="channel", reduce=reduce, keep_outputs=False)
    dead = (~report.masks["0.weight"].any(1)).nonzero().reshape(-1).tolist()
    assert dead == expected_drop


def test_channel_masks_bias_and_following_batchnorm_output_exactly_zero():
    model = conv_model(2)
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    report = bk.prune(model, compression=2, granularity="channel", scope="layer", keep_outputs=False)
    assert {"0.bias", "1.weight", "1.bias", "3.bias", "4.weight", "4.bias", "8.bias"} <= set(report.masks)
    x = torch.randn(4, 3, 6, 6)
    outs = {}
    model[1].register_forward_hook(lambda m, i, o: outs.__setitem__("bn1", o))
    model[4].register_forward_hook(lambda m, i, o: outs.__setitem__("bn2", o))
    for train in (False, True):
        model.train(train)
        model(x)
        for key, conv in (("bn1", "0"), ("bn2", "3")):
            dead = ~report.masks[f"{conv}.weight"].reshape(report.masks[f"{conv}.weight"].shape[0], -1).any(1)
            assert int(dead.sum()) == report.masks[f"{conv}.weight"].shape[0] // 2
            assert torch.equal(report.masks[f"{'1' if conv == '0' else '4'}.weight"], ~dead)
            assert bool((outs[key][:, dead] == 0).all()), f"dead channels of {conv} not zero after BN (train={train})"
            assert bool((outs[key][:, ~dead] != 0).any())


def test_following_batchnorm_via_fx_on_resnet18():
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    found = following_batchnorm(model, names)
    assert found["conv1"] == "bn1"
    assert found["layer1.0.conv2"] == "layer1.0.bn2"
    assert found["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert "fc" not in found
    assert len(found) == 20


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x):
        return x + self.bn1(self.conv1(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.block = Block()
        self.fc = nn.Linear(4, 2)
        self.bn_other = nn.BatchNorm1d(2)  # defined after fc but never applied to its output

    def forward(self, x):
        h = self.block(self.features(x))
        if h.sum() > 0:  # data-dependent control flow: fx cannot trace the whole model
            h = h * 2
        return self.fc(h.mean((2, 3)))


def test_following_batchnorm_falls_back_to_submodules_with_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = following_batchnorm(Untraceable(), ["features.0", "block.conv1", "fc"])
    assert found == {"features.0": "features.1", "block.conv1": "block.bn1"}  # never fc -> bn_other
    assert any("could not trace" in str(w.message) for w in caught)
