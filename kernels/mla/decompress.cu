// C entry point of the MLA decompression: the prepare kernel (tile counter, paged row table) or, for
// a paged source with a gather buffer, the gather kernel; then the WGMMA kernel as its
// programmatic dependent. Or the simple FMA oracle.
#include <cuda.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "decompress_sm90.cuh"
#include "device/launch.cuh"
#include "device/tensor_map.cuh"
#include "moekit.h"

namespace moekit {
namespace mla {

// The cache row of token t as token t - first of sequence b (whose tokens are [first, next) and
// whose cache position starts at `start`), or -1 when t lies outside the sequence or the table
// does not map it (every bad device-side value lands here instead of out of bounds).
__device__ __forceinline__ int64_t row_in_sequence(const moekit_mla_decompress_params &p, int b, int t, int first,
                                                   int next, int64_t start) {
  if (t < first || t >= next) return -1;
  const int64_t pos = start + (t - first);
  if (pos < 0 || pos / p.block_size >= p.max_blocks_per_seq) return -1;
  const int64_t block = p.block_table[(int64_t)b * p.max_blocks_per_seq + pos / p.block_size];
  if (block < 0 || block >= p.num_rows / p.block_size) return -1;
  return block * p.block_size + pos % p.block_size;
}

// The cache row of token t under the paged addressing of moekit_mla_decompress_params, or -1 when
// t lies in no sequence or the table does not map it.
__device__ __forceinline__ int64_t paged_row(const moekit_mla_decompress_params &p, int t) {
  // The last sequence b whose first token is <= t.
  int lo = 0, hi = p.num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.cu_seqlens[mid] <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int b = lo;
  return row_in_sequence(p, b, t, p.cu_seqlens[b], p.cu_seqlens[b + 1], p.seq_starts != nullptr ? p.seq_starts[b] : 0);
}

// paged_row for a whole warp asking about the same token t, when the batch has at most 32
// sequences: lane b loads sequence b's bounds, start and (when t lies in it) block id, so the
// chain is two rounds of loads instead of a binary search's log2(sequences) dependent ones plus
// two. The same sequence as paged_row's (the last b with cu_seqlens[b] <= t) for every valid
// table; -1 where paged_row gives -1.
__device__ __forceinline__ int64_t paged_row_warp(const moekit_mla_decompress_params &p, int t, int lane) {
  const int b = lane;
  bool starts_before = false;  // cu_seqlens[b] <= t
  int64_t row = -1;            // token t's row if b is its sequence
  if (b < p.num_seqs) {
    const int first = p.cu_seqlens[b];
    const int next = p.cu_seqlens[b + 1];
    const int64_t start = p.seq_starts != nullptr ? p.seq_starts[b] : 0;
    starts_before = first <= t;
    row = row_in_sequence(p, b, t, first, next, start);
  }
  const unsigned before = __ballot_sync(0xffffffffu, starts_before);
  if (before == 0) return -1;
  const int owner = 31 - __clz(before);
  const long long r = __shfl_sync(0xffffffffu, (long long)row, owner);
  return r;
}

__device__ __forceinline__ int64_t oracle_row(const moekit_mla_decompress_params &p, int t) {
  if (p.block_table != nullptr) return paged_row(p, t);
  return t < p.num_rows ? t : -1;
}

// Zeroes the WGMMA kernel's tile counter and, for a paged source, resolves every token's cache row
// once (the WGMMA kernel's producer and consumers both need it, per tile).
__global__ void prepare_kernel(const moekit_mla_decompress_params p) {
  allow_next_grid();  // the WGMMA kernel waits for this grid's completion before reading its output
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t == 0 && p.tile_counter != nullptr) *p.tile_counter = 0;
  if (p.block_table != nullptr && t < p.tokens) p.row_src[t] = (int32_t)paged_row(p, t);
}

// Copies each token's cache row (r latent values, then d_rope k_pe values) into row t of
// p.gathered, zeros where the table maps no row, so that the WGMMA kernel reads a paged source
// as contiguous rows by TMA; one warp per token, four 16-byte loads in flight per lane. Also
// zeroes the WGMMA kernel's tile counter (it replaces prepare_kernel). The rows stay in L2 for the
// WGMMA kernel (2 (r + d_rope) bytes per token: 9.4 MB at T = 8192).
// Why: the WGMMA kernel reads each latent tile once per head (128 times for DeepSeek-V3), so its
// own gather (kTmaA = false) cost 5.7% over a contiguous source at T = 8192 and 10% at T = 1024;
// gathered once here, 1.7% and 5.3% (H200, BENCHMARKS.md run 23). At T = 1024 this kernel's
// ~3 us, a chain of dependent loads (sequence search, block id, row), is not hidden; the warp-wide
// lookup below takes it from ~6 dependent loads to 3 for batches of up to 32 sequences.
constexpr int kGatherWarps = 8;
__global__ void __launch_bounds__(kGatherWarps * 32) gather_kernel(const moekit_mla_decompress_params p,
                                                                   const bool warp_lookup) {
  allow_next_grid();  // the WGMMA kernel waits for this grid's completion before reading its output
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.tile_counter = 0;
  const int t = blockIdx.x * kGatherWarps + threadIdx.x / 32;
  if (t >= p.tokens) return;
  const int lane = threadIdx.x % 32;
  // Every lane the same row: a warp-wide lookup for up to 32 sequences, else the binary search
  // (every lane the same loads, broadcast).
  const int64_t src = p.num_seqs <= 32 && warp_lookup ? paged_row_warp(p, t, lane) : paged_row(p, t);
  const int latent_vecs = p.rank / 8, row_vecs = (p.rank + p.d_rope) / 8;  // 16-byte vectors
  const uint4 *latent = static_cast<const uint4 *>(p.latent) + (src < 0 ? 0 : src * p.latent_stride / 8);
  const uint4 *k_pe = static_cast<const uint4 *>(p.k_pe) + (src < 0 ? 0 : src * p.k_pe_stride / 8);
  uint4 *dst = static_cast<uint4 *>(p.gathered) + (int64_t)t * row_vecs;
  constexpr int kInFlight = 4;
  for (int v0 = lane; v0 < row_vecs; v0 += 32 * kInFlight) {
    uint4 x[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int v = v0 + 32 * u;
      x[u] = make_uint4(0, 0, 0, 0);
      if (src >= 0 && v < row_vecs) x[u] = __ldg(v < latent_vecs ? latent + v : k_pe + (v - latent_vecs));
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      if (v0 + 32 * u < row_vecs) dst[v0 + 32 * u] = x[u];
    }
  }
}

// Whether a paged source is gathered by gather_kernel first (when the caller gave the buffer):
// MOEKIT_MLA_PREGATHER=0 keeps the WGMMA kernel's own gather (EXPERIMENT, for A/B timing).
static bool pregather_enabled() {
  static const bool enabled = env_switch("MOEKIT_MLA_PREGATHER", 1) != 0;
  return enabled;
}

// One thread per output element of K or V; the dot product over r in f32. Slow and obviously
// right: the WGMMA kernel's test oracle.
__global__ void decompress_oracle_kernel(const moekit_mla_decompress_params p) {
  const int k_dim = p.d_nope + p.d_rope;
  const int cols = k_dim + p.d_v;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (int64_t)p.tokens * p.heads * cols) return;
  const int col = (int)(i % cols);
  const int h = (int)((i / cols) % p.heads);
  const int t = (int)(i / ((int64_t)cols * p.heads));
  const int64_t src = oracle_row(p, t);
  const __nv_bfloat16 *latent = static_cast<const __nv_bfloat16 *>(p.latent);
  const __nv_bfloat16 *k_pe = static_cast<const __nv_bfloat16 *>(p.k_pe);
  const __nv_bfloat16 *w = static_cast<const __nv_bfloat16 *>(p.w);
  auto dot = [&](int w_row) {
    if (src < 0) return 0.0f;
    const __nv_bfloat16 *x = latent + src * p.latent_stride;
    const __nv_bfloat16 *wr = w + ((int64_t)h * (p.d_nope + p.d_v) + w_row) * p.rank;
    float s = 0.0f;
    for (int c = 0; c < p.rank; ++c) s = fmaf(__bfloat162float(x[c]), __bfloat162float(wr[c]), s);
    return s;
  };
  __nv_bfloat16 *k = static_cast<__nv_bfloat16 *>(p.k);
  __nv_bfloat16 *v = static_cast<__nv_bfloat16 *>(p.v);
  if (col < p.d_nope) {
    k[t * p.k_token_stride + h * p.k_head_stride + col] = __float2bfloat16_rn(dot(col));
  } else if (col < k_dim) {
    const int c = col - p.d_nope;
    k[t * p.k_token_stride + h * p.k_head_stride + col] =
        src < 0 ? __float2bfloat16_rn(0.0f) : k_pe[src * p.k_pe_stride + c];
  } else {
    const int c = col - k_dim;
    v[t * p.v_token_stride + h * p.v_head_stride + c] = __float2bfloat16_rn(dot(p.d_nope + c));
  }
}

static_assert(kBlockK == 64, "make_bf16_sw128_map reads 64-column boxes");

// Whether a contiguous source's call launches the decompression kernel alone (the kernel leaves its
// tile counter at zero). MOEKIT_MLA_PREPARE=1 launches the zeroing kernel before it, as until run 38 (A/B).
static bool skip_prepare() {
  static const int prepare = env_switch("MOEKIT_MLA_PREPARE", 0);
  return prepare == 0;
}

// The contiguous source's configuration: whether the 4-stage ring (one WGMMA group in flight, one
// staging buffer, k_pe by the producer's threads) rather than 3 stages (drained k-blocks, two
// staging buffers, k_pe by TMA; run_wgmma describes both). With at most 8 M tiles (T <= 1024) each
// head's W tile serves at most 8 tiles, so W streams from DRAM all through the grid, and the deeper
// ring wins; with more, 3 stages (H200, rounds interleaved, us, 3 -> 4 stages):
//   T = 1024, H = 128 (8 M tiles): 61.9-62.5 -> 61.8-62.1 (run 34 call 3), 62.1-62.4 ->
//     61.3-61.6 (run 34 call 8), 62.5-63.1 -> 62.0-62.4 (run 38 call 6), 62.0-62.3 -> 61.1-61.6
//     (run 38 call 7); paged 65.0-65.2 -> 64.4-64.7 (call 7).
//   T = 8192, H = 128 (64 M tiles): 415.8-417.1 -> 427.0-428.1 (run 34 call 3), 422.8-423.5 ->
//     431.6-432.5 (run 38 call 6).
//   T = 8192, H = 16 (64 M tiles, as many tiles as T = 1024, H = 128): 61.6-62.6 -> 61.7-63.2
//     (run 38 call 6), 62.0-62.8 -> 63.0-65.6 (call 7); H = 12: 48.3-48.8 -> 47.2-48.0,
//     48.4-48.7 -> 47.7-48.1 (within the spread of H = 16's, which goes the other way).
static bool four_stage_ring(int64_t m_tiles) { return m_tiles <= 8; }

// Whether the WGMMA kernel handles these dimensions (the Rust side reports the limits).
static bool wgmma_supports(const moekit_mla_decompress_params &p) {
  return p.d_nope == kHeadDim && p.d_v == kHeadDim && p.d_rope <= kMaxRope && p.d_rope % 8 == 0 &&
         p.rank % kBlockK == 0 && p.latent_stride % 8 == 0 && p.k_pe_stride % 8 == 0 && p.k_token_stride % 8 == 0 &&
         p.k_head_stride % 8 == 0 && p.v_token_stride % 8 == 0 && p.v_head_stride % 8 == 0 &&
         p.tile_counter != nullptr;
}

template <int kStages, int kStagingBufs, bool kTmaA, bool kKpeTma = false>
static moekit_status launch_wgmma(const CUtensorMap &map_w, const CUtensorMap &map_a, const CUtensorMap &map_k,
                                  const CUtensorMap &map_v, const CUtensorMap &map_kpe_in,
                                  const CUtensorMap &map_kpe_out, const Args &a, int grid, bool dependent,
                                  moekit_stream stream) {
  constexpr size_t smem = smem_bytes<kStages, kStagingBufs, kKpeTma>();
  auto kernel = decompress_wgmma_kernel<kStages, kStagingBufs, kTmaA, kKpeTma>;
  // The kernel's setmaxnreg split assumes the CTA's register pool of its launch bounds (384 x 168,
  // asserted at compile time); ptxas allocating fewer would make setmaxnreg.inc wait forever.
  static const int registers = [kernel] {
    cudaFuncAttributes attr;
    return cudaFuncGetAttributes(&attr, kernel) == cudaSuccess ? attr.numRegs : 0;
  }();
  if (registers < sm90::launch_bound_registers(kThreads)) return MOEKIT_ERR_UNSUPPORTED;
  MOEKIT_TRY(allow_dynamic_smem(kernel, smem));
  if (!dependent) {
    // The call's only kernel: an ordinary launch, which starts once the stream's previous kernel
    // (which may write the latent) has finished.
    kernel<<<grid, kThreads, smem, stream>>>(map_w, map_a, map_k, map_v, map_kpe_in, map_kpe_out, a);
    MOEKIT_TRY_LAUNCH();
    return MOEKIT_OK;
  }
  MOEKIT_TRY(launch_dependent(kernel, dim3(grid), dim3(kThreads), smem, stream, map_w, map_a, map_k, map_v, map_kpe_in,
                              map_kpe_out, a));
  return MOEKIT_OK;
}

static moekit_status run_wgmma(const moekit_mla_decompress_params &params, moekit_stream stream) {
  if (!wgmma_supports(params)) return MOEKIT_ERR_UNSUPPORTED;
  moekit_mla_decompress_params p = params;
  const bool pregathered = p.block_table != nullptr && p.gathered != nullptr && pregather_enabled();
  // A paged source without the gather builds its row table first; a contiguous one zeroes the tile
  // counter first only under MOEKIT_MLA_PREPARE=1 (the counter rests at zero, see below).
  const bool prepare = !pregathered && (p.block_table != nullptr || !skip_prepare());
  if (pregathered) {
    // The warp-wide sequence lookup (paged_row_warp) against the binary search, H200 (BENCHMARKS.md
    // run 27 call 10, 4 rounds): paged T = 1024 65.26-65.52 -> 64.64-65.06 us, +5.0..+5.3% ->
    // +4.2..+4.6% over the contiguous source. MOEKIT_MLA_WARP_LOOKUP=0 forces the search (A/B).
    static const bool warp_lookup = env_switch("MOEKIT_MLA_WARP_LOOKUP", 1) != 0;
    gather_kernel<<<(unsigned)ceil_div(p.tokens, kGatherWarps), kGatherWarps * 32, 0, stream>>>(p, warp_lookup);
    MOEKIT_TRY_LAUNCH();
    // From here on the source is contiguous: token t's row is row t of the gathered buffer.
    p.latent = p.gathered;
    p.k_pe = static_cast<const __nv_bfloat16 *>(p.gathered) + p.rank;
    p.latent_stride = p.k_pe_stride = p.rank + p.d_rope;
    p.num_rows = p.tokens;
    p.block_table = nullptr;
  } else if (prepare) {
    const int prepare_threads = 256;
    const int prepare_blocks = p.block_table != nullptr ? (int)ceil_div(p.tokens, prepare_threads) : 1;
    prepare_kernel<<<prepare_blocks, prepare_threads, 0, stream>>>(p);
    MOEKIT_TRY_LAUNCH();
  }
  CUtensorMap map_w;
  // kv_b_proj [heads * 256, r] in boxes of 256 rows (one head) x 64.
  if (!make_bf16_sw128_map(&map_w, p.w, (int64_t)p.heads * kBlockN, p.rank, kBlockN)) return MOEKIT_ERR_UNSUPPORTED;
  Args a;
  a.latent = static_cast<const __nv_bfloat16 *>(p.latent);
  a.k_pe = static_cast<const __nv_bfloat16 *>(p.k_pe);
  a.latent_stride = p.latent_stride;
  a.k_pe_stride = p.k_pe_stride;
  a.num_rows = p.num_rows;
  a.row_src = p.block_table != nullptr ? p.row_src : nullptr;
  a.k = static_cast<__nv_bfloat16 *>(p.k);
  a.v = static_cast<__nv_bfloat16 *>(p.v);
  a.k_token_stride = p.k_token_stride;
  a.k_head_stride = p.k_head_stride;
  a.v_token_stride = p.v_token_stride;
  a.v_head_stride = p.v_head_stride;
  a.tile_counter = p.tile_counter;
  a.tokens = p.tokens;
  a.heads = p.heads;
  a.rank = p.rank;
  a.d_rope = p.d_rope;
  a.source_from_previous_grid = pregathered ? 1 : 0;
  // The tile counter rests at zero (zeroed at allocation, and every grid leaves it so), so a
  // contiguous source's call is one launch, the decompression kernel alone: -0.3..-0.8 us at
  // T = 1024 (H200, BENCHMARKS.md run 38, 4 rounds each: 62.2-62.8 -> 61.9-62.3 us in call 3,
  // 62.5-62.8 -> 61.7-62.4 in call 5) against the one-block zeroing kernel before it. Paged
  // sources keep their kernel before it (the row table, or the gather), which zeroes the counter
  // too.
  // Whether a kernel of this call (the zeroing, the row table or the gather) runs first: then the
  // decompression kernel launches as its programmatic dependent.
  const bool dependent = pregathered || prepare;
  // MOEKIT_MLA_GROUP=n sets the tile order's group of M tiles (decompress_sm90.cuh's kGroupM has
  // the measurements; 16 and 64 measured within noise of 32 in BENCHMARKS.md run 34 call 2).
  static const int group_m = env_switch("MOEKIT_MLA_GROUP", kGroupM);
  a.group_m = group_m > 0 ? std::min(group_m, 1 << 16) : kGroupM;  // group_m * heads fits an int

  const int64_t tiles = ceil_div(p.tokens, kBlockM) * p.heads;
  // One CTA per SM. (The fewest CTAs that finish in the same number of tile rounds, 128 for the
  // 1024 tiles of T = 1024, measured slower: 61.7-62.4 -> 63.4-64.0 us, BENCHMARKS.md run 38.)
  const int grid = (int)std::max<int64_t>(1, std::min<int64_t>(sm_count(), tiles));
  // The epilogue writes K[:, :, 0:128] and V through TMA stores: tensor maps over the caller's
  // strides (multiples of 8 elements on 16-byte-aligned bases, as checked above and on the Rust
  // side, which is what TMA needs too).
  CUtensorMap map_k, map_v;
  if (!make_bf16_head_block_store_map(&map_k, p.k, p.tokens, p.heads, p.k_head_stride, p.k_token_stride, 64) ||
      !make_bf16_head_block_store_map(&map_v, p.v, p.tokens, p.heads, p.v_head_stride, p.v_token_stride, 64)) {
    return MOEKIT_ERR_UNSUPPORTED;
  }
  // A contiguous latent (a paged one gathered above) arrives by TMA (rows past num_rows read as
  // zeros, as source_row says); a paged one without the gather buffer is gathered by the kernel
  // itself (decompress_sm90.cuh, kTmaA, has the measurements).
  //
  // The contiguous configuration: 3 stages and two staging buffers per consumer (all four boxes
  // of a tile staged without waiting on a store), each k-block's WGMMAs drained before its stage
  // is freed, and k_pe moved by TMA through a 16 KB box (where d_rope = 64 and the maps take the
  // caller's pointers) instead of by the producer's 96 idle threads. The dense GEMM of the same
  // FLOPs through the grouped kernel (its 3 stages, whole-tile staging, drained k-blocks) ran
  // 655 TFLOP/s at T = 32768 where this kernel ran 574 (BENCHMARKS.md run 34 call 1), and with its
  // k_pe stores removed (a diagnostic build) this kernel ran 3.5% faster at T = 8192. Measured
  // (H200, run 34 call 3, 4 rounds interleaved, us; the old 4 stages / wait<1> / copier threads
  // -> this): T = 8192 427.0-428.1 -> 415.8-417.1 (-2.6%), paged 431.6-433.3 -> 420.2-422.4,
  // H = 16 63.1-64.6 -> 61.7-63.4, T = 1024 61.8-62.1 -> 61.9-62.5 (even), paged even,
  // T = 32768 1715-1910 -> 1661-1808 (power state). Each part alone: 3 stages + drain (copier
  // threads) 423.9-424.6 at T = 8192; 3 stages + TMA k_pe (wait<1>) 427.6-428.4. (Run 19 had
  // measured 3 stages with a buffer per pass the same as 4 stages at T = 8192.)
  // Where T <= 1024 the old configuration is the faster one (four_stage_ring).
  // MOEKIT_MLA_STAGES=3 or 4 fixes the configuration, MOEKIT_MLA_KPE_TMA=0 runs the copier threads
  // with the new one (A/B timing).
  CUtensorMap map_a;
  if (p.block_table == nullptr && p.num_rows >= 1 &&
      make_bf16_sw128_map(&map_a, p.latent, p.num_rows, p.rank, kBlockM, p.latent_stride)) {
    static const int stages_switch = env_switch("MOEKIT_MLA_STAGES", 0);
    static const int kpe_tma = env_switch("MOEKIT_MLA_KPE_TMA", 1);
    const bool four_stages =
        stages_switch == 3 || stages_switch == 4 ? stages_switch == 4 : four_stage_ring(ceil_div(p.tokens, kBlockM));
    if (four_stages) {
      return launch_wgmma<4, 1, true>(map_w, map_a, map_k, map_v, map_w, map_w, a, grid, dependent, stream);
    }
    // k_pe by TMA: boxes of [128 rows][64 columns] over the source's k_pe columns, stored to
    // K[t, h, 128:192].
    CUtensorMap map_kpe_in, map_kpe_out;
    if (kpe_tma != 0 && p.d_rope == 64 &&
        make_bf16_sw128_map(&map_kpe_in, p.k_pe, p.num_rows, 64, kBlockM, p.k_pe_stride) &&
        make_bf16_head_block_store_map(&map_kpe_out, static_cast<__nv_bfloat16 *>(p.k) + kHeadDim, p.tokens, p.heads,
                                       p.k_head_stride, p.k_token_stride, kBlockM, 64)) {
      return launch_wgmma<3, 2, true, true>(map_w, map_a, map_k, map_v, map_kpe_in, map_kpe_out, a, grid, dependent,
                                            stream);
    }
    return launch_wgmma<3, 2, true>(map_w, map_a, map_k, map_v, map_w, map_w, a, grid, dependent, stream);
  }
  // The in-kernel gather (paged caches without the gather buffer): 4 stages, its copier threads.
  return launch_wgmma<4, 1, false>(map_w, map_w, map_k, map_v, map_w, map_w, a, grid, dependent, stream);
}

static moekit_status run_oracle(const moekit_mla_decompress_params &p, moekit_stream stream) {
  const int64_t n = (int64_t)p.tokens * p.heads * (p.d_nope + p.d_rope + p.d_v);
  decompress_oracle_kernel<<<(unsigned)ceil_div(n, 256), 256, 0, stream>>>(p);
  return last_launch_status();
}

}  // namespace mla
}  // namespace moekit

extern "C" moekit_status moekit_mla_decompress(const moekit_mla_decompress_params *p, moekit_stream stream) {
  using namespace moekit::mla;
  if (p == nullptr || p->tokens < 0 || p->heads < 1 || p->rank < 1 || p->d_nope < 1 || p->d_v < 1 ||
      p->d_rope < 0 || p->latent == nullptr || p->w == nullptr || p->k == nullptr || p->v == nullptr ||
      (p->d_rope > 0 && p->k_pe == nullptr) || p->num_rows < 0 ||
      (p->block_table != nullptr &&
       (p->cu_seqlens == nullptr || p->row_src == nullptr || p->num_seqs < 1 || p->block_size < 1 ||
        p->max_blocks_per_seq < 1))) {
    return MOEKIT_ERR_INVALID_ARGUMENT;
  }
  if (p->tokens == 0) return MOEKIT_OK;
  if (p->implementation == MOEKIT_MLA_ORACLE) return run_oracle(*p, stream);
  if (p->implementation == MOEKIT_MLA_WGMMA) return run_wgmma(*p, stream);
  return MOEKIT_ERR_INVALID_ARGUMENT;
}
