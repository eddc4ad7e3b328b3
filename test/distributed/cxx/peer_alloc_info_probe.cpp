// Probe library for test_peer_alloc_info.py: a plain C ABI (loaded with
// ctypes, so no ninja or pybind11 is needed) around
//   * the two ways of getting small device buffers that matter for the
//     CUDAPeerAllocInfo fix: the CUDA caching allocator's raw_alloc (the
//     pin's way) and plain cudaMalloc (the fix's way);
//   * the CUDAPeerAllocInfo class of the INSTALLED libtorch_cuda, constructed
//     directly (no process group, no rendezvous): its constructor allocates
//     and uploads the device pointer tables; after the fix, its destructor
//     hands them over and the next construction frees them;
//   * helpers the tests of the PATCHED class use too (its own library,
//     patched_peer_alloc_info_probe.cu): the device of a pointer, the
//     contents of a table, the capture status of a stream.
// Every function returns 0 on success and -1 on error; probe_last_error()
// then describes the error.

// CUDASymmetricMemoryTypes.hpp names CUmemGenericAllocationHandle without
// including the driver API header itself.
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/distributed/c10d/symm_mem/CUDASymmetricMemory.hpp>

#include "fake_peer_pointers.h"

#include <cstdint>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

namespace sm = c10d::symmetric_memory;

std::mutex g_mutex;
std::string g_last_error;
int64_t g_next_handle = 1;
// Live objects, by handle. CUDASymmetricMemory holds the CUDAPeerAllocInfo.
std::map<int64_t, c10::intrusive_ptr<sm::CUDASymmetricMemory>> g_live;

int fail(const std::string& what) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_last_error = what;
  return -1;
}

int fail_cuda(const char* call, cudaError_t err) {
  return fail(std::string(call) + ": " + cudaGetErrorString(err));
}

} // namespace

extern "C" {

const char* probe_last_error() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_last_error.c_str();
}

// Caching allocator, current device and stream (what the pin's
// CUDAPeerAllocInfo constructor does).
int probe_raw_alloc(size_t nbytes, void** out) {
  try {
    *out = c10::cuda::CUDACachingAllocator::raw_alloc(nbytes);
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

int probe_raw_delete(void* ptr) {
  try {
    c10::cuda::CUDACachingAllocator::raw_delete(ptr);
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// Plain CUDA runtime on the current device (what the fix does).
int probe_cuda_malloc(size_t nbytes, void** out) {
  cudaError_t err = cudaMalloc(out, nbytes);
  return err == cudaSuccess ? 0 : fail_cuda("cudaMalloc", err);
}

int probe_cuda_free(void* ptr) {
  cudaError_t err = cudaFree(ptr);
  return err == cudaSuccess ? 0 : fail_cuda("cudaFree", err);
}

// The device that owns device allocation `ptr`, or -1 if `ptr` is not
// device memory.
int probe_pointer_device(void* ptr, int* device) {
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    *device = -1;
    return 0;
  }
  *device = attr.type == cudaMemoryTypeDevice ? attr.device : -1;
  return 0;
}

// The capture status of `stream` (a cudaStream_t): 0 none, 1 active,
// 2 invalidated (cudaStreamCaptureStatus).
int probe_stream_capture_status(void* stream, int* status) {
  cudaStreamCaptureStatus s = cudaStreamCaptureStatusNone;
  cudaError_t err =
      cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &s);
  if (err != cudaSuccess) {
    return fail_cuda("cudaStreamIsCapturing", err);
  }
  *status = static_cast<int>(s);
  return 0;
}

// Copies `count` pointers from the device table at `table` to `out`.
int probe_read_table(void* table, int count, uint64_t* out) {
  std::vector<void*> host(static_cast<size_t>(count));
  cudaError_t err = cudaMemcpy(
      host.data(), table, sizeof(void*) * host.size(), cudaMemcpyDeviceToHost);
  if (err != cudaSuccess) {
    return fail_cuda("cudaMemcpy", err);
  }
  for (size_t i = 0; i < host.size(); ++i) {
    out[i] = reinterpret_cast<uint64_t>(host[i]);
  }
  return 0;
}

// Constructs libtorch_cuda's CUDAPeerAllocInfo for `world_size` made-up peers
// on `device` (host-side pointer values only; nothing is dereferenced), wraps
// it in a CUDASymmetricMemory (which exposes the device tables), and keeps
// it alive under *handle until probe_release_peer_alloc_info(*handle).
// The fake pointers are base + stride * rank, reported back through
// buffers_base / signal_pads_base so the caller can check the uploaded
// tables.
int probe_make_peer_alloc_info(
    int device,
    int world_size,
    int64_t* handle,
    void** buffers_dev,
    void** signal_pads_dev,
    uint64_t* buffers_base,
    uint64_t* signal_pads_base,
    uint64_t* stride) {
  try {
    auto pai = make_fake_peer_alloc_info<sm::CUDAPeerAllocInfo>(device, world_size);
    auto symm = c10::make_intrusive<sm::CUDASymmetricMemory>(pai, 0);
    *buffers_dev = symm->get_buffer_ptrs_dev();
    *signal_pads_dev = symm->get_signal_pad_ptrs_dev();
    FakePeerPointers::report(buffers_base, signal_pads_base, stride);
    std::lock_guard<std::mutex> lock(g_mutex);
    *handle = g_next_handle++;
    g_live.emplace(*handle, std::move(symm));
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// Drops the objects made by probe_make_peer_alloc_info; this runs
// ~CUDAPeerAllocInfo.
int probe_release_peer_alloc_info(int64_t handle) {
  c10::intrusive_ptr<sm::CUDASymmetricMemory> victim;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_live.find(handle);
    if (it == g_live.end()) {
      g_last_error = "unknown handle";
      return -1;
    }
    victim = std::move(it->second);
    g_live.erase(it);
  }
  try {
    victim.reset();
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

} // extern "C"
