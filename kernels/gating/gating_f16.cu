// Gating kernels for f16 logits (one file per dtype, so nvcc compiles the dtypes in parallel).
#include "gating_kernel.cuh"

namespace moekit {
namespace gating {
template moekit_status launch<__half>(const moekit_gating_params &, moekit_stream);
}  // namespace gating
}  // namespace moekit
