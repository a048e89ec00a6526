//! Helpers for GPU tests, benches and examples: the GPU-or-skip gate, synthetic inputs (random
//! logits and routings) and error metrics.

use rand::prelude::*;
use rand_distr::{Distribution, StandardNormal, Zipf};

use crate::context::Context;

/// The environment variable that turns a skipped GPU test into a failure.
pub const REQUIRE_GPU_ENV: &str = "MOEKIT_REQUIRE_GPU";

/// Whether GPU tests must run (`MOEKIT_REQUIRE_GPU=1`).
pub fn gpu_required() -> bool {
    std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v == "1")
}

/// The GPU context for a test, or `None` after printing `SKIPPED (no GPU): <test>` when no usable
/// GPU is present. With `MOEKIT_REQUIRE_GPU=1` a missing GPU panics instead, so a GPU run cannot
/// pass by skipping.
pub fn gpu(test: &str) -> Option<Context> {
    match Context::new(0) {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            if gpu_required() {
                panic!("{test}: {REQUIRE_GPU_ENV}=1 but no usable GPU: {e}");
            }
            static SKIPPED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
            let mut seen = SKIPPED.lock().unwrap_or_else(|p| p.into_inner());
            if !seen.iter().any(|t| t == test) {
                println!("SKIPPED (no GPU): {test} ({e})");
                seen.push(test.to_string());
            }
            None
        }
    }
}

/// A seeded generator: tests print their seed, so a failure can be replayed.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A fresh seed from the OS, for tests that draw new inputs on every run.
pub fn fresh_seed() -> u64 {
    rand::random()
}

/// `n` standard-normal values scaled by `scale`.
pub fn normal_vec(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f32 = StandardNormal.sample(rng);
            v * scale
        })
        .collect()
}

/// How tokens pick their experts in synthetic routings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Routing {
    /// Each token picks k distinct experts uniformly.
    Uniform,
    /// Experts drawn from a Zipf distribution with exponent `alpha` (distinct per token).
    Zipf(f64),
    /// Every token picks experts `0..k` (all-to-one: k experts get every token).
    AllToFirst,
    /// Token t picks experts `(t·k + j) mod E` for `j < k`: every expert gets `T·k / E` rows
    /// (± 1): whole M tiles when that is a multiple of the tile height (DeepSeek-V3 at T = 4096
    /// and 16384), the bench's measure of what ragged last tiles cost.
    Balanced,
}

/// `[tokens, k]` expert ids (i32), k distinct experts per token.
pub fn routing(
    rng: &mut impl Rng,
    tokens: usize,
    k: usize,
    experts: usize,
    kind: Routing,
) -> Vec<i32> {
    assert!(k <= experts, "k = {k} > {experts} experts");
    let mut ids = Vec::with_capacity(tokens * k);
    let zipf = match kind {
        Routing::Zipf(alpha) => {
            Some(Zipf::new(experts as f64, alpha).expect("valid Zipf parameters"))
        }
        _ => None,
    };
    for t in 0..tokens {
        match kind {
            Routing::Uniform => {
                let chosen = rand::seq::index::sample(rng, experts, k);
                ids.extend(chosen.iter().map(|e| e as i32));
            }
            Routing::Zipf(_) => {
                let z = zipf.as_ref().unwrap();
                let mut chosen: Vec<i32> = Vec::with_capacity(k);
                while chosen.len() < k {
                    let e = z.sample(rng) as i32 - 1; // Zipf samples 1..=n
                    if !chosen.contains(&e) {
                        chosen.push(e);
                    }
                }
                ids.extend(chosen);
            }
            Routing::AllToFirst => ids.extend(0..k as i32),
            Routing::Balanced => ids.extend((0..k).map(|j| ((t * k + j) % experts) as i32)),
        }
    }
    ids
}

/// ‖out − ref‖₂ / ‖ref‖₂ (0 when both are zero; infinite when any output is NaN).
pub fn rel_l2_error(out: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        if o.is_nan() != r.is_nan() {
            return f64::INFINITY;
        }
        if r.is_nan() {
            continue;
        }
        num += (o as f64 - r).powi(2);
        den += r * r;
    }
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    }
}

/// The largest |out − ref| / max(|ref|, floor) over all elements, with its index.
pub fn max_rel_error(out: &[f32], reference: &[f64], floor: f64) -> (f64, usize) {
    assert_eq!(out.len(), reference.len(), "length mismatch");
    let mut worst = (0.0, 0);
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        let err = if o.is_nan() || r.is_nan() {
            if o.is_nan() && r.is_nan() {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (o as f64 - r).abs() / r.abs().max(floor)
        };
        if err > worst.0 {
            worst = (err, i);
        }
    }
    worst
}

/// A device buffer of `n` standard-normal values × `scale`, converted to `T`. To stay fast for
/// gigabyte buffers, one random block of up to 2²² − 3 values (a prime) is generated on the host
/// and repeated. The prime length matters: a 2²² block repeated exactly once per DeepSeek-V3 expert
/// (7 · 2²² weights) gave every expert the same weights, so a wrong expert index went unnoticed.
pub fn device_normal<T: crate::Element>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    rng: &mut impl Rng,
    n: usize,
    scale: f32,
) -> crate::Result<cudarc::driver::CudaSlice<T>> {
    use crate::error::DuringExt;
    let block: Vec<T> = normal_vec(rng, n.min((1 << 22) - 3), scale)
        .into_iter()
        .map(T::from_f32)
        .collect();
    // SAFETY: every element is written by the copies below before the buffer is returned.
    let mut buf = unsafe { stream.alloc::<T>(n.max(1)) }.during("allocating a benchmark input")?;
    let mut start = 0;
    while start < n {
        let len = block.len().min(n - start);
        stream
            .memcpy_htod(&block[..len], &mut buf.slice_mut(start..start + len))
            .during("uploading a benchmark input")?;
        start += len;
    }
    Ok(buf)
}

/// Uploads `host` into a new device buffer of `max(1, host.len())` elements (CUDA refuses
/// zero-byte allocations); use `.slice(..host.len())` for the exact view.
pub fn upload<T: cudarc::driver::DeviceRepr>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    host: &[T],
) -> crate::Result<cudarc::driver::CudaSlice<T>> {
    use crate::error::DuringExt;
    // SAFETY: the first host.len() elements are written below; a padding element stays unread.
    let mut buf =
        unsafe { stream.alloc::<T>(host.len().max(1)) }.during("allocating a test buffer")?;
    if !host.is_empty() {
        stream
            .memcpy_htod(host, &mut buf.slice_mut(..host.len()))
            .during("uploading a test buffer")?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_routing_gives_every_expert_its_share_of_distinct_picks() {
        for (t, k, e) in [(4096, 8, 256), (100, 3, 7), (5, 4, 4)] {
            let ids = routing(&mut rng(1), t, k, e, Routing::Balanced);
            let mut count = vec![0usize; e];
            for row in ids.chunks(k) {
                let mut seen = row.to_vec();
                seen.sort();
                seen.dedup();
                assert_eq!(seen.len(), k, "distinct experts per token");
                row.iter().for_each(|&id| count[id as usize] += 1);
            }
            let (lo, hi) = (t * k / e, (t * k).div_ceil(e));
            assert!(count.iter().all(|&c| c >= lo && c <= hi), "{count:?}");
        }
    }
}
