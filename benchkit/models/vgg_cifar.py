"""VGG-11/16 with BatchNorm for CIFAR (Simonyan & Zisserman 2015, as adapted for CIFAR by OpenLTH and
the pruning literature): the ImageNet conv configurations, then global average pooling and a single
fc layer (``fc=(512,)`` adds a hidden fc layer).

A max-pool is only placed while the feature map is at least 2×2, and the adaptive average pool
takes whatever remains, so the same network runs on 32×32 CIFAR and on 8×8 digits.
"""

from __future__ import annotations

import torch
from torch import nn

VGG_PLANS: dict[str, list[int | str]] = {
    # six 3×3 convs with BatchNorm, 16-32-64 wide: a VGG-style net small enough for a CPU (7.4M multiply-adds and
    # 73K parameters at 28×28, ~3× LeNet-5's FLOPs); the "rethinking" study's second architecture
    "vgg_small": [16, 16, "M", 32, 32, "M", 64, 64, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, plan: list[int | str], input_shape: tuple[int, int, int], num_classes: int,
                 fc: tuple[int, ...] = ()):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = input_shape[0], min(input_shape[1:])
        for item in plan:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            layers += [nn.Conv2d(channels, int(item), 3, padding=1, bias=False),
                       nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
            channels = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = []
        for width in fc:
            head += [nn.Linear(channels, width), nn.ReLU(inplace=True)]
            channels = width
        head.append(nn.Linear(channels, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
