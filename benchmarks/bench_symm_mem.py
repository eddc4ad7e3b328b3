"""Benchmark of the 8-layer mm -> all-reduce model, under torchrun on 2 GPUs.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_symm_mem.py \
        --label level1 --json build/bench-level1.json
    python benchmarks/bench_symm_mem.py --table \
        build/bench-level0.json build/bench-level1.json

Each run measures, for the torch it runs on (stock, or an overlay level):
the buffer plan of the generated code (distinct buffer names, reuses, out=
calls, allocations) and the median step time of
  - symm: x = symm_mem.one_shot_all_reduce(x @ w_i), default mode,
  - nccl: x = funcol.all_reduce(x @ w_i), default mode.
A configuration that fails is reported as failed, not dropped.  Timings are
CUDA-event medians over a fixed number of steps on every rank; compare only
rows from one invocation on one card.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).parents[1] / "test" / "distributed"))

from code_stats import CodeStats  # noqa: E402
from cuda_timing import median_step_us  # noqa: E402


def run(label: str, steps: int, warmup: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch._inductor.utils import run_and_get_code

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(
        "nccl", device_id=torch.device("cuda", torch.cuda.current_device())
    )
    gname = dist.group.WORLD.group_name
    gen = torch.Generator(device="cuda").manual_seed(1 + rank)
    x = torch.randn(128, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    ws = [
        torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=gen) / 96
        for _ in range(8)
    ]

    def symm(x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
        for w in ws:
            x = torch.ops.symm_mem.one_shot_all_reduce(x @ w, "sum", gname)
        return x

    def nccl(x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
        for w in ws:
            x = funcol.all_reduce(x @ w, "sum", dist.group.WORLD)
        return x

    result: dict[str, Any] = {
        "label": label,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": {},
    }
    for name, fn in (("symm default", symm), ("nccl default", nccl)):
        torch._dynamo.reset()
        row: dict[str, Any] = {}
        try:
            compiled = torch.compile(fn, fullgraph=True)
            _, (code, *_) = run_and_get_code(compiled, x, ws)
            row.update(dataclasses.asdict(CodeStats.of(code)))
            for _ in range(warmup):
                compiled(x, ws)
            torch.cuda.synchronize()
            dist.barrier()
            row["step_us"] = median_step_us(functools.partial(compiled, x, ws), steps)
        except Exception as e:  # report, keep going: every rank fails alike
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        result["rows"][name] = row
        dist.barrier()
    dist.destroy_process_group()
    return result


def table(paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    cols = [
        "buffer_names",
        "reuses",
        "out_calls",
        "p2p_allocs",
        "plain_allocs",
        "step_us",
    ]
    print(f"device: {runs[0]['device']}  torch: {runs[0]['torch']}")
    print(f"{'run':<10} {'config':<14} " + " ".join(f"{c:>12}" for c in cols))
    base = runs[0]["rows"].get("symm default", {}).get("step_us")
    for run_ in runs:
        for name, row in run_["rows"].items():
            if "error" in row:
                print(f"{run_['label']:<10} {name:<14} FAILED: {row['error']}")
                continue
            cells = []
            for c in cols:
                v = row.get(c)
                cells.append(f"{v:>12.1f}" if isinstance(v, float) else f"{v!s:>12}")
            ratio = ""
            if base and name == "symm default":
                ratio = f"  ({row['step_us'] / base:.2f}x of {runs[0]['label']})"
            print(f"{run_['label']:<10} {name:<14} " + " ".join(cells) + ratio)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", default="run")
    ap.add_argument("--json", help="write this rank-0 result as JSON")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print a table and exit")
    args = ap.parse_args()
    if args.table:
        table(args.table)
        return 0
    result = run(args.label, args.steps, args.warmup)
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(result, indent=1)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
