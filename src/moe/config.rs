//! Shapes and routing rules of MoE blocks, and their weights on the host.

use half::bf16;

use crate::error::{Error, Result};
use crate::gating::GatingConfig;

/// Shape and routing rule of one MoE block.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// H, the model's hidden size.
    pub hidden: usize,
    /// I, the intermediate size of one routed expert (`moe_intermediate_size`).
    pub intermediate: usize,
    /// The router: E, k and the routing rule.
    pub gating: GatingConfig,
    /// Width of the always-on shared expert MLP (all shared experts fused into one SwiGLU MLP,
    /// `n_shared_experts × moe_intermediate_size` for DeepSeek); 0 for none.
    pub shared_intermediate: usize,
}

impl MoeConfig {
    /// DeepSeek-V3 / R1: H = 7168, I = 2048, 256 experts, top-8, one shared expert.
    pub fn deepseek_v3() -> Self {
        Self {
            hidden: 7168,
            intermediate: 2048,
            gating: GatingConfig::deepseek_v3(),
            shared_intermediate: 2048,
        }
    }

    /// DeepSeek-V2-Lite: H = 2048, I = 1408, 64 experts, top-6, two shared experts.
    pub fn deepseek_v2_lite() -> Self {
        Self {
            hidden: 2048,
            intermediate: 1408,
            gating: GatingConfig::deepseek_v2_lite(),
            shared_intermediate: 2 * 1408,
        }
    }

    /// Qwen3-30B-A3B: H = 2048, I = 768, 128 experts, top-8, no shared expert.
    pub fn qwen3_30b_a3b() -> Self {
        Self {
            hidden: 2048,
            intermediate: 768,
            gating: GatingConfig::qwen3_moe(),
            shared_intermediate: 0,
        }
    }

    /// Mixtral 8x7B: H = 4096, I = 14336, 8 experts, top-2.
    pub fn mixtral_8x7b() -> Self {
        Self {
            hidden: 4096,
            intermediate: 14336,
            gating: GatingConfig::mixtral(),
            shared_intermediate: 0,
        }
    }

    /// E.
    pub fn num_experts(&self) -> usize {
        self.gating.num_experts
    }

    /// k.
    pub fn top_k(&self) -> usize {
        self.gating.top_k
    }

    /// Checks the shape against what the kernels take: H and I multiples of 8 (the grouped GEMM's
    /// N and K), E a multiple of 8 (the router GEMM's N), and the routing rule.
    pub fn validate(&self) -> Result<()> {
        self.gating.validate()?;
        for (name, v) in [("hidden", self.hidden), ("intermediate", self.intermediate)] {
            if v == 0 || v % 8 != 0 {
                return Err(Error::unsupported(
                    format!("{name} = {v}"),
                    "hidden and intermediate sizes must be positive multiples of 8",
                ));
            }
        }
        if self.shared_intermediate % 8 != 0 {
            return Err(Error::unsupported(
                format!("shared_intermediate = {}", self.shared_intermediate),
                "a multiple of 8",
            ));
        }
        if self.num_experts() % 8 != 0 {
            return Err(Error::unsupported(
                format!("{} experts", self.num_experts()),
                "the router GEMM needs a multiple of 8 experts",
            ));
        }
        Ok(())
    }
}

/// The weights of one MoE block on the host, bf16, in the layouts the kernels read (every matrix
/// row-major, `[out, in]` like `nn.Linear`).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeWeights {
    /// Router `[E, H]`.
    pub router: Vec<bf16>,
    /// Router bias `[E]` added to the logits (gpt-oss), if any.
    pub router_bias: Option<Vec<f32>>,
    /// Selection-only correction bias `[E]` (DeepSeek-V3 `e_score_correction_bias`), if any.
    pub correction_bias: Option<Vec<f32>>,
    /// Gate and up projections `[E, 2I, H]`: per expert the I gate rows, then the I up rows.
    pub w13: Vec<bf16>,
    /// Down projections `[E, H, I]`.
    pub w2: Vec<bf16>,
    /// Shared expert gate and up `[2·Is, H]` (gate rows first), if any.
    pub shared_w13: Option<Vec<bf16>>,
    /// Shared expert down `[H, Is]`, if any.
    pub shared_w2: Option<Vec<bf16>>,
}

impl MoeWeights {
    /// Checks every length against `cfg`.
    pub fn validate(&self, cfg: &MoeConfig) -> Result<()> {
        let (e, h, i, s) = (
            cfg.num_experts(),
            cfg.hidden,
            cfg.intermediate,
            cfg.shared_intermediate,
        );
        let check = |name: &'static str, got: usize, want: usize, shape: String| {
            if got != want {
                Err(Error::shape(
                    name,
                    format!("{want} elements ({shape})"),
                    got,
                ))
            } else {
                Ok(())
            }
        };
        check("router", self.router.len(), e * h, format!("[{e}, {h}]"))?;
        check(
            "w13",
            self.w13.len(),
            e * 2 * i * h,
            format!("[{e}, {}, {h}]", 2 * i),
        )?;
        check("w2", self.w2.len(), e * h * i, format!("[{e}, {h}, {i}]"))?;
        for (name, b) in [
            ("router_bias", &self.router_bias),
            ("correction_bias", &self.correction_bias),
        ] {
            if let Some(b) = b {
                check(name, b.len(), e, format!("[{e}]"))?;
            }
        }
        match (&self.shared_w13, &self.shared_w2, s) {
            (None, None, 0) => Ok(()),
            (Some(a), Some(b), s) if s > 0 => {
                check(
                    "shared_w13",
                    a.len(),
                    2 * s * h,
                    format!("[{}, {h}]", 2 * s),
                )?;
                check("shared_w2", b.len(), h * s, format!("[{h}, {s}]"))
            }
            _ => {
                Err(Error::invalid(
                    "shared expert",
                    format!(
                    "the config's shared_intermediate is {s} but the weights {} a shared expert",
                    if self.shared_w13.is_some() { "have" } else { "lack" }
                ),
                ))
            }
        }
    }
}
