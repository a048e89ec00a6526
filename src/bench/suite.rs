//! The crate's benchmark cases, shared by the criterion benches and the `bench_report` example.
//! Names follow `shared/anchors/torch_anchors.py`; each case counts its useful FLOPs and floor
//! bytes the way the anchor script does, so GB/s and TFLOP/s compare directly.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;

use super::{time_iters, time_launches, CaseResult};
use crate::error::{DuringExt, Error, Result};
use crate::gating::{topk_gating, GatingConfig, GatingInputs, ScoreFunction};
use crate::grouped_gemm::{grouped_gemm, Epilogue, GemmProblem, BLOCK_M};
use crate::mla::{
    decompress, write_fresh_tokens, DecompressProblem, FreshTokens, LatentNorm, LatentSource,
    MlaDims, MlaWorkspace, PagedCache, RopeConfig,
};
use crate::permute::{combine, permute_using, CombineInputs, CopyKernel, PlanConfig, RoutingPlan};
use crate::testing::{device_normal, rng, routing, Routing};
use crate::Context;

type Launch = Box<dyn FnMut(usize) -> Result<()>>;

/// A case with its inputs on the device, ready to launch.
pub struct BenchCase {
    /// Case name, `<model>/T<tokens>/<stage>`.
    pub name: String,
    /// Useful FLOPs per launch, if the case does arithmetic.
    pub flops: Option<f64>,
    /// Floor bytes per launch.
    pub bytes: Option<f64>,
    stream: Arc<CudaStream>,
    launch: Launch,
}

impl std::fmt::Debug for BenchCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchCase")
            .field("name", &self.name)
            .finish()
    }
}

impl BenchCase {
    /// Enqueues launch number `i` (inputs rotate with `i`).
    pub fn launch(&mut self, i: usize) -> Result<()> {
        (self.launch)(i)
    }

    /// Median over `reps` event-timed launches after `warmup`.
    pub fn measure(&mut self, warmup: usize, reps: usize) -> Result<CaseResult> {
        let timing = time_launches(&self.stream, warmup, reps, &mut self.launch)?;
        Ok(CaseResult {
            case: self.name.clone(),
            median_us: timing.median_us(),
            flops: self.flops,
            bytes: self.bytes,
        })
    }

    /// Device time of `iters` back-to-back launches (criterion's `iter_custom`).
    pub fn time_iters(&mut self, iters: u64) -> Result<Duration> {
        time_iters(&self.stream, iters, &mut self.launch)
    }
}

type Build = Box<dyn Fn(&Context) -> Result<BenchCase>>;

/// A case not yet set up: building it allocates its inputs.
pub struct CaseSpec {
    /// Case name.
    pub name: String,
    build: Build,
}

impl std::fmt::Debug for CaseSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaseSpec")
            .field("name", &self.name)
            .finish()
    }
}

impl CaseSpec {
    fn new(name: String, build: impl Fn(&Context) -> Result<BenchCase> + 'static) -> Self {
        Self {
            name,
            build: Box::new(build),
        }
    }

    /// Allocates and fills the case's inputs on `ctx`.
    pub fn build(&self, ctx: &Context) -> Result<BenchCase> {
        (self.build)(ctx)
    }
}

/// Which cases [`cases`] lists.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// Token counts of the per-model cases.
    pub tokens: Vec<usize>,
    /// Tokens of the gating sparsity sweep.
    pub sweep_tokens: usize,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        Self {
            tokens: vec![128, 4096, 16384],
            sweep_tokens: 4096,
        }
    }
}

/// (anchor prefix, E, k, hidden, moe_intermediate) of the models the anchors measure; DeepSeek-V3
/// first (the balanced and Zipf GEMM cases take its shape).
const MODELS: [(&str, usize, usize, usize, usize); 3] = [
    ("dsv3", 256, 8, 7168, 2048),
    ("qwen3", 128, 8, 2048, 768),
    ("mixtral", 8, 2, 4096, 14336),
];

fn case(
    ctx: &Context,
    name: &str,
    flops: Option<f64>,
    bytes: Option<f64>,
    launch: Launch,
) -> BenchCase {
    BenchCase {
        name: name.to_string(),
        flops,
        bytes,
        stream: ctx.stream().clone(),
        launch,
    }
}

/// Bytes each ceiling case moves (2 GiB: far past the L2).
const CEILING_BYTES: usize = 2 << 30;

fn copy_case(ctx: &Context, name: &str) -> Result<BenchCase> {
    let stream = ctx.stream().clone();
    let src: CudaSlice<u8> = {
        let mut r = rng(1);
        let block: Vec<u8> = (0..1 << 24).map(|_| rand::RngExt::random(&mut r)).collect();
        // SAFETY: fully written by the copies below.
        let mut buf =
            unsafe { stream.alloc::<u8>(CEILING_BYTES) }.during("allocating the copy source")?;
        for start in (0..CEILING_BYTES).step_by(block.len()) {
            stream
                .memcpy_htod(&block, &mut buf.slice_mut(start..start + block.len()))
                .during("filling the copy source")?;
        }
        buf
    };
    // SAFETY: only written (by the copies being timed).
    let mut dst =
        unsafe { stream.alloc::<u8>(CEILING_BYTES) }.during("allocating the copy target")?;
    let s = stream.clone();
    Ok(case(
        ctx,
        name,
        None,
        Some(2.0 * CEILING_BYTES as f64),
        Box::new(move |_| crate::probe::copy_bytes(&s, &src, &mut dst)),
    ))
}

/// The driver's own device-to-device memcpy (cuMemcpyDtoDAsync), the ceiling torch's copy_ reports.
fn memcpy_case(ctx: &Context, name: &str) -> Result<BenchCase> {
    let stream = ctx.stream().clone();
    let src = device_normal::<bf16>(&stream, &mut rng(1), CEILING_BYTES / 2, 1.0)?;
    // SAFETY: only written (by the copies being timed).
    let mut dst =
        unsafe { stream.alloc::<bf16>(CEILING_BYTES / 2) }.during("allocating the copy target")?;
    let s = stream.clone();
    Ok(case(
        ctx,
        name,
        None,
        Some(2.0 * CEILING_BYTES as f64),
        Box::new(move |_| s.memcpy_dtod(&src, &mut dst).during("cuMemcpyDtoDAsync")),
    ))
}

/// The driver's memset (cuMemsetD8Async) of 2 GiB: the write-only bandwidth, against which a
/// write-dominated stage (permute writes k rows per row read) can be judged. Not a roofline.
fn memset_case(ctx: &Context, name: &str) -> Result<BenchCase> {
    let stream = ctx.stream().clone();
    // SAFETY: only written (by the memsets being timed).
    let mut dst =
        unsafe { stream.alloc::<u8>(CEILING_BYTES) }.during("allocating the memset target")?;
    let s = stream.clone();
    Ok(case(
        ctx,
        name,
        None,
        Some(CEILING_BYTES as f64),
        Box::new(move |_| s.memset_zeros(&mut dst).during("cuMemsetD8Async")),
    ))
}

fn empty_case(ctx: &Context, name: &str) -> Result<BenchCase> {
    let s = ctx.stream().clone();
    Ok(case(
        ctx,
        name,
        None,
        None,
        Box::new(move |_| crate::probe::empty_launch(&s)),
    ))
}

fn gating_case(
    ctx: &Context,
    name: &str,
    cfg: GatingConfig,
    tokens: usize,
    with_bias: bool,
) -> Result<BenchCase> {
    let stream = ctx.stream().clone();
    let (e, k) = (cfg.num_experts, cfg.top_k);
    let bytes_per_set = tokens * e * 4;
    let sets = super::rotation_sets(bytes_per_set, ctx.l2_bytes());
    let mut r = rng(2);
    let logits: Vec<CudaSlice<f32>> = (0..sets)
        .map(|_| device_normal::<f32>(&stream, &mut r, tokens * e, 1.0))
        .collect::<Result<_>>()?;
    let bias = device_normal::<f32>(&stream, &mut r, e, 0.1)?;
    let mut ids = stream.alloc_zeros::<i32>((tokens * k).max(1))?;
    let mut weights = stream.alloc_zeros::<f32>((tokens * k).max(1))?;
    let s = stream.clone();
    Ok(case(
        ctx,
        name,
        None,
        Some((tokens * e * 4 + tokens * k * 8) as f64),
        Box::new(move |i| {
            let mut inputs = GatingInputs::new(logits[i % logits.len()].as_view(), tokens);
            if with_bias {
                inputs = inputs.correction_bias(bias.as_view());
            }
            topk_gating(
                &s,
                &cfg,
                &inputs,
                &mut ids.slice_mut(..tokens * k),
                &mut weights.slice_mut(..tokens * k),
                None,
            )
        }),
    ))
}

/// The read floor of a gate over `tokens` rows of `e` f32 logits: the same rows, rotated past L2
/// the same way, read in the gating kernels' geometry with no selection
/// ([`crate::probe::read_rows`]). GB/s counts the logits read.
fn read_floor_case(ctx: &Context, name: &str, tokens: usize, e: usize) -> Result<BenchCase> {
    let stream = ctx.stream().clone();
    let bytes_per_set = tokens * e * 4;
    let sets = super::rotation_sets(bytes_per_set, ctx.l2_bytes());
    let mut r = rng(2);
    let rows: Vec<CudaSlice<f32>> = (0..sets)
        .map(|_| device_normal::<f32>(&stream, &mut r, tokens * e, 1.0))
        .collect::<Result<_>>()?;
    let mut out = stream.alloc_zeros::<u32>(tokens.max(1))?;
    let s = stream.clone();
    Ok(case(
        ctx,
        name,
        None,
        Some(bytes_per_set as f64),
        Box::new(move |i| {
            // SAFETY: f32 -> u8 reinterpretation of a whole device buffer (no alignment or
            // validity requirement on bytes).
            let bytes = unsafe { rows[i % rows.len()].transmute::<u8>(bytes_per_set) }
                .ok_or_else(|| Error::invalid("rows", "byte view of the logits"))?;
            crate::probe::read_rows(&s, &bytes, e * 4, &mut out)
        }),
    ))
}

fn softmax_topk(e: usize, k: usize) -> GatingConfig {
    GatingConfig {
        num_experts: e,
        top_k: k,
        score: ScoreFunction::Softmax,
        renormalize: true,
        ..GatingConfig::qwen3_moe()
    }
}

/// A plan for `cfg` built from the host-side expert ids `[tokens, k]`.
fn built_plan(
    stream: &Arc<CudaStream>,
    cfg: PlanConfig,
    ids: &[i32],
    tokens: usize,
) -> Result<RoutingPlan> {
    let mut plan = RoutingPlan::new(stream, cfg)?;
    plan.build(stream, &stream.clone_htod(ids)?, tokens)?;
    Ok(plan)
}

/// Device-side routing for a model's permutation cases: uniform ids on the device and a plan.
fn routed(
    ctx: &Context,
    tokens: usize,
    e: usize,
    k: usize,
) -> Result<(CudaSlice<i32>, RoutingPlan)> {
    let stream = ctx.stream();
    let ids = routing(&mut rng(3), tokens, k, e, Routing::Uniform);
    let ids = stream.clone_htod(&ids)?;
    let mut plan = RoutingPlan::new(stream, PlanConfig::new(tokens, k, e))?;
    plan.build(stream, &ids, tokens)?;
    Ok((ids, plan))
}

fn plan_case(ctx: &Context, name: &str, tokens: usize, e: usize, k: usize) -> Result<BenchCase> {
    let (ids, mut plan) = routed(ctx, tokens, e, k)?;
    let s = ctx.stream().clone();
    let m = (tokens * k) as f64;
    Ok(case(
        ctx,
        name,
        None,
        Some(12.0 * m),
        Box::new(move |_| plan.build(&s, &ids, tokens)),
    ))
}

fn permute_case(
    ctx: &Context,
    name: &str,
    tokens: usize,
    e: usize,
    k: usize,
    h: usize,
    kernel: CopyKernel,
) -> Result<BenchCase> {
    let (_ids, plan) = routed(ctx, tokens, e, k)?;
    let stream = ctx.stream().clone();
    let x = device_normal::<bf16>(&stream, &mut rng(4), tokens * h, 1.0)?;
    // SAFETY: written by the permutes being timed, never read.
    let mut xp = unsafe { stream.alloc::<bf16>(plan.config().max_rows() * h) }?;
    let s = stream.clone();
    let bytes = ((tokens * h + tokens * k * h) * 2) as f64;
    Ok(case(
        ctx,
        name,
        None,
        Some(bytes),
        Box::new(move |_| permute_using(&s, &plan, h, &x, &mut xp, None, kernel)),
    ))
}

fn combine_case(
    ctx: &Context,
    name: &str,
    tokens: usize,
    e: usize,
    k: usize,
    h: usize,
    kernel: CopyKernel,
) -> Result<BenchCase> {
    let (_ids, plan) = routed(ctx, tokens, e, k)?;
    let stream = ctx.stream().clone();
    let mut r = rng(5);
    let y = device_normal::<bf16>(&stream, &mut r, plan.config().max_rows() * h, 1.0)?;
    let w = device_normal::<f32>(&stream, &mut r, tokens * k, 0.5)?;
    // SAFETY: written by the combines being timed.
    let mut out = unsafe { stream.alloc::<bf16>(tokens * h) }?;
    let s = stream.clone();
    let bytes = ((tokens * k * h + tokens * h) * 2) as f64;
    Ok(case(
        ctx,
        name,
        None,
        Some(bytes),
        Box::new(move |_| {
            let inputs =
                CombineInputs::<bf16, bf16>::new(y.as_view(), Some(w.as_view())).kernel(kernel);
            combine(&s, &plan, h, &inputs, &mut out)
        }),
    ))
}

#[derive(Clone, Copy, PartialEq)]
enum GemmStage {
    Up,
    UpSwiGlu,
    Down,
}

/// One grouped GEMM of a model: gate+up (`N = 2I`, `K = H`) or down (`N = H`, `K = I`), FLOPs and
/// floor bytes counted as torch_anchors.py counts them (activations in and out once, the weights
/// of the experts that received tokens once).
#[allow(clippy::too_many_arguments)]
fn gemm_case(
    ctx: &Context,
    name: &str,
    tokens: usize,
    (e, k, h, i): (usize, usize, usize, usize),
    stage: GemmStage,
    kind: Routing,
) -> Result<BenchCase> {
    let stream = ctx.stream().clone();
    let ids = routing(&mut rng(3), tokens, k, e, kind);
    let mut touched = vec![false; e];
    ids.iter().for_each(|&id| touched[id as usize] = true);
    let touched = touched.iter().filter(|t| **t).count();
    let cfg = PlanConfig::new(tokens, k, e).block_m(BLOCK_M);
    let mut plan = built_plan(&stream, cfg.clone(), &ids, tokens)?;
    let (n, kdim) = match stage {
        GemmStage::Up | GemmStage::UpSwiGlu => (2 * i, h),
        GemmStage::Down => (h, i),
    };
    let rows = cfg.max_rows();
    let mut r = rng(4);
    let x = device_normal::<bf16>(&stream, &mut r, rows * kdim, 1.0)?;
    let w = device_normal::<bf16>(&stream, &mut r, e * n * kdim, 0.02)?;
    let n_out = if stage == GemmStage::UpSwiGlu {
        n / 2
    } else {
        n
    };
    // SAFETY: written by the GEMMs being timed.
    let mut y = unsafe { stream.alloc::<bf16>(rows * n_out) }?;
    let m = (tokens * k) as f64;
    let flops = 2.0 * m * kdim as f64 * n as f64;
    let bytes = 2.0 * (m * kdim as f64 + m * n_out as f64 + (touched * n * kdim) as f64);
    let s = stream.clone();
    Ok(case(
        ctx,
        name,
        Some(flops),
        Some(bytes),
        Box::new(move |_| {
            let epilogue = if stage == GemmStage::UpSwiGlu {
                Epilogue::SwiGlu
            } else {
                Epilogue::Store
            };
            let p = GemmProblem::new(n, kdim).epilogue(epilogue);
            grouped_gemm(&s, &mut plan, &p, &x, &w, &mut y)
        }),
    ))
}

/// The router GEMM of a model: `logits [T, E] (f32) = x [T, H] · router [E, H]ᵀ` as the layer runs
/// it, a one-expert grouped GEMM (bf16 in, f32 out).
fn router_case(ctx: &Context, name: &str, tokens: usize, e: usize, h: usize) -> Result<BenchCase> {
    let stream = ctx.stream().clone();
    let cfg = PlanConfig::new(tokens, 1, 1).block_m(BLOCK_M);
    let mut plan = built_plan(&stream, cfg.clone(), &vec![0i32; tokens], tokens)?;
    let mut r = rng(5);
    let x = device_normal::<bf16>(&stream, &mut r, cfg.max_rows() * h, 1.0)?;
    let w = device_normal::<bf16>(&stream, &mut r, e * h, 0.02)?;
    // SAFETY: written by the GEMMs being timed.
    let mut y = unsafe { stream.alloc::<f32>(cfg.max_rows() * e) }?;
    let (t, e_f, h_f) = (tokens as f64, e as f64, h as f64);
    let flops = 2.0 * t * h_f * e_f;
    let bytes = 2.0 * (t * h_f + e_f * h_f) + 4.0 * t * e_f;
    let s = stream.clone();
    Ok(case(
        ctx,
        name,
        Some(flops),
        Some(bytes),
        Box::new(move |_| grouped_gemm(&s, &mut plan, &GemmProblem::new(e, h), &x, &w, &mut y)),
    ))
}

/// The whole MoE layer (router through combine) with random weights and the router's routing
/// (uniform: [`crate::moe::MoeLayer::random`]'s router spreads the tokens evenly).
fn layer_case(
    ctx: &Context,
    name: &str,
    tokens: usize,
    cfg: crate::moe::MoeConfig,
) -> Result<BenchCase> {
    let stream = ctx.stream().clone();
    let flops = crate::moe::Stage::ALL
        .into_iter()
        .map(|stage| stage.cost(&cfg, tokens, cfg.num_experts()).0)
        .sum();
    let mut layer = crate::moe::MoeLayer::random(&stream, cfg.clone(), tokens, 42, |_| {})?;
    let x = device_normal::<bf16>(&stream, &mut rng(6), tokens * cfg.hidden, 1.0)?;
    // SAFETY: written by the forwards being timed.
    let mut out = unsafe { stream.alloc::<bf16>(tokens * cfg.hidden) }?;
    let st = stream.clone();
    Ok(case(
        ctx,
        name,
        Some(flops),
        None,
        Box::new(move |_| layer.forward(&st, &x.as_view(), tokens, &mut out.as_view_mut())),
    ))
}

/// MLA decompression of `tokens` tokens with `heads` heads (DeepSeek dims) from contiguous cache
/// rows, or with `block_size` from a paged cache: 8 equal sequences at unaligned starts through a
/// shuffled block table. FLOPs and bytes as torch_anchors.py counts them.
fn mla_case(
    ctx: &Context,
    name: &str,
    tokens: usize,
    heads: usize,
    block_size: Option<usize>,
) -> Result<BenchCase> {
    let stream = ctx.stream().clone();
    let dims = MlaDims::deepseek_v3(heads);
    let row = dims.cache_row();
    let mut r = rng(7);
    let w = device_normal::<bf16>(
        &stream,
        &mut r,
        dims.kv_b_proj_rows() * dims.kv_lora_rank,
        0.02,
    )?;
    let p = DecompressProblem::new(dims, tokens);
    // SAFETY: written by the decompressions being timed.
    let mut k = unsafe { stream.alloc::<bf16>(tokens * heads * dims.k_head_dim()) }?;
    // SAFETY: as above.
    let mut v = unsafe { stream.alloc::<bf16>(tokens * heads * dims.v_head_dim) }?;
    let mut ws = MlaWorkspace::new(&stream, &dims, tokens)?;
    let t = tokens as f64;
    let flops = dims.decompress_flops(tokens);
    let bytes = 2.0
        * (t * row as f64
            + (dims.kv_b_proj_rows() * dims.kv_lora_rank) as f64
            + t * (heads * (dims.k_head_dim() + dims.v_head_dim)) as f64);
    let s = stream.clone();
    let launch: Launch = match block_size {
        None => {
            let cache = device_normal::<bf16>(&stream, &mut r, tokens * row, 1.0)?;
            Box::new(move |_| {
                let source = LatentSource::cache_rows(&cache, &dims);
                decompress(&s, &p, &source, &w, &mut k, &mut v, &mut ws)
            })
        }
        Some(bs) => {
            let seqs = 8;
            let per_seq = tokens.div_ceil(seqs);
            let starts: Vec<i32> = (0..seqs).map(|i| (i * 37 % bs) as i32).collect();
            let blocks_per_seq = (bs + per_seq).div_ceil(bs);
            let num_blocks = seqs * blocks_per_seq;
            let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
            rand::seq::SliceRandom::shuffle(pool.as_mut_slice(), &mut r);
            let cu: Vec<i32> = (0..=seqs)
                .map(|i| (i * per_seq).min(tokens) as i32)
                .collect();
            let cache = device_normal::<bf16>(&stream, &mut r, num_blocks * bs * row, 1.0)?;
            let table = stream.clone_htod(&pool)?;
            let cu = stream.clone_htod(&cu)?;
            let starts = stream.clone_htod(&starts)?;
            Box::new(move |_| {
                let source = LatentSource::Paged(PagedCache {
                    cache: cache.slice(..),
                    block_size: bs,
                    block_table: table.slice(..),
                    max_blocks_per_seq: blocks_per_seq,
                    cu_seqlens: cu.slice(..),
                    seq_starts: Some(starts.slice(..)),
                });
                decompress(&s, &p, &source, &w, &mut k, &mut v, &mut ws)
            })
        }
    };
    Ok(case(ctx, name, Some(flops), Some(bytes), launch))
}

/// The fresh-token cache write (RMSNorm + RoPE) of `tokens` DeepSeek tokens into shuffled slots.
fn fresh_case(ctx: &Context, name: &str, tokens: usize) -> Result<BenchCase> {
    let stream = ctx.stream().clone();
    let dims = MlaDims::deepseek_v3(1);
    let row = dims.cache_row();
    let mut r = rng(8);
    let kv_a = device_normal::<bf16>(&stream, &mut r, tokens * row, 1.0)?;
    let gamma = device_normal::<bf16>(&stream, &mut r, dims.kv_lora_rank, 1.0)?;
    let positions: Vec<i64> = (0..tokens as i64).map(|i| (i * 7919) % 163_840).collect();
    let mut slots: Vec<i64> = (0..tokens as i64).collect();
    rand::seq::SliceRandom::shuffle(slots.as_mut_slice(), &mut r);
    let positions = stream.clone_htod(&positions)?;
    let slots = stream.clone_htod(&slots)?;
    // SAFETY: written by the launches being timed (every slot is a token's).
    let mut cache = unsafe { stream.alloc::<bf16>(tokens * row) }?;
    let rope = RopeConfig::deepseek_v3();
    let bytes = 2.0 * (2 * tokens * row + dims.kv_lora_rank) as f64 + 16.0 * tokens as f64;
    let s = stream.clone();
    Ok(case(
        ctx,
        name,
        None,
        Some(bytes),
        Box::new(move |_| {
            let input = FreshTokens {
                kv_a: kv_a.slice(..),
                kv_a_stride: row,
                positions: positions.slice(..),
                tokens,
            };
            let norm = LatentNorm {
                gamma: gamma.slice(..),
                eps: 1e-6,
            };
            write_fresh_tokens(
                &s,
                &dims,
                &input,
                &norm,
                &rope,
                &mut cache,
                Some(&slots.slice(..)),
            )
        }),
    ))
}

/// Every case of the crate, in report order.
pub fn cases(opts: &SuiteOptions) -> Vec<CaseSpec> {
    let mut v = vec![
        CaseSpec::new("ceiling/copy-2GiB".into(), |ctx| {
            copy_case(ctx, "ceiling/copy-2GiB")
        }),
        CaseSpec::new("ceiling/memcpy-2GiB".into(), |ctx| {
            memcpy_case(ctx, "ceiling/memcpy-2GiB")
        }),
        CaseSpec::new("reference/memset-2GiB".into(), |ctx| {
            memset_case(ctx, "reference/memset-2GiB")
        }),
        CaseSpec::new("launch/empty-kernel".into(), |ctx| {
            empty_case(ctx, "launch/empty-kernel")
        }),
    ];
    for &t in &opts.tokens {
        let name = format!("dsv3/T{t}/gate-noaux-tc");
        v.push(CaseSpec::new(name.clone(), move |ctx| {
            gating_case(ctx, &name, GatingConfig::deepseek_v3(), t, true)
        }));
        let name = format!("dsv3/T{t}/gate-read-floor");
        v.push(CaseSpec::new(name.clone(), move |ctx| {
            read_floor_case(ctx, &name, t, 256)
        }));
    }
    for (model, e, k, h, i) in MODELS {
        for &t in &opts.tokens {
            let name = format!("{model}/T{t}/gate-softmax-topk");
            v.push(CaseSpec::new(name.clone(), move |ctx| {
                gating_case(ctx, &name, softmax_topk(e, k), t, false)
            }));
            let name = format!("{model}/T{t}/plan");
            v.push(CaseSpec::new(name.clone(), move |ctx| {
                plan_case(ctx, &name, t, e, k)
            }));
            // The launcher's choice under the anchor's name, then each kernel forced (the
            // measurements behind the choice).
            for (suffix, kernel) in [
                ("", CopyKernel::Auto),
                ("-warp", CopyKernel::WarpPerToken),
                ("-bulk", CopyKernel::Bulk),
                ("-phased", CopyKernel::Phased),
            ] {
                let name = format!("{model}/T{t}/permute{suffix}");
                v.push(CaseSpec::new(name.clone(), move |ctx| {
                    permute_case(ctx, &name, t, e, k, h, kernel)
                }));
                if kernel == CopyKernel::Phased {
                    continue; // permute only
                }
                let name = format!("{model}/T{t}/combine{suffix}");
                v.push(CaseSpec::new(name.clone(), move |ctx| {
                    combine_case(ctx, &name, t, e, k, h, kernel)
                }));
            }
            let shape = (e, k, h, i);
            for (stage, suffix) in [
                (GemmStage::Up, "gemm-up"),
                (GemmStage::Down, "gemm-down"),
                (GemmStage::UpSwiGlu, "gemm-up-swiglu"),
            ] {
                let name = format!("{model}/T{t}/{suffix}");
                v.push(CaseSpec::new(name.clone(), move |ctx| {
                    gemm_case(ctx, &name, t, shape, stage, Routing::Uniform)
                }));
            }
        }
    }
    for (model, e, _, h, _) in MODELS {
        for &t in &opts.tokens {
            let name = format!("{model}/T{t}/router");
            v.push(CaseSpec::new(name.clone(), move |ctx| {
                router_case(ctx, &name, t, e, h)
            }));
        }
    }
    for (model, cfg) in [
        ("dsv3", crate::moe::MoeConfig::deepseek_v3()),
        ("qwen3", crate::moe::MoeConfig::qwen3_30b_a3b()),
        ("mixtral", crate::moe::MoeConfig::mixtral_8x7b()),
    ] {
        for &t in &opts.tokens {
            let name = format!("{model}/T{t}/layer");
            let cfg = cfg.clone();
            v.push(CaseSpec::new(name.clone(), move |ctx| {
                layer_case(ctx, &name, t, cfg.clone())
            }));
        }
    }
    // The same GEMMs with every expert at exactly T·k/E rows: against the uniform cases, what the
    // ragged last M tiles of uniform routing cost (a tile of a few rows streams a whole W tile;
    // BENCHMARKS.md run 25).
    let (_, e, k, h, i) = MODELS[0];
    let dsv3 = (e, k, h, i);
    for &t in &opts.tokens {
        for (stage, suffix) in [
            (GemmStage::Up, "gemm-up-balanced"),
            (GemmStage::UpSwiGlu, "gemm-up-swiglu-balanced"),
            (GemmStage::Down, "gemm-down-balanced"),
        ] {
            let name = format!("dsv3/T{t}/{suffix}");
            v.push(CaseSpec::new(name.clone(), move |ctx| {
                gemm_case(ctx, &name, t, dsv3, stage, Routing::Balanced)
            }));
        }
    }
    // The same FLOPs as one dense GEMM through the grouped kernel (one expert holding all T·k
    // rows): the ceiling a grouped GEMM of that case could reach on this machine at its clocks,
    // timed the same way (scripts/dense_ceiling.py times cuBLAS on the same shapes under the same
    // names). The routed cases pay the ragged M tiles and the weight traffic on top.
    for (model, _, k, h, i) in MODELS {
        for &t in &opts.tokens {
            let dense = (1, 1, h, i);
            for (stage, suffix) in [
                (GemmStage::Up, "gemm-up-dense"),
                (GemmStage::Down, "gemm-down-dense"),
            ] {
                let name = format!("{model}/T{t}/{suffix}");
                v.push(CaseSpec::new(name.clone(), move |ctx| {
                    gemm_case(ctx, &name, t * k, dense, stage, Routing::Uniform)
                }));
            }
        }
    }
    for &t in &opts.tokens {
        let name = format!("dsv3/T{t}/gemm-up-zipf1.2");
        v.push(CaseSpec::new(name.clone(), move |ctx| {
            gemm_case(ctx, &name, t, dsv3, GemmStage::Up, Routing::Zipf(1.2))
        }));
    }
    for t in [1024, 8192, 32768] {
        let name = format!("mla/T{t}/decompress");
        v.push(CaseSpec::new(name.clone(), move |ctx| {
            mla_case(ctx, &name, t, 128, None)
        }));
        let name = format!("mla/T{t}/decompress-paged64");
        v.push(CaseSpec::new(name.clone(), move |ctx| {
            mla_case(ctx, &name, t, 128, Some(64))
        }));
    }
    for t in [1024, 8192, 32768] {
        // The decompression's FLOPs as one dense GEMM through the grouped kernel: [T, r] times
        // kv_b_proj [H·(d_nope + d_v), r]ᵀ, no K/V layout (a plain [T, 32768] output).
        let name = format!("mla/T{t}/gemm-dense");
        v.push(CaseSpec::new(name.clone(), move |ctx| {
            gemm_case(
                ctx,
                &name,
                t,
                (1, 1, 512, 128 * 256 / 2),
                GemmStage::Up,
                Routing::Uniform,
            )
        }));
    }
    for heads in [16, 12] {
        let t = 8192;
        let name = format!("mla/T{t}/decompress-H{heads}");
        v.push(CaseSpec::new(name.clone(), move |ctx| {
            mla_case(ctx, &name, t, heads, None)
        }));
    }
    for t in [4096, 16384] {
        let name = format!("mla/T{t}/fresh-tokens");
        v.push(CaseSpec::new(name.clone(), move |ctx| {
            fresh_case(ctx, &name, t)
        }));
    }
    let t = opts.sweep_tokens;
    for e in [64, 256, 1024, 2048] {
        let name = format!("sweep/T{t}/E{e}/gate-read-floor");
        v.push(CaseSpec::new(name.clone(), move |ctx| {
            read_floor_case(ctx, &name, t, e)
        }));
        for k in [1, 2, 8, 16] {
            let name = format!("sweep/T{t}/E{e}-k{k}/gate-softmax-topk");
            v.push(CaseSpec::new(name.clone(), move |ctx| {
                gating_case(ctx, &name, softmax_topk(e, k), t, false)
            }));
        }
    }
    v
}
