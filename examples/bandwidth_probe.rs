//! The device bandwidth probe: copies 2 GiB device-to-device with moekit's 16-byte copy kernel,
//! checks a sample of the copy on the CPU, and prints the bandwidth every memory-bound kernel of
//! the crate is measured against.
//!
//!     cargo run --release --example bandwidth_probe

use moekit::bench::{time_launches, CaseResult, Roofline};
use moekit::{probe, Context};
use rand::RngExt;

fn main() {
    if let Err(e) = run() {
        eprintln!("bandwidth_probe: {e}");
        std::process::exit(1);
    }
}

fn run() -> moekit::Result<()> {
    let ctx = Context::new(0)?;
    let s = ctx.stream();
    println!(
        "{}: {} SMs, {} MB L2",
        ctx.device_name(),
        ctx.sm_count(),
        ctx.l2_bytes() >> 20
    );
    const BYTES: usize = 2 << 30;
    let mut r = moekit::testing::rng(7);
    let block: Vec<u8> = (0..1 << 24).map(|_| r.random()).collect();
    // SAFETY: every byte of src is written below before it is read.
    let mut src = unsafe { s.alloc::<u8>(BYTES) }?;
    for start in (0..BYTES).step_by(block.len()) {
        s.memcpy_htod(&block, &mut src.slice_mut(start..start + block.len()))?;
    }
    let mut dst = s.alloc_zeros::<u8>(BYTES)?;
    let timing = time_launches(s, 3, 20, |_| probe::copy_bytes(s, &src, &mut dst))?;
    // CPU check of three 16 MiB windows: start, middle, end.
    for start in [0, BYTES / 2, BYTES - block.len()] {
        let got = s.clone_dtoh(&dst.slice(start..start + block.len()))?;
        if got != moekit::reference::probe::copy_bytes(&block) {
            eprintln!("bandwidth_probe: the copy differs from its source at offset {start}");
            std::process::exit(1);
        }
    }
    let case = CaseResult {
        case: "ceiling/copy-2GiB".into(),
        median_us: timing.median_us(),
        flops: None,
        bytes: Some(2.0 * BYTES as f64),
    };
    println!(
        "copy 2 GiB: median {:.1} us, {:.0} GB/s (reads + writes), min {:.1} us; CPU check passed",
        case.median_us,
        case.gbps().unwrap(),
        timing.min_us()
    );
    println!(
        "{:.0}% of the {:.0} GB/s torch measured on an H200",
        100.0 * case.gbps().unwrap() / Roofline::default().copy_gbps,
        Roofline::default().copy_gbps
    );
    Ok(())
}
