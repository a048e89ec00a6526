//! Criterion bench: the grouped GEMM cases of moekit's benchmark suite (names as in torch_anchors.py).
mod common;

use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    common::run(c, "grouped_gemm", |name| name.contains("/gemm-"));
}

criterion_group!(benches, bench);
criterion_main!(benches);
