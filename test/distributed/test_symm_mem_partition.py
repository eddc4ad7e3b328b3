"""Graph partitions under CUDA graphs: allocations of non-CUDA-graph regions,
GPU tier.

With ``graph_partition`` and ``mode="reduce-overhead"``, the cudagraph-unsafe
op ``symm_stack_part::unsafe_scale`` (partition_ops.py, lowered to an
ExternKernelOut through its out overload) runs between CUDA-graph partitions.
Patch 4/5 allocates its output in the preceding partition, so the buffer is
a CUDA-graph-managed output at one address on every replay, and the next
partition takes it as a static input instead of copying it.

Both classes run on one rank per visible CUDA GPU, world size 1 included
(``MultiProcContinuousTest``; no torchrun):

    python -m pytest -v test/distributed/test_symm_mem_partition.py

Results are compared against eager code (NCCL all_reduce for the all-reduce,
the identity at world size 1).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch._inductor import config
from torch._inductor.utils import run_and_get_code
from torch.testing._internal.common_utils import run_tests


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import partition_ops  # noqa: E402
from gpu_tier import SymmMemTestCase, nccl_all_reduce  # noqa: E402
from partition_ops import allocates, functions, partition_args, unsafe_out  # noqa: E402
from stack_level import levels  # noqa: E402


REPLAYS = 100
D = 256


def copied_inputs() -> int:
    """Inputs CUDA graph trees copy into static buffers, over all recordings."""
    return counters["inductor"]["cudagraph_recorded_non_static_inputs"]


def one_shot(t: torch.Tensor) -> torch.Tensor:
    return torch.ops.symm_mem.one_shot_all_reduce(t, "sum", dist.group.WORLD.group_name)


def unsafe_scale(t: torch.Tensor) -> torch.Tensor:
    return partition_ops.unsafe_scale(t)


def eager_scale(t: torch.Tensor) -> torch.Tensor:
    return t * partition_ops.SCALE


class TwoMatmuls(torch.nn.Module):
    """``mm(x, w1) -> middle -> mm(., w2)``; the weights are parameters, so
    CUDA graph trees treat them as static inputs."""

    def __init__(self, middle: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.w1 = torch.nn.Parameter(
            torch.randn(D, D, device="cuda", generator=gen) / 16, requires_grad=False
        )
        self.w2 = torch.nn.Parameter(
            torch.randn(D, D, device="cuda", generator=gen) / 16, requires_grad=False
        )
        self.middle = middle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.middle(x @ self.w1) @ self.w2


def plain_middle(
    scale: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    def middle(h: torch.Tensor) -> torch.Tensor:
        return torch.relu(scale(h))

    return middle


class PartitionCase(SymmMemTestCase):
    code = ""  # the generated code of the last run_replays

    def _init_process(self) -> None:
        super()._init_process()
        counters.clear()
        partition_ops.OUT_PTRS.clear()

    def inputs(self, it: int) -> torch.Tensor:
        gen = torch.Generator(device="cuda").manual_seed(1000 * it + dist.get_rank())
        return torch.randn(64, D, device="cuda", generator=gen)

    def run_replays(
        self,
        model: torch.nn.Module,
        reference: Callable[[torch.Tensor], torch.Tensor],
        mode: str | None = "reduce-overhead",
        partition: bool = True,
    ) -> dict[str, str]:
        """Compile, check every call against ``reference``, return the code.

        Two calls warm up and record; REPLAYS calls replay."""
        compiled = torch.compile(model, mode=mode, fullgraph=True)
        code = ""
        # fresh compiles: the counters below are bumped by codegen
        flags = {"graph_partition": partition, "force_disable_caches": True}
        with torch.no_grad(), config.patch(flags):
            for it in range(2 + REPLAYS):
                torch.compiler.cudagraph_mark_step_begin()
                x = self.inputs(it)
                if it == 0:
                    out, (code, *_) = run_and_get_code(compiled, x)
                else:
                    out = compiled(x)
                torch.testing.assert_close(
                    out, reference(x), rtol=1e-4, atol=1e-4, msg=f"call {it}"
                )
        self.code = code
        return functions(code)

    def assert_hoisted(self, fns: dict[str, str]) -> str:
        """The unsafe op's output is allocated and returned by partition 0."""
        self.assertEqual(sorted(fns), ["call", "partition_0", "partition_1"])
        buf = unsafe_out(fns["call"])
        partition_ops.check_hoisted(self.code, buf, 0)
        self.assertTrue(allocates(fns["partition_0"], buf), fns["partition_0"])
        self.assertRegex(fns["partition_0"], rf"return \(.*\b{buf}\b.*\)")
        self.assertFalse(allocates(fns["call"], buf), fns["call"])
        self.assertRegex(fns["call"], rf"\(.*\b{buf}\b.*\) = self\.partitions\[0\]")
        return buf

    def assert_address_stable(self) -> None:
        replays = partition_ops.OUT_PTRS[-REPLAYS:]
        self.assertEqual(len(replays), REPLAYS)
        self.assertEqual(len(set(replays)), 1, sorted(set(replays)))

    def copies_without_region(
        self, middle: Callable[[torch.Tensor], torch.Tensor]
    ) -> int:
        """copied_inputs() for the model with the unsafe op replaced by eager
        code: one CUDA graph, nothing between graphs.  It copies x, and the
        weights if the trees do not take parameters as static."""
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(TwoMatmuls(middle), mode="reduce-overhead")
        with torch.no_grad(), config.patch(force_disable_caches=True):
            for it in range(3):
                torch.compiler.cudagraph_mark_step_begin()
                compiled(self.inputs(it))
        return copied_inputs()

    def assert_partitions(self, expected: int) -> None:
        # graph partitions plus the region(s) between them
        self.assertEqual(counters["inductor"]["cudagraph_partitions"], expected)


class PlainPartitionTest(PartitionCase):
    """[4/5] without symm_mem: hoisting alone (no collective; each rank on its
    own)."""

    def model(self) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        model = TwoMatmuls(plain_middle(unsafe_scale))
        eager = TwoMatmuls(plain_middle(eager_scale))
        eager.load_state_dict(model.state_dict())
        return model, eager

    @levels(4)
    def test_region_output_hoisted_and_static(self) -> None:
        self._init_process()
        model, eager = self.model()
        fns = self.run_replays(model, eager)
        buf = self.assert_hoisted(fns)
        self.assertEqual(partition_args(fns["partition_1"])[0], buf)
        self.assert_address_stable()
        self.assert_partitions(3)
        # The region's output is a CUDA-graph-managed output of partition 0,
        # a static input of partition 1: no copy beyond the one-graph model's.
        copies = copied_inputs()
        self.assertEqual(copies, self.copies_without_region(eager.middle))

    @levels(0, 3)
    def test_pin_region_output_copied_into_next_graph(self) -> None:
        self._init_process()
        model, eager = self.model()
        fns = self.run_replays(model, eager)
        buf = unsafe_out(fns["call"])
        self.assertTrue(allocates(fns["call"], buf), fns["call"])
        self.assertFalse(allocates(fns["partition_0"], buf))
        self.assert_partitions(3)
        # the region's output is copied into a static input of partition 1
        copies = copied_inputs()
        self.assertEqual(copies, self.copies_without_region(eager.middle) + 1)

    @levels(0)
    def test_without_graph_partition(self) -> None:
        self._init_process()
        # The unsafe op keeps the whole graph out of CUDA graphs.
        model, eager = self.model()
        fns = self.run_replays(model, eager, partition=False)
        self.assertEqual(list(fns), ["call"])
        self.assertTrue(allocates(fns["call"], unsafe_out(fns["call"])))

    @levels(0)
    def test_default_mode(self) -> None:
        self._init_process()
        model, eager = self.model()
        fns = self.run_replays(model, eager, mode=None)
        self.assertEqual(list(fns), ["call"])
        self.assertTrue(allocates(fns["call"], unsafe_out(fns["call"])))
        self.assertEqual(counters["inductor"]["cudagraph_partitions"], 0)


class SymmMemPartitionTest(PartitionCase):
    """[4/5] with a symm_mem all-reduce next to the region.

    Needs 3/5 as well: CUDA graph trees take P2P tensors as static."""

    def check(
        self,
        middle: Callable[[torch.Tensor], torch.Tensor],
        reference_middle: Callable[[torch.Tensor], torch.Tensor],
        without_region: Callable[[torch.Tensor], torch.Tensor],
    ) -> dict[str, str]:
        """``without_region``: ``middle`` with eager code for the unsafe op."""
        model = TwoMatmuls(middle)
        eager = TwoMatmuls(reference_middle)
        eager.load_state_dict(model.state_dict())
        fns = self.run_replays(model, eager)
        self.assert_hoisted(fns)
        self.assert_address_stable()
        self.assert_partitions(3)
        copies = copied_inputs()
        self.assertEqual(copies, self.copies_without_region(without_region))
        return fns

    @levels(4)
    def test_region_output_feeds_all_reduce_through_pointwise(self) -> None:
        self._init_process()
        # mm -> unsafe -> (+1 writes the P2P buffer) -> all-reduce -> mm
        fns = self.check(
            lambda h: one_shot(unsafe_scale(h) + 1),
            lambda h: nccl_all_reduce(eager_scale(h) + 1),
            lambda h: one_shot(eager_scale(h) + 1),
        )
        self.assertIn("one_shot_all_reduce_out", fns["partition_1"])

    @levels(3)
    def test_region_produces_all_reduce_input(self) -> None:
        self._init_process()
        # mm -> unsafe (writes the P2P buffer) -> all-reduce -> mm. The P2P
        # buffer is the module's own: allocated in the region once, at one
        # address, and a static input of partition 1 (patch 3/5); never
        # hoisted into partition 0 (patch 4/5).
        model = TwoMatmuls(lambda h: one_shot(unsafe_scale(h)))
        eager = TwoMatmuls(lambda h: nccl_all_reduce(eager_scale(h)))
        eager.load_state_dict(model.state_dict())
        fns = self.run_replays(model, eager)
        self.assertEqual(sorted(fns), ["call", "partition_0", "partition_1"])
        buf = unsafe_out(fns["call"])
        self.assertRegex(fns["call"], rf"{buf} = p2p_buffers\.static\(")
        self.assertFalse(allocates(fns["partition_0"], buf))
        self.assertRegex(
            fns["partition_1"], rf"one_shot_all_reduce_out\.default\({buf}, "
        )
        self.assert_address_stable()
        self.assert_partitions(3)
        # no copy beyond those of the one-graph model
        self.assertEqual(
            copied_inputs(),
            self.copies_without_region(lambda h: one_shot(eager_scale(h))),
        )

    @levels(4)
    def test_region_consumes_all_reduce_output(self) -> None:
        self._init_process()
        # mm -> all-reduce -> unsafe -> mm
        fns = self.check(
            lambda h: unsafe_scale(one_shot(h)),
            lambda h: eager_scale(nccl_all_reduce(h)),
            lambda h: eager_scale(one_shot(h)),
        )
        self.assertIn("one_shot_all_reduce_out", fns["partition_0"])


if __name__ == "__main__":
    run_tests()
