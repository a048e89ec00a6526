//! # moekit
//!
//! Hand-written CUDA kernels for sparse Mixture-of-Experts layers on NVIDIA Hopper (H100/H200,
//! compute capability 9.0): top-k gating, token permutation (routing plan, permute, combine), the
//! grouped expert GEMM (TMA + WGMMA), MLA latent-KV decompression and a device bandwidth probe,
//! composed into a whole MoE layer ([`moe::MoeLayer`]), with a CPU reference of every kernel in
//! [`reference`](mod@reference).
//!
//! Every launch function takes a cudarc [`CudaStream`](cudarc::driver::CudaStream) and device
//! buffers ([`CudaSlice`](cudarc::driver::CudaSlice), [`CudaView`](cudarc::driver::CudaView),
//! [`CudaViewMut`](cudarc::driver::CudaViewMut)), validates every argument on the host before it
//! enqueues anything, and returns a [`Result`]. No launch synchronizes with the host, so sequences
//! of them can be captured in CUDA graphs.
//!
//! ```no_run
//! # fn main() -> moekit::Result<()> {
//! let ctx = moekit::Context::new(0)?; // fails unless device 0 is a Hopper GPU
//! let stream = ctx.stream();
//! let cfg = moekit::gating::GatingConfig::deepseek_v3();
//! let logits = stream.clone_htod(&vec![0.5f32; 4 * cfg.num_experts])?;
//! let mut ids = stream.alloc_zeros::<i32>(4 * cfg.top_k)?;
//! let mut weights = stream.alloc_zeros::<f32>(4 * cfg.top_k)?;
//! let bias = stream.alloc_zeros::<f32>(cfg.num_experts)?;
//! let inputs = moekit::gating::GatingInputs::new(logits.as_view(), 4).correction_bias(bias.as_view());
//! moekit::gating::topk_gating(stream, &cfg, &inputs, &mut ids, &mut weights, None)?;
//! # Ok(()) }
//! ```
//!
//! The whole layer, DeepSeek-V3-shaped with random weights (`examples/moe_layer.rs` times it per
//! stage and checks it against the CPU reference):
//!
//! ```no_run
//! # fn main() -> moekit::Result<()> {
//! use moekit::moe::{MoeConfig, MoeLayer};
//! let ctx = moekit::Context::new(0)?;
//! let stream = ctx.stream();
//! let tokens = 4096;
//! let cfg = MoeConfig::deepseek_v3();
//! let hidden = cfg.hidden;
//! // Weights made on the GPU; workspace for up to `tokens` tokens per forward.
//! let mut layer = MoeLayer::random(stream, cfg, tokens, 1, |what| eprintln!("making {what}"))?;
//! let x = stream.alloc_zeros::<half::bf16>(tokens * hidden)?; // [T, H] bf16 hidden states
//! let mut out = stream.alloc_zeros::<half::bf16>(tokens * hidden)?;
//! // Enqueues router GEMM, gating, plan, permute, both expert GEMMs, shared expert and combine:
//! // no host synchronization and no allocation, so it can be captured in a CUDA graph.
//! layer.forward(stream, &x.as_view(), tokens, &mut out.as_view_mut())?;
//! # Ok(()) }
//! ```
//!
//! Layout conventions: all matrices are row-major with the last dimension contiguous; shapes are
//! written `[rows, cols]`; token-major tensors are `[T, …]`.
#![warn(missing_docs)]

pub mod bench;
mod context;
pub mod dtype;
mod error;
mod ffi;
pub mod gating;
pub mod grouped_gemm;
pub mod mla;
pub mod moe;
pub mod permute;
pub mod probe;
pub mod reference;
pub mod testing;

pub use context::Context;
pub use dtype::{Dtype, Element};
pub use error::{Error, Result};

/// Re-export of the cudarc version this crate is built against, so callers name the same types.
pub use cudarc;
