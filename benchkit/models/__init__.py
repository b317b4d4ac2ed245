"""Model registry: the networks of the pruning literature, plus any torchvision classifier by name.

``build_model(cfg.model, input_shape, num_classes)`` builds a fresh, untrained network for the data;
call :func:`benchkit.seeding.seed_everything` first, since the initial weights are part of the seed.
Every registered factory has the signature ``factory(input_shape, num_classes, **model.kwargs)``.

Two kinds of input (a factory's ``input_kind`` attribute, default ``"image"``): images, where
``input_shape`` is ``(C, H, W)`` and ``num_classes`` the class count; and ``"tokens"`` (language
models such as ``gpt``), where ``input_shape`` is ``(context,)`` and ``num_classes`` the vocabulary size.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from benchkit.config import ModelConfig
from benchkit.models.attention import SplitMultiheadAttention, split_attention
from benchkit.models.init import INITS, initialize
from benchkit.models.lenet import LeNet5, LeNet300
from benchkit.models.lth_conv import CONV_PLANS, ConvNet
from benchkit.models.resnet_cifar import CifarResNet
from benchkit.models.torchvision_models import adapt_first_conv, build_torchvision, torchvision_names
from benchkit.models.transformer import GPT, ViT
from benchkit.models.vgg_cifar import VGG, VGG_PLANS
from benchkit.registry import Registry, UnknownNameError

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")

MODELS.register("lenet300", LeNet300)
MODELS.register("lenet5", LeNet5)
for _name, _plan in CONV_PLANS.items():
    MODELS.register(_name, partial(ConvNet, _plan))
for _depth in (20, 32, 44, 56, 110):
    MODELS.register(f"resnet{_depth}", partial(CifarResNet, _depth))
for _name, _plan in VGG_PLANS.items():
    MODELS.register(_name, partial(VGG, _plan))
MODELS.register("gpt", GPT)
MODELS.register("vit", ViT)

__all__ = ["MODELS", "INITS", "build_model", "initialize", "adapt_first_conv", "torchvision_names", "input_kind",
           "split_attention", "SplitMultiheadAttention"]

# input kind -> (rank of input_shape, how it reads)
INPUT_KINDS = {"image": (3, "(C, H, W)"), "tokens": (1, "(context,)")}


def input_kind(factory: ModelFactory) -> str:
    """``"image"`` or ``"tokens"``: what a factory's ``input_shape`` describes (its ``input_kind``)."""
    while isinstance(factory, partial):
        factory = factory.func
    return getattr(factory, "input_kind", "image")


def build_model(model_cfg: ModelConfig, input_shape: Any, num_classes: int | None = None) -> nn.Module:
    """Build ``model_cfg.name`` for inputs of ``input_shape`` and ``num_classes`` outputs: ``(C, H, W)``
    and classes for image models, ``(context,)`` and the vocabulary size for language models.

    ``input_shape`` may also be a :class:`benchkit.data.DataBundle` (its shape and class count are
    used). ``model.in_channels`` / ``model.num_classes`` override what the data says. Registry names
    win over torchvision names (``resnet20`` is the CIFAR one; ``resnet18`` comes from torchvision).
    """
    if hasattr(input_shape, "input_shape"):  # a DataBundle
        num_classes = num_classes if num_classes is not None else input_shape.num_classes
        input_shape = input_shape.input_shape
    shape = tuple(int(s) for s in input_shape)
    factory = _factory(model_cfg.name)
    kind = input_kind(factory)
    rank, layout = INPUT_KINDS[kind]
    if len(shape) != rank:
        other = "token sequences (context,)" if len(shape) == 1 else f"inputs of shape {shape}"
        raise ValueError(f"model {model_cfg.name!r} takes {kind} of shape {layout}, but the data gives "
                         f"{other}; choose a model for this data (language models such as 'gpt' need "
                         f"data.name: text, image models need image data)")
    if model_cfg.in_channels is not None:
        if kind != "image":
            raise ValueError(f"model.in_channels is for image models; {model_cfg.name!r} takes {kind}: remove it")
        shape = (model_cfg.in_channels, *shape[1:])
    classes = model_cfg.num_classes if model_cfg.num_classes is not None else num_classes
    if classes is None or classes < 1:
        raise ValueError(f"num_classes must be a positive int (from the data or model.num_classes), got {classes}")
    try:
        model = factory(shape, classes, **model_cfg.kwargs)
    except TypeError as e:
        if model_cfg.kwargs:
            raise ValueError(f"model.kwargs {model_cfg.kwargs} not accepted by {model_cfg.name!r}: {e}") from None
        raise
    return initialize(model, model_cfg.init)


def _factory(name: str) -> ModelFactory:
    if name in MODELS:
        return MODELS.get(name)
    if name in torchvision_names():
        return partial(build_torchvision, name)
    raise UnknownNameError(
        f"unknown model {name!r}; registered: {', '.join(MODELS.names())}; any torchvision classification "
        f"model name works too (e.g. resnet18, mobilenet_v2, vit_b_16), or register your own with "
        f"benchkit.MODELS.register"
    )
