"""[5/5] Static graph inputs of symm_mem ops staged by `copy_`, GPU tier.

One rank per visible CUDA GPU, world size 1 included
(``MultiProcContinuousTest``; no torchrun):

    python -m pytest -v test/distributed/test_symm_mem_allocator.py

A static-shape graph input of a symm_mem op gets one persistent P2P staging
buffer, filled by `staging.copy_(input)` on every call (no identity-copy
kernel); inputs of symbolic shape still take patch 2's identity copy.  Results
are compared with an eager NCCL all_reduce (the identity at world size 1).  The
reduce-overhead and graph partition variants also rely on patches 3 and 4 (CUDA
graph trees with P2P inputs), so they hold from level 5 on like the rest of
this file.  The CPU tier is test_symm_mem_allocator_cpu.py.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch._inductor.utils import run_and_get_code
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
    P2P_STATIC,
    TRITON_KERNEL,
    check_counts,
    p2p_alloc_lines,
)
from gpu_tier import SymmMemTestCase, group_name, nccl_all_reduce  # noqa: E402
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
        # one persistent P2P buffer per input at most (a later staging buffer
        # may reuse an earlier one), filled by one copy_ per input
        allocs = p2p_alloc_lines(code)
        self.assertTrue(1 <= len(allocs) <= inputs, allocs)
        for alloc in allocs:
            self.assertIn(P2P_STATIC, alloc)
        check_counts(code, {".copy_(": inputs})
        if inputs == 1:
            check_counts(code, {P2P_ALLOC: 1})

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
        # With graph_partition the copy runs outside the CUDA graph on every
        # call; the partition gets the persistent staging buffer as a (static)
        # P2P input.  In call: the staging copy_, then the partition.
        FileCheck().check("def call(self, args):").check(".copy_(").check(
            "self.partitions[0](partition0_args)"
        ).run(code)
        body = code[code.index("def call(self, args):") :]
        staging = re.search(r"\b(buf\d+)\.copy_\(", body)
        assert staging is not None
        args = re.search(r"partition0_args = \[([^\]]*)\]", body)
        assert args is not None, body
        self.assertIn(staging.group(1), args.group(1))

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


if __name__ == "__main__":
    run_tests()
