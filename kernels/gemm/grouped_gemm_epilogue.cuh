// Grouped GEMM, sm_90a: the epilogues of a 128-row tile -- the accumulators (plain, SwiGLU,
// row-scaled) staged in shared memory and written with 16-byte stores or TMA stores.
#pragma once

#include "grouped_gemm_tiles.cuh"

namespace moekit {
namespace gemm {

// g * sigmoid(g) with the fast exponential and reciprocal (device/fast_math.cuh): the IEEE
// division (no fast-math in the build) was a multi-instruction sequence per output element, and
// the SwiGLU GEMM ran 3-13% slower than the plain one though it writes half the bytes
// (BENCHMARKS.md run 23). A few ulp in f32, far inside what the bf16 output keeps.
__device__ __forceinline__ float silu(float g) { return g * sigmoid(g); }

// The output pair a thread holds for 8-column output block `block` and row half `h` (rows
// lane / 4 + 8h of its warp), as bf16 packed in one fragment register: the accumulators, or
// silu(gate) * up for SwiGLU, whose up columns sit BN/2 after their gate columns.
template <int BN, int kEpilogue>
__device__ __forceinline__ uint32_t output_bf16x2(const float (&acc)[BN / 2], int block, int h) {
  const int g = 4 * block + 2 * h;
  if constexpr (kEpilogue == MOEKIT_EPILOGUE_SWIGLU) {
    constexpr int kUp = 4 * (BN / 16);
    return sm90::pack_bf16x2(silu(acc[g]) * acc[g + kUp], silu(acc[g + 1]) * acc[g + 1 + kUp]);
  } else {
    return sm90::pack_bf16x2(acc[g], acc[g + 1]);
  }
}

// Writes one consumer warpgroup's 64 x BN accumulators. Thread (warp w, lane l) holds, for each
// 8-column block i, rows 16w + l/4 (+8) and columns 8i + 2(l%4) (+1): acc[4i + 2h + {0,1}]. They
// go through shared memory so that global stores are whole 16-byte chunks of 256-byte row runs
// (v1 stored the 4-byte pairs directly: ~8% slower GEMMs, measured on the DeepSeek-V3 gate+up).
template <int BN, int kEpilogue, typename OutT>
__device__ __forceinline__ void epilogue(const Args &a, void *y_base, const Tile &tile, const float (&acc)[BN / 2],
                                         int consumer, int warp, int lane, uint8_t *buf) {
  // The row scale is applied on the way out, in f32 (the staging then holds f32): applied to the
  // accumulators it kept two scales live next to them and the consumer spilled at its 240-register
  // limit (so did applying it while staging, run 23). Lane i < 16 of each warp loads the scale of
  // the warp's row i once per tile and the stores fetch it by shuffle (they reloaded it, two
  // dependent global loads, for every 16-byte chunk of every pass).
  constexpr bool kScaleRows = kEpilogue == MOEKIT_EPILOGUE_ROW_SCALE;
  using StageT = typename std::conditional<kScaleRows, float, OutT>::type;
  constexpr int kOutCols = kEpilogue == MOEKIT_EPILOGUE_SWIGLU ? BN / 2 : BN;
  constexpr int kPassCols = kStageRowBytes / (int)sizeof(StageT);
  constexpr int kPasses = (kOutCols + kPassCols - 1) / kPassCols;
  constexpr int kChunkCols = 16 / (int)sizeof(StageT);  // columns per 16-byte staging chunk
  // bf16 staging through stmatrix: 8 instructions per pass instead of 32 st.shared and their
  // swizzle arithmetic (no measurable change in time, BENCHMARKS.md run 29).
  constexpr bool kStmatrix = sizeof(StageT) == 2 && kOutCols % 16 == 0;
  const int row_base = tile.row0 + consumer * 64;
  const int col_base = tile.col_block * kOutCols;
  OutT *y = static_cast<OutT *>(y_base);
  float row_scale = 0.0f;  // lane i < 16: the scale of the warp's row i (the stores' rows)
  if constexpr (kScaleRows) {
    const int r = row_base + warp * 16 + lane % 16;
    if (r < tile.row_end) row_scale = __ldg(a.row_weights + __ldg(a.row_map + r));
  }
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    // 1. accumulators -> staging (columns [pass * kPassCols, +kPassCols) of the tile's output)
    if constexpr (kStmatrix) {
#pragma unroll
      for (int i = pass * kPassCols / 8; i < (pass + 1) * kPassCols / 8 && i < kOutCols / 8; i += 2) {
        sm90::stage_blocks_bf16(buf, warp, lane, i - pass * kPassCols / 8, output_bf16x2<BN, kEpilogue>(acc, i, 0),
                                output_bf16x2<BN, kEpilogue>(acc, i, 1), output_bf16x2<BN, kEpilogue>(acc, i + 1, 0),
                                output_bf16x2<BN, kEpilogue>(acc, i + 1, 1));
      }
    } else {
#pragma unroll
      for (int i = pass * kPassCols / 8; i < (pass + 1) * kPassCols / 8 && i < kOutCols / 8; ++i) {
        const int col = 8 * i + 2 * (lane % 4) - pass * kPassCols;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = warp * 16 + lane / 4 + 8 * h;
          float v0, v1;
          if constexpr (kEpilogue == MOEKIT_EPILOGUE_SWIGLU) {
            constexpr int kHalfBlocks = BN / 16;  // up columns sit BN/2 after their gate columns
            v0 = silu(acc[4 * i + 2 * h]) * acc[4 * (i + kHalfBlocks) + 2 * h];
            v1 = silu(acc[4 * i + 2 * h + 1]) * acc[4 * (i + kHalfBlocks) + 2 * h + 1];
          } else {
            v0 = acc[4 * i + 2 * h];
            v1 = acc[4 * i + 2 * h + 1];
          }
          stage_pair<StageT>(buf, row, col, v0, v1);
        }
      }
    }
    warpgroup_barrier(1 + consumer);
    // 2. staging -> global: each warp copies 16 rows, two per instruction, one chunk per lane
    const int chunk = lane % 16;
    const int col = col_base + pass * kPassCols + chunk * kChunkCols;
    // A pass may be wider than the tile (BN = 64): the chunks past it belong to the next column
    // block, another CTA's.
    const bool in_tile = pass * kPassCols + chunk * kChunkCols < kOutCols;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int row = warp * 16 + 2 * j + lane / 16;
      const int r = row_base + row;
      float s = 0.0f;
      if constexpr (kScaleRows) s = __shfl_sync(0xffffffffu, row_scale, 2 * j + lane / 16);  // every lane
      if (in_tile && r < tile.row_end && col < a.n_out) {
        const uint4 v = staged_chunk(buf, row, chunk);
        if constexpr (kScaleRows) {
          const float f[4] = {__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z), __uint_as_float(v.w)};
          if constexpr (sizeof(OutT) == 2) {
            __nv_bfloat162 *dst = reinterpret_cast<__nv_bfloat162 *>(y + (int64_t)r * a.n_out + col);
            __nv_bfloat162 lo = __floats2bfloat162_rn(s * f[0], s * f[1]);
            __nv_bfloat162 hi = __floats2bfloat162_rn(s * f[2], s * f[3]);
            uint2 packed;
            memcpy(&packed.x, &lo, 4);
            memcpy(&packed.y, &hi, 4);
            *reinterpret_cast<uint2 *>(dst) = packed;
          } else {
            *reinterpret_cast<float4 *>(y + (int64_t)r * a.n_out + col) =
                make_float4(s * f[0], s * f[1], s * f[2], s * f[3]);
          }
        } else {
          *reinterpret_cast<uint4 *>(y + (int64_t)r * a.n_out + col) = v;
        }
      }
    }
    warpgroup_barrier(1 + consumer);  // the next pass (or tile) overwrites the buffer
  }
}

// The TMA-store epilogue (kTmaRounds > 0): the consumer stages its 64 x kOutCols bf16 output in
// boxes of 64 columns (one stmatrix per two 8-column blocks), in kTmaRounds rounds of equal
// shares of the boxes, and, when all 64 rows belong to the expert, one thread hands each round's
// boxes to TMA stores; the warpgroup goes back to the MMAs while the last round drains. A half
// with rows past the expert's segment (those rows belong to the next expert) is copied by the
// threads with masked 16-byte stores instead. Before a round overwrites the buffer, the stores
// issued from it have read it (bulk_wait_group_read: for the first round, those of the previous
// tile, long complete by then).
template <int BN, int kEpilogue, int kTmaRounds>
__device__ __forceinline__ void epilogue_tma(const Args &a, const CUtensorMap *map_y, const Tile &tile,
                                             const float (&acc)[BN / 2], int consumer, int warp, int lane,
                                             uint8_t *buf) {
  constexpr int kOutCols = kEpilogue == MOEKIT_EPILOGUE_SWIGLU ? BN / 2 : BN;
  constexpr int kBoxes = kOutCols / 64;
  constexpr int kRoundBoxes = kBoxes / kTmaRounds;
  static_assert(kBoxes % kTmaRounds == 0, "rounds of equal shares of the boxes");
  const int tid = threadIdx.x % 128;
  const int row_base = tile.row0 + consumer * 64;
  const int col_base = tile.col_block * kOutCols;
  const bool full = row_base + 64 <= tile.row_end;
#pragma unroll
  for (int round = 0; round < kTmaRounds; ++round) {
    if (tid == 0) sm90::bulk_wait_group_read<0>();  // the stores issued from the buffer have read it
    warpgroup_barrier(1 + consumer);                 // ... and every thread's masked copy is done
#pragma unroll
    for (int i = round * kRoundBoxes * 8; i < (round + 1) * kRoundBoxes * 8; i += 2) {
      sm90::stage_blocks_boxed_bf16(buf, warp, lane, i - round * kRoundBoxes * 8,
                                    output_bf16x2<BN, kEpilogue>(acc, i, 0), output_bf16x2<BN, kEpilogue>(acc, i, 1),
                                    output_bf16x2<BN, kEpilogue>(acc, i + 1, 0),
                                    output_bf16x2<BN, kEpilogue>(acc, i + 1, 1));
    }
    const int col0 = col_base + round * kRoundBoxes * 64;
    if (full) {
      sm90::fence_proxy_async_shared();  // the staged values, for the TMA engine's reads
      warpgroup_barrier(1 + consumer);
      if (tid == 0) {
#pragma unroll
        for (int b = 0; b < kRoundBoxes; ++b) {
          sm90::tma_store_2d(map_y, buf + b * sm90::kBoxBytes, col0 + b * 64, row_base);
        }
        sm90::bulk_commit_group();
      }
    } else {
      warpgroup_barrier(1 + consumer);
      __nv_bfloat16 *y = static_cast<__nv_bfloat16 *>(a.y);
#pragma unroll
      for (int b = 0; b < kRoundBoxes; ++b) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int idx = j * 128 + tid, row = idx / 8, c = idx % 8;
          const int r = row_base + row, col = col0 + b * 64 + c * 8;
          if (r < tile.row_end && col < a.n_out) {
            *reinterpret_cast<uint4 *>(y + (int64_t)r * a.n_out + col) = sm90::boxed_chunk(buf, b, row, c);
          }
        }
      }
    }
  }
}

// Staging bytes per consumer warpgroup: one 256-byte-row pass, or (kTmaRounds) one round's share
// of its output.
template <int BN, int kEpilogue, int kTmaRounds>
constexpr size_t staging_bytes() {
  return kTmaRounds > 0 ? (size_t)64 * (kEpilogue == MOEKIT_EPILOGUE_SWIGLU ? BN / 2 : BN) * 2 / kTmaRounds
                        : (size_t)64 * kStageRowBytes;
}

}  // namespace gemm
}  // namespace moekit
