//! The main demo: a DeepSeek-V3-shaped MoE layer (E = 256, k = 8, H = 7168, I = 2048, one shared
//! expert) with random weights, run on T = 4096 tokens, checked on a sample of tokens against the
//! CPU reference, with one line per stage (µs, TFLOP/s, GB/s, % of roofline) and the total.
//!
//!     cargo run --release --example moe_layer -- [--preset deepseek-v3] [--tokens 4096]
//!         [--routing uniform|zipf|one] [--graph] [--check 4]

use std::collections::BTreeMap;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use cudarc::driver::{sys, CudaEvent, CudaStream};
use half::bf16;
use moekit::bench::{CaseResult, Roofline};
use moekit::moe::{MoeConfig, MoeLayer, Stage};
use moekit::testing::{device_normal, rng, routing, Routing};
use moekit::{probe, Context};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Preset {
    DeepseekV3,
    DeepseekV2Lite,
    Qwen3_30bA3b,
    #[value(name = "mixtral-8x7b")]
    Mixtral8x7b,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum RoutingKind {
    /// The router's own choice (random router weights: close to uniform).
    Uniform,
    /// Zipf α = 1.2 over the experts.
    Zipf,
    /// Every token to experts 0..k.
    One,
    /// Every expert gets T·k/E tokens (± 1): whole GEMM tiles when that is a multiple of 128.
    Balanced,
}

#[derive(Parser, Debug)]
#[command(about = "moekit's MoE layer demo")]
struct Args {
    #[arg(long, value_enum, default_value = "deepseek-v3")]
    preset: Preset,
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    #[arg(long, value_enum, default_value = "uniform")]
    routing: RoutingKind,
    /// Also time the forward captured in a CUDA graph.
    #[arg(long)]
    graph: bool,
    /// Tokens checked against the CPU reference.
    #[arg(long, default_value_t = 4)]
    check: usize,
    /// Timed forwards.
    #[arg(long, default_value_t = 10)]
    reps: usize,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("moe_layer: {e}");
        std::process::exit(1);
    }
}

fn config(p: Preset) -> (&'static str, MoeConfig) {
    match p {
        Preset::DeepseekV3 => ("dsv3", MoeConfig::deepseek_v3()),
        Preset::DeepseekV2Lite => ("dsv2-lite", MoeConfig::deepseek_v2_lite()),
        Preset::Qwen3_30bA3b => ("qwen3", MoeConfig::qwen3_30b_a3b()),
        Preset::Mixtral8x7b => ("mixtral", MoeConfig::mixtral_8x7b()),
    }
}

fn event(s: &Arc<CudaStream>) -> moekit::Result<CudaEvent> {
    Ok(s.context()
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?)
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let ctx = Context::new(0)?;
    // SAFETY: the demo drives everything from one stream, so cudarc's cross-stream event
    // tracking is not needed; without it a forward can be captured into a CUDA graph.
    unsafe { ctx.cuda().disable_event_tracking() };
    let s = ctx.stream().clone();
    let (model, cfg) = config(args.preset);
    let (t, h, k, e) = (args.tokens, cfg.hidden, cfg.top_k(), cfg.num_experts());
    println!(
        "{}: {model} MoE layer, E = {e}, k = {k}, H = {h}, I = {}, shared {}, T = {t}, {:?} routing",
        ctx.device_name(),
        cfg.intermediate,
        cfg.shared_intermediate,
        args.routing
    );
    let mut layer = MoeLayer::random(&s, cfg.clone(), t, 42, |what| {
        eprintln!("  making {what} ...")
    })?;
    let x = device_normal::<bf16>(&s, &mut rng(7), t * h, 1.0)?;
    let mut out = s.alloc_zeros::<bf16>(t * h)?;
    let synthetic = (args.routing != RoutingKind::Uniform).then(|| {
        let kind = match args.routing {
            RoutingKind::Zipf => Routing::Zipf(1.2),
            RoutingKind::Balanced => Routing::Balanced,
            _ => Routing::AllToFirst,
        };
        routing(&mut rng(9), t, k, e, kind)
    });
    let synth = match &synthetic {
        Some(ids) => {
            let w = vec![1.0 / k as f32; t * k];
            Some((s.clone_htod(ids)?, s.clone_htod(&w)?))
        }
        None => None,
    };
    let mut forward = |layer: &mut MoeLayer,
                       after: &mut dyn FnMut(Stage) -> moekit::Result<()>|
     -> moekit::Result<()> {
        match &synth {
            Some((ids, w)) => {
                layer.forward_routed(
                    &s,
                    &x.as_view(),
                    t,
                    &ids.as_view(),
                    &w.as_view(),
                    &mut out.as_view_mut(),
                )?;
                Ok(())
            }
            None => layer.forward_with(&s, &x.as_view(), t, &mut out.as_view_mut(), after),
        }
    };
    for _ in 0..3 {
        forward(&mut layer, &mut |_| Ok(()))?;
    }
    s.synchronize()?;

    // Per-stage times: events between stages, the forward queued behind a device spin so the
    // host's enqueue time is not measured.
    let mut samples: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let mut totals = Vec::new();
    let reps = args.reps.max(1);
    for _ in 0..reps {
        probe::busy_wait(&s, 3000.0)?;
        let start = event(&s)?;
        start.record(&s)?;
        let mut marks: Vec<(Stage, CudaEvent)> = Vec::new();
        forward(&mut layer, &mut |stage| {
            let ev = event(&s)?;
            ev.record(&s)?;
            marks.push((stage, ev));
            Ok(())
        })?;
        let end = event(&s)?;
        end.record(&s)?;
        s.synchronize()?;
        let mut prev = &start;
        for (stage, ev) in &marks {
            samples
                .entry(stage.name())
                .or_default()
                .push(prev.elapsed_ms(ev)? as f64 * 1e3);
            prev = ev;
        }
        totals.push(start.elapsed_ms(&end)? as f64 * 1e3);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ids_host = match &synthetic {
        Some(ids) => ids.clone(),
        None => s.clone_dtoh(&layer.routing().0.slice(..t * k))?,
    };
    // How even the routing is: the grouped GEMMs' kernel choice (single folding CTAs or pairs)
    // and their speed depend on how the rows spread over the experts.
    let mut per_expert = vec![0usize; e];
    ids_host.iter().for_each(|&id| per_expert[id as usize] += 1);
    let touched = per_expert.iter().filter(|&&n| n > 0).count();
    per_expert.sort_unstable();
    let mean = (t * k) as f64 / e as f64;
    println!(
        "routing: {touched} of {e} experts hit; rows per expert min {}, median {}, max {} (mean {mean:.0}); {} experts over twice the mean",
        per_expert[0],
        per_expert[e / 2],
        per_expert[e - 1],
        per_expert.iter().filter(|&&n| n as f64 > 2.0 * mean).count()
    );
    let roof = Roofline {
        copy_gbps: 4250.0,
        ..Roofline::default()
    };
    println!("{}", moekit::bench::header());
    // With a synthetic routing the forward skips the router and gating and records no stage
    // events: only the whole (routed) layer is reported.
    for stage in Stage::ALL.into_iter().filter(|_| synthetic.is_none()) {
        let name = stage.name();
        let Some(v) = samples.get_mut(name) else {
            continue;
        };
        let (flops, bytes) = stage.cost(&cfg, t, touched);
        let r = CaseResult {
            case: format!("{model}/T{t}/{name}"),
            median_us: median(v),
            flops: (flops > 0.0).then_some(flops),
            bytes: Some(bytes),
        };
        println!("{}", r.line(&roof));
    }
    let total_flops: f64 = Stage::ALL
        .into_iter()
        .filter(|st| synthetic.is_none() || !matches!(st, Stage::Router | Stage::Gating))
        .map(|st| st.cost(&cfg, t, touched).0)
        .sum();
    let total = CaseResult {
        case: if synthetic.is_some() {
            format!("{model}/T{t}/layer-routed")
        } else {
            format!("{model}/T{t}/layer")
        },
        median_us: median(&mut totals),
        flops: Some(total_flops),
        bytes: None,
    };
    println!("{}", total.line(&roof));

    if args.graph {
        let gs = s.clone();
        gs.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        forward(&mut layer, &mut |_| Ok(()))?;
        let graph = gs
            .end_capture(sys::CUgraphInstantiate_flags(0))?
            .ok_or("empty graph")?;
        graph.launch()?;
        let timing = moekit::bench::time_launches(&gs, 2, reps, |_| Ok(graph.launch()?))?;
        println!(
            "{:<44} {:>10.2}   (CUDA graph replay)",
            format!("{model}/T{t}/layer"),
            timing.median_us()
        );
    }

    check(
        &s,
        &layer,
        &cfg,
        &x,
        &out,
        &ids_host,
        synth.as_ref().map(|_| 1.0 / k as f32),
        args.check.min(t),
    )?;
    Ok(())
}

/// Compares a sample of output tokens with the CPU reference (downloading the experts they use).
#[allow(clippy::too_many_arguments)]
fn check(
    s: &Arc<CudaStream>,
    layer: &MoeLayer,
    cfg: &MoeConfig,
    x: &cudarc::driver::CudaSlice<bf16>,
    out: &cudarc::driver::CudaSlice<bf16>,
    ids: &[i32],
    fixed_weight: Option<f32>,
    n: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    if n == 0 {
        return Ok(());
    }
    let (t, h, k) = (x.len() / cfg.hidden, cfg.hidden, cfg.top_k());
    let dense = layer.download_dense(s)?;
    let weights: Vec<f32> = match fixed_weight {
        Some(w) => vec![w; t * k],
        None => s.clone_dtoh(&layer.routing().1.slice(..t * k))?,
    };
    let mut worst = 0.0f64;
    for j in 0..n {
        let tok = if n > 1 { j * (t - 1) / (n - 1) } else { 0 };
        let xt = s.clone_dtoh(&x.slice(tok * h..(tok + 1) * h))?;
        let got = s.clone_dtoh(&out.slice(tok * h..(tok + 1) * h))?;
        let tid = &ids[tok * k..(tok + 1) * k];
        let experts: Vec<(Vec<bf16>, Vec<bf16>)> = tid
            .iter()
            .map(|&e| layer.download_expert(s, e as usize))
            .collect::<moekit::Result<_>>()?;
        let lookup = |e: usize| {
            let pos = tid
                .iter()
                .position(|&x| x as usize == e)
                .expect("a routed expert");
            (&experts[pos].0[..], &experts[pos].1[..])
        };
        let want = moekit::reference::moe::token_output(
            cfg,
            &dense,
            &lookup,
            &xt,
            tid,
            &weights[tok * k..(tok + 1) * k],
        );
        let got: Vec<f32> = got.iter().map(|v| v.to_f32()).collect();
        let want64: Vec<f64> = want.iter().map(|v| *v as f64).collect();
        worst = worst.max(moekit::testing::rel_l2_error(&got, &want64));
    }
    if worst > 2e-2 {
        return Err(format!(
            "{n} tokens checked against the CPU reference: relative error {worst:.2e} > 2e-2"
        )
        .into());
    }
    println!("check: {n} tokens match the CPU reference (worst relative error {worst:.1e})");
    Ok(())
}
