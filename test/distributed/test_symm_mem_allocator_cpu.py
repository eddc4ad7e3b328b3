"""[5/5] Staging of static graph inputs, CPU tier.

Lowering and wrapper codegen on fake CUDA tensors (inductor_harness.py); no
GPU, no process group; the site logic with a stand-in for the symmetric
allocator.  The GPU tier is test_symm_mem_allocator.py; ranks whose
allocators diverge are test_symm_mem_ranks_cpu.py.

Which path `_symm_mem_input` takes for an input of a symm_mem op:
  1. Inductor allocates it: the buffer itself becomes P2P (CommBufferLayout);
  2. a static-shape graph input: a `SymmMemGraphInput`, which at run time is
     the input itself when it is symmetric memory, else a persistent P2P
     staging buffer filled by one `copy_` (Note [Symmetric graph inputs]);
  3. anything else (symbolic shapes, views, fallback outputs): patch 2's
     pointwise identity copy.
"""

from __future__ import annotations

import gc
import sys
import unittest
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch._inductor import config, ir
from torch.testing import FileCheck


sys.path.insert(0, str(Path(__file__).parent))

from code_stats import (  # noqa: E402
    P2P_DYNAMIC,
    p2p_alloc_lines,
)
from cpu_models import (  # noqa: E402
    BF16,
    GRAPH_INPUT_CASES,
    custom_op_output,
    graph_input_one_shot,
    mm_one_shot,
    symm_mem,
)
from inductor_harness import (  # noqa: E402
    GROUP,
    Lowered,
    comm_layout_names,
    is_identity_copy_of,
    lower,
)
from stack_level import levels, on_base  # noqa: E402


# What [5/5]'s runtime asks of torch.distributed._symmetric_memory: 2.11.0
# has no such check, so the series adds one; 2.14.1 has upstream's.
SYMM_CHECK = "_is_symm_mem_tensor" if on_base("2.11.0") else "is_symm_mem_tensor"


CUDA = torch.device("cuda", 0)


def two_inputs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return symm_mem.one_shot_all_reduce(x, "sum", GROUP) + symm_mem.one_shot_all_reduce(
        y, "sum", GROUP
    )


OTHER_GROUP = "1"


def one_input_two_ops(x: torch.Tensor) -> torch.Tensor:
    a = symm_mem.one_shot_all_reduce(x, "sum", GROUP)
    return a + symm_mem.one_shot_all_reduce(x, "sum", GROUP)


def one_input_two_groups(x: torch.Tensor) -> torch.Tensor:
    a = symm_mem.one_shot_all_reduce(x, "sum", GROUP)
    return a + symm_mem.one_shot_all_reduce(x, "sum", OTHER_GROUP)


def graph_input_view(x: torch.Tensor) -> torch.Tensor:
    return symm_mem.one_shot_all_reduce(x[:, :16], "sum", GROUP)


def one_shot_then_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return symm_mem.one_shot_all_reduce(x, "sum", GROUP) @ w


def one_shot_then_mm_one_shot(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    a = symm_mem.one_shot_all_reduce(x, "sum", GROUP)
    return symm_mem.one_shot_all_reduce(a @ w, "sum", GROUP)


def _graph_inputs(lowered: Lowered) -> list[Any]:
    return lowered.ops(ir.SymmMemGraphInput)


def _call_body(code: str) -> str:
    return code[code.index("def call(self, args):") :]


@levels(5)
class InputPathTest(unittest.TestCase):
    """Which of the three paths each kind of symm_mem input takes."""

    def _assert_graph_input(
        self, lowered: Lowered, node: Any, input_index: int, site: int
    ) -> None:
        self.assertIsInstance(node.layout, ir.CommBufferLayout)
        self.assertEqual(node.layout.group_name, GROUP)
        (src,) = node.inputs
        self.assertIsInstance(src, ir.InputBuffer)
        self.assertEqual(src.get_name(), lowered.input_name(input_index))
        # it may be the caller's tensor: the scheduler knows it aliases it
        self.assertEqual(node.get_inputs_that_alias_output(), [src.get_name()])
        self.assertIn(node.get_name(), lowered.graph.never_reuse_buffers)
        assert lowered.code is not None
        # made in `call` from the argument, then read by the op
        FileCheck().check("def call(").check(
            f"{node.get_name()} = p2p_buffers.graph_input({site}, "
            f"{src.get_name()}, '{GROUP}', pass_through=True, cudagraphs=False)"
        ).check(
            "torch.ops.symm_mem.one_shot_all_reduce_out.default("
            f"{node.get_name()}, 'sum', '{GROUP}', out="
        ).run(lowered.code)

    def test_static_graph_input_passes_through_or_is_staged(self) -> None:
        for fn, inputs, out_op in GRAPH_INPUT_CASES:
            with self.subTest(fn=fn.__name__):
                lowered = lower(fn, inputs)
                (node,) = _graph_inputs(lowered)
                self._assert_graph_input(lowered, node, 0, site=0)
                (op,) = lowered.by_op(out_op)
                self.assertEqual(op.inputs[0].get_name(), node.get_name())
                self.assertEqual(comm_layout_names(lowered), [node.get_name()])
                assert lowered.code is not None
                # no P2P buffer of Inductor's, no copy and no kernel in the
                # code: the staging buffer is the site's, made at run time
                self.assertEqual(p2p_alloc_lines(lowered.code), [])
                FileCheck().check_count(".copy_(", 0, exactly=True).check_count(
                    "@triton.jit", 0, exactly=True
                ).run(lowered.code)
                self.assertFalse(lowered.ops(ir.ComputedBuffer))

    def test_one_site_per_input(self) -> None:
        lowered = lower(two_inputs, [((64, 32), BF16)] * 2)
        nodes = _graph_inputs(lowered)
        self.assertEqual(len(nodes), 2)
        for i, node in enumerate(nodes):
            self._assert_graph_input(lowered, node, i, site=i)
        assert lowered.code is not None
        # only the final add is a kernel
        FileCheck().check_count("@triton.jit", 1, exactly=True).run(lowered.code)

    def test_one_site_per_input_and_group(self) -> None:
        # Two ops of one group read x: one node, one site, one staging buffer
        # and one copy. Another group gets a node of its own.
        lowered = lower(one_input_two_ops, [((64, 32), BF16)])
        (node,) = _graph_inputs(lowered)
        self._assert_graph_input(lowered, node, 0, site=0)
        ops = lowered.by_op(symm_mem.one_shot_all_reduce_out.default)
        self.assertEqual([op.inputs[0].get_name() for op in ops], [node.get_name()] * 2)
        assert lowered.code is not None
        FileCheck().check_count("p2p_buffers.graph_input(", 1, exactly=True).run(
            lowered.code
        )
        lowered = lower(one_input_two_groups, [((64, 32), BF16)])
        nodes = _graph_inputs(lowered)
        self.assertEqual(
            sorted(n.layout.group_name for n in nodes), sorted([GROUP, OTHER_GROUP])
        )

    def test_graph_input_is_never_handed_to_another_buffer(self) -> None:
        # The second collective's input (x's shape) is a P2P buffer too; memory
        # planning must not give it x's node, which may be the caller's x.
        lowered = lower(one_shot_then_mm_one_shot, [((64, 32), BF16), ((32, 32), BF16)])
        (node,) = _graph_inputs(lowered)
        name = node.get_name()
        assert lowered.code is not None
        FileCheck().check(f"{name} = p2p_buffers.graph_input(").check(
            f"one_shot_all_reduce_out.default({name}, "
        ).check_next(f"del {name}").check_not(f"= {name}; del {name}").check(
            "= p2p_buffers.static(1, "
        ).run(lowered.code)
        self.assertIn(name, lowered.graph.never_reuse_buffers)

    def test_layouts_the_op_cannot_take_are_staged(self) -> None:
        # x itself can serve only at the dense strides, at an offset of a
        # multiple of 4 bytes: otherwise the site always copies.
        cases = {
            "dense": ((64, 32), BF16, (32, 1)),
            "size-1 dim": ((1, 32), BF16, (7, 1)),
            "transposed": ((64, 32), BF16, (1, 64)),
            "padded": ((64, 32), BF16, (40, 1)),
        }
        for name, inp in cases.items():
            with self.subTest(layout=name):
                lowered = lower(graph_input_one_shot, [inp])
                (node,) = _graph_inputs(lowered)
                self.assertEqual(node.pass_through, name in ("dense", "size-1 dim"))
                assert lowered.code is not None
                FileCheck().check(f"pass_through={node.pass_through},").run(
                    lowered.code
                )

    def test_dynamic_graph_input_takes_identity_copy(self) -> None:
        lowered = lower(graph_input_one_shot, [((64, 32), BF16)], dynamic=True)
        self.assertEqual(_graph_inputs(lowered), [])
        (p2p,) = comm_layout_names(lowered)
        buf = lowered.graph.get_buffer(p2p)
        self.assertTrue(is_identity_copy_of(lowered, buf, lowered.input_name(0)))
        assert lowered.code is not None
        self.assertIn("@triton.jit", lowered.code)
        self.assertNotIn(".copy_(", lowered.code)
        (alloc,) = p2p_alloc_lines(lowered.code)
        self.assertIn(P2P_DYNAMIC, alloc)

    def test_view_of_graph_input_takes_identity_copy(self) -> None:
        lowered = lower(graph_input_view, [((64, 32), BF16)])
        self.assertEqual(_graph_inputs(lowered), [])
        assert lowered.code is not None
        self.assertIn("@triton.jit", lowered.code)

    def test_fallback_output_takes_identity_copy(self) -> None:
        lowered = lower(custom_op_output, [((64, 32), BF16)])
        self.assertEqual(_graph_inputs(lowered), [])
        (fallback,) = lowered.by_op(torch.ops.symm_stack_test.scale.default)
        (p2p,) = comm_layout_names(lowered)
        buf = lowered.graph.get_buffer(p2p)
        self.assertIsInstance(buf.data, ir.Pointwise)
        (src,) = lowered.reads(buf)
        self.assertIsInstance(
            lowered.graph.get_buffer(src), (ir.FallbackKernel, ir.MultiOutput)
        )
        assert lowered.code is not None
        self.assertNotIn(".copy_(", lowered.code)

    def test_inductor_buffer_becomes_comm_buffer(self) -> None:
        lowered = lower(mm_one_shot, [((64, 128), BF16), ((128, 32), BF16)])
        self.assertEqual(_graph_inputs(lowered), [])
        (p2p,) = comm_layout_names(lowered)
        buf = lowered.graph.get_buffer(p2p)
        # the mm writes the P2P buffer itself: no copy of any kind
        self.assertIsInstance(buf, ir.ExternKernelOut)
        self.assertIsInstance(buf.layout, ir.CommBufferLayout)
        assert lowered.code is not None
        self.assertNotIn(".copy_(", lowered.code)
        self.assertNotIn("@triton.jit", lowered.code)

    def test_config_off_takes_identity_copy(self) -> None:
        with config.patch({"_collective.stage_graph_inputs_in_symm_mem": False}):
            lowered = lower(graph_input_one_shot, [((64, 32), BF16)])
        self.assertEqual(_graph_inputs(lowered), [])
        (p2p,) = comm_layout_names(lowered)
        buf = lowered.graph.get_buffer(p2p)
        self.assertTrue(is_identity_copy_of(lowered, buf, lowered.input_name(0)))
        assert lowered.code is not None
        self.assertEqual(lowered.code.count("@triton.jit"), 1)


@levels(5)
class GraphInputPlacementTest(unittest.TestCase):
    """Note [Symmetric graph inputs]: the decision runs outside CUDA graphs."""

    def _lower(self, graph_partition: bool) -> tuple[Lowered, Any]:
        with config.patch(
            {"triton.cudagraphs": True, "graph_partition": graph_partition}
        ):
            lowered = lower(one_shot_then_mm, [((64, 32), BF16), ((32, 32), BF16)])
        (node,) = _graph_inputs(lowered)
        return lowered, node

    def test_graph_partition_decides_in_call(self) -> None:
        lowered, node = self._lower(graph_partition=True)
        name = node.get_name()
        assert lowered.code is not None
        self.assertTrue(node.pass_through)
        # In `call`, before the partition that gets its result as an input;
        # never inside a partition.
        FileCheck().check("def partition_0(args):").check_not(
            "p2p_buffers.graph_input("
        ).check("def call(self, args):").check(
            f"{name} = p2p_buffers.graph_input(0, "
        ).check_same("pass_through=True, cudagraphs=True)").check(
            "partition0_args = ["
        ).check_same(f"{name},").check("self.partitions[0](partition0_args)").run(
            lowered.code
        )
        scheduler = lowered.graph.scheduler
        (snode,) = [n for n in scheduler.nodes if n.node is node]
        with config.patch({"triton.cudagraphs": True, "graph_partition": True}):
            reason = scheduler.should_partition(snode)
        self.assertEqual(reason, "symm_mem graph input")

    def test_without_graph_partition_always_copies(self) -> None:
        # One CUDA graph holds the whole `call`: a replay would repeat the
        # first call's choice, so the site always copies.
        lowered, node = self._lower(graph_partition=False)
        self.assertFalse(node.pass_through)
        assert lowered.code is not None
        FileCheck().check("def call(args):").check(
            f"{node.get_name()} = p2p_buffers.graph_input(0, "
        ).check_same("pass_through=False, cudagraphs=True)").run(lowered.code)

    def test_default_mode_decides_in_call(self) -> None:
        lowered = lower(one_shot_then_mm, [((64, 32), BF16), ((32, 32), BF16)])
        (node,) = _graph_inputs(lowered)
        self.assertTrue(node.pass_through)
        assert lowered.code is not None
        FileCheck().check("def call(").check(
            f"{node.get_name()} = p2p_buffers.graph_input(0, "
        ).check_same("pass_through=True, cudagraphs=False)").run(lowered.code)


class _SymmetricStandIn:
    """Stands in for the symmetric allocator on the CPU: the storages of
    `symmetric` are symmetric memory; `asked` counts the questions and
    `rendezvoused` the rendezvous calls."""

    def __init__(self, *symmetric: torch.Tensor) -> None:
        self.storages = {t.untyped_storage()._cdata for t in symmetric}
        self.asked = 0
        self.rendezvoused: list[int] = []
        self.allocated: list[torch.Tensor] = []

    def is_symm_mem_tensor(self, x: torch.Tensor) -> bool:
        self.asked += 1
        return x.untyped_storage()._cdata in self.storages

    def rendezvous(self, x: torch.Tensor, group_name: str) -> None:
        self.rendezvoused.append(x.untyped_storage()._cdata)

    def allocate(
        self,
        size: Any,
        stride: Any,
        dtype: torch.dtype,
        device: torch.device,
        group_name: str,
    ) -> torch.Tensor:
        buf = torch.empty_strided(size, stride, dtype=dtype)
        self.allocated.append(buf)
        return buf

    def install(self, test: unittest.TestCase, capturing: bool = False) -> None:
        from torch._inductor.runtime import p2p_buffers
        from torch.distributed import _symmetric_memory

        for patcher in (
            mock.patch.object(_symmetric_memory, SYMM_CHECK, self.is_symm_mem_tensor),
            mock.patch.object(p2p_buffers, "_rendezvous", self.rendezvous),
            mock.patch.object(p2p_buffers, "_allocate", self.allocate),
            mock.patch.object(p2p_buffers, "_capturing", lambda device: capturing),
        ):
            patcher.start()
            test.addCleanup(patcher.stop)


@levels(5)
class InputSiteTest(unittest.TestCase):
    """Note [Symmetric graph inputs]: what a site passes through, asks and
    rendezvouses."""

    def _site(self, *symmetric: torch.Tensor) -> tuple[Any, _SymmetricStandIn]:
        from torch._inductor.runtime.p2p_buffers import _InputSite

        stand_in = _SymmetricStandIn(*symmetric)
        stand_in.install(self)
        return _InputSite(), stand_in

    def test_asks_once_per_storage(self) -> None:
        symm, plain = torch.empty(64), torch.empty(64)
        site, stand_in = self._site(symm)
        for _ in range(3):
            self.assertTrue(site.passes_through(symm, GROUP, False))
            self.assertFalse(site.passes_through(plain, GROUP, False))
            # a view of the same storage is the same storage
            self.assertTrue(site.passes_through(symm.view(8, 8), GROUP, False))
        self.assertEqual(stand_in.asked, 2)
        # a site keys on the storage's id: the storage object's `_cdata`,
        # which is the value `torch._C._storage_id` gives
        self.assertEqual(
            set(site.seen), {torch._C._storage_id(symm), torch._C._storage_id(plain)}
        )
        # the symmetric storage is rendezvoused when first met, and only then
        self.assertEqual(stand_in.rendezvoused, [symm.untyped_storage()._cdata])

    def test_a_dead_storage_is_forgotten(self) -> None:
        # The site's weak reference keeps the dead storage's id from reuse,
        # which `passes_through` relies on (an entry found under x's id is
        # x's storage); without it, the next storage of this size would
        # take that id and inherit the answer.
        symm = torch.empty(64)
        symm_id = torch._C._storage_id(symm)
        site, stand_in = self._site(symm)
        self.assertTrue(site.passes_through(symm, GROUP, False))
        del symm
        gc.collect()
        for _ in range(3):
            plain = torch.empty(64)
            self.assertNotEqual(torch._C._storage_id(plain), symm_id)
            self.assertFalse(site.passes_through(plain, GROUP, False))
            del plain

    def test_default_mode_passes_every_symmetric_storage(self) -> None:
        a, b = torch.empty(64), torch.empty(64)
        site, stand_in = self._site(a, b)
        for _ in range(2):
            self.assertTrue(site.passes_through(a, GROUP, False))
            self.assertTrue(site.passes_through(b, GROUP, False))
        self.assertEqual(stand_in.asked, 2)

    def test_cudagraphs_pass_one_storage_only(self) -> None:
        # A second symmetric storage would be a second static-input address,
        # a recording per address: it is copied.
        a, b, plain = torch.empty(64), torch.empty(64), torch.empty(64)
        site, _ = self._site(a, b)
        self.assertFalse(site.passes_through(plain, GROUP, True))
        self.assertTrue(site.passes_through(a, GROUP, True))
        self.assertFalse(site.passes_through(b, GROUP, True))
        self.assertTrue(site.passes_through(a, GROUP, True))

    def test_remembered_storages_are_bounded(self) -> None:
        symm = torch.empty(64)
        site, stand_in = self._site(symm)
        site.MAX_REMEMBERED = 4
        self.assertTrue(site.passes_through(symm, GROUP, True))
        for _ in range(10):
            self.assertFalse(site.passes_through(torch.empty(64), GROUP, True))
            self.assertLessEqual(len(site.seen), 5)
        # the pinned storage is never forgotten
        self.assertTrue(site.passes_through(symm, GROUP, True))
        self.assertEqual(stand_in.asked, 11)


@levels(5)
class GraphInputRuntimeTest(unittest.TestCase):
    """`P2PBuffers.graph_input`: the staging buffer is made at the site's
    first call whatever the input is, so its allocation (a collective) is at
    the same call on every rank."""

    def _buffers(
        self, *symmetric: torch.Tensor, capturing: bool = False
    ) -> tuple[Any, _SymmetricStandIn]:
        from torch._inductor.runtime.p2p_buffers import P2PBuffers

        stand_in = _SymmetricStandIn(*symmetric)
        stand_in.install(self, capturing=capturing)
        return P2PBuffers(), stand_in

    def test_staging_is_allocated_at_the_first_call(self) -> None:
        symm = torch.randn(64)
        buffers, stand_in = self._buffers(symm)
        self.assertIs(buffers.graph_input(0, symm, GROUP, True, False), symm)
        self.assertEqual(len(stand_in.allocated), 1)
        for _ in range(3):
            plain = torch.randn(64)
            out = buffers.graph_input(0, plain, GROUP, True, False)
            self.assertIs(out, stand_in.allocated[0])
            self.assertTrue(torch.equal(out, plain))
        self.assertEqual(len(stand_in.allocated), 1)

    def test_without_pass_through_always_copies(self) -> None:
        symm = torch.randn(64)
        buffers, stand_in = self._buffers(symm)
        out = buffers.graph_input(0, symm, GROUP, False, True)
        self.assertIs(out, stand_in.allocated[0])
        self.assertTrue(torch.equal(out, symm))
        self.assertEqual(stand_in.asked, 0)

    def test_first_call_under_a_capture(self) -> None:
        # Nothing is allocated during a capture: a symmetric input passes
        # through, any other is refused with what to do.
        symm = torch.randn(64)
        buffers, stand_in = self._buffers(symm, capturing=True)
        self.assertIs(buffers.graph_input(0, symm, GROUP, True, False), symm)
        self.assertEqual(stand_in.allocated, [])
        with self.assertRaisesRegex(RuntimeError, "call the module once"):
            buffers.graph_input(0, torch.randn(64), GROUP, True, False)


if __name__ == "__main__":
    unittest.main()
