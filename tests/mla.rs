//! MLA: decompression (WGMMA and oracle) against the CPU reference and each other, contiguous and
//! paged sources (every block size, permuted block tables, unaligned starts, empty sequences,
//! NaN-poisoned unused slots, unmapped tokens), strided and padded outputs, H ∈ {1, 12, 16, 64, 96,
//! 128}; the fresh-token cache write against its reference; bad inputs.

use cudarc::driver::CudaSlice;
use half::bf16;
use moekit::mla::{
    decompress, write_fresh_tokens, DecompressProblem, FreshTokens, HeadLayout, Implementation,
    LatentNorm, LatentSource, MlaDims, MlaWorkspace, PagedCache, RopeConfig, RopeStyle,
    YarnScaling,
};
use moekit::reference::mla as reference;
use moekit::testing::{fresh_seed, gpu, normal_vec, rng, upload};
use moekit::{Context, Error};
use rand::seq::SliceRandom;
use rand::RngExt;

const POISON: f32 = -1232.0; // exact in bf16

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn rounded(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect()
}

/// Asserts every element is within a bf16 rounding (plus f32-accumulation slack relative to the
/// output's scale) of the reference.
fn assert_close(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let rms = (want.iter().map(|w| w * w).sum::<f64>() / want.len().max(1) as f64).sqrt();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = w.abs() * (1.0 / 128.0) + rms * 2e-3;
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}: element {i}: got {g}, want {w} (tolerance {tol:.3e})"
        );
    }
}

/// Random DeepSeek-like inputs: latent and k_pe rows (bf16 values), kv_b_proj.
struct Inputs {
    dims: MlaDims,
    tokens: usize,
    latent: Vec<f32>, // [T, r]
    k_pe: Vec<f32>,   // [T, d_rope]
    w: Vec<f32>,      // [H (d_nope + d_v), r]
}

impl Inputs {
    fn new(dims: MlaDims, tokens: usize, seed: u64) -> Self {
        let mut r = rng(seed);
        Self {
            dims,
            tokens,
            latent: rounded(normal_vec(&mut r, tokens * dims.kv_lora_rank, 1.0)),
            k_pe: rounded(normal_vec(&mut r, tokens * dims.qk_rope_head_dim, 1.0)),
            w: rounded(normal_vec(
                &mut r,
                dims.kv_b_proj_rows() * dims.kv_lora_rank,
                0.05,
            )),
        }
    }

    /// Contiguous cache rows [T, r + d_rope].
    fn cache_rows(&self) -> Vec<f32> {
        let (r, d) = (self.dims.kv_lora_rank, self.dims.qk_rope_head_dim);
        let mut rows = Vec::with_capacity(self.tokens * (r + d));
        for t in 0..self.tokens {
            rows.extend_from_slice(&self.latent[t * r..(t + 1) * r]);
            rows.extend_from_slice(&self.k_pe[t * d..(t + 1) * d]);
        }
        rows
    }
}

/// Output buffers filled with poison, sized for the problem's layouts (+ `extra`).
fn outputs(
    ctx: &Context,
    p: &DecompressProblem,
    extra: usize,
) -> (CudaSlice<bf16>, CudaSlice<bf16>) {
    let d = p.dims;
    let k_len = p.k_layout.required_len(p.tokens, d.heads, d.k_head_dim()) + extra;
    let v_len = p.v_layout.required_len(p.tokens, d.heads, d.v_head_dim) + extra;
    let s = ctx.stream();
    (
        s.clone_htod(&vec![bf16::from_f32(POISON); k_len.max(1)])
            .unwrap(),
        s.clone_htod(&vec![bf16::from_f32(POISON); v_len.max(1)])
            .unwrap(),
    )
}

fn host(ctx: &Context, buf: &CudaSlice<bf16>) -> Vec<f32> {
    ctx.stream()
        .clone_dtoh(buf)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect()
}

/// Decompresses contiguous rows (dense outputs); returns K and V on the host.
fn run_contiguous(ctx: &Context, inp: &Inputs, imp: Implementation) -> (Vec<f32>, Vec<f32>) {
    let mut ws = MlaWorkspace::new(ctx.stream(), &inp.dims, inp.tokens).unwrap();
    run_contiguous_with(ctx, inp, imp, &mut ws)
}

/// [`run_contiguous`] with the caller's workspace (kept across calls).
fn run_contiguous_with(
    ctx: &Context,
    inp: &Inputs,
    imp: Implementation,
    ws: &mut MlaWorkspace,
) -> (Vec<f32>, Vec<f32>) {
    let s = ctx.stream();
    let d = inp.dims;
    let cache = upload(s, &to_bf16(&inp.cache_rows())).unwrap();
    let w = s.clone_htod(&to_bf16(&inp.w)).unwrap();
    let p = DecompressProblem::new(d, inp.tokens).implementation(imp);
    let (mut k, mut v) = outputs(ctx, &p, 0);
    let source = LatentSource::cache_rows(&cache, &d);
    decompress(s, &p, &source, &w, &mut k, &mut v, ws).unwrap();
    let (k, v) = (host(ctx, &k), host(ctx, &v));
    let kn = inp.tokens * d.heads * d.k_head_dim();
    let vn = inp.tokens * d.heads * d.v_head_dim;
    (k[..kn].to_vec(), v[..vn].to_vec())
}

fn check_against_reference(what: &str, inp: &Inputs, k: &[f32], v: &[f32]) {
    let (want_k, want_v) = reference::decompress(&inp.dims, &inp.latent, &inp.k_pe, &inp.w);
    assert_close(&format!("{what}: K"), k, &want_k);
    assert_close(&format!("{what}: V"), v, &want_v);
    // The k_pe columns are copies.
    let (kd, nope) = (inp.dims.k_head_dim(), inp.dims.qk_nope_head_dim);
    for (i, (&g, &w)) in k.iter().zip(&want_k).enumerate() {
        if i % kd >= nope {
            assert_eq!(
                g as f64, w,
                "{what}: k_pe column at {i} is not an exact copy"
            );
        }
    }
}

#[test]
fn gpu_decompress_contiguous_matches_reference() {
    let Some(ctx) = gpu("gpu_decompress_contiguous_matches_reference") else {
        return;
    };
    for (heads, tokens) in [(1, 1), (1, 300), (16, 130), (128, 3), (128, 21)] {
        let seed = fresh_seed();
        let inp = Inputs::new(MlaDims::deepseek_v3(heads), tokens, seed);
        for imp in [Implementation::Wgmma, Implementation::Oracle] {
            let what = format!("H={heads} T={tokens} {imp:?} seed={seed}");
            let (k, v) = run_contiguous(&ctx, &inp, imp);
            check_against_reference(&what, &inp, &k, &v);
        }
    }
}

/// Latent ranks from one k-block (fewer than the kernel's 4 stages, and fewer than the 3 k-blocks
/// by which k_pe is loaded ahead) to ten, and rope widths below 64, on the WGMMA kernel with the
/// latent loaded by TMA.
#[test]
fn gpu_decompress_other_ranks_on_the_wgmma_kernel() {
    let Some(ctx) = gpu("gpu_decompress_other_ranks_on_the_wgmma_kernel") else {
        return;
    };
    for (rank, rope, heads, tokens) in [
        (64, 64, 3, 200),
        (128, 32, 5, 333),
        (192, 8, 2, 64),
        (384, 64, 4, 129),
        (640, 16, 3, 257),
    ] {
        let dims = MlaDims {
            heads,
            kv_lora_rank: rank,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: rope,
            v_head_dim: 128,
        };
        assert!(dims.wgmma_supported(), "rank {rank} rope {rope}");
        let seed = fresh_seed();
        let inp = Inputs::new(dims, tokens, seed);
        let (k, v) = run_contiguous(&ctx, &inp, Implementation::Wgmma);
        check_against_reference(
            &format!("r={rank} rope={rope} H={heads} T={tokens} seed={seed}"),
            &inp,
            &k,
            &v,
        );
    }
}

#[test]
fn gpu_decompress_other_dims_run_on_the_oracle() {
    let Some(ctx) = gpu("gpu_decompress_other_dims_run_on_the_oracle") else {
        return;
    };
    // Multiples of 8 (16-byte rows), but not the WGMMA kernel's d_nope = d_v = 128.
    let dims = MlaDims {
        heads: 3,
        kv_lora_rank: 72,
        qk_nope_head_dim: 24,
        qk_rope_head_dim: 8,
        v_head_dim: 16,
    };
    assert!(!dims.wgmma_supported());
    let seed = fresh_seed();
    let inp = Inputs::new(dims, 37, seed);
    let (k, v) = run_contiguous(&ctx, &inp, Implementation::Oracle);
    check_against_reference(&format!("odd dims seed={seed}"), &inp, &k, &v);
}

#[test]
fn gpu_decompress_large_matches_oracle() {
    let Some(ctx) = gpu("gpu_decompress_large_matches_oracle") else {
        return;
    };
    // T = 4099 and 8300: 33 and 65 M tiles, two and three tile groups of 32, the last of one.
    // T <= 1024 runs the 4-stage ring, longer grids 3 stages (decompress.cu's four_stage_ring).
    for (heads, tokens) in [
        (128, 1000),
        (16, 4099),
        (12, 777),
        (96, 257),
        (64, 2048),
        (8, 8300),
    ] {
        let seed = fresh_seed();
        let inp = Inputs::new(MlaDims::deepseek_v3(heads), tokens, seed);
        let what = format!("H={heads} T={tokens} seed={seed}");
        let (k, v) = run_contiguous(&ctx, &inp, Implementation::Wgmma);
        let (ko, vo) = run_contiguous(&ctx, &inp, Implementation::Oracle);
        assert!(
            !k.contains(&POISON) && !v.contains(&POISON),
            "{what}: an output was not written"
        );
        let ko: Vec<f64> = ko.iter().map(|&x| x as f64).collect();
        let vo: Vec<f64> = vo.iter().map(|&x| x as f64).collect();
        assert_close(&format!("{what}: K vs oracle"), &k, &ko);
        assert_close(&format!("{what}: V vs oracle"), &v, &vo);
    }
}

#[test]
fn gpu_decompress_strided_outputs() {
    let Some(ctx) = gpu("gpu_decompress_strided_outputs") else {
        return;
    };
    let s = ctx.stream();
    let (heads, tokens) = (16, 300);
    let d = MlaDims::deepseek_v3(heads);
    let seed = fresh_seed();
    let inp = Inputs::new(d, tokens, seed);
    let (dense_k, dense_v) = run_contiguous(&ctx, &inp, Implementation::Wgmma);
    let cache = upload(s, &to_bf16(&inp.cache_rows())).unwrap();
    let w = s.clone_htod(&to_bf16(&inp.w)).unwrap();
    let kd = d.k_head_dim();
    let layouts = [
        // K inside a wider per-token buffer; V padded to the K head dim (FA2).
        (
            HeadLayout {
                token_stride: heads * kd + 64,
                head_stride: kd,
            },
            HeadLayout {
                token_stride: heads * kd,
                head_stride: kd,
            },
        ),
        // Head-major [H, T, dim] for both.
        (
            HeadLayout {
                token_stride: kd,
                head_stride: tokens * kd,
            },
            HeadLayout {
                token_stride: 128,
                head_stride: tokens * 128 + 8,
            },
        ),
    ];
    for (kl, vl) in layouts {
        for imp in [Implementation::Wgmma, Implementation::Oracle] {
            let what = format!("{kl:?} {vl:?} {imp:?} seed={seed}");
            let p = DecompressProblem::new(d, tokens)
                .k_layout(kl)
                .v_layout(vl)
                .implementation(imp);
            let (mut k, mut v) = outputs(&ctx, &p, 40);
            let mut ws = MlaWorkspace::new(s, &d, tokens).unwrap();
            let source = LatentSource::cache_rows(&cache, &d);
            decompress(s, &p, &source, &w, &mut k, &mut v, &mut ws).unwrap();
            for (name, got, dense, layout, dim) in [
                ("K", host(&ctx, &k), &dense_k, kl, kd),
                ("V", host(&ctx, &v), &dense_v, vl, 128),
            ] {
                let mut written = vec![false; got.len()];
                for t in 0..tokens {
                    for h in 0..heads {
                        for c in 0..dim {
                            let at = t * layout.token_stride + h * layout.head_stride + c;
                            written[at] = true;
                            let want = dense[(t * heads + h) * dim + c];
                            let g = got[at];
                            // Same math as the dense run: equal up to the implementation.
                            let tol = if imp == Implementation::Wgmma {
                                0.0
                            } else {
                                want.abs() / 64.0 + 1e-2
                            };
                            assert!(
                                (g - want).abs() <= tol,
                                "{what}: {name}[{t},{h},{c}] = {g}, dense run {want}"
                            );
                        }
                    }
                }
                for (i, (&g, &w)) in got.iter().zip(&written).enumerate() {
                    if !w {
                        assert_eq!(
                            g, POISON,
                            "{what}: {name} element {i} outside the layout was written"
                        );
                    }
                }
            }
        }
    }
}

/// A paged cache holding the given token rows for sequences of random lengths (some empty) at
/// random unaligned starts, through a randomly permuted block table; every other slot is NaN.
#[derive(Clone)]
struct Paged {
    cache: Vec<bf16>,
    block_table: Vec<i32>,
    max_blocks: usize,
    cu_seqlens: Vec<i32>,
    seq_starts: Vec<i32>,
    num_blocks: usize,
}

fn paged(rows: &[f32], row_len: usize, lens: &[usize], block_size: usize, seed: u64) -> Paged {
    let mut r = rng(seed);
    let starts: Vec<usize> = lens
        .iter()
        .map(|_| r.random_range(0..3 * block_size + 1))
        .collect();
    let needed: Vec<usize> = lens
        .iter()
        .zip(&starts)
        .map(|(&l, &s)| (s + l).div_ceil(block_size))
        .collect();
    let max_blocks = needed.iter().copied().max().unwrap_or(0) + 1;
    let num_blocks = needed.iter().sum::<usize>() + 5; // a few never-used blocks
    let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
    pool.shuffle(&mut r);
    let mut cache = vec![bf16::NAN; num_blocks * block_size * row_len];
    let mut block_table = vec![-1i32; lens.len() * max_blocks];
    let mut cu = vec![0i32];
    let mut next = 0;
    for (b, (&len, &start)) in lens.iter().zip(&starts).enumerate() {
        for j in 0..needed[b] {
            block_table[b * max_blocks + j] = pool[next];
            next += 1;
        }
        let first = *cu.last().unwrap() as usize;
        for i in 0..len {
            let pos = start + i;
            let block = block_table[b * max_blocks + pos / block_size] as usize;
            let slot = block * block_size + pos % block_size;
            let src = &rows[(first + i) * row_len..(first + i + 1) * row_len];
            for (c, &x) in src.iter().enumerate() {
                cache[slot * row_len + c] = bf16::from_f32(x);
            }
        }
        cu.push((first + len) as i32);
    }
    Paged {
        cache,
        block_table,
        max_blocks,
        cu_seqlens: cu,
        seq_starts: starts.iter().map(|&s| s as i32).collect(),
        num_blocks,
    }
}

/// Decompresses a paged cache with `tokens` output tokens (dense outputs); returns K and V.
fn run_paged(
    ctx: &Context,
    dims: MlaDims,
    pg: &Paged,
    block_size: usize,
    tokens: usize,
    w: &[f32],
    imp: Implementation,
) -> (Vec<f32>, Vec<f32>) {
    let cache = ctx.stream().clone_htod(&pg.cache).unwrap();
    decompress_paged(ctx, dims, &cache, pg, block_size, tokens, w, imp)
}

/// [`run_paged`] over a cache already on the device (`pg.cache` is not read).
#[allow(clippy::too_many_arguments)]
fn decompress_paged(
    ctx: &Context,
    dims: MlaDims,
    cache: &CudaSlice<bf16>,
    pg: &Paged,
    block_size: usize,
    tokens: usize,
    w: &[f32],
    imp: Implementation,
) -> (Vec<f32>, Vec<f32>) {
    let mut ws = MlaWorkspace::new(ctx.stream(), &dims, tokens).unwrap();
    decompress_paged_with(ctx, dims, cache, pg, block_size, tokens, w, imp, &mut ws)
}

/// [`decompress_paged`] with the caller's workspace (kept across calls).
#[allow(clippy::too_many_arguments)]
fn decompress_paged_with(
    ctx: &Context,
    dims: MlaDims,
    cache: &CudaSlice<bf16>,
    pg: &Paged,
    block_size: usize,
    tokens: usize,
    w: &[f32],
    imp: Implementation,
    ws: &mut MlaWorkspace,
) -> (Vec<f32>, Vec<f32>) {
    let s = ctx.stream();
    let table = upload(s, &pg.block_table).unwrap();
    let cu = upload(s, &pg.cu_seqlens).unwrap();
    let starts = upload(s, &pg.seq_starts).unwrap();
    let w = s.clone_htod(&to_bf16(w)).unwrap();
    let p = DecompressProblem::new(dims, tokens).implementation(imp);
    let (mut k, mut v) = outputs(ctx, &p, 0);
    let source = LatentSource::Paged(PagedCache {
        cache: cache.slice(..),
        block_size,
        block_table: table.slice(..pg.block_table.len()),
        max_blocks_per_seq: pg.max_blocks,
        cu_seqlens: cu.slice(..pg.cu_seqlens.len()),
        seq_starts: Some(starts.slice(..pg.seq_starts.len())),
    });
    decompress(s, &p, &source, &w, &mut k, &mut v, ws).unwrap();
    let kn = tokens * dims.heads * dims.k_head_dim();
    let vn = tokens * dims.heads * dims.v_head_dim;
    (host(ctx, &k)[..kn].to_vec(), host(ctx, &v)[..vn].to_vec())
}

/// One workspace through a run of calls of different sizes and sources. The kernel's tile queue
/// lives in the workspace: a contiguous call launches the kernel alone, which must leave the queue
/// at zero for the next call whatever ran before it (grids under and at the SM count, a head count
/// that leaves CTAs one tile, the paged path with its own kernel first).
#[test]
fn gpu_decompress_calls_share_one_workspace() {
    let Some(ctx) = gpu("gpu_decompress_calls_share_one_workspace") else {
        return;
    };
    let max_tokens = 700;
    let seed = fresh_seed();
    let mut ws = MlaWorkspace::new(ctx.stream(), &MlaDims::deepseek_v3(128), max_tokens).unwrap();
    for (i, (heads, tokens, paged_call)) in [
        (16, 300, false),
        (128, 140, false),
        (1, 1, false),
        (16, 259, true),
        (128, 130, false),
        (8, 690, false),
        (128, 140, true),
        (16, 700, false),
    ]
    .into_iter()
    .enumerate()
    {
        let d = MlaDims::deepseek_v3(heads);
        let inp = Inputs::new(d, tokens, seed + i as u64);
        let what = format!("call {i}: H={heads} T={tokens} paged={paged_call} seed={seed}");
        let (k, v) = if paged_call {
            let lens = [tokens / 3, 0, tokens - tokens / 3];
            let pg = paged(&inp.cache_rows(), d.cache_row(), &lens, 64, seed ^ i as u64);
            let cache = ctx.stream().clone_htod(&pg.cache).unwrap();
            decompress_paged_with(
                &ctx,
                d,
                &cache,
                &pg,
                64,
                tokens,
                &inp.w,
                Implementation::Wgmma,
                &mut ws,
            )
        } else {
            run_contiguous_with(&ctx, &inp, Implementation::Wgmma, &mut ws)
        };
        check_against_reference(&what, &inp, &k, &v);
    }
}

#[test]
fn gpu_decompress_paged_equals_contiguous() {
    let Some(ctx) = gpu("gpu_decompress_paged_equals_contiguous") else {
        return;
    };
    for block_size in [1, 16, 32, 64, 128] {
        let seed = fresh_seed();
        let mut r = rng(seed);
        // Block 32: 70 short sequences (a deeper search over cu_seqlens, and many sequence
        // boundaries inside one 128-token tile); the others: 6 sequences up to 259 tokens. Every
        // third one empty.
        let (n_seqs, max_len) = if block_size == 32 { (70, 12) } else { (6, 260) };
        let lens: Vec<usize> = (0..n_seqs)
            .map(|i| {
                if i % 3 == 1 {
                    0
                } else {
                    r.random_range(1..max_len)
                }
            })
            .collect();
        let tokens: usize = lens.iter().sum();
        let d = MlaDims::deepseek_v3(if block_size == 64 { 128 } else { 16 });
        let inp = Inputs::new(d, tokens, seed);
        let rows = inp.cache_rows();
        let pg = paged(&rows, d.cache_row(), &lens, block_size, seed ^ 1);
        // The reference's gather agrees with how the cache was built.
        let mapped = reference::paged_rows(
            &pg.cu_seqlens,
            Some(&pg.seq_starts),
            &pg.block_table,
            pg.max_blocks,
            block_size,
            pg.num_blocks,
            tokens,
        );
        let cache_f32: Vec<f32> = pg.cache.iter().map(|v| v.to_f32()).collect();
        assert_eq!(
            reference::gather_rows(&cache_f32, d.cache_row(), &mapped, 0, d.cache_row()),
            rows,
            "block {block_size}: reference gather"
        );
        let what = format!("block {block_size} lens {lens:?} H={} seed={seed}", d.heads);
        let (k, v) = run_paged(
            &ctx,
            d,
            &pg,
            block_size,
            tokens,
            &inp.w,
            Implementation::Wgmma,
        );
        assert!(
            k.iter().chain(&v).all(|x| x.is_finite()),
            "{what}: a NaN from an unused slot leaked into the outputs"
        );
        let (kc, vc) = run_contiguous(&ctx, &inp, Implementation::Wgmma);
        assert_eq!(k, kc, "{what}: paged K differs from contiguous K");
        assert_eq!(v, vc, "{what}: paged V differs from contiguous V");
        if d.heads <= 16 {
            check_against_reference(&what, &inp, &k, &v);
            let (ko, vo) = run_paged(
                &ctx,
                d,
                &pg,
                block_size,
                tokens,
                &inp.w,
                Implementation::Oracle,
            );
            check_against_reference(&format!("{what} oracle"), &inp, &ko, &vo);
        }
    }
}

#[test]
fn gpu_decompress_unmapped_tokens_are_zero() {
    let Some(ctx) = gpu("gpu_decompress_unmapped_tokens_are_zero") else {
        return;
    };
    let seed = fresh_seed();
    let block_size = 16;
    let lens = [40, 50];
    let d = MlaDims::deepseek_v3(16);
    let inp = Inputs::new(d, 90, seed);
    let mut pg = paged(&inp.cache_rows(), d.cache_row(), &lens, block_size, seed);
    let fully_mapped = pg.clone();
    // Sequence 1's first block id points past the cache: the tokens it holds read nothing.
    let s1_start = pg.seq_starts[1] as usize;
    let s1_first_block = s1_start / block_size;
    pg.block_table[pg.max_blocks + s1_first_block] = 1_000_000;
    // 90 real tokens plus 7 past cu_seqlens[2].
    let tokens = 97;
    for imp in [Implementation::Wgmma, Implementation::Oracle] {
        let what = format!("{imp:?} seed={seed}");
        let (k, v) = run_paged(&ctx, d, &pg, block_size, tokens, &inp.w, imp);
        let (kd, vd) = (d.heads * d.k_head_dim(), d.heads * d.v_head_dim);
        for t in 0..tokens {
            let unmapped =
                t >= 90 || (t >= 40 && (s1_start + t - 40) / block_size == s1_first_block);
            let kt = &k[t * kd..(t + 1) * kd];
            let vt = &v[t * vd..(t + 1) * vd];
            if unmapped {
                assert!(
                    kt.iter().chain(vt).all(|&x| x == 0.0),
                    "{what}: unmapped token {t} is not zero"
                );
            } else {
                assert!(
                    kt.iter().chain(vt).all(|x| x.is_finite() && *x != POISON),
                    "{what}: token {t} not written"
                );
            }
        }
    }
    // The same through a workspace that a fully mapped call has filled first: the zero rows are
    // written by the gather, not inherited from a fresh allocation.
    let cache = ctx.stream().clone_htod(&pg.cache).unwrap();
    let mut ws = MlaWorkspace::new(ctx.stream(), &d, tokens).unwrap();
    let i = Implementation::Wgmma;
    let _ = decompress_paged_with(
        &ctx,
        d,
        &cache,
        &fully_mapped,
        block_size,
        90,
        &inp.w,
        i,
        &mut ws,
    );
    let (k, v) =
        decompress_paged_with(&ctx, d, &cache, &pg, block_size, tokens, &inp.w, i, &mut ws);
    let (kd, vd) = (d.heads * d.k_head_dim(), d.heads * d.v_head_dim);
    for t in (40..tokens).filter(|&t| t >= 90 || (s1_start + t - 40) / block_size == s1_first_block)
    {
        assert!(
            k[t * kd..(t + 1) * kd]
                .iter()
                .chain(&v[t * vd..(t + 1) * vd])
                .all(|&x| x == 0.0),
            "reused workspace seed={seed}: unmapped token {t} is not zero"
        );
    }
}

/// Random kv_a rows for the fresh-token kernel, with a large range of positions.
fn fresh_inputs(d: &MlaDims, tokens: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<i64>) {
    let mut r = rng(seed);
    let mut kv_a = rounded(normal_vec(&mut r, tokens * d.cache_row(), 2.0));
    // One row far from unit scale, one all-zero latent (eps keeps it finite).
    if tokens > 2 {
        for x in &mut kv_a[..d.kv_lora_rank] {
            *x = bf16::from_f32(*x * 300.0).to_f32();
        }
        for x in &mut kv_a[d.cache_row()..d.cache_row() + d.kv_lora_rank] {
            *x = 0.0;
        }
    }
    let gamma = rounded(normal_vec(&mut r, d.kv_lora_rank, 0.5));
    let positions = (0..tokens)
        .map(|i| {
            if i == 0 {
                0
            } else {
                r.random_range(0..163_840)
            }
        })
        .collect();
    (kv_a, gamma, positions)
}

/// Uploads the fresh-token inputs and writes them into `cache` (eps 1e-6), to `slots` or row t.
#[allow(clippy::too_many_arguments)]
fn write_fresh(
    ctx: &Context,
    d: &MlaDims,
    kv_a: &[f32],
    gamma: &[f32],
    positions: &[i64],
    rope: &RopeConfig,
    slots: Option<&[i64]>,
    cache: &mut CudaSlice<bf16>,
) {
    let s = ctx.stream();
    let tokens = positions.len();
    let d_kv = upload(s, &to_bf16(kv_a)).unwrap();
    let d_gamma = s.clone_htod(&to_bf16(gamma)).unwrap();
    let d_pos = upload(s, positions).unwrap();
    let d_slots = upload(s, slots.unwrap_or(&[])).unwrap();
    let input = FreshTokens {
        kv_a: d_kv.slice(..kv_a.len()),
        kv_a_stride: d.cache_row(),
        positions: d_pos.slice(..tokens),
        tokens,
    };
    let norm = LatentNorm {
        gamma: d_gamma.slice(..),
        eps: 1e-6,
    };
    let slot_view = d_slots.slice(..slots.map_or(0, <[i64]>::len));
    write_fresh_tokens(
        s,
        d,
        &input,
        &norm,
        rope,
        cache,
        slots.is_some().then_some(&slot_view),
    )
    .unwrap();
}

/// Cache rows `[.., row]` against the reference: RoPE columns (≥ r) within one bf16 step (the GPU's
/// f32 sincos may round the other way), latent columns within two (the f32 `x · rstd` may round to
/// the other bf16 neighbour before the γ multiply, whose own rounding adds one more step).
fn assert_rows_close(what: &str, got: &[f32], want: &[f32], row: usize, r: usize) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let steps = if i % row < r { 2.0 } else { 1.0 };
        let tol = steps * w.abs() as f64 / 128.0 + 1e-6;
        assert!(
            ((g - w).abs() as f64) <= tol,
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

#[test]
fn gpu_fresh_tokens_match_reference() {
    let Some(ctx) = gpu("gpu_fresh_tokens_match_reference") else {
        return;
    };
    let s = ctx.stream();
    let d = MlaDims::deepseek_v3(1);
    let row = d.cache_row();
    let ropes = [
        RopeConfig::deepseek_v3(),
        RopeConfig::plain(10000.0, RopeStyle::NeoX),
    ];
    for tokens in [1, 37, 1000] {
        for rope in &ropes {
            for use_slots in [false, true] {
                let seed = fresh_seed();
                let what = format!("T={tokens} {:?} slots={use_slots} seed={seed}", rope.style);
                let (kv_a, gamma, positions) = fresh_inputs(&d, tokens, seed);
                let want = reference::fresh_tokens(&d, &kv_a, &gamma, &positions, 1e-6, rope);
                let num_rows = tokens + 11;
                let mut r = rng(seed);
                let mut rows: Vec<i64> = (0..num_rows as i64).collect();
                rows.shuffle(&mut r);
                let mut slots: Vec<i64> = rows[..tokens].to_vec();
                if use_slots && tokens > 2 {
                    slots[1] = -1; // skipped
                    slots[2] = num_rows as i64 + 5; // past the cache: skipped
                }
                let mut cache = s
                    .clone_htod(&vec![bf16::from_f32(POISON); num_rows * row])
                    .unwrap();
                write_fresh(
                    &ctx,
                    &d,
                    &kv_a,
                    &gamma,
                    &positions,
                    rope,
                    use_slots.then_some(&slots[..]),
                    &mut cache,
                );
                let got = host(&ctx, &cache);
                let mut written = vec![false; num_rows];
                for t in 0..tokens {
                    let slot = if use_slots { slots[t] } else { t as i64 };
                    if slot < 0 || slot >= num_rows as i64 {
                        continue;
                    }
                    let slot = slot as usize;
                    written[slot] = true;
                    assert_rows_close(
                        &format!("{what}: token {t}"),
                        &got[slot * row..(slot + 1) * row],
                        &want[t * row..(t + 1) * row],
                        row,
                        d.kv_lora_rank,
                    );
                }
                for (i, w) in written.iter().enumerate() {
                    if !w {
                        assert!(
                            got[i * row..(i + 1) * row].iter().all(|&x| x == POISON),
                            "{what}: row {i} was written but no token maps to it"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn gpu_fresh_tokens_then_paged_decompress() {
    let Some(ctx) = gpu("gpu_fresh_tokens_then_paged_decompress") else {
        return;
    };
    let s = ctx.stream();
    let seed = fresh_seed();
    let d = MlaDims::deepseek_v3(16);
    let (row, block_size, tokens) = (d.cache_row(), 64, 150);
    let rope = RopeConfig::deepseek_v3();
    let (kv_a, gamma, positions) = fresh_inputs(&d, tokens, seed);
    // Layout: one sequence of 150 tokens from position 0 in a shuffled block table.
    let zeros = vec![0.0f32; tokens * row];
    let pg = paged(&zeros, row, &[tokens], block_size, seed);
    let mapped = reference::paged_rows(
        &pg.cu_seqlens,
        Some(&pg.seq_starts),
        &pg.block_table,
        pg.max_blocks,
        block_size,
        pg.num_blocks,
        tokens,
    );
    let slots: Vec<i64> = mapped.iter().map(|m| m.unwrap() as i64).collect();
    let mut cache = s.clone_htod(&pg.cache).unwrap(); // NaN everywhere but the 150 slots
    write_fresh(
        &ctx,
        &d,
        &kv_a,
        &gamma,
        &positions,
        &rope,
        Some(&slots),
        &mut cache,
    );
    let mut r = rng(seed ^ 7);
    let w = rounded(normal_vec(
        &mut r,
        d.kv_b_proj_rows() * d.kv_lora_rank,
        0.05,
    ));
    let (k, v) = decompress_paged(
        &ctx,
        d,
        &cache,
        &pg,
        block_size,
        tokens,
        &w,
        Implementation::Wgmma,
    );
    // Reference pipeline: the reference cache rows, then the reference decompression. The GPU's
    // cache rows may differ from the reference's by one bf16 step, so compare through the GPU's
    // own rows as well: K/V must match the reference decompression of what the GPU wrote.
    let got_cache: Vec<f32> = host(&ctx, &cache);
    let gpu_rows = reference::gather_rows(&got_cache, row, &mapped, 0, row);
    let want_rows = reference::fresh_tokens(&d, &kv_a, &gamma, &positions, 1e-6, &rope);
    assert_rows_close(
        &format!("seed={seed}: cache rows"),
        &gpu_rows,
        &want_rows,
        row,
        d.kv_lora_rank,
    );
    let latent = reference::gather_rows(&got_cache, row, &mapped, 0, d.kv_lora_rank);
    let k_pe = reference::gather_rows(&got_cache, row, &mapped, d.kv_lora_rank, d.qk_rope_head_dim);
    let (want_k, want_v) = reference::decompress(&d, &latent, &k_pe, &w);
    assert_close(&format!("seed={seed}: K"), &k, &want_k);
    assert_close(&format!("seed={seed}: V"), &v, &want_v);
}

#[test]
fn bad_mla_inputs_are_refused() {
    let Some(ctx) = gpu("bad_mla_inputs_are_refused") else {
        return;
    };
    let s = ctx.stream();
    let d = MlaDims::deepseek_v3(4);
    let tokens = 10;
    let cache = s.alloc_zeros::<bf16>(tokens * d.cache_row()).unwrap();
    let w = s
        .alloc_zeros::<bf16>(d.kv_b_proj_rows() * d.kv_lora_rank)
        .unwrap();
    let w_short = s
        .alloc_zeros::<bf16>(d.kv_b_proj_rows() * d.kv_lora_rank - 8)
        .unwrap();
    let p = DecompressProblem::new(d, tokens);
    let (mut k, mut v) = outputs(&ctx, &p, 0);
    let mut ws = MlaWorkspace::new(s, &d, tokens).unwrap();
    let src = || LatentSource::cache_rows(&cache, &d);
    let run = |p: &DecompressProblem,
               src: &LatentSource<'_>,
               w: &CudaSlice<bf16>,
               k: &mut CudaSlice<bf16>,
               v: &mut CudaSlice<bf16>,
               ws: &mut MlaWorkspace| decompress(s, p, src, w, k, v, ws);
    assert!(run(&p, &src(), &w, &mut k, &mut v, &mut ws).is_ok());
    assert!(matches!(
        run(&p, &src(), &w_short, &mut k, &mut v, &mut ws),
        Err(Error::Shape {
            arg: "kv_b_proj",
            ..
        })
    ));
    let too_many = DecompressProblem::new(d, tokens + 1);
    assert!(matches!(
        run(&too_many, &src(), &w, &mut k, &mut v, &mut ws),
        Err(Error::Shape { .. })
    ));
    let odd = MlaDims {
        qk_nope_head_dim: 64,
        ..d
    };
    assert!(matches!(
        run(
            &DecompressProblem::new(odd, tokens),
            &src(),
            &w,
            &mut k,
            &mut v,
            &mut ws
        ),
        Err(Error::Unsupported { .. })
    ));
    let misaligned = p.k_layout(HeadLayout {
        token_stride: 4 * 192 + 4,
        head_stride: 192,
    });
    assert!(matches!(
        run(&misaligned, &src(), &w, &mut k, &mut v, &mut ws),
        Err(Error::InvalidArgument {
            arg: "k_layout",
            ..
        })
    ));
    let overlapping = p.v_layout(HeadLayout {
        token_stride: 128,
        head_stride: 64,
    });
    assert!(matches!(
        run(&overlapping, &src(), &w, &mut k, &mut v, &mut ws),
        Err(Error::InvalidArgument {
            arg: "v_layout",
            ..
        })
    ));
    let bad_heads = MlaDims { heads: 0, ..d };
    assert!(matches!(
        run(
            &DecompressProblem::new(bad_heads, tokens),
            &src(),
            &w,
            &mut k,
            &mut v,
            &mut ws
        ),
        Err(Error::InvalidArgument { .. })
    ));
    // Paged: bad block size, bad table shape, empty cu_seqlens, too small a workspace.
    let table = upload(s, &[0i32, 1, 2]).unwrap();
    let cu = upload(s, &[0i32, tokens as i32]).unwrap();
    let paged = |block_size: usize, table_len: usize, cu_len: usize| {
        LatentSource::Paged(PagedCache {
            cache: cache.slice(..),
            block_size,
            block_table: table.slice(..table_len),
            max_blocks_per_seq: 3,
            cu_seqlens: cu.slice(..cu_len),
            seq_starts: None,
        })
    };
    assert!(run(&p, &paged(1, 3, 2), &w, &mut k, &mut v, &mut ws).is_ok());
    assert!(matches!(
        run(&p, &paged(0, 3, 2), &w, &mut k, &mut v, &mut ws),
        Err(Error::InvalidArgument {
            arg: "block_size",
            ..
        })
    ));
    assert!(matches!(
        run(&p, &paged(3, 3, 2), &w, &mut k, &mut v, &mut ws),
        Err(Error::Shape { arg: "cache", .. })
    ));
    assert!(matches!(
        run(&p, &paged(1, 2, 2), &w, &mut k, &mut v, &mut ws),
        Err(Error::Shape {
            arg: "block_table",
            ..
        })
    ));
    assert!(matches!(
        run(&p, &paged(1, 3, 1), &w, &mut k, &mut v, &mut ws),
        Err(Error::Shape {
            arg: "cu_seqlens",
            ..
        })
    ));
    let mut small = MlaWorkspace::new(s, &d, tokens - 1).unwrap();
    assert!(matches!(
        run(&p, &paged(1, 3, 2), &w, &mut k, &mut v, &mut small),
        Err(Error::InvalidArgument {
            arg: "workspace",
            ..
        })
    ));
    // A workspace sized for narrower cache rows cannot hold this problem's gathered rows.
    let narrow = MlaDims {
        qk_rope_head_dim: 32,
        ..d
    };
    let mut narrow_ws = MlaWorkspace::new(s, &narrow, tokens).unwrap();
    assert!(matches!(
        run(&p, &paged(1, 3, 2), &w, &mut k, &mut v, &mut narrow_ws),
        Err(Error::InvalidArgument {
            arg: "workspace",
            ..
        })
    ));

    // Fresh tokens.
    let kv_a = s.alloc_zeros::<bf16>(tokens * d.cache_row()).unwrap();
    let gamma = s.alloc_zeros::<bf16>(d.kv_lora_rank).unwrap();
    let pos = s.alloc_zeros::<i64>(tokens).unwrap();
    let mut out = s.alloc_zeros::<bf16>(tokens * d.cache_row()).unwrap();
    let rope = RopeConfig::deepseek_v3();
    let input = |stride: usize| FreshTokens {
        kv_a: kv_a.slice(..),
        kv_a_stride: stride,
        positions: pos.slice(..),
        tokens,
    };
    let norm = |n: usize, eps: f32| LatentNorm {
        gamma: gamma.slice(..n),
        eps,
    };
    let row = d.cache_row();
    assert!(
        write_fresh_tokens(s, &d, &input(row), &norm(512, 1e-6), &rope, &mut out, None).is_ok()
    );
    assert!(matches!(
        write_fresh_tokens(
            s,
            &d,
            &input(row - 8),
            &norm(512, 1e-6),
            &rope,
            &mut out,
            None
        ),
        Err(Error::InvalidArgument {
            arg: "kv_a_stride",
            ..
        })
    ));
    assert!(matches!(
        write_fresh_tokens(
            s,
            &d,
            &input(row + 8),
            &norm(512, 1e-6),
            &rope,
            &mut out,
            None
        ),
        Err(Error::Shape { arg: "kv_a", .. })
    ));
    assert!(matches!(
        write_fresh_tokens(s, &d, &input(row), &norm(511, 1e-6), &rope, &mut out, None),
        Err(Error::Shape { arg: "gamma", .. })
    ));
    assert!(matches!(
        write_fresh_tokens(
            s,
            &d,
            &input(row),
            &norm(512, f32::NAN),
            &rope,
            &mut out,
            None
        ),
        Err(Error::InvalidArgument { arg: "eps", .. })
    ));
    let mut short = s.alloc_zeros::<bf16>((tokens - 1) * row).unwrap();
    assert!(matches!(
        write_fresh_tokens(
            s,
            &d,
            &input(row),
            &norm(512, 1e-6),
            &rope,
            &mut short,
            None
        ),
        Err(Error::Shape { arg: "cache", .. })
    ));
    let bad_rope = RopeConfig {
        yarn: Some(YarnScaling {
            factor: 0.0,
            ..RopeConfig::deepseek_v3().yarn.unwrap()
        }),
        ..rope
    };
    assert!(matches!(
        write_fresh_tokens(
            s,
            &d,
            &input(row),
            &norm(512, 1e-6),
            &bad_rope,
            &mut out,
            None
        ),
        Err(Error::InvalidArgument {
            arg: "rope.yarn",
            ..
        })
    ));
}

#[test]
fn rope_frequencies_follow_deepseek_yarn() {
    let plain = RopeConfig::plain(10000.0, RopeStyle::Interleaved).inv_freq(64);
    assert_eq!(plain.len(), 32);
    for (i, &f) in plain.iter().enumerate() {
        let want = 10000f64.powf(-(2.0 * i as f64) / 64.0) as f32;
        assert_eq!(f, want, "plain frequency {i}");
    }
    let yarn = RopeConfig::deepseek_v3();
    let f = yarn.inv_freq(64);
    // DeepSeek-V3 (dim 64, base 1e4, 4096 positions): correction dims floor(10.47) = 10 for
    // beta_fast = 32 and ceil(22.5) = 23 for beta_slow = 1. Below 10 the frequencies are kept,
    // from 23 on they are divided by the factor 40, in between blended linearly.
    for i in 0..32 {
        let ramp = ((i as f64 - 10.0) / 13.0).clamp(0.0, 1.0);
        let want = (plain[i] as f64 * (1.0 - ramp) + plain[i] as f64 / 40.0 * ramp) as f32;
        assert!(
            ((f[i] - want) / want).abs() < 1e-6,
            "yarn frequency {i}: {} vs {want}",
            f[i]
        );
    }
    assert_eq!(f[0], 1.0);
    assert_eq!(yarn.cos_sin_scale(), 1.0);
    // DeepSeek-V2-Lite: mscale 0.707, mscale_all_dim 1 -> (0.1*0.707*ln 40 + 1) / (0.1*ln 40 + 1).
    let lite = RopeConfig {
        yarn: Some(YarnScaling {
            mscale: 0.707,
            ..yarn.yarn.unwrap()
        }),
        ..yarn
    };
    let want = (0.1 * 0.707 * 40f64.ln() + 1.0) / (0.1 * 40f64.ln() + 1.0);
    assert!((lite.cos_sin_scale() as f64 - want).abs() < 1e-6);
}

#[test]
fn reference_paged_rows_follow_the_block_table() {
    // Two sequences, block size 4: sequence 0 has 3 tokens from position 2 in blocks [7, 3];
    // sequence 1 is empty; sequence 2 has 5 tokens from position 0 in blocks [5, 9, 99 (bad)].
    let cu = [0, 3, 3, 8];
    let starts = [2, 0, 0];
    let table = [7, 3, -1, -1, -1, -1, 5, 9, 99];
    let rows = reference::paged_rows(&cu, Some(&starts), &table, 3, 4, 10, 9);
    assert_eq!(
        rows,
        vec![
            Some(7 * 4 + 2),
            Some(7 * 4 + 3),
            Some(3 * 4),
            Some(5 * 4),
            Some(5 * 4 + 1),
            Some(5 * 4 + 2),
            Some(5 * 4 + 3),
            Some(9 * 4),
            None, // past cu_seqlens
        ]
    );
    let rows = reference::paged_rows(&[0, 9], None, &[1, 99, 0], 3, 4, 10, 9);
    assert_eq!(rows[3], Some(7));
    assert_eq!(rows[4], None); // block id 99 is outside the cache
    assert_eq!(rows[8], Some(0));
}

#[test]
fn reference_rounds_f64_to_bf16_correctly() {
    // Just above a tie rounds up; a tie rounds to even; below rounds down; negatives mirror.
    let ulp = 1.0 / 128.0; // bf16 spacing in [1, 2)
    assert_eq!(
        reference::round_bf16(1.0 + ulp / 2.0 + 2f64.powi(-30)),
        1.0 + ulp as f32
    );
    assert_eq!(reference::round_bf16(1.0 + ulp / 2.0), 1.0);
    assert_eq!(
        reference::round_bf16(1.0 + 1.5 * ulp),
        1.0 + 2.0 * ulp as f32
    );
    assert_eq!(reference::round_bf16(1.0 + ulp / 2.0 - 2f64.powi(-40)), 1.0);
    assert_eq!(
        reference::round_bf16(-(1.0 + ulp / 2.0 + 2f64.powi(-30))),
        -(1.0 + ulp as f32)
    );
    assert_eq!(reference::round_bf16(3.0), 3.0);
}
