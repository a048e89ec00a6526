// C entry point of the gating family: re-checks the arguments (the Rust side validates first) and
// dispatches on the logits dtype to the instantiations in gating_{f32,bf16,f16}.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device/launch.cuh"
#include "moekit.h"

namespace moekit {
namespace gating {
template <typename In>
moekit_status launch(const moekit_gating_params &p, moekit_stream stream);
extern template moekit_status launch<float>(const moekit_gating_params &, moekit_stream);
extern template moekit_status launch<__nv_bfloat16>(const moekit_gating_params &, moekit_stream);
extern template moekit_status launch<__half>(const moekit_gating_params &, moekit_stream);

static bool valid(const moekit_gating_params &p) {
  const int E = p.num_experts;
  if (E < 1 || E > MOEKIT_GATING_MAX_EXPERTS || p.tokens < 0) return false;
  if (p.top_k < 1 || p.top_k > E || p.top_k > MOEKIT_GATING_MAX_TOPK) return false;
  if (p.tokens > 0 && (p.logits == nullptr || p.topk_ids == nullptr || p.topk_weights == nullptr)) return false;
  if (p.group_select != MOEKIT_GROUP_NONE) {
    if (p.n_group < 1 || E % p.n_group != 0 || p.topk_group < 1 || p.topk_group > p.n_group) return false;
    if (p.top_k > p.topk_group * (E / p.n_group)) return false;
  }
  return true;
}
}  // namespace gating
}  // namespace moekit

extern "C" moekit_status moekit_topk_gating(const moekit_gating_params *p, moekit_stream stream) {
  using namespace moekit;
  if (p == nullptr || !gating::valid(*p)) return MOEKIT_ERR_INVALID_ARGUMENT;
  if (p->expert_counts != nullptr) {
    MOEKIT_TRY(cudaMemsetAsync(p->expert_counts, 0, sizeof(int32_t) * p->num_experts, stream));
  }
  if (p->tokens == 0) return MOEKIT_OK;
  switch (p->logits_dtype) {
    case MOEKIT_DTYPE_F32: return gating::launch<float>(*p, stream);
    case MOEKIT_DTYPE_BF16: return gating::launch<__nv_bfloat16>(*p, stream);
    case MOEKIT_DTYPE_F16: return gating::launch<__half>(*p, stream);
    default: return MOEKIT_ERR_INVALID_ARGUMENT;
  }
}
