// Probe: how fast can SMs write HBM, and which part of the permute's pattern costs what?
//
// The T = 16384 DeepSeek-V3 permute (read 235 MB, write 1.88 GB in 14 KB rows scattered over 256
// expert segments) runs ~89.5% of memcpy, while the driver's memset writes 6% faster than memcpy
// and torch's fill_ 22% slower (BENCHMARKS.md run 29). Timed here, each on 2 GiB (or the
// permute's 1.88 GB), the bench's way (probe_timing.cuh):
//   memset (driver, zero and a pattern), sequential 16-byte stores (plain, .cs), the permute's
//   scatter of constant rows (no reads), the permute's scatter with its reads (the crate kernel),
//   and the permute software-pipelined (persistent warps loading the next item while storing).
// Run 37 (H200): memcpy 4250 GB/s, memset 4546, sequential writes 4310-4430, the scatter without
// reads 4307 (436 us for T = 16384's 1.88 GB), the warp kernel with its reads 557 us, pipelined
// 581-586 us: the reads' latency is not what costs; their mixing with the writes in DRAM is
// (kernels/permute/permute.cu's phased kernel).
//
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr \
//        -Ikernels/include -o /tmp/wp scripts/probe_write_paths.cu -lcuda && /tmp/wp
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../kernels/permute/permute.cu"
#include "probe_permute_common.cuh"
#include "probe_timing.cuh"

namespace probe {

// Sequential: warp w of the grid writes 16-byte vectors; each thread kUnroll vectors per pass.
template <int kUnroll, bool kStreaming>
__global__ void __launch_bounds__(256) seq_write(uint4 *dst, int64_t n_vec, uint32_t seed) {
  const uint4 v = make_uint4(seed, seed ^ 0x9e3779b9u, seed + 7, ~seed);
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_vec; i += stride * kUnroll) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = i + u * stride;
      if (j < n_vec) {
        if (kStreaming) __stcs(dst + j, v); else dst[j] = v;
      }
    }
  }
}

// Chunked: each warp writes a contiguous run of `chunk_vec` vectors (as the permute's warps write a
// 7 KB slice of a row to each destination), warps in order.
template <bool kStreaming>
__global__ void __launch_bounds__(256) chunk_write(uint4 *dst, int64_t n_vec, int chunk_vec, uint32_t seed) {
  const uint4 v = make_uint4(seed, seed ^ 0x9e3779b9u, seed + 7, ~seed);
  const int lane = threadIdx.x % 32;
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
  const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
  for (int64_t c = warp; c * chunk_vec < n_vec; c += warps) {
    uint4 *d = dst + c * chunk_vec;
    for (int i = lane; i < chunk_vec; i += 32) {
      if (kStreaming) __stcs(d + i, v); else d[i] = v;
    }
  }
}

// The permute's stores without its loads: one warp per (token, half row), 8 rows each, constant
// data, streaming stores; the same blocks of 8 warps as permute_kernel<16, 16, true>.
__global__ void __launch_bounds__(256) scatter_const(uint4 *xp, const int *inverse_map, int64_t tokens, int top_k,
                                                     int row_vec, uint32_t seed) {
  const uint4 v = make_uint4(seed, seed ^ 0x9e3779b9u, seed + 7, ~seed);
  const int lane = threadIdx.x % 32;
  const int64_t item = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
  const int64_t t = item / 2;
  if (t >= tokens) return;
  const int half = (int)(item % 2) * (row_vec / 2);
  for (int j = 0; j < top_k; ++j) {
    const int r = __ldg(inverse_map + t * top_k + j);
    uint4 *d = xp + (int64_t)r * row_vec + half;
    for (int i = lane; i < row_vec / 2; i += 32) __stcs(d + i, v);
  }
}


// The permute software-pipelined: persistent warps, each item (token, 1/slices of its row) loaded
// one item ahead, so a warp's loads travel while it stores the previous item's 8 copies.
template <int kVec>
__global__ void __launch_bounds__(256) pipelined_permute(const uint4 *__restrict__ x, uint4 *__restrict__ xp,
                                                         const int *__restrict__ inv, int64_t tokens, int top_k,
                                                         int row_vec, int slices) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
  const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
  const int64_t items = tokens * slices;
  const int per_slice = row_vec / slices;
  uint4 cur[kVec], nxt[kVec];
  int cur_row = -1, nxt_row = -1;
  auto load = [&](int64_t item, uint4 (&buf)[kVec], int &row) {
    const int64_t t = item / slices;
    const int s = (int)(item - t * slices);
    const uint4 *src = x + t * row_vec + s * per_slice;
#pragma unroll
    for (int u = 0; u < kVec; ++u) buf[u] = __ldg(src + lane + 32 * u);
    row = lane < top_k ? __ldg(inv + t * top_k + lane) : -1;
  };
  int64_t it = warp;
  if (it < items) load(it, cur, cur_row);
  for (; it < items; it += warps) {
    const int64_t next = it + warps;
    if (next < items) load(next, nxt, nxt_row);
    const int s = (int)(it % slices);
    for (int j = 0; j < top_k; ++j) {
      const int r = __shfl_sync(0xffffffffu, cur_row, j);
      if (r < 0) continue;
      uint4 *d = xp + (int64_t)r * row_vec + s * per_slice;
#pragma unroll
      for (int u = 0; u < kVec; ++u) __stcs(d + lane + 32 * u, cur[u]);
    }
#pragma unroll
    for (int u = 0; u < kVec; ++u) cur[u] = nxt[u];
    cur_row = nxt_row;
  }
}

}  // namespace probe

int main() {
  using namespace probe;
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const size_t bytes = 2ull << 30;
  const int64_t n_vec = bytes / 16;
  uint8_t *a, *b;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&b, bytes));
  CK(cudaMemset(a, 1, bytes));
  auto gbps = [](double moved, float us) { printf("    %.1f GB/s\n", moved / us / 1e3); };
  for (int round = 0; round < 2; ++round) {
    gbps(2.0 * bytes, timeit("memcpy 2 GiB", [&] { CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); }, 30));
    gbps(bytes, timeit("memset zero 2 GiB", [&] { CK(cudaMemsetAsync(b, 0, bytes)); }, 30));
    gbps(bytes, timeit("memsetD32 pattern 2 GiB",
                       [&] { CK((cudaError_t)cuMemsetD32Async((CUdeviceptr)b, 0x12345679u, bytes / 4, 0)); }, 30));
    for (int blocks_per_sm : {2, 4, 8}) {
      char name[96];
      snprintf(name, sizeof name, "seq plain u4 %d blk/SM", blocks_per_sm);
      gbps(bytes, timeit(name, [&] { seq_write<4, false><<<sms * blocks_per_sm, 256>>>((uint4 *)b, n_vec, 5); }, 30));
      snprintf(name, sizeof name, "seq .cs u4 %d blk/SM", blocks_per_sm);
      gbps(bytes, timeit(name, [&] { seq_write<4, true><<<sms * blocks_per_sm, 256>>>((uint4 *)b, n_vec, 5); }, 30));
    }
    gbps(bytes, timeit("chunk 7 KB plain 8 blk/SM",
                       [&] { chunk_write<false><<<sms * 8, 256>>>((uint4 *)b, n_vec, 448, 5); }, 30));
    gbps(bytes, timeit("chunk 7 KB .cs 8 blk/SM",
                       [&] { chunk_write<true><<<sms * 8, 256>>>((uint4 *)b, n_vec, 448, 5); }, 30));
  }
  CK(cudaFree(a));
  CK(cudaFree(b));

  // The permute at DeepSeek-V3 shapes: with its reads (the crate kernel) and without (constants).
  const int experts = 256, top_k = 8, row_bytes = 14336, row_vec = row_bytes / 16;
  for (int64_t tokens : {4096, 16384}) {
    const DeviceRouting routing = upload_uniform_routing(tokens, top_k, experts, 11);
    const int *d_inv = routing.inverse_map;
    const int64_t x_bytes = tokens * row_bytes, xp_bytes = x_bytes * top_k;
    const int copies = (int)std::max<int64_t>(1, (180ll << 20) / x_bytes + 1);
    uint8_t *x, *xp;
    CK(cudaMalloc(&x, x_bytes * copies));
    CK(cudaMalloc(&xp, xp_bytes));
    CK(cudaMemset(x, 3, x_bytes * copies));
    int rot = 0;
    auto crate = [&](uint8_t *out) {
      run_permute(routing, x + (rot++ % copies) * x_bytes, out, row_bytes, MOEKIT_COPY_WARP, nullptr);
    };
    struct Pipe {
      int slices, blocks_per_sm;
    };
    const Pipe pipes[] = {{4, 2}, {4, 3}, {4, 4}, {7, 3}, {7, 4}, {2, 2}};
    auto pipe = [&](const Pipe &v, uint8_t *out) {
      const uint4 *xs = (const uint4 *)(x + (rot++ % copies) * x_bytes);
      const unsigned grid = sms * v.blocks_per_sm;
      if (v.slices == 4) pipelined_permute<7><<<grid, 256>>>(xs, (uint4 *)out, d_inv, tokens, top_k, row_vec, 4);
      if (v.slices == 7) pipelined_permute<4><<<grid, 256>>>(xs, (uint4 *)out, d_inv, tokens, top_k, row_vec, 7);
      if (v.slices == 2) pipelined_permute<14><<<grid, 256>>>(xs, (uint4 *)out, d_inv, tokens, top_k, row_vec, 2);
      CK(cudaGetLastError());
    };
    {
      // x with distinct words, so that a misplaced row shows
      std::vector<uint32_t> h(x_bytes * copies / 4);
      for (size_t i = 0; i < h.size(); ++i) h[i] = (uint32_t)(i * 2654435761u);
      CK(cudaMemcpy(x, h.data(), x_bytes * copies, cudaMemcpyHostToDevice));
      uint8_t *ref;
      CK(cudaMalloc(&ref, xp_bytes));
      CK(cudaMemset(ref, 0xff, xp_bytes));
      rot = 0;
      crate(ref);
      for (const Pipe &v : pipes) {
        CK(cudaMemset(xp, 0xff, xp_bytes));
        rot = 0;
        pipe(v, xp);
        const unsigned long long d = differing_vectors(xp, ref, xp_bytes);
        printf("T=%lld pipelined slices %d blocks/SM %d: %llu differing vectors\n", (long long)tokens, v.slices,
               v.blocks_per_sm, d);
        if (d) return 1;
      }
      CK(cudaFree(ref));
    }
    for (int round = 0; round < 2; ++round) {
      for (const Pipe &v : pipes) {
        char pname[96];
        snprintf(pname, sizeof pname, "T=%lld pipelined slices %d blocks/SM %d", (long long)tokens, v.slices,
                 v.blocks_per_sm);
        gbps(x_bytes + xp_bytes, timeit(pname, [&] { pipe(v, xp); }, 30));
      }
      char name[96];
      snprintf(name, sizeof name, "T=%lld permute (crate kernel)", (long long)tokens);
      gbps(x_bytes + xp_bytes, timeit(name, [&] { crate(xp); }, 30));
      snprintf(name, sizeof name, "T=%lld scatter, no reads", (long long)tokens);
      gbps(xp_bytes, timeit(name, [&] {
             scatter_const<<<(unsigned)(tokens * 2 / 8), 256>>>((uint4 *)xp, d_inv, tokens, top_k, row_vec, 9);
           }, 30));
      snprintf(name, sizeof name, "T=%lld sequential .cs, same bytes", (long long)tokens);
      gbps(xp_bytes, timeit(name, [&] { seq_write<4, true><<<sms * 4, 256>>>((uint4 *)xp, xp_bytes / 16, 5); }, 30));
      snprintf(name, sizeof name, "T=%lld memset, same bytes", (long long)tokens);
      gbps(xp_bytes, timeit(name, [&] { CK(cudaMemsetAsync(xp, 0, xp_bytes)); }, 30));
    }
    CK(cudaFree(x));
    CK(cudaFree(xp));
    free_routing(routing);
  }
  return 0;
}
