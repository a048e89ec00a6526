//! A whole routing step (gating → plan → permute → combine) captured in a CUDA graph and replayed
//! on new inputs equals eager execution: nothing synchronizes with the host or bakes in a size.
//! Its own test binary, because it turns off cudarc's cross-stream event tracking for the context.

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use half::bf16;
use moekit::gating::{topk_gating, GatingConfig, GatingInputs};
use moekit::permute::{combine, permute, CombineInputs, PlanConfig, RoutingPlan};
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
