/* Multi-head latent attention (DeepSeek-V2/V3): latent-KV decompression and the fresh-token cache
 * write.
 *
 * A latent cache row holds, per token, the RMSNorm'd latent c (r = kv_lora_rank values) followed by
 * the RoPE'd shared key part k_pe (d_rope values). Decompression computes, for every head h,
 *   K[t, h, 0:d_nope]             = c_t . W_UK[h]^T
 *   K[t, h, d_nope:d_nope+d_rope] = k_pe_t                 (the same for every head)
 *   V[t, h, 0:d_v]                = c_t . W_UV[h]^T
 * with kv_b_proj = [H * (d_nope + d_v), r] bf16, per head d_nope W_UK rows then d_v W_UV rows. */
#ifndef MOEKIT_MLA_H
#define MOEKIT_MLA_H

#include "common.h"

/* Implementations of the decompression. */
#define MOEKIT_MLA_WGMMA 0  /* persistent warp-specialized cp.async/TMA + WGMMA kernel (sm_90a) */
#define MOEKIT_MLA_ORACLE 1 /* one thread per output element, f32 FMA: the test oracle       */

/* RoPE styles: which elements of the d_rope part rotate together. */
#define MOEKIT_ROPE_INTERLEAVED 0 /* pairs (2i, 2i+1): DeepSeek's MLA (GPT-J style) */
#define MOEKIT_ROPE_NEOX 1        /* pairs (i, i + d_rope/2)                        */

/* Largest d_rope of the fresh-token kernel (inv_freq holds d_rope / 2 frequencies). */
#define MOEKIT_MLA_MAX_ROPE 128

typedef struct moekit_mla_decompress_params {
  /* Source rows: row i's latent at latent + i * latent_stride (r values), its k_pe at
   * k_pe + i * k_pe_stride (d_rope values); elements, bf16, rows 16-byte aligned. */
  const void *latent;
  const void *k_pe;
  int64_t latent_stride;
  int64_t k_pe_stride;
  int64_t num_rows;           /* rows the source holds; token rows outside [0, num_rows) read as zeros */
  /* Addressing. block_table == NULL: token t reads row t. Otherwise a paged cache of block_size-row
   * blocks: token t of sequence b (cu_seqlens[b] <= t < cu_seqlens[b+1]) sits at position
   * p = seq_starts[b] + t - cu_seqlens[b] and reads row block_table[b][p / block_size] *
   * block_size + p % block_size. Tokens no sequence covers, positions past the table and block
   * ids outside [0, num_rows / block_size) read as zeros. */
  const int32_t *block_table; /* [num_seqs, max_blocks_per_seq] */
  const int32_t *cu_seqlens;  /* [num_seqs + 1] */
  const int32_t *seq_starts;  /* [num_seqs], or NULL for all zeros */
  int32_t *row_src;           /* [tokens] workspace: the source row of each token (-1: zeros) */
  void *gathered;             /* [tokens, r + d_rope] bf16 workspace, or NULL: a paged source's rows copied
                               * contiguous by a gather kernel before the WGMMA kernel reads them by TMA
                               * (NULL: the WGMMA kernel gathers them itself, slower) */
  int32_t num_seqs;
  int32_t max_blocks_per_seq;
  int32_t block_size;
  int32_t _pad0;
  /* Weights and outputs. */
  const void *w;              /* kv_b_proj [heads * (d_nope + d_v), r] bf16, row-major */
  void *k;                    /* K[t, h, c] at k + t * k_token_stride + h * k_head_stride + c, bf16 */
  void *v;                    /* V[t, h, c] at v + t * v_token_stride + h * v_head_stride + c, bf16 */
  int64_t k_token_stride;
  int64_t k_head_stride;
  int64_t v_token_stride;
  int64_t v_head_stride;
  int32_t *tile_counter;      /* [1] workspace: the WGMMA kernel's tile queue */
  int32_t tokens;
  int32_t heads;
  int32_t rank;               /* r = kv_lora_rank */
  int32_t d_nope;
  int32_t d_rope;
  int32_t d_v;
  int32_t implementation;     /* MOEKIT_MLA_* */
  int32_t _pad1;
} moekit_mla_decompress_params;
MOEKIT_STATIC_ASSERT(sizeof(moekit_mla_decompress_params) == 192, "moekit_mla_decompress_params layout");

MOEKIT_EXTERN_C moekit_status moekit_mla_decompress(const moekit_mla_decompress_params *p, moekit_stream stream);

typedef struct moekit_mla_fresh_params {
  const void *kv_a;           /* [tokens, kv_a_stride] bf16: kv_a_proj output, r latent then d_rope rope values */
  const void *gamma;          /* [r] bf16: the latent RMSNorm weight */
  const int64_t *positions;   /* [tokens] RoPE position of each token */
  const int64_t *slot_mapping;/* [tokens] cache row of each token, negative = skip; NULL: token t -> row t */
  void *cache;                /* [num_rows, cache_stride] bf16: normalized latent at columns [0, r), RoPE'd k_pe at [r, r + d_rope) */
  int64_t kv_a_stride;
  int64_t cache_stride;
  int64_t num_rows;           /* slots outside [0, num_rows) are skipped */
  float inv_freq[MOEKIT_MLA_MAX_ROPE / 2]; /* rotation frequency of each pair (radians per position), YaRN applied */
  float cos_sin_scale;        /* multiplies cos and sin (YaRN mscale ratio; 1 for DeepSeek-V3) */
  float eps;                  /* RMSNorm epsilon */
  int32_t tokens;
  int32_t rank;
  int32_t d_rope;
  int32_t rope_style;         /* MOEKIT_ROPE_* */
} moekit_mla_fresh_params;
MOEKIT_STATIC_ASSERT(sizeof(moekit_mla_fresh_params) == 344, "moekit_mla_fresh_params layout");

/* RMSNorm(latent) * gamma (HF order: normalize in f32, round to bf16, then multiply by gamma) and
 * RoPE of the rope part (in f32), written into the cache rows. */
MOEKIT_EXTERN_C moekit_status moekit_mla_fresh_tokens(const moekit_mla_fresh_params *p, moekit_stream stream);

#endif
