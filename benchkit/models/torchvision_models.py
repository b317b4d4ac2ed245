"""Any torchvision classification model by name, with its first convolution adapted to the data's
channel count (e.g. ``resnet18`` on 1-channel Fashion-MNIST).

``googlenet`` and ``inception_v3`` are built without their auxiliary classifiers
(``aux_logits=False``): in train mode those return ``(logits, aux...)`` tuples, while the training
loss takes one logits tensor (and the unused heads would be pruned and counted for nothing). They
also get ``init_weights=True`` (torchvision's current default, passed so it does not warn) and
``transform_input=False`` (it rescales ImageNet-normalised RGB and would break other channel counts).

Models with ``nn.MultiheadAttention`` (the ``vit_*`` family) have it replaced by
:class:`benchkit.models.attention.SplitMultiheadAttention` — same weights and outputs, with ``q_proj``,
``k_proj``, ``v_proj`` and ``out_proj`` Linear layers — so their attention is prunable by name
(``encoder.layers.encoder_layer_0.self_attention.q_proj``). Their state dicts use those names, not
torchvision's ``in_proj_weight`` (benchkit builds them untrained, ``weights=None``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from benchkit.models.attention import split_attention

# name -> constructor kwargs benchkit sets unless model.kwargs gives them (aux_logits must stay False)
AUX_LOGITS_MODELS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True, "transform_input": False},
    "inception_v3": {"aux_logits": False, "init_weights": True, "transform_input": False},
}


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_torchvision(name: str, input_shape: tuple[int, int, int], num_classes: int, **kwargs) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=...)``, untrained, with the first
    Conv2d rebuilt for ``input_shape[0]`` input channels when it differs."""
    import torchvision

    if name in AUX_LOGITS_MODELS:
        if kwargs.get("aux_logits"):
            raise ValueError(f"model.kwargs aux_logits=True is not supported for {name!r}: its auxiliary outputs "
                             "(a tuple in train mode) do not fit the training loss; remove aux_logits")
        kwargs = {**AUX_LOGITS_MODELS[name], **kwargs}
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    adapt_first_conv(model, input_shape[0])
    return split_attention(model)


def adapt_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first Conv2d (in definition order) by a fresh one with ``in_channels`` inputs and
    otherwise the same hyper-parameters."""
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            if conv.in_channels == in_channels:
                return model
            if conv.groups != 1:
                raise ValueError(f"cannot adapt grouped first conv {name!r} to {in_channels} input channels")
            new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                            padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                            padding_mode=conv.padding_mode)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            return model
    return model
