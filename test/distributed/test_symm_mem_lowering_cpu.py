"""LoweringTest, CPU tier: Inductor lowering and wrapper codegen of symm_mem
ops on fake CUDA tensors.  Runs anywhere (no GPU, no process group).

Each test declares the series levels it holds for (see stack_level.py); the
level-0 tests pin down the behaviour of stock torch 2.11.0 that the series
changes, so they fail if the harness stops reproducing it.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import unittest
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch._inductor import ir
from torch._inductor.virtualized import V
from torch.testing import FileCheck


sys.path.insert(0, str(Path(__file__).parent))

from code_stats import (  # noqa: E402
    P2P_ALLOC,
    P2P_DYNAMIC,
    P2P_STATIC,
    PIN_P2P_ALLOC,
    TRITON_KERNEL,
    CodeStats,
    check_counts,
)
from cpu_models import (  # noqa: E402
    BF16,
    GRAPH_INPUT_CASES,
    custom_op_output,
    eight_layer_model,
    graph_input_one_shot,
    mm_one_shot,
    one_shot,
    symm_mem,
)
from cpu_models import (
    graph_input_copy as cpu_models_graph_input_copy,
)
from inductor_harness import (  # noqa: E402
    GROUP,
    Lowered,
    comm_layout_names,
    is_identity_copy_of,
    lower,
)
from stack_level import bases, holds, levels, levels_by_base, on_base  # noqa: E402


# what a P2P allocation site looks like at this level
P2P = P2P_ALLOC if holds(1) else PIN_P2P_ALLOC

# Whether the functional one-shot ops lower to an ExternKernelOut of their out
# overload: from [1/5] on 2.11.0; 2.14.1 does it itself (FallbackKernel.create
# and torch._library._out_variant.register_out_variant).
LOWERS_TO_OUT = holds(1) or on_base("2.14.1")

EIGHT_LAYER_INPUTS = [((128, 4096), BF16)] + [((4096, 4096), BF16)] * 8


CPU = torch.device("cpu")


def one_shot_copy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return symm_mem.one_shot_all_reduce_copy(x * 2, y + 1, "sum", GROUP)


# Every symm_mem op the CPU tier traces, with the first series level at which
# it has a Meta kernel (0: the pin; 2: patch 2/5 adds it). torch.compile
# traces through these kernels, so this tier tests what it reaches.
TRACED_OPS = {
    "one_shot_all_reduce": 0,
    "one_shot_all_reduce_copy": 0,
    "two_shot_all_reduce_": 2,
    "reduce_scatter_out": 2,
    "_two_shot_all_reduce": 2,
    "_reduce_scatter": 2,
}


class FakeKernelTest(unittest.TestCase):
    """The CPU tier invents no kernel: each op it traces has a Meta kernel
    from the pin or from the patches."""

    def test_traced_ops_have_meta_kernels(self) -> None:
        for name, since in TRACED_OPS.items():
            with self.subTest(op=name):
                qualname = f"symm_mem::{name}"
                has = hasattr(
                    torch.ops.symm_mem, name
                ) and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta")
                self.assertEqual(has, holds(since), qualname)

    def test_ops_without_meta_at_the_pin_are_not_lowered_here(self) -> None:
        # torch.compile cannot trace them (no Meta kernel at the pin, none
        # added by the series): the CPU tier does not lower them.
        for name in ("multimem_one_shot_all_reduce", "multimem_all_reduce_"):
            with self.subTest(op=name):
                self.assertFalse(
                    torch._C._dispatch_has_kernel_for_dispatch_key(
                        f"symm_mem::{name}", "Meta"
                    )
                )


class OutVariantLoweringTest(unittest.TestCase):
    """[1/5] functional symm_mem ops lower to ExternKernelOut."""

    def _single_extern(
        self, lowered: Lowered, op: torch._ops.OpOverload
    ) -> ir.ExternKernel:
        kernels = lowered.by_op(op)
        self.assertEqual(len(kernels), 1, [type(b).__name__ for b in lowered.buffers()])
        return kernels[0]

    @levels_by_base({"2.11.0": (1, None), "2.14.1": (0, None)})
    def test_functional_ops_lower_to_extern_kernel_out(self) -> None:
        cases = [
            (one_shot, [((64, 32), BF16)], symm_mem.one_shot_all_reduce_out.default),
        ]
        for fn, inputs, out_op in cases:
            with self.subTest(op=str(out_op)):
                lowered = lower(fn, inputs, codegen=False)
                node = self._single_extern(lowered, out_op)
                self.assertIs(type(node), ir.ExternKernelOut)
                self.assertTrue(node.should_allocate())
                self.assertIsInstance(node.layout, ir.FixedLayout)
                self.assertNotIsInstance(node.layout, ir.CommBufferLayout)
                self.assertEqual(list(node.get_size()), [64, 32])
                self.assertEqual(node.get_dtype(), BF16)
                (inp,) = node.inputs
                self.assertIsInstance(inp.get_output_spec(), ir.CommBufferLayout)
                self.assertEqual(comm_layout_names(lowered), [inp.get_name()])
                self.assertFalse(lowered.ops(ir.FallbackKernel))

    @levels_by_base({"2.11.0": (1, 1), "2.14.1": (0, 1)})
    def test_copy_variant_keeps_semantics(self) -> None:
        lowered = lower(
            one_shot_copy, [((64, 32), BF16), ((64, 32), BF16)], codegen=False
        )
        node = self._single_extern(
            lowered, symm_mem.one_shot_all_reduce_copy_out.default
        )
        self.assertIs(type(node), ir.ExternKernelOut)
        symm_buffer, local_input = node.inputs
        # Only the staging buffer is P2P; the local input stays a plain buffer
        # and the result is planned like any other buffer.
        self.assertIsInstance(symm_buffer.get_output_spec(), ir.CommBufferLayout)
        self.assertNotIsInstance(local_input.get_output_spec(), ir.CommBufferLayout)
        self.assertNotIsInstance(node.layout, ir.CommBufferLayout)
        self.assertEqual(node.constant_args, ["sum", GROUP])

    @bases("2.11.0")  # 2.14.1 has upstream's registry (register_out_variant)
    @levels(1)
    def test_out_variant_table_takes_only_matching_schemas(self) -> None:
        # Note [Out variants of fallback kernels]: the lowering passes the
        # functional op's arguments on to the out overload as they are, so a
        # pair whose schemas do not line up is refused, and nothing changes.
        table = dict(ir._fallback_out_variants)
        self.assertEqual(
            table,
            {
                symm_mem.one_shot_all_reduce.default: (
                    symm_mem.one_shot_all_reduce_out.default
                ),
                symm_mem.one_shot_all_reduce_copy.default: (
                    symm_mem.one_shot_all_reduce_copy_out.default
                ),
            },
        )
        mismatched = [
            # other arguments
            (
                symm_mem.one_shot_all_reduce.default,
                symm_mem.one_shot_all_reduce_copy_out.default,
            ),
            # no `out` argument
            (
                symm_mem.one_shot_all_reduce_copy.default,
                symm_mem.one_shot_all_reduce.default,
            ),
            # the "functional" op mutates its input and returns it
            (
                symm_mem.two_shot_all_reduce_.default,
                symm_mem.one_shot_all_reduce_out.default,
            ),
        ]
        for functional, out in mismatched:
            with self.subTest(functional=str(functional), out=str(out)):
                with self.assertRaises(ValueError):
                    ir.register_fallback_out_variant(functional, out)
                self.assertEqual(ir._fallback_out_variants, table)

    @bases("2.11.0")
    @levels(0, 0)
    def test_pin_lowers_functional_ops_to_fallback(self) -> None:
        for fn, op in [
            (one_shot, symm_mem.one_shot_all_reduce.default),
        ]:
            lowered = lower(fn, [((64, 32), BF16)], codegen=False)
            (node,) = lowered.by_op(op)
            self.assertIsInstance(node, ir.FallbackKernel)
            self.assertFalse(node.should_allocate())

    @levels_by_base({"2.11.0": (1, None), "2.14.1": (0, None)})
    def test_generated_call_uses_out_overload(self) -> None:
        lowered = lower(one_shot, [((64, 32), BF16)])
        assert lowered.code is not None
        self.assertRegex(
            lowered.code,
            r"torch\.ops\.symm_mem\.one_shot_all_reduce_out\.default\("
            r"buf\d+, 'sum', '0', out=buf\d+\)",
        )
        self.assertNotIn("symm_mem.one_shot_all_reduce.default(", lowered.code)

    @levels_by_base({"2.11.0": (1, None), "2.14.1": (0, None)})
    def test_eight_layer_buffer_plan(self) -> None:
        lowered = lower(eight_layer_model, EIGHT_LAYER_INPUTS)
        assert lowered.code is not None
        stats = CodeStats.of(lowered.code)
        # One P2P and one regular buffer ping-pong through all eight layers.
        self.assertEqual(stats.p2p_allocs + stats.plain_allocs, 2, stats)
        self.assertEqual(stats.p2p_allocs, 1, stats)
        self.assertGreaterEqual(stats.reuses, 14, stats)
        self.assertLessEqual(stats.buffer_names, 16, stats)
        self.assertEqual(stats.out_calls, 16, stats)

    @levels_by_base({"2.11.0": (1, None), "2.14.1": (0, None)})
    def test_eight_layer_buffer_plan_in_a_cuda_graph_partition(self) -> None:
        # Under CUDA graphs with graph partitions the kernels move into
        # partition_0; the plan (and CodeStats, which reads the partitions
        # too) stays the same.
        flags = {"triton.cudagraphs": True, "graph_partition": True}
        with torch._inductor.config.patch(flags):
            lowered = lower(eight_layer_model, EIGHT_LAYER_INPUTS)
        assert lowered.code is not None
        self.assertEqual(
            re.findall(r"^def (partition_\d+)\(", lowered.code, re.M), ["partition_0"]
        )
        stats = CodeStats.of(lowered.code)
        self.assertEqual((stats.out_calls, stats.p2p_allocs), (16, 1), stats)
        self.assertEqual(stats.p2p_allocs + stats.plain_allocs, 2, stats)

    @bases("2.11.0")
    @levels(0, 0)
    def test_pin_eight_layer_buffer_plan(self) -> None:
        # The numbers measured on 2 GPUs with stock 2.11.0.
        lowered = lower(eight_layer_model, EIGHT_LAYER_INPUTS)
        assert lowered.code is not None
        stats = CodeStats.of(lowered.code)
        self.assertEqual(
            (stats.buffer_names, stats.reuses, stats.out_calls), (24, 7, 8), stats
        )


def graph_input_two_one_shots(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    "two collectives of one group read one graph input"
    return (
        symm_mem.one_shot_all_reduce(x, "sum", GROUP),
        symm_mem.one_shot_all_reduce(x, "max", GROUP),
    )


def relu_of_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return symm_mem.one_shot_all_reduce(torch.relu(x @ w), "sum", GROUP)


def add_of_inputs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return symm_mem.one_shot_all_reduce(a + b, "sum", GROUP)


def graph_input_inplace_collectives(
    x: torch.Tensor, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    symm_mem.two_shot_all_reduce_(x, "sum", GROUP)
    symm_mem.reduce_scatter_out(x.flatten() * 2, GROUP, False, out)
    return x + 1, out


def _p2p_sources(lowered: Lowered) -> list[ir.Buffer]:
    """What each P2P buffer computes: the placeholder names its
    Pointwise identity copy reads, or the kind of kernel writing it."""
    found = []
    for buf in lowered.buffers():
        if not isinstance(buf.get_output_spec(), ir.CommBufferLayout):
            continue
        found.append(buf)
    return found


class UncontrolledInputTest(unittest.TestCase):
    """[2/5] inputs Inductor does not allocate get one identity copy into P2P."""

    def _only_p2p(self, lowered: Lowered) -> ir.Buffer:
        p2p = _p2p_sources(lowered)
        self.assertEqual(len(p2p), 1, [b.get_name() for b in p2p])
        return p2p[0]

    @levels(2, 4)
    def test_graph_input_is_copied_once(self) -> None:
        for fn, inputs, out_op in GRAPH_INPUT_CASES:
            with self.subTest(fn=fn.__name__):
                lowered = lower(fn, inputs)
                p2p = self._only_p2p(lowered)
                self.assertTrue(
                    is_identity_copy_of(lowered, p2p, lowered.input_name(0)), str(p2p)
                )
                (node,) = lowered.by_op(out_op)
                self.assertEqual(node.inputs[0].get_name(), p2p.get_name())
                assert lowered.code is not None
                # exactly one kernel: the identity copy into the P2P buffer
                check_counts(lowered.code, {P2P_ALLOC: 1, TRITON_KERNEL: 1})

    @bases("2.11.0")
    @levels(0, 1)
    def test_pin_passes_graph_input_through(self) -> None:
        # Stock torch logs "Failed to realize ..." and hands the placeholder
        # to the op, which then fails at run time on 2 GPUs.
        lowered = lower(graph_input_one_shot, [((64, 32), BF16)])
        self.assertEqual(_p2p_sources(lowered), [])
        assert lowered.code is not None
        self.assertNotIn("empty_strided_p2p(", lowered.code)

    @bases("2.14.1")
    @levels(0, 1)
    def test_base_copies_graph_input_at_every_op(self) -> None:
        # 2.14.1's `_maybe_realize_symm_mem` copies a graph input into a P2P
        # buffer (a pointwise identity) for each op that reads it.
        lowered = lower(graph_input_two_one_shots, [((64, 32), BF16)])
        name = lowered.input_name(0)
        p2p = [lowered.graph.get_buffer(n) for n in comm_layout_names(lowered)]
        self.assertEqual(len(p2p), 2, p2p)
        for buf in p2p:
            self.assertTrue(is_identity_copy_of(lowered, buf, name), str(buf))

    @levels(2, 4)
    def test_graph_input_read_by_two_ops_is_copied_once(self) -> None:
        # `GraphLowering.symm_mem_inputs`: one copy per graph input and group
        lowered = lower(graph_input_two_one_shots, [((64, 32), BF16)])
        p2p = self._only_p2p(lowered)
        ops = lowered.by_op(symm_mem.one_shot_all_reduce_out.default)
        self.assertEqual([op.inputs[0].get_name() for op in ops], [p2p.get_name()] * 2)

    @levels(2)
    def test_fallback_output_is_copied_once(self) -> None:
        lowered = lower(custom_op_output, [((64, 32), BF16)])
        (fallback,) = lowered.by_op(torch.ops.symm_stack_test.scale.default)
        self.assertIsInstance(fallback, ir.FallbackKernel)
        p2p = self._only_p2p(lowered)
        self.assertIsInstance(p2p.data, ir.Pointwise)
        (src,) = lowered.reads(p2p)
        # the copy reads what the fallback kernel produced
        self.assertIsInstance(
            lowered.graph.get_buffer(src), (ir.FallbackKernel, ir.MultiOutput)
        )
        self.assertNotEqual(src, p2p.get_name())
        assert lowered.code is not None
        check_counts(lowered.code, {P2P_ALLOC: 1, TRITON_KERNEL: 1})

    @levels(0)
    def test_pointwise_producer_becomes_p2p_without_copy(self) -> None:
        for fn, inputs in [
            (relu_of_mm, [((64, 128), BF16), ((128, 32), BF16)]),
            (add_of_inputs, [((64, 32), BF16)] * 2),
        ]:
            with self.subTest(fn=fn.__name__):
                lowered = lower(fn, inputs)
                p2p = self._only_p2p(lowered)
                # The pointwise op itself writes the P2P buffer: one kernel,
                # no identity copy after it.
                self.assertIsInstance(p2p.data, ir.Pointwise)
                self.assertFalse(
                    is_identity_copy_of(lowered, p2p, lowered.input_name(0))
                )
                assert lowered.code is not None
                check_counts(lowered.code, {P2P: 1, TRITON_KERNEL: 1})

    @levels_by_base({"2.11.0": (1, None), "2.14.1": (0, None)})
    def test_p2p_producer_is_not_an_inplace_update(self) -> None:
        # The kernel writing a P2P buffer must read its real input: an
        # in-place update (in_out_ptr) would read the fresh P2P buffer.
        cases = [(relu_of_mm, [((64, 128), BF16), ((128, 32), BF16)])]
        if holds(2):  # a fallback output is copied into P2P from patch 2 on
            cases.append((custom_op_output, [((64, 32), BF16)]))
        for fn, inputs in cases:
            with self.subTest(fn=fn.__name__):
                lowered = lower(fn, inputs)
                assert lowered.code is not None
                self.assertNotIn("in_out_ptr", lowered.code)
                (p2p,) = _p2p_sources(lowered)
                self.assertRegex(
                    lowered.code, rf"triton_\w+\.run\(buf\d+, {p2p.get_name()}, "
                )

    @bases("2.11.0")
    @levels(0, 0)
    def test_pin_p2p_producer_is_an_inplace_update(self) -> None:
        lowered = lower(relu_of_mm, [((64, 128), BF16), ((128, 32), BF16)])
        assert lowered.code is not None
        self.assertIn("in_out_ptr0", lowered.code)

    @levels(2)
    def test_dynamic_graph_input_gets_a_dynamic_p2p_site(self) -> None:
        lowered = lower(graph_input_one_shot, [((64, 32), BF16)], dynamic=True)
        p2p = self._only_p2p(lowered)
        self.assertTrue(
            is_identity_copy_of(lowered, p2p, lowered.input_name(0)), str(p2p)
        )
        assert lowered.code is not None
        # one growing buffer for every size, never an alloc_id
        check_counts(lowered.code, {P2P_DYNAMIC: 1, P2P_STATIC: 0, "alloc_id": 0})
        FileCheck().check(f"{p2p.get_name()} = p2p_buffers.dynamic(0, (s").check_same(
            f'"{GROUP}")'
        ).run(lowered.code)

    @levels(1)
    def test_dynamic_inductor_buffer_becomes_p2p_without_copy(self) -> None:
        lowered = lower(
            mm_one_shot, [((64, 128), BF16), ((128, 32), BF16)], dynamic=True
        )
        p2p = self._only_p2p(lowered)
        # the mm writes the P2P buffer itself: no identity copy, no kernel
        self.assertIsInstance(p2p, ir.ExternKernelOut)
        assert lowered.code is not None
        check_counts(lowered.code, {TRITON_KERNEL: 0, P2P_DYNAMIC: 1, P2P_STATIC: 0})

    @levels(1)
    def test_dynamic_site_code_is_the_same_under_cudagraphs(self) -> None:
        # Whether a replaced allocation may be freed is decided at run time
        # (a capture may come from the caller), never from config at codegen.
        codes = []
        for cudagraphs in (False, True):
            with torch._inductor.config.patch({"triton.cudagraphs": cudagraphs}):
                lowered = lower(
                    mm_one_shot, [((64, 128), BF16), ((128, 32), BF16)], dynamic=True
                )
            assert lowered.code is not None
            (line,) = [ln for ln in lowered.code.splitlines() if P2P_DYNAMIC in ln]
            codes.append(line.strip())
        self.assertEqual(codes[0], codes[1])
        self.assertTrue(codes[0].endswith(f'"{GROUP}")'), codes[0])

    @levels(0, 0)
    def test_pin_dynamic_p2p_buffer_is_persistent(self) -> None:
        # Stock torch gives a symbolic-size P2P buffer a persistent alloc_id,
        # which fails at run time as soon as the size changes.
        lowered = lower(
            mm_one_shot, [((64, 128), BF16), ((128, 32), BF16)], dynamic=True
        )
        assert lowered.code is not None
        (line,) = [ln for ln in lowered.code.splitlines() if PIN_P2P_ALLOC in ln]
        self.assertRegex(line, r"\(\(s\d+, s\d+\).*alloc_id=\d+\)$")

    @levels(2)
    def test_inplace_collectives_compile_functionally(self) -> None:
        # What torch.compile traces: the Functionalize kernels turn
        # two_shot_all_reduce_ and reduce_scatter_out into functional ops,
        # which run on P2P copies of their graph inputs.
        lowered = lower(
            graph_input_inplace_collectives,
            [((64, 32), BF16), ((1024,), BF16)],
            functionalize=True,
        )
        (two_shot,) = lowered.by_op(symm_mem.two_shot_all_reduce_.default)
        (reduce_scatter,) = lowered.by_op(symm_mem.reduce_scatter_out.default)
        for kernel, name in ((two_shot, "x"), (reduce_scatter, None)):
            p2p = kernel.inputs[0]
            self.assertIsInstance(p2p.get_output_spec(), ir.CommBufferLayout)
            if name is not None:
                self.assertTrue(
                    is_identity_copy_of(lowered, p2p, lowered.input_name(0))
                )
        out = reduce_scatter.inputs[1]
        self.assertNotIsInstance(out.get_output_spec(), ir.CommBufferLayout)
        assert lowered.code is not None
        check_counts(lowered.code, {P2P_ALLOC: 2})

    @levels(2)
    def test_lowering_import_leaves_symm_mem_unimported(self) -> None:
        # Importing Inductor's lowerings imports nothing of
        # torch.distributed._symmetric_memory, which defines the functional
        # forms; a graph that holds one registers their lowerings when
        # GraphLowering first meets it.
        script = (
            "import sys, torch, torch._inductor.lowering as L;"
            "print('torch.distributed._symmetric_memory' in sys.modules);"
            "import torch.distributed._symmetric_memory;"
            "from torch._inductor.comm_lowering import"
            " register_symm_mem_functional_lowerings as r; r();"
            "ops = torch.ops.symm_mem;"
            "print(ops._two_shot_all_reduce.default in L.lowerings,"
            " ops._reduce_scatter.default in L.lowerings)"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], check=True, capture_output=True, text=True
        ).stdout.split()
        # 2.14.1's Inductor imports it anyway (through torch.distributed.fsdp):
        # the lowerings must not depend on either
        imported = "True" if on_base("2.14.1") else "False"
        self.assertEqual(out[-3:], [imported, "True", "True"])

    @levels(0, 1)
    def test_pin_cannot_functionalize_inplace_collectives(self) -> None:
        with self.assertRaisesRegex(RuntimeError, "alias annotations"):
            lower(
                graph_input_inplace_collectives,
                [((64, 32), BF16), ((1024,), BF16)],
                functionalize=True,
            )


def returned_names(code: str) -> list[str]:
    "The names in the `return (...)` of the wrapper's `call`"
    body = code[code.index("def call(self, args):") :]
    ret = body[body.index("        return (") :].splitlines()[0]
    return re.findall(r"\bbuf\d+\b", ret)


def mm_returned_and_reduced(
    x: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    y = x @ w
    return y, symm_mem.one_shot_all_reduce(y, "sum", GROUP)


def mm_view_returned_and_reduced(
    x: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    y = x @ w
    return y.view(32, 64), symm_mem.one_shot_all_reduce(y, "sum", GROUP)


def two_live_p2p_buffers(
    x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = x * 2, y * 3
    ra = symm_mem.one_shot_all_reduce(a, "sum", GROUP)
    rb = symm_mem.one_shot_all_reduce(b, "sum", GROUP)
    return ra, rb, a + b


class P2PBuffersCodegenTest(unittest.TestCase):
    """[1/5] P2P buffers belong to the compiled module: Note [P2P buffers of a
    compiled module]."""

    @levels(1)
    def test_sites_of_the_module_no_alloc_id(self) -> None:
        lowered = lower(two_live_p2p_buffers, [((64, 32), BF16)] * 2)
        assert lowered.code is not None
        check_counts(
            lowered.code,
            {
                "from torch._inductor.runtime.p2p_buffers import P2PBuffers": 1,
                "p2p_buffers = P2PBuffers()": 1,
                "alloc_id": 0,
                PIN_P2P_ALLOC: 0,
            },
        )
        # the header declares the buffers before `call` uses site 0, then 1
        site = 'p2p_buffers.static({}, (64, 32), (32, 1), torch.bfloat16, {}, "0")'
        device = 'torch.device("cuda:0")'
        FileCheck().check("p2p_buffers = P2PBuffers()").check("def call(").check(
            site.format(0, device)
        ).check(site.format(1, device)).run(lowered.code)

    @levels(1)
    def test_no_p2p_buffers_without_comm_buffers(self) -> None:
        # A graph with no symm_mem op: its wrapper is the stock one.
        lowered = lower(lambda x: x * 2, [((64, 32), BF16)])
        assert lowered.code is not None
        check_counts(lowered.code, {"p2p_buffers": 0, "P2PBuffers": 0})

    @levels(0, 0)
    def test_pin_bakes_random_alloc_ids_into_the_code(self) -> None:
        lowered = lower(one_shot, [((64, 32), BF16)])
        assert lowered.code is not None
        FileCheck().check(PIN_P2P_ALLOC).check_same("alloc_id=").run(lowered.code)

    @levels(1)
    def test_graph_output_that_is_a_p2p_buffer_is_copied(self) -> None:
        for fn in (mm_returned_and_reduced, mm_view_returned_and_reduced):
            with self.subTest(fn=fn.__name__):
                lowered = lower(fn, [((64, 32), BF16), ((32, 32), BF16)])
                (p2p,) = comm_layout_names(lowered)
                assert lowered.code is not None
                # the op reads the P2P buffer, a copy of it is returned
                FileCheck().check(f"{p2p} = p2p_buffers.static(").check(
                    f"one_shot_all_reduce_out.default({p2p}, "
                ).check(f".run({p2p}, buf").check("return (").run(lowered.code)
                self.assertNotIn(p2p, returned_names(lowered.code))
                self.assertNotIn("in_out_ptr", lowered.code)

    @levels(0, 0)
    def test_pin_returns_the_p2p_buffer(self) -> None:
        lowered = lower(mm_returned_and_reduced, [((64, 32), BF16), ((32, 32), BF16)])
        (p2p,) = comm_layout_names(lowered)
        assert lowered.code is not None
        self.assertIn(p2p, returned_names(lowered.code))


def four_inputs(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor
) -> torch.Tensor:
    return a + b + c + d


def _recorder(calls: list[Any]) -> Any:
    "a stand-in for FallbackKernel.create that records the op's arguments"
    return lambda kernel, *args, **kwargs: calls.append(args)


class UnreachedLoweringsTest(unittest.TestCase):
    """The lowerings of symm_mem ops that torch.compile cannot reach (no
    Meta kernel at the pin) keep the pin's code. On 2.11.0 they hand the op
    its inputs as they are, and build no copy that nothing would read; on
    2.14.1 they hand it `_maybe_realize_symm_mem`'s copy of a graph input,
    as the base does."""

    def test_inputs_reach_the_op_as_they_are(self) -> None:
        from torch._inductor.lowering import lowerings

        lowered = lower(four_inputs, [((64, 32), BF16)] * 4, codegen=False)
        graph = lowered.graph
        x, out, s1, s2 = (graph.graph_inputs[n] for n in graph.graph_input_names)
        cases = {
            "one_shot_all_reduce_out": (x, "sum", GROUP, out),
            "two_shot_all_reduce_": (x, "sum", GROUP),
            "two_shot_all_reduce_out": (x, "sum", GROUP, out),
            "multimem_all_reduce_": (x, "sum", GROUP),
            "multimem_one_shot_all_reduce": (x, "sum", GROUP),
            "multimem_one_shot_all_reduce_out": (x, "sum", GROUP, out),
            "multimem_one_shot_reduce_out": (x, "sum", 0, GROUP, out),
            "multimem_all_gather_out": (x, GROUP, out),
            "reduce_scatter_out": (x, GROUP, False, out),
            "all_to_all_vdev": (x, out, s1, s2, GROUP),
            "all_to_all_vdev_2d": (x, out, s1, s2, GROUP),
            "all_to_all_vdev_2d_offset": (x, out, s1, s2, GROUP),
            "tile_reduce": (x, out, 0, GROUP),
            "multi_root_tile_reduce": ([x], out, [0], GROUP),
        }
        for name, args in cases.items():
            with self.subTest(op=name):
                lowering = lowerings[getattr(symm_mem, name).default]
                handed: list[Any] = []
                before = len(graph.buffers)
                with (
                    V.set_graph_handler(graph),
                    mock.patch.object(
                        ir.FallbackKernel,
                        "create",
                        _recorder(handed),
                    ),
                ):
                    lowering(*args)
                (call,) = handed
                if on_base("2.11.0"):
                    self.assertEqual(len(graph.buffers), before)
                    self.assertIs(call[0], args[0])
                    continue
                handed_x = call[0][0] if isinstance(call[0], list) else call[0]
                self.assertIsNot(handed_x, x)
                self.assertIsInstance(
                    handed_x.data.data.get_output_spec(), ir.CommBufferLayout
                )


def norm_all_reduce_scale(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    "the norm, all-reduce, scale-the-grad pattern: the graph mutates its input"
    n = (g * g).sum()
    y = symm_mem.one_shot_all_reduce(g, "sum", GROUP)
    g.mul_(0.5)
    return y, n


def _scheduled_at(lowered: Any, pred: Any) -> int:
    "the position in the schedule of the first node that `pred` accepts"
    for i, snode in enumerate(lowered.graph.scheduler.nodes):
        if any(pred(sub) for sub in snode.get_nodes()):
            return i
    raise AssertionError("no such node")


class InputMutationTest(unittest.TestCase):
    """A graph that mutates the input of a collective writes it back only
    after the collective read it: at no level may the write come first."""

    ONE_SHOT = (
        symm_mem.one_shot_all_reduce.default,
        symm_mem.one_shot_all_reduce_out.default,
    )

    def test_write_back_after_the_collective_reads_the_input(self) -> None:
        lowered = lower(norm_all_reduce_scale, [((64, 32), BF16)], functionalize=True)
        name = lowered.input_name(0)
        (collective,) = [
            b
            for b in lowered.buffers()
            if getattr(b, "op_overload", None) in self.ONE_SHOT
        ]
        read = lowered.graph.get_buffer(collective.inputs[0].get_name())
        write = _scheduled_at(
            lowered,
            lambda n: any(name in buf.get_mutations() for buf in n.get_outputs()),
        )
        if read.get_name() == name or isinstance(
            read, getattr(ir, "SymmMemGraphInput", ())
        ):
            # the collective reads the input itself (the pin, [1/5]) or a
            # node that may be the input at run time ([5/5]): the write comes
            # after it
            at = _scheduled_at(lowered, lambda n: n.node is collective)
            self.assertLess(at, write)
        else:
            # it reads a copy, which is made no later than the write (a fused
            # kernel reads each element before it writes it)
            at = _scheduled_at(lowered, lambda n: n.node is read)
            self.assertLessEqual(at, write)

    @levels(5)
    def test_passed_through_input_is_written_after_it_is_read(self) -> None:
        lowered = lower(norm_all_reduce_scale, [((64, 32), BF16)], functionalize=True)
        name = lowered.input_name(0)
        assert lowered.code is not None
        FileCheck().check(f"= p2p_buffers.graph_input(0, {name}, ").check(
            "torch.ops.symm_mem.one_shot_all_reduce_out.default("
        ).check(".run(").check_same(f", {name}, ").run(lowered.code)


class CppWrapperTest(unittest.TestCase):
    """The cpp wrapper (and AOTInductor) has no P2P buffers: inputs reach the
    op as they are, and no Python is written into the C++."""

    PYTHON = ("p2p_buffers", "P2PBuffers", "empty_strided_p2p", "# symm_mem")

    def _code(self, fn: Any, inputs: Any) -> str:
        lowered = lower(fn, inputs, cpp_wrapper=True)
        assert lowered.code is not None
        self.assertIn("inductor_entry_impl", lowered.code)
        self.assertEqual(comm_layout_names(lowered), [])
        return lowered.code

    @levels_by_base({"2.11.0": (0, None), "2.14.1": (1, None)})
    def test_graph_input_reaches_the_op_as_it_is(self) -> None:
        code = self._code(graph_input_one_shot, [((64, 32), BF16)])
        for text in self.PYTHON:
            self.assertNotIn(text, code)
        if on_base("2.11.0"):
            # through the proxy executor
            call = '"torch.ops.symm_mem.one_shot_all_reduce.default"'
        else:
            # 2.14.1 has a C shim for the out overload
            call = "aoti_torch_cuda_one_shot_all_reduce_out(buf0, x_1,"
        FileCheck().check(call).run(code)

    @levels(1)
    def test_no_python_in_the_cpp_wrapper(self) -> None:
        # An Inductor buffer (no Triton kernel: the CPU tier cannot make the
        # cpp wrapper's kernel launch code without compiling one)
        code = self._code(mm_one_shot, [((64, 128), BF16), ((128, 32), BF16)])
        for text in self.PYTHON:
            self.assertNotIn(text, code)

    @levels(0, 0)
    def test_pin_writes_python_into_the_cpp_wrapper(self) -> None:
        # An Inductor buffer realized as a comm buffer: the pin's free line
        # ends in a Python comment, in C++.
        lowered = lower(
            mm_one_shot, [((64, 128), BF16), ((128, 32), BF16)], cpp_wrapper=True
        )
        assert lowered.code is not None
        self.assertIn("# symm_mem buffer free", lowered.code)

    @bases("2.14.1")
    @levels(0, 0)
    def test_base_makes_a_p2p_buffer_for_a_graph_input(self) -> None:
        # 2.14.1 copies a graph input into a P2P buffer in the cpp wrapper
        # too, which has no C++ form of one (its allocation would be the
        # Python text above; the CPU tier cannot generate the copy's Triton
        # launch in C++, so this stops at lowering)
        lowered = lower(
            graph_input_one_shot, [((64, 32), BF16)], cpp_wrapper=True, codegen=False
        )
        self.assertEqual(len(comm_layout_names(lowered)), 1)


class P2PBuffersRuntimeTest(unittest.TestCase):
    """[1/5] `P2PBuffers`, with a CPU stand-in for the symmetric allocator
    (the GPU tier runs it on `empty_strided_p2p`)."""

    def setUp(self) -> None:
        from torch._inductor.runtime import p2p_buffers

        self.allocations: list[torch.Tensor] = []

        def allocate(
            size: tuple[int, ...],
            stride: tuple[int, ...],
            dtype: torch.dtype,
            device: torch.device,
            group_name: str,
        ) -> torch.Tensor:
            self.assertEqual((device, group_name), (CPU, GROUP))
            buf = torch.empty_strided(size, stride, dtype=dtype)
            self.allocations.append(buf)
            return buf

        patcher = mock.patch.object(p2p_buffers, "_allocate", allocate)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.buffers = p2p_buffers.P2PBuffers()

    @levels(1)
    def test_static_site_allocates_once(self) -> None:
        a = self.buffers.static(0, (4, 8), (8, 1), BF16, CPU, GROUP)
        b = self.buffers.static(0, (4, 8), (8, 1), BF16, CPU, GROUP)
        c = self.buffers.static(1, (4, 8), (8, 1), BF16, CPU, GROUP)
        self.assertIs(a, b)
        self.assertIsNot(a, c)
        self.assertEqual(len(self.allocations), 2)

    def _held(self) -> list[torch.Tensor]:
        sites = self.buffers._dynamic.values()
        return [t for site in sites for t in (site.current, *site.captured)]

    def _held_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self._held())

    def _dynamic(self, rows: int, cols: int = 64) -> torch.Tensor:
        return self.buffers.dynamic(0, (rows, cols), (cols, 1), BF16, CPU, GROUP)

    def _capturing(self, answer: bool) -> Any:
        from torch._inductor.runtime import p2p_buffers

        return mock.patch.object(p2p_buffers, "_capturing", lambda device: answer)

    @levels(1)
    def test_dynamic_site_holds_under_twice_the_largest_size(self) -> None:
        sizes = [(n, 96) for n in random.Random(0).sample(range(1, 5000), 100)]
        largest = 0
        for rows, cols in sizes:
            view = self._dynamic(rows, cols)
            self.assertEqual((view.shape, view.stride()), ((rows, cols), (cols, 1)))
            largest = max(largest, rows * cols * 2)
            self.assertLess(self._held_bytes(), 2 * largest)
            # nothing was captured: only the allocation in use is held
            self.assertEqual(len(self._held()), 1)
        # grows by powers of two: a few allocations, not one per size
        self.assertLessEqual(len(self.allocations), 14)

    @levels(1)
    def test_dynamic_site_keeps_what_a_capture_used(self) -> None:
        # The vLLM pattern on a default-mode module: the caller captures a
        # call at a small size with torch.cuda.graph, calls eagerly at a
        # larger size, then replays the capture. The allocation the capture
        # used must outlive the eager call that replaced it.
        with self._capturing(True):
            captured = self._dynamic(8)
        self._dynamic(4096)
        held = {t.untyped_storage().data_ptr() for t in self._held()}
        self.assertIn(captured.untyped_storage().data_ptr(), held)
        # an allocation no capture used is freed when replaced
        with self._capturing(False):
            eager = self._dynamic(8192)
            self._dynamic(65536)
        held = {t.untyped_storage().data_ptr() for t in self._held()}
        self.assertNotIn(eager.untyped_storage().data_ptr(), held)
        self.assertIn(captured.untyped_storage().data_ptr(), held)

    @levels(1)
    def test_dynamic_site_under_captures_holds_under_four_times(self) -> None:
        # a cudagraph tree records at every new size: every allocation a
        # recorded graph may replay is kept, within four times the largest
        largest = 0
        views = []
        with self._capturing(True):
            for rows in range(1, 3000, 37):
                views.append(self._dynamic(rows))
                largest = max(largest, rows * 64 * 2)
                self.assertLess(self._held_bytes(), 4 * largest)
        held = {t.untyped_storage().data_ptr() for t in self._held()}
        self.assertTrue({v.untyped_storage().data_ptr() for v in views} <= held)

    @levels(1)
    def test_dynamic_site_of_size_zero(self) -> None:
        view = self.buffers.dynamic(0, (0, 8), (8, 1), BF16, CPU, GROUP)
        self.assertEqual(view.shape, (0, 8))


class ScratchSymmBufferTest(unittest.TestCase):
    """[2/5] one_shot_all_reduce_copy's `symm_buffer` is scratch."""

    @levels(2)
    def test_symm_buffer_is_a_fresh_p2p_buffer(self) -> None:
        lowered = lower(
            cpu_models_graph_input_copy, [((64, 32), BF16), ((64, 32), BF16)]
        )
        (node,) = lowered.by_op(symm_mem.one_shot_all_reduce_copy_out.default)
        scratch, local_input = node.inputs
        self.assertIsInstance(scratch.get_output_spec(), ir.CommBufferLayout)
        # nothing is copied into it: it is written by the op alone
        self.assertFalse(lowered.reads(scratch))
        self.assertEqual(local_input.get_name(), lowered.input_name(1))
        assert lowered.code is not None
        check_counts(lowered.code, {TRITON_KERNEL: 0, P2P_STATIC: 1, ".copy_(": 0})
        FileCheck().check(f"{scratch.get_name()} = p2p_buffers.static(").check(
            f"one_shot_all_reduce_copy_out.default({scratch.get_name()}, "
            f"{lowered.input_name(1)}, 'sum', '0', out="
        ).run(lowered.code)

    @levels(0, 1)
    def test_pin_symm_buffer_is_the_callers_value(self) -> None:
        lowered = lower(one_shot_copy, [((64, 32), BF16), ((64, 32), BF16)])
        (node,) = lowered.by_op(
            symm_mem.one_shot_all_reduce_copy_out.default
            if LOWERS_TO_OUT
            else symm_mem.one_shot_all_reduce_copy.default
        )
        # x * 2 is computed into the P2P buffer, and the op overwrites it
        self.assertTrue(lowered.reads(node.inputs[0]))


if __name__ == "__main__":
    unittest.main()
