// Read-only global loads of 1..16 bytes as one access, through the non-coherent path: the
// kernels that use them never read memory that the same launch writes.
#pragma once

#include <cstdint>
#include <cstring>

namespace moekit {

template <int Bytes> struct RawWord;
template <> struct RawWord<16> { using type = uint4; };
template <> struct RawWord<8> { using type = uint2; };
template <> struct RawWord<4> { using type = unsigned int; };
template <> struct RawWord<2> { using type = unsigned short; };
template <> struct RawWord<1> { using type = unsigned char; };

// Loads sizeof(T) bytes (a power of two up to 16) from p, which must be aligned to sizeof(T).
template <typename T>
__device__ __forceinline__ T ldg(const T *p) {
  using W = typename RawWord<sizeof(T)>::type;
  W w = __ldg(reinterpret_cast<const W *>(p));
  T v;
  memcpy(&v, &w, sizeof(T));
  return v;
}

// Stores sizeof(T) bytes (a power of two up to 16) to p, aligned to sizeof(T).
template <typename T>
__device__ __forceinline__ void st(T *p, const T &v) {
  using W = typename RawWord<sizeof(T)>::type;
  W w;
  memcpy(&w, &v, sizeof(T));
  *reinterpret_cast<W *>(p) = w;
}

// st() with the streaming cache hint (st.global.cs: evict-first in L2), for data written once and
// not read again by the same kernel.
template <typename T>
__device__ __forceinline__ void st_streaming(T *p, const T &v) {
  using W = typename RawWord<sizeof(T)>::type;
  W w;
  memcpy(&w, &v, sizeof(T));
  __stcs(reinterpret_cast<W *>(p), w);
}

}  // namespace moekit
