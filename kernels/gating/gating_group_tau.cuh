// Top-k gating fast path for the DeepSeek-V3 rule: each 32-expert group of a token row is held by
// kLanesPerGroup lanes (4 by default: a warp per row, 8 keys per lane; kGroupTauLanesPerGroup below
// holds the measurements).
//
// Applies when E = 256 in 8 groups of 32, sigmoid scores, group score = sum of the top two,
// weights = the unbiased scores of the chosen experts, no router bias, k <= 8 and
// 2 * topk_group >= k (group_tau_path_applies). Why: the generic one-warp-per-row kernel spends ~630 of
// its 1034 warp-instructions per row on selection rounds (ncu, run 15); here a row needs no rounds.
//
// Per row (lane r of the row holds experts [r * kKeys, (r + 1) * kKeys)):
//   1. keys = sigmoid(logit) + correction bias (NaN -> -inf, as the warp kernel);
//   2. the group score is the sum of the group's two largest keys (each lane's top two, merged over
//      the group's lanes); a group's rank among the 8 (larger score first, ties to the lower
//      group) comes from 7 shuffles; kept = rank < topk_group;
//   3. tau = the smallest second-largest key of the kept groups: those 2 * topk_group >= k keys are
//      distinct elements, so the k-th largest kept key is >= tau and every key of the top k is a
//      candidate (key >= tau in a kept group);
//   4. the candidates (usually 8..20) go to shared memory; each one's rank is the number of
//      candidates with a larger key, or an equal key and a lower expert: every key above a top-k
//      candidate is a candidate too, so these are the global ranks, and rank < k is the output
//      slot (descending key, ties to the lower expert, as the reference);
//   5. rows with more than kGroupTauCap candidates (ties: constant rows, all-NaN rows) make their
//      warp take k selection rounds over the registers instead (uniform control flow per warp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace moekit {
namespace gating {

constexpr int kGroupTauWarps = 4;
constexpr int kGroupTauCap = 32;  // candidates a row ranks in shared memory
constexpr int kGroupTauMaxK = 8;  // output slot j belongs to lane j of the row in the rounds path

inline bool group_tau_path_applies(const moekit_gating_params &p) {
  auto aligned16 = [](const void *q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return p.num_experts == 256 && p.group_select == MOEKIT_GROUP_SUM_TOP2 && p.n_group == 8 &&
         p.top_k <= kGroupTauMaxK && 2 * p.topk_group >= p.top_k && p.score_func == MOEKIT_SCORE_SIGMOID &&
         p.weight_source == MOEKIT_WEIGHTS_SCORES && p.router_bias == nullptr && aligned16(p.logits) &&
         (p.correction_bias == nullptr || aligned16(p.correction_bias));
}

// How a row maps onto lanes: kLanesPerGroup lanes share each 32-expert group, so a row takes
// 8 * kLanesPerGroup lanes and lane r of a row holds experts [r * kKeys, (r + 1) * kKeys).
template <int kLanesPerGroup>
struct GroupTauShape {
  static constexpr int kRowLanes = 8 * kLanesPerGroup;
  static constexpr int kRowsPerWarp = 32 / kRowLanes;
  static constexpr int kRowsPerBlock = kGroupTauWarps * kRowsPerWarp;
  static constexpr int kKeys = 32 / kLanesPerGroup;        // keys per lane
  static constexpr int kPerLane = kGroupTauCap / kRowLanes;   // candidates each lane ranks
  static_assert(kRowLanes >= kGroupTauMaxK, "the rounds path gives output slot j to lane j of the row");
};

// Reduction over the lanes [o_first, ..., kRowLanes) apart inside a row (xor distances below
// kRowLanes stay inside it, rows being aligned to kRowLanes).
template <int kRowLanes, typename T, typename Op>
__device__ __forceinline__ T row_reduce(T v, Op op, int from = 1) {
#pragma unroll
  for (int o = 1; o < kRowLanes; o <<= 1)
    if (o >= from) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

template <typename In, int kLanesPerGroup>
__global__ void __launch_bounds__(kGroupTauWarps * 32) topk_gating_group_tau_kernel(const moekit_gating_params p) {
  using S = GroupTauShape<kLanesPerGroup>;
  constexpr int kKeys = S::kKeys;
  // + kRowLanes: a dummy slot per lane that the compaction's non-candidates write to (no branch per
  // key; one slot per lane, so racecheck sees no two lanes writing the same word).
  // (key, expert) pairs: one 8-byte store per key in the compaction.
  __shared__ float2 cand[S::kRowsPerBlock][kGroupTauCap + S::kRowLanes];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int r = lane % S::kRowLanes;  // this lane's place in its row
  const int g = r / kLanesPerGroup;   // this lane's group
  const int row_base = lane - r;      // the row's first lane
  const int first_expert = r * kKeys;
  const int local_row = warp * S::kRowsPerWarp + lane / S::kRowLanes;
  const int64_t row = (int64_t)blockIdx.x * S::kRowsPerBlock + local_row;
  const bool live_row = row < p.tokens;  // lanes of rows past the end compute on -inf, store nothing
  const In *logits = static_cast<const In *>(p.logits) + (live_row ? row : 0) * 256;
  const int k = p.top_k;
  auto fmax_op = [](float a, float b) { return fmaxf(a, b); };
  auto fmin_op = [](float a, float b) { return fminf(a, b); };

  // 1. Keys.
  constexpr int kVec = 16 / (int)sizeof(In);
  static_assert(kKeys % kVec == 0 && kKeys % 4 == 0, "whole vector loads per lane");
  float key[kKeys];
#pragma unroll
  for (int c = 0; c < kKeys / kVec; ++c) {
    Packed<In, kVec> v = ldg(reinterpret_cast<const Packed<In, kVec> *>(logits + first_expert) + c);
#pragma unroll
    for (int j = 0; j < kVec; ++j) key[c * kVec + j] = live_row ? Dtype<In>::to_f32(v.v[j]) : -INFINITY;
  }
#pragma unroll
  for (int c = 0; c < kKeys / 4; ++c) {
    const float4 b = p.correction_bias != nullptr
                         ? __ldg(reinterpret_cast<const float4 *>(p.correction_bias + first_expert) + c)
                         : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    key[4 * c] = no_nan(sigmoid(no_nan(key[4 * c])) + b.x);
    key[4 * c + 1] = no_nan(sigmoid(no_nan(key[4 * c + 1])) + b.y);
    key[4 * c + 2] = no_nan(sigmoid(no_nan(key[4 * c + 2])) + b.z);
    key[4 * c + 3] = no_nan(sigmoid(no_nan(key[4 * c + 3])) + b.w);
  }

  // 2. Group score (the sum of the group's two largest keys) and the kept groups.
  float t1 = -INFINITY, t2 = -INFINITY;
#pragma unroll
  for (int i = 0; i < kKeys; ++i) {
    t2 = fmaxf(t2, fminf(t1, key[i]));
    t1 = fmaxf(t1, key[i]);
  }
#pragma unroll
  for (int o = 1; o < kLanesPerGroup; o <<= 1) {  // merge the group's lanes' top two
    const float u1 = __shfl_xor_sync(kFullMask, t1, o);
    const float u2 = __shfl_xor_sync(kFullMask, t2, o);
    t2 = fmaxf(fmaxf(t2, u2), fminf(t1, u1));
    t1 = fmaxf(t1, u1);
  }
  const float group_score = no_nan(t1 + t2);
  // Group g ^ d sits kLanesPerGroup * d lanes away (xor stays inside the row): no lane index
  // arithmetic per shuffle.
  int group_rank = 0;
#pragma unroll
  for (int d = 1; d < 8; ++d) {
    const int other = g ^ d;
    const float s = __shfl_xor_sync(kFullMask, group_score, d * kLanesPerGroup);
    group_rank += (int)(s > group_score) | ((int)(s == group_score) & (int)(other < g));
  }
  // A row past the end keeps no group: no candidates, nothing chosen.
  const bool kept = live_row && group_rank < p.topk_group;

  // 3. tau and the candidates. The lanes of a group hold the same t2, so the reduction over
  // groups starts at distance kLanesPerGroup.
  const float tau = row_reduce<S::kRowLanes>(kept ? t2 : INFINITY, fmin_op, kLanesPerGroup);
  int mine = 0;
#pragma unroll
  for (int i = 0; i < kKeys; ++i) mine += (kept && key[i] >= tau) ? 1 : 0;
  int upto = mine;  // inclusive prefix over the row
#pragma unroll
  for (int d = 1; d < S::kRowLanes; d <<= 1) {
    const int v = __shfl_up_sync(kFullMask, upto, d, S::kRowLanes);
    if (r >= d) upto += v;
  }
  const int total = __shfl_sync(kFullMask, upto, row_base + S::kRowLanes - 1);

  if (!__any_sync(kFullMask, total > kGroupTauCap)) {  // (rows past the end have no candidates)
    // 4. Rank the candidates.
    float2 *c = cand[local_row];
    // Branch-free: every key is stored, a non-candidate to the dummy slot (a branch per key was
    // ~16 instructions per key in the SASS).
    int at = upto - mine;
#pragma unroll
    for (int i = 0; i < kKeys; ++i) {
      const bool candidate = kept && key[i] >= tau;
      const int slot = candidate ? at : kGroupTauCap + r;
      c[slot] = make_float2(key[i], __int_as_float(first_expert + i));
      at += candidate ? 1 : 0;
    }
    __syncwarp();
    constexpr int kPerLane = S::kPerLane;
    float my_key[kPerLane];
    int my_expert[kPerLane], my_rank[kPerLane];
#pragma unroll
    for (int m = 0; m < kPerLane; ++m) {
      const int j = r + S::kRowLanes * m;
      const float2 cj = j < total ? c[j] : make_float2(-INFINITY, __int_as_float(0x7fffffff));
      my_key[m] = cj.x;
      my_expert[m] = __float_as_int(cj.y);
      my_rank[m] = 0;
    }
    for (int d = 0; d < total; ++d) {
      const float2 cd = c[d];
      const float kd = cd.x;
      const int ed = __float_as_int(cd.y);
#pragma unroll
      for (int m = 0; m < kPerLane; ++m) {
        // Bitwise, not ||: short-circuit evaluation became a branch per comparison.
        my_rank[m] += (int)(kd > my_key[m]) | ((int)(kd == my_key[m]) & (int)(ed < my_expert[m]));
      }
    }
    // 5. Weights of the chosen candidates, renormalized over the row.
    float w[kPerLane];
    float w_sum_part = 0.0f;
#pragma unroll
    for (int m = 0; m < kPerLane; ++m) {
      const bool chosen = r + S::kRowLanes * m < total && my_rank[m] < k;  // total is 0 past the end
      w[m] = chosen ? sigmoid(no_nan(Dtype<In>::to_f32(logits[my_expert[m]]))) : 0.0f;
      w_sum_part += w[m];
    }
    const float w_sum = row_reduce<S::kRowLanes>(w_sum_part, [](float a, float b) { return a + b; });
    // One approximate reciprocal per row (1 ulp) instead of an IEEE division per weight: its check
    // sends the zero weights of unchosen lanes to a ~100-instruction slow path (gating_kernel.cuh).
    const float w_scale = (p.renormalize ? fast_rcp(w_sum + 1e-20f) : 1.0f) * p.routed_scaling_factor;
#pragma unroll
    for (int m = 0; m < kPerLane; ++m) {
      const bool chosen = r + S::kRowLanes * m < total && my_rank[m] < k;
      if (chosen && live_row) {
        p.topk_ids[row * k + my_rank[m]] = my_expert[m];
        p.topk_weights[row * k + my_rank[m]] = w[m] * w_scale;
        if (p.expert_counts != nullptr) atomicAdd(p.expert_counts + my_expert[m], 1);
      }
    }
  } else {
    // Too many candidates in some row of this warp (ties): k rounds over the registers for all
    // its rows. Dead keys are NaN (fmaxf skips them, every comparison with them is false).
#pragma unroll
    for (int i = 0; i < kKeys; ++i) key[i] = kept ? key[i] : __int_as_float(0x7fc00000);
    int my_pick = 0;
    for (int j = 0; j < k; ++j) {
      float m = __int_as_float(0x7fc00000);
#pragma unroll
      for (int i = 0; i < kKeys; ++i) m = fmaxf(m, key[i]);
      m = row_reduce<S::kRowLanes>(m, fmax_op);
      int first = 0x7fffffff;
#pragma unroll
      for (int i = kKeys - 1; i >= 0; --i) first = key[i] == m ? first_expert + i : first;
      first = row_reduce<S::kRowLanes>(first, [](int a, int b) { return min(a, b); });
      if (r == j) my_pick = first;
#pragma unroll
      for (int i = 0; i < kKeys; ++i) key[i] = first == first_expert + i ? __int_as_float(0x7fc00000) : key[i];
    }
    const bool active = live_row && r < k;  // a row past the end picked nothing (my_pick is junk)
    const float w = active ? sigmoid(no_nan(Dtype<In>::to_f32(logits[my_pick]))) : 0.0f;
    const float w_sum = row_reduce<S::kRowLanes>(w, [](float a, float b) { return a + b; });
    if (active) {
      float v = p.renormalize ? w * fast_rcp(w_sum + 1e-20f) : w;
      v *= p.routed_scaling_factor;
      p.topk_ids[row * k + r] = my_pick;
      p.topk_weights[row * k + r] = v;
      if (p.expert_counts != nullptr) atomicAdd(p.expert_counts + my_pick, 1);
    }
  }
}

// Lanes per 32-expert group. H200, DeepSeek-V3 f32 logits, event-timed medians (run 21; the empty
// kernel is 3.4 us):
//   lanes per group        1      2      4
//   T = 128             6.65   5.35   4.97 us
//   T = 4096            9.27   7.85   7.59
//   T = 16384          20.0   15.6   15.4
//   T = 65536          58.7   43.8   44.1
// One lane per group (109 registers, 4 rows per warp) ran a ~1160-instruction dependent chain per
// warp at 25% occupancy (ncu: 1.06 IPC at T = 4096); a whole warp per row (39 registers) halves
// the chain's length per key and fills the SM. Two lanes per group are as fast only at T = 65536.
constexpr int kGroupTauLanesPerGroup = 4;

template <typename In>
moekit_status run_group_tau(const moekit_gating_params &p, moekit_stream stream) {
  constexpr int kRows = GroupTauShape<kGroupTauLanesPerGroup>::kRowsPerBlock;
  const int64_t blocks = ceil_div(p.tokens, kRows);
  if (blocks > 0x7fffffff) return MOEKIT_ERR_UNSUPPORTED;
  topk_gating_group_tau_kernel<In, kGroupTauLanesPerGroup><<<(unsigned)blocks, kGroupTauWarps * 32, 0, stream>>>(p);
  return last_launch_status();
}

}  // namespace gating
}  // namespace moekit
