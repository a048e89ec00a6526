// Launch-latency probe (run 22): event-timed empty launches of plain and cluster grids, cluster
// barriers, scattered DSMEM traffic, block scans, one- and eight-CTA copies. Standalone; on the
// GPU machine: nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -O3 -o /tmp/p scripts/probe_launch.cu && /tmp/p
#include "probe_timing.cuh"
#include <cub/block/block_scan.cuh>
#include <cooperative_groups.h>
namespace cg = cooperative_groups;

__global__ void empty_k(int *out) { if (out && threadIdx.x == 9999) out[0] = 1; }
__global__ void __cluster_dims__(8, 1, 1) empty_cluster(int *out) { if (out && threadIdx.x == 9999) out[0] = 1; }
__global__ void __cluster_dims__(8, 1, 1) cluster_sync2(int *out) {
  extern __shared__ int sm[];
  sm[threadIdx.x] = threadIdx.x;
  cg::this_cluster().sync();
  cg::this_cluster().sync();
  if (out && sm[threadIdx.x] == -5) out[0] = 1;
}
__global__ void __cluster_dims__(8, 1, 1) cluster_remote(int *out, int n) {
  // every warp w < n reads 8 remote ints per lane, scattered, and writes them back (the old scan)
  extern __shared__ int sm[];
  for (int i = threadIdx.x; i < 32 * 256; i += blockDim.x) sm[i] = i;
  cg::cluster_group cl = cg::this_cluster();
  cl.sync();
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int e = cl.block_rank() * 32 + warp;
  if (e < n) {
    int *rs = cl.map_shared_rank(sm, lane / 4);
    int s = 0;
    for (int i = 0; i < 8; ++i) s += rs[((lane % 4) * 8 + i) * n + e];
    for (int i = 0; i < 8; ++i) rs[((lane % 4) * 8 + i) * n + e] = s + i;
  }
  cl.sync();
  if (out && sm[threadIdx.x] == -5) out[0] = 1;
}
using Scan = cub::BlockScan<int, 1024>;
__global__ void scan2(int *out) {
  __shared__ Scan::TempStorage tmp;
  int x = threadIdx.x, y, tot;
  Scan(tmp).ExclusiveSum(x, y, tot);
  __syncthreads();
  Scan(tmp).ExclusiveSum(y, x, tot);
  if (out && x == -5) out[0] = tot;
}
__global__ void load_store(const int *in, int *out, int n) {
  // one CTA moves n ints: the single-CTA plan's traffic floor
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = in[i] + 1;
}

int main() {
  int *buf, *buf2; CK(cudaMalloc(&buf, 64 << 20)); CK(cudaMalloc(&buf2, 64 << 20));
  CK(cudaMemset(buf, 1, 64 << 20));
  CK(cudaFuncSetAttribute(cluster_sync2, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10));
  CK(cudaFuncSetAttribute(cluster_remote, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10));
  timeit("nothing (events only)", [] {});
  timeit("empty <<<1,32>>>", [&] { empty_k<<<1, 32>>>(buf); });
  timeit("empty <<<1,1024>>>", [&] { empty_k<<<1, 1024>>>(buf); });
  timeit("empty <<<8,1024>>>", [&] { empty_k<<<8, 1024>>>(buf); });
  timeit("empty <<<264,256>>>", [&] { empty_k<<<264, 256>>>(buf); });
  timeit("empty cluster8 <<<8,1024>>>", [&] { empty_cluster<<<8, 1024>>>(buf); });
  timeit("empty cluster8 <<<8,256>>>", [&] { empty_cluster<<<8, 256>>>(buf); });
  timeit("cluster8 2 syncs, 4KB smem", [&] { cluster_sync2<<<8, 1024, 4096>>>(buf); });
  timeit("cluster8 2 syncs, 35KB smem", [&] { cluster_sync2<<<8, 1024, 35000>>>(buf); });
  timeit("cluster8 remote scan n=8", [&] { cluster_remote<<<8, 1024, 35000>>>(buf, 8); });
  timeit("cluster8 remote scan n=256", [&] { cluster_remote<<<8, 1024, 35000>>>(buf, 256); });
  timeit("<<<1,1024>>> two block scans", [&] { scan2<<<1, 1024>>>(buf); });
  timeit("<<<1,1024>>> move 1K ints", [&] { load_store<<<1, 1024>>>(buf, buf2, 1024); });
  timeit("<<<1,1024>>> move 32K ints", [&] { load_store<<<1, 1024>>>(buf, buf2, 32768); });
  timeit("<<<1,1024>>> move 64K ints", [&] { load_store<<<1, 1024>>>(buf, buf2, 65536); });
  timeit("<<<8,1024>>> move 64K ints", [&] { load_store<<<8, 1024>>>(buf, buf2, 65536); });
  return 0;
}
