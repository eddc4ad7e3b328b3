"""CUDA graph trees and P2P (symmetric memory) buffers, CPU tier.

Runs anywhere (no GPU, no process group): the pool routing that patch 3/5 adds
to torch/_inductor/cudagraph_utils.py is driven with the caching allocator's
pool calls recorded instead of made, `P2PBuffers` with a recorded stand-in for
the symmetric allocator, and the partition maps come from real lowerings with
the harness. Note [P2P buffers under CUDA graph trees] says what is tested.
The GPU tier is test_symm_mem_cudagraphs.py.
"""

from __future__ import annotations

import contextlib
import sys
import unittest
from pathlib import Path
from typing import Any
from unittest import mock

import torch


sys.path.insert(0, str(Path(__file__).parent))

from cpu_models import BF16, eight_layer_model, graph_input_one_shot  # noqa: E402
from inductor_harness import GROUP, lower  # noqa: E402
from stack_level import levels  # noqa: E402


def pool_calls() -> tuple[list[tuple[Any, ...]], contextlib.ExitStack]:
    "Record the caching allocator's pool-routing calls instead of making them"
    calls: list[tuple[Any, ...]] = []

    def rec(name: str) -> Any:
        return lambda *args: calls.append((name, *args))

    stack = contextlib.ExitStack()
    for target, name in [
        ("torch._C._cuda_endAllocateToPool", "end"),
        ("torch._C._cuda_beginAllocateCurrentThreadToPool", "begin"),
        ("torch._C._cuda_releasePool", "release"),
    ]:
        stack.enter_context(mock.patch(target, rec(name)))
    return calls, stack


def symmetric_allocator(calls: list[tuple[Any, ...]]) -> mock.MagicMock:
    "A stand-in for `_SymmetricMemory` that records what it is asked"
    symm = mock.MagicMock()

    def empty_strided_p2p(size: Any, stride: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(("alloc", tuple(size)))
        return torch.empty_strided(size, stride)

    symm.empty_strided_p2p.side_effect = empty_strided_p2p
    symm.rendezvous.side_effect = lambda t, g: calls.append(("rendezvous", g))
    return symm


class WarmupAllocationTest(unittest.TestCase):
    """[3/5] a P2P buffer is allocated and rendezvoused outside the pool."""

    POOL = (7, 3)

    @levels(3)
    def test_outside_a_warmup_the_pool_is_left_alone(self) -> None:
        from torch._inductor.cudagraph_utils import allocate_outside_cudagraph_pool

        calls, stack = pool_calls()
        with stack, allocate_outside_cudagraph_pool():
            calls.append(("body",))
        self.assertEqual(calls, [("body",)])

    @levels(3)
    def test_pool_is_suspended_and_restored(self) -> None:
        from torch._inductor.cudagraph_utils import (
            allocate_outside_cudagraph_pool,
            routing_allocations_to_pool,
        )

        calls, stack = pool_calls()
        with stack, routing_allocations_to_pool(1, self.POOL):
            with allocate_outside_cudagraph_pool():
                calls.append(("body",))
            with self.assertRaises(KeyError), allocate_outside_cudagraph_pool():
                raise KeyError
        one = [
            ("end", 1, self.POOL),
            ("begin", 1, self.POOL),
            ("release", 1, self.POOL),
        ]
        self.assertEqual(calls, [one[0], ("body",), *one[1:], *one])

    @levels(3)
    def test_site_allocates_and_rendezvouses_once_outside_the_pool(self) -> None:
        from torch._inductor.cudagraph_utils import routing_allocations_to_pool
        from torch._inductor.runtime.p2p_buffers import P2PBuffers

        calls, stack = pool_calls()
        symm = symmetric_allocator(calls)
        buffers = P2PBuffers()
        with (
            stack,
            mock.patch("torch._C._distributed_c10d._SymmetricMemory", symm),
            routing_allocations_to_pool(0, self.POOL),
        ):
            for _ in range(3):  # a warm-up, then two more calls
                buffers.static(0, (4, 8), (8, 1), BF16, "cpu", GROUP)
        self.assertEqual(
            calls,
            [
                ("end", 0, self.POOL),
                ("alloc", (4, 8)),
                ("rendezvous", GROUP),
                ("begin", 0, self.POOL),
                ("release", 0, self.POOL),
            ],
        )

    @levels(1, 2)
    def test_pin_site_leaves_the_rendezvous_to_the_op(self) -> None:
        from torch._inductor.runtime.p2p_buffers import P2PBuffers

        calls: list[tuple[Any, ...]] = []
        symm = symmetric_allocator(calls)
        with mock.patch("torch._C._distributed_c10d._SymmetricMemory", symm):
            P2PBuffers().static(0, (4, 8), (8, 1), BF16, "cpu", GROUP)
        self.assertEqual(calls, [("alloc", (4, 8))])


# CUDA graphs with graph partitions
PARTITIONED = {"triton.cudagraphs": True, "graph_partition": True}


def cudagraph_metadata(placeholders: list[Any], static_input_idxs: set[int]) -> Any:
    """A CudagraphMetadata of one output and no constants or mutations (its
    fields differ between bases: 2.14.1 added user_visible_output_idxs)."""
    import dataclasses

    from torch._inductor.cudagraph_utils import CudagraphMetadata

    values = {
        "placeholders": placeholders,
        "static_input_idxs": static_input_idxs,
        "mutated_input_idxs": set(),
        "stack_traces": [None],
        "user_visible_output_idxs": {0},
        "constants": {},
    }
    names = [f.name for f in dataclasses.fields(CudagraphMetadata)]
    return CudagraphMetadata(**{n: values[n] for n in names})


class PartitionInputsTest(unittest.TestCase):
    """[3/5] P2P partition inputs are static by what Inductor knows."""

    def _maps(self, fn: Any, inputs: Any) -> Any:
        with torch._inductor.config.patch(PARTITIONED):
            lowered = lower(fn, inputs)
        self.assertIsNone(lowered.graph.disable_cudagraphs_reason)
        assert lowered.graph.partition_maps is not None
        return lowered.graph.partition_maps

    @levels(3)
    def test_internal_p2p_buffers_are_not_partition_inputs(self) -> None:
        # The 8-layer model's P2P buffer lives inside partition_0.
        inputs = [((128, 256), BF16)] + [((256, 256), BF16)] * 8
        (pmap,) = self._maps(eight_layer_model, inputs)
        self.assertEqual(pmap.comm_buffer_input_idxs, [])

    @levels(5)
    def test_staging_buffer_is_a_static_partition_input(self) -> None:
        # [5/5] stages the graph input in `call`: the partition takes the
        # staging buffer, which keeps its address, as a static input.
        from torch._inductor.cudagraph_utils import (
            PlaceholderInfo,
            get_partition_cudagraph_metadata,
        )

        (pmap,) = self._maps(graph_input_one_shot, [((64, 32), BF16)])
        self.assertEqual(pmap.input_index_mapping, [None])
        self.assertEqual(pmap.comm_buffer_input_idxs, [0])
        placeholder = PlaceholderInfo("x", None, [], None)
        meta = get_partition_cudagraph_metadata(
            pmap, cudagraph_metadata([placeholder], set())
        )
        self.assertEqual(list(meta.static_input_idxs), [0])

    @levels(3)
    def test_graph_inputs_stay_as_at_stock(self) -> None:
        # A graph input (whoever allocated it) is never made static by the
        # series: only the graph's own static inputs are.
        from torch._inductor.cudagraph_utils import (
            PlaceholderInfo,
            get_partition_cudagraph_metadata,
        )

        inputs = [((128, 256), BF16)] + [((256, 256), BF16)] * 8
        (pmap,) = self._maps(eight_layer_model, inputs)
        placeholders = [PlaceholderInfo(f"a{i}", None, [], None) for i in range(9)]
        meta = get_partition_cudagraph_metadata(
            pmap, cudagraph_metadata(placeholders, {1, 2})
        )
        self.assertEqual(sorted(meta.static_input_idxs), [1, 2])

    @levels(0, 2)
    def test_pin_partition_map_has_no_p2p_inputs(self) -> None:
        from torch._inductor.utils import GraphPartitionMap

        self.assertNotIn(
            "comm_buffer_input_idxs", GraphPartitionMap.__dataclass_fields__
        )


if __name__ == "__main__":
    unittest.main()
