//! CPU reference of MLA: paged-cache addressing, latent-KV decompression (f64) and the fresh-token
//! cache write (f64 with the kernel's documented bf16 roundings).

use half::bf16;

use crate::mla::{MlaDims, RopeConfig, RopeStyle};

/// f64 → bf16, correctly rounded (to nearest, ties to even). `half`'s `bf16::from_f64` truncates
/// the f64 to 32 bits first, which turns values just above a tie into ties (1 + 2⁻⁸ + 2⁻³⁰ → 1.0).
/// Here the f64 goes to f32 with round-to-odd (truncate, then set the last bit if anything was
/// dropped), which keeps the final f32 → bf16 rounding exact.
pub fn round_bf16(x: f64) -> f32 {
    let mut f = x as f32;
    if f.is_finite() && f as f64 != x {
        if (f as f64).abs() > x.abs() {
            f = f32::from_bits(f.to_bits() - 1); // one step toward zero: the truncation
        }
        f = f32::from_bits(f.to_bits() | 1);
    }
    bf16::from_f32(f).to_f32()
}

/// The cache row each of `tokens` output tokens reads under the paged addressing of
/// [`crate::mla::PagedCache`], or `None` where the tables do not map it (such tokens decompress to
/// zeros). `cu_seqlens` must be non-decreasing.
pub fn paged_rows(
    cu_seqlens: &[i32],
    seq_starts: Option<&[i32]>,
    block_table: &[i32],
    max_blocks_per_seq: usize,
    block_size: usize,
    num_blocks: usize,
    tokens: usize,
) -> Vec<Option<usize>> {
    let num_seqs = cu_seqlens.len().saturating_sub(1);
    (0..tokens as i64)
        .map(|t| {
            let b = (0..num_seqs)
                .find(|&b| i64::from(cu_seqlens[b]) <= t && t < i64::from(cu_seqlens[b + 1]))?;
            let start = seq_starts.map_or(0, |s| i64::from(s[b]));
            let pos = start + t - i64::from(cu_seqlens[b]);
            if pos < 0 || pos as usize / block_size >= max_blocks_per_seq {
                return None;
            }
            let pos = pos as usize;
            let block = block_table[b * max_blocks_per_seq + pos / block_size];
            if block < 0 || block as usize >= num_blocks {
                return None;
            }
            Some(block as usize * block_size + pos % block_size)
        })
        .collect()
}

/// Gathers `width` values at column `offset` of each listed row of `source` (rows of `row_len`)
/// into `[rows.len(), width]`; `None` rows are zeros.
pub fn gather_rows(
    source: &[f32],
    row_len: usize,
    rows: &[Option<usize>],
    offset: usize,
    width: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; rows.len() * width];
    for (t, row) in rows.iter().enumerate() {
        if let Some(row) = row {
            let src = &source[row * row_len + offset..row * row_len + offset + width];
            out[t * width..(t + 1) * width].copy_from_slice(src);
        }
    }
    out
}

/// Decompression in f64: from `latent [T, r]`, `k_pe [T, d_rope]` and `kv_b_proj
/// [H·(d_nope + d_v), r]` (bf16 values as f32), returns `K [T, H, d_nope + d_rope]` and
/// `V [T, H, d_v]`, dense.
pub fn decompress(
    dims: &MlaDims,
    latent: &[f32],
    k_pe: &[f32],
    kv_b_proj: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let (h_n, r, nope, rope, dv) = (
        dims.heads,
        dims.kv_lora_rank,
        dims.qk_nope_head_dim,
        dims.qk_rope_head_dim,
        dims.v_head_dim,
    );
    let tokens = latent.len() / r;
    let kd = nope + rope;
    let mut k = vec![0.0f64; tokens * h_n * kd];
    let mut v = vec![0.0f64; tokens * h_n * dv];
    let dot = |c: &[f32], w_row: usize| -> f64 {
        let w = &kv_b_proj[w_row * r..(w_row + 1) * r];
        c.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum()
    };
    for t in 0..tokens {
        let c = &latent[t * r..(t + 1) * r];
        for h in 0..h_n {
            let w0 = h * (nope + dv);
            let kk = &mut k[(t * h_n + h) * kd..(t * h_n + h + 1) * kd];
            for (j, out) in kk[..nope].iter_mut().enumerate() {
                *out = dot(c, w0 + j);
            }
            for (j, out) in kk[nope..].iter_mut().enumerate() {
                *out = k_pe[t * rope + j] as f64;
            }
            for j in 0..dv {
                v[(t * h_n + h) * dv + j] = dot(c, w0 + nope + j);
            }
        }
    }
    (k, v)
}

/// The cache rows `[T, r + d_rope]` the fresh-token kernel writes for `kv_a [T, r + d_rope]`
/// (bf16 values as f32), `gamma [r]` and `positions [T]`: RMSNorm with the sum in f64, the
/// normalized value rounded to bf16 before the γ multiply (Hugging Face's order), and RoPE with the
/// angle `f32(position) · inv_freq` formed in f32 (as DeepSeek's and the kernel's tables are) and
/// the rotation in f64. Every value is rounded to bf16.
pub fn fresh_tokens(
    dims: &MlaDims,
    kv_a: &[f32],
    gamma: &[f32],
    positions: &[i64],
    eps: f32,
    rope: &RopeConfig,
) -> Vec<f32> {
    let (r, d_rope, row) = (dims.kv_lora_rank, dims.qk_rope_head_dim, dims.cache_row());
    let tokens = kv_a.len() / row;
    let inv_freq = rope.inv_freq(d_rope);
    let scale = rope.cos_sin_scale() as f64;
    let pairs = d_rope / 2;
    let mut out = vec![0.0f32; tokens * row];
    for t in 0..tokens {
        let x = &kv_a[t * row..(t + 1) * row];
        let o = &mut out[t * row..(t + 1) * row];
        let mean = x[..r].iter().map(|&v| v as f64 * v as f64).sum::<f64>() / r as f64;
        let rstd = 1.0 / (mean + eps as f64).sqrt();
        for i in 0..r {
            let normalized = round_bf16(x[i] as f64 * rstd) as f64;
            o[i] = round_bf16(gamma[i] as f64 * normalized);
        }
        let pos = positions[t] as f32;
        for (i, &f) in inv_freq.iter().enumerate() {
            let (ia, ib) = match rope.style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::NeoX => (i, i + pairs),
            };
            let angle = (pos * f) as f64;
            let (s, c) = (angle.sin() * scale, angle.cos() * scale);
            let (xa, xb) = (x[r + ia] as f64, x[r + ib] as f64);
            o[r + ia] = round_bf16(xa * c - xb * s);
            o[r + ib] = round_bf16(xb * c + xa * s);
        }
    }
    out
}
