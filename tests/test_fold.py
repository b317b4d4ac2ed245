"""BatchNorm folding (benchkit.deployment.fold): the folded convolution equals the textbook formula
(w * gamma / sqrt(var + eps), (b - mean) * gamma / sqrt(var + eps) + beta), outputs are unchanged, zeros
stay zero, and every case where folding would be wrong is left alone; deploy folds every variant."""

from __future__ import annotations

import pytest
import torch
from test_deploy import Block, dead_conv1_channels, fake_timer
from torch import nn

import benchkit as bk
from benchkit.deployment.fold import fold_batchnorm


def with_stats(bn: nn.modules.batchnorm._BatchNorm, seed: int) -> nn.Module:
    """Non-trivial running statistics and affine parameters (a fresh BatchNorm is the identity map)."""
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(n, generator=g))
        bn.bias.copy_(torch.randn(n, generator=g))
    return bn


def test_folded_conv_is_the_textbook_formula_and_outputs_are_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), with_stats(nn.BatchNorm2d(8), 1), nn.ReLU()).eval()
    w, b = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    bn = net[1]
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    want_w = w * scale[:, None, None, None]
    want_b = (b - bn.running_mean) * scale + bn.bias.detach()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ref = net(x)
    folded = fold_batchnorm(net)
    assert folded.batchnorms == ["1"] and folded.why_not == ""
    assert isinstance(net[1], nn.Identity) and isinstance(net[0], nn.Conv2d)
    torch.testing.assert_close(net[0].weight.detach(), want_w)
    torch.testing.assert_close(net[0].bias.detach(), want_b)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)


def test_a_pruned_weights_zeros_stay_zero_and_a_biasless_conv_gets_a_bias():
    net = nn.Sequential(nn.Conv1d(4, 6, 3, bias=False), with_stats(nn.BatchNorm1d(6), 2)).eval()
    with torch.no_grad():
        net[0].weight.mul_(torch.rand(net[0].weight.shape, generator=torch.Generator().manual_seed(3)) < 0.3)
    zeros = net[0].weight == 0
    assert fold_batchnorm(net).batchnorms == ["1"]
    assert torch.equal(net[0].weight == 0, zeros) and net[0].bias is not None


class Branch(nn.Module):
    """Cases folding would get wrong: a conv whose output also feeds a skip, a shared conv called twice,
    a BatchNorm without running statistics, one after a Linear, and one left in training mode."""

    def __init__(self):
        super().__init__()
        self.skip_conv, self.skip_bn = nn.Conv2d(3, 3, 1), with_stats(nn.BatchNorm2d(3), 4)
        self.shared, self.shared_bn = nn.Conv2d(3, 3, 1), with_stats(nn.BatchNorm2d(3), 5)
        self.free_conv, self.free_bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)
        self.train_conv, self.train_bn = nn.Conv2d(3, 3, 1), with_stats(nn.BatchNorm2d(3), 6)
        self.fc, self.fc_bn = nn.Linear(3, 3), with_stats(nn.BatchNorm1d(3), 7)
        self.ok_conv, self.ok_bn = nn.Conv2d(3, 3, 1), with_stats(nn.BatchNorm2d(3), 8)

    def forward(self, x):
        y = self.skip_conv(x)
        x = self.skip_bn(y) + y
        x = self.shared_bn(self.shared(x)) + self.shared(x)
        x = self.free_bn(self.free_conv(x)) + self.train_bn(self.train_conv(x))
        x = self.ok_bn(self.ok_conv(x))
        return self.fc_bn(self.fc(x.mean((2, 3))))


def test_only_a_conv_feeding_nothing_but_its_batchnorm_is_folded():
    torch.manual_seed(0)
    net = Branch().eval()
    net.train_bn.train()  # a submodule left in training mode normalises by the batch: not a fixed affine map
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        ref = net(x)
    assert fold_batchnorm(net).batchnorms == ["ok_bn"]
    kept = [n for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kept == ["skip_bn", "shared_bn", "free_bn", "train_bn", "fc_bn"]
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), with_stats(nn.BatchNorm2d(4), 9)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x)).mean((2, 3))


def test_an_untraceable_model_is_left_as_it_is_with_the_reason_and_deploy_still_runs():
    net = Untraceable().eval()
    folded = fold_batchnorm(net)
    assert folded.batchnorms == [] and "torch.fx could not trace Untraceable" in folded.why_not
    assert isinstance(net.bn, nn.BatchNorm2d)
    dep = bk.deploy(net, torch.randn(2, 3, 6, 6), timer=fake_timer({}))
    assert "BatchNorm not folded: torch.fx could not trace" in dep.markdown()
    assert dep.setting["folded_batchnorm"] == 0 and isinstance(dep.model.bn, nn.BatchNorm2d)


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))


@pytest.mark.parametrize("fastest", ["dense", "compacted"])
def test_deploy_folds_every_variant_dense_included(fastest):
    """Whichever variant wins, dense included (the baseline every speedup divides), it has no BatchNorm
    left and gives the masked model's outputs; fold_batchnorm=False keeps them."""
    torch.manual_seed(0)
    net = Block()
    with_stats(net.bn1, 10)
    dead_conv1_channels(net)
    x = torch.randn(3, 3, 5, 5)
    times = {"dense": 1.0, "compacted": 2.0} if fastest == "dense" else {"dense": 2.0, "compacted": 1.0}
    dep = bk.deploy(net, x, forms=["dense"], align=1, channels_last=False, timer=fake_timer({}, times))
    assert dep.variant == fastest and dep.setting["folded_batchnorm"] == 1
    assert isinstance(dep.model.bn1, nn.Identity) and dep.model.conv1.out_channels == (16 if fastest == "dense" else 13)
    assert "1 BatchNorm layers folded" in dep.markdown()
    assert isinstance(dep.compaction.model.bn1, nn.BatchNorm2d)  # the plain compacted model is left as it is
    with torch.no_grad():
        ref = net.eval()(x)
        assert (dep.model(x) - ref).abs().max().item() <= dep.tolerance
    dep = bk.deploy(net, x, forms=["dense"], align=1, channels_last=False, fold_batchnorm=False,
                    timer=fake_timer({}, times))
    assert isinstance(dep.model.bn1, nn.BatchNorm2d) and dep.setting["folded_batchnorm"] == 0 and dep.fold_note == ""


def test_every_registered_model_with_batchnorm_folds_completely():
    """benchkit's own CNNs (CIFAR ResNets, VGGs) trace and lose every BatchNorm, outputs unchanged to float
    rounding (relative 1e-5), with non-trivial running statistics."""
    from benchkit.config import ModelConfig
    from benchkit.models import MODELS, build_model

    seen = []
    for name in MODELS.names():
        if name in ("gpt", "vit"):  # token / patch models: LayerNorm, no BatchNorm
            continue
        torch.manual_seed(0)
        model = build_model(ModelConfig(name=name), (3, 32, 32), 10).eval()
        bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for i, n in enumerate(bns):
            with_stats(model.get_submodule(n), i)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            ref = model(x)
            assert fold_batchnorm(model).batchnorms == bns, name
            assert (model(x) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), name
        if bns:
            seen.append(name)
    assert {"resnet20", "resnet56", "vgg11", "vgg_small"} <= set(seen)
