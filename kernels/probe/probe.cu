// Device bandwidth probe: the copy every memory-bound kernel of the crate is measured against.
//
// Floor: a copy of n bytes reads n and writes n, so its time is 2n / bandwidth; the H200 moves
// about 4.25 TB/s (torch's copy_ measured 4250 GB/s there), 1 ms for 2 GiB.
#include <algorithm>
#include <cstdint>

#include "device/launch.cuh"
#include "moekit.h"

namespace moekit {
namespace {

// One pass, no grid-stride loop: block b copies kPerThread*256 consecutive vectors, each thread
// kPerThread of them 256 apart (coalesced), all loads issued before the first store.
template <int kPerThread, bool kStreaming>
__global__ void __launch_bounds__(256) copy_16b_onepass_kernel(const uint4 *__restrict__ src, uint4 *__restrict__ dst,
                                                               uint64_t n_vec) {
  const uint64_t base = (uint64_t)blockIdx.x * 256 * kPerThread + threadIdx.x;
  uint4 v[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const uint64_t j = base + (uint64_t)i * 256;
    if (j < n_vec) v[i] = kStreaming ? __ldcs(src + j) : __ldg(src + j);
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const uint64_t j = base + (uint64_t)i * 256;
    if (j < n_vec) {
      if (kStreaming) {
        __stcs(dst + j, v[i]);
      } else {
        dst[j] = v[i];
      }
    }
  }
}

__global__ void copy_bytes_kernel(const uint8_t *__restrict__ src, uint8_t *__restrict__ dst, uint64_t n) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) dst[i] = src[i];
}

// One warp per row, 4 per block, every vector of the row in flight at once (kVecs per lane), as
// the gating kernels load their logits; the XOR keeps the loads from being optimized away.
constexpr int kReadRowsWarps = 4;
template <int kVecs>
__global__ void __launch_bounds__(kReadRowsWarps * 32)
    read_rows_kernel(const uint4 *__restrict__ src, int64_t rows, int row_vecs, uint32_t *__restrict__ dst) {
  const int lane = threadIdx.x % 32;
  const int64_t row = (int64_t)blockIdx.x * kReadRowsWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const uint4 *r = src + row * row_vecs;
  uint4 v[kVecs];
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int j = lane + 32 * i;
    v[i] = j < row_vecs ? __ldg(r + j) : make_uint4(0, 0, 0, 0);
  }
  uint32_t x = 0;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) x ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x ^= __shfl_xor_sync(0xffffffffu, x, o);
  if (lane == 0) dst[row] = x;
}

template <int kVecs>
moekit_status launch_read_rows(const moekit_read_rows_params &p, moekit_stream stream) {
  read_rows_kernel<kVecs><<<(unsigned)ceil_div(p.rows, kReadRowsWarps), kReadRowsWarps * 32, 0, stream>>>(
      static_cast<const uint4 *>(p.src), p.rows, p.row_bytes / 16, p.dst);
  return last_launch_status();
}

__global__ void empty_kernel() {}

__global__ void busy_wait_kernel(uint64_t ns) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

}  // namespace
}  // namespace moekit

extern "C" moekit_status moekit_copy_bytes(const moekit_copy_params *p, moekit_stream stream) {
  using namespace moekit;
  if (p == nullptr || (p->n_bytes > 0 && (p->src == nullptr || p->dst == nullptr))) return MOEKIT_ERR_INVALID_ARGUMENT;
  if (p->n_bytes == 0) return MOEKIT_OK;
  const auto src = reinterpret_cast<uintptr_t>(p->src);
  const auto dst = reinterpret_cast<uintptr_t>(p->dst);
  const int max_blocks = sm_count() * 8;  // for the byte path
  if (src % 16 == 0 && dst % 16 == 0) {
    const uint64_t n_vec = p->n_bytes / 16;
    if (n_vec > 0) {
      // One pass, 4 vectors per thread, default caching: 4099 GB/s on the H200, against 3925 for a
      // persistent grid-stride loop (8 blocks/SM, streaming hints), 4089 with 8 vectors and
      // streaming hints; the driver's own cudaMemcpy moved 4249 (BENCHMARKS.md, run 2).
      copy_16b_onepass_kernel<4, false><<<(unsigned)ceil_div(n_vec, 1024), 256, 0, stream>>>(
          static_cast<const uint4 *>(p->src), static_cast<uint4 *>(p->dst), n_vec);
      MOEKIT_TRY_LAUNCH();
    }
    const uint64_t tail = p->n_bytes - n_vec * 16;
    if (tail > 0) {
      copy_bytes_kernel<<<1, 32, 0, stream>>>(static_cast<const uint8_t *>(p->src) + n_vec * 16,
                                              static_cast<uint8_t *>(p->dst) + n_vec * 16, tail);
      MOEKIT_TRY_LAUNCH();
    }
    return MOEKIT_OK;
  }
  const int blocks = (int)std::min<uint64_t>(max_blocks, (p->n_bytes + 255) / 256);
  copy_bytes_kernel<<<blocks, 256, 0, stream>>>(static_cast<const uint8_t *>(p->src), static_cast<uint8_t *>(p->dst),
                                                p->n_bytes);
  return last_launch_status();
}

extern "C" moekit_status moekit_read_rows(const moekit_read_rows_params *p, moekit_stream stream) {
  using namespace moekit;
  if (p == nullptr || p->rows < 0 || p->row_bytes < 16 || p->row_bytes % 16 != 0 ||
      p->row_bytes > MOEKIT_READ_ROWS_MAX_BYTES || (p->rows > 0 && (p->src == nullptr || p->dst == nullptr)) ||
      reinterpret_cast<uintptr_t>(p->src) % 16 != 0) {
    return MOEKIT_ERR_INVALID_ARGUMENT;
  }
  if (p->rows == 0) return MOEKIT_OK;
  if (ceil_div(p->rows, kReadRowsWarps) > 0x7fffffff) return MOEKIT_ERR_UNSUPPORTED;
  const int per_lane = (int)ceil_div(p->row_bytes / 16, 32);
  if (per_lane <= 1) return launch_read_rows<1>(*p, stream);
  if (per_lane <= 2) return launch_read_rows<2>(*p, stream);
  if (per_lane <= 4) return launch_read_rows<4>(*p, stream);
  if (per_lane <= 8) return launch_read_rows<8>(*p, stream);
  return launch_read_rows<16>(*p, stream);
}

extern "C" moekit_status moekit_empty_kernel(moekit_stream stream) {
  moekit::empty_kernel<<<1, 32, 0, stream>>>();
  return moekit::last_launch_status();
}

extern "C" moekit_status moekit_busy_wait(uint64_t nanoseconds, moekit_stream stream) {
  moekit::busy_wait_kernel<<<1, 1, 0, stream>>>(nanoseconds);
  return moekit::last_launch_status();
}
