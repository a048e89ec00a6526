/* Device probes: a 16-byte vectorized device-to-device copy, a row reader with the gating
 * kernels' geometry (the read floor of a gate), and an empty kernel that measures launch
 * overhead. */
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

typedef struct moekit_read_rows_params {
  const void *src;   /* rows * row_bytes bytes of device memory, 16-byte aligned */
  uint32_t *dst;     /* [rows]: the XOR of each row's 32-bit words */
  int64_t rows;
  int32_t row_bytes; /* a multiple of 16, at most MOEKIT_READ_ROWS_MAX_BYTES */
  int32_t _pad0;
} moekit_read_rows_params;
MOEKIT_STATIC_ASSERT(sizeof(moekit_read_rows_params) == 32, "moekit_read_rows_params layout");

/* Longest row of moekit_read_rows: 16 vectors of 16 bytes per lane (a 2048-expert f32 row). */
#define MOEKIT_READ_ROWS_MAX_BYTES 8192

/* The read floor of the gating kernel: one warp per row, four rows per 128-thread block (the
 * gating kernels' geometry), every 16-byte vector of the row loaded at once, dst[row] = the XOR of
 * the row's words. What a gate must at least do (read its logits in that geometry) with no
 * selection at all. rows == 0 launches nothing. */
MOEKIT_EXTERN_C moekit_status moekit_read_rows(const moekit_read_rows_params *p, moekit_stream stream);

/* One thread that spins for `nanoseconds` of device time (%globaltimer). Benchmarks enqueue it
 * before a timed launch so the host's enqueue latency hides behind it and CUDA events time only
 * the device. */
MOEKIT_EXTERN_C moekit_status moekit_busy_wait(uint64_t nanoseconds, moekit_stream stream);

/* One block of 32 threads that does nothing: the floor of any kernel's measured time. */
MOEKIT_EXTERN_C moekit_status moekit_empty_kernel(moekit_stream stream);

#endif
