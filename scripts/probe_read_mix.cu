// Probe: how fast can the H200 read HBM, and what does a small share of writes mixed into the
// read stream cost? The memory-bound T = 4096 expert GEMMs stream their weights (97% of their
// traffic) at ~4.1 TB/s while writing their outputs (3%); the permute showed that reads mixed
// into a write stream cost far more than their bytes (BENCHMARKS.md run 37). Timed the bench's
// way (probe_timing.cuh) over 4 GiB:
//   16-byte loads only; loads with one 16-byte store per 32 (3%) or 8 (11%) loads; bulk-copy
//   (TMA) loads into a shared-memory ring, as the GEMMs read, with and without 3% stores; and the
//   ring's stores held until the global timer enters a short window, so that all SMs write at once.
// Run 37 (H200, us for 4 GiB): reads alone 947 (16-byte loads, 4.53 TB/s), 933 (bulk ring,
// 4.60 TB/s); with 3% stores 1037-1041 / 1018-1027; with 11% 1109-1113 / 1093: a few percent of
// writes cost ~10% of the time. Windowed stores: 3% 1008 (period 40 us), 6% 1077-1083 against 1043
// continuous: the L2, not the SM's store timing, decides when DRAM sees the writes, so writes a
// few percent of the traffic cannot be phased the way the permute's rounds phase its reads.
//
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr \
//        -Ikernels/include -o /tmp/rm scripts/probe_read_mix.cu -lcuda && /tmp/rm
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "device/sm90.cuh"
#include "probe_timing.cuh"

// Every thread reads 16-byte vectors grid-strided, kUnroll in flight; one store per `write_every`
// loads (0: none) goes to a sequential output.
template <int kUnroll>
__global__ void __launch_bounds__(256) read_kernel(const uint4 *src, int64_t n_vec, uint4 *out, int write_every) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  uint4 acc = make_uint4(0, 0, 0, 0);
  int64_t w = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  int count = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_vec; i += stride * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = i + u * stride;
      v[u] = j < n_vec ? __ldcs(src + j) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      acc.x ^= v[u].x;
      acc.y += v[u].y;
      acc.z ^= v[u].z;
      acc.w += v[u].w;
    }
    count += kUnroll;
    if (write_every > 0 && count >= write_every) {
      count -= write_every;
      __stcs(out + w, acc);
      w += stride;
    }
  }
  if (acc.x == 0x12345678u && acc.y == 7u) out[0] = acc;  // keeps the loads
}

// One CTA per SM: thread 0 keeps a ring of kSlots 32 KB bulk loads in flight over the CTA's
// contiguous share of src; the CTA's threads fold each landed slot (so the loads are consumed) and
// optionally store one 16-byte vector per 32 read.
constexpr int kSlots = 6;
constexpr int kSlotBytes = 32 * 1024;
__global__ void __launch_bounds__(256, 1) bulk_read_kernel(const uint8_t *src, int64_t bytes, uint4 *out,
                                                           int write_every) {
  extern __shared__ __align__(128) uint8_t ring[];
  __shared__ uint64_t full[kSlots];
  const int64_t per_cta = bytes / gridDim.x / kSlotBytes * kSlotBytes;
  const uint8_t *base = src + per_cta * blockIdx.x;
  const int chunks = (int)(per_cta / kSlotBytes);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kSlots; ++s) moekit::sm90::mbar_init(&full[s], 1);
    moekit::sm90::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int c = 0; c < kSlots && c < chunks; ++c) {
      moekit::sm90::mbar_arrive_expect_tx(&full[c], kSlotBytes);
      moekit::sm90::bulk_load(ring + c * kSlotBytes, base + (int64_t)c * kSlotBytes, kSlotBytes, &full[c]);
    }
  }
  uint4 acc = make_uint4(0, 0, 0, 0);
  int64_t w = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  for (int c = 0; c < chunks; ++c) {
    const int s = c % kSlots;
    moekit::sm90::mbar_wait(&full[s], (uint32_t)(c / kSlots) & 1u);
    const uint4 *slot = reinterpret_cast<const uint4 *>(ring + s * kSlotBytes);
    // Each thread folds one vector of the slot per 16 (the GEMM's consumers read smem, not all of it here).
    const uint4 v = slot[threadIdx.x * 8];
    acc.x ^= v.x;
    acc.y += v.y;
    if (write_every > 0 && (c * 2048 / write_every) != ((c + 1) * 2048 / write_every)) {
      // 2048 vectors per slot: one store per write_every of them, spread over the CTA's threads.
      const int stores = (c + 1) * 2048 / write_every - c * 2048 / write_every;
      if ((int)threadIdx.x < stores) {
        __stcs(out + w, acc);
        w += (int64_t)gridDim.x * blockDim.x;
      }
    }
    __syncthreads();  // every thread is done with slot s
    if (threadIdx.x == 0 && c + kSlots < chunks) {
      moekit::sm90::mbar_arrive_expect_tx(&full[s], kSlotBytes);
      moekit::sm90::bulk_load(ring + s * kSlotBytes, base + (int64_t)(c + kSlots) * kSlotBytes, kSlotBytes, &full[s]);
    }
  }
  if (acc.x == 0x12345678u && acc.y == 7u) out[0] = acc;
}

// The bulk ring again, writing 32 KB from a buffer of its own by bulk store once per `write_every`
// slots read: at once (period_ns = 0), or held until the global timer enters the first window_ns
// of every period_ns, so that all SMs write in the same short windows (writes in bursts, as a GEMM
// epilogue could issue its staged tiles' stores).
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__global__ void __launch_bounds__(256, 1) bulk_read_windowed(const uint8_t *src, int64_t bytes, uint8_t *out,
                                                             int write_every, uint64_t period_ns,
                                                             uint64_t window_ns) {
  extern __shared__ __align__(128) uint8_t ring[];  // [kSlots][32 KB], then the store buffer
  __shared__ uint64_t full[kSlots];
  const int64_t per_cta = bytes / gridDim.x / kSlotBytes * kSlotBytes;
  const uint8_t *base = src + per_cta * blockIdx.x;
  const int chunks = (int)(per_cta / kSlotBytes);
  uint8_t *out_cta = out + (per_cta / write_every / kSlotBytes + 2) * kSlotBytes * blockIdx.x;
  uint8_t *store_buf = ring + kSlots * kSlotBytes;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kSlots; ++s) moekit::sm90::mbar_init(&full[s], 1);
    moekit::sm90::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x != 0) return;  // one thread drives the ring; nothing reads the slots
  for (int c = 0; c < kSlots && c < chunks; ++c) {
    moekit::sm90::mbar_arrive_expect_tx(&full[c], kSlotBytes);
    moekit::sm90::bulk_load(ring + c * kSlotBytes, base + (int64_t)c * kSlotBytes, kSlotBytes, &full[c]);
  }
  int pending = 0, written = 0;
  for (int c = 0; c < chunks; ++c) {
    const int s = c % kSlots;
    moekit::sm90::mbar_wait(&full[s], (uint32_t)(c / kSlots) & 1u);
    if ((c + 1) % write_every == 0) ++pending;
    if (pending > 0 && (period_ns == 0 || global_ns() % period_ns < window_ns)) {
      for (; pending > 0; --pending, ++written) {
        moekit::sm90::bulk_store(out_cta + (int64_t)written * kSlotBytes, store_buf, kSlotBytes);
      }
      moekit::sm90::bulk_commit_group();
    }
    if (c + kSlots < chunks) {
      moekit::sm90::mbar_arrive_expect_tx(&full[s], kSlotBytes);
      moekit::sm90::bulk_load(ring + s * kSlotBytes, base + (int64_t)(c + kSlots) * kSlotBytes, kSlotBytes, &full[s]);
    }
  }
  for (; pending > 0; --pending, ++written) {
    moekit::sm90::bulk_store(out_cta + (int64_t)written * kSlotBytes, store_buf, kSlotBytes);
  }
  moekit::sm90::bulk_commit_group();
  moekit::sm90::bulk_wait_group<0>();
}

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const size_t bytes = 4ull << 30;
  uint8_t *src;
  uint4 *out;
  CK(cudaMalloc(&src, bytes));
  CK(cudaMalloc(&out, bytes / 4));
  CK(cudaMemset(src, 0x5a, bytes));
  CK(cudaFuncSetAttribute(bulk_read_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSlots * kSlotBytes));
  CK(cudaFuncSetAttribute(bulk_read_windowed, cudaFuncAttributeMaxDynamicSharedMemorySize, (kSlots + 1) * kSlotBytes));
  const int64_t n_vec = bytes / 16;
  auto gbps = [&](float us, int write_every) {
    const double moved = bytes + (write_every > 0 ? (double)bytes / write_every : 0.0);
    printf("    %.1f GB/s (reads %.1f)\n", moved / us / 1e3, bytes / us / 1e3);
  };
  for (int round = 0; round < 2; ++round) {
    for (int we : {32, 16}) {
      const uint64_t windows[][2] = {{0, 0}, {10000, 1000}, {40000, 4000}, {40000, 2000}, {100000, 10000}};
      for (const auto &w : windows) {
        char name[96];
        snprintf(name, sizeof name, "bulk ring, 32 KB store per %d, window %llu/%llu ns", we,
                 (unsigned long long)w[1], (unsigned long long)w[0]);
        gbps(timeit(name, [&] {
               bulk_read_windowed<<<sms, 256, (kSlots + 1) * kSlotBytes>>>(src, bytes, (uint8_t *)out, we, w[0], w[1]);
             }, 20), we);
      }
    }
  }
  for (int round = 0; round < 1; ++round) {
    for (int we : {0, 32, 8}) {
      char name[96];
      for (int bps : {4, 8}) {
        snprintf(name, sizeof name, "ld.cs x8, %d blk/SM, store 1/%d", bps, we);
        gbps(timeit(name, [&] { read_kernel<8><<<sms * bps, 256>>>((const uint4 *)src, n_vec, out, we); }, 20), we);
      }
      snprintf(name, sizeof name, "bulk ring 6x32KB, store 1/%d", we);
      gbps(timeit(name, [&] { bulk_read_kernel<<<sms, 256, kSlots * kSlotBytes>>>(src, bytes, out, we); }, 20), we);
    }
  }
  return 0;
}
