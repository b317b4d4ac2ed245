"""Conv-2/4/6 of the lottery ticket paper (Frankle & Carbin 2019, Figure 2), for CIFAR-10.

Pairs of 3×3 'same' convolutions (64,64 / 64,64,128,128 / 64,64,128,128,256,256), ReLU, a 2×2
max-pool after each pair, then fc 256, 256, classes. At 32×32×3 the weights are
Conv-2 4,300,992 (paper: 4.3M; conv 38,592 ≈ 38K), Conv-4 2,425,024 (2.4M; conv 259,776 ≈ 260K),
Conv-6 2,261,184 (conv 1,144,512 ≈ 1.1M as in the paper, but the paper's total says 1.7M: the
architecture it describes has 4·4·256·256 = 1,048,576 weights in fc1 alone, so the 1.7M total cannot
hold for that architecture; we build the architecture as described).
"""

from __future__ import annotations

import torch
from torch import nn

from benchkit.models.lenet import _flat_features

CONV_PLANS: dict[str, list[int]] = {
    "conv2": [64, 64],
    "conv4": [64, 64, 128, 128],
    "conv6": [64, 64, 128, 128, 256, 256],
}


class ConvNet(nn.Module):
    """``features`` (conv/ReLU pairs + pools) then ``classifier`` (fc 256 → 256 → classes)."""

    def __init__(self, plan: list[int], input_shape: tuple[int, int, int], num_classes: int,
                 fc: tuple[int, ...] = (256, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        channels = input_shape[0]
        for i, width in enumerate(plan):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        flat = _flat_features(lambda x: self.features(x).flatten(1), input_shape, f"conv{len(plan)}")
        head: list[nn.Module] = []
        for width in fc:
            head += [nn.Linear(flat, width), nn.ReLU(inplace=True)]
            flat = width
        head.append(nn.Linear(flat, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
