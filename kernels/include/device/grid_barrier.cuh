// A barrier across every CTA of a grid whose CTAs are all resident at once (a cooperative launch
// guarantees it: otherwise the waiting CTAs could hold the SMs the missing ones need).
//
// State: two ints in global memory, zero before the first use and left zero-count after each:
// [0] arrivals in the current episode, [1] the episode's generation. The last CTA to arrive resets
// the count and advances the generation; the others wait for the generation to change. Reading the
// generation before arriving is safe: it cannot advance until this CTA has arrived.
#pragma once

namespace moekit {

__device__ __forceinline__ unsigned ld_acquire_gpu(const unsigned *p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned atom_add_acq_rel_gpu(unsigned *p, unsigned v) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

__device__ __forceinline__ void st_release_gpu(unsigned *p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Every thread of every CTA calls it; global-memory writes of any thread before it are visible to
// every thread of the grid after it. Thread 0 of each CTA does the handshake; the CTA barriers
// order the other threads' accesses around it (release before the arrival, acquire after).
__device__ __forceinline__ void grid_barrier(unsigned *state, unsigned n_ctas) {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned *count = state;
    unsigned *generation = state + 1;
    const unsigned gen = ld_acquire_gpu(generation);
    __threadfence();  // the CTA's writes (ordered before this thread by __syncthreads) go first
    if (atom_add_acq_rel_gpu(count, 1) == n_ctas - 1) {
      *count = 0;  // nobody reads it until the next episode, which starts after the release below
      st_release_gpu(generation, gen + 1);
    } else {
      while (ld_acquire_gpu(generation) == gen) __nanosleep(32);
    }
    __threadfence();
  }
  __syncthreads();
}

}  // namespace moekit
