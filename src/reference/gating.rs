//! Reference of [`crate::gating::topk_gating`], in f64, with the same rules and limits (see the
//! `gating` module docs).

use crate::error::{Error, Result};
use crate::gating::{GatingConfig, GroupSelection, ScoreFunction, WeightSource};

/// The reference result for `tokens` rows.
#[derive(Debug, Clone, PartialEq)]
pub struct GatingOutput {
    /// `[tokens, k]` chosen experts in descending selection score, ties to the lower index.
    pub ids: Vec<i32>,
    /// `[tokens, k]` routing weights.
    pub weights: Vec<f32>,
    /// `[tokens]` the smallest relative gap between two decisions of the row (adjacent selection
    /// keys among the best k + 1 candidates, and the group-selection boundary). Where it is below
    /// the f32 rounding of the kernel's keys (~1e-6), an f32 implementation may legitimately choose
    /// differently; 0 marks an exact tie, broken by index.
    pub margins: Vec<f64>,
}

fn no_nan(x: f64) -> f64 {
    if x.is_nan() {
        f64::NEG_INFINITY
    } else {
        x
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn softmax_numerator(x: f64, m: f64) -> f64 {
    if x == m {
        1.0
    } else {
        (x - m).exp()
    }
}

/// Relative gap between two ordered keys `a >= b`.
fn gap(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else if a.is_infinite() || b.is_infinite() {
        f64::INFINITY
    } else {
        (a - b) / 1f64.max(a.abs()).max(b.abs())
    }
}

/// Indices sorted by descending key, ties by ascending index.
fn ranked(keys: &[f64], candidates: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut idx: Vec<usize> = candidates.collect();
    idx.sort_by(|&a, &b| keys[b].total_cmp(&keys[a]).then(a.cmp(&b)));
    idx
}

/// Runs the routing rule on `logits` `[tokens, E]`.
pub fn topk_gating(
    cfg: &GatingConfig,
    logits: &[f32],
    tokens: usize,
    router_bias: Option<&[f32]>,
    correction_bias: Option<&[f32]>,
) -> Result<GatingOutput> {
    cfg.validate()?;
    let (e, k) = (cfg.num_experts, cfg.top_k);
    if logits.len() != tokens * e {
        return Err(Error::shape("logits", tokens * e, logits.len()));
    }
    for (name, b) in [
        ("router_bias", router_bias),
        ("correction_bias", correction_bias),
    ] {
        if let Some(b) = b {
            if b.len() != e {
                return Err(Error::shape(name, e, b.len()));
            }
        }
    }
    // Ranking by the logit is exact whenever the score is a monotone function of the logit alone.
    let rank_by_logit = correction_bias.is_none()
        && !(cfg.grouped() && cfg.group_selection == GroupSelection::SumTop2PerGroup);
    let mut out = GatingOutput {
        ids: Vec::with_capacity(tokens * k),
        weights: Vec::with_capacity(tokens * k),
        margins: Vec::with_capacity(tokens),
    };
    for t in 0..tokens {
        let x: Vec<f64> = (0..e)
            .map(|i| {
                let b = router_bias.map_or(0.0, |b| b[i] as f64);
                no_nan(logits[t * e + i] as f64 + b)
            })
            .collect();
        let row_max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let row_sum: f64 = if row_max == f64::NEG_INFINITY {
            0.0
        } else {
            x.iter().map(|&v| softmax_numerator(v, row_max)).sum()
        };
        let score = |v: f64| match cfg.score {
            ScoreFunction::Softmax if row_max == f64::NEG_INFINITY => 0.0,
            ScoreFunction::Softmax => softmax_numerator(v, row_max) / row_sum,
            ScoreFunction::Sigmoid => sigmoid(v),
            ScoreFunction::Identity => v,
        };
        let keys: Vec<f64> = (0..e)
            .map(|i| {
                if rank_by_logit {
                    x[i]
                } else {
                    no_nan(score(x[i]) + correction_bias.map_or(0.0, |c| c[i] as f64))
                }
            })
            .collect();

        let mut margin = f64::INFINITY;
        let candidates: Vec<usize> = if cfg.grouped() {
            let g_size = e / cfg.n_group;
            let group_scores: Vec<f64> = (0..cfg.n_group)
                .map(|g| {
                    let mut members: Vec<f64> = keys[g * g_size..(g + 1) * g_size].to_vec();
                    members.sort_by(|a, b| b.total_cmp(a));
                    no_nan(match cfg.group_selection {
                        GroupSelection::MaxPerGroup => members[0],
                        _ if g_size > 1 => members[0] + members[1],
                        _ => members[0],
                    })
                })
                .collect();
            let order = ranked(&group_scores, 0..cfg.n_group);
            if cfg.topk_group < cfg.n_group {
                margin = margin.min(gap(
                    group_scores[order[cfg.topk_group - 1]],
                    group_scores[order[cfg.topk_group]],
                ));
            }
            let mut kept: Vec<usize> = order[..cfg.topk_group].to_vec();
            kept.sort_unstable();
            kept.iter()
                .flat_map(|&g| g * g_size..(g + 1) * g_size)
                .collect()
        } else {
            (0..e).collect()
        };
        let order = ranked(&keys, candidates.into_iter());
        for j in 0..k.min(order.len().saturating_sub(1)) {
            margin = margin.min(gap(keys[order[j]], keys[order[j + 1]]));
        }
        let chosen = &order[..k];

        let mut w: Vec<f64> = match cfg.weights {
            WeightSource::Scores => chosen.iter().map(|&i| score(x[i])).collect(),
            WeightSource::SigmoidOfChosenLogit => chosen.iter().map(|&i| sigmoid(x[i])).collect(),
            WeightSource::SoftmaxOfChosenLogits => {
                let m = chosen
                    .iter()
                    .map(|&i| x[i])
                    .fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    vec![0.0; k]
                } else {
                    let num: Vec<f64> =
                        chosen.iter().map(|&i| softmax_numerator(x[i], m)).collect();
                    let s: f64 = num.iter().sum();
                    num.iter().map(|v| v / s).collect()
                }
            }
        };
        if cfg.renormalize {
            let s: f64 = w.iter().sum();
            w.iter_mut().for_each(|v| *v /= s + 1e-20);
        }
        out.ids.extend(chosen.iter().map(|&i| i as i32));
        out.weights.extend(
            w.iter()
                .map(|v| (v * cfg.routed_scaling_factor as f64) as f32),
        );
        out.margins.push(margin);
    }
    Ok(out)
}
