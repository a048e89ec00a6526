// Approximate f32 math shared by the gating scores and the GEMM's SwiGLU epilogue.
#pragma once

namespace moekit {

// 1 / y via rcp.approx (1 ulp); rcp.approx(inf) = 0. __frcp_rn's rounding fix-up put a branch per
// slot into v2 of the gating kernel, and the IEEE division's check sends a zero dividend to a
// ~100-instruction slow path.
__device__ __forceinline__ float fast_rcp(float y) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
}

// 2^y with denormal results flushed to zero: __expf's non-ftz ex2 adds a range check and two
// fix-up multiplies per value, and a denormal e^-x changes nothing once added to 1.
__device__ __forceinline__ float exp2_ftz(float y) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
}

// 1 / (1 + e^-x) with the fast exponential and reciprocal (a few ulp, far inside the 1e-5 the
// gating tests allow); sigmoid(-inf) = 0.
__device__ __forceinline__ float sigmoid(float x) { return fast_rcp(1.0f + exp2_ftz(x * -1.4426950408889634f)); }

}  // namespace moekit
