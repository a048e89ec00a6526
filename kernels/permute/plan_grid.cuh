// Routing plan in one cooperative launch: the rank, scan and place steps of plan.cu in a single
// kernel whose CTAs meet once at a grid barrier, instead of three dependent kernels. Why: the
// three kernels cost ~7 us over an empty launch even at T = 128 (BENCHMARKS.md, run 21), while one
// kernel with a barrier measured ~0.7 us over empty (run 22 probe); the work itself is a few
// hundred KB.
//
//   1. rank:   warp w of CTA c ranks assignments [(c * kGridWarps + w) * 32 * per_lane, + 32 *
//              per_lane) (plan.cu's rank_in_warp) into its own per-expert counters in shared memory,
//              keeping each lane's ids and ranks in registers. Thread e then replaces expert e's
//              counters by their prefix over the CTA's warps and publishes the CTA's total for e.
//   2. grid barrier.
//   3. place:  thread e sums expert e's totals over the CTAs before its own (its base) and over
//              all (the expert's rows); one block scan gives the padded segment offsets and the
//              tile schedule's starts; CTA e % n_ctas writes expert e's count, offset and tiles;
//              each lane places its held assignments; the grid marks padding and unused rows -1.
//
// Row order within an expert is ascending assignment index, as in plan.cu. Limits (checked by the
// launcher, which otherwise runs the three kernels): num_local <= kGridThreads, and the grid fits
// on the device at once.
#pragma once

#include <cub/block/block_scan.cuh>

#include "device/grid_barrier.cuh"

namespace moekit {
namespace plan {

constexpr int kGridThreads = 512;
constexpr int kGridWarps = kGridThreads / 32;
constexpr int kGridMaxPerLane = 4;  // assignments a lane holds in registers
constexpr int kGridMaxLocal = kGridThreads;

// An expert's padded rows and GEMM tiles, scanned together: one block scan gives every CTA both
// the segment offsets and the tile schedule's starts (CTA 0 ran a second scan for the tiles).
struct RowsTiles {
  int rows;
  int tiles;
};
struct RowsTilesSum {
  __device__ __forceinline__ RowsTiles operator()(const RowsTiles &a, const RowsTiles &b) const {
    return RowsTiles{a.rows + b.rows, a.tiles + b.tiles};
  }
};
using GridScan = cub::BlockScan<RowsTiles, kGridThreads>;

// Dynamic shared memory of one CTA, in ints.
inline size_t grid_smem_ints(int num_local) { return (size_t)kGridWarps * num_local + 3 * (size_t)num_local + 1; }

// The CTAs' per-expert totals go to p.chunk_counts as [n_ctas][num_local] and their invalid-id
// counts to p.invalid_ids[cta]; CTA 0 then leaves the sum in entry 0 and zeros in the rest of the
// host_chunks entries the host sums (n_ctas <= MOEKIT_PLAN_TARGET_CHUNKS, the array's length).
__global__ void __launch_bounds__(kGridThreads)
    plan_grid_kernel(const moekit_plan_params p, const int n_assign, const int num_local, const int per_lane,
                     const int host_chunks, unsigned *barrier_word, const int id_bits) {
  extern __shared__ int grid_smem[];
  int *counts = grid_smem;                              // [kGridWarps][num_local]: counts, then starts
  int *bases = counts + kGridWarps * num_local;         // [num_local] rows of lower CTAs per expert
  int *totals = bases + num_local;                      // [num_local] rows per local expert
  int *offsets = totals + num_local;                    // [num_local + 1] padded segment offsets
  __shared__ GridScan::TempStorage scan_tmp;
  __shared__ int invalid_count;  // this CTA's ids outside [0, E)
  __shared__ int invalid_total;  // CTA 0: every CTA's
  allow_next_grid();
  const int t = threadIdx.x;
  const int lane = t & 31;
  const int warp = t >> 5;
  const int cta = blockIdx.x;
  const int n_ctas = gridDim.x;

  // 1. Rank.
  for (int i = t; i < kGridWarps * num_local; i += kGridThreads) counts[i] = 0;
  if (t == 0) {
    invalid_count = 0;
    invalid_total = 0;
  }
  const int begin = (cta * kGridWarps + warp) * 32 * per_lane;
  int held[kGridMaxPerLane];  // the id, then rank << 16 | local expert, or -1 when not placed
#pragma unroll
  for (int b = 0; b < kGridMaxPerLane; ++b) {
    const int a = begin + b * 32 + lane;
    held[b] = b < per_lane && a < n_assign ? __ldg(p.topk_ids + a) : INT32_MIN;
  }
  __syncthreads();  // counters cleared
  int *my_counts = counts + warp * num_local;
  int invalid = 0;
#pragma unroll
  for (int b = 0; b < kGridMaxPerLane; ++b) {
    if (b < per_lane) {
      const int a = begin + b * 32 + lane;
      const int e = local_expert(p, held[b], a < n_assign, invalid);
      const int rank = rank_in_warp(my_counts, e, lane, id_bits);  // < 32 * per_lane
      held[b] = e >= 0 ? rank << 16 | e : -1;
    }
  }
  invalid = __reduce_add_sync(kFullMask, invalid);
  if (lane == 0 && invalid > 0) atomicAdd(&invalid_count, invalid);
  __syncthreads();  // every warp's counters complete
  if (t < num_local) {
    int running = 0;
    for (int w0 = 0; w0 < kGridWarps; w0 += 8) {
      int c[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) c[i] = counts[(w0 + i) * num_local + t];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        counts[(w0 + i) * num_local + t] = running;
        running += c[i];
      }
    }
    p.chunk_counts[(int64_t)cta * num_local + t] = running;
  }
  if (t == 0) p.invalid_ids[cta] = invalid_count;

  // 2. Every CTA's totals published.
  grid_barrier(barrier_word, (unsigned)n_ctas);

  // 3. Bases and totals (L2 reads: other CTAs wrote them during this kernel), then offsets. CTA 0
  // also loads the CTAs' invalid-id counts now and sums them after placing its rows, off the
  // critical path (summed before placing, they delayed the kernel's end by an L2 round trip).
  const int cta_invalid = cta == 0 && t < n_ctas ? __ldcg(p.invalid_ids + t) : 0;  // n_ctas <= kGridThreads
  int count = 0;
  if (t < num_local) {
    int base = 0;
    const int *column = p.chunk_counts + t;
    // 32 loads in flight: one L2 latency for the grids of <= 32 CTAs the launcher prefers.
    for (int c0 = 0; c0 < n_ctas; c0 += 32) {
      int v[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) v[i] = c0 + i < n_ctas ? __ldcg(column + (int64_t)(c0 + i) * num_local) : 0;
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        base += c0 + i < cta ? v[i] : 0;
        count += v[i];
      }
    }
    bases[t] = base;
    totals[t] = count;
  }
  const int n_tiles = t < num_local ? (count + p.block_m - 1) / p.block_m : 0;
  RowsTiles before, all;
  GridScan(scan_tmp).ExclusiveScan(RowsTiles{t < num_local ? round_up(count, p.align) : 0, n_tiles}, before,
                                   RowsTiles{0, 0}, RowsTilesSum(), all);
  const int offset = before.rows, padded_total = all.rows;
  if (t < num_local) offsets[t] = offset;
  if (t == 0) offsets[num_local] = padded_total;
  // The counts, offsets and tile schedule of expert e, written by CTA e % n_ctas (CTA 0 wrote them
  // all after a second scan, on top of its share of the rows: the grid ends with its last CTA).
  if (t < num_local && t % n_ctas == cta) {
    p.expert_counts[t] = count;
    p.expert_offsets[t] = offset;
    for (int j = 0; j < n_tiles; ++j) {
      p.tiles[2 * (int64_t)(before.tiles + j)] = t;
      p.tiles[2 * (int64_t)(before.tiles + j) + 1] = offset + j * p.block_m;
    }
  }
  if (cta == 0 && t == 0) {
    p.expert_offsets[num_local] = padded_total;
    *p.num_tiles = all.tiles;
  }
  __syncthreads();  // offsets, bases, totals complete
#pragma unroll
  for (int b = 0; b < kGridMaxPerLane; ++b) {
    const int a = begin + b * 32 + lane;
    if (b < per_lane && a < n_assign) {
      int row = -1;
      if (held[b] >= 0) {
        const int le = held[b] & 0xffff;
        // my_counts now holds this warp's first rank within the CTA.
        row = offsets[le] + bases[le] + my_counts[le] + (held[b] >> 16);
        p.row_map[row] = a;
      }
      p.inverse_map[a] = row;
    }
  }
  const int64_t gtid = (int64_t)cta * kGridThreads + t;
  const int64_t stride = (int64_t)n_ctas * kGridThreads;
  if (p.align > 1) {
    const int64_t pads = (int64_t)num_local * (p.align - 1);  // < max_rows <= INT32_MAX
    for (int64_t f = gtid; f < pads; f += stride) {
      const int pe = (int)f / (p.align - 1);  // 32-bit division: f fits
      const int r = offsets[pe] + totals[pe] + (int)f % (p.align - 1);
      if (r < offsets[pe + 1]) p.row_map[r] = -1;
    }
  }
  for (int64_t r = offsets[num_local] + gtid; r < p.max_rows; r += stride) p.row_map[r] = -1;
  if (cta == 0) {
    const int v = __reduce_add_sync(kFullMask, cta_invalid);
    if (lane == 0 && v > 0) atomicAdd(&invalid_total, v);
    __syncthreads();  // every count read and summed before entry 0 is written and the rest cleared
    if (t == 0) p.invalid_ids[0] = invalid_total;
    for (int c = 1 + t; c < host_chunks; c += kGridThreads) p.invalid_ids[c] = 0;
  }
}

}  // namespace plan
}  // namespace moekit
