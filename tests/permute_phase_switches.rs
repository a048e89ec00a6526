//! The phased permute under its A/B switches, which the launcher reads once per process (hence a
//! test binary of their own): one token row per CTA and round, so that some CTAs get no rows in a
//! round (their bulk-load barrier must skip that round's phase), and copies written in slot order
//! instead of by destination.

use half::bf16;
use moekit::permute::{permute_using, CopyKernel, PlanConfig, RoutingPlan};
use moekit::reference::permute as reference;
use moekit::testing::{fresh_seed, gpu, normal_vec, rng, routing, upload, Routing};

#[test]
fn phased_permute_with_one_row_per_cta_in_slot_order() {
    // Before the first permute of this process, which reads them.
    std::env::set_var("MOEKIT_PERMUTE_PHASE_ROWS", "1");
    std::env::set_var("MOEKIT_PERMUTE_PHASE_SORT", "0");
    let Some(ctx) = gpu("phased_permute_with_one_row_per_cta_in_slot_order") else {
        return;
    };
    let s = ctx.stream();
    let mut r = rng(fresh_seed());
    // 200 tokens over (up to) 132 CTAs: 2 rounds of 100, so 32 CTAs idle in each; 500: 4 rounds.
    for (t, k, e, h, align) in [(200, 4, 16, 1000, 8), (500, 8, 64, 64, 1)] {
        let what = format!("T={t} k={k} E={e} H={h} align={align}");
        let cfg = PlanConfig::new(t, k, e).align(align);
        let ids = routing(&mut r, t, k, e, Routing::Uniform);
        let mut plan = RoutingPlan::new(s, cfg.clone()).unwrap();
        plan.build(s, &upload(s, &ids).unwrap(), t).unwrap();
        let want = reference::routing_plan(&cfg, &ids, t);
        let x: Vec<bf16> = normal_vec(&mut r, t * h, 1.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let d_x = s.clone_htod(&x).unwrap();
        let rows = cfg.max_rows();
        let poison = bf16::from_f32(-77.0);
        let total = want.total_rows();
        let expect = reference::permute(&want, &x, h, k);
        for kernel in [
            CopyKernel::Phased,
            CopyKernel::Phased,
            CopyKernel::WarpPerToken,
        ] {
            let mut d_xp = s.clone_htod(&vec![poison; rows * h]).unwrap();
            permute_using(s, &plan, h, &d_x, &mut d_xp, None, kernel).unwrap();
            let xp = s.clone_dtoh(&d_xp).unwrap();
            assert!(
                xp[..total * h] == expect[..],
                "{what}: {kernel:?} rows differ from the reference"
            );
            assert!(
                xp[total * h..].iter().all(|v| *v == poison),
                "{what}: {kernel:?} wrote past the padded total"
            );
        }
    }
}
