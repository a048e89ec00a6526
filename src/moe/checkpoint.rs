//! Loading the MoE block of one layer from a Hugging Face checkpoint directory (`config.json` and
//! `*.safetensors`, single file or sharded with `model.safetensors.index.json`), for model types
//! `deepseek_v3`, `deepseek_v2`, `qwen3_moe` and `mixtral`.
//!
//! Expert weights are read either per expert, as published
//! (`…mlp.experts.{e}.{gate,up,down}_proj.weight`, Mixtral's `…block_sparse_moe.experts.{e}.w1/w2/w3.weight`),
//! or from the fused 3-D tensors some transformers versions write (`…experts.gate_up_proj`
//! `[E, 2I, H]` or `[E, H, 2I]`, gate half first; `…experts.down_proj` `[E, H, I]` or `[E, I, H]`;
//! when `H = 2I` (or `H = I`) the two orientations cannot be told apart and the first, `[out, in]`
//! like `nn.Linear`, is assumed).
//! BF16, F16 and F32 tensors are converted to bf16; FP8 e4m3 weights with `weight_scale_inv`
//! 128×128 block scales (DeepSeek-V3) are dequantized. Only the byte ranges of the needed tensors
//! are read, so a 700 GB checkpoint loads one layer quickly.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, Metadata};
use safetensors::SafeTensors;
use serde_json::Value;

use super::config::{MoeConfig, MoeWeights};
use crate::error::{Error, Result};
use crate::gating::{GatingConfig, GroupSelection, ScoreFunction, WeightSource};

fn err(path: impl AsRef<Path>, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.as_ref().display().to_string(),
        reason: reason.into(),
    }
}

/// A tensor read from a checkpoint: its dtype, shape and raw little-endian bytes.
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// The safetensors dtype.
    pub dtype: StDtype,
    /// The shape.
    pub shape: Vec<usize>,
    /// The bytes.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// The values as f32 (BF16, F16, F32 and F8_E4M3 tensors).
    pub fn to_f32(&self) -> std::result::Result<Vec<f32>, String> {
        let d = &self.data;
        Ok(match self.dtype {
            StDtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            StDtype::BF16 => d
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StDtype::F16 => d
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StDtype::F8_E4M3 => d
                .iter()
                .map(|&b| float8::F8E4M3::from_bits(b).to_f32())
                .collect(),
            other => return Err(format!("unsupported dtype {other:?}")),
        })
    }
}

/// An opened checkpoint directory: its config and where each tensor lives.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: Value,
    files: HashMap<String, PathBuf>,
    headers: std::cell::RefCell<HashMap<PathBuf, (usize, Metadata)>>,
}

impl Checkpoint {
    /// Reads `config.json` and the tensor index (or the headers of every `*.safetensors` file).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(&config_path).map_err(|e| err(&config_path, e.to_string()))?,
        )
        .map_err(|e| err(&config_path, format!("not valid JSON: {e}")))?;
        let ckpt = Self {
            files: HashMap::new(),
            headers: Default::default(),
            config,
            dir,
        };
        let files = ckpt.index()?;
        Ok(Self { files, ..ckpt })
    }

    fn index(&self) -> Result<HashMap<String, PathBuf>> {
        let index_path = self.dir.join("model.safetensors.index.json");
        let mut files = HashMap::new();
        if index_path.is_file() {
            let index: Value = serde_json::from_str(
                &std::fs::read_to_string(&index_path)
                    .map_err(|e| err(&index_path, e.to_string()))?,
            )
            .map_err(|e| err(&index_path, format!("not valid JSON: {e}")))?;
            let map = index["weight_map"]
                .as_object()
                .ok_or_else(|| err(&index_path, "no \"weight_map\" object"))?;
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    err(
                        &index_path,
                        format!("weight_map[{name}] is not a file name"),
                    )
                })?;
                files.insert(name.clone(), self.dir.join(file));
            }
            return Ok(files);
        }
        let mut shards: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(|e| err(&self.dir, e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        shards.sort();
        if shards.is_empty() {
            return Err(err(
                &self.dir,
                "no *.safetensors file and no model.safetensors.index.json",
            ));
        }
        for shard in shards {
            let (_, meta) = self.header(&shard)?;
            for name in meta.tensors().keys() {
                files.insert(name.clone(), shard.clone());
            }
        }
        Ok(files)
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &Value {
        &self.config
    }

    fn header(&self, path: &Path) -> Result<(usize, Metadata)> {
        if let Some(h) = self.headers.borrow().get(path) {
            return Ok(h.clone());
        }
        let mut f = File::open(path).map_err(|e| err(path, e.to_string()))?;
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(|e| err(path, e.to_string()))?;
        let n = u64::from_le_bytes(n) as usize;
        if n > 100 << 20 {
            return Err(err(
                path,
                format!("header of {n} bytes: not a safetensors file"),
            ));
        }
        let mut header = vec![0u8; n];
        f.read_exact(&mut header)
            .map_err(|e| err(path, e.to_string()))?;
        // The header alone (safetensors' read_metadata wants the whole file in memory).
        let meta: Metadata =
            serde_json::from_slice(&header).map_err(|e| err(path, format!("bad header: {e}")))?;
        let file_len = f.metadata().map_err(|e| err(path, e.to_string()))?.len() as usize;
        if 8 + n + meta.data_len() > file_len {
            return Err(err(
                path,
                "truncated: the header describes more data than the file holds",
            ));
        }
        let len = n;
        self.headers
            .borrow_mut()
            .insert(path.to_path_buf(), (len, meta.clone()));
        Ok((len, meta))
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn has(&self, name: &str) -> bool {
        self.files.contains_key(name)
    }

    /// Reads one tensor (only its bytes).
    pub fn tensor(&self, name: &str) -> Result<RawTensor> {
        let path = self
            .files
            .get(name)
            .ok_or_else(|| err(&self.dir, format!("tensor {name} is missing")))?;
        let (header_len, meta) = self.header(path)?;
        let info = meta
            .info(name)
            .ok_or_else(|| err(path, format!("tensor {name} is not in this file's header")))?;
        let (start, end) = info.data_offsets;
        let mut f = File::open(path).map_err(|e| err(path, e.to_string()))?;
        f.seek(SeekFrom::Start((8 + header_len + start) as u64))
            .map_err(|e| err(path, e.to_string()))?;
        let mut data = vec![0u8; end - start];
        f.read_exact(&mut data)
            .map_err(|e| err(path, format!("reading {name}: {e}")))?;
        Ok(RawTensor {
            dtype: info.dtype,
            shape: info.shape.clone(),
            data,
        })
    }

    /// A weight matrix of the given shape as f32, dequantizing FP8 e4m3 with its
    /// `<name>_scale_inv` 128×128 block scales.
    pub fn weight_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        if t.shape != shape {
            return Err(err(
                self.files.get(name).unwrap(),
                format!("{name} has shape {:?}, expected {shape:?}", t.shape),
            ));
        }
        let mut v = t
            .to_f32()
            .map_err(|e| err(self.files.get(name).unwrap(), format!("{name}: {e}")))?;
        if t.dtype == StDtype::F8_E4M3 {
            let scale_name = format!("{name}_scale_inv");
            let (rows, cols) = match shape {
                [r, c] => (*r, *c),
                _ => return Err(err(&self.dir, format!("{name}: FP8 tensors must be 2-D"))),
            };
            let (br, bc) = (rows.div_ceil(128), cols.div_ceil(128));
            let scales = self.weight_f32(&scale_name, &[br, bc]).map_err(|e| {
                err(
                    &self.dir,
                    format!("{name} is FP8 but its block scales could not be read: {e}"),
                )
            })?;
            for r in 0..rows {
                for c in 0..cols {
                    v[r * cols + c] *= scales[(r / 128) * bc + c / 128];
                }
            }
        }
        Ok(v)
    }

    fn weight_bf16(&self, name: &str, shape: &[usize]) -> Result<Vec<bf16>> {
        Ok(self
            .weight_f32(name, shape)?
            .into_iter()
            .map(bf16::from_f32)
            .collect())
    }

    /// Fused 3-D expert tensors come only in 16/32-bit dtypes in published checkpoints; an FP8
    /// one would need per-expert block scales this loader does not read, so it is refused rather
    /// than loaded unscaled.
    fn reject_fp8_fused(&self, name: &str, t: &RawTensor) -> Result<()> {
        if matches!(t.dtype, StDtype::F8_E4M3 | StDtype::F8_E5M2) {
            return Err(err(
                &self.dir,
                format!(
                    "{name} is a fused FP8 expert tensor ({:?}); only per-expert FP8 weights with \
                     weight_scale_inv are supported",
                    t.dtype
                ),
            ));
        }
        Ok(())
    }

    fn usize_key(&self, keys: &[&str]) -> Option<usize> {
        keys.iter()
            .find_map(|k| self.config.get(*k).and_then(Value::as_u64))
            .map(|v| v as usize)
    }

    fn require(&self, keys: &[&str]) -> Result<usize> {
        self.usize_key(keys).ok_or_else(|| {
            err(
                self.dir.join("config.json"),
                format!("missing integer key {}", keys.join(" / ")),
            )
        })
    }

    /// The MoE block's configuration for `layer`, from `config.json`. Dense layers are an error
    /// that says so.
    pub fn moe_config(&self, layer: usize) -> Result<MoeConfig> {
        let cfg_path = self.dir.join("config.json");
        let model_type = self.config["model_type"].as_str().unwrap_or("").to_string();
        if let Some(n) = self.usize_key(&["num_hidden_layers"]) {
            if layer >= n {
                return Err(err(
                    &cfg_path,
                    format!("layer {layer} of a {n}-layer model"),
                ));
            }
        }
        let dense = |why: String| {
            err(
                &cfg_path,
                format!("layer {layer} is a dense MLP layer ({why}), not MoE"),
            )
        };
        match model_type.as_str() {
            "deepseek_v3" | "deepseek_v2" => {
                let first = self.usize_key(&["first_k_dense_replace"]).unwrap_or(0);
                if layer < first {
                    return Err(dense(format!("first_k_dense_replace = {first}")));
                }
                let freq = self.usize_key(&["moe_layer_freq"]).unwrap_or(1).max(1);
                if layer % freq != 0 {
                    return Err(dense(format!("moe_layer_freq = {freq}")));
                }
            }
            "qwen3_moe" => {
                let only = self.config["mlp_only_layers"].as_array();
                if only.is_some_and(|l| l.iter().any(|v| v.as_u64() == Some(layer as u64))) {
                    return Err(dense("listed in mlp_only_layers".into()));
                }
                let step = self.usize_key(&["decoder_sparse_step"]).unwrap_or(1).max(1);
                if (layer + 1) % step != 0 {
                    return Err(dense(format!("decoder_sparse_step = {step}")));
                }
            }
            "mixtral" => {}
            other => {
                return Err(err(
                    &cfg_path,
                    format!(
                        "unsupported model_type {other:?}: supported are deepseek_v3, deepseek_v2, qwen3_moe, mixtral"
                    ),
                ))
            }
        }
        let hidden = self.require(&["hidden_size"])?;
        let experts = self.require(&["n_routed_experts", "num_experts", "num_local_experts"])?;
        let top_k = self.require(&["num_experts_per_tok"])?;
        let intermediate = if model_type == "mixtral" {
            self.require(&["intermediate_size"])?
        } else {
            self.require(&["moe_intermediate_size", "intermediate_size"])?
        };
        let bool_key = |k: &str, default: bool| {
            self.config
                .get(k)
                .and_then(Value::as_bool)
                .unwrap_or(default)
        };
        let scale = self
            .config
            .get("routed_scaling_factor")
            .and_then(Value::as_f64)
            .unwrap_or(1.0) as f32;
        let n_group = self.usize_key(&["n_group"]).unwrap_or(1);
        let topk_group = self.usize_key(&["topk_group"]).unwrap_or(1);
        // Defaults of the Hugging Face config classes when a key is absent (minimal configs):
        // DeepseekV3Config routes by sigmoid + noaux_tc and renormalizes; DeepseekV2Config by
        // softmax + greedy without renormalizing; Qwen3MoeConfig does not renormalize.
        let v3 = model_type == "deepseek_v3";
        let scoring =
            self.config["scoring_func"]
                .as_str()
                .unwrap_or(if v3 { "sigmoid" } else { "softmax" });
        let topk_method =
            self.config["topk_method"]
                .as_str()
                .unwrap_or(if v3 { "noaux_tc" } else { "greedy" });
        let score = match scoring {
            "softmax" => ScoreFunction::Softmax,
            "sigmoid" => ScoreFunction::Sigmoid,
            other => {
                return Err(err(
                    &cfg_path,
                    format!("unsupported scoring_func {other:?}"),
                ))
            }
        };
        let group_selection = match topk_method {
            "noaux_tc" if n_group > 1 => GroupSelection::SumTop2PerGroup,
            "group_limited_greedy" if n_group > 1 => GroupSelection::MaxPerGroup,
            "noaux_tc" | "group_limited_greedy" | "greedy" => GroupSelection::None,
            other => return Err(err(&cfg_path, format!("unsupported topk_method {other:?}"))),
        };
        let (renormalize, routed_scaling_factor) = match model_type.as_str() {
            "mixtral" => (true, 1.0),
            "qwen3_moe" => (bool_key("norm_topk_prob", false), 1.0),
            // DeepSeek-V2's MoEGate scales only when it does not renormalize; V3 always scales.
            "deepseek_v2" => {
                let norm = bool_key("norm_topk_prob", false) && top_k > 1;
                (norm, if norm { 1.0 } else { scale })
            }
            _ => (bool_key("norm_topk_prob", v3) && top_k > 1, scale),
        };
        let shared = if model_type.starts_with("deepseek") {
            self.usize_key(&["n_shared_experts"]).unwrap_or(0) * intermediate
        } else {
            0
        };
        let cfg = MoeConfig {
            hidden,
            intermediate,
            gating: GatingConfig {
                num_experts: experts,
                top_k,
                score,
                group_selection,
                n_group,
                topk_group,
                weights: WeightSource::Scores,
                renormalize,
                routed_scaling_factor,
            },
            shared_intermediate: shared,
        };
        cfg.validate()
            .map_err(|e| err(&cfg_path, format!("layer {layer}: {e}")))?;
        Ok(cfg)
    }

    /// The configuration and weights of `layer`'s MoE block.
    pub fn moe_block(&self, layer: usize) -> Result<(MoeConfig, MoeWeights)> {
        let cfg = self.moe_config(layer)?;
        let model_type = self.config["model_type"].as_str().unwrap_or("");
        let (e, h, i) = (cfg.num_experts(), cfg.hidden, cfg.intermediate);
        let mixtral = model_type == "mixtral";
        let p = if mixtral {
            format!("model.layers.{layer}.block_sparse_moe.")
        } else {
            format!("model.layers.{layer}.mlp.")
        };
        let router = self.weight_bf16(&format!("{p}gate.weight"), &[e, h])?;
        let correction_name = format!("{p}gate.e_score_correction_bias");
        let correction_bias = if self.has(&correction_name) {
            Some(self.weight_f32(&correction_name, &[e])?)
        } else {
            None
        };
        let (gate_n, up_n, down_n) = if mixtral {
            ("w1", "w3", "w2")
        } else {
            ("gate_proj", "up_proj", "down_proj")
        };
        let mut w13 = Vec::with_capacity(e * 2 * i * h);
        let mut w2 = Vec::with_capacity(e * h * i);
        if self.has(&format!("{p}experts.0.{gate_n}.weight")) {
            for x in 0..e {
                let q = format!("{p}experts.{x}.");
                w13.extend(self.weight_bf16(&format!("{q}{gate_n}.weight"), &[i, h])?);
                w13.extend(self.weight_bf16(&format!("{q}{up_n}.weight"), &[i, h])?);
                w2.extend(self.weight_bf16(&format!("{q}{down_n}.weight"), &[h, i])?);
            }
        } else {
            let name = |base: &str| {
                let with = format!("{p}experts.{base}.weight");
                if self.has(&with) {
                    with
                } else {
                    format!("{p}experts.{base}")
                }
            };
            let gu_name = name("gate_up_proj");
            let gu = self.tensor(&gu_name)?;
            self.reject_fp8_fused(&gu_name, &gu)?;
            let gu_vals = gu
                .to_f32()
                .map_err(|e| err(&self.dir, format!("{gu_name}: {e}")))?;
            if gu.shape == [e, 2 * i, h] {
                w13.extend(gu_vals.into_iter().map(bf16::from_f32));
            } else if gu.shape == [e, h, 2 * i] {
                for x in 0..e {
                    for r in 0..2 * i {
                        for c in 0..h {
                            w13.push(bf16::from_f32(gu_vals[(x * h + c) * 2 * i + r]));
                        }
                    }
                }
            } else {
                return Err(err(
                    &self.dir,
                    format!(
                        "{gu_name} has shape {:?}, expected [{e}, {}, {h}] or [{e}, {h}, {}]",
                        gu.shape,
                        2 * i,
                        2 * i
                    ),
                ));
            }
            let d_name = name("down_proj");
            let d = self.tensor(&d_name)?;
            self.reject_fp8_fused(&d_name, &d)?;
            let d_vals = d
                .to_f32()
                .map_err(|e| err(&self.dir, format!("{d_name}: {e}")))?;
            if d.shape == [e, h, i] {
                w2.extend(d_vals.into_iter().map(bf16::from_f32));
            } else if d.shape == [e, i, h] {
                for x in 0..e {
                    for r in 0..h {
                        for c in 0..i {
                            w2.push(bf16::from_f32(d_vals[(x * i + c) * h + r]));
                        }
                    }
                }
            } else {
                return Err(err(
                    &self.dir,
                    format!(
                        "{d_name} has shape {:?}, expected [{e}, {h}, {i}] or [{e}, {i}, {h}]",
                        d.shape
                    ),
                ));
            }
        }
        let s = cfg.shared_intermediate;
        let (shared_w13, shared_w2) = if s > 0 {
            let q = format!("{p}shared_experts.");
            let mut a = self.weight_bf16(&format!("{q}gate_proj.weight"), &[s, h])?;
            a.extend(self.weight_bf16(&format!("{q}up_proj.weight"), &[s, h])?);
            (
                Some(a),
                Some(self.weight_bf16(&format!("{q}down_proj.weight"), &[h, s])?),
            )
        } else {
            (None, None)
        };
        let w = MoeWeights {
            router,
            router_bias: None,
            correction_bias,
            w13,
            w2,
            shared_w13,
            shared_w2,
        };
        w.validate(&cfg)?;
        Ok((cfg, w))
    }
}

/// Hidden states `[T, H]` read from a safetensors file's `hidden_states` tensor (bf16 or f32).
#[derive(Debug, Clone)]
pub struct HiddenStates {
    /// The values, rounded to bf16 (the layer's input type).
    pub values: Vec<bf16>,
    /// T.
    pub tokens: usize,
    /// H.
    pub hidden: usize,
    /// The file's dtype, which the output keeps.
    pub dtype: StDtype,
}

/// Reads tensor `hidden_states` `[T, H]` from a safetensors file.
pub fn read_hidden_states(path: impl AsRef<Path>) -> Result<HiddenStates> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| err(path, e.to_string()))?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| err(path, format!("bad safetensors: {e}")))?;
    let t = st
        .tensor("hidden_states")
        .map_err(|_| err(path, "no tensor named hidden_states"))?;
    let (tokens, hidden) = match t.shape() {
        [a, b] => (*a, *b),
        s => {
            return Err(err(
                path,
                format!("hidden_states has shape {s:?}, expected [T, H]"),
            ))
        }
    };
    if !matches!(t.dtype(), StDtype::BF16 | StDtype::F32) {
        return Err(err(
            path,
            format!("hidden_states is {:?}; bf16 or f32 expected", t.dtype()),
        ));
    }
    let raw = RawTensor {
        dtype: t.dtype(),
        shape: t.shape().to_vec(),
        data: t.data().to_vec(),
    };
    let values = raw
        .to_f32()
        .map_err(|e| err(path, e))?
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    Ok(HiddenStates {
        values,
        tokens,
        hidden,
        dtype: raw.dtype,
    })
}

/// Writes `values` `[tokens, hidden]` as tensor `hidden_states` in `dtype` (BF16 or F32).
pub fn write_hidden_states(
    path: impl AsRef<Path>,
    values: &[f32],
    tokens: usize,
    hidden: usize,
    dtype: StDtype,
) -> Result<()> {
    let path = path.as_ref();
    let data: Vec<u8> = match dtype {
        StDtype::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        StDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        other => {
            return Err(err(
                path,
                format!("cannot write hidden_states as {other:?}"),
            ))
        }
    };
    let view = safetensors::tensor::TensorView::new(dtype, vec![tokens, hidden], &data)
        .map_err(|e| err(path, e.to_string()))?;
    let bytes = safetensors::serialize([("hidden_states", view)], None)
        .map_err(|e| err(path, e.to_string()))?;
    std::fs::write(path, bytes).map_err(|e| err(path, e.to_string()))
}
