// Grid-barrier probe (run 22): cost of barrier variants over 1-128 cooperative 512-thread CTAs and
// of one thread reading a column of per-CTA totals. Standalone; on the GPU machine:
// nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -O3 -o /tmp/p scripts/probe_grid_barrier.cu && /tmp/p
#include "probe_timing.cuh"
#include <cooperative_groups.h>
namespace cg = cooperative_groups;
__device__ __forceinline__ unsigned ld_acquire(const unsigned *p) { unsigned v; asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v; }
__device__ __forceinline__ unsigned ld_relaxed(const unsigned *p) { unsigned v; asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v; }
__device__ __forceinline__ unsigned atom_acq_rel(unsigned *p, unsigned v) { unsigned o; asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(o) : "l"(p), "r"(v) : "memory"); return o; }
__device__ __forceinline__ unsigned atom_relaxed(unsigned *p, unsigned v) { unsigned o; asm volatile("atom.relaxed.gpu.global.add.u32 %0, [%1], %2;" : "=r"(o) : "l"(p), "r"(v) : "memory"); return o; }
__device__ __forceinline__ void st_release(unsigned *p, unsigned v) { asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory"); }
__device__ __forceinline__ void st_relaxed(unsigned *p, unsigned v) { asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory"); }

template <int V> __device__ void barrier(unsigned *count, unsigned *gen_p, unsigned n) {
  __syncthreads();
  if (threadIdx.x == 0) {
    if (V == 0) {  // as in plan_grid.cuh
      const unsigned gen = ld_acquire(gen_p);
      __threadfence();
      if (atom_acq_rel(count, 1) == n - 1) { *count = 0; st_release(gen_p, gen + 1); }
      else while (ld_acquire(gen_p) == gen) __nanosleep(32);
      __threadfence();
    } else if (V == 1) {  // relaxed ops, one fence each side, relaxed spin without sleep
      const unsigned gen = ld_relaxed(gen_p);
      __threadfence();
      if (atom_relaxed(count, 1) == n - 1) { st_relaxed(count, 0); __threadfence(); st_relaxed(gen_p, gen + 1); }
      else while (ld_relaxed(gen_p) == gen) {}
      __threadfence();
    } else if (V == 2) {  // monotonic counter only: target passed in (no reset) -- lower bound
      __threadfence();
      atom_relaxed(count, 1);
      while (ld_relaxed(count) < n) {}
      __threadfence();
    }
  }
  __syncthreads();
}
template <int V> __global__ void kbar(unsigned *state, int sep, int *out, unsigned target) {
  if (V == 3) { cg::this_grid().sync(); }
  else barrier<V>(state, state + sep, V == 2 ? target : gridDim.x);
  if (out && threadIdx.x == 9999) out[0] = 1;
}
__global__ void kreads(const int *col, int n_ctas, int nl, int *out) {
  // thread t < nl reads n_ctas values, 8 in flight (the plan's cross-CTA read)
  int s = 0;
  if (threadIdx.x < nl) {
    int c = 0;
    for (; c + 8 <= n_ctas; c += 8) { int v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = __ldcg(col + (c + i) * nl + threadIdx.x);
#pragma unroll
      for (int i = 0; i < 8; ++i) s += v[i]; }
  }
  if (s == -12345) out[0] = s;
}
template <int V> void coop(unsigned *state, int sep, int *out, int ctas, bool coopattr, unsigned target = 0) {
  cudaLaunchConfig_t cfg = {}; cfg.gridDim = dim3(ctas); cfg.blockDim = dim3(512);
  cudaLaunchAttribute attr[1]; attr[0].id = cudaLaunchAttributeCooperative; attr[0].val.cooperative = 1;
  cfg.attrs = attr; cfg.numAttrs = coopattr ? 1 : 0;
  CK(cudaLaunchKernelEx(&cfg, kbar<V>, state, sep, out, target));
}
int main() {
  unsigned *state; int *buf; CK(cudaMalloc(&state, 4096)); CK(cudaMalloc(&buf, 64 << 20));
  char name[128];
  for (int ctas : {1, 8, 16, 32, 64, 128}) {
    CK(cudaMemset(state, 0, 4096));
    snprintf(name, 128, "empty coop kernel(V3 no sync) ctas=%d", ctas);
    // plain launch, no barrier: launch cost of the grid
    timeit(name, [&] { cudaLaunchConfig_t cfg = {}; cfg.gridDim = dim3(ctas); cfg.blockDim = dim3(512);
      cudaLaunchAttribute attr[1]; attr[0].id = cudaLaunchAttributeCooperative; attr[0].val.cooperative = 1; cfg.attrs = attr; cfg.numAttrs = 1;
      CK(cudaLaunchKernelEx(&cfg, kreads, (const int *)buf, 0, 0, buf)); }, 100);
    snprintf(name, 128, "V0 adjacent words ctas=%d", ctas); timeit(name, [&] { coop<0>(state, 1, buf, ctas, true); }, 100);
    CK(cudaMemset(state, 0, 4096));
    snprintf(name, 128, "V0 separate lines ctas=%d", ctas); timeit(name, [&] { coop<0>(state, 64, buf, ctas, true); }, 100);
    CK(cudaMemset(state, 0, 4096));
    snprintf(name, 128, "V1 relaxed, separate ctas=%d", ctas); timeit(name, [&] { coop<1>(state, 64, buf, ctas, true); }, 100);
    snprintf(name, 128, "V2 monotonic lower bound ctas=%d", ctas); { CK(cudaMemset(state, 0, 4096)); unsigned tgt = 0; timeit(name, [&] { tgt += ctas; coop<2>(state, 64, buf, ctas, true, tgt); }, 100); }
    snprintf(name, 128, "V3 cg grid sync ctas=%d", ctas); timeit(name, [&] { coop<3>(state, 64, buf, ctas, true); }, 100);
    snprintf(name, 128, "reads 256 thr x %d ctas", ctas); timeit(name, [&] { kreads<<<1, 512>>>(buf, ctas, 256, buf); }, 100);
  }
  return 0;
}
