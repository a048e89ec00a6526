// Grouped GEMM, sm_90a: the producer of 2-CTA clusters, whose CTAs claim consecutive tiles
// together and load half of a shared W tile each, multicast to both.
#pragma once

#include "grouped_gemm_tiles.cuh"

namespace moekit {
namespace gemm {

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

}  // namespace gemm
}  // namespace moekit
