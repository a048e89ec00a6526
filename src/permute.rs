//! Token permutation: the device-side routing plan, [`permute`] (token rows → expert-sorted rows)
//! and [`combine`] (the weighted sum of each token's expert outputs).
//!
//! Nothing here synchronizes with the host. Every buffer is sized from `(max_tokens, top_k, E,
//! align, block_m)` alone when the [`RoutingPlan`] is created, and the kernels read the per-expert
//! counts and offsets from device memory, so a whole MoE forward can be captured in a CUDA graph
//! and replayed.
//!
//! Row order: expert segments in expert order, each padded to a multiple of `align` rows; within an
//! expert, ascending token, then slot. Assignment `a = t * top_k + slot` of token `t`.
//!
//! The plan is one cooperative launch up to 2048 assignments per SM and 512 local experts (its
//! CTAs meet at a grid barrier; H200, DeepSeek-V3: 8.3 µs at T = 128, ~10 at T = 4096, 14.6 at
//! T = 16384), else three dependent kernels (rank, scan, place). Both give bitwise-equal plans;
//! `MOEKIT_PLAN_GRID=0` forces the three kernels.
//!
//! Three kernels move the rows ([`CopyKernel`]): one warp per token (any row), one block per
//! (token, row chunk) fed by the bulk-copy engine (16-byte rows), and, for permute, one CTA per SM
//! reading and writing in grid-wide phases (16-byte rows). The launcher picks by shape: combine
//! always takes the bulk kernel where the rows allow it (H200, DeepSeek-V3 T = 4096: 129 µs
//! against 180, 96% of the copy bandwidth); permute takes the bulk kernel while the warp kernel
//! would leave SMs idle (T = 128: 7.8 µs against 19.2) and the phased one for k ≥ 4 copies of at
//! least 96 MiB (DeepSeek-V3 T = 16384: 527 µs against 551, 94% of memcpy).

use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
};

use crate::context::{check_status, prepare_launch, ptr_or_null, raw_stream};
use crate::dtype::Element;
use crate::error::{DuringExt, Error, Result};
use crate::ffi;

/// Segment alignments the plan accepts (rows).
pub const ALIGNMENTS: [usize; 6] = [1, 8, 16, 32, 64, 128];
/// Largest top-k that permute and combine accept.
pub const MAX_TOP_K: usize = 32;

/// Shape of a routing plan: fixes every buffer size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConfig {
    /// Largest T the plan will be built for.
    pub max_tokens: usize,
    /// k, experts per token.
    pub top_k: usize,
    /// E, number of experts the ids refer to.
    pub num_experts: usize,
    /// Each expert's segment is padded to a multiple of `align` rows (one of [`ALIGNMENTS`]).
    pub align: usize,
    /// Rows per tile of the tile schedule (the grouped GEMM's block M).
    pub block_m: usize,
    /// Experts placed by this plan (expert parallelism); assignments to others are dropped.
    pub local_experts: Range<usize>,
}

impl PlanConfig {
    /// All experts local, no padding, 128-row tiles.
    pub fn new(max_tokens: usize, top_k: usize, num_experts: usize) -> Self {
        Self {
            max_tokens,
            top_k,
            num_experts,
            align: 1,
            block_m: 128,
            local_experts: 0..num_experts,
        }
    }

    /// Sets the segment alignment.
    pub fn align(mut self, align: usize) -> Self {
        self.align = align;
        self
    }

    /// Sets the tile height of the tile schedule.
    pub fn block_m(mut self, block_m: usize) -> Self {
        self.block_m = block_m;
        self
    }

    /// Restricts placement to the experts in `range`.
    pub fn local_experts(mut self, range: Range<usize>) -> Self {
        self.local_experts = range;
        self
    }

    /// Number of local experts.
    pub fn num_local(&self) -> usize {
        self.local_experts.len()
    }

    /// Capacity of the permuted rows: `max_tokens * top_k + num_local * (align - 1)`.
    pub fn max_rows(&self) -> usize {
        self.max_tokens * self.top_k + self.num_local() * (self.align - 1)
    }

    /// Capacity of the tile schedule: `max_rows / block_m + num_local`.
    pub fn max_tiles(&self) -> usize {
        self.max_rows() / self.block_m + self.num_local()
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        if self.top_k == 0 || self.top_k > MAX_TOP_K {
            return Err(Error::invalid(
                "top_k",
                format!("{}; must be 1 ..= {MAX_TOP_K}", self.top_k),
            ));
        }
        if self.num_experts == 0 || self.num_experts > i32::MAX as usize {
            return Err(Error::invalid(
                "num_experts",
                format!("{}", self.num_experts),
            ));
        }
        if self.local_experts.is_empty() || self.local_experts.end > self.num_experts {
            return Err(Error::invalid(
                "local_experts",
                format!(
                    "{:?} must be a non-empty range within 0..{}",
                    self.local_experts, self.num_experts
                ),
            ));
        }
        if !ALIGNMENTS.contains(&self.align) {
            return Err(Error::invalid(
                "align",
                format!("{}; must be one of {ALIGNMENTS:?}", self.align),
            ));
        }
        if self.block_m == 0 || self.block_m > 1024 {
            return Err(Error::invalid(
                "block_m",
                format!("{}; must be 1 ..= 1024", self.block_m),
            ));
        }
        let rows = self
            .max_tokens
            .checked_mul(self.top_k)
            .and_then(|a| a.checked_add(self.num_local() * (self.align - 1)));
        if rows.is_none_or(|r| r > i32::MAX as usize) {
            return Err(Error::unsupported(
                format!(
                    "{} tokens × top-{} (+ padding) permuted rows",
                    self.max_tokens, self.top_k
                ),
                "rows are indexed with i32: at most 2^31 - 1",
            ));
        }
        Ok(())
    }

    fn chunks(&self) -> usize {
        ffi::MOEKIT_PLAN_TARGET_CHUNKS as usize
    }
}

/// Assignments per chunk of the plan's rank kernel for `assignments` assignments.
fn plan_chunk(assignments: i64) -> i64 {
    // SAFETY: a pure function of its argument.
    unsafe { ffi::moekit_plan_chunk(assignments) }
}

/// A routing plan on the device, rebuilt in place for every batch by [`RoutingPlan::build`].
///
/// Buffers (i32, indexed by local expert `e - local_experts.start`):
/// - `expert_counts` `[num_local]`: rows routed to each expert;
/// - `expert_offsets` `[num_local + 1]`: first row of each padded segment; the last entry is the
///   padded total row count;
/// - `row_map` `[max_rows]`: assignment `t * top_k + slot` of each permuted row, -1 for padding
///   rows and rows past the total;
/// - `inverse_map` `[max_tokens * top_k]`: permuted row of each assignment, -1 when its expert is
///   not local (only the first `tokens * top_k` entries belong to the last build);
/// - `tiles` `[max_tiles, 2]`: `(local expert, first row)` of each `block_m`-row tile over the
///   experts' real rows (the last tile of an expert may extend past its rows: mask by the count);
/// - `num_tiles` `[1]`.
///
/// It also holds the grouped GEMM's scheduling counter, which is why
/// [`crate::grouped_gemm::grouped_gemm`] borrows the plan mutably.
#[derive(Debug)]
pub struct RoutingPlan {
    cfg: PlanConfig,
    tokens: Option<usize>,
    pub(crate) expert_counts: CudaSlice<i32>,
    pub(crate) expert_offsets: CudaSlice<i32>,
    pub(crate) row_map: CudaSlice<i32>,
    inverse_map: CudaSlice<i32>,
    pub(crate) tiles: CudaSlice<i32>,
    pub(crate) num_tiles: CudaSlice<i32>,
    chunk_counts: CudaSlice<i32>,
    assignment_rank: CudaSlice<i32>,
    invalid_ids: CudaSlice<i32>,
    /// The one-launch plan's grid-barrier word: zero at allocation; every build leaves its low 31
    /// bits zero again.
    grid_barrier: CudaSlice<u32>,
    /// The phased permute's grid-barrier word ([`CopyKernel::Phased`]): zero at allocation; every
    /// permute leaves its low 31 bits zero again. Every permute of the plan takes it as written
    /// (`device_ptr_mut`, behind the mutex because permutes borrow the plan shared), so cudarc's
    /// event tracking orders permutes of one plan on different streams instead of letting two
    /// grids arrive at the same barrier.
    permute_barrier: Mutex<CudaSlice<u32>>,
    /// Scratch of the grouped GEMM: the counter its CTAs claim tiles from.
    pub(crate) gemm_tile_counter: CudaSlice<i32>,
    /// Scratch of the grouped GEMM's split-K partial sums (one-expert plans only, such as the
    /// router's; [`SPLIT_K_PARTIALS`] f32 values, else 1).
    pub(crate) gemm_partials: CudaSlice<f32>,
}

/// f32 values of split-K scratch a one-expert plan holds (16 MB): the partial sums of up to 16
/// splits of the narrow GEMMs that leave most SMs idle (a DeepSeek-V3 router GEMM at T = 4096
/// splits 4 ways: 4 M).
pub(crate) const SPLIT_K_PARTIALS: usize = 1 << 22;

impl RoutingPlan {
    /// Allocates every buffer of a plan for `cfg` on `stream` (the only allocation: builds reuse it).
    pub fn new(stream: &Arc<CudaStream>, cfg: PlanConfig) -> Result<Self> {
        cfg.validate()?;
        let alloc = |n: usize| {
            stream
                .alloc_zeros::<i32>(n.max(1))
                .during("allocating the routing plan")
        };
        Ok(Self {
            expert_counts: alloc(cfg.num_local())?,
            expert_offsets: alloc(cfg.num_local() + 1)?,
            row_map: alloc(cfg.max_rows())?,
            inverse_map: alloc(cfg.max_tokens * cfg.top_k)?,
            tiles: alloc(2 * cfg.max_tiles())?,
            num_tiles: alloc(1)?,
            chunk_counts: alloc(cfg.num_local() * cfg.chunks())?,
            assignment_rank: alloc(cfg.max_tokens * cfg.top_k)?,
            invalid_ids: alloc(cfg.chunks())?,
            grid_barrier: stream
                .alloc_zeros::<u32>(1)
                .during("allocating the routing plan")?,
            permute_barrier: Mutex::new(
                stream
                    .alloc_zeros::<u32>(1)
                    .during("allocating the routing plan")?,
            ),
            gemm_tile_counter: alloc(1)?,
            gemm_partials: stream
                .alloc_zeros::<f32>(if cfg.num_local() == 1 {
                    SPLIT_K_PARTIALS
                } else {
                    1
                })
                .during("allocating the routing plan")?,
            tokens: None,
            cfg,
        })
    }

    /// Builds the plan for `topk_ids` `[tokens, top_k]` (i32) on `stream`, with no host
    /// synchronization. Ids outside `[0, E)` are not placed (their inverse-map entry is -1) and are
    /// reported by [`RoutingPlan::check_ids`].
    pub fn build(
        &mut self,
        stream: &CudaStream,
        topk_ids: &impl DevicePtr<i32>,
        tokens: usize,
    ) -> Result<()> {
        let cfg = &self.cfg;
        if tokens > cfg.max_tokens {
            return Err(Error::invalid(
                "tokens",
                format!(
                    "{tokens} tokens but the plan was sized for at most {}",
                    cfg.max_tokens
                ),
            ));
        }
        let n_assign = tokens * cfg.top_k;
        if topk_ids.len() != n_assign {
            return Err(Error::shape(
                "topk_ids",
                format!("{n_assign} elements ([{tokens}, {}])", cfg.top_k),
                topk_ids.len(),
            ));
        }
        prepare_launch(stream)?;
        let chunk = plan_chunk(n_assign as i64);
        let (ids, _g0) = topk_ids.device_ptr(stream);
        let (counts, _g1) = self.expert_counts.device_ptr_mut(stream);
        let (offsets, _g2) = self.expert_offsets.device_ptr_mut(stream);
        let (row_map, _g3) = self.row_map.device_ptr_mut(stream);
        let (inverse, _g4) = self.inverse_map.device_ptr_mut(stream);
        let (tiles, _g5) = self.tiles.device_ptr_mut(stream);
        let (num_tiles, _g6) = self.num_tiles.device_ptr_mut(stream);
        let (chunk_counts, _g7) = self.chunk_counts.device_ptr_mut(stream);
        let (rank, _g8) = self.assignment_rank.device_ptr_mut(stream);
        let (invalid, _g9) = self.invalid_ids.device_ptr_mut(stream);
        let (barrier, _g10) = self.grid_barrier.device_ptr_mut(stream);
        let params = ffi::moekit_plan_params {
            topk_ids: ids as *const i32,
            tokens: tokens as i64,
            top_k: cfg.top_k as i32,
            num_experts: cfg.num_experts as i32,
            expert_begin: cfg.local_experts.start as i32,
            expert_end: cfg.local_experts.end as i32,
            align: cfg.align as i32,
            block_m: cfg.block_m as i32,
            chunk,
            max_rows: cfg.max_rows() as i64,
            max_tiles: cfg.max_tiles() as i64,
            expert_counts: counts as *mut i32,
            expert_offsets: offsets as *mut i32,
            row_map: row_map as *mut i32,
            inverse_map: inverse as *mut i32,
            tiles: tiles as *mut i32,
            num_tiles: num_tiles as *mut i32,
            chunk_counts: chunk_counts as *mut i32,
            assignment_rank: rank as *mut i32,
            invalid_ids: invalid as *mut i32,
            grid_barrier: barrier as *mut u32,
        };
        // SAFETY: the plan's buffers were allocated from `cfg` with the sizes the header documents
        // (num_local, num_local + 1, max_rows, max_tokens*top_k, 2*max_tiles, 1,
        // num_local*MOEKIT_PLAN_TARGET_CHUNKS, max_tokens*top_k, MOEKIT_PLAN_TARGET_CHUNKS, 1; the
        // barrier word is ready between builds, which stream order serializes), and
        // `chunk` comes from moekit_plan_chunk, so at most MOEKIT_PLAN_TARGET_CHUNKS chunks exist;
        // topk_ids holds tokens*top_k ids; the guards keep everything alive until enqueued.
        let status = unsafe { ffi::moekit_routing_plan(&params, raw_stream(stream)) };
        check_status(status, "building the routing plan")?;
        self.tokens = Some(tokens);
        Ok(())
    }

    /// Waits for the last build and fails if any id was outside `[0, E)`. The only call here that
    /// synchronizes: for tests and debugging, not for the hot path.
    pub fn check_ids(&self, stream: &Arc<CudaStream>) -> Result<()> {
        let tokens = self.built_tokens()?;
        let invalid = stream
            .clone_dtoh(&self.invalid_ids)
            .during("reading the plan's invalid-id counts")?;
        // Only the last build's chunks: a build with fewer chunks leaves older counts behind.
        let assignments = (tokens * self.cfg.top_k) as i64;
        let chunk = plan_chunk(assignments);
        let chunks = (assignments + chunk - 1) / chunk;
        let n: i64 = invalid[..chunks as usize].iter().map(|&v| v as i64).sum();
        if n > 0 {
            return Err(Error::invalid(
                "topk_ids",
                format!(
                    "{n} ids outside [0, {}) were dropped from the plan",
                    self.cfg.num_experts
                ),
            ));
        }
        Ok(())
    }

    /// The plan's shape.
    pub fn config(&self) -> &PlanConfig {
        &self.cfg
    }

    /// T of the last build, `None` before the first.
    pub fn tokens(&self) -> Option<usize> {
        self.tokens
    }

    /// `[num_local]` rows routed to each local expert.
    pub fn expert_counts(&self) -> &CudaSlice<i32> {
        &self.expert_counts
    }

    /// `[num_local + 1]` padded segment offsets; the last entry is the padded total.
    pub fn expert_offsets(&self) -> &CudaSlice<i32> {
        &self.expert_offsets
    }

    /// `[max_rows]` assignment of each permuted row, or -1.
    pub fn row_map(&self) -> &CudaSlice<i32> {
        &self.row_map
    }

    /// `[max_tokens * top_k]` permuted row of each assignment, or -1.
    pub fn inverse_map(&self) -> &CudaSlice<i32> {
        &self.inverse_map
    }

    /// `[max_tiles, 2]` `(local expert, first row)` per tile.
    pub fn tiles(&self) -> &CudaSlice<i32> {
        &self.tiles
    }

    /// `[1]` number of tiles.
    pub fn num_tiles(&self) -> &CudaSlice<i32> {
        &self.num_tiles
    }

    /// T of the last build, or the error every consumer of an unbuilt plan returns.
    pub(crate) fn built_tokens(&self) -> Result<usize> {
        self.tokens.ok_or_else(|| {
            Error::invalid(
                "plan",
                "the routing plan has not been built (call RoutingPlan::build first)",
            )
        })
    }

    /// Row bound of the last build, `tokens * top_k + num_local * (align - 1)` (at most
    /// `max_rows`): every permuted row of the build is below it, so buffers of permuted rows need
    /// this many rows, not `max_rows`.
    pub fn rows(&self) -> Result<usize> {
        let t = self.built_tokens()?;
        Ok(t * self.cfg.top_k + self.cfg.num_local() * (self.cfg.align - 1))
    }

    /// Checks that routing weights for the last build hold `[tokens, top_k]` values.
    pub(crate) fn check_weights(&self, len: usize) -> Result<()> {
        let (t, k) = (self.built_tokens()?, self.cfg.top_k);
        if len != t * k {
            return Err(Error::shape(
                "weights",
                format!("{} elements ([{t}, {k}])", t * k),
                len,
            ));
        }
        Ok(())
    }
}

/// Per-row scales that travel with FP8 rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleLayout {
    /// One f32 per row.
    PerRow,
    /// One f32 per 128 columns: `ceil(hidden / 128)` per row (DeepSeek's 1×128 activation groups).
    Per128Columns,
}

impl ScaleLayout {
    /// Scales per row for rows of `hidden` elements.
    pub fn per_row(self, hidden: usize) -> usize {
        match self {
            ScaleLayout::PerRow => 1,
            ScaleLayout::Per128Columns => hidden.div_ceil(128),
        }
    }
}

/// Scales `[rows, scales_per_row]` (f32) to move along with the rows in [`permute`].
#[derive(Debug)]
pub struct RowScales<'a, 'b> {
    /// Scales of the token rows, `[tokens, layout.per_row(hidden)]`.
    pub input: CudaView<'a, f32>,
    /// Scales of the permuted rows, `[rows, layout.per_row(hidden)]`.
    pub output: CudaViewMut<'b, f32>,
    /// How many scales each row has.
    pub layout: ScaleLayout,
}

/// Which kernel moves the rows in [`permute_using`] and [`combine`] (see [`CombineInputs::kernel`]).
/// Every choice writes the same bytes: the sums of combine run in the same slot order in both
/// kernels, so their outputs are bitwise equal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CopyKernel {
    /// The launcher's choice by shape (the measurements are in `kernels/permute/*.cu`).
    #[default]
    Auto,
    /// One warp per token with 16-byte (or narrower) loads and stores: any row size and alignment.
    /// The simple kernel, kept as the oracle of the other two.
    WarpPerToken,
    /// One block per (token, row chunk), rows moved by the bulk-copy engine through shared memory.
    /// Needs rows whose byte size and base addresses are multiples of 16 and, for permute, no
    /// scales; [`Error::Unsupported`] otherwise.
    Bulk,
    /// Permute only: one CTA per SM (a cooperative launch) moving the tokens in grid-wide rounds,
    /// each CTA reading its share of a round's rows into shared memory and then writing their
    /// copies in destination order, so that the DRAM sees reads and writes in separate phases
    /// (4.5% faster than the warp kernel at DeepSeek-V3 T = 16384). Needs what [`CopyKernel::Bulk`]
    /// needs; [`Error::Unsupported`] otherwise, from [`combine`], or where the GPU cannot hold the
    /// whole grid at once (an MPS client with fewer SMs). Its grid barrier uses a word of the
    /// plan, so permutes of one plan never overlap: on different streams, cudarc's event tracking
    /// orders them (with tracking disabled, order them yourself).
    Phased,
}

impl CopyKernel {
    fn code(self) -> i32 {
        (match self {
            CopyKernel::Auto => ffi::MOEKIT_COPY_AUTO,
            CopyKernel::WarpPerToken => ffi::MOEKIT_COPY_WARP,
            CopyKernel::Bulk => ffi::MOEKIT_COPY_BULK,
            CopyKernel::Phased => ffi::MOEKIT_COPY_PHASED,
        }) as i32
    }
}

/// Copies token rows `x` `[tokens, hidden]` to their permuted rows in `xp` `[rows, hidden]`
/// (`rows` ≥ [`RoutingPlan::rows`]; a buffer of `max_rows` rows fits every build)
/// (any element type: bf16, f16, f32, FP8 as bytes…), zero-filling each segment's padding rows.
/// Rows past the padded total are not written. With `scales`, the per-row scales move the same way
/// (padding rows get scale 0).
pub fn permute<T: DeviceRepr>(
    stream: &CudaStream,
    plan: &RoutingPlan,
    hidden: usize,
    x: &impl DevicePtr<T>,
    xp: &mut impl DevicePtrMut<T>,
    scales: Option<RowScales<'_, '_>>,
) -> Result<()> {
    permute_using(stream, plan, hidden, x, xp, scales, CopyKernel::Auto)
}

/// [`permute`] with the kernel chosen by the caller (tests and benchmarks compare them).
pub fn permute_using<T: DeviceRepr>(
    stream: &CudaStream,
    plan: &RoutingPlan,
    hidden: usize,
    x: &impl DevicePtr<T>,
    xp: &mut impl DevicePtrMut<T>,
    scales: Option<RowScales<'_, '_>>,
    kernel: CopyKernel,
) -> Result<()> {
    let tokens = plan.built_tokens()?;
    let cfg = plan.config();
    if hidden == 0 {
        return Err(Error::invalid("hidden", "must be at least 1"));
    }
    if x.len() != tokens * hidden {
        return Err(Error::shape(
            "x",
            format!("{} elements ([{tokens}, {hidden}])", tokens * hidden),
            x.len(),
        ));
    }
    let rows = plan.rows()?;
    if xp.len() < rows * hidden {
        return Err(Error::shape(
            "xp",
            format!(
                "at least {} elements ([rows = {rows}, {hidden}])",
                rows * hidden
            ),
            xp.len(),
        ));
    }
    let scale_cols = scales.as_ref().map_or(0, |s| s.layout.per_row(hidden));
    if let Some(s) = &scales {
        if s.input.len() != tokens * scale_cols {
            return Err(Error::shape(
                "scales.input",
                format!(
                    "{} elements ([{tokens}, {scale_cols}])",
                    tokens * scale_cols
                ),
                s.input.len(),
            ));
        }
        if s.output.len() < rows * scale_cols {
            return Err(Error::shape(
                "scales.output",
                format!(
                    "at least {} elements ([rows = {rows}, {scale_cols}])",
                    rows * scale_cols
                ),
                s.output.len(),
            ));
        }
    }
    if tokens == 0 {
        return Ok(()); // no rows and, with every expert empty, no padding rows
    }
    prepare_launch(stream)?;
    let mut scales = scales;
    let (x_ptr, _g0) = x.device_ptr(stream);
    let (xp_ptr, _g1) = xp.device_ptr_mut(stream);
    let (inverse, _g2) = plan.inverse_map.device_ptr(stream);
    let (counts, _g3) = plan.expert_counts.device_ptr(stream);
    let (offsets, _g4) = plan.expert_offsets.device_ptr(stream);
    // Written by the phased kernel's grid barrier: a write guard, so that a permute of this plan
    // on another stream waits for this one (two grids on one word could release each other's
    // barriers early or, interleaved, leave a CTA waiting forever). A poisoned lock still holds a
    // valid word: the kernels, not the host, change it.
    let mut barrier_word = plan
        .permute_barrier
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let (barrier, _g5) = barrier_word.device_ptr_mut(stream);
    let (s_in, s_out) = match scales.as_mut() {
        Some(RowScales { input, output, .. }) => (
            Some(input.device_ptr(stream)),
            Some(output.device_ptr_mut(stream)),
        ),
        None => (None, None),
    };
    let params = ffi::moekit_permute_params {
        x: x_ptr as *const _,
        xp: xp_ptr as *mut _,
        x_scales: ptr_or_null(&s_in) as *const _,
        xp_scales: ptr_or_null(&s_out) as *mut _,
        inverse_map: inverse as *const i32,
        expert_counts: counts as *const i32,
        expert_offsets: offsets as *const i32,
        tokens: tokens as i64,
        row_bytes: (hidden * std::mem::size_of::<T>()) as i64,
        scale_bytes: (scale_cols * 4) as i64,
        top_k: cfg.top_k as i32,
        num_local: cfg.num_local() as i32,
        align: cfg.align as i32,
        kernel: kernel.code(),
        grid_barrier: barrier as *mut u32,
    };
    // SAFETY: x holds tokens rows and xp (and the scale buffers) at least the build's row bound of
    // the row sizes passed, as checked above; the plan's inverse map only holds rows below that
    // bound and its offsets describe segments inside it; guards keep all buffers alive and ordered.
    let status = unsafe { ffi::moekit_permute(&params, raw_stream(stream)) };
    check_status(status, "launching permute")
}

/// The inputs of [`combine`].
#[derive(Debug)]
pub struct CombineInputs<'a, Y, O> {
    /// Expert outputs in permuted order, `[rows, hidden]`, rows ≥ [`RoutingPlan::rows`].
    pub y: CudaView<'a, Y>,
    /// Routing weights `[tokens, top_k]` f32; `None` sums the rows unweighted (for outputs whose
    /// GEMM epilogue already applied the weights).
    pub weights: Option<CudaView<'a, f32>>,
    /// Shared-expert output `[tokens, hidden]` added to the sum, or `None`.
    pub shared: Option<CudaView<'a, O>>,
    /// Residual `[tokens, hidden]` added to the sum, or `None`.
    pub residual: Option<CudaView<'a, O>>,
    /// The kernel that runs it ([`CopyKernel::Auto`] unless set).
    pub kernel: CopyKernel,
}

impl<'a, Y, O> CombineInputs<'a, Y, O> {
    /// Weighted combine of `y` with `weights`.
    pub fn new(y: CudaView<'a, Y>, weights: Option<CudaView<'a, f32>>) -> Self {
        Self {
            y,
            weights,
            shared: None,
            residual: None,
            kernel: CopyKernel::Auto,
        }
    }

    /// Runs the combine with `kernel` instead of the launcher's choice.
    pub fn kernel(mut self, kernel: CopyKernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// Adds a shared-expert output.
    pub fn shared(mut self, shared: CudaView<'a, O>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Adds a residual.
    pub fn residual(mut self, residual: CudaView<'a, O>) -> Self {
        self.residual = Some(residual);
        self
    }
}

/// `out[t] = Σ_slot weights[t, slot] · y[row(t, slot)] + shared[t] + residual[t]`, accumulated in
/// f32 in slot order with no atomics (bitwise reproducible); slots whose expert is not local add
/// nothing. `out` is `[tokens, hidden]`.
pub fn combine<Y: Element, O: Element>(
    stream: &CudaStream,
    plan: &RoutingPlan,
    hidden: usize,
    inputs: &CombineInputs<'_, Y, O>,
    out: &mut impl DevicePtrMut<O>,
) -> Result<()> {
    let tokens = plan.built_tokens()?;
    let cfg = plan.config();
    if hidden == 0 {
        return Err(Error::invalid("hidden", "must be at least 1"));
    }
    let rows = plan.rows()?;
    if inputs.y.len() < rows * hidden {
        return Err(Error::shape(
            "y",
            format!(
                "at least {} elements ([rows = {rows}, {hidden}])",
                rows * hidden
            ),
            inputs.y.len(),
        ));
    }
    if let Some(w) = &inputs.weights {
        plan.check_weights(w.len())?;
    }
    for (name, t) in [("shared", &inputs.shared), ("residual", &inputs.residual)] {
        if let Some(t) = t {
            if t.len() != tokens * hidden {
                return Err(Error::shape(
                    name,
                    format!("{} elements ([{tokens}, {hidden}])", tokens * hidden),
                    t.len(),
                ));
            }
        }
    }
    if out.len() != tokens * hidden {
        return Err(Error::shape(
            "out",
            format!("{} elements ([{tokens}, {hidden}])", tokens * hidden),
            out.len(),
        ));
    }
    if tokens == 0 {
        return Ok(());
    }
    prepare_launch(stream)?;
    let (y, _g0) = inputs.y.device_ptr(stream);
    let w = inputs.weights.as_ref().map(|w| w.device_ptr(stream));
    let shared = inputs.shared.as_ref().map(|s| s.device_ptr(stream));
    let residual = inputs.residual.as_ref().map(|r| r.device_ptr(stream));
    let (inverse, _g1) = plan.inverse_map.device_ptr(stream);
    let (out_ptr, _g2) = out.device_ptr_mut(stream);
    let params = ffi::moekit_combine_params {
        y: y as *const _,
        weights: ptr_or_null(&w) as *const f32,
        shared: ptr_or_null(&shared) as *const _,
        residual: ptr_or_null(&residual) as *const _,
        out: out_ptr as *mut _,
        inverse_map: inverse as *const i32,
        tokens: tokens as i64,
        hidden: hidden as i64,
        top_k: cfg.top_k as i32,
        y_dtype: Y::DTYPE.code(),
        out_dtype: O::DTYPE.code(),
        kernel: inputs.kernel.code(),
    };
    // SAFETY: y covers the build's row bound (every row the inverse map can name), weights/shared/residual
    // and out have the [tokens, ...] sizes checked above; out is borrowed mutably, so it aliases
    // no input; guards keep the buffers alive and ordered on `stream`.
    let status = unsafe { ffi::moekit_combine(&params, raw_stream(stream)) };
    check_status(status, "launching combine")
}
