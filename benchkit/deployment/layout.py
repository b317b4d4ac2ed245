"""The channels-last twin of deploy's whole-model candidates (``channels_last``, on by default for
models with 2-d convolutions).

Why: a convolutional network kept in PyTorch's default NCHW layout runs oneDNN's convolutions with a
reorder of every activation into a blocked layout and back, and NCHW max-pooling walks memory with a
stride. On this project's CPU the stem max-pool of a 4x channel-compacted resnet18 took 2.2 ms of its
8.9 ms in NCHW and 0.28 ms in channels-last (torch.profiler, batch 64, one thread), and dense LeNet-5
went from 5.8 to 2.5 ms. The same layout does not help every model (dense resnet18's convolutions
were 20% slower in it), so it is one more candidate timed, dense included, never a blanket switch:
a pruned model's measured speedup is still taken against the fastest dense model.

Per-layer forms are chosen against the NCHW dense layer, so in the deployed model's twin each convolution
given a sparse form is timed again on a channels-last input against the dense layer in that layout, and
kept dense there when the form does not win (``deploy``); dense LeNet-5's convolutions run faster in
channels-last than im2col + CSR ones, while its sparse Linear layers still pay.

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
    """A copy with its 4-d parameters in channels-last layout; modules that lay out their own outputs (a
    ``channels_last_output`` flag: benchkit's im2col convolutions) write channels-last outputs, as a dense
    convolution with channels-last weights does. The caller's model is unchanged."""
    copy = deepcopy_model(model).to(memory_format=torch.channels_last).eval()
    for m in copy.modules():
        if hasattr(m, "channels_last_output"):
            m.channels_last_output = True
    return copy
