"""Model zoo: parameter counts against the papers (computed by hand here), any-input-size behaviour,
torchvision models, initialisations, registry errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchkit.config import ModelConfig
from benchkit.models import MODELS, build_model
from benchkit.registry import UnknownNameError
from benchkit.seeding import seed_everything

torch.set_num_threads(1)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights(model: nn.Module, types=(nn.Conv2d, nn.Linear)) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, types))


def conv_w(cin: int, cout: int, k: int = 3) -> int:
    return cin * cout * k * k


def build(name: str, shape, classes: int = 10, **kw) -> nn.Module:
    return build_model(ModelConfig(name=name, **kw), shape, classes)


def test_lenet300_counts_and_layer_names():
    m = build("lenet300", (1, 28, 28))
    assert weights(m) == 784 * 300 + 300 * 100 + 100 * 10 == 266_200  # Han et al. 2015: 267K
    assert params(m) == 266_610
    assert [n for n, _ in m.named_children()] == ["fc1", "fc2", "fc3"]
    assert build("lenet300", (1, 8, 8)).fc1.in_features == 64


def test_lenet5_caffe_counts_and_small_inputs():
    m = build("lenet5", (1, 28, 28))
    # conv1 20·25+20, conv2 50·20·25+50, fc1 800·500+500, fc2 500·10+10 (Han et al. 2015: 431K)
    assert params(m) == 520 + 25_050 + 400_500 + 5_010 == 431_080
    assert m.fc1.in_features == 50 * 4 * 4
    small = build("lenet5", (1, 8, 8))  # digits: padding 2 keeps 8→8→4→4→2
    assert small.conv1.padding == (2, 2) and small.fc1.in_features == 50 * 2 * 2
    assert small(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert not any(isinstance(c, nn.ReLU) for c in m.modules())  # Caffe: no ReLU after the convs
    assert any(isinstance(c, nn.ReLU) for c in build("lenet5", (1, 28, 28), kwargs={"conv_relu": True}).modules())


@pytest.mark.parametrize("name, convs, pools, paper_conv, paper_total", [
    ("conv2", [(3, 64), (64, 64)], 1, 38e3, 4.3e6),
    ("conv4", [(3, 64), (64, 64), (64, 128), (128, 128)], 2, 260e3, 2.4e6),
    ("conv6", [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256)], 3, 1.1e6, None),
])
def test_lth_conv_nets_match_the_paper(name, convs, pools, paper_conv, paper_total):
    m = build(name, (3, 32, 32))
    conv = sum(conv_w(a, b) for a, b in convs)
    side = 32 // 2 ** pools
    fc = convs[-1][1] * side * side * 256 + 256 * 256 + 256 * 10
    assert weights(m, (nn.Conv2d,)) == conv and round(conv, -3) == pytest.approx(paper_conv, rel=0.05)
    assert weights(m) == conv + fc
    if paper_total:  # Frankle & Carbin 2019, Figure 2
        assert round(weights(m) / 1e6, 1) == paper_total / 1e6
    # Conv-6: the paper's table says 1.7M, but the architecture it describes has 2.26M weights
    # (fc1 alone is 4·4·256 × 256 = 1.05M); we build the described architecture.
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert build(name, (1, 8, 8))(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_cifar_resnets_counts_and_projection_shortcuts():
    r20, r56 = build("resnet20", (3, 32, 32)), build("resnet56", (3, 32, 32))
    assert params(r20) == pytest.approx(0.27e6, rel=0.02)  # He et al. 2016: 0.27M
    assert params(r56) == pytest.approx(0.85e6, rel=0.02)  # 0.85M
    # option B: exactly two 1x1 conv + BN projections (16→32, 32→64) on top of the option-A count
    projections = [m for m in r20.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [(p.in_channels, p.out_channels) for p in projections] == [(16, 32), (32, 64)]
    assert params(r20) == 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert r20(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert build("resnet32", (1, 8, 8))(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_resnet_shortcut_is_handled_by_torch_pruning():
    import torch_pruning as tp

    model = build("resnet20", (3, 32, 32)).eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 32, 32))
    block = model.layer2[0]
    group = dg.get_pruning_group(block.conv2, tp.prune_conv_out_channels, idxs=[0, 1, 2])
    group.prune()  # the residual sum couples conv2, the projection and the next blocks
    assert block.conv2.out_channels == block.shortcut[0].out_channels == 29
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_vgg_counts_and_small_inputs():
    v16 = build("vgg16", (3, 32, 32))
    cfg = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    conv = sum(conv_w(a, b) for a, b in zip([3] + cfg[:-1], cfg))
    assert weights(v16, (nn.Conv2d,)) == conv == 14_710_464  # VGG-16's 13 conv layers
    assert weights(v16, (nn.Linear,)) == 512 * 10
    assert sum(isinstance(m, nn.BatchNorm2d) for m in v16.modules()) == 13
    assert build("vgg11", (1, 8, 8))(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert build("vgg11", (3, 32, 32), kwargs={"fc": (512,)}).classifier[0].out_features == 512


def test_torchvision_model_by_name_with_adapted_input_channels():
    m = build("resnet18", (1, 28, 28))
    assert m.conv1.in_channels == 1 and m.fc.out_features == 10
    # torchvision's resnet18 has 11,689,512 params; 1 input channel drops 64·2·7·7, 10 classes drop 512·990+990
    assert params(m) == 11_689_512 - 64 * 2 * 49 - (512 * 990 + 990)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_model_lists_names_and_mentions_torchvision():
    with pytest.raises(UnknownNameError) as err:
        build("lenet301", (1, 8, 8))
    assert "lenet300" in str(err.value) and "torchvision" in str(err.value)
    with pytest.raises(ValueError, match="kwargs"):
        build("lenet300", (1, 8, 8), kwargs={"width": 3})


def test_initialisations():
    seed_everything(0)
    g = build("lenet300", (1, 28, 28), init="glorot_normal")
    assert g.fc1.weight.std().item() == pytest.approx(math.sqrt(2 / (784 + 300)), rel=0.02)
    assert torch.count_nonzero(g.fc1.bias) == 0
    k = build("lenet300", (1, 28, 28), init="kaiming_normal")
    assert k.fc1.weight.std().item() == pytest.approx(math.sqrt(2 / 784), rel=0.02)
    d = build("lenet300", (1, 28, 28))  # PyTorch default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert d.fc1.weight.abs().max().item() <= 1 / math.sqrt(784)
    with pytest.raises(ValueError, match="glorot_normal"):
        build("lenet300", (1, 28, 28), init="xavier")


def test_seeded_builds_are_identical_and_overrides_apply():
    seed_everything(3)
    a = build("conv2", (3, 32, 32))
    seed_everything(3)
    b = build("conv2", (3, 32, 32))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    m = build_model(ModelConfig(name="lenet5", num_classes=7, in_channels=3), (1, 28, 28), 10)
    assert m.conv1.in_channels == 3 and m.fc2.out_features == 7
    assert {"lenet300", "lenet5", "conv2", "conv4", "conv6", "resnet20", "resnet32", "resnet56", "vgg11",
            "vgg16"} <= set(MODELS.names())


@pytest.mark.parametrize("name,shape", [
    ("googlenet", (1, 32, 32)),  # adapted 1-channel first conv; 32×32 is enough with the aux heads off
    ("inception_v3", (3, 75, 75)),  # inception_v3 needs inputs of at least 75×75
])
def test_torchvision_models_with_auxiliary_heads_return_logits_in_train_mode(name, shape):
    """googlenet / inception_v3 are built without their auxiliary heads, so training gets one Tensor."""
    import warnings

    seed_everything(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torchvision's init_weights warning: passed explicitly
        m = build(name, shape, classes=3)
    assert not any(n.startswith(("aux", "AuxLogits")) for n, _ in m.named_modules() if n)
    m.train()
    out = m(torch.randn(2, *shape))
    assert isinstance(out, torch.Tensor) and not isinstance(out, tuple) and out.shape == (2, 3)
    with pytest.raises(ValueError, match="aux_logits"):
        build(name, shape, kwargs={"aux_logits": True})
