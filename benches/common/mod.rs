//! Runs a filtered part of moekit's benchmark suite under criterion, timing with CUDA events
//! (`iter_custom`), then prints the harness's one-line-per-case report.

use std::time::Duration;

use criterion::{Criterion, Throughput};
use moekit::bench::{cases, header, Roofline, SuiteOptions};

pub fn run(c: &mut Criterion, group: &str, keep: impl Fn(&str) -> bool) {
    let Some(ctx) = moekit::testing::gpu(&format!("bench {group}")) else {
        return;
    };
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let mut lines = Vec::new();
    for spec in cases(&SuiteOptions::default()) {
        if !keep(&spec.name) {
            continue;
        }
        let mut case = spec
            .build(&ctx)
            .unwrap_or_else(|e| panic!("{}: {e}", spec.name));
        // Decimal GB/s, like the report lines; a case without a byte count (the empty kernel) is
        // one launch, not the previous case's bytes (a group keeps the last throughput set).
        g.throughput(match case.bytes {
            Some(b) => Throughput::BytesDecimal(b as u64),
            None => Throughput::Elements(1),
        });
        g.bench_function(case.name.clone(), |b| {
            b.iter_custom(|iters| case.time_iters(iters).expect("timed launches"))
        });
        lines.push(
            case.measure(5, 30)
                .expect("measured case")
                .line(&Roofline::default()),
        );
    }
    g.finish();
    println!("{}", header());
    for l in lines {
        println!("{l}");
    }
}
