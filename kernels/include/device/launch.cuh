// Host-side helpers shared by the launchers: CUDA error -> moekit_status, device properties,
// and the opt-in to more than 48 KB of dynamic shared memory.
#pragma once

#include <cuda_runtime.h>

#include "moekit/common.h"

namespace moekit {

inline moekit_status to_status(cudaError_t e) { return e == cudaSuccess ? MOEKIT_OK : (moekit_status)e; }

// The launch error of the kernel just enqueued (configuration errors; faults surface later).
inline moekit_status last_launch_status() { return to_status(cudaGetLastError()); }

#define MOEKIT_TRY(expr)                                   \
  do {                                                     \
    cudaError_t moekit_err_ = (expr);                      \
    if (moekit_err_ != cudaSuccess) return (moekit_status)moekit_err_; \
  } while (0)

#define MOEKIT_TRY_LAUNCH()                                \
  do {                                                     \
    moekit_status moekit_st_ = ::moekit::last_launch_status(); \
    if (moekit_st_ != MOEKIT_OK) return moekit_st_;        \
  } while (0)

#define MOEKIT_TRY_STATUS(expr)                            \
  do {                                                     \
    moekit_status moekit_st_ = (expr);                     \
    if (moekit_st_ != MOEKIT_OK) return moekit_st_;        \
  } while (0)

// Multiprocessor count of the current device (cached per device; devices never change it).
inline int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 132;
  if (dev < 64 && cached[dev] > 0) return cached[dev];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
  if (dev < 64) cached[dev] = n;
  return n;
}

// Raises a kernel's dynamic shared-memory limit when it needs more than the 48 KB default.
// The attribute belongs to the function in the current context, so it is set on every launch that
// needs it (a cheap host call) rather than cached across devices.
template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace moekit
