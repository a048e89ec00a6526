// Conversions between the element types of the C ABI (MOEKIT_DTYPE_*) and f32 in registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace moekit {

template <typename T> struct Dtype;
template <> struct Dtype<float> {
  __device__ __forceinline__ static float to_f32(float v) { return v; }
  __device__ __forceinline__ static float from_f32(float v) { return v; }
};
template <> struct Dtype<__nv_bfloat16> {
  __device__ __forceinline__ static float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Dtype<__half> {
  __device__ __forceinline__ static float to_f32(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_f32(float v) { return __float2half_rn(v); }
};

// N elements of T loaded or stored as one access of N*sizeof(T) bytes (N*sizeof(T) in 1..16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

}  // namespace moekit
