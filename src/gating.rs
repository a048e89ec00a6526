//! Top-k gating: the MoE router's scoring, (group-limited) expert selection and routing weights in
//! one launch, for every production routing rule (DeepSeek-V3/V2, Kimi K2, Qwen3-MoE, Mixtral,
//! DBRX, gpt-oss, Llama-4).
//!
//! The rule, per token row of router logits `x[E]` (see [`GatingConfig`]):
//!
//! ```text
//! x      = logits (+ router_bias)                 NaN is treated as -inf from here on
//! s      = score(x)                               softmax over all E | sigmoid | identity
//! c      = s (+ correction_bias)                  used for selection only
//! groups = n_group equal groups of E/n_group experts; keep the topk_group groups with the best
//!          group score (max of c | sum of the two best c); the other experts are never chosen
//! ids    = the k best c among kept experts, in descending c; ties go to the lower expert index
//! w      = s[ids] | softmax(x[ids]) | sigmoid(x[ids])
//! w      = w / (sum(w) + 1e-20)   if renormalize
//! w      = w * routed_scaling_factor
//! ```
//!
//! Limits the kernel handles exactly (documented behaviour, not errors):
//! - a softmax whose maximum logit is `+inf` gives the `+inf` entries equal shares of 1 and the
//!   others 0; a row with no logit above `-inf` (all `-inf` or NaN) has all scores 0;
//! - such a row (and any tie) selects the lowest expert indices, so an all-NaN row yields experts
//!   `0..k` with weight 0 for softmax and sigmoid scores;
//! - excluded groups are masked with "never", not with 0.0 as one Hugging Face implementation
//!   does: an expert outside the kept groups is never chosen, whatever the sign of the scores;
//! - a group score that is NaN (`+inf + -inf`) ranks as `-inf`.

use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use crate::context::{check_status, prepare_launch, ptr_or_null, raw_stream};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ffi;

/// Largest expert count the kernel supports.
pub const MAX_EXPERTS: usize = ffi::MOEKIT_GATING_MAX_EXPERTS as usize;
/// Largest top-k the kernel supports.
pub const MAX_TOP_K: usize = ffi::MOEKIT_GATING_MAX_TOPK as usize;

/// The score function applied to every logit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreFunction {
    /// Softmax over all E logits of the token.
    Softmax,
    /// Sigmoid of each logit.
    Sigmoid,
    /// The logit itself.
    Identity,
}

/// Group-limited selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupSelection {
    /// No group limit.
    None,
    /// Group score = the best selection score in the group (DeepSeek-V2 `group_limited_greedy`).
    MaxPerGroup,
    /// Group score = the sum of the two best selection scores (DeepSeek-V3 `noaux_tc`); a group of
    /// one expert scores that expert.
    SumTop2PerGroup,
}

/// Where the routing weights of the chosen experts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightSource {
    /// Their scores, without the correction bias.
    Scores,
    /// Softmax over their logits (top-k, then softmax: gpt-oss).
    SoftmaxOfChosenLogits,
    /// Sigmoid of each chosen logit (Llama-4).
    SigmoidOfChosenLogit,
}

/// A routing rule. Build one from a preset and adjust the public fields.
#[derive(Debug, Clone, PartialEq)]
pub struct GatingConfig {
    /// E, number of routed experts, 1 ..= [`MAX_EXPERTS`].
    pub num_experts: usize,
    /// k, experts chosen per token, 1 ..= min(E, [`MAX_TOP_K`]).
    pub top_k: usize,
    /// Score function.
    pub score: ScoreFunction,
    /// Group-limited selection.
    pub group_selection: GroupSelection,
    /// Number of equal expert groups; must divide E (ignored without group selection).
    pub n_group: usize,
    /// Groups kept, 1 ..= n_group (ignored without group selection).
    pub topk_group: usize,
    /// Source of the routing weights.
    pub weights: WeightSource,
    /// Divide the k weights by their sum + 1e-20.
    pub renormalize: bool,
    /// Multiplies the weights last.
    pub routed_scaling_factor: f32,
}

impl GatingConfig {
    fn base(num_experts: usize, top_k: usize, score: ScoreFunction) -> Self {
        Self {
            num_experts,
            top_k,
            score,
            group_selection: GroupSelection::None,
            n_group: 1,
            topk_group: 1,
            weights: WeightSource::Scores,
            renormalize: false,
            routed_scaling_factor: 1.0,
        }
    }

    /// DeepSeek-V3 / R1: sigmoid, correction bias, 8 groups scored by their top-2 sum keep 4,
    /// top-8 of 256, renormalized, ×2.5.
    pub fn deepseek_v3() -> Self {
        Self {
            group_selection: GroupSelection::SumTop2PerGroup,
            n_group: 8,
            topk_group: 4,
            renormalize: true,
            routed_scaling_factor: 2.5,
            ..Self::base(256, 8, ScoreFunction::Sigmoid)
        }
    }

    /// DeepSeek-V2: softmax, 8 groups scored by their max keep 3, top-6 of 160, no renorm, ×16.
    pub fn deepseek_v2() -> Self {
        Self {
            group_selection: GroupSelection::MaxPerGroup,
            n_group: 8,
            topk_group: 3,
            routed_scaling_factor: 16.0,
            ..Self::base(160, 6, ScoreFunction::Softmax)
        }
    }

    /// DeepSeek-V2-Lite: softmax, greedy top-6 of 64, no renorm.
    pub fn deepseek_v2_lite() -> Self {
        Self::base(64, 6, ScoreFunction::Softmax)
    }

    /// Kimi K2: sigmoid, correction bias, no group limit, top-8 of 384, renormalized, ×2.827.
    pub fn kimi_k2() -> Self {
        Self {
            renormalize: true,
            routed_scaling_factor: 2.827,
            ..Self::base(384, 8, ScoreFunction::Sigmoid)
        }
    }

    /// Qwen3-MoE (30B-A3B, 235B-A22B): softmax, top-8 of 128, renormalized.
    pub fn qwen3_moe() -> Self {
        Self {
            renormalize: true,
            ..Self::base(128, 8, ScoreFunction::Softmax)
        }
    }

    /// Mixtral 8x7B: softmax, top-2 of 8, renormalized.
    pub fn mixtral() -> Self {
        Self {
            renormalize: true,
            ..Self::base(8, 2, ScoreFunction::Softmax)
        }
    }

    /// DBRX: softmax, top-4 of 16, divided by their L1 norm (their sum: the weights are positive).
    pub fn dbrx() -> Self {
        Self {
            renormalize: true,
            ..Self::base(16, 4, ScoreFunction::Softmax)
        }
    }

    /// gpt-oss-120b: router bias on the logits, top-4 of 128 logits, softmax over the chosen four.
    /// (gpt-oss-20b: set `num_experts` to 32.)
    pub fn gpt_oss() -> Self {
        Self {
            weights: WeightSource::SoftmaxOfChosenLogits,
            ..Self::base(128, 4, ScoreFunction::Identity)
        }
    }

    /// Llama-4 Maverick: top-1 of 128 logits, weight = sigmoid of the chosen logit.
    /// (Scout: set `num_experts` to 16.)
    pub fn llama4() -> Self {
        Self {
            weights: WeightSource::SigmoidOfChosenLogit,
            ..Self::base(128, 1, ScoreFunction::Identity)
        }
    }

    /// Whether group-limited selection applies (a group mode and more than one group).
    pub fn grouped(&self) -> bool {
        self.group_selection != GroupSelection::None && self.n_group > 1
    }

    /// Checks every field against the kernel's limits.
    pub fn validate(&self) -> Result<()> {
        let e = self.num_experts;
        if e == 0 || e > MAX_EXPERTS {
            return Err(Error::invalid(
                "num_experts",
                format!("{e} experts; must be 1 ..= {MAX_EXPERTS}"),
            ));
        }
        if self.top_k == 0 || self.top_k > e {
            return Err(Error::invalid(
                "top_k",
                format!(
                    "top_k = {} with {e} experts; must be 1 ..= num_experts",
                    self.top_k
                ),
            ));
        }
        if self.top_k > MAX_TOP_K {
            return Err(Error::unsupported(
                format!("top_k = {}", self.top_k),
                format!("top_k <= {MAX_TOP_K}"),
            ));
        }
        if self.group_selection != GroupSelection::None {
            if self.n_group == 0 || e % self.n_group != 0 {
                return Err(Error::invalid(
                    "n_group",
                    format!("{} groups do not divide {e} experts", self.n_group),
                ));
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return Err(Error::invalid(
                    "topk_group",
                    format!(
                        "topk_group = {} with {} groups; must be 1 ..= n_group",
                        self.topk_group, self.n_group
                    ),
                ));
            }
            let candidates = self.topk_group * (e / self.n_group);
            if self.top_k > candidates {
                return Err(Error::invalid(
                    "top_k",
                    format!(
                        "top_k = {} but the {} kept groups hold only {candidates} experts",
                        self.top_k, self.topk_group
                    ),
                ));
            }
        }
        if !self.routed_scaling_factor.is_finite() {
            return Err(Error::invalid(
                "routed_scaling_factor",
                format!("{} is not finite", self.routed_scaling_factor),
            ));
        }
        Ok(())
    }
}

/// The inputs of one gating launch.
#[derive(Debug)]
pub struct GatingInputs<'a, L> {
    /// Router logits `[tokens, E]`, row-major (E contiguous).
    pub logits: CudaView<'a, L>,
    /// Number of token rows T (0 allowed).
    pub tokens: usize,
    /// `[E]` f32 added to the logits before scoring (gpt-oss), or `None`.
    pub router_bias: Option<CudaView<'a, f32>>,
    /// `[E]` f32 added to the scores for selection only (DeepSeek-V3 `e_score_correction_bias`).
    pub correction_bias: Option<CudaView<'a, f32>>,
}

impl<'a, L> GatingInputs<'a, L> {
    /// Logits `[tokens, E]` without biases.
    pub fn new(logits: CudaView<'a, L>, tokens: usize) -> Self {
        Self {
            logits,
            tokens,
            router_bias: None,
            correction_bias: None,
        }
    }

    /// Adds a router bias `[E]` (f32) to the logits.
    pub fn router_bias(mut self, bias: CudaView<'a, f32>) -> Self {
        self.router_bias = Some(bias);
        self
    }

    /// Adds a selection-only correction bias `[E]` (f32) to the scores.
    pub fn correction_bias(mut self, bias: CudaView<'a, f32>) -> Self {
        self.correction_bias = Some(bias);
        self
    }
}

/// Runs the router rule `cfg` on `inputs`, writing `topk_ids` `[T, k]` (i32, descending selection
/// score) and `topk_weights` `[T, k]` (f32). With `expert_counts` (`[E]` i32) it also writes the
/// histogram of the chosen ids, for the routing plan or load-balancing statistics.
///
/// Deterministic: reruns on the same inputs are bitwise identical.
pub fn topk_gating<L: Element>(
    stream: &CudaStream,
    cfg: &GatingConfig,
    inputs: &GatingInputs<'_, L>,
    topk_ids: &mut impl DevicePtrMut<i32>,
    topk_weights: &mut impl DevicePtrMut<f32>,
    expert_counts: Option<&mut CudaViewMut<'_, i32>>,
) -> Result<()> {
    cfg.validate()?;
    let (t, e, k) = (inputs.tokens, cfg.num_experts, cfg.top_k);
    let n_logits = t
        .checked_mul(e)
        .filter(|n| *n <= i64::MAX as usize)
        .ok_or_else(|| Error::invalid("tokens", format!("{t} tokens × {e} experts overflows")))?;
    if t.div_ceil(4) > i32::MAX as usize {
        return Err(Error::unsupported(
            format!("{t} tokens"),
            format!("at most {} tokens per launch", 4 * (i32::MAX as usize)),
        ));
    }
    if inputs.logits.len() != n_logits {
        return Err(Error::shape(
            "logits",
            format!("{n_logits} elements ([{t}, {e}])"),
            inputs.logits.len(),
        ));
    }
    for (name, bias) in [
        ("router_bias", &inputs.router_bias),
        ("correction_bias", &inputs.correction_bias),
    ] {
        if let Some(b) = bias {
            if b.len() != e {
                return Err(Error::shape(name, format!("{e} elements ([E])"), b.len()));
            }
        }
    }
    if topk_ids.len() != t * k {
        return Err(Error::shape(
            "topk_ids",
            format!("{} elements ([{t}, {k}])", t * k),
            topk_ids.len(),
        ));
    }
    if topk_weights.len() != t * k {
        return Err(Error::shape(
            "topk_weights",
            format!("{} elements ([{t}, {k}])", t * k),
            topk_weights.len(),
        ));
    }
    if let Some(c) = &expert_counts {
        if c.len() != e {
            return Err(Error::shape(
                "expert_counts",
                format!("{e} elements ([E])"),
                c.len(),
            ));
        }
    }

    prepare_launch(stream)?;
    let (logits, _logits_guard) = inputs.logits.device_ptr(stream);
    let router_bias = inputs.router_bias.as_ref().map(|b| b.device_ptr(stream));
    let correction_bias = inputs
        .correction_bias
        .as_ref()
        .map(|b| b.device_ptr(stream));
    let (ids, _ids_guard) = topk_ids.device_ptr_mut(stream);
    let (weights, _weights_guard) = topk_weights.device_ptr_mut(stream);
    let counts = expert_counts.map(|c| c.device_ptr_mut(stream));
    let params = ffi::moekit_gating_params {
        logits: logits as *const _,
        router_bias: ptr_or_null(&router_bias) as *const f32,
        correction_bias: ptr_or_null(&correction_bias) as *const f32,
        topk_ids: ids as *mut i32,
        topk_weights: weights as *mut f32,
        expert_counts: ptr_or_null(&counts) as *mut i32,
        tokens: t as i64,
        num_experts: e as i32,
        top_k: k as i32,
        logits_dtype: L::DTYPE.code(),
        score_func: match cfg.score {
            ScoreFunction::Softmax => ffi::MOEKIT_SCORE_SOFTMAX,
            ScoreFunction::Sigmoid => ffi::MOEKIT_SCORE_SIGMOID,
            ScoreFunction::Identity => ffi::MOEKIT_SCORE_NONE,
        } as i32,
        group_select: if cfg.grouped() {
            match cfg.group_selection {
                GroupSelection::None => ffi::MOEKIT_GROUP_NONE,
                GroupSelection::MaxPerGroup => ffi::MOEKIT_GROUP_MAX,
                GroupSelection::SumTop2PerGroup => ffi::MOEKIT_GROUP_SUM_TOP2,
            }
        } else {
            ffi::MOEKIT_GROUP_NONE
        } as i32,
        n_group: if cfg.grouped() { cfg.n_group as i32 } else { 1 },
        topk_group: if cfg.grouped() {
            cfg.topk_group as i32
        } else {
            1
        },
        weight_source: match cfg.weights {
            WeightSource::Scores => ffi::MOEKIT_WEIGHTS_SCORES,
            WeightSource::SoftmaxOfChosenLogits => ffi::MOEKIT_WEIGHTS_SOFTMAX_CHOSEN,
            WeightSource::SigmoidOfChosenLogit => ffi::MOEKIT_WEIGHTS_SIGMOID_CHOSEN,
        } as i32,
        renormalize: cfg.renormalize as i32,
        routed_scaling_factor: cfg.routed_scaling_factor,
    };
    // SAFETY: every pointer addresses a device buffer whose length was checked above against the
    // shape the kernel reads or writes ([T,E] logits, [E] biases and counts, [T,k] outputs); the
    // guards keep the buffers alive and ordered on `stream` until the launch is enqueued; outputs
    // are borrowed mutably, so they cannot alias the inputs.
    let status = unsafe { ffi::moekit_topk_gating(&params, raw_stream(stream)) };
    check_status(status, "launching top-k gating")
}
