"""Step timing shared by the benchmarks: CUDA events around many back-to-back
steps, so launch gaps are amortised, plus the host time of the same loop."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple


class StepTime(NamedTuple):
    # median over repeats of the mean step time, CUDA events, microseconds
    step_us: float
    # median over repeats of the mean host time to issue one step (the loop
    # before its final synchronize), microseconds.  host_us close to step_us
    # means the loop is host-bound: the GPU waits for the host.
    host_us: float


def median_step_time(fn: Callable[[], Any], steps: int, repeats: int = 7) -> StepTime:
    """Time `repeats` runs of `steps` back-to-back calls of `fn`."""
    return interleaved_step_times({"": fn}, steps, repeats)[""]


def interleaved_step_times(
    fns: dict[str, Callable[[], Any]], steps: int, repeats: int = 7
) -> dict[str, StepTime]:
    """Time `repeats` rounds of `steps` back-to-back calls of each of `fns`,
    in turn within a round: a drift of the host's speed then reaches every
    function alike, so rows that are compared by difference stay comparable."""
    import torch

    means: dict[str, list[float]] = {name: [] for name in fns}
    hosts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            t1 = time.perf_counter()
            end.record()
            end.synchronize()
            means[name].append(start.elapsed_time(end) * 1e3 / steps)
            hosts[name].append((t1 - t0) * 1e6 / steps)
    return {
        name: StepTime(statistics.median(means[name]), statistics.median(hosts[name]))
        for name in fns
    }


# Multicast stays off on shared machines (NVLink SHARP); set before NCCL or
# symmetric memory start.
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def join_process_group() -> tuple[int, str]:
    """Join the NCCL process group that torchrun describes, on this rank's
    GPU, with multicast off; return the rank and the group's name."""
    import os

    import torch
    import torch.distributed as dist

    for var, value in MULTICAST_OFF.items():
        os.environ.setdefault(var, value)
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(
        "nccl", device_id=torch.device("cuda", torch.cuda.current_device())
    )
    return rank, dist.group.WORLD.group_name
