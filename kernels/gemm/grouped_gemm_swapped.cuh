// Grouped GEMM, sm_90a: small tiles run swapped -- the W tile as the WGMMA's A operand and the
// few X rows as its N -- with their own k-loop and a transposing epilogue.
#pragma once

#include "grouped_gemm_epilogue.cuh"
#include "grouped_gemm_tiles.cuh"

namespace moekit {
namespace gemm {

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

}  // namespace gemm
}  // namespace moekit
