// Top-k gating fast path for the DeepSeek-V3 rule: 8 lanes per token row, 4 rows per warp.
//
// Applies when E = 256 in 8 groups of 32 (one group per lane), sigmoid scores, group score = sum
// of the top two, weights = the unbiased scores of the chosen experts, no router bias, k <= 8 and
// 2 * topk_group >= k (octet_path_applies). Why: the one-warp-per-row kernel spends ~630 of its
// 1034 warp-instructions per row on cross-lane work (ncu, run 15), paid once per row; here every
// shuffle serves 4 rows and a group's top-two needs none (BENCHMARKS.md, "Not yet measured").
//
// Per row (lane g of the row's octet holds experts [32 g, 32 g + 32)):
//   1. keys = sigmoid(logit) + correction bias (NaN -> -inf, as the warp kernel);
//   2. the group score is the sum of the lane's two largest keys; a group's rank among the 8
//      (larger score first, ties to the lower group) comes from 7 shuffles; kept = rank < topk_group;
//   3. tau = the smallest second-largest key of the kept groups: those 2 * topk_group >= k keys are
//      distinct elements, so the k-th largest kept key is >= tau and every key of the top k is a
//      candidate (key >= tau in a kept group);
//   4. the candidates (usually 8..20) go to shared memory; each one's rank is the number of
//      candidates with a larger key, or an equal key and a lower expert: every key above a top-k
//      candidate is a candidate too, so these are the global ranks, and rank < k is the output
//      slot (descending key, ties to the lower expert, as the reference);
//   5. rows with more than kOctetCap candidates (ties: constant rows, all-NaN rows) make their
//      warp take k selection rounds over the registers instead (uniform control flow per warp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace moekit {
namespace gating {

constexpr int kOctetWarps = 4;
constexpr int kOctetRowsPerWarp = 4;
constexpr int kOctetRowsPerBlock = kOctetWarps * kOctetRowsPerWarp;
constexpr int kOctetCap = 32;  // candidates a row ranks in shared memory
constexpr int kOctetMaxK = 8;  // output slot j belongs to lane j of the octet in the rounds path

inline bool octet_path_applies(const moekit_gating_params &p) {
  auto aligned16 = [](const void *q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return p.num_experts == 256 && p.group_select == MOEKIT_GROUP_SUM_TOP2 && p.n_group == 8 &&
         p.top_k <= kOctetMaxK && 2 * p.topk_group >= p.top_k && p.score_func == MOEKIT_SCORE_SIGMOID &&
         p.weight_source == MOEKIT_WEIGHTS_SCORES && p.router_bias == nullptr && aligned16(p.logits) &&
         (p.correction_bias == nullptr || aligned16(p.correction_bias));
}

// Sum over the 8 lanes of an octet (xor distances below 8 stay inside it).
__device__ __forceinline__ float octet_sum(float v) {
#pragma unroll
  for (int o = 1; o < 8; o <<= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename In>
__global__ void __launch_bounds__(kOctetWarps * 32) topk_gating_octet_kernel(const moekit_gating_params p) {
  // + 8: a dummy slot per lane that the compaction's non-candidates write to (no branch per key;
  // one slot per lane, so racecheck sees no two lanes writing the same word).
  __shared__ float cand_key[kOctetRowsPerBlock][kOctetCap + 8];
  __shared__ int cand_expert[kOctetRowsPerBlock][kOctetCap + 8];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane & 7;  // this lane's group
  const int local_row = warp * kOctetRowsPerWarp + (lane >> 3);
  const int64_t row = (int64_t)blockIdx.x * kOctetRowsPerBlock + local_row;
  const bool live_row = row < p.tokens;  // lanes of rows past the end compute on -inf, store nothing
  const In *logits = static_cast<const In *>(p.logits) + (live_row ? row : 0) * 256;
  const int k = p.top_k;

  // 1. Keys.
  constexpr int kVec = 16 / (int)sizeof(In);
  float key[32];
#pragma unroll
  for (int c = 0; c < 32 / kVec; ++c) {
    Packed<In, kVec> v = ldg(reinterpret_cast<const Packed<In, kVec> *>(logits + 32 * g) + c);
#pragma unroll
    for (int j = 0; j < kVec; ++j) key[c * kVec + j] = live_row ? Dtype<In>::to_f32(v.v[j]) : -INFINITY;
  }
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const float4 b = p.correction_bias != nullptr
                         ? __ldg(reinterpret_cast<const float4 *>(p.correction_bias + 32 * g) + c)
                         : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    key[4 * c] = no_nan(sigmoid(no_nan(key[4 * c])) + b.x);
    key[4 * c + 1] = no_nan(sigmoid(no_nan(key[4 * c + 1])) + b.y);
    key[4 * c + 2] = no_nan(sigmoid(no_nan(key[4 * c + 2])) + b.z);
    key[4 * c + 3] = no_nan(sigmoid(no_nan(key[4 * c + 3])) + b.w);
  }

  // 2. Group score and the kept groups.
  float t1 = -INFINITY, t2 = -INFINITY;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    t2 = fmaxf(t2, fminf(t1, key[i]));
    t1 = fmaxf(t1, key[i]);
  }
  const float group_score = no_nan(t1 + t2);
  int group_rank = 0;
#pragma unroll
  for (int d = 1; d < 8; ++d) {
    const int other = (g + d) & 7;
    const float s = __shfl_sync(kFullMask, group_score, (lane & ~7) | other);
    group_rank += (int)(s > group_score) | ((int)(s == group_score) & (int)(other < g));
  }
  // A row past the end keeps no group: no candidates, nothing chosen.
  const bool kept = live_row && group_rank < p.topk_group;

  // 3. tau and the candidates.
  float tau = kept ? t2 : INFINITY;
#pragma unroll
  for (int o = 1; o < 8; o <<= 1) tau = fminf(tau, __shfl_xor_sync(kFullMask, tau, o));
  int mine = 0;
#pragma unroll
  for (int i = 0; i < 32; ++i) mine += (kept && key[i] >= tau) ? 1 : 0;
  int upto = mine;  // inclusive prefix over the octet
#pragma unroll
  for (int d = 1; d < 8; d <<= 1) {
    const int v = __shfl_up_sync(kFullMask, upto, d, 8);
    if (g >= d) upto += v;
  }
  const int total = __shfl_sync(kFullMask, upto, lane | 7);

  float w_sum_part = 0.0f;
  if (!__any_sync(kFullMask, total > kOctetCap)) {  // (rows past the end have no candidates)
    // 4. Rank the candidates.
    float *ck = cand_key[local_row];
    int *ce = cand_expert[local_row];
    // Branch-free: every key is stored, a non-candidate to the dummy slot (a branch per key was
    // ~16 instructions per key in the SASS).
    int at = upto - mine;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const bool candidate = kept && key[i] >= tau;
      const int slot = candidate ? at : kOctetCap + g;
      ck[slot] = key[i];
      ce[slot] = 32 * g + i;
      at += candidate ? 1 : 0;
    }
    __syncwarp();
    constexpr int kPerLane = kOctetCap / 8;
    float my_key[kPerLane];
    int my_expert[kPerLane], my_rank[kPerLane];
#pragma unroll
    for (int m = 0; m < kPerLane; ++m) {
      const int j = g + 8 * m;
      my_key[m] = j < total ? ck[j] : -INFINITY;
      my_expert[m] = j < total ? ce[j] : 0x7fffffff;
      my_rank[m] = 0;
    }
    for (int d = 0; d < total; ++d) {
      const float kd = ck[d];
      const int ed = ce[d];
#pragma unroll
      for (int m = 0; m < kPerLane; ++m) {
        // Bitwise, not ||: short-circuit evaluation became a branch per comparison.
        my_rank[m] += (int)(kd > my_key[m]) | ((int)(kd == my_key[m]) & (int)(ed < my_expert[m]));
      }
    }
    // 5. Weights of the chosen candidates, renormalized over the row.
    float w[kPerLane];
#pragma unroll
    for (int m = 0; m < kPerLane; ++m) {
      const bool chosen = g + 8 * m < total && my_rank[m] < k;  // total is 0 past the end
      w[m] = chosen ? sigmoid(no_nan(Dtype<In>::to_f32(logits[my_expert[m]]))) : 0.0f;
      w_sum_part += w[m];
    }
    const float w_sum = octet_sum(w_sum_part);
#pragma unroll
    for (int m = 0; m < kPerLane; ++m) {
      const bool chosen = g + 8 * m < total && my_rank[m] < k;
      if (chosen && live_row) {
        float v = p.renormalize ? w[m] / (w_sum + 1e-20f) : w[m];
        v *= p.routed_scaling_factor;
        p.topk_ids[row * k + my_rank[m]] = my_expert[m];
        p.topk_weights[row * k + my_rank[m]] = v;
        if (p.expert_counts != nullptr) atomicAdd(p.expert_counts + my_expert[m], 1);
      }
    }
  } else {
    // Too many candidates in some row of this warp (ties): k rounds over the registers for all
    // four rows. Dead keys are NaN (fmaxf skips them, every comparison with them is false).
#pragma unroll
    for (int i = 0; i < 32; ++i) key[i] = kept ? key[i] : __int_as_float(0x7fc00000);
    int my_pick = 0;
    for (int j = 0; j < k; ++j) {
      float m = __int_as_float(0x7fc00000);
#pragma unroll
      for (int i = 0; i < 32; ++i) m = fmaxf(m, key[i]);
#pragma unroll
      for (int o = 1; o < 8; o <<= 1) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, o));
      int first = 0x7fffffff;
#pragma unroll
      for (int i = 31; i >= 0; --i) first = key[i] == m ? 32 * g + i : first;
#pragma unroll
      for (int o = 1; o < 8; o <<= 1) first = min(first, __shfl_xor_sync(kFullMask, first, o));
      if (g == j) my_pick = first;
#pragma unroll
      for (int i = 0; i < 32; ++i) key[i] = first == 32 * g + i ? __int_as_float(0x7fc00000) : key[i];
    }
    const bool active = live_row && g < k;  // a row past the end picked nothing (my_pick is junk)
    const float w = active ? sigmoid(no_nan(Dtype<In>::to_f32(logits[my_pick]))) : 0.0f;
    const float w_sum = octet_sum(w);
    if (active) {
      float v = p.renormalize ? w / (w_sum + 1e-20f) : w;
      v *= p.routed_scaling_factor;
      p.topk_ids[row * k + g] = my_pick;
      p.topk_weights[row * k + g] = v;
      if (p.expert_counts != nullptr) atomicAdd(p.expert_counts + my_pick, 1);
    }
  }
}

template <typename In>
moekit_status run_octet(const moekit_gating_params &p, moekit_stream stream) {
  const int64_t blocks = ceil_div(p.tokens, kOctetRowsPerBlock);
  if (blocks > 0x7fffffff) return MOEKIT_ERR_UNSUPPORTED;
  topk_gating_octet_kernel<In><<<(unsigned)blocks, kOctetWarps * 32, 0, stream>>>(p);
  return last_launch_status();
}

}  // namespace gating
}  // namespace moekit
