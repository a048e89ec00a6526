// Probe: the crate's phased permute (MOEKIT_COPY_PHASED) against its warp kernel, and a
// double-buffered "sweep" kernel without the grid barrier (kept here as the contrast).
//
// The T = 16384 DeepSeek-V3 permute sat at ~89.5% of memcpy with the warp kernel. Its writes alone
// run 4.31 TB/s (scripts/probe_write_paths.cu), so the 235 MB of reads mixed into the write stream
// cost ~120 us. The sweep kernel stages chunks of R consecutive token rows in shared memory (one
// bulk copy each, double-buffered, so reads still trickle in beside the writes) and writes each
// chunk's R*k copies in ascending destination row: 565-569 us, slower than the warp kernel. The
// phased kernel (kernels/permute/permute.cu) adds what the sweep lacks: a grid barrier between
// rounds, so every CTA reads while the others read and writes while they write: 525-527 us.
// Every variant is checked bitwise against the warp kernel on a poisoned output first. Run the
// binary with MOEKIT_PERMUTE_PHASE_ROWS=n or MOEKIT_PERMUTE_PHASE_SORT=0 for those variants.
//
// Build and run (on the device machine, from the repository root):
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr -Ikernels/include \
//        -o /tmp/probe scripts/probe_permute_phased.cu -lcuda && /tmp/probe
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../kernels/permute/permute.cu"
#include "probe_permute_common.cuh"
#include "probe_timing.cuh"

namespace probe {
using namespace moekit;

constexpr int kMaxBuffers = 4;

// One CTA per SM; chunk c = blockIdx.x + i * gridDim.x holds tokens [c*R, c*R + R).
template <int kThreads>
__global__ void __launch_bounds__(kThreads, 1)
    sweep_kernel(const uint8_t *__restrict__ x, uint8_t *__restrict__ xp, const int *__restrict__ inverse_map,
                 int64_t tokens, int row_bytes, int top_k, int rows_per_chunk, int nbuf, int sort) {
  extern __shared__ __align__(128) uint8_t buf[];
  __shared__ uint64_t full[kMaxBuffers];
  __shared__ int keys[kThreads];
  __shared__ int sorted_dst[kThreads];
  __shared__ int sorted_src[kThreads];
  const int tid = threadIdx.x;
  const int64_t chunks = (tokens + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t chunk_bytes = (int64_t)rows_per_chunk * row_bytes;
  if (tid == 0) {
    for (int b = 0; b < nbuf; ++b) sm90::mbar_init(&full[b], 1);
    sm90::fence_barrier_init();
  }
  __syncthreads();
  auto issue = [&](int64_t c, int b) {
    const int64_t t0 = c * rows_per_chunk;
    const int rows = (int)std::min<int64_t>(rows_per_chunk, tokens - t0);
    const uint32_t bytes = (uint32_t)rows * (uint32_t)row_bytes;
    sm90::mbar_arrive_expect_tx(&full[b], bytes);
    sm90::bulk_load(buf + b * chunk_bytes, x + t0 * row_bytes, bytes, &full[b]);
  };
  if (tid == 0) {
    for (int b = 0; b < nbuf; ++b) {
      const int64_t c = blockIdx.x + (int64_t)b * gridDim.x;
      if (c < chunks) issue(c, b);
    }
  }
  // The keys of the next chunk are loaded a chunk ahead (their latency hidden by the stores).
  auto load_key = [&](int64_t c) {
    if (c >= chunks) return -1;
    const int64_t t0 = c * rows_per_chunk;
    const int n = (int)std::min<int64_t>(rows_per_chunk, tokens - t0) * top_k;
    return tid < n ? __ldg(inverse_map + t0 * top_k + tid) : -1;
  };
  int key = load_key(blockIdx.x);
  const int n_vec = row_bytes / 16;
  int i = 0;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x, ++i) {
    const int b = i % nbuf;
    const uint32_t parity = (uint32_t)(i / nbuf) & 1u;
    keys[tid] = key;
    key = load_key(c + gridDim.x);
    __syncthreads();
    const int n = (int)std::min<int64_t>(rows_per_chunk, tokens - c * rows_per_chunk) * top_k;
    const int mine = keys[tid];
    if (mine >= 0) {
      int rank = 0;
      if (sort) {
        for (int m = 0; m < n; ++m) rank += (unsigned)keys[m] < (unsigned)mine;
      } else {
        for (int m = 0; m < tid; ++m) rank += keys[m] >= 0;
      }
      sorted_dst[rank] = mine;
      sorted_src[rank] = tid / top_k;
    }
    const int n_valid = __syncthreads_count(mine >= 0);
    sm90::mbar_wait(&full[b], parity);
    const uint8_t *src = buf + b * chunk_bytes;
    for (int q = 0; q < n_valid; ++q) {
      const uint4 *s = reinterpret_cast<const uint4 *>(src + sorted_src[q] * row_bytes);
      uint4 *d = reinterpret_cast<uint4 *>(xp + (int64_t)sorted_dst[q] * row_bytes);
      for (int v = tid; v < n_vec; v += kThreads) __stcs(d + v, s[v]);
    }
    __syncthreads();  // the buffer and the sorted lists are free
    if (tid == 0) {
      const int64_t next = c + (int64_t)nbuf * gridDim.x;
      if (next < chunks) issue(next, b);
    }
  }
}


}  // namespace probe

int main() {
  using namespace probe;
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CK(cudaFuncSetAttribute(sweep_kernel<512>, cudaFuncAttributeMaxDynamicSharedMemorySize, 220 * 1024));
  unsigned *barrier_word;
  CK(cudaMalloc(&barrier_word, 4));
  CK(cudaMemset(barrier_word, 0, 4));
  {  // memcpy reference
    const size_t bytes = 2ull << 30;
    void *a, *b;
    CK(cudaMalloc(&a, bytes));
    CK(cudaMalloc(&b, bytes));
    CK(cudaMemset(a, 1, bytes));
    const float us = timeit("memcpy 2 GiB", [&] { CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); }, 50);
    printf("memcpy %.1f GB/s\n", 2.0 * bytes / us / 1e3);
    CK(cudaFree(a));
    CK(cudaFree(b));
  }
  struct Model {
    const char *name;
    int experts, top_k, hidden;
  };
  const Model models[] = {{"dsv3", 256, 8, 7168}, {"qwen3", 128, 8, 2048}, {"mixtral", 8, 2, 4096}};
  for (const Model &m : models) {
    for (int64_t tokens : {2048, 4096, 16384}) {
      const int row_bytes = m.hidden * 2;
      const int64_t x_bytes = tokens * row_bytes, xp_bytes = x_bytes * m.top_k;
      const int copies = (int)std::max<int64_t>(1, (180ll << 20) / x_bytes + 1);
      uint8_t *x, *xp, *xp_ref;
      CK(cudaMalloc(&x, x_bytes * copies));
      CK(cudaMalloc(&xp, xp_bytes));
      CK(cudaMalloc(&xp_ref, xp_bytes));
      {
        std::vector<uint32_t> h(x_bytes * copies / 4);
        for (size_t i = 0; i < h.size(); ++i) h[i] = (uint32_t)(i * 2654435761u);
        CK(cudaMemcpy(x, h.data(), x_bytes * copies, cudaMemcpyHostToDevice));
      }
      const DeviceRouting routing = upload_uniform_routing(tokens, m.top_k, m.experts, 11);
      int rot = 0;
      auto crate = [&](uint8_t *out, int kernel) {
        run_permute(routing, x + (rot++ % copies) * x_bytes, out, row_bytes, kernel, barrier_word);
      };
      const bool dsv3 = m.experts == 256;
      auto sweep = [&](uint8_t *out) {  // the double-buffered chunks, no barrier (dsv3 rows only)
        const int rows = 7;
        const int64_t chunks = (tokens + rows - 1) / rows;
        const uint8_t *xs = x + (rot++ % copies) * x_bytes;
        sweep_kernel<512><<<(int)std::min<int64_t>(sms, chunks), 512, (size_t)rows * 2 * row_bytes>>>(
            xs, out, routing.inverse_map, tokens, row_bytes, m.top_k, rows, 2, 1);
        CK(cudaGetLastError());
      };
      CK(cudaMemset(xp_ref, 0xff, xp_bytes));
      rot = 0;
      crate(xp_ref, MOEKIT_COPY_WARP);
      for (int variant = 0; variant < (dsv3 ? 2 : 1); ++variant) {
        CK(cudaMemset(xp, 0xff, xp_bytes));
        rot = 0;
        if (variant == 0) crate(xp, MOEKIT_COPY_PHASED); else sweep(xp);
        const unsigned long long d = differing_vectors(xp, xp_ref, xp_bytes);
        printf("%s T=%lld %s: %llu differing vectors\n", m.name, (long long)tokens, variant ? "sweep" : "phased", d);
        if (d) return 1;
      }
      const double floor_bytes = (double)x_bytes + (double)xp_bytes;
      for (int round = 0; round < 2; ++round) {
        char name[128];
        snprintf(name, sizeof name, "%s/T%lld/permute warp", m.name, (long long)tokens);
        float us = timeit(name, [&] { crate(xp, MOEKIT_COPY_WARP); }, 50);
        printf("    %.1f GB/s\n", floor_bytes / us / 1e3);
        snprintf(name, sizeof name, "%s/T%lld/permute phased", m.name, (long long)tokens);
        us = timeit(name, [&] { crate(xp, MOEKIT_COPY_PHASED); }, 50);
        printf("    %.1f GB/s\n", floor_bytes / us / 1e3);
        if (dsv3 && round == 0) {
          snprintf(name, sizeof name, "%s/T%lld/permute sweep (no barrier)", m.name, (long long)tokens);
          us = timeit(name, [&] { sweep(xp); }, 50);
          printf("    %.1f GB/s\n", floor_bytes / us / 1e3);
        }
      }
      free_routing(routing);
      CK(cudaFree(x));
      CK(cudaFree(xp));
      CK(cudaFree(xp_ref));
    }
  }
  return 0;
}
