"""benchkit.latency's timing rules: what a timed call follows, and what batch it runs on."""

from __future__ import annotations

import time

import torch

from benchkit.latency import time_callables, with_batch_size


def test_timing_batches_are_made_of_the_examples_own_samples():
    """with_batch_size takes the example's samples in order, cyclically when it has fewer: never one sample
    copied (data-dependent kernels such as max-pooling time an easy case on identical samples)."""
    x, ids = torch.randn(3, 4), torch.tensor([[1, 2], [3, 4], [5, 6]])
    bx, bids = with_batch_size((x, ids), 5)
    assert torch.equal(bx, x[[0, 1, 2, 0, 1]]) and torch.equal(bids, ids[[0, 1, 2, 0, 1]])
    assert torch.equal(with_batch_size((x,), 2)[0], x[:2])


def test_warm_timing_times_each_call_after_one_of_its_own():
    """A callable that is slow only right after another callable ran (a cache another one evicted): warm
    timing (the default) never sees that, cold timing sees it on every timed call. Calls are counted too."""
    last: list[str] = [""]
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
            if last[0] != name:
                time.sleep(0.02)
            last[0] = name
        return fn

    fns = {"a": make("a"), "b": make("b")}
    warm = time_callables(fns, warmup=1, repeats=3)
    assert calls == {"a": 1 + 2 * 3, "b": 1 + 2 * 3}
    assert max(max(v) for v in warm.values()) < 10  # ms: no timed call followed the other callable
    cold = time_callables(fns, warmup=1, repeats=3, warm=False)
    assert min(min(v) for v in cold.values()) >= 19
