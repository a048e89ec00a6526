// MLA fresh tokens: from kv_a_proj's output row [latent (r) | rope part (d_rope)], write the cache
// row [RMSNorm(latent) * gamma | RoPE(rope part)], one warp per token, in one pass.
//
// Memory-bound: per token 2 * (r + d_rope) bytes read and written (1152 + 1152 B for DeepSeek),
// plus gamma and the position from cache; T = 16384 moves 37.7 MB, ~9 us at 4.25 TB/s.
#include <cuda_bf16.h>

#include <cstdint>

#include "device/launch.cuh"
#include "device/warp.cuh"
#include "moekit.h"

namespace moekit {
namespace mla {

constexpr int kFreshWarps = 8;  // tokens per 256-thread block

__device__ __forceinline__ void unpack8(const uint4 &u, float (&f)[8]) {
  const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __bfloat1622float2(h[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint4 u;
  __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return u;
}

__global__ void __launch_bounds__(32 * kFreshWarps) fresh_tokens_kernel(const moekit_mla_fresh_params p) {
  const int lane = threadIdx.x % 32;
  const int64_t t = (int64_t)blockIdx.x * kFreshWarps + threadIdx.x / 32;
  if (t >= p.tokens) return;
  const int64_t slot = p.slot_mapping != nullptr ? p.slot_mapping[t] : t;
  if (slot < 0 || slot >= p.num_rows) return;
  const __nv_bfloat16 *src = static_cast<const __nv_bfloat16 *>(p.kv_a) + t * p.kv_a_stride;
  __nv_bfloat16 *dst = static_cast<__nv_bfloat16 *>(p.cache) + slot * p.cache_stride;
  const __nv_bfloat16 *gamma = static_cast<const __nv_bfloat16 *>(p.gamma);

  // RMSNorm over the r latent values, 8 per chunk, chunks strided over the lanes. The sum of squares
  // is in f32 (as HF computes it); the second loop re-reads the row from L1.
  const int chunks = p.rank / 8;
  float ss = 0.0f;
  for (int c = lane; c < chunks; c += 32) {
    float f[8];
    unpack8(__ldg(reinterpret_cast<const uint4 *>(src) + c), f);
#pragma unroll
    for (int i = 0; i < 8; ++i) ss = fmaf(f[i], f[i], ss);
  }
  ss = warp_sum(ss);
  const float rstd = rsqrtf(ss / (float)p.rank + p.eps);
  for (int c = lane; c < chunks; c += 32) {
    float f[8], g[8];
    unpack8(__ldg(reinterpret_cast<const uint4 *>(src) + c), f);
    unpack8(__ldg(reinterpret_cast<const uint4 *>(gamma) + c), g);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      // HF order: normalize, round to the input dtype, then scale by the weight.
      const float normalized = __bfloat162float(__float2bfloat16_rn(f[i] * rstd));
      f[i] = g[i] * normalized;
    }
    reinterpret_cast<uint4 *>(dst)[c] = pack8(f);
  }

  // RoPE over the d_rope values after the latent: pair i rotates by position * inv_freq[i]
  // (precise sincosf: positions reach 10^5 radians).
  const int pairs = p.d_rope / 2;
  const float pos = pairs > 0 ? (float)p.positions[t] : 0.0f;
  const __nv_bfloat16 *rs = src + p.rank;
  __nv_bfloat16 *rd = dst + p.rank;
  for (int i = lane; i < pairs; i += 32) {
    const int ia = p.rope_style == MOEKIT_ROPE_NEOX ? i : 2 * i;
    const int ib = p.rope_style == MOEKIT_ROPE_NEOX ? i + pairs : 2 * i + 1;
    float s, c;
    sincosf(pos * p.inv_freq[i], &s, &c);
    c *= p.cos_sin_scale;
    s *= p.cos_sin_scale;
    const float xa = __bfloat162float(rs[ia]);
    const float xb = __bfloat162float(rs[ib]);
    rd[ia] = __float2bfloat16_rn(xa * c - xb * s);
    rd[ib] = __float2bfloat16_rn(xb * c + xa * s);
  }
}

}  // namespace mla
}  // namespace moekit

extern "C" moekit_status moekit_mla_fresh_tokens(const moekit_mla_fresh_params *p, moekit_stream stream) {
  using namespace moekit::mla;
  if (p == nullptr || p->tokens < 0 || p->rank < 8 || p->rank % 8 != 0 || p->d_rope < 0 || p->d_rope % 2 != 0 ||
      p->d_rope > MOEKIT_MLA_MAX_ROPE || p->kv_a == nullptr || p->gamma == nullptr || p->cache == nullptr ||
      (p->d_rope > 0 && p->positions == nullptr) || p->kv_a_stride % 8 != 0 || p->cache_stride % 8 != 0 ||
      (p->rope_style != MOEKIT_ROPE_INTERLEAVED && p->rope_style != MOEKIT_ROPE_NEOX)) {
    return MOEKIT_ERR_INVALID_ARGUMENT;
  }
  if (p->tokens == 0) return MOEKIT_OK;
  const unsigned blocks = (unsigned)moekit::ceil_div(p->tokens, kFreshWarps);
  fresh_tokens_kernel<<<blocks, 32 * kFreshWarps, 0, stream>>>(*p);
  return moekit::last_launch_status();
}
