"""Physical compaction: the compact model equals the masked one, and shrinks by the expected amount.

Channel masks are built here by hand (weight rows + bias + the following BatchNorm's gamma/beta),
independently of the pruning engine.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import benchkit as bk
from benchkit.deployment.compact import CompactionError, CompactResult
from benchkit.pruning.masks import apply_masks, get_masks

torch.set_num_threads(1)


def kill(model: nn.Module, layer: str, idxs: list[int], bn: str | None = None, bias: bool = True) -> None:
    """Mask whole output channels ``idxs`` of ``layer`` (weight rows, bias) and of its BatchNorm."""
    module = model.get_submodule(layer)
    rows = torch.ones_like(module.weight, dtype=torch.bool)
    rows[idxs] = False
    masks = {f"{layer}.weight": rows}
    vec = torch.ones(module.weight.shape[0], dtype=torch.bool)
    vec[idxs] = False
    if bias and module.bias is not None:
        masks[f"{layer}.bias"] = vec
    if bn is not None:
        masks[f"{bn}.weight"] = vec.clone()
        masks[f"{bn}.bias"] = vec.clone()
    apply_masks(model, masks)


@torch.no_grad()
def randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine terms, so a wrong channel shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.rand(n, generator=g) - 0.5)


@torch.no_grad()
def assert_same_outputs(masked: nn.Module, result: CompactResult, x: torch.Tensor) -> None:
    modes = masked.training, result.model.training
    masked.eval()
    result.model.eval()
    assert (masked(x) - result.model(x)).abs().max().item() <= 1e-5
    assert result.max_abs_diff <= 1e-5
    masked.train(modes[0])
    result.model.train(modes[1])


# ---------------------------------------------------------------------------------------------
# (a) plain conv net with BatchNorm


def plain_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    randomise_bn(net)
    return net


def test_plain_conv_bn_net():
    net = plain_net()
    kill(net, "0", [1, 4, 6], bn="1")
    kill(net, "3", [0, 3], bn="4")
    kill(net, "0", [7])  # conv row and bias dead, BN beta alive: constant channel, must stay
    kill(net, "8", [2])  # a dead logit: the classifier's outputs are never removed
    net.train()
    masks_before = get_masks(net)
    x = torch.randn(4, 3, 8, 8)

    result = bk.compact(net, x, repeats=2, warmup=1)

    c1, c2 = 8 - 3, 16 - 2
    assert result.channels == {"0": (8, c1), "3": (16, c2), "8": (10, 10)}
    assert result.removed == {"0": 3, "3": 2}
    assert_same_outputs(net, result, x)
    dense_params = (8 * 3 * 9 + 8) + 2 * 8 + (16 * 8 * 9 + 16) + 2 * 16 + (16 * 10 + 10)
    compact_params = (c1 * 3 * 9 + c1) + 2 * c1 + (c2 * c1 * 9 + c2) + 2 * c2 + (c2 * 10 + 10)
    assert (result.params_before, result.params_after) == (dense_params, compact_params)
    # conv1: 8×8 output (padded), conv2: 6×6 output (unpadded); MACs = out·H·W·in·k·k
    dense_flops = 8 * 8 * 8 * 3 * 9 + 16 * 6 * 6 * 8 * 9 + 16 * 10
    compact_flops = c1 * 8 * 8 * 3 * 9 + c2 * 6 * 6 * c1 * 9 + c2 * 10
    assert (result.flops_prunable_before, result.flops_prunable_after) == (dense_flops, compact_flops)
    assert result.flops_after < result.flops_before

    # the caller's model is untouched and the compact one comes back in its training mode
    assert net.training and result.model.training
    assert net[0].weight_orig.shape == (8, 3, 3, 3)
    assert all(torch.equal(masks_before[k], v) for k, v in get_masks(net).items())

    # the same figures through compacted_metrics (compaction is on by default: there are dead channels)
    m = {**bk.model_metrics(net, (3, 8, 8)), **bk.compacted_metrics(net, (3, 8, 8))}
    assert m["compacted_params"] == compact_params
    assert m["compacted_flops"] == compact_flops
    assert m["compacted_speedup"] == pytest.approx(dense_flops / compact_flops)
    assert m["flops_dense"] == dense_flops
    assert m["compacted_size_bytes"] < m["size_bytes_dense"]


def test_latency_is_measured_with_its_setting():
    net = plain_net()
    kill(net, "3", list(range(12)), bn="4")
    result = bk.compact(net, torch.randn(2, 3, 8, 8), batch_size=3, threads=1, warmup=1, repeats=3)
    for lat in (result.latency_masked, result.latency_compact):
        assert lat.median_ms > 0 and len(lat.times_ms) == 3
        assert lat.setting.as_dict() == {
            "device": "cpu", "batch_size": 3, "dtype": "float32", "threads": 1, "warmup": 1, "repeats": 3,
        }
    assert result.latency_speedup == pytest.approx(result.latency_masked.median_ms / result.latency_compact.median_ms)
    flat = result.as_dict()
    assert flat["latency_masked_batch_size"] == 3 and "latency_compact_ms" in flat
    assert bk.compact(net, torch.randn(2, 3, 8, 8), measure_latency=False).latency_masked is None


# ---------------------------------------------------------------------------------------------
# (b) residual nets: a channel is removed only if dead on both sides of the add


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:  # option B: 1×1 conv projection
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block1 = Block(8, 8)
        self.block2 = Block(8, 16, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_tiny_resnet_add_keeps_one_sided_channels():
    torch.manual_seed(0)
    net = TinyResNet()
    randomise_bn(net)
    # stem output + block1 residual branch feed the identity add: 3 dead on both sides, 6 on one
    kill(net, "conv", [3, 6], bn="bn")
    kill(net, "block1.conv2", [3], bn="block1.bn2")
    # block2: residual branch dead at {0, 1, 2}, projection shortcut dead at {0, 1, 5}
    kill(net, "block2.conv2", [0, 1, 2], bn="block2.bn2")
    kill(net, "block2.shortcut.0", [0, 1, 5], bn="block2.shortcut.1")
    # inside block2, before the add: removable on its own
    kill(net, "block2.conv1", [4, 9], bn="block2.bn1")
    x = torch.randn(2, 3, 8, 8)

    result = bk.compact(net, x, measure_latency=False)

    assert result.channels == {
        "conv": (8, 7), "block1.conv1": (8, 8), "block1.conv2": (8, 7),
        "block2.conv1": (16, 14), "block2.conv2": (16, 14), "block2.shortcut.0": (16, 14), "fc": (10, 10),
    }
    compact = result.model
    assert compact.block1.conv1.in_channels == 7 and compact.block2.shortcut[0].in_channels == 7
    assert compact.block2.conv2.in_channels == 14 and compact.fc.in_features == 14
    assert_same_outputs(net, result, x)
    assert_same_outputs(net, result, torch.randn(3, 3, 8, 8))  # not only on the tracing inputs


def test_torchvision_resnet18_small_input():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    randomise_bn(net)
    kill(net, "layer1.0.conv1", [0, 1, 2], bn="layer1.0.bn1")                 # inside a block
    kill(net, "layer2.0.conv2", [0, 1, 2, 3], bn="layer2.0.bn2")              # stage-2 residual stream:
    kill(net, "layer2.0.downsample.0", [0, 1, 5], bn="layer2.0.downsample.1")  # three producers, dead in
    kill(net, "layer2.1.conv2", [0, 1, 7], bn="layer2.1.bn2")                 # all three only at {0, 1}
    x = torch.randn(2, 3, 32, 32)

    result = bk.compact(net, x, measure_latency=False)

    assert result.removed == {"layer1.0.conv1": 3, "layer2.0.conv2": 2, "layer2.0.downsample.0": 2, "layer2.1.conv2": 2}
    assert result.model.layer3[0].conv1.in_channels == 126
    assert_same_outputs(net, result, x)


def test_channel_pruning_then_compaction_end_to_end_on_resnet18():
    """bk.prune(granularity="channel") → bk.compact → model_metrics: the masks the engine chose
    (bias and BN entries with them) compact into a smaller network with the same outputs."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    randomise_bn(net)
    x = torch.randn(2, 3, 32, 32)
    bk.prune(net, compression=2, criterion="magnitude", granularity="channel", scope="layer", exclude=["fc"])
    bn_masks = [k for k in get_masks(net) if k.endswith("bn1.weight")]
    assert bn_masks, "channel pruning masks the BatchNorm entries that follow a pruned conv"
    result = bk.compact(net, x, measure_latency=False)
    assert sum(result.removed.values()) > 0 and result.params_after < result.params_before
    assert_same_outputs(net, result, x)
    m = bk.compacted_metrics(net, input_shape=(3, 32, 32))
    assert m["compacted_params"] == result.params_after
    assert 1 < m["compacted_speedup"] and m["compacted_flops"] == result.flops_prunable_after


# ---------------------------------------------------------------------------------------------
# (c) MLP, and concatenation


def test_mlp_dead_neurons():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
    kill(net, "1", [0, 5, 9])
    kill(net, "1", [11], bias=False)  # weight row dead, bias alive: relu(bias) is a constant, keep it
    with torch.no_grad():
        net[1].bias_orig[11] = 0.5
    kill(net, "3", [2])
    kill(net, "5", [4])  # logits stay
    x = torch.randn(6, 4, 5)

    result = bk.compact(net, x, measure_latency=False)

    assert result.channels == {"1": (16, 13), "3": (12, 11), "5": (5, 5)}
    assert result.params_after == (13 * 20 + 13) + (11 * 13 + 11) + (5 * 11 + 5)
    assert result.flops_prunable_after == 13 * 20 + 11 * 13 + 5 * 11
    assert_same_outputs(net, result, x)


def test_align_keeps_channel_counts_at_multiples_and_the_outputs():
    """align=8: each layer keeps ceil(alive / 8) * 8 channels (never more than it had), the extra ones dead
    zeros, so the outputs stay the masked model's; the residual group keeps its union rounded up."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 12),
                        nn.ReLU(), nn.Linear(12, 5))
    kill(net, "0", list(range(0, 40, 3)))  # 14 dead: 26 alive -> 32
    kill(net, "2", list(range(14)))        # 14 dead: 16 alive -> 16 (already a multiple)
    kill(net, "4", [0, 1, 2, 3, 4, 5, 6])  # 7 dead: 5 alive -> 8
    x = torch.randn(6, 20)
    exact = bk.compact(net, x, measure_latency=False)
    aligned = bk.compact(net, x, measure_latency=False, align=8)
    assert exact.channels == {"0": (40, 26), "2": (30, 16), "4": (12, 5), "6": (5, 5)}
    assert aligned.channels == {"0": (40, 32), "2": (30, 16), "4": (12, 8), "6": (5, 5)}
    assert aligned.flops_prunable_after == 20 * 32 + 32 * 16 + 16 * 8 + 8 * 5
    assert_same_outputs(net, aligned, x)
    assert bk.compact(net, x, measure_latency=False, align=16).channels["4"] == (12, 12)  # capped: nothing removed
    with pytest.raises(ValueError, match="align"):
        bk.compact(net, x, measure_latency=False, align=0)

    torch.manual_seed(0)
    res = TinyResNet()
    randomise_bn(res)
    kill(res, "block2.conv1", [4, 9], bn="block2.bn1")  # 14 alive -> 16: nothing removed at align 8
    kill(res, "conv", [3, 6], bn="bn")
    kill(res, "block1.conv2", [3, 6], bn="block1.bn2")  # the stem's add: 6 alive in all producers -> 8
    x = torch.randn(2, 3, 8, 8)
    result = bk.compact(res, x, measure_latency=False, align=4)
    assert result.channels["conv"] == (8, 8) and result.channels["block2.conv1"] == (16, 16)
    result = bk.compact(res, x, measure_latency=False, align=3)
    assert result.channels["conv"] == (8, 6) and result.channels["block2.conv1"] == (16, 15)
    assert_same_outputs(res, result, x)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.head(y).mean(dim=(2, 3))


def test_concat_branches():
    torch.manual_seed(0)
    net = Concat()
    kill(net, "a", [1])
    kill(net, "b", [0, 4])
    x = torch.randn(2, 3, 6, 6)
    result = bk.compact(net, x, measure_latency=False)
    assert result.channels == {"a": (4, 3), "b": (6, 4), "head": (5, 5)}
    assert result.model.head.in_channels == 7
    assert_same_outputs(net, result, x)


def test_no_dead_channel_changes_nothing():
    net = plain_net()
    x = torch.randn(2, 3, 8, 8)
    result = bk.compact(net, x, measure_latency=False)
    assert result.removed == {} and result.params_after == result.params_before
    assert bk.compacted_metrics(net, (3, 8, 8)) == {}
    assert bk.compacted_metrics(net, (3, 8, 8), compacted=True)["compacted_params"] == result.params_before


def test_coupling_it_cannot_see_is_refused():
    """Softmax over channels turns a zero channel into a non-zero one: removal would change the
    outputs, and the built-in output check must say so instead of returning a wrong model."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(torch.softmax(self.a(x), dim=1)).flatten(1)

    net = Net()
    kill(net, "a", [0])
    with pytest.raises(CompactionError, match="differs from the masked one"):
        bk.compact(net, torch.randn(2, 3, 4, 4), measure_latency=False)
    # compacted_metrics: asked explicitly → the error; implied by a dead channel → a warning, no compacted_*
    with pytest.raises(CompactionError):
        bk.compacted_metrics(net, (3, 4, 4), compacted=True)
    with pytest.warns(UserWarning, match="compacted_\\* metrics skipped"):
        assert bk.compacted_metrics(net, (3, 4, 4)) == {}


def test_latency_ranks_models_and_restores_threads():
    from benchkit.latency import measure_latencies

    before = torch.get_num_threads()
    small = nn.Linear(256, 2)
    big = nn.Sequential(nn.Linear(256, 1024), *[nn.Linear(1024, 1024) for _ in range(4)], nn.Linear(1024, 2))
    fast, slow = measure_latencies([small, big], torch.randn(32, 256), threads=1, warmup=1, repeats=5)
    assert torch.get_num_threads() == before
    assert slow.median_ms > 10 * fast.median_ms  # ~4.5M vs 512 multiply-adds per sample
