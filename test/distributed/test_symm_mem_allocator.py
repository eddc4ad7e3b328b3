"""[5/5] Static graph inputs of symm_mem ops: passed through when they are
symmetric memory, else staged by one `copy_`.  GPU tier.

One rank per visible CUDA GPU, world size 1 included
(``MultiProcContinuousTest``; no torchrun):

    python -m pytest -v test/distributed/test_symm_mem_allocator.py

A static-shape graph input of a symm_mem op is a site of the module's
`p2p_buffers` (Note [Symmetric graph inputs]): a tensor from
`symm_mem.empty()` or from the symmetric memory pool passes through, any
other is copied into the site's persistent P2P buffer; inputs of symbolic
shape still take patch 2's identity copy.  Copies are counted from the
profiler (Memcpy DtoD events and copy kernels), results compared with an
eager NCCL all_reduce (the identity at world size 1).  The reduce-overhead
and graph partition variants also rely on patches 3 and 4 (CUDA graph trees
with P2P inputs), so they hold from level 5 on like the rest of this file.
The CPU tier is test_symm_mem_allocator_cpu.py.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem
from torch._inductor import cudagraph_trees
from torch._inductor.utils import run_and_get_code
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity
from torch.testing import FileCheck
from torch.testing._internal.common_utils import (
    instantiate_parametrized_tests,
    parametrize,
    run_tests,
)


sys.path.insert(0, str(Path(__file__).parent))

from code_stats import (  # noqa: E402
    P2P_ALLOC,
    P2P_DYNAMIC,
    P2P_GRAPH_INPUT,
    P2P_STATIC,
    TRITON_KERNEL,
    check_counts,
    p2p_alloc_lines,
)
from gpu_tier import (  # noqa: E402
    SymmMemTestCase,
    group_name,
    loaded_modules,
    module_p2p_buffers,
    nccl_all_reduce,
    tree_nodes,
)
from stack_level import levels  # noqa: E402


CALLS = 100


@instantiate_parametrized_tests
class GraphInputStagingTest(SymmMemTestCase):
    def _inputs(self, it: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        gen = torch.Generator(device="cuda").manual_seed(1000 * it + dist.get_rank())
        return [torch.randn(s, device="cuda", generator=gen) for s in shapes]

    def _run(
        self,
        fn: Callable[..., torch.Tensor],
        ref: Callable[..., torch.Tensor],
        shapes: Callable[[int], list[tuple[int, ...]]],
        calls: int = CALLS,
        **compile_kwargs: object,
    ) -> str:
        """Compile `fn`, call it `calls` times with new values, compare every
        result with `ref`; return the code of the first call."""
        compiled = torch.compile(fn, fullgraph=True, **compile_kwargs)
        self._since = loaded_modules()
        code = ""
        for it in range(calls):
            args = self._inputs(it, shapes(it))
            if it == 0:
                out, codes = run_and_get_code(compiled, *args)
                code = codes[0]
            else:
                out = compiled(*args)
            # a CUDA graph's output is overwritten by its next replay
            out = out.clone()
            torch.testing.assert_close(out, ref(*args), msg=f"call {it}")
        return code

    def _assert_staged_once_per_input(self, code: str, inputs: int) -> None:
        # one graph-input site per input, which copies at run time (these
        # inputs are not symmetric memory): no allocation or copy in the code
        check_counts(code, {P2P_GRAPH_INPUT: inputs, P2P_ALLOC: inputs, ".copy_(": 0})
        sites = len(module_p2p_buffers(self._since))
        self.assertEqual(sites, inputs)

    def _one_shot(self) -> Callable[[torch.Tensor], torch.Tensor]:
        gname = group_name()

        def fn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(x, "sum", gname)

        return fn

    @levels(5)
    def test_static_graph_input_default_mode(self) -> None:
        self._init_process()
        code = self._run(self._one_shot(), nccl_all_reduce, lambda it: [(256, 512)])
        self._assert_staged_once_per_input(code, 1)
        check_counts(code, {TRITON_KERNEL: 0})  # no identity-copy kernel

    @levels(5)
    def test_two_static_graph_inputs_default_mode(self) -> None:
        self._init_process()
        gname = group_name()

        def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            a = torch.ops.symm_mem.one_shot_all_reduce(x, "sum", gname)
            b = torch.ops.symm_mem.one_shot_all_reduce(y, "sum", gname)
            return a * 2 + b

        code = self._run(
            fn,
            lambda x, y: nccl_all_reduce(x) * 2 + nccl_all_reduce(y),
            lambda it: [(128, 256), (128, 256)],
        )
        self._assert_staged_once_per_input(code, 2)
        check_counts(code, {TRITON_KERNEL: 1})  # the final a * 2 + b

    @levels(5)
    def test_one_shot_copy_symm_buffer_is_never_staged(self) -> None:
        # [2/5] `symm_buffer` is scratch the kernel overwrites: a P2P buffer
        # of the module's own, so x is never staged (nor copied at all).
        self._init_process()
        gname = group_name()

        def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce_copy(x, y, "sum", gname)

        code = self._run(
            fn, lambda x, y: nccl_all_reduce(y), lambda it: [(128, 256)] * 2
        )
        check_counts(code, {".copy_(": 0, P2P_STATIC: 1, TRITON_KERNEL: 0})

    def _one_shot_then_mm(self) -> Callable[..., torch.Tensor]:
        gname = group_name()

        def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(x, "sum", gname) @ w

        return fn

    def _reduce_overhead(self, graph_partition: bool) -> str:
        with torch._inductor.config.patch(graph_partition=graph_partition):
            return self._run(
                self._one_shot_then_mm(),
                lambda x, w: nccl_all_reduce(x) @ w,
                lambda it: [(256, 512), (512, 128)],
                mode="reduce-overhead",
            )

    @levels(5)
    @parametrize(
        "graph_partition",
        [False, True],
        name_fn=lambda p: "graph_partition" if p else "reduce_overhead",
    )
    def test_static_graph_input(self, graph_partition: bool) -> None:
        self._init_process()
        # without graph_partition: the whole graph, staging copy included, is
        # one CUDA graph
        code = self._reduce_overhead(graph_partition=graph_partition)
        self._assert_staged_once_per_input(code, 1)
        check_counts(code, {TRITON_KERNEL: 0})
        if not graph_partition:
            return
        # With graph_partition the site runs outside the CUDA graph on every
        # call; the partition gets what it returns as a (static) P2P input.
        staged = re.search(r"(buf\d+) = p2p_buffers\.graph_input\(", code)
        assert staged is not None, code
        FileCheck().check("def call(self, args):").check(staged.group(0)).check(
            "partition0_args = ["
        ).check_same(f"{staged.group(1)},").check(
            "self.partitions[0](partition0_args)"
        ).run(code)

    @levels(5)
    def test_dynamic_graph_input_takes_identity_copy(self) -> None:
        self._init_process()
        sizes = [96, 160, 33, 64]

        def shapes(it: int) -> list[tuple[int, ...]]:
            return [(sizes[it % len(sizes)], 64)]

        code = self._run(
            self._one_shot(), nccl_all_reduce, shapes, calls=20, dynamic=True
        )
        check_counts(code, {TRITON_KERNEL: 1, ".copy_(": 0})  # patch 2's copy
        (alloc,) = p2p_alloc_lines(code)
        self.assertIn(P2P_DYNAMIC, alloc)  # a growing site

    @levels(5)
    def test_config_off_takes_identity_copy(self) -> None:
        self._init_process()
        with torch._inductor.config.patch(
            {"_collective.stage_graph_inputs_in_symm_mem": False}
        ):
            code = self._run(
                self._one_shot(), nccl_all_reduce, lambda it: [(256, 512)], calls=10
            )
        check_counts(code, {TRITON_KERNEL: 1, ".copy_(": 0})


def device_copies(fn: Callable[[], object], calls: int) -> tuple[int, list[str]]:
    """Run ``fn`` ``calls`` times under the profiler: the copies the device
    made (Memcpy DtoD events and copy kernels; a dense ``copy_`` is a memcpy,
    the tree's input copy a kernel), and the names of all device work."""
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    copies = [n for n in names if "Memcpy DtoD" in n or "copy" in n.lower()]
    return len(copies), names


def symmetric_tensor(source: str, shape: tuple[int, ...]) -> torch.Tensor:
    if source == "empty":
        return symm_mem.empty(shape, device="cuda")
    # an ordinary allocation in the symmetric memory pool
    with torch.cuda.use_mem_pool(symm_mem.get_mem_pool(torch.device("cuda"))):
        return torch.empty(shape, device="cuda")


MODES = {
    "default": {},
    "reduce_overhead": {"mode": "reduce-overhead"},
}


class GraphInputCopies:
    """Calls of a compiled `one_shot_all_reduce(x)` and the copies they make."""

    SHAPE = (256, 512)

    def _init_process(self) -> None:
        super()._init_process()  # type: ignore[misc]
        cudagraph_trees.reset_cudagraph_trees()

    def _compiled(self, mode: str, graph_partition: bool = True) -> Callable:
        gname = group_name()

        def fn(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(x, "sum", gname)

        compiled = torch.compile(fn, fullgraph=True, **MODES[mode])

        def call(x: torch.Tensor) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            with torch._inductor.config.patch(graph_partition=graph_partition):
                return compiled(x)

        return call

    def _refill(self, x: torch.Tensor, it: int) -> None:
        "New values for call `it`, written into x itself"
        gen = torch.Generator(device="cuda").manual_seed(it + 7 * dist.get_rank())
        x.copy_(torch.randn(x.shape, device="cuda", generator=gen))

    def _check(self, call: Callable, x: torch.Tensor, it: int) -> None:
        self._refill(x, it)
        out = call(x).clone()
        torch.testing.assert_close(out, nccl_all_reduce(x), msg=f"call {it}")

    def _copies_per_call(self, call: Callable, x: torch.Tensor) -> int:
        for it in range(3):  # compile, warm up, record
            self._check(call, x, it)
        copies, names = device_copies(lambda: call(x), CALLS)
        for it in range(3, 6):  # still right after the profiled calls
            self._check(call, x, it)
        self.assertEqual(copies % CALLS, 0, names[:20])  # type: ignore[attr-defined]
        return copies // CALLS


@instantiate_parametrized_tests
class SymmetricGraphInputTest(GraphInputCopies, SymmMemTestCase):
    """Note [Symmetric graph inputs]: what each kind of input costs per call."""

    @levels(5)
    @parametrize("mode", list(MODES))
    @parametrize("source", ["empty", "mem_pool"])
    def test_symmetric_input_costs_no_copy(self, mode: str, source: str) -> None:
        self._init_process()
        call = self._compiled(mode)
        x = symmetric_tensor(source, self.SHAPE)
        self.assertEqual(self._copies_per_call(call, x), 0)

    @levels(5)
    @parametrize("mode", list(MODES))
    def test_passed_through_input_is_left_alone(self, mode: str) -> None:
        # A later P2P buffer of x's shape (a @ w) must not be planned into
        # the node that stands for x, which here is the caller's x itself.
        self._init_process()
        gname = group_name()

        def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            a = torch.ops.symm_mem.one_shot_all_reduce(x, "sum", gname)
            return torch.ops.symm_mem.one_shot_all_reduce(a @ w, "sum", gname)

        compiled = torch.compile(fn, fullgraph=True, **MODES[mode])
        x = symmetric_tensor("empty", self.SHAPE)
        w = torch.eye(self.SHAPE[1], device="cuda")
        for it in range(6):
            self._refill(x, it)
            before = x.clone()
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(x, w).clone()
            torch.testing.assert_close(x, before, rtol=0, atol=0, msg=f"call {it}")
            ref = nccl_all_reduce(nccl_all_reduce(before) @ w)
            torch.testing.assert_close(out, ref, msg=f"call {it}")

    @levels(5)
    @parametrize("mode", list(MODES))
    def test_one_copy_for_two_ops_that_read_one_input(self, mode: str) -> None:
        # one site, one staging buffer and one copy per input and group
        self._init_process()
        gname = group_name()

        def fn(x: torch.Tensor) -> torch.Tensor:
            a = torch.ops.symm_mem.one_shot_all_reduce(x, "sum", gname)
            return a + torch.ops.symm_mem.one_shot_all_reduce(x, "sum", gname)

        compiled = torch.compile(fn, fullgraph=True, **MODES[mode])

        def call(x: torch.Tensor) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(x)

        x = torch.empty(self.SHAPE, device="cuda")
        for it in range(3):
            self._refill(x, it)
            out = call(x).clone()
            torch.testing.assert_close(out, 2 * nccl_all_reduce(x), msg=f"call {it}")
        copies, names = device_copies(lambda: call(x), CALLS)
        self.assertEqual(copies, CALLS, names[:20])

    @levels(5)
    @parametrize("mode", list(MODES))
    @parametrize("source", ["empty", "plain"])
    def test_input_mutated_after_the_collective(self, mode: str, source: str) -> None:
        # The norm, all-reduce, scale-the-grad pattern, against eager: the
        # scaling written back to g must not reach the all-reduce, whether g
        # passes through (symmetric) or is copied.
        self._init_process()
        gname = group_name()

        def fn(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            n = (g * g).sum()
            y = torch.ops.symm_mem.one_shot_all_reduce(g, "sum", gname)
            g.mul_(0.5)
            return y, n

        compiled = torch.compile(fn, fullgraph=True, **MODES[mode])
        g = (
            symmetric_tensor("empty", self.SHAPE)
            if source == "empty"
            else torch.empty(self.SHAPE, device="cuda")
        )
        for it in range(6):
            self._refill(g, it)
            before = g.clone()
            torch.compiler.cudagraph_mark_step_begin()
            y, n = compiled(g)
            y, n = y.clone(), n.clone()
            torch.testing.assert_close(y, nccl_all_reduce(before), msg=f"call {it}")
            torch.testing.assert_close(n, (before * before).sum(), msg=f"call {it}")
            torch.testing.assert_close(g, before * 0.5, msg=f"call {it}")

    @levels(5)
    @parametrize("mode", list(MODES))
    def test_non_symmetric_input_costs_one_copy(self, mode: str) -> None:
        self._init_process()
        call = self._compiled(mode)
        x = torch.empty(self.SHAPE, device="cuda")
        self.assertEqual(self._copies_per_call(call, x), 1)

    @levels(5)
    @parametrize("source", ["empty", "plain"])
    def test_without_graph_partition_two_copies(self, source: str) -> None:
        # One CUDA graph holds the whole call: the tree copies the input into
        # its static input, then the graph's `copy_` into the staging buffer.
        self._init_process()
        call = self._compiled("reduce_overhead", graph_partition=False)
        if source == "empty":
            x = symmetric_tensor("empty", self.SHAPE)
        else:
            x = torch.empty(self.SHAPE, device="cuda")
        self.assertEqual(self._copies_per_call(call, x), 2)

    @levels(5)
    @parametrize("mode", list(MODES))
    def test_symmetric_inputs_at_new_addresses(self, mode: str) -> None:
        # Two symmetric inputs in turn. Default mode passes both through;
        # under CUDA graphs the site passes only the first address through and
        # copies the other, so the tree records at most twice, never per call.
        self._init_process()
        call = self._compiled(mode)
        a, b = (symmetric_tensor("empty", self.SHAPE) for _ in range(2))
        for it in range(6):
            self._check(call, (a, b)[it % 2], it)
        copies, names = device_copies(lambda: (call(a), call(b)), CALLS)
        self.assertEqual(copies, 0 if mode == "default" else CALLS, names[:20])
        if mode == "reduce_overhead":
            self.assertLessEqual(len(tree_nodes()), 2)

    @levels(5)
    def test_external_inputs_are_copied_not_rerecorded(self) -> None:
        # A new DLPack tensor every call under CUDA graphs: one copy each into
        # the staging buffer, whose address the one recording keeps.
        self._init_process()
        call = self._compiled("reduce_overhead")
        owners = [torch.randn(self.SHAPE, device="cuda") for _ in range(20)]
        for it, owner in enumerate(owners):
            x = torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(owner))
            out = call(x).clone()
            torch.testing.assert_close(out, nccl_all_reduce(owner), msg=f"call {it}")
        self.assertEqual(len(tree_nodes()), 1)


@instantiate_parametrized_tests
class NoImplicitPoolTest(GraphInputCopies, SymmMemTestCase):
    """``TORCH_SYMMMEM_IMPLICIT_POOL=0`` in this class's workers:
    ``symm_mem.empty()`` allocates outside the pool, and still passes
    through."""

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        # The workers spawn at the class's first test and inherit this.
        cls._saved_pool_env = os.environ.get("TORCH_SYMMMEM_IMPLICIT_POOL")
        os.environ["TORCH_SYMMMEM_IMPLICIT_POOL"] = "0"

    @classmethod
    def tearDownClass(cls) -> None:
        if cls._saved_pool_env is None:
            os.environ.pop("TORCH_SYMMMEM_IMPLICIT_POOL", None)
        else:
            os.environ["TORCH_SYMMMEM_IMPLICIT_POOL"] = cls._saved_pool_env
        super().tearDownClass()

    @levels(5)
    @parametrize("mode", list(MODES))
    def test_symmetric_input_costs_no_copy(self, mode: str) -> None:
        self._init_process()
        self.assertFalse(symm_mem._should_use_implicit_mempool())
        call = self._compiled(mode)
        x = symmetric_tensor("empty", self.SHAPE)
        self.assertEqual(self._copies_per_call(call, x), 0)


if __name__ == "__main__":
    run_tests()
