"""Soak the 8-layer mm -> one_shot_all_reduce model under CUDA graph trees.

    torchrun --standalone --nproc-per-node 1 benchmarks/soak_cudagraphs.py \
        [--calls 1000] [--warmup 3]

After warm-up (CUDA graph recorded), runs a fixed number of calls with new
input values and prints, per rank, at start and end: torch.cuda.memory_allocated()
(caching allocator), device memory in use (cudaMemGetInfo; this also sees the
symmetric memory allocator's cuMemCreate mappings, which the caching allocator
does not), and the P2P allocations Inductor made (calls of
`_SymmetricMemory.empty_strided_p2p` and distinct P2P pointers, counted by a
proxy installed before compiling). A steady state shows equal start and end.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.distributed as dist
from cuda_timing import join_process_group


class P2PCounter:
    """Stands in for torch._C._distributed_c10d._SymmetricMemory and counts
    `empty_strided_p2p`; everything else goes to the real class."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0
        self.ptrs: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def empty_strided_p2p(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        t = self.real.empty_strided_p2p(*args, **kwargs)
        self.calls += 1
        self.ptrs.add(t.data_ptr())
        return t


def device_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dim", type=int, default=2048)
    args = parser.parse_args()

    rank, _ = join_process_group()
    c10d = torch._C._distributed_c10d
    counter = P2PCounter(c10d._SymmetricMemory)
    c10d._SymmetricMemory = counter  # type: ignore[misc]
    gname = dist.group.WORLD.group_name

    def model(x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
        for w in ws:
            x = torch.ops.symm_mem.one_shot_all_reduce(x @ w, "sum", gname)
        return x

    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    gen = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(128, args.dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    ws = [
        torch.randn(
            args.dim, args.dim, device="cuda", dtype=torch.bfloat16, generator=gen
        )
        / (args.dim**0.5)
        for _ in range(8)
    ]

    def step() -> torch.Tensor:
        x.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=gen))
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, ws)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    dist.barrier()

    def report(label: str) -> None:
        print(
            f"[rank {rank}] {label}: memory_allocated={torch.cuda.memory_allocated()} "
            f"device_used={device_used()} p2p_alloc_calls={counter.calls} "
            f"p2p_distinct_ptrs={len(counter.ptrs)}",
            flush=True,
        )

    report("start")
    out = None
    for _ in range(args.calls):
        out = step()
    torch.cuda.synchronize()
    assert out is not None and bool(torch.isfinite(out).all())
    del out
    report("end")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
