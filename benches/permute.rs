//! Criterion bench: the `permute` cases of moekit's benchmark suite (names as in torch_anchors.py).
mod common;

use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    common::run(c, "permute", |name| {
        ["/plan", "/permute", "/combine"]
            .iter()
            .any(|p| name.contains(p))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
