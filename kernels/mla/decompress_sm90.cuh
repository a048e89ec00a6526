// MLA latent-KV decompression, sm_90a: persistent, warp-specialized, cp.async + TMA + WGMMA.
//
//   for each tile (128 tokens, head h):  [K_nope | V][tokens, 256] = C[tokens, r] . W_kvb[h]^T
//
// Cost model (DeepSeek-V3, H = 128, r = 512, T = 8192): 2*T*r*H*256 = 275 GFLOP against
// T*H*640 B = 671 MB of K/V writes, 33.5 MB of weights and 9.4 MB of latent: 404 FLOP/B, so
// compute-bound (H200 ridge ~186 FLOP/B), 0.35 ms at 790 TFLOP/s with the writes (0.16 ms at
// 4.25 TB/s) hidden under the math. K = r = 512 is short: a tile is only 8 k-blocks, so the
// epilogue is a large share of a tile's time. Measured on the H200 at T = 8192: the MMAs alone
// (epilogue removed) 273 us, ~1000 TFLOP/s; consumers writing K/V themselves 570 us; with the
// TMA-store epilogue below 496-513 us, 474-478 us after the producer and epilogue changes of run
// 19 and the box epilogue, 447-450 us with a contiguous latent loaded by TMA (run 20). Both
// consumers still reach their epilogues together and the tensor cores idle meanwhile; consumers
// on alternate tiles (ping-pong, 128 x 128 tiles each, branch next/mla-pingpong) measured slower:
// 490 us with TMA-loaded latent, 600-616 us gathered (BENCHMARKS.md run 20).
//
// Structure (one CTA per SM; its first tile is its block index, the rest claimed in order from a
// global counter):
//   warpgroup 0      thread 0 issues the TMA load of the W tile [256 x 64] of each stage (one
//                    head's 128 W_UK rows then 128 W_UV rows) and, for a contiguous latent, of
//                    the A tile [128 x 64] (a paged cache is gathered contiguous first by
//                    decompress.cu's gather kernel when the caller gives the buffer); from a
//                    paged cache without it (rows scattered, which one TMA box cannot address)
//                    all 128 threads gather the A tile with 16-byte cp.async (8
//                    lanes per token row) into the same 128-byte swizzle TMA uses, and copies
//                    the same rows' k_pe to K[t, h, 128:128+d_rope]; with a contiguous latent,
//                    thread 32 moves each tile's k_pe by TMA through a 16 KB box (kKpeTma), or
//                    warps 1..3 (otherwise idle) copy it;
//   warpgroups 1, 2  each owns 64 token rows and runs m64n256k16 WGMMAs, then stages its
//                    columns in four 64-column boxes
//                    in shared memory, each handed to a TMA store to K[t, h, 0:128] or V[t, h, :]
//                    that drains while the next boxes and the next tile's MMAs run.
//   full[s]  (1 expect_tx arrival [+ 128 cp.async arrivals when gathering] + TMA bytes): the
//            stage holds data;
//   empty[s] (8 arrivals: lane 0 of every consumer warp): the stage may be overwritten.
// Tile order: groups of kGroupM M tiles sweep the heads together, so consecutive CTAs share one
// head's W (256 KB, read from L2) and a group's latent rows (4 MB) stay in L2 across its heads.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "device/launch.cuh"
#include "device/sm90.cuh"
#include "device/staging.cuh"
#include "moekit/mla.h"

namespace moekit {
namespace mla {

constexpr int kBlockM = 128;  // tokens per tile: two consumer warpgroups x 64
constexpr int kHeadDim = 128; // d_nope = d_v of the WGMMA kernel
constexpr int kBlockN = 2 * kHeadDim;  // one head: W_UK rows then W_UV rows
constexpr int kBlockK = 64;   // 64 bf16 = 128 bytes: one swizzle row
constexpr int kConsumers = 2;
constexpr int kThreads = 128 * (1 + kConsumers);
// M tiles per group of the tile order: W is read from DRAM once per group, the group's latent
// rows (kGroupM x 128 KB) must stay in L2 while it sweeps the heads. H200 (BENCHMARKS.md run 27,
// call 3, 16 / 32 / 64 / 256): T = 8192 440.8 / 435.1 / 435.1 / 435.1 us, paged 448.7 / 441.6 /
// 441.6 / 442.1; T = 32768 1837-1934 / 1744-1946 / 1754-1916 / 2030-2123 (one group of 256 M
// tiles, 33.5 MB of latent, no longer stays in L2 beside the K/V writes); T = 1024 unchanged.
constexpr int kGroupM = 32;
constexpr int kMaxRope = 64;  // k_pe columns: one 16-byte chunk per copier thread of a row (8 lanes)

// What the device needs besides the W tensor map.
struct Args {
  const __nv_bfloat16 *latent;
  const __nv_bfloat16 *k_pe;
  int64_t latent_stride;
  int64_t k_pe_stride;
  int64_t num_rows;
  const int32_t *row_src;  // NULL: token t reads row t
  __nv_bfloat16 *k;
  __nv_bfloat16 *v;
  int64_t k_token_stride;
  int64_t k_head_stride;
  int64_t v_token_stride;
  int64_t v_head_stride;
  int32_t *tile_counter;
  int tokens;
  int heads;
  int rank;
  int d_rope;
  // Whether the latent and k_pe are written by the grid this kernel depends on (a paged cache's
  // gather): then the first tile's A loads wait for it; otherwise they are issued before the wait.
  int source_from_previous_grid;
  // M tiles per group of the tile order (decode_tile): kGroupM unless MOEKIT_MLA_GROUP says
  // otherwise (decompress.cu's run_wgmma).
  int group_m;
};

// The source row of token t, or -1 for a zero row.
__device__ __forceinline__ int64_t source_row(const Args &a, int t) {
  if (t >= a.tokens) return -1;
  if (a.row_src != nullptr) return a.row_src[t];  // written by the prepare kernel (plain load: PDL)
  return t < a.num_rows ? t : -1;
}

struct Tile {
  int m0;  // first token
  int head;
};

__device__ __forceinline__ Tile decode_tile(int t, int m_tiles, int heads, int group_m) {
  const int group = t / (group_m * heads);
  const int first = group * group_m;
  const int rows = min(group_m, m_tiles - first);
  const int local = t - group * group_m * heads;
  return Tile{(first + local % rows) * kBlockM, local / rows};
}

// Per consumer warpgroup: kStagingBufs staging buffers of 64 rows x 128 columns bf16 (16 KB).
constexpr int kStagingBytes = 64 * kHeadDim * 2;
// kKpeTma: one more 16 KB box, [128 rows][64 k_pe columns] in the 128-byte swizzle, through which
// the producer's copier thread moves each tile's k_pe by TMA (decompress_wgmma_kernel).
constexpr int kKpeBoxBytes = kBlockM * 64 * 2;
template <int kStages, int kStagingBufs, bool kKpeTma = false>
constexpr size_t smem_bytes() {
  // At most 231,576 bytes (4 stages and one staging buffer; 3 stages, two buffers and the k_pe box:
  // 231,552): under the 232,448 (227 KB) an sm_90 block may opt in to.
  return (size_t)kStages * (kBlockM + kBlockN) * kBlockK * 2 + (size_t)kConsumers * kStagingBufs * kStagingBytes +
         (kKpeTma ? (size_t)kKpeBoxBytes : 0) + sizeof(uint64_t) +
         (2 * kStages + 4) * sizeof(uint64_t) + 2 * kStages * sizeof(int32_t) + 2 * sizeof(int32_t) +
         2 * kBlockM * sizeof(int32_t) + 2 * sizeof(int32_t) + 1024;
}
static_assert(smem_bytes<4, 1>() <= 232448, "over the 227 KB of shared memory a block may use");
static_assert(smem_bytes<3, 2>() <= 232448, "over the 227 KB of shared memory a block may use");
static_assert(smem_bytes<3, 2, true>() <= 232448, "over the 227 KB of shared memory a block may use");

// The staging of the TMA-store epilogue: accumulator columns [first, first + 64) as bf16 in one box
// of 64 rows x 64 columns (128 bytes per row), 16-byte chunk c of row r at chunk c ^ (r % 8): the
// 128-byte swizzle of the K and V store maps, which also puts the 8 rows a warp writes at once in
// different banks.
constexpr int kBoxBytes = 64 * 128;
constexpr int kBoxCols = 64;
__device__ __forceinline__ void stage_box(uint8_t *box, const float (&acc)[kBlockN / 2], int first, int warp,
                                          int lane) {
#pragma unroll
  for (int i = first / 8; i < first / 8 + kBoxCols / 8; ++i) {
    const int col = 8 * i + 2 * (lane % 4) - first;  // 0..63 within the box
    const int chunk = col / 8;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp * 16 + lane / 4 + 8 * h;
      uint8_t *p = box + row * 128 + ((chunk ^ (row & 7)) << 4) + (col % 8) * 2;
      sm90::store_pair(reinterpret_cast<__nv_bfloat16 *>(p), acc[4 * i + 2 * h], acc[4 * i + 2 * h + 1]);
    }
  }
}

// kTmaA: a contiguous latent (token t reads row t) arrives by TMA from map_a, issued by one
// producer thread with the W tile; otherwise the producer warpgroup gathers it with cp.async.
// Measured on the H200 (BENCHMARKS.md run 20, A/B): DeepSeek-V3 T = 8192 474 -> 447 us (616
// TFLOP/s), T = 1024 67.6 -> 63.1 us, H = 16 and 12 shards -5..-7%: gathered, the consumers
// waited for full stages and fenced every k-block for the cp.async writes. Paged caches keep the
// gather (488 us): one TMA per row (751 us) and 8-row TMA boxes for runs of consecutive rows with
// cp.async for the rest (533 us) were slower (branch next/mla-paged-tma). Since run 23 a paged
// source is gathered once by its own kernel and read here by TMA (452 us at T = 8192 against
// 471 gathered here); this path remains for callers without the gather buffer.
template <int kStages, int kStagingBufs, bool kTmaA, bool kKpeTma = false>
__global__ void __launch_bounds__(kThreads, 1)
    decompress_wgmma_kernel(const __grid_constant__ CUtensorMap map_w, const __grid_constant__ CUtensorMap map_a,
                            const __grid_constant__ CUtensorMap map_k, const __grid_constant__ CUtensorMap map_v,
                            const __grid_constant__ CUtensorMap map_kpe_in,
                            const __grid_constant__ CUtensorMap map_kpe_out, const Args a) {
  static_assert(!kKpeTma || kTmaA, "k_pe by TMA: contiguous sources only");
  // 3 stages drain each k-block's WGMMAs before freeing its stage; 4 keep one group in flight
  // (the consumer loop below says why).
  constexpr bool kDrainEach = kStages < 4;
  constexpr int kTileA = kBlockM * kBlockK;  // elements
  constexpr int kTileB = kBlockN * kBlockK;
  constexpr uint32_t kBytesB = kTileB * 2;
  constexpr int kProducerRegs = kTmaA ? 40 : 72;
  constexpr int kConsumerRegs = kTmaA ? 232 : 208;

  extern __shared__ uint8_t smem_raw[];
  // Swizzled tiles must start on 1024-byte boundaries.
  uint8_t *smem = sm90::align_smem_1024(smem_raw);
  __nv_bfloat16 *sa = reinterpret_cast<__nv_bfloat16 *>(smem);
  __nv_bfloat16 *sb = sa + kStages * kTileA;
  uint8_t *staging = reinterpret_cast<uint8_t *>(sb + kStages * kTileB);  // [kConsumers][kStagingBufs][16 KB]
  // kKpeTma: the k_pe box, 1024-byte aligned as the 128-byte swizzle needs (the stages and the
  // staging are whole KB).
  uint8_t *kpe_box = staging + kConsumers * kStagingBufs * kStagingBytes;
  uint64_t *full = reinterpret_cast<uint64_t *>(kpe_box + (kKpeTma ? kKpeBoxBytes : 0));
  uint64_t *empty = full + kStages;
  // kTmaA: thread 0 hands each claimed tile to the producer's k_pe copiers (warps 1..3) through a
  // two-slot mailbox: kpe_full[i] (its arrival), kpe_empty[i] (lane 0 of each copier warp).
  uint64_t *kpe_full = empty + kStages;
  uint64_t *kpe_empty = kpe_full + 2;
  // The tile of each stage as its first token (-1 = stop) and head, decoded once by the producer:
  // the consumers' two integer divisions per tile were 6% of their stall samples (ncu, T = 8192).
  uint64_t *kpe_loaded = kpe_empty + 2;  // kKpeTma: the k_pe box's load has landed
  int32_t *stage_m0 = reinterpret_cast<int32_t *>(kpe_loaded + 1);
  int32_t *stage_head = stage_m0 + kStages;
  int32_t *claimed = stage_head + kStages;  // [2] the producer's claimed tile, double-buffered
  int32_t *row_index = claimed + 2;  // [2][128] source row of each tile row (-1: zeros), double-buffered
  int32_t *kpe_tile = row_index + 2 * kBlockM;  // [2] the mailbox: a claimed tile, -1 = stop

  const int warpgroup = threadIdx.x / 128;
  const int m_tiles = (a.tokens + kBlockM - 1) / kBlockM;
  const int total = m_tiles * a.heads;
  const int k_blocks = a.rank / kBlockK;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbar_init(&full[s], kTmaA ? 1 : 1 + 128);
      sm90::mbar_init(&empty[s], kConsumers * 4);  // lane 0 of each consumer warp
    }
    for (int i = 0; i < 2; ++i) {
      sm90::mbar_init(&kpe_full[i], 1);
      sm90::mbar_init(&kpe_empty[i], 3);
    }
    if constexpr (kKpeTma) sm90::mbar_init(kpe_loaded, 1);
    sm90::fence_barrier_init();
  }
  __syncthreads();
  // The tile counter (and the row table or the gathered rows) come from the kernel this one
  // depends on. The in-kernel gather waits for it at once; otherwise only the threads that read
  // those wait, and thread 0 first issues its first tile's loads (tile blockIdx.x, claimed without
  // the counter), so they travel while the previous grid finishes.
  if (!kTmaA) wait_for_previous_grid();
  if (warpgroup == 0) {
    // Producer. Gathering, 72 registers: the gather keeps its 8 rows' sources for the whole tile;
    // the CTA's pool is what the launch bounds reserve (384 x 168), 128 x 72 + 256 x 208 fits it,
    // and the consumers compile without spills at 208 (ptxas; without setmaxnreg they spill 288
    // bytes). With a TMA-loaded latent the producer needs no more than 40 and the consumers keep
    // 232 (the split run 20 measured).
    static_assert(sm90::register_split_fits(kProducerRegs, kConsumers, kConsumerRegs),
                  "setmaxnreg would overdraw the CTA's pool");
    sm90::setmaxnreg_dec<kProducerRegs>();
    const int p = threadIdx.x;
    if (p == 0) sm90::tma_prefetch_descriptor(&map_w);
    int stage = 0;
    uint32_t phase = 0;
    if constexpr (kTmaA) {
      if (p == 0) {
        sm90::tma_prefetch_descriptor(&map_a);
        bool waited = false;
        for (uint32_t n = 0;; ++n) {
          if (n > 0 && !waited) {
            wait_for_previous_grid();
            waited = true;
          }
          // Every CTA's first tile is its block index; the counter hands out the rest.
          const int claim = n == 0 ? -1 : atomicAdd(a.tile_counter, 1);
          const int t = n == 0 ? (int)blockIdx.x : (int)gridDim.x + claim;
          // Each CTA claims past the end exactly once and then stops, so the claim that returns
          // total - 1 (the last of the grid's gridDim.x claims past the end) is the counter's last
          // use in this grid: it leaves the counter at zero for the next launch (decompress.cu's
          // run_wgmma says why).
          if (claim == total - 1) atomicExch(a.tile_counter, 0);
          // Hand the tile (or the stop) to the k_pe copiers.
          const uint32_t slot = n & 1, parity = (n >> 1) & 1;
          sm90::mbar_wait(&kpe_empty[slot], parity ^ 1);
          kpe_tile[slot] = t < total ? t : -1;
          sm90::mbar_arrive(&kpe_full[slot]);  // release: the copiers read kpe_tile after their wait
          if (t >= total) {
            // No bytes: the phase completes on this arrival and tells the consumers to stop.
            sm90::mbar_wait(&empty[stage], phase ^ 1);
            stage_m0[stage] = -1;
            sm90::mbar_arrive(&full[stage]);
            break;
          }
          const Tile tile = decode_tile(t, m_tiles, a.heads, a.group_m);
          const int w_row = tile.head * kBlockN;
          // Before the wait (first tile only), the first ring's worth of k-blocks: their W tiles
          // now, and their A tiles too unless the previous grid writes the source (then after the
          // wait). The fresh ring starts at stage 0, so k-block kb sits in stage kb.
          const int early = waited ? 0 : min(k_blocks, kStages);
          const bool defer_a = early > 0 && a.source_from_previous_grid;
          auto finish_early = [&]() {
            wait_for_previous_grid();
            waited = true;
            if (defer_a) {
              for (int kb = 0; kb < early; ++kb) {
                sm90::tma_load_2d(sa + kb * kTileA, &map_a, kb * kBlockK, tile.m0, &full[kb]);
              }
            }
          };
          for (int kb = 0; kb < k_blocks; ++kb) {
            if (kb == early && !waited) finish_early();
            sm90::mbar_wait(&empty[stage], phase ^ 1);
            stage_m0[stage] = tile.m0;  // published by the arrive below (release)
            stage_head[stage] = tile.head;
            sm90::mbar_arrive_expect_tx(&full[stage], kBytesB + kTileA * 2);
            if (!(defer_a && kb < early)) {
              sm90::tma_load_2d(sa + stage * kTileA, &map_a, kb * kBlockK, tile.m0, &full[stage]);
            }
            sm90::tma_load_2d(sb + stage * kTileB, &map_w, kb * kBlockK, w_row, &full[stage]);
            if (++stage == kStages) {
              stage = 0;
              phase ^= 1;
            }
          }
          if (!waited) finish_early();
        }
      } else if (p >= 32) {
        // The k_pe copiers: K[t, h, 128:128+d_rope] = k_pe[t] for every tile thread 0 claims,
        // while the consumers compute it (the consumers did this in their epilogue, where it
        // delayed the next tile's MMAs). 128 rows x 8 16-byte chunks per tile over 96 threads,
        // four loads in flight per thread.
        // k_pe may be the gather kernel's output, written while this grid was already launched:
        // plain L2 loads (ld.global.cg), not the read-only path, which assumes data constant for
        // the kernel's whole life.
        wait_for_previous_grid();  // ... so it is read only once that grid has finished
        const int q = p - 32;
        const int lane = p % 32;
        const int rope_chunks = a.d_rope / 8;
        if (kKpeTma && p == 32) sm90::tma_prefetch_descriptor(&map_kpe_in);
        for (uint32_t n = 0;; ++n) {
          const uint32_t slot = n & 1, parity = (n >> 1) & 1;
          sm90::mbar_wait(&kpe_full[slot], parity);
          const int t = sm90::read_stage_tile(kpe_tile, (int)slot, lane);
          __syncwarp();
          if (lane == 0) sm90::mbar_arrive(&kpe_empty[slot]);
          if (t < 0) break;
          const Tile tile = decode_tile(t, m_tiles, a.heads, a.group_m);
          if constexpr (kKpeTma) {
            // One thread moves the tile's k_pe through the box: a TMA load of its 128 rows (rows
            // past the source read as zeros), then a TMA store to K[t, h, 128:192] (rows past the
            // tokens are not written). The copy engine, not 96 threads' loads and stores, carries
            // the 16 KB per tile. The box is reloaded only once the previous store has read it.
            if (p == 32) {
              sm90::bulk_wait_group_read<0>();
              sm90::mbar_arrive_expect_tx(kpe_loaded, kKpeBoxBytes);
              sm90::tma_load_2d(kpe_box, &map_kpe_in, 0, tile.m0, kpe_loaded);
              sm90::mbar_wait(kpe_loaded, n & 1);
              sm90::tma_store_3d(&map_kpe_out, kpe_box, 0, tile.head, tile.m0);
              sm90::bulk_commit_group();
            }
            continue;
          }
          __nv_bfloat16 *k_tile =
              a.k + (int64_t)tile.m0 * a.k_token_stride + (int64_t)tile.head * a.k_head_stride + kHeadDim;
          for (int job0 = q; job0 < kBlockM * 8; job0 += 96 * 4) {
            uint4 v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              const int job = job0 + 96 * u;
              const int row = job >> 3, c = job & 7;
              const int64_t src = (job < kBlockM * 8 && c < rope_chunks) ? source_row(a, tile.m0 + row) : -1;
              v[u] = src < 0 ? make_uint4(0, 0, 0, 0)
                             : __ldcg(reinterpret_cast<const uint4 *>(a.k_pe + src * a.k_pe_stride) + c);
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              const int job = job0 + 96 * u;
              const int row = job >> 3, c = job & 7;
              if (job < kBlockM * 8 && c < rope_chunks && tile.m0 + row < a.tokens) {
                *reinterpret_cast<uint4 *>(k_tile + (int64_t)row * a.k_token_stride + c * 8) = v[u];
              }
            }
          }
        }
        // The box lives until the last store has read it, and the stores are done before the grid.
        if (kKpeTma && p == 32) sm90::bulk_wait_group<0>();
      }
    } else {
      // A gathered latent: every producer thread copies its share of the A tile.
      for (int iter = 0;; ++iter) {
        if (p == 0) {
          const int claim = atomicAdd(a.tile_counter, 1);
          claimed[iter & 1] = claim;
          // The grid's last claim past the end (one per CTA, claims from zero): the counter's last
          // use in this grid.
          if (claim == total + (int)gridDim.x - 1) atomicExch(a.tile_counter, 0);
        }
        // Publishes the claim; the other slot is rewritten only after the next barrier, which every
        // thread reaches after reading this one.
        sm90::warpgroup_barrier(1);
        const int t = claimed[iter & 1];
        if (t >= total) {
          // No bytes: the phase completes on the 129 plain arrivals and tells the consumers to stop.
          sm90::mbar_wait(&empty[stage], phase ^ 1);
          if (p == 0) {
            stage_m0[stage] = -1;
            sm90::mbar_arrive(&full[stage]);
          }
          sm90::mbar_arrive(&full[stage]);
          sm90::cp_async_wait_all();  // no copy may outlive its thread
          break;
        }
        const Tile tile = decode_tile(t, m_tiles, a.heads, a.group_m);
        // Each thread resolves one token's source row for the whole tile (-1: a zero row past the
        // tokens or an unmapped slot); the copies then read the table, double-buffered like the claim.
        int32_t *rows = row_index + (iter & 1) * kBlockM;
        rows[p] = (int32_t)source_row(a, tile.m0 + p);  // row counts fit in int32 (checked on the host)
        sm90::warpgroup_barrier(1);
        const int w_row = tile.head * kBlockN;
        // Copy layout: 8 consecutive lanes copy one row's 128 bytes, so a warp instruction reads 4
        // whole rows (one 16-byte chunk per thread per row scattered the 32-byte sectors over two
        // instructions and doubled the L2 traffic of the A tile). Thread p copies chunk p % 8 of
        // rows 16 j + p / 8; their sources are resolved once per tile into registers and advance
        // by one k-block per stage. (v3 re-read the row table and redid the 64-bit address
        // arithmetic for every copy: ~140 instructions per thread per stage, under a 40-register
        // budget.)
        const int chunk = p % 8;
        const __nv_bfloat16 *src_ptr[kBlockM / 16];
        uint32_t live_rows = 0;  // bit j: row 16 j + p / 8 has a source (else it is zero-filled)
#pragma unroll
        for (int j = 0; j < kBlockM / 16; ++j) {
          const int src = rows[16 * j + p / 8];
          live_rows |= (src >= 0 ? 1u : 0u) << j;
          src_ptr[j] = a.latent + (src < 0 ? 0 : (int64_t)src * a.latent_stride) + chunk * 8;
        }
        // Row 16 j + p / 8 of the 128-byte-swizzled tile: 16-byte chunk c lands at chunk
        // c ^ (r % 8), and r % 8 = (p / 8) % 8 for every j.
        const uint32_t dst_offset = (uint32_t)((p / 8) * (kBlockK * 2) + ((chunk ^ ((p / 8) & 7)) << 4));
        // k_pe: K[t, h, 128:128+d_rope] = k_pe[source row of t] (zeros for a row without one),
        // for the same rows 16 j + p / 8 and chunk p % 8 this thread gathers: row j's chunk is
        // loaded during k-block j and stored during k-block j + 1, so no load latency stalls the
        // gather. (The consumers did it in their epilogue: in the ncu profile of run 22 the paged
        // kernel executed 31 M more consumer instructions than the contiguous one, whose producer
        // already copies k_pe, while this producer waited on empty stages for 17% of its samples.)
        const bool copies_kpe = chunk < a.d_rope / 8;
        __nv_bfloat16 *k_rope = a.k + (int64_t)tile.head * a.k_head_stride + kHeadDim + chunk * 8;
        uint4 kpe_held = make_uint4(0, 0, 0, 0);
        int kpe_row = -1;  // the tile row kpe_held belongs to, -1: none
        auto store_kpe = [&]() {
          if (kpe_row >= 0 && tile.m0 + kpe_row < a.tokens) {
            *reinterpret_cast<uint4 *>(k_rope + (int64_t)(tile.m0 + kpe_row) * a.k_token_stride) = kpe_held;
          }
        };
        auto load_kpe = [&](int j) {
          const int row = 16 * j + p / 8;
          const int src = rows[row];
          kpe_held = src < 0 ? make_uint4(0, 0, 0, 0)
                             : __ldg(reinterpret_cast<const uint4 *>(a.k_pe + (int64_t)src * a.k_pe_stride) + chunk);
          kpe_row = row;
        };
        for (int kb = 0; kb < k_blocks; ++kb) {
          if (copies_kpe) {
            store_kpe();
            if (kb < kBlockM / 16) {
              load_kpe(kb);
            } else {
              kpe_row = -1;
            }
          }
          sm90::mbar_wait(&empty[stage], phase ^ 1);
          if (p == 0) {
            // Published by the arrive below (release), read after the wait (acquire).
            stage_m0[stage] = tile.m0;
            stage_head[stage] = tile.head;
            sm90::mbar_arrive_expect_tx(&full[stage], kBytesB);
            sm90::tma_load_2d(sb + stage * kTileB, &map_w, kb * kBlockK, w_row, &full[stage]);
          }
          const uint32_t dst = sm90::smem_addr(sa + stage * kTileA) + dst_offset;
#pragma unroll
          for (int j = 0; j < kBlockM / 16; ++j) {
            const bool live = (live_rows >> j) & 1u;
            sm90::cp_async_16(dst + j * 16 * (kBlockK * 2), src_ptr[j] + (live ? kb * kBlockK : 0), live ? 16u : 0u);
          }
          sm90::cp_async_mbar_arrive_noinc(&full[stage]);
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
        if (copies_kpe) {
          store_kpe();
          // Ranks under 512 have fewer k-blocks than the tile's 8 row groups.
          for (int j = k_blocks; j < kBlockM / 16; ++j) {
            load_kpe(j);
            store_kpe();
          }
        }
      }
    }
  } else {
    sm90::setmaxnreg_inc<kConsumerRegs>();
    const int consumer = warpgroup - 1;
    const int tid = threadIdx.x % 128;
    const int warp = tid / 32;
    const int lane = tid % 32;
    uint8_t *bufs = staging + consumer * kStagingBufs * kStagingBytes;
    int stage = 0;
    uint32_t phase = 0;
    float acc[kBlockN / 2];
    while (true) {
      sm90::mbar_wait(&full[stage], phase);
      const int m0 = sm90::read_stage_tile(stage_m0, stage, lane);
      if (m0 < 0) break;
      const Tile tile{m0, sm90::read_stage_tile(stage_head, stage, lane)};
      const int row0 = tile.m0 + consumer * 64;
      // A consumer whose 64 rows all lie past the tokens skips the math and the stores.
      const bool active = row0 < a.tokens;
      // With 4 stages each k-block's WGMMAs stay in flight while the next k-block's are issued
      // (wait<1>), and its stage is freed one k-block later: that beat draining every k-block
      // (H200, BENCHMARKS.md run 27, T = 8192 443.2 -> 436.5 us). With 3 stages a stage held a
      // k-block longer starves the ring, and draining wins (run 34: decompress.cu's run_wgmma has
      // the numbers).
      int held = -1;  // the stage whose WGMMAs may still be reading it
      for (int kb = 0; kb < k_blocks; ++kb) {
        sm90::mbar_wait(&full[stage], phase);  // passes at once for kb = 0 (waited above)
        // A gathered A tile arrived through cp.async (generic proxy); the WGMMAs read it through
        // the async proxy.
        if constexpr (!kTmaA) sm90::fence_proxy_async_shared();
        if (active) {
          const uint32_t a_base = sm90::smem_addr(sa + stage * kTileA + consumer * 64 * kBlockK);
          const uint32_t b_base = sm90::smem_addr(sb + stage * kTileB);
          sm90::wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < kBlockK / 16; ++kk) {
            sm90::wgmma_tile<kBlockN>(acc, sm90::desc_k_major_sw128(a_base + kk * 32),
                                      sm90::desc_k_major_sw128(b_base + kk * 32), (kb > 0 || kk > 0) ? 1u : 0u);
          }
          sm90::wgmma_commit();
          sm90::fence_operands(acc);
          if constexpr (kDrainEach) {
            sm90::wgmma_wait<0>();
          } else {
            sm90::wgmma_wait<1>();  // the previous k-block's WGMMAs are done with their stage
          }
          sm90::fence_operands(acc);
        }
        if constexpr (kDrainEach) {
          sm90::release_stage(&empty[stage], lane);
        } else {
          if (held >= 0) sm90::release_stage(&empty[held], lane);  // every lane's reads of it are complete
          held = stage;
        }
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
      // Outside `if (active)`: a wait in a divergent path makes ptxas serialize every WGMMA of
      // the kernel (C7518). With nothing in flight it returns at once.
      sm90::wgmma_wait<0>();
      sm90::fence_operands(acc);
      if (held >= 0) sm90::release_stage(&empty[held], lane);
      if (!active) continue;
      const int barrier = 2 + consumer;
      // Four 64-column boxes: columns [0, 128) -> K[t, h, 0:128], [128, 256) -> V[t, h, :].
      // Each box is staged in one of the consumer's kSlots box slots and handed to its own TMA
      // store (one bulk group per box), so staging a box waits only for the store kSlots boxes
      // back to have read its slot -- one that had the staging of the boxes between to finish.
      // (v2 staged 128 columns per pass and the second pass waited for the first pass's store,
      // issued just before, to read 16 KB: those waits and the named barriers behind them were
      // 60% of the epilogue's stall samples, ncu, T = 8192.) The global writes drain under the
      // next tile's MMAs (the consumers writing 82 KB per tile themselves left the tensor cores
      // idle for half of the kernel: 570 us against 273 us without any epilogue at T = 8192).
      constexpr int kSlots = kStagingBytes * kStagingBufs / kBoxBytes;
      // Slot box % kSlots is the one used kSlots bulk groups earlier (also across tiles) only when
      // the slots divide a tile's boxes; otherwise the wait below would free the wrong slot.
      static_assert((kBlockN / kBoxCols) % kSlots == 0, "the slot rotation must align with tiles");
#pragma unroll
      for (int box = 0; box < kBlockN / kBoxCols; ++box) {
        uint8_t *slot = bufs + (box % kSlots) * kBoxBytes;
        if (tid == 0) sm90::bulk_wait_group_read<kSlots - 1>();
        sm90::warpgroup_barrier(barrier);
        stage_box(slot, acc, box * kBoxCols, warp, lane);
        sm90::fence_proxy_async_shared();  // the staged values, for the async proxy's reads
        sm90::warpgroup_barrier(barrier);
        if (tid == 0) {
          const CUtensorMap *map = box * kBoxCols < kHeadDim ? &map_k : &map_v;
          sm90::tma_store_3d(map, slot, (box * kBoxCols) % kHeadDim, tile.head, row0);
          sm90::bulk_commit_group();
        }
      }
    }
    // The last stores must have read the staging buffer before the block's shared memory goes.
    if (tid == 0) sm90::bulk_wait_group<0>();
  }
}

}  // namespace mla
}  // namespace moekit
