// Top-k gating kernel: one warp per token row.
//
// Cost model (DeepSeek-V3, E = 256, k = 8, f32 logits): the floor is reading T*E*4 bytes once,
// 4 MB at T = 4096 = about 1 us at 4.25 TB/s, so the kernel has to keep the arithmetic per row
// small and many rows in flight. Each lane holds S = E/32 values in registers (S a power of two,
// so every loop over slots unrolls), loaded with 16-byte accesses when the row allows it. Each of
// the k selection rounds is S compares per lane plus one 5-step warp reduction; no sort.
//
// Selection keys are floats mapped to ordered u32 (see order_key); a candidate is the u64
// (key << 32 | ~expert), so one unsigned max picks the highest score and, among equal scores, the
// lowest expert index: reruns are bitwise identical and ties are deterministic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "device/convert.cuh"
#include "device/launch.cuh"
#include "device/load.cuh"
#include "device/warp.cuh"
#include "moekit/gating.h"

namespace moekit {
namespace gating {

constexpr int kWarpsPerBlock = 4;

// Selection keys are compared through the logits themselves when the score is a monotone function
// of the logit alone (no correction bias, no group sums): exact, and cheaper than scoring all E.
enum KeyMode : int { kKeyLogit = 0, kKeyScore = 1 };

// Maps a float to a u32 whose unsigned order is the float order, with -0 == +0. NaN never reaches
// it (callers map NaN to -inf). Every valid key is >= order_key(-inf) = 0x007fffff, so 0 is free to
// mean "never select" (past E, outside the kept groups, or already chosen).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f + 0.0f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ float no_nan(float x) { return isnan(x) ? -INFINITY : x; }

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// exp(x - m) with the limits made explicit: the entries equal to the maximum get 1, so a +inf
// logit takes all the mass (shared with other +inf logits) instead of producing NaN.
__device__ __forceinline__ float softmax_numerator(float x, float m) { return x == m ? 1.0f : expf(x - m); }

// The expert held in slot s of a lane: lanes own V consecutive experts per 32*V-wide chunk, so a
// warp's V-wide loads cover a contiguous stretch of the row.
template <int V>
__device__ __forceinline__ int expert_of(int s, int lane) {
  return ((s / V) * 32 + lane) * V + (s % V);
}

// Score of one (sanitized) logit given the softmax statistics of its row.
__device__ __forceinline__ float score_of(float x, int score_func, float row_max, float row_sum) {
  if (score_func == MOEKIT_SCORE_SOFTMAX) {
    return row_max == -INFINITY ? 0.0f : softmax_numerator(x, row_max) / row_sum;
  }
  if (score_func == MOEKIT_SCORE_SIGMOID) return sigmoid(x);
  return x;
}

template <typename In, int S, int V>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, S <= 32 ? 4 : 1)
    topk_gating_kernel(const moekit_gating_params p, const int key_mode, const bool vector_rows) {
  static_assert(S % V == 0, "slots per lane must be a multiple of the vector width");
  extern __shared__ uint32_t group_smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + warp;
  if (row >= p.tokens) return;  // the whole warp leaves together: no warp-wide call is skipped
  const int E = p.num_experts;
  const In *logits = static_cast<const In *>(p.logits) + row * E;

  // 1. Logits (+ router bias); NaN behaves as -inf everywhere after this point. Rows that are not
  // V-aligned (E % V != 0 or an odd base address) take the same slots with scalar loads: one
  // instantiation serves both, which keeps the fatbin small.
  float x[S];
#pragma unroll
  for (int c = 0; c < S / V; ++c) {
    const int e0 = (c * 32 + lane) * V;
    if (vector_rows && e0 < E) {  // E % V == 0 here: the whole vector is in the row
      const Packed<In, V> pk = ldg(reinterpret_cast<const Packed<In, V> *>(logits + e0));
#pragma unroll
      for (int j = 0; j < V; ++j) x[c * V + j] = Dtype<In>::to_f32(pk.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) x[c * V + j] = e0 + j < E ? Dtype<In>::to_f32(logits[e0 + j]) : -INFINITY;
    }
  }
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int e = expert_of<V>(s, lane);
    if (p.router_bias != nullptr && e < E) x[s] += __ldg(p.router_bias + e);
    x[s] = no_nan(x[s]);
  }

  // 2. Softmax statistics over all E logits (only for the softmax score).
  float row_max = -INFINITY, row_sum = 0.0f;
  if (p.score_func == MOEKIT_SCORE_SOFTMAX) {
    float m = -INFINITY;
#pragma unroll
    for (int s = 0; s < S; ++s) m = fmaxf(m, x[s]);
    row_max = warp_max(m);
    if (row_max != -INFINITY) {
      float acc = 0.0f;
#pragma unroll
      for (int s = 0; s < S; ++s) acc += softmax_numerator(x[s], row_max);
      row_sum = warp_sum(acc);
    }
  }

  // 3. Selection keys.
  uint32_t key[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int e = expert_of<V>(s, lane);
    float k = x[s];
    if (key_mode == kKeyScore) {
      k = score_of(x[s], p.score_func, row_max, row_sum);
      if (p.correction_bias != nullptr && e < E) k += __ldg(p.correction_bias + e);
      k = no_nan(k);
    }
    key[s] = e < E ? order_key(k) : 0u;
  }

  // 4. Group-limited selection: zero the keys of every group that is not among the best topk_group.
  if (p.group_select != MOEKIT_GROUP_NONE && p.n_group > 1) {
    const int n_group = p.n_group;
    const int G = E / n_group;
    uint32_t *row_keys = group_smem + (size_t)warp * (32 * S + 2 * n_group);  // [32*S]
    uint32_t *group_score = row_keys + 32 * S;                               // [n_group]
    uint32_t *kept = group_score + n_group;                                  // [n_group]
#pragma unroll
    for (int s = 0; s < S; ++s) row_keys[expert_of<V>(s, lane)] = key[s];
    __syncwarp();
    for (int g = lane; g < n_group; g += 32) {
      const uint32_t *gk = row_keys + g * G;
      uint32_t score;
      if (p.group_select == MOEKIT_GROUP_MAX) {
        uint32_t m = 0;
        for (int i = 0; i < G; ++i) m = max(m, gk[i]);
        score = m;
      } else {  // sum of the two best, or the one expert of a one-expert group
        float t1 = -INFINITY, t2 = -INFINITY;
        for (int i = 0; i < G; ++i) {
          const float v = key_value(gk[i]);
          if (v > t1) {
            t2 = t1;
            t1 = v;
          } else if (v > t2) {
            t2 = v;
          }
        }
        score = order_key(no_nan(G > 1 ? t1 + t2 : t1));
      }
      group_score[g] = score;
      kept[g] = 0;
    }
    __syncwarp();
    for (int r = 0; r < p.topk_group; ++r) {
      uint64_t best = 0;
      for (int g = lane; g < n_group; g += 32) {
        const uint64_t c = kept[g] ? 0ull : ((uint64_t)group_score[g] << 32) | (uint32_t)~(uint32_t)g;
        best = c > best ? c : best;
      }
      best = warp_max_u64(best);
      if (lane == 0) kept[~(uint32_t)best] = 1;
      __syncwarp();
    }
    if (G >= 32) {
      for (int g = 0; g < n_group; ++g) {
        if (kept[g]) continue;  // kept[] is the same for every lane: a uniform branch
        for (int i = lane; i < G; i += 32) row_keys[g * G + i] = 0;
      }
    } else {
      for (int e = lane; e < E; e += 32) {
        if (!kept[e / G]) row_keys[e] = 0;
      }
    }
    __syncwarp();
#pragma unroll
    for (int s = 0; s < S; ++s) key[s] = row_keys[expert_of<V>(s, lane)];
  }

  // 5. k rounds of warp argmax. Lane j keeps the j-th chosen expert.
  int my_id = 0;
  for (int j = 0; j < p.top_k; ++j) {
    uint32_t best = 0;
    int best_slot = 0;
#pragma unroll
    for (int s = 0; s < S; ++s) {
      if (key[s] > best) {  // strict: the lowest slot (= lowest expert of this lane) wins ties
        best = key[s];
        best_slot = s;
      }
    }
    const uint32_t e_best = (uint32_t)expert_of<V>(best_slot, lane);
    const uint64_t winner = warp_max_u64(((uint64_t)best << 32) | (uint32_t)~e_best);
    const int e_win = (int)~(uint32_t)winner;
    if (lane == j) my_id = e_win;
    const int owner = (e_win / V) & 31;
    const int owner_slot = ((e_win / V) >> 5) * V + (e_win % V);
    if (lane == owner) {
#pragma unroll
      for (int s = 0; s < S; ++s) key[s] = (s == owner_slot) ? 0u : key[s];
    }
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
  if (p.weight_source == MOEKIT_WEIGHTS_SOFTMAX_CHOSEN) {
    const float m = warp_max(xl);
    const float num = (active && m != -INFINITY) ? softmax_numerator(xl, m) : 0.0f;
    const float total = warp_sum(num);
    w = total > 0.0f ? num / total : 0.0f;
  } else if (p.weight_source == MOEKIT_WEIGHTS_SIGMOID_CHOSEN) {
    w = sigmoid(xl);
  } else {
    w = score_of(xl, p.score_func, row_max, row_sum);
  }
  if (!active) w = 0.0f;
  if (p.renormalize) w = w / (warp_sum(w) + 1e-20f);
  w *= p.routed_scaling_factor;
  if (active) {
    p.topk_ids[row * p.top_k + lane] = my_id;
    p.topk_weights[row * p.top_k + lane] = w;
    if (p.expert_counts != nullptr) atomicAdd(p.expert_counts + my_id, 1);
  }
}

// V = 16 bytes of logits per load, or S when a lane holds fewer.
template <typename In, int S>
moekit_status run(const moekit_gating_params &p, int key_mode, bool grouped, moekit_stream stream) {
  constexpr int V = (16 / (int)sizeof(In)) < S ? (16 / (int)sizeof(In)) : S;
  const bool vector_rows =
      p.num_experts % V == 0 && reinterpret_cast<uintptr_t>(p.logits) % (V * sizeof(In)) == 0;
  const size_t smem = grouped ? (size_t)kWarpsPerBlock * (32 * S + 2 * p.n_group) * sizeof(uint32_t) : 0;
  auto kernel = topk_gating_kernel<In, S, V>;
  MOEKIT_TRY(allow_dynamic_smem(kernel, smem));
  const int64_t blocks = ceil_div(p.tokens, kWarpsPerBlock);
  if (blocks > 0x7fffffff) return MOEKIT_ERR_UNSUPPORTED;
  kernel<<<(unsigned)blocks, kWarpsPerBlock * 32, smem, stream>>>(p, key_mode, vector_rows);
  return last_launch_status();
}

// Dispatch on the slots per lane, S = the smallest power of two >= E/32 (at least 4: fewer slots
// would leave 16-bit rows without a vector load and save nothing measurable).
template <typename In>
moekit_status launch(const moekit_gating_params &p, moekit_stream stream) {
  const bool grouped = p.group_select != MOEKIT_GROUP_NONE && p.n_group > 1;
  const int key_mode =
      (p.correction_bias == nullptr && p.group_select != MOEKIT_GROUP_SUM_TOP2) ? kKeyLogit : kKeyScore;
  const int per_lane = (p.num_experts + 31) / 32;
  if (per_lane <= 4) return run<In, 4>(p, key_mode, grouped, stream);
  if (per_lane <= 8) return run<In, 8>(p, key_mode, grouped, stream);
  if (per_lane <= 16) return run<In, 16>(p, key_mode, grouped, stream);
  if (per_lane <= 32) return run<In, 32>(p, key_mode, grouped, stream);
  if (per_lane <= 64) return run<In, 64>(p, key_mode, grouped, stream);
  if (per_lane <= 128) return run<In, 128>(p, key_mode, grouped, stream);
  return MOEKIT_ERR_UNSUPPORTED;
}

}  // namespace gating
}  // namespace moekit
