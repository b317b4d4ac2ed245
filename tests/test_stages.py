"""A convolution fused with the 2x2 max-pool after it (benchkit::conv_stage, benchkit.deployment.stages):
the kernel equals torch's conv2d -> ReLU -> max_pool2d on every shape it takes, the fuser takes exactly
the chains where that holds, and deploy times the fused twin of every variant, dense included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_deploy import fake_timer
from torch import nn

import benchkit as bk
from benchkit.config import ModelConfig
from benchkit.deployment import fused, layout
from benchkit.deployment.stages import ConvStage, Staged, fuse_stages, measured_twin
from benchkit.models import build_model
from benchkit.pruning.masks import deepcopy_model

pytestmark = pytest.mark.skipif(fused.available() is not None, reason=f"benchkit's kernels: {fused.available()}")


def torch_stage(x, weight, bias, stride, padding, relu, pool):
    """The stage in torch's own ops: the independent expectation."""
    y = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    y = F.relu(y) if relu else y
    return F.max_pool2d(y, 2) if pool else y


@pytest.mark.parametrize("n,cin,cout,hw,k,stride,pad,relu,bias,pool", [
    (64, 1, 5, (28, 28), (5, 5), 1, (0, 0), False, True, True),    # LeNet-5 conv1 at 4x: one group of 5 channels
    (16, 3, 6, (9, 9), (3, 3), 1, (1, 1), True, True, True),       # one full group; odd conv output: floor pooling
    (17, 4, 13, (8, 11), (3, 5), 1, (2, 1), True, False, True),    # a block of 16 + 1 sample; 2 groups + 1 channel
    (1, 2, 7, (6, 6), (2, 2), 1, (0, 0), True, True, True),        # batch 1 (15 idle lanes); 6 + 1 channels
    (33, 5, 12, (12, 12), (5, 5), 1, (0, 0), False, True, True),   # three blocks, the last of one sample
    (5, 8, 4, (7, 5), (1, 1), 1, (0, 0), True, True, True),        # 1x1 kernel, odd width and height
    (20, 3, 9, (32, 32), (7, 7), 2, (3, 3), True, True, False),    # a resnet stem: 7x7 stride 2, no pool
    (18, 3, 7, (15, 13), (3, 3), 2, (1, 1), False, True, True),    # stride 2 and a pool, odd sizes
    (16, 6, 11, (9, 10), (3, 3), 1, (1, 1), True, False, False),   # rows of 10 outputs: 4 + 4 + 2 per row
    (3, 4, 5, (5, 7), (1, 1), 2, (0, 0), False, True, False),      # a 1x1 stride-2 shortcut
    (17, 64, 4, (64, 64), (3, 3), 1, (1, 1), True, True, True),    # buffers over 16 MB: allocated per call
])
@pytest.mark.parametrize("layouts", ["nchw", "channels_last in", "channels_last out", "channels_last both"])
def test_kernel_equals_conv_relu_maxpool(n, cin, cout, hw, k, stride, pad, relu, bias, pool, layouts):
    g = torch.Generator().manual_seed(n + cin + cout)
    x = torch.randn(n, cin, *hw, generator=g)
    w = torch.randn(cout, cin, *k, generator=g)
    b = torch.randn(cout, generator=g) if bias else None
    want = torch_stage(x, w, b, stride, pad, relu, pool)
    cl_in, cl_out = layouts in ("channels_last in", "channels_last both"), layouts.startswith("channels_last") and (
        layouts != "channels_last in")
    xin = x.contiguous(memory_format=torch.channels_last) if cl_in else x
    got = fused.op("conv_stage")(xin, w, b, stride, pad[0], pad[1], relu, 2 if pool else 1, cl_out)
    fmt = torch.channels_last if cl_out else torch.contiguous_format
    assert got.shape == want.shape and got.is_contiguous(memory_format=fmt)
    assert (got - want).abs().max().item() <= 1e-5 * cin * k[0] * k[1] * float(want.abs().max())


def test_kernel_is_the_same_on_two_threads_and_takes_a_strided_input():
    x = torch.randn(40, 3, 10, 10).transpose(2, 3)  # not contiguous: the kernel copies it
    w, b = torch.randn(9, 3, 3, 3), torch.randn(9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.op("conv_stage")(x, w, b, 1, 1, 1, True, 2, False)
        torch.set_num_threads(2)
        two = fused.op("conv_stage")(x, w, b, 1, 1, 1, True, 2, False)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each block of samples is one thread's, summed in the same order
    assert (one - torch_stage(x, w, b, 1, (1, 1), True, True)).abs().max().item() < 1e-4


def test_kernel_refuses_bad_inputs_with_the_reason():
    op = fused.op("conv_stage")
    with pytest.raises(RuntimeError, match="fp32 CPU"):
        op(torch.randn(2, 1, 6, 6, dtype=torch.float64), torch.randn(2, 1, 3, 3), None, 1, 0, 0, False, 2, False)
    with pytest.raises(RuntimeError, match="input channels"):
        op(torch.randn(2, 2, 6, 6), torch.randn(2, 1, 3, 3), None, 1, 0, 0, False, 2, False)
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        op(torch.randn(2, 1, 2, 2), torch.randn(2, 1, 3, 3), None, 1, 0, 0, False, 2, False)
    with pytest.raises(RuntimeError, match="pool must be 1"):
        op(torch.randn(2, 1, 6, 6), torch.randn(2, 1, 3, 3), None, 1, 0, 0, False, 3, False)


def run(model, x):
    with torch.no_grad():
        return model(x)


def test_lenet5_fuses_both_stages_and_keeps_its_outputs():
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="lenet5"), (1, 28, 28), 10).eval()
    x = torch.randn(20, 1, 28, 28)
    want = run(net, x)
    staged = fuse_stages(net)
    assert staged.convolutions == ["conv1", "conv2"] and staged.why_not == ""
    assert isinstance(net.conv1, ConvStage) and isinstance(net.pool, nn.Identity) and type(net).__name__ == "LeNet5"
    assert (run(net, x) - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("after", [
    [nn.ReLU(), nn.MaxPool2d(2)], [nn.MaxPool2d(2), nn.ReLU()], [nn.Identity(), nn.MaxPool2d(2, 2), nn.Identity()],
    [nn.MaxPool2d((2, 2), stride=(2, 2))],
])
def test_chains_that_fuse(after, stride):
    torch.manual_seed(0)
    side = 4 // stride
    net = nn.Sequential(nn.Conv2d(3, 7, 3, stride=stride, padding=1), *after, nn.Flatten(),
                        nn.Linear(7 * side * side, 4)).eval()
    x = torch.randn(18, 3, 8, 8)
    want = run(net, x)
    assert fuse_stages(net).convolutions == ["0"]
    assert net[0].relu == any(isinstance(m, nn.ReLU) for m in after) and net[0].pool and net[0].stride == stride
    assert all(isinstance(net[i], nn.Identity) for i in range(1, len(after) + 1))
    assert (run(net, x) - want).abs().max().item() < 1e-5


def test_chains_without_a_pool_fuse_when_keep_says_so_and_the_default_leaves_them():
    """A convolution and its ReLU (or the convolution alone) is a stage too; without measurements
    (pooled_only) only chains that absorb a pool are fused."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 6, 3, stride=2), nn.Flatten()).eval()
    x = torch.randn(17, 3, 9, 9)
    want = run(net, x)
    assert fuse_stages(net) == Staged(why_not="no convolution was faster as a stage")
    asked = []
    staged = fuse_stages(net, keep=lambda name, unfused, stage: asked.append((name, len(unfused), stage.relu)) or True)
    assert asked == [("0", 2, True), ("2", 1, False)] and staged.convolutions == ["0", "2"]
    assert isinstance(net[1], nn.Identity) and not net[0].pool and net[2].stride == 2
    assert (run(net, x) - want).abs().max().item() < 1e-5


class SharedRelu(nn.Module):
    """The ReLU after the convolution is also called on the Linear's output: it cannot become Identity."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.pool, self.fc = nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Linear(36, 3)

    def forward(self, x):
        return self.relu(self.fc(self.pool(self.relu(self.conv(x))).flatten(1)))


class FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(1, 4, 3), nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(torch.relu(self.conv(x)))


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(1, 4, 3), nn.MaxPool2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.pool(y).sum() + y.sum()


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(1, 4, 3), nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(x)) if x.sum() > 0 else x


UNFIT = {  # convolutions the kernel does not compute: never offered as a stage
    "uneven-stride": nn.Sequential(nn.Conv2d(1, 4, 3, stride=(1, 2)), nn.MaxPool2d(2)),
    "dilation": nn.Sequential(nn.Conv2d(1, 4, 3, dilation=2), nn.MaxPool2d(2)),
    "groups": nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.MaxPool2d(2)),
    "same": nn.Sequential(nn.Conv2d(1, 4, 3, padding="same"), nn.MaxPool2d(2)),
    "reflect": nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.MaxPool2d(2)),
    "float64": nn.Sequential(nn.Conv2d(1, 4, 3).double(), nn.MaxPool2d(2)),
}
UNABSORBED = {  # the convolution may be a stage, but the pool after it must not be absorbed
    "pool3": nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(3)),
    "pool-stride1": nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2, stride=1)),
    "pool-pad": nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2, padding=1)),
    "ceil": nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2, ceil_mode=True)),
    "avgpool": nn.Sequential(nn.Conv2d(1, 4, 3), nn.AvgPool2d(2)),
    "tanh": nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.MaxPool2d(2)),
    "shared-relu": SharedRelu(), "functional-relu": FunctionalRelu(), "two-users": TwoUsers(),
}


@pytest.mark.parametrize("case", [*UNFIT, *UNABSORBED])
def test_chains_left_alone(case):
    """Each would change the result or cannot be expressed by editing modules: no pool is absorbed, no
    unsupported convolution is offered (``keep`` would take anything), and by default nothing changes."""
    net = {**UNFIT, **UNABSORBED}[case].eval()
    offered = []
    fuse_stages(deepcopy_model(net), keep=lambda name, unfused, stage: offered.append((len(unfused), stage)) or True)
    assert offered == [] if case in UNFIT else [(n, s.pool, s.relu) for n, s in offered] == [(1, False, False)]
    before = [type(m) for m in net.modules()]
    assert fuse_stages(net).convolutions == [] and [type(m) for m in net.modules()] == before


def test_a_shared_module_absorbed_by_every_chain_becomes_identity():
    """LeNet-5 with conv_relu: one ReLU and one pool module, each called once per stage: both fuse."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="lenet5", kwargs={"conv_relu": True}), (1, 28, 28), 10).eval()
    x = torch.randn(3, 1, 28, 28)
    want = run(net, x)
    assert fuse_stages(net).convolutions == ["conv1", "conv2"]
    assert net.conv1.relu and net.conv2.relu and isinstance(net.act, nn.Identity)
    assert (run(net, x) - want).abs().max().item() < 1e-4


def test_a_chain_not_kept_keeps_working_when_a_kept_one_absorbed_their_shared_pool():
    """LeNet-5 calls one pool module after both convolutions: with only conv1 kept, the pool becomes
    Identity and conv2's slot runs conv2, act and pool in a Sequential."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="lenet5"), (1, 28, 28), 10).eval()
    x = torch.randn(5, 1, 28, 28)
    want = run(net, x)
    assert fuse_stages(net, keep=lambda name, unfused, stage: name == "conv1").convolutions == ["conv1"]
    assert isinstance(net.pool, nn.Identity) and isinstance(net.conv2, nn.Sequential)
    assert [type(m) for m in net.conv2] == [nn.Conv2d, nn.Identity, nn.MaxPool2d]
    assert (run(net, x) - want).abs().max().item() < 1e-4


def test_untraceable_training_and_convolutionless_models():
    staged = fuse_stages(Untraceable().eval())
    assert staged.convolutions == [] and "torch.fx could not trace Untraceable" in staged.why_not
    with pytest.raises(ValueError, match="eval mode"):
        fuse_stages(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2)))
    assert fuse_stages(nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval()) == Staged()  # nothing to say


def channel_pruned_lenet5() -> nn.Module:
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="lenet5"), (1, 28, 28), 10)
    bk.prune(net, compression=2, granularity="channel", scope="layer", exclude=["fc2"])
    return net


def test_deploy_times_the_fused_twin_of_every_variant_dense_included_and_saves_it_portably(tmp_path):
    net = channel_pruned_lenet5()
    x = torch.randn(20, 1, 28, 28)
    calls = []
    dep = bk.deploy(net, x, forms=["dense"], align=1, timer=fake_timer(
        {"stage": 0.5}, {"dense": 3.0, "dense_stages": 2.0, "compacted": 1.5, "compacted_stages": 0.5}, calls))
    timed = next(names for label, names in calls if label == "<model>")
    assert {"dense_stages", "compacted_stages", "dense_channels_last_stages", "compacted_channels_last_stages"} <= set(
        timed)
    # each convolution's stage was timed against its unfused modules in each variant, dense included
    assert ("dense_stages conv2", ["stage", "unfused"]) in calls and ("compacted_channels_last_stages conv1",
                                                                      ["stage", "unfused"]) in calls
    assert dep.variant == "compacted_stages" and dep.dense_ms == 2.0  # the fused dense model is the baseline
    assert isinstance(dep.model.conv1, ConvStage) and isinstance(dep.model.conv2, ConvStage)
    assert "(benchkit::conv_stage, 0.5 ms vs 1 ms unfused)" in dep.table().set_index("layer").loc["conv1", "reason"]
    assert "fused stages (benchkit::conv_stage): conv1, conv2" in dep.stage_note and dep.stage_note in dep.markdown()
    with torch.no_grad():
        want = net.eval()(x)
    assert (dep.model(x) - want).abs().max().item() <= dep.tolerance
    saved = dep.save(tmp_path / "m")
    loaded = saved.load()
    assert not any("ConvStage" in type(m).__name__ for m in loaded.modules())
    assert (loaded(x[:3]) - want[:3]).abs().max().item() <= dep.tolerance


def test_deploy_keeps_the_fused_dense_model_when_it_is_fastest_and_can_be_told_not_to_fuse():
    net = channel_pruned_lenet5()
    x = torch.randn(20, 1, 28, 28)
    dep = bk.deploy(net, x, forms=["dense"], align=1, timer=fake_timer(
        {"stage": 0.5}, {"dense": 3.0, "dense_stages": 1.0, "compacted": 1.5, "compacted_stages": 0.99}))
    assert dep.variant == "dense_stages" and dep.measured_speedup == 1.0  # 1% faster is not min_gain
    dep = bk.deploy(net, x, forms=["dense"], align=1, timer=fake_timer({"stage": 0.96}))  # within min_gain
    assert not any("_stages" in k for k in dep.times_ms)
    assert dep.stage_note == "fused convolution stages (benchkit::conv_stage) were timed; the kept model has none"
    calls = []
    dep = bk.deploy(net, x, forms=["dense"], align=1, fused_stages=False, timer=fake_timer({}, None, calls))
    assert not any("_stages" in k for label, names in calls for k in names) and dep.stage_note == ""


def test_deploy_compiles_the_fused_twin():
    """torch.compile traces benchkit::conv_stage through its registered shape function."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 9, 3))
    x = torch.randn(16, 1, 8, 8)
    dep = bk.deploy(net, x, align=1, channels_last=False, compile=True, timer=fake_timer(
        {"stage": 0.5}, {"dense": 3.0, "dense_compiled": 3.0, "dense_stages": 2.0, "dense_stages_compiled": 1.0}))
    assert dep.variant == "dense_stages_compiled" and dep.not_measured == {}
    with torch.no_grad():
        assert (dep.model(x) - net.eval()(x)).abs().max().item() <= dep.tolerance


def test_every_variant_of_a_pruned_lenet5_compiles_for_real():
    """Channel-pruned LeNet-5 with compile=True has 12 variants (dense, compacted, aligned, each also
    channels-last, and each of those with fused stages), more than torch's default cache holds for one
    forward (8): each is compiled, none silently runs eagerly or is dropped."""
    x = torch.randn(16, 1, 28, 28)
    dep = bk.deploy(channel_pruned_lenet5(), x, compile=True,
                    timer=fake_timer({"stage": 0.5}, {"compacted_stages_compiled": 0.1}))
    compiled = [k for k in dep.times_ms if k.endswith("_compiled")]
    assert dep.not_measured == {} and len(compiled) == 12 and dep.variant == "compacted_stages_compiled"


def test_the_deployed_models_fused_twin_runs_a_sparse_convolution_as_a_dense_stage_where_that_is_faster():
    """In the deployed model's fused twin a convolution given a sparse form is a candidate too: timed as a
    dense stage against that form (with the modules the stage absorbs), it runs dense where the stage wins
    and keeps its sparse form where it does not. The twin traces through deploy's own modules (a fused_csr
    Linear branches on its input's rank)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(6 * 4 * 4, 5))
    bk.prune(net, sparsity=0.8, scope="layer")
    x = torch.randn(16, 1, 12, 12)
    forms = fake_timer({"csr": 0.1, "fused_csr": 0.05}, {"dense": 3.0, "deployed": 2.0, "deployed_stages": 1.0})
    asked = []

    def timer(label, fns):  # the stage of layer "2" wins, that of layer "0" loses
        if set(fns) == {"stage", "unfused"}:
            asked.append((label, sorted(fns)))
            return {"stage": 0.5 if label.endswith(" 2") else 2.0, "unfused": 1.0}
        return forms(label, fns)
    dep = bk.deploy(net, x, forms=["csr", "fused_csr"], align=1, channels_last=False, timer=timer)
    assert ("deployed_stages 0", ["stage", "unfused"]) in asked and ("dense_stages 2", ["stage", "unfused"]) in asked
    assert dep.variant == "deployed_stages"
    assert type(dep.model[0]).__name__ == "SparseConv2d" and isinstance(dep.model[2], ConvStage)
    assert isinstance(dep.model[3], nn.Identity) and type(dep.model[5]).__name__ == "FusedCsrLinear"
    assert dep.forms == {"0": "csr", "2": "dense", "5": "fused_csr"}
    reason = dep.table().set_index("layer").loc["2", "reason"]
    assert reason.startswith("dense: as a fused stage it beat csr in this model") and "0.5 ms vs 1 ms" in reason
    with torch.no_grad():
        want = net.eval()(x)
    assert (dep.model(x) - want).abs().max().item() <= dep.tolerance


def test_measured_twin_keeps_what_is_faster_and_writes_the_layout_it_was_timed_in():
    """measured_twin times each candidate on its real input; the stages it keeps are the very modules
    timed, so in a channels-last model they write channels-last outputs (else the pooling after a
    stage runs on NCHW, which took a resnet18 stem's max-pool from 0.32 to 2.2 ms)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                        nn.Conv2d(6, 5, 3, padding=1), nn.Flatten()).eval()
    x = torch.randn(16, 3, 16, 16)
    want = run(net, x)
    seen = []

    def timer(label, fns):
        seen.append((label, {k: fn().is_contiguous(memory_format=torch.channels_last) for k, fn in fns.items()}))
        return {"stage": 0.5 if label.endswith(" 0") else 2.0, "unfused": 1.0}
    twin, times = measured_twin(layout.channels_last_copy(net), (x,), timer, 0.05, channels_last=True, label="m")
    assert times == {"0": {"stage": 0.5, "unfused": 1.0}, "3": {"stage": 2.0, "unfused": 1.0}}
    assert [label for label, _ in seen] == ["m 0", "m 3"] and seen[0][1] == {"stage": True, "unfused": True}
    assert isinstance(twin[0], ConvStage) and twin[0].channels_last_output and isinstance(twin[1], nn.Identity)
    assert type(twin[3]) is nn.Conv2d and isinstance(net[0], nn.Conv2d)  # the 2nd not kept; the model untouched
    got = run(twin, x)
    assert (got - want).abs().max().item() < 1e-5
    assert measured_twin(net, (x,), lambda label, fns: {"stage": 1.0, "unfused": 1.0}, 0.05, False)[0] is None


class Unbatched(nn.Module):
    """Calls its convolution on one image (3-D): the kernel takes 4-D inputs only."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(1, 4, 3), nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(x[0])).unsqueeze(0)


def test_a_convolution_called_on_what_the_kernel_does_not_take_is_not_offered():
    net = Unbatched().eval()
    x = torch.randn(16, 1, 10, 10)
    timed = []
    twin, times = measured_twin(net, (x,), lambda label, fns: timed.append(label) or {}, 0.05, False)
    assert twin is None and times == {} and timed == []
    dep = bk.deploy(net, x, align=1, timer=fake_timer({"stage": 0.1}))
    assert (dep.model(x) - run(net, x)).abs().max().item() <= dep.tolerance
