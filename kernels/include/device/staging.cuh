// Pieces shared by the WGMMA kernels' epilogues: the m64nBNk16 dispatch by tile width, the
// per-warpgroup named barrier, and the swizzled shared-memory staging that turns the accumulator
// fragment (4-byte pairs scattered over 8 rows) into whole 16-byte chunks of 256-byte row runs.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "device/sm90.cuh"
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

// Packs two floats as bf16 (round to nearest): a in the low half, as a fragment register holds
// the lower column.
__device__ __forceinline__ uint32_t pack_bf16x2(float a, float b) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t *>(&v);
}

// Stages one warp's accumulators of two 8-column blocks (`block`, `block` + 1; block even, 0..14
// within the pass) of its 16 rows as bf16, the layout stage_pair writes, with one stmatrix: r0, r1
// hold block `block` rows 0-7 and 8-15 of the warp (packed pairs, the fragment's layout), r2, r3
// block + 1. Lane l gives the address of row l % 8 of matrix l / 8. (32 st.shared and their
// swizzle arithmetic per pass became 8 instructions.)
__device__ __forceinline__ void stage_blocks_bf16(uint8_t *buf, int warp, int lane, int block, uint32_t r0,
                                                  uint32_t r1, uint32_t r2, uint32_t r3) {
  const int m = lane >> 3, rr = lane & 7;
  const int row = warp * 16 + 8 * (m & 1) + rr;  // row & 7 == rr
  stmatrix_x4(smem_addr(buf) + row * kStageRowBytes + (((block | (m >> 1)) ^ rr) << 4), r0, r1, r2, r3);
}

// Bytes of one box of a TMA-store staging buffer: 64 rows x 64 bf16 columns (128 bytes per row),
// 16-byte chunk c of row r at chunk c ^ (r % 8), the 128-byte swizzle of the store's tensor map
// (which also puts the 8 rows of a fragment in different banks).
constexpr int kBoxBytes = 64 * 128;

// stage_blocks_bf16 for a buffer of such boxes (columns [64b, 64b + 64) in box b): 8-column
// blocks `block` and `block` + 1 (block even) of the warp's 16 rows.
__device__ __forceinline__ void stage_blocks_boxed_bf16(uint8_t *buf, int warp, int lane, int block, uint32_t r0,
                                                        uint32_t r1, uint32_t r2, uint32_t r3) {
  const int m = lane >> 3, rr = lane & 7;
  const int row = warp * 16 + 8 * (m & 1) + rr;  // row & 7 == rr
  const int chunk = (block & 7) | (m >> 1);
  stmatrix_x4(smem_addr(buf) + (block >> 3) * kBoxBytes + row * 128 + ((chunk ^ rr) << 4), r0, r1, r2, r3);
}

// The 16-byte chunk `chunk` (0..7) of row `row` of box `box`, as stage_blocks_boxed_bf16 laid it
// out.
__device__ __forceinline__ uint4 boxed_chunk(const uint8_t *buf, int box, int row, int chunk) {
  return *reinterpret_cast<const uint4 *>(buf + box * kBoxBytes + row * 128 + ((chunk ^ (row & 7)) << 4));
}

// The 16-byte chunk `chunk` (0..15) of staging row `row`, as stage_pair laid it out.
__device__ __forceinline__ uint4 staged_chunk(const uint8_t *buf, int row, int chunk) {
  return *reinterpret_cast<const uint4 *>(buf + row * kStageRowBytes + ((chunk ^ (row & 7)) << 4));
}

}  // namespace sm90
}  // namespace moekit
