"""bk.deploy: every form reproduces the dense layer, the choice never takes a slower form (a fake timer
makes it deterministic), saved models load with torch alone, and the compacted path agrees with the
masked model. No wall-clock asserts: the timers here are fakes."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import benchkit as bk
from benchkit.deployment.choose import pick
from benchkit.deployment.core import MODEL, DeployError, kind
from benchkit.deployment.forms import (
    FORMS,
    FormError,
    FusedCsrLinear,
    SparseConv2d,
    SparseLinear,
    is_two_four,
)
from benchkit.pruning.masks import apply_masks
from benchkit.registry import UnknownNameError

torch.set_num_threads(1)
SPARSE_FORMS = ["csr", "fused_csr", "torch_csr", "torch_bsr4", "torch_bsr8", "torch_bsr16"]


def fake_timer(layer_ms: dict[str, float], model_ms: dict[str, float] | None = None, calls: list | None = None):
    """Times by form name (missing: 1.0 ms); whole models by variant, a twin (channels-last, compiled)
    as its source unless given. Nothing is run or timed."""
    model_ms = model_ms if model_ms is not None else {"dense": 3.0, "compacted": 2.0, "deployed": 1.0}

    def timer(label, fns):
        if calls is not None:
            calls.append((label, sorted(fns)))
        table = model_ms if label == MODEL else layer_ms
        return {k: table.get(k, table.get(kind(k), 1.0) if label == MODEL else 1.0) for k in fns}
    return timer


def random_mask(shape, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def sparse_layer(layer: nn.Module, density: float = 0.2, seed: int = 0, dead_rows=(1,)) -> nn.Module:
    """The layer with a random mask folded in and whole rows zero (an empty CSR row / embedding bag)."""
    with torch.no_grad():
        layer.weight.mul_(random_mask(layer.weight.shape, density, seed))
        for r in dead_rows:
            layer.weight[r] = 0
    return layer.eval()


LAYERS = {
    "linear_2d": (lambda: nn.Linear(32, 16), (5, 32)),
    "linear_3d": (lambda: nn.Linear(32, 16, bias=False), (2, 3, 32)),
    "linear_1d": (lambda: nn.Linear(32, 16), (32,)),
    "conv3x3_stride2_pad1": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), (3, 8, 9, 9)),
    "conv1x1": (lambda: nn.Conv2d(16, 16, 1), (2, 16, 5, 5)),
    "conv_dilated_rect": (lambda: nn.Conv2d(4, 16, (3, 2), padding=(2, 1), dilation=2, bias=False), (2, 4, 7, 8)),
    "conv_unbatched": (lambda: nn.Conv2d(8, 16, 3), (8, 6, 6)),
}


@pytest.mark.parametrize("form_name", SPARSE_FORMS)
@pytest.mark.parametrize("case", list(LAYERS))
def test_every_sparse_form_reproduces_the_dense_layer(form_name, case):
    torch.manual_seed(0)
    make, shape = LAYERS[case]
    layer = sparse_layer(make())
    x = torch.randn(shape)
    form = FORMS.get(form_name)
    reason = form.check(layer, torch.device("cpu"))
    if reason is not None and form_name == "fused_csr":  # Linear only
        assert isinstance(layer, nn.Conv2d) and "Linear" in reason
        return
    if reason is not None:  # only BSR may refuse, and only for shapes that are not whole blocks
        assert form_name.startswith("torch_bsr") and "blocks" in reason
        rows, cols = layer.weight.shape[0], layer.weight[0].numel()
        assert rows % form.blocksize or cols % form.blocksize
        return
    module = form.build(layer)
    assert isinstance(module, SparseLinear | SparseConv2d | FusedCsrLinear)
    with torch.no_grad():
        ref, got = layer(x), module(x)
    assert got.shape == ref.shape
    # laid out as the dense layer's output: a transposed view slowed every op after it (attention lost
    # its fused kernel and a deployed GPT ran 1.6x slower than dense)
    assert got.is_contiguous() and got.stride() == ref.stride()
    # fp32 sums in another order: the stated tolerance atol + rtol * max|dense|, and it is tight
    assert (got - ref).abs().max().item() <= form.tolerance(ref)
    assert form.tolerance(ref) < 1e-3


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 64, 70])
@pytest.mark.parametrize("shape,density,bias", [((512, 512), 0.02, True), ((37, 29), 0.3, False),
                                                ((300, 784), 0.1, True), ((16, 24), 0.0, True),
                                                ((24, 16), 1.0, False)])
def test_fused_csr_kernel_equals_f_linear(rows, shape, density, bias):
    """benchkit::csr_linear against F.linear on the same (masked) weight: every block size the kernel picks
    (16, 32 samples; partial blocks), tails past its 8x8 transposes (37x29), empty and full rows, no bias,
    and with two threads splitting the outputs."""
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)
    weight[1] = 0  # an empty CSR row
    b = torch.randn(shape[0], generator=g) if bias else None
    layer = nn.Linear(shape[1], shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias:
            layer.bias.copy_(b)
    module = FORMS.get("fused_csr").build(layer)
    x = torch.randn(rows, shape[1], generator=g)
    ref = torch.nn.functional.linear(x, weight, b)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                got = module(x)
            assert got.shape == ref.shape and got.is_contiguous()
            assert (got - ref).abs().max().item() <= FORMS.get("fused_csr").tolerance(ref)
    finally:
        torch.set_num_threads(before)
    with torch.no_grad():  # any leading dims, as nn.Linear
        assert module(x.reshape(1, rows, -1)).shape == (1, rows, shape[0]) and module(x[0]).shape == (shape[0],)


def test_fused_csr_without_a_compiler_is_skipped_with_the_reason(tmp_path, monkeypatch):
    """No C++ compiler (CXX points nowhere, a fresh build folder): the form says why, deploy measures the
    others and reports it, nothing raises."""
    from benchkit.deployment import fused

    monkeypatch.setattr(fused, "_STATE", {})
    monkeypatch.setattr(fused, "_cpu_tag", lambda: "nocompiler")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    reason = FORMS.get("fused_csr").check(nn.Linear(8, 4), torch.device("cpu"))
    assert reason is not None and "kernels could not be built" in reason and "C++ compiler" in reason
    dep = bk.deploy(pruned(), torch.randn(4, 3, 6, 6), forms=["fused_csr", "csr"], timer=fake_timer({"csr": 0.1}))
    assert dep.layers[2].not_measured["fused_csr"] == reason and dep.layers[2].form == "csr"
    assert dep.stage_note == f"no fused convolution stages: {reason}"  # nor are the convolution stages timed


def test_grouped_and_string_padded_convs_are_left_dense():
    csr = FORMS.get("csr")
    assert "grouped" in csr.check(nn.Conv2d(4, 4, 3, groups=2), torch.device("cpu"))
    assert "padding" in csr.check(nn.Conv2d(4, 4, 3, padding="same"), torch.device("cpu"))
    assert "only Linear and Conv2d" in csr.check(nn.Conv1d(4, 4, 3), torch.device("cpu"))


def test_semi_structured_refuses_cpu_cleanly():
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(32, 16))
    assert is_two_four(layer.weight) and not is_two_four(torch.ones(4, 8))
    form = FORMS.get("semi_structured")
    assert "CUDA" in form.check(layer, torch.device("cpu"))
    with pytest.raises(FormError, match="CUDA"):
        form.build(layer)
    if not torch.cuda.is_available():
        with pytest.raises(DeployError, match="no CUDA"):
            bk.deploy(nn.Sequential(layer), torch.randn(2, 64), device="cuda")


def test_semi_structured_names_the_shapes_torch_refuses(monkeypatch):
    # found on an H200: a GPT's 85-token lm_head (85x1024, 2:4) passed the check, then
    # to_sparse_semi_structured refused it ("both dimensions must be ... a multiple of (16, 16)")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    form, cuda = FORMS.get("semi_structured"), torch.device("cuda")

    def two_four(rows: int, cols: int) -> nn.Linear:
        layer = nn.Linear(cols, rows)
        with torch.no_grad():
            layer.weight.mul_(torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(rows, cols // 4))
        return layer

    assert "multiples of 16" in form.check(two_four(85, 1024), cuda)
    assert "multiples of 16" in form.check(two_four(96, 1000), cuda)
    assert form.check(two_four(96, 1024), cuda) is None
    assert "not 2:4" in form.check(nn.Linear(1024, 96), cuda)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA")
def test_semi_structured_on_cuda_matches_dense():
    layer = nn.Linear(128, 64).cuda().half()
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([0.0, 1.0, 1.0, 0.0], device="cuda", dtype=torch.half).repeat(64, 32))
    form = FORMS.get("semi_structured")
    assert form.check(layer, torch.device("cuda")) is None
    x = torch.randn(32, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        ref, got = layer(x), form.build(layer)(x)
    assert (got.float() - ref.float()).abs().max().item() <= form.tolerance(ref.float())


# ---------------------------------------------------------------------------------------------
# the choice


def test_pick_takes_the_fastest_only_when_it_beats_the_baseline_by_the_margin():
    assert pick({"dense": 1.0, "csr": 1.2}, "dense", 0.05)[0] == "dense"        # slower: never
    assert pick({"dense": 1.0, "csr": 0.96}, "dense", 0.05)[0] == "dense"       # inside the margin
    assert pick({"dense": 1.0, "csr": 0.95}, "dense", 0.05)[0] == "csr"         # 1.05 * 0.95 <= 1
    assert pick({"dense": 1.0, "csr": 0.5, "torch_csr": 0.4}, "dense", 0.05)[0] == "torch_csr"
    assert pick({"dense": 1.0, "csr": math.nan, "torch_csr": math.inf}, "dense", 0.05)[0] == "dense"
    chosen, why = pick({"dense": 2.0, "csr": 0.5}, "dense", 0.0)
    assert chosen == "csr" and "4.00x" in why
    with pytest.raises(ValueError, match="baseline"):
        pick({"csr": 1.0}, "dense", 0.05)


def mlp_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def pruned(density: float = 0.15) -> nn.Module:
    net = mlp_cnn()
    apply_masks(net, {f"{i}.weight": random_mask(net[i].weight.shape, density, i) for i in (0, 2, 6, 8)})
    return net


@pytest.mark.parametrize("form_name", ["csr", "torch_csr", "torch_bsr4"])
def test_deployed_model_reproduces_the_masked_one(form_name):
    net = pruned()
    x = torch.randn(4, 3, 6, 6)
    dep = bk.deploy(net, x, forms=[form_name], timer=fake_timer({form_name: 0.1}))
    expected = {"0": form_name, "2": form_name, "6": form_name, "8": form_name}
    if form_name == "torch_bsr4":
        expected["0"] = expected["8"] = "dense"  # 8 x 27 and 10 x 32 weights: not whole 4x4 blocks
        assert "blocks" in dep.layers[0].not_measured["torch_bsr4"] and "10x32" in dep.layers[3].not_measured["torch_bsr4"]
    assert dep.forms == expected and dep.variant == "deployed"
    assert dep.exportable == (form_name == "csr")
    # on inputs it never saw, at another batch size
    x2 = torch.randn(7, 3, 6, 6)
    with torch.no_grad():
        ref, got = net.eval()(x2), dep.model(x2)
    assert (got - ref).abs().max().item() <= 1e-5 + 1e-4 * ref.abs().max().item()
    with torch.no_grad():
        scale = net(x).abs().max().item()
    assert dep.max_abs_diff <= dep.tolerance and dep.tolerance == pytest.approx(1e-5 + 1e-4 * scale)
    assert any(isinstance(m, SparseLinear | SparseConv2d) for m in dep.model.modules())
    assert net[0].weight_orig.shape == (8, 3, 3, 3) and hasattr(net[0], "weight_mask")  # caller untouched


def test_a_slower_form_is_never_chosen():
    net = pruned()
    calls: list = []
    dep = bk.deploy(net, torch.randn(4, 3, 6, 6), timer=fake_timer({"dense": 1.0, "csr": 1.5, "torch_csr": 1.01,
                                                                     "fused_csr": 1.02}, calls=calls))
    assert set(dep.forms.values()) == {"dense"} and dep.variant == "dense"
    assert not any(isinstance(m, SparseLinear | SparseConv2d | FusedCsrLinear) for m in dep.model.modules())
    # every layer was measured with the CPU sparse forms (the fused kernel: Linear layers); 2:4 says why not
    layer_calls = [c for c in calls if c[0] != MODEL and "_stages " not in c[0]]  # not the stage timings
    assert [c[0] for c in layer_calls] == ["0", "2", "6", "8"]
    assert [c[1] for c in layer_calls] == [["csr", "dense", "torch_csr"]] * 2 + [["csr", "dense", "fused_csr", "torch_csr"]] * 2
    assert "Linear" in dep.layers[0].not_measured["fused_csr"]
    assert all("CUDA" in r.not_measured["semi_structured"] for r in dep.layers)
    assert all("not 5% faster" in r.reason for r in dep.layers)
    # nothing else to compare at the model level than the dense model's channels-last twin (it has convs)
    assert calls[-1] == (MODEL, ["dense", "dense_channels_last"])
    assert dep.measured_speedup == 1.0


def test_fastest_form_per_layer_and_the_whole_model_check():
    net = pruned()
    x = torch.randn(4, 3, 6, 6)
    times = {"dense": 1.0, "csr": 0.5, "torch_csr": 0.3}
    dep = bk.deploy(net, x, channels_last=False, timer=fake_timer(times))
    assert set(dep.forms.values()) == {"torch_csr"} and dep.variant == "deployed"
    assert dep.layers[0].times_ms == {"dense": 1.0, "csr": 0.5, "torch_csr": 0.3}
    assert dep.layers[0].measured_speedup == pytest.approx(1.0 / 0.3)
    assert dep.measured_speedup == pytest.approx(3.0)
    # per layer faster, but the assembled model is not: the dense model is kept and every layer says why
    dep = bk.deploy(net, x, timer=fake_timer(times, {"dense": 1.0, "deployed": 1.2}))
    assert dep.variant == "dense" and set(dep.forms.values()) == {"dense"}
    assert all("whole model" in r.reason for r in dep.layers)
    assert not any(isinstance(m, SparseLinear | SparseConv2d) for m in dep.model.modules())


def test_layers_too_dense_are_not_tried_and_say_so():
    net = pruned(density=0.95)
    calls: list = []
    dep = bk.deploy(net, torch.randn(2, 3, 6, 6), max_density=0.9, timer=fake_timer({"csr": 0.1}, calls=calls))
    assert set(dep.forms.values()) == {"dense"}
    assert all("max_density" in r.not_measured["csr"] for r in dep.layers)
    assert all(c[1] == ["dense"] for c in calls if c[0] != MODEL and "_stages " not in c[0])


def test_bad_arguments_are_refused_before_work():
    net = pruned()
    with pytest.raises(UnknownNameError, match="unknown deploy form 'cssr'; allowed: csr, dense"):
        bk.deploy(net, torch.randn(2, 3, 6, 6), forms=["cssr"])
    with pytest.raises(DeployError, match="batch_size"):
        bk.deploy(net, torch.randn(2, 3, 6, 6), batch_size=0)
    with pytest.raises(DeployError, match="no Conv/Linear"):
        bk.deploy(nn.Sequential(nn.ReLU()), torch.randn(2, 3))
    with pytest.raises(DeployError, match="device"):
        bk.deploy(net, torch.randn(2, 3, 6, 6), device="tpu")
    with pytest.raises(TypeError, match="example inputs"):
        bk.deploy(net, "not a tensor")


# ---------------------------------------------------------------------------------------------
# compaction inside deploy


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def dead_conv1_channels(net: Block, dead=(0, 3, 5), batchnorm: bool = True) -> Block:
    """Whole output channels of ``conv1`` masked (and, with ``batchnorm``, bn1's affine terms), as channel
    pruning leaves them: compaction removes them."""
    keep = torch.ones(16, dtype=torch.bool)
    keep[list(dead)] = False
    masks = {"conv1.weight": keep[:, None, None, None].expand(16, 3, 3, 3).clone(), "conv1.bias": keep.clone()}
    if batchnorm:
        masks.update({"bn1.weight": keep.clone(), "bn1.bias": keep.clone()})
    apply_masks(net, masks)
    return net


def test_compaction_then_sparse_forms_reproduce_the_masked_model():
    torch.manual_seed(0)
    net = Block()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 1.5)
    keep = torch.ones(16, dtype=torch.bool)
    keep[[0, 3, 5, 9, 12]] = False
    rows = keep[:, None, None, None].expand(16, 3, 3, 3)
    apply_masks(net, {"conv1.weight": rows.clone(), "conv1.bias": keep.clone(), "bn1.weight": keep.clone(),
                      "bn1.bias": keep.clone(), "conv2.weight": random_mask((16, 16, 3, 3), 0.2, 1),
                      "fc.weight": random_mask((10, 16), 0.3, 2)})
    x = torch.randn(3, 3, 5, 5)
    dep = bk.deploy(net, x, timer=fake_timer({"csr": 0.2}, {"dense": 3.0, "compacted": 2.0, "deployed": 1.0}))
    assert dep.variant == "deployed" and dep.compaction is not None
    conv1, conv2 = dep.layers[0], dep.layers[1]
    assert conv1.shape == (16, 3, 3, 3) and conv1.deployed_shape == (11, 3, 3, 3)
    assert conv2.deployed_shape == (16, 11, 3, 3) and "original" in conv2.times_ms
    assert conv1.compacted_speedup == pytest.approx(16 / 11) and dep.layers[2].compacted_speedup == 1.0
    assert conv1.form == "dense" and "max_density" in conv1.not_measured["csr"]  # compacted rows are dense
    assert conv2.form == "csr" and dep.layers[2].form == "csr"
    assert dep.compacted_theoretical_speedup == pytest.approx(dep.compaction.flops_speedup)
    # the compaction's model stays the plain compacted network (what the size files and the ONNX export use):
    # the sparse forms went into the deployed copy only (a CSR form there broke torch.export in CI)
    plain = dep.compaction.model
    assert plain is not dep.model and type(plain.fc) is nn.Linear and type(plain.conv2) is nn.Conv2d
    assert plain.conv1.weight.shape == (11, 3, 3, 3) and type(dep.model.fc) is not nn.Linear
    x2 = torch.randn(5, 3, 5, 5)
    with torch.no_grad():
        ref, got = net.eval()(x2), dep.model(x2)
    assert (got - ref).abs().max().item() <= 1e-5 + 1e-4 * ref.abs().max().item()
    # the compacted model alone is kept when the sparse forms do not pay as a whole
    dep = bk.deploy(net, x, timer=fake_timer({"csr": 0.2}, {"dense": 3.0, "compacted": 2.0, "deployed": 2.5}))
    assert dep.variant == "compacted" and set(dep.forms.values()) == {"dense"}
    assert dep.model.conv1.out_channels == 11 and dep.measured_speedup == pytest.approx(1.5)
    # and the dense one when compaction does not pay either
    dep = bk.deploy(net, x, timer=fake_timer({}, {"dense": 1.0, "compacted": 1.0}))
    assert dep.variant == "dense" and dep.model.conv1.out_channels == 16


def test_the_report_table_and_summary():
    net = pruned()
    dep = bk.deploy(net, torch.randn(4, 3, 6, 6), threads=1, batch_size=8,
                    timer=fake_timer({"dense": 2.0, "csr": 0.5, "torch_csr": 1.0}))
    table = dep.table()
    assert list(table["layer"]) == ["0", "2", "6", "8"] and set(table["form"]) == {"csr"}
    assert table["measured_speedup"].tolist() == [4.0] * 4
    density = table["density"]
    assert table["theoretical_speedup"].tolist() == pytest.approx((1 / density).tolist())
    assert table["efficiency"].tolist() == pytest.approx((4.0 * density).tolist())
    assert {"csr_ms", "torch_csr_ms"} <= set(table.columns)
    s = dep.summary()
    assert s["deploy_variant"] == "deployed" and s["deploy_batch_size"] == 8 and s["deploy_threads"] == 1
    assert s["deploy_measured_speedup"] == 3.0
    assert s["deploy_efficiency"] == pytest.approx(3.0 / s["deploy_theoretical_speedup"])
    m = bk.model_metrics(net, (3, 6, 6))
    assert s["deploy_theoretical_speedup"] == pytest.approx(m["theoretical_speedup"])
    assert "| 0 | 8x3x3x3 |" in dep.markdown()


def test_compiled_variants_are_timed_beside_eager_and_credited_against_compiled_dense(tmp_path):
    """compile=True times every whole-model variant compiled too, dense included; the speedup divides the
    *fastest dense* runtime (here the compiled one, 2.5 ms), not eager dense (4 ms), by the kept variant."""
    net = pruned()
    x = torch.randn(4, 3, 6, 6)
    calls: list = []
    dep = bk.deploy(
        net, x, compile=True, threads=1, channels_last=False,
        timer=fake_timer({"csr": 0.5}, {"dense": 4.0, "deployed": 2.0, "dense_compiled": 2.5,
                                        "deployed_compiled": 1.0}, calls))
    assert [c[1] for c in calls if c[0] == MODEL] == [["dense", "dense_compiled", "deployed", "deployed_compiled"]]
    assert dep.variant == "deployed_compiled" and dep.not_measured == {}
    assert dep.dense_ms == 2.5 and dep.measured_speedup == 2.5
    assert dep.summary()["latency_dense_ms"] == 2.5 and dep.summary()["latency_deployed_ms"] == 1.0
    assert dep.model._compiled_call_impl is not None  # really compiled (nn.Module.compile)
    assert dep.eager_model is not None and dep.eager_model._compiled_call_impl is None
    assert set(dep.forms.values()) == {"csr"}
    with torch.no_grad():
        ref, got = net.eval()(x), dep.model(x)
    assert (got - ref).abs().max().item() <= dep.tolerance and dep.max_abs_diff <= dep.tolerance
    # saved: the eager module, which torch alone loads (compile it again after loading)
    saved = dep.save(tmp_path / "model")
    with torch.no_grad():
        again = saved.load()(x)
    assert saved.format == "torch.export" and (again - ref).abs().max().item() <= dep.tolerance
    # the compiler's own gain is not pruning's: compiled dense fastest -> measured speedup 1
    dep = bk.deploy(net, x, compile=True, threads=1, channels_last=False,
                    timer=fake_timer({"csr": 0.5}, {"dense": 4.0, "deployed": 3.0, "dense_compiled": 1.0,
                                                    "deployed_compiled": 1.02}))
    assert dep.variant == "dense_compiled" and dep.measured_speedup == 1.0 and set(dep.forms.values()) == {"dense"}
    # benchkit's own operator compiles too (its shape function is registered with torch.library)
    dep = bk.deploy(net, x, forms=["fused_csr"], compile=True, threads=1, channels_last=False,
                    timer=fake_timer({"fused_csr": 0.5}, {"dense": 4.0, "deployed": 2.0, "dense_compiled": 2.5,
                                                         "deployed_compiled": 1.0}))
    assert dep.variant == "deployed_compiled" and dep.forms["6"] == "fused_csr" and dep.not_measured == {}
    with torch.no_grad():
        assert (dep.model(x) - ref).abs().max().item() <= dep.tolerance


def test_channels_last_twins_are_timed_and_credited_against_the_fastest_dense_layout(tmp_path):
    """A convolutional model's variants are also timed with channels-last parameters (dense included):
    the kept one has them, gives the masked outputs on NCHW inputs, and its speedup divides the fastest
    dense layout's time (3 ms here, not NCHW's 4 ms). Under compile=True the channels-last twins compile too."""
    torch.manual_seed(0)
    net = Block()
    dead_conv1_channels(net)
    x = torch.randn(3, 3, 5, 5)
    calls: list = []
    dep = bk.deploy(net, x, forms=["dense"], align=1,
                    timer=fake_timer({}, {"dense": 4.0, "dense_channels_last": 3.0, "compacted": 2.5,
                                          "compacted_channels_last": 1.5}, calls))
    assert calls[-1] == (MODEL, ["compacted", "compacted_channels_last", "dense", "dense_channels_last"])
    assert dep.variant == "compacted_channels_last" and dep.dense_ms == 3.0 and dep.measured_speedup == 2.0
    assert dep.model.conv1.out_channels == 13
    for w in (dep.model.conv1.weight, dep.model.conv2.weight):
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    with torch.no_grad():
        ref, got = net.eval()(x), dep.model(x)
    assert (got - ref).abs().max().item() <= dep.tolerance
    saved = dep.save(tmp_path / "model")
    with torch.no_grad():
        assert (saved.load()(x) - ref).abs().max().item() <= dep.tolerance
    net = pruned()
    x = torch.randn(4, 3, 6, 6)
    # off, or a model without a 2-d convolution: no twin is timed
    calls.clear()
    bk.deploy(net, x, channels_last=False, timer=fake_timer({"csr": 0.5}, calls=calls))
    assert calls[-1] == (MODEL, ["dense", "deployed"])
    calls.clear()
    mlp = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    apply_masks(mlp, {"0.weight": random_mask((16, 12), 0.2, 0)})
    bk.deploy(mlp, torch.randn(4, 12), timer=fake_timer({"csr": 0.5}, calls=calls))
    assert calls[-1] == (MODEL, ["dense", "deployed"])


def test_the_fastest_dense_layout_is_the_baseline_a_variant_must_beat():
    """Compacted beats NCHW dense by 5% but channels-last dense by only 1%: channels-last dense is kept
    (measured speedup 1.0), not NCHW dense (which would have measured 0.98 of the fastest dense)."""
    torch.manual_seed(0)
    net = Block()
    dead_conv1_channels(net, batchnorm=False)
    dep = bk.deploy(net, torch.randn(3, 3, 5, 5), forms=["dense"], align=1, timer=fake_timer(
        {}, {"dense": 1.0, "dense_channels_last": 0.96, "compacted": 0.95, "compacted_channels_last": 0.97}))
    assert dep.variant == "dense_channels_last" and dep.measured_speedup == 1.0
    dep = bk.deploy(net, torch.randn(3, 3, 5, 5), forms=["dense"], align=1, timer=fake_timer(
        {}, {"dense": 1.0, "dense_channels_last": 0.96, "compacted": 0.9, "compacted_channels_last": 0.97}))
    assert dep.variant == "compacted" and dep.measured_speedup == pytest.approx(0.96 / 0.9)


def test_the_channels_last_twin_of_the_deployed_model_keeps_convolutions_dense_where_that_layout_wins():
    """Per-layer forms are chosen against the NCHW dense layer; a convolution whose chosen form loses to the
    dense layer in channels-last layout (on a channels-last input) is dense in the deployed model's
    channels-last twin, and the report says so when that twin wins. Linear layers keep their form."""
    net = pruned()
    x = torch.randn(4, 3, 6, 6)
    calls: list = []
    layer_ms = {"dense": 1.0, "csr": 0.5, "dense_channels_last": 0.3, "csr_channels_last": 0.6}
    dep = bk.deploy(net, x, forms=["csr"], timer=fake_timer(
        layer_ms, {"dense": 4.0, "deployed": 2.0, "dense_channels_last": 3.0, "deployed_channels_last": 1.0}, calls))
    assert [c for c in calls if c[1] == ["csr_channels_last", "dense_channels_last"]] == [
        ("0", ["csr_channels_last", "dense_channels_last"]), ("2", ["csr_channels_last", "dense_channels_last"])]
    assert dep.variant == "deployed_channels_last"
    assert dep.forms == {"0": "dense", "2": "dense", "6": "csr", "8": "csr"}
    assert "in channels-last layout the dense layer beats csr" in dep.layers[0].reason
    assert dep.layers[0].times_ms["dense_channels_last"] == 0.3 and dep.layers[1].times_ms["csr_channels_last"] == 0.6
    assert type(dep.model[0]) is nn.Conv2d and dep.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(dep.model[6], SparseLinear)
    with torch.no_grad():
        ref = net.eval()(x)
        assert (dep.model(x) - ref).abs().max().item() <= dep.tolerance
    # the NCHW deployed model keeps every chosen form
    dep = bk.deploy(net, x, forms=["csr"], timer=fake_timer(
        layer_ms, {"dense": 4.0, "deployed": 1.0, "dense_channels_last": 3.0, "deployed_channels_last": 2.0}))
    assert dep.variant == "deployed" and set(dep.forms.values()) == {"csr"} and isinstance(dep.model[0], SparseConv2d)
    # a form that also wins in channels-last layout stays in the twin
    dep = bk.deploy(net, x, forms=["csr"], timer=fake_timer(
        {**layer_ms, "csr_channels_last": 0.1}, {"dense": 4.0, "deployed": 2.0, "deployed_channels_last": 1.0}))
    assert dep.variant == "deployed_channels_last" and set(dep.forms.values()) == {"csr"}
    assert isinstance(dep.model[0], SparseConv2d)
    with torch.no_grad():  # it writes channels-last outputs there, as a dense conv with channels-last weights
        y = dep.model[0](x)
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        assert (dep.model(x) - ref).abs().max().item() <= dep.tolerance


def test_the_aligned_variant_rounds_channel_counts_up_and_keeps_the_exact_theory():
    """align=8 (the default) times the compaction with channel counts rounded up to multiples of 8 beside
    the exact one; when it wins, the report shows its shapes, the outputs are the masked model's, and the
    compacted theoretical speedup is still the exact compaction's. align=1 times no such variant."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 20), nn.ReLU(), nn.Linear(20, 5))
    rows = torch.ones(40, 24, dtype=torch.bool)
    rows[:19] = False  # 21 alive -> 24
    bias = torch.ones(40, dtype=torch.bool)
    bias[:19] = False
    apply_masks(mlp, {"0.weight": rows, "0.bias": bias})
    x = torch.randn(6, 24)
    calls: list = []
    dep = bk.deploy(mlp, x, forms=["dense"], timer=fake_timer({}, {"dense": 3.0, "compacted": 2.0, "aligned": 1.5},
                                                                calls))
    assert calls[-1] == (MODEL, ["aligned", "compacted", "dense"])
    assert dep.variant == "aligned" and dep.model[0].out_features == 24 and dep.model[2].in_features == 24
    assert dep.layers[0].deployed_shape == (24, 24) and dep.layers[1].deployed_shape == (20, 24)
    dense_flops, exact_flops = 24 * 40 + 40 * 20 + 20 * 5, 24 * 21 + 21 * 20 + 20 * 5
    assert dep.compacted_theoretical_speedup == pytest.approx(dense_flops / exact_flops)
    with torch.no_grad():
        ref = mlp.eval()(x)
    assert (dep.model(x) - ref).abs().max().item() <= dep.tolerance
    calls.clear()
    dep = bk.deploy(mlp, x, forms=["dense"], align=1, timer=fake_timer({}, calls=calls))
    assert calls[-1] == (MODEL, ["compacted", "dense"]) and dep.model[0].out_features == 21
    with pytest.raises(DeployError, match="align"):
        bk.deploy(mlp, x, align=0)


def test_a_compiled_variant_is_never_an_eager_one_in_disguise(monkeypatch):
    """Every nn.Module.compile'd module shares one entry of torch's cache, which holds a limited number of
    compilations; past that torch runs the module eagerly with only a logged warning. compile_copy refuses
    that (the variant is not measured, with the reason); deploy clears the cache first, so a long sweep of
    deploys compiles each. (The limit is lowered to 8 here, torch's default, to keep the test short.)"""
    from benchkit.deployment import compiled
    from benchkit.deployment.compiled import compile_copy

    monkeypatch.setattr(compiled, "RECOMPILE_LIMIT", 8)
    torch.compiler.reset()
    outcomes = []
    for width in range(2, 14):  # a new Linear shape each time: a new compilation
        model = nn.Sequential(nn.Linear(width, 3)).eval()
        outcomes.append(compile_copy(model, (torch.randn(2, width),), threads=1))
    refused = [why for m, why in outcomes if m is None]
    assert refused and all("recompile" in why.lower() for why in refused)
    assert all(m is not None for m, _ in outcomes[:8])
    dep = bk.deploy(pruned(), torch.randn(4, 3, 6, 6), compile=True, timer=fake_timer({"csr": 0.5}))
    assert dep.not_measured == {} and {"dense_compiled", "deployed_compiled"} <= set(dep.times_ms)
    torch.compiler.reset()


def test_a_compiler_that_fails_is_reported_and_the_eager_model_kept():
    """No working C++ compiler (a path that does not exist): every compiled variant is 'not measured'
    with torch's error, the eager choice stands, nothing raises."""
    import torch._inductor.config as inductor

    torch.compiler.reset()
    net = pruned()
    x = torch.randn(4, 3, 6, 6)
    with inductor.patch({"cpp.cxx": ("/nonexistent/bin/c++",), "fx_graph_cache": False}):
        dep = bk.deploy(net, x, compile=True, timer=fake_timer({"csr": 0.5}))
    torch.compiler.reset()
    assert set(dep.not_measured) == {"dense_compiled", "deployed_compiled", "dense_channels_last_compiled",
                                     "deployed_channels_last_compiled"}
    assert all(v.startswith("torch.compile failed: ") for v in dep.not_measured.values())
    assert dep.variant == "deployed" and dep.eager_model is None
    assert "dense_compiled not measured: torch.compile failed" in dep.markdown()


def test_deploy_name_survives_importing_the_package():
    """The package is benchkit.deployment: a package named deploy would shadow bk.deploy once imported."""
    import benchkit.deployment.artifacts  # noqa: F401
    import benchkit.deployment.core  # noqa: F401
    import benchkit.deployment.report  # noqa: F401

    assert callable(bk.deploy) and bk.deploy.__module__ == "benchkit.deployment.core"


# ---------------------------------------------------------------------------------------------
# saving: torch alone loads it back


LOADER = """
import sys, torch
path, xpath, ypath = sys.argv[1:]
if path.endswith(".pt2"):
    m = torch.export.load(path).module()
else:
    m = torch.jit.load(path)
y = m(torch.load(xpath))
assert not [k for k in sys.modules if k.startswith("benchkit")], "benchkit was imported"
torch.save(y, ypath)
"""


@pytest.mark.parametrize("form_name,suffix", [("csr", ".pt2"), ("torch_csr", ".ts"), ("fused_csr", ".pt2")])
def test_saved_model_loads_with_torch_alone(tmp_path, form_name, suffix):
    net = pruned()
    dep = bk.deploy(net, torch.randn(4, 3, 6, 6), forms=[form_name], timer=fake_timer({form_name: 0.1}))
    if form_name == "fused_csr":  # the Linear layers run benchkit's kernel; the file holds their csr twin
        assert dep.forms == {"0": "dense", "2": "dense", "6": "fused_csr", "8": "fused_csr"}
    saved = dep.save(tmp_path / "model")
    assert ("csr twin" in saved.note) == (form_name == "fused_csr")
    assert saved.path.suffix == suffix and saved.path.exists() and saved.dynamic_batch
    assert saved.format == ("torch.export" if suffix == ".pt2" else "torchscript")
    x = torch.randn(5, 3, 6, 6)
    torch.save(x, tmp_path / "x.pt")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no PYTHONPATH: benchkit is not importable
    r = subprocess.run([sys.executable, "-c", LOADER, str(saved.path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with torch.no_grad():
        ref = net.eval()(x)
    got = torch.load(tmp_path / "y.pt")
    assert (got - ref).abs().max().item() <= 1e-5 + 1e-4 * ref.abs().max().item()
