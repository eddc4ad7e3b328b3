"""The functions the CPU tier lowers, shared by its modules.

Each is traced on fake CUDA tensors by ``inductor_harness.lower`` with the
group name ``GROUP``; none of them runs.  ``scale`` is a custom op without an
out variant (Inductor lowers it to a FallbackKernel and does not control its
output allocation), registered once however many modules import this one.
"""

from __future__ import annotations

import torch
from inductor_harness import GROUP


symm_mem = torch.ops.symm_mem
BF16 = torch.bfloat16


@torch.library.custom_op("symm_stack_test::scale", mutates_args=())
def scale(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@scale.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def eight_layer_model(x: torch.Tensor, *ws: torch.Tensor) -> torch.Tensor:
    for w in ws:
        x = symm_mem.one_shot_all_reduce(x @ w, "sum", GROUP)
    return x


def one_shot(x: torch.Tensor) -> torch.Tensor:
    "the all-reduce's input is an Inductor buffer (x * 2)"
    return symm_mem.one_shot_all_reduce(x * 2, "sum", GROUP)


def mm_one_shot(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return symm_mem.one_shot_all_reduce(x @ w, "sum", GROUP)


def custom_op_output(x: torch.Tensor) -> torch.Tensor:
    return symm_mem.one_shot_all_reduce(scale(x), "sum", GROUP)


def graph_input_one_shot(x: torch.Tensor) -> torch.Tensor:
    return symm_mem.one_shot_all_reduce(x, "sum", GROUP)


def graph_input_copy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return symm_mem.one_shot_all_reduce_copy(x, y, "sum", GROUP)


# A graph input fed straight to a symm_mem op that has an out overload:
# (function, input shapes and dtypes, the out overload it is lowered to).
GRAPH_INPUT_CASES = [
    (
        graph_input_one_shot,
        [((64, 32), BF16)],
        symm_mem.one_shot_all_reduce_out.default,
    ),
]
# (one_shot_all_reduce_copy's `symm_buffer` is scratch from patch 2/5 on:
# nothing of the graph input is copied into P2P memory, see the scratch tests.)
