/* Types and status codes shared by every moekit launcher. Plain C11 (bindgen reads it). */
#ifndef MOEKIT_COMMON_H
#define MOEKIT_COMMON_H

#include <stdint.h>

#ifdef __cplusplus
#define MOEKIT_EXTERN_C extern "C"
#define MOEKIT_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define MOEKIT_EXTERN_C
#define MOEKIT_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif

/* Bumped whenever a params struct, a launcher signature or a workspace size changes; the Rust side checks that the
 * linked library reports the version its bindings were generated for. */
#define MOEKIT_ABI_VERSION 9

/* A CUDA stream. Same type as cudaStream_t and CUstream (struct CUstream_st *), declared here so
 * that bindgen never has to parse CUDA's headers. */
typedef struct CUstream_st *moekit_stream;

typedef int32_t moekit_status;
#define MOEKIT_OK 0
#define MOEKIT_ERR_INVALID_ARGUMENT (-1)
#define MOEKIT_ERR_UNSUPPORTED (-2)

/* Element types of tensors that cross the ABI. */
#define MOEKIT_DTYPE_F32 0
#define MOEKIT_DTYPE_BF16 1
#define MOEKIT_DTYPE_F16 2

/* The ABI version the library was compiled with. */
MOEKIT_EXTERN_C int32_t moekit_abi_version(void);
/* cudaGetErrorName / cudaGetErrorString of a positive moekit_status; static strings. */
MOEKIT_EXTERN_C const char *moekit_cuda_error_name(int32_t code);
MOEKIT_EXTERN_C const char *moekit_cuda_error_string(int32_t code);

#endif
