// ABI version and CUDA error names for the Rust side.
#include "device/launch.cuh"
#include "moekit.h"

extern "C" int32_t moekit_abi_version(void) { return MOEKIT_ABI_VERSION; }

extern "C" const char *moekit_cuda_error_name(int32_t code) { return cudaGetErrorName((cudaError_t)code); }

extern "C" const char *moekit_cuda_error_string(int32_t code) { return cudaGetErrorString((cudaError_t)code); }
