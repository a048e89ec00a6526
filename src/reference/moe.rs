//! Reference of the MoE layer ([`crate::moe`]), composed from the reference ops: f32 dot products
//! of bf16 values, the f64 gating reference, and bf16 rounding at the points where the GPU layer
//! stores bf16 (the SwiGLU activations, each expert output before its routing weight, the shared
//! expert's output and the layer output), so GPU and reference differ only by summation order.

use half::bf16;

use super::gating::{topk_gating, GatingOutput};
use crate::error::{Error, Result};
use crate::moe::{MoeConfig, MoeWeights};

fn dot(a: &[bf16], b: &[bf16]) -> f32 {
    a.iter()
        .zip(b)
        .fold(0.0f32, |s, (x, y)| x.to_f32().mul_add(y.to_f32(), s))
}

fn round(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// Router logits `[T, E]` (f32) of `x` `[T, H]`.
pub fn router_logits(cfg: &MoeConfig, w: &MoeWeights, x: &[bf16], tokens: usize) -> Vec<f32> {
    let (e, h) = (cfg.num_experts(), cfg.hidden);
    let mut out = Vec::with_capacity(tokens * e);
    for t in 0..tokens {
        let xt = &x[t * h..(t + 1) * h];
        out.extend((0..e).map(|j| dot(xt, &w.router[j * h..(j + 1) * h])));
    }
    out
}

/// One SwiGLU MLP on one token: `W2 · bf16(silu(W1 x) ⊙ W3 x)` with `w13` `[2I, H]` (gate rows
/// first) and `w2` `[H, I]`; f32, not rounded.
pub fn mlp(x: &[bf16], w13: &[bf16], w2: &[bf16], hidden: usize, inter: usize) -> Vec<f32> {
    let act: Vec<bf16> = (0..inter)
        .map(|j| {
            let g = dot(x, &w13[j * hidden..(j + 1) * hidden]);
            let u = dot(x, &w13[(inter + j) * hidden..(inter + j + 1) * hidden]);
            bf16::from_f32(silu(g) * u)
        })
        .collect();
    (0..hidden)
        .map(|c| dot(&act, &w2[c * inter..(c + 1) * inter]))
        .collect()
}

/// The layer's output for one token given its routing: `Σ_j w_j · bf16(expert_j(x)) + shared`,
/// summed in f32 in slot order and rounded to bf16 (the GPU layer's combine applies the weights).
/// `expert(e)` returns expert e's `w13` `[2I, H]` and `w2` `[H, I]`.
pub fn token_output<'a>(
    cfg: &MoeConfig,
    dense: &MoeWeights,
    expert: &dyn Fn(usize) -> (&'a [bf16], &'a [bf16]),
    x: &[bf16],
    ids: &[i32],
    weights: &[f32],
) -> Vec<f32> {
    let (h, i) = (cfg.hidden, cfg.intermediate);
    let mut acc = vec![0.0f32; h];
    for (&e, &w) in ids.iter().zip(weights) {
        let (w13, w2) = expert(e as usize);
        for (a, y) in acc.iter_mut().zip(mlp(x, w13, w2, h, i)) {
            *a += w * round(y);
        }
    }
    if let (Some(w13), Some(w2)) = (&dense.shared_w13, &dense.shared_w2) {
        let shared = mlp(x, w13, w2, h, cfg.shared_intermediate);
        for (a, y) in acc.iter_mut().zip(shared) {
            *a += round(y);
        }
    }
    acc.into_iter().map(round).collect()
}

/// The layer on `x` `[T, H]` with a given routing (`ids`, `weights` `[T, k]`): `[T, H]`.
pub fn forward_routed(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &[bf16],
    tokens: usize,
    ids: &[i32],
    weights: &[f32],
) -> Vec<f32> {
    let (h, i, k) = (cfg.hidden, cfg.intermediate, cfg.top_k());
    let expert = |e: usize| {
        (
            &w.w13[e * 2 * i * h..(e + 1) * 2 * i * h],
            &w.w2[e * h * i..(e + 1) * h * i],
        )
    };
    let mut out = Vec::with_capacity(tokens * h);
    for t in 0..tokens {
        out.extend(token_output(
            cfg,
            w,
            &expert,
            &x[t * h..(t + 1) * h],
            &ids[t * k..(t + 1) * k],
            &weights[t * k..(t + 1) * k],
        ));
    }
    out
}

/// The reference layer's output and the routing it chose.
#[derive(Debug, Clone)]
pub struct LayerOutput {
    /// `[T, H]`, bf16 values as f32.
    pub out: Vec<f32>,
    /// The router's decisions (with their margins, to tell near ties apart).
    pub routing: GatingOutput,
}

/// The whole layer on `x` `[T, H]`: router, gating (f64 reference), experts, shared expert.
pub fn forward(cfg: &MoeConfig, w: &MoeWeights, x: &[bf16], tokens: usize) -> Result<LayerOutput> {
    cfg.validate()?;
    w.validate(cfg)?;
    if x.len() != tokens * cfg.hidden {
        return Err(Error::shape("x", tokens * cfg.hidden, x.len()));
    }
    let logits = router_logits(cfg, w, x, tokens);
    let routing = topk_gating(
        &cfg.gating,
        &logits,
        tokens,
        w.router_bias.as_deref(),
        w.correction_bias.as_deref(),
    )?;
    let out = forward_routed(cfg, w, x, tokens, &routing.ids, &routing.weights);
    Ok(LayerOutput { out, routing })
}
