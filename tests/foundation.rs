//! The foundation: the device check, the bandwidth probe against its CPU reference, errors, and
//! the bench harness arithmetic.

use moekit::bench::{rotation_sets, CaseResult, Roofline, Timing};
use moekit::testing::{fresh_seed, gpu, rel_l2_error, rng, upload};
use moekit::{probe, reference, Error};
use rand::RngExt;

#[test]
fn context_reports_a_hopper_device() {
    let Some(ctx) = gpu("context_reports_a_hopper_device") else {
        return;
    };
    let (major, minor) = ctx.cuda().compute_capability().unwrap();
    assert_eq!((major, minor), (9, 0));
    assert!(ctx.sm_count() >= 100, "{} SMs", ctx.sm_count());
    assert!(ctx.l2_bytes() >= 40 << 20, "{} bytes of L2", ctx.l2_bytes());
    println!(
        "{}: {} SMs, {} MB L2",
        ctx.device_name(),
        ctx.sm_count(),
        ctx.l2_bytes() >> 20
    );
}

#[test]
fn copy_probe_matches_reference_for_any_size_and_alignment() {
    let Some(ctx) = gpu("copy_probe_matches_reference_for_any_size_and_alignment") else {
        return;
    };
    let s = ctx.stream();
    let seed = fresh_seed();
    let mut r = rng(seed);
    for &n in &[
        0usize,
        1,
        15,
        16,
        17,
        255,
        4096 + 3,
        (1 << 20) + 5,
        48 << 20,
    ] {
        for (src_off, dst_off) in [(0, 0), (1, 1), (3, 0), (0, 8), (16, 32)] {
            let src: Vec<u8> = (0..n + src_off).map(|_| r.random()).collect();
            let d_src = upload(s, &src).unwrap();
            let mut d_dst = upload(s, &vec![0xA5u8; n + dst_off]).unwrap();
            probe::copy_bytes(
                s,
                &d_src.slice(src_off..src_off + n),
                &mut d_dst.slice_mut(dst_off..dst_off + n),
            )
            .unwrap();
            let got = s.clone_dtoh(&d_dst.slice(..n + dst_off)).unwrap();
            assert!(
                got[..dst_off].iter().all(|&b| b == 0xA5),
                "wrote before dst (n={n})"
            );
            assert!(
                got[dst_off..] == reference::probe::copy_bytes(&src[src_off..])[..],
                "n={n} offsets=({src_off},{dst_off}) seed={seed}"
            );
        }
    }
}

#[test]
fn copy_probe_refuses_mismatched_lengths() {
    let Some(ctx) = gpu("copy_probe_refuses_mismatched_lengths") else {
        return;
    };
    let s = ctx.stream();
    let a = s.alloc_zeros::<u8>(10).unwrap();
    let mut b = s.alloc_zeros::<u8>(11).unwrap();
    let e = probe::copy_bytes(s, &a, &mut b).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "dst", .. }), "{e}");
    assert!(e.to_string().contains("expected 10, got 11"), "{e}");
}

/// The row-read probe (the gating floor cases) against the CPU XOR of each row, for every
/// per-lane unroll (rows of 16 B to 8 KB, partial last vectors per lane), row counts that leave a
/// block partly empty, and a poisoned dst whose entries past the rows must survive.
#[test]
fn read_rows_probe_matches_reference() {
    let Some(ctx) = gpu("read_rows_probe_matches_reference") else {
        return;
    };
    let s = ctx.stream();
    let seed = fresh_seed();
    let mut r = rng(seed);
    for &row_bytes in &[16usize, 48, 512, 1024, 1040, 4096, 8192] {
        for &rows in &[0usize, 1, 3, 4, 129] {
            let src: Vec<u8> = (0..rows * row_bytes).map(|_| r.random()).collect();
            let d_src = upload(s, &src).unwrap();
            let mut d_dst = upload(s, &vec![0xDEAD_BEEFu32; rows + 2]).unwrap();
            // (upload allocates at least one byte: the view holds exactly the rows)
            probe::read_rows(s, &d_src.slice(..rows * row_bytes), row_bytes, &mut d_dst).unwrap();
            let got = s.clone_dtoh(&d_dst).unwrap();
            let want = reference::probe::read_rows(&src, row_bytes);
            assert_eq!(
                got[..rows],
                want[..],
                "row_bytes={row_bytes} rows={rows} seed={seed}"
            );
            assert!(
                got[rows..].iter().all(|&v| v == 0xDEAD_BEEF),
                "wrote past the rows (row_bytes={row_bytes} rows={rows})"
            );
        }
    }
    let src = s.alloc_zeros::<u8>(4096).unwrap();
    let mut dst = s.alloc_zeros::<u32>(64).unwrap();
    for (row_bytes, what) in [
        (8, "row_bytes"),
        (24, "row_bytes"),
        (16384, "row_bytes"),
        (1536, "src"),
    ] {
        let e = probe::read_rows(s, &src, row_bytes, &mut dst).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument { arg, .. } if *arg == what),
            "row_bytes {row_bytes}: {e}"
        );
    }
    let e = probe::read_rows(s, &src, 16, &mut dst).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "dst", .. }), "{e}");
    let e = probe::read_rows(s, &src.slice(4..4 + 32), 16, &mut dst).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { arg: "src", .. }),
        "{e}"
    );
}

#[test]
fn empty_kernel_launches() {
    let Some(ctx) = gpu("empty_kernel_launches") else {
        return;
    };
    for _ in 0..10 {
        probe::empty_launch(ctx.stream()).unwrap();
    }
    ctx.synchronize().unwrap();
}

#[test]
fn error_messages_name_what_to_fix() {
    let e = Error::Unsupported {
        what: "NVIDIA A100 has compute capability 8.0".into(),
        limit: "sm_90a".into(),
    };
    assert_eq!(
        e.to_string(),
        "unsupported: NVIDIA A100 has compute capability 8.0 (limit: sm_90a)"
    );
    assert!(Error::KernelsNotBuilt
        .to_string()
        .contains("install-cuda.sh"));
    let e = Error::Shape {
        arg: "logits",
        expected: "8".into(),
        actual: "7".into(),
    };
    assert_eq!(
        e.to_string(),
        "shape mismatch for `logits`: expected 8, got 7"
    );
    let e: Error =
        cudarc::driver::DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY).into();
    assert!(matches!(e, Error::Cuda { code: 2, .. }), "{e:?}");
}

#[test]
fn without_a_gpu_the_gate_skips_or_fails_as_asked() {
    // Runs everywhere: on a GPU machine it must return a context; without one it must skip,
    // unless MOEKIT_REQUIRE_GPU=1 (then gpu() panics, which this test would report).
    let ctx = gpu("without_a_gpu_the_gate_skips_or_fails_as_asked");
    if moekit::testing::gpu_required() {
        assert!(ctx.is_some());
    }
}

#[test]
fn bench_harness_arithmetic() {
    let roof = Roofline {
        copy_gbps: 4000.0,
        bf16_tflops: 800.0,
    };
    // 4 GB in 1000 us = 4000 GB/s: 100% of the copy roofline
    let c = CaseResult {
        case: "x".into(),
        median_us: 1000.0,
        flops: None,
        bytes: Some(4e9),
    };
    assert!((c.gbps().unwrap() - 4000.0).abs() < 1e-9);
    assert!((c.roofline_pct(&roof).unwrap() - 100.0).abs() < 1e-9);
    // 400 GFLOP in 1000 us = 400 TFLOP/s: 50% of the matrix roofline, the larger floor
    let c = CaseResult {
        case: "y".into(),
        median_us: 1000.0,
        flops: Some(4e11),
        bytes: Some(1e9),
    };
    assert!((c.tflops().unwrap() - 400.0).abs() < 1e-9);
    assert!((c.roofline_pct(&roof).unwrap() - 50.0).abs() < 1e-9);
    assert!(c.line(&roof).starts_with("y "));
    assert_eq!(rotation_sets(1 << 20, 60 << 20), 64);
    assert_eq!(rotation_sets(100 << 20, 60 << 20), 2);
    assert_eq!(rotation_sets(1 << 30, 60 << 20), 1);
    let t = Timing {
        samples_us: vec![5.0, 1.0, 3.0, 2.0],
    };
    assert_eq!(t.median_us(), 2.5);
    assert_eq!(t.min_us(), 1.0);
}

#[test]
fn relative_error_metric() {
    assert_eq!(rel_l2_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!((rel_l2_error(&[1.0, 0.0], &[0.0, 1.0]) - 2f64.sqrt()).abs() < 1e-12);
    assert_eq!(rel_l2_error(&[f32::NAN], &[1.0]), f64::INFINITY);
    assert_eq!(rel_l2_error(&[1.0], &[0.0]), f64::INFINITY);
}
