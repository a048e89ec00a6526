//! Grouped expert GEMM (bf16): for every local expert `e`, `Y[rows of e] = X[rows of e] · W[e]ᵀ` in
//! one launch, with the rows of each expert given by a [`RoutingPlan`] on the device (no host
//! synchronization: row counts never leave the GPU; empty experts cost nothing).
//!
//! - `X` `[rows, K]` bf16 row-major: the permuted activations ([`crate::permute::permute`]);
//!   `rows` ≥ the plan's row bound for its last build ([`RoutingPlan::rows`], at most `max_rows`).
//! - `W` `[num_local, N, K]` bf16, K contiguous: each expert's `nn.Linear` weight `[out, in]`, as
//!   checkpoints store it.
//! - `Y` `[rows, N_out]` bf16 or f32 row-major, 16-byte aligned (its rows are written in 16-byte
//!   chunks, bf16 outputs by TMA stores); only the rows of each expert's segment are written
//!   (padding rows and rows past the total keep their contents).
//! - `X` and `W` start 16-byte aligned (TMA reads them).
//!
//! Epilogues: plain store; fused SwiGLU for the gate+up projection (`W13 [E, 2I, H]`, gate rows
//! first: writes `silu(gate) · up`, `N_out = I`); a per-row scale by the row's routing weight (folds
//! the weights into the down projection, so combine can be a plain sum; the MoE layer applies them
//! in combine instead, which measured faster).
//!
//! The kernel is a persistent, warp-specialized sm_90a kernel (TMA producer, two WGMMA consumer
//! warpgroups, 128 × 256 tiles; for K ≥ 4096 as 2-CTA clusters whose CTAs each load half of a
//! shared weight tile, multicast to both, unless folding small last tiles into full ones in single
//! CTAs measured faster; [`Implementation::WgmmaSingle`] / [`Implementation::WgmmaPairs`] or
//! `MOEKIT_GEMM_CLUSTER=1`/`2` fix the choice); [`Implementation::Oracle`] runs a plain FMA kernel
//! that tests use as a second opinion.

use cudarc::driver::{CudaStream, CudaView, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::context::{check_aligned16, check_status, prepare_launch, ptr_or_null, raw_stream};
use crate::dtype::{Dtype, Element};
use crate::error::{Error, Result};
use crate::ffi;
use crate::permute::RoutingPlan;

/// Rows per M tile of the WGMMA kernel: build the [`RoutingPlan`] with this `block_m`.
pub const BLOCK_M: usize = ffi::MOEKIT_GEMM_BLOCK_M as usize;

/// What happens to the product before it is stored.
#[derive(Debug)]
pub enum Epilogue<'a> {
    /// `Y = X · Wᵀ`, `N_out = N`.
    Store,
    /// `W` holds gate rows `[0, N/2)` then up rows `[N/2, N)` per expert;
    /// `Y[:, j] = silu(gate_j) · up_j`, `N_out = N/2`.
    SwiGlu,
    /// `Y[r, :] = weights[row_map[r]] · (X · Wᵀ)[r, :]` with the routing weights `[T, k]` (f32).
    RowScale {
        /// Routing weights `[tokens, top_k]` f32, as gating writes them.
        weights: CudaView<'a, f32>,
    },
}

/// Which kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Implementation {
    /// The persistent TMA + WGMMA kernel.
    #[default]
    Wgmma,
    /// One thread per output element, f32 FMA: slow, for tests.
    Oracle,
    /// The WGMMA kernel as single CTAs wherever the heuristic would choose between single CTAs
    /// and 2-CTA clusters (tests and A/B timing; small last tiles still fold where it would fold).
    WgmmaSingle,
    /// The WGMMA kernel as 2-CTA clusters sharing weight tiles wherever the kernel has them
    /// (128 × 256 tiles; single CTAs where no cluster fits the GPU), for tests and A/B timing.
    WgmmaPairs,
}

/// The problem: weight shape and epilogue.
#[derive(Debug)]
pub struct GemmProblem<'a> {
    /// Rows of each expert's weight (output features; `2I` for SwiGLU), a multiple of 8
    /// (16 for SwiGLU).
    pub n: usize,
    /// Reduction dimension (input features), a multiple of 8.
    pub k: usize,
    /// Epilogue.
    pub epilogue: Epilogue<'a>,
    /// Kernel.
    pub implementation: Implementation,
    /// At most this many CTAs of the persistent WGMMA kernel (it runs one per SM); 0: one per
    /// SM. Leaves SMs to concurrent work on other streams (communication kernels of expert
    /// parallelism, for instance): the kernel claims its tiles dynamically, so fewer CTAs only
    /// take longer, and the output bits do not change (2-CTA clusters run as many whole pairs as
    /// fit under the cap; a cap of 1 runs single CTAs instead).
    pub max_ctas: usize,
}

impl<'a> GemmProblem<'a> {
    /// A plain `Y = X · Wᵀ` with the WGMMA kernel.
    pub fn new(n: usize, k: usize) -> Self {
        Self {
            n,
            k,
            epilogue: Epilogue::Store,
            implementation: Implementation::Wgmma,
            max_ctas: 0,
        }
    }

    /// Sets the epilogue.
    pub fn epilogue(mut self, epilogue: Epilogue<'a>) -> Self {
        self.epilogue = epilogue;
        self
    }

    /// Sets the implementation.
    pub fn implementation(mut self, implementation: Implementation) -> Self {
        self.implementation = implementation;
        self
    }

    /// Sets the most CTAs the WGMMA kernel runs ([`GemmProblem::max_ctas`]; 0: one per SM).
    pub fn max_ctas(mut self, ctas: usize) -> Self {
        self.max_ctas = ctas;
        self
    }

    /// Output columns: `n`, or `n / 2` with SwiGLU.
    pub fn n_out(&self) -> usize {
        match self.epilogue {
            Epilogue::SwiGlu => self.n / 2,
            _ => self.n,
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
}

/// Output element types of the grouped GEMM: bf16 or f32.
pub trait GemmOutput: Element + sealed::Sealed {}
impl GemmOutput for bf16 {}
impl GemmOutput for f32 {}

/// Runs the grouped GEMM on `stream` over the experts of `plan` (which must have been built, with
/// `block_m` = [`BLOCK_M`] for the WGMMA kernel). The plan is borrowed mutably for its scheduling
/// counter and its split-K scratch: a one-expert plan with f32 output and too few tiles to fill
/// the GPU (the router GEMM) splits K across CTAs and sums the partial sums in a second kernel, in
/// a fixed order, so reruns stay bitwise identical.
pub fn grouped_gemm<O: GemmOutput>(
    stream: &CudaStream,
    plan: &mut RoutingPlan,
    problem: &GemmProblem<'_>,
    x: &impl DevicePtr<bf16>,
    w: &impl DevicePtr<bf16>,
    y: &mut impl DevicePtrMut<O>,
) -> Result<()> {
    let cfg = plan.config().clone();
    plan.built_tokens()?;
    let (n, k) = (problem.n, problem.k);
    if n < 8 || n % 8 != 0 || n > i32::MAX as usize {
        return Err(Error::invalid(
            "n",
            format!("{n}; must be a positive multiple of 8"),
        ));
    }
    if k < 8 || k % 8 != 0 || k > i32::MAX as usize {
        return Err(Error::invalid(
            "k",
            format!("{k}; must be a positive multiple of 8"),
        ));
    }
    if matches!(problem.epilogue, Epilogue::SwiGlu) && n % 16 != 0 {
        return Err(Error::invalid(
            "n",
            format!("{n}; SwiGLU needs gate and up halves that are multiples of 8"),
        ));
    }
    if problem.implementation != Implementation::Oracle && cfg.block_m != BLOCK_M {
        return Err(Error::invalid(
            "plan",
            format!(
                "the plan's tiles are {} rows; the WGMMA kernel needs block_m = {BLOCK_M}",
                cfg.block_m
            ),
        ));
    }
    let rows = plan.rows()?;
    let n_local = cfg.num_local();
    if x.len() < rows * k {
        return Err(Error::shape(
            "x",
            format!("at least {} elements ([rows = {rows}, {k}])", rows * k),
            x.len(),
        ));
    }
    if w.len() != n_local * n * k {
        return Err(Error::shape(
            "w",
            format!("{} elements ([{n_local}, {n}, {k}])", n_local * n * k),
            w.len(),
        ));
    }
    let n_out = problem.n_out();
    if y.len() < rows * n_out {
        return Err(Error::shape(
            "y",
            format!(
                "at least {} elements ([rows = {rows}, {n_out}])",
                rows * n_out
            ),
            y.len(),
        ));
    }
    if let Epilogue::RowScale { weights } = &problem.epilogue {
        plan.check_weights(weights.len())?;
    }
    prepare_launch(stream)?;
    let (x_ptr, _g0) = x.device_ptr(stream);
    let (w_ptr, _g1) = w.device_ptr(stream);
    let (y_ptr, _g2) = y.device_ptr_mut(stream);
    for (name, ptr) in [("x", x_ptr), ("w", w_ptr)] {
        check_aligned16(name, ptr)?; // TMA
    }
    // The epilogues store 16-byte chunks (bf16 outputs through TMA stores when the map accepts y).
    if y_ptr % 16 != 0 {
        return Err(Error::invalid(
            "y",
            "must start 16-byte aligned (rows are stored in 16-byte chunks)",
        ));
    }
    let RoutingPlan {
        tiles,
        num_tiles,
        expert_offsets,
        expert_counts,
        row_map,
        gemm_tile_counter,
        gemm_partials,
        ..
    } = plan;
    let (counter, _g8) = gemm_tile_counter.device_ptr_mut(stream);
    let partials_capacity = if gemm_partials.len() > 1 {
        gemm_partials.len()
    } else {
        0
    };
    let (partials, _g9) = gemm_partials.device_ptr_mut(stream);
    let (tiles, _g3) = tiles.device_ptr(stream);
    let (num_tiles, _g4) = num_tiles.device_ptr(stream);
    let (offsets, _g5) = expert_offsets.device_ptr(stream);
    let (counts, _g6) = expert_counts.device_ptr(stream);
    let (row_map, _g7) = row_map.device_ptr(stream);
    let scale = match &problem.epilogue {
        Epilogue::RowScale { weights } => Some(weights.device_ptr(stream)),
        _ => None,
    };
    let params = ffi::moekit_grouped_gemm_params {
        x: x_ptr as *const _,
        w: w_ptr as *const _,
        y: y_ptr as *mut _,
        tiles: tiles as *const i32,
        num_tiles: num_tiles as *const i32,
        expert_offsets: offsets as *const i32,
        expert_counts: counts as *const i32,
        row_map: row_map as *const i32,
        row_weights: ptr_or_null(&scale) as *const f32,
        tile_counter: counter as *mut i32,
        partials: if partials_capacity > 0 {
            partials as *mut f32
        } else {
            std::ptr::null_mut()
        },
        partials_capacity: partials_capacity as i64,
        // Every row x holds: the TMA map's bound (tiles read up to 127 rows past a segment).
        x_rows: (x.len() / k) as i64,
        rows: rows as i64,
        n: n as i32,
        k: k as i32,
        num_local: n_local as i32,
        max_tiles: cfg.max_tiles() as i32,
        block_m: cfg.block_m as i32,
        epilogue: match problem.epilogue {
            Epilogue::Store => ffi::MOEKIT_EPILOGUE_STORE,
            Epilogue::SwiGlu => ffi::MOEKIT_EPILOGUE_SWIGLU,
            Epilogue::RowScale { .. } => ffi::MOEKIT_EPILOGUE_ROW_SCALE,
        } as i32,
        out_dtype: match O::DTYPE {
            Dtype::F32 => ffi::MOEKIT_DTYPE_F32,
            _ => ffi::MOEKIT_DTYPE_BF16,
        } as i32,
        implementation: match problem.implementation {
            Implementation::Wgmma => ffi::MOEKIT_GEMM_WGMMA,
            Implementation::Oracle => ffi::MOEKIT_GEMM_ORACLE,
            Implementation::WgmmaSingle => ffi::MOEKIT_GEMM_WGMMA_SINGLE,
            Implementation::WgmmaPairs => ffi::MOEKIT_GEMM_WGMMA_PAIRS,
        } as i32,
        max_ctas: problem.max_ctas.min(i32::MAX as usize) as i32,
        reserved: 0,
    };
    // SAFETY: x covers x_rows x k (at least the build's row bound) and w num_local x n x k
    // elements, y the row bound x n_out, as
    // checked above; x and w are 16-byte aligned for TMA; the plan's buffers have the sizes its
    // config fixes (tiles: 2 x max_tiles, row_map: max_rows) and its build wrote them on a stream
    // ordered before this one by the buffer guards; the routing weights hold tokens x top_k values
    // and row_map only names assignments < tokens x top_k.
    let status = unsafe { ffi::moekit_grouped_gemm(&params, raw_stream(stream)) };
    check_status(status, "launching the grouped GEMM")
}
