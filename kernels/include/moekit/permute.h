/* Token permutation: the device-side routing plan, permute (token rows -> expert-sorted rows) and
 * combine (the weighted sum of each token's expert outputs). No launcher synchronizes with the
 * host: every size a kernel needs at run time is read from device memory, so a whole MoE forward
 * can be captured in a CUDA graph. */
#ifndef MOEKIT_PERMUTE_H
#define MOEKIT_PERMUTE_H

#include "common.h"

/* Assignments (token, slot) ranked per warp in one chunk of the plan's first kernel: at least this many. */
#define MOEKIT_PLAN_CHUNK_MIN 128
/* A plan has at most this many chunks (the chunk_counts and invalid_ids workspaces are sized by it). */
#define MOEKIT_PLAN_TARGET_CHUNKS 256

typedef struct moekit_plan_params {
  const int32_t *topk_ids;    /* [tokens, top_k] expert ids in [0, num_experts) */
  int64_t tokens;
  int32_t top_k;
  int32_t num_experts;
  int32_t expert_begin;       /* local expert range [expert_begin, expert_end): the others are not placed */
  int32_t expert_end;
  int32_t align;              /* each expert's segment is padded to a multiple of align rows */
  int32_t block_m;            /* rows per tile of the tile schedule */
  int64_t chunk;              /* assignments per chunk: moekit_plan_chunk(tokens * top_k) */
  int64_t max_rows;           /* capacity of row_map: tokens*top_k + num_local*(align-1) */
  int64_t max_tiles;          /* capacity of tiles: max_rows/block_m + num_local */
  /* outputs, indexed by local expert e - expert_begin */
  int32_t *expert_counts;     /* [num_local] rows routed to each local expert */
  int32_t *expert_offsets;    /* [num_local + 1] first row of each padded segment; the last entry is the padded total */
  int32_t *row_map;           /* [max_rows] assignment t*top_k+slot of each permuted row, -1 for padding and unused rows */
  int32_t *inverse_map;       /* [tokens*top_k] permuted row of each assignment, -1 when not placed */
  int32_t *tiles;             /* [max_tiles][2] (local expert, first row) of each block_m-row tile */
  int32_t *num_tiles;         /* [1] */
  /* workspace */
  int32_t *chunk_counts;      /* [num_local][num_chunks] */
  int32_t *assignment_rank;   /* [tokens*top_k] rank of an assignment among its chunk's rows of its expert */
  int32_t *invalid_ids;       /* [num_chunks] ids outside [0, num_experts) seen by each chunk */
  uint32_t *grid_barrier;     /* [1] zero before the first build; the one-launch plan's barrier word, which every build leaves as it needs it */
} moekit_plan_params;
MOEKIT_STATIC_ASSERT(sizeof(moekit_plan_params) == 144, "moekit_plan_params layout");

/* Assignments per chunk for n assignments (a multiple of 32, at least MOEKIT_PLAN_CHUNK_MIN). */
MOEKIT_EXTERN_C int64_t moekit_plan_chunk(int64_t assignments);
MOEKIT_EXTERN_C moekit_status moekit_routing_plan(const moekit_plan_params *p, moekit_stream stream);

/* Which kernel moves the rows of permute and combine (field `kernel` of their params). */
#define MOEKIT_COPY_AUTO 0  /* the launcher's choice (see permute.cu / combine.cu for the measurements) */
#define MOEKIT_COPY_WARP 1  /* one warp per token, 16-byte (or narrower) loads and stores: any row */
#define MOEKIT_COPY_BULK 2  /* one block per (token, row chunk), bulk copies through shared memory: rows
                             * 16-byte aligned multiples, no scales; MOEKIT_ERR_UNSUPPORTED otherwise */
#define MOEKIT_COPY_PHASED 3 /* permute only: one cooperative CTA per SM, reads and writes in grid-wide
                              * phases (rows 16-byte aligned multiples, no scales, a grid_barrier word);
                              * MOEKIT_ERR_UNSUPPORTED otherwise, and from combine */

typedef struct moekit_permute_params {
  const void *x;              /* [tokens, row_bytes] token rows */
  void *xp;                   /* [max_rows, row_bytes] permuted rows; rows past the padded total are not written */
  const void *x_scales;       /* [tokens, scale_bytes] per-row scales (FP8), or NULL */
  void *xp_scales;            /* [max_rows, scale_bytes], or NULL */
  const int32_t *inverse_map; /* from the plan */
  const int32_t *expert_counts;
  const int32_t *expert_offsets;
  int64_t tokens;
  int64_t row_bytes;          /* bytes of one row of x */
  int64_t scale_bytes;        /* bytes of one row of scales, 0 without scales */
  int32_t top_k;
  int32_t num_local;
  int32_t align;
  int32_t kernel;             /* MOEKIT_COPY_* */
  uint32_t *grid_barrier;     /* [1] low 31 bits zero before the first use, or NULL (no phased kernel); every
                               * launch leaves it as it needs it; launches sharing a word must not overlap */
} moekit_permute_params;
MOEKIT_STATIC_ASSERT(sizeof(moekit_permute_params) == 104, "moekit_permute_params layout");

/* xp[inverse_map[t*top_k+s]] = x[t] for every placed assignment; padding rows become zeros. */
MOEKIT_EXTERN_C moekit_status moekit_permute(const moekit_permute_params *p, moekit_stream stream);

typedef struct moekit_combine_params {
  const void *y;              /* [rows, hidden] expert outputs in permuted order, y_dtype */
  const float *weights;       /* [tokens, top_k] routing weights, or NULL for a plain sum */
  const void *shared;         /* [tokens, hidden] out_dtype, added to the sum, or NULL */
  const void *residual;       /* [tokens, hidden] out_dtype, added to the sum, or NULL */
  void *out;                  /* [tokens, hidden] out_dtype */
  const int32_t *inverse_map; /* from the plan */
  int64_t tokens;
  int64_t hidden;
  int32_t top_k;
  int32_t y_dtype;            /* MOEKIT_DTYPE_* */
  int32_t out_dtype;          /* MOEKIT_DTYPE_* */
  int32_t kernel;             /* MOEKIT_COPY_* */
} moekit_combine_params;
MOEKIT_STATIC_ASSERT(sizeof(moekit_combine_params) == 80, "moekit_combine_params layout");

/* out[t] = sum over s of weights[t,s] * y[inverse_map[t*top_k+s]] (slots in order, f32
 * accumulation, unplaced slots skipped) + shared[t] + residual[t]. */
MOEKIT_EXTERN_C moekit_status moekit_combine(const moekit_combine_params *p, moekit_stream stream);

#endif
