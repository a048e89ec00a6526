// C entry point of the grouped GEMM: builds the TMA tensor maps, picks the kernel configuration
// and launches the persistent WGMMA kernel, or the simple FMA oracle.
#include <cuda.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "device/launch.cuh"
#include "device/tensor_map.cuh"
#include "grouped_gemm_sm90.cuh"
#include "moekit.h"

namespace moekit {
namespace gemm {

// ---- oracle -------------------------------------------------------------------------------------

// One thread per output element: finds the row's expert by binary search over the segment offsets
// and accumulates the dot product over K in f32. Slow and obviously right: the WGMMA kernel's test
// oracle.
template <int kEpilogue, typename OutT>
__global__ void grouped_gemm_oracle_kernel(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ w,
                                           const Args a, int num_local, int64_t x_rows) {
  const int64_t r = (int64_t)blockIdx.y * blockDim.y + threadIdx.y;
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= x_rows || col >= a.n_out) return;
  if (r >= __ldg(a.offsets + num_local)) return;
  int lo = 0, hi = num_local - 1;  // the last e with offsets[e] <= r
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (__ldg(a.offsets + mid) <= r) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int e = lo;
  if (r >= __ldg(a.offsets + e) + __ldg(a.counts + e)) return;  // a padding row: not written
  auto dot = [&](int wrow) {
    const __nv_bfloat16 *xr = x + r * a.k;
    const __nv_bfloat16 *wr = w + ((int64_t)e * a.n + wrow) * a.k;
    float s = 0.0f;
    for (int i = 0; i < a.k; ++i) s = fmaf(__bfloat162float(xr[i]), __bfloat162float(wr[i]), s);
    return s;
  };
  float v;
  if constexpr (kEpilogue == MOEKIT_EPILOGUE_SWIGLU) {
    v = silu(dot(col)) * dot(a.n / 2 + col);
  } else {
    v = dot(col);
    if constexpr (kEpilogue == MOEKIT_EPILOGUE_ROW_SCALE) v *= __ldg(a.row_weights + __ldg(a.row_map + r));
  }
  OutT *y = static_cast<OutT *>(a.y);
  if constexpr (sizeof(OutT) == 2) {
    y[r * a.n_out + col] = __float2bfloat16_rn(v);
  } else {
    y[r * a.n_out + col] = v;
  }
}

template <int kEpilogue, typename OutT>
moekit_status run_oracle(const moekit_grouped_gemm_params &p, const Args &a, moekit_stream stream) {
  const dim3 block(32, 8);
  const dim3 grid((unsigned)ceil_div(a.n_out, 32), (unsigned)ceil_div(p.x_rows, 8));
  if (p.x_rows == 0) return MOEKIT_OK;
  grouped_gemm_oracle_kernel<kEpilogue, OutT><<<grid, block, 0, stream>>>(
      static_cast<const __nv_bfloat16 *>(p.x), static_cast<const __nv_bfloat16 *>(p.w), a, p.num_local, p.x_rows);
  return last_launch_status();
}

// ---- WGMMA --------------------------------------------------------------------------------------

static_assert(kBlockK == 64, "make_bf16_sw128_map reads 64-column boxes");

// M tiles the last build can have: each expert's rows round up to whole tiles, so at most
// rows / block_m + num_local, and never more than the plan's capacity. The heuristics use it
// rather than the capacity alone: a plan sized for an engine's largest batch runs small ones too.
inline int64_t tile_bound(const moekit_grouped_gemm_params &p) {
  return std::min<int64_t>(p.max_tiles, ceil_div(p.rows, p.block_m) + p.num_local);
}

template <int BN, int kStages, int kEpilogue, typename OutT, bool kSplitK = false, int kCluster = 1,
          int kTmaRounds = 0, int kFoldRows = 0>
moekit_status run_wgmma(const moekit_grouped_gemm_params &p, const Args &a, moekit_stream stream) {
  if (p.block_m != kBlockM) return MOEKIT_ERR_INVALID_ARGUMENT;
  CUtensorMap map_x, map_w, map_y, map_xf;
  // Clusters load W in halves of BN/2 rows (each CTA one half, multicast); SwiGLU always does.
  const int w_box = kEpilogue == MOEKIT_EPILOGUE_SWIGLU || kCluster > 1 ? BN / 2 : BN;
  if (!make_bf16_sw128_map(&map_x, p.x, std::max<int64_t>(p.x_rows, 1), p.k, 64) ||
      !make_bf16_sw128_map(&map_w, p.w, (int64_t)p.num_local * p.n, p.k, w_box)) {
    return MOEKIT_ERR_UNSUPPORTED;
  }
  if constexpr (kTmaRounds > 0) {
    // Y [rows, n_out] in boxes of 64 rows x 64 columns: epilogue_tma's staging layout.
    if (!make_bf16_sw128_map(&map_y, p.y, std::max<int64_t>(p.rows, 1), a.n_out, 64, 0,
                             CU_TENSOR_MAP_L2_PROMOTION_NONE)) {
      return MOEKIT_ERR_UNSUPPORTED;
    }
  } else {
    map_y = map_x;  // unused
  }
  if constexpr (kFoldRows > 0) {
    // The fold boxes: kFoldRows rows of X past a full tile (rows past x_rows read as zeros).
    if (!make_bf16_sw128_map(&map_xf, p.x, std::max<int64_t>(p.x_rows, 1), p.k, kFoldRows)) {
      return MOEKIT_ERR_UNSUPPORTED;
    }
  } else {
    map_xf = map_x;  // unused
  }
  auto kernel = grouped_gemm_wgmma_kernel<BN, kStages, kEpilogue, OutT, kSplitK, kCluster, kTmaRounds, kFoldRows>;
  constexpr size_t smem = smem_bytes<BN, kStages, kEpilogue, kTmaRounds, kFoldRows>();
  static_assert(smem <= 232448, "over the 227 KB of shared memory a block may use");
  MOEKIT_TRY(allow_dynamic_smem(kernel, smem));
  const int cols_per_tile = kEpilogue == MOEKIT_EPILOGUE_SWIGLU ? BN / 2 : BN;
  const int64_t max_work = tile_bound(p) * ceil_div(a.n_out, cols_per_tile) * a.split_k;
  if constexpr (kCluster > 1) {
    // A cap under one cluster: the caller's single CTAs instead.
    if (p.max_ctas > 0 && p.max_ctas < kCluster) return MOEKIT_ERR_UNSUPPORTED;
    // As many clusters as fit at once (a GPC with an odd SM count leaves one SM out), at most one
    // per tile pair; asked once per device (-1: the query failed or none fit, and the caller
    // falls back to single CTAs).
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kCluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    cfg.gridDim = dim3(kCluster * (unsigned)ceil_div(sm_count(), kCluster));
    static int cached[64] = {0};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return MOEKIT_ERR_UNSUPPORTED;
    int clusters = dev < 64 ? cached[dev] : 0;
    if (clusters == 0) {
      if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess || clusters < 1) {
        (void)cudaGetLastError();  // not left for an unrelated launch's status check
        clusters = -1;
      }
      if (dev < 64) cached[dev] = clusters;
    }
    if (clusters < 1) return MOEKIT_ERR_UNSUPPORTED;
    MOEKIT_TRY(cudaMemsetAsync(p.tile_counter, 0, sizeof(int32_t), stream));
    const int64_t cap = p.max_ctas > 0 ? p.max_ctas / kCluster : clusters;
    cfg.gridDim = dim3(kCluster * (unsigned)std::max<int64_t>(
                                      1, std::min<int64_t>({(int64_t)clusters, cap, ceil_div(max_work, kCluster)})));
    MOEKIT_TRY(cudaLaunchKernelEx(&cfg, kernel, map_x, map_w, map_y, map_xf, a));
    return MOEKIT_OK;
  } else {
    MOEKIT_TRY(cudaMemsetAsync(p.tile_counter, 0, sizeof(int32_t), stream));
    const int64_t ctas = p.max_ctas > 0 ? std::min<int64_t>(p.max_ctas, sm_count()) : sm_count();
    const int grid = (int)std::max<int64_t>(1, std::min<int64_t>(ctas, max_work));
    kernel<<<grid, kThreads, smem, stream>>>(map_x, map_w, map_y, map_xf, a);
    return last_launch_status();
  }
}

// Whether the 128 x 256 kernel runs as 2-CTA clusters sharing W tiles (produce_pairs). Measured
// (H200, BENCHMARKS.md run 24 call 7, pairs against single CTAs, best of 2): K = 7168 DeepSeek-V3
// gate+up T = 4096 -8.4% (SwiGLU -9.0%; the layer demo 6686 -> 6545 us), T = 16384 +-0.2%;
// K = 4096 Mixtral SwiGLU T = 16384 -2.3%, plain +0.3%; K = 14336 Mixtral down -1.3%; but
// K = 2048 DeepSeek-V3 down +2.5%, Qwen3 gate+up +0.2..+1.5% and Qwen3 down (K = 768) +7..+10%:
// the two CTAs wait on each other at every stage, which short tiles (few k-blocks) do not
// amortize (run 26, with the tail pairs: DeepSeek-V3 down still +1.2..+4.6%). So: pairs for
// K >= 4096. (4-CTA clusters sharing X too measured +6..+22%: BENCHMARKS.md run 26.)
// MOEKIT_GEMM_CLUSTER=1 or 2 forces one or the other (for A/B timing).
// Where folding applies (would_fold: fold_small, a kernel with folding), the single folding CTAs
// run instead of pairs while fold_beats_pairs says so. The implementations
// MOEKIT_GEMM_WGMMA_SINGLE / _PAIRS fix the choice (tests), as MOEKIT_GEMM_CLUSTER does.
static bool fold_beats_pairs(const moekit_grouped_gemm_params &p);
static bool use_w_pairs(const moekit_grouped_gemm_params &p, bool would_fold) {
  if (p.implementation == MOEKIT_GEMM_WGMMA_SINGLE) return false;
  if (p.implementation == MOEKIT_GEMM_WGMMA_PAIRS) return true;
  static const int forced = env_switch("MOEKIT_GEMM_CLUSTER", 0);
  if (forced == 1 || forced == 2) return forced == 2;
  return p.k >= 4096 && !(would_fold && fold_beats_pairs(p));
}

// Whether the 128 x 256 kernels with a bf16 STORE or SWIGLU output write it through TMA stores
// (grouped_gemm_epilogue.cuh's epilogue_tma): the consumers stage the tile and go back to their MMAs
// while the stores drain, where the staged 16-byte stores kept both consumers (and so the tensor
// pipe) in the epilogue -- 7-8% of a K = 2048 GEMM (BENCHMARKS.md run 28). Staging the whole tile
// takes 32 KB per consumer for 256 plain columns, so single CTAs run 3 stages; pairs (K >= 4096,
// whose W tiles take longer to arrive) keep 4 and stage the plain tile in two rounds of 16 KB, the
// second round's stores draining under the next tile; SwiGLU's 128 columns fit 16 KB with 4
// stages. Measured (H200, BENCHMARKS.md run 29, staged stores -> TMA stores, us, 2 rounds each):
// DeepSeek-V3 T = 16384 down 6728-6738 -> 6555 (3 stages, whole tile; 4 stages in two rounds:
// 6647); Qwen3 T = 16384 down 642 -> 609-611 (two rounds: 627), gate+up 1162 -> 1139; Mixtral
// T = 16384 plain gate+up (pairs) 11634-11648 -> 11375-11381 (3 stages, whole tile: +0.5..+1%);
// DeepSeek-V3 T = 16384 SwiGLU (pairs) 12724 -> 12688; the plain pairs at K = 7168 and 14336 and
// the layer at T = 4096 (memory-bound) unchanged. MOEKIT_GEMM_TMA_STORE=0 turns them off (A/B).
static bool use_tma_stores() {
  static const int v = env_switch("MOEKIT_GEMM_TMA_STORE", 1);
  return v != 0;
}

// Tall pairs in the pair kernels (grouped_gemm_pairs.cuh's produce_pairs). An expert's full M tile
// paired with its last tile of at most 64 rows ran that last tile on one warpgroup at the full
// tile's pace, multiplying 64 rows for a few real ones (DeepSeek-V3 T = 4096: ~128 rows per
// expert, half of the experts end in a tile of ~1-30 rows). A tall pair splits the 192 rows: each
// CTA takes its half of the full tile's rows at full width and half of the columns of the last
// tile's rows; a last tile of at most 16 rows runs swapped (W rows on the WGMMA's M side, its rows
// on N = 16), so its math shrinks with its rows. At the power cap the wasted math is what the
// time follows: measured (H200, BENCHMARKS.md run 30 call 6, 3 rounds, us, off / tall /
// tall + swapped): DeepSeek-V3 T = 4096 gate+up 4580-4637 / 4506-4562 / 4412-4454, SwiGLU
// 4580-4631 / 4482-4522 / 4347-4375, Zipf T = 16384 13200-13204 / 13073-13095 / 13063-13083, the
// layer 7362-7386 / 7288-7359 / 7270-7336. Since run 34 a tall pair's last tile holds at most
// swap_rows (32) rows and always runs swapped (m64n32 for 17-32 rows, where the m64n64 path
// multiplied 64): the pair kernels then hold no fourth WGMMA shape, and last tiles of 17-32 rows
// elsewhere in pairs swap too; a last tile of 33-64 rows behind a full tile now pairs with it as a
// plain W-sharing pair (rare: uniform DeepSeek-V3 T = 4096 ends ~1-35 rows past a full tile).
// Measured (H200, BENCHMARKS.md run 34 call 6, two builds, 3 rounds, us, before -> after):
// DeepSeek-V3 T = 4096 gate+up 4350-4374 -> 4335-4341, SwiGLU 4300-4312 -> 4295-4301, the layer
// 7172-7212 -> 7055-7171, Zipf T = 16384 13106-13136 -> 13088-13109, SwiGLU T = 16384 even,
// Mixtral T = 4096 gate+up 2850-2884 -> 2776-2782 (one round of the old build read 2545: the
// first case of the call). MOEKIT_GEMM_TALL_PAIRS=0 turns them off (A/B timing).
static int tall_pairs() {
  static const int v = env_switch("MOEKIT_GEMM_TALL_PAIRS", 1);
  return v == 0 ? 0 : 1;
}

// 128 x 256 kernels with bf16 outputs: a tile of at most swap_rows rows (16 in the pair kernels
// until run 34; an expert's last: at DeepSeek-V3 T = 4096 half of the experts end in one of
// ~1-30 rows) runs swapped on both
// consumers, each on half of the W tile's rows (grouped_gemm_swapped.cuh's run_swapped), instead of
// one consumer multiplying 64 rows: the tall pairs' finding that the capped time follows the math
// done. 0 never, 1 in the single-CTA kernels (K < 4096), 2 in the pair kernels too (K >= 4096:
// tail pairs, lone tiles, W-sharing pairs outside tall pairs). Measured (H200, BENCHMARKS.md run
// 31, us, A/B in one call):
// - 0 -> 1: Qwen3 T = 4096 up 375.6 -> 372.5-373.6 (-0.7%), T = 16384 down 614-615 -> 611-613,
//   DeepSeek-V3 T = 16384 down 6505-6508 -> 6479-6485 (-0.4%). DeepSeek-V3 T = 4096 down swings
//   between ~2230 and ~2450 in every setting (call 2: 2424-2454 -> 2264-2308; call 6: 2233-2367
//   -> 2251-2353): no reliable difference there.
// - 1 -> 2: the layer 7319-7341 -> 7172-7211 (-1.9%: its random router skews the loads, so more
//   experts end in a small tile outside a tall pair); the uniform gate+up cases within +-0.2%
//   (their small tiles are W-load-bound: the math saved is not their time).
// MOEKIT_GEMM_SWAP_SMALL=0/1/2 (A/B timing).
static int swap_small() {
  static const int v = env_switch("MOEKIT_GEMM_SWAP_SMALL", 2);
  return v < 0 || v > 2 ? 2 : v;
}

// The most rows a swapped tile takes: 16 runs m64n16 only, 32 also m64n32 for 17-32 rows (~15%
// of the DeepSeek-V3 T = 4096 last tiles; in the pair kernels since run 34, see tall_pairs; it
// also bounds a tall pair's last tile). Run 31 (16 / 32, us): Qwen3 T = 16384 down 611-614 / 611-613,
// T = 4096 up 372.6-373.8 / 372.3-373.6: no difference beyond noise; 32 covers more tiles.
// MOEKIT_GEMM_SWAP_ROWS=16/32 (A/B timing).
static int swap_rows() {
  static const int v = env_switch("MOEKIT_GEMM_SWAP_ROWS", 32);
  return v == 16 ? 16 : 32;
}

// The rows an expert averages in the last build (the folding heuristics' measure: the host knows
// no more of the routing without a synchronization).
inline int64_t mean_rows_per_expert(const moekit_grouped_gemm_params &p) {
  return p.rows / std::max(1, p.num_local);
}

// Folded last tiles in the single-CTA bf16 kernels with TMA stores (plain since run 32, SwiGLU
// since run 35; K >= 4096 too where fold_beats_pairs prefers them to pairs;
// grouped_gemm_fold.cuh's consume_folded): an expert's
// last M tile of at most fold_rows() rows behind a full one runs inside that full tile instead of
// as a tile of its own that streams a whole W tile for a few rows. The fold costs more than its
// math: its m64n16 WGMMAs read the W slices from shared memory again (2.5 KB for 1/16 of an
// m64n256's math). Measured directly (H200, BENCHMARKS.md run 39 call 6: balanced routing with
// every DeepSeek-V3 expert at 512 + F rows against 512, T = 16384, in tiles of one expert's
// column block): a fold of 16 rows costs 0.31 tile at K = 2048 (down), 32 rows 0.38, a 33-64-row
// tail on one consumer 0.71. At K = 7168 (gate+up SwiGLU; BENCHMARKS.md run 40 calls 2-3, the
// single folding CTAs forced by MOEKIT_GEMM_FOLD_OVER_PAIRS=1, since at more than 512 rows per
// expert the pairs run) a fold of 16 rows costs 0.46-0.50 tile alone and ~0.36 spread
// (fold_spread), 32 rows 0.58 / ~0.50, a 48-row tail on one consumer 0.84 (the pairs' tail
// pairs: 0.65, 0.73, 0.74; run 39's table of 0.66 / 0.69 / 0.76 measured those, not folds).
// The measurements below fold 16 rows.
// The folding kernel ran 1.4-2.6% slower than the plain one on tiles that fold nothing until its
// producer got a k-block loop of its own for folding tiles (the fold box's predicated load in
// every k-block of every tile was the cost, BENCHMARKS.md run 32 call 7); since then (run 33 call 1, H200, us, off -> on, 3 rounds, mean rows per
// expert): DeepSeek-V3 T = 4096 down (128) 2249-2317 -> 1982-2046 (-12%), Qwen3 T = 4096 down
// (256) 201.7-202.1 -> 196.4-196.9 (-2.6%), DeepSeek-V3 T = 16384 down (512) 6417-6446 ->
// 6321-6325 (-1.5%), Qwen3 T = 16384 down (1024) 601.1-603.5 -> 601.7-602.1 (even), the
// T = 16384 layer 22553-22587 -> 22531-22575; balanced routing, where nothing folds, still
// +0.5% (T = 16384, 5925-5932 -> 5954-5960) and +1% (T = 4096). So: folds whenever experts
// average more than 96 rows (below, few experts have a full tile to fold into).
// MOEKIT_GEMM_FOLD_SMALL=0 never, 1 by the mean (default), 2 always (A/B timing).
static bool fold_small(const moekit_grouped_gemm_params &p) {
  static const int v = env_switch("MOEKIT_GEMM_FOLD_SMALL", 1);
  if (v == 0 || v == 2) return v == 2;
  return mean_rows_per_expert(p) > 96;
}

// SwiGLU outputs fold too (since run 35; the folded rows' epilogue is the swapped tiles' SwiGLU
// one); the SwiGLU kernel then runs 3 stages instead of 4 (4 with the fold boxes would take
// 240 KB). Measured (H200, BENCHMARKS.md run 35 call 2, us, unfolded 4 stages -> folded 3):
// Qwen3 T = 4096 gate+up SwiGLU 357.2-358.1 -> 349.2-350.4, T = 16384 1140-1182 -> 1132-1183.
// MOEKIT_GEMM_FOLD_SWIGLU=0 keeps them unfolded (A/B timing).
static bool fold_swiglu() {
  static const int v = env_switch("MOEKIT_GEMM_FOLD_SWIGLU", 1);
  return v != 0;
}

// K >= 4096, where pairs run otherwise: the single folding CTAs instead while experts average at
// most 4 M tiles (512 rows). Under uniform routing at 128 rows per expert every expert then runs
// one tile per column block (a full one with its tail folded in, or a lone one), where the pairs
// ran a tall pair of two CTAs in lockstep or paired unrelated lone tiles; at 512 rows the tails
// are still one tile in five. Experts of many tiles keep the pairs, whose shared W tiles halve
// the L2 bytes per tile. Measured (H200, BENCHMARKS.md run 35 calls 1-2, us, pairs -> single
// folding CTAs, 2 rounds each):
// - DeepSeek-V3 (mean 128 / 512 rows): T = 4096 gate+up 4129 -> 3900-4044, SwiGLU 4117-4122 ->
//   3871-4024; T = 16384 gate+up 12346-12349 -> 12231-12259, SwiGLU 12319-12323 -> 12230-12319;
//   Zipf T = 16384 (skewed: a few experts of 20+ tiles) 12495-12761 -> 12787-12809.
// - Mixtral (mean 1024 / 4096 rows, not switched): T = 4096 gate+up 2762-2809 -> 2751-2825,
//   down 1318 -> 1285-1334; T = 16384 gate+up 11121-11126 -> 11102-11105, SwiGLU 11226-11229 ->
//   11096-11106, down 5540-5567 -> 5520-5690: within the rounds' spread.
// - A skewed router (178 of 256 experts hit, max 1076 rows, mean 128), DeepSeek-V3 T = 4096
//   gate+up SwiGLU in the layer: 3669-3670 -> 3780-3782 (+3%): the skew the mean cannot see.
// - Above 512 rows, uniform routing (run 41 call 1, 2 rounds, SwiGLU, pairs -> single): T = 16896
//   13080-13254 -> 13356-13362, T = 20480 15319-15346 -> 15536-15539, T = 24576 18231-18302 ->
//   18538, T = 32768 23400-23422 -> 24087-24208 (+1.4..+3%), though balanced routing with every
//   expert folding favoured the single CTAs at 528 and 544 rows (run 40): the threshold stays.
//   Mixtral T = 16384 gate+up 11489-11527 -> 11449-11465 (-0.4%), Zipf even; the T = 4096 layer
//   (single by default) 7215-7262 against 7344-7380 with pairs forced.
// MOEKIT_GEMM_FOLD_OVER_PAIRS=0 never, 1 always (A/B timing).
static bool fold_beats_pairs(const moekit_grouped_gemm_params &p) {
  static const int v = env_switch("MOEKIT_GEMM_FOLD_OVER_PAIRS", -1);
  if (v == 0 || v == 1) return v == 1;
  return mean_rows_per_expert(p) <= 4 * kBlockM;
}

// The most rows a folded last tile holds: 16 (two m64n16 per 16-deep slice) or 32 (m64n32, the
// swapped small tiles' shape, so no new WGMMA shape in the kernel: tails of 17-32 rows then fold
// too, ~16% of the experts at 512 rows each; 4 KB of shared memory more, 220 KB in all; a 4-byte
// spill outside the loops). Measured (H200, BENCHMARKS.md run 33 call 3, 3 rounds interleaved,
// us, 16 -> 32): DeepSeek-V3 T = 4096 down 2070-2136 -> 2024-2112, T = 16384 down 6494-6531 ->
// 6487-6502, Qwen3 T = 16384 down 624.4-625.6 -> 621.5-622.1, the DeepSeek-V3 T = 4096 layer
// 7224-7257 -> 7182-7221; Qwen3 T = 4096 down even. MOEKIT_GEMM_FOLD_ROWS=16/32 (A/B timing).
static int fold_rows() {
  static const int v = env_switch("MOEKIT_GEMM_FOLD_ROWS", 32);
  return v == 16 ? 16 : 32;
}

// In the 32-row folding kernels, a fold of at most 16 rows runs m64n16 (half of an m64n32's
// math, on the same 32-row box) instead of m64n32: under uniform routing about half the folds
// (DeepSeek-V3: experts of 513-528 rows at T = 16384, 129-144 at T = 4096). The fold's cost is
// mostly its W slices read again from shared memory, which stay, so it gains less than the half
// of the fold's math. Measured (H200, BENCHMARKS.md run 39 call 1, 2 rounds, us, 0 -> 1):
// DeepSeek-V3 T = 16384 gate+up 12448-12685 -> 12424-12457, SwiGLU 12527-12544 -> 12426-12434,
// down 6270-6274 -> 6252-6253; T = 4096 SwiGLU 4140-4167 -> 4128-4139, down even; the T = 4096
// layer 7236-7247 -> 7175. MOEKIT_GEMM_FOLD_NARROW=0/1 (A/B timing).
static int fold_narrow() {
  static const int v = env_switch("MOEKIT_GEMM_FOLD_NARROW", 1);
  return v == 0 ? 0 : 1;
}

// Folding kernels: the fold's two output halves go to two CTAs, consumer 0 of the folding tile
// and consumer 1 of the full tile before it, where K >= 4096 (grouped_gemm_fold.cuh's fold_role
// says why: the lone folding CTA fell behind the CTAs sharing its W tile and, with W tiles of
// 3.67 MB at K = 7168, read W from DRAM again). Measured (H200, BENCHMARKS.md run 40 call 3,
// 3 rounds, us, alone -> spread; single folding CTAs, DeepSeek-V3):
// - K = 7168 gate+up SwiGLU, balanced routing with every expert 4 tiles + a fold: T = 16896
//   (16 rows) 12971-12987 -> 12622-12632 (a fold ~0.48 -> ~0.36 tile; ncu DRAM reads 26.95 ->
//   20.11 GB, 17.6 without folds), T = 17408 (32 rows) 13165-13177 -> 12904-12958; uniform
//   T = 16384 gate+up 12295-12517 -> 12273-12291, SwiGLU 12327-12337 -> 12291-12321; T = 4096
//   (one full tile per expert: nothing to spread) even.
// - K = 2048 down, where 1 MB W tiles stay in L2 and the spread only adds shared-memory traffic
//   (each CTA loads the fold box): balanced T = 16896 6343-6418 -> 6429-6440 (+0.3..1.4%),
//   uniform T = 16384 6235-6297 -> 6230-6239, T = 4096 even. So: K >= 4096.
// MOEKIT_GEMM_FOLD_SPREAD=0 never, 1 where K >= 4096 (default), 2 always (A/B timing, tests).
static int fold_spread(const moekit_grouped_gemm_params &p) {
  static const int v = env_switch("MOEKIT_GEMM_FOLD_SPREAD", 1);
  if (v == 0) return 0;
  if (v == 2) return 1;
  return p.k >= 4096 ? 1 : 0;
}

// The most M tiles an expert sweeps across its column blocks at once (decode_tile): an expert with
// more sweeps in bands of about this many (an even count, the bands as equal as that allows; the
// last one may be short). Without bands, the CTAs at work hold ~4 column blocks of all 32 M tiles
// of a Mixtral expert at T = 16384 (its down projection's X rows, 117 MB, cannot stay in L2
// between the column blocks); two bands hold ~8 column blocks of 16 M tiles, fewer bytes per
// wave, at the price of streaming W twice. Measured (H200, BENCHMARKS.md
// run 28 call 1, 3 rounds, us, no bands / bands of <= 8 / 16 / 24): Mixtral T = 16384 down
// 5772-5776 / 5797-5800 / 5609-5674 / 5622-5655, gate+up SwiGLU 11606-11621 / 11750-11771 /
// 11584-11593 / 11576-11583, plain gate+up 11659-11698 / 11854-11868 / 11677-11683 /
// 11669-11678; DeepSeek-V3 T = 16384 (4-5 M tiles per expert) unchanged. Bands of 8 stream W
// four times and lose. MOEKIT_GEMM_BAND=n sets the limit (0: no bands), for A/B timing.
static int band_m_tiles() {
  static const int v = env_switch("MOEKIT_GEMM_BAND", 24);
  return v > 0 ? v : 0;
}

// Split-K second pass: y[r, :] = sum over splits (in order) of partials[split][r, :], for the rows
// of the single expert's segment (rows past it keep what y held, as without split-K).
__global__ void split_k_reduce_kernel(const float *__restrict__ partials, int split_k, int64_t split_stride,
                                      const int32_t *__restrict__ counts, float *__restrict__ y, int n_out,
                                      int64_t max_elems) {
  wait_for_previous_grid();  // the partial sums of the GEMM this kernel depends on
  const int64_t used = (int64_t)__ldg(counts) * n_out;
  const int64_t end = used < max_elems ? used : max_elems;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < end; i += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.0f;
    for (int split = 0; split < split_k; ++split) s += partials[split * split_stride + i];
    y[i] = s;
  }
}

// Splits of K for an f32 STORE problem (the caller's check) of one expert whose tiles of width bn
// (64 or 256) fill fewer than half of the SMs (the router GEMM at small T: K = 7168 streamed
// through 4 CTAs took 44 us at T = 128 on the H200, cuBLAS 27 us), or 1. At least 4 k-blocks per
// split, at most 16 splits, and the partials must fit the caller's scratch. Returns the split
// count and sets kb_per_split.
inline int choose_split_k(const moekit_grouped_gemm_params &p, const Args &a, int bn, int *kb_per_split) {
  const int k_blocks = (int)ceil_div(p.k, kBlockK);
  *kb_per_split = k_blocks;
  if (p.num_local != 1 || p.partials == nullptr) return 1;
  const int64_t tiles = tile_bound(p) * ceil_div(a.n_out, bn);
  int64_t split = std::min<int64_t>({16, sm_count() / std::max<int64_t>(1, tiles), k_blocks / 4});
  // The partials cover the build's rows, not all of x: a plan sized for many tokens (an engine's
  // maximum batch) still splits when it runs a few.
  while (split >= 2 && split * p.rows * a.n_out > p.partials_capacity) --split;
  if (split < 2) return 1;
  const int per = (int)ceil_div(k_blocks, split);
  *kb_per_split = per;
  return (int)ceil_div(k_blocks, per);  // every split non-empty
}

// Configuration heuristic.
// - 128 x 256 tiles (two consumer warpgroups of m64n256), 4 stages of 48 KB = 192 KB of shared
//   memory: every measured case (BENCHMARKS.md; 4 stages beat 3, 128 x 256 beat narrower tiles
//   wherever there are enough tiles to fill the GPU). With TMA stores (use_tma_stores) a single
//   CTA's plain bf16 output takes 3 stages and a 64 KB staging buffer instead: the epilogue that
//   then overlaps the next tile's MMAs outweighs the shallower ring.
// - 128 x 64 tiles, 8 stages of 24 KB, when 128 x 256 tiles would leave more than half of the SMs
//   idle: narrow outputs over few rows, such as the router GEMM (N = E = 256, K = 7168: at
//   T = 4096 only 33 tiles of 128 x 256 for 132 SMs, 4x as many of 128 x 64). Measured on the H200
//   (BENCHMARKS.md run 13): DeepSeek-V3 router 47.7 us at T = 4096 (cuBLAS 43.5) and 44 us at
//   T = 128 and 1024, where K streamed through 4-32 CTAs bounds it; one-expert f32 problems
//   there split K (choose_split_k): 20.9 us at T = 128, 30.7 us at T = 1024; outputs at least
//   256 wide split K over 128 x 256 tiles instead when those splits fill the GPU (below).
template <int kEpilogue, typename OutT>
moekit_status dispatch(const moekit_grouped_gemm_params &p, const Args &a, moekit_stream stream) {
  if (p.implementation == MOEKIT_GEMM_ORACLE) return run_oracle<kEpilogue, OutT>(p, a, stream);
  const int cols_per_tile = kEpilogue == MOEKIT_EPILOGUE_SWIGLU ? 128 : 256;
  const int64_t wide_tiles = tile_bound(p) * ceil_div(a.n_out, cols_per_tile);
  if (2 * wide_tiles >= sm_count()) {
    if constexpr (std::is_same<OutT, __nv_bfloat16>::value && kEpilogue != MOEKIT_EPILOGUE_ROW_SCALE) {
      if (use_tma_stores()) {
        // See use_tma_stores for the stages and rounds; UNSUPPORTED: a y the store map refuses
        // (misaligned), or no cluster fits: the staged stores below.
        constexpr bool kSwiglu = kEpilogue == MOEKIT_EPILOGUE_SWIGLU;
        const bool fold = fold_small(p) && (!kSwiglu || fold_swiglu());
        if (use_w_pairs(p, fold)) {
          const moekit_status pairs = run_wgmma<256, 4, kEpilogue, OutT, false, 2, kSwiglu ? 1 : 2>(p, a, stream);
          if (pairs != MOEKIT_ERR_UNSUPPORTED) return pairs;
        }
        if (fold) {
          // 3 stages beside the fold boxes and a whole staged tile. (4 stages fit with the tile
          // staged in rounds of one 64-column box, 226 KB, and measured even where W streams from
          // DRAM: H200, BENCHMARKS.md run 35 call 8, 3 rounds, us, 4 -> 3 stages: DeepSeek-V3
          // T = 4096 gate+up 3953-4041 / 3969-4080, SwiGLU 3983-4024 / 3935-4041, T = 16384 gate+up
          // 12315-12336 / 12273-12280, SwiGLU 12303-12310 / 12323-12337, the layer 6950-6974 /
          // 6984-7008; that instance spilled 28 bytes.)
          const moekit_status folded = fold_rows() == 32
                                           ? run_wgmma<256, 3, kEpilogue, OutT, false, 1, 1, 32>(p, a, stream)
                                           : run_wgmma<256, 3, kEpilogue, OutT, false, 1, 1, 16>(p, a, stream);
          if (folded != MOEKIT_ERR_UNSUPPORTED) return folded;
        }
        const moekit_status single = run_wgmma<256, kSwiglu ? 4 : 3, kEpilogue, OutT, false, 1, 1>(p, a, stream);
        if (single != MOEKIT_ERR_UNSUPPORTED) return single;
      }
    }
    if (use_w_pairs(p, false)) {
      const moekit_status pairs = run_wgmma<256, 4, kEpilogue, OutT, false, 2>(p, a, stream);
      if (pairs != MOEKIT_ERR_UNSUPPORTED) return pairs;  // else: no cluster fits; single CTAs
    }
    return run_wgmma<256, 4, kEpilogue, OutT>(p, a, stream);
  }
  if constexpr (kEpilogue == MOEKIT_EPILOGUE_STORE && std::is_same<OutT, float>::value) {
    // Outputs at least 256 wide split K over 128 x 256 tiles when the splits fill at least 3/4 of
    // the SMs (the DeepSeek-V3 router GEMM at T = 4096: 33 tiles x 4 splits of 28 k-blocks);
    // otherwise 128 x 64 tiles split as far as they need. Wide tiles move half the L2 bytes per
    // FLOP of narrow ones, but narrower outputs would waste most of their columns. Measured (H200,
    // BENCHMARKS.md run 27 call 5, wide -> narrow, best of 3): router T = 4096 DeepSeek-V3 (N =
    // 256) 38.6 -> 43.6 us (cuBLAS 43.5 in run 13); Qwen3 (N = 128) 19.7 -> 15.7; Mixtral (N = 8)
    // 29.9 -> 17.3. MOEKIT_GEMM_WIDE_SPLIT=0 forces the narrow tiles (for A/B timing).
    Args split_args = a;
    static const int wide_split = env_switch("MOEKIT_GEMM_WIDE_SPLIT", 1);
    bool wide = wide_split != 0 && a.n_out >= 256;
    if (wide) {
      split_args.split_k = choose_split_k(p, a, 256, &split_args.kb_per_split);
      wide = split_args.split_k >= 2 && 4 * wide_tiles * split_args.split_k >= 3 * sm_count();
    }
    if (!wide) split_args.split_k = choose_split_k(p, a, 64, &split_args.kb_per_split);
    if (split_args.split_k > 1) {
      split_args.partials = p.partials;
      split_args.split_stride = p.rows * a.n_out;
      if (wide) {
        MOEKIT_TRY_STATUS((run_wgmma<256, 4, kEpilogue, OutT, true>(p, split_args, stream)));
      } else {
        MOEKIT_TRY_STATUS((run_wgmma<64, 8, kEpilogue, OutT, true>(p, split_args, stream)));
      }
      const int64_t elems = p.rows * a.n_out;
      const int blocks = (int)std::max<int64_t>(1, std::min<int64_t>(ceil_div(elems, 256), 4 * sm_count()));
      MOEKIT_TRY(launch_dependent(split_k_reduce_kernel, dim3(blocks), dim3(256), 0, stream,
                                  static_cast<const float *>(p.partials), split_args.split_k,
                                  split_args.split_stride, p.expert_counts, static_cast<float *>(p.y), a.n_out,
                                  elems));
      return MOEKIT_OK;
    }
  }
  return run_wgmma<64, 8, kEpilogue, OutT>(p, a, stream);
}

template <typename OutT>
moekit_status dispatch_epilogue(const moekit_grouped_gemm_params &p, const Args &a, moekit_stream stream) {
  switch (p.epilogue) {
    case MOEKIT_EPILOGUE_STORE: return dispatch<MOEKIT_EPILOGUE_STORE, OutT>(p, a, stream);
    case MOEKIT_EPILOGUE_SWIGLU: return dispatch<MOEKIT_EPILOGUE_SWIGLU, OutT>(p, a, stream);
    case MOEKIT_EPILOGUE_ROW_SCALE: return dispatch<MOEKIT_EPILOGUE_ROW_SCALE, OutT>(p, a, stream);
    default: return MOEKIT_ERR_INVALID_ARGUMENT;
  }
}

}  // namespace gemm
}  // namespace moekit

extern "C" moekit_status moekit_grouped_gemm(const moekit_grouped_gemm_params *p, moekit_stream stream) {
  using namespace moekit::gemm;
  if (p == nullptr || p->n < 8 || p->k < 8 || p->n % 8 != 0 || p->k % 8 != 0 || p->num_local < 1 ||
      p->x_rows < 0 || p->rows < 0 || p->rows > p->x_rows || p->x == nullptr || p->w == nullptr || p->y == nullptr ||
      p->partials_capacity < 0 || reinterpret_cast<uintptr_t>(p->y) % 16 != 0 || p->max_ctas < 0 || p->reserved != 0 ||
      (p->epilogue == MOEKIT_EPILOGUE_SWIGLU && p->n % 16 != 0) ||
      (p->epilogue == MOEKIT_EPILOGUE_ROW_SCALE && (p->row_map == nullptr || p->row_weights == nullptr)) ||
      p->implementation < MOEKIT_GEMM_WGMMA || p->implementation > MOEKIT_GEMM_WGMMA_PAIRS ||
      (p->implementation != MOEKIT_GEMM_ORACLE && p->tile_counter == nullptr)) {
    return MOEKIT_ERR_INVALID_ARGUMENT;
  }
  Args a;
  a.tiles = p->tiles;
  a.num_tiles = p->num_tiles;
  a.offsets = p->expert_offsets;
  a.counts = p->expert_counts;
  a.row_map = p->row_map;
  a.row_weights = p->row_weights;
  a.tile_counter = p->tile_counter;
  a.y = p->y;
  a.n = p->n;
  a.k = p->k;
  a.n_out = p->epilogue == MOEKIT_EPILOGUE_SWIGLU ? p->n / 2 : p->n;
  a.partials = nullptr;
  a.split_stride = 0;
  a.split_k = 1;
  a.kb_per_split = (int32_t)moekit::ceil_div(p->k, kBlockK);
  a.band_m = band_m_tiles();
  a.tall_pairs = tall_pairs();
  a.swap_small = swap_small();
  a.swap_rows = swap_rows();
  a.fold_narrow = fold_narrow();
  a.fold_spread = fold_spread(*p);
  if (p->out_dtype == MOEKIT_DTYPE_BF16) return dispatch_epilogue<__nv_bfloat16>(*p, a, stream);
  if (p->out_dtype == MOEKIT_DTYPE_F32) return dispatch_epilogue<float>(*p, a, stream);
  return MOEKIT_ERR_INVALID_ARGUMENT;
}
