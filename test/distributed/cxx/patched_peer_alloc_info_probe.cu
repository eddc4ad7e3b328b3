// Probe library for test_peer_alloc_info.py's PatchedPeerAllocInfoTest: a
// plain C ABI (loaded with ctypes) around the PATCHED CUDAPeerAllocInfo of
// patch 5, compiled into this library under the name
// PatchedCUDAPeerAllocInfo, next to libtorch_cuda's own (stock) class.
//
// patched_peer_alloc_info_defs.inc is generated at build time by
// patched_probe_build.py from the series' patched CUDASymmetricMemory.cu
// (its RetiredPeerPtrTables and the constructor and destructor of
// CUDAPeerAllocInfo, renamed); the patched CUDASymmetricMemory.hpp comes
// first on the include path. Nothing here is copied from the patch.
//
// Every function returns 0 on success and -1 on error; patched_last_error()
// then describes the error.

#include "patched_peer_alloc_info_defs.inc"

#include "fake_peer_pointers.h"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace sm = c10d::symmetric_memory;
using Patched = sm::PatchedCUDAPeerAllocInfo;
using Retired = sm::RetiredPeerPtrTables;
using RetiredList = std::vector<std::pair<int, void**>>;

// Private members are read through an explicit template instantiation, which
// may name them (the class itself is the patch's, unchanged). If the patch
// renames or retypes one of these members, this is where the probe stops
// compiling.
template <typename Tag, typename Tag::type Member>
struct PrivateMember {
  friend typename Tag::type get(Tag) {
    return Member;
  }
};
struct BuffersDev {
  using type = void** Patched::*;
  friend type get(BuffersDev);
};
struct SignalPadsDev {
  using type = void** Patched::*;
  friend type get(SignalPadsDev);
};
struct RetiredTables {
  using type = RetiredList Retired::*;
  friend type get(RetiredTables);
};
struct RetiredMutex {
  using type = std::mutex Retired::*;
  friend type get(RetiredMutex);
};
template struct PrivateMember<BuffersDev, &Patched::buffers_dev_>;
template struct PrivateMember<SignalPadsDev, &Patched::signal_pads_dev_>;
template struct PrivateMember<RetiredTables, &Retired::tables_>;
template struct PrivateMember<RetiredMutex, &Retired::mutex_>;

std::mutex g_mutex;
std::string g_last_error;
int64_t g_next_handle = 1;
std::map<int64_t, c10::intrusive_ptr<Patched>> g_live;

int fail(const std::string& what) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_last_error = what;
  return -1;
}

} // namespace

extern "C" {

const char* patched_last_error() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_last_error.c_str();
}

// Constructs the patched CUDAPeerAllocInfo for `world_size` made-up peers on
// `device` and keeps it alive under *handle until patched_release(*handle).
// The peer pointers are base + stride * rank (host-side values only; nothing
// is dereferenced), reported back so the caller can check the tables.
int patched_make(
    int device,
    int world_size,
    int64_t* handle,
    void** buffers_dev,
    void** signal_pads_dev,
    uint64_t* buffers_base,
    uint64_t* signal_pads_base,
    uint64_t* stride) {
  try {
    auto pai = make_fake_peer_alloc_info<Patched>(device, world_size);
    *buffers_dev = (*pai).*get(BuffersDev{});
    *signal_pads_dev = (*pai).*get(SignalPadsDev{});
    FakePeerPointers::report(buffers_base, signal_pads_base, stride);
    std::lock_guard<std::mutex> lock(g_mutex);
    *handle = g_next_handle++;
    g_live.emplace(*handle, std::move(pai));
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// Drops the object made by patched_make: this runs ~CUDAPeerAllocInfo (the
// patch's). *current_before / *current_after: the current device around it.
int patched_release(int64_t handle, int* current_before, int* current_after) {
  c10::intrusive_ptr<Patched> victim;
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
  // cudaGetDevice is legal during a stream capture.
  cudaError_t err = cudaGetDevice(current_before);
  if (err != cudaSuccess) {
    return fail(std::string("cudaGetDevice: ") + cudaGetErrorString(err));
  }
  try {
    victim.reset();
  } catch (const std::exception& e) {
    return fail(e.what());
  }
  err = cudaGetDevice(current_after);
  if (err != cudaSuccess) {
    return fail(std::string("cudaGetDevice: ") + cudaGetErrorString(err));
  }
  return 0;
}

// The tables retired and not yet freed: up to `capacity` of them into
// devices[] / tables[], their number into *count.
int patched_retired(int capacity, int* devices, void** tables, int* count) {
  try {
    Retired& retired = sm::retired_peer_ptr_tables();
    // Under the list's own mutex, as RetiredPeerPtrTables reads it.
    std::lock_guard<std::mutex> lock(retired.*get(RetiredMutex{}));
    const RetiredList& list = retired.*get(RetiredTables{});
    *count = static_cast<int>(list.size());
    for (int i = 0; i < *count && i < capacity; ++i) {
      devices[i] = list[i].first;
      tables[i] = list[i].second;
    }
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

} // extern "C"
