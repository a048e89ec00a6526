//! Every benchmark case of the crate, under the case names of shared/anchors/torch_anchors.py:
//! one line per case (`case  median_us  TFLOP/s  GB/s  %roofline`, plus the ratio to torch when an
//! anchors JSON from the same machine is given), and a JSON file
//! `{case: {"us": …, "tflops": …, "gbps": …}}`.
//!
//!     cargo run --release --example bench_report -- [--filter F] [--json FILE] [--anchors FILE]

use std::collections::BTreeMap;

use clap::Parser;
use moekit::bench::{cases, header, Roofline, SuiteOptions};
use moekit::Context;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "moekit's benchmark report")]
struct Args {
    /// Only cases whose name contains one of these comma-separated substrings (`=NAME`: the case
    /// named exactly NAME).
    #[arg(long, default_value = "")]
    filter: String,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<String>,
    /// torch_anchors.py's JSON from the same machine: adds a "torch_us" and "x_torch" column.
    #[arg(long)]
    anchors: Option<String>,
    /// Token counts of the per-model cases.
    #[arg(long, default_value = "128,4096,16384", value_delimiter = ',')]
    tokens: Vec<usize>,
    /// Timed repetitions per case (after 5 warm-ups).
    #[arg(long, default_value_t = 50)]
    reps: usize,
    /// Milliseconds the GPU idles before a case whose predecessor kept it busy for more than
    /// [`HEAVY_CASE_MS`], so that a case starts from the same power state whichever case ran
    /// before it (default: `MOEKIT_BENCH_SETTLE_MS`, else 2000; 0: never).
    #[arg(long)]
    settle_ms: Option<u64>,
}

/// A case whose timed launches span more than this many milliseconds runs the GPU at its power
/// cap by its end (the DeepSeek-V3 layer and T = 16384 GEMMs: 0.4-0.7 s), and the case after it
/// would start in that state: the MLA T = 1024 decompression read 63.2-64.7 us right after the
/// layer case and 61.5-61.8 after a 2 s idle (H200, BENCHMARKS.md run 39 call 1), while cases of a
/// few milliseconds leave nothing to settle.
const HEAVY_CASE_MS: u64 = 100;

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("bench_report: {e}");
        std::process::exit(1);
    }
}

/// A case is selected by a filter it contains, or, for a filter starting with `=`, by the rest of
/// the filter exactly (`=dsv3/T4096/gemm-up-swiglu` leaves out `...-swiglu-balanced`).
fn matches_filter(name: &str, filter: &str) -> bool {
    match filter.strip_prefix('=') {
        Some(exact) => name == exact,
        None => name.contains(filter),
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let ctx = Context::new(0)?;
    let anchors: BTreeMap<String, Value> = match &args.anchors {
        Some(path) => serde_json::from_str(&std::fs::read_to_string(path)?)?,
        None => BTreeMap::new(),
    };
    let filters: Vec<&str> = args.filter.split(',').filter(|f| !f.is_empty()).collect();
    let opts = SuiteOptions {
        tokens: args.tokens.clone(),
        ..SuiteOptions::default()
    };
    let settle_ms = match args.settle_ms {
        Some(ms) => ms,
        None => match std::env::var("MOEKIT_BENCH_SETTLE_MS") {
            Ok(v) => v
                .parse()
                .map_err(|_| format!("MOEKIT_BENCH_SETTLE_MS={v:?} is not a whole number"))?,
            Err(_) => 2000,
        },
    };
    let mut previous_span_ms = 0u64;
    let mut roof = Roofline::default();
    println!(
        "# {}, {} SMs, {} MB L2",
        ctx.device_name(),
        ctx.sm_count(),
        ctx.l2_bytes() >> 20
    );
    println!("{}  {:>9} {:>8}", header(), "torch_us", "x_torch");
    let mut out = serde_json::Map::new();
    for spec in cases(&opts) {
        // The copy ceiling always runs first: it sets the roofline of every later case.
        let is_ceiling = spec.name.starts_with("ceiling/");
        let always = is_ceiling || spec.name.starts_with("reference/");
        if !always && !filters.is_empty() && !filters.iter().any(|f| matches_filter(&spec.name, f))
        {
            continue;
        }
        let mut case = spec.build(&ctx)?;
        let settled_ms = if settle_ms > 0 && previous_span_ms > HEAVY_CASE_MS {
            // The build's own device work (random inputs) must finish before the idle starts.
            ctx.stream().context().synchronize()?;
            std::thread::sleep(std::time::Duration::from_millis(settle_ms));
            settle_ms
        } else {
            0
        };
        let started = unix_ms();
        let result = case.measure(5, args.reps)?;
        let ended = unix_ms();
        previous_span_ms = ended.saturating_sub(started);
        drop(case);
        if is_ceiling {
            // The best measured copy (ours or the driver's memcpy) is the memory roofline.
            let gbps = result.gbps().unwrap_or(0.0);
            roof.copy_gbps = if spec.name == "ceiling/copy-2GiB" {
                gbps
            } else {
                roof.copy_gbps.max(gbps)
            };
        }
        let torch_us = anchors.get(&result.case).and_then(|a| a["us"].as_f64());
        let ratio = torch_us.map(|t| t / result.median_us);
        println!(
            "{}  {:>9} {:>8}",
            result.line(&roof),
            torch_us.map_or("-".into(), |t| format!("{t:.1}")),
            ratio.map_or("-".into(), |r| format!("{r:.2}x"))
        );
        out.insert(
            result.case.clone(),
            json!({
                "us": result.median_us,
                "tflops": result.tflops(),
                "gbps": result.gbps(),
                "roofline_pct": result.roofline_pct(&roof),
                "torch_us": torch_us,
                // Wall-clock span of the timed runs (Unix ms), to line a case up with a log of
                // the GPU's clocks and power (device-check's smi-log.csv).
                "start_unix_ms": started,
                "end_unix_ms": ended,
                // The idle before the case's warm-ups (--settle-ms), 0 if none.
                "settled_ms": settled_ms,
            }),
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(out))?)?;
    }
    Ok(())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::matches_filter;

    #[test]
    fn filters_match_substrings_or_exact_names() {
        let (plain, balanced) = (
            "dsv3/T4096/gemm-up-swiglu",
            "dsv3/T4096/gemm-up-swiglu-balanced",
        );
        assert!(matches_filter(plain, "gemm-up"));
        assert!(matches_filter(balanced, "dsv3/T4096/gemm-up-swiglu"));
        assert!(matches_filter(plain, "=dsv3/T4096/gemm-up-swiglu"));
        assert!(!matches_filter(balanced, "=dsv3/T4096/gemm-up-swiglu"));
        assert!(!matches_filter(plain, "=gemm-up-swiglu"));
    }
}
