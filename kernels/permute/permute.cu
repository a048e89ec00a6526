// permute: copies each token row to the permuted rows of its k assignments (a scatter by token),
// and zero-fills each expert segment's padding rows.
//
// Floor: read T*H elements once, write T*k*H: at DeepSeek-V3 T = 4096 (H = 7168, k = 8, bf16)
// 59 MB + 470 MB = 529 MB, 124 us at 4.25 TB/s. Walking tokens (not permuted rows) reads each token
// row exactly once, so the floor is also the traffic; the k stores of one loaded vector go to k
// different rows, each written with full 16-byte stores.
#include <algorithm>
#include <cstdint>

#include "device/grid_barrier.cuh"
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

// The permuted row of padding candidate f (expert f / (align - 1), its (f % (align - 1))-th row past
// the expert's routed rows), or -1 when that expert's segment has fewer padding rows.
__device__ __forceinline__ int padding_row(const moekit_permute_params &p, int64_t f) {
  const int e = (int)(f / (p.align - 1));
  const int r = __ldg(p.expert_offsets + e) + __ldg(p.expert_counts + e) + (int)(f % (p.align - 1));
  return r < __ldg(p.expert_offsets + e + 1) ? r : -1;
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
  const int r = padding_row(p, f);
  if (r < 0) return;
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

// ---- The phased permute (MOEKIT_COPY_PHASED) -------------------------------------------------
//
// Why phases: the permute's writes alone (1.88 GB scattered at DeepSeek-V3 T = 16384, no reads)
// run at 4.31 TB/s and sequential writes at 4.38, yet with its 235 MB of reads mixed in the warp
// kernel takes 557 us instead of ~490: the DRAM turns the bus around for the trickle of reads
// inside the write stream (memcpy, half reads, runs 4.25 TB/s; the driver's memset 4.55). Here one
// CTA per SM (a cooperative launch, so all are resident) works in rounds: every CTA loads its share
// of the round's token rows into shared memory with one bulk copy, writes their k copies from
// there, and waits at a grid barrier, so the GPU's reads arrive together and then its writes.
// Within a round a CTA writes its copies in ascending destination row, so the CTAs, moving in step,
// sweep the expert segments together instead of writing all of them at once. Measured (H200,
// BENCHMARKS.md run 37 call 9, bench_report, 3 rounds, us, warp kernel -> phased): DeepSeek-V3
// T = 16384 550.6-551.3 -> 526.2-527.4 (8 rounds of 16 rows per CTA; 94% of memcpy), T = 4096
// 136.3-136.7 -> 132.0-132.8 (2 rounds; 3 rounds of 15 rows: 136.4-136.9). A prototype
// (scripts/probe_permute_phased.cu's history, call 4) without the barrier ran 549-550 at
// T = 16384, without the sort 532, and double-buffered chunks without either 565-568.
constexpr int kPhasedThreads = 512;
// Dynamic shared memory: the rows, then three arrays of keys_len words (the copies' destination
// rows, and their sorted destinations and sources); under the 227 KB an sm_90 block may use, with
// 1 KB of headroom for the static part (the 8-byte mbarrier: 128 bytes by ptxas).
constexpr int kPhasedSmemBytes = 232448 - 1024;
__host__ __device__ inline int phased_keys_len(int rows_cap, int top_k) { return (rows_cap * top_k + 3) / 4 * 4; }
inline size_t phased_smem_bytes(int rows_cap, int64_t row_bytes, int top_k) {
  return (size_t)rows_cap * (size_t)row_bytes + 3 * sizeof(int) * (size_t)phased_keys_len(rows_cap, top_k);
}

// Rounds: tokens [T*r/rounds, T*(r+1)/rounds), split evenly over the CTAs (at most rows_cap each,
// which the launcher's choice of rounds guarantees); a CTA's copies are at most rows_cap * top_k
// <= kPhasedThreads, one key per thread.
__global__ void __launch_bounds__(kPhasedThreads, 1)
    permute_phased_kernel(const moekit_permute_params p, const int rounds, const int rows_cap, const int sort) {
  extern __shared__ __align__(128) unsigned char rows_smem[];  // [rows_cap][row_bytes], then the arrays
  __shared__ uint64_t loaded;
  const int keys_len = phased_keys_len(rows_cap, p.top_k);
  // 16-byte aligned (row_bytes is a multiple of 16) for the vector loads of the ranking.
  unsigned *keys = reinterpret_cast<unsigned *>(rows_smem + (size_t)rows_cap * p.row_bytes);  // unplaced: ~0
  int *sorted_dst = reinterpret_cast<int *>(keys + keys_len);
  int *sorted_src = sorted_dst + keys_len;  // a row of rows_smem
  const int tid = threadIdx.x;
  if (tid == 0) {
    sm90::mbar_init(&loaded, 1);
    sm90::fence_barrier_init();
  }
  __syncthreads();
  const unsigned char *x = static_cast<const unsigned char *>(p.x);
  unsigned char *xp = static_cast<unsigned char *>(p.xp);
  const int row_bytes = (int)p.row_bytes;
  const int n_vec = row_bytes / 16;
  // This CTA's tokens of round r, [t0, t0 + rows), and this thread's key among their copies
  // (~0 past them). The first round's now; each later round's before the barrier that precedes it.
  int64_t t0;
  int rows;
  unsigned key;
  auto share = [&](int r) {
    const int64_t lo = p.tokens * r / rounds, hi = p.tokens * (r + 1) / rounds;
    t0 = lo + (hi - lo) * blockIdx.x / gridDim.x;
    rows = (int)(lo + (hi - lo) * (blockIdx.x + 1) / gridDim.x - t0);
    key = tid < rows * p.top_k ? (unsigned)__ldg(p.inverse_map + t0 * p.top_k + tid) : 0xffffffffu;
  };
  share(0);
  uint32_t load_parity = 0;  // of `loaded`, which completes once per round with rows
  for (int r = 0; r < rounds; ++r) {
    if (tid == 0 && rows > 0) {
      // The previous round's generic reads of rows_smem (ordered before this thread by the
      // barrier) before the async proxy's writes to it.
      if (r > 0) sm90::fence_proxy_async_shared();
      const uint32_t bytes = (uint32_t)rows * (uint32_t)row_bytes;
      sm90::mbar_arrive_expect_tx(&loaded, bytes);
      sm90::bulk_load(rows_smem, x + t0 * p.row_bytes, bytes, &loaded);
    }
    const int n = rows * p.top_k;
    if (tid < keys_len) keys[tid] = key;  // past the n copies: ~0, which the vector loads may read
    __syncthreads();
    // Rank of this thread's copy among the placed ones: by destination row, or in slot order.
    const bool placed = key != 0xffffffffu;
    if (placed) {
      int rank = 0;
      if (sort) {
        const uint4 *k4 = reinterpret_cast<const uint4 *>(keys);
        for (int m = 0; m < (n + 3) / 4; ++m) {
          const uint4 v = k4[m];
          rank += (v.x < key) + (v.y < key) + (v.z < key) + (v.w < key);
        }
      } else {
        for (int m = 0; m < tid; ++m) rank += keys[m] != 0xffffffffu;
      }
      sorted_dst[rank] = (int)key;
      sorted_src[rank] = tid / p.top_k;
    }
    const int copies = __syncthreads_count(placed);
    if (rows > 0) {
      sm90::mbar_wait(&loaded, load_parity);
      load_parity ^= 1u;
    }
    // Copies in sorted order, the CTA's threads over (copy, vector) pairs: thread tid takes pair
    // tid, tid + kPhasedThreads, ... (rows of fewer vectors than threads keep every thread busy).
    int q = tid / n_vec, v = tid - q * n_vec;
    while (q < copies) {
      const uint4 val = *reinterpret_cast<const uint4 *>(rows_smem + sorted_src[q] * row_bytes + v * 16);
      st_streaming(reinterpret_cast<uint4 *>(xp + (int64_t)sorted_dst[q] * p.row_bytes) + v, val);
      v += kPhasedThreads;
      while (v >= n_vec) {
        v -= n_vec;
        ++q;
      }
    }
    if (r + 1 < rounds) {
      share(r + 1);
      // Every CTA's stores issued (and this CTA's reads of rows_smem and keys done) before any
      // CTA's next loads.
      grid_barrier(p.grid_barrier, gridDim.x);
    }
  }
  // The padding rows, one warp per (expert, padding slot) candidate, as permute_kernel does.
  const int lane = tid & 31;
  const int64_t warps = (int64_t)gridDim.x * (kPhasedThreads / 32);
  const int64_t pads = (int64_t)p.num_local * (p.align - 1);
  for (int64_t f = blockIdx.x * (int64_t)(kPhasedThreads / 32) + tid / 32; f < pads; f += warps) {
    const int r = padding_row(p, f);
    if (r >= 0) zero_row<16>(xp + (int64_t)r * p.row_bytes, n_vec, lane);
  }
}

// The phased kernel's most rows per CTA and round for p (0: it cannot run): what shared memory
// holds, at most kPhasedThreads / top_k (one key per thread), MOEKIT_PERMUTE_PHASE_ROWS if smaller.
// DeepSeek-V3's 14 KB rows: 16 (15 until the arrays moved to dynamic memory, which took T = 4096
// from 3 rounds to 2 and T = 16384 from 9 to 8).
static int phased_rows_cap(const moekit_permute_params &p) {
  static const int forced = env_switch("MOEKIT_PERMUTE_PHASE_ROWS", 0);
  int cap = (int)std::min<int64_t>(kPhasedSmemBytes / p.row_bytes, kPhasedThreads / p.top_k);
  while (cap > 0 && phased_smem_bytes(cap, p.row_bytes, p.top_k) > (size_t)kPhasedSmemBytes) --cap;
  if (forced > 0) cap = std::min(cap, forced);
  return cap;
}

// UNSUPPORTED where the kernel cannot run: no barrier word, rows over what shared memory holds, or
// a cooperative grid that does not fit (launch_cooperative).
moekit_status run_phased(const moekit_permute_params &p, moekit_stream stream) {
  const int cap = phased_rows_cap(p);
  if (p.grid_barrier == nullptr || cap < 1) return MOEKIT_ERR_UNSUPPORTED;  // cap >= 1: rows under 227 KB
  static const int sort = env_switch("MOEKIT_PERMUTE_PHASE_SORT", 1);
  const int grid = (int)std::max<int64_t>(1, std::min<int64_t>(sm_count(), p.tokens));
  const int64_t rounds = std::max<int64_t>(1, ceil_div(p.tokens, (int64_t)grid * cap));
  if (rounds > INT32_MAX) return MOEKIT_ERR_UNSUPPORTED;
  const size_t smem = phased_smem_bytes(cap, p.row_bytes, p.top_k);
  if (allow_dynamic_smem(permute_phased_kernel, smem) != cudaSuccess) {
    (void)cudaGetLastError();  // a device with less shared memory per block: another kernel
    return MOEKIT_ERR_UNSUPPORTED;
  }
  return launch_cooperative(permute_phased_kernel, dim3((unsigned)grid), dim3(kPhasedThreads), smem, stream, p,
                            (int)rounds, cap, sort != 0 ? 1 : 0);
}

// Whether AUTO runs the phased kernel (where it can): for k >= 4 copies of at least 96 MiB. The
// phases pay where writes dominate and the rounds are long enough to amortize their barriers.
// Measured (H200, BENCHMARKS.md run 37 call 5, us, warp kernel -> phased, 2 rounds, at 15 rows
// per CTA for DeepSeek-V3; call 9 has the 16 rows that landed):
//   DeepSeek-V3 (14 KB rows, k = 8)  T = 2048 69.2-69.6 -> 69.4, T = 4096 137.6-137.8 -> 136.1-136.2
//                                    (16 rows: 132.0-132.8), T = 16384 555.7-557.0 -> 526.1-526.6
//   Qwen3 (4 KB rows, k = 8)         T = 2048 21.4 -> 21.8 (64 MiB of copies), T = 4096 39.3-39.5 ->
//                                    38.9-39.0, T = 16384 159.3-159.5 -> 151.6-152.4
//   Mixtral (8 KB rows, k = 2)       T = 2048 15.9 -> 16.3, T = 4096 29.8-30.0 -> 31.8-32.0,
//                                    T = 16384 106.3 -> 112.0-112.3 (a third of the traffic is reads)
// Fewer rows per CTA lose (7 at most: DeepSeek-V3 T = 16384 551, Qwen3 190), and so does writing
// the copies in slot order instead of by destination (DeepSeek-V3 T = 16384 533-534).
// MOEKIT_PERMUTE_PHASED=0/1 forces the choice (A/B timing).
static bool use_phased(const moekit_permute_params &p) {
  static const int forced = env_switch("MOEKIT_PERMUTE_PHASED", -1);
  if (forced == 0 || forced == 1) return forced == 1;
  return p.top_k >= 4 && p.tokens * p.top_k * p.row_bytes >= (96ll << 20);
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
  if (p->kernel < MOEKIT_COPY_AUTO || p->kernel > MOEKIT_COPY_PHASED) return MOEKIT_ERR_INVALID_ARGUMENT;
  const bool bulk_ok = bits % 16 == 0 && p->scale_bytes == 0;
  if (p->kernel == MOEKIT_COPY_BULK) return bulk_ok ? run_bulk(*p, stream) : MOEKIT_ERR_UNSUPPORTED;
  if (p->kernel == MOEKIT_COPY_PHASED) {
    if (!bulk_ok) return MOEKIT_ERR_UNSUPPORTED;
    return p->tokens == 0 ? MOEKIT_OK : run_phased(*p, stream);
  }

  // Auto: the bulk kernel while permute_kernel would have fewer token blocks than SMs. Measured
  // (H200, BENCHMARKS.md run 14, warp -> bulk): T = 128 DeepSeek-V3 19.3 -> 7.9 us, Qwen3 8.5 -> 5.3,
  // Mixtral 6.6 -> 4.7; T = 4096 DeepSeek-V3 151 -> 154, Qwen3 40.8 -> 51.0, Mixtral 31.2 -> 30.6.
  if (p->kernel == MOEKIT_COPY_AUTO && bulk_ok && moekit::ceil_div(p->tokens, (int64_t)kWarps) < moekit::sm_count()) {
    return run_bulk(*p, stream);
  }
  // Auto, past the bulk kernel's range: the phased kernel where use_phased says it pays.
  if (p->kernel == MOEKIT_COPY_AUTO && bulk_ok && use_phased(*p)) {
    const moekit_status phased = run_phased(*p, stream);
    if (phased != MOEKIT_ERR_UNSUPPORTED) return phased;
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
