// Routing plan: a stable counting sort of the T*k assignments (token, slot) by expert, entirely on
// the device, with no host synchronization. Up to 2048 assignments per SM and 512 local experts,
// one cooperative launch does it all (plan_grid.cuh, the same three steps around a grid barrier);
// otherwise three short kernels:
//
//   1. rank:   one warp per chunk of assignments walks its chunk in order and ranks each assignment
//              among the chunk's earlier assignments of the same expert (rank_in_warp), giving
//              per-(expert, chunk) counts. No atomics, so the ranks are deterministic.
//   2. scan:   one warp per expert turns its per-chunk counts into per-chunk starting ranks and
//              the expert's total.
//   3. place:  every block scans the (padded) expert totals into segment offsets in shared memory
//              and writes row_map / inverse_map for its assignments; block 0 also writes the
//              offsets and the tile schedule; all blocks mark padding and unused rows with -1.
//
// Row order within an expert is ascending assignment index t*k + slot, i.e. ascending token, then
// slot: the same order as a stable sort, independent of scheduling.
//
// Floor: read T*k ids, write T*k rows of row_map and inverse_map: 384 KB at T = 4096, k = 8, well
// under a microsecond of HBM time; the plan is bound by launch latency and the dependent steps.
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>

#include "device/launch.cuh"
#include "device/warp.cuh"
#include "moekit.h"

namespace moekit {
namespace plan {

constexpr int kRankWarps = 4;
constexpr int kScanWarps = 8;
constexpr int kPlaceThreads = 256;
// Ids each lane of a rank warp loads before it starts ranking them: independent loads in flight.
constexpr int kRankBatch = 8;

__device__ __forceinline__ int round_up(int x, int a) { return (x + a - 1) / a * a; }

// The local expert of an assignment's id, -1 when it is not placed (outside the local range, or
// not an assignment of this build: `live` false); counts ids outside [0, E) in `invalid`.
__device__ __forceinline__ int local_expert(const moekit_plan_params &p, int id, bool live, int &invalid) {
  int e = -1;
  if (live) {
    if (id < 0 || id >= p.num_experts) {
      ++invalid;
    } else if (id >= p.expert_begin && id < p.expert_end) {
      e = id - p.expert_begin;
    }
  }
  return e;
}

// The lanes of the warp whose local expert equals this lane's e (e = -1: the lanes without one).
// id_bits < 0: __match_any_sync. Otherwise e < 2^id_bits and the mask is built from one ballot per
// bit of e (plus one for e >= 0): every lane keeps the lanes that agree with it on each bit. Both
// give the same mask; match.any measured ~0.5 us per 32 ids per warp with 16 warps per SM
// (BENCHMARKS.md run 27), the ballots (9 for 256 experts) are plain ALU work. Plan, H200, us
// (BENCHMARKS.md run 28 call 3, 5 rounds, match.any -> ballots): DeepSeek-V3 T = 4096
// 10.16-10.45 -> 9.55-9.86, T = 16384 13.66-14.05 -> 12.70-13.02; Qwen3 T = 4096 9.70-9.98 ->
// 9.31-9.50; Mixtral (E = 8) unchanged.
__device__ __forceinline__ unsigned same_expert_lanes(int e, int id_bits) {
  if (id_bits < 0) return __match_any_sync(kFullMask, e);
  const unsigned placed = __ballot_sync(kFullMask, e >= 0);
  unsigned same = e >= 0 ? placed : ~placed;
  for (int b = 0; b < id_bits; ++b) {
    const bool bit = (e >> b) & 1;
    const unsigned with_bit = __ballot_sync(kFullMask, bit);
    same &= bit ? with_bit : ~with_bit;
  }
  return same;
}

// Bits of a local expert index below num_local (0 for one expert); -1 selects __match_any_sync
// (MOEKIT_PLAN_MATCH_ANY=1, for A/B timing).
static int rank_id_bits(int num_local) {
  static const int match_any = env_switch("MOEKIT_PLAN_MATCH_ANY", 0);
  if (match_any == 1) return -1;
  int bits = 0;
  while ((1 << bits) < num_local) ++bits;
  return bits;
}

// One step of a warp's ranking, every lane calling it: the rank of this lane's assignment of
// local expert e (-1: none) among the warp's assignments of e so far (count[e] of them, in this
// warp's counters) plus its lower lanes with the same expert; count[e] then advances by the lanes
// of e. No atomics, so the ranks are deterministic. The rank is 0 for e = -1.
__device__ __forceinline__ int rank_in_warp(int *count, int e, int lane, int id_bits) {
  const unsigned same = same_expert_lanes(e, id_bits);
  const unsigned earlier = same & lanemask_lt(lane);
  const int rank = e >= 0 ? count[e] + __popc(earlier) : 0;
  __syncwarp();  // every lane has read count[e] before the group's first lane advances it
  if (e >= 0 && earlier == 0) count[e] += __popc(same);
  __syncwarp();
  return rank;
}

__global__ void __launch_bounds__(kRankWarps * 32)
    rank_kernel(const moekit_plan_params p, const int64_t n_assign, const int num_local, const int n_chunks,
                const int id_bits) {
  extern __shared__ int rank_counts[];  // [kRankWarps][num_local]
  allow_next_grid();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int chunk = blockIdx.x * kRankWarps + warp;
  if (chunk >= n_chunks) return;  // only __syncwarp below: a warp may leave alone
  int *count = rank_counts + (size_t)warp * num_local;
  for (int e = lane; e < num_local; e += 32) count[e] = 0;
  __syncwarp();

  const int64_t begin = (int64_t)chunk * p.chunk;
  const int64_t end = min(begin + p.chunk, n_assign);
  int invalid = 0;
  for (int64_t base = begin; base < end; base += 32 * kRankBatch) {
    int ids[kRankBatch];
#pragma unroll
    for (int b = 0; b < kRankBatch; ++b) {
      const int64_t a = base + b * 32 + lane;
      ids[b] = a < end ? __ldg(p.topk_ids + a) : INT32_MIN;
    }
#pragma unroll
    for (int b = 0; b < kRankBatch; ++b) {
      const int64_t a = base + b * 32 + lane;
      const int e = local_expert(p, ids[b], a < end, invalid);
      const int rank = rank_in_warp(count, e, lane, id_bits);
      if (e >= 0) p.assignment_rank[a] = rank;
    }
  }
  invalid = __reduce_add_sync(kFullMask, invalid);
  if (lane == 0) p.invalid_ids[chunk] = invalid;
  for (int e = lane; e < num_local; e += 32) p.chunk_counts[(int64_t)e * n_chunks + chunk] = count[e];
}

// A lane's share of one expert's chunk counts, held in registers: every load is issued before the
// scan needs any (a loop of load-then-shuffle waited a memory latency per 32 chunks).
constexpr int kScanPerLane = MOEKIT_PLAN_TARGET_CHUNKS / 32;

__global__ void __launch_bounds__(kScanWarps * 32)
    scan_kernel(const moekit_plan_params p, const int num_local, const int n_chunks) {
  allow_next_grid();
  wait_for_previous_grid();  // the rank kernel's chunk counts
  const int lane = threadIdx.x & 31;
  const int e = blockIdx.x * kScanWarps + (threadIdx.x >> 5);
  if (e >= num_local) return;
  int *counts = p.chunk_counts + (int64_t)e * n_chunks;
  const int per = (n_chunks + 31) / 32;  // lane l owns chunks [l * per, (l + 1) * per)
  const int first = lane * per;
  int v[kScanPerLane];
  int sum = 0;
#pragma unroll
  for (int i = 0; i < kScanPerLane; ++i) {
    v[i] = i < per && first + i < n_chunks ? counts[first + i] : 0;
    sum += v[i];
  }
  const int inclusive = warp_inclusive_scan(sum, lane);
  int running = inclusive - sum;
#pragma unroll
  for (int i = 0; i < kScanPerLane; ++i) {
    if (i < per && first + i < n_chunks) counts[first + i] = running;  // first rank of this chunk's rows
    running += v[i];
  }
  if (lane == 31) p.expert_counts[e] = inclusive;
}

using BlockScan = cub::BlockScan<int, kPlaceThreads>;

// offsets[e] = sum over e' < e of round_up(count[e'], align); offsets[num_local] = padded total.
// Each thread owns a contiguous run of experts so one block-wide scan covers any expert count.
__device__ void padded_offsets(const moekit_plan_params &p, int num_local, int *count, int *offsets,
                               BlockScan::TempStorage &tmp) {
  const int per = (num_local + kPlaceThreads - 1) / kPlaceThreads;
  const int first = threadIdx.x * per;
  int local = 0;
  for (int i = 0; i < per; ++i) {
    const int e = first + i;
    if (e < num_local) {
      const int c = p.expert_counts[e];
      count[e] = c;
      local += round_up(c, p.align);
    }
  }
  int running;
  BlockScan(tmp).ExclusiveSum(local, running);
  for (int i = 0; i < per; ++i) {
    const int e = first + i;
    if (e < num_local) {
      offsets[e] = running;
      running += round_up(count[e], p.align);
    }
  }
  if (threadIdx.x == kPlaceThreads - 1) offsets[num_local] = running;
  __syncthreads();
}

// Block 0: the offsets and the tile schedule (tiles cover each expert's real rows only).
__device__ void write_offsets_and_tiles(const moekit_plan_params &p, int num_local, const int *count,
                                        const int *offsets, BlockScan::TempStorage &tmp) {
  for (int e = threadIdx.x; e <= num_local; e += kPlaceThreads) p.expert_offsets[e] = offsets[e];
  const int per = (num_local + kPlaceThreads - 1) / kPlaceThreads;
  const int first = threadIdx.x * per;
  int local = 0;
  for (int i = 0; i < per; ++i) {
    const int e = first + i;
    if (e < num_local) local += (count[e] + p.block_m - 1) / p.block_m;
  }
  int tile, total;
  BlockScan(tmp).ExclusiveSum(local, tile, total);
  for (int i = 0; i < per; ++i) {
    const int e = first + i;
    if (e >= num_local) break;
    const int n = (count[e] + p.block_m - 1) / p.block_m;
    for (int j = 0; j < n; ++j, ++tile) {
      p.tiles[2 * (int64_t)tile] = e;
      p.tiles[2 * (int64_t)tile + 1] = offsets[e] + j * p.block_m;
    }
  }
  if (threadIdx.x == 0) *p.num_tiles = total;
}

__global__ void __launch_bounds__(kPlaceThreads)
    place_kernel(const moekit_plan_params p, const int64_t n_assign, const int num_local, const int n_chunks) {
  extern __shared__ int place_smem[];
  int *count = place_smem;                // [num_local]
  int *offsets = place_smem + num_local;  // [num_local + 1]
  __shared__ BlockScan::TempStorage tmp;
  const int64_t stride = (int64_t)gridDim.x * kPlaceThreads;
  const int64_t tid = (int64_t)blockIdx.x * kPlaceThreads + threadIdx.x;
  // The ids were written before the rank kernel started (a plain stream dependency), so this
  // thread's first id is read before waiting for the scan, and its first rank (the rank kernel's,
  // complete once the scan is) right after: both latencies overlap the offsets' scan.
  const int first_id = tid < n_assign ? __ldg(p.topk_ids + tid) : 0;
  wait_for_previous_grid();  // the scan kernel's expert counts and chunk starts
  const int first_rank = tid < n_assign ? p.assignment_rank[tid] : 0;
  padded_offsets(p, num_local, count, offsets, tmp);
  if (blockIdx.x == 0) write_offsets_and_tiles(p, num_local, count, offsets, tmp);

  for (int64_t a = tid; a < n_assign; a += stride) {
    const bool first = a == tid;
    const int id = first ? first_id : __ldg(p.topk_ids + a);
    int row = -1;
    if (id >= p.expert_begin && id < p.expert_end && id < p.num_experts) {
      const int e = id - p.expert_begin;
      const int chunk = (int)(a / p.chunk);
      row = offsets[e] + p.chunk_counts[(int64_t)e * n_chunks + chunk] + (first ? first_rank : p.assignment_rank[a]);
      p.row_map[row] = (int)a;
    }
    p.inverse_map[a] = row;
  }
  // Padding rows of each segment, then every row past the padded total up to the capacity.
  if (p.align > 1) {
    const int64_t pads = (int64_t)num_local * (p.align - 1);
    for (int64_t f = tid; f < pads; f += stride) {
      const int e = (int)(f / (p.align - 1));
      const int r = offsets[e] + count[e] + (int)(f % (p.align - 1));
      if (r < offsets[e + 1]) p.row_map[r] = -1;
    }
  }
  for (int64_t r = offsets[num_local] + tid; r < p.max_rows; r += stride) p.row_map[r] = -1;
}

}  // namespace plan
}  // namespace moekit

#include "plan_grid.cuh"

// Chunks of at least MOEKIT_PLAN_CHUNK_MIN assignments, at most MOEKIT_PLAN_TARGET_CHUNKS of them.
// Every rank warp clears and writes a counter per local expert and the scan reads num_local *
// n_chunks counts, so a chunk much shorter than num_local costs more than it ranks. H200, plan
// of DeepSeek-V3 (E = 256, k = 8) in us, (chunks aimed for, smallest chunk):
//                  (128, 256)  (256, 128)  (512, 128)  (512, 64)  (1024, 32)
//   T = 128           10.9        10.3        10.3        10.4       10.8
//   T = 4096          13.0        12.8        12.9        16.9       27.6
//   T = 16384         22.7        18.5        21.0        20.9       31.3
// Qwen3 (E = 128) and Mixtral (E = 8) rank the same way (run 21).
extern "C" int64_t moekit_plan_chunk(int64_t assignments) {
  int64_t c = (assignments + MOEKIT_PLAN_TARGET_CHUNKS - 1) / MOEKIT_PLAN_TARGET_CHUNKS;
  c = (c + 31) / 32 * 32;
  return c < MOEKIT_PLAN_CHUNK_MIN ? MOEKIT_PLAN_CHUNK_MIN : c;
}

namespace moekit {
namespace plan {

// Assignments per lane of the one-launch plan, or 0 for the three kernels: MOEKIT_PLAN_GRID=0
// forces the three kernels, 1, 2 or 4 a fixed share per lane (EXPERIMENT, for A/B timing).
static int forced_per_lane() {
  static const int v = env_switch("MOEKIT_PLAN_GRID", -1);
  return v;
}

// The whole plan in one cooperative launch (plan_grid.cuh) when it fits: MOEKIT_ERR_UNSUPPORTED
// when it does not (the caller runs the three kernels).
static moekit_status launch_plan_grid(const moekit_plan_params &p, int64_t n_assign, int num_local, int n_chunks,
                                      cudaStream_t stream) {
  const int forced = forced_per_lane();
  if (forced == 0 || p.grid_barrier == nullptr || n_assign < 1 || num_local > kGridMaxLocal) {
    return MOEKIT_ERR_UNSUPPORTED;
  }
  const int max_ctas = std::min(sm_count(), MOEKIT_PLAN_TARGET_CHUNKS);  // one CTA per SM at most
  // The fewest assignments per lane that keep the grid at <= 32 CTAs: more CTAs load, rank and
  // place in parallel, but every CTA reads every CTA's totals after the barrier. H200, us (run 22;
  // assignments per lane 1 / 2 / 4, three kernels):
  //   DeepSeek-V3 T = 128      8.24 /  9.02 /  9.07   (9.79)
  //   DeepSeek-V3 T = 4096    11.49 / 10.99 / 12.16  (12.42)   32768 assignments
  //   DeepSeek-V3 T = 16384       - / 18.24 / 16.16  (18.46)   131072
  //   Mixtral     T = 16384   10.40 /  9.34 /  9.28   (9.50)   32768
  int per_lane = forced > 0 ? forced : 1;
  while (forced <= 0 && per_lane < kGridMaxPerLane && ceil_div(n_assign, (int64_t)kGridThreads * per_lane) > 32) {
    per_lane *= 2;
  }
  if (per_lane > kGridMaxPerLane) return MOEKIT_ERR_UNSUPPORTED;
  const int64_t rank_ctas = ceil_div(n_assign, (int64_t)kGridThreads * per_lane);
  if (rank_ctas > max_ctas) return MOEKIT_ERR_UNSUPPORTED;
  // Enough CTAs to clear the padding and unused rows at ~16 rows per thread.
  const int64_t clear_ctas = ceil_div(p.max_rows - n_assign, (int64_t)kGridThreads * 16);
  const int ctas = (int)std::max<int64_t>(rank_ctas, std::min<int64_t>(clear_ctas, max_ctas));

  const size_t smem = sizeof(int) * grid_smem_ints(num_local);
  MOEKIT_TRY(allow_dynamic_smem(plan_grid_kernel, smem));
  // UNSUPPORTED when the grid cannot be resident at once: the three kernels instead.
  return launch_cooperative(plan_grid_kernel, dim3((unsigned)ctas), dim3(kGridThreads), smem, stream, p,
                            (int)n_assign, num_local, per_lane, n_chunks, p.grid_barrier, rank_id_bits(num_local));
}

}  // namespace plan
}  // namespace moekit

extern "C" moekit_status moekit_routing_plan(const moekit_plan_params *p, moekit_stream stream) {
  using namespace moekit;
  using namespace moekit::plan;
  if (p == nullptr) return MOEKIT_ERR_INVALID_ARGUMENT;
  const int num_local = p->expert_end - p->expert_begin;
  const int64_t n_assign = p->tokens * p->top_k;
  if (p->tokens < 0 || p->top_k < 1 || num_local < 1 || p->expert_begin < 0 || p->expert_end > p->num_experts ||
      p->align < 1 || p->block_m < 1 || p->chunk != moekit_plan_chunk(n_assign) ||
      p->max_rows < n_assign + (int64_t)num_local * (p->align - 1) || p->max_rows > INT32_MAX) {
    return MOEKIT_ERR_INVALID_ARGUMENT;
  }
  const int n_chunks = (int)ceil_div(n_assign, p->chunk);

  const moekit_status one_launch = launch_plan_grid(*p, n_assign, num_local, n_chunks, stream);
  if (one_launch != MOEKIT_ERR_UNSUPPORTED) return one_launch;

  if (n_chunks > 0) {
    const size_t smem = sizeof(int) * kRankWarps * (size_t)num_local;
    MOEKIT_TRY(allow_dynamic_smem(rank_kernel, smem));
    rank_kernel<<<(unsigned)ceil_div(n_chunks, kRankWarps), kRankWarps * 32, smem, stream>>>(
        *p, n_assign, num_local, n_chunks, rank_id_bits(num_local));
    MOEKIT_TRY_LAUNCH();
  }
  // The scan and place kernels are programmatic dependents: their launch latency overlaps the
  // kernel before them (each waits for its predecessor's writes with griddepcontrol.wait).
  MOEKIT_TRY(launch_dependent(scan_kernel, dim3((unsigned)ceil_div(num_local, kScanWarps)), dim3(kScanWarps * 32), 0,
                              stream, *p, num_local, n_chunks));

  // Enough blocks to place every assignment with one thread each, at least enough to clear the
  // unused rows quickly, and never more than a few waves.
  const int64_t work = std::max<int64_t>(n_assign, p->max_rows - n_assign);
  const int blocks = (int)std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kPlaceThreads), sm_count() * 4));
  const size_t smem = sizeof(int) * (2 * (size_t)num_local + 1);
  MOEKIT_TRY(allow_dynamic_smem(place_kernel, smem));
  MOEKIT_TRY(launch_dependent(place_kernel, dim3(blocks), dim3(kPlaceThreads), smem, stream, *p, n_assign, num_local,
                              n_chunks));
  return MOEKIT_OK;
}
