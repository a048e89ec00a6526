//! References of the routing plan, permute and combine.

use crate::permute::PlanConfig;

/// The reference routing plan (same buffers as [`crate::permute::RoutingPlan`], on the host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRef {
    /// `[num_local]` rows per local expert.
    pub expert_counts: Vec<i32>,
    /// `[num_local + 1]` padded segment offsets.
    pub expert_offsets: Vec<i32>,
    /// `[max_rows]` assignment per row, -1 for padding and unused rows.
    pub row_map: Vec<i32>,
    /// `[tokens * top_k]` row per assignment, -1 when not placed.
    pub inverse_map: Vec<i32>,
    /// `(local expert, first row)` per tile.
    pub tiles: Vec<(i32, i32)>,
    /// Ids outside `[0, E)`.
    pub invalid_ids: usize,
}

impl PlanRef {
    /// The padded total row count.
    pub fn total_rows(&self) -> usize {
        *self.expert_offsets.last().unwrap() as usize
    }
}

/// Stable counting sort of the assignments by expert: rows in expert order, each segment padded to
/// `cfg.align`, ascending assignment index within an expert.
pub fn routing_plan(cfg: &PlanConfig, topk_ids: &[i32], tokens: usize) -> PlanRef {
    let k = cfg.top_k;
    assert_eq!(
        topk_ids.len(),
        tokens * k,
        "topk_ids must be [tokens, top_k]"
    );
    let local = cfg.local_experts.clone();
    let n_local = local.len();
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); n_local];
    let mut invalid_ids = 0;
    for (a, &id) in topk_ids.iter().enumerate() {
        if id < 0 || id as usize >= cfg.num_experts {
            invalid_ids += 1;
        } else if local.contains(&(id as usize)) {
            members[id as usize - local.start].push(a);
        }
    }
    let mut plan = PlanRef {
        expert_counts: members.iter().map(|m| m.len() as i32).collect(),
        expert_offsets: Vec::with_capacity(n_local + 1),
        row_map: vec![-1; cfg.max_rows()],
        inverse_map: vec![-1; tokens * k],
        tiles: Vec::new(),
        invalid_ids,
    };
    let mut row = 0usize;
    for (e, m) in members.iter().enumerate() {
        plan.expert_offsets.push(row as i32);
        for (i, &a) in m.iter().enumerate() {
            plan.row_map[row + i] = a as i32;
            plan.inverse_map[a] = (row + i) as i32;
        }
        for j in 0..m.len().div_ceil(cfg.block_m) {
            plan.tiles.push((e as i32, (row + j * cfg.block_m) as i32));
        }
        row += m.len().div_ceil(cfg.align) * cfg.align;
    }
    plan.expert_offsets.push(row as i32);
    plan
}

/// Permuted rows `[total_rows, hidden]`: token rows at their rows, zeros in the padding rows.
pub fn permute<T: Copy + Default>(plan: &PlanRef, x: &[T], hidden: usize, top_k: usize) -> Vec<T> {
    let total = plan.total_rows();
    let mut xp = vec![T::default(); total * hidden];
    for r in 0..total {
        let a = plan.row_map[r];
        if a >= 0 {
            let t = a as usize / top_k;
            xp[r * hidden..(r + 1) * hidden].copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
    }
    xp
}

/// The inputs of [`combine`] (f32 copies of the kernel's inputs).
#[derive(Debug, Clone, Copy)]
pub struct CombineArgs<'a> {
    /// `[rows, hidden]` expert outputs in permuted order.
    pub y: &'a [f32],
    /// `[tokens, top_k]` routing weights; `None` means weight 1.
    pub weights: Option<&'a [f32]>,
    /// `[tokens, hidden]` added to the sum.
    pub shared: Option<&'a [f32]>,
    /// `[tokens, hidden]` added to the sum.
    pub residual: Option<&'a [f32]>,
    /// T.
    pub tokens: usize,
    /// Row length.
    pub hidden: usize,
    /// k.
    pub top_k: usize,
}

/// `out[t] = Σ_slot w[t,slot] · y[row(t,slot)] + shared[t] + residual[t]` in f64; unplaced slots
/// add nothing.
pub fn combine(plan: &PlanRef, a: &CombineArgs<'_>) -> Vec<f64> {
    let (tokens, hidden, top_k) = (a.tokens, a.hidden, a.top_k);
    let mut out = vec![0.0f64; tokens * hidden];
    for t in 0..tokens {
        let o = &mut out[t * hidden..(t + 1) * hidden];
        for s in 0..top_k {
            let row = plan.inverse_map[t * top_k + s];
            if row < 0 {
                continue;
            }
            let w = a.weights.map_or(1.0, |w| w[t * top_k + s] as f64);
            let yr = &a.y[row as usize * hidden..(row as usize + 1) * hidden];
            for (acc, &v) in o.iter_mut().zip(yr) {
                *acc += w * v as f64;
            }
        }
        for extra in [a.shared, a.residual].into_iter().flatten() {
            for (acc, &v) in o.iter_mut().zip(&extra[t * hidden..(t + 1) * hidden]) {
                *acc += v as f64;
            }
        }
    }
    out
}
