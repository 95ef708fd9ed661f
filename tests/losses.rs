//! The distillation losses (`distill_loss`: train/training/distill_loss.rs, docs/losses.md) and
//! the per-depth weights (`depth_weighting`): each loss against its definition written out in
//! f64 loops, its gradient against finite differences, the batch loss of every head kind (with
//! a draft vocabulary, chunked, and split into data-parallel shares) against a hand-written
//! batch reference, the config keys, the default's bits, and a few real SmolLM2 training steps
//! per loss.
//!
//! Error model (as tests/loss.rs): two evaluations of one quantity that differ only in the order
//! of a k-term sum differ by at most 2·k·u of the sum of the terms' sizes, u the unit round-off
//! of the arithmetic; a logit x·W_v computed by two matmul kernels differs by at most
//! 2·H·u·||x||·||W_v|| (Cauchy-Schwarz). The per-row terms here are sums over V of products of
//! p, q, log p, log q: the "size" of row t is
//!   B_t = 1 + Σ_v (p_v + q_v)·(1 + |log p_v| + |log q_v|)   (0·log 0 counted as 0),
//! and a change δ in a row's logits (teacher or draft) moves its term by at most G·δ with
//! G = 2·(1 + η)·(1 + max|log p| + max|log q|)/α_min: the L1 norm of every term's gradient with
//! respect to a row of logits (|q − p|₁ ≤ 2 for the cross-entropies and KL, ≤ 1 for TV, with
//! factors log-ratio, η and 1/α from the KL weight and the log of the acceptance).

use crate::common::{scratch_dir, smollm2_dir, tiny_teacher, whole_batch_loss, F32_U, F64_U};
use clover::model::draft_vocab::DraftVocab;
use clover::model::head::DraftHead;
use clover::model::head_config::{HeadConfig, HeadKind};
use clover::model::teacher::Teacher;
use clover::training::batches::SplitMix64;
use clover::training::config::{TrainConfig, TrainOptions};
use clover::training::distill_loss::{
    DistillLoss, DistillLossName, ForwardKl, TotalVariation, DEFAULT_LK_ETA,
};
use clover::training::loss::{BatchLoss, DepthLogits, LossParts, LossWeights};
use clover::training::run_dir::Start;
use clover::training::trainer::{train, Source};
use tch::{Device, Kind, Tensor};

const NAMES: [DistillLossName; 5] = [
    DistillLossName::SoftCe,
    DistillLossName::ForwardKl,
    DistillLossName::Tv,
    DistillLossName::Lk,
    DistillLossName::LkAlpha,
];

/// A non-default η for `lk`, so that η is seen to reach the loss.
const ETA: f64 = 1.7;

/// η a loss uses (only `lk` has one).
fn eta_of(name: DistillLossName) -> f64 {
    if name == DistillLossName::Lk {
        ETA
    } else {
        0.0
    }
}

/// Uniform draws from a test's own seeded generator.
struct Draws(SplitMix64);

impl Draws {
    fn new(seed: u64) -> Self {
        Draws(SplitMix64::new(seed))
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn row(&mut self, v: usize, spread: f64) -> Vec<f64> {
        (0..v).map(|_| self.uniform(-spread, spread)).collect()
    }
}

fn log_softmax(l: &[f64]) -> Vec<f64> {
    let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = l.iter().map(|x| (x - m).exp()).sum();
    l.iter().map(|x| x - m - s.ln()).collect()
}

fn softmax(l: &[f64]) -> Vec<f64> {
    log_softmax(l).iter().map(|x| x.exp()).collect()
}

/// p·log p with 0·log 0 = 0.
fn xlogx(p: f64) -> f64 {
    if p > 0.0 {
        p * p.ln()
    } else {
        0.0
    }
}

/// The per-row term of `name` written out from its definition (docs/losses.md), in f64.
fn row_term(name: DistillLossName, eta: f64, p: &[f64], logits: &[f64]) -> f64 {
    let logq = log_softmax(logits);
    let q: Vec<f64> = logq.iter().map(|x| x.exp()).collect();
    let ce: f64 = -p.iter().zip(&logq).map(|(p, lq)| p * lq).sum::<f64>();
    let kl = p.iter().map(|&p| xlogx(p)).sum::<f64>() + ce;
    let tv = 0.5 * p.iter().zip(&q).map(|(p, q)| (p - q).abs()).sum::<f64>();
    let alpha: f64 = p.iter().zip(&q).map(|(p, q)| p.min(*q)).sum();
    match name {
        DistillLossName::SoftCe => ce,
        DistillLossName::ForwardKl => kl,
        DistillLossName::Tv => tv,
        DistillLossName::Lk => {
            let lambda = (-eta * alpha).exp();
            lambda * kl + (1.0 - lambda) * tv
        }
        DistillLossName::LkAlpha => -alpha.max(f32::MIN_POSITIVE as f64).ln(),
    }
}

/// Sizes of one row (module comment): (B_t, max|log p| + max|log q|, α).
fn row_sizes(p: &[f64], logits: &[f64]) -> (f64, f64, f64) {
    let logq = log_softmax(logits);
    let mut b = 1.0;
    let (mut lp_max, mut lq_max, mut alpha) = (0.0f64, 0.0f64, 0.0);
    for (&p, &lq) in p.iter().zip(&logq) {
        let lp = if p > 0.0 { p.ln().abs() } else { 0.0 };
        b += (p + lq.exp()) * (1.0 + lp + lq.abs());
        lp_max = lp_max.max(lp);
        lq_max = lq_max.max(lq.abs());
        alpha += p.min(lq.exp());
    }
    (b, lp_max + lq_max, alpha)
}

/// Σ_t B_t and G over a set of rows (module comment).
fn sizes(p: &[Vec<f64>], logits: &[Vec<f64>], eta: f64) -> (f64, f64) {
    let (mut sum_b, mut logs, mut alpha_min) = (0.0, 0.0f64, 1.0f64);
    for (p, l) in p.iter().zip(logits) {
        let (b, lg, a) = row_sizes(p, l);
        sum_b += b;
        logs = logs.max(lg);
        alpha_min = alpha_min.min(a);
    }
    (
        sum_b * (1.0 + eta),
        2.0 * (1.0 + eta) * (1.0 + logs) / alpha_min,
    )
}

fn to_rows(t: &Tensor) -> Vec<Vec<f64>> {
    let t = t.to_kind(Kind::Double).to_device(Device::Cpu);
    let v = t.size()[1] as usize;
    let flat = Vec::<f64>::try_from(t.reshape([-1])).unwrap();
    flat.chunks(v).map(|c| c.to_vec()).collect()
}

fn from_rows(rows: &[Vec<f64>], kind: Kind) -> Tensor {
    let v = rows[0].len() as i64;
    let flat: Vec<f64> = rows.concat();
    Tensor::from_slice(&flat).view([-1, v]).to_kind(kind)
}

/// Teacher probabilities and draft logits of `n` rows over `v` tokens: random, plus a one-hot
/// teacher row (0·log 0 in KL) and a draft row within 1e-3 of the teacher (TV's kink near).
fn random_rows(seed: u64, n: usize, v: usize) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut d = Draws::new(seed);
    let mut p = vec![];
    let mut l = vec![];
    for t in 0..n {
        let teacher = d.row(v, 3.0);
        let draft = if t == 1 {
            teacher.iter().map(|x| x + d.uniform(-1e-3, 1e-3)).collect()
        } else {
            d.row(v, 3.0)
        };
        let mut probs = softmax(&teacher);
        if t == 0 {
            probs = (0..v).map(|j| f64::from(u8::from(j == 2))).collect();
        }
        p.push(probs);
        l.push(draft);
    }
    (p, l)
}

/// Each loss's sum over rows against its definition, in f64 and in f32 (the loss arithmetic's
/// kinds). Bound: both sides sum V-term row sums over n rows, each product and log within a
/// few u of its value, so they differ by at most 4·(V + n + 8)·u·Σ_t B_t.
#[test]
fn each_loss_matches_its_definition() {
    let (n, v) = (6usize, 7usize);
    let (p, l) = random_rows(41, n, v);
    for name in NAMES {
        let eta = eta_of(name);
        let loss = name.build(eta);
        let want: f64 = p
            .iter()
            .zip(&l)
            .map(|(p, l)| row_term(name, eta, p, l))
            .sum();
        let (sum_b, _) = sizes(&p, &l, eta);
        for (kind, u) in [(Kind::Double, F64_U), (Kind::Float, F32_U)] {
            let got = loss
                .sum_over_rows(&from_rows(&p, kind), &from_rows(&l, kind))
                .double_value(&[]);
            // The f32 case also starts from p and logits rounded to f32 (δ ≤ u·|l|, |l| ≤ 3).
            let input_rounding = if kind == Kind::Float {
                n as f64 * sizes(&p, &l, eta).1 * 3.0 * u
            } else {
                0.0
            };
            let tol = 4.0 * (v + n + 8) as f64 * u * sum_b + input_rounding;
            assert!(
                (got - want).abs() <= tol,
                "{name:?} {kind:?}: {got} vs definition {want} (tol {tol:e})"
            );
        }
    }
}

/// Soft cross-entropy and forward KL differ by the teacher's entropy and have the same
/// gradient, (Σp)·q − p for each row (∂/∂z of −Σ p·log_softmax(z)). Bounds as above; a
/// gradient element is a product and a V-term sum: within 4·(V + 4)·u of 1 + |q|.
#[test]
fn forward_kl_is_soft_ce_minus_the_teacher_entropy_with_the_same_gradient() {
    let (n, v) = (5usize, 9usize);
    let (p, l) = random_rows(43, n, v);
    let pt = from_rows(&p, Kind::Double);
    let entropy: f64 = -p.iter().flatten().map(|&x| xlogx(x)).sum::<f64>();
    let mut grads = vec![];
    let mut values = vec![];
    for name in [DistillLossName::SoftCe, DistillLossName::ForwardKl] {
        let z = from_rows(&l, Kind::Double).set_requires_grad(true);
        let value = name.build(0.0).sum_over_rows(&pt, &z);
        values.push(value.double_value(&[]));
        grads.push(to_rows(
            &Tensor::run_backward(&[&value], &[&z], false, false)[0],
        ));
    }
    let (sum_b, _) = sizes(&p, &l, 0.0);
    let tol = 8.0 * (v + n + 8) as f64 * F64_U * sum_b;
    assert!(
        (values[0] - values[1] - entropy).abs() <= tol,
        "soft_ce {} − forward_kl {} vs entropy {entropy}",
        values[0],
        values[1]
    );
    let gtol = 4.0 * (v + 4) as f64 * F64_U * 2.0;
    for t in 0..n {
        let q = softmax(&l[t]);
        let mass: f64 = p[t].iter().sum();
        for j in 0..v {
            let want = mass * q[j] - p[t][j];
            for g in &grads {
                assert!(
                    (g[t][j] - want).abs() <= gtol,
                    "row {t} token {j}: {} vs (Σp)·q − p = {want}",
                    g[t][j]
                );
            }
        }
    }
}

/// TV is exactly 0 where the draft's logits are the teacher's (q = exp(log_softmax) bit for bit
/// as the teacher's p), and so is its gradient: TV's kink sits at q = p, where abs has
/// derivative 0. A draft one step away has a gradient again, and the step against it lowers TV.
#[test]
fn tv_and_its_gradient_vanish_when_the_draft_is_the_teacher() {
    let mut d = Draws::new(47);
    let rows: Vec<Vec<f64>> = (0..4).map(|_| d.row(11, 4.0)).collect();
    for kind in [Kind::Float, Kind::Double] {
        let logits = from_rows(&rows, kind);
        let p = logits.log_softmax(-1, kind).exp();
        let z = logits.copy().set_requires_grad(true);
        let tv = TotalVariation.sum_over_rows(&p, &z);
        let g = Tensor::run_backward(&[&tv], &[&z], false, false).remove(0);
        assert_eq!(tv.double_value(&[]), 0.0, "{kind:?}: TV(p, p)");
        assert_eq!(
            g.abs().max().double_value(&[]),
            0.0,
            "{kind:?}: ∇TV at q = p"
        );

        let moved = (logits.copy()
            + Tensor::from_slice(&[0.5]).to_kind(kind)
                * Tensor::eye(11, (kind, Device::Cpu)).narrow(0, 0, 4))
        .set_requires_grad(true);
        let tv = TotalVariation.sum_over_rows(&p, &moved);
        let g = Tensor::run_backward(&[&tv], &[&moved], false, false).remove(0);
        let norm = g.norm().double_value(&[]);
        assert!(norm > 0.0, "{kind:?}: a moved draft has a TV gradient");
        let stepped = tch::no_grad(|| &moved - &g * (1e-2 / norm));
        let after = TotalVariation.sum_over_rows(&p, &stepped).double_value(&[]);
        assert!(
            after < tv.double_value(&[]),
            "{kind:?}: a step against ∇TV lowers TV ({} -> {after})",
            tv.double_value(&[])
        );
    }
}

/// The value whose gradient a loss trains with: the loss itself, except `lk`, whose weight λ
/// is held at its value at `at` (λ carries no gradient): λ·KL + (1 − λ)·TV per row, through the
/// ForwardKl and TotalVariation types row by row.
fn trained_value(name: DistillLossName, p: &Tensor, z: &Tensor, at: &Tensor) -> f64 {
    if name != DistillLossName::Lk {
        return name.build(ETA).sum_over_rows(p, z).double_value(&[]);
    }
    let q = at.softmax(-1, Kind::Double);
    let alpha =
        Vec::<f64>::try_from(p.minimum(&q).sum_dim_intlist(-1, false, Kind::Double)).unwrap();
    (0..p.size()[0])
        .map(|t| {
            let (pt, zt) = (p.narrow(0, t, 1), z.narrow(0, t, 1));
            let lambda = (-ETA * alpha[t as usize]).exp();
            lambda * ForwardKl.sum_over_rows(&pt, &zt).double_value(&[])
                + (1.0 - lambda) * TotalVariation.sum_over_rows(&pt, &zt).double_value(&[])
        })
        .sum()
}

/// Autograd's gradient of each loss against central differences in f64 (for `lk` with λ held:
/// its weight is a stop-gradient), and a step against it lowers that value. Central
/// differences err by c·h² + O(h⁴) (Richardson: c·h² ≈ (D(2h) − D(h))/3) and by 2u·F/h from
/// rounding F; the case keeps every |p_v − q_v| above 100·h, so neither |·| nor min changes
/// branch inside a difference.
#[test]
fn gradients_match_finite_differences_in_f64() {
    let (n, v) = (2usize, 5usize);
    let mut d = Draws::new(53);
    let p_rows: Vec<Vec<f64>> = (0..n).map(|_| softmax(&d.row(v, 2.0))).collect();
    let l_rows: Vec<Vec<f64>> = (0..n).map(|_| d.row(v, 2.0)).collect();
    let h = 1e-4;
    let gap = p_rows
        .iter()
        .zip(&l_rows)
        .flat_map(|(p, l)| p.iter().zip(softmax(l)).map(|(p, q)| (p - q).abs()))
        .fold(f64::INFINITY, f64::min);
    assert!(
        gap > 100.0 * h,
        "the case must stay clear of kinks: gap {gap}"
    );
    let p = from_rows(&p_rows, Kind::Double);
    let z0 = from_rows(&l_rows, Kind::Double);
    for name in NAMES {
        let z = z0.copy().set_requires_grad(true);
        let value = name.build(ETA).sum_over_rows(&p, &z);
        let g = to_rows(&Tensor::run_backward(&[&value], &[&z], false, false)[0]);
        let f = |dz: &Tensor| trained_value(name, &p, &(&z0 + dz), &z0);
        let f0 = f(&z0.zeros_like());
        for t in 0..n {
            for j in 0..v {
                let e = |s: f64| {
                    let mut x = vec![vec![0.0; v]; n];
                    x[t][j] = s;
                    from_rows(&x, Kind::Double)
                };
                let diff = |s: f64| (f(&e(s)) - f(&e(-s))) / (2.0 * s);
                let (d1, d2) = (diff(h), diff(2.0 * h));
                let tol = (d2 - d1).abs() + 8.0 * F64_U * (f0.abs() + 1.0) / h;
                assert!(
                    (g[t][j] - d1).abs() <= tol,
                    "{name:?} row {t} token {j}: autograd {} vs central difference {d1} \
                     (tol {tol:e})",
                    g[t][j]
                );
            }
        }
        let gt = from_rows(&g, Kind::Double);
        let norm = gt.norm().double_value(&[]);
        let after = f(&(-gt * (1e-3 / norm)));
        assert!(
            after < f0,
            "{name:?}: a step against the gradient lowers the loss ({f0} -> {after})"
        );
    }
}

fn head_of(teacher: &Teacher, kind: HeadKind, depths: i64, seed: i64) -> DraftHead {
    let mut cfg = HeadConfig::from_teacher(&teacher.config);
    cfg.options.head = kind;
    cfg.options.num_depths = depths;
    let mut head = DraftHead::new(teacher, cfg, seed).unwrap();
    head.to_kind(teacher.kind());
    head
}

/// One depth of the batch reference: Σ terms / (n + 1), n, and the rows' sizes.
struct RefDepth {
    ploss: f64,
    n: i64,
    sum_b: f64,
    g: f64,
    /// min over rows and tokens of |p_v − q_v|: TV's distance from a kink.
    gap: f64,
}

/// The per-depth distillation terms of a batch by loops (module comment of tests/loss.rs for
/// the pairing, docs/clover2.md G4-G5): the masked positions t' of the shifted mask in
/// row-major order, h_{t'+1} = final_norm(u_{t'+1}) and the teacher's softmax over its logits,
/// over the draft vocabulary's ids alone and only at positions whose full argmax is one of
/// them when there is one; depth i pairs its output row o_i[b, t' − i] with each position
/// t' >= i. The draft logits of a depth come from one `lm_head` call on its rows in order.
fn batch_reference(
    teacher: &Teacher,
    (u, mask): (&Tensor, &Tensor),
    outs: &[Tensor],
    lm_head: DepthLogits,
    ids: Option<&[i64]>,
    (name, eta): (DistillLossName, f64),
) -> Vec<RefDepth> {
    let _g = tch::no_grad_guard();
    let (b, t) = (u.size()[0], u.size()[1]);
    let m = Vec::<f64>::try_from(mask.to_kind(Kind::Double).reshape([-1])).unwrap();
    let positions: Vec<(i64, i64)> = (0..b)
        .flat_map(|r| (0..t).map(move |s| (r, s)))
        .filter(|&(r, s)| m[(r * t + s) as usize] != 0.0)
        .collect();
    let next: Vec<i64> = positions.iter().map(|&(r, s)| r * t + s + 1).collect();
    let hdim = u.size()[2];
    let h = teacher.final_norm(
        &u.reshape([b * t, hdim])
            .index_select(0, &Tensor::from_slice(&next)),
    );
    let full = to_rows(&teacher.lm_head(&h));
    let kept: Vec<(usize, Vec<f64>)> = full
        .iter()
        .enumerate()
        .filter_map(|(j, row)| {
            let Some(ids) = ids else {
                return Some((j, softmax(row)));
            };
            let top = (0..row.len()).fold(0, |a, x| if row[x] > row[a] { x } else { a });
            ids.contains(&(top as i64)).then(|| {
                (
                    j,
                    softmax(&ids.iter().map(|&k| row[k as usize]).collect::<Vec<_>>()),
                )
            })
        })
        .collect();
    outs.iter()
        .enumerate()
        .map(|(i, o)| {
            let d = i as i64;
            let rows: Vec<&(usize, Vec<f64>)> =
                kept.iter().filter(|(j, _)| positions[*j].1 >= d).collect();
            let out_rows: Vec<i64> = rows
                .iter()
                .map(|(j, _)| positions[*j].0 * (t - d) + positions[*j].1 - d)
                .collect();
            let o_sel = o
                .reshape([-1, hdim])
                .index_select(0, &Tensor::from_slice(&out_rows));
            let logits = to_rows(&lm_head(i, &o_sel));
            let p: Vec<Vec<f64>> = rows.iter().map(|(_, p)| p.clone()).collect();
            let sum: f64 = p
                .iter()
                .zip(&logits)
                .map(|(p, l)| row_term(name, eta, p, l))
                .sum();
            let (sum_b, g) = sizes(&p, &logits, eta);
            let gap = p
                .iter()
                .zip(&logits)
                .flat_map(|(p, l)| p.iter().zip(softmax(l)).map(|(p, q)| (p - q).abs()))
                .fold(f64::INFINITY, f64::min);
            let n = p.len() as i64;
            RefDepth {
                ploss: sum / (n as f64 + 1.0),
                n,
                sum_b,
                g,
                gap,
            }
        })
        .collect()
}

/// max over rows of ||x||.
fn row_norm_max(x: &Tensor) -> f64 {
    x.reshape([-1, *x.size().last().unwrap()])
        .to_kind(Kind::Double)
        .norm_scalaropt_dim(2, [-1], false)
        .max()
        .double_value(&[])
}

/// The bound on a depth's ploss between the reference and a BatchLoss run in `chunks` chunks
/// (0 = unchunked: same logits bit for bit, only sums reordered). Chunked, the teacher's and
/// the draft's logits come from matmuls over other row sets: each within
/// δ = 2·H·u·max||x||·max||W_v|| of the reference's.
fn ploss_tol(r: &RefDepth, v: i64, chunks: i64, delta: f64) -> f64 {
    let n = r.n as f64;
    let logits = if chunks > 0 {
        n * r.g * 2.0 * delta
    } else {
        0.0
    };
    (logits + 4.0 * (n * v as f64 + chunks as f64 + 8.0) * F64_U * r.sum_b) / (n + 1.0)
}

/// Weights of `name` with the head's reference terms and, when `gamma`, exp(−i/γ) depth weights.
fn weights_of(head: &DraftHead, name: DistillLossName, gamma: Option<f64>) -> LossWeights {
    let mut w = LossWeights::reference(head.config());
    w.distill = name.build(eta_of(name));
    w.depth_gamma = gamma;
    w
}

/// Each depth's weight written out: exp(−i/γ)·coef, or decay^i·coef.
fn depth_weight_by_hand(w: &LossWeights, i: usize) -> f64 {
    let shape = match w.depth_gamma {
        Some(g) => (-(i as f64) / g).exp(),
        None => (0..i).fold(1.0, |acc, _| acc * w.decay),
    };
    shape * w.heads_coefficient
}

/// `parts` against the reference: each depth's count and ploss, and its weighted loss
/// (v_w·vloss + p_w·ploss)·w_i with w_i written out (a few roundings: 8u of the terms).
fn check_parts(
    label: &str,
    parts: &LossParts,
    want: &[RefDepth],
    w: &LossWeights,
    tol: &dyn Fn(&RefDepth) -> f64,
) {
    assert_eq!(parts.depths.len(), want.len(), "{label}: depths");
    for (i, (got, r)) in parts.depths.iter().zip(want).enumerate() {
        assert_eq!(got.count, r.n, "{label} depth {i}: rows");
        let t = tol(r);
        assert!(
            (got.ploss - r.ploss).abs() <= t,
            "{label} depth {i}: ploss {} vs reference {} (tol {t:e})",
            got.ploss,
            r.ploss
        );
        let terms = (w.v_w * got.vloss + w.p_w * got.ploss) * depth_weight_by_hand(w, i);
        assert!(
            (got.loss - terms).abs() <= 8.0 * F64_U * terms.abs(),
            "{label} depth {i}: loss {} vs weighted terms {terms}",
            got.loss
        );
    }
}

/// δ of the module comment for the batch's teacher rows and `outs` through `w`'s rows.
fn logit_delta(
    teacher: &Teacher,
    (u, mask): (&Tensor, &Tensor),
    outs: &[Tensor],
    w: &Tensor,
) -> f64 {
    let rows = clover::training::loss::target_rows(teacher, u, mask);
    let x_max = outs
        .iter()
        .map(row_norm_max)
        .fold(row_norm_max(&rows.h), f64::max);
    2.0 * w.size()[1] as f64 * F64_U * x_max * row_norm_max(w)
}

/// Chunk sums of M = 9 positions in chunks of `chunk` (0: unchunked, none).
fn chunks_of(chunk: usize) -> i64 {
    if chunk == 0 {
        0
    } else {
        9usize.div_ceil(chunk) as i64
    }
}

/// The batch loss of every head kind and every loss, unchunked and (for the heads that train
/// chunked: Clover-2, EAGLE-1) chunked, with the reference's and the exp depth weights, against
/// `batch_reference`. Bounds: `ploss_tol`.
#[test]
fn batch_loss_matches_the_reference_for_every_head_kind_and_loss() {
    let teacher = tiny_teacher(Kind::Double);
    let (u, next, mask) = crate::loss::inputs(&teacher);
    let v = teacher.lm_head_weight().size()[0];
    for (kind, depths) in [
        (HeadKind::Clover2, 3),
        (HeadKind::Eagle1, 1),
        (HeadKind::Medusa, 3),
    ] {
        let head = head_of(&teacher, kind, depths, 13);
        let outs = head.depth_outputs(&u, &next);
        let lm = |i: usize, o: &Tensor| head.loss_logits_at(i as i64, o);
        let delta = logit_delta(&teacher, (&u, &mask), &outs, teacher.lm_head_weight());
        let chunks: &[usize] = match kind {
            HeadKind::Medusa => &[0],
            _ => &[0, 4],
        };
        for name in NAMES {
            let case = (name, eta_of(name));
            let want = batch_reference(&teacher, (&u, &mask), &outs, &lm, None, case);
            for gamma in [None, Some(2.0)] {
                let w = weights_of(&head, name, gamma);
                for &chunk in chunks {
                    let parts = tch::no_grad(|| {
                        whole_batch_loss(&teacher, (&u, &mask), &outs, &lm, &w, chunk, None)
                    });
                    let label = format!("{kind:?} {name:?} gamma {gamma:?} chunk {chunk}");
                    check_parts(&label, &parts, &want, &w, &|r| {
                        ploss_tol(r, v, chunks_of(chunk), delta)
                    });
                }
            }
        }
    }
}

/// The batch loss of Clover-2 under a draft vocabulary of the even ids, for every loss,
/// unchunked and chunked, against `batch_reference` (teacher restricted and renormalised, rows
/// whose teacher argmax is odd left out). Bounds: `ploss_tol` over the N kept columns.
#[test]
fn batch_loss_under_a_draft_vocabulary_matches_the_reference() {
    let teacher = tiny_teacher(Kind::Double);
    let (u, next, mask) = crate::loss::inputs(&teacher);
    let w_lm = teacher.lm_head_weight();
    let head = head_of(&teacher, HeadKind::Clover2, 3, 13);
    let outs = head.depth_outputs(&u, &next);
    let ids: Vec<i64> = (0..w_lm.size()[0]).step_by(2).collect();
    let vocab = DraftVocab::new(w_lm, &ids, 1).unwrap();
    let lm = |_: usize, o: &Tensor| vocab.draft_logits(o);
    let delta = logit_delta(&teacher, (&u, &mask), &outs, w_lm);
    for name in NAMES {
        let case = (name, eta_of(name));
        let want = batch_reference(&teacher, (&u, &mask), &outs, &lm, Some(&ids), case);
        assert!(
            want[0].n > 0 && want[0].n < 9,
            "the vocabulary must drop some rows and keep some"
        );
        let w = weights_of(&head, name, None);
        for chunk in [0usize, 3] {
            let parts = tch::no_grad(|| {
                whole_batch_loss(&teacher, (&u, &mask), &outs, &lm, &w, chunk, Some(&vocab))
            });
            let label = format!("draft vocab {name:?} chunk {chunk}");
            check_parts(&label, &parts, &want, &w, &|r| {
                ploss_tol(r, ids.len() as i64, chunks_of(chunk), delta)
            });
        }
    }
}

/// The bound on depth i's gradient with respect to its outputs between two evaluations whose
/// logits differ by δ (`chunked_gradients_match_unchunked_for_every_loss`); `scale` is the
/// gradient's largest element (for the final accumulation's rounding).
fn grad_tol(
    r: &RefDepth,
    (v, delta): (i64, f64),
    w_lm: &Tensor,
    w: &LossWeights,
    i: usize,
    scale: f64,
) -> f64 {
    let col_l1 = w_lm
        .abs()
        .sum_dim_intlist(0, false, Kind::Double)
        .max()
        .double_value(&[]);
    (r.g * r.g * delta + 4.0 * (v + 8) as f64 * F64_U * r.g) * col_l1 * w.p_w * w.depth_weight(i)
        / (r.n as f64 + 1.0)
        + 8.0 * F64_U * scale
}

/// Gradients with respect to the depth outputs, chunked (chunks of 1, 4 and 64 positions)
/// against unchunked, for every loss (Clover-2, f64): each gradient row is Σ_v γ_v·W_v/(n + 1)
/// with γ the term's gradient with respect to the row's logits. γ moves by at most
/// L·δ (L ≤ G², a bound on each term's second derivative in the logits away from TV's kinks,
/// which the case keeps more than 1000·δ away) and is summed over V in another order:
/// |Δg| ≤ (L·δ + 4·(V + 8)·u·G)·max_k Σ_v|W_vk|/(n + 1) (`grad_tol`).
#[test]
fn chunked_gradients_match_unchunked_for_every_loss() {
    let teacher = tiny_teacher(Kind::Double);
    let (u, next, mask) = crate::loss::inputs(&teacher);
    let head = head_of(&teacher, HeadKind::Clover2, 3, 17);
    let outs = head.depth_outputs(&u, &next);
    let lm = |i: usize, o: &Tensor| head.loss_logits_at(i as i64, o);
    let w_lm = teacher.lm_head_weight();
    let v = w_lm.size()[0];
    let delta = logit_delta(&teacher, (&u, &mask), &outs, w_lm);
    let ins: Vec<&Tensor> = outs.iter().collect();
    let grads = |w: &LossWeights, chunk: usize| -> Vec<Tensor> {
        let parts = whole_batch_loss(&teacher, (&u, &mask), &outs, &lm, w, chunk, None);
        Tensor::run_backward(&[&parts.total], &ins, true, false)
    };
    for name in NAMES {
        let w = weights_of(&head, name, None);
        let case = (name, eta_of(name));
        let want = batch_reference(&teacher, (&u, &mask), &outs, &lm, None, case);
        let full = grads(&w, 0);
        for chunk in [1usize, 4, 64] {
            let got = grads(&w, chunk);
            for (i, ((a, b), r)) in full.iter().zip(&got).zip(&want).enumerate() {
                assert!(
                    r.gap > 1000.0 * delta,
                    "{name:?} depth {i}: a kink within reach"
                );
                let tol = grad_tol(r, (v, delta), w_lm, &w, i, b.abs().max().double_value(&[]));
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(
                    diff <= tol,
                    "{name:?} chunk {chunk} depth {i}: gradients differ by {diff:e} (tol {tol:e})"
                );
            }
        }
    }
}

/// The batch's two rows as two data-parallel shares, each with the whole batch's `counts`
/// (chunks of 4): the sum of their totals and of their gradients with respect to `ins` (the
/// whole batch's depth outputs, which the shares' outputs are views of).
fn loss_of_shares(
    teacher: &Teacher,
    (u, mask): (&Tensor, &Tensor),
    ins: &[&Tensor],
    lm: DepthLogits,
    w: &LossWeights,
    counts: &[i64],
) -> (f64, Vec<Tensor>) {
    let mut total = 0.0;
    let mut grads: Vec<Tensor> = ins.iter().map(|o| o.zeros_like()).collect();
    for b in 0..2 {
        let share_outs: Vec<Tensor> = ins.iter().map(|o| o.narrow(0, b, 1)).collect();
        let parts = BatchLoss {
            teacher,
            u: &u.narrow(0, b, 1),
            mask: &mask.narrow(0, b, 1),
            outs: &share_outs,
            lm_head: lm,
            weights: w,
            chunk: 4,
            vocab: None,
            counts: Some(counts),
        }
        .compute()
        .unwrap();
        total += parts.total.double_value(&[]);
        let share_grads = Tensor::run_backward(&[&parts.total], ins, true, false);
        for (acc, g) in grads.iter_mut().zip(share_grads) {
            *acc = &*acc + g;
        }
    }
    (total, grads)
}

/// Data parallelism: the two rows of the batch as two shares, each with the whole batch's
/// counts, add up to the whole batch's loss for every loss (exp depth weights), and their
/// gradients with respect to the (shared) depth outputs to its gradients. Bounds as `ploss_tol`
/// (δ for the lm_head over fewer rows) and `grad_tol`, plus the regression term's n·H-term sums
/// regrouped.
#[test]
fn data_parallel_shares_add_up_to_the_batch_for_every_loss() {
    let teacher = tiny_teacher(Kind::Double);
    let (u, next, mask) = crate::loss::inputs(&teacher);
    let head = head_of(&teacher, HeadKind::Clover2, 3, 19);
    let outs = head.depth_outputs(&u, &next);
    let lm = |i: usize, o: &Tensor| head.loss_logits_at(i as i64, o);
    let w_lm = teacher.lm_head_weight();
    let (v, h) = (w_lm.size()[0], w_lm.size()[1]);
    let delta = logit_delta(&teacher, (&u, &mask), &outs, w_lm);
    let ins: Vec<&Tensor> = outs.iter().collect();
    for name in NAMES {
        let w = weights_of(&head, name, Some(3.0));
        let whole = whole_batch_loss(&teacher, (&u, &mask), &outs, &lm, &w, 4, None);
        let whole_total = whole.total.double_value(&[]);
        let counts: Vec<i64> = whole.depths.iter().map(|d| d.count).collect();
        let want_g = Tensor::run_backward(&[&whole.total], &ins, true, false);
        let (total, got_g) = loss_of_shares(&teacher, (&u, &mask), &ins, &lm, &w, &counts);
        let case = (name, eta_of(name));
        let want = batch_reference(&teacher, (&u, &mask), &outs, &lm, None, case);
        let tol: f64 = want
            .iter()
            .enumerate()
            .zip(&whole.depths)
            .map(|((i, r), d)| {
                // The regression term: n·H SmoothL1 terms summed in other groupings.
                let vloss = 4.0 * (r.n * h + 8) as f64 * F64_U * d.vloss * w.v_w;
                (ploss_tol(r, v, 4, delta) * w.p_w + vloss) * w.depth_weight(i)
            })
            .sum::<f64>()
            + 16.0 * F64_U * whole_total.abs();
        assert!(
            (total - whole_total).abs() <= tol,
            "{name:?}: shares {total} vs batch {whole_total} (tol {tol:e})"
        );
        for (i, ((a, b), r)) in want_g.iter().zip(&got_g).zip(&want).enumerate() {
            let tol = grad_tol(r, (v, delta), w_lm, &w, i, a.abs().max().double_value(&[]));
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(
                diff <= tol,
                "{name:?} depth {i}: gradients differ by {diff:e} (tol {tol:e})"
            );
        }
    }
}

/// A training config over `extra` TOML lines.
fn config(extra: &str) -> anyhow::Result<TrainConfig> {
    let text = format!(
        "model_dir = \"m\"\ndata_dir = \"d\"\nout_dir = \"o\"\ndevice = \"cpu\"\n{extra}\n"
    );
    TrainConfig::from_toml(&text, "t.toml")
}

/// The default: a config without the new keys trains with LossWeights::reference's loss to the
/// last bit (the loss, every depth's terms and the gradients, unchunked and chunked), serialises
/// without them, and its soft cross-entropy is the pre-`distill_loss` expression,
/// −(p·log_softmax(z)).sum(), bit for bit.
#[test]
fn the_default_config_gives_todays_loss_bit_for_bit() {
    let cfg = config("").unwrap();
    let json = serde_json::to_value(&cfg).unwrap();
    for key in ["distill_loss", "lk_eta", "depth_weighting", "depth_gamma"] {
        assert!(json.get(key).is_none(), "{key} serialised by default");
    }
    let explicit = config("distill_loss = \"soft_ce\"\ndepth_weighting = \"decay\"").unwrap();
    let teacher = tiny_teacher(Kind::Float);
    let (u, next, mask) = crate::loss::inputs(&teacher);
    let head = head_of(&teacher, HeadKind::Clover2, 3, 11);
    let outs = head.depth_outputs(&u, &next);
    let lm = |i: usize, o: &Tensor| head.loss_logits_at(i as i64, o);
    let ins: Vec<&Tensor> = outs.iter().collect();
    let bits = |w: &LossWeights, chunk: usize| -> Vec<u64> {
        let parts = whole_batch_loss(&teacher, (&u, &mask), &outs, &lm, w, chunk, None);
        let mut bits = vec![parts.total.double_value(&[]).to_bits()];
        for d in &parts.depths {
            bits.extend([d.vloss.to_bits(), d.ploss.to_bits(), d.loss.to_bits()]);
        }
        for g in Tensor::run_backward(&[&parts.total], &ins, true, false) {
            bits.extend(
                Vec::<f32>::try_from(g.reshape([-1]))
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits() as u64),
            );
        }
        bits
    };
    for chunk in [0usize, 4] {
        let reference = bits(&LossWeights::reference(head.config()), chunk);
        assert_eq!(
            bits(&cfg.loss_weights(head.config()), chunk),
            reference,
            "chunk {chunk}"
        );
        assert_eq!(
            bits(&explicit.loss_weights(head.config()), chunk),
            reference,
            "chunk {chunk}"
        );
    }
    let w = cfg.loss_weights(head.config());
    for i in 0..5 {
        // The pre-`depth_weighting` expression (black_box: a constant-folded powi may round
        // differently from the runtime one).
        let today = std::hint::black_box(w.decay).powi(i as i32) * w.heads_coefficient;
        assert_eq!(w.depth_weight(i).to_bits(), today.to_bits(), "depth {i}");
    }
    let mut d = Draws::new(59);
    let logits = from_rows(
        &(0..3).map(|_| d.row(13, 3.0)).collect::<Vec<_>>(),
        Kind::Float,
    );
    let p = from_rows(
        &(0..3).map(|_| softmax(&d.row(13, 3.0))).collect::<Vec<_>>(),
        Kind::Float,
    );
    let today = -(&p * logits.log_softmax(-1, Kind::Float)).sum(Kind::Float);
    let now = w.distill.sum_over_rows(&p, &logits);
    assert_eq!(
        now.double_value(&[]).to_bits(),
        today.double_value(&[]).to_bits()
    );
}

/// The keys select what they name (`lk_eta` reaching `lk`, exp depth weights exp(−i/γ)·coef),
/// and `--set` reaches them.
#[test]
fn loss_keys_select_what_they_name() {
    for (value, ty) in [
        ("soft_ce", "SoftCe"),
        ("forward_kl", "ForwardKl"),
        ("tv", "TotalVariation"),
        ("lk", "LkHybrid { eta: 3.0 }"),
        ("lk_alpha", "LkAlpha"),
    ] {
        let cfg = config(&format!("distill_loss = \"{value}\"")).unwrap();
        let w = cfg.loss_weights(&HeadConfig::from_teacher(&tiny_teacher(Kind::Float).config));
        assert_eq!(format!("{:?}", w.distill), ty, "{value}");
        assert_eq!(cfg.distill_loss.as_str(), value);
    }
    assert_eq!(DEFAULT_LK_ETA, 3.0);
    let head = HeadConfig::from_teacher(&tiny_teacher(Kind::Float).config);
    let cfg =
        config("distill_loss = \"lk\"\nlk_eta = 0.5\ndepth_weighting = \"exp\"\ndepth_gamma = 4.0")
            .unwrap();
    let w = cfg.loss_weights(&head);
    assert_eq!(format!("{:?}", w.distill), "LkHybrid { eta: 0.5 }");
    for i in 0..5 {
        let want = (-(i as f64) / 4.0).exp() * head.options.heads_coefficient;
        assert_eq!(w.depth_weight(i), want, "depth {i}");
    }
    let set = TrainConfig::from_toml_with_overrides(
        "model_dir = \"m\"\ndata_dir = \"d\"\nout_dir = \"o\"\ndevice = \"cpu\"\n",
        "t.toml",
        clover::training::config::Profile::Cpu,
        &[
            "distill_loss=tv".into(),
            "depth_weighting=exp".into(),
            "depth_gamma=7".into(),
        ],
    )
    .unwrap();
    assert_eq!(set.distill_loss, DistillLossName::Tv);
    assert_eq!(set.loss_weights(&head).depth_gamma, Some(7.0));
}

/// A loss key set where it cannot apply, out of range or misspelt is refused at load, the
/// error naming the key.
#[test]
fn loss_keys_are_refused_where_they_cannot_apply() {
    for (extra, key, says) in [
        ("distill_loss = \"tvd\"", "distill_loss", "unknown variant"),
        (
            "lk_eta = 2.0",
            "lk_eta",
            "applies only to distill_loss = \"lk\"",
        ),
        (
            "distill_loss = \"lk\"\nlk_eta = -1.0",
            "lk_eta",
            "not a finite number > 0",
        ),
        (
            "distill_loss = \"lk\"\nlk_eta = nan",
            "lk_eta",
            "not a finite number > 0",
        ),
        ("depth_weighting = \"exp\"", "depth_gamma", "missing"),
        (
            "depth_weighting = \"exp\"\ndepth_gamma = 0.0",
            "depth_gamma",
            "not a finite number > 0",
        ),
        (
            "depth_weighting = \"exp\"\ndepth_gamma = inf",
            "depth_gamma",
            "not a finite number > 0",
        ),
        (
            "depth_gamma = 4.0",
            "depth_gamma",
            "applies only to depth_weighting = \"exp\"",
        ),
        (
            "depth_weighting = \"linear\"",
            "depth_weighting",
            "unknown variant",
        ),
    ] {
        let err = format!("{:#}", config(extra).unwrap_err());
        assert!(
            err.contains(key) && err.contains(says),
            "{extra:?}: the error must name {key} and say {says:?}: {err}"
        );
    }
}

/// One tokenized sentence for SmolLM2, loss mask from token 2 on.
fn smollm2_sample(dir: &std::path::Path) -> clover::data::shards::Sample {
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let text = "Speculative decoding drafts several tokens ahead with a small model, and the \
                large model verifies all of them in one pass, keeping the ones it agrees with.";
    let input_ids: Vec<i64> = tokenizer
        .encode(text, false)
        .unwrap()
        .get_ids()
        .iter()
        .map(|&x| x as i64)
        .collect();
    let loss_mask = (0..input_ids.len()).map(|j| u8::from(j >= 2)).collect();
    clover::data::shards::Sample {
        id: "s0".into(),
        input_ids,
        loss_mask,
    }
}

/// 5 steps of SmolLM2's Clover-2 head (2 depths, regression off) with `name` on `sample` alone,
/// evaluated on it before the first step and after the last.
fn smollm2_run(
    teacher: &Teacher,
    dir: &std::path::Path,
    sample: &clover::data::shards::Sample,
    name: DistillLossName,
) -> clover::training::trainer::TrainOutcome {
    let out = scratch_dir("losses", &format!("smollm2-{}", name.as_str()));
    let extra = if name == DistillLossName::Lk {
        "lk_eta = 3.0\ndepth_weighting = \"exp\"\ndepth_gamma = 4.0\n"
    } else {
        ""
    };
    let text = format!(
        "model_dir = \"{}\"\ndata_dir = \"unused\"\nout_dir = \"{}\"\ndevice = \"cpu\"\n\
         num_depths = 2\nregression_weight = 0.0\nmax_steps = 5\nbatch_tokens = 128\n\
         eval_every = 5\nsave_every = 100\nseed = 3\nprogress = false\n\
         distill_loss = \"{}\"\n{extra}",
        dir.display(),
        out.display(),
        name.as_str()
    );
    let cfg = TrainConfig::from_toml(&text, "smollm2.toml").unwrap();
    train(
        &cfg,
        teacher,
        Source::Online(vec![sample.clone()]),
        vec![sample.clone()],
        Start::Fresh,
        &TrainOptions::default(),
        None,
    )
    .unwrap()
}

/// A real run per loss: SmolLM2's Clover-2 head (2 depths), 5 AdamW steps on one fixed batch
/// (one tokenized sentence), the regression term off so that the loss is the distillation term
/// alone (at depths 0 and 1, chunked as the trainer runs it; `lk` with exp(−i/4) depth
/// weights): finite at every step and lower after the steps than before. The held-out loss
/// before the first step is that step's loss (the same batch through the same kernels; the
/// trainer's total is an f32 sum of the depth terms, the evaluation's an f64 one: 4·u_f32 of
/// the loss apart at most), and the five losses give five different first values.
#[test]
fn each_loss_trains_the_smollm2_clover2_head() {
    let dir = smollm2_dir();
    let teacher = Teacher::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let sample = smollm2_sample(&dir);
    let (mut figures, mut firsts) = (vec![], vec![]);
    for name in NAMES {
        let run = smollm2_run(&teacher, &dir, &sample, name);
        let losses: Vec<f64> = run.steps.iter().map(|s| s.loss).collect();
        assert_eq!(losses.len(), 5, "{name:?}");
        assert!(losses.iter().all(|l| l.is_finite()), "{name:?}: {losses:?}");
        assert!(
            losses[4] < losses[0],
            "{name:?}: the loss must fall on a fixed batch: {losses:?}"
        );
        let eval0 = &run.evals[0];
        assert!(
            eval0.step == 0 && (eval0.loss - losses[0]).abs() <= 4.0 * F32_U * losses[0].abs(),
            "{name:?}: held-out loss {} at step {} vs the first step's {}",
            eval0.loss,
            eval0.step,
            losses[0]
        );
        let last = run.evals.last().unwrap().loss;
        figures.push(format!(
            "{}: {losses:?}, held-out after: {last}",
            name.as_str()
        ));
        firsts.push(losses[0]);
    }
    for (i, a) in firsts.iter().enumerate() {
        for b in &firsts[i + 1..] {
            assert!(
                a != b,
                "two losses gave the same first value {a}: {firsts:?}"
            );
        }
    }
    eprintln!(
        "SmolLM2 Clover-2, 5 steps on one batch of {} tokens:\n  {}",
        sample.input_ids.len(),
        figures.join("\n  ")
    );
}
