"""benchkit's transformers (gpt, vit) and the split of nn.MultiheadAttention into prunable Linear
layers: parameter counts by hand, causality, equal outputs against torch's own attention."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from benchkit.config import ModelConfig
from benchkit.models import SplitMultiheadAttention, build_model, split_attention
from benchkit.pruning.layers import prunable_layers

torch.set_num_threads(1)


def gpt(context=12, vocab=17, **kw) -> nn.Module:
    kwargs = {"n_layer": 2, "n_embd": 16, "n_head": 4, **kw}
    return build_model(ModelConfig(name="gpt", kwargs=kwargs), (context,), vocab)


def test_gpt_parameters_by_hand_and_layer_names():
    t, v, e, n_layer = 12, 17, 16, 2
    m = gpt(t, v)
    per_block = (2 * 2 * e  # two LayerNorms
                 + 4 * (e * e + e)  # q, k, v, out with biases
                 + (e * 4 * e + 4 * e) + (4 * e * e + e))  # fc, proj
    expected = v * e + t * e + n_layer * per_block + 2 * e + e * v  # embeddings, blocks, ln_f, lm_head (no bias)
    assert sum(p.numel() for p in m.parameters()) == expected
    names = list(prunable_layers(m))
    assert names[:6] == ["blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj",
                         "blocks.0.attn.out_proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj"]
    assert names[-1] == "lm_head" and len(names) == 6 * n_layer + 1
    assert m.lm_head.weight is not m.tok_emb.weight  # not tied by default: a tied matrix would be scored twice


def test_gpt_is_causal_and_gives_logits_per_position():
    torch.manual_seed(0)
    m = gpt().eval()
    x = torch.randint(0, 17, (3, 12))
    y = m(x)
    assert y.shape == (3, 12, 17)
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 17  # change the future
    y2 = m(x2)
    assert torch.allclose(y[:, :7], y2[:, :7], atol=1e-6) and not torch.allclose(y[:, 7:], y2[:, 7:])
    assert m(x[:, :5]).shape == (3, 5, 17)  # shorter sequences are fine
    with pytest.raises(ValueError, match="longer than the model's context"):
        m(torch.zeros(1, 13, dtype=torch.long))


def test_gpt_weight_tying_is_an_option():
    m = gpt(tie_weights=True)
    assert m.lm_head.weight is m.tok_emb.weight


def test_build_model_matches_model_and_data_kinds():
    with pytest.raises(ValueError, match="takes tokens of shape \\(context,\\).*data.name: text"):
        build_model(ModelConfig(name="gpt"), (1, 28, 28), 10)
    with pytest.raises(ValueError, match="takes image of shape \\(C, H, W\\).*token sequences"):
        build_model(ModelConfig(name="lenet5"), (64,), 80)
    with pytest.raises(ValueError, match="in_channels is for image models"):
        build_model(ModelConfig(name="gpt", in_channels=3), (64,), 80)
    with pytest.raises(ValueError, match="n_embd=30 must be a multiple of n_head=4"):
        build_model(ModelConfig(name="gpt", kwargs={"n_embd": 30}), (64,), 80)


def test_vit_patch_embedding_is_a_strided_conv():
    torch.manual_seed(0)
    m = build_model(ModelConfig(name="vit", kwargs={"patch_size": 7, "n_layer": 1, "n_embd": 8, "n_head": 2}),
                    (1, 28, 28), 10).eval()
    x = torch.randn(2, 1, 28, 28)
    assert m(x).shape == (2, 10)
    conv = nn.Conv2d(1, 8, 7, stride=7)
    with torch.no_grad():
        conv.weight.copy_(m.patch_embed.weight.view(8, 1, 7, 7))
        conv.bias.copy_(m.patch_embed.bias)
    expected = conv(x).flatten(2).transpose(1, 2)  # [B, 16 patches, 8]
    torch.testing.assert_close(m.patch_embed(m.patches(x)), expected, rtol=1e-5, atol=1e-5)
    assert m.pos_emb.shape == (1, 16 + 1, 8)
    with pytest.raises(ValueError, match="patch_size=5 must divide"):
        build_model(ModelConfig(name="vit", kwargs={"patch_size": 5}), (1, 28, 28), 10)


def small_tv_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(28, 7, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                                               num_classes=10)


@pytest.mark.parametrize("training, grad", [(True, True), (False, True), (False, False)])
def test_split_torchvision_vit_gives_the_same_outputs(training, grad):
    """Eval mode without gradients is nn.MultiheadAttention's fused path; the split model must agree."""
    torch.manual_seed(0)
    ref = small_tv_vit()
    split = split_attention(copy.deepcopy(ref))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in split.modules())
    x = torch.randn(3, 3, 28, 28)
    ref.train(training)
    split.train(training)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(split(x), ref(x), rtol=1e-5, atol=1e-5)


def test_torchvision_vit_by_name_is_prunable_by_name():
    m = build_model(ModelConfig(name="vit_b_16", kwargs={"image_size": 32}), (1, 32, 32), 10)
    names = list(prunable_layers(m))
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert [f"{attn}.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")] == names[1:5]
    assert len(names) == 1 + 12 * 6 + 1  # conv_proj, 12 blocks of q/k/v/out/mlp.0/mlp.3, the head
    assert m(torch.randn(1, 1, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights, average", [(True, True), (True, False), (False, True)])
def test_split_attention_matches_multihead_attention_with_masks(batch_first, need_weights, average):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=6, vdim=5).eval()
    split = SplitMultiheadAttention.from_module(mha)
    n, tgt, src = 3, 4, 5
    q = torch.randn(n, tgt, 8)
    k, v = torch.randn(n, src, 6), torch.randn(n, src, 5)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    padding = torch.zeros(n, src, dtype=torch.bool)
    padding[0, -2:] = True
    attn_mask = torch.randn(tgt, src)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": attn_mask},
                   {"attn_mask": torch.rand(n * 2, tgt, src) > 0.8, "key_padding_mask": padding}):
        out, w = mha(q, k, v, need_weights=need_weights, average_attn_weights=average, **kwargs)
        out2, w2 = split(q, k, v, need_weights=need_weights, average_attn_weights=average, **kwargs)
        torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)
        if need_weights:
            torch.testing.assert_close(w2, w, rtol=1e-5, atol=1e-6)
        else:
            assert w is None and w2 is None


def test_split_attention_unbatched_and_refusals():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    split = SplitMultiheadAttention.from_module(mha)
    x = torch.randn(5, 8)
    torch.testing.assert_close(split(x, x, x)[0], mha(x, x, x)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split(x, x, x)[1], mha(x, x, x)[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="add_bias_kv"):
        SplitMultiheadAttention.from_module(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(RuntimeError, match="is_causal"):
        split(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="from_module"):
        split_attention(mha)
