"""Series v3 rows: fused staging, symmetric inputs against the floor, hoisting.

    torchrun --standalone --nproc-per-node 1 benchmarks/bench_v3.py \
        --label L5 --json /tmp/v3-L5.json [--rows fused,symm,call,hoist] \
        [--code-from /tmp/v3-L0.json]
    python benchmarks/bench_v3.py --table /tmp/v3-L0.json /tmp/v3-L5.json

Runs that share a label (a level run several times, in turns with the other)
are also pooled by `--table`: the median excess per label.

One process group (NCCL, from torchrun's environment) for all groups; rank 0
prints the table.  Every timed set is built first (compiled, warmed up,
checked against an eager reference), then its functions are timed in turns
(`interleaved_step_times`: `--steps` back-to-back calls, median over
`--repeats` rounds), so a drift of the host's speed reaches them alike.
Every step of a compiled function starts with
`torch.compiler.cudagraph_mark_step_begin()`.  Each row gives step_us (CUDA
events), host_us (the host time to issue a step; close to step_us means
host-bound) and, from torch.profiler over `--profile-calls` calls after
warm-up, the device copies per call (Memcpy events and copy kernels) and all
device operations per call (a copy done by a Triton kernel, such as patch 2's
identity copy, counts only there).  A function that fails to compile, to run
or to match the reference is reported as "failed: <reason>".

Groups (`--rows`):
  fused  a plain (non-symmetric) bf16 input of 64 KB, 1 MB and 64 MB, in the
         default mode and under reduce-overhead:
           staged  torch.compile(one_shot_all_reduce(x, "sum", group)): the
                   input is staged into symmetric memory (patch 5: one copy_
                   into a persistent P2P buffer; patches 2-4: an identity
                   kernel);
           fused   torch.compile(one_shot_all_reduce_copy(buf, x, "sum",
                   group)), buf a plain tensor of x's shape: the lowering
                   gives the op a P2P scratch buffer (patch 2) and the
                   collective kernel copies x itself;
         and the ratio fused / staged.
  symm   a symm_mem.empty bf16 input (random data, rendezvoused) of 1 MB and
         64 MB, default and reduce-overhead: the compiled
         one_shot_all_reduce(x), the floor (`x * 2` compiled the same way on
         the same x, no collective) and the eager op, in turns; excess =
         compiled - floor.  `--table` compares the excess across runs (level
         0 first): target (L5 - floor) <= 1.05 x (L0 - floor).  Under
         reduce-overhead the floor's input is a non-static CUDA-graph input
         (the tree copies it on every replay), so at 64 MB the floor holds a
         64 MB copy and the excess can be negative.
  call   the symm rows' default mode once more, without a process between
         the levels: the generated modules of one_shot_all_reduce(x) and of
         the floor (`x * 2`), compiled here with torch.compile
         (run_and_get_code) and loaded with PyCodeCache, each `call([x])`
         timed in turns.  The code is kept in the row; with `--code-from
         RUN.json` (a `call` run of another level, level 0) that run's
         module is loaded and timed in the same turns, so both levels'
         excess over the floor come from one process and one host speed.
         Level 0's generated code runs unchanged on level 5's runtime (it
         calls nothing the series changes).  What torch.compile adds around
         `call` (guards, the AOT wrapper) is the same code at every level and
         cancels in the excess; `call` runs with grad off, as under that
         wrapper.
         Then the `whole` rows time the same modules through that whole path
         in one process: each is a torch.compile'd function (Dynamo's guards,
         the AOT runtime wrapper, Inductor's CompiledFxGraph and its input
         realignment) whose CompiledFxGraph, built by this level's Inductor,
         runs the module's `call` in place of its own (`swap_call`); the
         module of this level also runs unswapped ("native"), which is what
         a `symm` row times.  So a cost of a level outside `call` would show
         as native - swapped, and one inside it as the levels' difference.
  hoist  relu(unsafe(x @ w1)) @ w2, fp32 1024 x 1024, weights static
         (mark_static_address), under mode="reduce-overhead" with
         graph_partition=True: `unsafe` is tagged cudagraph_unsafe, so it
         runs between two CUDA-graph partitions.  Two variants:
           out-variant  lowered to an ExternKernelOut through its .out
                        overload (Inductor allocates the result): what patch
                        4 hoists into partition 0;
           custom_op    a torch.library.custom_op, as in
                        bench_inputs_and_memory.py's region row: a
                        FallbackKernel whose result the op allocates itself,
                        which patch 4 leaves where it is.
         Each with graph_partition_hoist_region_allocations True and False
         (two compiled functions, timed in turns); below level 4 the flag
         does not exist and the one stock config is timed.  Also: where the
         region's output is allocated (from the generated code) and the
         non-static inputs CUDA graph trees recorded
         (counters["inductor"]["cudagraph_recorded_non_static_inputs"]).
Compare rows of one card only.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import re
import sys
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cuda_timing import interleaved_step_times, join_process_group


GROUPS = ("fused", "symm", "call", "hoist")
FUSED_SIZES = ((64 * 2**10, "64 KB"), (2**20, "1 MB"), (64 * 2**20, "64 MB"))
SYMM_SIZES = ((2**20, "1 MB"), (64 * 2**20, "64 MB"))
MODES = ("default", "reduce-overhead")
HOIST_FLAG = "graph_partition_hoist_region_allocations"
TARGET = 1.05  # (L5 - floor) <= TARGET x (L0 - floor)
OPS_NS = "symm_stack_bench3"

Step = Callable[[], Any]
# emit(name, row): a finished row (stored, printed to stderr, JSON rewritten)
Emit = Callable[[str, dict[str, Any]], None]


# -------- helpers


_fresh_ids = itertools.count()


def fresh(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with a code object of its own: Dynamo keeps its cache on the code
    object, so two compiled functions (another mode, another config) never
    share cache entries."""
    code = fn.__code__
    code = code.replace(co_name=f"{code.co_name}_{next(_fresh_ids)}")
    return types.FunctionType(
        code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__
    )


def short(e: BaseException) -> str:
    """The innermost cause's first meaningful line, shortened."""
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("backend=")] or [""]
    return f"{type(root).__name__}: {lines[0]}"[:120]


def is_copy(name: str) -> bool:
    low = name.lower()
    return ("memcpy" in low or "copy" in low) and "reduce" not in low


def device_ops(step: Step, calls: int) -> tuple[float, float]:
    """Copies and device operations per call of `step`, over `calls` calls
    under torch.profiler (CUDA activity)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sum(map(is_copy, names)) / calls, len(names) / calls


def compiled_step(
    fn: Callable[..., Any], mode: str, *args: Any, backend: Any = "inductor"
) -> tuple[Step, Callable[..., Any]]:
    """A step calling torch.compile(fn) (own code object) on `args`."""
    import torch

    compiled = torch.compile(
        fresh(fn),
        mode=None if mode == "default" else mode,
        fullgraph=True,
        backend=backend,
    )

    def step() -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args)

    return step, compiled


def swap_call(compiled_graph: Any, call: Callable[..., Any]) -> None:
    """Make Inductor's CompiledFxGraph run `call` (another generated module's)
    where it ran its own module's `call`: directly, or inside the input
    realignment wrapper of post_compile (its closure's `model`)."""
    fn = compiled_graph.current_callable
    if getattr(fn, "__name__", "") == "call":
        compiled_graph.current_callable = call
        return
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True))
    model = cells.get("model")
    if model is None or getattr(model.cell_contents, "__name__", "") != "call":
        raise RuntimeError(f"no generated call found in {fn!r}")
    model.cell_contents = call


def whole_step(
    fn: Callable[..., Any], call: Callable[..., Any], x: Any, ref: Any, warmup: int
) -> Step:
    """A warmed-up, checked step of torch.compile(fn) on `x` (default mode)
    whose Inductor-built CompiledFxGraph runs `call` (see `swap_call`): the
    same step as `compiled_step`'s, through the same run-time path.  It is
    compiled without the FX graph and AOTAutograd caches, so that the swap
    cannot be skipped by a cache hit."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    swapped: list[bool] = []

    def inner(*a: Any, **kw: Any) -> Any:
        compiled_graph = compile_fx_inner(*a, **kw)
        swap_call(compiled_graph, call)
        swapped.append(True)
        return compiled_graph

    step, _ = compiled_step(
        fn, "default", x, backend=functools.partial(compile_fx, inner_compile=inner)
    )
    with (
        config.patch(fx_graph_cache=False),
        functorch_config.patch(enable_autograd_cache=False),
    ):
        warm_and_check(step, ref, warmup, 2e-2, 2e-2)
    if not swapped:
        raise RuntimeError("the compiled function's call was not swapped")
    return step


class Built:
    """A warmed-up, checked step and what was learnt while building it."""

    def __init__(self, step: Step, **info: Any) -> None:
        self.step = step
        self.info = info


Maker = Callable[[], Built]


def warm_and_check(step: Step, ref: Any, warmup: int, rtol: float, atol: float) -> None:
    """Warm up (compile, CUDA-graph warm-up, recording, replays), checking the
    first three calls and the last against `ref`."""
    import torch

    for i in range(3 + warmup):
        out = step()
        if i < 3 or i == 2 + warmup:
            torch.testing.assert_close(
                out, ref, rtol=rtol, atol=atol, msg=lambda m, i=i: f"call {i}: {m}"
            )


def measure_set(
    makers: dict[str, Maker], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Build every maker's step, then time the built ones in turns and count
    their device copies.  After a failure Dynamo and the CUDA graph trees are
    reset (a failed CUDA-graph warm-up can leave the tree mid-way) and the
    steps built so far are built again."""
    import torch
    import torch.distributed as dist

    torch._dynamo.reset()
    failed: dict[str, str] = {}
    built: dict[str, Built] = {}
    pending = list(makers)
    while pending:
        name = pending.pop(0)
        try:
            built[name] = makers[name]()
        except Exception as e:
            failed[name] = short(e)
            torch._dynamo.reset()
            pending = [n for n in makers if n not in failed]
            built.clear()
    torch.cuda.synchronize()
    dist.barrier()
    rows: dict[str, dict[str, Any]] = {n: {"failed": r} for n, r in failed.items()}
    if built:
        steps = {n: b.step for n, b in built.items()}
        times = interleaved_step_times(steps, args.steps, args.repeats)
        for name, b in built.items():
            copies, ops = device_ops(b.step, args.profile_calls)
            rows[name] = {
                "step_us": times[name].step_us,
                "host_us": times[name].host_us,
                "copies": copies,
                "device_ops": ops,
                **b.info,
            }
    torch.cuda.synchronize()
    dist.barrier()
    torch._dynamo.reset()
    return {n: rows[n] for n in makers}


# -------- groups


def fused_group(args: argparse.Namespace, gname: str, rank: int, emit: Emit) -> None:
    import torch
    import torch.distributed._symmetric_memory as symm_mem

    op = torch.ops.symm_mem

    def f_staged(x: torch.Tensor) -> torch.Tensor:
        return op.one_shot_all_reduce(x, "sum", gname)

    def f_fused(buf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return op.one_shot_all_reduce_copy(buf, x, "sum", gname)

    for nbytes, size in FUSED_SIZES:
        shape = (nbytes // 2 // 1024, 1024)
        gen = torch.Generator(device="cuda").manual_seed(100 + rank)
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
        buf = torch.empty_like(x)
        # the eager reference: the op on a symmetric buffer
        sbuf = symm_mem.empty(shape, device="cuda", dtype=torch.bfloat16)
        symm_mem.rendezvous(sbuf, gname)
        ref = op.one_shot_all_reduce_copy(sbuf, x, "sum", gname).clone()
        for mode in MODES:

            def make(
                fn: Callable[..., Any],
                *fargs: Any,
                mode: str = mode,
                ref: torch.Tensor = ref,
            ) -> Built:
                step, _ = compiled_step(fn, mode, *fargs)
                warm_and_check(step, ref, args.warmup, 2e-2, 2e-2)
                return Built(step)

            makers: dict[str, Maker] = {
                "staged": lambda x=x: make(f_staged, x),
                "fused": lambda x=x, buf=buf: make(f_fused, buf, x),
            }
            row: dict[str, Any] = measure_set(makers, args)
            staged, fused = row["staged"], row["fused"]
            if "step_us" in staged and "step_us" in fused:
                row["ratio"] = fused["step_us"] / staged["step_us"]
            emit(f"fused {size} {mode}", row)


def symm_input(nbytes: int, rank: int, gname: str) -> Any:
    """A rendezvoused symm_mem.empty bf16 tensor of `nbytes`, random data."""
    import torch
    import torch.distributed._symmetric_memory as symm_mem

    n = nbytes // 2
    x = symm_mem.empty(n, device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(200 + rank)
    x.copy_(torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen))
    symm_mem.rendezvous(x, gname)
    return x


def symm_group(args: argparse.Namespace, gname: str, rank: int, emit: Emit) -> None:
    import torch

    op = torch.ops.symm_mem

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return op.one_shot_all_reduce(x, "sum", gname)

    def floor(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    for nbytes, size in SYMM_SIZES:
        x = symm_input(nbytes, rank, gname)
        ref = reduce(x).clone()
        ref_floor = x * 2
        for mode in MODES:

            def make_compiled(
                fn: Callable[..., Any],
                expected: torch.Tensor,
                x: torch.Tensor = x,
                mode: str = mode,
            ) -> Built:
                step, _ = compiled_step(fn, mode, x)
                warm_and_check(step, expected, args.warmup, 2e-2, 2e-2)
                return Built(step)

            def make_eager(x: torch.Tensor = x, ref: torch.Tensor = ref) -> Built:
                step = lambda: reduce(x)  # noqa: E731
                warm_and_check(step, ref, args.warmup, 2e-2, 2e-2)
                return Built(step)

            makers: dict[str, Maker] = {
                "compiled": lambda ref=ref: make_compiled(reduce, ref),
                "floor": lambda ref=ref_floor: make_compiled(floor, ref),
                "eager": make_eager,
            }
            row: dict[str, Any] = measure_set(makers, args)
            if "step_us" in row["compiled"] and "step_us" in row["floor"]:
                row["excess_us"] = row["compiled"]["step_us"] - row["floor"]["step_us"]
            emit(f"symm {size} {mode}", row)


def call_group(args: argparse.Namespace, gname: str, rank: int, emit: Emit) -> None:
    import torch
    from torch._inductor import config
    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.utils import run_and_get_code

    op = torch.ops.symm_mem

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return op.one_shot_all_reduce(x, "sum", gname)

    def floor(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    fns = {"reduce": reduce, "floor": floor}
    other = json.loads(Path(args.code_from).read_text()) if args.code_from else None
    for nbytes, size in SYMM_SIZES:
        name = f"call {size}"
        x = symm_input(nbytes, rank, gname)
        refs = {"reduce": reduce(x).clone(), "floor": x * 2}
        code: dict[str, str] = {}
        for fn_name, fn in fns.items():
            # a fresh compile, so that the code is generated (and seen) here
            with config.patch(fx_graph_cache=False):
                _, sources = run_and_get_code(
                    torch.compile(fresh(fn), fullgraph=True), x
                )
            (code[fn_name],) = sources
        # (label, which function, source): the other level first
        modules: list[tuple[str, str, str]] = []
        if other is not None:
            modules.append(
                (other["label"], "reduce", other["rows"][name]["code"]["reduce"])
            )
        modules += [
            (args.label, "reduce", code["reduce"]),
            ("floor", "floor", code["floor"]),
        ]
        calls = {label: PyCodeCache.load(source).call for label, _, source in modules}
        steps: dict[str, Step] = {}
        # with grad off, as AOTAutograd's runtime wrapper runs an inference
        # graph's `call`
        with torch.no_grad():
            for label, fn_name, _ in modules:
                step = lambda call=calls[label], x=x: call([x])[0]  # noqa: E731
                warm_and_check(step, refs[fn_name], args.warmup, 2e-2, 2e-2)
                steps[label] = step
            torch.cuda.synchronize()
            times = interleaved_step_times(steps, args.steps, args.repeats)
        levels = [label for label, fn_name, _ in modules if fn_name == "reduce"]
        emit(name, {"code": code, "levels": levels, **call_times(times)})
        # the same modules through torch.compile's whole run-time path
        whole = {
            label: whole_step(fns[fn_name], calls[label], x, refs[fn_name], args.warmup)
            for label, fn_name, _ in modules
        }
        native = f"{args.label} native"
        whole[native], _ = compiled_step(reduce, "default", x)
        warm_and_check(whole[native], refs["reduce"], args.warmup, 2e-2, 2e-2)
        torch.cuda.synchronize()
        times = interleaved_step_times(whole, args.steps, args.repeats)
        emit(f"whole {size}", {"levels": [*levels, native], **call_times(times)})


def call_times(times: dict[str, Any]) -> dict[str, Any]:
    """A call or whole row's times: step_us, host_us and excess over the
    floor of each timed module."""
    floor_us = times["floor"].step_us
    return {
        "step_us": {k: t.step_us for k, t in times.items()},
        "host_us": {k: t.host_us for k, t in times.items()},
        "excess_us": {
            k: t.step_us - floor_us for k, t in times.items() if k != "floor"
        },
    }


_LIBS: list[Any] = []


def region_ops() -> dict[str, Any]:
    """The CUDA-graph-unsafe ops of the hoist group, defined once."""
    import torch

    if _LIBS:
        return _LIBS[0]
    from torch._inductor import ir
    from torch._inductor.lowering import register_lowering

    unsafe = (torch._C.Tag.cudagraph_unsafe,)
    lib = torch.library.Library(OPS_NS, "DEF")
    lib.define("unsafe_scale(Tensor x) -> Tensor", tags=unsafe)
    lib.define(
        "unsafe_scale.out(Tensor x, *, Tensor(a!) out) -> Tensor(a!)", tags=unsafe
    )

    def scale(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    def scale_out(x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        return torch.mul(x, 3, out=out)

    def scale_fake(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def scale_out_fake(x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        return out

    lib.impl("unsafe_scale", scale, "CUDA")
    lib.impl("unsafe_scale.out", scale_out, "CUDA")
    torch.library.register_fake(f"{OPS_NS}::unsafe_scale", scale_fake, lib=lib)
    torch.library.register_fake(f"{OPS_NS}::unsafe_scale.out", scale_out_fake, lib=lib)
    out_op = getattr(torch.ops, OPS_NS).unsafe_scale.out

    @register_lowering(getattr(torch.ops, OPS_NS).unsafe_scale.default)
    def _lower(x: ir.TensorBox) -> ir.TensorBox:
        # through the out overload: Inductor allocates the result
        x = ir.ExternKernel.realize_input(x)
        layout = ir.FixedLayout(
            device=x.get_device_or_error(), dtype=x.get_dtype(), size=x.get_size()
        )
        return ir.TensorBox.create(
            ir.ExternKernelOut(layout=layout, inputs=[x], op_overload=out_op)
        )

    # as bench_inputs_and_memory.py's region row (an explicit schema: the
    # annotations of this module are strings)
    custom = torch.library.custom_op(
        f"{OPS_NS}::unsafe_scale_custom",
        mutates_args=(),
        tags=unsafe,
        schema="(Tensor x) -> Tensor",
    )(scale)
    custom.register_fake(scale_fake)

    ops = {
        "out-variant": getattr(torch.ops, OPS_NS).unsafe_scale.default,
        "custom_op": getattr(torch.ops, OPS_NS).unsafe_scale_custom.default,
        "_keep": (lib, custom),
    }
    _LIBS.append(ops)
    return ops


def region_output_site(code: str) -> str:
    """Where the generated code allocates the region's output: the function
    (`partition_N` or `call`) holding its allocation, or `op` when the op
    returns a tensor of its own."""
    if re.search(rf"= torch\.ops\.{OPS_NS}\.unsafe_scale_custom\.default\(", code):
        return "op"
    m = re.search(rf"{OPS_NS}\.unsafe_scale\.out\(.*out=(buf\d+)\)", code)
    if m is None:
        return "?"
    alloc = re.search(rf"^\s*{m.group(1)} = empty_strided_\w+\(", code, re.M)
    if alloc is None:
        return "?"
    defs = re.findall(r"^\s*def (partition_\d+|call)\(", code[: alloc.start()], re.M)
    return defs[-1] if defs else "?"


def hoist_group(args: argparse.Namespace, gname: str, rank: int, emit: Emit) -> None:
    import torch
    from torch._dynamo.utils import counters
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    has_flag = hasattr(config, HOIST_FLAG)
    ops = region_ops()
    gen = torch.Generator(device="cuda").manual_seed(300 + rank)
    x = torch.randn(1024, 1024, device="cuda", generator=gen)
    w1, w2 = (
        torch.randn(1024, 1024, device="cuda", generator=gen) / 32 for _ in range(2)
    )
    for w in (w1, w2):  # like parameters: CUDA graphs must not copy them
        torch._dynamo.mark_static_address(w)
    ref = torch.relu((x @ w1) * 3) @ w2
    if not has_flag:
        emit("flag absent at this level", {"note": f"no config.{HOIST_FLAG}"})

    for variant in ("out-variant", "custom_op"):
        unsafe = ops[variant]

        def region(t: torch.Tensor, unsafe: Any = unsafe) -> torch.Tensor:
            return torch.relu(unsafe(t @ w1)) @ w2

        def make(hoist: bool | None, region: Callable[..., Any] = region) -> Built:
            step, compiled = compiled_step(region, "reduce-overhead", x)
            patches: dict[str, Any] = {
                "graph_partition": True,
                # the generated code is read below: no FX graph cache hit
                "force_disable_caches": True,
            }
            if hoist is not None:
                patches[HOIST_FLAG] = hoist
            before = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
            with config.patch(patches):
                torch.compiler.cudagraph_mark_step_begin()
                out, codes = run_and_get_code(compiled, x)
                torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
                warm_and_check(step, ref, args.warmup, 1e-3, 1e-3)
            recorded = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
            return Built(
                step,
                output_allocated_in=region_output_site("\n".join(codes)),
                non_static_inputs=recorded - before,
            )

        configs: dict[str, bool | None] = (
            {"on": True, "off": False} if has_flag else {"stock": None}
        )
        makers: dict[str, Maker] = {
            name: lambda h=hoist: make(h) for name, hoist in configs.items()
        }
        row: dict[str, Any] = measure_set(makers, args)
        emit(f"hoist {variant}", row)


# -------- output


def progress(name: str, row: dict[str, Any]) -> None:
    """One line per timed set on stderr, as it completes."""
    if int(os.environ.get("RANK", "0")) == 0:
        if name.startswith(("call ", "whole ")):
            parts = [
                f"{k}={row['step_us'][k]:.1f} ({row['host_us'][k]:.1f})"
                for k in row["step_us"]
            ]
        else:
            parts = [
                f"{k}={cell(v).strip()}" if isinstance(v, dict) else f"{k}={v}"
                for k, v in row.items()
            ]
        print(f"[bench_v3] {name}: " + "  ".join(parts), file=sys.stderr, flush=True)


def cell(r: dict[str, Any], width: int = 32) -> str:
    """step_us (host_us) copies/call, or the reason of a failure."""
    if "failed" in r:
        # the message without its exception type; print_run lists the whole
        return f"failed: {r['failed'].split(': ', 1)[-1]}"[:width]
    if "step_us" not in r:
        return str(r)[:width]
    return f"{r['step_us']:8.1f} ({r['host_us']:6.1f}) {r['copies']:4.1f}"


def of_group(names: Iterable[str], prefix: str) -> list[str]:
    """The timed rows named `prefix ...` (not the note of a failed group)."""
    return [n for n in names if n.startswith(prefix) and not n.endswith(" group")]


def level_of() -> str:
    """The overlay level torch is imported from (OVERLAY.json's `upto`), else
    SYMM_STACK_LEVEL, else 0 (the stock pin)."""
    import torch

    overlay = Path(torch.__file__).parents[1] / "OVERLAY.json"
    if overlay.exists():
        return str(json.loads(overlay.read_text()).get("upto", "?"))
    return os.environ.get("SYMM_STACK_LEVEL", "0")


def print_run(result: dict[str, Any]) -> None:
    rows = result["rows"]
    print(
        f"device: {result['device']}  torch: {result['torch']}  level: "
        f"{result['level']}  world size: {result['world_size']}  label: "
        f"{result['label']}\ninductor: {result['inductor']}"
    )
    print("cells: step_us (host_us) copies/call; failed: <reason>")
    fused = of_group(rows, "fused ")
    if fused:
        print(f"\n{'fused':26s} {'staged':>32s}   {'fused':>32s}   fused/staged")
        for n in fused:
            r = rows[n]
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
            print(
                f"{n[6:]:26s} {cell(r['staged']):>32s}   {cell(r['fused']):>32s}   "
                f"{ratio}"
            )
    symm = of_group(rows, "symm ")
    if symm:
        print(
            f"\n{'symm':26s} {'compiled':>32s}   {'floor (x * 2)':>32s}   "
            f"{'eager':>32s}   compiled-floor"
        )
        for n in symm:
            r = rows[n]
            excess = f"{r['excess_us']:.1f}" if "excess_us" in r else "-"
            print(
                f"{n[5:]:26s} {cell(r['compiled']):>32s}   {cell(r['floor']):>32s}   "
                f"{cell(r['eager']):>32s}   {excess}"
            )
    for prefix, what in (
        ("call ", "generated call([x])"),
        ("whole ", "each module run by a torch.compile'd function"),
    ):
        group = prefix.strip()
        in_group = of_group(rows, prefix)
        if in_group:
            print(
                f"\n{group} (default mode, {what} timed in turns in this "
                f"process): step_us (host_us), {group}-floor us"
            )
        for n in in_group:
            print(f"{n[len(prefix) :]:26s} {call_cells(rows[n])}")
    hoist = of_group(rows, "hoist ") + of_group(rows, "flag ")
    if hoist:
        print(
            f"\n{'hoist (reduce-overhead)':26s} {'flag':>5s} {'copies/replay':>14s} "
            f"{'step_us':>9s} {'host_us':>9s} {'output in':>12s} {'non-static':>11s}"
        )
        for n in hoist:
            if "note" in rows[n]:
                print(n)
                continue
            for flag, r in rows[n].items():
                if "failed" in r:
                    print(f"{n[6:]:26s} {flag:>5s} failed: {r['failed']}")
                    continue
                print(
                    f"{n[6:]:26s} {flag:>5s} {r['copies']:14.2f} {r['step_us']:9.1f} "
                    f"{r['host_us']:9.1f} {r['output_allocated_in']:>12s} "
                    f"{r['non_static_inputs']:11d}"
                )
    failures = [
        f"  {n} {k}: {v['failed']}"
        for n, r in rows.items()
        for k, v in r.items()
        if isinstance(v, dict) and "failed" in v
    ]
    failures += [f"  {n}: {r['note']}" for n, r in rows.items() if n.endswith(" group")]
    if failures:
        print("\nfailed:\n" + "\n".join(failures))
    print(f"\n(elapsed {result['elapsed_s']:.0f} s, per group: {result['group_s']})")


def call_cells(row: dict[str, Any]) -> str:
    """A call row: each module's step_us (host_us) and excess over the floor,
    the later levels judged against the first (see `against_target`)."""
    if "step_us" not in row:
        return cell(row)
    levels, excess = row["levels"], row["excess_us"]
    cells = [f"floor {row['step_us']['floor']:.1f} ({row['host_us']['floor']:.1f})"]
    for lb in levels:
        judged = (
            f"{excess[lb]:.1f}"
            if lb == levels[0]
            else against_target(excess[levels[0]], excess[lb])
        )
        cells.append(
            f"{lb} {row['step_us'][lb]:.1f} ({row['host_us'][lb]:.1f}) excess {judged}"
        )
    return "   ".join(cells)


def against_target(b: float, e: float) -> str:
    """The excess `e` judged against the base's excess `b`: met when at most
    (TARGET - 1) x |b| above it (sign-aware); shown as a ratio where the base
    is positive, else as the difference."""
    met = e <= b + (TARGET - 1) * abs(b)
    vs = f"{e / b:.2f}x" if b > 0 else f"{e - b:+.1f} us"
    return f"{e:.1f} ({vs} {'met' if met else 'MISSED'})"


def pooled(symm: list[str], by_label: dict[str, list[dict[str, Any]]]) -> None:
    """Runs that share a label (one level run several times, in turns with the
    other levels) pooled: the median of their excesses, the ratio and the
    target judged on those medians (the first label the base)."""
    import statistics

    labels = list(by_label)
    counts = ", ".join(f"{lb}: {len(rs)} runs" for lb, rs in by_label.items())
    print(f"\nsymm pooled: median compiled-floor us over runs ({counts})")
    print(f"{'':26s}" + "".join(f"{lb:>36s}" for lb in labels))
    for n in symm:
        medians: dict[str, float] = {}
        for lb, rs in by_label.items():
            excess = [
                r["rows"][n]["excess_us"]
                for r in rs
                if "excess_us" in r["rows"].get(n, {})
            ]
            if excess:
                medians[lb] = statistics.median(excess)
        cells = []
        for lb in labels:
            if lb not in medians:
                cells.append("-")
            elif lb == labels[0] or labels[0] not in medians:
                cells.append(f"{medians[lb]:.1f}")
            else:
                cells.append(against_target(medians[labels[0]], medians[lb]))
        print(f"{n[5:]:26s}" + "".join(f"{c:>36s}" for c in cells))


def pooled_calls(name: str, rows: list[dict[str, Any]]) -> None:
    """Several runs of one call row with the same levels: the median excess
    of each level and the target judged on the medians."""
    import statistics

    levels = max((r["levels"] for r in rows), key=len, default=[])
    rows = [r for r in rows if r["levels"] == levels]
    if len(rows) < 2 or len(levels) < 2:
        return
    med = {lb: statistics.median(r["excess_us"][lb] for r in rows) for lb in levels}
    cells = [f"{levels[0]} {med[levels[0]]:.1f}"] + [
        f"{lb} {against_target(med[levels[0]], med[lb])}" for lb in levels[1:]
    ]
    print(f"{name:26s} median of {len(rows)} runs: " + "   ".join(cells))


def table(paths: list[str]) -> None:
    """Runs side by side, the first (level 0) the base of the ratios."""
    runs = [json.load(open(p)) for p in paths]
    labels = [r["label"] for r in runs]
    names = list(dict.fromkeys(n for r in runs for n in r["rows"]))
    width = 36
    print(
        "devices: " + ", ".join(f"{r['label']}={r['device']}" for r in runs) + "\n"
        "levels: " + ", ".join(f"{r['label']}={r['level']}" for r in runs)
    )

    def head(title: str) -> None:
        print(f"\n{title:26s}" + "".join(f"{lb:>{width}s}" for lb in labels))

    def failed(r: dict[str, Any]) -> str:
        return cell(r, width - 2)

    symm = of_group(names, "symm ")
    if symm:
        head(f"symm: compiled-floor us, ratio to {labels[0]}, target <= {TARGET}x")
        for n in symm:
            base = runs[0]["rows"].get(n, {})
            cells = []
            for r in runs:
                row = r["rows"].get(n)
                if row is None:
                    cells.append("-")
                elif "excess_us" not in row:
                    bad = (
                        row["compiled"] if "failed" in row["compiled"] else row["floor"]
                    )
                    cells.append(failed(bad))
                elif r is runs[0] or "excess_us" not in base:
                    cells.append(f"{row['excess_us']:.1f}")
                else:
                    cells.append(against_target(base["excess_us"], row["excess_us"]))
            print(f"{n[5:]:26s}" + "".join(f"{c:>{width}s}" for c in cells))
        by_label = {
            lb: [r for r in runs if r["label"] == lb] for lb in dict.fromkeys(labels)
        }
        if any(len(rs) > 1 for rs in by_label.values()):
            pooled(symm, by_label)
    for prefix in ("call ", "whole "):
        calls = of_group(names, prefix)
        if calls:
            print(
                f"\n{prefix.strip()}: {prefix.strip()}-floor us within one process, "
                "later levels against the first"
            )
        for n in calls:
            within = [r for r in runs if "excess_us" in r["rows"].get(n, {})]
            for r in within:
                print(
                    f"{n[len(prefix) :]:26s} {r['label']:>6s}: "
                    f"{call_cells(r['rows'][n])}"
                )
            pooled_calls(n[len(prefix) :], [r["rows"][n] for r in within])
    fused = of_group(names, "fused ")
    if fused:
        head("fused: fused/staged (us)")
        for n in fused:
            cells = []
            for r in runs:
                row = r["rows"].get(n)
                if row is None:
                    cells.append("-")
                elif "ratio" in row:
                    cells.append(
                        f"{row['ratio']:.2f} ({row['fused']['step_us']:.0f}/"
                        f"{row['staged']['step_us']:.0f})"
                    )
                else:
                    bad = row["staged"] if "failed" in row["staged"] else row["fused"]
                    cells.append(failed(bad))
            print(f"{n[6:]:26s}" + "".join(f"{c:>{width}s}" for c in cells))
    hoist = of_group(names, "hoist ")
    if hoist:
        head("hoist: copies/replay, step_us")
        for n in hoist:
            flags = list(dict.fromkeys(f for r in runs for f in r["rows"].get(n, {})))
            for flag in flags:
                cells = []
                for r in runs:
                    row = r["rows"].get(n, {}).get(flag)
                    if row is None:
                        cells.append("-")
                    elif "failed" in row:
                        cells.append(failed(row))
                    else:
                        cells.append(f"{row['copies']:.2f} cp, {row['step_us']:.1f} us")
                print(
                    f"{n[6:] + ' ' + flag:26s}"
                    + "".join(f"{c:>{width}s}" for c in cells)
                )


# -------- main


def run(args: argparse.Namespace, groups: list[str]) -> dict[str, Any]:
    import torch
    import torch._inductor.config
    import torch.distributed as dist
    import torch.distributed._symmetric_memory  # noqa: F401  (before compiling)

    t0 = time.perf_counter()
    rank, gname = join_process_group()
    result: dict[str, Any] = {
        "label": args.label,
        "rank": rank,
        "world_size": dist.get_world_size(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "inductor": str(Path(torch._inductor.config.__file__).parent),
        "level": level_of(),
        "rows": {},
        "group_s": {},
    }

    def emit(name: str, row: dict[str, Any]) -> None:
        result["rows"][name] = row
        result["elapsed_s"] = time.perf_counter() - t0
        progress(name, row)
        if args.json and rank == 0:  # after each row: a time-boxed run keeps some
            Path(args.json).write_text(json.dumps(result, indent=1))

    runners = {
        "fused": fused_group,
        "symm": symm_group,
        "call": call_group,
        "hoist": hoist_group,
    }
    for group in groups:
        start = time.perf_counter()
        try:
            runners[group](args, gname, rank, emit)
        except Exception as e:  # a group that breaks down is reported
            emit(f"{group} group", {"note": f"failed: {short(e)}"})
        result["group_s"][group] = round(time.perf_counter() - start, 1)
    dist.destroy_process_group()
    result["elapsed_s"] = time.perf_counter() - t0
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Run under torchrun; --table needs no GPU.",
    )
    parser.add_argument(
        "--rows",
        default="fused,symm,hoist",
        help=f"comma-separated, of {','.join(GROUPS)} (default: fused,symm,hoist)",
    )
    parser.add_argument(
        "--code-from",
        metavar="JSON",
        help="call rows: also time the modules of this run (another level)",
    )
    parser.add_argument("--label", default="run")
    parser.add_argument("--json", help="write the rows to this file (rank 0)")
    parser.add_argument(
        "--table", nargs="+", metavar="JSON", help="compare runs (level 0 first)"
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--profile-calls", type=int, default=10)
    args = parser.parse_args()
    if args.table:
        table(args.table)
        return 0
    groups = [g for g in args.rows.split(",") if g]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        parser.error(f"--rows: unknown {unknown}; choose from {','.join(GROUPS)}")
    result = run(args, groups)
    if result["rank"] == 0:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        print_run(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
