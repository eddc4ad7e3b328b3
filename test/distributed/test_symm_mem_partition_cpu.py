"""Graph partitions and allocations of non-CUDA-graph regions, CPU tier.

With ``graph_partition`` and CUDA graphs, an op that cannot be captured runs
between CUDA-graph partitions, in the wrapper's ``call``.  Patch 4/5 moves
the allocation of such an op's output into the preceding partition, which
returns it, so the buffer keeps one address on every replay.  The wrapper
code is generated with the lowering harness on fake CUDA tensors (no GPU, no
process group); the GPU tier is test_symm_mem_partition.py.

The op is ``symm_stack_part::unsafe_scale`` (partition_ops.py): tagged
``cudagraph_unsafe`` and lowered to an ExternKernelOut through its out
overload.  Level 0..3 tests pin what the code looks like before the patch.
"""

from __future__ import annotations

import re
import sys
import unittest
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch._inductor import config


sys.path.insert(0, str(Path(__file__).parent))

import partition_ops  # noqa: E402
from cpu_models import BF16, eight_layer_model  # noqa: E402
from inductor_harness import GROUP, lower  # noqa: E402
from partition_ops import allocates, functions, partition_args, returned, unsafe_outs  # noqa: E402
from stack_level import levels  # noqa: E402


symm_mem = torch.ops.symm_mem
F32 = torch.float32
MM_INPUTS = [((64, 128), F32), ((128, 128), F32), ((128, 64), F32)]


@contextmanager
def partitioned(cudagraphs: bool = True, partition: bool = True) -> Iterator[None]:
    """What ``mode="reduce-overhead"`` sets, with graph partitions."""
    with config.patch({"graph_partition": partition, "triton.cudagraphs": cudagraphs}):
        yield


def mm_unsafe_relu_mm(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> Any:
    """The region's output feeds a plain kernel of the next partition."""
    u = partition_ops.unsafe_scale(x @ w1)
    return torch.relu(u) @ w2


def mm_unsafe_one_shot_mm(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """The region's output is the all-reduce's input: a P2P buffer."""
    u = partition_ops.unsafe_scale(x @ w1)
    return symm_mem.one_shot_all_reduce(u, "sum", GROUP) @ w2


def mm_one_shot_unsafe_mm(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """mm -> all-reduce -> unsafe op -> mm: the region consumes the result."""
    r = symm_mem.one_shot_all_reduce(x @ w1, "sum", GROUP)
    return partition_ops.unsafe_scale(r) @ w2


def mm_read_by_region_and_all_reduce(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mm's output is the all-reduce's P2P buffer and also the region's
    input: it is produced in partition 0 and read after the region."""
    y = x @ w1
    u = partition_ops.unsafe_scale(y)
    return symm_mem.one_shot_all_reduce(y, "sum", GROUP) @ w2, u


def two_regions(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    u = partition_ops.unsafe_scale(x @ w1)
    v = partition_ops.unsafe_scale(torch.relu(u) @ w2)
    return v.sin()


def region_first(x: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    return torch.relu(partition_ops.unsafe_scale(x)) @ w1


def region_output_returned(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    u = partition_ops.unsafe_scale(x @ w1)
    return u, torch.relu(u) @ w2


def data_dependent_size(x: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """The region's output has an unbacked size computed after partition 0."""
    h = x @ w1
    k = (h[:, 0] > 0).sum().item()
    torch._check(k >= 0)
    torch._check(k <= h.shape[0])
    return torch.relu(partition_ops.unsafe_scale(h.narrow(0, 0, k))).sum(0)


def generate(
    fn: Callable[..., Any],
    inputs: list[tuple[tuple[int, ...], torch.dtype]],
    dynamic: bool = False,
    **flags: bool,
) -> tuple[str, dict[str, str]]:
    with partitioned(**flags):
        lowered = lower(fn, inputs, dynamic=dynamic)
    assert lowered.code is not None
    return lowered.code, functions(lowered.code)


class HoistRegionOutputTest(unittest.TestCase):
    """[4/5] outputs of a non-CUDA-graph region are allocated by the
    preceding partition, which returns them."""

    def assert_hoisted(
        self, code: str, fns: dict[str, str], buf: str, into: str
    ) -> None:
        partition_ops.check_hoisted(code, buf, int(into.split("_")[1]))
        call = fns["call"]
        self.assertTrue(allocates(fns[into], buf), fns[into])
        self.assertIn(buf, returned(fns[into]))
        self.assertFalse(allocates(call, buf), call)
        # the call receives it from the partition, before the region runs
        index = int(into.split("_")[1])
        m = re.search(rf"\((.*)\) = self\.partitions\[{index}\]", call)
        assert m is not None, call
        self.assertIn(buf, [n.strip() for n in m.group(1).split(",")])
        self.assertLess(m.start(), call.index(f"out={buf})"))

    @levels(4)
    def test_region_output_allocated_in_prior_partition(self) -> None:
        code, fns = generate(mm_unsafe_relu_mm, MM_INPUTS)
        self.assertEqual(sorted(fns), ["call", "partition_0", "partition_1"])
        (buf,) = unsafe_outs(fns["call"])
        self.assert_hoisted(code, fns, buf, "partition_0")
        self.assertEqual(partition_args(fns["partition_1"])[0], buf)
        # nothing else moved: partition 0 still computes the mm
        self.assertIn("extern_kernels.mm(", fns["partition_0"])

    @levels(4)
    def test_region_after_all_reduce(self) -> None:
        code, fns = generate(mm_one_shot_unsafe_mm, MM_INPUTS)
        self.assertEqual(sorted(fns), ["call", "partition_0", "partition_1"])
        (buf,) = unsafe_outs(fns["call"])
        self.assert_hoisted(code, fns, buf, "partition_0")
        self.assertIn("one_shot_all_reduce_out", fns["partition_0"])

    @levels(4)
    def test_each_region_uses_its_own_prior_partition(self) -> None:
        code, fns = generate(two_regions, MM_INPUTS)
        self.assertEqual(
            sorted(fns), ["call", "partition_0", "partition_1", "partition_2"]
        )
        first, second = unsafe_outs(fns["call"])
        self.assert_hoisted(code, fns, first, "partition_0")
        self.assert_hoisted(code, fns, second, "partition_1")
        self.assertFalse(allocates(fns["partition_0"], second))

    @levels(4)
    def test_backed_symbolic_size_is_hoisted(self) -> None:
        code, fns = generate(mm_unsafe_relu_mm, MM_INPUTS, dynamic=True)
        (buf,) = unsafe_outs(fns["call"])
        self.assert_hoisted(code, fns, buf, "partition_0")
        (alloc,) = re.findall(
            rf"{buf} = empty_strided_cuda\(\((.*?)\)", fns["partition_0"]
        )
        symbols = re.findall(r"\bs\d+\b", alloc)
        self.assertTrue(symbols, alloc)
        # the sizes are arguments of the partition
        self.assertLessEqual(set(symbols), set(partition_args(fns["partition_0"])))

    @levels(2)
    def test_symbolic_size_p2p_buffer_stays_in_region(self) -> None:
        # A symbolic-size P2P buffer is allocated per call (patch 2/5), which
        # must not be recorded into a CUDA graph.
        code, fns = generate(mm_unsafe_one_shot_mm, MM_INPUTS, dynamic=True)
        (buf,) = unsafe_outs(fns["call"])
        self.assertTrue(allocates(fns["call"], buf), fns["call"])
        self.assertFalse(allocates(fns["partition_0"], buf))


class PinRegionAllocatesTest(unittest.TestCase):
    """Before 4/5 the region allocates its own output, at a new address on
    every call."""

    def assert_in_region(self, fns: dict[str, str], buf: str) -> None:
        call = fns["call"]
        self.assertTrue(allocates(call, buf), call)
        self.assertLess(call.index(f"{buf} = "), call.index(f"out={buf})"))
        # after partition 0 returned
        self.assertLess(call.index("self.partitions[0]"), call.index(f"{buf} = "))
        self.assertFalse(allocates(fns["partition_0"], buf))
        self.assertNotIn(buf, returned(fns["partition_0"]))

    @levels(0, 3)
    def test_pin_region_allocates_its_output(self) -> None:
        for fn in (mm_unsafe_relu_mm, mm_one_shot_unsafe_mm):
            with self.subTest(fn=fn.__name__):
                code, fns = generate(fn, MM_INPUTS)
                self.assertEqual(sorted(fns), ["call", "partition_0", "partition_1"])
                (buf,) = unsafe_outs(fns["call"])
                self.assert_in_region(fns, buf)

    @levels(2)
    def test_region_allocates_its_p2p_output(self) -> None:
        code, fns = generate(mm_unsafe_one_shot_mm, MM_INPUTS)
        (buf,) = unsafe_outs(fns["call"])
        self.assert_in_region(fns, buf)
        self.assertRegex(fns["call"], rf"{buf} = p2p_buffers\.static\(")

    @levels(3)
    def test_p2p_buffer_leaving_a_partition_disables_cudagraphs(self) -> None:
        # [3/5] a P2P buffer would be an output of a CUDA-graph partition,
        # which the tree would take for pool memory: the graph runs without
        # CUDA graphs, with the reason logged.
        with partitioned():
            lowered = lower(mm_read_by_region_and_all_reduce, MM_INPUTS)
        reason = lowered.graph.disable_cudagraphs_reason
        self.assertIsNotNone(reason)
        self.assertRegex(
            reason, r"P2P buffer buf\d+ would be an output of a cudagraph partition"
        )

    @levels(0, 2)
    def test_pin_p2p_buffer_leaving_a_partition_keeps_cudagraphs(self) -> None:
        with partitioned():
            lowered = lower(mm_read_by_region_and_all_reduce, MM_INPUTS)
        self.assertIsNone(lowered.graph.disable_cudagraphs_reason)

    @levels(3)
    def test_p2p_region_output_is_a_static_input_of_the_next_partition(
        self,
    ) -> None:
        # [3/5] Inductor knows the region's output is its own P2P buffer.
        with partitioned():
            lowered = lower(mm_unsafe_one_shot_mm, MM_INPUTS)
        assert lowered.code is not None and lowered.graph.partition_maps
        (buf,) = unsafe_outs(functions(lowered.code)["call"])
        first, second = lowered.graph.partition_maps
        args = partition_args(functions(lowered.code)["partition_1"])
        self.assertEqual(first.comm_buffer_input_idxs, [])
        self.assertEqual(second.comm_buffer_input_idxs, [args.index(buf)])
        self.assertIsNone(lowered.graph.disable_cudagraphs_reason)
        # allocated in the region, at one address on every call (Note [P2P
        # buffers of a compiled module]): never hoisted by patch 4/5, which
        # would make it an output of a CUDA-graph partition
        fns = functions(lowered.code)
        self.assertRegex(fns["call"], rf"{buf} = p2p_buffers\.static\(")
        self.assertFalse(allocates(fns["partition_0"], buf))
        self.assertNotIn(buf, returned(fns["partition_0"]))

    @levels(0, 3)
    def test_pin_two_regions(self) -> None:
        code, fns = generate(two_regions, MM_INPUTS)
        first, second = unsafe_outs(fns["call"])  # one output per region
        for buf in (first, second):
            self.assertTrue(allocates(fns["call"], buf), fns["call"])


class HoistFlagTest(unittest.TestCase):
    """[4/5] `config.graph_partition_hoist_region_allocations` gates the
    hoisting, and only graphs with a region see it."""

    FLAG = "graph_partition_hoist_region_allocations"

    @levels(4)
    def test_flag_off_leaves_the_region_output_in_the_region(self) -> None:
        with config.patch({self.FLAG: False}):
            code, fns = generate(mm_unsafe_relu_mm, MM_INPUTS)
        (buf,) = unsafe_outs(fns["call"])
        self.assertTrue(allocates(fns["call"], buf), fns["call"])
        self.assertFalse(allocates(fns["partition_0"], buf))

    @levels(4)
    def test_graphs_without_regions_are_byte_identical(self) -> None:
        eight_layer_inputs = [((128, 256), BF16)] + [((256, 256), BF16)] * 8
        cases = [
            ("mm_relu_mm", lambda x, w1, w2: torch.relu(x @ w1) @ w2, MM_INPUTS),
            ("eight_layers", eight_layer_model, eight_layer_inputs),
        ]
        for name, fn, inputs in cases:
            with self.subTest(case=name):
                codes = []
                for on in (True, False):
                    with config.patch({self.FLAG: on}):
                        codes.append(generate(fn, inputs)[0])
                self.assertEqual(codes[0], codes[1])


class UnchangedTest(unittest.TestCase):
    """Cases the patch leaves alone, at every level."""

    @levels(0)
    def test_region_without_prior_partition(self) -> None:
        code, fns = generate(region_first, MM_INPUTS[:2])
        self.assertEqual(sorted(fns), ["call", "partition_0"])
        (buf,) = unsafe_outs(fns["call"])
        self.assertTrue(allocates(fns["call"], buf), fns["call"])
        self.assertEqual(partition_args(fns["partition_0"])[0], buf)

    @levels(0)
    def test_graph_output_is_not_hoisted(self) -> None:
        # A returned tensor stays the caller's own allocation.
        code, fns = generate(region_output_returned, MM_INPUTS)
        (buf,) = unsafe_outs(fns["call"])
        self.assertTrue(allocates(fns["call"], buf), fns["call"])
        self.assertFalse(allocates(fns["partition_0"], buf))

    @levels(0)
    def test_size_computed_in_region_is_not_hoisted(self) -> None:
        code, fns = generate(data_dependent_size, MM_INPUTS[:2])
        call = fns["call"]
        (buf,) = unsafe_outs(call)
        m = re.search(r"\b(u\d+) = .*\.item\(\)", call)
        assert m is not None, call
        unbacked = m.group(1)
        # the size is computed in the region, after partition 0 ran ...
        self.assertLess(call.index("self.partitions[0]"), m.start())
        self.assertRegex(call, rf"{buf} = empty_strided_cuda\(\({unbacked}, ")
        # ... so the region allocates the buffer
        self.assertLess(m.start(), call.index(f"{buf} = "))
        self.assertFalse(allocates(fns["partition_0"], buf))

    @levels(0)
    def test_no_partitions_without_cudagraphs(self) -> None:
        # default mode: graph_partition is on, CUDA graphs are off
        for flags in ({"cudagraphs": False}, {"cudagraphs": True, "partition": False}):
            with self.subTest(**flags):
                code, fns = generate(mm_unsafe_relu_mm, MM_INPUTS, **flags)
                self.assertEqual(list(fns), ["call"])
                (buf,) = unsafe_outs(fns["call"])
                self.assertTrue(allocates(fns["call"], buf), fns["call"])
                self.assertNotIn("self.partitions[", code)


if __name__ == "__main__":
    unittest.main()
