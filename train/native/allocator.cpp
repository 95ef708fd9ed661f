// Statistics of libtorch's caching device allocator (CUDA), which tch does not expose.
//
// Only c10 headers that need no CUDA toolkit are included: the CUDA allocator registers itself
// with c10 when libc10_cuda loads, and c10::getDeviceAllocator reaches it through the generic
// DeviceAllocator interface. Every function returns 0 on success, or 1 with a message in `err`
// (guarded.h).
#include <c10/core/CachingDeviceAllocator.h>

#include "guarded.h"

#include <cstdint>
#include <cstring>
#include <exception>

namespace {

using clover_native::guarded;

c10::DeviceAllocator* cuda_allocator() {
  return c10::getDeviceAllocator(c10::DeviceType::CUDA);
}

constexpr size_t kAggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);

}  // namespace

extern "C" {

// Current and peak bytes handed out to tensors on CUDA device `device` (all pools).
int clover_cuda_allocated_bytes(int device, int64_t* current, int64_t* peak, char* err,
                                size_t err_len) {
  return guarded(
      [&] {
        auto stats = cuda_allocator()->getDeviceStats(static_cast<c10::DeviceIndex>(device));
        *current = stats.allocated_bytes[kAggregate].current;
        *peak = stats.allocated_bytes[kAggregate].peak;
      },
      err, err_len);
}

// Start a new peak: the peak becomes the current allocation.
int clover_cuda_reset_peak(int device, char* err, size_t err_len) {
  return guarded(
      [&] { cuda_allocator()->resetPeakStats(static_cast<c10::DeviceIndex>(device)); }, err,
      err_len);
}

}  // extern "C"
