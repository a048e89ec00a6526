// Grouped expert GEMM, sm_90a: persistent, warp-specialized, TMA + WGMMA.
//
//   Y[rows of e, :] = X[rows of e, :] . W[e]^T    for every local expert e, in one launch.
//
// Cost model (DeepSeek-V3 gate+up, T = 16384: 131072 rows, N = 4096, K = 7168): 7.7 TFLOP, and the
// weights (15 GB) are read once when each expert's M tiles run together: at ~700 TFLOP/s 11 ms of
// math against 3.5 ms of weight traffic, so large T is compute-bound; at T = 4096 (128 rows per
// expert) the two meet (~3 ms each) and the kernel must stream weights while computing.
//
// Structure (one CTA per SM, claiming tiles in order from a global counter):
//   warpgroup 0      one thread issues TMA loads of an X tile [128 x 64] (two 64-row boxes) and a
//                    W tile [BN x 64]
//                    per stage into a kStages-deep shared-memory ring (128-byte swizzle);
//   warpgroups 1, 2  each owns 64 rows of the 128-row tile and runs m64nBNk16 WGMMAs over the ring,
//                    then stages its rows in shared memory (with the epilogue's math) and writes
//                    them with 16-byte stores (epilogue) or hands them to TMA stores that drain
//                    while it starts the next tile (epilogue_tma: bf16 STORE and SWIGLU outputs).
// For K >= 4096 the 128 x 256 kernel runs as 2-CTA clusters whose CTAs take consecutive tiles and
// load half of a shared W tile each, multicast to both (produce_pairs).
//   full[s]  (1 arrival + TMA bytes)   : the stage holds data;
//   empty[s] (8 arrivals: lane 0 of every consumer warp) : the stage may be overwritten.
// Tiles come from the routing plan's device-side list of (expert, first row) M tiles; tile t maps
// to (M tile, column block) so that all M tiles of an expert sweep each column block together (one
// W tile feeds them from L2) and all column blocks of an M tile run in the same window (its X tile
// stays in L2). Rows past an expert's segment are computed on whatever
// the tile holds (the next expert's rows, or TMA's zero fill) and never stored.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "device/fast_math.cuh"
#include "device/sm90.cuh"
#include "device/sm90_cluster.cuh"
#include "device/staging.cuh"
#include "device/wgmma_ops.cuh"
#include "moekit/grouped_gemm.h"

namespace moekit {
namespace gemm {

using sm90::kStageRowBytes;
using sm90::stage_pair;
using sm90::staged_chunk;
using sm90::store_pair;
using sm90::warpgroup_barrier;
using sm90::wgmma_tile;

constexpr int kBlockM = MOEKIT_GEMM_BLOCK_M;  // two consumer warpgroups x 64 rows
constexpr int kBlockK = 64;                   // 64 bf16 = 128 bytes: one swizzle row
constexpr int kConsumers = 2;
constexpr int kThreads = 128 * (1 + kConsumers);

// What the device needs besides the two tensor maps.
struct Args {
  const int32_t *tiles;
  const int32_t *num_tiles;
  const int32_t *offsets;
  const int32_t *counts;
  const int32_t *row_map;
  const float *row_weights;
  int32_t *tile_counter;  // zeroed before the launch; CTAs claim tiles from it in order
  void *y;
  // Split-K: each (tile, split) sums k-blocks [split * kb_per_split, +kb_per_split) into
  // partials + split * split_stride (f32, the layout of y); split_k = 1 writes y directly.
  float *partials;
  int64_t split_stride;
  int32_t split_k;
  int32_t kb_per_split;
  int32_t n;      // weight rows per expert
  int32_t k;
  int32_t n_out;  // output columns (n, or n/2 for SwiGLU); also the row stride of y
  // Experts with more M tiles than this sweep their column blocks in bands of about this many M
  // tiles (decode_tile; rounded up to an even count); 0: one band per expert.
  int32_t band_m;
  // Pair kernels: an expert's full M tile paired with its last tile of at most swap_rows rows runs
  // as a tall pair (produce_pairs; the last tile swapped, run_swapped): 0 never, else always.
  // grouped_gemm.cu's tall_pairs says why.
  int32_t tall_pairs;
  // 128 x 256 kernels with bf16 outputs: a tile of at most swap_rows (16 or 32) rows
  // runs swapped on both consumers (run_swapped): 0 never, 1 in single CTAs, 2 in pairs too.
  // grouped_gemm.cu's swap_small.
  int32_t swap_small;
  int32_t swap_rows;
  // Folding kernels of 32 rows: a fold of at most 16 rows runs m64n16 instead of m64n32 (1 always,
  // 0 never; grouped_gemm.cu's fold_narrow).
  int32_t fold_narrow;
  // Folding kernels: an expert of at least two full tiles before its fold splits the fold's
  // columns between its last two full tiles (fold_role; 1 always, 0 never; grouped_gemm.cu's
  // fold_spread).
  int32_t fold_spread;
};

struct Tile {
  int expert;
  int row0;     // first row of the 128-row tile
  int row_end;  // end of the expert's real rows
  int col_block;
};

// Persistent tile t -> (M tile, column block). The M tiles of expert e are consecutive entries of
// the plan's list, [base, base + m_tiles); its tiles are t in [base * nb, (base + m_tiles) * nb),
// ordered column-block-major so consecutive CTAs share a W tile (within bands of M tiles for
// experts of more than a.band_m M tiles).
//
// kTailPairs (the 2-CTA clusters, whose CTAs run consecutive tiles in lockstep): an expert whose
// last M tile holds at most 64 rows behind an even number of full tiles (DeepSeek-V3 T = 16384:
// 4 + a few rows on half the experts) orders each two column blocks as [c: full tiles]
// [c + 1: full tiles] [last tile of c, last tile of c + 1]. The full tiles still pair up within
// a column block (sharing W) and the two one-warpgroup tiles pair with each other, instead of one
// of them holding a full tile's CTA in lockstep for twice its math. By a pair-by-pair count the
// slots of DeepSeek-V3 gate+up T = 16384 fall from 1.12x to 1.06x the balanced routing's, and
// ncu puts that kernel at 90-95% of the tensor pipe; measured back to back (at the power cap,
// where idle slots partly turn into clock) it is 1.1-1.3% faster (BENCHMARKS.md run 26). Both
// column blocks' W tiles were streamed a few tiles earlier, so the last tiles read them from L2.
template <bool kTailPairs = false>
__device__ __forceinline__ Tile decode_tile(const Args &a, int t, int col_blocks) {
  const int q = t / col_blocks;
  const int e = __ldg(a.tiles + 2 * q);
  const int first = __ldg(a.tiles + 2 * q + 1);
  const int seg = __ldg(a.offsets + e);
  const int count = __ldg(a.counts + e);
  const int base = q - (first - seg) / kBlockM;
  const int m_tiles = (count + kBlockM - 1) / kBlockM;
  const int local = t - base * col_blocks;
  int m_tile = local % m_tiles, col_block = local / m_tiles;
  if (a.band_m > 0 && m_tiles > a.band_m) {
    // Bands of an even number of M tiles (a pair that starts on an even tile stays within one
    // column block), all but the last of size `band` (bands of 33 M tiles under a limit of 24: 18
    // and 15); each band sweeps every column block before the next starts (grouped_gemm.cu's
    // band_m_tiles says why). Banded experts keep this order even where kTailPairs would reorder
    // their last tiles: their tail is one tile of dozens.
    const int bands = (m_tiles + a.band_m - 1) / a.band_m;
    const int band = ((m_tiles + bands - 1) / bands + 1) & ~1;
    const int j = local / (band * col_blocks);
    const int r = local - j * band * col_blocks;
    const int size = min(band, m_tiles - j * band);
    m_tile = j * band + r % size;
    col_block = r / size;
  } else if (kTailPairs) {
    const int full = m_tiles - 1;
    if (full >= 2 && full % 2 == 0 && col_blocks % 2 == 0 && count - full * kBlockM <= 64) {
      const int group = local / (2 * m_tiles), r = local % (2 * m_tiles);
      m_tile = r < 2 * full ? r % full : full;
      col_block = 2 * group + (r < 2 * full ? r / full : r - 2 * full);
    }
  }
  return Tile{e, seg + m_tile * kBlockM, seg + count, col_block};
}

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

template <int BN, int kStages, int kEpilogue = MOEKIT_EPILOGUE_STORE, int kTmaRounds = 0, int kFoldRows = 0>
constexpr size_t smem_bytes() {
  // + the cluster's claim mailbox: 4 barriers and 2 work-item ids (unused without clusters).
  return (size_t)kStages * (kBlockM + BN + kFoldRows) * kBlockK * 2 +
         (size_t)kConsumers * staging_bytes<BN, kEpilogue, kTmaRounds>() +
         2 * kStages * sizeof(uint64_t) + kStages * sizeof(int4) + 4 * sizeof(uint64_t) + 2 * sizeof(int32_t) + 1024;
}

// The shared memory a 2-CTA cluster's producers coordinate through (each CTA has its own copy),
// right after the stage records. Derived from them where used: held as three pointers across the
// producer's loop, they spilled at its 24 registers.
struct PairMailbox {
  uint64_t *claim_full;   // [2] rank 1: a work item claimed by rank 0 is in claim_box
  uint64_t *claim_empty;  // [2] rank 0: rank 1 has read that slot
  int32_t *claim_box;     // [2] rank 1: the work items
};
template <int kStages>
__device__ __forceinline__ PairMailbox pair_mailbox(int4 *stage_info) {
  uint64_t *bars = reinterpret_cast<uint64_t *>(stage_info + kStages);
  return PairMailbox{bars, bars + 2, reinterpret_cast<int32_t *>(bars + 4)};
}

// The producer of one CTA of a 2-CTA cluster sharing W tiles (K >= 4096; grouped_gemm.cu says why).
// Work item u is the tile pair (2u, 2u + 1) of the single-CTA order; rank r computes tile 2u + r.
// Consecutive tiles are consecutive M tiles of one expert and column block (decode_tile), so most
// pairs need the same W tile: then each producer loads half of it (BN/2 rows: for SwiGLU the gate
// half or the up half) and multicasts it into both CTAs' stage, and L2 serves each W tile once
// per pair instead of once per tile (32 instead of 48 KB per k-block per CTA). A pair that
// straddles two column blocks or experts (an odd M-tile count) loads its W tiles separately; a
// rank past the last tile arrives with no bytes and its consumers skip the math. Every stage is
// freed by the consumers of both CTAs (the peer may multicast into it), so both CTAs run the same
// number of stages per item. Rank 0 claims items from the global counter and hands each to rank 1
// through a two-slot mailbox. (The X-multicast cluster of run 19 cut 17% of the L2 bytes and
// measured -0.5..+6%; this one cuts a third and takes 8-9% off the DeepSeek-V3 gate+up at
// T = 4096, BENCHMARKS.md run 24. Multicasting X between the ranks of a pair whose tiles hold
// the same rows in different column blocks measured even to +2.7%, run 33 call 9: a stage that
// waits on the peer's box costs more than the L2 bytes it saves.)
//
// kTall (a.tall_pairs > 0): a pair of an expert's full M tile (rank 0) and its next and last M
// tile of at most a.swap_rows (32) rows (rank 1) in one column block runs as a tall pair. Each
// rank loads the full tile's rows [64 r, 64 r + 64) as its first X box and the last tile's rows
// as its second; its consumer 0 multiplies the first box by the whole W tile, its consumer 1 the
// second box by the W rows of the rank's half of the output columns, swapped (run_swapped: m64n16
// or m64n32). Both CTAs then run ~2.5 of the 4 row-block units of math per k-block instead of 4 and 2
// (grouped_gemm.cu's tall_pairs has the measurements). The rank goes to the consumers in bits
// 28-29 of the stage record's tile index.
template <int BN, int kStages, int kEpilogue, bool kTall>
__device__ __forceinline__ void produce_pairs(const CUtensorMap *map_x, const CUtensorMap *map_w, const Args &a,
                                              __nv_bfloat16 *sa, __nv_bfloat16 *sb, uint64_t *full,
                                              uint64_t *empty, int4 *stage_info) {
  constexpr int kTileA = kBlockM * kBlockK;
  constexpr int kTileB = BN * kBlockK;
  constexpr int kColsPerTile = kEpilogue == MOEKIT_EPILOGUE_SWIGLU ? BN / 2 : BN;
  // Sizes recomputed from the parameters where used: held across the loop they spilled at the
  // producer's 24 registers.
  const uint32_t rank = sm90::cluster_ctarank();
  auto col_blocks = [&a] { return (a.n_out + kColsPerTile - 1) / kColsPerTile; };
  auto total = [&a, &col_blocks] { return __ldg(a.num_tiles) * col_blocks(); };
  int stage = 0;
  uint32_t phase = 0;
  for (uint32_t claim = 0;; ++claim) {
    const uint32_t slot = claim & 1, parity = (claim >> 1) & 1;
    int u;
    const PairMailbox box = pair_mailbox<kStages>(stage_info);
    if (rank == 0) {
      sm90::mbar_wait_cluster(&box.claim_empty[slot], parity ^ 1);  // rank 1 has read this slot's last item
      u = atomicAdd(a.tile_counter, 1);
      sm90::st_cluster_u32(sm90::peer_addr(sm90::smem_addr(&box.claim_box[slot]), 1), (uint32_t)u);
      sm90::mbar_arrive_cluster(sm90::peer_addr(sm90::smem_addr(&box.claim_full[slot]), 1));
    } else {
      sm90::mbar_wait_cluster(&box.claim_full[slot], parity);  // acquires rank 0's remote store
      u = box.claim_box[slot];
      sm90::mbar_arrive_cluster(sm90::peer_addr(sm90::smem_addr(&box.claim_empty[slot]), 0));
    }
    if (u >= (total() + 1) / 2) {
      sm90::mbar_wait(&empty[stage], phase ^ 1);
      stage_info[stage].x = -1;
      sm90::mbar_arrive(&full[stage]);
      return;
    }
    const int t = 2 * u + (int)rank;
    const bool mine = t < total();
    const Tile tile = mine ? decode_tile<true>(a, t, col_blocks()) : Tile{-1, 0, 0, 0};
    bool shared = false;  // the same on both ranks
    bool tall = false;    // likewise
    int pair_row0 = tile.row0;
    if (2 * u + 1 < total()) {
      const Tile other = decode_tile<true>(a, 2 * u + (int)(rank ^ 1), col_blocks());
      shared = other.expert == tile.expert && other.col_block == tile.col_block;
      // Rank 0 holds an expert's full M tile and rank 1 the expert's next M tile (decode_tile keeps
      // them in this order): a tall pair when that next tile is the last and holds at most
      // a.swap_rows rows (it then runs swapped).
      const int last_row0 = rank == 0 ? other.row0 : tile.row0;
      pair_row0 = rank == 0 ? tile.row0 : other.row0;
      tall = kTall && shared && a.tall_pairs != 0 && last_row0 == pair_row0 + kBlockM &&
             tile.row_end - last_row0 <= a.swap_rows;
    }
    const int w_row = tile.expert * a.n + tile.col_block * kColsPerTile;
    // The W tile's two halves: SwiGLU pairs BN/2 gate rows with the matching BN/2 up rows.
    const int w_row_1 = w_row + (kEpilogue == MOEKIT_EPILOGUE_SWIGLU ? a.n / 2 : BN / 2);
    // X boxes: the tile's two 64-row halves (the second only if it holds rows of the expert); in a
    // tall pair, the full tile's half of this rank, then the last tile's rows (both ranks).
    const int x_row0 = tall ? pair_row0 + 64 * (int)rank : tile.row0;
    const bool second_box = tall || tile.row0 + 64 < tile.row_end;
    const uint32_t x_bytes = (second_box ? 2u : 1u) * 64 * kBlockK * 2;
    // The stage record's first word: the tile index, with a tall pair's rank + 1 in bits 28-29
    // (the consumers only test it for the stop mark; a column-block bit field made ptxas rewrite
    // the epilogues' address arithmetic, +270 instructions).
    const int info_x = t | (tall ? (int)(rank + 1) << 28 : 0);
    for (int kb = 0; kb < (a.k + kBlockK - 1) / kBlockK; ++kb) {
      // Both CTAs' consumers have freed this stage: the peer's multicast may land in ours.
      sm90::mbar_wait(&empty[stage], phase ^ 1);
      // Published by the arrive below (release), read after the consumers' wait (acquire). A
      // rank without a tile publishes an empty row range.
      stage_info[stage] = mine ? make_int4(info_x, tall ? pair_row0 : tile.row0, tile.row_end, tile.col_block)
                               : make_int4(0, 0, 0, 0);
      if (!mine) {
        sm90::mbar_arrive(&full[stage]);
      } else {
        sm90::mbar_arrive_expect_tx(&full[stage], x_bytes + kTileB * 2);
        sm90::tma_load_2d(sa + stage * kTileA, map_x, kb * kBlockK, x_row0, &full[stage]);
        if (second_box) {
          sm90::tma_load_2d(sa + stage * kTileA + 64 * kBlockK, map_x, kb * kBlockK, tall ? pair_row0 + kBlockM : tile.row0 + 64,
                            &full[stage]);
        }
        __nv_bfloat16 *w_dst = sb + stage * kTileB;
        if (shared) {
          sm90::tma_load_2d_multicast(w_dst + rank * (BN / 2) * kBlockK, map_w, kb * kBlockK, rank == 0 ? w_row : w_row_1,
                                      &full[stage], (uint16_t)0x3);
        } else {
          sm90::tma_load_2d(w_dst, map_w, kb * kBlockK, w_row, &full[stage]);
          sm90::tma_load_2d(w_dst + (BN / 2) * kBlockK, map_w, kb * kBlockK, w_row_1, &full[stage]);
        }
      }
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
  }
}

// Byte offsets, within a stage's W tile, of the two 64-row slices behind half `part` (0 or 1) of
// the tile's output columns: for SwiGLU 64 gate rows and the matching 64 up rows (BN/2 further),
// else 128 consecutive rows. The narrow consumers (consume_narrow) split the W tile this way.
struct WHalf {
  uint32_t off0, off1;
};
template <int BN, int kEpilogue>
__device__ __forceinline__ WHalf w_half(uint32_t part) {
  constexpr uint32_t kRowBytes = kBlockK * 2;
  constexpr bool kSwiglu = kEpilogue == MOEKIT_EPILOGUE_SWIGLU;
  const uint32_t off0 = (kSwiglu ? part * 64 : part * 128) * kRowBytes;
  return WHalf{off0, off0 + (kSwiglu ? BN / 2 : 64) * kRowBytes};
}

// m64nNk16 for the swapped tiles' N (their row count rounded up to 16 or 32).
template <int N>
__device__ __forceinline__ void wgmma_swapped(float (&acc)[N / 2], uint64_t desc_w, uint64_t desc_x, uint32_t scale_d) {
  if constexpr (N == 16) {
    sm90::wgmma_m64n16k16_bf16(acc, desc_w, desc_x, scale_d);
  } else {
    static_assert(N == 32, "swapped tiles of 16 or 32 rows");
    sm90::wgmma_m64n32k16_bf16(acc, desc_w, desc_x, scale_d);
  }
}

// The k-blocks of a consumer that multiplies one 64-row X box of the stage (x_box) by two slices
// of the W tile, at byte offsets w.off0 and w.off1 of the stage, into acc's two halves; then the
// stage is freed (in both CTAs for pairs). Used by a tall pair's last-tile consumer
// (produce_pairs: X box 1, this rank's half of the output columns) and by single CTAs' small tiles
// (X box 0, each consumer half of the W tile's rows).
// kSwappedN = 16 or 32 (a tile of at most that many rows): W's rows are the M side and the tile's
// rows the N side (m64nN), so the math shrinks with the rows instead of covering 64; each thread
// holds W rows 16w + l/4 (+8) and tile rows 8i + 2(l%4) (+1), transposed on the way out
// (epilogue_swapped). (Until run 34 tall pairs ran last tiles of 17-64 rows here unswapped, as two
// m64n64; that fourth WGMMA shape kept the pairs from swapping 17-32 rows.)
// A second WGMMA shape in the kernel is fine for ptxas in a loop of its own with its own
// accumulators: under a branch inside the main loop, predicated, or on the main loop's
// accumulators, ptxas serialized every WGMMA of the kernel (C7519/C7520/C7511; BENCHMARKS.md
// runs 25, 26 and 30).
template <int BN, int kStages, bool kPair, int kSwappedN>
__device__ __forceinline__ void consume_narrow(float (&acc)[kSwappedN], const __nv_bfloat16 *sa,
                                               const __nv_bfloat16 *sb, uint64_t *full, uint64_t *empty, int &stage,
                                               uint32_t &phase, int k_blocks, int x_box, int lane, WHalf w) {
  constexpr int kTileA = kBlockM * kBlockK;
  constexpr int kTileB = BN * kBlockK;
  static_assert(kSwappedN == 16 || kSwappedN == 32, "swapped tiles of 16 or 32 rows");
  constexpr int kHalf = kSwappedN / 2;
  float(&acc0)[kHalf] = *reinterpret_cast<float(*)[kHalf]>(&acc[0]);
  float(&acc1)[kHalf] = *reinterpret_cast<float(*)[kHalf]>(&acc[kHalf]);
  const uint32_t peer_empty = kPair ? sm90::peer_addr(sm90::smem_addr(empty), sm90::cluster_ctarank() ^ 1) : 0u;
  for (int kb = 0; kb < k_blocks; ++kb) {
    sm90::mbar_wait(&full[stage], phase);  // passes at once for kb = 0 (the caller waited)
    const uint32_t x_base = sm90::smem_addr(sa + stage * kTileA + x_box * 64 * kBlockK);
    const uint32_t w_base = sm90::smem_addr(sb + stage * kTileB);
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      const uint32_t scale_d = (kb > 0 || kk > 0) ? 1u : 0u;
      const uint64_t dx = sm90::desc_k_major_sw128(x_base + kk * 32);
      const uint64_t dw0 = sm90::desc_k_major_sw128(w_base + w.off0 + kk * 32);
      const uint64_t dw1 = sm90::desc_k_major_sw128(w_base + w.off1 + kk * 32);
      wgmma_swapped<kSwappedN>(acc0, dw0, dx, scale_d);
      wgmma_swapped<kSwappedN>(acc1, dw1, dx, scale_d);
    }
    sm90::wgmma_commit();
    sm90::fence_operands(acc0);
    sm90::fence_operands(acc1);
    sm90::wgmma_wait<0>();
    sm90::fence_operands(acc0);
    sm90::fence_operands(acc1);
    sm90::release_stage(&empty[stage], lane);
    if constexpr (kPair) {
      if (lane == 0) sm90::mbar_arrive_remote(peer_empty + stage * (uint32_t)sizeof(uint64_t));
    }
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
}

// Writes a swapped consume_narrow's product: rows [row0, row0 + N) (those below row_end) of the
// bf16 output, columns [col_block * kCols, +kCols) with kCols = 128 (plain: acc[0, N/2) the first
// 64, acc[N/2, N) the next 64; ROW_SCALE: times the row's routing weight) or 64 (SwiGLU:
// silu(acc[f]) * acc[N/2 + f]). Transposed through the consumer's staging buffer as bf16
// [N][kCols], then copied in masked 16-byte chunks.
template <int kEpilogue, int N>
__device__ __forceinline__ void epilogue_swapped(const Args &a, int row0, int row_end, int col_block,
                                                 const float (&acc)[N], int consumer, int warp, int lane,
                                                 uint8_t *buf) {
  constexpr bool kSwiglu = kEpilogue == MOEKIT_EPILOGUE_SWIGLU;
  constexpr int kCols = kSwiglu ? 64 : 128;
  constexpr int kBlocks = N / 8;  // 8-row blocks of the tile: i in the fragment order
  const int tid = threadIdx.x % 128;
  // ROW_SCALE: the weights of the thread's rows 8i + 2(l%4) + j, loaded before the barrier.
  float scale[2 * kBlocks];
#pragma unroll
  for (int q = 0; q < 2 * kBlocks; ++q) scale[q] = 1.0f;
  if constexpr (kEpilogue == MOEKIT_EPILOGUE_ROW_SCALE) {
#pragma unroll
    for (int q = 0; q < 2 * kBlocks; ++q) {
      const int r = row0 + 8 * (q / 2) + 2 * (lane % 4) + q % 2;
      if (r < row_end) scale[q] = __ldg(a.row_weights + __ldg(a.row_map + r));
    }
  }
  if (tid == 0) sm90::bulk_wait_group_read<0>();  // earlier TMA stores from the buffer have read it
  warpgroup_barrier(1 + consumer);
  __nv_bfloat16 *st = reinterpret_cast<__nv_bfloat16 *>(buf);
#pragma unroll
  for (int i = 0; i < kBlocks; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = 8 * i + 2 * (lane % 4) + j, m = 16 * warp + lane / 4 + 8 * h;
        const int f = 4 * i + 2 * h + j;
        if constexpr (kSwiglu) {
          st[n * kCols + m] = __float2bfloat16_rn(silu(acc[f]) * acc[N / 2 + f]);
        } else {
          const float w = scale[2 * i + j];
          st[n * kCols + m] = __float2bfloat16_rn(w * acc[f]);
          st[n * kCols + 64 + m] = __float2bfloat16_rn(w * acc[N / 2 + f]);
        }
      }
    }
  }
  warpgroup_barrier(1 + consumer);
  __nv_bfloat16 *y = static_cast<__nv_bfloat16 *>(a.y);
#pragma unroll
  for (int idx = tid; idx < N * kCols / 8; idx += 128) {
    const int n = idx / (kCols / 8), c = idx % (kCols / 8);
    const int r = row0 + n, col = col_block * kCols + 8 * c;
    if (r < row_end && col < a.n_out) {
      *reinterpret_cast<uint4 *>(y + (int64_t)r * a.n_out + col) = *reinterpret_cast<const uint4 *>(st + n * kCols + 8 * c);
    }
  }
  // The staged epilogue (kTmaRounds = 0) of this consumer's next tile writes the buffer without a
  // barrier first (it relies on the one that ends every epilogue): without this one, only the
  // next tile's WGMMAs, which no memory model orders, kept those writes behind the reads above
  // (racecheck reported it in the row-scaled pair kernel, BENCHMARKS.md run 39 call 2).
  warpgroup_barrier(1 + consumer);
}

// Runs a tile of at most 32 rows swapped: N = 16 or 32 by its row count (`rows`; 32 only where
// a.swap_rows allows it). Returns false (nothing done) for more rows. The kernels hold three WGMMA
// shapes (m64n256, m64n16, m64n32), each in loops of their own; a fourth (the tall pairs' m64n64
// until run 34) made ptxas serialize every WGMMA and spill (C7512).
template <int BN, int kStages, bool kPair, int kEpilogue>
__device__ __forceinline__ bool run_swapped(const Args &a, int rows, int row0, int row_end, int col_block,
                                            const __nv_bfloat16 *sa, const __nv_bfloat16 *sb, uint64_t *full,
                                            uint64_t *empty, int &stage, uint32_t &phase, int k_blocks, int x_box,
                                            int consumer, int warp, int lane, WHalf w, uint8_t *buf) {
  if (rows <= 16) {
    float acc[16];
    consume_narrow<BN, kStages, kPair, 16>(acc, sa, sb, full, empty, stage, phase, k_blocks, x_box, lane, w);
    epilogue_swapped<kEpilogue, 16>(a, row0, row_end, col_block, acc, consumer, warp, lane, buf);
    return true;
  }
  if (rows <= a.swap_rows) {
    float acc[32];
    consume_narrow<BN, kStages, kPair, 32>(acc, sa, sb, full, empty, stage, phase, k_blocks, x_box, lane, w);
    epilogue_swapped<kEpilogue, 32>(a, row0, row_end, col_block, acc, consumer, warp, lane, buf);
    return true;
  }
  return false;
}

// Folded last tiles (kFoldRows > 0, single CTAs): an expert whose last M tile holds at most
// kFoldRows rows behind a full tile runs that last tile inside the full one. The small tile alone
// streamed a whole W tile from L2 for a few rows and cost ~70% of a full tile's time (W-load-bound:
// balanced routing with 8 more rows per expert took the DeepSeek-V3 T = 16384 down projection from
// 6000 to 6909 us with the small tiles swapped, BENCHMARKS.md run 31 call 7); folded, it is two
// swapped m64nF WGMMAs per 16-deep slice beside each consumer's m64n256 (F = kFoldRows, 16 or 32:
// +1/8 or +1/4 of the math) on the W tile already in the stage, and one F-row X box (2 or 4 KB)
// more per stage.
//   - decode: the producer skips the small tile (folded_away) and loads its rows as the fold box
//     of the full tile before it; both sides tell a folding tile by its row range alone
//     (folds_next): 128 < row_end - row0 <= 128 + kFoldRows holds exactly for the full tile
//     right before an expert's last tile of at most kFoldRows rows.
//   - each consumer multiplies its 64 rows by the whole W tile and the fold box by the W rows of
//     its half of the output columns (w_half), as a swapped small tile does (run_swapped).
template <int kFoldRows>
__device__ __forceinline__ bool folds_next(int row0, int row_end) {
  return kFoldRows > 0 && row_end - row0 > kBlockM && row_end - row0 <= kBlockM + kFoldRows;
}
template <int kFoldRows>
__device__ __forceinline__ bool folded_away(const Args &a, const Tile &tile) {
  return kFoldRows > 0 && tile.row_end - tile.row0 <= kFoldRows && tile.row0 - __ldg(a.offsets + tile.expert) >= kBlockM;
}

// Who multiplies a fold (a.fold_spread). The CTA of the folding tile, alone, ran its k-blocks
// ~1.5x slower than the three CTAs sharing its W tile and fell behind them: by its last k-blocks
// the L2 had let their W go, and it read them from DRAM again (ncu, DeepSeek-V3 gate+up SwiGLU
// at T = 16896 balanced, every expert folding 16 rows: 26.95 GB of DRAM reads against 17.6 GB
// with no folds, BENCHMARKS.md run 40). Spread, the fold's two output halves go to two CTAs --
// consumer 0 of the folding tile and consumer 1 of the full tile before it, each on the W rows of
// its own half as before -- so each runs half the extra and both keep closer pace with the rest.
// The producer tells the role in bits 28-29 of the stage's tile index (a tall pair's bits: no
// folding kernel runs tall pairs).
enum FoldRole : int {
  kNoFold = 0,
  kFoldBoth = 1,    // the folding tile, both consumers fold (no full tile before it, or not spread)
  kFoldFirst = 2,   // the folding tile, consumer 0 folds (its output half); the helper has the other
  kFoldHelper = 3,  // the full tile before a folding one: consumer 1 folds (a box 256 rows past row0)
};
template <int kFoldRows>
__device__ __forceinline__ int fold_role(const Args &a, const Tile &tile) {
  if constexpr (kFoldRows == 0) {
    return kNoFold;
  } else {
    const int span = tile.row_end - tile.row0;
    if (folds_next<kFoldRows>(tile.row0, tile.row_end)) {
      const bool helped = a.fold_spread != 0 && tile.row0 - __ldg(a.offsets + tile.expert) >= kBlockM;
      return helped ? kFoldFirst : kFoldBoth;
    }
    // 256 < span <= 256 + kFoldRows holds exactly for the full tile two before an expert's last
    // tile of at most kFoldRows rows, i.e. the full tile before the folding one.
    if (a.fold_spread != 0 && span > 2 * kBlockM && span <= 2 * kBlockM + kFoldRows) return kFoldHelper;
    return kNoFold;
  }
}
// The first row of the fold box a tile of this role loads and writes.
__device__ __forceinline__ int fold_row0(int role, int row0) { return row0 + (role == kFoldHelper ? 2 : 1) * kBlockM; }
// Whether this consumer multiplies the fold box in a tile of this role.
__device__ __forceinline__ bool folds_here(int role, int consumer) {
  return role == kFoldBoth || (role == kFoldFirst && consumer == 0) || (role == kFoldHelper && consumer == 1);
}

// The k-blocks of a folding tile: the consumer's m64n256 over its X half and, in the same
// k16 slices, the fold box's rows swapped against the two 64-row W slices of w (one m64nF
// each). One loop of its own with its own accumulators: ptxas keeps one gsb0 per loop (a second
// WGMMA shape under a branch of the main loop serialized every WGMMA, BENCHMARKS.md run 25).
//
// kFoldN (16 or kFoldRows) is the swapped WGMMAs' N: a fold of at most 16 rows in a 32-row folding
// kernel multiplies only the box's first 16 rows (m64n16, half the fold's math; the box still
// holds 32 rows, its rows 16-31 unread). The m64n16 fragment is the first 8 floats of the m64n32
// one (columns 0-15), so acc_fold keeps the 32-row layout and one epilogue_swapped serves both;
// its columns 16-31 are zeroed here and masked there (past row_end).
template <int BN, int kStages, int kFoldRows, int kFoldN = kFoldRows>
__device__ __forceinline__ void consume_folded(float (&acc)[BN / 2], float (&acc_fold)[kFoldRows],
                                               const __nv_bfloat16 *sa, const __nv_bfloat16 *sb,
                                               const __nv_bfloat16 *sf, uint64_t *full, uint64_t *empty, int &stage,
                                               uint32_t &phase, int k_blocks, uint32_t a_consumer, int lane, WHalf w) {
  static_assert(kFoldN == kFoldRows || (kFoldN == 16 && kFoldRows == 32), "a fold's N: 16, or the box's rows");
  constexpr int kTileA = kBlockM * kBlockK;
  constexpr int kTileB = BN * kBlockK;
  constexpr int kTileF = kFoldRows * kBlockK;
  constexpr int kHalf = kFoldRows / 2;
  constexpr int kHalfN = kFoldN / 2;
  float(&fold0)[kHalfN] = *reinterpret_cast<float(*)[kHalfN]>(&acc_fold[0]);
  float(&fold1)[kHalfN] = *reinterpret_cast<float(*)[kHalfN]>(&acc_fold[kHalf]);
#pragma unroll
  for (int i = kHalfN; i < kHalf; ++i) {
    acc_fold[i] = 0.f;
    acc_fold[kHalf + i] = 0.f;
  }
  for (int kb = 0; kb < k_blocks; ++kb) {
    sm90::mbar_wait(&full[stage], phase);  // passes at once for kb = 0 (the caller waited)
    const uint32_t a_base = a_consumer + stage * kTileA * 2;
    const uint32_t b_base = sm90::smem_addr(sb + stage * kTileB);
    const uint32_t f_base = sm90::smem_addr(sf + stage * kTileF);
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      const uint32_t scale_d = (kb > 0 || kk > 0) ? 1u : 0u;
      wgmma_tile<BN>(acc, sm90::desc_k_major_sw128(a_base + kk * 32), sm90::desc_k_major_sw128(b_base + kk * 32),
                     scale_d);
      const uint64_t df = sm90::desc_k_major_sw128(f_base + kk * 32);
      wgmma_swapped<kFoldN>(fold0, sm90::desc_k_major_sw128(b_base + w.off0 + kk * 32), df, scale_d);
      wgmma_swapped<kFoldN>(fold1, sm90::desc_k_major_sw128(b_base + w.off1 + kk * 32), df, scale_d);
    }
    sm90::wgmma_commit();
    sm90::fence_operands(acc);
    sm90::fence_operands(fold0);
    sm90::fence_operands(fold1);
    sm90::wgmma_wait<0>();
    sm90::fence_operands(acc);
    sm90::fence_operands(fold0);
    sm90::fence_operands(fold1);
    sm90::release_stage(&empty[stage], lane);
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
}

// kSplitK: tiles are (tile, split) pairs over k-block ranges, summed into a.partials (a separate
// instantiation: the extra index arithmetic cost the 128 x 256 kernels an 8-byte spill).
// kFoldRows > 0: folded last tiles (consume_folded), single CTAs with TMA stores; map_xf is X in
// boxes of kFoldRows rows (unused otherwise).
template <int BN, int kStages, int kEpilogue, typename OutT, bool kSplitK = false, int kCluster = 1,
          int kTmaRounds = 0, int kFoldRows = 0>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_gemm_wgmma_kernel(const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_w,
                              const __grid_constant__ CUtensorMap map_y, const __grid_constant__ CUtensorMap map_xf,
                              const Args a) {
  constexpr int kTileA = kBlockM * kBlockK;  // elements
  constexpr int kTileB = BN * kBlockK;
  constexpr uint32_t kStageBytes = (kTileA + kTileB) * 2;
  // Output columns per tile: SwiGLU tiles pair BN/2 gate rows with the matching BN/2 up rows.
  constexpr int kColsPerTile = kEpilogue == MOEKIT_EPILOGUE_SWIGLU ? BN / 2 : BN;

  extern __shared__ uint8_t smem_raw[];
  // Swizzled tiles must start on 1024-byte boundaries.
  uint8_t *smem = sm90::align_smem_1024(smem_raw);
  __nv_bfloat16 *sa = reinterpret_cast<__nv_bfloat16 *>(smem);
  __nv_bfloat16 *sb = sa + kStages * kTileA;
  __nv_bfloat16 *sf = sb + kStages * kTileB;  // [kStages][kFoldRows][64]: the fold boxes
  uint8_t *staging = reinterpret_cast<uint8_t *>(sf + kStages * kFoldRows * kBlockK);  // [kConsumers][...]
  static_assert(kFoldRows == 0 || ((kFoldRows == 16 || kFoldRows == 32) && kCluster == 1 && kTmaRounds > 0 &&
                                   BN == 256 && kEpilogue != MOEKIT_EPILOGUE_ROW_SCALE),
                "folded last tiles: single CTAs, 128 x 256 plain or SwiGLU bf16 tiles with TMA stores, 16 or 32 rows");
  constexpr size_t kStagingBytes = staging_bytes<BN, kEpilogue, kTmaRounds>();
  static_assert(kTmaRounds == 0 || (std::is_same<OutT, __nv_bfloat16>::value && !kSplitK &&
                               kEpilogue != MOEKIT_EPILOGUE_ROW_SCALE),
                "TMA stores: bf16 STORE or SWIGLU outputs, without split-K");
  uint64_t *full = reinterpret_cast<uint64_t *>(staging + kConsumers * kStagingBytes);
  uint64_t *empty = full + kStages;
  // Each stage's tile as the producer decoded it: {t (-1 = stop), row0, row_end, col_block}. The
  // consumers decoded it again at every tile start, two dependent global loads and two divisions
  // before their first WGMMA (the MLA kernel publishes its tiles the same way, 7afb15b).
  int4 *stage_info = reinterpret_cast<int4 *>(empty + kStages);  // 16-byte aligned: 2 * kStages words of 8 bytes
  static_assert(kCluster == 1 || (kCluster == 2 && !kSplitK), "clusters of 2 CTAs, without split-K");
  constexpr bool kPair = kCluster == 2;
  // Tall pairs in the TMA-store pair kernels (bf16 STORE and SWIGLU, the gate+up projections):
  // with the staged epilogues (f32 or row-scaled outputs) the second epilogue instance made the
  // consumers spill (5 -> 8..15 spill stores).
  constexpr bool kTall = kPair && kTmaRounds > 0;
  // Swapped small tiles in the 128 x 256 kernels with bf16 outputs: single CTAs (the DeepSeek-V3
  // and Qwen3 down projections, K < 4096) and pairs (K >= 4096: the last tiles of experts that
  // pair with another last tile or straddle column blocks, and W-sharing pairs without tall pairs).
  constexpr bool kSwapSmall = !kSplitK && BN == 256 && std::is_same<OutT, __nv_bfloat16>::value;
  // epilogue_swapped (swapped small tiles, folded rows) transposes up to 32 rows x 128 (SwiGLU 64)
  // bf16 columns through a consumer's staging buffer.
  static_assert(!(kSwapSmall || kFoldRows > 0) ||
                    kStagingBytes >= 32 * (kEpilogue == MOEKIT_EPILOGUE_SWIGLU ? 64 : 128) * 2,
                "the swapped epilogue's transpose fits the staging buffer");
  // The pair producer spills 16 bytes at 24 registers (a local load per k-block in one thread);
  // 40 for it would leave the consumers 232, and the bf16 store epilogue spills there instead.
  constexpr int kProducerRegs = 24;
  constexpr int kConsumerRegs = 240;

  const int warpgroup = threadIdx.x / 128;
  const int col_blocks = (a.n_out + kColsPerTile - 1) / kColsPerTile;
  const int k_blocks = (a.k + kBlockK - 1) / kBlockK;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbar_init(&full[s], 1);
      sm90::mbar_init(&empty[s], kConsumers * 4 * kCluster);  // lane 0 of each consumer warp (of the cluster)
    }
    for (int i = 0; i < 2; ++i) {
      sm90::mbar_init(&pair_mailbox<kStages>(stage_info).claim_full[i], 1);
      sm90::mbar_init(&pair_mailbox<kStages>(stage_info).claim_empty[i], 1);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();
  if constexpr (kPair) sm90::cluster_sync();  // both CTAs' barriers exist before any remote use
  if (warpgroup == 0) {
    // Producer: one thread claims tiles and issues every TMA; the others only give their
    // registers away. Tiles are claimed in order from a global counter: CTAs that share a W tile
    // (the M tiles of one expert and column block) start together and stream it through L2 once.
    // (A static round-robin drifted apart: ncu measured 34% L2 hits and 4.1 TB/s of DRAM traffic,
    // 4x the weights, on the DeepSeek-V3 gate+up at T = 16384.)
    static_assert(sm90::register_split_fits(kProducerRegs, kConsumers, kConsumerRegs),
                  "setmaxnreg would overdraw the CTA's pool");
    sm90::setmaxnreg_dec<kProducerRegs>();
    if (kPair && threadIdx.x == 0) {
      sm90::tma_prefetch_descriptor(&map_x);
      sm90::tma_prefetch_descriptor(&map_w);
      produce_pairs<BN, kStages, kEpilogue, kTall>(&map_x, &map_w, a, sa, sb, full, empty, stage_info);
    } else if (threadIdx.x == 0) {
      sm90::tma_prefetch_descriptor(&map_x);
      sm90::tma_prefetch_descriptor(&map_w);
      const int splits = kSplitK ? a.split_k : 1;
      const int total = __ldg(a.num_tiles) * col_blocks * splits;
      int stage = 0;
      uint32_t phase = 0;
      while (true) {
        const int t = atomicAdd(a.tile_counter, 1);
        if (t >= total) {
          // No bytes: the phase completes on this arrival alone and tells the consumers to stop.
          sm90::mbar_wait(&empty[stage], phase ^ 1);
          stage_info[stage].x = -1;
          sm90::mbar_arrive(&full[stage]);
          break;
        }
        const Tile tile = decode_tile(a, kSplitK ? t / splits : t, col_blocks);
        if (folded_away<kFoldRows>(a, tile)) continue;  // its rows ride with the tile before it
        const int role = fold_role<kFoldRows>(a, tile);
        const bool fold = role != kNoFold;
        const int w_row = tile.expert * a.n + tile.col_block * kColsPerTile;
        const int kb_begin = kSplitK ? (t % splits) * a.kb_per_split : 0;
        const int kb_end = kSplitK ? min(k_blocks, kb_begin + a.kb_per_split) : k_blocks;
        // X arrives as two 64-row boxes, one per consumer; a box wholly past the expert's rows is
        // not loaded (its consumer skips the math). An expert's last tile usually holds few rows
        // (uniform routing at 128 rows per expert: half the experts end in a tile of ~10 rows), so
        // this drops 1/6 of the bytes such a tile moves from L2.
        const bool second_half = tile.row0 + 64 < tile.row_end;
        // A folding tile runs its k-blocks in a loop of its own (issue_k_blocks with the fold box):
        // the fold box's load as a predicate inside the one loop made the producer the bottleneck
        // on tiles that fold nothing (+2.4% balanced at T = 16384, BENCHMARKS.md run 32 call 7),
        // with 3 stages the consumers wait on its issue.
        auto issue_k_blocks = [&](auto with_fold) {
          constexpr bool kWithFold = decltype(with_fold)::value;
          const uint32_t stage_bytes = kStageBytes - (second_half ? 0u : (uint32_t)(64 * kBlockK * 2)) +
                                       (kWithFold ? (uint32_t)(kFoldRows * kBlockK * 2) : 0u);
          for (int kb = kb_begin; kb < kb_end; ++kb) {
            sm90::mbar_wait(&empty[stage], phase ^ 1);
            // Published by the arrive below (release), read after the consumers' wait (acquire).
            stage_info[stage] = make_int4(t | (role << 28), tile.row0, tile.row_end, tile.col_block);
            sm90::mbar_arrive_expect_tx(&full[stage], stage_bytes);
            sm90::tma_load_2d(sa + stage * kTileA, &map_x, kb * kBlockK, tile.row0, &full[stage]);
            if (second_half) {
              sm90::tma_load_2d(sa + stage * kTileA + 64 * kBlockK, &map_x, kb * kBlockK, tile.row0 + 64,
                                &full[stage]);
            }
            if constexpr (kEpilogue == MOEKIT_EPILOGUE_SWIGLU) {
              sm90::tma_load_2d(sb + stage * kTileB, &map_w, kb * kBlockK, w_row, &full[stage]);
              sm90::tma_load_2d(sb + stage * kTileB + (BN / 2) * kBlockK, &map_w, kb * kBlockK, w_row + a.n / 2,
                                &full[stage]);
            } else {
              sm90::tma_load_2d(sb + stage * kTileB, &map_w, kb * kBlockK, w_row, &full[stage]);
            }
            if constexpr (kWithFold) {
              sm90::tma_load_2d(sf + stage * kFoldRows * kBlockK, &map_xf, kb * kBlockK, fold_row0(role, tile.row0),
                                &full[stage]);
            }
            if (++stage == kStages) {
              stage = 0;
              phase ^= 1;
            }
          }
        };
        if (fold) {
          issue_k_blocks(std::true_type{});
        } else {
          issue_k_blocks(std::false_type{});
        }
      }
    }
  } else {
    sm90::setmaxnreg_inc<kConsumerRegs>();
    const int consumer = warpgroup - 1;
    const int warp = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    int stage = 0;
    uint32_t phase = 0;
    float acc[BN / 2];
    // Loop invariants of the main loop, computed once: read there, they were recomputed at every
    // k-block between the stage's barrier and the first WGMMA, where the tensor pipe idles (the
    // other consumer drains at the same time). This consumer's X half of stage 0, broadcast by a
    // shuffle: with it ptxas keeps the address in a register through the main loop (it had
    // rematerialized the thread-index arithmetic there in the folding kernel, an S2R on that
    // path; consume_folded's loop takes the same register since run 34, which drops the S2R it
    // had kept there);
    // the peer CTA's empty barriers (pairs), mapped once (cluster_ctarank and mapa are volatile
    // asm, re-issued wherever written).
    const uint32_t a_consumer = __shfl_sync(0xffffffffu, sm90::smem_addr(sa + consumer * 64 * kBlockK), 0);
    const uint32_t peer_empty = kPair ? sm90::peer_addr(sm90::smem_addr(empty), sm90::cluster_ctarank() ^ 1) : 0u;
    while (true) {
      sm90::mbar_wait(&full[stage], phase);
      const int4 info = sm90::read_stage_info(stage_info, stage, lane);
      const int t = info.x;
      if (t < 0) break;
      const int split = kSplitK ? t % a.split_k : 0;
      // A tall pair (produce_pairs): the rank + 1 in bits 28-29 of the tile index.
      const int tall = kTall ? t >> 28 : 0;
      int row0 = info.y, col_block = info.w;
      if (tall != 0) {
        // Consumer 0: this rank's 64-row half of the full tile (all 256 columns); consumer 1: the
        // last tile's rows, 64 past the full tile's second half for its epilogue's consumer offset,
        // and this rank's half of the columns (an output block of a 128-wide tile).
        row0 += consumer == 1 ? 64 : 64 * (tall - 1);
        if (consumer == 1) col_block = 2 * col_block + tall - 1;
      }
      const Tile tile{-1, row0, info.z, col_block};  // the expert: the producer's business only
      const int kb_begin = kSplitK ? split * a.kb_per_split : 0;
      // The host keeps every split non-empty.
      const int kb_end = kSplitK ? min(k_blocks, kb_begin + a.kb_per_split) : k_blocks;
      // A consumer whose 64 rows all lie past the expert's segment skips the math (the producer
      // did not load them): the ragged last tile of an expert then costs half a tile of
      // tensor-core time.
      const bool active = tile.row0 + consumer * 64 < tile.row_end;
      if constexpr (kTall) {
        if (tall != 0 && consumer == 1) {
          // The last tile's rows by the W rows of this rank's half of the output columns. It holds
          // at most a.swap_rows rows (produce_pairs' tall condition), so run_swapped always takes it.
          const WHalf w = w_half<BN, kEpilogue>((uint32_t)(tall - 1));
          run_swapped<BN, kStages, true, kEpilogue>(a, tile.row_end - (tile.row0 + 64), tile.row0 + 64, tile.row_end,
                                                    tile.col_block, sa, sb, full, empty, stage, phase, k_blocks, 1,
                                                    consumer, warp, lane, w, staging + consumer * kStagingBytes);
          continue;
        }
      }
      // A folding tile runs its k-blocks in consume_folded and writes the folded rows there; its
      // own 128 rows then take the common epilogue below (one instance of it: a second inlined
      // copy for the folding tiles grew the kernel by 60% and measured 1-2% slower on cases
      // without a single fold, BENCHMARKS.md run 32).
      bool folded = false;
      if constexpr (kFoldRows > 0) {
        // Where this consumer does not fold (fold_role), the fold box in the stage goes unread.
        const int role = (t >> 28) & 3;
        if (folds_here(role, consumer)) {
          float acc_fold[kFoldRows];
          const WHalf w = w_half<BN, kEpilogue>((uint32_t)consumer);
          const int fold0 = fold_row0(role, tile.row0);
          if (kFoldRows == 32 && a.fold_narrow != 0 && tile.row_end - fold0 <= 16) {
            consume_folded<BN, kStages, kFoldRows, 16>(acc, acc_fold, sa, sb, sf, full, empty, stage, phase, k_blocks,
                                                       a_consumer, lane, w);
          } else {
            consume_folded<BN, kStages, kFoldRows>(acc, acc_fold, sa, sb, sf, full, empty, stage, phase, k_blocks,
                                                   a_consumer, lane, w);
          }
          // The folded rows first: epilogue_swapped waits for earlier TMA stores to have read the
          // staging buffer, which the tile's own stores (issued last) would make it do at once.
          epilogue_swapped<kEpilogue, kFoldRows>(a, fold0, tile.row_end, 2 * tile.col_block + consumer,
                                                 acc_fold, consumer, warp, lane, staging + consumer * kStagingBytes);
          folded = true;
        }
      }
      if constexpr (kSwapSmall) {
        const int rows = tile.row_end - tile.row0;
        if (!folded && a.swap_small > (kPair ? 1 : 0) && tall == 0 && rows > 0 && rows <= a.swap_rows) {
          // A tile of at most 32 rows (the producer loaded X box 0 only; the whole W tile is in the
          // stage, pairs included): both consumers, each on half of the W tile's rows, swapped --
          // consumer 1 would otherwise idle while consumer 0 multiplied 64 rows. Each consumer
          // writes an output block of a 128-wide tile. (A pair rank without a tile has no rows.)
          if (run_swapped<BN, kStages, kPair, kEpilogue>(a, rows, tile.row0, tile.row_end, 2 * tile.col_block + consumer,
                                                         sa, sb, full, empty, stage, phase, k_blocks, 0, consumer, warp,
                                                         lane, w_half<BN, kEpilogue>((uint32_t)consumer),
                                                         staging + consumer * kStagingBytes)) {
            continue;
          }
        }
      }
      for (int kb = kb_begin; kb < (folded ? kb_begin : kb_end); ++kb) {
        sm90::mbar_wait(&full[stage], phase);  // passes at once for kb = 0 (waited above)
        if (active) {
          const uint32_t a_base = a_consumer + stage * kTileA * 2;
          const uint32_t b_base = sm90::smem_addr(sb + stage * kTileB);
          sm90::wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < kBlockK / 16; ++kk) {
            wgmma_tile<BN>(acc, sm90::desc_k_major_sw128(a_base + kk * 32),
                           sm90::desc_k_major_sw128(b_base + kk * 32), (kb > kb_begin || kk > 0) ? 1u : 0u);
          }
          sm90::wgmma_commit();
          sm90::fence_operands(acc);
          // Drain, then free the stage at once: the other consumer's WGMMAs fill the tensor pipe.
          // (Keeping one group in flight frees each stage a k-block later; with 4 stages the TMA
          // ring ran dry: qwen3 T=16384 gate+up 571 vs 630 TFLOP/s, BENCHMARKS.md run 6.)
          sm90::wgmma_wait<0>();
          sm90::fence_operands(acc);
        }
        sm90::release_stage(&empty[stage], lane);  // every lane's WGMMA reads are complete (the wait above)
        if constexpr (kPair) {
          // The peer's producer may multicast its half of W into this stage too.
          if (lane == 0) sm90::mbar_arrive_remote(peer_empty + stage * (uint32_t)sizeof(uint64_t));
        }
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
      if (active) {
        if constexpr (kTmaRounds > 0) {
          epilogue_tma<BN, kEpilogue, kTmaRounds>(a, &map_y, tile, acc, consumer, warp, lane,
                                                  staging + consumer * kStagingBytes);
        } else {
          void *y_base = kSplitK ? static_cast<void *>(a.partials + split * a.split_stride) : a.y;
          epilogue<BN, kEpilogue, OutT>(a, y_base, tile, acc, consumer, warp, lane, staging + consumer * kStagingBytes);
        }
      }
    }
    // The last TMA stores must have read the staging buffer before the block's shared memory goes.
    if constexpr (kTmaRounds > 0) {
      if (threadIdx.x % 128 == 0) sm90::bulk_wait_group<0>();
    }
  }
  if constexpr (kPair) {
    // Neither CTA leaves while its peer may still arrive on its barriers or multicast into it.
    __syncwarp();
    sm90::cluster_sync();
  }
}

}  // namespace gemm
}  // namespace moekit
