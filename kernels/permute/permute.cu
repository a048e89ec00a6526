// permute: copies each token row to the permuted rows of its k assignments (a scatter by token),
// and zero-fills each expert segment's padding rows.
//
// Floor: read T*H elements once, write T*k*H: at DeepSeek-V3 T = 4096 (H = 7168, k = 8, bf16)
// 59 MB + 470 MB = 529 MB, 124 us at 4.25 TB/s. Walking tokens (not permuted rows) reads each token
// row exactly once, so the floor is also the traffic; the k stores of one loaded vector go to k
// different rows, each written with full 16-byte stores.
#include <algorithm>
#include <cstdint>

#include "device/launch.cuh"
#include "device/load.cuh"
#include "device/sm90.cuh"
#include "moekit.h"

namespace moekit {
namespace permute {

constexpr int kWarps = 8;
// Vectors each lane loads before its first store (template parameter kUnroll of the kernel).

template <int VW>
struct alignas(VW) Bytes {
  unsigned char b[VW];
};

// Copies one row of n_vec VW-byte vectors from src to every dst row in rows[0..k) that is >= 0;
// kStreaming: with the streaming store hint.
template <int VW, int kUnroll, bool kStreaming = false>
__device__ __forceinline__ void scatter_row(const unsigned char *src, unsigned char *dst_base, int64_t row_bytes,
                                            const int *rows, int k, int64_t n_vec, int lane) {
  for (int64_t v0 = lane; v0 < n_vec; v0 += 32 * kUnroll) {
    Bytes<VW> val[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + u * 32;
      if (v < n_vec) val[u] = ldg(reinterpret_cast<const Bytes<VW> *>(src) + v);
    }
    for (int j = 0; j < k; ++j) {
      const int r = rows[j];
      if (r < 0) continue;
      Bytes<VW> *dst = reinterpret_cast<Bytes<VW> *>(dst_base + r * row_bytes);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + u * 32;
        if (v < n_vec) {
          if constexpr (kStreaming) {
            st_streaming(dst + v, val[u]);
          } else {
            st(dst + v, val[u]);
          }
        }
      }
    }
  }
}

template <int VW>
__device__ __forceinline__ void zero_row(unsigned char *dst, int64_t n_vec, int lane) {
  Bytes<VW> z;
#pragma unroll
  for (int i = 0; i < VW; ++i) z.b[i] = 0;
  for (int64_t v = lane; v < n_vec; v += 32) st(reinterpret_cast<Bytes<VW> *>(dst) + v, z);
}

// Blocks [0, token_blocks) scatter tokens, one warp per (token, slice): a row is cut into
// `slices` equal runs of vectors (the launcher picks one slice per load pass of the warp); the
// remaining blocks zero the padding rows, one warp per (expert, padding slot) candidate.
template <int VW, int kUnroll, bool kStreaming = false, int kBlockWarps = kWarps>
__global__ void __launch_bounds__(kBlockWarps * 32)
    permute_kernel(const moekit_permute_params p, const int64_t token_blocks, const int slices) {
  __shared__ int rows_smem[kBlockWarps][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t n_vec = p.row_bytes / VW;
  const int64_t scale_words = p.scale_bytes / 4;
  if (blockIdx.x < token_blocks) {
    const int64_t item = (int64_t)blockIdx.x * kBlockWarps + warp;
    // 64-bit division only for sliced rows: with it, one-slice rows measured +1.4..+5% (the
    // index math sits on each warp's path to its first load; run 23 call 11).
    const int64_t t = slices == 1 ? item : item / slices;
    const int slice = slices == 1 ? 0 : (int)(item - t * slices);
    if (t >= p.tokens) return;
    int *rows = rows_smem[warp];
    if (lane < p.top_k) rows[lane] = __ldg(p.inverse_map + t * p.top_k + lane);
    __syncwarp();
    const int64_t per_slice = (n_vec + slices - 1) / slices;
    const int64_t v_begin = slice * per_slice;
    const int64_t v_count = v_begin >= n_vec ? 0 : std::min(per_slice, n_vec - v_begin);
    scatter_row<VW, kUnroll, kStreaming>(static_cast<const unsigned char *>(p.x) + t * p.row_bytes + v_begin * VW,
                                         static_cast<unsigned char *>(p.xp) + v_begin * VW, p.row_bytes, rows,
                                         p.top_k, v_count, lane);
    if (scale_words > 0 && slice == 0) {
      scatter_row<4, 4>(static_cast<const unsigned char *>(p.x_scales) + t * p.scale_bytes,
                     static_cast<unsigned char *>(p.xp_scales), p.scale_bytes, rows, p.top_k, scale_words, lane);
    }
    return;
  }
  const int64_t f = (blockIdx.x - token_blocks) * kBlockWarps + warp;
  const int64_t pads = (int64_t)p.num_local * (p.align - 1);
  if (f >= pads) return;
  const int e = (int)(f / (p.align - 1));
  const int r = __ldg(p.expert_offsets + e) + __ldg(p.expert_counts + e) + (int)(f % (p.align - 1));
  if (r >= __ldg(p.expert_offsets + e + 1)) return;
  zero_row<VW>(static_cast<unsigned char *>(p.xp) + r * p.row_bytes, n_vec, lane);
  if (scale_words > 0) zero_row<4>(static_cast<unsigned char *>(p.xp_scales) + r * p.scale_bytes, scale_words, lane);
}

// The token scatter through the bulk-copy engine (MOEKIT_COPY_BULK). One block per (token, 8 KB
// chunk of its row): one thread loads the chunk into shared memory once and stores it to the
// token's k permuted rows with k bulk copies; no registers carry the data. Rows of 16-byte
// multiples on 16-byte-aligned bases, no scales; the padding rows are zeroed by permute_kernel.
// It wins where permute_kernel has too few token warps to keep the SMs' memory pipes full.
constexpr int kBulkBytes = 8192;

__global__ void __launch_bounds__(32) permute_bulk_kernel(const moekit_permute_params p, int64_t chunks_per_row) {
  extern __shared__ __align__(128) unsigned char buf[];  // [kBulkBytes]
  __shared__ uint64_t full;
  if (threadIdx.x != 0) return;  // one thread drives the copies
  const int64_t t = blockIdx.x / chunks_per_row;
  const int64_t c0 = (blockIdx.x % chunks_per_row) * kBulkBytes;
  const int64_t rest = p.row_bytes - c0;
  const uint32_t bytes = (uint32_t)(rest < kBulkBytes ? rest : kBulkBytes);
  sm90::mbar_init(&full, 1);
  sm90::fence_barrier_init();
  sm90::mbar_arrive_expect_tx(&full, bytes);
  sm90::bulk_load(buf, static_cast<const unsigned char *>(p.x) + t * p.row_bytes + c0, bytes, &full);
  int rows[32];
  for (int j = 0; j < p.top_k; ++j) rows[j] = __ldg(p.inverse_map + t * p.top_k + j);
  sm90::mbar_wait(&full, 0);
  unsigned char *xp = static_cast<unsigned char *>(p.xp);
  for (int j = 0; j < p.top_k; ++j) {
    if (rows[j] >= 0) sm90::bulk_store(xp + rows[j] * p.row_bytes + c0, buf, bytes);
  }
  sm90::bulk_commit_group();
  sm90::bulk_wait_group_read<0>();  // the buffer lives until every store has read it
}

moekit_status run_bulk(const moekit_permute_params &p, moekit_stream stream) {
  const int64_t chunks = ceil_div(p.row_bytes, kBulkBytes);
  const int64_t blocks = p.tokens * chunks;
  if (blocks > 0x7fffffff) return MOEKIT_ERR_UNSUPPORTED;
  if (blocks > 0) {
    MOEKIT_TRY(allow_dynamic_smem(permute_bulk_kernel, kBulkBytes));
    permute_bulk_kernel<<<(unsigned)blocks, 32, kBulkBytes, stream>>>(p, chunks);
    MOEKIT_TRY_LAUNCH();
  }
  // The padding rows: permute_kernel's blocks past the token blocks (token_blocks = 0).
  const int64_t pad_blocks = ceil_div((int64_t)p.num_local * (p.align - 1), kWarps);
  if (pad_blocks == 0) return MOEKIT_OK;
  permute_kernel<16, 8><<<(unsigned)pad_blocks, kWarps * 32, 0, stream>>>(p, 0, 1);
  return last_launch_status();
}

// Whether the k copies are stored with the streaming hint (st.global.cs, evict-first in L2).
// The kernel reads each token row once and writes it k times, and nothing it writes is read
// again before it ends, so the hint only changes which lines L2 gives up first. Measured (H200,
// BENCHMARKS.md run 23, call 1, streaming against plain): k = 8 DeepSeek-V3 T=4096 146.6 ->
// 141.2 us, T=16384 584 -> 572, Qwen3 T=4096 40.3 -> 36.3, T=16384 167.1 -> 163.9; k = 2
// Mixtral T=4096 30.8 -> 30.0 but T=16384 106.3 -> 108.0; T=128 (output L2-resident) within
// noise. So: streaming for k >= 4 once the copies (tokens * k * row_bytes) outgrow L2 (an
// output that fits in L2 stays there for the expert GEMM that reads it next).
// MOEKIT_PERMUTE_STREAMING=0/1 forces the choice (for A/B timing).
static bool use_streaming_stores(const moekit_permute_params &p) {
  static const int forced = env_switch("MOEKIT_PERMUTE_STREAMING", -1);
  if (forced == 0 || forced == 1) return forced == 1;
  constexpr int64_t kL2Bytes = 50ll << 20;
  return p.top_k >= 4 && p.tokens > kL2Bytes / p.top_k / p.row_bytes;  // no overflow
}

// A 16-byte-vector row longer than one load pass of a warp (32 x kUnroll vectors) is cut into
// as many slices as it needs passes, each its own warp: DeepSeek-V3 rows (896 vectors, 2 passes
// of 512) as 2 x 448. Measured (H200, BENCHMARKS.md run 23, call 10, best of 2): T=4096 139.7 ->
// 137.5 us, T=16384 573.5 -> 556.9 (twice the warps of one pass each, where 91 registers allow
// 16 warps per SM); one warp per token with 3 blocks per SM instead (85 registers) measured
// 163.8 / 562.7, with 14-vector slices 144-147 / 568-581. Against main in call 12: 139.2 -> 137.1
// (90.2% of memcpy), 565.0 -> 549.6 (90.0%). Narrower vectors keep one warp per token.
template <int VW, int kUnroll>
int slices_per_row(const moekit_permute_params &p) {
  if (VW != 16) return 1;
  return (int)std::max<int64_t>(1, ceil_div(p.row_bytes / VW, (int64_t)32 * kUnroll));
}

template <int VW, int kUnroll = 4, bool kStreaming = false, int kBlockWarps = kWarps>
moekit_status run(const moekit_permute_params &p, moekit_stream stream) {
  const int slices = slices_per_row<VW, kUnroll>(p);
  const int64_t token_blocks = ceil_div(p.tokens * slices, kBlockWarps);
  const int64_t pad_blocks = ceil_div((int64_t)p.num_local * (p.align - 1), kBlockWarps);
  const int64_t blocks = token_blocks + pad_blocks;
  if (blocks == 0) return MOEKIT_OK;
  if (blocks > 0x7fffffff) return MOEKIT_ERR_UNSUPPORTED;
  permute_kernel<VW, kUnroll, kStreaming, kBlockWarps>
      <<<(unsigned)blocks, kBlockWarps * 32, 0, stream>>>(p, token_blocks, slices);
  return last_launch_status();
}

}  // namespace permute
}  // namespace moekit

extern "C" moekit_status moekit_permute(const moekit_permute_params *p, moekit_stream stream) {
  using namespace moekit::permute;
  if (p == nullptr || p->tokens < 0 || p->top_k < 1 || p->top_k > 32 || p->row_bytes < 1 || p->align < 1 ||
      p->num_local < 1 || p->scale_bytes < 0 || p->scale_bytes % 4 != 0 ||
      (p->scale_bytes > 0 && (p->x_scales == nullptr || p->xp_scales == nullptr))) {
    return MOEKIT_ERR_INVALID_ARGUMENT;
  }
  // The widest access that divides the row and both base addresses.
  const uintptr_t bits = reinterpret_cast<uintptr_t>(p->x) | reinterpret_cast<uintptr_t>(p->xp) |
                         static_cast<uintptr_t>(p->row_bytes);
  if (p->scale_bytes > 0 &&
      ((reinterpret_cast<uintptr_t>(p->x_scales) | reinterpret_cast<uintptr_t>(p->xp_scales)) % 4 != 0)) {
    return MOEKIT_ERR_INVALID_ARGUMENT;
  }
  if (p->kernel < MOEKIT_COPY_AUTO || p->kernel > MOEKIT_COPY_BULK) return MOEKIT_ERR_INVALID_ARGUMENT;
  const bool bulk_ok = bits % 16 == 0 && p->scale_bytes == 0;
  if (p->kernel == MOEKIT_COPY_BULK) return bulk_ok ? run_bulk(*p, stream) : MOEKIT_ERR_UNSUPPORTED;
  // Auto: the bulk kernel while permute_kernel would have fewer token blocks than SMs. Measured
  // (H200, BENCHMARKS.md run 14, warp -> bulk): T = 128 DeepSeek-V3 19.3 -> 7.9 us, Qwen3 8.5 -> 5.3,
  // Mixtral 6.6 -> 4.7; T = 4096 DeepSeek-V3 151 -> 154, Qwen3 40.8 -> 51.0, Mixtral 31.2 -> 30.6.
  if (p->kernel == MOEKIT_COPY_AUTO && bulk_ok && moekit::ceil_div(p->tokens, (int64_t)kWarps) < moekit::sm_count()) {
    return run_bulk(*p, stream);
  }
  if (bits % 16 == 0) {
    // 8 vectors per lane in flight: qwen3 T=4096 40 us against 45 with 4 (2: 45); DeepSeek-V3
    // shapes within 1% either way (BENCHMARKS.md, run 2). Rows over 4 KB take 16, so a warp
    // walks a DeepSeek-V3 row (14 KB) in 2 load round trips instead of 4 (a Mixtral row in 1):
    // DeepSeek-V3 T=4096 148.1 -> 145.0 us, T=16384 578.3 -> 574.7, Mixtral T=16384 106.3 ->
    // 104.9 (BENCHMARKS.md, run 19).
    const bool streaming = use_streaming_stores(*p);
    if (p->row_bytes > 32 * 16 * 8) {
      return streaming ? run<16, 16, true>(*p, stream) : run<16, 16>(*p, stream);
    }
    // Rows of at most 4 KB run in 4-warp blocks: with 8 vectors per lane the kernel needs fewer
    // registers, 4-warp blocks pack more warps per SM and the last wave is finer. Measured (H200,
    // BENCHMARKS.md run 24 call 2, 4 against 8 warps, best of 3): Qwen3 T=16384 163.0 -> 157.5 us,
    // T=4096 37.0 -> 37.0; the 16-vector path did not gain (DeepSeek-V3 T=16384 551.3 -> 553.7,
    // Mixtral 105.4 -> 105.5), so it keeps 8.
    return streaming ? run<16, 8, true, 4>(*p, stream) : run<16, 8, false, 4>(*p, stream);
  }
  if (bits % 8 == 0) return run<8>(*p, stream);
  if (bits % 4 == 0) return run<4>(*p, stream);
  if (bits % 2 == 0) return run<2>(*p, stream);
  return run<1>(*p, stream);
}
