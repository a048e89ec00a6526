// Probe (not part of the crate): do 1-row TMA boxes with SWIZZLE_128B, landing at 128-byte offsets
// of a 1024-byte-aligned buffer, produce the same layout as one 8-row box (the swizzle a function
// of the shared-memory address), and do negative row coordinates read as zeros?
// nvcc -arch=sm_90a -std=c++17 scripts/probe_tma_row_swizzle.cu -lcuda -o /tmp/probe && /tmp/probe
#include <cuda.h>
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdint>
#include <vector>

__device__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

__global__ void probe(const __grid_constant__ CUtensorMap rows1, const __grid_constant__ CUtensorMap rows8,
                      const int *perm, uint16_t *out) {
  __shared__ __align__(1024) uint16_t a[8 * 64];
  __shared__ __align__(1024) uint16_t b[8 * 64];
  __shared__ __align__(8) uint64_t bar;
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"(smem_u32(&bar)));
    asm volatile("fence.mbarrier_init.release.cluster;");
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" ::"r"(smem_u32(&bar)), "r"(2 * 8 * 128));
    for (int i = 0; i < 8; ++i) {
      asm volatile(
          "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
              smem_u32(a + i * 64)),
          "l"((uint64_t)&rows1), "r"(0), "r"(perm[i]), "r"(smem_u32(&bar))
          : "memory");
    }
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
            smem_u32(b)),
        "l"((uint64_t)&rows8), "r"(0), "r"(0), "r"(smem_u32(&bar))
        : "memory");
  }
  uint32_t done = 0;
  while (!done) {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(smem_u32(&bar)) : "memory");
  }
  for (int i = threadIdx.x; i < 8 * 64; i += blockDim.x) {
    out[i] = a[i];
    out[512 + i] = b[i];
  }
}

int main() {
  const int R = 64, C = 64;
  std::vector<uint16_t> h(R * C);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) h[r * C + c] = (uint16_t)(r * C + c + 1);
  void *d;
  cudaMalloc(&d, h.size() * 2);
  cudaMemcpy(d, h.data(), h.size() * 2, cudaMemcpyHostToDevice);
  CUtensorMap m1, m8;
  cuuint64_t dims[2] = {(cuuint64_t)C, (cuuint64_t)R};
  cuuint64_t strides[1] = {(cuuint64_t)C * 2};
  cuuint32_t box1[2] = {64, 1}, box8[2] = {64, 8}, es[2] = {1, 1};
  CUresult e1 = cuTensorMapEncodeTiled(&m1, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, d, dims, strides, box1, es,
                                       CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                       CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  CUresult e8 = cuTensorMapEncodeTiled(&m8, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, d, dims, strides, box8, es,
                                       CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                       CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  printf("encode: %d %d\n", (int)e1, (int)e8);
  int hp[8] = {9, 3, -1, 40, 1, 63, 2, 17};
  int *dp;
  cudaMalloc(&dp, sizeof(hp));
  cudaMemcpy(dp, hp, sizeof(hp), cudaMemcpyHostToDevice);
  uint16_t *dout;
  cudaMalloc(&dout, 1024 * 2);
  probe<<<1, 128>>>(m1, m8, dp, dout);
  cudaError_t err = cudaDeviceSynchronize();
  printf("kernel: %s\n", cudaGetErrorString(err));
  std::vector<uint16_t> o(1024);
  cudaMemcpy(o.data(), dout, 2048, cudaMemcpyDeviceToHost);
  // The 8-row box: smem row i, 16-byte chunk c holds source chunk c ^ (i & 7) of row i (SW128).
  int bad8 = 0, bad1 = 0, bad1_rowindex = 0;
  for (int i = 0; i < 8; ++i)
    for (int c = 0; c < 8; ++c)
      for (int e = 0; e < 8; ++e) {
        const int src_chunk = c ^ (i & 7);
        const uint16_t want8 = h[i * C + src_chunk * 8 + e];
        if (o[512 + i * 64 + c * 8 + e] != want8) ++bad8;
        const int r = hp[i];
        const uint16_t want1 = r < 0 ? 0 : h[r * C + src_chunk * 8 + e];       // swizzle by smem address
        const uint16_t want1b = r < 0 ? 0 : h[r * C + c * 8 + e];              // swizzle by box row (row 0: none)
        if (o[i * 64 + c * 8 + e] != want1) ++bad1;
        if (o[i * 64 + c * 8 + e] != want1b) ++bad1_rowindex;
      }
  printf("8-row box mismatches vs SW128: %d\n1-row boxes mismatches vs address swizzle: %d; vs no swizzle: %d\n", bad8,
         bad1, bad1_rowindex);
  return 0;
}
