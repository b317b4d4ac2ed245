"""Any torchvision classification model by name, with its first convolution adapted to the data's
channel count (e.g. ``resnet18`` on 1-channel Fashion-MNIST)."""

from __future__ import annotations

from torch import nn


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_torchvision(name: str, input_shape: tuple[int, int, int], num_classes: int, **kwargs) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=...)``, untrained, with the first
    Conv2d rebuilt for ``input_shape[0]`` input channels when it differs."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    adapt_first_conv(model, input_shape[0])
    return model


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
