//! Grouped GEMM: the WGMMA kernel against the CPU reference and the FMA oracle, over routings
//! (uniform, Zipf, all-to-one, empty and one-row experts, E = 1, E = 1024), every epilogue, both
//! output types, ragged shapes; poisoned outputs prove every real row is written and nothing else.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use moekit::grouped_gemm::{grouped_gemm, Epilogue, GemmProblem, Implementation, BLOCK_M};
use moekit::permute::{PlanConfig, RoutingPlan};
use moekit::reference::grouped_gemm as reference;
use moekit::reference::permute::{routing_plan, PlanRef};
use moekit::testing::{fresh_seed, gpu, normal_vec, rel_l2_error, rng, routing, upload, Routing};
use moekit::{Context, Error};

struct Case {
    what: String,
    plan: RoutingPlan,
    plan_ref: PlanRef,
    x: Vec<f32>, // bf16 values
    w: Vec<f32>,
    weights: Vec<f32>,
    n: usize,
    k: usize,
    /// The WGMMA kernel's arrangement under test (`Wgmma`: the heuristic's choice).
    imp: Implementation,
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn rounded(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect()
}

#[allow(clippy::too_many_arguments)]
fn case(
    ctx: &Context,
    what: &str,
    ids: Vec<i32>,
    tokens: usize,
    top_k: usize,
    experts: usize,
    n: usize,
    k: usize,
    align: usize,
) -> Case {
    let s = ctx.stream();
    let cfg = PlanConfig::new(tokens.max(1), top_k, experts)
        .align(align)
        .block_m(BLOCK_M);
    let mut plan = RoutingPlan::new(s, cfg.clone()).unwrap();
    let d_ids = upload(s, &ids).unwrap();
    plan.build(s, &d_ids.slice(..ids.len()), tokens)
        .unwrap_or_else(|e| panic!("{what}: building the plan: {e}"));
    let plan_ref = routing_plan(&cfg, &ids, tokens);
    let mut r = rng(fresh_seed());
    let rows = cfg.max_rows();
    Case {
        what: format!("{what} (T={tokens}, k={top_k}, E={experts}, N={n}, K={k}, align={align})"),
        plan,
        plan_ref,
        x: rounded(normal_vec(&mut r, rows * k, 1.0)),
        w: rounded(normal_vec(&mut r, experts * n * k, 0.05)),
        weights: normal_vec(&mut r, tokens * top_k, 0.5),
        n,
        k,
        imp: Implementation::Wgmma,
    }
}

fn uniform(
    ctx: &Context,
    what: &str,
    tokens: usize,
    top_k: usize,
    experts: usize,
    n: usize,
    k: usize,
) -> Case {
    let ids = routing(
        &mut rng(fresh_seed()),
        tokens,
        top_k,
        experts,
        Routing::Uniform,
    );
    case(ctx, what, ids, tokens, top_k, experts, n, k, 1)
}

#[derive(Clone, Copy, PartialEq)]
enum Epi {
    Store,
    SwiGlu,
    RowScale,
}

/// Runs one implementation; returns the output as f32 and whether each element kept its poison.
fn run<O: moekit::grouped_gemm::GemmOutput>(
    ctx: &Context,
    c: &mut Case,
    epi: Epi,
    imp: Implementation,
) -> (Vec<f32>, Vec<bool>) {
    let s = ctx.stream();
    let rows = c.plan.config().max_rows();
    let n_out = if epi == Epi::SwiGlu { c.n / 2 } else { c.n };
    let poison = O::from_f32(-1232.0); // exact in bf16 and f32
    let d_x = s.clone_htod(&to_bf16(&c.x)).unwrap();
    let d_w = s.clone_htod(&to_bf16(&c.w)).unwrap();
    let d_weights = upload(s, &c.weights).unwrap();
    let mut d_y = s.clone_htod(&vec![poison; rows * n_out]).unwrap();
    let epilogue = match epi {
        Epi::Store => Epilogue::Store,
        Epi::SwiGlu => Epilogue::SwiGlu,
        Epi::RowScale => Epilogue::RowScale {
            weights: d_weights.slice(..c.weights.len()),
        },
    };
    let problem = GemmProblem::new(c.n, c.k)
        .epilogue(epilogue)
        .implementation(imp);
    grouped_gemm(s, &mut c.plan, &problem, &d_x, &d_w, &mut d_y).unwrap();
    let y = s.clone_dtoh(&d_y).unwrap();
    let untouched = y.iter().map(|v| v.to_f32() == -1232.0).collect();
    (y.iter().map(|v| v.to_f32()).collect(), untouched)
}

/// Checks the WGMMA kernel against the reference (and the oracle): real rows within tolerance,
/// every other row untouched. Returns the relative error.
fn check<O: moekit::grouped_gemm::GemmOutput>(
    ctx: &Context,
    c: &mut Case,
    epi: Epi,
    tol: f64,
) -> f64 {
    let epilogue = match epi {
        Epi::Store => reference::Epilogue::Store,
        Epi::SwiGlu => reference::Epilogue::SwiGlu,
        Epi::RowScale => reference::Epilogue::RowScale(&c.weights),
    };
    let want = reference::grouped_gemm(&c.plan_ref, &c.x, &c.w, c.n, c.k, epilogue);
    let imp = c.imp;
    let (got, untouched) = run::<O>(ctx, &mut *c, epi, imp);
    let n_out = if epi == Epi::SwiGlu { c.n / 2 } else { c.n };
    let (mut g, mut r) = (Vec::new(), Vec::new());
    for (row, w) in want.iter().enumerate() {
        let span = row * n_out..(row + 1) * n_out;
        match w {
            Some(vals) => {
                g.extend_from_slice(&got[span]);
                r.extend(vals.iter().map(|&v| v as f64));
            }
            None => assert!(
                untouched[span].iter().all(|&u| u),
                "{}: row {row} is not an expert row but was written",
                c.what
            ),
        }
    }
    let err = rel_l2_error(&g, &r);
    assert!(
        err <= tol,
        "{} {:?}: relative error {err:.3e} > {tol:.1e}",
        c.what,
        O::DTYPE
    );
    // The oracle agrees too, and a rerun is bitwise identical.
    let (oracle, _) = run::<O>(ctx, &mut *c, epi, Implementation::Oracle);
    let (again, _) = run::<O>(ctx, &mut *c, epi, imp);
    assert!(
        got.iter()
            .zip(&again)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{}: rerun differs",
        c.what
    );
    let ro: Vec<f64> = oracle.iter().map(|&v| v as f64).collect();
    let mask: Vec<bool> = untouched.iter().map(|u| !u).collect();
    let pick = |v: &[f32]| {
        v.iter()
            .zip(&mask)
            .filter(|(_, m)| **m)
            .map(|(x, _)| *x)
            .collect::<Vec<f32>>()
    };
    let pick64 = |v: &[f64]| {
        v.iter()
            .zip(&mask)
            .filter(|(_, m)| **m)
            .map(|(x, _)| *x)
            .collect::<Vec<f64>>()
    };
    let e2 = rel_l2_error(&pick(&got), &pick64(&ro));
    assert!(e2 <= tol, "{}: WGMMA vs oracle {e2:.3e}", c.what);
    err
}

#[test]
fn uniform_routing_every_epilogue() {
    let Some(ctx) = gpu("uniform_routing_every_epilogue") else {
        return;
    };
    let mut c = uniform(&ctx, "uniform", 512, 8, 16, 512, 512);
    check::<bf16>(&ctx, &mut c, Epi::Store, 5e-3);
    check::<f32>(&ctx, &mut c, Epi::Store, 1e-4);
    check::<bf16>(&ctx, &mut c, Epi::SwiGlu, 5e-3);
    check::<f32>(&ctx, &mut c, Epi::SwiGlu, 1e-4);
    check::<bf16>(&ctx, &mut c, Epi::RowScale, 5e-3);
    check::<f32>(&ctx, &mut c, Epi::RowScale, 1e-4);
}

#[test]
fn ragged_shapes() {
    let Some(ctx) = gpu("ragged_shapes") else {
        return;
    };
    // N and K not multiples of the tile, N below the 256-column tile, K below the 64-deep stage.
    for (n, k) in [(200, 72), (8, 8), (264, 1000), (1024, 136), (48, 2056)] {
        let mut c = uniform(&ctx, "ragged", 300, 4, 8, n, k);
        check::<bf16>(&ctx, &mut c, Epi::Store, 5e-3);
    }
    let mut c = uniform(&ctx, "ragged swiglu", 300, 4, 8, 272, 88);
    check::<f32>(&ctx, &mut c, Epi::SwiGlu, 1e-4);
}

#[test]
fn skewed_and_degenerate_routings() {
    let Some(ctx) = gpu("skewed_and_degenerate_routings") else {
        return;
    };
    let mut r = rng(fresh_seed());
    let zipf = routing(&mut r, 2000, 8, 64, Routing::Zipf(1.2));
    check::<bf16>(
        &ctx,
        &mut case(&ctx, "zipf-1.2", zipf, 2000, 8, 64, 256, 256, 1),
        Epi::Store,
        5e-3,
    );
    let all = routing(&mut r, 1000, 2, 32, Routing::AllToFirst);
    check::<bf16>(
        &ctx,
        &mut case(&ctx, "all-to-one", all, 1000, 2, 32, 256, 128, 1),
        Epi::Store,
        5e-3,
    );
    let sparse = routing(&mut r, 3, 8, 256, Routing::Uniform);
    check::<bf16>(
        &ctx,
        &mut case(&ctx, "mostly empty experts", sparse, 3, 8, 256, 128, 64, 1),
        Epi::SwiGlu,
        5e-3,
    );
    let one_row: Vec<i32> = (0..64).collect();
    check::<f32>(
        &ctx,
        &mut case(&ctx, "one-row experts", one_row, 64, 1, 64, 128, 128, 1),
        Epi::Store,
        1e-4,
    );
    let e1 = routing(&mut r, 700, 1, 1, Routing::Uniform);
    check::<bf16>(
        &ctx,
        &mut case(&ctx, "E=1", e1, 700, 1, 1, 512, 256, 1),
        Epi::Store,
        5e-3,
    );
    let e1024 = routing(&mut r, 300, 4, 1024, Routing::Uniform);
    check::<bf16>(
        &ctx,
        &mut case(&ctx, "E=1024", e1024, 300, 4, 1024, 64, 64, 1),
        Epi::Store,
        5e-3,
    );
    let padded = routing(&mut r, 500, 6, 20, Routing::Uniform);
    check::<bf16>(
        &ctx,
        &mut case(&ctx, "padded segments", padded, 500, 6, 20, 256, 192, 16),
        Epi::RowScale,
        5e-3,
    );
    let none: Vec<i32> = Vec::new();
    check::<bf16>(
        &ctx,
        &mut case(&ctx, "T=0", none, 0, 4, 16, 128, 64, 1),
        Epi::Store,
        5e-3,
    );
}

/// Runs `problem` (WGMMA) and the same problem through the oracle on one plan and the same
/// inputs, bf16 outputs of `out_len` elements; returns the WGMMA output's relative L2 error
/// against the oracle's, and the WGMMA output (as f32).
fn wgmma_vs_oracle(
    s: &Arc<CudaStream>,
    plan: &mut RoutingPlan,
    problem: GemmProblem<'_>,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    out_len: usize,
) -> (f64, Vec<f32>) {
    let mut got = s.alloc_zeros::<bf16>(out_len).unwrap();
    let mut want = s.alloc_zeros::<bf16>(out_len).unwrap();
    grouped_gemm(s, plan, &problem, x, w, &mut got).unwrap();
    let problem = problem.implementation(Implementation::Oracle);
    grouped_gemm(s, plan, &problem, x, w, &mut want).unwrap();
    let got = download(s, &got);
    let want: Vec<f64> = download(s, &want).iter().map(|&v| v as f64).collect();
    (rel_l2_error(&got, &want), got)
}

/// A bf16 device buffer, copied back as f32 (exact).
fn download(s: &Arc<CudaStream>, d: &CudaSlice<bf16>) -> Vec<f32> {
    s.clone_dtoh(d)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect()
}

/// The plan of `ids` under `cfg` and random X, then, for each `(epilogue, N, outputs per row)`,
/// random W `[E, N, K]` and the WGMMA kernel (arranged as `imp` says) against the oracle
/// (relative L2 error under 1e-2).
fn wgmma_vs_oracle_for_ids(
    s: &Arc<CudaStream>,
    cfg: &PlanConfig,
    ids: &[i32],
    k: usize,
    problems: impl IntoIterator<Item = (Epilogue<'static>, usize, usize)>,
    imp: Implementation,
    seed: u64,
) {
    let t = ids.len() / cfg.top_k;
    let mut plan = RoutingPlan::new(s, cfg.clone()).unwrap();
    plan.build(s, &s.clone_htod(ids).unwrap(), t).unwrap();
    let rows = cfg.max_rows();
    let e = cfg.num_experts;
    let x = moekit::testing::device_normal::<bf16>(s, &mut rng(seed ^ 1), rows * k, 1.0).unwrap();
    for (epilogue, n, n_out) in problems {
        let label = format!("{epilogue:?}");
        let w =
            moekit::testing::device_normal::<bf16>(s, &mut rng(seed ^ 2), e * n * k, 0.02).unwrap();
        let p = GemmProblem::new(n, k)
            .epilogue(epilogue)
            .implementation(imp);
        let (err, _) = wgmma_vs_oracle(s, &mut plan, p, &x, &w, rows * n_out);
        assert!(
            err < 1e-2,
            "K={k} N={n} {label} {imp:?}: WGMMA vs oracle {err:.3e} (seed {seed})"
        );
    }
}

/// A DeepSeek-V3-shaped expert GEMM (K = 7168, N = 4096) on fewer tokens: the WGMMA kernel against
/// the oracle everywhere, and against the CPU on a sample of rows.
#[test]
fn deepseek_v3_shapes_against_the_oracle() {
    let Some(ctx) = gpu("deepseek_v3_shapes_against_the_oracle") else {
        return;
    };
    let s = ctx.stream();
    let (t, top_k, e, n, k) = (512, 8, 64, 4096, 7168);
    let ids = routing(&mut rng(fresh_seed()), t, top_k, e, Routing::Uniform);
    let cfg = PlanConfig::new(t, top_k, e).block_m(BLOCK_M);
    let mut plan = RoutingPlan::new(s, cfg.clone()).unwrap();
    plan.build(s, &s.clone_htod(&ids).unwrap(), t).unwrap();
    let plan_ref = routing_plan(&cfg, &ids, t);
    let rows = cfg.max_rows();
    let x = moekit::testing::device_normal::<bf16>(s, &mut rng(5), rows * k, 1.0).unwrap();
    let w = moekit::testing::device_normal::<bf16>(s, &mut rng(6), e * n * k, 0.02).unwrap();
    let p = GemmProblem::new(n, k).epilogue(Epilogue::SwiGlu);
    let (err, got) = wgmma_vs_oracle(s, &mut plan, p, &x, &w, rows * (n / 2));
    assert!(
        err < 1e-2,
        "SwiGLU K=7168 N=4096: WGMMA vs oracle {err:.3e}"
    );
    // CPU spot check of three rows.
    let xh = download(s, &x);
    let wh = download(s, &w);
    for &row in &[0usize, rows / 2, rows - 1] {
        let e_row = plan_ref
            .expert_offsets
            .iter()
            .rposition(|&o| o as usize <= row)
            .unwrap();
        let xr = &xh[row * k..(row + 1) * k];
        for j in [0usize, 777, n / 2 - 1] {
            let dot = |c: usize| {
                xr.iter()
                    .zip(&wh[(e_row * n + c) * k..(e_row * n + c + 1) * k])
                    .fold(0f32, |s, (a, b)| a.mul_add(*b, s))
            };
            let g = dot(j);
            let v = g / (1.0 + (-g).exp()) * dot(n / 2 + j);
            let o = got[row * (n / 2) + j];
            assert!(
                (o - v).abs() <= 0.02 * v.abs() + 0.02,
                "row {row} col {j}: {o} vs {v}"
            );
        }
    }
}

/// K = 4096, the 128 x 256 kernel as 2-CTA clusters sharing W tiles
/// (`Implementation::WgmmaPairs`). Three column blocks per M tile and an odd M-tile total (Zipf routing
/// over 24 experts, redrawn until the plan has an odd tile count) give every pair kind: pairs
/// sharing a W tile, pairs straddling two column blocks or two experts (separate W loads), and a
/// last pair whose second rank has no tile. The WGMMA kernel against the oracle, for the plain
/// epilogue on a ragged N (640: the last column block half full) and for SwiGLU (N = 768).
#[test]
fn w_tile_pairs_against_the_oracle() {
    let Some(ctx) = gpu("w_tile_pairs_against_the_oracle") else {
        return;
    };
    let seed = fresh_seed();
    let (t, top_k, e) = (700, 4, 24);
    let cfg = PlanConfig::new(t, top_k, e).block_m(BLOCK_M);
    let mut r = rng(seed);
    let ids = loop {
        let ids = routing(&mut r, t, top_k, e, Routing::Zipf(1.2));
        if routing_plan(&cfg, &ids, t).tiles.len() % 2 == 1 {
            break ids;
        }
    };
    let problems = [(Epilogue::Store, 640, 640), (Epilogue::SwiGlu, 768, 384)];
    let imp = Implementation::WgmmaPairs;
    wgmma_vs_oracle_for_ids(ctx.stream(), &cfg, &ids, 4096, problems, imp, seed);
}

/// One-slot expert ids (k = 1) giving expert e exactly `sizes[e]` tokens, the tokens in a random
/// order so that every segment gathers rows from all over x.
fn ids_of_sizes(sizes: &[usize], seed: u64) -> Vec<i32> {
    use rand::seq::SliceRandom;
    let mut ids: Vec<i32> = sizes
        .iter()
        .enumerate()
        .flat_map(|(e, &n)| std::iter::repeat_n(e as i32, n))
        .collect();
    ids.shuffle(&mut rng(seed));
    ids
}

/// The pair-order tests' problems at K = 4096 on the 2-CTA pair kernels: plain over 4 and 3
/// column blocks and SwiGLU over 4 (128 outputs each), WGMMA against the oracle, one token per
/// id (top-1) over `experts` experts.
fn pair_problems_vs_oracle(ctx: &Context, ids: &[i32], experts: usize, seed: u64) {
    let cfg = PlanConfig::new(ids.len(), 1, experts).block_m(BLOCK_M);
    let problems = [
        (Epilogue::Store, 1024, 1024),
        (Epilogue::SwiGlu, 1024, 512),
        (Epilogue::Store, 640, 640),
    ];
    let imp = Implementation::WgmmaPairs;
    wgmma_vs_oracle_for_ids(ctx.stream(), &cfg, ids, 4096, problems, imp, seed);
}

/// K = 4096 pairs whose experts end in a tile of at most 64 rows behind an even number of full
/// tiles: those run column blocks two by two, the two last tiles paired with each other (the
/// kernel's decode_tile). The expert sizes mix that case (300, 280 and 520 rows) with the ones
/// keeping the plain order: an odd number of full tiles (129), a last tile over 64 rows (600), no
/// ragged tile (384), an empty expert and a tiny one; an even (1024 plain: 4 column blocks, 1024
/// SwiGLU: 4 of 128 outputs) and an odd (640 plain: 3) column-block count, all with enough tiles
/// for the 128 x 256 pair kernel (N = 512 plain would run the narrow 128 x 64 kernel).
#[test]
fn tail_pairs_against_the_oracle() {
    let Some(ctx) = gpu("tail_pairs_against_the_oracle") else {
        return;
    };
    let seed = fresh_seed();
    let sizes = [300usize, 280, 129, 600, 520, 0, 5, 384];
    let ids = ids_of_sizes(&sizes, seed);
    pair_problems_vs_oracle(&ctx, &ids, sizes.len(), seed);
}

/// K = 4096 pairs where an expert ends in a tile of at most 32 rows behind an odd number of full
/// tiles: the pair of its last full tile and that last tile runs as a tall pair (each CTA takes
/// its half of the full tile's rows at full width and half of the columns of the last tile's
/// rows, swapped: W on the WGMMA's M side, m64n16 up to 16 rows, m64n32 up to 32; the kernel's
/// produce_pairs). Sizes: one full tile + 1, + 22, + 32, + 33 and + 64 rows (129, 150, 160, 161,
/// 192), three full tiles + 64 and + 16 (448, 400), beside a lone tile (64), an empty expert and
/// one row: 129, 150, 160 and 400 run as tall pairs (unless `MOEKIT_GEMM_TALL_PAIRS=0` or
/// `MOEKIT_GEMM_SWAP_ROWS=16`), 161, 192 and 448 as plain W-sharing pairs. Plain (4 and 3
/// column blocks) and SwiGLU bf16 outputs against the oracle, then row-scaled bf16 and plain and
/// SwiGLU f32 outputs (the staged epilogue) against the CPU, with poisoned outputs.
#[test]
fn tall_pairs_against_the_oracle() {
    let Some(ctx) = gpu("tall_pairs_against_the_oracle") else {
        return;
    };
    let seed = fresh_seed();
    let sizes = [129usize, 150, 160, 161, 192, 448, 400, 64, 0, 1];
    let ids = ids_of_sizes(&sizes, seed);
    let (t, e) = (ids.len(), sizes.len());
    pair_problems_vs_oracle(&ctx, &ids, e, seed);
    let mut c = case(&ctx, "tall pairs", ids, t, 1, e, 1024, 4096, 1);
    c.imp = Implementation::WgmmaPairs;
    check::<bf16>(&ctx, &mut c, Epi::RowScale, 5e-3);
    check::<f32>(&ctx, &mut c, Epi::Store, 1e-4);
    check::<f32>(&ctx, &mut c, Epi::SwiGlu, 1e-4);
}

/// K = 2048 (single CTAs, the 128 x 256 kernel): tiles of at most 32 rows run swapped on both
/// consumers (the kernel's run_swapped: m64n16 up to 16 rows, m64n32 up to 32, unless
/// `MOEKIT_GEMM_SWAP_SMALL=0` or `MOEKIT_GEMM_SWAP_ROWS=16`). Sizes give lone tiles of 1, 5, 16
/// and 30 rows, last tiles of 1, 12, 16, 17 and 30 rows behind full ones (129, 140, 144, 145, 158,
/// 272), a last tile over 32 rows (300) and an empty expert; bf16 plain, SwiGLU and row-scaled
/// outputs against the CPU, with poisoned outputs.
#[test]
fn small_tiles_swapped_against_the_cpu() {
    let Some(ctx) = gpu("small_tiles_swapped_against_the_cpu") else {
        return;
    };
    let seed = fresh_seed();
    let sizes = [1usize, 5, 16, 30, 129, 140, 144, 145, 158, 272, 300, 0];
    let ids = ids_of_sizes(&sizes, seed);
    let (t, e) = (ids.len(), sizes.len());
    let mut c = case(&ctx, "small tiles", ids, t, 1, e, 1024, 2048, 1);
    check::<bf16>(&ctx, &mut c, Epi::Store, 5e-3);
    check::<bf16>(&ctx, &mut c, Epi::SwiGlu, 5e-3);
    check::<bf16>(&ctx, &mut c, Epi::RowScale, 5e-3);
}

/// K = 2048 (single CTAs), plain and SwiGLU bf16 outputs (the kernels with TMA stores): an expert's
/// last tile of at most 32 rows (16 with `MOEKIT_GEMM_FOLD_ROWS=16`) behind a full one is folded
/// into that full tile (the kernel's consume_folded, unless `MOEKIT_GEMM_FOLD_SMALL=0`; folds of at
/// most 16 rows by m64n16 on the 32-row box unless `MOEKIT_GEMM_FOLD_NARROW=0`): last tiles of 1,
/// 15 and 16 rows behind one full tile (129, 143, 144), 16 behind two and three (272, 400), 32
/// behind two (288), 5 behind 25 in the last of two bands (3205), 17 and 32 behind one (145, 160)
/// -- behind two or more full tiles the fold's output halves are split between the last two
/// (`MOEKIT_GEMM_FOLD_SPREAD`: at K = 4096 by default, at K = 2048 with `=2`), behind one that tile
/// folds alone -- beside ones that are not folded: 33 rows behind a full tile (161), no ragged tile
/// (256), lone tiles of 16, 8 and 1 rows, empty experts (the mean rows per expert stays above 96,
/// where the kernel folds by default). Four column blocks and two and a half (N = 640: the fold's
/// second 128 columns of the last block lie past N), segments packed and padded to 8 rows (the fold
/// box then reads padding rows), against the CPU with poisoned outputs; then K = 4096 on single
/// CTAs against the oracle.
#[test]
fn folded_last_tiles_against_the_cpu() {
    let Some(ctx) = gpu("folded_last_tiles_against_the_cpu") else {
        return;
    };
    let seed = fresh_seed();
    let sizes = [
        129usize, 143, 144, 272, 400, 288, 3205, 145, 160, 161, 256, 16, 8, 0, 1, 0,
    ];
    let ids = ids_of_sizes(&sizes, seed);
    let (t, e) = (ids.len(), sizes.len());
    for (n, align) in [(1024, 1), (640, 8)] {
        let mut c = case(
            &ctx,
            "folded last tiles",
            ids.clone(),
            t,
            1,
            e,
            n,
            2048,
            align,
        );
        check::<bf16>(&ctx, &mut c, Epi::Store, 5e-3);
        check::<bf16>(&ctx, &mut c, Epi::SwiGlu, 5e-3);
    }
    // K = 4096, where the heuristic picks between the pairs and the single folding CTAs: the
    // single CTAs (folding) against the oracle, plain and SwiGLU.
    let cfg = PlanConfig::new(t, 1, e).block_m(BLOCK_M);
    let problems = [(Epilogue::Store, 1024, 1024), (Epilogue::SwiGlu, 1024, 512)];
    let imp = Implementation::WgmmaSingle;
    wgmma_vs_oracle_for_ids(ctx.stream(), &cfg, &ids, 4096, problems, imp, seed);
}

/// K = 4096 (pairs of CTAs): tiles of at most 32 rows run swapped on both consumers there too
/// (`MOEKIT_GEMM_SWAP_SMALL=2`, the default): the last tiles of experts paired two by two (520,
/// 528, 529 and 544: 8, 16, 17 and 32 rows; 272: 16), lone tiles of 5, 16, 17 and 1 rows, and a
/// W-sharing pair whose second tile holds one row (129: a tall pair with plain and SwiGLU outputs,
/// swapped here with row-scaled ones), while last tiles of 33 rows (545) keep the m64n256 path. Plain and
/// SwiGLU bf16 against the oracle, row-scaled bf16 against the CPU with poisoned outputs.
#[test]
fn small_tiles_swapped_in_pairs_against_the_oracle() {
    let Some(ctx) = gpu("small_tiles_swapped_in_pairs_against_the_oracle") else {
        return;
    };
    let seed = fresh_seed();
    let sizes = [520usize, 272, 528, 529, 544, 545, 5, 16, 17, 1, 129, 0];
    let ids = ids_of_sizes(&sizes, seed);
    let (t, e) = (ids.len(), sizes.len());
    pair_problems_vs_oracle(&ctx, &ids, e, seed);
    let mut c = case(&ctx, "small tiles in pairs", ids, t, 1, e, 1024, 4096, 1);
    c.imp = Implementation::WgmmaPairs;
    check::<bf16>(&ctx, &mut c, Epi::RowScale, 5e-3);
}

/// Experts of more than 24 M tiles sweep their column blocks in bands (the kernel's decode_tile):
/// 25 M tiles (two bands of 14 and 11), 32 (two of 16), 51 (three of 18, 18 and 15), beside a
/// small and an empty expert (unless `MOEKIT_GEMM_BAND` sets another limit); K = 4096 on the
/// 2-CTA pairs and on single CTAs (no tail folds: the large experts end 0, 0 and 100 rows past
/// a full tile), K = 2048 single CTAs.
#[test]
fn banded_experts_against_the_oracle() {
    let Some(ctx) = gpu("banded_experts_against_the_oracle") else {
        return;
    };
    let seed = fresh_seed();
    let sizes = [3200usize, 70, 4096, 0, 6500];
    let ids = ids_of_sizes(&sizes, seed);
    let cfg = PlanConfig::new(ids.len(), 1, sizes.len()).block_m(BLOCK_M);
    for (k, imp) in [
        (4096, Implementation::WgmmaPairs),
        (4096, Implementation::WgmmaSingle),
        (2048, Implementation::Wgmma),
    ] {
        let problems = [(Epilogue::Store, 512, 512), (Epilogue::SwiGlu, 512, 256)];
        wgmma_vs_oracle_for_ids(ctx.stream(), &cfg, &ids, k, problems, imp, seed);
    }
}

/// A grid capped at a few CTAs (leaving SMs to concurrent work) changes which CTA runs a tile,
/// never its bits: 3 and 7 CTAs against the default launch (single folding CTAs and 2-CTA pairs at
/// K = 4096, the heuristic's choice at K = 2048), and the default against the oracle; pairs
/// capped at 1 CTA run single CTAs (against the oracle).
#[test]
fn capped_grids_keep_the_bits() {
    let Some(ctx) = gpu("capped_grids_keep_the_bits") else {
        return;
    };
    let s = ctx.stream();
    let seed = fresh_seed();
    let sizes = [1000usize, 70, 3100, 0, 130];
    let ids = ids_of_sizes(&sizes, seed);
    let cfg = PlanConfig::new(ids.len(), 1, sizes.len()).block_m(BLOCK_M);
    let mut plan = RoutingPlan::new(s, cfg.clone()).unwrap();
    plan.build(s, &s.clone_htod(&ids).unwrap(), ids.len())
        .unwrap();
    let rows = cfg.max_rows();
    for (k, imp) in [
        (4096, Implementation::WgmmaSingle),
        (4096, Implementation::WgmmaPairs),
        (2048, Implementation::Wgmma),
    ] {
        let x =
            moekit::testing::device_normal::<bf16>(s, &mut rng(seed ^ 1), rows * k, 1.0).unwrap();
        for (swiglu, n) in [(false, 768), (true, 1024)] {
            let n_out = if swiglu { n / 2 } else { n };
            let w = moekit::testing::device_normal::<bf16>(
                s,
                &mut rng(seed ^ 2),
                sizes.len() * n * k,
                0.02,
            )
            .unwrap();
            let problem = || {
                let p = GemmProblem::new(n, k).implementation(imp);
                if swiglu {
                    p.epilogue(Epilogue::SwiGlu)
                } else {
                    p
                }
            };
            let (err, want) = wgmma_vs_oracle(s, &mut plan, problem(), &x, &w, rows * n_out);
            assert!(
                err < 1e-2,
                "K={k} N={n} swiglu={swiglu}: default vs oracle {err:.3e} (seed {seed})"
            );
            for (label, p) in [
                ("3 CTAs", problem().max_ctas(3)),
                ("7 CTAs", problem().max_ctas(7)),
            ] {
                let mut got = s.alloc_zeros::<bf16>(rows * n_out).unwrap();
                grouped_gemm(s, &mut plan, &p, &x, &w, &mut got).unwrap();
                let got = download(s, &got);
                assert!(
                    got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "K={k} N={n} swiglu={swiglu} {imp:?}: {label} differs from the default launch (seed {seed})"
                );
            }
            if imp == Implementation::WgmmaPairs {
                let (err, _) =
                    wgmma_vs_oracle(s, &mut plan, problem().max_ctas(1), &x, &w, rows * n_out);
                assert!(
                    err < 1e-2,
                    "K={k} N={n} swiglu={swiglu}: pairs capped at 1 CTA vs oracle {err:.3e} (seed {seed})"
                );
            }
        }
    }
}

#[test]
fn bad_inputs_are_refused() {
    let Some(ctx) = gpu("bad_inputs_are_refused") else {
        return;
    };
    let s = ctx.stream();
    let mut c = uniform(&ctx, "bad", 10, 2, 4, 64, 64);
    let rows = c.plan.config().max_rows();
    let x = s.alloc_zeros::<bf16>(rows * 64 + 8).unwrap();
    let w = s.alloc_zeros::<bf16>(4 * 64 * 64).unwrap();
    let mut y = s.alloc_zeros::<bf16>(rows * 64).unwrap();
    let e = grouped_gemm(s, &mut c.plan, &GemmProblem::new(60, 64), &x, &w, &mut y).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { arg: "n", .. }), "{e}");
    let e = grouped_gemm(s, &mut c.plan, &GemmProblem::new(64, 60), &x, &w, &mut y).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { arg: "k", .. }), "{e}");
    let e = grouped_gemm(
        s,
        &mut c.plan,
        &GemmProblem::new(64, 64),
        &x,
        &w.slice(1..),
        &mut y,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "w", .. }), "{e}");
    let e = grouped_gemm(
        s,
        &mut c.plan,
        &GemmProblem::new(64, 64),
        &x,
        &w,
        &mut y.slice_mut(1..),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "y", .. }), "{e}");
    let e = grouped_gemm(
        s,
        &mut c.plan,
        &GemmProblem::new(64, 64),
        &x.slice(4..),
        &w,
        &mut y,
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { arg: "x", .. }), "{e}");
    // y one pair of elements in (4 bytes): the 16-byte chunk stores would be misaligned.
    let mut wide_y = s.alloc_zeros::<bf16>(rows * 64 + 8).unwrap();
    let e = grouped_gemm(
        s,
        &mut c.plan,
        &GemmProblem::new(64, 64),
        &x,
        &w,
        &mut wide_y.slice_mut(2..),
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { arg: "y", .. }), "{e}");
    let small = RoutingPlan::new(s, PlanConfig::new(10, 2, 4).block_m(64)).unwrap();
    let mut small = small;
    small
        .build(s, &s.clone_htod(&[0i32; 20]).unwrap(), 10)
        .unwrap();
    let e = grouped_gemm(s, &mut small, &GemmProblem::new(64, 64), &x, &w, &mut y).unwrap_err();
    assert!(e.to_string().contains("block_m"), "{e}");
    let weights = s.alloc_zeros::<f32>(19).unwrap();
    let p = GemmProblem::new(64, 64).epilogue(Epilogue::RowScale {
        weights: weights.slice(..),
    });
    let e = grouped_gemm(s, &mut c.plan, &p, &x, &w, &mut y).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "weights", .. }), "{e}");
}

/// One expert with f32 output over few rows (the router GEMM's shape): the launcher splits K
/// across CTAs and sums the partial sums in a second pass, in split order (bitwise reruns).
#[test]
fn one_expert_split_k() {
    let Some(ctx) = gpu("one_expert_split_k") else {
        return;
    };
    let mut r = rng(fresh_seed());
    // On the H200's 132 SMs the first five split 128 x 64 tiles; (2048, 256, 2048) and
    // (3000, 256, 1536) split 128 x 256 tiles 7 and 5 ways (the second's last split shorter).
    for (t, n, k) in [
        (1, 256, 7168),
        (128, 256, 7168),
        (700, 128, 2048),
        (1000, 8, 4096),
        (300, 64, 520),
        (2048, 256, 2048),
        (3000, 256, 1536),
    ] {
        let ids = routing(&mut r, t, 1, 1, Routing::Uniform);
        let mut c = case(&ctx, "one expert, f32 out", ids, t, 1, 1, n, k, 1);
        check::<f32>(&ctx, &mut c, Epi::Store, 1e-4);
    }
    // A plan sized for far more tokens than it runs (an engine's maximum batch): the partial sums
    // cover the build's rows only.
    let (t, n, k, capacity) = (64, 256, 2048, 8192);
    let s = ctx.stream();
    let ids = routing(&mut r, t, 1, 1, Routing::Uniform);
    let cfg = PlanConfig::new(capacity, 1, 1).block_m(BLOCK_M);
    let mut plan = RoutingPlan::new(s, cfg.clone()).unwrap();
    let d_ids = upload(s, &ids).unwrap();
    plan.build(s, &d_ids.slice(..ids.len()), t).unwrap();
    let rows = cfg.max_rows();
    let mut c = Case {
        what: format!("one expert, plan for {capacity} tokens, T={t}, N={n}, K={k}"),
        plan,
        plan_ref: routing_plan(&cfg, &ids, t),
        x: rounded(normal_vec(&mut r, rows * k, 1.0)),
        w: rounded(normal_vec(&mut r, n * k, 0.05)),
        weights: normal_vec(&mut r, t, 0.5),
        n,
        k,
        imp: Implementation::Wgmma,
    };
    check::<f32>(&ctx, &mut c, Epi::Store, 1e-4);
}
