"""A CUDA-graph-unsafe custom op with an out variant, lowered to ExternKernelOut.

Shared by both tiers of the graph-partition tests
(test_symm_mem_partition.py, test_symm_mem_partition_cpu.py); importing the
module twice in one process defines the ops once.

``symm_stack_part::unsafe_scale(x)`` returns ``3 * x`` and is tagged
``cudagraph_unsafe``, so with ``graph_partition`` Inductor runs it between
CUDA-graph partitions.  Its Inductor lowering goes through the out overload
``unsafe_scale.out(x, *, out)`` as an ``ir.ExternKernelOut``: Inductor
allocates the result buffer, which is what patch 4/5 hoists into the
preceding CUDA-graph partition.  The eager out kernel records the address of
every ``out`` it writes (``OUT_PTRS``), so a test can tell whether that
buffer stays put across replays.
"""

from __future__ import annotations

import re

import torch
from torch._inductor import ir
from torch._inductor.lowering import register_lowering


NAMESPACE = "symm_stack_part"
SCALE = 3.0

# data_ptr() of every `out` the eager out kernel wrote, in call order
OUT_PTRS: list[int] = []

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define("unsafe_scale(Tensor x) -> Tensor", tags=(torch._C.Tag.cudagraph_unsafe,))
_lib.define(
    "unsafe_scale.out(Tensor x, *, Tensor(a!) out) -> Tensor(a!)",
    tags=(torch._C.Tag.cudagraph_unsafe,),
)


def _unsafe_scale(x: torch.Tensor) -> torch.Tensor:
    return x * SCALE


def _unsafe_scale_out(x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    OUT_PTRS.append(out.data_ptr())
    torch.mul(x, SCALE, out=out)
    return out


def _unsafe_scale_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _unsafe_scale_out_fake(x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    return out


for _key in ("CPU", "CUDA"):
    _lib.impl("unsafe_scale", _unsafe_scale, _key)
    _lib.impl("unsafe_scale.out", _unsafe_scale_out, _key)
torch.library.register_fake(f"{NAMESPACE}::unsafe_scale", _unsafe_scale_fake, lib=_lib)
torch.library.register_fake(
    f"{NAMESPACE}::unsafe_scale.out", _unsafe_scale_out_fake, lib=_lib
)

unsafe_scale = torch.ops.symm_stack_part.unsafe_scale.default
unsafe_scale_out = torch.ops.symm_stack_part.unsafe_scale.out


@register_lowering(unsafe_scale)
def _lower_unsafe_scale(x: ir.TensorBox) -> ir.TensorBox:
    """Lower through the out overload, so Inductor allocates the result.

    The ExternKernelOut records the functional FX node (``fx_node``), whose
    ``cudagraph_unsafe`` tag makes the partitioner run it outside CUDA graphs.
    """
    x = ir.ExternKernel.realize_input(x)
    layout = ir.FixedLayout(
        device=x.get_device_or_error(), dtype=x.get_dtype(), size=x.get_size()
    )
    return ir.TensorBox.create(
        ir.ExternKernelOut(layout=layout, inputs=[x], op_overload=unsafe_scale_out)
    )


# -------- reading the generated code (both tiers)


def functions(code: str) -> dict[str, str]:
    """The bodies of the partition functions and of ``call``, by name."""
    found = {}
    pattern = r"^( *)def (partition_\d+|call)\((?:self, )?args\):\n"
    for m in re.finditer(pattern, code, re.M):
        indent = len(m.group(1))
        body = []
        for line in code[m.end() :].splitlines():
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                break
            body.append(line)
        found[m.group(2)] = "\n".join(body)
    return found


def allocates(body: str, name: str) -> bool:
    pattern = (
        rf"^\s*{name} = (empty_strided_(cuda|p2p)|p2p_buffers\.(static|dynamic))\("
    )
    return re.search(pattern, body, re.M) is not None


def returned(body: str) -> list[str]:
    (ret,) = re.findall(r"^\s*return \((.*)\)\s*$", body, re.M)
    return [n.strip() for n in ret.split(",") if n.strip()]


def partition_args(body: str) -> list[str]:
    (line,) = re.findall(r"^\s*(.*) = args$", body, re.M)
    return [n.strip() for n in line.split(",") if n.strip()]


def unsafe_outs(call: str) -> list[str]:
    """Buffers the unsafe op writes, in call order."""
    return re.findall(rf"{NAMESPACE}\.unsafe_scale\.out\(.*, out=(buf\d+)\)", call)


def unsafe_out(call: str) -> str:
    """The one buffer the unsafe op writes."""
    (name,) = unsafe_outs(call)
    return name


def check_hoisted(code: str, buf: str, index: int) -> None:
    """FileCheck the generated code: ``partition_{index}`` allocates ``buf``
    and returns it; ``call`` never allocates it, receives it from that
    partition, and only then runs the region that writes it (``out=buf``)."""
    from torch.testing import FileCheck

    alloc = f"{buf} = empty_strided_"
    call = "def call(self, args):"
    FileCheck().check(f"def partition_{index}(args):").check(alloc).check_not(
        "def "  # still inside partition_{index}
    ).check_regex(rf"return \(.*\b{buf}\b").run(code)
    # (check_not after check_regex would search from the wrong place: keep the
    # regex in a chain of its own)
    FileCheck().check(call).check_not(alloc).check(
        f"= self.partitions[{index}]("
    ).check_not(alloc).check(f"out={buf})").run(code)
    FileCheck().check(call).check_regex(
        rf"\(.*\b{buf}\b.*\) = self\.partitions\[{index}\]"
    ).run(code)
