"""Weight initialisations selectable with ``model.init`` (the lottery ticket experiments depend on them).

``default`` keeps PyTorch's layer defaults. The others re-draw every Conv/Linear weight and zero
its bias, as TensorFlow's dense/conv layers did in the original lottery-ticket code (Frankle &
Carbin 2019 used Gaussian Glorot). BatchNorm keeps weight 1, bias 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from benchkit.registry import Registry

INITS: Registry[Callable[[torch.Tensor], None]] = Registry("init")
_INIT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

INITS.register("kaiming_normal", lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
INITS.register("glorot_normal", nn.init.xavier_normal_)  # N(0, 2 / (fan_in + fan_out))


@torch.no_grad()
def initialize(model: nn.Module, name: str) -> nn.Module:
    """Re-initialise ``model`` in place with the named scheme (``default`` leaves it untouched)."""
    if str(name).lower() == "default":
        return model
    if name not in INITS:  # the registry's error lists the allowed names; add "default" to it
        raise ValueError(f"unknown model.init {name!r}; allowed: default, {', '.join(INITS.names())}")
    draw = INITS.get(name)
    for m in model.modules():
        if isinstance(m, _INIT_TYPES):
            draw(m.weight)
            if m.bias is not None:
                m.bias.zero_()
    return model
