// MLA latent-KV decompression, sm_90a: persistent, warp-specialized, cp.async + TMA + WGMMA.
//
//   for each tile (128 tokens, head h):  [K_nope | V][tokens, 256] = C[tokens, r] . W_kvb[h]^T
//
// Cost model (DeepSeek-V3, H = 128, r = 512, T = 8192): 2*T*r*H*256 = 275 GFLOP against
// T*H*640 B = 671 MB of K/V writes, 33.5 MB of weights and 9.4 MB of latent: 404 FLOP/B, so
// compute-bound (H200 ridge ~186 FLOP/B), 0.35 ms at 790 TFLOP/s with the writes (0.16 ms at
// 4.25 TB/s) hidden under the math. K = r = 512 is short: a tile is only 8 k-blocks, so the
// epilogue is a large share of a tile's time.
//
// Structure (one CTA per SM, tiles claimed in order from a global counter):
//   warpgroup 0      thread 0 issues the TMA load of the W tile [256 x 64] of each stage (one
//                    head's 128 W_UK rows then 128 W_UV rows); all 128 threads gather the A tile
//                    [128 x 64] with 16-byte cp.async (8 lanes per token row) into the same
//                    128-byte swizzle TMA uses (a paged cache scatters rows, which one TMA box
//                    cannot address; one path for paged and contiguous sources keeps their speed
//                    equal);
//   warpgroups 1, 2  each owns 64 token rows and runs m64n256k16 WGMMAs, then writes columns
//                    [0, 128) to K[t, h, 0:128], the token's k_pe to K[t, h, 128:128+d_rope] and
//                    columns [128, 256) to V[t, h, :].
//   full[s]  (1 expect_tx arrival + 128 cp.async arrivals + W bytes): the stage holds data;
//   empty[s] (8 arrivals: lane 0 of every consumer warp): the stage may be overwritten.
// Tile order: groups of kGroupM M tiles sweep the heads together, so consecutive CTAs share one
// head's W (256 KB, read from L2) and a group's latent rows (2 MB) stay in L2 across its heads.
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
constexpr int kStages = 4;
constexpr int kConsumers = 2;
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kGroupM = 16;
constexpr int kMaxRope = 64;  // k_pe chunks a consumer thread holds: 64 rows x 8 chunks / 128 threads
constexpr int kRopeSlots = 64 * (kMaxRope / 8) / 128;

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

__device__ __forceinline__ Tile decode_tile(int t, int m_tiles, int heads) {
  const int group = t / (kGroupM * heads);
  const int first = group * kGroupM;
  const int rows = min(kGroupM, m_tiles - first);
  const int local = t - group * kGroupM * heads;
  return Tile{(first + local % rows) * kBlockM, local / rows};
}

constexpr size_t smem_bytes() {
  // 231,512 bytes: under the 232,448 (227 KB) an sm_90 block may opt in to.
  return (size_t)kStages * (kBlockM + kBlockN) * kBlockK * 2 + (size_t)kConsumers * 64 * sm90::kStageRowBytes +
         2 * kStages * sizeof(uint64_t) + kStages * sizeof(int32_t) + 2 * sizeof(int32_t) +
         2 * kBlockM * sizeof(int32_t) + 1024;
}
static_assert(smem_bytes() <= 232448, "over the 227 KB of shared memory a block may use");

// Copies one pass (128 bf16 columns of the consumer's 64 rows) from the staging buffer to
// dst[t * token_stride + head_offset + column].
__device__ __forceinline__ void copy_out(const uint8_t *buf, __nv_bfloat16 *dst, int64_t token_stride,
                                         int64_t head_offset, int row0, int tokens, int warp, int lane) {
  const int chunk = lane % 16;
  const int first = warp * 16 + lane / 16;  // rows first, first + 2, ..., first + 14
  __nv_bfloat16 *out = dst + (int64_t)(row0 + first) * token_stride + head_offset + chunk * 8;
  const int rows = min(16, tokens - row0 - warp * 16);  // this warp's rows that are tokens
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (2 * j + lane / 16 < rows) {
      *reinterpret_cast<uint4 *>(out) = sm90::staged_chunk(buf, first + 2 * j, chunk);
    }
    out += 2 * token_stride;
  }
}

// Stages accumulator columns [first, first + 128) as bf16 (thread layout: see the grouped GEMM's
// epilogue; acc[4i + 2h + {0,1}] is row 16w + l/4 + 8h, columns 8i + 2(l%4) + {0,1}).
__device__ __forceinline__ void stage_half(uint8_t *buf, const float (&acc)[kBlockN / 2], int first, int warp,
                                           int lane) {
#pragma unroll
  for (int i = first / 8; i < first / 8 + kHeadDim / 8; ++i) {
    const int col = 8 * i + 2 * (lane % 4) - first;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp * 16 + lane / 4 + 8 * h;
      sm90::stage_pair<__nv_bfloat16>(buf, row, col, acc[4 * i + 2 * h], acc[4 * i + 2 * h + 1]);
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    decompress_wgmma_kernel(const __grid_constant__ CUtensorMap map_w, const Args a) {
  constexpr int kTileA = kBlockM * kBlockK;  // elements
  constexpr int kTileB = kBlockN * kBlockK;
  constexpr uint32_t kBytesB = kTileB * 2;

  extern __shared__ uint8_t smem_raw[];
  // Swizzled tiles must start on 1024-byte boundaries.
  uint8_t *smem = reinterpret_cast<uint8_t *>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __nv_bfloat16 *sa = reinterpret_cast<__nv_bfloat16 *>(smem);
  __nv_bfloat16 *sb = sa + kStages * kTileA;
  uint8_t *staging = reinterpret_cast<uint8_t *>(sb + kStages * kTileB);  // [kConsumers][64][256 B]
  uint64_t *full = reinterpret_cast<uint64_t *>(staging + kConsumers * 64 * sm90::kStageRowBytes);
  uint64_t *empty = full + kStages;
  int32_t *stage_tile = reinterpret_cast<int32_t *>(empty + kStages);  // tile of each stage, -1 = stop
  int32_t *claimed = stage_tile + kStages;  // [2] the producer's claimed tile, double-buffered
  int32_t *row_index = claimed + 2;  // [2][128] source row of each tile row (-1: zeros), double-buffered

  const int warpgroup = threadIdx.x / 128;
  const int m_tiles = (a.tokens + kBlockM - 1) / kBlockM;
  const int total = m_tiles * a.heads;
  const int k_blocks = a.rank / kBlockK;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbar_init(&full[s], 1 + 128);
      sm90::mbar_init(&empty[s], kConsumers * 4);  // lane 0 of each consumer warp
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();
  // The tile counter and the row table come from the prepare kernel this one depends on.
  wait_for_previous_grid();
  if (warpgroup == 0) {
    // Producer. 40 registers (the gather needs no more); 128 x 40 + 256 x 232
    // fits the 64 K register file the launch bounds reserve (384 x 168).
    sm90::setmaxnreg_dec<40>();
    const int p = threadIdx.x;
    if (p == 0) sm90::tma_prefetch_descriptor(&map_w);
    int stage = 0;
    uint32_t phase = 0;
    for (int iter = 0;; ++iter) {
      if (p == 0) claimed[iter & 1] = atomicAdd(a.tile_counter, 1);
      // Publishes the claim; the other slot is rewritten only after the next barrier, which every
      // thread reaches after reading this one.
      sm90::warpgroup_barrier(1);
      const int t = claimed[iter & 1];
      if (t >= total) {
        // No bytes: the phase completes on the 129 plain arrivals and tells the consumers to stop.
        sm90::mbar_wait(&empty[stage], phase ^ 1);
        if (p == 0) {
          stage_tile[stage] = -1;
          sm90::mbar_arrive(&full[stage]);
        }
        sm90::mbar_arrive(&full[stage]);
        sm90::cp_async_wait_all();  // no copy may outlive its thread
        break;
      }
      const Tile tile = decode_tile(t, m_tiles, a.heads);
      // Each thread resolves one token's source row for the whole tile (-1: a zero row past the
      // tokens or an unmapped slot); the copies then read the table, double-buffered like the claim.
      int32_t *rows = row_index + (iter & 1) * kBlockM;
      rows[p] = (int32_t)source_row(a, tile.m0 + p);  // row counts fit in int32 (checked on the host)
      sm90::warpgroup_barrier(1);
      const int w_row = tile.head * kBlockN;
      // Copy layout: 8 consecutive lanes copy one row's 128 bytes, so a warp instruction reads 4
      // whole rows (one 16-byte chunk per thread per row scattered the 32-byte sectors over two
      // instructions and doubled the L2 traffic of the A tile).
      const int chunk = p % 8;
      for (int kb = 0; kb < k_blocks; ++kb) {
        sm90::mbar_wait(&empty[stage], phase ^ 1);
        if (p == 0) {
          stage_tile[stage] = t;  // published by the arrive below (release), read after the wait (acquire)
          sm90::mbar_arrive_expect_tx(&full[stage], kBytesB);
          sm90::tma_load_2d(sb + stage * kTileB, &map_w, kb * kBlockK, w_row, &full[stage]);
        }
        const uint32_t tile_a = sm90::smem_addr(sa + stage * kTileA);
#pragma unroll
        for (int j = 0; j < kBlockM / 16; ++j) {
          const int r = 16 * j + p / 8;
          const int src = rows[r];
          // Row r of the 128-byte-swizzled tile: 16-byte chunk c lands at chunk c ^ (r % 8).
          const uint32_t dst = tile_a + r * (kBlockK * 2) + ((chunk ^ (r & 7)) << 4);
          const __nv_bfloat16 *from = a.latent + (src < 0 ? 0 : (int64_t)src * a.latent_stride + kb * kBlockK + chunk * 8);
          sm90::cp_async_16(dst, from, src < 0 ? 0u : 16u);
        }
        sm90::cp_async_mbar_arrive_noinc(&full[stage]);
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
  } else {
    sm90::setmaxnreg_inc<232>();
    const int consumer = warpgroup - 1;
    const int tid = threadIdx.x % 128;
    const int warp = tid / 32;
    const int lane = tid % 32;
    uint8_t *buf = staging + consumer * 64 * sm90::kStageRowBytes;
    const int rope_chunks = a.d_rope / 8;
    int stage = 0;
    uint32_t phase = 0;
    float acc[kBlockN / 2];
    while (true) {
      sm90::mbar_wait(&full[stage], phase);
      // Only lane 0 reads the tile id (and broadcasts it): the thread that frees the stage below
      // is then the only one that read it, so the producer's next write is ordered after every
      // read by that arrive alone.
      int t = 0;
      if (lane == 0) t = stage_tile[stage];
      t = __shfl_sync(0xffffffffu, t, 0);
      if (t < 0) break;
      const Tile tile = decode_tile(t, m_tiles, a.heads);
      const int row0 = tile.m0 + consumer * 64;
      // A consumer whose 64 rows all lie past the tokens skips the math and the stores.
      const bool active = row0 < a.tokens;
      // The k_pe chunks this thread stores: slot j is row tid/8 + 16j, chunk tid % 8. Loaded
      // during the first k-block's MMAs, stored in the epilogue.
      uint4 kpe[kRopeSlots];
      for (int kb = 0; kb < k_blocks; ++kb) {
        sm90::mbar_wait(&full[stage], phase);  // passes at once for kb = 0 (waited above)
        // The A tile arrived through cp.async (generic proxy); the WGMMAs read it through the async proxy.
        sm90::fence_proxy_async_shared();
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
          if (kb == 0) {
#pragma unroll
            for (int j = 0; j < kRopeSlots; ++j) {
              const int64_t src = (tid % 8) < rope_chunks ? source_row(a, row0 + tid / 8 + 16 * j) : -1;
              kpe[j] = src < 0 ? make_uint4(0, 0, 0, 0)
                               : __ldg(reinterpret_cast<const uint4 *>(a.k_pe + src * a.k_pe_stride) + tid % 8);
            }
          }
          sm90::fence_operands(acc);
          sm90::wgmma_wait<0>();
          sm90::fence_operands(acc);
        }
        __syncwarp();  // every lane's WGMMA reads of the stage are complete (the wait above)
        if (lane == 0) sm90::mbar_arrive(&empty[stage]);
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
      if (!active) continue;
      const int barrier = 2 + consumer;
      // Pass 1: columns [0, 128) -> K[t, h, 0:128], and the k_pe columns from registers.
      const int64_t k_head = (int64_t)tile.head * a.k_head_stride;
      stage_half(buf, acc, 0, warp, lane);
      sm90::warpgroup_barrier(barrier);
      copy_out(buf, a.k, a.k_token_stride, k_head, row0, a.tokens, warp, lane);
      if ((tid % 8) < rope_chunks) {
        __nv_bfloat16 *out = a.k + (int64_t)(row0 + tid / 8) * a.k_token_stride + k_head + kHeadDim + (tid % 8) * 8;
#pragma unroll
        for (int j = 0; j < kRopeSlots; ++j) {
          if (row0 + tid / 8 + 16 * j < a.tokens) *reinterpret_cast<uint4 *>(out) = kpe[j];
          out += 16 * a.k_token_stride;
        }
      }
      sm90::warpgroup_barrier(barrier);  // pass 2 overwrites the buffer
      // Pass 2: columns [128, 256) -> V[t, h, :].
      stage_half(buf, acc, kHeadDim, warp, lane);
      sm90::warpgroup_barrier(barrier);
      copy_out(buf, a.v, a.v_token_stride, (int64_t)tile.head * a.v_head_stride, row0, a.tokens, warp, lane);
      sm90::warpgroup_barrier(barrier);  // the next tile's pass 1 overwrites the buffer
    }
  }
}

}  // namespace mla
}  // namespace moekit
