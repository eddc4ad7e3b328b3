// Made-up peer pointers for the probes' CUDAPeerAllocInfo objects:
// base + stride * rank, host-side values only (nothing dereferences them).
// The probes report the bases and the stride back, so the caller can check
// the device tables the constructor uploads.
#pragma once

#include <torch/csrc/distributed/c10d/symm_mem/CUDASymmetricMemory.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

// The CUDAPeerAllocInfo constructor of torch 2.14.1 takes the group's name
// after world_size; 2.11.0's ends at world_size. The probe builds pass
// -DSYMM_STACK_PEER_INFO_GROUP_NAME=1 when the header they compile against
// declares it (peer_info_flags() in patched_probe_build.py).
#if SYMM_STACK_PEER_INFO_GROUP_NAME
#define SYMM_STACK_AFTER_WORLD_SIZE , std::string("probe")
#else
#define SYMM_STACK_AFTER_WORLD_SIZE
#endif

struct FakePeerPointers {
  static constexpr uint64_t kBuffersBase = 0x7e0000000000ULL;
  static constexpr uint64_t kSignalPadsBase = 0x7f0000000000ULL;
  static constexpr uint64_t kStride = 0x100000ULL;

  std::vector<void*> buffers;
  std::vector<void*> signal_pads;

  explicit FakePeerPointers(int world_size)
      : buffers(static_cast<size_t>(world_size)),
        signal_pads(static_cast<size_t>(world_size)) {
    for (int r = 0; r < world_size; ++r) {
      buffers[r] = reinterpret_cast<void*>(kBuffersBase + kStride * r);
      signal_pads[r] = reinterpret_cast<void*>(kSignalPadsBase + kStride * r);
    }
  }

  static void report(
      uint64_t* buffers_base,
      uint64_t* signal_pads_base,
      uint64_t* stride) {
    *buffers_base = kBuffersBase;
    *signal_pads_base = kSignalPadsBase;
    *stride = kStride;
  }
};

// A `PeerAllocInfo` (libtorch's CUDAPeerAllocInfo, or the patched copy the
// patched probe compiles) for `world_size` made-up peers on `device`. Its
// alloc_refs are empty: the constructor and destructor under test only move
// them in and drop them, and a real AllocationRef would need a mapped
// symmetric allocation.
template <class PeerAllocInfo>
c10::intrusive_ptr<PeerAllocInfo> make_fake_peer_alloc_info(
    int device,
    int world_size) {
  FakePeerPointers peers(world_size);
  return c10::make_intrusive<PeerAllocInfo>(
      std::vector<c10::intrusive_ptr<c10d::symmetric_memory::AllocationRef>>{},
      std::move(peers.buffers),
      std::move(peers.signal_pads),
      c10d::symmetric_memory::HandleType{},
      /*mc_addr=*/nullptr,
      /*buffer_size=*/size_t{1} << 20,
      device,
      /*rank=*/0,
      world_size SYMM_STACK_AFTER_WORLD_SIZE);
}
