"""What every GPU-tier test module shares: process-group set-up under
torchrun (2 processes, 2 GPUs, multicast off), the NCCL references, and the
8-layer mm -> one_shot_all_reduce model.

A test module uses it as

    def setUpModule() -> None:
        gpu_tier.set_up()

    def tearDownModule() -> None:
        gpu_tier.tear_down()

The process group is created once per process and destroyed when the process
exits, so one pytest run can take several modules: tearing it down and creating
it again between modules hung NCCL's start-up on the 2-GPU machine.
"""

from __future__ import annotations

import atexit
import os
import unittest
from collections.abc import Callable

import torch
import torch.distributed as dist


WORLD = int(os.environ.get("WORLD_SIZE", "1"))
HAVE_GPU = torch.cuda.is_available()
HAVE_GPUS = HAVE_GPU and torch.cuda.device_count() >= 2
DISTRIBUTED = WORLD >= 2 and HAVE_GPUS
REASON = (
    f"needs torchrun with 2 processes on 2 CUDA GPUs "
    f"(WORLD_SIZE={WORLD}, GPUs={torch.cuda.device_count() if HAVE_GPU else 0})"
)

# Multicast must stay off on shared machines; the multimem ops are covered by
# the CPU tier only.
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def set_up(need_distributed: bool = True) -> None:
    """Skip the module without the GPUs it needs; else join the process group.

    With ``need_distributed=False`` one GPU is enough, and the process group is
    joined only under torchrun with 2 GPUs.
    """
    if need_distributed and not DISTRIBUTED:
        raise unittest.SkipTest(REASON)
    if not HAVE_GPU:
        raise unittest.SkipTest("needs a CUDA GPU")
    for var, value in MULTICAST_OFF.items():
        os.environ.setdefault(var, value)
    if not DISTRIBUTED:
        return
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl", device_id=torch.device("cuda", torch.cuda.current_device())
        )
        atexit.register(_destroy)


def tear_down() -> None:
    "End a module: every rank finishes its tests before the next module starts"
    if dist.is_initialized():
        dist.barrier()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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


class DistributedCase(unittest.TestCase):
    """Every rank starts each test from a fresh dynamo and finishes it before
    any rank starts the next."""

    def setUp(self) -> None:
        torch._dynamo.reset()
        dist.barrier()

    def tearDown(self) -> None:
        torch.cuda.synchronize()
        dist.barrier()


@torch.library.custom_op("symm_stack_gpu::scale", mutates_args=())
def scale(x: torch.Tensor) -> torch.Tensor:
    """3 * x, with no out variant: Inductor does not control its output
    allocation (a FallbackKernel)."""
    return x * 3


@scale.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)
