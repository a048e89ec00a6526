// Top-k gating kernel: one warp per token row.
//
// Cost model (DeepSeek-V3, E = 256, k = 8, f32 logits): the floor is reading T*E*4 bytes once,
// 4 MB at T = 4096 = about 1 us at 4.25 TB/s, so the kernel must keep the instructions per row
// few: at T = 16384 the 12 us target leaves ~190 issue cycles per row per SM. Each lane holds
// S = E/32 values in registers (S a power of two, so every loop over slots unrolls), loaded with
// 16-byte accesses when the row allows it.
//
// Selection: a float score is mapped to an ordered u32 (order_key) so one `redux.sync` finds the
// warp's maximum, and a second `redux.sync` over candidate expert ids picks the lowest expert among
// equal maxima: exact, deterministic, ties to the lower index. The rounds run over a filtered set:
// tau = the k-th largest lane maximum bounds the k-th largest key from below, so every key >= tau
// is a candidate and the top k are among them; the (usually 8..20) candidates are compacted into
// shared memory, 2 per lane, and each one's rank (larger key first, ties to the lower expert) is
// counted by a loop over the candidates; a few shapes keep k redux rounds over them instead
// (Shape::rank_select). Rows with more than 64 candidates (many ties) take the unfiltered rounds.
// Measured (H200, DeepSeek-V3 rule, T = 16384, ncu): v1 (64-bit shuffle rounds) 3 ns/row;
// v2 (redux rounds over all slots) 1111 instructions/row, 28.4 us.
//
// Group-limited selection has a register fast path when each group is a power-of-two run of lanes
// within one chunk (DeepSeek-V3: 32 experts per group = 8 lanes x 4 f32 slots): group scores are
// butterfly reductions within those lanes. Other group shapes stage the keys in shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "device/convert.cuh"
#include "device/fast_math.cuh"
#include "device/launch.cuh"
#include "device/load.cuh"
#include "device/warp.cuh"
#include "moekit/gating.h"

namespace moekit {
namespace gating {

constexpr int kWarpsPerBlock = 4;
// The register group path keeps a score, a group id and a flag per chunk: past 8 chunks per lane
// (E > 1024 f32) that pushed the 128-slot kernel to 255 registers and spills, so wider rows stage
// their keys in shared memory instead.
constexpr int kMaxRegisterGroupChunks = 8;

// Selection keys are the logits themselves when the score is a monotone function of the logit
// alone (no correction bias, no group sums): exact, and no score needs computing for selection.
enum KeyMode : int { kKeyLogit = 0, kKeyScore = 1 };

// Launch-time facts the kernel branches on (uniform across the grid).
struct Shape {
  int key_mode;
  int vector_rows;   // rows and biases start V-aligned: 16-byte loads
  int group_lanes;   // > 0: register group path, lanes per group; 0: shared-memory path or no groups
  int grouped;       // group-limited selection applies
  int rank_select;   // filtered candidates ranked by a loop over them instead of k redux rounds
  int skip_softmax_stats;  // softmax scores renormalized over the chosen: the row's sum cancels
};

// Maps a float to a u32 whose unsigned order is the float order, with -0 == +0. NaN never reaches
// it (callers map NaN to -inf). Every valid key is >= order_key(-inf) = 0x007fffff, so 0 is free to
// mean "never select" (past E, outside the kept groups, or already chosen).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f + 0.0f);
  return u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// fmaxf returns the other operand when one is NaN: one FMNMX instead of a compare and a select
// (no fast-math here, so the compiler keeps it).
__device__ __forceinline__ float no_nan(float x) { return fmaxf(x, -INFINITY); }

// exp(x - m) with the limits made explicit: entries equal to the maximum get 1, so a +inf logit
// takes all the mass (shared with other +inf logits) instead of producing NaN.
__device__ __forceinline__ float softmax_numerator(float x, float m) { return x == m ? 1.0f : __expf(x - m); }

// The expert held in slot s of a lane: lanes own V consecutive experts per 32*V-wide chunk, so a
// warp's V-wide loads cover a contiguous stretch of the row.
template <int V>
__device__ __forceinline__ int expert_of(int s, int lane) {
  return ((s / V) * 32 + lane) * V + (s % V);
}

// row_inv = 1 / (sum of the softmax numerators); 0 when the row has no logit above -inf.
__device__ __forceinline__ float score_of(float x, int score_func, float row_max, float row_inv) {
  if (score_func == MOEKIT_SCORE_SOFTMAX) {
    return row_max == -INFINITY ? 0.0f : softmax_numerator(x, row_max) * row_inv;
  }
  if (score_func == MOEKIT_SCORE_SIGMOID) return sigmoid(x);
  return x;
}

// V consecutive f32 of a bias vector starting at e0 (all < E), 16-byte loads when aligned.
template <int V>
__device__ __forceinline__ void load_bias(const float *bias, int e0, int E, bool vector_ok, float (&out)[V]) {
  if (vector_ok && e0 < E) {
#pragma unroll
    for (int h = 0; h < (V + 3) / 4; ++h) {
      if constexpr (V >= 4) {
        const float4 b = __ldg(reinterpret_cast<const float4 *>(bias + e0) + h);
        out[4 * h] = b.x;
        out[4 * h + 1] = b.y;
        out[4 * h + 2] = b.z;
        out[4 * h + 3] = b.w;
      }
    }
    if constexpr (V < 4) {
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = __ldg(bias + e0 + j);
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = e0 + j < E ? __ldg(bias + e0 + j) : 0.0f;
  }
}

// Group scores from keys staged in shared memory: any group size.
template <int S, int V>
__device__ void select_groups_smem(const moekit_gating_params &p, uint32_t (&key)[S], uint32_t *row_keys, int lane) {
  const int n_group = p.n_group;
  const int G = p.num_experts / n_group;
  uint32_t *group_score = row_keys + 32 * S;  // [n_group]
  uint32_t *kept = group_score + n_group;     // [n_group]
#pragma unroll
  for (int s = 0; s < S; ++s) row_keys[expert_of<V>(s, lane)] = key[s];
  __syncwarp();
  for (int g = lane; g < n_group; g += 32) {
    const uint32_t *gk = row_keys + g * G;
    uint32_t t1 = 0, t2 = 0;  // the two largest keys of the group
    for (int i = 0; i < G; ++i) {
      const uint32_t v = gk[i];
      t2 = max(t2, min(t1, v));
      t1 = max(t1, v);
    }
    group_score[g] = p.group_select == MOEKIT_GROUP_MAX
                         ? t1
                         : order_key(no_nan(G > 1 ? key_value(t1) + key_value(t2) : key_value(t1)));
    kept[g] = 0;
  }
  __syncwarp();
  for (int r = 0; r < p.topk_group; ++r) {
    uint32_t best = 0;
    for (int g = lane; g < n_group; g += 32) best = max(best, kept[g] ? 0u : group_score[g]);
    const uint32_t m = __reduce_max_sync(kFullMask, best);
    uint32_t cand = 0xffffffffu;
    for (int g = lane; g < n_group; g += 32) {
      if (!kept[g] && group_score[g] == m) cand = min(cand, (uint32_t)g);
    }
    const uint32_t gw = __reduce_min_sync(kFullMask, cand);
    if (lane == 0) kept[gw] = 1;
    __syncwarp();
  }
  for (int e = lane; e < p.num_experts; e += 32) {
    if (!kept[e / G]) row_keys[e] = 0;
  }
  __syncwarp();
#pragma unroll
  for (int s = 0; s < S; ++s) key[s] = row_keys[expert_of<V>(s, lane)];
}

// Group scores in registers when a group is `lanes` (a power of two <= 32) consecutive lanes of
// one chunk and there are at most 32 groups: lane L of chunk c belongs to group (c*32 + L) / lanes.
// Each group's top-2 comes from a butterfly within its lanes; then lane g holds group g's score and
// topk_group rounds of redux pick the kept groups; a ballot turns them into a bit mask.
template <int S, int V>
__device__ __forceinline__ void select_groups_lanes(const moekit_gating_params &p, uint32_t (&key)[S], int lanes,
                                                    int lane) {
  constexpr int C = S / V;
  const int shift = __ffs(lanes) - 1;        // lanes is a power of two: division by it is a shift
  const int per_chunk = 32 >> shift;         // groups per chunk
  uint32_t score[C];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    uint32_t t1 = 0, t2 = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const uint32_t v = key[c * V + j];
      t2 = max(t2, min(t1, v));
      t1 = max(t1, v);
    }
    for (int o = 1; o < lanes; o <<= 1) {  // every lane of the group gets the group's top two
      const uint32_t u1 = __shfl_xor_sync(kFullMask, t1, o);
      const uint32_t u2 = __shfl_xor_sync(kFullMask, t2, o);
      t2 = max(max(t2, u2), min(t1, u1));
      t1 = max(t1, u1);
    }
    const int G = lanes * V;
    score[c] = p.group_select == MOEKIT_GROUP_MAX
                   ? t1
                   : order_key(no_nan(G > 1 ? key_value(t1) + key_value(t2) : key_value(t1)));
  }
  // Lane g fetches group g's score from the first lane of that group.
  const int src_chunk = lane / per_chunk;
  const int src_lane = (lane % per_chunk) << shift;
  uint32_t mine = 0;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const uint32_t v = __shfl_sync(kFullMask, score[c], src_lane);
    if (c == src_chunk) mine = v;
  }
  const bool real = lane < p.n_group;
  bool kept = false;
  for (int r = 0; r < p.topk_group; ++r) {
    const uint32_t m = __reduce_max_sync(kFullMask, real && !kept ? mine : 0u);
    const uint32_t gw = __reduce_min_sync(kFullMask, real && !kept && mine == m ? (uint32_t)lane : 0xffffffffu);
    kept = kept || (uint32_t)lane == gw;
  }
  const unsigned kept_mask = __ballot_sync(kFullMask, kept);
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const bool keep = (kept_mask >> (((c * 32 + lane) >> shift) & 31)) & 1u;
#pragma unroll
    for (int j = 0; j < V; ++j) key[c * V + j] = keep ? key[c * V + j] : 0u;
  }
}

// k rounds over every slot: the warp's largest key, then the lowest expert holding it. Slot offsets
// (expert - lane*V) are compile-time constants: comparing against them keeps the per-slot expert
// ids out of registers (hoisted, they pushed the 128-slot kernel into spills).
template <int S, int V>
__device__ __forceinline__ int select_topk_all_slots(uint32_t (&key)[S], int k, int lane) {
  const uint32_t lane_base = (uint32_t)(lane * V);
  int my_id = 0;
  for (int j = 0; j < k; ++j) {
    uint32_t lane_max = key[0];
#pragma unroll
    for (int s = 1; s < S; ++s) lane_max = max(lane_max, key[s]);
    const uint32_t m = __reduce_max_sync(kFullMask, lane_max);
    uint32_t offset = 0xffffffffu;
#pragma unroll
    for (int s = S - 1; s >= 0; --s) offset = key[s] == m ? (uint32_t)expert_of<V>(s, 0) : offset;
    const uint32_t winner = __reduce_min_sync(kFullMask, offset == 0xffffffffu ? offset : offset + lane_base);
    if (lane == j) my_id = (int)winner;
    const uint32_t winner_offset = winner - lane_base;  // a slot offset only in the owner lane
#pragma unroll
    for (int s = 0; s < S; ++s) key[s] = winner_offset == (uint32_t)expert_of<V>(s, 0) ? 0u : key[s];
  }
  return my_id;
}

constexpr int kMaxCandidates = 64;  // 2 per lane

// The filtered selection (see the header). Returns false, leaving `key` untouched, when more than
// kMaxCandidates keys reach tau; the caller then runs select_topk_all_slots.
template <int S, int V>
__device__ __forceinline__ bool select_topk_filtered(const uint32_t (&key)[S], int k, int lane, uint32_t *cand_key,
                                                     uint32_t *cand_expert, int &my_id, bool rank_select) {
  uint32_t lane_max = key[0];
#pragma unroll
  for (int s = 1; s < S; ++s) lane_max = max(lane_max, key[s]);
  // tau = the k-th largest lane maximum (0 when fewer than k lanes hold a live key).
  uint32_t work = lane_max, tau = 0;
  for (int found = 0; found < k;) {
    const uint32_t m = __reduce_max_sync(kFullMask, work);
    tau = m;
    if (m == 0) break;
    const unsigned tied = __ballot_sync(kFullMask, work == m);
    found += __popc(tied);
    work = work == m ? 0u : work;
  }
  const uint32_t threshold = max(tau, 1u);  // 0 marks dead keys, never candidates
  int mine = 0;
#pragma unroll
  for (int s = 0; s < S; ++s) mine += key[s] >= threshold;
  const int total = (int)__reduce_add_sync(kFullMask, (unsigned)mine);
  if (total > kMaxCandidates) return false;
  int at = warp_inclusive_scan(mine, lane) - mine;
  const uint32_t lane_base = (uint32_t)(lane * V);
#pragma unroll
  for (int s = 0; s < S; ++s) {
    if (key[s] >= threshold) {
      cand_key[at] = key[s];
      cand_expert[at] = lane_base + (uint32_t)expert_of<V>(s, 0);
      ++at;
    }
  }
  __syncwarp();
  uint32_t k0 = lane < total ? cand_key[lane] : 0u;
  uint32_t k1 = lane + 32 < total ? cand_key[lane + 32] : 0u;
  const uint32_t e0 = lane < total ? cand_expert[lane] : 0xffffffffu;
  const uint32_t e1 = lane + 32 < total ? cand_expert[lane + 32] : 0xffffffffu;
  if (rank_select) {
    // Each candidate's rank = the candidates with a larger key, or an equal key and a lower expert:
    // independent loads and compares, no warp-wide reduction in the chain.
    int r0 = 0, r1 = 0;
    for (int d = 0; d < total; ++d) {
      const uint32_t kd = cand_key[d];
      const uint32_t ed = cand_expert[d];
      r0 += (int)(kd > k0) | ((int)(kd == k0) & (int)(ed < e0));
      r1 += (int)(kd > k1) | ((int)(kd == k1) & (int)(ed < e1));
    }
    __syncwarp();  // every lane has read the candidates before slot r's expert overwrites them
    if (lane < total && r0 < k) cand_expert[r0] = e0;
    if (lane + 32 < total && r1 < k) cand_expert[r1] = e1;
    __syncwarp();
    if (lane < k) my_id = (int)cand_expert[lane];
    return true;
  }
  __syncwarp();  // the buffers are reused by the next row of this warp only after every lane read
  for (int j = 0; j < k; ++j) {
    const uint32_t m = __reduce_max_sync(kFullMask, max(k0, k1));
    const uint32_t c = min(k0 == m ? e0 : 0xffffffffu, k1 == m ? e1 : 0xffffffffu);
    const uint32_t winner = __reduce_min_sync(kFullMask, c);
    if (lane == j) my_id = (int)winner;
    k0 = e0 == winner ? 0u : k0;
    k1 = e1 == winner ? 0u : k1;
  }
  return true;
}

template <typename In, int S, int V>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, S <= 32 ? 4 : 1)
    topk_gating_kernel(const moekit_gating_params p, const Shape shape) {
  static_assert(S % V == 0, "slots per lane must be a multiple of the vector width");
  constexpr int C = S / V;
  extern __shared__ uint32_t group_smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + warp;
  if (row >= p.tokens) return;  // the whole warp leaves together: no warp-wide call is skipped
  const int E = p.num_experts;
  const In *logits = static_cast<const In *>(p.logits) + row * E;

  // 1. Logits (+ router bias); NaN behaves as -inf from here on. Rows that are not V-aligned take
  // the same slots with scalar loads: one instantiation serves both, keeping the fatbin small.
  // One register array: the logits as float bits, then the selection keys in place (separate arrays
  // pushed the 128-slot kernel past 255 registers).
  uint32_t key[S];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int e0 = (c * 32 + lane) * V;
    if (shape.vector_rows && e0 < E) {  // E % V == 0 here: the whole vector is in the row
      const Packed<In, V> pk = ldg(reinterpret_cast<const Packed<In, V> *>(logits + e0));
#pragma unroll
      for (int j = 0; j < V; ++j) key[c * V + j] = __float_as_uint(Dtype<In>::to_f32(pk.v[j]));
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) key[c * V + j] = __float_as_uint(e0 + j < E ? Dtype<In>::to_f32(logits[e0 + j]) : -INFINITY);
    }
    if (p.router_bias != nullptr) {
      float b[V];
      load_bias<V>(p.router_bias, e0, E, shape.vector_rows, b);
#pragma unroll
      for (int j = 0; j < V; ++j) key[c * V + j] = __float_as_uint(__uint_as_float(key[c * V + j]) + b[j]);
    }
  }
#pragma unroll
  for (int s = 0; s < S; ++s) key[s] = __float_as_uint(no_nan(__uint_as_float(key[s])));

  // 2. Softmax statistics over all E logits (only for the softmax score). The row maximum is a
  // 32-bit integer max of ordered keys: one redux.sync.
  float row_max = -INFINITY, row_inv = 0.0f;
  if (p.score_func == MOEKIT_SCORE_SOFTMAX && !shape.skip_softmax_stats) {
    uint32_t m = 0;
#pragma unroll
    for (int s = 0; s < S; ++s) m = max(m, order_key(__uint_as_float(key[s])));
    row_max = key_value(__reduce_max_sync(kFullMask, m));
    if (row_max != -INFINITY) {
      float acc = 0.0f;
#pragma unroll
      for (int s = 0; s < S; ++s) acc += softmax_numerator(__uint_as_float(key[s]), row_max);
      row_inv = 1.0f / warp_sum(acc);
    }
  }

  // 3. Selection keys; slots past E get 0 (never selected). The mode branches sit outside the slot
  // loops: v2's per-slot branches on the score function cost ~25% of its instructions.
  if (shape.key_mode == kKeyLogit) {
#pragma unroll
    for (int s = 0; s < S; ++s) key[s] = order_key(__uint_as_float(key[s]));
  } else {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int e0 = (c * 32 + lane) * V;
      float corr[V];
#pragma unroll
      for (int j = 0; j < V; ++j) corr[j] = 0.0f;
      if (p.correction_bias != nullptr) load_bias<V>(p.correction_bias, e0, E, shape.vector_rows, corr);
      if (p.score_func == MOEKIT_SCORE_SIGMOID) {
#pragma unroll
        for (int j = 0; j < V; ++j) key[c * V + j] = order_key(no_nan(sigmoid(__uint_as_float(key[c * V + j])) + corr[j]));
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          key[c * V + j] = order_key(no_nan(score_of(__uint_as_float(key[c * V + j]), p.score_func, row_max, row_inv) + corr[j]));
        }
      }
    }
  }
#pragma unroll
  for (int s = 0; s < S; ++s) key[s] = expert_of<V>(s, lane) < E ? key[s] : 0u;

  // 4. Group-limited selection: zero the keys of every group not among the best topk_group.
  if (shape.grouped) {
    bool done = false;
    if constexpr (C <= kMaxRegisterGroupChunks) {
      if (shape.group_lanes > 0) {
        select_groups_lanes<S, V>(p, key, shape.group_lanes, lane);
        done = true;
      }
    }
    if (!done) select_groups_smem<S, V>(p, key, group_smem + (size_t)warp * (32 * S + 2 * p.n_group), lane);
  }

  // 5. Top k: filtered rounds, or rounds over every slot when too many keys tie. Lane j keeps the
  // j-th chosen expert.
  __shared__ uint32_t cand_smem[kWarpsPerBlock][2][kMaxCandidates];
  // E > 2048 (S = 128) skips the filter: with it the 128-slot kernel spilled (4 bytes), and no
  // production model comes near that many experts.
  int my_id = 0;
  if (S == 128 || !select_topk_filtered<S, V>(key, p.top_k, lane, cand_smem[warp][0], cand_smem[warp][1], my_id, shape.rank_select)) {
    my_id = select_topk_all_slots<S, V>(key, p.top_k, lane);
  }

  // 6. Weights of the chosen experts, lane j for the j-th.
  const bool active = lane < p.top_k;
  float xl = -INFINITY;
  if (active) {
    xl = Dtype<In>::to_f32(logits[my_id]);
    if (p.router_bias != nullptr) xl += __ldg(p.router_bias + my_id);
    xl = no_nan(xl);
  }
  float w;
  // A softmax over the chosen already sums to 1 (or is all 0): renormalizing it again would cost a
  // warp sum and a reciprocal per row to move each weight by an ulp at most.
  const bool softmax_over_chosen = p.weight_source == MOEKIT_WEIGHTS_SOFTMAX_CHOSEN || shape.skip_softmax_stats;
  if (softmax_over_chosen) {
    const float m = key_value(__reduce_max_sync(kFullMask, order_key(xl)));
    const float num = (active && m != -INFINITY) ? softmax_numerator(xl, m) : 0.0f;
    const float total = warp_sum(num);
    w = total > 0.0f ? num * fast_rcp(total) : 0.0f;
  } else if (p.weight_source == MOEKIT_WEIGHTS_SIGMOID_CHOSEN) {
    w = sigmoid(xl);
  } else {
    w = score_of(xl, p.score_func, row_max, row_inv);
  }
  if (!active) w = 0.0f;
  // Multiplying by an approximate reciprocal (1 ulp) instead of dividing: the IEEE division's
  // check sends a zero dividend (every lane past k) to its ~100-instruction slow path, and ncu
  // (run 21) counted that call once per row.
  if (p.renormalize && !softmax_over_chosen) w *= fast_rcp(warp_sum(w) + 1e-20f);
  w *= p.routed_scaling_factor;
  if (active) {
    p.topk_ids[row * p.top_k + lane] = my_id;
    p.topk_weights[row * p.top_k + lane] = w;
    if (p.expert_counts != nullptr) atomicAdd(p.expert_counts + my_id, 1);
  }
}

// V = 16 bytes of logits per load, or S when a lane holds fewer.
template <typename In, int S>
moekit_status run(const moekit_gating_params &p, moekit_stream stream) {
  constexpr int V = (16 / (int)sizeof(In)) < S ? (16 / (int)sizeof(In)) : S;
  auto aligned = [](const void *ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; };
  Shape shape;
  shape.grouped = p.group_select != MOEKIT_GROUP_NONE && p.n_group > 1;
  shape.key_mode =
      (p.correction_bias == nullptr && !(shape.grouped && p.group_select == MOEKIT_GROUP_SUM_TOP2)) ? kKeyLogit
                                                                                                     : kKeyScore;
  const size_t bias_align = V * sizeof(float) >= 16 ? 16 : V * sizeof(float);
  shape.vector_rows = p.num_experts % V == 0 && aligned(p.logits, V * sizeof(In)) &&
                      (p.router_bias == nullptr || aligned(p.router_bias, bias_align)) &&
                      (p.correction_bias == nullptr || aligned(p.correction_bias, bias_align));
  // Ranking the filtered candidates by a loop over them (no warp reduction in the chain) against
  // k rounds of two redux.sync each. H200, f32, T = 4096, rounds -> ranks with the softmax
  // statistics skipped as well (run 21): Qwen3 8.42 -> 7.87 us, DeepSeek-V3 softmax T = 16384
  // 22.3 -> 19.9, E = 1024 k = 8 18.0 -> 15.6, E = 2048 k = 16 34.8 -> 28.8; only E = 64 k = 16
  // was slower (10.0 -> 10.5), so rows of <= 128 experts choosing more than 8 keep the rounds.
  shape.rank_select = !(p.num_experts <= 128 && p.top_k > 8);
  // Softmax scores renormalized over the chosen experts equal a softmax over the chosen logits:
  // the row's sum cancels, and the renormalization's 1e-20 is negligible next to the chosen sum,
  // which holds the row's top score (>= 1/E) when no group limit applies. Skipping the row's
  // exp-and-sum saved 2-7% (E = 1024: 16.0 -> 14.0 us).
  shape.skip_softmax_stats = p.score_func == MOEKIT_SCORE_SOFTMAX && p.weight_source == MOEKIT_WEIGHTS_SCORES &&
                             p.renormalize && shape.key_mode == kKeyLogit && !shape.grouped;
  shape.group_lanes = 0;
  if (shape.grouped) {
    const int G = p.num_experts / p.n_group;
    const int lanes = G / V;
    if (G % V == 0 && lanes >= 1 && lanes <= 32 && (lanes & (lanes - 1)) == 0 && S / V <= kMaxRegisterGroupChunks &&
        p.n_group <= 32) {
      shape.group_lanes = lanes;
    }
  }
  const size_t smem = shape.grouped && shape.group_lanes == 0
                          ? (size_t)kWarpsPerBlock * (32 * S + 2 * p.n_group) * sizeof(uint32_t)
                          : 0;
  auto kernel = topk_gating_kernel<In, S, V>;
  MOEKIT_TRY(allow_dynamic_smem(kernel, smem));
  const int64_t blocks = ceil_div(p.tokens, kWarpsPerBlock);
  if (blocks > 0x7fffffff) return MOEKIT_ERR_UNSUPPORTED;
  kernel<<<(unsigned)blocks, kWarpsPerBlock * 32, smem, stream>>>(p, shape);
  return last_launch_status();
}

}  // namespace gating
}  // namespace moekit

#include "gating_group_tau.cuh"

namespace moekit {
namespace gating {

// The DeepSeek-V3 rule takes the group-tau kernel (gating_group_tau.cuh); everything else dispatches on
// the slots per lane, S = the smallest power of two >= E/32 (at least 4: fewer slots would leave
// 16-bit rows without a vector load and save nothing measurable).
template <typename In>
moekit_status launch(const moekit_gating_params &p, moekit_stream stream) {
  if (group_tau_path_applies(p)) return run_group_tau<In>(p, stream);
  const int per_lane = (p.num_experts + 31) / 32;
  if (per_lane <= 4) return run<In, 4>(p, stream);
  if (per_lane <= 8) return run<In, 8>(p, stream);
  if (per_lane <= 16) return run<In, 16>(p, stream);
  if (per_lane <= 32) return run<In, 32>(p, stream);
  if (per_lane <= 64) return run<In, 64>(p, stream);
  if (per_lane <= 128) return run<In, 128>(p, stream);
  return MOEKIT_ERR_UNSUPPORTED;
}

}  // namespace gating
}  // namespace moekit
