"""[5/5] Layout.allocator and staging of static graph inputs, CPU tier.

Lowering and wrapper codegen on fake CUDA tensors (inductor_harness.py); no
GPU, no process group.  The GPU tier is test_symm_mem_allocator.py.

Which path `_maybe_realize_symm_mem` takes for an input of a symm_mem op:
  1. Inductor allocates it: the buffer itself becomes P2P (CommBufferLayout);
  2. a static-shape graph input: a `SymmMemGraphInput`, which at run time is
     the input itself when it is symmetric memory, else a persistent P2P
     staging buffer filled by one `copy_` (Note [Symmetric graph inputs]);
  3. anything else (symbolic shapes, views, fallback outputs): patch 2's
     pointwise identity copy.
"""

from __future__ import annotations

import sys
import unittest
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch._inductor import config, ir
from torch._inductor.virtualized import V
from torch.testing import FileCheck
from torch.testing._internal.common_distributed import MultiProcessTestCase


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
from stack_level import levels  # noqa: E402


CUDA = torch.device("cuda", 0)


def two_inputs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return symm_mem.one_shot_all_reduce(x, "sum", GROUP) + symm_mem.one_shot_all_reduce(
        y, "sum", GROUP
    )


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


def _layout(
    allocator: Any = None, size: tuple[int, ...] = (4, 8), cls: type = ir.FixedLayout
) -> ir.Layout:
    kwargs = {} if allocator is None else {"allocator": allocator}
    return cls(CUDA, BF16, list(size), **kwargs)


@levels(5)
class AllocatorTypeTest(unittest.TestCase):
    """The allocator is part of every layout and of every copy of one."""

    def setUp(self) -> None:
        self.symm = ir.AllocatorType.symm_mem(GROUP)

    def test_values(self) -> None:
        self.assertEqual(ir.AllocatorType(), ir.AllocatorType.DEFAULT)
        self.assertEqual(ir.AllocatorType.DEFAULT.kind, ir.AllocatorKind.DEFAULT)
        self.assertEqual(self.symm.kind, ir.AllocatorKind.SYMM_MEM)
        self.assertEqual(self.symm.group_name, GROUP)
        self.assertEqual(self.symm, ir.AllocatorType(ir.AllocatorKind.SYMM_MEM, GROUP))
        self.assertNotEqual(self.symm, ir.AllocatorType.symm_mem("other"))
        with self.assertRaisesRegex(ValueError, "group_name"):
            ir.AllocatorType(ir.AllocatorKind.SYMM_MEM)
        with self.assertRaisesRegex(ValueError, "group_name"):
            ir.AllocatorType(ir.AllocatorKind.DEFAULT, GROUP)

    def test_default(self) -> None:
        for cls in (ir.FixedLayout, ir.FlexibleLayout):
            self.assertEqual(_layout(cls=cls).allocator, ir.AllocatorType.DEFAULT)
        self.assertNotIn("allocator", str(_layout()))
        self.assertIn("allocator=symm_mem(group_name='0')", str(_layout(self.symm)))

    def test_equality_ignores_the_allocator(self) -> None:
        # Layouts that differ only in their allocator compare (and hash)
        # equal: comparisons of layouts (template layout checks, buffer
        # reuse keys) see a comm buffer as the FixedLayout it is.
        plain, symm = _layout(), _layout(self.symm)
        self.assertEqual(plain, symm)
        self.assertEqual(hash(plain), hash(symm))

    def test_as_fixed(self) -> None:
        flexible = _layout(self.symm, cls=ir.FlexibleLayout)
        fixed = flexible.as_fixed()
        self.assertIs(type(fixed), ir.FixedLayout)
        self.assertEqual(fixed.allocator, self.symm)
        self.assertIs(fixed.as_fixed(), fixed)

    def test_flexible_layout_copies(self) -> None:
        lowered = lower(graph_input_one_shot, [((4, 8), BF16)], codegen=False)
        flexible = _layout(self.symm, size=(2, 3, 4), cls=ir.FlexibleLayout)
        with V.set_graph_handler(lowered.graph):
            copies = {
                "as_stride_order": flexible.as_stride_order([2, 1, 0]),
                "as_exact_strides": flexible.as_exact_strides([12, 4, 1]),
                "as_fill_order": flexible.as_fill_order([2, 1, 0]),
                "as_same_order": flexible.as_same_order([1, 2, 6]),
            }
        for name, layout in copies.items():
            with self.subTest(copy=name):
                self.assertIs(type(layout), ir.FixedLayout)
                self.assertEqual(layout.allocator, self.symm)

    def test_views_keep_the_allocator(self) -> None:
        lowered = lower(graph_input_one_shot, [((4, 8), BF16)], codegen=False)
        with V.set_graph_handler(lowered.graph):
            buf = ir.Buffer(name="buf_test", layout=_layout(self.symm))
            box = ir.TensorBox.create(buf)
            views = {
                "permute": ir.PermuteView.create(box, [1, 0]),
                "slice": ir.SliceView.create(box, 1, 0, 4),
                "dtype": ir.DtypeView.create(box, torch.float16),
            }
            for name, view in views.items():
                with self.subTest(view=name):
                    self.assertIsInstance(view, ir.ReinterpretView)
                    self.assertEqual(view.get_layout().allocator, self.symm)
            non_owning = ir.NonOwningLayout(views["permute"])
            self.assertEqual(non_owning.allocator, self.symm)

    def test_comm_buffer_layout_is_symm_mem(self) -> None:
        for source in (_layout(), _layout(self.symm), _layout(cls=ir.FlexibleLayout)):
            with self.subTest(source=str(source)):
                comm = ir.CommBufferLayout(source, ir.CommBufferType.SYMM_MEM, GROUP)
                self.assertEqual(comm.allocator, self.symm)
                self.assertEqual(comm, _layout())
        with self.assertRaisesRegex(AssertionError, "allocator"):
            ir.CommBufferLayout(
                _layout(ir.AllocatorType.symm_mem("other")),
                ir.CommBufferType.SYMM_MEM,
                GROUP,
            )


@levels(5)
class InputPathTest(unittest.TestCase):
    """Which of the three paths each kind of symm_mem input takes."""

    def _assert_graph_input(
        self, lowered: Lowered, node: Any, input_index: int, site: int
    ) -> None:
        self.assertIsInstance(node.layout, ir.CommBufferLayout)
        self.assertEqual(node.layout.allocator, ir.AllocatorType.symm_mem(GROUP))
        (src,) = node.inputs
        self.assertIsInstance(src, ir.InputBuffer)
        self.assertEqual(src.get_name(), lowered.input_name(input_index))
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
        self.assertEqual(buf.layout.allocator, ir.AllocatorType.symm_mem(GROUP))
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


class _StandIn:
    """Stands in for the symmetric-memory test: `owned` says which tensors
    are symmetric; `asked` counts the decisions."""

    def __init__(self, owned: set[int]) -> None:
        self.owned = owned
        self.asked = 0

    def __call__(self, x: torch.Tensor, group_name: str) -> bool:
        self.asked += 1
        return id(x) in self.owned


@levels(5)
class InputSiteTest(unittest.TestCase):
    """Note [Symmetric graph inputs]: when a site decides, and what."""

    def _site(self, cudagraphs: bool, *owned: torch.Tensor) -> Any:
        from torch._inductor.runtime.p2p_buffers import _InputSite

        probe = _StandIn({id(t) for t in owned})
        return _InputSite(cudagraphs, decide=probe), probe

    def test_decides_once_per_address(self) -> None:
        symm, plain = torch.empty(64), torch.empty(64)
        site, probe = self._site(False, symm)
        for _ in range(3):
            self.assertTrue(site.passes_through(symm, GROUP))
            self.assertFalse(site.passes_through(plain, GROUP))
        self.assertEqual(probe.asked, 2)

    def test_a_view_of_the_same_storage_is_not_asked_again(self) -> None:
        symm = torch.empty(64)
        site, probe = self._site(False, symm)
        self.assertTrue(site.passes_through(symm, GROUP))
        # same address, same storage
        self.assertTrue(site.passes_through(symm.view(8, 8), GROUP))
        self.assertEqual(probe.asked, 1)

    def test_a_new_storage_at_a_symmetric_address_is_asked_again(self) -> None:
        symm = torch.empty(64)
        site, probe = self._site(False, symm)
        self.assertTrue(site.passes_through(symm, GROUP))
        other = torch.empty(0).set_(torch.UntypedStorage(256))
        # stand for a new storage at the same address
        site.decided[other.data_ptr()] = site.decided.pop(symm.data_ptr())
        self.assertFalse(site.passes_through(other, GROUP))
        self.assertEqual(probe.asked, 2)

    def test_default_mode_passes_every_symmetric_address(self) -> None:
        a, b = torch.empty(64), torch.empty(64)
        site, probe = self._site(False, a, b)
        for _ in range(2):
            self.assertTrue(site.passes_through(a, GROUP))
            self.assertTrue(site.passes_through(b, GROUP))
        self.assertEqual(probe.asked, 2)

    def test_cudagraphs_pass_one_address_only(self) -> None:
        # A second symmetric address would be a second static-input address,
        # a recording per address: it is copied, and not even asked about.
        a, b, plain = torch.empty(64), torch.empty(64), torch.empty(64)
        site, probe = self._site(True, a, b)
        self.assertFalse(site.passes_through(plain, GROUP))
        self.assertTrue(site.passes_through(a, GROUP))
        self.assertFalse(site.passes_through(b, GROUP))
        self.assertTrue(site.passes_through(a, GROUP))
        self.assertEqual(probe.asked, 2)
        self.assertEqual(site.pinned, a.data_ptr())

    def test_remembered_addresses_are_bounded(self) -> None:
        symm = torch.empty(64)
        site, probe = self._site(True, symm)
        site.MAX_DECIDED = 4
        self.assertTrue(site.passes_through(symm, GROUP))
        site.cudagraphs = False  # let copies be remembered
        plain = [torch.empty(64) for _ in range(10)]
        for t in plain:
            self.assertFalse(site.passes_through(t, GROUP))
            self.assertLessEqual(len(site.decided), 4)
        # the pass-through address is never forgotten
        self.assertIn(symm.data_ptr(), site.decided)
        self.assertTrue(site.passes_through(symm, GROUP))
        self.assertEqual(probe.asked, 11)


@levels(5)
class RankAgreementTest(MultiProcessTestCase):
    """Two CPU ranks (gloo) with a stand-in for the symmetric-memory test:
    an input passes through only where every rank's does."""

    @property
    def world_size(self) -> int:
        return 2

    def setUp(self) -> None:
        super().setUp()
        self._spawn_processes()

    def _group(self) -> str:
        dist.init_process_group(
            "gloo",
            rank=self.rank,
            world_size=self.world_size,
            init_method=f"file://{self.file_name}",
        )
        self.addCleanup(dist.destroy_process_group)
        return dist.group.WORLD.group_name

    def test_agreed_across_ranks(self) -> None:
        from torch._inductor.runtime.p2p_buffers import agreed_across_ranks

        group = self._group()
        cpu = torch.device("cpu")
        for answers in [(True, True), (True, False), (False, True), (False, False)]:
            self.assertEqual(
                agreed_across_ranks(answers[self.rank], group, cpu), all(answers)
            )

    def test_sites_decide_alike_on_every_rank(self) -> None:
        from torch._inductor.runtime.p2p_buffers import _InputSite, agreed_across_ranks

        group = self._group()
        # rank 0 holds symmetric memory in both inputs, rank 1 only in `b`
        a, b = torch.empty(64), torch.empty(64)
        local = _StandIn({id(a), id(b)} if self.rank == 0 else {id(b)})

        def decide(x: torch.Tensor, group_name: str) -> bool:
            return agreed_across_ranks(local(x, group_name), group_name, x.device)

        site = _InputSite(False, decide=decide)
        for _ in range(2):
            self.assertFalse(site.passes_through(a, group))
            self.assertTrue(site.passes_through(b, group))
        # one decision per address on both ranks, so no rank waits alone
        self.assertEqual(local.asked, 2)


@levels(0, 4)
class PinAllocatorTest(unittest.TestCase):
    def test_layout_has_no_allocator_before_patch_5(self) -> None:
        self.assertFalse(hasattr(ir, "AllocatorType"))
        self.assertFalse(hasattr(_layout(), "allocator"))


if __name__ == "__main__":
    unittest.main()
