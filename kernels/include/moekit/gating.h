/* Top-k gating: the MoE router's scoring, (group-limited) expert selection and routing weights,
 * one warp per token, in one launch. */
#ifndef MOEKIT_GATING_H
#define MOEKIT_GATING_H

#include "common.h"

/* Score function applied to every logit. */
#define MOEKIT_SCORE_SOFTMAX 0 /* softmax over all E logits of the token */
#define MOEKIT_SCORE_SIGMOID 1 /* sigmoid of each logit */
#define MOEKIT_SCORE_NONE 2    /* the logit itself */

/* Group-limited selection: keep topk_group of n_group equal groups of experts, then pick the
 * top k among the kept groups. */
#define MOEKIT_GROUP_NONE 0     /* no group limit */
#define MOEKIT_GROUP_MAX 1      /* group score = max selection score in the group (DeepSeek-V2) */
#define MOEKIT_GROUP_SUM_TOP2 2 /* group score = sum of the top two (DeepSeek-V3) */

/* Where the routing weights come from. */
#define MOEKIT_WEIGHTS_SCORES 0          /* unbiased scores of the chosen experts */
#define MOEKIT_WEIGHTS_SOFTMAX_CHOSEN 1  /* softmax over the chosen logits (top-k then softmax) */
#define MOEKIT_WEIGHTS_SIGMOID_CHOSEN 2  /* sigmoid of each chosen logit (Llama-4) */

/* The largest expert count and top-k the kernel supports. */
#define MOEKIT_GATING_MAX_EXPERTS 4096
#define MOEKIT_GATING_MAX_TOPK 32

typedef struct moekit_gating_params {
  const void *logits;             /* [tokens, num_experts] row-major, logits_dtype */
  const float *router_bias;       /* [num_experts] added to the logits, or NULL (gpt-oss) */
  const float *correction_bias;   /* [num_experts] added to the scores for selection only, or NULL */
  int32_t *topk_ids;              /* [tokens, top_k] chosen experts, descending selection score */
  float *topk_weights;            /* [tokens, top_k] routing weights */
  int32_t *expert_counts;         /* [num_experts] histogram of topk_ids, or NULL; zeroed by the launcher */
  int64_t tokens;
  int32_t num_experts;            /* 1 ..= MOEKIT_GATING_MAX_EXPERTS */
  int32_t top_k;                  /* 1 ..= min(num_experts, MOEKIT_GATING_MAX_TOPK) */
  int32_t logits_dtype;           /* MOEKIT_DTYPE_* */
  int32_t score_func;             /* MOEKIT_SCORE_* */
  int32_t group_select;           /* MOEKIT_GROUP_* */
  int32_t n_group;                /* divides num_experts; 1 when group_select is NONE */
  int32_t topk_group;             /* 1 ..= n_group */
  int32_t weight_source;          /* MOEKIT_WEIGHTS_* */
  int32_t renormalize;            /* 1: weights /= (sum of the k weights + 1e-20) */
  float routed_scaling_factor;    /* multiplies the weights last */
} moekit_gating_params;
MOEKIT_STATIC_ASSERT(sizeof(moekit_gating_params) == 96, "moekit_gating_params layout");

MOEKIT_EXTERN_C moekit_status moekit_topk_gating(const moekit_gating_params *p, moekit_stream stream);

#endif
