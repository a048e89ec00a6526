/* Device bandwidth probe: a 16-byte vectorized device-to-device copy, and an empty kernel that
 * measures launch overhead. */
#ifndef MOEKIT_PROBE_H
#define MOEKIT_PROBE_H

#include "common.h"

typedef struct moekit_copy_params {
  const void *src; /* n_bytes bytes of device memory */
  void *dst;       /* n_bytes bytes of device memory, not overlapping src */
  uint64_t n_bytes;
} moekit_copy_params;
MOEKIT_STATIC_ASSERT(sizeof(moekit_copy_params) == 24, "moekit_copy_params layout");

/* dst[i] = src[i] for i < n_bytes. 16-byte loads and stores when both pointers are 16-byte
 * aligned, otherwise byte copies. n_bytes == 0 launches nothing. */
MOEKIT_EXTERN_C moekit_status moekit_copy_bytes(const moekit_copy_params *p, moekit_stream stream);

/* One thread that spins for `nanoseconds` of device time (%globaltimer). Benchmarks enqueue it
 * before a timed launch so the host's enqueue latency hides behind it and CUDA events time only
 * the device. */
MOEKIT_EXTERN_C moekit_status moekit_busy_wait(uint64_t nanoseconds, moekit_stream stream);

/* One block of 32 threads that does nothing: the floor of any kernel's measured time. */
MOEKIT_EXTERN_C moekit_status moekit_empty_kernel(moekit_stream stream);

#endif
