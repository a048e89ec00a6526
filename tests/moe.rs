//! The MoE layer: checkpoint loading from tiny checkpoints written here (both tensor layouts,
//! FP8 with block scales, sharded), config rules, and on the GPU the layer against the CPU
//! reference and its graph replay.

use std::collections::BTreeMap;
use std::path::Path;

use half::bf16;
use moekit::gating::GatingConfig;
use moekit::moe::checkpoint::{read_hidden_states, write_hidden_states, Checkpoint};
use moekit::moe::{MoeConfig, MoeLayer, MoeWeights};
use moekit::reference::moe as reference;
use moekit::testing::{fresh_seed, gpu, normal_vec, rel_l2_error, rng};
use moekit::Error;
use rand::RngExt;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

/// A tensor to write: dtype, shape, bytes.
type Entry = (Dtype, Vec<usize>, Vec<u8>);

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_file(path: &Path, tensors: &BTreeMap<String, Entry>) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Values exactly representable in bf16 and in FP8 e4m3 (multiples of 1/8 in [-2, 2]).
fn exact_values(r: &mut impl rand::Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (r.random_range(-16i32..=16) as f32) / 8.0)
        .collect()
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Layout {
    PerExpert,
    FusedOutFirst,
    FusedInFirst,
    Fp8,
}

struct Tiny {
    cfg_json: serde_json::Value,
    expect: MoeWeights,
    tensors: BTreeMap<String, Entry>,
}

/// A two-layer checkpoint whose layer 1 is MoE (layer 0 dense), H = 24, I = 8, E = 8 (H != 2I:
/// a square fused tensor could not say which way round it is).
fn tiny(model_type: &str, layout: Layout, seed: u64) -> Tiny {
    let (h, i, e, k) = (24usize, 8usize, 8usize, 2usize);
    let mut r = rng(seed);
    let mixtral = model_type == "mixtral";
    let deepseek = model_type.starts_with("deepseek");
    let shared = if deepseek { 8 } else { 0 };
    let mut cfg_json = json!({
        "model_type": model_type,
        "hidden_size": h,
        "num_hidden_layers": 2,
        "num_experts_per_tok": k,
    });
    let obj = cfg_json.as_object_mut().unwrap();
    match model_type {
        "deepseek_v3" => {
            for (key, v) in [
                ("n_routed_experts", json!(e)),
                ("moe_intermediate_size", json!(i)),
                ("n_shared_experts", json!(1)),
                ("first_k_dense_replace", json!(1)),
                ("n_group", json!(2)),
                ("topk_group", json!(1)),
                ("norm_topk_prob", json!(true)),
                ("routed_scaling_factor", json!(2.5)),
                ("scoring_func", json!("sigmoid")),
                ("topk_method", json!("noaux_tc")),
                ("intermediate_size", json!(64)),
            ] {
                obj.insert(key.into(), v);
            }
        }
        "deepseek_v2" => {
            for (key, v) in [
                ("n_routed_experts", json!(e)),
                ("moe_intermediate_size", json!(i)),
                ("n_shared_experts", json!(1)),
                ("first_k_dense_replace", json!(1)),
                ("n_group", json!(2)),
                ("topk_group", json!(2)),
                ("routed_scaling_factor", json!(16.0)),
                ("scoring_func", json!("softmax")),
                ("topk_method", json!("group_limited_greedy")),
            ] {
                obj.insert(key.into(), v);
            }
        }
        "qwen3_moe" => {
            for (key, v) in [
                ("num_experts", json!(e)),
                ("moe_intermediate_size", json!(i)),
                ("norm_topk_prob", json!(true)),
                ("mlp_only_layers", json!([0])),
                ("decoder_sparse_step", json!(1)),
            ] {
                obj.insert(key.into(), v);
            }
        }
        _ => {
            obj.insert("num_local_experts".into(), json!(e));
            obj.insert("intermediate_size".into(), json!(i));
        }
    }
    let p = if mixtral {
        "model.layers.1.block_sparse_moe.".to_string()
    } else {
        "model.layers.1.mlp.".to_string()
    };
    let mut tensors = BTreeMap::new();
    let router = exact_values(&mut r, e * h);
    tensors.insert(
        format!("{p}gate.weight"),
        (Dtype::BF16, vec![e, h], bf16_bytes(&router)),
    );
    let correction = exact_values(&mut r, e);
    if model_type == "deepseek_v3" {
        tensors.insert(
            format!("{p}gate.e_score_correction_bias"),
            (Dtype::F32, vec![e], f32_bytes(&correction)),
        );
    }
    let gate: Vec<Vec<f32>> = (0..e).map(|_| exact_values(&mut r, i * h)).collect();
    let up: Vec<Vec<f32>> = (0..e).map(|_| exact_values(&mut r, i * h)).collect();
    let down: Vec<Vec<f32>> = (0..e).map(|_| exact_values(&mut r, h * i)).collect();
    let (gn, un, dn) = if mixtral {
        ("w1", "w3", "w2")
    } else {
        ("gate_proj", "up_proj", "down_proj")
    };
    match layout {
        Layout::PerExpert | Layout::Fp8 => {
            for x in 0..e {
                for (name, vals, shape) in [
                    (gn, &gate[x], vec![i, h]),
                    (un, &up[x], vec![i, h]),
                    (dn, &down[x], vec![h, i]),
                ] {
                    let full = format!("{p}experts.{x}.{name}.weight");
                    if layout == Layout::Fp8 {
                        // FP8 values v / s with block scale s = 2 (one 128 x 128 block here).
                        let q: Vec<u8> = vals
                            .iter()
                            .map(|v| float8::F8E4M3::from_f32(v / 2.0).to_bits())
                            .collect();
                        tensors.insert(full.clone(), (Dtype::F8_E4M3, shape, q));
                        tensors.insert(
                            format!("{full}_scale_inv"),
                            (Dtype::F32, vec![1, 1], f32_bytes(&[2.0])),
                        );
                    } else {
                        tensors.insert(full, (Dtype::BF16, shape, bf16_bytes(vals)));
                    }
                }
            }
        }
        Layout::FusedOutFirst | Layout::FusedInFirst => {
            let mut gu = Vec::new();
            let mut d = Vec::new();
            for x in 0..e {
                if layout == Layout::FusedOutFirst {
                    gu.extend_from_slice(&gate[x]);
                    gu.extend_from_slice(&up[x]);
                    d.extend_from_slice(&down[x]);
                } else {
                    // [H, 2I] and [I, H] per expert: the transposes.
                    for c in 0..h {
                        for rr in 0..2 * i {
                            gu.push(if rr < i {
                                gate[x][rr * h + c]
                            } else {
                                up[x][(rr - i) * h + c]
                            });
                        }
                    }
                    for c in 0..i {
                        for rr in 0..h {
                            d.push(down[x][rr * i + c]);
                        }
                    }
                }
            }
            let (gs, ds) = if layout == Layout::FusedOutFirst {
                (vec![e, 2 * i, h], vec![e, h, i])
            } else {
                (vec![e, h, 2 * i], vec![e, i, h])
            };
            tensors.insert(
                format!("{p}experts.gate_up_proj"),
                (Dtype::F32, gs, f32_bytes(&gu)),
            );
            tensors.insert(
                format!("{p}experts.down_proj"),
                (Dtype::F32, ds, f32_bytes(&d)),
            );
        }
    }
    let (shared_w13, shared_w2) = if shared > 0 {
        let sg = exact_values(&mut r, shared * h);
        let su = exact_values(&mut r, shared * h);
        let sd = exact_values(&mut r, h * shared);
        tensors.insert(
            format!("{p}shared_experts.gate_proj.weight"),
            (Dtype::BF16, vec![shared, h], bf16_bytes(&sg)),
        );
        tensors.insert(
            format!("{p}shared_experts.up_proj.weight"),
            (Dtype::BF16, vec![shared, h], bf16_bytes(&su)),
        );
        tensors.insert(
            format!("{p}shared_experts.down_proj.weight"),
            (Dtype::BF16, vec![h, shared], bf16_bytes(&sd)),
        );
        let mut a: Vec<f32> = sg;
        a.extend(su);
        (Some(a), Some(sd))
    } else {
        (None, None)
    };
    // An unrelated tensor, as real checkpoints have.
    tensors.insert(
        "model.embed_tokens.weight".into(),
        (Dtype::BF16, vec![4, h], bf16_bytes(&vec![0.5; 4 * h])),
    );
    let to16 = |v: &[f32]| v.iter().map(|x| bf16::from_f32(*x)).collect::<Vec<_>>();
    let mut w13 = Vec::new();
    let mut w2 = Vec::new();
    for x in 0..e {
        w13.extend(to16(&gate[x]));
        w13.extend(to16(&up[x]));
        w2.extend(to16(&down[x]));
    }
    Tiny {
        cfg_json,
        expect: MoeWeights {
            router: to16(&router),
            router_bias: None,
            correction_bias: (model_type == "deepseek_v3").then_some(correction),
            w13,
            w2,
            shared_w13: shared_w13.as_deref().map(to16),
            shared_w2: shared_w2.as_deref().map(to16),
        },
        tensors,
    }
}

fn write_checkpoint(dir: &Path, t: &Tiny, shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&t.cfg_json).unwrap(),
    )
    .unwrap();
    if shards <= 1 {
        write_file(&dir.join("model.safetensors"), &t.tensors);
        return;
    }
    let mut parts: Vec<BTreeMap<String, Entry>> = vec![BTreeMap::new(); shards];
    let mut weight_map = serde_json::Map::new();
    for (n, (name, entry)) in t.tensors.iter().enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", n % shards + 1);
        parts[n % shards].insert(name.clone(), entry.clone());
        weight_map.insert(name.clone(), json!(file));
    }
    for (s, part) in parts.iter().enumerate() {
        write_file(
            &dir.join(format!("model-{:05}-of-{shards:05}.safetensors", s + 1)),
            part,
        );
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("moekit-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn tiny_checkpoints_load_in_every_layout() {
    let cases = [
        ("deepseek_v3", Layout::PerExpert, 1),
        ("deepseek_v3", Layout::Fp8, 3),
        ("deepseek_v2", Layout::PerExpert, 2),
        ("qwen3_moe", Layout::PerExpert, 1),
        ("qwen3_moe", Layout::FusedOutFirst, 1),
        ("qwen3_moe", Layout::FusedInFirst, 2),
        ("mixtral", Layout::PerExpert, 2),
    ];
    for (n, (model, layout, shards)) in cases.into_iter().enumerate() {
        let t = tiny(model, layout, 100 + n as u64);
        let dir = temp_dir(&format!("{model}-{n}"));
        write_checkpoint(&dir, &t, shards);
        let ck = Checkpoint::open(&dir).unwrap();
        let (cfg, w) = ck
            .moe_block(1)
            .unwrap_or_else(|e| panic!("{model} {layout:?}: {e}"));
        assert_eq!(w, t.expect, "{model} {layout:?}: weights");
        assert_eq!(
            (cfg.hidden, cfg.intermediate, cfg.num_experts(), cfg.top_k()),
            (24, 8, 8, 2)
        );
        match model {
            "deepseek_v3" => {
                assert_eq!(
                    cfg.gating,
                    GatingConfig {
                        num_experts: 8,
                        top_k: 2,
                        n_group: 2,
                        topk_group: 1,
                        routed_scaling_factor: 2.5,
                        ..GatingConfig::deepseek_v3()
                    }
                );
                assert_eq!(cfg.shared_intermediate, 8);
            }
            "deepseek_v2" => {
                assert_eq!(
                    cfg.gating.group_selection,
                    moekit::gating::GroupSelection::MaxPerGroup
                );
                assert_eq!(cfg.gating.routed_scaling_factor, 16.0);
                assert!(!cfg.gating.renormalize);
            }
            "qwen3_moe" | "mixtral" => {
                assert!(cfg.gating.renormalize);
                assert_eq!(cfg.shared_intermediate, 0);
            }
            _ => unreachable!(),
        }
        // Layer 0 is dense.
        let e = ck.moe_block(0).unwrap_err().to_string();
        if model != "mixtral" {
            assert!(e.contains("dense"), "{model}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn checkpoint_errors_say_what_is_wrong() {
    let t = tiny("qwen3_moe", Layout::PerExpert, 7);
    let dir = temp_dir("errors");
    write_checkpoint(&dir, &t, 1);
    let ck = Checkpoint::open(&dir).unwrap();
    let e = ck.moe_block(5).unwrap_err().to_string();
    assert!(e.contains("2-layer"), "{e}");
    // A missing expert tensor.
    let mut broken = t;
    broken
        .tensors
        .remove("model.layers.1.mlp.experts.3.up_proj.weight");
    let dir2 = temp_dir("errors-missing");
    write_checkpoint(&dir2, &broken, 1);
    let e = Checkpoint::open(&dir2).unwrap().moe_block(1).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("experts.3.up_proj.weight is missing"),
        "{e}"
    );
    // A wrong shape, an unsupported model type.
    let mut wrong = tiny("mixtral", Layout::PerExpert, 8);
    wrong
        .tensors
        .get_mut("model.layers.1.block_sparse_moe.gate.weight")
        .unwrap()
        .1 = vec![24, 8];
    let dir3 = temp_dir("errors-shape");
    write_checkpoint(&dir3, &wrong, 1);
    let e = Checkpoint::open(&dir3)
        .unwrap()
        .moe_block(1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("has shape [24, 8], expected [8, 24]"), "{e}");
    let mut other = tiny("mixtral", Layout::PerExpert, 9);
    other.cfg_json["model_type"] = json!("llama");
    let dir4 = temp_dir("errors-type");
    write_checkpoint(&dir4, &other, 1);
    let e = Checkpoint::open(&dir4)
        .unwrap()
        .moe_block(1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unsupported model_type \"llama\""), "{e}");
    for d in [dir, dir2, dir3, dir4] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn hidden_states_round_trip_and_cpu_layer() {
    let t = tiny("deepseek_v3", Layout::PerExpert, 11);
    let dir = temp_dir("hidden");
    write_checkpoint(&dir, &t, 1);
    let (cfg, w) = Checkpoint::open(&dir).unwrap().moe_block(1).unwrap();
    let tokens = 5;
    let h = 24;
    let x = normal_vec(&mut rng(3), tokens * h, 1.0);
    for dtype in [Dtype::BF16, Dtype::F32] {
        let path = dir.join(format!("in-{dtype:?}.safetensors"));
        write_hidden_states(&path, &x, tokens, h, dtype).unwrap();
        let hs = read_hidden_states(&path).unwrap();
        assert_eq!((hs.tokens, hs.hidden, hs.dtype), (tokens, h, dtype));
        let want: Vec<bf16> = x.iter().map(|v| bf16::from_f32(*v)).collect();
        assert_eq!(hs.values, want);
        let out = reference::forward(&cfg, &w, &hs.values, tokens).unwrap();
        assert_eq!(out.out.len(), tokens * h);
        assert!(out.out.iter().all(|v| v.is_finite()));
        // The reference layer is the sum of its parts: re-derive one token by hand.
        let ids = &out.routing.ids[..2];
        let ws = &out.routing.weights[..2];
        let single = reference::forward_routed(&cfg, &w, &hs.values[..h], 1, ids, ws);
        assert_eq!(&single[..], &out.out[..h]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small layer per routing rule, random weights.
fn small(cfg: MoeConfig, seed: u64) -> MoeWeights {
    let (e, h, i, s) = (
        cfg.num_experts(),
        cfg.hidden,
        cfg.intermediate,
        cfg.shared_intermediate,
    );
    let mut r = rng(seed);
    let v = |r: &mut rand::rngs::StdRng, n: usize, sc: f32| {
        normal_vec(r, n, sc)
            .into_iter()
            .map(bf16::from_f32)
            .collect::<Vec<_>>()
    };
    MoeWeights {
        router: v(&mut r, e * h, 0.1),
        router_bias: None,
        correction_bias: (cfg.gating.score == moekit::gating::ScoreFunction::Sigmoid)
            .then(|| normal_vec(&mut r, e, 0.1)),
        w13: v(&mut r, e * 2 * i * h, 0.05),
        w2: v(&mut r, e * h * i, 0.05),
        shared_w13: (s > 0).then(|| v(&mut r, 2 * s * h, 0.05)),
        shared_w2: (s > 0).then(|| v(&mut r, h * s, 0.05)),
    }
}

fn small_presets() -> Vec<(&'static str, MoeConfig)> {
    vec![
        (
            "deepseek-v3",
            MoeConfig {
                hidden: 256,
                intermediate: 128,
                shared_intermediate: 128,
                ..MoeConfig::deepseek_v3()
            },
        ),
        (
            "deepseek-v2-lite",
            MoeConfig {
                hidden: 256,
                intermediate: 96,
                shared_intermediate: 192,
                ..MoeConfig::deepseek_v2_lite()
            },
        ),
        (
            "qwen3-30b-a3b",
            MoeConfig {
                hidden: 256,
                intermediate: 64,
                ..MoeConfig::qwen3_30b_a3b()
            },
        ),
        (
            "mixtral-8x7b",
            MoeConfig {
                hidden: 256,
                intermediate: 512,
                ..MoeConfig::mixtral_8x7b()
            },
        ),
    ]
}

#[test]
fn gpu_layer_matches_reference() {
    let Some(ctx) = gpu("gpu_layer_matches_reference") else {
        return;
    };
    let s = ctx.stream();
    for (name, cfg) in small_presets() {
        let seed = fresh_seed();
        let w = small(cfg.clone(), seed);
        let tokens = 300;
        let mut layer = MoeLayer::new(s, cfg.clone(), &w, 512).unwrap();
        let x: Vec<bf16> = normal_vec(&mut rng(seed ^ 1), tokens * cfg.hidden, 1.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let d_x = s.clone_htod(&x).unwrap();
        let mut out = s
            .clone_htod(&vec![bf16::from_f32(f32::NAN); tokens * cfg.hidden])
            .unwrap();
        layer
            .forward(s, &d_x.as_view(), tokens, &mut out.as_view_mut())
            .unwrap();
        let got: Vec<f32> = s
            .clone_dtoh(&out)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        // Expert path: the reference with the GPU's own routing.
        let (ids, wts) = layer.routing();
        let k = cfg.top_k();
        let ids = s.clone_dtoh(&ids.slice(..tokens * k)).unwrap();
        let wts = s.clone_dtoh(&wts.slice(..tokens * k)).unwrap();
        let want = reference::forward_routed(&cfg, &w, &x, tokens, &ids, &wts);
        let want64: Vec<f64> = want.iter().map(|v| *v as f64).collect();
        let err = rel_l2_error(&got, &want64);
        assert!(
            err < 1e-2,
            "{name} seed={seed}: layer vs reference {err:.3e}"
        );
        // Routing: the GPU's choice equals the reference's except at near ties of the logits.
        let full = reference::forward(&cfg, &w, &x, tokens).unwrap();
        let mut differ = 0;
        for t in 0..tokens {
            if ids[t * k..(t + 1) * k] != full.routing.ids[t * k..(t + 1) * k] {
                assert!(
                    full.routing.margins[t] < 1e-3,
                    "{name}: token {t} routed differently (margin {:.2e})",
                    full.routing.margins[t]
                );
                differ += 1;
            }
        }
        assert!(
            differ * 20 <= tokens,
            "{name}: {differ} tokens routed differently"
        );
        let r = rel_l2_error(
            &got,
            &full.out.iter().map(|v| *v as f64).collect::<Vec<_>>(),
        );
        assert!(
            r < 0.1,
            "{name}: layer vs the fully reference-routed output {r:.3e}"
        );
    }
}

#[test]
fn gpu_layer_graph_replay_equals_eager() {
    let Some(ctx) = gpu("gpu_layer_graph_replay_equals_eager") else {
        return;
    };
    // SAFETY: one stream for everything in this test; events recorded outside a capture must not
    // be waited on inside it.
    unsafe { ctx.cuda().disable_event_tracking() };
    let s = ctx.new_stream().unwrap();
    let (_, cfg) = small_presets().remove(0);
    let w = small(cfg.clone(), 5);
    let tokens = 200;
    let mut layer = MoeLayer::new(&s, cfg.clone(), &w, tokens).unwrap();
    let h = cfg.hidden;
    let xa: Vec<bf16> = normal_vec(&mut rng(1), tokens * h, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let xb: Vec<bf16> = normal_vec(&mut rng(2), tokens * h, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let mut d_x = s.clone_htod(&xa).unwrap();
    let mut out = s.alloc_zeros::<bf16>(tokens * h).unwrap();
    // Warm up (builds the token plan), then eager on B.
    layer
        .forward(&s, &d_x.as_view(), tokens, &mut out.as_view_mut())
        .unwrap();
    let d_xb = s.clone_htod(&xb).unwrap();
    let mut eager = s.alloc_zeros::<bf16>(tokens * h).unwrap();
    layer
        .forward(&s, &d_xb.as_view(), tokens, &mut eager.as_view_mut())
        .unwrap();
    let eager = s.clone_dtoh(&eager).unwrap();
    s.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    layer
        .forward(&s, &d_x.as_view(), tokens, &mut out.as_view_mut())
        .unwrap();
    let graph = s
        .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph");
    s.memcpy_htod(&xb, &mut d_x).unwrap();
    graph.launch().unwrap();
    s.synchronize().unwrap();
    let replayed = s.clone_dtoh(&out).unwrap();
    assert!(
        eager
            .iter()
            .zip(&replayed)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "replay differs from eager"
    );
}

/// The token count changes between forwards, eagerly and across graphs captured at two sizes and
/// replayed alternately: every forward must rebuild what depends on T (a host-side "built for T"
/// cache once made a replayed graph use the other size's token plan). Rows are computed
/// independently, so the first 37 rows of a 300-token forward equal a 37-token forward bitwise.
#[test]
fn gpu_layer_token_count_changes() {
    let Some(ctx) = gpu("gpu_layer_token_count_changes") else {
        return;
    };
    // SAFETY: one stream for everything in this test.
    unsafe { ctx.cuda().disable_event_tracking() };
    let s = ctx.new_stream().unwrap();
    let (_, cfg) = small_presets().remove(0);
    let w = small(cfg.clone(), 6);
    let (big, small_t, h) = (300, 37, cfg.hidden);
    let mut layer = MoeLayer::new(&s, cfg.clone(), &w, big).unwrap();
    let x: Vec<bf16> = normal_vec(&mut rng(3), big * h, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let d_x = s.clone_htod(&x).unwrap();
    let run = |layer: &mut MoeLayer, t: usize| {
        let mut out = s.alloc_zeros::<bf16>(t * h).unwrap();
        layer
            .forward(&s, &d_x.slice(..t * h), t, &mut out.as_view_mut())
            .unwrap();
        s.clone_dtoh(&out).unwrap()
    };
    let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let a = run(&mut layer, big);
    let b = run(&mut layer, small_t);
    let c = run(&mut layer, big);
    assert_eq!(
        bits(&a),
        bits(&c),
        "T=300 after T=37 differs from the first T=300"
    );
    assert_eq!(
        bits(&b),
        bits(&a[..small_t * h]),
        "T=37 differs from the first 37 rows of T=300"
    );
    // Graphs of both sizes, captured in an order where the second capture's T was the last eager T.
    let capture = |layer: &mut MoeLayer, t: usize| {
        let mut out = s.alloc_zeros::<bf16>(t * h).unwrap();
        s.begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
        .unwrap();
        layer
            .forward(&s, &d_x.slice(..t * h), t, &mut out.as_view_mut())
            .unwrap();
        let g = s
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("a graph");
        (g, out)
    };
    let (g_small, out_small) = capture(&mut layer, small_t);
    let (g_big, out_big) = capture(&mut layer, big);
    for _ in 0..2 {
        g_small.launch().unwrap();
        g_big.launch().unwrap();
        s.synchronize().unwrap();
        assert_eq!(
            bits(&s.clone_dtoh(&out_big).unwrap()),
            bits(&a),
            "T=300 graph replay"
        );
        g_small.launch().unwrap();
        s.synchronize().unwrap();
        assert_eq!(
            bits(&s.clone_dtoh(&out_small).unwrap()),
            bits(&b),
            "T=37 graph replay"
        );
    }
}

#[test]
fn bad_layer_inputs_are_refused() {
    let cfg = MoeConfig {
        hidden: 100,
        ..MoeConfig::qwen3_30b_a3b()
    };
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("multiples of 8"));
    let cfg = MoeConfig {
        hidden: 64,
        intermediate: 32,
        ..MoeConfig::qwen3_30b_a3b()
    };
    let mut w = small(cfg.clone(), 1);
    w.w2.pop();
    assert!(matches!(
        w.validate(&cfg),
        Err(Error::Shape { arg: "w2", .. })
    ));
    let Some(ctx) = gpu("bad_layer_inputs_are_refused") else {
        return;
    };
    let s = ctx.stream();
    let w = small(cfg.clone(), 1);
    let mut layer = MoeLayer::new(s, cfg.clone(), &w, 10).unwrap();
    let x = s.alloc_zeros::<bf16>(11 * 64).unwrap();
    let mut out = s.alloc_zeros::<bf16>(11 * 64).unwrap();
    let e = layer
        .forward(s, &x.as_view(), 11, &mut out.as_view_mut())
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { arg: "tokens", .. }),
        "{e}"
    );
    let e = layer
        .forward(s, &x.slice(..64 * 9), 10, &mut out.slice_mut(..640))
        .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "x", .. }), "{e}");
}
