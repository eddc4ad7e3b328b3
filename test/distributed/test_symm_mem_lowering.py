"""LoweringTest, GPU tier: symm_mem lowering end to end, one rank per GPU.

In the form of upstream's test/distributed/test_symmetric_memory.py
(``MultiProcContinuousTest``): plain pytest launches it and the class spawns
one worker per visible CUDA GPU, world size 1 included (scripts/apply_and_build.sh
and scripts/gpu_tier.sh run it so):

    python -m pytest -v test/distributed/test_symm_mem_lowering.py

Every rank runs the same tests in the same order with fixed iteration counts.
Results are compared against an eager reference that uses NCCL all_reduce (the
identity at world size 1).  Only the tests that need two ranks skip below 2
GPUs (``@skip_if_lt_x_gpu(2)``).
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

# The Meta and Functionalize kernels of the in-place symm_mem collectives, and
# their functional forms, come with this module, as in any program that uses
# symmetric memory.
import torch.distributed._symmetric_memory  # noqa: F401
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck
from torch.testing._internal.common_distributed import skip_if_lt_x_gpu
from torch.testing._internal.common_utils import (
    instantiate_parametrized_tests,
    parametrize,
    requires_cuda_p2p_access,
    run_tests,
)


sys.path.insert(0, str(Path(__file__).parent))

import gpu_tier  # noqa: E402
from code_stats import (  # noqa: E402
    P2P_ALLOC,
    P2P_DYNAMIC,
    P2P_GRAPH_INPUT,
    TRITON_KERNEL,
    CodeStats,
    check_counts,
)
from gpu_tier import (  # noqa: E402
    SymmMemTestCase,
    eight_layers,
    eight_layers_reference,
    group_name,
    module_p2p_buffers,
    nccl_all_reduce,
    poison_p2p_buffers,
    rank_values,
    rel_err,
)
from stack_level import bases, holds, levels  # noqa: E402


@instantiate_parametrized_tests
class LoweringTest(SymmMemTestCase):
    def _eight_layer_inputs(self, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        gen = torch.Generator(device="cuda").manual_seed(seed + dist.get_rank())
        x = torch.randn(128, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
        ws = [
            torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
            / 96
            for _ in range(8)
        ]
        return x, ws

    @levels(0)
    def test_eight_layer_numerics(self) -> None:
        self._init_process()
        compiled = torch.compile(eight_layers(group_name()), fullgraph=True)
        for it in range(3):
            x, ws = self._eight_layer_inputs(seed=100 * it)
            out = compiled(x, ws)
            ref = eight_layers_reference(x, ws)
            self.assertTrue(torch.isfinite(out).all())
            self.assertLess(rel_err(out, ref), 2e-2)

    @levels(1)
    def test_eight_layer_buffer_plan(self) -> None:
        self._init_process()
        compiled = torch.compile(eight_layers(group_name()), fullgraph=True)
        x, ws = self._eight_layer_inputs(seed=7)
        out, (code, *_) = run_and_get_code(compiled, x, ws)
        stats = CodeStats.of(code)
        # One P2P buffer and one regular buffer ping-pong through 8 layers.
        self.assertEqual(stats.p2p_allocs, 1, stats)
        self.assertEqual(stats.plain_allocs, 1, stats)
        self.assertGreaterEqual(stats.reuses, 14, stats)
        self.assertLessEqual(stats.buffer_names, 16, stats)
        self.assertEqual(stats.out_calls, 16, stats)
        check_counts(code, {"torch.ops.symm_mem.one_shot_all_reduce_out.default(": 8})
        self.assertLess(rel_err(out, eight_layers_reference(x, ws)), 2e-2)

    @levels(0, 0)
    def test_pin_eight_layer_buffer_plan(self) -> None:
        self._init_process()
        compiled = torch.compile(eight_layers(group_name()), fullgraph=True)
        x, ws = self._eight_layer_inputs(seed=7)
        _, (code, *_) = run_and_get_code(compiled, x, ws)
        stats = CodeStats.of(code)
        self.assertEqual(
            (stats.buffer_names, stats.reuses, stats.out_calls),
            (24, 7, 8),
            stats,
        )

    def _one_shot_copy_case(self) -> None:
        gname = group_name()

        def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            staging = x * 2  # Inductor-allocated, so it can become P2P
            return torch.ops.symm_mem.one_shot_all_reduce_copy(
                staging, y + 1, "sum", gname
            )

        compiled = torch.compile(fn, fullgraph=True)
        code = ""
        for it in range(3):
            x = torch.randn(256, 512, device="cuda") + it
            y = torch.randn(256, 512, device="cuda") * (dist.get_rank() + 1)
            if it == 0:  # run_and_get_code resets dynamo: first call only
                out, (code, *_) = run_and_get_code(compiled, x, y)
            else:
                out = compiled(x, y)
            torch.testing.assert_close(out, nccl_all_reduce(y + 1))
        FileCheck().check(
            "torch.ops.symm_mem.one_shot_all_reduce_copy_out.default("
        ).run(code)

    @levels(1)
    def test_one_shot_copy_numerics(self) -> None:
        self._init_process()
        self._one_shot_copy_case()

    def _two_graphs(self) -> None:
        gname = group_name()

        def f(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(x + 1, "sum", gname)

        def g(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(x * 3, "sum", gname) - 1

        cf = torch.compile(f, fullgraph=True)
        cg = torch.compile(g, fullgraph=True)
        for it in range(2):
            a = torch.randn(64, 128, device="cuda") + dist.get_rank() + it
            b = torch.randn(300, 256, device="cuda") - dist.get_rank() - it
            torch.testing.assert_close(cf(a), nccl_all_reduce(a + 1))
            torch.testing.assert_close(cg(b), nccl_all_reduce(b * 3) - 1)

    @levels(1)
    def test_two_graphs_with_p2p_buffers_of_different_sizes(self) -> None:
        self._init_process()
        self._two_graphs()

    @levels(0, 0)
    def test_pin_two_graphs_collide_on_alloc_id(self) -> None:
        self._init_process()
        with self.assertRaisesRegex(RuntimeError, "alloc_id"):
            self._two_graphs()

    def _mm_returned_and_reduced(self) -> None:
        gname = group_name()

        def fn(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = x @ w
            return y, torch.ops.symm_mem.one_shot_all_reduce(y, "sum", gname)

        compiled = torch.compile(fn, fullgraph=True)
        held = []
        for it in range(3):
            x = torch.randn(64, 128, device="cuda") + it
            w = torch.randn(128, 256, device="cuda") * (dist.get_rank() + 1)
            y, r = compiled(x, w)
            torch.testing.assert_close(y, x @ w)
            torch.testing.assert_close(r, nccl_all_reduce(x @ w))
            held.append((y, (x @ w).clone()))
        # the caller still holds every returned y, none was overwritten
        for y, ref in held:
            torch.testing.assert_close(y, ref)

    @levels(1)
    def test_p2p_buffer_that_is_a_graph_output_does_not_escape(self) -> None:
        self._init_process()
        self._mm_returned_and_reduced()

    @levels(0, 0)
    def test_pin_p2p_buffer_that_is_a_graph_output_fails(self) -> None:
        self._init_process()
        with self.assertRaisesRegex(RuntimeError, "alloc_id"):
            self._mm_returned_and_reduced()

    @levels(1)
    def test_fx_graph_cache_hit_gets_buffers_of_its_own(self) -> None:
        """With the FX graph cache on, identical graphs (the second served by
        the cache) and a different graph each get P2P buffers of their own:
        no ids are baked into the code (Note [P2P buffers of a compiled
        module])."""
        self._init_process()
        from torch._dynamo.utils import counters

        gname = group_name()

        def fn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(x * 2, "sum", gname)

        def other(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(x * 3, "sum", gname)

        x = torch.randn(64, 128, device="cuda") * (dist.get_rank() + 1)
        seen = [{t.data_ptr() for t in module_p2p_buffers()}]
        with torch._inductor.config.patch(
            {"fx_graph_cache": True, "force_disable_caches": False}
        ):
            first = torch.compile(fn, fullgraph=True)
            torch.testing.assert_close(first(x), nccl_all_reduce(x * 2))
            seen.append({t.data_ptr() for t in module_p2p_buffers()})
            torch._dynamo.reset()
            counters.clear()
            second = torch.compile(fn, fullgraph=True)
            torch.testing.assert_close(second(x), nccl_all_reduce(x * 2))
            self.assertGreaterEqual(counters["inductor"]["fxgraph_cache_hit"], 1)
            seen.append({t.data_ptr() for t in module_p2p_buffers()})
            third = torch.compile(other, fullgraph=True)
            torch.testing.assert_close(third(x), nccl_all_reduce(x * 3))
            seen.append({t.data_ptr() for t in module_p2p_buffers()})
        # each compiled module added one buffer of its own
        self.assertEqual([len(b - a) for a, b in itertools.pairwise(seen)], [1, 1, 1])
        torch.testing.assert_close(first(x + 1), nccl_all_reduce(x * 2 + 2))
        torch.testing.assert_close(second(x + 1), nccl_all_reduce(x * 2 + 2))

    @levels(1)
    def test_dynamic_site_memory_is_bounded(self) -> None:
        """Default mode, 40 sizes: the site holds less than twice the bytes
        of the largest size (Note [P2P buffers of a compiled module])."""
        self._init_process()
        gname = group_name()

        def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(x @ w, "sum", gname)

        compiled = torch.compile(fn, fullgraph=True, dynamic=True)
        since = gpu_tier.loaded_modules()
        w = torch.randn(128, 256, device="cuda")
        largest = 0
        for it, n in enumerate(range(64, 64 + 40 * 97, 97)):
            x = torch.randn(n, 128, device="cuda") + it
            torch.testing.assert_close(compiled(x, w), nccl_all_reduce(x @ w))
            largest = max(largest, n * 256 * 4)
            held = sum(t.untyped_storage().nbytes() for t in module_p2p_buffers(since))
            self.assertLess(held, 2 * largest)

    # [2/5] inputs Inductor does not allocate

    def _check_calls(
        self,
        fn: Callable[..., torch.Tensor],
        ref: Callable[..., torch.Tensor],
        shapes: list[list[tuple[int, ...]]],
        dynamic: bool = False,
        poison: bool = False,
    ) -> str:
        """Compile ``fn``, call it once per entry of ``shapes`` with new values
        and check each result against ``ref``; return the generated code. All
        calls run the graph compiled by the first one (with ``dynamic``, one
        graph of symbolic sizes for every size in ``shapes``).

        ``poison``: before every call after the first, fill the graph's
        persistent P2P buffers with NaN (on every rank), so a result computed
        from a P2P buffer that the compiled code did not write is caught."""
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic or None)
        code = ""
        # Stock torch warned "Failed to realize the input as a symmetric
        # memory buffer" and then failed at run time; planning now succeeds.
        with self.assertNoLogs("torch._inductor.comm_lowering", "WARNING"):
            code = self._calls(compiled, ref, shapes, dynamic, poison)
        return code

    def _calls(
        self,
        compiled: Callable[..., torch.Tensor],
        ref: Callable[..., torch.Tensor],
        shapes: list[list[tuple[int, ...]]],
        dynamic: bool,
        poison: bool,
    ) -> str:
        code = ""
        for it, call_shapes in enumerate(shapes):
            args = [
                torch.randn(shape, device="cuda") * (dist.get_rank() + 1) + it
                for shape in call_shapes
            ]
            if dynamic:
                for a in args:
                    torch._dynamo.mark_dynamic(a, 0)
            if poison and it > 0:
                poison_p2p_buffers()
            if it == 0:  # run_and_get_code resets dynamo: first call only
                out, (code, *_) = run_and_get_code(compiled, *args)
            else:
                out = compiled(*args)
            torch.testing.assert_close(out, ref(*args))
        return code

    @levels(2)
    @parametrize(
        "dynamic", [False, True], name_fn=lambda d: "dynamic" if d else "static"
    )
    def test_graph_input_one_shot(self, dynamic: bool) -> None:
        self._init_process()
        gname = group_name()

        def fn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(x, "sum", gname)

        if not dynamic:
            code = self._check_calls(fn, nccl_all_reduce, [[(256, 512)]] * 3)
            if holds(2, 4):
                # exactly one identity copy into the one P2P buffer
                check_counts(code, {P2P_ALLOC: 1, TRITON_KERNEL: 1})
            else:
                # [5/5] the site that passes x through or copies it into its
                # staging buffer at run time: no kernel, no copy in the code
                check_counts(
                    code,
                    {P2P_ALLOC: 1, P2P_GRAPH_INPUT: 1, TRITON_KERNEL: 0, ".copy_(": 0},
                )
            return
        code = self._check_calls(
            fn, nccl_all_reduce, [[(96, 64)], [(160, 64)], [(33, 64)]], dynamic=True
        )
        # dynamic: the identity copy into the site's growing P2P buffer
        check_counts(code, {P2P_DYNAMIC: 1, TRITON_KERNEL: 1})

    @levels(1)
    def test_dynamic_mm_output_fed_to_one_shot(self) -> None:
        self._init_process()
        gname = group_name()

        def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(x @ w, "sum", gname)

        code = self._check_calls(
            fn,
            lambda x, w: nccl_all_reduce(x @ w),
            [[(n, 128), (128, 64)] for n in (96, 160, 33)],
            dynamic=True,
        )
        # the site's growing P2P buffer, written by the mm itself: no copy
        check_counts(code, {P2P_DYNAMIC: 1, TRITON_KERNEL: 0})

    @levels(2)
    @parametrize(
        "dynamic", [False, True], name_fn=lambda d: "dynamic" if d else "static"
    )
    def test_graph_input_two_shot_all_reduce_(self, dynamic: bool) -> None:
        self._init_process()
        gname = group_name()

        def fn(x: torch.Tensor) -> torch.Tensor:
            torch.ops.symm_mem.two_shot_all_reduce_(x, "sum", gname)
            return x * 1

        shapes = (
            [[(96, 64)], [(160, 64)], [(64, 64)]] if dynamic else [[(256, 512)]] * 3
        )
        compiled = torch.compile(fn, fullgraph=True)
        for it, (shape,) in enumerate(shapes):
            x = torch.randn(shape, device="cuda") * (dist.get_rank() + 1) + it
            if dynamic:
                torch._dynamo.mark_dynamic(x, 0)
            ref = nccl_all_reduce(x)
            out = compiled(x)
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(x, ref)  # mutated in place, as eager

    @levels(2)
    @skip_if_lt_x_gpu(2)
    @parametrize(
        "dynamic", [False, True], name_fn=lambda d: "dynamic" if d else "static"
    )
    def test_graph_input_reduce_scatter_out(self, dynamic: bool) -> None:
        """Needs 2 ranks: the reduce-scatter kernel refuses world size 1
        ("Not implemented for world_size=1", seen on one H200)."""
        self._init_process()
        gname = group_name()
        world = dist.get_world_size()

        def fn(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            torch.ops.symm_mem.reduce_scatter_out(x, gname, False, out)
            return out + 0

        # The kernel takes 1-D inputs ("reduce_scatter expected 1D input").
        sizes = [16384, 49152, 24576] if dynamic else [32768, 32768, 32768]
        compiled = torch.compile(fn, fullgraph=True)
        for it, n in enumerate(sizes):
            x = torch.randn(n, device="cuda") * (dist.get_rank() + 1) + it
            out = torch.empty(n // world, device="cuda")
            if dynamic:
                torch._dynamo.mark_dynamic(x, 0)
                torch._dynamo.mark_dynamic(out, 0)
            ref = torch.empty_like(out)
            dist.reduce_scatter_tensor(ref, x)
            torch.testing.assert_close(compiled(x, out), ref)
            torch.testing.assert_close(out, ref)

    @levels(2)
    @parametrize(
        "dynamic", [False, True], name_fn=lambda d: "dynamic" if d else "static"
    )
    def test_graph_input_one_shot_copy(self, dynamic: bool) -> None:
        self._init_process()
        gname = group_name()

        def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce_copy(x, y, "sum", gname)

        def ref(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return nccl_all_reduce(y)

        shapes = (
            [[(n, 64)] * 2 for n in (96, 160, 33)]
            if dynamic
            else [[(128, 256)] * 2] * 3
        )
        code = self._check_calls(fn, ref, shapes, dynamic=dynamic)
        # [2/5] `symm_buffer` is scratch the kernel overwrites: a P2P buffer of
        # its own, nothing of x is copied into it
        check_counts(code, {P2P_ALLOC: 1, TRITON_KERNEL: 0, ".copy_(": 0})

    @levels(2)
    def test_one_shot_copy_leaves_the_callers_symm_buffer_alone(self) -> None:
        self._init_process()
        gname = group_name()

        def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce_copy(x, y, "sum", gname)

        compiled = torch.compile(fn, fullgraph=True)
        x = torch.randn(128, 256, device="cuda")
        before = x.clone()
        for it in range(3):
            y = torch.randn(128, 256, device="cuda") * (dist.get_rank() + 1) + it
            torch.testing.assert_close(compiled(x, y), nccl_all_reduce(y))
        # the schema says `symm_buffer` is read-only, and so it stays
        torch.testing.assert_close(x, before, rtol=0, atol=0)

    @levels(2)
    def test_custom_op_output_fed_to_one_shot(self) -> None:
        self._init_process()
        gname = group_name()

        def fn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(
                gpu_tier.scale(x), "sum", gname
            )

        code = self._check_calls(
            fn, lambda x: nccl_all_reduce(x * 3), [[(128, 256)]] * 3
        )
        # the custom op's output is copied into the one P2P buffer
        check_counts(code, {P2P_ALLOC: 1, TRITON_KERNEL: 1})

    @levels(2)
    @parametrize("producer", ["relu_mm", "add"])
    def test_pointwise_producer_needs_no_copy(self, producer: str) -> None:
        self._init_process()
        gname = group_name()

        def relu_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(
                torch.relu(x @ w), "sum", gname
            )

        def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(a + b, "sum", gname)

        fn, ref, shapes = {
            "relu_mm": (
                relu_mm,
                lambda x, w: nccl_all_reduce(torch.relu(x @ w)),
                [(64, 128), (128, 256)],
            ),
            "add": (add, lambda a, b: nccl_all_reduce(a + b), [(128, 256)] * 2),
        }[producer]
        # Poisoned: a P2P buffer the pointwise kernel did not write would
        # turn the result into NaN.
        code = self._check_calls(fn, ref, [shapes] * 3, poison=True)
        # The pointwise kernel writes the P2P buffer: one kernel, no copy.
        check_counts(code, {TRITON_KERNEL: 1, P2P_ALLOC: 1})

    @levels(2)
    @skip_if_lt_x_gpu(2)
    @requires_cuda_p2p_access()
    @parametrize(
        "dynamic", [False, True], name_fn=lambda d: "dynamic" if d else "static"
    )
    def test_graph_input_every_peer_contributes(self, dynamic: bool) -> None:
        """Needs 2 ranks: at world size 1 the all-reduce is the identity, so a
        result that misses a peer's staged input, or reads a peer's staging
        buffer before that peer wrote this call's values, looks right."""
        self._init_process()
        self.assertGreaterEqual(dist.get_world_size(), 2)
        gname = group_name()

        def fn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(x, "sum", gname)

        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic or None)
        for it, n in enumerate((96, 160, 33, 96) if dynamic else (256,) * 4):
            x, total = rank_values((n, 64), it)
            if dynamic:
                torch._dynamo.mark_dynamic(x, 0)
            out = compiled(x)
            torch.testing.assert_close(out, total, msg=f"call {it}")
            self.assertFalse(torch.equal(out, x))  # the peers' values are in

    @bases("2.11.0")  # 2.14.1 copies the input into a P2P buffer
    @levels(0, 1)
    def test_pin_graph_input_fails_at_run_time(self) -> None:
        self._init_process()
        gname = group_name()

        def fn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(x, "sum", gname)

        with self.assertRaisesRegex(RuntimeError, "empty_strided_p2p"):
            torch.compile(fn, fullgraph=True)(torch.randn(64, 64, device="cuda"))


# Run by UserCaptureTest in a process of its own: an illegal memory access
# poisons the CUDA context, and would end the test's worker.
USER_CAPTURE_CHILD = """
import os, sys, torch, torch.distributed as dist
import torch.distributed._symmetric_memory  # noqa: F401

torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1)
gname = dist.group.WORLD.group_name

def fn(x):
    return torch.ops.symm_mem.one_shot_all_reduce(x * 2, "sum", gname)

compiled = torch.compile(fn, fullgraph=True, dynamic=True)
small = torch.randn(8, 64, device="cuda")
torch.testing.assert_close(compiled(small), small * 2)
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    compiled(small)
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    captured = compiled(small)
big = torch.randn(4096, 64, device="cuda")
torch.testing.assert_close(compiled(big), big * 2)
for it in range(5):
    small.copy_(torch.randn(8, 64, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, small * 2, msg=f"replay {it}")
dist.destroy_process_group()
print("replays after a larger eager call: OK")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class UserCaptureTest(SymmMemTestCase):
    """A default-mode module under the caller's own torch.cuda.graph (the
    vLLM pattern): capture at a small size, call eagerly at a larger one,
    then replay the capture. The allocation the capture used must still be
    there (`P2PBuffers.dynamic` decides that at run time)."""

    @levels(1)
    def test_replay_after_a_larger_eager_call(self) -> None:
        self._init_process()
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "CUDA_VISIBLE_DEVICES": str(torch.cuda.current_device()),
            "PYTHONPATH": os.pathsep.join(sys.path),
        }
        child = subprocess.run(
            [sys.executable, "-c", USER_CAPTURE_CHILD],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        self.assertEqual(child.returncode, 0, child.stderr[-3000:])
        self.assertIn("replays after a larger eager call: OK", child.stdout)


class CppWrapperTest(SymmMemTestCase):
    """The cpp wrapper has no P2P buffers: a symmetric graph input reaches
    the op as it is, as at the pin, and gives the pin's result."""

    @levels(0)
    def test_symmetric_input(self) -> None:
        self._init_process()
        gname = group_name()

        def fn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(x, "sum", gname)

        with torch._inductor.config.patch(cpp_wrapper=True):
            compiled = torch.compile(fn, fullgraph=True)
            x = torch.distributed._symmetric_memory.empty((256, 512), device="cuda")
            x.copy_(torch.randn(x.shape, device="cuda"))
            out, (code,) = run_and_get_code(compiled, x)
            torch.testing.assert_close(out, nccl_all_reduce(x))
            for it in range(3):
                x.copy_(torch.randn(x.shape, device="cuda"))
                torch.testing.assert_close(compiled(x), nccl_all_reduce(x), msg=f"{it}")
        self.assertNotIn("p2p_buffers", code)


if __name__ == "__main__":
    run_tests()
