"""What every GPU-tier test class shares: the base class ``SymmMemTestCase``
(upstream's ``MultiProcContinuousTest`` on NCCL, one worker per visible CUDA
GPU, world size 1 included), the NCCL references, and the 8-layer
mm -> one_shot_all_reduce model.

A test class derives from ``SymmMemTestCase`` and each test begins with
``self._init_process()``, as in upstream's test/distributed/test_symmetric_memory.py:

    @instantiate_parametrized_tests
    class LoweringTest(SymmMemTestCase):
        def test_x(self) -> None:
            self._init_process()
            ...

``python -m pytest FILE`` (or ``python FILE``) launches it; no torchrun.  The
parent process spawns the workers on the class's first test, sends every test
to every worker and reports the workers' results.  Workers run the test
function only (no setUp/tearDown there), hence ``_init_process``.  A test that
needs two ranks says so with ``@skip_if_lt_x_gpu(2)`` (and
``@requires_cuda_p2p_access()``); everything else runs at world size 1, where
``one_shot_all_reduce`` and NCCL's all_reduce are the identity.

After a test fails, ``MultiProcContinuousTest`` reports every later test of its
class as skipped ("Previous test failed, skipping ..."); scripts/gpu_tier.sh
counts those as failures.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.testing._internal.common_distributed import MultiProcContinuousTest


# Multicast must stay off on shared machines; the multimem ops are covered by
# the CPU tier only.  Set at import, before any worker is spawned (workers
# inherit the environment).
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
for _var, _value in MULTICAST_OFF.items():
    os.environ.setdefault(_var, _value)

# The reason pytest reports for a test skipped because an earlier test of its
# class failed (MultiProcContinuousTest.setUp); gpu_tier.sh matches it.
POISON_PILL_REASON = "Previous test failed, skipping"


class SymmMemTestCase(MultiProcContinuousTest):
    """One worker per visible CUDA GPU (``world_size`` is left at its default:
    ``torch.cuda.device_count()``), NCCL process group.  Without a CUDA GPU
    every test skips ("No cuda devices available")."""

    # The process group's timeout (upstream's default is 120 s): a rank may
    # wait at a barrier while its peer compiles.
    timeout = timedelta(seconds=300)

    @classmethod
    def backend_str(cls) -> str:
        return "nccl"

    @classmethod
    def device_type(cls) -> str:
        # not the current accelerator: on a machine without a GPU that is the
        # CPU, whose device_count() is 1
        return "cuda"

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.rank)

    def _init_process(self) -> None:
        """Begin a test on this worker: its GPU, every rank done with the
        previous test's GPU work, a fresh dynamo."""
        torch.cuda.set_device(self.device)
        torch.cuda.synchronize()
        dist.barrier(device_ids=[self.rank])
        torch._dynamo.reset()


def group_name() -> str:
    return dist.group.WORLD.group_name


def nccl_all_reduce(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def eight_layers(gname: str) -> Callable[..., torch.Tensor]:
    def model(x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
        for w in ws:
            x = torch.ops.symm_mem.one_shot_all_reduce(x @ w, "sum", gname)
        return x

    return model


def eight_layers_reference(x: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    for w in ws:
        x = nccl_all_reduce(x @ w)
    return x


def rank_values(shape: tuple[int, ...], it: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the two-rank tests: this rank's input, ``(rank + 1) * (it + 1)``
    everywhere, and the sum over every rank's input, computed without any
    collective.  A result that misses a peer's contribution, or holds a
    peer's value of an earlier call, differs from the sum."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.full(shape, float((rank + 1) * (it + 1)), device="cuda")
    total = torch.full(shape, float(world * (world + 1) // 2 * (it + 1)), device="cuda")
    return x, total


@torch.library.custom_op("symm_stack_gpu::scale", mutates_args=())
def scale(x: torch.Tensor) -> torch.Tensor:
    """3 * x, with no out variant: Inductor does not control its output
    allocation (a FallbackKernel)."""
    return x * 3


@scale.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def loaded_modules() -> int:
    "How many compiled modules this process has loaded so far"
    from torch._inductor.codecache import PyCodeCache

    return len(PyCodeCache.modules)


def module_p2p_buffers(since: int = 0) -> list[torch.Tensor]:
    """Every P2P buffer held by the compiled modules loaded in this process
    (after the first ``since``; Note [P2P buffers of a compiled module]);
    none before patch 1/5."""
    from torch._inductor.codecache import PyCodeCache

    held: list[torch.Tensor] = []
    for mod in PyCodeCache.modules[since:]:
        buffers = getattr(mod, "p2p_buffers", None)
        if buffers is None:
            continue
        held.extend(buffers._static.values())
        for site in buffers._dynamic.values():
            held.extend(t for t in (site.current, *site.captured) if t is not None)
    return held


def poison_p2p_buffers() -> None:
    """Fill every P2P buffer of the loaded compiled modules with NaN on this
    rank. The ranks sync before and after, so no peer still reads a buffer
    and every buffer is poisoned before any rank calls a graph again."""
    held = module_p2p_buffers()
    assert held, "no P2P buffer in any compiled module"
    torch.cuda.synchronize()
    dist.barrier()
    for buf in held:
        buf.fill_(float("nan"))
    torch.cuda.synchronize()
    dist.barrier()


def tree_nodes() -> list[Any]:
    "Every node of the current device's CUDA graph tree"
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_container(torch.cuda.current_device()).tree_manager
    assert manager is not None
    nodes = []
    pending = [n for roots in manager.roots.values() for n in roots]
    while pending:
        node = pending.pop()
        nodes.append(node)
        pending.extend(n for kids in node.children.values() for n in kids)
    return nodes
