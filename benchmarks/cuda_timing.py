"""Step timing shared by the benchmarks: CUDA events around many back-to-back
steps, so launch gaps are amortised and no host clock is read."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any


def median_step_us(fn: Callable[[], Any], steps: int, repeats: int = 7) -> float:
    """Median over `repeats` of the mean time of one step, in microseconds,
    each repeat timing `steps` back-to-back calls of `fn`."""
    import torch

    means = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        means.append(start.elapsed_time(end) * 1e3 / steps)
    return statistics.median(means)
