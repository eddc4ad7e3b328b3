"""Benchmark of the 8-layer mm -> all-reduce model, under torchrun, one rank per GPU.

    torchrun --standalone --nproc-per-node 1 benchmarks/bench_symm_mem.py \
        --label level1 --json build/bench-level1.json
    python benchmarks/bench_symm_mem.py --table \
        build/bench-level0.json build/bench-level1.json

Each run measures, for the torch it runs on (stock, or an overlay level):
the buffer plan of the generated code (distinct buffer names, reuses, out=
calls, allocations) and the median step time of
  - symm: x = symm_mem.one_shot_all_reduce(x @ w_i),
  - nccl: x = funcol.all_reduce(x @ w_i),
each in the default mode and under mode="reduce-overhead" (CUDA graph trees;
every step starts with torch.compiler.cudagraph_mark_step_begin()).  The table
adds, per run, symm reduce-overhead over nccl reduce-overhead and over symm
default.  A configuration that fails is reported as failed, not dropped.  Timings are
CUDA-event medians over a fixed number of steps on every rank (step_us), with
the host time to issue a step (host_us: close to step_us means host-bound);
with --profile also the device time of a step (gpu_us: the sum of its kernel
and copy times over 10 profiled steps, from torch.profiler; a collective
kernel's time includes its wait for the peer), and where the time went on
device and host.  Compare only rows from one invocation on one card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).parents[1] / "test" / "distributed"))

from code_stats import CodeStats  # noqa: E402
from cuda_timing import join_process_group, median_step_time  # noqa: E402


CONFIGS = (
    ("symm default", "symm", "default"),
    ("nccl default", "nccl", "default"),
    ("symm reduce-overhead", "symm", "reduce-overhead"),
    ("nccl reduce-overhead", "nccl", "reduce-overhead"),
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch._inductor.utils import run_and_get_code

    rank, gname = join_process_group()
    gen = torch.Generator(device="cuda").manual_seed(1 + rank)
    x = torch.randn(128, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    ws = [
        torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=gen) / 96
        for _ in range(8)
    ]
    for w in ws:  # weights, like parameters: CUDA graphs must not copy them
        torch._dynamo.mark_static_address(w)

    def symm(x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
        for w in ws:
            x = torch.ops.symm_mem.one_shot_all_reduce(x @ w, "sum", gname)
        return x

    def nccl(x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
        for w in ws:
            x = funcol.all_reduce(x @ w, "sum", dist.group.WORLD)
        return x

    result: dict[str, Any] = {
        "label": args.label,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "world_size": dist.get_world_size(),
        "rows": {},
    }
    for name, fn, mode in CONFIGS:
        if args.configs and name not in args.configs:
            continue
        torch._dynamo.reset()
        row: dict[str, Any] = {}
        try:
            compiled = torch.compile(
                symm if fn == "symm" else nccl, mode=mode, fullgraph=True
            )

            def step(compiled: Callable[..., Any] = compiled, mode: str = mode) -> Any:
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                return compiled(x, ws)

            _, (code, *_) = run_and_get_code(step)
            row.update(dataclasses.asdict(CodeStats.of(code)))
            for _ in range(args.warmup):
                step()
            torch.cuda.synchronize()
            dist.barrier()
            row["step_us"], row["host_us"] = median_step_time(step, args.steps)
            if args.profile:
                row["gpu_us"] = profile_steps(name, step, rank)
        except Exception as e:  # report, keep going: every rank fails alike
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        result["rows"][name] = row
        if rank == 0:
            print(f"{name}: {row}", file=sys.stderr, flush=True)
            if args.json:  # partial results survive a run cut short
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(result, indent=1))
        dist.barrier()
    # Drop the compiled graphs and CUDA graph trees (which hold P2P buffers
    # and NCCL work) before the process group goes.
    torch._dynamo.reset()
    torch._inductor.cudagraph_trees.reset_cudagraph_trees()
    torch.cuda.synchronize()
    dist.destroy_process_group()
    return result


def profile_steps(name: str, step: Callable[[], Any], rank: int) -> float:
    """Every rank profiles 10 steps, then runs 50 more under cProfile; rank 0
    prints where the device time went and where the host time went.  Returns
    the device time of one step (the sum of all kernel and copy times over the
    10 profiled steps, divided by 10), in microseconds.  A collective kernel's
    time includes its wait for the peer, and profiling slows the host, so
    gpu_us can exceed step_us; a step_us well above it means the device sat
    idle, waiting for the host."""
    import cProfile
    import io
    import pstats

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    # device-side events only (kernels, copies), as the table's total counts
    gpu_us = (
        sum(
            e.self_device_time_total
            for e in averages
            if e.device_type == DeviceType.CUDA and not e.is_user_annotation
        )
        / 10
    )
    host = cProfile.Profile()
    host.enable()
    for _ in range(50):
        step()
    host.disable()
    torch.cuda.synchronize()
    if rank == 0:
        table = averages.table(sort_by="device_time_total", row_limit=15)
        print(f"--- profile of {name}, 10 steps\n{table}", file=sys.stderr, flush=True)
        out = io.StringIO()
        stats = pstats.Stats(host, stream=out)
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(15)
        print(
            f"--- host profile of {name}, 50 steps\n{out.getvalue()}", file=sys.stderr
        )
    return gpu_us


def table(paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    cols = [
        "buffer_names",
        "reuses",
        "out_calls",
        "p2p_allocs",
        "plain_allocs",
        "step_us",
        "host_us",
        "gpu_us",
    ]
    # runs of another world size are not comparable: say it per run
    world = {run_.get("world_size", "?") for run_ in runs}
    print(
        f"device: {runs[0]['device']}  torch: {runs[0]['torch']}  "
        f"world size: {', '.join(map(str, sorted(world, key=str)))}"
    )
    print(f"{'run':<10} {'config':<22} " + " ".join(f"{c:>12}" for c in cols))
    base = runs[0]["rows"].get("symm default", {}).get("step_us")
    for run_ in runs:
        for name, row in run_["rows"].items():
            if "error" in row:
                print(f"{run_['label']:<10} {name:<22} FAILED: {row['error']}")
                continue
            cells = []
            for c in cols:
                v = row.get(c)
                cells.append(f"{v:>12.1f}" if isinstance(v, float) else f"{v!s:>12}")
            ratio = ""
            if base and name == "symm default":
                ratio = f"  ({row['step_us'] / base:.2f}x of {runs[0]['label']})"
            print(f"{run_['label']:<10} {name:<22} " + " ".join(cells) + ratio)
        us = {name: row.get("step_us") for name, row in run_["rows"].items()}
        cg = us.get("symm reduce-overhead")
        if cg and us.get("nccl reduce-overhead") and us.get("symm default"):
            print(
                f"{run_['label']:<10} symm reduce-overhead = "
                f"{cg / us['nccl reduce-overhead']:.2f}x nccl reduce-overhead, "
                f"{cg / us['symm default']:.2f}x symm default"
            )
        gpu = {name: row.get("gpu_us") for name, row in run_["rows"].items()}
        if gpu.get("symm reduce-overhead") and gpu.get("nccl reduce-overhead"):
            print(
                f"{run_['label']:<10} device time per step: symm reduce-overhead = "
                f"{gpu['symm reduce-overhead'] / gpu['nccl reduce-overhead']:.2f}x "
                "nccl reduce-overhead"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", default="run")
    ap.add_argument("--json", help="write this rank-0 result as JSON")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument(
        "--configs",
        nargs="+",
        choices=[name for name, _, _ in CONFIGS],
        help="run only these configurations (default: all)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after timing each configuration, profile 10 steps (table on stderr)",
    )
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print a table and exit")
    args = ap.parse_args()
    if args.table:
        table(args.table)
        return 0
    result = run(args)
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(result, indent=1)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
