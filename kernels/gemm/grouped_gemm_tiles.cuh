// Grouped GEMM, sm_90a: the launch arguments, the tile shape and the tile schedule (which CTA
// runs which M tile and column block, and in what order). Shared by the kernel's producer and
// consumers; grouped_gemm_sm90.cuh describes the kernel.
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

}  // namespace gemm
}  // namespace moekit
