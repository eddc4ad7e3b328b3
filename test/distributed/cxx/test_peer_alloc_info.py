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
* ``PatchedPeerAllocInfoTest``: the PATCHED class itself, on the released
  wheel.  The series' CUDASymmetricMemory.{cu,hpp} come from the tree that
  ``scripts/cxx_check.sh --make-tree`` makes (``stack.py base`` + ``import``,
  as its compile check does; ``SYMM_STACK_CXX_TREE=DIR`` names another tree
  holding them); ``patched_probe_build.py`` compiles the patch's constructor,
  destructor and ``RetiredPeerPtrTables`` into a library of their own, the
  class renamed ``PatchedCUDAPeerAllocInfo`` so it cannot clash with
  libtorch's.  Checked: under pool routing its tables stay out of the pool and
  hold the right pointers; the destructor retires them (still allocated, in
  the retired list) without changing the current device, and the next
  construction frees them; destroying it during a CUDA graph capture on a
  side stream leaves the capture valid.  These pass on any torch with the
  pinned wheel's headers; where the tree cannot be made (a torch other than
  the pin, no git, no ``unidiff`` for ``stack.py import``), they skip and say
  why.

The probes are C++ (``peer_alloc_info_probe.cpp``,
``patched_peer_alloc_info_probe.cu``), compiled with nvcc into shared
libraries against the installed torch and loaded with ctypes, so neither
ninja nor pybind11 is needed.  Compile errors are test errors; a missing CUDA
device or nvcc is a skip.  ``scripts/cxx_check.sh`` builds the patched probe
too (without a GPU), so a series change that breaks it shows there.

Run (any machine with a CUDA GPU and nvcc):
    python -m pytest -v test/distributed/cxx/test_peer_alloc_info.py
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
import unittest
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

import patched_probe_build  # noqa: E402
from patched_probe_build import find_nvcc  # noqa: E402


_T = TypeVar("_T")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
CXX_CHECK = REPO / "scripts" / "cxx_check.sh"
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


_PROBE: ctypes.CDLL | None = None
_BUILD_DIR: tempfile.TemporaryDirectory[str] | None = None


# The arguments of both probes' make functions (probe_make_peer_alloc_info,
# patched_make): device, world size, then the handle, both device tables and
# the made-up pointers' bases and stride, written back.
MAKE_ARGTYPES: list[Any] = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(ctypes.c_int64),
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint64),
]


def bind(dll: ctypes.CDLL, sigs: dict[str, list[Any]], last_error: str) -> None:
    """Declare a probe's functions: each takes `sigs[name]` and returns 0 or
    -1; `last_error` returns the message of the last -1."""
    for name, argtypes in sigs.items():
        fn = getattr(dll, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    getattr(dll, last_error).argtypes = []
    getattr(dll, last_error).restype = ctypes.c_char_p


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
        *patched_probe_build.peer_info_flags(inc / patched_probe_build.HPP_REL),
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
        "probe_stream_capture_status": [vp, ctypes.POINTER(ctypes.c_int)],
        "probe_make_peer_alloc_info": MAKE_ARGTYPES,
        "probe_release_peer_alloc_info": [ctypes.c_int64],
    }
    bind(dll, sigs, "probe_last_error")
    _PROBE = dll
    return dll


def call(name: str, *args: Any) -> None:
    dll = probe()
    if getattr(dll, name)(*args) != 0:
        raise RuntimeError(f"{name}: {dll.probe_last_error().decode()}")


# The patched class's probe: built once per process, or skipped / failed once.
_PATCHED: ctypes.CDLL | None = None
_PATCHED_DIR: tempfile.TemporaryDirectory[str] | None = None
_PATCHED_UNAVAILABLE: tuple[type[Exception], str] | None = None


def patched_tree(work: Path) -> Path:
    """A tree holding the series' patched CUDASymmetricMemory.{cu,hpp}:
    $SYMM_STACK_CXX_TREE, or one made by ``cxx_check.sh --make-tree`` (the
    pin as a git repo with the whole series applied, as its compile check
    makes it)."""
    named = os.environ.get("SYMM_STACK_CXX_TREE")
    if named:
        return Path(named)
    tree = work / "tree"
    cmd = ["bash", str(CXX_CHECK), "--python", sys.executable, "--make-tree", str(tree)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    output = res.stdout + res.stderr
    if res.returncode == 3:  # cannot run here, and why (stack.py's error too)
        lines = output.strip().splitlines()
        why = [ln for ln in lines if "error:" in ln or "CANNOT RUN HERE" in ln]
        raise unittest.SkipTest(
            "no patched tree here: " + " / ".join(why or lines[-1:])
        )
    if res.returncode != 0:
        raise RuntimeError(
            f"making the patched tree failed (exit {res.returncode}):\n"
            + " ".join(cmd)
            + "\n"
            + output
        )
    return tree


def _build_patched_probe() -> ctypes.CDLL:
    global _PATCHED_DIR
    nvcc = find_nvcc()
    if nvcc is None:
        raise unittest.SkipTest("nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda)")
    _PATCHED_DIR = tempfile.TemporaryDirectory(prefix="patched_peer_alloc_info.")
    work = Path(_PATCHED_DIR.name)
    tree = patched_tree(work)
    try:
        lib = patched_probe_build.build(tree, work / "probe", nvcc=nvcc)
    except patched_probe_build.ProbeBuildError as err:
        raise RuntimeError(f"building the patched probe failed: {err}") from None
    dll = ctypes.CDLL(str(lib))
    pi = ctypes.POINTER(ctypes.c_int)
    pvp = ctypes.POINTER(ctypes.c_void_p)
    sigs: dict[str, list[Any]] = {
        "patched_make": MAKE_ARGTYPES,
        "patched_release": [ctypes.c_int64, pi, pi],
        "patched_retired": [ctypes.c_int, pi, pvp, pi],
    }
    bind(dll, sigs, "patched_last_error")
    return dll


def patched_probe() -> ctypes.CDLL:
    """Build (once per process) and load the patched class's probe library."""
    global _PATCHED, _PATCHED_UNAVAILABLE
    if _PATCHED is not None:
        return _PATCHED
    if _PATCHED_UNAVAILABLE is not None:
        kind, message = _PATCHED_UNAVAILABLE
        raise kind(message)
    try:
        _PATCHED = _build_patched_probe()
    except (unittest.SkipTest, RuntimeError) as err:
        _PATCHED_UNAVAILABLE = (type(err), str(err))
        raise
    return _PATCHED


def patched_call(name: str, *args: Any) -> None:
    dll = patched_probe()
    if getattr(dll, name)(*args) != 0:
        raise RuntimeError(f"{name}: {dll.patched_last_error().decode()}")


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


def read_table(table: int, count: int) -> list[int]:
    """The ``count`` pointers held by the device table at ``table``."""
    out = (ctypes.c_uint64 * count)()
    call("probe_read_table", ctypes.c_void_p(table), count, out)
    return list(out)


CAPTURE_NONE, CAPTURE_ACTIVE, CAPTURE_INVALIDATED = 0, 1, 2


def capture_status(stream: torch.cuda.Stream) -> int:
    """``cudaStreamIsCapturing`` of ``stream``: CAPTURE_NONE/ACTIVE/INVALIDATED."""
    status = ctypes.c_int(-1)
    call(
        "probe_stream_capture_status",
        ctypes.c_void_p(stream.cuda_stream),
        ctypes.byref(status),
    )
    return status.value


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
        made = make_peer_alloc_info(
            call, "probe_make_peer_alloc_info", device, world_size
        )
        return (
            made.handle,
            made.buffers_dev,
            made.signal_pads_dev,
            made.buffers,
            made.signal_pads,
        )

    def read_table(self, table: int, count: int = 2) -> list[int]:
        return read_table(table, count)

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


@dataclass(frozen=True)
class Made:
    """A live CUDAPeerAllocInfo of a probe (stock or patched), by its handle."""

    handle: int
    device: int
    world_size: int
    buffers_dev: int  # the device table of buffer pointers
    signal_pads_dev: int  # the device table of signal-pad pointers
    buffers_base: int  # the made-up peer pointers: base + stride * rank
    signal_pads_base: int
    stride: int

    @property
    def buffers(self) -> list[int]:
        """What ``buffers_dev`` must hold."""
        return [self.buffers_base + self.stride * r for r in range(self.world_size)]

    @property
    def signal_pads(self) -> list[int]:
        """What ``signal_pads_dev`` must hold."""
        base = self.signal_pads_base
        return [base + self.stride * r for r in range(self.world_size)]

    @property
    def tables(self) -> list[tuple[int, int]]:
        """(device, table) of both tables, as RetiredPeerPtrTables lists them."""
        return [(self.device, self.buffers_dev), (self.device, self.signal_pads_dev)]


def make_peer_alloc_info(
    call_fn: Callable[..., None], symbol: str, device: int, world_size: int
) -> Made:
    """Constructs a CUDAPeerAllocInfo through a probe's `symbol` (the stock
    or the patched one), over the made-up peer pointers of
    fake_peer_pointers.h."""
    handle = ctypes.c_int64()
    bdev = ctypes.c_void_p()
    sdev = ctypes.c_void_p()
    bbase = ctypes.c_uint64()
    sbase = ctypes.c_uint64()
    stride = ctypes.c_uint64()
    call_fn(
        symbol,
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
    return Made(
        handle.value,
        device,
        world_size,
        bdev.value,
        sdev.value,
        bbase.value,
        sbase.value,
        stride.value,
    )


@unittest.skipUnless(torch.cuda.is_available(), "needs a CUDA device")
class PatchedPeerAllocInfoTest(unittest.TestCase):
    """Patch 5's own CUDAPeerAllocInfo, compiled from the series (see the
    module docstring) and constructed directly, on the released wheel.

    Each object is made with an EMPTY ``alloc_refs`` vector and made-up peer
    pointers: the constructor and destructor under test only move
    ``alloc_refs`` in and drop it, and only copy the peer pointer values into
    the device tables (nothing dereferences them).  A real AllocationRef would
    need a symmetric allocation (cuMemCreate and a mapping, which its
    destructor unmaps) and a rendezvous; neither touches the tables.
    """

    def setUp(self) -> None:
        # Both libraries are built and loaded here, before any test's CUDA
        # work (the helpers read_table, pointer_device and capture_status are
        # the stock probe's): skips and build errors show up here.
        probe()
        patched_probe()

    def make(self, device: int, world_size: int = 2) -> Made:
        return make_peer_alloc_info(patched_call, "patched_make", device, world_size)

    def release(self, made: Made) -> tuple[int, int]:
        """Destroys ``made``; returns the current device before and after."""
        before = ctypes.c_int(-1)
        after = ctypes.c_int(-1)
        patched_call(
            "patched_release", made.handle, ctypes.byref(before), ctypes.byref(after)
        )
        return before.value, after.value

    def retired(self) -> list[tuple[int, int]]:
        """RetiredPeerPtrTables' list: (device, table) retired, not yet freed."""
        count = ctypes.c_int(0)
        patched_call("patched_retired", 0, None, None, ctypes.byref(count))
        devices = (ctypes.c_int * count.value)()
        tables = (ctypes.c_void_p * count.value)()
        patched_call(
            "patched_retired", count.value, devices, tables, ctypes.byref(count)
        )
        return [(d, t or 0) for d, t in zip(devices, tables, strict=True)]

    def assert_holds(self, made: Made) -> None:
        n = made.world_size
        self.assertEqual(read_table(made.buffers_dev, n), made.buffers)
        self.assertEqual(read_table(made.signal_pads_dev, n), made.signal_pads)

    def assert_allocated(self, made: Made) -> None:
        """Both tables are live cudaMalloc allocations on ``made.device``."""
        for table in (made.buffers_dev, made.signal_pads_dev):
            self.assertEqual(pointer_device(table), made.device, hex(table))

    def assert_freed(self, made: Made, *live: Made) -> None:
        """Both tables of ``made`` were freed.  The CUDA driver may hand the
        same address to a later allocation (``live``'s tables): two live
        allocations never share a base address, so such a table was freed
        first."""
        reused = {t for other in live for _, t in other.tables}
        for table in (made.buffers_dev, made.signal_pads_dev):
            if table not in reused:
                self.assertEqual(pointer_device(table), -1, f"{hex(table)} not freed")

    def test_tables_stay_out_of_active_pool(self) -> None:
        device = torch.cuda.current_device()
        before = torch.cuda.memory_allocated()
        made, pool = with_pool(lambda: self.make(device, world_size=8))
        try:
            segments = pool.snapshot()
            for table in (made.buffers_dev, made.signal_pads_dev):
                self.assertFalse(active_block_holding(segments, table), hex(table))
                self.assertFalse(
                    in_any_segment(torch.cuda.memory_snapshot(), table), hex(table)
                )
            self.assertEqual(torch.cuda.memory_allocated(), before)
            self.assert_allocated(made)
            self.assert_holds(made)
        finally:
            self.release(made)

    def test_destructor_retires_next_construction_frees(self) -> None:
        device = torch.cuda.current_device()
        first = self.make(device)
        self.assertNotIn(first.tables[0], self.retired())
        current = self.release(first)
        self.assertEqual(current, (device, device), "the destructor changed device")
        self.assertEqual(torch.cuda.current_device(), device)
        # Retired, not freed: listed, still allocated, contents intact.
        retired = self.retired()
        for entry in first.tables:
            self.assertIn(entry, retired)
        self.assert_allocated(first)
        self.assert_holds(first)
        # The next construction frees every retired table.
        second = self.make(device)
        try:
            self.assertEqual(self.retired(), [])
            self.assert_freed(first, second)
            self.assert_allocated(second)
            self.assert_holds(second)
            self.assertEqual(torch.cuda.current_device(), device)
        finally:
            self.release(second)

    def test_retired_memory_returns_at_next_construction(self) -> None:
        # Large tables (two of 32 MiB per object), so device free memory shows
        # where they are freed: not by the destructor, but by the next
        # construction.  Slack covers the driver's page granularity.
        device = torch.cuda.current_device()
        world_size, mib, slack = 4 << 20, 1 << 20, 8 << 20
        tables = 2 * world_size * ctypes.sizeof(ctypes.c_void_p)  # 64 MiB

        def free() -> int:
            torch.cuda.synchronize()
            return torch.cuda.mem_get_info()[0]

        base = self.make(device, world_size=1)  # frees what earlier tests retired
        self.release(base)
        free0 = free()
        first = self.make(device, world_size=world_size)
        free1 = free()
        self.assertGreaterEqual(free0 - free1, tables - slack)
        self.release(first)
        self.assertLess(abs(free() - free1), slack, "the destructor freed memory")
        second = self.make(device, world_size=world_size)
        free2 = free()
        self.assertLess(
            abs(free2 - free1),
            slack,
            f"{(free1 - free2) / mib:.0f} MiB more in use after the next "
            "construction: the retired tables were not freed",
        )
        self.release(second)
        last = self.make(device, world_size=1)
        self.release(last)
        self.assertLess(abs(free() - free0), slack)

    def test_no_leak_over_many_objects(self) -> None:
        # As InstalledPeerAllocInfoTest's: 500 objects of 1024 peers, ~8 MiB
        # in all if nothing were freed.
        device = torch.cuda.current_device()
        torch.cuda.synchronize()
        allocated_before = torch.cuda.memory_allocated()
        free_before, _ = torch.cuda.mem_get_info()
        for _ in range(500):
            self.release(self.make(device, world_size=1024))
        self.release(self.make(device, world_size=1))  # frees the last ones
        torch.cuda.synchronize()
        free_after, _ = torch.cuda.mem_get_info()
        self.assertEqual(torch.cuda.memory_allocated(), allocated_before)
        self.assertLess(free_before - free_after, 4 << 20, "device memory leaked")

    def test_destroy_during_graph_capture_on_side_stream(self) -> None:
        # The last reference to a symmetric allocation can drop while a stream
        # captures a CUDA graph.  In the strictest capture mode ("global") a
        # cudaFree (or any call unsafe during capture) from any thread would
        # invalidate the capture; the patched destructor makes no CUDA call.
        device = torch.cuda.current_device()
        made = self.make(device)
        x = torch.zeros(16, device=device)
        side = torch.cuda.Stream(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="global"):
            x.add_(1)
            self.assertEqual(capture_status(side), CAPTURE_ACTIVE)
            current = self.release(made)
            status_after = capture_status(side)
            x.add_(1)
        # Reaching here, capture_end succeeded; the capture was valid all along.
        self.assertEqual(status_after, CAPTURE_ACTIVE, "the destructor broke it")
        self.assertEqual(current, (device, device))
        self.assertEqual(capture_status(side), CAPTURE_NONE)
        graph.replay()
        torch.cuda.synchronize()
        self.assertTrue(torch.equal(x, torch.full_like(x, 2)), x)
        retired = self.retired()
        for entry in made.tables:
            self.assertIn(entry, retired)
        self.assert_allocated(made)
        # Freed at the next construction, after the capture.
        after = self.make(device)
        try:
            self.assertEqual(self.retired(), [])
            self.assert_freed(made, after)
        finally:
            self.release(after)
        graph.reset()

    @unittest.skipUnless(torch.cuda.device_count() >= 2, "needs 2 CUDA devices")
    def test_other_device_keeps_current_device(self) -> None:
        torch.cuda.set_device(0)
        made = self.make(1)
        self.assertEqual(torch.cuda.current_device(), 0)
        self.assert_allocated(made)  # on device 1: the constructor's guard
        self.assert_holds(made)
        self.assertEqual(self.release(made), (0, 0))
        self.assertIn((1, made.buffers_dev), self.retired())
        # Freeing them switches to device 1 and back.
        after = self.make(0)
        try:
            self.assertEqual(torch.cuda.current_device(), 0)
            self.assert_freed(made)
        finally:
            self.release(after)


if __name__ == "__main__":
    unittest.main()
