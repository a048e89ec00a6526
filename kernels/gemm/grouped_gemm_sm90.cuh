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
//
// Files: grouped_gemm_tiles.cuh (arguments, tile shape, tile schedule), grouped_gemm_epilogue.cuh
// (a tile's epilogues), grouped_gemm_pairs.cuh (the 2-CTA clusters' producer),
// grouped_gemm_swapped.cuh (small tiles swapped), grouped_gemm_fold.cuh (folded last tiles), and
// this one: the kernel. grouped_gemm.cu holds the host side: the heuristics and the launch.
#pragma once

#include "grouped_gemm_epilogue.cuh"
#include "grouped_gemm_fold.cuh"
#include "grouped_gemm_pairs.cuh"
#include "grouped_gemm_swapped.cuh"
#include "grouped_gemm_tiles.cuh"

namespace moekit {
namespace gemm {

template <int BN, int kStages, int kEpilogue = MOEKIT_EPILOGUE_STORE, int kTmaRounds = 0, int kFoldRows = 0>
constexpr size_t smem_bytes() {
  // + the cluster's claim mailbox: 4 barriers and 2 work-item ids (unused without clusters).
  return (size_t)kStages * (kBlockM + BN + kFoldRows) * kBlockK * 2 +
         (size_t)kConsumers * staging_bytes<BN, kEpilogue, kTmaRounds>() +
         2 * kStages * sizeof(uint64_t) + kStages * sizeof(int4) + 4 * sizeof(uint64_t) + 2 * sizeof(int32_t) + 1024;
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
