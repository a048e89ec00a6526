//! Multi-head latent attention (DeepSeek-V2/V3): latent-KV decompression and the fresh-token cache
//! write.
//!
//! An MLA cache row holds, per token, the RMSNorm'd latent `c` (`r` = `kv_lora_rank` values) then the
//! RoPE'd shared key part `k_pe` (`d_rope` values): `r + d_rope` bf16 values (576 for DeepSeek).
//!
//! - [`decompress`] turns latent rows (contiguous, or gathered from a paged cache through a block
//!   table) into per-head keys and values in one fused kernel:
//!   `K[t, h] = [c_t · W_UK[h]ᵀ ‖ k_pe_t]` (`d_nope + d_rope` values, `k_pe` broadcast to every head)
//!   and `V[t, h] = c_t · W_UV[h]ᵀ` (`d_v` values), with `kv_b_proj` `[H·(d_nope + d_v), r]` holding,
//!   per head, its `d_nope` W_UK rows then its `d_v` W_UV rows (the checkpoint layout).
//! - [`write_fresh_tokens`] turns `kv_a_proj` output rows `[latent ‖ rope part]` into cache rows:
//!   `RMSNorm(latent)·γ` and RoPE (interleaved or NeoX, YaRN frequencies) of the rope part.
//!
//! The CPU references are in [`crate::reference::mla`].

mod decompress;
mod fresh;

pub use decompress::{decompress, DecompressProblem, LatentSource, MlaWorkspace, PagedCache};
pub use fresh::{write_fresh_tokens, FreshTokens, LatentNorm};

use crate::error::{Error, Result};

/// Head dimension `d_nope` = `d_v` the WGMMA kernel is built for.
pub const WGMMA_HEAD_DIM: usize = 128;
/// Largest `d_rope` the WGMMA kernel copies (a multiple of 8).
pub const WGMMA_MAX_ROPE: usize = 64;
/// Largest `d_rope` of the fresh-token kernel.
pub const MAX_ROPE: usize = crate::ffi::MOEKIT_MLA_MAX_ROPE as usize;

/// MLA dimensions. [`MlaDims::deepseek_v3`] gives DeepSeek-V2/V3's (r = 512, d_nope = 128,
/// d_rope = 64, d_v = 128) for a number of local heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaDims {
    /// Local heads `H` (a tensor-parallel shard: 128, 64, 32, 16, 8; 96 or 12 for other models).
    pub heads: usize,
    /// `r` = `kv_lora_rank`, the latent width (a multiple of 8).
    pub kv_lora_rank: usize,
    /// `d_nope` = `qk_nope_head_dim`: key columns from the latent.
    pub qk_nope_head_dim: usize,
    /// `d_rope` = `qk_rope_head_dim`: the shared RoPE key columns (even).
    pub qk_rope_head_dim: usize,
    /// `d_v` = `v_head_dim`.
    pub v_head_dim: usize,
}

impl MlaDims {
    /// DeepSeek-V2/V3 dimensions with `heads` local heads.
    pub fn deepseek_v3(heads: usize) -> Self {
        Self {
            heads,
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
        }
    }

    /// Key head dimension `d_nope + d_rope` (192 for DeepSeek).
    pub fn k_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values per cache row: `r + d_rope` (576 for DeepSeek).
    pub fn cache_row(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Rows of `kv_b_proj`: `H · (d_nope + d_v)`.
    pub fn kv_b_proj_rows(&self) -> usize {
        self.heads * (self.qk_nope_head_dim + self.v_head_dim)
    }

    /// Multiply-add FLOPs of decompressing `tokens` tokens: `2 · T · r · H · (d_nope + d_v)`.
    pub fn decompress_flops(&self, tokens: usize) -> f64 {
        2.0 * tokens as f64 * self.kv_lora_rank as f64 * self.kv_b_proj_rows() as f64
    }

    /// Whether the WGMMA decompression kernel handles these dimensions.
    pub fn wgmma_supported(&self) -> bool {
        self.qk_nope_head_dim == WGMMA_HEAD_DIM
            && self.v_head_dim == WGMMA_HEAD_DIM
            && self.qk_rope_head_dim <= WGMMA_MAX_ROPE
            && self.qk_rope_head_dim % 8 == 0
            && self.kv_lora_rank % 64 == 0
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let i32_max = i32::MAX as usize;
        if self.heads == 0 || self.heads > 4096 {
            return Err(Error::invalid(
                "dims.heads",
                format!("{}; must be in 1..=4096", self.heads),
            ));
        }
        if self.kv_lora_rank < 8 || self.kv_lora_rank % 8 != 0 || self.kv_lora_rank > 65536 {
            return Err(Error::invalid(
                "dims.kv_lora_rank",
                format!(
                    "{}; must be a positive multiple of 8 up to 65536 (16-byte row loads)",
                    self.kv_lora_rank
                ),
            ));
        }
        if self.qk_nope_head_dim == 0 || self.v_head_dim == 0 {
            return Err(Error::invalid(
                "dims",
                "qk_nope_head_dim and v_head_dim must be positive",
            ));
        }
        if self.qk_nope_head_dim % 8 != 0 || self.v_head_dim % 8 != 0 {
            return Err(Error::invalid(
                "dims",
                format!(
                    "qk_nope_head_dim {} and v_head_dim {} must be multiples of 8 (16-byte stores)",
                    self.qk_nope_head_dim, self.v_head_dim
                ),
            ));
        }
        if self.qk_rope_head_dim % 2 != 0 || self.qk_rope_head_dim > MAX_ROPE {
            return Err(Error::invalid(
                "dims.qk_rope_head_dim",
                format!(
                    "{}; must be even and at most {MAX_ROPE}",
                    self.qk_rope_head_dim
                ),
            ));
        }
        if self.kv_b_proj_rows() > i32_max / 2 {
            return Err(Error::unsupported(
                format!("{} kv_b_proj rows", self.kv_b_proj_rows()),
                "2^30",
            ));
        }
        Ok(())
    }
}

/// Where element `(t, h, c)` of a per-head output (K or V) lives:
/// `t · token_stride + h · head_stride + c`, in elements. Token-major `[T, H, dim]` is
/// [`HeadLayout::dense`]; a wider `head_stride` pads each head (V padded to the K head dim), a wider
/// `token_stride` writes into a larger buffer; head-major `[H, T, dim]` works too. Strides are
/// multiples of 8 (16-byte stores).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLayout {
    /// Elements between consecutive tokens.
    pub token_stride: usize,
    /// Elements between consecutive heads.
    pub head_stride: usize,
}

impl HeadLayout {
    /// Contiguous `[T, heads, dim]`.
    pub fn dense(heads: usize, dim: usize) -> Self {
        Self {
            token_stride: heads * dim,
            head_stride: dim,
        }
    }

    /// Elements a buffer needs for `tokens` tokens of `heads` heads of `dim` values.
    pub fn required_len(&self, tokens: usize, heads: usize, dim: usize) -> usize {
        if tokens == 0 {
            return 0;
        }
        (tokens - 1) * self.token_stride + (heads - 1) * self.head_stride + dim
    }

    /// Checks that no two `(t, h, c)` share an element and that strides keep 16-byte alignment.
    pub(crate) fn validate(
        &self,
        arg: &'static str,
        tokens: usize,
        heads: usize,
        dim: usize,
    ) -> Result<()> {
        if self.token_stride % 8 != 0 || self.head_stride % 8 != 0 {
            return Err(Error::invalid(
                arg,
                format!(
                    "strides {:?} must be multiples of 8 elements (16-byte stores)",
                    self
                ),
            ));
        }
        let heads_inside_tokens = (heads == 1 || self.head_stride >= dim)
            && (tokens <= 1 || self.token_stride >= (heads - 1) * self.head_stride + dim);
        let tokens_inside_heads = (tokens <= 1 || self.token_stride >= dim)
            && (heads == 1
                || self.head_stride >= tokens.saturating_sub(1) * self.token_stride + dim);
        if !heads_inside_tokens && !tokens_inside_heads {
            return Err(Error::invalid(
                arg,
                format!(
                    "layout {:?} makes tokens or heads of {dim} values overlap",
                    self
                ),
            ));
        }
        Ok(())
    }
}

/// Which decompression kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Implementation {
    /// The persistent cp.async + TMA + WGMMA kernel (DeepSeek head dims; see
    /// [`MlaDims::wgmma_supported`]).
    #[default]
    Wgmma,
    /// One thread per output element, f32 FMA: slow, for tests; any dims that pass validation.
    Oracle,
}

/// Which elements of the `d_rope` part rotate together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i + 1)` (GPT-J style): DeepSeek's MLA `k_pe`.
    #[default]
    Interleaved,
    /// Pairs `(i, i + d_rope/2)` (GPT-NeoX `rotate_half`).
    NeoX,
}

/// YaRN context extension (DeepSeek-V3: factor 40, 4096 original positions, β_fast 32, β_slow 1,
/// mscale = mscale_all_dim = 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnScaling {
    /// Context extension factor `s`.
    pub factor: f64,
    /// The pre-extension context length.
    pub original_max_position: usize,
    /// Rotations below which frequencies are interpolated (`beta_fast`).
    pub beta_fast: f64,
    /// Rotations above which frequencies are kept (`beta_slow`).
    pub beta_slow: f64,
    /// `mscale` of the config.
    pub mscale: f64,
    /// `mscale_all_dim` of the config.
    pub mscale_all_dim: f64,
}

/// Rotary embedding of the `d_rope` part: `x_pair ← rotate(x_pair, position · inv_freq[i])`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// `rope_theta` (10000 for DeepSeek).
    pub base: f64,
    /// Pairing of the rotated elements.
    pub style: RopeStyle,
    /// YaRN scaling of the frequencies, if any.
    pub yarn: Option<YarnScaling>,
}

impl RopeConfig {
    /// DeepSeek-V3's MLA rope: base 10000, interleaved, YaRN factor 40 over 4096 positions.
    pub fn deepseek_v3() -> Self {
        Self {
            base: 10000.0,
            style: RopeStyle::Interleaved,
            yarn: Some(YarnScaling {
                factor: 40.0,
                original_max_position: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 1.0,
                mscale_all_dim: 1.0,
            }),
        }
    }

    /// Plain RoPE with `base` and no scaling.
    pub fn plain(base: f64, style: RopeStyle) -> Self {
        Self {
            base,
            style,
            yarn: None,
        }
    }

    /// The `d_rope / 2` rotation frequencies (radians per position) as f32, as DeepSeek's
    /// `precompute_freqs_cis` computes them: `base^(-2i/d_rope)`, and with YaRN
    /// `freq / factor · (1 − smooth) + freq · smooth` where `smooth = 1 − ramp(i)` rises linearly
    /// between the correction dims of β_fast and β_slow.
    pub fn inv_freq(&self, d_rope: usize) -> Vec<f32> {
        let dim = d_rope as f64;
        let freqs = (0..d_rope / 2).map(|i| 1.0 / self.base.powf(2.0 * i as f64 / dim));
        let Some(y) = self.yarn else {
            return freqs.map(|f| f as f32).collect();
        };
        let correction_dim = |rotations: f64| {
            dim * (y.original_max_position as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * self.base.ln())
        };
        let low = correction_dim(y.beta_fast).floor().max(0.0);
        let mut high = correction_dim(y.beta_slow).ceil().min(dim - 1.0);
        if low == high {
            high += 0.001;
        }
        freqs
            .enumerate()
            .map(|(i, f)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let smooth = 1.0 - ramp;
                (f / y.factor * (1.0 - smooth) + f * smooth) as f32
            })
            .collect()
    }

    /// Factor on cos and sin: YaRN's `get_mscale(factor, mscale) / get_mscale(factor,
    /// mscale_all_dim)` with `get_mscale(s, m) = 0.1·m·ln(s) + 1` (1 for DeepSeek-V3), else 1.
    pub fn cos_sin_scale(&self) -> f32 {
        let Some(y) = self.yarn else { return 1.0 };
        let get = |m: f64| {
            if y.factor <= 1.0 {
                1.0
            } else {
                0.1 * m * y.factor.ln() + 1.0
            }
        };
        (get(y.mscale) / get(y.mscale_all_dim)) as f32
    }
}
