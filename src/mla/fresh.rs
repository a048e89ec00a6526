//! Fresh tokens: `kv_a_proj` output rows → normalized, rotated cache rows, in one kernel.

use cudarc::driver::{CudaStream, CudaView, DevicePtr, DevicePtrMut};
use half::bf16;

use super::{MlaDims, RopeConfig, RopeStyle, MAX_ROPE};
use crate::context::{check_aligned16, check_status, prepare_launch, raw_stream};
use crate::error::{Error, Result};
use crate::ffi;

/// The new tokens: `kv_a_proj` output and positions.
#[derive(Debug)]
pub struct FreshTokens<'a> {
    /// `[tokens, kv_a_stride]` bf16: per token `r` latent values then `d_rope` rope values.
    pub kv_a: CudaView<'a, bf16>,
    /// Elements between consecutive rows (≥ r + d_rope, a multiple of 8).
    pub kv_a_stride: usize,
    /// `[tokens]` i64: each token's position (the RoPE angle is `position · inv_freq`).
    pub positions: CudaView<'a, i64>,
    /// Tokens to write.
    pub tokens: usize,
}

/// The latent's RMSNorm (`kv_a_layernorm`).
#[derive(Debug)]
pub struct LatentNorm<'a> {
    /// `[r]` bf16 weight γ.
    pub gamma: CudaView<'a, bf16>,
    /// Epsilon (1e-6 for DeepSeek).
    pub eps: f32,
}

/// Writes the cache rows of fresh tokens on `stream`: for token `t`,
/// `row[0:r] = γ · bf16(latent_t · rsqrt(mean(latent_t²) + eps))` (Hugging Face's order: normalize
/// in f32, round, then scale) and `row[r:r + d_rope] = RoPE(rope_t, positions[t])` (in f32).
///
/// `cache` is viewed as rows of `r + d_rope` bf16 values (a contiguous `[T, r + d_rope]` cache or a
/// paged `[num_blocks, block_size, r + d_rope]` one). Token `t` goes to row `slots[t]` (i64; a
/// negative slot skips the token, as do slots past the cache), or to row `t` with `slots = None`.
/// Other rows keep their contents.
pub fn write_fresh_tokens(
    stream: &CudaStream,
    dims: &MlaDims,
    input: &FreshTokens<'_>,
    norm: &LatentNorm<'_>,
    rope: &RopeConfig,
    cache: &mut impl DevicePtrMut<bf16>,
    slots: Option<&CudaView<'_, i64>>,
) -> Result<()> {
    dims.validate()?;
    let (r, d_rope, row) = (dims.kv_lora_rank, dims.qk_rope_head_dim, dims.cache_row());
    let tokens = input.tokens;
    if tokens > i32::MAX as usize {
        return Err(Error::unsupported(
            format!("{tokens} tokens"),
            "2^31 - 1 per call",
        ));
    }
    if d_rope > MAX_ROPE {
        return Err(Error::unsupported(
            format!("d_rope = {d_rope}"),
            MAX_ROPE.to_string(),
        ));
    }
    if input.kv_a_stride < row || input.kv_a_stride % 8 != 0 {
        return Err(Error::invalid(
            "kv_a_stride",
            format!(
                "{}; must be ≥ r + d_rope = {row} and a multiple of 8",
                input.kv_a_stride
            ),
        ));
    }
    let kv_a_need = if tokens == 0 {
        0
    } else {
        (tokens - 1) * input.kv_a_stride + row
    };
    if input.kv_a.len() < kv_a_need {
        return Err(Error::shape(
            "kv_a",
            format!(
                "at least {kv_a_need} elements ([{tokens}, {}])",
                input.kv_a_stride
            ),
            input.kv_a.len(),
        ));
    }
    if input.positions.len() < tokens {
        return Err(Error::shape(
            "positions",
            format!("at least {tokens}"),
            input.positions.len(),
        ));
    }
    if norm.gamma.len() != r {
        return Err(Error::shape("gamma", r, norm.gamma.len()));
    }
    if !(norm.eps.is_finite() && norm.eps >= 0.0) {
        return Err(Error::invalid(
            "eps",
            format!("{}; must be finite and ≥ 0", norm.eps),
        ));
    }
    if !(rope.base.is_finite() && rope.base > 1.0) {
        return Err(Error::invalid(
            "rope.base",
            format!("{}; must be > 1", rope.base),
        ));
    }
    if let Some(y) = &rope.yarn {
        let positive = y.factor.is_finite()
            && y.factor > 0.0
            && y.beta_fast > 0.0
            && y.beta_slow > 0.0
            && y.original_max_position > 0;
        if !positive {
            return Err(Error::invalid(
                "rope.yarn",
                format!("{y:?}: factor, betas and original_max_position must be positive"),
            ));
        }
    }
    if cache.len() % row != 0 {
        return Err(Error::shape(
            "cache",
            format!("rows of r + d_rope = {row} elements"),
            cache.len(),
        ));
    }
    let num_rows = cache.len() / row;
    match slots {
        Some(s) if s.len() < tokens => {
            return Err(Error::shape("slots", format!("at least {tokens}"), s.len()))
        }
        None if num_rows < tokens => {
            return Err(Error::shape(
                "cache",
                format!("at least {tokens} rows of {row} (one per token without slots)"),
                format!("{num_rows} rows"),
            ))
        }
        _ => {}
    }

    let mut inv_freq = [0.0f32; MAX_ROPE / 2];
    for (slot, f) in inv_freq.iter_mut().zip(rope.inv_freq(d_rope)) {
        *slot = f;
    }
    prepare_launch(stream)?;
    let (kv_a_ptr, _g0) = input.kv_a.device_ptr(stream);
    let (gamma_ptr, _g1) = norm.gamma.device_ptr(stream);
    let (pos_ptr, _g2) = input.positions.device_ptr(stream);
    let slot_ptr = slots.map(|s| s.device_ptr(stream));
    let (cache_ptr, _g3) = cache.device_ptr_mut(stream);
    for (name, ptr) in [
        ("kv_a", kv_a_ptr),
        ("gamma", gamma_ptr),
        ("cache", cache_ptr),
    ] {
        check_aligned16(name, ptr)?;
    }
    let params = ffi::moekit_mla_fresh_params {
        kv_a: kv_a_ptr as *const _,
        gamma: gamma_ptr as *const _,
        positions: pos_ptr as *const i64,
        slot_mapping: crate::context::ptr_or_null(&slot_ptr) as *const i64,
        cache: cache_ptr as *mut _,
        kv_a_stride: input.kv_a_stride as i64,
        cache_stride: row as i64,
        num_rows: num_rows as i64,
        inv_freq,
        cos_sin_scale: rope.cos_sin_scale(),
        eps: norm.eps,
        tokens: tokens as i32,
        rank: r as i32,
        d_rope: d_rope as i32,
        rope_style: match rope.style {
            RopeStyle::Interleaved => ffi::MOEKIT_ROPE_INTERLEAVED,
            RopeStyle::NeoX => ffi::MOEKIT_ROPE_NEOX,
        } as i32,
    };
    // SAFETY: kv_a holds `tokens` rows of kv_a_stride >= r + d_rope elements, positions and
    // slots `tokens` entries, gamma r, all checked above; the kernel writes only rows in
    // [0, num_rows) of the cache (num_rows whole rows) and skips other slots; kv_a, gamma and the
    // cache are 16-byte aligned with strides that are multiples of 8 elements.
    let status = unsafe { ffi::moekit_mla_fresh_tokens(&params, raw_stream(stream)) };
    check_status(status, "launching the MLA fresh-token kernel")
}
