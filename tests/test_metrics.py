"""Metrics against independent expectations: FLOPs by the convolution formula, counts by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

import benchkit as bk
from benchkit.metrics import (
    LAYER_COLUMNS,
    NoPrunableLayersError,
    count_flops,
    dead_channels,
    nonzero_counts,
    sparse_storage_bytes,
)
from benchkit.pruning.masks import apply_masks

torch.set_num_threads(1)


def lenet5() -> nn.Module:
    """LeNet-5, Caffe variant (20/50 filters, 500 hidden), unpadded 5×5 convs on 1×28×28."""
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    )


LENET_NAMES = ["0", "2", "5", "7"]
# out_c · H_out · W_out · in_c · kh · kw, and in · out for the Linear layers
LENET_FLOPS = [20 * 24 * 24 * 1 * 5 * 5, 50 * 8 * 8 * 20 * 5 * 5, 800 * 500, 500 * 10]
LENET_WEIGHTS = [20 * 1 * 5 * 5, 50 * 20 * 5 * 5, 800 * 500, 500 * 10]
LENET_BIASES = [20, 50, 500, 10]


def keep_first(shape, n_keep: int) -> torch.Tensor:
    """A mask keeping exactly ``n_keep`` entries, at random positions (fixed seed)."""
    numel = math.prod(shape)
    order = torch.randperm(numel, generator=torch.Generator().manual_seed(n_keep))
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[order[:n_keep]] = True
    return mask.view(shape)


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_lenet5_flops_hand_count():
    assert LENET_FLOPS == [288_000, 1_600_000, 400_000, 5_000]
    table = bk.layer_metrics(lenet5(), input_shape=(1, 1, 28, 28))
    assert list(table.columns) == LAYER_COLUMNS
    assert table["layer"].tolist() == LENET_NAMES
    assert table["type"].tolist() == ["Conv2d", "Conv2d", "Linear", "Linear"]
    assert table["shape"].tolist() == [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]
    assert table["params"].tolist() == LENET_WEIGHTS
    assert table["flops"].tolist() == LENET_FLOPS
    # ShrinkBench's 'same'-padding count would give 20·28·28·25 = 392,000 for conv1: not what we report
    assert table["flops"].iloc[0] != 20 * 28 * 28 * 25


def out_size(n: int, k: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """H_out of torch.nn.Conv2d's documentation: floor((H + 2p − d·(k − 1) − 1) / s) + 1."""
    return (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def test_flops_padding_stride_groups_dilation():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),                                   # unpadded, strided
        nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=4),           # dilated, grouped
        nn.Conv2d(12, 6, (1, 3), stride=(1, 2), padding=(0, 1), groups=3, bias=False),
        nn.Conv2d(6, 6, 3, padding=1, groups=6),                        # depthwise
        nn.Flatten(),
        nn.Linear(6 * 8 * 5, 7),
    )
    h0, w0 = 17, 19
    h1, w1 = out_size(h0, 3, stride=2), out_size(w0, 3, stride=2)                      # 8, 9
    h2, w2 = out_size(h1, 3, padding=2, dilation=2), out_size(w1, 3, padding=2, dilation=2)  # 8, 9
    h3, w3 = out_size(h2, 1), out_size(w2, 3, stride=2, padding=1)                     # 8, 5
    h4, w4 = out_size(h3, 3, padding=1), out_size(w3, 3, padding=1)                    # 8, 5
    assert (h1, w1, h2, w2, h3, w3, h4, w4) == (8, 9, 8, 9, 8, 5, 8, 5)
    expected = [
        8 * h1 * w1 * (3 // 1) * 3 * 3,
        12 * h2 * w2 * (8 // 4) * 3 * 3,
        6 * h3 * w3 * (12 // 3) * 1 * 3,
        6 * h4 * w4 * (6 // 6) * 3 * 3,
        6 * h4 * w4 * 7,
    ]
    table = bk.layer_metrics(net, input_shape=(3, h0, w0))  # (C, H, W) gets its batch dim
    assert table["flops"].tolist() == expected
    assert bk.model_metrics(net, (1, 3, h0, w0))["flops_dense"] == sum(expected)


def test_conv1d_flops():
    net = nn.Sequential(nn.Conv1d(4, 6, 5, stride=2, padding=1), nn.Flatten(), nn.Linear(6 * 15, 3))
    length = out_size(32, 5, stride=2, padding=1)  # 15
    table = bk.layer_metrics(net, (4, 32))
    assert table["flops"].tolist() == [6 * length * 4 * 5, 6 * length * 3]


def test_resnet18_flops_match_formula_and_fvcore_operators():
    model = torchvision.models.resnet18()
    shape = (1, 3, 224, 224)
    # independent count: output sizes from forward hooks, then out_c·H·W·(in_c/groups)·kh·kw
    expected = {}

    def hook(name):
        def fn(module, _inp, out):
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                expected[name] = out.shape[1] * out.shape[2] * out.shape[3] * module.in_channels // module.groups * kh * kw
            else:
                expected[name] = module.in_features * module.out_features
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in handles:
        h.remove()

    table = bk.layer_metrics(model, shape)
    assert dict(zip(table["layer"], table["flops"])) == expected
    ops = count_flops(model, torch.zeros(shape)).by_operator
    total = bk.model_metrics(model, shape)
    assert total["flops_dense"] == ops["conv"] + ops["linear"] == sum(expected.values())
    assert 1.80e9 < total["flops_dense"] < 1.83e9  # the usual "1.8 GFLOPs" (multiply-adds)
    assert total["flops_total_model"] > total["flops_dense"]  # BN, pooling counted by fvcore too


def test_masked_model_is_traced_through_prune_hooks():
    dense = lenet5()
    masked = lenet5()
    prune.l1_unstructured(masked[0], "weight", amount=0.5)
    prune.random_unstructured(masked[5], "weight", amount=0.9)
    assert bk.layer_metrics(masked, (1, 1, 28, 28))["flops"].tolist() == LENET_FLOPS
    assert bk.layer_metrics(dense, (1, 1, 28, 28))["flops"].tolist() == LENET_FLOPS


def test_caller_model_untouched():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bk.model_metrics(net, (3, 8, 8))
    bk.layer_metrics(net, (3, 8, 8))
    assert net.training and net[1].training
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics and counter unchanged


# ---------------------------------------------------------------------------------------------
# non-zeros, density, compression


def masked_lenet() -> tuple[nn.Module, dict[str, int]]:
    model = lenet5()
    keep = {"0": 250, "2": 25_000, "5": 40_000, "7": 5_000}
    apply_masks(model, {"0.weight": keep_first((20, 1, 5, 5), 250), "5.weight": keep_first((500, 800), 40_000)})
    return model, keep


def test_nonzero_density_and_flops_nonzero_hand_count():
    model, keep = masked_lenet()
    table = bk.layer_metrics(model, (1, 1, 28, 28))
    assert table["nonzero"].tolist() == [keep[n] for n in LENET_NAMES]
    assert table["density"].tolist() == pytest.approx([keep[n] / p for n, p in zip(LENET_NAMES, LENET_WEIGHTS)])
    # every surviving conv weight is used once per output position: H_out·W_out·nonzero
    assert table["flops_nonzero"].tolist() == [24 * 24 * 250, 8 * 8 * 25_000, 40_000, 5_000]
    assert table["flops_nonzero"].tolist() == pytest.approx((table["flops"] * table["density"]).tolist())
    assert table["speedup"].tolist() == pytest.approx([2.0, 1.0, 10.0, 1.0])
    assert nonzero_counts(model) == {n: (p, keep[n]) for n, p in zip(LENET_NAMES, LENET_WEIGHTS)}


def test_nonzero_uses_orig_times_mask_not_stale_weight_attribute():
    model = lenet5()
    prune.random_unstructured(model[0], "weight", amount=0.5)  # plain torch: _orig is NOT zeroed
    with torch.no_grad():
        model[0].weight_mask[:4] = 0  # edited in place, no forward since: `weight` is stale
    expected = int((model[0].weight_orig * model[0].weight_mask).count_nonzero())
    assert int(model[0].weight.count_nonzero()) != expected
    assert bk.layer_metrics(model, (1, 28, 28))["nonzero"].iloc[0] == expected


def test_compression_ratios_hand_count():
    model, keep = masked_lenet()
    m = bk.model_metrics(model, (1, 1, 28, 28))
    prunable, nonzero = 430_500, 250 + 25_000 + 40_000 + 5_000
    assert sum(LENET_WEIGHTS) == prunable
    assert m["params_prunable"] == prunable and m["nonzero_prunable"] == nonzero
    assert m["compression_ratio"] == pytest.approx(prunable / nonzero)
    assert m["sparsity"] == pytest.approx(1 - nonzero / prunable)
    assert m["params_total"] == prunable + 580
    assert m["nonzero_total"] == nonzero + 580
    assert m["model_compression_ratio"] == pytest.approx((prunable + 580) / (nonzero + 580))
    flops_nonzero = 24 * 24 * 250 + 8 * 8 * 25_000 + 40_000 + 5_000
    assert m["flops_dense"] == sum(LENET_FLOPS)
    assert m["flops_nonzero"] == pytest.approx(flops_nonzero)
    assert m["theoretical_speedup"] == pytest.approx(sum(LENET_FLOPS) / flops_nonzero)


def test_model_metrics_keys_order_and_types():
    model, _ = masked_lenet()
    m = bk.model_metrics(model, (1, 1, 28, 28))
    assert list(m) == [
        "params_prunable", "nonzero_prunable", "compression_ratio", "sparsity", "params_total",
        "nonzero_total", "model_compression_ratio", "flops_dense", "flops_nonzero",
        "theoretical_speedup", "flops_total_model", "flops_attention", "flops_nonprunable", "size_bytes_dense",
        "size_bytes_sparse",
    ]  # unstructured mask: no dead channel, so no compacted_* figures
    ints = {"params_prunable", "nonzero_prunable", "params_total", "nonzero_total", "flops_dense",
            "flops_total_model", "flops_attention", "flops_nonprunable", "size_bytes_dense", "size_bytes_sparse"}
    for k, v in m.items():
        assert type(v) is (int if k in ints else float), k


def test_fully_pruned_layer_gives_infinite_speedup():
    model = lenet5()
    apply_masks(model, {"7.weight": torch.zeros(10, 500, dtype=torch.bool)})
    row = bk.layer_metrics(model, (1, 28, 28)).iloc[3]
    assert row["nonzero"] == 0 and row["flops_nonzero"] == 0.0 and row["speedup"] == math.inf


# ---------------------------------------------------------------------------------------------
# storage


def test_sparse_storage_formats():
    # bitmap: 4·nnz + ceil(numel/8); csr: 8·nnz + 4·(rows + 1)
    w = torch.zeros(4, 10)
    w.view(-1)[:5] = 1.0
    assert sparse_storage_bytes(w) == (4 * 5 + 5, "bitmap")          # vs csr 8·5 + 4·5 = 60
    w = torch.zeros(2, 100)
    w[0, 0] = 1.0
    assert sparse_storage_bytes(w) == (8 * 1 + 4 * 3, "csr")         # vs bitmap 4 + 25 = 29


def test_size_bytes_formula():
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    apply_masks(net, {"0.weight": keep_first((3, 2, 1, 1), 2), "3.weight": keep_first((2, 48), 3)})
    m = bk.model_metrics(net, (2, 4, 4))
    # params: conv 6 + 3, BN 3 + 3, linear 96 + 2; buffers: running mean 3, var 3, num_batches_tracked 1
    assert m["size_bytes_dense"] == 4 * (6 + 3 + 3 + 3 + 96 + 2 + 3 + 3 + 1)
    conv_w = min(4 * 2 + math.ceil(6 / 8), 8 * 2 + 4 * 4)   # bitmap 9 vs csr 32
    lin_w = min(4 * 3 + math.ceil(96 / 8), 8 * 3 + 4 * 3)   # bitmap 24 vs csr 36
    assert m["size_bytes_sparse"] == conv_w + lin_w + 4 * (3 + 3 + 3 + 2 + 3 + 3 + 1)


# ---------------------------------------------------------------------------------------------
# helpers and errors


def test_dead_channels_need_weight_row_and_bias():
    model = lenet5()
    rows = torch.ones(20, 1, 5, 5, dtype=torch.bool)
    rows[[1, 2]] = False
    bias = torch.ones(20, dtype=torch.bool)
    bias[1] = False  # channel 2 keeps its bias: constant output, not dead
    apply_masks(model, {"0.weight": rows, "0.bias": bias})
    assert dead_channels(model) == {"0": 1, "2": 0, "5": 0, "7": 0}


def test_no_prunable_layer_is_a_clear_error():
    with pytest.raises(NoPrunableLayersError, match="no prunable layer.*Conv2d.*Linear"):
        bk.model_metrics(nn.Sequential(nn.ReLU()), (1, 4))
    with pytest.raises(NoPrunableLayersError):
        bk.layer_metrics(nn.BatchNorm2d(3), (3, 4, 4))


@pytest.mark.parametrize("shape, message", [
    ((8, 1, 28, 28), "batch size 8.*pass \\(1, 1, 28, 28\\)"),
    ((28, 28), "does not fit Conv2d"),
    ((1, 0, 28, 28), "positive"),
    ("abc", "sequence of ints"),
])
def test_bad_input_shape(shape, message):
    with pytest.raises(ValueError, match=message):
        bk.layer_metrics(lenet5(), shape)


def test_chw_and_batched_shape_agree():
    torch.manual_seed(0)  # one network for both (an unseeded init holds an exact zero ~2% of the time)
    net = lenet5()
    a = bk.layer_metrics(net, (1, 28, 28))
    b = bk.layer_metrics(net, (1, 1, 28, 28))
    assert a.equals(b)


def test_works_after_a_training_forward_pass():
    """After a forward with autograd on, the prune hook leaves a non-leaf ``weight`` that plain
    ``copy.deepcopy`` refuses; metrics must still work and leave that attribute in place."""
    model, keep = masked_lenet()
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    stale = model[0].weight
    assert not stale.is_leaf
    assert bk.layer_metrics(model, (1, 28, 28))["nonzero"].tolist() == [keep[n] for n in LENET_NAMES]
    assert model[0].weight is stale


def test_mlp_accepts_image_sample_shapes():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 100), nn.ReLU(), nn.Linear(100, 10))
    expected = [3072 * 100, 100 * 10]
    for shape in [(3, 32, 32), (1, 3, 32, 32), (3072,), (1, 3072)]:
        assert bk.layer_metrics(mlp, shape)["flops"].tolist() == expected, shape
    with pytest.raises(ValueError, match="cannot run on an input of shape \\(1, 8, 3072\\)"):
        bk.layer_metrics(mlp, (8, 3072))
