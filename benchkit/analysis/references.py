"""Published per-layer results to draw beside ours (see ../shared/REFERENCES.md)."""

from __future__ import annotations

# Han, Pool, Tran & Dally 2015, "Learning both Weights and Connections", fraction of weights kept
# per layer after iterative magnitude pruning with retraining (MNIST).
HAN2015_LENET300: dict[str, float] = {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}  # Table 2, 12x overall
HAN2015_LENET5: dict[str, float] = {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19}  # Table 3

# Frankle & Carbin 2019, LeNet-300-100: % of weights remaining after each level of 20% layer-wise
# pruning (output layer 10%): (265200·0.8ⁿ + 1000·0.9ⁿ) / 266200.
def lth_lenet300_percent_remaining(levels: int) -> list[float]:
    """Weights remaining (%) at levels 0..levels of the lottery-ticket LeNet-300-100 schedule."""
    return [100.0 * (265200 * 0.8**n + 1000 * 0.9**n) / 266200 for n in range(levels + 1)]
