//! The distillation term of the training loss, one type per loss behind [`DistillLoss`]
//! (docs/losses.md): Clover-2's soft cross-entropy (the default), forward KL, total variation
//! and the two LK losses, which train for speculative acceptance directly.
//!
//! Every loss here is a sum over rows of a per-row term, so a sum over chunks of rows
//! (`loss::clover_loss_chunked`) or over data-parallel shares of a batch is the same loss.
//! The per-row terms use p (the teacher's distribution at a row: restricted to the draft
//! vocabulary and renormalised when there is one) and q = softmax(draft logits), and
//! α = Σ_v min(p_v, q_v), the probability that speculative sampling accepts one token drawn from
//! q when the target samples from p.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// One distillation loss.
pub trait DistillLoss: Send + Sync + fmt::Debug {
    /// Σ over the n rows of the per-row term between the teacher's probabilities `p` [n,V]
    /// and the draft's `logits` [n,V] (kind f32 or f64: the loss arithmetic's kind),
    /// differentiable with respect to `logits`; `p` is a constant.
    fn sum_over_rows(&self, p: &Tensor, logits: &Tensor) -> Tensor;
}

/// The `distill_loss` key of a training config: which [`DistillLoss`] a run trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistillLossName {
    /// −Σ p·log q (Clover-2's reference).
    #[default]
    SoftCe,
    /// Σ p·(log p − log q) = KL(p‖q).
    ForwardKl,
    /// ½Σ|p − q| = 1 − α.
    Tv,
    /// λ·KL(p‖q) + (1 − λ)·TV(p, q), λ = exp(−η·α) held constant (LK's hybrid).
    Lk,
    /// −log α (LK's negative log-acceptance).
    LkAlpha,
}

/// LK's hybrid η when `lk_eta` is not set: the value vLLM's speculators ship as the paper's best
/// hybrid setting (docs/losses.md §4).
pub const DEFAULT_LK_ETA: f64 = 3.0;

impl DistillLossName {
    /// The loss this name selects; `lk_eta` is η of `lk` (unused by the others).
    pub fn build(self, lk_eta: f64) -> Arc<dyn DistillLoss> {
        match self {
            DistillLossName::SoftCe => Arc::new(SoftCe),
            DistillLossName::ForwardKl => Arc::new(ForwardKl),
            DistillLossName::Tv => Arc::new(TotalVariation),
            DistillLossName::Lk => Arc::new(LkHybrid { eta: lk_eta }),
            DistillLossName::LkAlpha => Arc::new(LkAlpha),
        }
    }

    /// The spelling of a config file.
    pub fn as_str(self) -> &'static str {
        match self {
            DistillLossName::SoftCe => "soft_ce",
            DistillLossName::ForwardKl => "forward_kl",
            DistillLossName::Tv => "tv",
            DistillLossName::Lk => "lk",
            DistillLossName::LkAlpha => "lk_alpha",
        }
    }

    /// Whether this is the default (a config that leaves the key out serialises without it).
    pub fn is_default(&self) -> bool {
        *self == DistillLossName::default()
    }
}

/// The draft's log-probabilities and probabilities. q is exp(log q) rather than a second
/// softmax, as the teacher's p is exp of its log_softmax: identical logits give bitwise
/// identical q and p, so TV is exactly 0 there.
fn draft_dist(logits: &Tensor) -> (Tensor, Tensor) {
    let logq = logits.log_softmax(-1, logits.kind());
    let q = logq.exp();
    (logq, q)
}

/// Per-row Σ_v of `x` [n,V] -> [n].
fn row_sums(x: &Tensor) -> Tensor {
    x.sum_dim_intlist(-1, false, x.kind())
}

/// Per-row KL(p‖q) = Σ p·log p − Σ p·log q; xlogy gives 0·log 0 = 0 where the teacher's
/// probability underflowed.
fn kl_rows(p: &Tensor, logq: &Tensor) -> Tensor {
    row_sums(&(p.xlogy(p) - p * logq))
}

/// Per-row TV(p, q) = ½Σ|p − q|: exactly 0 at q == p, and without the cancellation of 1 − α
/// when the two are close.
fn tv_rows(p: &Tensor, q: &Tensor) -> Tensor {
    row_sums(&(p - q).abs()) * 0.5
}

/// Per-row acceptance α = Σ min(p, q), summed directly so that a small α keeps its digits.
fn acceptance_rows(p: &Tensor, q: &Tensor) -> Tensor {
    row_sums(&p.minimum(q))
}

/// Soft cross-entropy against the teacher's distribution (Clover-2, docs/clover2.md §2.2).
#[derive(Debug, Clone, Copy)]
pub struct SoftCe;

impl DistillLoss for SoftCe {
    fn sum_over_rows(&self, p: &Tensor, logits: &Tensor) -> Tensor {
        // The reference's arithmetic op for op, so the default loss stays bitwise what it was.
        let k = logits.kind();
        let logq = logits.log_softmax(-1, k);
        -(p.to_kind(k) * &logq).sum(k)
    }
}

/// Forward KL(p‖q): soft cross-entropy minus the teacher's entropy, the same gradient.
#[derive(Debug, Clone, Copy)]
pub struct ForwardKl;

impl DistillLoss for ForwardKl {
    fn sum_over_rows(&self, p: &Tensor, logits: &Tensor) -> Tensor {
        let k = logits.kind();
        let logq = logits.log_softmax(-1, k);
        kl_rows(&p.to_kind(k), &logq).sum(k)
    }
}

/// Total variation ½Σ|p − q| = 1 − α: the rejection probability of one drafted token.
#[derive(Debug, Clone, Copy)]
pub struct TotalVariation;

impl DistillLoss for TotalVariation {
    fn sum_over_rows(&self, p: &Tensor, logits: &Tensor) -> Tensor {
        let k = logits.kind();
        let (_, q) = draft_dist(logits);
        tv_rows(&p.to_kind(k), &q).sum(k)
    }
}

/// LK's hybrid: per row λ·KL + (1 − λ)·TV with λ = exp(−η·α), α held constant (no gradient
/// through the weight). A poor draft (α near 0) learns from KL's strong gradient, a good one
/// (α near 1) from TV, which is the acceptance itself.
#[derive(Debug, Clone, Copy)]
pub struct LkHybrid {
    pub eta: f64,
}

impl DistillLoss for LkHybrid {
    fn sum_over_rows(&self, p: &Tensor, logits: &Tensor) -> Tensor {
        let k = logits.kind();
        let p = p.to_kind(k);
        let (logq, q) = draft_dist(logits);
        let lambda = (acceptance_rows(&p, &q).detach() * -self.eta).exp();
        let tv = tv_rows(&p, &q);
        let kl = kl_rows(&p, &logq);
        let rows: Tensor = &lambda * kl + (1.0 - &lambda) * tv;
        rows.sum(k)
    }
}

/// LK's negative log-acceptance −log α: TV's optimum with its gradient scaled by 1/α, so a
/// draft far from the teacher still gets a usable gradient.
#[derive(Debug, Clone, Copy)]
pub struct LkAlpha;

/// The smallest α the log sees: f32's smallest normal number, so a row whose overlap
/// underflowed costs a finite −log(1.2e-38) ≈ 87.3 instead of infinity (and no gradient).
const MIN_ACCEPTANCE: f64 = f32::MIN_POSITIVE as f64;

impl DistillLoss for LkAlpha {
    fn sum_over_rows(&self, p: &Tensor, logits: &Tensor) -> Tensor {
        let k = logits.kind();
        let (_, q) = draft_dist(logits);
        let alpha = acceptance_rows(&p.to_kind(k), &q).clamp_min(MIN_ACCEPTANCE);
        -alpha.log().sum(k)
    }
}
