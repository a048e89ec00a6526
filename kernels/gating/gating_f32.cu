// Gating kernels for f32 logits (one file per dtype, so nvcc compiles the dtypes in parallel).
#include "gating_kernel.cuh"

namespace moekit {
namespace gating {
template moekit_status launch<float>(const moekit_gating_params &, moekit_stream);
}  // namespace gating
}  // namespace moekit
