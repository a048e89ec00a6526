//! The MoE layer end to end, on the GPU, for the forward of hidden states `x [T, H]` (bf16):
//!
//! ```text
//! logits [T, E] (f32)  = x · routerᵀ                                  router GEMM
//! ids, w [T, k]        = gating(logits, biases)                       top-k gating
//! plan                 = routing plan of ids                          (device side)
//! xp [rows, H]         = x permuted into expert segments               permute
//! act [rows, I]        = silu(xp · W1ᵀ) ⊙ (xp · W3ᵀ)                   grouped GEMM, SwiGLU
//! yd [rows, H]         = act · W2ᵀ                                     grouped GEMM
//! shared [T, H]        = W2s · (silu(W1s x) ⊙ W3s x)                  dense SwiGLU MLP
//! out [T, H]           = Σ over a token's rows of w[row] · yd + shared  combine, weighted
//! ```
//!
//! Weights are bf16 `[out, in]` row-major ([`MoeWeights`]); a [`MoeLayer`] holds them on the GPU
//! with a workspace sized once for `max_tokens`, so a forward allocates nothing and never
//! synchronizes with the host, and can be captured in a CUDA graph. [`checkpoint`] loads the MoE
//! block of a Hugging Face checkpoint; [`crate::reference::moe`] is the CPU reference.

pub mod checkpoint;
mod config;
mod layer;

pub use config::{MoeConfig, MoeWeights};
pub use layer::{MoeLayer, Stage};
