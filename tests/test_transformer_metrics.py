"""Transformer FLOPs against hand counts: per-token Linear work, attention's QKᵀ and AV, and
nn.MultiheadAttention (whose out_proj fvcore counts as 0 and whose fused path it does not see)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import benchkit as bk
from benchkit.attention_flops import count_attention
from benchkit.config import ModelConfig
from benchkit.models import build_model, split_attention
from benchkit.pruning.masks import apply_masks

torch.set_num_threads(1)

T, E, V, L, H = 6, 8, 11, 2, 2


def gpt() -> nn.Module:
    return build_model(ModelConfig(name="gpt", kwargs={"n_layer": L, "n_embd": E, "n_head": H}), (T,), V)


# per block: q, k, v, out (T·E·E each), fc (T·E·4E), proj (T·4E·E); lm_head T·E·V
BLOCK = [T * E * E] * 4 + [T * E * 4 * E] * 2
GPT_FLOPS = BLOCK * L + [T * E * V]
GPT_ATTENTION = L * 2 * T * T * E  # QKᵀ and AV: per head T·T·(E/H), H heads, per block


def test_gpt_flops_by_hand():
    assert GPT_FLOPS[:6] == [384, 384, 384, 384, 1536, 1536] and GPT_ATTENTION == 1152
    model = gpt()
    table = bk.layer_metrics(model, (T,))  # the model's input_dtype (token ids) is used for the zeros
    assert table["flops"].tolist() == GPT_FLOPS
    ids = torch.randint(0, V, (1, T))
    m = bk.model_metrics(model, example_inputs=ids)
    assert m == bk.model_metrics(model, (T,))
    assert m["flops_dense"] == sum(GPT_FLOPS)
    assert m["flops_attention"] == m["flops_nonprunable"] == GPT_ATTENTION
    assert m["flops_total_model"] >= m["flops_dense"] + GPT_ATTENTION  # + LayerNorm etc. (fvcore)
    assert m["theoretical_speedup"] == 1.0


def test_pruned_gpt_speedup_keeps_attention_work():
    model = gpt()
    masks = {f"{n}.weight": torch.arange(mod.weight.numel()).view_as(mod.weight) % 2 == 0
             for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    apply_masks(model, masks)  # every prunable weight at 50%
    m = bk.model_metrics(model, (T,))
    dense = sum(GPT_FLOPS)
    assert m["flops_nonzero"] == pytest.approx(dense / 2)
    assert m["theoretical_speedup"] == pytest.approx((dense + GPT_ATTENTION) / (dense / 2 + GPT_ATTENTION))
    assert m["theoretical_speedup"] < 2.0  # QKᵀ and AV do not shrink with weight sparsity


def test_example_inputs_checks():
    model = gpt()
    with pytest.raises(ValueError, match="exactly one of input_shape"):
        bk.layer_metrics(model)
    with pytest.raises(ValueError, match="exactly one of input_shape"):
        bk.layer_metrics(model, (T,), example_inputs=torch.zeros(1, T, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size 1"):
        bk.model_metrics(model, example_inputs=torch.zeros(3, T, dtype=torch.long))
    longer = bk.layer_metrics(model, example_inputs=(torch.zeros(1, T - 2, dtype=torch.long),))
    assert longer["flops"].tolist() == [f * (T - 2) // T for f in GPT_FLOPS]  # per-token work


class CrossAttention(nn.Module):
    """nn.MultiheadAttention, sequence-first, different key length and key/value widths, then a Linear."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, kdim=5, vdim=3, batch_first=batch_first)
        self.head = nn.Linear(E, 4)
        self.batch_first = batch_first

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        k, v = kv[..., :5], kv[..., 5:]
        return self.head(self.attn(q, k, v, need_weights=False)[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_counted_by_hand(batch_first):
    tgt, src = 4, 7
    model = CrossAttention(batch_first)
    q, kv = (torch.randn(1, tgt, E), torch.randn(1, src, 8)) if batch_first else \
        (torch.randn(tgt, 1, E), torch.randn(src, 1, 8))
    m = bk.model_metrics(model, example_inputs=(q, kv))
    table = bk.layer_metrics(model, example_inputs=(q, kv))
    assert table["layer"].tolist() == ["attn.out_proj", "head"]
    assert table["flops"].tolist() == [tgt * E * E, tgt * E * 4]  # fvcore alone gives out_proj 0
    in_proj = tgt * E * E + src * 5 * E + src * 3 * E
    attention = 2 * tgt * src * E
    assert m["flops_attention"] == attention
    assert m["flops_nonprunable"] == attention + in_proj  # in_proj_weight is no prunable layer


def vit_like(split: bool) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(28, 7, num_layers=2, num_heads=2, hidden_dim=E, mlp_dim=16,
                                             num_classes=10)
    return split_attention(m) if split else m


def test_torchvision_vit_raw_and_split_count_the_same_work():
    tokens = 16 + 1  # 4×4 patches and the class token
    raw = bk.model_metrics(vit_like(False), (3, 28, 28))
    split = bk.model_metrics(vit_like(True), (3, 28, 28))
    attention = 2 * 2 * tokens * tokens * E  # two blocks
    assert raw["flops_attention"] == split["flops_attention"] == attention
    assert raw["flops_total_model"] == split["flops_total_model"]
    assert raw["flops_nonprunable"] - split["flops_nonprunable"] == 2 * 3 * tokens * E * E  # raw in_proj
    assert split["flops_dense"] - raw["flops_dense"] == 2 * 3 * tokens * E * E  # now q/k/v rows
    rows = bk.layer_metrics(vit_like(True), (3, 28, 28)).set_index("layer")["flops"]
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert [rows[f"{attn}.{p}"] for p in ("q_proj", "k_proj", "v_proj", "out_proj")] == [tokens * E * E] * 4
    assert rows["conv_proj"] == E * 16 * 3 * 7 * 7 and rows["heads.head"] == E * 10  # the class token only


def test_attention_counted_with_and_without_gradients_and_in_train_mode():
    """The fused paths (nn.MultiheadAttention's in eval without gradients, SDPA's kernels) are counted
    from the shapes, so the mode and grad state do not change the figures."""
    for build in (lambda: vit_like(False), lambda: vit_like(True), gpt):
        model = build()
        x = torch.randn(1, 3, 28, 28) if not hasattr(model, "input_dtype") else torch.zeros(1, T, dtype=torch.long)
        counts = []
        for training, grad in ((True, True), (False, True), (False, False)):
            model.train(training)
            with torch.set_grad_enabled(grad):
                c = count_attention(copy.deepcopy(model), (x,))
            counts.append((c.attention, c.in_proj))
        assert len(set(counts)) == 1 and counts[0][0] > 0
        with torch.no_grad():
            assert bk.model_metrics(model, example_inputs=x) == bk.model_metrics(model, example_inputs=x)


def test_cnn_has_no_attention_work():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    m = bk.model_metrics(net, (1, 8, 8))
    assert m["flops_attention"] == m["flops_nonprunable"] == 0
    assert m["flops_dense"] == 4 * 36 * 9 + 144 * 3
