// combine: out[t] = sum over slots s (in order) of w[t,s] * y[row(t,s)] + shared[t] + residual[t],
// accumulated in f32, no atomics: deterministic and bitwise reproducible. Two kernels with the same
// sums: one warp per token (any row; the oracle) and one block per (token, row chunk) fed by bulk
// copies (16-byte rows; the launcher's choice, 94-100% of the copy bandwidth at DeepSeek-V3 shapes).
//
// Floor: read T*k*H elements of y once, write T*H: at DeepSeek-V3 T = 4096 (bf16) 470 MB + 59 MB,
// 124 us at 4.25 TB/s. The k rows of one vector position are loaded in groups of B before any is
// used, so each lane keeps several independent 16-byte loads in flight.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "device/convert.cuh"
#include "device/launch.cuh"
#include "device/load.cuh"
#include "device/sm90.cuh"
#include "moekit.h"

namespace moekit {
namespace combine {

constexpr int kWarps = 8;

// Stores N values of To; accesses wider than 16 bytes are split into 16-byte stores.
template <typename To, int N>
__device__ __forceinline__ void store_packed(To *dst, const float (&acc)[N]) {
  constexpr int kPer16 = 16 / sizeof(To);
  if constexpr (N * sizeof(To) > 16) {
#pragma unroll
    for (int h = 0; h < N / kPer16; ++h) {
      Packed<To, kPer16> o;
#pragma unroll
      for (int i = 0; i < kPer16; ++i) o.v[i] = Dtype<To>::from_f32(acc[h * kPer16 + i]);
      st(reinterpret_cast<Packed<To, kPer16> *>(dst) + h, o);
    }
  } else {
    Packed<To, N> o;
#pragma unroll
    for (int i = 0; i < N; ++i) o.v[i] = Dtype<To>::from_f32(acc[i]);
    st(reinterpret_cast<Packed<To, N> *>(dst), o);
  }
}

// Adds N values of To loaded from src (split into 16-byte loads when wider).
template <typename To, int N>
__device__ __forceinline__ void add_packed(const To *src, float (&acc)[N]) {
  constexpr int kPer16 = 16 / sizeof(To);
  if constexpr (N * sizeof(To) > 16) {
#pragma unroll
    for (int h = 0; h < N / kPer16; ++h) {
      const Packed<To, kPer16> v = ldg(reinterpret_cast<const Packed<To, kPer16> *>(src) + h);
#pragma unroll
      for (int i = 0; i < kPer16; ++i) acc[h * kPer16 + i] += Dtype<To>::to_f32(v.v[i]);
    }
  } else {
    const Packed<To, N> v = ldg(reinterpret_cast<const Packed<To, N> *>(src));
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] += Dtype<To>::to_f32(v.v[i]);
  }
}

// N: elements of y per access (16 bytes of y on the vector path, 1 on the scalar path).
// U: vector positions per lane per iteration, B: slots loaded before any is used; U*B independent
// loads in flight per lane.
template <typename Ty, typename To, int N, int U, int B>
__global__ void __launch_bounds__(kWarps * 32) combine_kernel(const moekit_combine_params p) {
  __shared__ int rows_smem[kWarps][32];
  __shared__ float weights_smem[kWarps][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t t = (int64_t)blockIdx.x * kWarps + warp;
  if (t >= p.tokens) return;
  const int k = p.top_k;
  int *rows = rows_smem[warp];
  float *weights = weights_smem[warp];
  if (lane < k) {
    rows[lane] = __ldg(p.inverse_map + t * k + lane);
    weights[lane] = p.weights != nullptr ? __ldg(p.weights + t * k + lane) : 1.0f;
  }
  __syncwarp();
  const Ty *y = static_cast<const Ty *>(p.y);
  const To *shared = static_cast<const To *>(p.shared);
  const To *residual = static_cast<const To *>(p.residual);
  To *out = static_cast<To *>(p.out) + t * p.hidden;
  const int64_t n_vec = p.hidden / N;
  for (int64_t v0 = lane; v0 < n_vec; v0 += 32 * U) {
    float acc[U][N];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int i = 0; i < N; ++i) acc[u][i] = 0.0f;
    }
    for (int j0 = 0; j0 < k; j0 += B) {
      Packed<Ty, N> vals[B][U];
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const int j = j0 + b;
        if (j < k && rows[j] >= 0) {
          const Packed<Ty, N> *src = reinterpret_cast<const Packed<Ty, N> *>(y + (int64_t)rows[j] * p.hidden);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if (v0 + u * 32 < n_vec) vals[b][u] = ldg(src + v0 + u * 32);
          }
        }
      }
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const int j = j0 + b;
        if (j < k && rows[j] >= 0) {
          const float w = weights[j];
#pragma unroll
          for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int i = 0; i < N; ++i) acc[u][i] = fmaf(w, Dtype<Ty>::to_f32(vals[b][u].v[i]), acc[u][i]);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + u * 32;
      if (v >= n_vec) break;
      if (shared != nullptr) add_packed<To, N>(shared + t * p.hidden + v * N, acc[u]);
      if (residual != nullptr) add_packed<To, N>(residual + t * p.hidden + v * N, acc[u]);
      store_packed<To, N>(out + v * N, acc[u]);
    }
  }
}

// The bulk-copy combine (MOEKIT_COPY_BULK): one block per (token, chunk of kBulkThreads * kPer
// elements). Thread 0 fetches the chunk of each of the token's k rows with one bulk copy (2 KB or
// more contiguous per row, where the warp kernel reads 512 B per warp instruction), then every
// thread sums its kPer elements over the slots in order, exactly as combine_kernel does: the two
// kernels' outputs are bitwise equal. kPer is chosen so one block has about 16 KB of rows in
// flight (k * chunk * sizeof(Ty)), the amount at which DeepSeek-V3 (k = 8, kPer = 4) measured
// 3.6-4.3 TB/s; Mixtral (k = 2) with kPer = 4 (4 KB per block) fell behind the warp kernel.
constexpr int kBulkThreads = 256;

template <typename Ty, typename To, int kPer>
__global__ void __launch_bounds__(kBulkThreads) combine_bulk_kernel(const moekit_combine_params p) {
  constexpr int kChunk = kBulkThreads * kPer;  // elements of each row per block
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Ty *rows_smem = reinterpret_cast<Ty *>(smem_raw);  // [top_k][kChunk]
  __shared__ uint64_t full;
  __shared__ float weights[32];
  __shared__ int rows[32];
  // 32-bit division (the grid is < 2^31 blocks): the 64-bit one is a called routine whose
  // register saves ptxas reports as 12 bytes of spills.
  const uint32_t n_chunks = (uint32_t)((p.hidden + kChunk - 1) / kChunk);
  const int64_t t = blockIdx.x / n_chunks;
  const int64_t c0 = (int64_t)(blockIdx.x % n_chunks) * kChunk;
  const int64_t rest = p.hidden - c0;
  // A multiple of 16 bytes of Ty (the launcher's vector check).
  const int len = (int)(rest < kChunk ? rest : kChunk);
  const int k = p.top_k;
  if (threadIdx.x < k) {
    rows[threadIdx.x] = __ldg(p.inverse_map + t * k + threadIdx.x);
    weights[threadIdx.x] = p.weights != nullptr ? __ldg(p.weights + t * k + threadIdx.x) : 1.0f;
  }
  if (threadIdx.x == 0) {
    sm90::mbar_init(&full, 1);
    sm90::fence_barrier_init();
  }
  __syncthreads();
  const Ty *y = static_cast<const Ty *>(p.y);
  if (threadIdx.x == 0) {
    uint32_t bytes = 0;
    for (int j = 0; j < k; ++j) bytes += rows[j] >= 0 ? (uint32_t)(len * sizeof(Ty)) : 0u;
    sm90::mbar_arrive_expect_tx(&full, bytes);
    for (int j = 0; j < k; ++j) {
      if (rows[j] >= 0) {
        sm90::bulk_load(rows_smem + j * kChunk, y + (int64_t)rows[j] * p.hidden + c0, (uint32_t)(len * sizeof(Ty)),
                        &full);
      }
    }
  }
  sm90::mbar_wait(&full, 0);
  // Each thread sums kPer / kOut pieces of kOut elements, piece h at element
  // (h * kBulkThreads + thread) * kOut, so that one piece of a warp is 32 contiguous accesses
  // (a thread-contiguous slice of 16 elements wrote half sectors per instruction: Mixtral's combine
  // 29 -> 42 us). kOut is no wider than the rows' guaranteed alignment, 16 / sizeof(Ty) elements
  // (the launcher's vector check; 16-byte accesses of f16 out rows faulted), and len is a multiple
  // of it, so a piece is wholly inside the row or wholly past it.
  constexpr int kOut = kPer < 16 / (int)sizeof(Ty) ? kPer : 16 / (int)sizeof(Ty);
#pragma unroll 1  // one piece live at a time: ptxas holds this kernel to 32 registers (8 blocks per SM)
  for (int h = 0; h < kPer / kOut; ++h) {
    const int e = (h * kBulkThreads + (int)threadIdx.x) * kOut;
    if (e >= len) break;
    float acc[kOut];
#pragma unroll
    for (int i = 0; i < kOut; ++i) acc[i] = 0.0f;
    for (int j = 0; j < k; ++j) {
      if (rows[j] < 0) continue;
      const float w = weights[j];
      const Packed<Ty, kOut> v = *reinterpret_cast<const Packed<Ty, kOut> *>(rows_smem + j * kChunk + e);
#pragma unroll
      for (int i = 0; i < kOut; ++i) acc[i] = fmaf(w, Dtype<Ty>::to_f32(v.v[i]), acc[i]);
    }
    const int64_t at = t * p.hidden + c0 + e;
    if (p.shared != nullptr) add_packed<To, kOut>(static_cast<const To *>(p.shared) + at, acc);
    if (p.residual != nullptr) add_packed<To, kOut>(static_cast<const To *>(p.residual) + at, acc);
    store_packed<To, kOut>(static_cast<To *>(p.out) + at, acc);
  }
}

template <typename Ty, typename To, int kPer>
moekit_status run_bulk_per(const moekit_combine_params &p, moekit_stream stream) {
  constexpr int kChunk = kBulkThreads * kPer;
  const int64_t blocks = p.tokens * ceil_div(p.hidden, (int64_t)kChunk);
  if (blocks == 0) return MOEKIT_OK;
  if (blocks > 0x7fffffff) return MOEKIT_ERR_UNSUPPORTED;
  const size_t smem = (size_t)p.top_k * kChunk * sizeof(Ty);
  auto kernel = combine_bulk_kernel<Ty, To, kPer>;
  MOEKIT_TRY(allow_dynamic_smem(kernel, smem));
  kernel<<<(unsigned)blocks, kBulkThreads, smem, stream>>>(p);
  return last_launch_status();
}

// kPer: the smallest of 4, 8, 16 elements per thread that puts >= 16 KB of rows in one block.
template <typename Ty, typename To>
moekit_status run_bulk(const moekit_combine_params &p, moekit_stream stream) {
  const int64_t bytes_per_element = (int64_t)p.top_k * kBulkThreads * (int64_t)sizeof(Ty);
  if (4 * bytes_per_element >= 16384) return run_bulk_per<Ty, To, 4>(p, stream);
  if (8 * bytes_per_element >= 16384) return run_bulk_per<Ty, To, 8>(p, stream);
  return run_bulk_per<Ty, To, 16>(p, stream);
}

template <typename Ty, typename To, int N, int U = 1, int B = 4>
moekit_status run(const moekit_combine_params &p, moekit_stream stream) {
  const int64_t blocks = ceil_div(p.tokens, kWarps);
  if (blocks == 0) return MOEKIT_OK;
  if (blocks > 0x7fffffff) return MOEKIT_ERR_UNSUPPORTED;
  combine_kernel<Ty, To, N, U, B><<<(unsigned)blocks, kWarps * 32, 0, stream>>>(p);
  return last_launch_status();
}

// Vector path when every row of every tensor starts on a boundary of its N-element access.
template <typename Ty, typename To>
moekit_status run_types(const moekit_combine_params &p, moekit_stream stream) {
  constexpr int kN = 16 / sizeof(Ty);
  auto aligned = [](const void *ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; };
  const size_t out_bytes = kN * sizeof(To) > 16 ? 16 : kN * sizeof(To);
  const bool vector_ok = p.hidden % kN == 0 && aligned(p.y, 16) && aligned(p.out, out_bytes) &&
                         (p.shared == nullptr || aligned(p.shared, out_bytes)) &&
                         (p.residual == nullptr || aligned(p.residual, out_bytes));
  if (p.kernel == MOEKIT_COPY_BULK) return vector_ok ? run_bulk<Ty, To>(p, stream) : MOEKIT_ERR_UNSUPPORTED;
  // Auto: the bulk kernel where the rows allow it. Measured (H200, BENCHMARKS.md run 14, warp ->
  // bulk with 1024-element chunks): DeepSeek-V3 T = 128 / 4096 / 16384: 82.7 -> 8.2, 181 -> 130,
  // 695 -> 492 us; Qwen3 26.7 -> 5.7, 57.7 -> 43.0, 208 -> 146; Mixtral (k = 2) 17.5 -> 5.5,
  // 38.5 -> 45.2, 134 -> 164, hence kPer grows as k falls (run_bulk).
  if (p.kernel == MOEKIT_COPY_AUTO && vector_ok) return run_bulk<Ty, To>(p, stream);
  // The warp kernel: one vector position and 4 slots in flight per lane: DeepSeek-V3 T=4096
  // 181 us, against 189 (2 positions x 4 slots), 293 (1 x 8) and 320 (2 x 8) (BENCHMARKS.md, run 2).
  if (vector_ok) return run<Ty, To, kN>(p, stream);
  return run<Ty, To, 1>(p, stream);
}

template <typename Ty>
moekit_status run_out(const moekit_combine_params &p, moekit_stream stream) {
  switch (p.out_dtype) {
    case MOEKIT_DTYPE_F32: return run_types<Ty, float>(p, stream);
    case MOEKIT_DTYPE_BF16: return run_types<Ty, __nv_bfloat16>(p, stream);
    case MOEKIT_DTYPE_F16: return run_types<Ty, __half>(p, stream);
    default: return MOEKIT_ERR_INVALID_ARGUMENT;
  }
}

}  // namespace combine
}  // namespace moekit

extern "C" moekit_status moekit_combine(const moekit_combine_params *p, moekit_stream stream) {
  using namespace moekit::combine;
  if (p == nullptr || p->tokens < 0 || p->top_k < 1 || p->top_k > 32 || p->hidden < 1 ||
      p->kernel < MOEKIT_COPY_AUTO || p->kernel > MOEKIT_COPY_PHASED) {
    return MOEKIT_ERR_INVALID_ARGUMENT;
  }
  // The phased kernel is the permute's (combine reads k rows per token: its reads are the bulk of
  // its traffic, and combine already runs at ~96-101% of memcpy).
  if (p->kernel == MOEKIT_COPY_PHASED) return MOEKIT_ERR_UNSUPPORTED;
  switch (p->y_dtype) {
    case MOEKIT_DTYPE_F32: return run_out<float>(*p, stream);
    case MOEKIT_DTYPE_BF16: return run_out<__nv_bfloat16>(*p, stream);
    case MOEKIT_DTYPE_F16: return run_out<__half>(*p, stream);
    default: return MOEKIT_ERR_INVALID_ARGUMENT;
  }
}
