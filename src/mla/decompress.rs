//! Latent-KV decompression: latent rows × `kv_b_proj` → per-head K (with the `k_pe` columns) and V.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};
use half::bf16;

use super::{HeadLayout, Implementation, MlaDims, WGMMA_HEAD_DIM, WGMMA_MAX_ROPE};
use crate::context::{check_aligned16, check_status, prepare_launch, ptr_or_null, raw_stream};
use crate::error::{DuringExt, Error, Result};
use crate::ffi;

/// A paged latent cache and the addressing of the tokens to decompress.
///
/// Output token `t` belongs to the sequence `b` with `cu_seqlens[b] ≤ t < cu_seqlens[b + 1]`; it
/// is that sequence's position `p = seq_starts[b] + (t − cu_seqlens[b])` (any start: no block
/// alignment needed) and reads cache row `block_table[b][p / block_size] · block_size +
/// p % block_size`. Only those rows are read: unused slots may hold anything (NaN included).
/// The device-side tables cannot be checked on the host without a synchronization; tokens they do
/// not map (past `cu_seqlens[num_seqs]`, positions past the table, block ids outside
/// `[0, num_blocks)`) decompress to zeros, and nothing outside the cache is read.
#[derive(Debug)]
pub struct PagedCache<'a> {
    /// `[num_blocks, block_size, r + d_rope]` bf16: each slot's latent then its `k_pe`.
    pub cache: CudaView<'a, bf16>,
    /// Token slots per block (1, 16, 32, 64, 128 in engines; any positive value works).
    pub block_size: usize,
    /// `[num_seqs, max_blocks_per_seq]` i32 block ids, row-major.
    pub block_table: CudaView<'a, i32>,
    /// Columns of `block_table`.
    pub max_blocks_per_seq: usize,
    /// `[num_seqs + 1]` i32, non-decreasing: the first output token of each sequence; the last
    /// entry should equal the number of tokens decompressed.
    pub cu_seqlens: CudaView<'a, i32>,
    /// `[num_seqs]` i32: the position of each sequence's first decompressed token (a chunk of a
    /// longer context), or `None` for 0.
    pub seq_starts: Option<CudaView<'a, i32>>,
}

/// Where the latent rows come from.
#[derive(Debug)]
pub enum LatentSource<'a> {
    /// Token `t`'s latent at `latent[t · latent_stride ..][.. r]` and its `k_pe` at
    /// `k_pe[t · k_pe_stride ..][.. d_rope]` (bf16; strides in elements, multiples of 8; views
    /// 16-byte aligned).
    Contiguous {
        /// Latent rows.
        latent: CudaView<'a, bf16>,
        /// Elements between consecutive latent rows (≥ r).
        latent_stride: usize,
        /// `k_pe` rows (may be a view into the same cache rows, offset by r).
        k_pe: CudaView<'a, bf16>,
        /// Elements between consecutive `k_pe` rows (≥ d_rope).
        k_pe_stride: usize,
    },
    /// A paged cache.
    Paged(PagedCache<'a>),
}

impl<'a> LatentSource<'a> {
    /// Contiguous cache rows `[T, r + d_rope]` (latent then `k_pe` in each row), as
    /// [`super::write_fresh_tokens`] writes them.
    pub fn cache_rows(cache: &'a CudaSlice<bf16>, dims: &MlaDims) -> Self {
        let row = dims.cache_row();
        let r = dims.kv_lora_rank.min(cache.len());
        LatentSource::Contiguous {
            latent: cache.slice(..),
            latent_stride: row,
            k_pe: cache.slice(r..),
            k_pe_stride: row,
        }
    }
}

/// What to decompress and where the outputs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecompressProblem {
    /// Dimensions.
    pub dims: MlaDims,
    /// Tokens `T` to decompress.
    pub tokens: usize,
    /// Layout of K (`d_nope + d_rope` values per head).
    pub k_layout: HeadLayout,
    /// Layout of V (`d_v` values per head).
    pub v_layout: HeadLayout,
    /// Kernel.
    pub implementation: Implementation,
}

impl DecompressProblem {
    /// `tokens` tokens into dense `K [T, H, d_nope + d_rope]` and `V [T, H, d_v]`, WGMMA kernel.
    pub fn new(dims: MlaDims, tokens: usize) -> Self {
        Self {
            dims,
            tokens,
            k_layout: HeadLayout::dense(dims.heads, dims.k_head_dim()),
            v_layout: HeadLayout::dense(dims.heads, dims.v_head_dim),
            implementation: Implementation::Wgmma,
        }
    }

    /// Sets K's layout.
    pub fn k_layout(mut self, layout: HeadLayout) -> Self {
        self.k_layout = layout;
        self
    }

    /// Sets V's layout (e.g. `head_stride = d_nope + d_rope` pads V to the K head dim).
    pub fn v_layout(mut self, layout: HeadLayout) -> Self {
        self.v_layout = layout;
        self
    }

    /// Sets the implementation.
    pub fn implementation(mut self, implementation: Implementation) -> Self {
        self.implementation = implementation;
        self
    }
}

/// Device scratch of [`decompress`]: a paged source's rows gathered contiguous (`[max_tokens,
/// r + d_rope]` bf16, 1152 bytes per token for DeepSeek-V3), the paged row table (4 bytes per
/// token) and the kernel's tile queue (a counter that every launch leaves at zero, so a contiguous
/// source's call is a single kernel launch). One per stream; reused across calls.
///
/// Why a gather buffer: the decompression kernel reads each latent tile once per head (128 times
/// for DeepSeek-V3), so gathering the scattered cache rows once into this buffer and reading it
/// by TMA costs less than gathering inside the kernel (BENCHMARKS.md, run 23).
#[derive(Debug)]
pub struct MlaWorkspace {
    gathered: CudaSlice<bf16>,
    row_src: CudaSlice<i32>,
    tile_counter: CudaSlice<i32>,
    max_tokens: usize,
    row_elems: usize,
}

impl MlaWorkspace {
    /// Scratch for up to `max_tokens` tokens per call of dimensions `dims` (its cache row,
    /// `r + d_rope` values, sizes the gather buffer).
    pub fn new(stream: &Arc<CudaStream>, dims: &MlaDims, max_tokens: usize) -> Result<Self> {
        let row_elems = dims.cache_row();
        let gathered_len = max_tokens.max(1).checked_mul(row_elems).ok_or_else(|| {
            Error::invalid(
                "max_tokens",
                format!("{max_tokens} rows of {row_elems} overflow"),
            )
        })?;
        Ok(Self {
            // SAFETY: the gather kernel writes every row it hands to the decompression kernel.
            gathered: unsafe { stream.alloc::<bf16>(gathered_len) }
                .during("allocating the MLA gather buffer")?,
            row_src: stream
                .alloc_zeros::<i32>(max_tokens.max(1))
                .during("allocating the MLA row table")?,
            tile_counter: stream
                .alloc_zeros::<i32>(1)
                .during("allocating the MLA tile counter")?,
            max_tokens,
            row_elems,
        })
    }

    /// Tokens per call this workspace holds.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
}

/// Rows a strided view holds: the largest `n` with `(n − 1) · stride + width ≤ len`.
fn rows_in(len: usize, stride: usize, width: usize) -> usize {
    if len < width || stride == 0 {
        0
    } else {
        (len - width) / stride + 1
    }
}

/// Decompresses `problem.tokens` tokens of `source` through `kv_b_proj` into `k` and `v` on
/// `stream`.
///
/// - `kv_b_proj`: `[H · (d_nope + d_v), r]` bf16 row-major (per head: `d_nope` W_UK rows, then
///   `d_v` W_UV rows), 16-byte aligned.
/// - `k`: `K[t, h, 0:d_nope] = c_t · W_UK[h]ᵀ`, `K[t, h, d_nope:] = k_pe_t`, at
///   `problem.k_layout`; `v`: `V[t, h, :] = c_t · W_UV[h]ᵀ` at `problem.v_layout` (bf16, f32
///   accumulation). Elements outside the layouts' `(t, h, c)` keep their contents.
///
/// Launches a small prepare kernel (for a paged source: the gather into the workspace) and the
/// decompression kernel; no host synchronization.
pub fn decompress(
    stream: &CudaStream,
    problem: &DecompressProblem,
    source: &LatentSource<'_>,
    kv_b_proj: &impl DevicePtr<bf16>,
    k: &mut impl DevicePtrMut<bf16>,
    v: &mut impl DevicePtrMut<bf16>,
    workspace: &mut MlaWorkspace,
) -> Result<()> {
    let dims = problem.dims;
    dims.validate()?;
    let tokens = problem.tokens;
    let (r, d_rope) = (dims.kv_lora_rank, dims.qk_rope_head_dim);
    if tokens > i32::MAX as usize {
        return Err(Error::unsupported(
            format!("{tokens} tokens"),
            "2^31 - 1 per call",
        ));
    }
    if problem.implementation == Implementation::Wgmma && !dims.wgmma_supported() {
        return Err(Error::unsupported(
            format!(
                "WGMMA decompression with d_nope = {}, d_v = {}, d_rope = {}, r = {}",
                dims.qk_nope_head_dim, dims.v_head_dim, d_rope, r
            ),
            format!(
                "d_nope = d_v = {WGMMA_HEAD_DIM}, d_rope a multiple of 8 up to {WGMMA_MAX_ROPE}, \
                 r a multiple of 64; Implementation::Oracle runs other dims (multiples of 8)"
            ),
        ));
    }
    if kv_b_proj.len() != dims.kv_b_proj_rows() * r {
        return Err(Error::shape(
            "kv_b_proj",
            format!(
                "{} elements ([{}, {r}])",
                dims.kv_b_proj_rows() * r,
                dims.kv_b_proj_rows()
            ),
            kv_b_proj.len(),
        ));
    }
    let (k_dim, heads) = (dims.k_head_dim(), dims.heads);
    problem
        .k_layout
        .validate("k_layout", tokens, heads, k_dim)?;
    problem
        .v_layout
        .validate("v_layout", tokens, heads, dims.v_head_dim)?;
    let k_need = problem.k_layout.required_len(tokens, heads, k_dim);
    if k.len() < k_need {
        return Err(Error::shape(
            "k",
            format!("at least {k_need} elements for {:?}", problem.k_layout),
            k.len(),
        ));
    }
    let v_need = problem
        .v_layout
        .required_len(tokens, heads, dims.v_head_dim);
    if v.len() < v_need {
        return Err(Error::shape(
            "v",
            format!("at least {v_need} elements for {:?}", problem.v_layout),
            v.len(),
        ));
    }

    // Source geometry, checked before any pointer is taken.
    let (latent, latent_stride, k_pe, k_pe_stride, num_rows) = match source {
        LatentSource::Contiguous {
            latent,
            latent_stride,
            k_pe,
            k_pe_stride,
        } => {
            if *latent_stride < r || latent_stride % 8 != 0 {
                return Err(Error::invalid(
                    "latent_stride",
                    format!("{latent_stride}; must be ≥ r = {r} and a multiple of 8"),
                ));
            }
            if *k_pe_stride < d_rope || k_pe_stride % 8 != 0 || *k_pe_stride == 0 {
                return Err(Error::invalid(
                    "k_pe_stride",
                    format!(
                        "{k_pe_stride}; must be ≥ d_rope = {d_rope}, positive and a multiple of 8"
                    ),
                ));
            }
            let k_pe_rows = if d_rope == 0 {
                usize::MAX
            } else {
                rows_in(k_pe.len(), *k_pe_stride, d_rope)
            };
            let rows = rows_in(latent.len(), *latent_stride, r).min(k_pe_rows);
            if rows < tokens {
                return Err(Error::shape(
                    "latent/k_pe",
                    format!("rows for {tokens} tokens"),
                    format!("{rows} rows"),
                ));
            }
            (latent, *latent_stride, k_pe, *k_pe_stride, tokens)
        }
        LatentSource::Paged(p) => {
            let row = dims.cache_row();
            if p.block_size == 0 || p.block_size > i32::MAX as usize {
                return Err(Error::invalid("block_size", "must be positive"));
            }
            if p.cache.len() % (row * p.block_size) != 0 {
                return Err(Error::shape(
                    "cache",
                    format!(
                        "[num_blocks, {}, {row}]: a multiple of {} elements",
                        p.block_size,
                        row * p.block_size
                    ),
                    p.cache.len(),
                ));
            }
            let num_rows = p.cache.len() / row;
            if num_rows > i32::MAX as usize {
                return Err(Error::unsupported(
                    format!("a cache of {num_rows} token slots"),
                    "2^31 - 1",
                ));
            }
            if p.cu_seqlens.len() < 2 {
                return Err(Error::shape(
                    "cu_seqlens",
                    "[num_seqs + 1] with num_seqs ≥ 1",
                    p.cu_seqlens.len(),
                ));
            }
            let num_seqs = p.cu_seqlens.len() - 1;
            if num_seqs > i32::MAX as usize {
                return Err(Error::unsupported(
                    format!("{num_seqs} sequences"),
                    "2^31 - 1",
                ));
            }
            if p.max_blocks_per_seq == 0 || p.max_blocks_per_seq > i32::MAX as usize {
                return Err(Error::invalid("max_blocks_per_seq", "must be in 1..2^31"));
            }
            if p.block_table.len() != num_seqs * p.max_blocks_per_seq {
                return Err(Error::shape(
                    "block_table",
                    format!(
                        "{} elements ([{num_seqs}, {}])",
                        num_seqs * p.max_blocks_per_seq,
                        p.max_blocks_per_seq
                    ),
                    p.block_table.len(),
                ));
            }
            if let Some(s) = &p.seq_starts {
                if s.len() != num_seqs {
                    return Err(Error::shape("seq_starts", num_seqs, s.len()));
                }
            }
            if tokens > workspace.max_tokens || workspace.row_elems < row {
                return Err(Error::invalid(
                    "workspace",
                    format!(
                        "holds {} tokens of {} values; this call decompresses {tokens} of {row}",
                        workspace.max_tokens, workspace.row_elems
                    ),
                ));
            }
            (&p.cache, row, &p.cache, row, num_rows)
        }
    };

    prepare_launch(stream)?;
    let (latent_ptr, _g0) = latent.device_ptr(stream);
    let (k_pe_base, _g1) = k_pe.device_ptr(stream);
    let k_pe_ptr = match source {
        LatentSource::Paged(_) => k_pe_base + 2 * r as u64,
        LatentSource::Contiguous { .. } => k_pe_base,
    };
    let (w_ptr, _g2) = kv_b_proj.device_ptr(stream);
    let (k_ptr, _g3) = k.device_ptr_mut(stream);
    let (v_ptr, _g4) = v.device_ptr_mut(stream);
    for (name, ptr) in [
        ("latent", latent_ptr),
        ("k_pe", k_pe_ptr),
        ("kv_b_proj", w_ptr),
        ("k", k_ptr),
        ("v", v_ptr),
    ] {
        check_aligned16(name, ptr)?;
    }
    let paged = match source {
        LatentSource::Paged(p) => Some(p),
        LatentSource::Contiguous { .. } => None,
    };
    let table = paged.map(|p| p.block_table.device_ptr(stream));
    let cu = paged.map(|p| p.cu_seqlens.device_ptr(stream));
    let starts = paged.and_then(|p| p.seq_starts.as_ref().map(|s| s.device_ptr(stream)));
    let MlaWorkspace {
        gathered,
        row_src,
        tile_counter,
        ..
    } = workspace;
    let (row_src_ptr, _g5) = row_src.device_ptr_mut(stream);
    let (counter_ptr, _g6) = tile_counter.device_ptr_mut(stream);
    let (gathered_ptr, _g7) = gathered.device_ptr_mut(stream);
    let params = ffi::moekit_mla_decompress_params {
        latent: latent_ptr as *const _,
        k_pe: k_pe_ptr as *const _,
        latent_stride: latent_stride as i64,
        k_pe_stride: k_pe_stride as i64,
        num_rows: num_rows as i64,
        block_table: ptr_or_null(&table) as *const i32,
        cu_seqlens: ptr_or_null(&cu) as *const i32,
        seq_starts: ptr_or_null(&starts) as *const i32,
        row_src: row_src_ptr as *mut i32,
        gathered: gathered_ptr as *mut _,
        num_seqs: paged.map_or(0, |p| p.cu_seqlens.len() - 1) as i32,
        max_blocks_per_seq: paged.map_or(0, |p| p.max_blocks_per_seq) as i32,
        block_size: paged.map_or(0, |p| p.block_size) as i32,
        _pad0: 0,
        w: w_ptr as *const _,
        k: k_ptr as *mut _,
        v: v_ptr as *mut _,
        k_token_stride: problem.k_layout.token_stride as i64,
        k_head_stride: problem.k_layout.head_stride as i64,
        v_token_stride: problem.v_layout.token_stride as i64,
        v_head_stride: problem.v_layout.head_stride as i64,
        tile_counter: counter_ptr as *mut i32,
        tokens: tokens as i32,
        heads: heads as i32,
        rank: r as i32,
        d_nope: dims.qk_nope_head_dim as i32,
        d_rope: d_rope as i32,
        d_v: dims.v_head_dim as i32,
        implementation: match problem.implementation {
            Implementation::Wgmma => ffi::MOEKIT_MLA_WGMMA,
            Implementation::Oracle => ffi::MOEKIT_MLA_ORACLE,
        } as i32,
        _pad1: 0,
    };
    // SAFETY: every source row the kernels read is one of num_rows rows that lie inside the
    // latent and k_pe views (checked above: contiguous views hold `tokens` rows of their strides;
    // a paged cache is exactly num_rows rows of r + d_rope, k_pe at offset r); the kernels map
    // unmapped or out-of-range device-side table entries to zero rows. k and v hold every element
    // of their layouts for tokens x heads (checked, no overlap); kv_b_proj is H (d_nope + d_v) x r.
    // The paged tables have the checked shapes; row_src holds max_tokens >= tokens entries and
    // gathered max_tokens rows of at least r + d_rope values (checked for a paged source). All
    // pointers are 16-byte aligned and the strides multiples of 8 elements. The buffer guards
    // order the launches after earlier work on their buffers.
    let status = unsafe { ffi::moekit_mla_decompress(&params, raw_stream(stream)) };
    check_status(status, "launching the MLA decompression")
}
