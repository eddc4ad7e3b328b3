"""CUDA graph trees with P2P (symmetric memory) buffers, GPU tier: one rank
per visible CUDA GPU, world size 1 included (``MultiProcContinuousTest``; no
torchrun):

    python -m pytest -v test/distributed/test_symm_mem_cudagraphs.py

Every rank runs the same tests in the same order with fixed iteration counts;
every result is compared with an eager reference that uses NCCL all_reduce
(the identity at world size 1).  Only the tests that need two ranks skip below
2 GPUs.  The CPU tier of the same patch is test_symm_mem_cudagraphs_cpu.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch._inductor import cudagraph_trees
from torch.testing._internal.common_distributed import skip_if_lt_x_gpu
from torch.testing._internal.common_utils import (
    instantiate_parametrized_tests,
    parametrize,
    requires_cuda_p2p_access,
    run_tests,
)


sys.path.insert(0, str(Path(__file__).parent))

import gpu_tier  # noqa: E402
from gpu_tier import (  # noqa: E402
    SymmMemTestCase,
    eight_layers,
    eight_layers_reference,
    group_name,
    nccl_all_reduce,
    rank_values,
    rel_err,
    tree_nodes,
)
from stack_level import holds, levels  # noqa: E402


REPLAYS = 100
Fn = Callable[..., torch.Tensor]


def graph_input_one_shot(gname: str) -> Callable[..., torch.Tensor]:
    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.symm_mem.one_shot_all_reduce(x, "sum", gname)

    return model


class CudaArray:
    "Memory handed over by __cuda_array_interface__, as CuPy or Numba do"

    def __init__(self, t: torch.Tensor) -> None:
        self.owner = t
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape),
            "typestr": "<f4",
            "data": (t.data_ptr(), False),
            "version": 3,
            "strides": None,
        }


@instantiate_parametrized_tests
class CudagraphTreeTest(SymmMemTestCase):
    def _init_process(self) -> None:
        super()._init_process()
        cudagraph_trees.reset_cudagraph_trees()
        counters.clear()

    def _gen(self, seed: int) -> torch.Generator:
        return torch.Generator(device="cuda").manual_seed(seed + 17 * dist.get_rank())

    def _next_input(
        self, x: torch.Tensor, gen: torch.Generator, it: int
    ) -> torch.Tensor:
        """New values for call ``it``: on odd calls a fresh tensor, on even
        calls written into ``x`` itself (the address CUDA graphs recorded)."""
        new = torch.randn(x.shape, device="cuda", generator=gen) + it
        if it % 2:
            return new
        x.copy_(new)
        return x

    def _eight_layers(self) -> None:
        compiled = torch.compile(
            eight_layers(group_name()), mode="reduce-overhead", fullgraph=True
        )
        gen = self._gen(1)
        x = torch.randn(128, 1024, device="cuda", dtype=torch.bfloat16, generator=gen)
        ws = [
            torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16, generator=gen)
            / 32
            for _ in range(8)
        ]
        for it in range(REPLAYS):
            new = torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=gen)
            if it % 2:
                x = new  # a fresh tensor
            else:
                x.copy_(new)  # new values in the same tensor
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(x, ws)
            ref = eight_layers_reference(x, ws)
            self.assertTrue(torch.isfinite(out).all(), it)
            self.assertLess(rel_err(out, ref), 2e-2, it)

    @levels(3)
    def test_eight_layers_reduce_overhead(self) -> None:
        self._init_process()
        with torch._inductor.config.patch({"triton.slow_path_cudagraph_asserts": True}):
            self._eight_layers()
        self.assertGreaterEqual(len(tree_nodes()), 1)

    @levels(3)
    def test_graph_input_one_shot_reduce_overhead(self) -> None:
        self._init_process()
        compiled = torch.compile(
            graph_input_one_shot(group_name()), mode="reduce-overhead", fullgraph=True
        )
        gen = self._gen(2)
        x = torch.randn(256, 512, device="cuda", generator=gen)
        with torch._inductor.config.patch({"triton.slow_path_cudagraph_asserts": True}):
            for it in range(REPLAYS):
                x = self._next_input(x, gen, it)
                torch.compiler.cudagraph_mark_step_begin()
                out = compiled(x)
                torch.testing.assert_close(out, nccl_all_reduce(x))
        self.assertEqual(counters["inductor"]["cudagraph_skips"], 0)
        self.assertGreaterEqual(len(tree_nodes()), 1)

    @levels(3)
    @parametrize("model", ["mm_output", "graph_input"])
    def test_dynamic_shapes_reduce_overhead(self, model: str) -> None:
        self._init_process()
        # Symbolic-size P2P buffers inside the CUDA graph: one written by the
        # mm (Inductor allocates it), one the identity copy of a graph input.
        # Each is a growing site of the module's P2P buffers that keeps what it
        # replaced while a graph recorded over it may replay (patch 1); a
        # fresh allocation per call was freed during capture and aborted.
        gname = group_name()
        one_shot = torch.ops.symm_mem.one_shot_all_reduce
        models: dict[str, tuple[Fn, Fn]] = {
            "mm_output": (
                lambda x, w: one_shot(torch.relu(x @ w), "sum", gname),
                lambda x, w: nccl_all_reduce(torch.relu(x @ w)),
            ),
            "graph_input": (
                lambda x, w: one_shot(x, "sum", gname) @ w,
                lambda x, w: nccl_all_reduce(x) @ w,
            ),
        }
        fn, ref = models[model]
        sizes = [96, 160, 33]
        compiled = torch.compile(
            fn, mode="reduce-overhead", fullgraph=True, dynamic=True
        )
        gen = self._gen(20 + list(models).index(model))
        w = torch.randn(64, 64, device="cuda", generator=gen) / 8
        for it in range(10 * len(sizes)):  # each size: warm-up, record, replays
            n = sizes[it % len(sizes)]
            x = torch.randn(n, 64, device="cuda", generator=gen) + it
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(x, w).clone()
            torch.testing.assert_close(
                out, ref(x, w), rtol=1e-3, atol=1e-3, msg=f"call {it}"
            )
        self.assertEqual(counters["inductor"]["cudagraph_skips"], 0)
        self.assertGreaterEqual(len(tree_nodes()), len(sizes))

    @levels(3)
    @parametrize("model", ["one_shot_copy", "custom_op_output", "pointwise_producer"])
    def test_graph_input_models_reduce_overhead(self, model: str) -> None:
        self._init_process()
        # patch 2's models whose symm_mem input Inductor does not allocate
        gname = group_name()
        one_shot = torch.ops.symm_mem.one_shot_all_reduce
        models: dict[str, tuple[Fn, Fn]] = {
            "one_shot_copy": (
                lambda x, y: torch.ops.symm_mem.one_shot_all_reduce_copy(
                    x, y, "sum", gname
                ),
                lambda x, y: nccl_all_reduce(y),
            ),
            "custom_op_output": (
                lambda x, y: one_shot(gpu_tier.scale(x), "sum", gname) + y,
                lambda x, y: nccl_all_reduce(x * 3) + y,
            ),
            "pointwise_producer": (
                lambda x, y: one_shot(x + y, "sum", gname),
                lambda x, y: nccl_all_reduce(x + y),
            ),
        }
        fn, ref = models[model]
        compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
        gen = self._gen(10 + list(models).index(model))
        x = torch.randn(128, 256, device="cuda", generator=gen)
        y = torch.randn(128, 256, device="cuda", generator=gen)
        with torch._inductor.config.patch({"triton.slow_path_cudagraph_asserts": True}):
            for it in range(REPLAYS):
                x = self._next_input(x, gen, it)
                y = torch.randn(y.shape, device="cuda", generator=gen)
                torch.compiler.cudagraph_mark_step_begin()
                out = compiled(x, y).clone()
                torch.testing.assert_close(out, ref(x, y), msg=f"call {it}")
        # it ran as a CUDA graph, not eagerly after a skip
        self.assertEqual(counters["inductor"]["cudagraph_skips"], 0)
        self.assertGreaterEqual(len(tree_nodes()), 1)

    @levels(3)
    @skip_if_lt_x_gpu(2)
    @requires_cuda_p2p_access()
    def test_replays_every_peer_contributes(self) -> None:
        """Needs 2 ranks: at world size 1 the all-reduce is the identity, so a
        replay that reads a peer's P2P buffer before that peer wrote this
        call's values (or not at all) looks right."""
        self._init_process()
        self.assertGreaterEqual(dist.get_world_size(), 2)
        compiled = torch.compile(
            graph_input_one_shot(group_name()), mode="reduce-overhead", fullgraph=True
        )
        x, _ = rank_values((256, 512), 0)
        for it in range(REPLAYS):
            new, total = rank_values(x.shape, it)
            if it % 2:
                x = new  # a fresh tensor
            else:
                x.copy_(new)  # new values at the address the graph recorded
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(x).clone()
            torch.testing.assert_close(out, total, msg=f"call {it}")
        self.assertEqual(counters["inductor"]["cudagraph_skips"], 0)
        self.assertGreaterEqual(len(tree_nodes()), 1)

    @levels(3)
    def test_symmetric_graph_input_is_an_input_like_any_other(self) -> None:
        """No storage is probed (Note [P2P buffers under CUDA graph trees]):
        a user's symmetric tensor is a graph input like any other. Only
        Inductor's own P2P buffers are static partition inputs."""
        self._init_process()
        gname = group_name()

        def fn(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.ops.symm_mem.one_shot_all_reduce(p, "sum", gname) + y

        symm = torch._C._distributed_c10d._SymmetricMemory
        p = symm.empty_strided_p2p(
            (256, 512), (512, 1), torch.float32, torch.device("cuda"), gname
        )
        compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
        gen = self._gen(3)
        with torch._inductor.config.patch({"triton.slow_path_cudagraph_asserts": True}):
            for it in range(REPLAYS):
                p.copy_(torch.randn(p.shape, device="cuda", generator=gen))
                y = torch.randn(p.shape, device="cuda", generator=gen) + it
                torch.compiler.cudagraph_mark_step_begin()
                out = compiled(p, y)
                torch.testing.assert_close(out, nccl_all_reduce(p) + y)
        (node,) = tree_nodes()  # never re-recorded
        if holds(3, 4):
            # The partition reads p (patch 2's identity copy runs inside it):
            # the tree copies p into the pool like y.
            self.assertEqual(
                counters["inductor"]["cudagraph_recorded_non_static_inputs"], 2
            )
        else:
            # [5/5] p, a direct `empty_strided_p2p` allocation, is staged by
            # copy_ in `call` on 2.11.0 (whose check tracks `empty()` and
            # the pools only) and passed through on 2.14.1
            # (`is_symm_mem_tensor`); either way the partition takes a
            # static input and only y is copied.
            self.assertEqual(
                counters["inductor"]["cudagraph_recorded_non_static_inputs"], 1
            )
            self.assertEqual(len(node.static_input_idxs), 1)

    @levels(0)
    @parametrize("source", ["dlpack", "cuda_array_interface"])
    def test_external_inputs_are_copied_not_rerecorded(self, source: str) -> None:
        """A reduce-overhead function with no symm_mem op, called with memory
        the caching allocator did not hand out (a new tensor every call): as
        at stock, the input is copied into the graph's static input and the
        graph is recorded once."""
        self._init_process()
        compiled = torch.compile(
            lambda x: x * 2 + 1, mode="reduce-overhead", fullgraph=True
        )
        owners = [torch.randn(256, 512, device="cuda") for _ in range(20)]

        def external(t: torch.Tensor) -> torch.Tensor:
            if source == "dlpack":
                return torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(t))
            # what CuPy or Numba arrays hand over: torch wraps the pointer
            # (at::from_blob) with a deleter of its own
            return torch.as_tensor(CudaArray(t), device="cuda")

        for it, owner in enumerate(owners):
            x = external(owner)
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(x)
            torch.testing.assert_close(out, owner * 2 + 1, msg=f"call {it}")
        self.assertEqual(len(tree_nodes()), 1)
        self.assertEqual(
            counters["inductor"]["cudagraph_recorded_non_static_inputs"], 1
        )
        self.assertEqual(counters["inductor"]["cudagraph_skips"], 0)

    @levels(0, 2)
    def test_pin_warmup_rendezvous_left_in_pool(self) -> None:
        self._init_process()
        # On the stock pin (level 0), a compile earlier in the same process can
        # make this fail first on the alloc-id collision that patch 1 fixes.
        expected = "not tracked as outputs" + ("|same alloc_id" if not holds(1) else "")
        with (
            torch._inductor.config.patch({"triton.slow_path_cudagraph_asserts": True}),
            self.assertRaisesRegex(RuntimeError, expected),
        ):
            self._eight_layers()


if __name__ == "__main__":
    run_tests()
