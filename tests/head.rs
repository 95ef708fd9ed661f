//! The draft head and its loss: hand-computed values, slicing/shifting (G4, G5), init, gradients.

use std::collections::BTreeMap;

use crate::common::{f32_paths_bound, max_abs, max_abs_diff, tiny_head, tiny_teacher, F64_U};
use clover::model::clover2::attention_decoder;
use clover::model::head::DraftHead;
use clover::training::loss::{
    clover_loss, shift_for_training, teacher_targets, DistillTargets, LossWeights,
};
use tch::{Device, Kind, Tensor};

fn t2(rows: &[[f64; 4]]) -> Tensor {
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, 4])
}

#[test]
fn cosine_gate_matches_hand_computed_values() {
    // H = 4, 2 heads of 2. Identity q/k and v = 2·I, zero biases, unit norm weight: RMSNorm only
    // rescales x, which leaves the per-head cosine unchanged.
    let eye = Tensor::eye(4, (Kind::Double, Device::Cpu));
    let zero = Tensor::zeros([4], (Kind::Double, Device::Cpu));
    let v2 = &eye * 2.0;
    let norm = Tensor::ones([4], (Kind::Double, Device::Cpu));
    let x = t2(&[[3.0, 4.0, 1.0, 1.0], [1.0, 0.0, 2.0, -1.0]]);
    let y = t2(&[[4.0, 3.0, 2.0, 2.0], [0.0, 5.0, 0.0, 0.0]]);
    let out = attention_decoder(
        &x,
        &y,
        &norm,
        (&eye, &zero),
        (&eye, &zero),
        (&v2, &zero),
        2,
        1e-5,
    );
    // Row 0: head 0 cos((3,4),(4,3)) = 24/25; head 1 cos((1,1),(2,2)) = 1.
    // Row 1: head 0 cos((1,0),(0,5)) = 0; head 1: y is zero, cos = 0 (eps guards 0/0).
    let a = 24.0 / 25.0;
    let want = t2(&[
        [3.0 + a * 8.0, 4.0 + a * 6.0, 1.0 + 4.0, 1.0 + 4.0],
        [1.0, 0.0, 2.0, -1.0],
    ]);
    assert!(max_abs_diff(&out, &want) < 1e-12, "got {out}");
    // A bias on q moves the gate: q = x + (0,0,-2,-2) makes head 1 of row 0 cos((-1,-1),(2,2)) = -1.
    let qb = Tensor::from_slice(&[0.0, 0.0, -2.0, -2.0]);
    let out = attention_decoder(
        &x.narrow(0, 0, 1),
        &y.narrow(0, 0, 1),
        &norm,
        (&eye, &qb),
        (&eye, &zero),
        (&v2, &zero),
        2,
        1e-5,
    );
    // RMSNorm(x) for row 0 = x / sqrt((9+16+1+1)/4); q head 1 = (1,1)/rms - 2 < 0 on both.
    let rms = (27.0f64 / 4.0).sqrt();
    let q1 = 1.0 / rms - 2.0;
    assert!(q1 < 0.0);
    let want = t2(&[[3.0 + a * 8.0, 4.0 + a * 6.0, 1.0 - 4.0, 1.0 - 4.0]]);
    assert!(max_abs_diff(&out, &want) < 1e-12, "got {out}");
}

#[test]
fn reference_init_follows_spec_and_seed() {
    let teacher = tiny_teacher(Kind::Float);
    let head = tiny_head(&teacher, 5, 7);
    let w = head.named_tensors();
    let h = head.config().hidden_size;
    // G1: both Augmenting-Block layers start as base layer 0; both norms as the final norm.
    for l in 0..2 {
        for rel in [
            "self_attn.q_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.down_proj.weight",
            "input_layernorm.weight",
        ] {
            let base = teacher.weight(&format!("model.layers.0.{rel}")).unwrap();
            assert_eq!(
                max_abs_diff(&w[&format!("layers.{l}.{rel}")], base),
                0.0,
                "layers.{l}.{rel}"
            );
        }
    }
    let final_norm = teacher.weight("model.norm.weight").unwrap();
    assert_eq!(max_abs_diff(&w["clover_norm.weight"], final_norm), 0.0);
    assert_eq!(max_abs_diff(&w["clover_head_norm.weight"], final_norm), 0.0);
    let eye = Tensor::eye(h, (Kind::Float, Device::Cpu));
    let in_unit = |t: &Tensor, name: &str| {
        let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
        assert!(
            lo >= 0.0 && hi < 0.01,
            "{name}: noise outside [0,0.01): {lo}..{hi}"
        );
    };
    for cell in ["clover_head_mlp_rnn", "clover_head_mlp_rnn2"] {
        in_unit(&(&w[&format!("{cell}.q.weight")] - &eye), "q - I");
        in_unit(&(&w[&format!("{cell}.k.weight")] - &eye), "k - I");
        in_unit(&w[&format!("{cell}.v.weight")], "v");
        for b in ["q.bias", "k.bias", "v.bias"] {
            assert_eq!(
                w[&format!("{cell}.{b}")]
                    .abs()
                    .sum(Kind::Float)
                    .double_value(&[]),
                0.0
            );
        }
    }
    in_unit(&(&w["clover_head_mlp.weight"] - &eye), "fc0 - I");
    let fc1 = &w["clover_head_mlp2.weight"];
    assert_eq!(fc1.size(), [h, 2 * h]);
    in_unit(&(fc1.narrow(1, 0, h) - &eye), "fc1 state half - I");
    in_unit(&fc1.narrow(1, h, h), "fc1 embedding half");
    // Same seed, same init; another seed, another init.
    let again = tiny_head(&teacher, 5, 7).named_tensors();
    let other = tiny_head(&teacher, 5, 8).named_tensors();
    assert_eq!(max_abs_diff(&again["clover_head_mlp2.weight"], fc1), 0.0);
    assert!(max_abs_diff(&other["clover_head_mlp2.weight"], fc1) > 0.0);
    // Parameter count as docs/clover2.md §1.4's formula: 2 layers + 2 cells (3(H²+H)+H) + FC0 + FC1 + 2 norms.
    let c = head.config();
    let (hh, i, q, kv) = (
        h,
        c.intermediate_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let layer = 2 * q * hh + 2 * kv * hh + 3 * hh * i + 2 * hh;
    let want =
        2 * layer + 2 * (3 * (hh * hh + hh) + hh) + (hh * hh + hh) + (2 * hh * hh + hh) + 2 * hh;
    assert_eq!(head.num_parameters(), want);
}

fn ids(b: i64, t: i64, seed: i64) -> Tensor {
    let _rng = clover::rng::hold(seed);
    Tensor::randint(96, [b, t], (Kind::Int64, Device::Cpu))
}

#[test]
fn depth_outputs_slice_and_shift_as_get_all_head() {
    let teacher = tiny_teacher(Kind::Float);
    let head = tiny_head(&teacher, 3, 1);
    let (b, t) = (2, 7);
    let x = ids(b, t, 3);
    let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .expand([b, t], true);
    let u = tch::no_grad(|| teacher.forward(&x, &pos, None, None));
    let next = ids(b, t, 4);
    let outs = tch::no_grad(|| head.depth_outputs(&u, &next));
    assert_eq!(outs.len(), 3);
    for (i, o) in outs.iter().enumerate() {
        assert_eq!(
            o.size(),
            [b, t - i as i64, 64],
            "depth {i} keeps T-i rows (G5)"
        );
    }
    // By hand: depth 1 row r = step(s0[r], next[r+1]); depth 2 row r = step(s1[r], next[r+2]).
    tch::no_grad(|| {
        let (o0, s0) = head.depth0(&u, &next, &pos, None, None);
        // The very call depth_outputs makes, same shapes and kernels: bit-identical.
        assert!(max_abs_diff(&o0, &outs[0]) < 1e-6);
        // One row vs T-i rows: other kernels through 1 head step (widest reduction: FC over
        // 2H = 128) for depth 1, 2 steps for depth 2; 2·128·2^-24·|o| ≈ 6e-5 per step at |o| ≈ 4.
        let tol1 = f32_paths_bound(&[128], max_abs(&outs[1]));
        let tol2 = f32_paths_bound(&[128, 128], max_abs(&outs[2]));
        for r in 0..t - 2 {
            let (o1, s1) = head.step(&s0.narrow(1, r, 1), &next.narrow(1, r + 1, 1));
            assert!(
                max_abs_diff(&o1, &outs[1].narrow(1, r, 1)) < tol1,
                "depth 1 row {r}: {} (tol {tol1:e})",
                max_abs_diff(&o1, &outs[1].narrow(1, r, 1))
            );
            let (o2, _) = head.step(&s1, &next.narrow(1, r + 2, 1));
            assert!(
                max_abs_diff(&o2, &outs[2].narrow(1, r, 1)) < tol2,
                "depth 2 row {r}: {} (tol {tol2:e})",
                max_abs_diff(&o2, &outs[2].narrow(1, r, 1))
            );
        }
        // Causal: changing the last position changes no earlier depth-0 row.
        let u2 = u.copy();
        let _ = u2.narrow(1, t - 1, 1).fill_(3.0);
        let (o0b, _) = head.depth0(&u2, &next, &pos, None, None);
        // Same shapes and kernels; masked scores give exact zero weights: bit-identical rows.
        assert!(max_abs_diff(&o0b.narrow(1, 0, t - 1), &o0.narrow(1, 0, t - 1)) < 1e-6);
        assert!(max_abs_diff(&o0b.narrow(1, t - 1, 1), &o0.narrow(1, t - 1, 1)) > 1e-3);
    });
}

#[test]
fn cached_depth0_matches_one_full_pass() {
    let teacher = tiny_teacher(Kind::Float);
    let head = tiny_head(&teacher, 2, 2);
    let t = 9;
    let x = ids(1, t, 5);
    let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let u = tch::no_grad(|| teacher.forward(&x, &pos, None, None));
    let next = ids(1, t, 6);
    tch::no_grad(|| {
        let (full, _) = head.depth0(&u, &next, &pos, None, None);
        let mut cache = head.new_cache(1);
        let mut parts = vec![];
        for (start, len) in [(0, 5), (5, 1), (6, 3)] {
            let (o, _) = head.depth0(
                &u.narrow(1, start, len),
                &next.narrow(1, start, len),
                &pos.narrow(1, start, len),
                None,
                Some(&mut cache),
            );
            parts.push(o);
        }
        assert_eq!(cache.len(), t);
        let d = max_abs_diff(&Tensor::cat(&parts, 1), &full);
        // Chunks of 5, 1, 3 rows vs 9: cell (64), 2 layers (MLP 160), FC0 (64) on the path,
        // 2·448·2^-24·|o| ≈ 2e-4 at |o| ≈ 3.
        let tol = f32_paths_bound(&[64, 160, 160, 64], max_abs(&full));
        assert!(
            d < tol,
            "cached vs full depth 0 differ by {d} (tol {tol:e})"
        );
    });
}

#[test]
fn shift_pairs_state_with_next_token_and_masks_last() {
    let (next, mask) = shift_for_training(&[5, 6, 7, 8], &[0, 1, 1, 1]);
    assert_eq!(next, vec![6, 7, 8, 0]);
    assert_eq!(mask, vec![0.0, 1.0, 1.0, 0.0]);
}

#[test]
fn teacher_targets_are_next_position_post_norm_states() {
    let teacher = tiny_teacher(Kind::Float);
    let t = 6;
    let x = ids(2, t, 9);
    let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .expand([2, t], true);
    let u = tch::no_grad(|| teacher.forward(&x, &pos, None, None));
    let mask = Tensor::from_slice(&[0f32, 1., 0., 1., 1., 0., 1., 0., 0., 0., 1., 0.]).view([2, t]);
    let tg = teacher_targets(&teacher, &u, &mask);
    assert_eq!(
        Vec::<i64>::try_from(&tg.batch).unwrap(),
        vec![0, 0, 0, 1, 1]
    );
    assert_eq!(Vec::<i64>::try_from(&tg.pos).unwrap(), vec![1, 3, 4, 0, 4]);
    let h = teacher.final_norm(&u);
    let logits = teacher.logits(&u);
    let p = logits.softmax(-1, Kind::Float);
    // Gathered rows [5,H] vs all rows [2,6,H] may reduce in other orders: RMSNorm over H = 64.
    let tol_h = f32_paths_bound(&[64], max_abs(&h));
    // Logits move by ≤ Δl = 2·(64 + 64)·2^-24·|l| (norm, lm_head); dp_i = p_i(dl_i − Σ p_j dl_j),
    // so |dp| ≤ 2·max(p)·Δl.
    let tol_p = 2.0 * max_abs(&p) * f32_paths_bound(&[64, 64], max_abs(&logits));
    for (j, (b, tp)) in [(0, 1), (0, 3), (0, 4), (1, 0), (1, 4)].iter().enumerate() {
        let j = j as i64;
        assert!(max_abs_diff(&tg.h.get(j), &h.get(*b).get(tp + 1)) < tol_h);
        assert!(max_abs_diff(&tg.probs.get(j), &p.get(*b).get(tp + 1)) < tol_p);
    }
}

fn smooth_l1(d: f64) -> f64 {
    if d.abs() < 1.0 {
        0.5 * d * d
    } else {
        d.abs() - 0.5
    }
}

fn log_softmax2(a: f64, b: f64) -> [f64; 2] {
    let m = a.max(b);
    let lse = m + ((a - m).exp() + (b - m).exp()).ln();
    [a - lse, b - lse]
}

#[test]
fn loss_weights_and_denominators_by_hand() {
    // B=1, T=3, H=V=2, lm_head = identity (logits = o). Loss mask [1,1,0] -> positions 0 and 1.
    let outs = vec![
        Tensor::from_slice(&[0.5, -0.5, 2.0, 0.0, 9.0, 9.0]).view([1, 3, 2]),
        Tensor::from_slice(&[1.0, 1.0, 0.3, 0.2]).view([1, 2, 2]),
    ];
    let targets = DistillTargets {
        batch: Tensor::from_slice(&[0i64, 0]),
        pos: Tensor::from_slice(&[0i64, 1]),
        h: Tensor::from_slice(&[0.0, 0.0, 1.0, 3.0]).view([2, 2]),
        probs: Tensor::from_slice(&[0.25, 0.75, 1.0, 0.0]).view([2, 2]),
        top1: Tensor::from_slice(&[1i64, 0]),
        seq_len: 3,
    };
    let w = LossWeights {
        v_w: 10.0,
        p_w: 1.0,
        decay: 0.7,
        heads_coefficient: 1.0,
        depth_gamma: None,
        distill: std::sync::Arc::new(clover::training::distill_loss::SoftCe),
    };
    let ident = |_: usize, o: &Tensor| o.shallow_clone();
    let parts = clover_loss(&outs, &targets, &ident, &w);
    // Depth 0: rows 0,1 vs targets at positions 0,1; denominators Σm+1 = 3.
    let v0 =
        ((smooth_l1(0.5) + smooth_l1(-0.5)) / 2.0 + (smooth_l1(1.0) + smooth_l1(-3.0)) / 2.0) / 3.0;
    let l_a = log_softmax2(0.5, -0.5);
    let l_b = log_softmax2(2.0, 0.0);
    let p0 = -(0.25 * l_a[0] + 0.75 * l_a[1] + 1.0 * l_b[0]) / 3.0;
    // Depth 1: only position 1 (t' >= 1), row t = 0 of outs[1]; denominator 2; weight 0.7.
    let v1 = ((smooth_l1(0.0) + smooth_l1(-2.0)) / 2.0) / 2.0;
    let p1 = -(log_softmax2(1.0, 1.0)[0]) / 2.0;
    let d = &parts.depths;
    assert!(
        (d[0].vloss - v0).abs() < 1e-12 && (d[0].ploss - p0).abs() < 1e-12,
        "{d:?}"
    );
    assert!(
        (d[1].vloss - v1).abs() < 1e-12 && (d[1].ploss - p1).abs() < 1e-12,
        "{d:?}"
    );
    assert!((d[0].loss - (10.0 * v0 + p0)).abs() < 1e-12);
    assert!((d[1].loss - 0.7 * (10.0 * v1 + p1)).abs() < 1e-12);
    let total = parts.total.double_value(&[]);
    assert!((total - (10.0 * v0 + p0) - 0.7 * (10.0 * v1 + p1)).abs() < 1e-12);
    assert_eq!((d[0].count, d[1].count), (2, 1));
    // Top-1: depth 0 argmax [0, 0] vs teacher [1, 0]; depth 1 argmax 0 vs teacher 0.
    assert_eq!((d[0].top1, d[1].top1), (0.5, 1.0));
    let weights = [1.0, 0.7, 0.49, 0.343, 0.2401];
    for (i, want) in weights.iter().enumerate() {
        assert!((w.depth_weight(i) - want).abs() < 1e-12, "depth {i} weight");
    }
}

/// Allowed round-off of one evaluated loss, in units of F64_U·|L|. Every loss term is >= 0 and L
/// is their sum, so an evaluated L̂ = L + e with |e| <= K·F64_U·|L|, K counting the rounding steps
/// a term goes through times their conditioning. Measured here: central differences at ε <= 1e-8
/// scatter by about 2e-15, half an ulp of L ≈ 20; K = 64 leaves a factor 64 for other kernels.
const K_ROUND: f64 = 64.0;

/// Central differences of the loss along one direction `d` (some or all parameters), at steps ε
/// and 2ε. They do not depend on the analytic gradient, so one probe can judge any candidate.
struct FdProbe {
    label: String,
    /// θ⁺ − θ⁻ as actually stored at step ε: θ ± ε·d are rounded, so the analytic side uses the
    /// step really taken instead of 2ε·d.
    step: BTreeMap<String, Tensor>,
    eps: f64,
    /// D(h) = (L(θ + h·d) − L(θ − h·d)) / 2h at h = ε and h = 2ε.
    d1: f64,
    d2: f64,
    /// |L(θ)|, the scale of the loss's own round-off.
    loss: f64,
    /// Elements of d: the number of terms of the analytic dot product.
    n: i64,
}

/// What a probe says about one candidate gradient.
struct FdVerdict {
    analytic: f64,
    numeric: f64,
    tol: f64,
}

impl FdVerdict {
    fn passes(&self) -> bool {
        (self.analytic - self.numeric).abs() <= self.tol
    }
}

impl FdProbe {
    fn verdict(&self, grads: &BTreeMap<String, Tensor>) -> FdVerdict {
        let two_eps = 2.0 * self.eps;
        let (mut dot, mut abs_dot) = (0.0, 0.0);
        for (name, step) in &self.step {
            let prod = &grads[name] * step;
            dot += prod.sum(Kind::Double).double_value(&[]);
            abs_dot += prod.abs().sum(Kind::Double).double_value(&[]);
        }
        // Error model of |analytic − numeric|, doubled for the O(ε⁴) terms it leaves out:
        // - round-off of D(ε) = (L̂⁺ − L̂⁻)/2ε: 2δ/2ε = δ/ε, with δ = K·F64_U·|L| per loss value;
        // - truncation: D(h) = L' + h²·T + O(h⁴) with T = L'''(d)/6, so D(2ε) − D(ε) = 3ε²·T
        //   (Richardson) and ε²·|T| <= |D(2ε) − D(ε)|/3 + (δ/ε + δ/2ε)/3, the last term being the
        //   estimate's own round-off; with the first item that is 1.5·δ/ε of round-off in all;
        // - analytic side: each gradient element within K ulps, summed over n products (γ_n):
        //   (n + K)·F64_U·Σ|g_i·Δ_i| / 2ε.
        let delta = K_ROUND * F64_U * self.loss;
        let round_off = 1.5 * delta / self.eps;
        let truncation = (self.d2 - self.d1).abs() / 3.0;
        let dot_error = (self.n as f64 + K_ROUND) * F64_U * abs_dot / two_eps;
        FdVerdict {
            analytic: dot / two_eps,
            numeric: self.d1,
            tol: 2.0 * (round_off + truncation + dot_error),
        }
    }
}

#[test]
fn gradient_matches_finite_differences_in_f64() {
    let teacher = tiny_teacher(Kind::Double);
    let mut head = tiny_head(&teacher, 3, 11);
    head.to_kind(Kind::Double);
    let t = 6;
    let x = ids(1, t, 12);
    let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let u = tch::no_grad(|| teacher.forward(&x, &pos, None, None));
    let (next, mask) = shift_for_training(
        &Vec::<i64>::try_from(x.get(0)).unwrap(),
        &[0, 1, 1, 1, 1, 1],
    );
    let next = Tensor::from_slice(&next).view([1, t]);
    let mask = Tensor::from_slice(&mask).view([1, t]);
    let targets = teacher_targets(&teacher, &u, &mask);
    let w = LossWeights::reference(head.config());
    let loss = |head: &DraftHead| {
        let outs = head.depth_outputs(&u, &next);
        clover_loss(&outs, &targets, &|_, o: &Tensor| head.logits(o), &w).total
    };
    let params: BTreeMap<String, Tensor> = head.named_tensors();
    for p in params.values() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let l0 = loss(&head);
    l0.backward();
    let l0 = l0.double_value(&[]);
    let grads: BTreeMap<String, Tensor> = params
        .iter()
        .map(|(k, p)| (k.clone(), p.grad().copy()))
        .collect();
    let orig: BTreeMap<String, Tensor> = params
        .iter()
        .map(|(k, p)| (k.clone(), p.detach().copy()))
        .collect();
    // L at θ + h·d; θ is restored exactly afterwards.
    let loss_along = |d: &BTreeMap<String, Tensor>, h: f64| -> f64 {
        tch::no_grad(|| {
            for (k, dk) in d {
                let _ = params[k].detach().copy_(&(&orig[k] + dk * h));
            }
            let v = loss(&head).double_value(&[]);
            for k in d.keys() {
                let _ = params[k].detach().copy_(&orig[k]);
            }
            v
        })
    };
    // ε = 2^-17 ≈ 7.6e-6: round-off 1.5·δ/ε ≈ 3e-8 here, truncation ε²·|T| ≈ 2e-7 along the
    // all-parameter directions (T ≈ 3e3), both far below their derivatives (|∇L·d| ~ |∇L| ≈ 10).
    let eps = 2f64.powi(-17);
    let probe = |label: String, d: BTreeMap<String, Tensor>| -> FdProbe {
        let step = d
            .iter()
            .map(|(k, dk)| (k.clone(), (&orig[k] + dk * eps) - (&orig[k] - dk * eps)))
            .collect();
        let n = d.values().map(|t| t.numel() as i64).sum();
        let d1 = (loss_along(&d, eps) - loss_along(&d, -eps)) / (2.0 * eps);
        let d2 = (loss_along(&d, 2.0 * eps) - loss_along(&d, -2.0 * eps)) / (4.0 * eps);
        FdProbe {
            label,
            step,
            eps,
            d1,
            d2,
            loss: l0.abs(),
            n,
        }
    };

    // Directional derivatives over ALL parameters at once, along seeded ±1 directions drawn from a
    // Rust-side RNG (libtorch's global generator is shared by the test threads).
    let mut rng = clover::training::batches::SplitMix64::new(0x5eed_f00d);
    let mut probes: Vec<FdProbe> = (0..3)
        .map(|i| {
            let d = params
                .iter()
                .map(|(k, p)| {
                    let signs: Vec<f64> = (0..p.numel())
                        .map(|_| if rng.next_u64() >> 63 == 1 { 1.0 } else { -1.0 })
                        .collect();
                    (
                        k.clone(),
                        Tensor::from_slice(&signs).view(p.size().as_slice()),
                    )
                })
                .collect();
            probe(format!("random direction {i}"), d)
        })
        .collect();
    let n_directions = probes.len();
    // Single elements (one-hot directions), judged by the same error model.
    for (name, flat_idx) in [
        ("clover_head_mlp_rnn.q.weight", 3),
        ("clover_head_mlp_rnn.v.bias", 5),
        ("layers.0.self_attn.k_proj.weight", 17),
        ("layers.1.mlp.down_proj.weight", 40),
        ("clover_norm.weight", 2),
        ("clover_head_mlp.weight", 70),
        ("clover_head_mlp2.weight", 100),
        ("clover_head_mlp_rnn2.k.weight", 9),
        ("clover_head_norm.weight", 1),
    ] {
        let p = &params[name];
        let one_hot = Tensor::zeros([p.numel() as i64], (Kind::Double, Device::Cpu));
        let _ = one_hot.get(flat_idx).fill_(1.0);
        let d = BTreeMap::from([(name.to_string(), one_hot.view(p.size().as_slice()))]);
        probes.push(probe(format!("{name}[{flat_idx}]"), d));
    }
    for pr in &probes {
        let v = pr.verdict(&grads);
        let diff = (v.analytic - v.numeric).abs();
        eprintln!(
            "{}: autograd {:e} vs finite difference {:e}: |diff| {diff:.2e} <= tol {:.2e}?",
            pr.label, v.analytic, v.numeric, v.tol
        );
        assert!(
            v.passes(),
            "{}: autograd {} vs finite difference {} differ by {diff:e} > tol {:e}",
            pr.label,
            v.analytic,
            v.numeric,
            v.tol
        );
    }

    // Control: the same check must reject a gradient broken the way a real bug breaks it, here one
    // parameter tensor's gradient dropped (zeroed) or sign-flipped, for every tensor in turn.
    let mut closest = (f64::INFINITY, String::new());
    for name in grads.keys() {
        for (bug, factor) in [("zeroed", 0.0), ("sign-flipped", -1.0)] {
            let mut broken: BTreeMap<String, Tensor> = grads
                .iter()
                .map(|(k, g)| (k.clone(), g.shallow_clone()))
                .collect();
            broken.insert(name.clone(), &grads[name] * factor);
            // How far outside the bound the broken gradient lands, in units of tol (> 1: rejected).
            let outside = probes[..n_directions]
                .iter()
                .map(|pr| {
                    let v = pr.verdict(&broken);
                    (v.analytic - v.numeric).abs() / v.tol
                })
                .fold(0.0, f64::max);
            assert!(
                outside > 1.0,
                "{name} gradient {bug}: the check does not reject it (|diff|/tol {outside})"
            );
            if outside < closest.0 {
                closest = (outside, format!("{name} {bug}"));
            }
        }
    }
    eprintln!(
        "control: all {} broken gradients rejected; the closest call, {}, lands at {:.3e} x tol",
        2 * grads.len(),
        closest.1,
        closest.0
    );
}
