//! CPU references of every kernel, in f64 where there is arithmetic. The GPU tests compare the
//! kernels against these on fresh random inputs; they are public so users can check a kernel on
//! their own data.

pub mod gating;
pub mod grouped_gemm;
pub mod mla;
pub mod moe;
pub mod permute;
pub mod probe;
