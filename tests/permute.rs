//! Routing plan, permute and combine: GPU against the CPU reference over random and adversarial
//! routings, every alignment, FP8 rows with scales, odd row sizes, and bad inputs.

use half::{bf16, f16};
use moekit::permute::{
    combine, permute, permute_using, CombineInputs, CopyKernel, PlanConfig, RoutingPlan, RowScales,
    ScaleLayout, ALIGNMENTS,
};
use moekit::reference::permute as reference;
use moekit::testing::{fresh_seed, gpu, normal_vec, rel_l2_error, rng, routing, upload, Routing};
use moekit::{Context, Element, Error};
use rand::RngExt;

/// Builds the plan on the GPU (after a different routing, so stale state would show) and checks
/// every buffer against the reference exactly. Returns the plan and the reference.
fn checked_plan(
    ctx: &Context,
    cfg: &PlanConfig,
    ids: &[i32],
    tokens: usize,
    what: &str,
) -> (RoutingPlan, reference::PlanRef) {
    let s = ctx.stream();
    let mut plan = RoutingPlan::new(s, cfg.clone()).unwrap();
    // A first build with another routing: every buffer the second build leaves stale would differ.
    let other: Vec<i32> = (0..tokens * cfg.top_k)
        .map(|a| ((a * 7 + 3) % cfg.num_experts) as i32)
        .collect();
    let n = tokens * cfg.top_k;
    let d_other = upload(s, &other).unwrap();
    plan.build(s, &d_other.slice(..n), tokens).unwrap();
    let d_ids = upload(s, ids).unwrap();
    plan.build(s, &d_ids.slice(..n), tokens).unwrap();
    let want = assert_plan_matches(ctx, &plan, ids, tokens, what);
    (plan, want)
}

/// Checks every buffer of `plan`, last built from `ids` (`tokens` tokens), against the reference
/// exactly; returns the reference.
fn assert_plan_matches(
    ctx: &Context,
    plan: &RoutingPlan,
    ids: &[i32],
    tokens: usize,
    what: &str,
) -> reference::PlanRef {
    let s = ctx.stream();
    let cfg = plan.config();
    let n = tokens * cfg.top_k;
    let want = reference::routing_plan(cfg, ids, tokens);
    assert_eq!(
        s.clone_dtoh(plan.expert_counts()).unwrap(),
        want.expert_counts,
        "{what}: counts"
    );
    assert_eq!(
        s.clone_dtoh(plan.expert_offsets()).unwrap(),
        want.expert_offsets,
        "{what}: offsets"
    );
    let row_map = s.clone_dtoh(plan.row_map()).unwrap();
    assert_eq!(row_map.len(), cfg.max_rows().max(1));
    assert_eq!(
        &row_map[..cfg.max_rows()],
        &want.row_map[..],
        "{what}: row_map"
    );
    let inverse = s.clone_dtoh(plan.inverse_map()).unwrap();
    assert_eq!(&inverse[..n], &want.inverse_map[..], "{what}: inverse_map");
    let num_tiles = s.clone_dtoh(plan.num_tiles()).unwrap()[0] as usize;
    assert_eq!(num_tiles, want.tiles.len(), "{what}: num_tiles");
    assert!(num_tiles <= cfg.max_tiles(), "{what}: tiles over capacity");
    let tiles = s.clone_dtoh(plan.tiles()).unwrap();
    let tiles: Vec<(i32, i32)> = tiles[..2 * num_tiles]
        .chunks(2)
        .map(|c| (c[0], c[1]))
        .collect();
    assert_eq!(tiles, want.tiles, "{what}: tiles");
    want
}

#[test]
fn plan_matches_reference_across_routings_and_alignments() {
    let Some(ctx) = gpu("plan_matches_reference_across_routings_and_alignments") else {
        return;
    };
    let seed = fresh_seed();
    let mut r = rng(seed);
    for &align in &ALIGNMENTS {
        for (kind, label) in [
            (Routing::Uniform, "uniform"),
            (Routing::Zipf(1.2), "zipf-1.2"),
            (Routing::AllToFirst, "all-to-first"),
            (Routing::Balanced, "balanced"),
        ] {
            let (t, k, e) = (4096, 8, 256);
            let ids = routing(&mut r, t, k, e, kind);
            for block_m in [64, 128] {
                let cfg = PlanConfig::new(t, k, e).align(align).block_m(block_m);
                checked_plan(
                    &ctx,
                    &cfg,
                    &ids,
                    t,
                    &format!("{label} align={align} block_m={block_m} seed={seed}"),
                );
            }
        }
    }
}

#[test]
fn plan_edge_cases() {
    let Some(ctx) = gpu("plan_edge_cases") else {
        return;
    };
    let seed = fresh_seed();
    let mut r = rng(seed);
    // (tokens, k, E, align, what)
    let shapes: Vec<(usize, usize, usize, usize, &str)> = vec![
        (0, 8, 256, 1, "T=0"),
        (0, 8, 256, 128, "T=0 aligned"),
        (1, 8, 256, 16, "T=1"),
        (3, 8, 256, 8, "mostly empty experts"),
        (100, 1, 1, 1, "E=1"),
        (100, 1, 1, 64, "E=1 aligned"),
        (50, 8, 8, 32, "k=E"),
        (1000, 8, 4096, 16, "E=4096"),
        (16384, 8, 256, 1, "T=16384"),
        (65536, 8, 256, 128, "T=65536"),
        // The one-launch plan takes <= 512 local experts and T*k <= 2048 per SM (270336 on an
        // H200's 132): both sides of each limit.
        (2000, 8, 512, 16, "E=512 (one launch)"),
        (2000, 8, 513, 16, "E=513 (three kernels)"),
        (33792, 8, 256, 1, "T*k = 270336"),
        (33793, 8, 256, 1, "T*k = 270344"),
        (777, 6, 160, 8, "E=160 (V2)"),
        (5, 32, 64, 1, "k=32"),
    ];
    for (t, k, e, align, what) in shapes {
        let ids = routing(&mut r, t, k, e, Routing::Uniform);
        let cfg = PlanConfig::new(t.max(1), k, e).align(align);
        checked_plan(&ctx, &cfg, &ids, t, &format!("{what} seed={seed}"));
    }
    // Fewer tokens than the plan was sized for: rows past the total are cleared too.
    let ids = routing(&mut r, 300, 8, 256, Routing::Uniform);
    checked_plan(
        &ctx,
        &PlanConfig::new(1000, 8, 256).align(32),
        &ids,
        300,
        "T < max_tokens",
    );
}

#[test]
fn plan_rebuilt_for_changing_token_counts() {
    // One plan rebuilt for batches of different sizes (so different grids for the one-launch
    // plan, whose barrier state persists between builds, and both plan paths in turn).
    let Some(ctx) = gpu("plan_rebuilt_for_changing_token_counts") else {
        return;
    };
    let seed = fresh_seed();
    let mut r = rng(seed);
    let s = ctx.stream();
    let mut plan = RoutingPlan::new(s, PlanConfig::new(40000, 8, 256).align(16)).unwrap();
    for tokens in [40000, 7, 4096, 1, 16384, 40000, 0, 300] {
        let ids = routing(&mut r, tokens, 8, 256, Routing::Zipf(1.1));
        let d_ids = upload(s, &ids).unwrap();
        plan.build(s, &d_ids.slice(..tokens * 8), tokens).unwrap();
        assert_plan_matches(
            &ctx,
            &plan,
            &ids,
            tokens,
            &format!("T={tokens} seed={seed}"),
        );
    }
}

#[test]
fn plan_with_every_expert_at_align_plus_one_rows() {
    let Some(ctx) = gpu("plan_with_every_expert_at_align_plus_one_rows") else {
        return;
    };
    for align in [8, 64, 128] {
        // k divides E: token t takes experts 4t..4t+3 (mod 16), so every expert gets align+1 rows.
        let (e, k) = (16, 4);
        let t = e * (align + 1) / k;
        let ids: Vec<i32> = (0..t * k).map(|a| (a % e) as i32).collect();
        let cfg = PlanConfig::new(t, k, e).align(align).block_m(align);
        let (_, want) = checked_plan(&ctx, &cfg, &ids, t, &format!("align+1 rows, align={align}"));
        assert!(want.expert_counts.iter().all(|&c| c as usize == align + 1));
        assert_eq!(want.total_rows(), e * 2 * align);
    }
}

#[test]
fn plan_local_expert_range_drops_other_experts() {
    let Some(ctx) = gpu("plan_local_expert_range_drops_other_experts") else {
        return;
    };
    let mut r = rng(fresh_seed());
    let ids = routing(&mut r, 2000, 8, 256, Routing::Uniform);
    for range in [64..128, 0..1, 255..256, 0..256] {
        let cfg = PlanConfig::new(2000, 8, 256)
            .align(16)
            .local_experts(range.clone());
        let (_, want) = checked_plan(&ctx, &cfg, &ids, 2000, &format!("local {range:?}"));
        for (a, &row) in want.inverse_map.iter().enumerate() {
            assert_eq!(row >= 0, range.contains(&(ids[a] as usize)));
        }
    }
}

#[test]
fn plan_reports_ids_out_of_range() {
    let Some(ctx) = gpu("plan_reports_ids_out_of_range") else {
        return;
    };
    let s = ctx.stream();
    let mut ids = routing(&mut rng(1), 100, 4, 32, Routing::Uniform);
    ids[5] = -1;
    ids[77] = 32;
    ids[300] = i32::MAX;
    let cfg = PlanConfig::new(100, 4, 32);
    let (plan, want) = checked_plan(&ctx, &cfg, &ids, 100, "invalid ids");
    assert_eq!(want.invalid_ids, 3);
    let err = plan.check_ids(s).unwrap_err();
    assert!(err.to_string().contains("3 ids outside [0, 32)"), "{err}");
    let ok = routing(&mut rng(2), 100, 4, 32, Routing::Uniform);
    let mut plan = plan;
    plan.build(s, &s.clone_htod(&ok).unwrap(), 100).unwrap();
    plan.check_ids(s).unwrap();
    // A bad id in the second 256-assignment chunk, then a build of 50 tokens (one chunk): the
    // second chunk's old count must not be reported again; nor by a build of no tokens.
    let mut bad = ok.clone();
    bad[300] = -5;
    plan.build(s, &s.clone_htod(&bad).unwrap(), 100).unwrap();
    assert!(plan.check_ids(s).is_err());
    let d_ok = upload(s, &ok).unwrap();
    plan.build(s, &d_ok.slice(..200), 50).unwrap();
    plan.check_ids(s).unwrap();
    plan.build(s, &d_ok.slice(..0), 0).unwrap();
    plan.check_ids(s).unwrap();
}

#[test]
fn plan_config_validation() {
    let ok = PlanConfig::new(16, 8, 256);
    ok.validate().unwrap();
    for (cfg, needle) in [
        (ok.clone().align(3), "align"),
        (ok.clone().align(256), "align"),
        (ok.clone().block_m(0), "block_m"),
        (PlanConfig::new(16, 0, 256), "top_k"),
        (PlanConfig::new(16, 33, 256), "top_k"),
        (ok.clone().local_experts(10..10), "local_experts"),
        (ok.clone().local_experts(0..257), "local_experts"),
        (PlanConfig::new(1 << 29, 8, 256), "i32"),
    ] {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} should mention {needle:?}");
    }
    assert_eq!(ok.max_rows(), 128);
    assert_eq!(ok.clone().align(64).max_rows(), 128 + 256 * 63);
}

#[test]
fn reference_plan_by_hand() {
    // 3 tokens, k = 2, 3 experts, align 2.
    let ids = [2, 0, 0, 1, 2, 0];
    let cfg = PlanConfig::new(3, 2, 3).align(2).block_m(2);
    let p = reference::routing_plan(&cfg, &ids, 3);
    assert_eq!(p.expert_counts, vec![3, 1, 2]);
    assert_eq!(p.expert_offsets, vec![0, 4, 6, 8]);
    // expert 0: assignments 1, 2, 5; pad; expert 1: 3; pad; expert 2: 0, 4
    assert_eq!(&p.row_map[..8], &[1, 2, 5, -1, 3, -1, 0, 4]);
    assert_eq!(p.inverse_map, vec![6, 0, 1, 4, 7, 2]);
    assert_eq!(p.tiles, vec![(0, 0), (0, 2), (1, 4), (2, 6)]);
}

/// Element types that permute moves as opaque rows (bytes for FP8).
fn check_permute<T>(
    ctx: &Context,
    cfg: &PlanConfig,
    hidden: usize,
    scales: Option<ScaleLayout>,
    x: Vec<T>,
    poison: T,
    what: &str,
) where
    T: cudarc::driver::DeviceRepr + Copy + Default + PartialEq + std::fmt::Debug,
{
    let tokens = x.len() / hidden;
    let s = ctx.stream();
    let mut r = rng(fresh_seed());
    let ids = routing(
        &mut r,
        tokens,
        cfg.top_k,
        cfg.num_experts,
        Routing::Zipf(1.2),
    );
    let (plan, want) = checked_plan(ctx, cfg, &ids, tokens, what);
    let d_x = s.clone_htod(&x).unwrap();
    let rows = cfg.max_rows();
    let mut d_xp = s.clone_htod(&vec![poison; rows * hidden]).unwrap();
    let cols = scales.map_or(0, |l| l.per_row(hidden));
    let x_scales = normal_vec(&mut r, tokens * cols, 1.0);
    let d_scales = upload(s, &x_scales).unwrap();
    let mut d_xp_scales = upload(s, &vec![f32::NAN; rows * cols]).unwrap();
    let row_scales = scales.map(|layout| RowScales {
        input: d_scales.slice(..tokens * cols),
        output: d_xp_scales.slice_mut(..rows * cols),
        layout,
    });
    permute(s, &plan, hidden, &d_x, &mut d_xp, row_scales).unwrap();
    let xp = s.clone_dtoh(&d_xp).unwrap();
    let total = want.total_rows();
    let expect = reference::permute(&want, &x, hidden, cfg.top_k);
    assert!(
        xp[..total * hidden] == expect[..],
        "{what}: permuted rows differ"
    );
    assert!(
        xp[total * hidden..].iter().all(|v| *v == poison),
        "{what}: wrote past the padded total"
    );
    // Each kernel on its own writes the same rows (the bulk and phased ones only where rows are
    // 16-byte multiples on 16-byte bases and no scales move; elsewhere they are refused). The
    // phased one twice: its grid-barrier word must be left ready for the next launch.
    if scales.is_none() {
        let bulk_ok = (hidden * std::mem::size_of::<T>()) % 16 == 0;
        for kernel in [
            CopyKernel::WarpPerToken,
            CopyKernel::Bulk,
            CopyKernel::Phased,
            CopyKernel::Phased,
        ] {
            let mut d_xp2 = s.clone_htod(&vec![poison; rows * hidden]).unwrap();
            let res = permute_using(s, &plan, hidden, &d_x, &mut d_xp2, None, kernel);
            if kernel != CopyKernel::WarpPerToken && !bulk_ok {
                assert!(
                    matches!(res, Err(Error::Unsupported { .. })),
                    "{what}: {kernel:?} permute of {hidden}-element rows: {res:?}"
                );
                continue;
            }
            res.unwrap();
            let xp2 = s.clone_dtoh(&d_xp2).unwrap();
            assert!(
                xp2 == xp,
                "{what}: {kernel:?} differs from the launcher's choice"
            );
        }
    }
    if scales.is_some() {
        let got = s.clone_dtoh(&d_xp_scales.slice(..rows * cols)).unwrap();
        let expect = reference::permute(&want, &x_scales, cols, cfg.top_k);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got[..total * cols]), bits(&expect), "{what}: scales");
        assert!(
            got[total * cols..].iter().all(|v| v.is_nan()),
            "{what}: scales past the total"
        );
    }
}

#[test]
fn permute_moves_rows_exactly() {
    let Some(ctx) = gpu("permute_moves_rows_exactly") else {
        return;
    };
    let mut r = rng(fresh_seed());
    let mut normal = |n| normal_vec(&mut r, n, 1.0);
    // bf16, DeepSeek-V3 hidden, unpadded and padded
    for align in [1, 16, 128] {
        let (t, h) = (300, 7168);
        let x: Vec<bf16> = normal(t * h).into_iter().map(bf16::from_f32).collect();
        let cfg = PlanConfig::new(t, 8, 256).align(align);
        check_permute(
            &ctx,
            &cfg,
            h,
            None,
            x,
            bf16::from_f32(-77.0),
            &format!("bf16 align={align}"),
        );
    }
    // f16 gpt-oss hidden 2880 (5760-byte rows: 16-byte path)
    let x: Vec<f16> = normal(200 * 2880).into_iter().map(f16::from_f32).collect();
    check_permute(
        &ctx,
        &PlanConfig::new(200, 4, 128).align(8),
        2880,
        None,
        x,
        f16::from_f32(-77.0),
        "f16 H=2880",
    );
    // f32 with 33 columns: 132-byte rows, 4-byte path
    let x = normal(97 * 33);
    check_permute(
        &ctx,
        &PlanConfig::new(97, 3, 10).align(8),
        33,
        None,
        x,
        -77.0f32,
        "f32 H=33",
    );
    // FP8 rows as bytes with one scale per row, odd width: byte path
    let x: Vec<u8> = (0..64 * 7).map(|i| (i * 37 % 251) as u8).collect();
    check_permute(
        &ctx,
        &PlanConfig::new(64, 2, 8).align(16),
        7,
        Some(ScaleLayout::PerRow),
        x,
        0xEEu8,
        "fp8 H=7 per-row scales",
    );
    // FP8 rows with DeepSeek's 1x128 scales
    let x: Vec<u8> = (0..128 * 7168).map(|i| (i * 131 % 255) as u8).collect();
    check_permute(
        &ctx,
        &PlanConfig::new(128, 8, 256).align(128),
        7168,
        Some(ScaleLayout::Per128Columns),
        x,
        0xEEu8,
        "fp8 H=7168 1x128 scales",
    );
    // FP8 rows of 16 KB with 1x128 scales: rows of two load passes, each its own warp (the
    // scales moved by the first)
    let x: Vec<u8> = (0..77 * 16384).map(|i| (i * 131 % 253) as u8).collect();
    check_permute(
        &ctx,
        &PlanConfig::new(77, 4, 64).align(8),
        16384,
        Some(ScaleLayout::Per128Columns),
        x,
        0xEEu8,
        "fp8 H=16384 1x128 scales",
    );
    // Rows of 513 16-byte vectors (two uneven slices, 257 + 256) and of 1536 (three slices)
    for h in [4104, 12288] {
        let x: Vec<bf16> = normal(150 * h).into_iter().map(bf16::from_f32).collect();
        check_permute(
            &ctx,
            &PlanConfig::new(150, 4, 32).align(16),
            h,
            None,
            x,
            bf16::from_f32(-77.0),
            &format!("bf16 H={h} (sliced rows)"),
        );
    }
    // 1100 tokens x 8 copies of 8 KB rows: 72 MB of copies, past L2, so the streaming stores
    let x: Vec<bf16> = normal(1100 * 4096)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    check_permute(
        &ctx,
        &PlanConfig::new(1100, 8, 64),
        4096,
        None,
        x,
        bf16::from_f32(-77.0),
        "bf16 H=4096 T=1100 k=8 (streaming stores)",
    );
    // The phased kernel over several grid-wide rounds (it takes at most 512 / k = 16 rows per
    // CTA, so 5000 tokens are 3 rounds on 132 SMs), padded segments, and a local expert range
    // whose other slots are not placed.
    for (range, what) in [(0..64, "all experts"), (8..40, "local experts 8..40")] {
        let x: Vec<bf16> = normal(5000 * 64).into_iter().map(bf16::from_f32).collect();
        check_permute(
            &ctx,
            &PlanConfig::new(5000, 32, 64).align(16).local_experts(range),
            64,
            None,
            x,
            bf16::from_f32(-77.0),
            &format!("bf16 H=64 T=5000 k=32 (phased rounds), {what}"),
        );
    }
    // E = 1, k = 1: every token to the one expert
    let x = normal(50 * 64);
    check_permute(
        &ctx,
        &PlanConfig::new(50, 1, 1).align(32),
        64,
        None,
        x,
        -77.0f32,
        "E=1",
    );
}

/// DeepSeek-V3 rows through the launcher's choice at a size where it takes the phased kernel
/// (k >= 4 and 505 MB of copies: 3 rounds of at most 16 rows per CTA on 132 SMs, rows of 896
/// vectors that the 512 threads do not divide, the keys right behind 224 KB of rows), padded
/// segments. (Named for the sanitizer runs' `--skip deepseek_v3`: too large to instrument.)
#[test]
fn permute_deepseek_v3_rows_through_the_phased_kernel() {
    let Some(ctx) = gpu("permute_deepseek_v3_rows_through_the_phased_kernel") else {
        return;
    };
    let mut r = rng(fresh_seed());
    let (t, h) = (4400, 7168);
    let x: Vec<bf16> = normal_vec(&mut r, t * h, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    check_permute(
        &ctx,
        &PlanConfig::new(t, 8, 256).align(16),
        h,
        None,
        x,
        bf16::from_f32(-77.0),
        "bf16 H=7168 T=4400 k=8 (phased by the launcher)",
    );
}

#[test]
fn permute_from_a_misaligned_view() {
    let Some(ctx) = gpu("permute_from_a_misaligned_view") else {
        return;
    };
    let s = ctx.stream();
    let (t, h, k, e) = (40, 64, 2, 8);
    let ids = routing(&mut rng(3), t, k, e, Routing::Uniform);
    let cfg = PlanConfig::new(t, k, e);
    let (plan, want) = checked_plan(&ctx, &cfg, &ids, t, "misaligned");
    let x: Vec<bf16> = normal_vec(&mut rng(4), t * h + 1, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let d_x = s.clone_htod(&x).unwrap();
    let mut d_xp = s.alloc_zeros::<bf16>(cfg.max_rows() * h + 1).unwrap();
    // Views starting one element in: 2-byte aligned only.
    permute(s, &plan, h, &d_x.slice(1..), &mut d_xp.slice_mut(1..), None).unwrap();
    let xp = s.clone_dtoh(&d_xp).unwrap();
    assert_eq!(&xp[1..], &reference::permute(&want, &x[1..], h, k)[..]);
}

#[allow(clippy::too_many_arguments)]
fn check_combine<Y: Element, O: Element>(
    ctx: &Context,
    cfg: &PlanConfig,
    tokens: usize,
    hidden: usize,
    weighted: bool,
    extras: bool,
    tol: f64,
    what: &str,
) {
    let s = ctx.stream();
    let seed = fresh_seed();
    let mut r = rng(seed);
    let ids = routing(&mut r, tokens, cfg.top_k, cfg.num_experts, Routing::Uniform);
    let (plan, want) = checked_plan(ctx, cfg, &ids, tokens, what);
    let rows = cfg.max_rows();
    let y: Vec<Y> = normal_vec(&mut r, rows * hidden, 1.0)
        .into_iter()
        .map(Y::from_f32)
        .collect();
    let w = normal_vec(&mut r, tokens * cfg.top_k, 0.5);
    let shared: Vec<O> = normal_vec(&mut r, tokens * hidden, 1.0)
        .into_iter()
        .map(O::from_f32)
        .collect();
    let residual: Vec<O> = normal_vec(&mut r, tokens * hidden, 1.0)
        .into_iter()
        .map(O::from_f32)
        .collect();
    let (d_y, d_w, d_shared, d_res) = (
        s.clone_htod(&y).unwrap(),
        s.clone_htod(&w).unwrap(),
        s.clone_htod(&shared).unwrap(),
        s.clone_htod(&residual).unwrap(),
    );
    // One combine with `kernel` into a NaN-poisoned output, downloaded as f32.
    let run = |kernel: CopyKernel| -> moekit::Result<Vec<f32>> {
        let mut inputs = CombineInputs::<Y, O>::new(d_y.as_view(), weighted.then(|| d_w.as_view()))
            .kernel(kernel);
        if extras {
            inputs = inputs.shared(d_shared.as_view()).residual(d_res.as_view());
        }
        let mut out = s
            .clone_htod(&vec![O::from_f32(f32::NAN); tokens * hidden])
            .unwrap();
        combine(s, &plan, hidden, &inputs, &mut out)?;
        Ok(s.clone_dtoh(&out)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect())
    };
    let got = run(CopyKernel::Auto).unwrap();
    let f = |v: &[Y]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    let g = |v: &[O]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    let (sh, re) = (g(&shared), g(&residual));
    let expect = reference::combine(
        &want,
        &reference::CombineArgs {
            y: &f(&y),
            weights: weighted.then_some(w.as_slice()),
            shared: extras.then_some(sh.as_slice()),
            residual: extras.then_some(re.as_slice()),
            tokens,
            hidden,
            top_k: cfg.top_k,
        },
    );
    let err = rel_l2_error(&got, &expect);
    assert!(
        err <= tol,
        "{what} seed={seed}: relative error {err:.3e} > {tol:.1e}"
    );
    // Bitwise reproducible.
    let again = run(CopyKernel::Auto).unwrap();
    assert!(
        got.iter()
            .zip(&again)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{what}: rerun differs"
    );
    // The warp and bulk kernels sum in the same order: bitwise equal outputs. The bulk kernel
    // needs 16-byte rows of y and is refused otherwise.
    let bulk_ok = (hidden * std::mem::size_of::<Y>()) % 16 == 0;
    for kernel in [CopyKernel::WarpPerToken, CopyKernel::Bulk] {
        let res = run(kernel);
        if kernel == CopyKernel::Bulk && !bulk_ok {
            assert!(
                matches!(res, Err(Error::Unsupported { .. })),
                "{what}: bulk combine of {hidden}-element rows: {res:?}"
            );
            continue;
        }
        let other = res.unwrap();
        assert!(
            got.iter()
                .zip(&other)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: {kernel:?} differs from the launcher's choice"
        );
    }
    // The phased kernel is the permute's only.
    let res = run(CopyKernel::Phased);
    assert!(
        matches!(res, Err(Error::Unsupported { .. })),
        "{what}: phased combine: {res:?}"
    );
}

#[test]
fn combine_matches_reference() {
    let Some(ctx) = gpu("combine_matches_reference") else {
        return;
    };
    let dsv3 = PlanConfig::new(256, 8, 256).align(16);
    check_combine::<bf16, bf16>(
        &ctx,
        &dsv3,
        256,
        7168,
        true,
        true,
        4e-3,
        "bf16->bf16 weighted + shared + residual",
    );
    check_combine::<bf16, bf16>(
        &ctx,
        &dsv3,
        256,
        7168,
        false,
        false,
        4e-3,
        "bf16->bf16 plain sum",
    );
    check_combine::<f32, bf16>(&ctx, &dsv3, 256, 7168, true, false, 4e-3, "f32->bf16");
    check_combine::<bf16, f32>(&ctx, &dsv3, 256, 7168, true, true, 1e-6, "bf16->f32");
    check_combine::<f16, f16>(
        &ctx,
        &PlanConfig::new(100, 4, 128),
        100,
        2880,
        true,
        true,
        1e-3,
        "f16 H=2880",
    );
    check_combine::<f32, f32>(
        &ctx,
        &PlanConfig::new(77, 3, 9).align(8),
        77,
        33,
        true,
        true,
        1e-6,
        "f32 H=33 (scalar path)",
    );
    check_combine::<bf16, bf16>(
        &ctx,
        &PlanConfig::new(64, 32, 64),
        64,
        128,
        true,
        false,
        4e-3,
        "k=32",
    );
    // The bulk kernel's chunk sizes: k = 2 bf16 takes 4096-element chunks (16 per thread, in two
    // pieces of 8), so H = 4104 ends in a chunk of 8 elements that one thread sums; k = 4 takes
    // 2048; k = 1 f32 takes 4096 (four pieces of 4, f16 out) and H = 4100 leaves 4.
    check_combine::<bf16, bf16>(
        &ctx,
        &PlanConfig::new(200, 2, 8),
        200,
        4104,
        true,
        true,
        4e-3,
        "k=2 H=4104 (short last chunk)",
    );
    check_combine::<bf16, bf16>(
        &ctx,
        &PlanConfig::new(150, 4, 16),
        150,
        3000,
        true,
        false,
        4e-3,
        "k=4 H=3000",
    );
    check_combine::<f32, f16>(
        &ctx,
        &PlanConfig::new(90, 1, 4),
        90,
        4100,
        true,
        true,
        1e-3,
        "k=1 f32 H=4100",
    );
    check_combine::<bf16, f32>(
        &ctx,
        &PlanConfig::new(300, 8, 256).local_experts(100..200),
        300,
        512,
        true,
        true,
        1e-6,
        "local experts only",
    );
}

#[test]
fn bad_inputs_are_refused() {
    let Some(ctx) = gpu("bad_inputs_are_refused") else {
        return;
    };
    let s = ctx.stream();
    let cfg = PlanConfig::new(10, 2, 4);
    let mut plan = RoutingPlan::new(s, cfg.clone()).unwrap();
    let x = s.alloc_zeros::<f32>(10 * 8).unwrap();
    let mut xp = s.alloc_zeros::<f32>(cfg.max_rows() * 8).unwrap();
    // Not built yet.
    let e = permute(s, &plan, 8, &x, &mut xp, None).unwrap_err();
    assert!(e.to_string().contains("not been built"), "{e}");
    let ids = s.clone_htod(&[0i32; 20]).unwrap();
    let e = plan.build(s, &ids, 11).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { arg: "tokens", .. }),
        "{e}"
    );
    let e = plan.build(s, &ids, 9).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                arg: "topk_ids",
                ..
            }
        ),
        "{e}"
    );
    plan.build(s, &ids, 10).unwrap();
    let mut small = s.alloc_zeros::<f32>(cfg.max_rows() * 8 - 1).unwrap();
    let e = permute(s, &plan, 8, &x, &mut small, None).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "xp", .. }), "{e}");
    let e = permute(s, &plan, 9, &x, &mut xp, None).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "x", .. }), "{e}");
    let y = s.alloc_zeros::<f32>(cfg.max_rows() * 8).unwrap();
    let w = s.alloc_zeros::<f32>(19).unwrap();
    let mut out = s.alloc_zeros::<f32>(80).unwrap();
    let inputs = CombineInputs::<f32, f32>::new(y.as_view(), Some(w.as_view()));
    let e = combine(s, &plan, 8, &inputs, &mut out).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "weights", .. }), "{e}");
    let inputs = CombineInputs::<f32, f32>::new(y.slice(1..), None);
    let e = combine(s, &plan, 8, &inputs, &mut out).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "y", .. }), "{e}");
    let e = RoutingPlan::new(s, cfg.clone().align(5)).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { arg: "align", .. }),
        "{e}"
    );
    // random garbage ids never crash: they are dropped and reported
    let mut jr = rng(9);
    let junk: Vec<i32> = (0..20).map(|_| jr.random::<i32>()).collect();
    plan.build(s, &s.clone_htod(&junk).unwrap(), 10).unwrap();
    assert!(plan.check_ids(s).is_err());
}
