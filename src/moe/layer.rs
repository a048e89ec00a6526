//! The MoE layer on the GPU: router GEMM → gating → routing plan → permute → grouped GEMM with
//! fused SwiGLU → down grouped GEMM → combine weighted by the routing weights (+ the shared
//! expert).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use half::bf16;

use super::config::{MoeConfig, MoeWeights};
use crate::error::{DuringExt, Error, Result};
use crate::gating::{topk_gating, GatingInputs};
use crate::grouped_gemm::{grouped_gemm, Epilogue, GemmProblem, BLOCK_M};
use crate::permute::{combine, permute, CombineInputs, PlanConfig, RoutingPlan};

/// The stages of a forward, in order; [`MoeLayer::forward_with`] reports each as it is enqueued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// `logits [T, E] (f32) = x · routerᵀ` (bf16 inputs, f32 accumulation and output).
    Router,
    /// Top-k gating: expert ids and routing weights.
    Gating,
    /// The routing plan.
    Plan,
    /// Token rows to expert-sorted rows.
    Permute,
    /// Gate+up grouped GEMM with fused SwiGLU.
    GemmUp,
    /// Down grouped GEMM (plain; combine applies the routing weights).
    GemmDown,
    /// The shared expert: two dense GEMMs (none when the layer has no shared expert).
    Shared,
    /// The routing-weighted sum of each token's expert rows, plus the shared expert's output.
    Combine,
}

impl Stage {
    /// Every stage, in forward order.
    pub const ALL: [Stage; 8] = [
        Stage::Router,
        Stage::Gating,
        Stage::Plan,
        Stage::Permute,
        Stage::GemmUp,
        Stage::GemmDown,
        Stage::Shared,
        Stage::Combine,
    ];

    /// Lower-case name, as in benchmark case names.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Router => "router",
            Stage::Gating => "gating",
            Stage::Plan => "plan",
            Stage::Permute => "permute",
            Stage::GemmUp => "gemm-up",
            Stage::GemmDown => "gemm-down",
            Stage::Shared => "shared",
            Stage::Combine => "combine",
        }
    }

    /// (FLOPs, floor bytes) of this stage in a forward of `tokens` tokens whose routing touched
    /// `touched` experts: each input read once and each output written once, counted as the
    /// crate's benchmark cases (and torch_anchors.py) count them. A stage without math has 0 FLOPs.
    pub fn cost(self, cfg: &MoeConfig, tokens: usize, touched: usize) -> (f64, f64) {
        let (e, k, h, i, s) = (
            cfg.num_experts() as f64,
            cfg.top_k() as f64,
            cfg.hidden as f64,
            cfg.intermediate as f64,
            cfg.shared_intermediate as f64,
        );
        let t = tokens as f64;
        let m = t * k;
        let touched = touched as f64;
        match self {
            Stage::Router => (2.0 * t * h * e, 2.0 * (t * h + e * h) + 4.0 * t * e),
            Stage::Gating => (0.0, 4.0 * t * e + 8.0 * t * k),
            Stage::Plan => (0.0, 12.0 * m),
            Stage::Permute => (0.0, 2.0 * (t * h + m * h)),
            Stage::GemmUp => (
                2.0 * m * h * 2.0 * i,
                2.0 * (m * h + m * i + touched * 2.0 * i * h),
            ),
            Stage::GemmDown => (2.0 * m * i * h, 2.0 * (m * i + m * h + touched * h * i)),
            Stage::Shared => (
                6.0 * t * h * s,
                2.0 * (t * h + 3.0 * s * h + 2.0 * t * s + t * h),
            ),
            Stage::Combine => (0.0, 2.0 * (m * h + 2.0 * t * h)),
        }
    }
}

/// Device buffers sized once from (max_tokens, config): a forward allocates nothing and never
/// synchronizes with the host, so it can be captured in a CUDA graph.
#[derive(Debug)]
struct Workspace {
    /// `[max_tokens]` zeros: every token to the one "expert" of the dense GEMMs.
    token_ids: CudaSlice<i32>,
    /// One expert, k = 1: row r is token r (router and shared-expert GEMMs).
    token_plan: RoutingPlan,
    plan: RoutingPlan,
    logits: CudaSlice<f32>,
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    xp: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    yd: CudaSlice<bf16>,
    shared_act: Option<CudaSlice<bf16>>,
    shared_out: Option<CudaSlice<bf16>>,
}

/// An MoE block's weights on the GPU with the workspace of its forward. See the module docs of
/// [`crate::moe`] for the computation and layouts.
#[derive(Debug)]
pub struct MoeLayer {
    cfg: MoeConfig,
    max_tokens: usize,
    w: DeviceWeights,
    ws: Workspace,
}

/// The weights on the device (the layouts of [`MoeWeights`]).
#[derive(Debug)]
struct DeviceWeights {
    router: CudaSlice<bf16>,
    router_bias: Option<CudaSlice<f32>>,
    correction_bias: Option<CudaSlice<f32>>,
    w13: CudaSlice<bf16>,
    w2: CudaSlice<bf16>,
    shared_w13: Option<CudaSlice<bf16>>,
    shared_w2: Option<CudaSlice<bf16>>,
}

impl MoeLayer {
    /// Uploads `weights` and sizes the workspace for up to `max_tokens` tokens per forward.
    pub fn new(
        stream: &Arc<CudaStream>,
        cfg: MoeConfig,
        weights: &MoeWeights,
        max_tokens: usize,
    ) -> Result<Self> {
        cfg.validate()?;
        weights.validate(&cfg)?;
        let up = |v: &[bf16]| stream.clone_htod(v).during("uploading MoE weights");
        let up32 = |v: &[f32]| stream.clone_htod(v).during("uploading MoE weights");
        let w = DeviceWeights {
            router: up(&weights.router)?,
            router_bias: weights.router_bias.as_deref().map(up32).transpose()?,
            correction_bias: weights.correction_bias.as_deref().map(up32).transpose()?,
            w13: up(&weights.w13)?,
            w2: up(&weights.w2)?,
            shared_w13: weights.shared_w13.as_deref().map(up).transpose()?,
            shared_w2: weights.shared_w2.as_deref().map(up).transpose()?,
        };
        Self::assemble(stream, cfg, w, max_tokens)
    }

    /// A layer with random weights generated on the device (normal, std 0.02; a zero correction
    /// bias when the rule uses one), for demos and benchmarks: a DeepSeek-V3 block is 22.5 GB.
    /// Its router spreads random tokens evenly over the experts (uniform routing in expectation).
    /// `progress` is told what is being made.
    pub fn random(
        stream: &Arc<CudaStream>,
        cfg: MoeConfig,
        max_tokens: usize,
        seed: u64,
        mut progress: impl FnMut(&str),
    ) -> Result<Self> {
        use crate::testing::{device_normal, rng};
        cfg.validate()?;
        let (e, h, i, s) = (
            cfg.num_experts(),
            cfg.hidden,
            cfg.intermediate,
            cfg.shared_intermediate,
        );
        let mut r = rng(seed);
        progress("router");
        let router = device_normal::<bf16>(stream, &mut r, e * h, 0.02)?;
        // The sigmoid rules (DeepSeek-V3, Kimi K2) select with a correction bias: a trained
        // model's is what balances its expert loads. Random values do the opposite: with std 0.1
        // (until run 35) over sigmoid scores that saturate near 1, the bias decided the ranking
        // and every token went to the same few experts (DeepSeek-V3 T = 4096: 178 of 256 experts
        // hit, median 16 rows, max 1076), so the layer read 70% of its weights and measured a
        // routing no benchmark names. Zero keeps the routing uniform and the bias path running.
        let uses_correction = cfg.gating.score == crate::gating::ScoreFunction::Sigmoid;
        let correction_bias = if uses_correction {
            Some(
                stream
                    .alloc_zeros::<f32>(e)
                    .during("allocating the correction bias")?,
            )
        } else {
            None
        };
        progress(&format!(
            "gate+up projections [{e}, {}, {h}] ({:.1} GB)",
            2 * i,
            (e * 2 * i * h * 2) as f64 / 1e9
        ));
        let w13 = device_normal::<bf16>(stream, &mut r, e * 2 * i * h, 0.02)?;
        progress(&format!(
            "down projections [{e}, {h}, {i}] ({:.1} GB)",
            (e * i * h * 2) as f64 / 1e9
        ));
        let w2 = device_normal::<bf16>(stream, &mut r, e * h * i, 0.02)?;
        let (shared_w13, shared_w2) = if s > 0 {
            progress("shared expert");
            (
                Some(device_normal::<bf16>(stream, &mut r, 2 * s * h, 0.02)?),
                Some(device_normal::<bf16>(stream, &mut r, h * s, 0.02)?),
            )
        } else {
            (None, None)
        };
        let w = DeviceWeights {
            router,
            router_bias: None,
            correction_bias,
            w13,
            w2,
            shared_w13,
            shared_w2,
        };
        Self::assemble(stream, cfg, w, max_tokens)
    }

    fn assemble(
        stream: &Arc<CudaStream>,
        cfg: MoeConfig,
        w: DeviceWeights,
        max_tokens: usize,
    ) -> Result<Self> {
        if max_tokens == 0 {
            return Err(Error::invalid("max_tokens", "must be at least 1"));
        }
        let (e, k, h, i, s) = (
            cfg.num_experts(),
            cfg.top_k(),
            cfg.hidden,
            cfg.intermediate,
            cfg.shared_intermediate,
        );
        let plan_cfg = PlanConfig::new(max_tokens, k, e).block_m(BLOCK_M);
        let rows = plan_cfg.max_rows();
        let zeros = |n: usize| stream.alloc_zeros(n).during("allocating the MoE workspace");
        let zeros16 = |n: usize| {
            stream
                .alloc_zeros::<bf16>(n)
                .during("allocating the MoE workspace")
        };
        let ws = Workspace {
            token_ids: zeros(max_tokens)?,
            token_plan: RoutingPlan::new(
                stream,
                PlanConfig::new(max_tokens, 1, 1).block_m(BLOCK_M),
            )?,
            plan: RoutingPlan::new(stream, plan_cfg)?,
            logits: stream
                .alloc_zeros::<f32>(max_tokens * e)
                .during("allocating the MoE workspace")?,
            ids: zeros(max_tokens * k)?,
            weights: stream
                .alloc_zeros::<f32>(max_tokens * k)
                .during("allocating the MoE workspace")?,
            xp: zeros16(rows * h)?,
            act: zeros16(rows * i)?,
            yd: zeros16(rows * h)?,
            shared_act: if s > 0 {
                Some(zeros16(max_tokens * s)?)
            } else {
                None
            },
            shared_out: if s > 0 {
                Some(zeros16(max_tokens * h)?)
            } else {
                None
            },
        };
        Ok(Self {
            cfg,
            max_tokens,
            w,
            ws,
        })
    }

    /// The block's shape and routing rule.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// The most tokens a forward takes.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// `out [T, H] = MoE(x [T, H])`, both bf16 row-major. Enqueues every stage on `stream` and
    /// returns: no host synchronization, no allocation.
    pub fn forward(
        &mut self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, bf16>,
        tokens: usize,
        out: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        self.forward_with(stream, x, tokens, out, |_| Ok(()))
    }

    /// [`MoeLayer::forward`], calling `after(stage)` once each stage is enqueued (to record events
    /// between stages, for instance).
    pub fn forward_with(
        &mut self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, bf16>,
        tokens: usize,
        out: &mut CudaViewMut<'_, bf16>,
        mut after: impl FnMut(Stage) -> Result<()>,
    ) -> Result<()> {
        self.check_io(x, tokens, out)?;
        if tokens == 0 {
            return Ok(());
        }
        let (e, k, h) = (self.cfg.num_experts(), self.cfg.top_k(), self.cfg.hidden);
        self.build_token_plan(stream, tokens)?;
        // Router: a one-expert grouped GEMM over the token rows, f32 out.
        let ws = &mut self.ws;
        let mut logits = ws.logits.slice_mut(..tokens * e);
        grouped_gemm(
            stream,
            &mut ws.token_plan,
            &GemmProblem::new(e, h),
            x,
            &self.w.router,
            &mut logits,
        )?;
        after(Stage::Router)?;
        let mut inputs = GatingInputs::new(ws.logits.slice(..tokens * e), tokens);
        if let Some(b) = &self.w.router_bias {
            inputs = inputs.router_bias(b.as_view());
        }
        if let Some(b) = &self.w.correction_bias {
            inputs = inputs.correction_bias(b.as_view());
        }
        topk_gating(
            stream,
            &self.cfg.gating,
            &inputs,
            &mut ws.ids.slice_mut(..tokens * k),
            &mut ws.weights.slice_mut(..tokens * k),
            None,
        )?;
        after(Stage::Gating)?;
        self.experts(stream, x, tokens, out, &mut after)
    }

    /// The forward with a given routing instead of the router's: `ids` `[T, k]` i32 and
    /// `weights` `[T, k]` f32 on the device (synthetic routings for benchmarks: Zipf, all-to-one).
    pub fn forward_routed(
        &mut self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, bf16>,
        tokens: usize,
        ids: &CudaView<'_, i32>,
        weights: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        self.check_io(x, tokens, out)?;
        let k = self.cfg.top_k();
        if ids.len() != tokens * k || weights.len() != tokens * k {
            return Err(Error::shape(
                "ids / weights",
                format!("{} elements each ([{tokens}, {k}])", tokens * k),
                format!("{} and {}", ids.len(), weights.len()),
            ));
        }
        if tokens == 0 {
            return Ok(());
        }
        self.build_token_plan(stream, tokens)?;
        stream
            .memcpy_dtod(ids, &mut self.ws.ids.slice_mut(..tokens * k))
            .during("copying the routing")?;
        stream
            .memcpy_dtod(weights, &mut self.ws.weights.slice_mut(..tokens * k))
            .during("copying the routing")?;
        self.experts(stream, x, tokens, out, &mut |_| Ok(()))
    }

    /// The routing of the last forward: expert ids `[max_tokens, k]` and weights (the first
    /// `tokens * k` entries belong to it).
    pub fn routing(&self) -> (&CudaSlice<i32>, &CudaSlice<f32>) {
        (&self.ws.ids, &self.ws.weights)
    }

    /// Copies expert `e`'s gate+up `[2I, H]` and down `[H, I]` weights to the host (for checks
    /// against the CPU reference).
    pub fn download_expert(
        &self,
        stream: &Arc<CudaStream>,
        e: usize,
    ) -> Result<(Vec<bf16>, Vec<bf16>)> {
        let (h, i) = (self.cfg.hidden, self.cfg.intermediate);
        if e >= self.cfg.num_experts() {
            return Err(Error::invalid(
                "e",
                format!("expert {e} of {}", self.cfg.num_experts()),
            ));
        }
        let a = stream
            .clone_dtoh(&self.w.w13.slice(e * 2 * i * h..(e + 1) * 2 * i * h))
            .during("downloading an expert")?;
        let b = stream
            .clone_dtoh(&self.w.w2.slice(e * h * i..(e + 1) * h * i))
            .during("downloading an expert")?;
        Ok((a, b))
    }

    /// Copies the router, its biases and the shared expert to the host: with
    /// [`MoeLayer::download_expert`], everything the CPU reference needs.
    pub fn download_dense(&self, stream: &Arc<CudaStream>) -> Result<MoeWeights> {
        let get = |s: &CudaSlice<bf16>| stream.clone_dtoh(s).during("downloading weights");
        let get32 = |s: &CudaSlice<f32>| stream.clone_dtoh(s).during("downloading weights");
        Ok(MoeWeights {
            router: get(&self.w.router)?,
            router_bias: self.w.router_bias.as_ref().map(get32).transpose()?,
            correction_bias: self.w.correction_bias.as_ref().map(get32).transpose()?,
            w13: Vec::new(),
            w2: Vec::new(),
            shared_w13: self.w.shared_w13.as_ref().map(get).transpose()?,
            shared_w2: self.w.shared_w2.as_ref().map(get).transpose()?,
        })
    }

    fn check_io(
        &self,
        x: &CudaView<'_, bf16>,
        tokens: usize,
        out: &CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        let h = self.cfg.hidden;
        if tokens > self.max_tokens {
            return Err(Error::invalid(
                "tokens",
                format!(
                    "{tokens} tokens but the layer was sized for at most {}",
                    self.max_tokens
                ),
            ));
        }
        if x.len() != tokens * h {
            return Err(Error::shape(
                "x",
                format!("{} elements ([{tokens}, {h}])", tokens * h),
                x.len(),
            ));
        }
        if out.len() != tokens * h {
            return Err(Error::shape(
                "out",
                format!("{} elements ([{tokens}, {h}])", tokens * h),
                out.len(),
            ));
        }
        Ok(())
    }

    /// Builds the token plan (one expert holding rows 0..T) for this forward. It depends on T
    /// alone, but it is rebuilt every forward: a host-side "already built for T" flag would be
    /// wrong under CUDA graphs (a graph captured at T without the build replays whatever plan the
    /// device holds then). Three small kernels, a few µs.
    fn build_token_plan(&mut self, stream: &Arc<CudaStream>, tokens: usize) -> Result<()> {
        let ids = self.ws.token_ids.slice(..tokens);
        self.ws.token_plan.build(stream, &ids, tokens)
    }

    /// Plan, permute, the two grouped GEMMs, the shared expert and combine.
    fn experts(
        &mut self,
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, bf16>,
        tokens: usize,
        out: &mut CudaViewMut<'_, bf16>,
        after: &mut impl FnMut(Stage) -> Result<()>,
    ) -> Result<()> {
        let (k, h, i, s) = (
            self.cfg.top_k(),
            self.cfg.hidden,
            self.cfg.intermediate,
            self.cfg.shared_intermediate,
        );
        let ws = &mut self.ws;
        ws.plan.build(stream, &ws.ids.slice(..tokens * k), tokens)?;
        after(Stage::Plan)?;
        permute(stream, &ws.plan, h, x, &mut ws.xp, None)?;
        after(Stage::Permute)?;
        let up = GemmProblem::new(2 * i, h).epilogue(Epilogue::SwiGlu);
        grouped_gemm(stream, &mut ws.plan, &up, &ws.xp, &self.w.w13, &mut ws.act)?;
        after(Stage::GemmUp)?;
        // The routing weights are applied by combine (in f32, on the way into its sum), not by the
        // down projection's row-scale epilogue: that epilogue stages f32 (4 passes per 256-column
        // tile against 2 for bf16), and the plain one made the layer 1.1-1.7% faster at
        // DeepSeek-V3 T = 4096 and 4-6% at Qwen3 T = 4096 (BENCHMARKS.md run 28 call 6). The
        // expert output is now rounded to bf16 before its weight multiplies it in f32 (before,
        // the weighted product was rounded): one rounding either way.
        let down = GemmProblem::new(h, i);
        grouped_gemm(stream, &mut ws.plan, &down, &ws.act, &self.w.w2, &mut ws.yd)?;
        after(Stage::GemmDown)?;
        if let (Some(w13), Some(w2), Some(act), Some(y)) = (
            &self.w.shared_w13,
            &self.w.shared_w2,
            ws.shared_act.as_mut(),
            ws.shared_out.as_mut(),
        ) {
            let p = GemmProblem::new(2 * s, h).epilogue(Epilogue::SwiGlu);
            grouped_gemm(stream, &mut ws.token_plan, &p, x, w13, act)?;
            grouped_gemm(
                stream,
                &mut ws.token_plan,
                &GemmProblem::new(h, s),
                act,
                w2,
                y,
            )?;
        }
        after(Stage::Shared)?;
        let weights = ws.weights.slice(..tokens * k);
        let mut inputs = CombineInputs::<bf16, bf16>::new(ws.yd.as_view(), Some(weights));
        if let Some(y) = &ws.shared_out {
            inputs = inputs.shared(y.slice(..tokens * h));
        }
        combine(stream, &ws.plan, h, &inputs, out)?;
        after(Stage::Combine)
    }
}
