"""The MNIST networks of the pruning literature.

* LeNet-300-100 (LeCun et al. 1998; Han et al. 2015; Frankle & Carbin 2019): 784-300-100-10 with ReLU,
  266,200 weights + 410 biases at 28×28.
* LeNet-5 as in Caffe's ``lenet_train_test.prototxt``, the model Han et al. 2015 and SNIP ("LeNet-5-Caffe")
  prune: conv1 1→20 5×5, max-pool 2, conv2 20→50 5×5, max-pool 2, fc1 800→500, ReLU, fc2 500→10:
  431,080 parameters at 28×28. Caffe's net has no non-linearity after the convolutions (only the
  max-pools); ``conv_relu=True`` adds ReLUs for those who want the common PyTorch variant.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LeNet300(nn.Module):
    """Flatten → fc1 (300) → ReLU → fc2 (100) → ReLU → fc3 (classes). Any input size works."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, hidden: tuple[int, int] = (300, 100)):
        super().__init__()
        features = math.prod(input_shape)
        self.fc1 = nn.Linear(features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class LeNet5(nn.Module):
    """Caffe LeNet-5. Inputs smaller than 28×28 (e.g. the 8×8 digits) get ``padding=2`` on both convs
    so the feature maps survive the two pools (8 → 8 → 4 → 4 → 2); fc1's in-features always follow
    from the input shape (800 at 28×28, 200 at 8×8)."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, conv_relu: bool = False,
                 padding: int | None = None):
        super().__init__()
        c, h, w = input_shape
        pad = padding if padding is not None else (2 if min(h, w) < 28 else 0)
        self.conv1 = nn.Conv2d(c, 20, 5, padding=pad)
        self.conv2 = nn.Conv2d(20, 50, 5, padding=pad)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU() if conv_relu else nn.Identity()
        flat = _flat_features(self._features, input_shape, "lenet5")
        self.fc1 = nn.Linear(flat, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))
        return self.pool(self.act(self.conv2(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self._features(x))))


@torch.no_grad()
def _flat_features(features, input_shape: tuple[int, int, int], name: str) -> int:
    """Size of the flattened feature map for one input, found by a dry run (so every input size works)."""
    try:
        return features(torch.zeros(1, *input_shape)).shape[1]
    except RuntimeError as e:
        raise ValueError(f"{name} cannot take inputs of shape {tuple(input_shape)}: {e}") from None
