"""Run Inductor's lowering and wrapper codegen on a machine without a GPU.

The CPU tier of LoweringTest traces a function with ``make_fx`` under a
``FakeTensorMode`` whose tensors claim to live on ``cuda``, lowers the FX graph
with ``GraphLowering`` and, optionally, generates the Python wrapper code.  No
CUDA driver is touched: the few device queries that lowering and Triton
codegen make are answered by a fake H100 (``fake_cuda_device``).  Nothing is
compiled or run, so the generated code and the IR are what the tests assert on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import sympy
import torch
import torch.distributed._symmetric_memory  # noqa: F401  (registers symm_mem meta kernels)
from torch._dynamo.source import ConstantSource
from torch._inductor import ir
from torch._inductor.debug import DebugContext
from torch._inductor.graph import GraphLowering
from torch._inductor.virtualized import V
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv


GROUP = "0"  # group name baked into the traced graphs; lowering never resolves it


_H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3 (fake)",
    major=9,
    minor=0,
    multi_processor_count=132,
    total_memory=80 * 2**30,
    max_threads_per_multi_processor=2048,
    max_threads_per_block=1024,
    warp_size=32,
    regs_per_multiprocessor=65536,
    shared_memory_per_block_optin=232448,
    shared_memory_per_multiprocessor=233472,
    L2_cache_size=50 * 2**20,
    gcnArchName="",
)


@contextlib.contextmanager
def fake_cuda_device() -> Iterator[None]:
    """Answer the device queries of lowering and Triton codegen with an H100."""
    from triton.backends.compiler import GPUTarget

    iface = "torch._dynamo.device_interface.CudaInterface"
    patches = [
        mock.patch("torch.cuda.get_device_properties", lambda *a, **k: _H100),
        mock.patch("torch.cuda.get_device_capability", lambda *a, **k: (9, 0)),
        mock.patch("torch.cuda.is_available", lambda: True),
        mock.patch("torch.cuda.current_device", lambda: 0),
        mock.patch("torch.cuda.device_count", lambda: 2),
        mock.patch(f"{iface}.get_device_properties", lambda *a, **k: _H100),
        mock.patch(f"{iface}.get_compute_capability", lambda *a, **k: 90),
        mock.patch(f"{iface}.is_available", lambda *a, **k: True),
        mock.patch(f"{iface}.current_device", lambda *a, **k: 0),
        mock.patch(
            "torch.utils._triton.triton_backend", lambda: GPUTarget("cuda", 90, 32)
        ),
        mock.patch("torch.utils._triton.triton_hash_with_backend", lambda: "0" * 64),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


@dataclasses.dataclass
class Lowered:
    graph: GraphLowering
    code: str | None

    def buffers(self) -> list[ir.Buffer]:
        return list(self.graph.buffers)

    def ops(self, cls: type | tuple[type, ...] = ir.ExternKernel) -> list[Any]:
        return [b for b in self.graph.buffers if isinstance(b, cls)]

    def by_op(self, op: torch._ops.OpOverload) -> list[ir.ExternKernel]:
        """The ExternKernels lowered with op overload ``op``."""
        return [b for b in self.graph.buffers if getattr(b, "op_overload", None) is op]

    def reads(self, buf: ir.Buffer) -> set[str]:
        """Names of the buffers ``buf`` reads."""
        with V.set_graph_handler(self.graph):
            return {dep.name for dep in buf.get_read_writes().reads}

    def input_name(self, i: int) -> str:
        return self.graph.graph_input_names[i]

    def layout_of(self, name: str) -> ir.OutputSpec:
        return self.graph.get_buffer(name).get_output_spec()


class _LoadProbe:
    """An ops handler for `is_identity_copy_of`: a load evaluates to
    "load:NAME", any other op to "op:OP"."""

    def load(self, name: str, index: object) -> str:
        return f"load:{name}"

    def __getattr__(self, op: str) -> Callable[..., str]:
        return lambda *args, **kwargs: f"op:{op}"


def is_identity_copy_of(lowered: Lowered, buf: ir.Buffer, name: str) -> bool:
    """Whether ``buf`` is a Pointwise whose value is the load of ``name``
    itself: an identity copy, not a computation such as mul, add or relu.
    Its inner function is evaluated with ops that record what they are."""
    data = getattr(buf, "data", None)
    if not isinstance(data, ir.Pointwise):
        return False
    index = [sympy.Symbol(f"i{d}") for d in range(len(data.ranges))]
    with V.set_graph_handler(lowered.graph), V.set_ops_handler(_LoadProbe()):
        value = data.inner_fn(index)
    # the ops wrapper boxes what the handler returns
    return getattr(value, "value", value) == f"load:{name}"


def comm_layout_names(lowered: Lowered) -> list[str]:
    return [
        b.get_name()
        for b in lowered.graph.buffers
        if isinstance(b.get_output_spec(), ir.CommBufferLayout)
    ]


def lower(
    fn: Callable[..., Any],
    inputs: Sequence[tuple[Any, ...]],
    *,
    codegen: bool = True,
    dynamic: bool = False,
    functionalize: bool = False,
    cpp_wrapper: bool = False,
) -> Lowered:
    """Trace ``fn`` on fake CUDA tensors of the given shapes and lower it.

    Each input is ``(shape, dtype)``, or ``(shape, dtype, stride)`` for a
    static input of the given strides.
    With ``dynamic=True`` every dimension of every input is symbolic; with
    ``functionalize=True`` the graph is functionalized as torch.compile does;
    with ``cpp_wrapper=True`` the wrapper is the C++ one (as under
    ``config.cpp_wrapper`` or AOTInductor).
    """
    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    # Tensors are made before the device is faked: FakeTensor initialises a
    # real CUDA context when torch.cuda.is_available() says yes.
    with mode:
        args = []
        for i, (shape, dtype, *stride) in enumerate(inputs):
            if stride:
                (strides,) = stride
                args.append(
                    torch.empty_strided(shape, strides, dtype=dtype, device="cuda")
                )
                continue
            if dynamic:
                shape = [
                    shape_env.create_unspecified_symint_and_symbol(
                        n, ConstantSource(f"in{i}_dim{d}"), DimDynamic.DYNAMIC
                    )
                    for d, n in enumerate(shape)
                ]
            args.append(torch.empty(shape, dtype=dtype, device="cuda"))
        if functionalize:
            # what torch.compile traces: mutations become functional ops
            fn = torch.func.functionalize(fn, remove="mutations")
        gm = make_fx(fn)(*args)
    with fake_cuda_device():
        graph = GraphLowering(
            gm, example_inputs=args, shape_env=shape_env, cpp_wrapper=cpp_wrapper
        )
        with DebugContext(), V.set_graph_handler(graph), V.set_fake_mode(mode):
            graph.run(*args)
            code = None
            if codegen:
                out = graph.codegen()
                code = out[0].value if isinstance(out, tuple) else out
    return Lowered(graph=graph, code=code)
