"""[5/5] Graph-input sites on ranks whose allocators diverge, CPU tier.

A compiled module's static graph input of a symm_mem op goes through
`P2PBuffers.graph_input` (Note [Symmetric graph inputs]): the input itself
when it is symmetric memory, else the site's staging buffer. Whatever a site
does must be the same sequence of collectives on every rank, whatever each
rank's allocator does between calls: a collective that one rank runs and its
peer does not pairs with the user's next collective.

Here gloo ranks (2 and 4 of them, spawned as in test_symm_mem_allocator_cpu.py)
drive the run-time logic of a module with two sites, exactly as the wrapper
code calls it, through 1000 calls. Which inputs are symmetric is the same on
every rank (SPMD); their addresses are not, as each rank makes and drops
tensors of its own between calls. After every call a user `all_reduce` must
sum to the world size. Only the symmetric allocator is stood in for (CPU
tensors, no GPU): what the symmetric-memory check (SYMM_CHECK) says,
`p2p_buffers._allocate` and `_SymmetricMemory.rendezvous`, both collective
like the real ones.
"""

from __future__ import annotations

import contextlib
import random
import sys
import unittest
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef
from torch.testing._internal import common_distributed
from torch.testing._internal.common_distributed import MultiProcessTestCase


sys.path.insert(0, str(Path(__file__).parent))

from stack_level import levels, on_base  # noqa: E402


# What [5/5]'s runtime asks of torch.distributed._symmetric_memory: 2.11.0
# has no such check, so the series adds one; 2.14.1 has upstream's.
SYMM_CHECK = "_is_symm_mem_tensor" if on_base("2.11.0") else "is_symm_mem_tensor"


CALLS = 1000
# a collective left without its peer fails a rank after this long, not hangs
PG_TIMEOUT = timedelta(seconds=15)
# and the parent gives up on the ranks after this long
PARENT_TIMEOUT_S = 90
# the module's graph-input sites: (site, shape of its input)
SITES = ((0, (64,)), (1, (16, 8)))
# symmetric inputs a caller keeps for reuse, per site
POOL = 4
# what the stand-in collectives exchange, so that a rank can tell which
# collective its peer ran
_ALLOCATE, _RENDEZVOUS = 1, 2


class _SymmAllocatorStandIn:
    """
    Stands in for the symmetric-memory allocator on CPU: the storages its
    `empty` made are symmetric while they live; `allocate` (for
    `p2p_buffers._allocate`) makes one and rendezvouses it; `rendezvous` is
    collective the first time it meets a storage, like the real one, and
    checks that every rank rendezvouses its copy of the same allocation.
    """

    def __init__(self, group_name: str) -> None:
        self.group_name = group_name
        # storage address (`_cdata`) -> (weak reference, allocation serial).
        # The weak reference keeps the address from reuse while it lives.
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.prune_at = 64
        self.rendezvoused: set[int] = set()
        self.serial = 0

    def empty(
        self,
        size: Sequence[int],
        stride: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        if stride is None:
            stride = torch.empty(size, device="meta").stride()
        t = torch.empty_strided(size, stride, dtype=dtype)
        storage = t.untyped_storage()
        if len(self.storages) >= self.prune_at:
            for cdata in [c for c, (r, _) in self.storages.items() if r.expired()]:
                del self.storages[cdata]
                self.rendezvoused.discard(cdata)
            self.prune_at = max(64, 2 * len(self.storages))
        self.storages[storage._cdata] = (StorageWeakRef(storage), self.serial)
        self.serial += 1
        return t

    def _allocation(self, t: torch.Tensor) -> tuple[int, int] | None:
        """(storage address, serial) of the live allocation `t` lies in."""
        cdata = t.untyped_storage()._cdata
        entry = self.storages.get(cdata)
        if entry is None or entry[0].expired():
            return None
        return cdata, entry[1]

    def is_symm_mem_tensor(self, t: torch.Tensor) -> bool:
        return self._allocation(t) is not None

    def rendezvous(self, t: torch.Tensor, group_name: str | None = None) -> object:
        if group_name != self.group_name:
            raise AssertionError(f"rendezvous over group {group_name!r}")
        allocation = self._allocation(t)
        if allocation is None:
            raise AssertionError("rendezvous of memory that is not symmetric")
        cdata, serial = allocation
        if cdata not in self.rendezvoused:
            self.rendezvoused.add(cdata)
            self._exchange(_RENDEZVOUS, serial)
        return mock.sentinel.symm_mem_handle

    def allocate(
        self,
        size: Sequence[int],
        stride: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
        group_name: str,
    ) -> torch.Tensor:
        if torch.device(device).type != "cpu":
            raise AssertionError(f"P2P buffer on {device}")
        if group_name != self.group_name:
            raise AssertionError(f"P2P buffer of group {group_name!r}")
        buf = self.empty(size, stride, dtype)
        # allocated and rendezvoused: one collective
        cdata, serial = self._allocation(buf) or (0, 0)
        self.rendezvoused.add(cdata)
        self._exchange(_ALLOCATE, serial)
        return buf

    def _exchange(self, what: int, serial: int) -> None:
        mine = torch.tensor([what, serial], dtype=torch.int64)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        if any(not torch.equal(theirs, mine) for theirs in every):
            raise AssertionError(
                f"collective of the symmetric allocator: {what=}, {serial=}; "
                f"the ranks' were {[theirs.tolist() for theirs in every]}"
            )

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import torch.distributed._symmetric_memory as symm_mem_module
        from torch._C._distributed_c10d import _SymmetricMemory
        from torch._inductor.runtime import p2p_buffers

        with contextlib.ExitStack() as stack:
            patches = [
                (symm_mem_module, SYMM_CHECK, self.is_symm_mem_tensor),
                (p2p_buffers, "_allocate", self.allocate),
                (_SymmetricMemory, "rendezvous", self.rendezvous),
            ]
            for target, name, stand_in in patches:
                stack.enter_context(mock.patch.object(target, name, stand_in))
            yield


@levels(5)
class DivergentAllocatorsTest(MultiProcessTestCase):
    """1000 calls of a module with two graph-input sites, per rank."""

    @property
    def world_size(self) -> int:
        return int(self._testMethodName.rsplit("_", 1)[-1])

    def setUp(self) -> None:
        super().setUp()
        # the parent, too, gives up on ranks that hang
        timeout = mock.patch.dict(
            common_distributed.TIMEOUT_OVERRIDE,
            {self._testMethodName: PARENT_TIMEOUT_S},
        )
        timeout.start()
        self.addCleanup(timeout.stop)
        self._spawn_processes()

    def _run_calls(self) -> None:
        dist.init_process_group(
            "gloo",
            rank=self.rank,
            world_size=self.world_size,
            init_method=f"file://{self.file_name}",
            timeout=PG_TIMEOUT,
        )
        try:
            group_name = dist.group.WORLD.group_name
            allocator = _SymmAllocatorStandIn(group_name)
            with allocator.installed():
                self._drive(allocator, group_name)
        finally:
            dist.destroy_process_group()

    def _drive(self, allocator: _SymmAllocatorStandIn, group_name: str) -> None:
        from torch._inductor.runtime.p2p_buffers import P2PBuffers

        p2p_buffers = P2PBuffers()
        # this rank's own allocations: (the call that drops it, tensor)
        own: list[tuple[int, torch.Tensor]] = []
        own_rng = random.Random(1000 + self.rank)
        pools: dict[int, list[torch.Tensor]] = {site: [] for site, _ in SITES}
        for call in range(CALLS):
            own = [(until, t) for until, t in own if until > call]
            # rank-dependent allocations between calls, so that the inputs'
            # addresses, and whatever a rank caches by address, diverge
            for _ in range(own_rng.randrange(1 + 3 * self.rank)):
                numel = own_rng.choice((16, 64, 100, 128, 200, 256, 1024))
                until = call + own_rng.randrange(1, 5 + 7 * self.rank)
                own.append((until, torch.empty(numel)))
            try:
                inputs = [
                    self._input(allocator, pools[site], call, site, shape)
                    for site, shape in SITES
                ]
                for (site, _), (x, symmetric) in zip(SITES, inputs, strict=True):
                    # as the wrapper code calls it
                    out = p2p_buffers.graph_input(
                        site, x, group_name, pass_through=True, cudagraphs=False
                    )
                    self.assertEqual(out is x, symmetric, f"site {site}: is x")
                    self.assertTrue(torch.equal(out, x), f"site {site}: value")
                # the caller keeps some plain inputs alive a while, per rank
                for x, symmetric in inputs:
                    if not symmetric and own_rng.random() < 0.3:
                        own.append((call + own_rng.randrange(1, 20), x))
                del inputs, x, out
                total = torch.ones(1)
                dist.all_reduce(total)
                self.assertEqual(total.item(), self.world_size, "the user's all_reduce")
            except Exception as e:
                raise AssertionError(
                    f"rank {self.rank}, call {call}: {type(e).__name__}: {e}"
                ) from e

    def _input(
        self,
        allocator: _SymmAllocatorStandIn,
        pool: list[torch.Tensor],
        call: int,
        site: int,
        shape: tuple[int, ...],
    ) -> tuple[torch.Tensor, bool]:
        """This call's input of `site`, and whether it is symmetric: the same
        kind, and the same symmetric tensor, on every rank."""
        spmd = random.Random(call * len(SITES) + site)
        values = torch.arange(torch.Size(shape).numel(), dtype=torch.float32)
        values = (values + 1000 * call + site).view(shape)
        kind = spmd.choice(("plain", "plain", "reused", "new", "new"))
        if kind == "plain":
            return values, False
        if kind == "reused" and pool:
            x = pool[spmd.randrange(len(pool))]
        else:
            x = allocator.empty(shape)
            pool.append(x)
            if len(pool) > POOL:
                # dropped: its storage dies
                pool.pop(spmd.randrange(len(pool)))
        x.copy_(values)
        return x, True

    def test_calls_2(self) -> None:
        self._run_calls()

    def test_calls_4(self) -> None:
        self._run_calls()


if __name__ == "__main__":
    unittest.main()
