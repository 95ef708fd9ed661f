//! The Clover-2 per-depth distillation loss (docs/clover2.md §2.2, G4-G6).
//!
//! For depth i, the output row t is regressed onto h_{t+1+i} (SmoothL1, beta 1, mean over the
//! hidden dim) and distilled toward softmax(lm_head(h_{t+1+i})) (soft cross-entropy), gated by
//! loss_mask[t+i]; both sums are divided by (Σ mask_i + 1). loss_i = (10·v + 1·p)·0.7^i·coef.
//!
//! Cost: the lm_head pass over V (49152 for SmolLM2) dominates the CPU budget, once for the
//! teacher and once per depth. So (1) the teacher log-probs are computed ONCE per batch, only at
//! the masked positions, and (2) each depth gathers only its masked rows (index_select) before its
//! lm_head pass, instead of running lm_head over all B·T rows and masking afterwards. With 0/1
//! masks (the reference's label mask is off) this equals the reference's masked sums exactly.

use tch::{Kind, Reduction, Tensor};

use crate::model::head_config::HeadConfig;
use crate::model::teacher::Teacher;

/// Loss arithmetic runs in f32 at least (as the reference's fp32 SmoothL1 under bf16 autocast),
/// and in f64 when the head runs in f64 (the gradient check).
pub fn at_least_f32(t: &Tensor) -> Tensor {
    match t.kind() {
        Kind::Half | Kind::BFloat16 => t.to_kind(Kind::Float),
        _ => t.shallow_clone(),
    }
}

/// Regression weight v_w of the reference.
pub const VLOSS_WEIGHT: f64 = 10.0;
/// Distillation weight p_w of the reference.
pub const PLOSS_WEIGHT: f64 = 1.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    pub v_w: f64,
    pub p_w: f64,
    pub decay: f64,
    pub heads_coefficient: f64,
}

impl LossWeights {
    pub fn reference(cfg: &HeadConfig) -> Self {
        LossWeights {
            v_w: VLOSS_WEIGHT,
            p_w: PLOSS_WEIGHT,
            decay: cfg.decay,
            heads_coefficient: cfg.heads_coefficient,
        }
    }
    /// decay^i · heads_coefficient: 1, 0.7, 0.49, 0.343, 0.2401 for the reference.
    pub fn depth_weight(&self, depth: usize) -> f64 {
        self.decay.powi(depth as i32) * self.heads_coefficient
    }
}

/// G4 per sample: position t pairs u_t with x_{t+1}; the last position gets id 0 and mask 0 (its
/// target h_{t+1} does not exist). Returns (next_ids, loss mask as 0/1).
pub fn shift_for_training(input_ids: &[i64], loss_mask: &[u8]) -> (Vec<i64>, Vec<f32>) {
    let n = input_ids.len();
    let mut next: Vec<i64> = input_ids.iter().skip(1).copied().collect();
    next.push(0);
    let mut mask: Vec<f32> = loss_mask
        .iter()
        .take(n)
        .map(|&m| if m != 0 { 1.0 } else { 0.0 })
        .collect();
    mask.resize(n, 0.0);
    if let Some(last) = mask.last_mut() {
        *last = 0.0;
    }
    (next, mask)
}

/// The teacher side of one batch, at the positions t' where loss_mask[t'] = 1 (every depth's
/// rows are a subset: depth i uses the positions t' >= i).
pub struct DistillTargets {
    /// Batch row of each masked position [M] i64.
    pub batch: Tensor,
    /// Position t' of each masked position [M] i64.
    pub pos: Tensor,
    /// Post-norm h_{t'+1} [M,H] f32: the regression target.
    pub h: Tensor,
    /// Teacher probabilities softmax(lm_head(h_{t'+1})) [M,V] f32.
    pub probs: Tensor,
    /// Teacher argmax token [M] i64.
    pub top1: Tensor,
    /// Padded sequence length T of the batch.
    pub seq_len: i64,
}

/// Builds the teacher targets from the pre-norm states u [B,T,H] and the shifted 0/1 loss mask
/// [B,T] (`shift_for_training`): h_{t'+1} = final_norm(u_{t'+1}) and its lm_head distribution, only
/// at masked positions. Runs under no_grad.
pub fn teacher_targets(teacher: &Teacher, u: &Tensor, mask: &Tensor) -> DistillTargets {
    tch::no_grad(|| {
        let (b, t) = (u.size()[0], u.size()[1]);
        let flat = mask.reshape([b * t]).nonzero().squeeze_dim(1);
        let (batch, pos) = (flat.divide_scalar_mode(t, "floor"), flat.remainder(t));
        let u_next = u.reshape([b * t, -1]).index_select(0, &(&flat + 1));
        let h = teacher.final_norm(&u_next);
        let h = at_least_f32(&h);
        let logits = at_least_f32(&teacher.lm_head(&h.to_kind(teacher.kind())));
        let logp = logits.log_softmax(-1, logits.kind());
        DistillTargets {
            batch,
            pos,
            top1: logp.argmax(-1, false),
            probs: logp.exp(),
            h,
            seq_len: t,
        }
    })
}

/// One depth's loss terms and its top-1 agreement with the teacher.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DepthLoss {
    pub vloss: f64,
    pub ploss: f64,
    /// (v_w·vloss + p_w·ploss)·decay^i·coef
    pub loss: f64,
    /// Fraction of rows where argmax lm_head(o_i) == the teacher's argmax (teacher-forced).
    pub top1: f64,
    /// Rows used (Σ mask_i).
    pub count: i64,
}

pub struct LossParts {
    /// Σ_i loss_i, differentiable.
    pub total: Tensor,
    pub depths: Vec<DepthLoss>,
}

/// The per-depth loss of `outs` (o_i with T-i rows, from `DraftHead::depth_outputs`). `lm_head`
/// maps [n,H] to logits [n,V] (the frozen teacher head).
pub fn clover_loss(
    outs: &[Tensor],
    targets: &DistillTargets,
    lm_head: &dyn Fn(&Tensor) -> Tensor,
    weights: &LossWeights,
) -> LossParts {
    let mut total: Option<Tensor> = None;
    let mut depths = Vec::with_capacity(outs.len());
    for (i, o) in outs.iter().enumerate() {
        let (term, parts) = depth_loss(i, o, targets, lm_head, weights);
        total = Some(match total {
            None => term,
            Some(acc) => acc + term,
        });
        depths.push(parts);
    }
    let total = total.unwrap_or_else(|| Tensor::zeros([], (Kind::Float, targets.h.device())));
    LossParts { total, depths }
}

fn depth_loss(
    i: usize,
    o: &Tensor,
    targets: &DistillTargets,
    lm_head: &dyn Fn(&Tensor) -> Tensor,
    weights: &LossWeights,
) -> (Tensor, DepthLoss) {
    let d = i as i64;
    let rows_i = targets.seq_len - d;
    // G5: depth i row t (t < T-i) pairs with target position t+i. The masked positions t' >= i
    // are exactly the rows t = t'-i with mask_i = loss_mask[:, i:] = 1.
    let sel = targets.pos.ge(d).nonzero().squeeze_dim(1);
    let n = sel.size()[0];
    let rows = targets.batch.index_select(0, &sel) * rows_i + targets.pos.index_select(0, &sel) - d;
    let hdim = o.size()[2];
    let o_sel = at_least_f32(&o.reshape([-1, hdim]).index_select(0, &rows));
    let k = o_sel.kind();
    let h = targets.h.index_select(0, &sel).to_kind(k);
    let denom = n as f64 + 1.0;
    let vloss = o_sel
        .smooth_l1_loss(&h, Reduction::None, 1.0)
        .mean_dim(-1, false, k)
        .sum(k)
        / denom;
    let logits = at_least_f32(&lm_head(&o_sel)).to_kind(k);
    let logq = logits.log_softmax(-1, k);
    let probs = targets.probs.index_select(0, &sel).to_kind(k);
    let ploss = -(probs * &logq).sum(k) / denom;
    let scale = weights.depth_weight(i);
    let term = (&vloss * weights.v_w + &ploss * weights.p_w) * scale;
    let top1 = if n > 0 {
        let hit = logits
            .argmax(-1, false)
            .eq_tensor(&targets.top1.index_select(0, &sel));
        hit.to_kind(Kind::Float).mean(Kind::Float).double_value(&[])
    } else {
        0.0
    };
    let parts = DepthLoss {
        vloss: vloss.double_value(&[]),
        ploss: ploss.double_value(&[]),
        loss: term.double_value(&[]),
        top1,
        count: n,
    };
    (term, parts)
}
