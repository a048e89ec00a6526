//! A whole routing step (gating → plan → permute → combine), the phased permute, and an MLA step
//! (fresh tokens → paged decompression), captured in a CUDA graph and replayed on new inputs,
//! equal eager execution: nothing synchronizes with the host or bakes in a size.
//! Its own test binary, because it turns off cudarc's cross-stream event tracking for the context.

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use half::bf16;
use moekit::gating::{topk_gating, GatingConfig, GatingInputs};
use moekit::permute::{
    combine, permute, permute_using, CombineInputs, CopyKernel, PlanConfig, RoutingPlan,
};
use moekit::testing::{gpu, normal_vec, rng};

#[test]
fn captured_routing_step_replays_like_eager() {
    let Some(ctx) = gpu("captured_routing_step_replays_like_eager") else {
        return;
    };
    // SAFETY: this binary uses one stream for everything, so no cross-stream tracking is needed;
    // events recorded outside a capture must not be waited on inside it.
    unsafe { ctx.cuda().disable_event_tracking() };
    let s = ctx.new_stream().unwrap();
    let cfg = GatingConfig::deepseek_v3();
    let (t, e, k, h) = (512usize, 256usize, 8usize, 1024usize);
    let mut r = rng(11);
    let inputs_a = (
        normal_vec(&mut r, t * e, 1.0),
        normal_vec(&mut r, t * h, 1.0),
    );
    let inputs_b = (
        normal_vec(&mut r, t * e, 1.0),
        normal_vec(&mut r, t * h, 1.0),
    );
    let bias = s.clone_htod(&normal_vec(&mut r, e, 0.1)).unwrap();

    let mut logits = s.clone_htod(&inputs_a.0).unwrap();
    let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let mut x = s.clone_htod(&to_bf16(&inputs_a.1)).unwrap();
    let mut ids = s.alloc_zeros::<i32>(t * k).unwrap();
    let mut w = s.alloc_zeros::<f32>(t * k).unwrap();
    let mut plan = RoutingPlan::new(&s, PlanConfig::new(t, k, e).align(16)).unwrap();
    let rows = plan.config().max_rows();
    let mut xp = s.alloc_zeros::<bf16>(rows * h).unwrap();
    let mut out = s.alloc_zeros::<bf16>(t * h).unwrap();

    let mut step = |s: &std::sync::Arc<cudarc::driver::CudaStream>,
                    logits: &cudarc::driver::CudaSlice<f32>,
                    x: &cudarc::driver::CudaSlice<bf16>,
                    out: &mut cudarc::driver::CudaSlice<bf16>| {
        let gi = GatingInputs::new(logits.as_view(), t).correction_bias(bias.as_view());
        topk_gating(s, &cfg, &gi, &mut ids, &mut w, None).unwrap();
        plan.build(s, &ids, t).unwrap();
        permute(s, &plan, h, x, &mut xp, None).unwrap();
        // The permuted rows stand in for expert outputs.
        let ci = CombineInputs::<bf16, bf16>::new(xp.as_view(), Some(w.as_view()));
        combine(s, &plan, h, &ci, out).unwrap();
    };

    // Eager on inputs B: the expected result.
    let logits_b = s.clone_htod(&inputs_b.0).unwrap();
    let x_b = s.clone_htod(&to_bf16(&inputs_b.1)).unwrap();
    let mut out_eager = s.alloc_zeros::<bf16>(t * h).unwrap();
    step(&s, &logits_b, &x_b, &mut out_eager);
    let eager = s.clone_dtoh(&out_eager).unwrap();

    // Capture on inputs A, then load inputs B into the same buffers and replay.
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    step(&s, &logits, &x, &mut out);
    let graph = s
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a captured graph");
    s.memcpy_htod(&inputs_b.0, &mut logits).unwrap();
    s.memcpy_htod(&to_bf16(&inputs_b.1), &mut x).unwrap();
    graph.launch().unwrap();
    s.synchronize().unwrap();
    let replayed = s.clone_dtoh(&out).unwrap();
    assert!(
        eager
            .iter()
            .zip(&replayed)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "graph replay differs from eager execution"
    );
    assert!(eager.iter().any(|v| v.to_f32() != 0.0));
}

/// The phased permute (a cooperative grid with a grid barrier between its rounds) captured once
/// and replayed three times on new rows: each replay equals the warp kernel run eagerly, so the
/// barrier word is left ready by every replay.
#[test]
fn captured_phased_permute_replays_like_eager() {
    let Some(ctx) = gpu("captured_phased_permute_replays_like_eager") else {
        return;
    };
    // SAFETY: as in the routing test: one stream for everything.
    unsafe { ctx.cuda().disable_event_tracking() };
    let s = ctx.new_stream().unwrap();
    // At most 512 / k = 16 rows per CTA and round: 5000 tokens take 3 rounds on 132 SMs.
    let (t, e, k, h) = (5000usize, 64usize, 32usize, 64usize);
    let mut r = rng(13);
    let ids: Vec<i32> =
        moekit::testing::routing(&mut r, t, k, e, moekit::testing::Routing::Uniform);
    let d_ids = s.clone_htod(&ids).unwrap();
    let mut plan = RoutingPlan::new(&s, PlanConfig::new(t, k, e).align(8)).unwrap();
    plan.build(&s, &d_ids, t).unwrap();
    let rows = plan.config().max_rows();
    let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let mut x = s.alloc_zeros::<bf16>(t * h).unwrap();
    let mut xp = s.clone_htod(&vec![bf16::from_f32(-5.0); rows * h]).unwrap();
    let mut xp_eager = s.clone_htod(&vec![bf16::from_f32(-5.0); rows * h]).unwrap();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    permute_using(&s, &plan, h, &x, &mut xp, None, CopyKernel::Phased).unwrap();
    let graph = s
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a captured graph");
    for replay in 0..3 {
        s.memcpy_htod(&to_bf16(&normal_vec(&mut r, t * h, 1.0)), &mut x)
            .unwrap();
        graph.launch().unwrap();
        permute_using(
            &s,
            &plan,
            h,
            &x,
            &mut xp_eager,
            None,
            CopyKernel::WarpPerToken,
        )
        .unwrap();
        let (got, want) = (s.clone_dtoh(&xp).unwrap(), s.clone_dtoh(&xp_eager).unwrap());
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "replay {replay} differs from the warp kernel"
        );
    }
}

#[test]
fn captured_mla_step_replays_like_eager() {
    use moekit::mla::{
        decompress, write_fresh_tokens, DecompressProblem, FreshTokens, LatentNorm, LatentSource,
        MlaDims, MlaWorkspace, PagedCache, RopeConfig,
    };
    let Some(ctx) = gpu("captured_mla_step_replays_like_eager") else {
        return;
    };
    // SAFETY: as in the routing test: one stream for everything.
    unsafe { ctx.cuda().disable_event_tracking() };
    let s = ctx.new_stream().unwrap();
    let dims = MlaDims::deepseek_v3(16);
    let (t, row, block) = (200usize, dims.cache_row(), 16usize);
    let blocks = t.div_ceil(block) + 1;
    let mut r = rng(12);
    let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let kv_a_a = to_bf16(&normal_vec(&mut r, t * row, 1.0));
    let kv_a_b = to_bf16(&normal_vec(&mut r, t * row, 1.0));
    let gamma = s
        .clone_htod(&to_bf16(&normal_vec(&mut r, dims.kv_lora_rank, 1.0)))
        .unwrap();
    let w = s
        .clone_htod(&to_bf16(&normal_vec(
            &mut r,
            dims.kv_b_proj_rows() * dims.kv_lora_rank,
            0.05,
        )))
        .unwrap();
    // One sequence at position 5 in reversed blocks; slots follow the same table.
    let table: Vec<i32> = (0..blocks as i32).rev().collect();
    let slots: Vec<i64> = (0..t)
        .map(|i| {
            let p = 5 + i;
            (table[p / block] as usize * block + p % block) as i64
        })
        .collect();
    let positions: Vec<i64> = (0..t as i64).map(|i| 5 + i).collect();
    let table = s.clone_htod(&table).unwrap();
    let cu = s.clone_htod(&[0i32, t as i32]).unwrap();
    let starts = s.clone_htod(&[5i32]).unwrap();
    let slots = s.clone_htod(&slots).unwrap();
    let positions = s.clone_htod(&positions).unwrap();
    let mut kv_a = s.clone_htod(&kv_a_a).unwrap();
    let mut cache = s.alloc_zeros::<bf16>(blocks * block * row).unwrap();
    let p = DecompressProblem::new(dims, t);
    let mut k = s.alloc_zeros::<bf16>(t * 16 * dims.k_head_dim()).unwrap();
    let mut v = s.alloc_zeros::<bf16>(t * 16 * dims.v_head_dim).unwrap();
    let mut ws = MlaWorkspace::new(&s, &dims, t).unwrap();
    let rope = RopeConfig::deepseek_v3();

    let mut step = |s: &std::sync::Arc<cudarc::driver::CudaStream>,
                    kv_a: &cudarc::driver::CudaSlice<bf16>,
                    cache: &mut cudarc::driver::CudaSlice<bf16>,
                    k: &mut cudarc::driver::CudaSlice<bf16>,
                    v: &mut cudarc::driver::CudaSlice<bf16>| {
        let input = FreshTokens {
            kv_a: kv_a.slice(..),
            kv_a_stride: row,
            positions: positions.slice(..),
            tokens: t,
        };
        let norm = LatentNorm {
            gamma: gamma.slice(..),
            eps: 1e-6,
        };
        write_fresh_tokens(
            s,
            &dims,
            &input,
            &norm,
            &rope,
            cache,
            Some(&slots.slice(..)),
        )
        .unwrap();
        let source = LatentSource::Paged(PagedCache {
            cache: cache.slice(..),
            block_size: block,
            block_table: table.slice(..),
            max_blocks_per_seq: blocks,
            cu_seqlens: cu.slice(..),
            seq_starts: Some(starts.slice(..)),
        });
        decompress(s, &p, &source, &w, k, v, &mut ws).unwrap();
    };

    // Eager on inputs B.
    let kv_b = s.clone_htod(&kv_a_b).unwrap();
    let mut cache_e = s.alloc_zeros::<bf16>(blocks * block * row).unwrap();
    let mut k_e = s.alloc_zeros::<bf16>(t * 16 * dims.k_head_dim()).unwrap();
    let mut v_e = s.alloc_zeros::<bf16>(t * 16 * dims.v_head_dim).unwrap();
    step(&s, &kv_b, &mut cache_e, &mut k_e, &mut v_e);
    let (ke, ve) = (s.clone_dtoh(&k_e).unwrap(), s.clone_dtoh(&v_e).unwrap());

    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    step(&s, &kv_a, &mut cache, &mut k, &mut v);
    let graph = s
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a captured graph");
    s.memcpy_htod(&kv_a_b, &mut kv_a).unwrap();
    graph.launch().unwrap();
    s.synchronize().unwrap();
    let (kr, vr) = (s.clone_dtoh(&k).unwrap(), s.clone_dtoh(&v).unwrap());
    let same = |a: &[bf16], b: &[bf16]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(
        same(&ke, &kr),
        "K: graph replay differs from eager execution"
    );
    assert!(
        same(&ve, &vr),
        "V: graph replay differs from eager execution"
    );
    assert!(ke.iter().any(|x| x.to_f32() != 0.0));
}
