//! Reference of the grouped GEMM: f32 accumulation of bf16 inputs (given here as their f32 values),
//! in K order, like the kernels.

use super::permute::PlanRef;

/// The epilogue, with the routing weights for the row scale.
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    /// `Y = X · Wᵀ`.
    Store,
    /// `Y[:, j] = silu(gate_j) · up_j` with gate rows `[0, n/2)`, up rows `[n/2, n)`.
    SwiGlu,
    /// `Y[r, :] = weights[row_map[r]] · (X · Wᵀ)[r, :]`.
    RowScale(&'a [f32]),
}

/// `y[r]` for every row `r` of an expert's segment (`None` for padding and unused rows), `n_out`
/// values each. `x` is `[rows, k]`, `w` is `[num_local, n, k]`.
pub fn grouped_gemm(
    plan: &PlanRef,
    x: &[f32],
    w: &[f32],
    n: usize,
    k: usize,
    epilogue: Epilogue<'_>,
) -> Vec<Option<Vec<f32>>> {
    let rows = plan.row_map.len();
    let n_out = if matches!(epilogue, Epilogue::SwiGlu) {
        n / 2
    } else {
        n
    };
    let mut out = vec![None; rows];
    for (e, (&off, &count)) in plan
        .expert_offsets
        .iter()
        .zip(&plan.expert_counts)
        .enumerate()
    {
        for r in off as usize..(off + count) as usize {
            let xr = &x[r * k..(r + 1) * k];
            let dot = |c: usize| -> f32 {
                let wr = &w[(e * n + c) * k..(e * n + c + 1) * k];
                xr.iter().zip(wr).fold(0.0f32, |s, (a, b)| a.mul_add(*b, s))
            };
            let row: Vec<f32> = match epilogue {
                Epilogue::Store => (0..n).map(dot).collect(),
                Epilogue::SwiGlu => (0..n_out)
                    .map(|j| {
                        let g = dot(j);
                        g / (1.0 + (-g).exp()) * dot(n / 2 + j)
                    })
                    .collect(),
                Epilogue::RowScale(weights) => {
                    let s = weights[plan.row_map[r] as usize];
                    (0..n).map(|c| s * dot(c)).collect()
                }
            };
            out[r] = Some(row);
        }
    }
    out
}
