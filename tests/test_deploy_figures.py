"""What deployment reports: sizes read from files (against hand-computed byte counts, and decoded back
to the weights), structured FLOP conventions on a tiny residual CNN counted by hand, the ONNX export
under onnxruntime, the layering that keeps metrics/latency/pruning below deployment, the CLI command
and a run with latency enabled."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import benchkit as bk
from benchkit.deployment.flops import channel_metrics, structured_flops, zero_input_channels
from benchkit.deployment.sizes import payload_bytes, write_formats
from benchkit.pruning.masks import apply_masks

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# sizes


def sized_net() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Conv(4→4, 3x3) on 4x4 → BN → flatten 16 → Linear(16→3). Conv: random mask with row 0 whole
    (so not 2:4) and channel 2 dead with its bias and BN entries; Linear: 2:4 with one group 1:4."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))
    conv = torch.rand(4, 4, 3, 3, generator=torch.Generator().manual_seed(3)) < 0.6
    conv[0] = True
    conv[2] = False
    keep = torch.tensor([True, True, False, True])
    lin = torch.tensor([True, True, False, False]).repeat(3, 4)
    lin[0, 4:8] = torch.tensor([False, True, False, False])
    masks = {"0.weight": conv, "0.bias": keep, "1.weight": keep, "1.bias": keep, "3.weight": lin}
    apply_masks(net, masks)
    return net.eval(), masks


def test_sizes_equal_hand_computed_bytes_and_decode_to_the_weights(tmp_path):
    net, masks = sized_net()
    nnz_conv, nnz_lin = int(masks["0.weight"].sum()), int(masks["3.weight"].sum())
    assert nnz_lin == 23
    compacted = bk.compact(net, torch.randn(2, 4, 4, 4), measure_latency=False).model
    sizes = write_formats(net, tmp_path, compacted=compacted)

    other = 4 * (4 + 4 + 4 + 4 + 4 + 3) + 8  # conv bias, BN weight/bias/mean/var, linear bias; int64 counter
    dense = 4 * (144 + 48) + other
    assert sizes["dense_fp32"].payload_bytes == dense
    # CSR: int32 row offsets (rows + 1), int32 columns and fp32 values per non-zero
    assert sizes["sparse_csr"].payload_bytes == (4 * 5 + 8 * nnz_conv) + (4 * 4 + 8 * nnz_lin) + other
    # bitmask: one bit per weight, packed, plus fp32 values
    assert sizes["sparse_bitmask"].payload_bytes == (18 + 4 * nnz_conv) + (6 + 4 * nnz_lin) + other
    # 2:4: the conv is not 2:4 (row 0 is whole) and stays dense; the linear keeps exactly 2 fp32 values
    # per group of 4 (24, one padded) and a 2-bit index for each (48 bits = 6 bytes)
    assert sizes["n_m"].format == "n_m_2_4"
    assert sizes["n_m"].payload_bytes == 4 * 144 + (4 * 24 + 6) + other
    # compacted: channel 2 gone from conv rows, bias, BN and the linear's 4 inputs it fed
    assert sizes["compacted_fp32"].payload_bytes == 4 * (3 * 4 * 9 + 3 + 4 * 3 + 3 * 12 + 3) + 8
    for s in sizes.values():  # the figures are read from the files themselves
        assert s.path.exists() and s.file_bytes == s.path.stat().st_size > s.payload_bytes
        assert s.payload_bytes == payload_bytes(s.path)

    # every format decodes back to the effective weights
    w_conv = (net[0].weight_orig * net[0].weight_mask).detach()
    w_lin = (net[3].weight_orig * net[3].weight_mask).detach()
    csr = torch.load(sizes["sparse_csr"].path, weights_only=True)
    rebuilt = torch.sparse_csr_tensor(csr["0.weight.crow_indices"].long(), csr["0.weight.col_indices"].long(),
                                      csr["0.weight.values"], (4, 36), check_invariants=True).to_dense()
    assert torch.equal(rebuilt.reshape(4, 4, 3, 3), w_conv)
    bm = torch.load(sizes["sparse_bitmask"].path, weights_only=True)
    bits = torch.from_numpy(np.unpackbits(bm["3.weight.bitmask"].numpy())[:48].astype(bool))
    dense_lin = torch.zeros(48)
    dense_lin[bits] = bm["3.weight.values"]
    assert torch.equal(dense_lin.reshape(3, 16), w_lin)
    nm = torch.load(sizes["n_m"].path, weights_only=True)
    assert torch.equal(nm["0.weight"], w_conv)
    idx_bits = np.unpackbits(nm["3.weight.indices"].numpy())[:48].reshape(24, 2)
    idx = torch.from_numpy(idx_bits[:, 0] * 2 + idx_bits[:, 1]).long().reshape(12, 2)
    groups = torch.zeros(12, 4).scatter(1, idx, nm["3.weight.values"].reshape(12, 2))
    assert torch.equal(groups.reshape(3, 16), w_lin)
    assert set(torch.load(sizes["dense_fp32"].path, weights_only=True)) == {
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
        "3.weight", "3.bias"}  # no *_mask bookkeeping


def test_n_m_is_written_only_when_some_weight_is_n_m(tmp_path):
    net = nn.Sequential(nn.Linear(8, 4))
    assert "n_m" not in write_formats(net, tmp_path)
    with pytest.raises(ValueError, match="0 < N < M"):
        write_formats(net, tmp_path, nm=(4, 4))


# ---------------------------------------------------------------------------------------------
# structured FLOP conventions


class Residual(nn.Module):
    """a: 3→4 (3x3, pad 1) → relu → h;  h + b(h) → relu → stream;  c: 4→5 (1x1);  fc: 5→2 on the mean."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(h + self.b(h))
        return self.fc(torch.relu(self.c(h)).mean((2, 3)))


def kill_rows(net: nn.Module, layer: str, rows: list[int]) -> None:
    m = net.get_submodule(layer)
    w = torch.ones_like(m.weight, dtype=torch.bool)
    w[rows] = False
    b = torch.ones(m.weight.shape[0], dtype=torch.bool)
    b[rows] = False
    apply_masks(net, {f"{layer}.weight": w, f"{layer}.bias": b})


def test_three_flop_conventions_by_hand():
    torch.manual_seed(0)
    net = Residual()
    kill_rows(net, "a", [1, 3])  # a's channel 1 dead: b reads zeros there, but b keeps the sum alive
    kill_rows(net, "b", [2, 3])  # channel 3 dead on both sides of the add: gone from the stream
    kill_rows(net, "c", [0])     # fc's input 0 is the mean of a dead channel
    f = structured_flops(net, (3, 6, 6))
    pos = 36  # 6x6 output positions of every conv
    dense = 4 * 27 * pos + 4 * 36 * pos + 5 * 4 * pos + 5 * 2
    assert f["structured_flops_dense"] == dense == 9802
    # ShrinkBench: surviving rows only (a 2 of 4, b 2 of 4, c 4 of 5, fc all)
    shrink = 2 * 27 * pos + 2 * 36 * pos + 4 * 4 * pos + 10
    # compacted: only channel 3 leaves the add's group (dead on both sides); c's channel 0 leaves c and fc
    compacted = 3 * 27 * pos + 3 * 3 * 9 * pos + 4 * 3 * pos + 2 * 4
    # skipping zero inputs too: b's live rows 0, 1 read a's live channels 0, 2; c's 4 rows read stream
    # channels 0, 1, 2 (3 is dead); fc reads c's 4 live channels
    skip = 2 * 27 * pos + 2 * 2 * 9 * pos + 4 * 3 * pos + 2 * 4
    assert (f["structured_flops_shrinkbench"], f["structured_flops_compacted"],
            f["structured_flops_skip_zero_inputs"]) == (shrink, compacted, skip) == (5122, 6272, 3680)
    assert f["structured_speedup_skip_zero_inputs"] == pytest.approx(9802 / 3680)
    # ShrinkBench's figure is the one benchkit.metrics reports
    assert f["structured_speedup_shrinkbench"] == pytest.approx(bk.model_metrics(net, (3, 6, 6))["theoretical_speedup"])
    m = bk.model_metrics(net, (3, 6, 6))
    assert m["flops_nonzero"] == shrink
    ch = channel_metrics(net, (3, 6, 6))
    assert ch["compacted_flops"] == compacted and ch["structured_flops_skip_zero_inputs"] == skip


def test_zero_inputs_follow_the_dataflow_not_the_graph():
    torch.manual_seed(0)

    class Soft(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(4, 2, 1)
            self.c = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(torch.relu(y)) + self.c(torch.softmax(y, dim=1))

    net = Soft()
    kill_rows(net, "a", [0])
    z = zero_input_channels(net, torch.randn(2, 3, 4, 4))
    assert z["a"].tolist() == [False] * 3
    assert z["b"].tolist() == [True, False, False, False]  # relu(0) = 0
    assert z["c"].tolist() == [False] * 4  # softmax makes the dead channel live


# ---------------------------------------------------------------------------------------------
# ONNX


def test_onnx_export_matches_under_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from benchkit.deployment.onnx_export import export_onnx

    net, _ = sized_net()
    compacted = bk.compact(net, torch.randn(2, 4, 4, 4), measure_latency=False).model.eval()
    rep = export_onnx(compacted, torch.randn(2, 4, 4, 4), tmp_path / "m.onnx", batch_size=5, threads=1,
                      warmup=0, repeats=2)
    assert rep.path.exists() and rep.file_bytes == rep.path.stat().st_size and rep.dynamic_batch
    assert rep.max_abs_diff <= rep.tolerance < 1e-3
    assert rep.latency_onnxruntime_ms > 0 and rep.latency_torch_ms > 0 and rep.setting["batch_size"] == 5
    assert {"onnx", "onnxruntime", "onnxscript", "torch"} <= set(rep.versions)
    # an independent run of the file at another batch size against the masked model itself
    import onnxruntime as ort

    x = torch.randn(7, 4, 4, 4)
    session = ort.InferenceSession(str(rep.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = net(x).numpy()
    assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


# ---------------------------------------------------------------------------------------------
# layering: the layer below never imports the layer above, not even inside a function

LOWER = {
    "benchkit/metrics.py": ("benchkit.deployment", "benchkit.latency", "benchkit.experiment"),
    "benchkit/latency.py": ("benchkit.deployment", "benchkit.experiment"),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_lower_layer_imports_a_higher_one():
    rules = dict(LOWER)
    for path in (REPO / "benchkit" / "pruning").glob("*.py"):
        rules[str(path.relative_to(REPO))] = ("benchkit.metrics", "benchkit.latency", "benchkit.deployment",
                                              "benchkit.experiment", "benchkit.timing")
    for rel, forbidden in rules.items():
        bad = [m for m in imported_modules(REPO / rel) if m.startswith(forbidden)]
        assert not bad, f"{rel} imports {bad}"
    assert not (REPO / "benchkit" / "pruning" / "compact.py").exists()


# ---------------------------------------------------------------------------------------------
# CLI and runs


def write_checkpoint(folder: Path) -> Path:
    from benchkit.config import ExperimentConfig
    from benchkit.models import build_model

    cfg = ExperimentConfig.from_dict({"data": {"name": "digits"}, "model": {"name": "lenet5"},
                                      "output_dir": str(folder)})
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 8, 8), 10)
    bk.prune(model, compression=2, granularity="channel", scope="layer", exclude=["fc2"])
    bk.prune(model, compression=4, granularity="element", scope="layer", exclude=["fc2"])
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    torch.save(model.state_dict(), folder / "model.pt")
    return folder


def test_cli_deploy_writes_model_report_sizes_and_onnx(tmp_path, capsys, monkeypatch):
    import benchkit.deployment.artifacts as artifacts
    from benchkit.cli import main

    asked = []
    real = artifacts.deploy
    monkeypatch.setattr(artifacts, "deploy", lambda *a, **kw: asked.append(kw) or real(*a, **kw))
    run = write_checkpoint(tmp_path / "run")
    out = tmp_path / "out"
    assert main(["deploy", str(run), "--out", str(out), "--batch-size", "4", "--threads", "1", "--repeats", "2",
                 "--warmup", "0", "--compile", "--align", "1", "--no-fold-batchnorm", "--no-fused-stages"]) == 0
    assert [(kw["fold_batchnorm"], kw["fused_stages"]) for kw in asked] == [(False, False)]
    printed = capsys.readouterr().out
    assert "deployed as" in printed and f"written to {out}" in printed
    report = json.loads((out / "deploy.json").read_text())
    # --compile: every whole-model variant timed compiled too, the dense one included
    assert report["not_measured"] == {} and report["latency_variant_dense_compiled_ms"] > 0
    assert report["latency_variant_compacted_compiled_ms"] > 0
    # a convolutional model: the channels-last twins too; --align 1: no aligned variant
    assert report["latency_variant_dense_channels_last_compiled_ms"] > 0
    assert not any(k.startswith("latency_variant_aligned") for k in report)
    assert Path(report["saved"]).exists() and report["saved_format"] in ("torch.export", "torchscript")
    assert report["deploy_batch_size"] == 4 and report["deploy_threads"] == 1
    assert report["structured_speedup_compacted"] > 1 and report["compacted_params"] > 0
    for fmt in ("dense_fp32", "sparse_csr", "sparse_bitmask", "compacted_fp32"):
        assert report[f"size_payload_{fmt}"] == payload_bytes(out / "formats" / f"{fmt}.pt")
    if importlib.util.find_spec("onnxruntime") is not None:
        assert report["onnx_max_abs_diff"] <= 1e-3 and (out / "model.onnx").exists()
    else:  # the optional dependency is missing: said so, everything else done
        assert "pip install onnxruntime" in report["onnx_skipped"]
    table = (out / "deploy_layers.csv").read_text().splitlines()
    assert table[0].startswith("layer,type,shape,deployed_shape,density,theoretical_speedup,compacted_speedup,form")
    assert [row.split(",")[0] for row in table[1:]] == ["conv1", "conv2", "fc1", "fc2"]
    # the model file loads with torch alone and gives the checkpoint's outputs
    from benchkit.deployment.artifacts import load_model

    model, shape, _ = load_model(run / "model.pt", run / "config.yaml")
    x = torch.randn(3, *shape)
    with torch.no_grad():
        ref, got = model(x), bk.load_deployed(report["saved"])(x)
    assert (got - ref).abs().max().item() <= 1e-5 + 1e-4 * ref.abs().max().item()


def test_cli_deploy_refuses_bad_arguments_before_loading(tmp_path, capsys):
    from benchkit.cli import main

    run = write_checkpoint(tmp_path / "run")
    assert main(["deploy", str(run), "--forms", "csr,nope"]) == 2
    assert "unknown deploy form 'nope'" in capsys.readouterr().err
    assert main(["deploy", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["deploy", str(run), "--batch-size", "0"]) == 2
    assert main(["deploy", str(run), "--align", "0"]) == 2
    assert "--align" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["deploy", str(run), "--device", "cuda"]) == 2
        assert "no CUDA" in capsys.readouterr().err


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_a_run_with_latency_reports_theory_beside_practice(tmp_path, granularity):
    from benchkit.config import ExperimentConfig
    from benchkit.experiment import PruningExperiment

    cfg = ExperimentConfig.from_dict({
        "data": {"name": "digits"}, "model": {"name": "lenet300", "kwargs": {"hidden": [32, 16]}},
        "train": {"epochs": 1, "lr": 0.05, "batch_size": 64}, "progress": False,
        "output_dir": str(tmp_path / "runs"),
        "prune": {"timing": "post", "compression": 4, "granularity": granularity, "scope": "layer",
                  "exclude": ["fc3"], "finetune": {"epochs": 0}},
        "latency": {"enabled": True, "batch_size": 8, "threads": 1, "warmup": 0, "repeats": 2}})
    result = PruningExperiment(cfg).run()
    m = result.metrics
    assert m["deploy_speedup"] == pytest.approx(m["latency_ms"] / m["latency_deployed_ms"])
    assert m["deploy_efficiency"] == pytest.approx(m["deploy_speedup"] / m["theoretical_speedup"])
    assert (m["latency_batch_size"], m["latency_threads"]) == (8, 1)
    layers = result.layers
    assert {"deploy_form", "deploy_reason", "latency_dense_ms", "latency_deployed_ms", "measured_speedup",
            "efficiency"} <= set(layers.columns)
    assert layers["efficiency"].tolist() == pytest.approx((layers["measured_speedup"] / layers["speedup"]).tolist())
    if granularity == "channel":
        assert m["structured_speedup_shrinkbench"] == pytest.approx(m["theoretical_speedup"])
        assert m["structured_speedup_compacted"] == pytest.approx(m["compacted_speedup"])
        assert m["structured_speedup_skip_zero_inputs"] >= m["structured_speedup_compacted"]
        assert m["latency_speedup"] == pytest.approx(m["latency_ms"] / m["latency_compacted_ms"])
    else:
        assert not any(k.startswith(("structured_", "compacted_")) for k in m)
        assert not math.isnan(m["deploy_speedup"])
