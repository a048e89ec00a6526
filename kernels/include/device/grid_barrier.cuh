// A barrier across every CTA of a grid whose CTAs are all resident at once (a cooperative launch
// guarantees it: otherwise the waiting CTAs could hold the SMs the missing ones need).
//
// State: one u32 in global memory whose low 31 bits are zero before the first use. Each episode
// adds exactly 2^31 to it: CTA 0 adds 2^31 - (n - 1), every other CTA 1. Whatever the order of
// arrival, the sum passes 2^31 (flipping the top bit) only with the last arrival, and the low bits
// are zero again after it, so the word needs no reset between episodes or launches.
// (Run 22 probe, 512-thread CTAs: 0.5-1.2 us over an empty launch for 1-128 CTAs; a count plus a
// generation word, reset by the last CTA, took 1.4-2.3 us.)
#pragma once

namespace moekit {

__device__ __forceinline__ unsigned ld_relaxed_gpu(const unsigned *p) {
  unsigned v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Every thread of every CTA calls it; global-memory writes of any thread before it are visible to
// every thread of the grid after it. Thread 0 of each CTA does the handshake between two fences
// (release before its arrival, acquire after the flip); the CTA barriers order the other threads'
// accesses around it.
__device__ __forceinline__ void grid_barrier(unsigned *word, unsigned n_ctas) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned add = blockIdx.x == 0 ? 0x80000000u - (n_ctas - 1) : 1u;
    __threadfence();
    const unsigned before = atomicAdd(word, add);
    while (((before ^ ld_relaxed_gpu(word)) & 0x80000000u) == 0) {
    }
    __threadfence();
  }
  __syncthreads();
}

}  // namespace moekit
