// Hopper (sm_90a) building blocks as thin PTX wrappers: mbarriers, TMA (cp.async.bulk.tensor),
// warpgroup MMA fences and shared-memory matrix descriptors, register reallocation.
// One function per instruction; the kernels compose them.
#pragma once

#include <cuda.h>

#include <cstdint>

namespace moekit {
namespace sm90 {

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The first 1024-byte boundary at or after p, a pointer into shared memory (tiles in the 128-byte
// swizzle must start on one). Offset from p itself rather than rounded through an integer: through
// uintptr_t the compiler lost the address space, and every access to the staging buffers and stage
// records became a generic ST.E / LD.E with 64-bit address arithmetic (BENCHMARKS.md run 28).
__device__ __forceinline__ uint8_t *align_smem_1024(uint8_t *p) { return p + ((1024u - (smem_addr(p) & 1023u)) & 1023u); }

// ---- mbarrier -------------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint64_t *bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
}

// Makes the initialized barriers visible to the async proxy (TMA) and the other threads.
__device__ __forceinline__ void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }

__device__ __forceinline__ void mbar_arrive(uint64_t *bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Warp-specialized rings whose producer publishes a work-item id with each stage (stage_tile[s],
// written before the stage's full barrier arrives): a consumer warp reads the id with lane 0 only
// and broadcasts it, and frees the stage with one arrival from that same lane after the warp
// converges. The freeing thread is then the only reader, so the producer's next write to the slot
// is ordered after every read by that one arrive (racecheck follows this chain; reads by every
// lane followed by a lane-0 arrive it flagged), and a stage costs 8 arrivals instead of 256
// (3-15% faster grouped GEMMs, BENCHMARKS.md run 12).
__device__ __forceinline__ int read_stage_tile(const int32_t *stage_tile, int stage, int lane) {
  int t = 0;
  if (lane == 0) t = stage_tile[stage];
  return __shfl_sync(0xffffffffu, t, 0);
}

// read_stage_tile for a stage's four-word record (the grouped GEMM's decoded tile): lane 0 reads
// it, shuffles give it to the warp. (Every lane reading the 16 bytes itself was race-free by the
// memory model, __syncwarp then lane 0's release-arrive, but racecheck reported each read against
// the producer's next write: 20 reports over the grouped_gemm tests, BENCHMARKS.md run 24.)
__device__ __forceinline__ int4 read_stage_info(const int4 *stage_info, int stage, int lane) {
  int4 v = make_int4(0, 0, 0, 0);
  if (lane == 0) v = stage_info[stage];
  v.x = __shfl_sync(0xffffffffu, v.x, 0);
  v.y = __shfl_sync(0xffffffffu, v.y, 0);
  v.z = __shfl_sync(0xffffffffu, v.z, 0);
  v.w = __shfl_sync(0xffffffffu, v.w, 0);
  return v;
}

// Frees a stage for the producer; call after every lane's reads of it are complete (for WGMMA
// operands: after the wgmma wait).
__device__ __forceinline__ void release_stage(uint64_t *empty, int lane) {
  __syncwarp();
  if (lane == 0) mbar_arrive(empty);
}

// Arrives and announces `bytes` more bytes of transactions (TMA completions) for this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t *bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

// Spins until the phase with the given parity has completed. A fresh barrier counts its previous
// phase (parity 1) as completed, so a producer's first wait on an "empty" barrier passes.
__device__ __forceinline__ void mbar_wait(uint64_t *bar, uint32_t parity) {
  const uint32_t addr = smem_addr(bar);
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}

// ---- TMA ------------------------------------------------------------------------------------

// Loads the box at (c0 = innermost coordinate, c1) of a 2-D tensor map into shared memory; the
// transfer's bytes complete on `bar`.
__device__ __forceinline__ void tma_load_2d(void *dst, const CUtensorMap *map, int32_t c0, int32_t c1, uint64_t *bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
}

// Stores a shared-memory box to (c0 = innermost coordinate, c1, c2) of a 3-D tensor map; rows past
// the map's extent are not written. Asynchronous: commit the store with bulk_commit_group() and
// wait with bulk_wait_group_read() before the buffer is written again. The writes to `src` must
// be made visible to the async proxy first (fence_proxy_async_shared in every writing thread, then
// a barrier).
__device__ __forceinline__ void tma_store_3d(const CUtensorMap *map, const void *src, int32_t c0, int32_t c1,
                                             int32_t c2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(smem_addr(src)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}

// Stores a shared-memory box to (c0 = innermost coordinate, c1) of a 2-D tensor map; elements past
// the map's extent are not written. Asynchronous, as tma_store_3d.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap *map, const void *src, int32_t c0, int32_t c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(smem_addr(src)), "r"(c0), "r"(c1)
               : "memory");
}

// Stores four 8 x 8 b16 matrices held in the mma fragment layout (r0..r3, one per matrix) to
// shared memory: lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}

__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Waits until at most N committed bulk stores still read their shared-memory source.
template <int N>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// Waits until at most N committed bulk stores are incomplete (their writes done).
template <int N>
__device__ __forceinline__ void bulk_wait_group() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}

// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to shared memory
// with the bulk-copy engine; the bytes complete on `bar` (announce them with expect_tx).
__device__ __forceinline__ void bulk_load(void *dst, const void *src, uint32_t bytes, uint64_t *bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from shared to global memory
// with the bulk-copy engine, in the current bulk group (bulk_commit_group, bulk_wait_group_read).
__device__ __forceinline__ void bulk_store(void *dst, const void *src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem_addr(src)),
               "r"(bytes)
               : "memory");
}

// Prefetches a tensor map's descriptor into the cache ahead of the first TMA that uses it.
__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap *map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// ---- cp.async (for gathered rows that TMA cannot address as one box) -----------------------

// Copies 16 bytes from global to shared memory asynchronously; when src_bytes is 0 nothing is read
// and the 16 bytes are zero-filled (src must still be a valid address).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

// Arrives on `bar` once every cp.async this thread issued so far has landed. noinc: the arrival is
// one of the barrier's initialized count (it does not add an expected arrival).
__device__ __forceinline__ void cp_async_mbar_arrive_noinc(uint64_t *bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Waits until every cp.async this thread issued has landed.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Orders this thread's view of shared memory written through the generic proxy (st.shared,
// cp.async) before its later async-proxy accesses (WGMMA operand reads, TMA stores).
__device__ __forceinline__ void fence_proxy_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// ---- warpgroup MMA --------------------------------------------------------------------------

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Descriptor of a K-major bf16 tile whose rows are 128 bytes (64 elements) stored with the
// 128-byte swizzle TMA writes (CU_TENSOR_MAP_SWIZZLE_128B): 8-row atoms of 1024 bytes, so the
// stride between 8-row groups (SBO) is 1024; the leading offset is unused for this layout. The tile
// must start on a 1024-byte boundary; the k-th 16-element slice starts 32*k bytes further, which is
// how the kernels step through K within a tile.
__device__ __forceinline__ uint64_t desc_k_major_sw128(uint32_t smem_byte_addr) {
  uint64_t d = 0;
  d |= (uint64_t)((smem_byte_addr & 0x3ffff) >> 4);
  d |= (uint64_t)1 << 16;              // leading byte offset (16 B): ignored for swizzled K-major
  d |= (uint64_t)(1024 >> 4) << 32;    // stride byte offset: 8 rows x 128 B
  d |= (uint64_t)1 << 62;              // layout: 128-byte swizzle
  return d;
}

// ---- register reallocation (needs __launch_bounds__(threads, 1)) -------------------------------

// Registers per thread a kernel of `threads` threads gets under __launch_bounds__(threads, 1): the
// 64 K register file split evenly, in whole allocation units of 8. It is also the CTA's whole pool
// for setmaxnreg: a warpgroup's setmaxnreg.inc that would overdraw the pool never returns (an MLA
// kernel with producer 48 + consumers 232 over a 384 x 168 pool hung on the H200, BENCHMARKS.md
// run 20). ptxas does use an inc for the code after it (the MLA consumers spill 288 bytes without
// theirs), but a WGMMA whose accumulators exceed this count did not compile (a 512-thread kernel
// with m64n256 tiles: 128 available, ~154 needed, an inc to 160 notwithstanding).
__host__ __device__ constexpr int launch_bound_registers(int threads) { return 65536 / threads / 8 * 8; }

// Whether one producer warpgroup at `producer` registers and `consumers` warpgroups at `consumer`
// registers fit the pool of a CTA of (1 + consumers) warpgroups.
__host__ __device__ constexpr bool register_split_fits(int producer, int consumers, int consumer) {
  return producer + consumers * consumer <= (1 + consumers) * launch_bound_registers(128 * (1 + consumers));
}

template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
}

}  // namespace sm90
}  // namespace moekit
