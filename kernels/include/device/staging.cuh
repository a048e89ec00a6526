// Pieces shared by the WGMMA kernels' epilogues: the m64nBNk16 dispatch by tile width, the
// per-warpgroup named barrier, and the swizzled shared-memory staging that turns the accumulator
// fragment (4-byte pairs scattered over 8 rows) into whole 16-byte chunks of 256-byte row runs.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "device/wgmma_ops.cuh"

namespace moekit {
namespace sm90 {

template <int BN>
__device__ __forceinline__ void wgmma_tile(float (&acc)[BN / 2], uint64_t da, uint64_t db, uint32_t scale_d) {
  if constexpr (BN == 256) {
    wgmma_m64n256k16_bf16(acc, da, db, scale_d);
  } else if constexpr (BN == 128) {
    wgmma_m64n128k16_bf16(acc, da, db, scale_d);
  } else {
    static_assert(BN == 64, "BN must be 64, 128 or 256");
    wgmma_m64n64k16_bf16(acc, da, db, scale_d);
  }
}

__device__ __forceinline__ void store_pair(__nv_bfloat16 *p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162 *>(p) = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void store_pair(float *p, float a, float b) { *reinterpret_cast<float2 *>(p) = make_float2(a, b); }

// Synchronizes the 128 threads of one warpgroup (ids 1.. are free: 0 is __syncthreads).
__device__ __forceinline__ void warpgroup_barrier(int id) { asm volatile("bar.sync %0, 128;" ::"r"(id) : "memory"); }

// Bytes per row of a consumer warpgroup's staging buffer: an epilogue writes its 64 x BN outputs
// in passes of 256 bytes per row (128 bf16 or 64 f32 columns), 16 KB per warpgroup.
constexpr int kStageRowBytes = 256;

// Stores one value pair at column `col` (within the pass) of staging row `row`. 16-byte chunks are
// XOR-swizzled by row so the 8 rows a warp writes at once fall in different banks.
template <typename OutT>
__device__ __forceinline__ void stage_pair(uint8_t *buf, int row, int col, float a, float b) {
  const int byte = col * (int)sizeof(OutT);
  uint8_t *p = buf + row * kStageRowBytes + (((byte >> 4) ^ (row & 7)) << 4) + (byte & 15);
  store_pair(reinterpret_cast<OutT *>(p), a, b);
}

// The 16-byte chunk `chunk` (0..15) of staging row `row`, as stage_pair laid it out.
__device__ __forceinline__ uint4 staged_chunk(const uint8_t *buf, int row, int chunk) {
  return *reinterpret_cast<const uint4 *>(buf + row * kStageRowBytes + ((chunk ^ (row & 7)) << 4));
}

}  // namespace sm90
}  // namespace moekit
