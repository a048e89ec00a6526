/* moekit C ABI: one plain-C params struct per kernel family and the extern "C" host launchers.
 *
 * Every launcher takes a pointer to its params struct and a CUDA stream, enqueues its kernels on
 * that stream without synchronizing, and returns a moekit_status:
 *   0                  success;
 *   > 0                a cudaError_t from the launch (moekit_cuda_error_name() names it);
 *   MOEKIT_ERR_*  < 0  arguments the launcher refused (the Rust side validates first, so these
 *                      mean a bug in the caller of the C ABI).
 * bindgen reads this header (and only this header) to generate src/ffi.rs's bindings. */
#ifndef MOEKIT_H
#define MOEKIT_H

#include "moekit/common.h"
#include "moekit/probe.h"
#include "moekit/gating.h"
#include "moekit/permute.h"
#include "moekit/grouped_gemm.h"
#include "moekit/mla.h"

#endif
