"""Runtime check for the C++ part of patch 5/5 (CUDAPeerAllocInfo tables).

Background: on the pin, CUDAPeerAllocInfo's constructor takes its two small
device pointer tables (``buffers_dev_``, ``signal_pads_dev_``) from the CUDA
caching allocator.  When a symmetric-memory rendezvous runs while the caching
allocator sends this thread's allocations to a CUDA graph's private pool (what
cudagraph trees do during warm-up under ``torch.compile(mode="reduce-overhead")``),
the tables land in that pool and the cudagraph tree fails with "Detected 2
tensor(s) in the cudagraph pool not tracked as outputs".  They are also never
freed.  The fix takes them from plain ``cudaMalloc``; its new destructor
hands them over (no CUDA call, safe during a capture) and the next
rendezvous frees them.

What runs here, on one GPU, without a process group:

* ``MechanismTest``: with ``torch.cuda.use_mem_pool(pool)`` active (the same
  allocator routing that cudagraph trees use), a caching-allocator
  ``raw_alloc`` lands in ``pool`` while a ``cudaMalloc`` does not.  This holds
  on any build and shows both why the pin fails and why the fix works.
* ``InstalledPeerAllocInfoTest``: constructs the installed libtorch_cuda's own
  ``CUDAPeerAllocInfo`` under the same routing and checks that its tables stay
  out of the pool, hold the right pointers, are freed on destruction, and
  that destruction leaves the current device alone.  Whether the installed
  torch carries the fix is read from its installed
  ``CUDASymmetricMemory.hpp`` (the fix declares ``~CUDAPeerAllocInfo``): on the
  stock 2.11.0 wheel the pool test is an expected failure (it demonstrates the
  bug); after a source build with patch 5 it must pass.

The probe is C++ (``peer_alloc_info_probe.cpp``), compiled with nvcc into a
shared library against the installed torch and loaded with ctypes, so neither
ninja nor pybind11 is needed.  Compile errors are test errors; a missing CUDA
device or nvcc is a skip.

Run (any machine with a CUDA GPU and nvcc):
    python -m pytest -v test/distributed/cxx/test_peer_alloc_info.py
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import unittest
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch


_T = TypeVar("_T")

HERE = Path(__file__).resolve().parent
PROBE_SRC = HERE / "peer_alloc_info_probe.cpp"
HPP_REL = "torch/csrc/distributed/c10d/symm_mem/CUDASymmetricMemory.hpp"
TORCH_DIR = Path(torch.__file__).resolve().parent
TABLE_BYTES = 16  # world_size 2 * sizeof(void*)


def installed_torch_has_fix() -> bool:
    """True if the installed CUDASymmetricMemory.hpp declares the destructor."""
    header = TORCH_DIR / "include" / HPP_REL
    return header.is_file() and "~CUDAPeerAllocInfo()" in header.read_text()


HAS_FIX = installed_torch_has_fix()


def expected_failure_unless_fixed(test: _T) -> _T:
    """Mark a test of fixed behaviour as an expected failure on an unfixed torch."""
    return test if HAS_FIX else unittest.expectedFailure(test)


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


_PROBE: ctypes.CDLL | None = None
_BUILD_DIR: tempfile.TemporaryDirectory[str] | None = None


def probe() -> ctypes.CDLL:
    """Build (once per process) and load the probe library."""
    global _PROBE, _BUILD_DIR
    if _PROBE is not None:
        return _PROBE
    nvcc = find_nvcc()
    if nvcc is None:
        raise unittest.SkipTest("nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda)")
    _BUILD_DIR = tempfile.TemporaryDirectory(prefix="peer_alloc_info_probe.")
    out = Path(_BUILD_DIR.name) / "libpeer_alloc_info_probe.so"
    inc = TORCH_DIR / "include"
    lib = TORCH_DIR / "lib"
    cmd = [
        nvcc,
        "-std=c++17",
        "-O1",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        "--cudart=shared",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        # As in the build of libtorch_cuda: HandleType is then the driver's
        # CUmemGenericAllocationHandle, which the exported symbols use.
        "-DPYTORCH_C10_DRIVER_API_SUPPORTED=1",
        "-I",
        str(inc),
        "-I",
        str(inc / "torch" / "csrc" / "api" / "include"),
        str(PROBE_SRC),
        "-o",
        str(out),
        "-L",
        str(lib),
        "-ltorch_cuda",
        "-lc10_cuda",
        "-ltorch_cpu",
        "-lc10",
        f"-Xlinker=-rpath,{lib}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(
            "building the probe failed:\n"
            + " ".join(cmd)
            + "\n"
            + res.stdout
            + res.stderr
        )
    dll = ctypes.CDLL(str(out))
    vp = ctypes.c_void_p
    pvp = ctypes.POINTER(ctypes.c_void_p)
    pu64 = ctypes.POINTER(ctypes.c_uint64)
    sigs: dict[str, list[Any]] = {
        "probe_raw_alloc": [ctypes.c_size_t, pvp],
        "probe_raw_delete": [vp],
        "probe_cuda_malloc": [ctypes.c_size_t, pvp],
        "probe_cuda_free": [vp],
        "probe_pointer_device": [vp, ctypes.POINTER(ctypes.c_int)],
        "probe_read_table": [vp, ctypes.c_int, pu64],
        "probe_make_peer_alloc_info": [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int64),
            pvp,
            pvp,
            pu64,
            pu64,
            pu64,
        ],
        "probe_release_peer_alloc_info": [ctypes.c_int64],
    }
    for name, argtypes in sigs.items():
        fn = getattr(dll, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    dll.probe_last_error.argtypes = []
    dll.probe_last_error.restype = ctypes.c_char_p
    _PROBE = dll
    return dll


def call(name: str, *args: Any) -> None:
    dll = probe()
    if getattr(dll, name)(*args) != 0:
        raise RuntimeError(f"{name}: {dll.probe_last_error().decode()}")


def active_block_holding(segments: list[dict[str, Any]], ptr: int) -> bool:
    """True if ``ptr`` lies in an allocated block of one of ``segments``."""
    for seg in segments:
        if not seg["address"] <= ptr < seg["address"] + seg["total_size"]:
            continue
        for block in seg["blocks"]:
            in_block = block["address"] <= ptr < block["address"] + block["size"]
            if in_block and block["state"] == "active_allocated":
                return True
    return False


def in_any_segment(segments: list[dict[str, Any]], ptr: int) -> bool:
    return any(s["address"] <= ptr < s["address"] + s["total_size"] for s in segments)


def pointer_device(ptr: int) -> int:
    """The device owning device allocation ``ptr``; -1 if it is not one."""
    device = ctypes.c_int(-1)
    call("probe_pointer_device", ctypes.c_void_p(ptr), ctypes.byref(device))
    return device.value


def probe_alloc(entry: str) -> Callable[[], int]:
    """A function allocating TABLE_BYTES through the probe's ``entry``
    (raw_alloc or cudaMalloc) and returning the pointer."""

    def alloc() -> int:
        out = ctypes.c_void_p()
        call(entry, TABLE_BYTES, ctypes.byref(out))
        assert out.value is not None
        return out.value

    return alloc


def with_pool(fn: Callable[[], _T]) -> tuple[_T, torch.cuda.MemPool]:
    """Run ``fn`` while the caching allocator routes allocations to a new pool."""
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        result = fn()
    torch.cuda.synchronize()
    return result, pool


@unittest.skipUnless(torch.cuda.is_available(), "needs a CUDA device")
class MechanismTest(unittest.TestCase):
    """Where small device allocations go while a graph-style pool is active."""

    def test_caching_allocator_alloc_lands_in_active_pool(self) -> None:
        ptr, pool = with_pool(probe_alloc("probe_raw_alloc"))
        try:
            self.assertTrue(
                active_block_holding(pool.snapshot(), ptr),
                "raw_alloc under use_mem_pool should be served from the pool",
            )
        finally:
            call("probe_raw_delete", ctypes.c_void_p(ptr))

    def test_cuda_malloc_stays_out_of_active_pool(self) -> None:
        before = torch.cuda.memory_allocated()
        ptr, pool = with_pool(probe_alloc("probe_cuda_malloc"))
        try:
            self.assertFalse(in_any_segment(pool.snapshot(), ptr))
            self.assertFalse(in_any_segment(torch.cuda.memory_snapshot(), ptr))
            self.assertEqual(torch.cuda.memory_allocated(), before)
        finally:
            call("probe_cuda_free", ctypes.c_void_p(ptr))


@unittest.skipUnless(torch.cuda.is_available(), "needs a CUDA device")
class InstalledPeerAllocInfoTest(unittest.TestCase):
    """The installed libtorch_cuda's CUDAPeerAllocInfo, built directly."""

    def make(
        self, device: int, world_size: int = 2
    ) -> tuple[int, int, int, list[int], list[int]]:
        """Returns (handle, buffers table, signal pads table, their contents)."""
        handle = ctypes.c_int64()
        bdev = ctypes.c_void_p()
        sdev = ctypes.c_void_p()
        bbase = ctypes.c_uint64()
        sbase = ctypes.c_uint64()
        stride = ctypes.c_uint64()
        call(
            "probe_make_peer_alloc_info",
            device,
            world_size,
            ctypes.byref(handle),
            ctypes.byref(bdev),
            ctypes.byref(sdev),
            ctypes.byref(bbase),
            ctypes.byref(sbase),
            ctypes.byref(stride),
        )
        assert bdev.value is not None and sdev.value is not None
        expect_b = [bbase.value + stride.value * r for r in range(world_size)]
        expect_s = [sbase.value + stride.value * r for r in range(world_size)]
        return handle.value, bdev.value, sdev.value, expect_b, expect_s

    def read_table(self, table: int, count: int = 2) -> list[int]:
        out = (ctypes.c_uint64 * count)()
        call("probe_read_table", ctypes.c_void_p(table), count, out)
        return list(out)

    def release(self, handle: int) -> None:
        call("probe_release_peer_alloc_info", handle)

    def test_tables_hold_the_peer_pointers(self) -> None:
        # Holds with and without the fix.
        device = torch.cuda.current_device()
        handle, bdev, sdev, expect_b, expect_s = self.make(device, world_size=8)
        try:
            self.assertEqual(self.read_table(bdev, 8), expect_b)
            self.assertEqual(self.read_table(sdev, 8), expect_s)
        finally:
            self.release(handle)

    @expected_failure_unless_fixed
    def test_tables_stay_out_of_active_pool(self) -> None:
        # The pin's constructor allocates on the current device (before its
        # CUDAGuard), so use the current device: both builds then route alike.
        device = torch.cuda.current_device()
        before = torch.cuda.memory_allocated()
        (handle, bdev, sdev, expect_b, expect_s), pool = with_pool(
            lambda: self.make(device)
        )
        try:
            segments = pool.snapshot()
            self.assertFalse(
                active_block_holding(segments, bdev)
                or active_block_holding(segments, sdev),
                "CUDAPeerAllocInfo's device tables were allocated in the "
                "active (graph-style) pool",
            )
            self.assertEqual(torch.cuda.memory_allocated(), before)
            self.assertEqual(self.read_table(bdev), expect_b)
            self.assertEqual(self.read_table(sdev), expect_s)
        finally:
            self.release(handle)

    @expected_failure_unless_fixed
    def test_no_leak_over_many_objects(self) -> None:
        # 500 objects with 1024 peers: two 8 KiB tables each, ~8 MiB in all if
        # nothing is freed.  The pin leaks them as caching-allocator blocks
        # (memory_allocated grows); the fix frees each object's tables with
        # cudaFree when the next one is made (device free memory stays put;
        # cudaMalloc'd memory is not in memory_allocated).
        device = torch.cuda.current_device()
        world_size, rounds = 1024, 500
        torch.cuda.synchronize()
        allocated_before = torch.cuda.memory_allocated()
        free_before, _ = torch.cuda.mem_get_info()
        for _ in range(rounds):
            handle, *_ = self.make(device, world_size=world_size)
            self.release(handle)
        torch.cuda.synchronize()
        leaked_allocator = torch.cuda.memory_allocated() - allocated_before
        free_after, _ = torch.cuda.mem_get_info()
        self.assertEqual(leaked_allocator, 0, "caching-allocator bytes leaked")
        # Generous slack for driver-side bookkeeping; a leak would be ~8 MiB.
        self.assertLess(free_before - free_after, 4 << 20, "device memory leaked")

    @unittest.skipUnless(torch.cuda.device_count() >= 2, "needs 2 CUDA devices")
    def test_other_device_keeps_current_device(self) -> None:
        torch.cuda.set_device(0)
        handle, bdev, sdev, expect_b, _ = self.make(1)
        try:
            self.assertEqual(self.read_table(bdev), expect_b)
            self.assertEqual(torch.cuda.current_device(), 0)
            if HAS_FIX:
                # The fix selects the owning device before allocating.
                self.assertEqual(pointer_device(bdev), 1)
                self.assertEqual(pointer_device(sdev), 1)
        finally:
            self.release(handle)
        # The destructor (fix) makes no CUDA call; freeing later switches to
        # device 1 and back.
        self.assertEqual(torch.cuda.current_device(), 0)


if __name__ == "__main__":
    unittest.main()
