//! The draft head and its loss: hand-computed values, slicing/shifting (G4, G5), init, gradients.

use std::collections::BTreeMap;

use crate::common::{fixture, max_abs_diff};
use clover::model::head::{attention_decoder, DraftHead};
use clover::model::head_config::HeadConfig;
use clover::model::teacher::Teacher;
use clover::training::loss::{
    clover_loss, shift_for_training, teacher_targets, DistillTargets, LossWeights,
};
use tch::{Device, Kind, Tensor};

pub fn tiny_teacher(kind: Kind) -> Teacher {
    Teacher::load(&fixture("tiny-llama-untied"), Device::Cpu, kind).expect("tiny fixture loads")
}

pub fn tiny_head(teacher: &Teacher, depths: i64, seed: i64) -> DraftHead {
    let mut cfg = HeadConfig::from_teacher(&teacher.config);
    cfg.options.num_depths = depths;
    DraftHead::new(teacher, cfg, seed).expect("tiny head builds")
}

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
    let outs = tch::no_grad(|| head.depth_outputs(&u, &next, None));
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
        assert!(max_abs_diff(&o0, &outs[0]) < 1e-6);
        for r in 0..t - 2 {
            let (o1, s1) = head.step(&s0.narrow(1, r, 1), &next.narrow(1, r + 1, 1));
            assert!(
                max_abs_diff(&o1, &outs[1].narrow(1, r, 1)) < 1e-5,
                "depth 1 row {r}: {}",
                max_abs_diff(&o1, &outs[1].narrow(1, r, 1))
            );
            let (o2, _) = head.step(&s1, &next.narrow(1, r + 2, 1));
            assert!(
                max_abs_diff(&o2, &outs[2].narrow(1, r, 1)) < 1e-5,
                "depth 2 row {r}: {}",
                max_abs_diff(&o2, &outs[2].narrow(1, r, 1))
            );
        }
        // Causal: changing the last position changes no earlier depth-0 row.
        let u2 = u.copy();
        let _ = u2.narrow(1, t - 1, 1).fill_(3.0);
        let (o0b, _) = head.depth0(&u2, &next, &pos, None, None);
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
        assert!(d < 1e-5, "cached vs full depth 0 differ by {d}");
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
    let p = teacher.logits(&u).softmax(-1, Kind::Float);
    for (j, (b, tp)) in [(0, 1), (0, 3), (0, 4), (1, 0), (1, 4)].iter().enumerate() {
        let j = j as i64;
        assert!(max_abs_diff(&tg.h.get(j), &h.get(*b).get(tp + 1)) < 1e-6);
        assert!(max_abs_diff(&tg.probs.get(j), &p.get(*b).get(tp + 1)) < 1e-6);
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
    };
    let ident = |o: &Tensor| o.shallow_clone();
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
        let outs = head.depth_outputs(&u, &next, None);
        clover_loss(&outs, &targets, &|o: &Tensor| head.logits(o), &w).total
    };
    let params: BTreeMap<String, Tensor> = head.named_tensors();
    for p in params.values() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    loss(&head).backward();
    let probes = [
        ("clover_head_mlp_rnn.q.weight", 3),
        ("clover_head_mlp_rnn.v.bias", 5),
        ("layers.0.self_attn.k_proj.weight", 17),
        ("layers.1.mlp.down_proj.weight", 40),
        ("clover_norm.weight", 2),
        ("clover_head_mlp.weight", 70),
        ("clover_head_mlp2.weight", 100),
        ("clover_head_mlp_rnn2.k.weight", 9),
        ("clover_head_norm.weight", 1),
    ];
    for (name, flat_idx) in probes {
        let p = &params[name];
        let analytic = p.grad().reshape([-1]).double_value(&[flat_idx]);
        let eps = 1e-6;
        let bump = |delta: f64| {
            tch::no_grad(|| {
                let flat = p.reshape([-1]);
                let v = flat.double_value(&[flat_idx]);
                let _ = flat.get(flat_idx).fill_(v + delta);
            });
        };
        bump(eps);
        let up = tch::no_grad(|| loss(&head).double_value(&[]));
        bump(-2.0 * eps);
        let down = tch::no_grad(|| loss(&head).double_value(&[]));
        bump(eps);
        let numeric = (up - down) / (2.0 * eps);
        let err = (numeric - analytic).abs() / (numeric.abs().max(analytic.abs()).max(1e-6));
        assert!(err < 1e-5, "{name}[{flat_idx}]: autograd {analytic} vs finite difference {numeric} (rel err {err})");
    }
}
