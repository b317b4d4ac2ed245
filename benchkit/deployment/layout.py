"""The channels-last twin of deploy's whole-model candidates (``channels_last``, on by default for
models with 2-d convolutions).

Why: a convolutional network kept in PyTorch's default NCHW layout runs oneDNN's convolutions with a
reorder of every activation into a blocked layout and back, and NCHW max-pooling walks memory with a
stride. On this project's CPU the stem max-pool of a 4x channel-compacted resnet18 took 2.2 ms of its
8.9 ms in NCHW and 0.28 ms in channels-last (torch.profiler, batch 64, one thread), and dense LeNet-5
went from 5.8 to 2.5 ms. The same layout does not help every model (dense resnet18's convolutions
were 20% slower in it), so it is one more candidate timed, dense included, never a blanket switch:
a pruned model's measured speedup is still taken against the fastest dense model.

Only the parameters' layout changes (``module.to(memory_format=torch.channels_last)``); the model is
still called with ordinary NCHW inputs, the first convolution converts them, and that copy is inside
the time measured.
"""

from __future__ import annotations

import torch
from torch import nn

from benchkit.pruning.masks import deepcopy_model

SUFFIX = "_channels_last"  # a channels-last variant's name is the NCHW variant's plus this


def applies(model: nn.Module) -> bool:
    """The model has a 2-d convolution, the layer the layout is for."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def channels_last_copy(model: nn.Module) -> nn.Module:
    """A copy with its 4-d parameters in channels-last layout; the caller's model is unchanged."""
    return deepcopy_model(model).to(memory_format=torch.channels_last).eval()
