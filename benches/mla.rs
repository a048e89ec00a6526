//! Criterion bench: the MLA cases of moekit's benchmark suite (decompression contiguous and paged,
//! fresh-token cache write; names as in torch_anchors.py).
mod common;

use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    common::run(c, "mla", |name| name.starts_with("mla/"));
}

criterion_group!(benches, bench);
criterion_main!(benches);
