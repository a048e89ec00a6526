// Hopper thread-block-cluster building blocks as thin PTX wrappers: the CTA's rank, the cluster
// barrier, addresses in a peer CTA's shared memory, remote mbarrier arrivals and stores, waits
// that acquire at cluster scope, and TMA loads multicast to several CTAs of the cluster.
// Addresses are 32-bit shared-memory addresses (sm90::smem_addr) in the shared::cluster window.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "device/sm90.cuh"

namespace moekit {
namespace sm90 {

__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

// Every thread of every CTA of the cluster arrives and waits: orders the barrier initializations
// before any peer's remote use, and keeps each CTA's shared memory alive until no peer can still
// write to it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// The address of the same shared-memory location (`local`, from smem_addr) in CTA `rank`.
__device__ __forceinline__ uint32_t peer_addr(uint32_t local, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  return remote;
}

// Arrives on a barrier of any CTA of the cluster, releasing this thread's prior writes at cluster
// scope (MEMBAR.ALL.GPU in SASS: for publishing data, not for every stage).
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Arrives on a barrier of any CTA of the cluster with the default (CTA-scope release) semantics:
// a bare remote arrive in SASS. For freeing a ring stage whose reads are already complete (WGMMA
// reads after wgmma.wait_group), as CUTLASS's cluster pipelines do: the .release.cluster form
// compiles to MEMBAR.ALL.GPU before every arrive.
__device__ __forceinline__ void mbar_arrive_remote(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Stores a 32-bit value to shared memory of any CTA of the cluster (published by a later
// release-arrive of the same thread).
__device__ __forceinline__ void st_cluster_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared::cluster.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}

// mbar_wait that acquires at cluster scope: what a peer CTA wrote before its release-arrive on
// this barrier is visible after the wait.
__device__ __forceinline__ void mbar_wait_cluster(uint64_t *bar, uint32_t parity) {
  const uint32_t addr = smem_addr(bar);
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}

// tma_load_2d into the same shared-memory offset of every CTA in `cta_mask` (bit r: rank r); each
// destination's barrier at `bar`'s offset receives the box's bytes.
__device__ __forceinline__ void tma_load_2d_multicast(void *dst, const CUtensorMap *map, int32_t c0, int32_t c1,
                                                      uint64_t *bar, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar)), "h"(cta_mask)
      : "memory");
}

}  // namespace sm90
}  // namespace moekit
