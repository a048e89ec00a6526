// Shared by the standalone probes (probe_launch.cu, probe_grid_barrier.cu): error checks and the
// bench report's timing method (each launch alone between two CUDA events, behind a 100 us device
// spin so the events time the device and not the host's enqueue; median and 10th percentile).
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s line %d\n", #x, cudaGetErrorString(e), __LINE__); exit(1);} } while (0)

__global__ void busy(unsigned long long ns) {
  unsigned long long t0; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  for (;;) { unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); if (t - t0 > ns) break; }
}

// Median of `reps` timed launches after 10 untimed ones, in microseconds; prints a line.
template <class F> float timeit(const char *name, F launch, int reps = 200) {
  cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  std::vector<float> v;
  for (int r = 0; r < reps + 10; ++r) {
    busy<<<1, 1>>>(100000);
    CK(cudaEventRecord(a)); launch(); CK(cudaEventRecord(b)); CK(cudaEventSynchronize(b));
    float ms; CK(cudaEventElapsedTime(&ms, a, b)); if (r >= 10) v.push_back(ms * 1000);
  }
  CK(cudaGetLastError());
  std::sort(v.begin(), v.end());
  printf("%-44s median %6.2f us  p10 %6.2f\n", name, v[v.size() / 2], v[v.size() / 10]);
  return v[v.size() / 2];
}
