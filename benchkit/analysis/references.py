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


# Sun, Liu, Bair & Kolter 2024 (Wanda), Table 2: LLaMA-7B, WikiText-2 perplexity, 128 C4 calibration sequences of
# 2048 tokens, uniform per-layer sparsity, no fine-tuning. Methods and patterns named as benchkit.analysis.oneshot
# names them (magnitude: one threshold per layer, as the authors' code compares it).
WANDA2024_LLAMA7B: dict[str, dict[str, float]] = {
    "dense": {"dense": 5.68},
    "magnitude (per layer)": {"50%": 17.29, "4:8": 16.84, "2:4": 42.13},
    "SparseGPT": {"50%": 7.22, "4:8": 8.61, "2:4": 11.00},
    "Wanda": {"50%": 7.26, "4:8": 8.57, "2:4": 11.53},
}
