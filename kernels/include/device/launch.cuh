// Host-side helpers shared by the launchers: CUDA error -> moekit_status, device properties,
// and the opt-in to more than 48 KB of dynamic shared memory.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>

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

// Lets launches of `kernel` use up to `bytes` of dynamic shared memory. Needed whenever static plus
// dynamic shared memory passes 48 KB. The limit is a property of the function, shared by every
// host thread, so it is always raised to the same value, the most the device allows next to the
// kernel's static shared memory: a per-launch value raced between host threads launching one
// kernel with different sizes (one lowered the limit between another's set and launch, and that
// launch failed with cudaErrorInvalidValue; the parallel plan tests hit it under memcheck).
template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes == 0) return cudaSuccess;
  int dev = 0, optin = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaFuncAttributes attr;
  if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, kernel);
  if (e != cudaSuccess) return e;
  const size_t limit = (size_t)optin > attr.sharedSizeBytes ? (size_t)optin - attr.sharedSizeBytes : 0;
  if (bytes > limit) return cudaErrorInvalidValue;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)limit);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The integer value of a run-time switch (the MOEKIT_* variables the README lists, for A/B
// timing), or `unset` when the variable is absent. Callers cache it in a function-local static:
// read once per process.
inline int env_switch(const char *name, int unset) {
  const char *v = getenv(name);
  return v == nullptr ? unset : atoi(v);
}

// Launches `kernel` with one launch attribute (launch_dependent, launch_cooperative).
template <typename... Params, typename... Args>
inline cudaError_t launch_with_attribute(cudaLaunchAttribute attr, void (*kernel)(Params...), dim3 grid, dim3 block,
                                         size_t smem, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

// Launches `kernel` as a programmatic dependent of the previous kernel on the stream: its blocks
// may be scheduled while that kernel finishes (hiding the launch latency, ~2 us each), and must
// call wait_for_previous_grid() before reading what the previous kernel wrote. Captured into CUDA
// graphs as programmatic edges.
template <typename... Params, typename... Args>
inline cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                    cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr = {};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  return launch_with_attribute(attr, kernel, grid, block, smem, stream, args...);
}

// Launches `kernel` as a cooperative grid, every block resident at once (what a grid barrier,
// grid_barrier.cuh, needs); captured into CUDA graphs like any launch. MOEKIT_ERR_UNSUPPORTED when
// the device cannot hold the grid (an MPS client with fewer SMs, say): the caller runs another
// kernel.
template <typename... Params, typename... Args>
inline moekit_status launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                        cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr = {};
  attr.id = cudaLaunchAttributeCooperative;
  attr.val.cooperative = 1;
  const cudaError_t e = launch_with_attribute(attr, kernel, grid, block, smem, stream, args...);
  if (e == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();
    return MOEKIT_ERR_UNSUPPORTED;
  }
  return to_status(e);
}

// Device side of launch_dependent: blocks until the previous grid has completed and its writes are
// visible. A no-op for kernels launched the ordinary way.
__device__ __forceinline__ void wait_for_previous_grid() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// Lets the next kernel (launched with launch_dependent) start scheduling its blocks now.
__device__ __forceinline__ void allow_next_grid() { asm volatile("griddepcontrol.launch_dependents;" :::); }

}  // namespace moekit
