// Shared by the permute probes (probe_permute_phased.cu, probe_write_paths.cu): a uniform routing
// made on the host and uploaded, the crate's permute params over it, and a bitwise comparison of
// two device buffers.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "moekit.h"
#include "probe_timing.cuh"

namespace probe {

// A routing plan's device buffers (align 1): each token's k experts distinct and uniform, the rows
// of an expert in ascending token order (as the crate's plan places them).
struct DeviceRouting {
  int *inverse_map, *counts, *offsets;
  int64_t tokens;
  int top_k, experts;
};

inline DeviceRouting upload_uniform_routing(int64_t tokens, int top_k, int experts, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int> ids(tokens * top_k), counts(experts, 0), offsets(experts + 1, 0), perm(experts);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int e = 0; e < experts; ++e) perm[e] = e;
    for (int j = 0; j < top_k; ++j) {
      std::uniform_int_distribution<int> d(j, experts - 1);
      std::swap(perm[j], perm[d(rng)]);
      ids[t * top_k + j] = perm[j];
      counts[perm[j]]++;
    }
  }
  for (int e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
  std::vector<int> fill(offsets.begin(), offsets.end() - 1), inverse(tokens * top_k);
  for (int64_t i = 0; i < tokens * top_k; ++i) inverse[i] = fill[ids[i]]++;
  DeviceRouting r{nullptr, nullptr, nullptr, tokens, top_k, experts};
  CK(cudaMalloc(&r.inverse_map, inverse.size() * 4));
  CK(cudaMalloc(&r.counts, experts * 4));
  CK(cudaMalloc(&r.offsets, (experts + 1) * 4));
  CK(cudaMemcpy(r.inverse_map, inverse.data(), inverse.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(r.counts, counts.data(), experts * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(r.offsets, offsets.data(), (experts + 1) * 4, cudaMemcpyHostToDevice));
  return r;
}

inline void free_routing(const DeviceRouting &r) {
  CK(cudaFree(r.inverse_map));
  CK(cudaFree(r.counts));
  CK(cudaFree(r.offsets));
}

// Runs the crate's permute of x (tokens rows of row_bytes) into xp with `kernel` (MOEKIT_COPY_*).
inline void run_permute(const DeviceRouting &r, const void *x, void *xp, int64_t row_bytes, int kernel,
                        uint32_t *barrier_word) {
  moekit_permute_params p{};
  p.x = x;
  p.xp = xp;
  p.inverse_map = r.inverse_map;
  p.expert_counts = r.counts;
  p.expert_offsets = r.offsets;
  p.tokens = r.tokens;
  p.row_bytes = row_bytes;
  p.top_k = r.top_k;
  p.num_local = r.experts;
  p.align = 1;
  p.kernel = kernel;
  p.grid_barrier = barrier_word;
  CK((cudaError_t)moekit_permute(&p, 0));
}

__global__ void count_diff(const uint4 *a, const uint4 *b, int64_t n, unsigned long long *diff) {
  unsigned long long d = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const uint4 u = a[i], v = b[i];
    d += (u.x != v.x) | (u.y != v.y) | (u.z != v.z) | (u.w != v.w);
  }
  if (d) atomicAdd(diff, d);
}

// How many 16-byte vectors of the two device buffers differ (bytes a multiple of 16).
inline unsigned long long differing_vectors(const void *a, const void *b, int64_t bytes) {
  unsigned long long *diff, d = 0;
  CK(cudaMalloc(&diff, sizeof d));
  CK(cudaMemset(diff, 0, sizeof d));
  count_diff<<<1024, 256>>>(static_cast<const uint4 *>(a), static_cast<const uint4 *>(b), bytes / 16, diff);
  CK(cudaMemcpy(&d, diff, sizeof d, cudaMemcpyDeviceToHost));
  CK(cudaFree(diff));
  return d;
}

}  // namespace probe
