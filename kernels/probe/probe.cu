// Device bandwidth probe: the copy every memory-bound kernel of the crate is measured against.
//
// Floor: a copy of n bytes reads n and writes n, so its time is 2n / bandwidth; the H200 moves
// about 4.25 TB/s (torch's copy_ measured 4250 GB/s there), 1 ms for 2 GiB.
#include <algorithm>
#include <cstdint>

#include "device/launch.cuh"
#include "moekit.h"

namespace moekit {
namespace {

// Grid-stride 16-byte copy, four independent loads in flight per thread before the first store:
// one load per thread at a time leaves HBM idle between round trips.
__global__ void __launch_bounds__(256) copy_16b_kernel(const uint4 *__restrict__ src, uint4 *__restrict__ dst,
                                                       uint64_t n_vec) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n_vec; i += 4 * stride) {
    uint4 a = __ldcs(src + i);
    uint4 b = __ldcs(src + i + stride);
    uint4 c = __ldcs(src + i + 2 * stride);
    uint4 d = __ldcs(src + i + 3 * stride);
    __stcs(dst + i, a);
    __stcs(dst + i + stride, b);
    __stcs(dst + i + 2 * stride, c);
    __stcs(dst + i + 3 * stride, d);
  }
  for (; i < n_vec; i += stride) __stcs(dst + i, __ldcs(src + i));
}

__global__ void copy_bytes_kernel(const uint8_t *__restrict__ src, uint8_t *__restrict__ dst, uint64_t n) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) dst[i] = src[i];
}

__global__ void empty_kernel() {}

}  // namespace
}  // namespace moekit

extern "C" moekit_status moekit_copy_bytes(const moekit_copy_params *p, moekit_stream stream) {
  using namespace moekit;
  if (p == nullptr || (p->n_bytes > 0 && (p->src == nullptr || p->dst == nullptr))) return MOEKIT_ERR_INVALID_ARGUMENT;
  if (p->n_bytes == 0) return MOEKIT_OK;
  const auto src = reinterpret_cast<uintptr_t>(p->src);
  const auto dst = reinterpret_cast<uintptr_t>(p->dst);
  // Enough resident threads to cover HBM latency: 8 blocks of 256 per multiprocessor.
  const int max_blocks = sm_count() * 8;
  if (src % 16 == 0 && dst % 16 == 0) {
    const uint64_t n_vec = p->n_bytes / 16;
    if (n_vec > 0) {
      const int blocks = (int)std::min<uint64_t>(max_blocks, (n_vec + 255) / 256);
      copy_16b_kernel<<<blocks, 256, 0, stream>>>(static_cast<const uint4 *>(p->src), static_cast<uint4 *>(p->dst),
                                                  n_vec);
      MOEKIT_TRY_LAUNCH();
    }
    const uint64_t tail = p->n_bytes - n_vec * 16;
    if (tail > 0) {
      copy_bytes_kernel<<<1, 32, 0, stream>>>(static_cast<const uint8_t *>(p->src) + n_vec * 16,
                                              static_cast<uint8_t *>(p->dst) + n_vec * 16, tail);
      MOEKIT_TRY_LAUNCH();
    }
    return MOEKIT_OK;
  }
  const int blocks = (int)std::min<uint64_t>(max_blocks, (p->n_bytes + 255) / 256);
  copy_bytes_kernel<<<blocks, 256, 0, stream>>>(static_cast<const uint8_t *>(p->src), static_cast<uint8_t *>(p->dst),
                                                p->n_bytes);
  return last_launch_status();
}

extern "C" moekit_status moekit_empty_kernel(moekit_stream stream) {
  moekit::empty_kernel<<<1, 32, 0, stream>>>();
  return moekit::last_launch_status();
}
