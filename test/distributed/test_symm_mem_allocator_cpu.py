"""[5/5] Layout.allocator and staging of static graph inputs, CPU tier.

Lowering and wrapper codegen on fake CUDA tensors (inductor_harness.py); no
GPU, no process group.  The GPU tier is test_symm_mem_allocator.py.

Which path `_maybe_realize_symm_mem` takes for an input of a symm_mem op:
  1. Inductor allocates it: the buffer itself becomes P2P (CommBufferLayout);
  2. a static-shape graph input: a persistent P2P staging buffer, filled by
     `staging.copy_(input)` on every call (CommBufferStagingCopy);
  3. anything else (symbolic shapes, views, fallback outputs): patch 2's
     pointwise identity copy.
"""

from __future__ import annotations

import re
import sys
import tempfile
import unittest
from pathlib import Path
from typing import Any

import torch
from torch._inductor import config, ir
from torch._inductor.virtualized import V


sys.path.insert(0, str(Path(__file__).parent))

from code_stats import (  # noqa: E402
    P2P_DYNAMIC,
    P2P_STATIC,
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


def _staging_copies(lowered: Lowered) -> list[Any]:
    from torch._inductor.comm_lowering import CommBufferStagingCopy

    return lowered.ops(CommBufferStagingCopy)


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

    def _assert_staged(self, lowered: Lowered, staging: Any, input_index: int) -> None:
        self.assertIsInstance(staging.layout, ir.CommBufferLayout)
        self.assertEqual(staging.layout.allocator, ir.AllocatorType.symm_mem(GROUP))
        (src,) = staging.inputs
        self.assertIsInstance(src, ir.InputBuffer)
        self.assertEqual(src.get_name(), lowered.input_name(input_index))
        assert lowered.code is not None
        body = _call_body(lowered.code)
        self.assertIn(f"{staging.get_name()}.copy_({src.get_name()}, False)", body)
        # The staging buffer is a persistent P2P allocation made before the
        # copy, or reuses a P2P buffer that is free by then (comm buffers are
        # only ever reused for comm buffers).
        name = staging.get_name()
        allocs = [ln for ln in p2p_alloc_lines(body) if ln.startswith(f"{name} = ")]
        reuse = re.search(rf"{name} = (buf\d+); del \1  # reuse", body)
        if reuse is None:
            (alloc,) = allocs
            self.assertIn(P2P_STATIC, alloc)
            made_at = body.index(alloc)
        else:
            self.assertEqual(allocs, [])
            self.assertIn(reuse.group(1), comm_layout_names(lowered))
            made_at = reuse.start()
        self.assertLess(made_at, body.index(f"{name}.copy_("))

    def test_static_graph_input_is_staged_without_kernel(self) -> None:
        for fn, inputs, out_op in GRAPH_INPUT_CASES:
            with self.subTest(fn=fn.__name__):
                lowered = lower(fn, inputs)
                (staging,) = _staging_copies(lowered)
                self._assert_staged(lowered, staging, 0)
                (node,) = lowered.by_op(out_op)
                self.assertEqual(node.inputs[0].get_name(), staging.get_name())
                self.assertEqual(comm_layout_names(lowered), [staging.get_name()])
                assert lowered.code is not None
                self.assertEqual(len(p2p_alloc_lines(lowered.code)), 1)
                self.assertEqual(lowered.code.count(".copy_("), 1)
                # no Triton identity copy (and no other kernel)
                self.assertNotIn("@triton.jit", lowered.code)
                self.assertFalse(lowered.ops(ir.ComputedBuffer))

    def test_one_staging_buffer_per_input(self) -> None:
        lowered = lower(two_inputs, [((64, 32), BF16)] * 2)
        stagings = _staging_copies(lowered)
        self.assertEqual(len(stagings), 2)
        for i, staging in enumerate(stagings):
            self._assert_staged(lowered, staging, i)
        assert lowered.code is not None
        self.assertEqual(lowered.code.count(".copy_("), 2)
        # the second staging buffer reuses the first: one P2P allocation
        (alloc,) = p2p_alloc_lines(lowered.code)
        self.assertIn(P2P_STATIC, alloc)
        # only the final add is a kernel
        self.assertEqual(lowered.code.count("@triton.jit"), 1)

    def test_dynamic_graph_input_takes_identity_copy(self) -> None:
        lowered = lower(graph_input_one_shot, [((64, 32), BF16)], dynamic=True)
        self.assertEqual(_staging_copies(lowered), [])
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
        self.assertEqual(_staging_copies(lowered), [])
        assert lowered.code is not None
        self.assertIn("@triton.jit", lowered.code)

    def test_fallback_output_takes_identity_copy(self) -> None:
        lowered = lower(custom_op_output, [((64, 32), BF16)])
        self.assertEqual(_staging_copies(lowered), [])
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
        self.assertEqual(_staging_copies(lowered), [])
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
        self.assertEqual(_staging_copies(lowered), [])
        (p2p,) = comm_layout_names(lowered)
        buf = lowered.graph.get_buffer(p2p)
        self.assertTrue(is_identity_copy_of(lowered, buf, lowered.input_name(0)))
        assert lowered.code is not None
        self.assertEqual(lowered.code.count("@triton.jit"), 1)

    def test_cudagraph_partition_gets_the_staging_buffer_as_input(self) -> None:
        with config.patch({"triton.cudagraphs": True, "graph_partition": True}):
            lowered = lower(one_shot_then_mm, [((64, 32), BF16), ((32, 32), BF16)])
        (staging,) = _staging_copies(lowered)
        name = staging.get_name()
        assert lowered.code is not None
        body = _call_body(lowered.code)
        # The copy runs in `call` on every call, outside the CUDA graph; the
        # partition receives the persistent P2P buffer.
        copy_at = body.index(f"{name}.copy_(")
        args = re.search(r"partition0_args = \[([^\]]*)\]", body)
        assert args is not None
        self.assertIn(name, [a.strip() for a in args.group(1).split(",")])
        self.assertLess(copy_at, args.start())
        (alloc,) = p2p_alloc_lines(lowered.code)
        self.assertTrue(alloc.startswith(f"{name} = "), alloc)
        self.assertIn(alloc, body)
        partition = lowered.code[: lowered.code.index("class Runner")]
        self.assertIn("def partition_0(args):", partition)
        self.assertNotIn("empty_strided_p2p(", partition.split("def partition_0")[1])


PROTON_ALLOCATOR = "triton.set_allocator("
PROTON_START = "if not _ProtonHookManager.active_hooks: proton.start("


class ProtonSetupTest(unittest.TestCase):
    """The proton set-up runs in the call prefix, on every call."""

    def _code(self, partition: bool) -> str:
        patches: dict[str, Any] = {
            "triton.proton_profiling": True,
            "triton.proton_output_dir": tempfile.gettempdir(),
        }
        if partition:
            patches |= {"triton.cudagraphs": True, "graph_partition": True}
        with config.patch(patches):
            lowered = lower(one_shot_then_mm, [((64, 32), BF16), ((32, 32), BF16)])
        assert lowered.code is not None
        return lowered.code

    @levels(5)
    def test_setup_in_call_prefix(self) -> None:
        for partition in (False, True):
            with self.subTest(partition=partition):
                code = self._code(partition)
                body = _call_body(code)
                header = code[: code.index("async_compile.wait(globals())")]
                first = body.splitlines()[1:4]
                self.assertTrue(first[0].strip().startswith(PROTON_ALLOCATOR), first)
                self.assertTrue(first[1].strip().startswith(PROTON_START), first)
                self.assertEqual(first[2].strip(), 'pl.enable_semantic("triton")')
                # the allocator is set per call only; the header still starts
                # proton before the kernels compile
                self.assertNotIn(PROTON_ALLOCATOR, header)
                self.assertIn(PROTON_START, header)
                if partition:
                    self.assertNotIn(
                        "proton",
                        code[
                            code.index("def partition_0") : code.index("class Runner")
                        ],
                    )

    @levels(0, 4)
    def test_pin_sets_up_proton_in_header_only(self) -> None:
        code = self._code(partition=False)
        self.assertIn(PROTON_ALLOCATOR, code[: code.index("def call(")])
        self.assertNotIn("proton", _call_body(code).split("return (")[0])


@levels(0, 4)
class PinAllocatorTest(unittest.TestCase):
    def test_layout_has_no_allocator_before_patch_5(self) -> None:
        self.assertFalse(hasattr(ir, "AllocatorType"))
        self.assertFalse(hasattr(_layout(), "allocator"))


if __name__ == "__main__":
    unittest.main()
