"""CUDA graph trees and P2P (symmetric memory) tensors, CPU tier.

Runs anywhere (no GPU, no process group): the helpers patch 3/5 adds to
torch/_inductor/cudagraph_utils.py and cudagraph_trees.py are driven with
mocked allocator queries, and the wrapper code is generated with the lowering
harness.  The GPU tier is test_symm_mem_cudagraphs.py.
"""

from __future__ import annotations

import contextlib
import re
import sys
import unittest
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch


sys.path.insert(0, str(Path(__file__).parent))

from cpu_models import (  # noqa: E402
    BF16,
    eight_layer_model,
    graph_input_one_shot,
    one_shot,
)
from inductor_harness import GROUP, lower  # noqa: E402
from stack_level import LEVEL, holds, levels  # noqa: E402


class _CudaLooking(torch.Tensor):
    """A CPU tensor that says it lives on CUDA (its storage is real)."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def cuda_looking(n: int = 4) -> torch.Tensor:
    return torch.Tensor._make_subclass(_CudaLooking, torch.zeros(n))


def cdata(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _Deleters:
    """Stands in for torch._C._has_Standard_Deleter: storages in `foreign`
    have a deleter that is not the caching allocator's."""

    def __init__(self, *foreign: int) -> None:
        self.foreign = set(foreign)
        self.asked: list[int] = []

    def __call__(self, storage_ptr: int) -> bool:
        self.asked.append(storage_ptr)
        return storage_ptr not in self.foreign


class P2PRecognitionTest(unittest.TestCase):
    """[3/5] which storages the CUDA graph tree treats as P2P memory."""

    def _patch(
        self, deleters: _Deleters, segments: list[tuple[int, int]]
    ) -> tuple[Any, mock.MagicMock]:
        from torch._inductor import cudagraph_utils

        seg = mock.MagicMock(return_value=segments)
        stack = (
            mock.patch.multiple(cudagraph_utils, _caching_allocator_segments=seg),
            mock.patch("torch._C._has_Standard_Deleter", deleters),
        )
        return stack, seg

    @levels(3)
    def test_storage_mask(self) -> None:
        from torch._inductor.cudagraph_utils import p2p_storage_mask

        deleters = _Deleters(11, 12, 13)
        (a, b), seg = self._patch(deleters, [(1000, 2000), (5000, 6000)])
        with a, b:
            mask = p2p_storage_mask(
                [
                    (10, 1500),  # caching allocator storage
                    (11, 3000),  # foreign deleter, in no segment: P2P
                    (12, 1500),  # no deleter but pool memory (tree's own view)
                    (13, 0),  # empty storage
                    None,  # not a CUDA tensor
                    (11, 6000),  # segment ends are exclusive
                ]
            )
        self.assertEqual(mask, [False, True, False, False, False, True])
        seg.assert_called_once()  # one snapshot for the whole batch
        self.assertNotIn(13, deleters.asked)

    @levels(3)
    def test_no_snapshot_when_every_deleter_is_standard(self) -> None:
        from torch._inductor.cudagraph_utils import p2p_storage_mask

        (a, b), seg = self._patch(_Deleters(), [])
        with a, b:
            self.assertEqual(p2p_storage_mask([(1, 64), (2, 128)]), [False, False])
        seg.assert_not_called()

    @levels(3)
    def test_tensor_mask(self) -> None:
        from torch._inductor.cudagraph_utils import p2p_tensor_mask

        p2p, pooled, cpu = cuda_looking(), cuda_looking(), torch.zeros(4)
        deleters = _Deleters(cdata(p2p), cdata(pooled))
        ptr = pooled.untyped_storage().data_ptr()
        (a, b), _ = self._patch(deleters, [(ptr, ptr + 16)])
        with a, b:
            mask = p2p_tensor_mask([p2p, pooled, cpu, 3, None])
        self.assertEqual(mask, [True, False, False, False, False])
        self.assertNotIn(cdata(cpu), deleters.asked)

    @levels(3)
    def test_p2p_inputs_become_static(self) -> None:
        from torch._inductor import cudagraph_trees

        inputs: list[Any] = [torch.zeros(1)] * 4
        with mock.patch.object(
            cudagraph_trees, "p2p_tensor_mask", return_value=[False, True, False, True]
        ):
            self.assertEqual(
                list(cudagraph_trees.p2p_static_input_idxs(inputs, [0, 3])), [0, 1, 3]
            )
        static = [2]
        with mock.patch.object(
            cudagraph_trees, "p2p_tensor_mask", return_value=[False] * 4
        ):
            self.assertIs(cudagraph_trees.p2p_static_input_idxs(inputs, static), static)


def pool_calls() -> tuple[list[tuple[Any, ...]], Any]:
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


class WarmupAllocationTest(unittest.TestCase):
    """[3/5] the rendezvous of a P2P buffer stays out of the warm-up pool."""

    POOL = (7, 3)

    @levels(3)
    def test_outside_a_warmup_the_pool_is_left_alone(self) -> None:
        from torch._inductor.cudagraph_utils import (
            allocate_outside_cudagraph_pool,
            rendezvous_p2p_buffer,
        )

        calls, stack = pool_calls()
        buf = torch.zeros(2)
        symm = mock.MagicMock()
        with (
            stack,
            mock.patch("torch._C._distributed_c10d._SymmetricMemory", symm),
        ):
            with allocate_outside_cudagraph_pool():
                pass
            # A buffer allocated outside a warm-up (e.g. a staging buffer
            # filled in `call`) is still rendezvoused where it is allocated,
            # so the op in a CUDA graph partition finds the rendezvous cached.
            rendezvous_p2p_buffer(buf, GROUP)
        self.assertEqual(calls, [])
        symm.rendezvous.assert_called_once_with(buf, GROUP)

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
    def test_rendezvous_runs_outside_the_pool(self) -> None:
        from torch._inductor.cudagraph_utils import (
            rendezvous_p2p_buffer,
            routing_allocations_to_pool,
        )

        calls, stack = pool_calls()
        buf = torch.zeros(2)
        symm = mock.MagicMock()
        symm.rendezvous.side_effect = lambda t, g: calls.append(("rendezvous", g))
        with (
            stack,
            mock.patch("torch._C._distributed_c10d._SymmetricMemory", symm),
            routing_allocations_to_pool(0, self.POOL),
        ):
            rendezvous_p2p_buffer(buf, GROUP)
        self.assertEqual(
            [c[0] for c in calls], ["end", "rendezvous", "begin", "release"]
        )
        self.assertIs(symm.rendezvous.call_args.args[0], buf)
        self.assertEqual(symm.rendezvous.call_args.args[1], GROUP)

    @levels(3)
    def test_pool_manager_records_its_pool(self) -> None:
        from torch._inductor import cudagraph_utils
        from torch._inductor.cudagraph_trees import _use_cuda_memory_pool_manager

        calls, stack = pool_calls()
        stream = mock.MagicMock()
        seen: list[list[tuple[int, tuple[int, int]]]] = []
        with (
            stack,
            mock.patch("torch.cuda.synchronize"),
            mock.patch("torch.cuda.current_stream", return_value=mock.MagicMock()),
            mock.patch("torch.cuda.stream", return_value=mock.MagicMock()),
            mock.patch("torch.device", return_value=mock.MagicMock()),
        ):
            with _use_cuda_memory_pool_manager(0, self.POOL, stream):
                seen.append(list(cudagraph_utils._pool_routing.active))
        self.assertEqual(seen, [[(0, self.POOL)]])
        self.assertEqual(cudagraph_utils._pool_routing.active, [])


class PoolCheckTest(unittest.TestCase):
    """check_memory_pool with one pooled output and one P2P storage."""

    def _check(self) -> None:
        from torch._inductor import cudagraph_trees, cudagraph_utils

        pooled, p2p = torch.zeros(4), torch.zeros(4)
        refs = [cudagraph_trees.StorageWeakRefWrapper(t) for t in (pooled, p2p)]
        ptr = pooled.untyped_storage().data_ptr()
        segment = {
            "address": ptr,
            "total_size": 16,
            "blocks": [{"state": "active_allocated", "size": 16}],
        }
        patches = [
            mock.patch("torch._C._cuda_checkPoolLiveAllocations", return_value=False),
            mock.patch("torch.cuda.synchronize"),
            mock.patch.object(
                cudagraph_trees, "get_cudagraph_segments", return_value=[segment]
            ),
            mock.patch("torch._C._has_Standard_Deleter", _Deleters(cdata(p2p))),
        ]
        if hasattr(cudagraph_utils, "_caching_allocator_segments"):
            patches.append(
                mock.patch.object(
                    cudagraph_utils,
                    "_caching_allocator_segments",
                    return_value=[(ptr, ptr + 16)],
                )
            )
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            cudagraph_trees.check_memory_pool(0, (1, 1), refs)

    @levels(3)
    def test_p2p_storage_is_not_expected_in_pool(self) -> None:
        self._check()

    @levels(0, 2)
    def test_pin_expects_every_live_storage_in_pool(self) -> None:
        with self.assertRaisesRegex(RuntimeError, "not allocated in pool"):
            self._check()


RENDEZVOUS = re.compile(r'^\s*rendezvous_p2p_buffer\((buf\d+), "' + GROUP + r'"\)$')
ALLOC = re.compile(r"^\s*(buf\d+) = empty_strided_p2p\(")


# CUDA graphs with graph partitions: allocations inside partition functions,
# and (from level 5) graph-input staging buffers allocated in `call`
PARTITIONED = {"triton.cudagraphs": True, "graph_partition": True}


class WarmupCodegenTest(unittest.TestCase):
    """The wrapper rendezvouses every P2P buffer right after allocating it."""

    EIGHT_LAYER_INPUTS = [((128, 256), BF16)] + [((256, 256), BF16)] * 8
    CASES = [
        ("one_shot", one_shot, [((64, 32), BF16)], False, {}),
        ("eight_layers", eight_layer_model, EIGHT_LAYER_INPUTS, False, {}),
        ("graph_input", graph_input_one_shot, [((64, 32), BF16)], False, {}),
        ("graph_input_dynamic", graph_input_one_shot, [((64, 32), BF16)], True, {}),
        (
            "eight_layers_partitioned",
            eight_layer_model,
            EIGHT_LAYER_INPUTS,
            False,
            PARTITIONED,
        ),
        (
            "graph_input_partitioned",
            graph_input_one_shot,
            [((64, 32), BF16)],
            False,
            PARTITIONED,
        ),
    ]

    def _codes(self) -> Iterator[tuple[str, str]]:
        for name, fn, inputs, dynamic, flags in self.CASES:
            if (
                name.startswith("graph_input") and LEVEL < 2
            ):  # the pin cannot lower graph-input symm_mem ops
                continue
            with torch._inductor.config.patch(flags):
                code = lower(fn, inputs, dynamic=dynamic).code
            assert code is not None
            yield name, code

    @levels(3)
    def test_rendezvous_follows_each_p2p_allocation(self) -> None:
        for name, code in self._codes():
            with self.subTest(case=name):
                self.assertIn(
                    "from torch._inductor.cudagraph_utils import rendezvous_p2p_buffer",
                    code,
                )
                lines = code.splitlines()
                allocs = [
                    (i, m.group(1))
                    for i, line in enumerate(lines)
                    if (m := ALLOC.match(line))
                ]
                self.assertGreaterEqual(len(allocs), 1, code)
                rendezvous = [
                    m.group(1) for line in lines if (m := RENDEZVOUS.match(line))
                ]
                self.assertEqual(len(rendezvous), len(allocs), code)
                for i, buf in allocs:
                    self.assertRegex(lines[i + 1], RENDEZVOUS, code)
                    self.assertEqual(RENDEZVOUS.match(lines[i + 1]).group(1), buf)
                if name == "graph_input_partitioned" and holds(5):
                    # [5/5] the staging buffer is allocated in `call`, outside
                    # any partition, and still rendezvoused there
                    call = lines.index("    def call(self, args):")
                    self.assertGreater(allocs[0][0], call, code)

    @levels(0, 2)
    def test_pin_rendezvous_is_left_to_the_op(self) -> None:
        for name, code in self._codes():
            with self.subTest(case=name):
                self.assertIn("empty_strided_p2p(", code)
                self.assertNotIn("rendezvous_p2p_buffer", code)


if __name__ == "__main__":
    unittest.main()
