// Grouped GEMM, sm_90a: folded last tiles -- an expert's last tile of a few rows multiplied
// inside a full tile of the same expert, on the W tile already in shared memory.
#pragma once

#include "grouped_gemm_swapped.cuh"
#include "grouped_gemm_tiles.cuh"

namespace moekit {
namespace gemm {

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

}  // namespace gemm
}  // namespace moekit
