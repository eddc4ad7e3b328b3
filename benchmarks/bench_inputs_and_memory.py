"""The series' costs for inputs it does not allocate, and its memory, per level.

    torchrun --standalone --nproc-per-node 1 benchmarks/bench_inputs_and_memory.py \
        --label L5 --json build/inputs-L5.json
    python benchmarks/bench_inputs_and_memory.py --table build/inputs-L*.json

Rows (CUDA-event medians, `step_us`, and the host time to issue a step,
`host_us`; see cuda_timing.py):
  - external reduce-overhead: `x * 2 + 1` under mode="reduce-overhead", no
    symm_mem op, called with a new DLPack tensor on every call (all made
    before timing): what a user who never touches symm_mem sees;
  - region reduce-overhead: `relu(unsafe(x @ w1)) @ w2` under reduce-overhead,
    `unsafe` a CUDA-graph-unsafe custom op (a graph partition each side of
    it): the graphs patch 4's hoisting changes for every user;
  - symm input {1,64} MB eager / default / reduce-overhead: a bf16
    `symm_mem.empty` tensor, rendezvoused, fed to `one_shot_all_reduce`: the
    eager op on that pre-staged input, and the compiled function in the
    default mode and under reduce-overhead;
  - plain input {1,64} MB default: the compiled function on an ordinary
    tensor (at the pin the op refuses it; from patch 5 on, one `copy_`);
  - floor: x * 2, {1,64} MB default / reduce-overhead: `x * 2` compiled in
    that mode, no collective: what any compiled function costs per call on
    this host, at every level (the symm input rows cannot go below it);
and the memory a dynamic-shape graph holds after 100 sizes of 16-18 MB
(`one_shot_all_reduce(x @ w)`, default mode): device memory in use
(cudaMemGetInfo, which also sees symmetric-memory mappings) over the start.
Compare rows of one card only; the table puts levels side by side with ratios
to the first file given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from cuda_timing import join_process_group, median_step_time


def device_used() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


def module_p2p_bytes() -> int:
    """Bytes of the P2P buffers the compiled modules hold (patch 1/5 on; at
    the pin the alloc_id allocations are not visible from Python: 0)."""
    from torch._inductor.codecache import PyCodeCache

    total = 0
    for mod in PyCodeCache.modules:
        buffers = getattr(mod, "p2p_buffers", None)
        if buffers is not None:
            held = [*buffers._static.values()]
            for site in buffers._dynamic.values():
                held += [t for t in (site.current, *site.captured) if t is not None]
            total += sum(t.untyped_storage().nbytes() for t in held)
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    rank, gname = join_process_group()
    rows: dict[str, Any] = {}

    def timed(name: str, fn: Callable[[], Any], steps: int) -> None:
        try:
            for _ in range(3):
                fn()
            t = median_step_time(fn, steps)
            rows[name] = {"step_us": t.step_us, "host_us": t.host_us}
        except Exception as e:  # a failing row is reported, not dropped
            rows[name] = {"failed": f"{type(e).__name__}: {e}"[:200]}
        torch._dynamo.reset()

    # external inputs under reduce-overhead
    owners = [torch.randn(1024, 1024, device="cuda") for _ in range(args.calls)]
    externals = [
        torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(t)) for t in owners
    ]
    compiled = torch.compile(lambda x: x * 2 + 1, mode="reduce-overhead")
    it = iter(range(10**9))

    def external_step() -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(externals[next(it) % len(externals)])

    timed("external reduce-overhead", external_step, args.calls)

    # a graph with a CUDA-graph-unsafe region, under reduce-overhead: what
    # patch 4's hoisting changes for users who never touch symm_mem
    # (an explicit schema: annotations are strings in this module)
    @torch.library.custom_op(
        "symm_stack_bench::unsafe_scale",
        mutates_args=(),
        tags=(torch._C.Tag.cudagraph_unsafe,),
        schema="(Tensor x) -> Tensor",
    )
    def unsafe_scale(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    @unsafe_scale.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    w1, w2 = (torch.randn(1024, 1024, device="cuda") / 32 for _ in range(2))
    region = torch.compile(
        lambda x: torch.relu(unsafe_scale(x @ w1)) @ w2, mode="reduce-overhead"
    )
    x_region = torch.randn(1024, 1024, device="cuda")

    def region_step() -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return region(x_region)

    timed("region reduce-overhead", region_step, args.calls)
    if "symm" not in args.rows:
        owners.clear()
    # symmetric graph inputs
    op = torch.ops.symm_mem.one_shot_all_reduce

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return op(x, "sum", gname)

    for mb in (1, 64) if "symm" in args.rows else ():
        n = mb * 2**20 // 2
        x = symm_mem.empty(n, dtype=torch.bfloat16, device="cuda")
        x.fill_(1)
        symm_mem.rendezvous(x, gname)
        timed(f"symm input {mb} MB eager", lambda x=x: reduce(x), 200)
        plain = torch.ones(n, dtype=torch.bfloat16, device="cuda")
        fn = torch.compile(reduce, fullgraph=True)
        timed(f"plain input {mb} MB default", lambda p=plain, f=fn: f(p), 200)
        for mode in ("default", "reduce-overhead"):
            fn = torch.compile(
                reduce, mode=None if mode == "default" else mode, fullgraph=True
            )

            def step(fn: Callable[..., Any] = fn, x: torch.Tensor = x) -> Any:
                torch.compiler.cudagraph_mark_step_begin()
                return fn(x)

            timed(f"symm input {mb} MB {mode}", step, 200)
            floor = torch.compile(
                lambda t: t * 2, mode=None if mode == "default" else mode
            )
            timed(
                f"floor: x * 2, {mb} MB {mode}",
                lambda f=floor, x=x, s=step: s(f, x),
                200,
            )

    # memory after 100 dynamic sizes
    if "memory" not in args.rows:
        dist.destroy_process_group()
        return {"label": args.label, "rank": rank, "rows": rows}
    torch.cuda.synchronize()
    start = device_used()
    w = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    dyn = torch.compile(
        lambda x, w: torch.ops.symm_mem.one_shot_all_reduce(x @ w, "sum", gname),
        dynamic=True,
    )
    try:
        for i in range(100):
            rows_n = 8192 + i * 8192 // 100  # 16 MB .. 18 MB of bf16 output
            dyn(torch.randn(rows_n, 1024, device="cuda", dtype=torch.bfloat16), w)
        torch.cuda.synchronize()
        rows["memory after 100 dynamic sizes"] = {
            "MiB": (device_used() - start) / 2**20
        }
        rows["P2P memory of the module after 100 sizes"] = {
            "MiB": module_p2p_bytes() / 2**20
        }
    except Exception as e:
        rows["memory after 100 dynamic sizes"] = {"failed": str(e)[:200]}
    dist.destroy_process_group()
    return {"label": args.label, "rank": rank, "rows": rows}


def table(paths: list[str]) -> None:
    runs = [json.load(open(p)) for p in paths]
    names = list(runs[0]["rows"])
    head = f"{'row':34s}" + "".join(f"{r['label']:>22s}" for r in runs)
    print(head)
    for name in names:
        cells = []
        base = runs[0]["rows"].get(name, {})
        for r in runs:
            row = r["rows"].get(name, {})
            if "failed" in row:
                cells.append(f"{'failed':>22s}")
            elif "MiB" in row:
                cells.append(f"{row['MiB']:>18.0f} MiB")
            else:
                ratio = (
                    f" ({row['step_us'] / base['step_us']:.2f}x)"
                    if "step_us" in base
                    else ""
                )
                cells.append(f"{row['step_us']:>13.1f}{ratio:>9s}")
        print(f"{name:34s}" + "".join(cells))
    print("(step_us; ratio to the first column)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--label", default="run")
    parser.add_argument("--json")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--table", nargs="+", metavar="JSON")
    parser.add_argument(
        "--rows",
        default="external,symm,memory",
        help="comma-separated groups of rows to run (default: all)",
    )
    args = parser.parse_args()
    if args.table:
        table(args.table)
        return 0
    result = run(args)
    if args.json and result["rank"] == 0:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if result["rank"] == 0:
        json.dump(result["rows"], sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
