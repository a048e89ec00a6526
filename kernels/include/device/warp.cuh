// Warp-wide reductions and scans over all 32 lanes (every lane must call them).
#pragma once

#include <cstdint>

namespace moekit {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ uint64_t warp_max_u64(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    uint32_t lo = __shfl_xor_sync(kFullMask, (uint32_t)v, o);
    uint32_t hi = __shfl_xor_sync(kFullMask, (uint32_t)(v >> 32), o);
    uint64_t other = ((uint64_t)hi << 32) | lo;
    v = other > v ? other : v;
  }
  return v;
}

// Inclusive prefix sum over the lanes.
__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    int n = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

__device__ __forceinline__ unsigned lanemask_lt(int lane) { return (1u << lane) - 1u; }

}  // namespace moekit
