/* Grouped expert GEMM: for every local expert e, Y[rows of e] = X[rows of e] . W[e]^T, in one
 * launch, reading the routing plan's device-side tile schedule (no host synchronization). */
#ifndef MOEKIT_GROUPED_GEMM_H
#define MOEKIT_GROUPED_GEMM_H

#include "common.h"

/* Epilogues. */
#define MOEKIT_EPILOGUE_STORE 0     /* Y = X W^T                                                   */
#define MOEKIT_EPILOGUE_SWIGLU 1    /* W = [gate rows (N/2); up rows (N/2)]: Y[:, j] = silu(g_j) * u_j */
#define MOEKIT_EPILOGUE_ROW_SCALE 2 /* Y[r, :] = row_weights[row_map[r]] * (X W^T)[r, :]           */

/* Implementations. */
#define MOEKIT_GEMM_WGMMA 0  /* persistent warp-specialized TMA + WGMMA kernel (sm_90a) */
#define MOEKIT_GEMM_ORACLE 1 /* simple FMA kernel: the test oracle                       */
/* The WGMMA kernel with its CTA arrangement fixed instead of chosen by the heuristic (tests and
 * A/B timing): single CTAs (folding small last tiles where the heuristic would), or 2-CTA
 * clusters sharing W tiles wherever the kernel has them (single CTAs where no cluster fits). */
#define MOEKIT_GEMM_WGMMA_SINGLE 2
#define MOEKIT_GEMM_WGMMA_PAIRS 3

/* Rows per M tile of the WGMMA kernel: the plan's block_m must equal it. */
#define MOEKIT_GEMM_BLOCK_M 128

typedef struct moekit_grouped_gemm_params {
  const void *x;               /* [x_rows, k] bf16, row-major: permuted activations            */
  const void *w;               /* [num_local, n, k] bf16: each expert's nn.Linear weight [out, in] */
  void *y;                     /* [rows, n_out] out_dtype, n_out = n (n/2 for SWIGLU); rows >= the
                                  plan's row bound (only segment rows are written); 16-byte
                                  aligned (rows are stored in 16-byte chunks)                   */
  const int32_t *tiles;        /* plan: [max_tiles][2] (local expert, first row)               */
  const int32_t *num_tiles;    /* plan: [1]                                                    */
  const int32_t *expert_offsets; /* plan: [num_local + 1]                                      */
  const int32_t *expert_counts;  /* plan: [num_local]                                          */
  const int32_t *row_map;      /* plan: [x_rows] (ROW_SCALE only)                              */
  const float *row_weights;    /* [tokens * top_k] routing weights (ROW_SCALE only)            */
  int32_t *tile_counter;       /* [1] scratch: the launcher zeroes it, the CTAs claim tiles from it */
  float *partials;             /* scratch for split-K, or NULL: [split][rows][n_out] f32 partial
                                  sums, used for one-expert f32 STORE problems whose tiles would
                                  leave most SMs idle (the router GEMM); reduced in split order  */
  int64_t partials_capacity;   /* elements partials holds                                       */
  int64_t x_rows;              /* rows x holds, at least the plan's row bound: TMA reads no further */
  int64_t rows;                /* the last build's row bound (every segment row is below it), <= x_rows */
  int32_t n;                   /* rows of each expert's weight (for SWIGLU: 2 * intermediate)   */
  int32_t k;                   /* reduction dimension, a multiple of 8                          */
  int32_t num_local;
  int32_t max_tiles;
  int32_t block_m;             /* the plan's tile height                                       */
  int32_t epilogue;            /* MOEKIT_EPILOGUE_*                                            */
  int32_t out_dtype;           /* MOEKIT_DTYPE_BF16 or MOEKIT_DTYPE_F32                        */
  int32_t implementation;      /* MOEKIT_GEMM_*                                                */
  int32_t max_ctas;            /* at most this many CTAs of the persistent WGMMA kernel (leaving
                                  SMs to concurrent work, e.g. communication kernels); 0: one per SM */
  int32_t reserved;            /* 0                                                            */
} moekit_grouped_gemm_params;
MOEKIT_STATIC_ASSERT(sizeof(moekit_grouped_gemm_params) == 152, "moekit_grouped_gemm_params layout");

MOEKIT_EXTERN_C moekit_status moekit_grouped_gemm(const moekit_grouped_gemm_params *p, moekit_stream stream);

#endif
