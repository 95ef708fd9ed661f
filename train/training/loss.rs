//! The Clover-2 per-depth distillation loss (docs/clover2.md §2.2, G4-G6).
//!
//! For depth i, the output row t is regressed onto h_{t+1+i} (SmoothL1, beta 1, mean over the
//! hidden dim) and distilled toward softmax(lm_head(h_{t+1+i})) (soft cross-entropy, or the
//! config's `distill_loss`: `distill_loss.rs`, docs/losses.md), gated by loss_mask[t+i]; both
//! sums are divided by (Σ mask_i + 1). loss_i = (10·v + 1·p)·0.7^i·coef (or exp(−i/γ)·coef).
//!
//! Cost: the lm_head pass over V (49152 for SmolLM2) dominates the CPU budget, once for the
//! teacher and once per depth. So (1) the teacher log-probs are computed ONCE per batch, only at
//! the masked positions, and (2) each depth gathers only its masked rows (index_select) before its
//! lm_head pass, instead of running lm_head over all B·T rows and masking afterwards. With 0/1
//! masks (the reference's label mask is off) this equals the reference's masked sums exactly.
//!
//! Memory: `teacher_targets` + `clover_loss` hold the teacher distribution [M,V] and, per depth,
//! logits and log-probs [n_i,V] that autograd keeps for the backward: about 100 GB for LLaMA-3's
//! V = 128,256 at 32k tokens. `clover_loss_chunked` (`BatchLoss` with a chunk > 0, the trainer's
//! `loss_chunk`) walks the M masked positions in chunks instead: per chunk it computes the teacher
//! distribution once for all depths, and per depth the student's distillation term and its
//! gradient with respect to the chunk's rows in a local graph that is freed at once; the gradients
//! go back through the head as a surrogate term. At most a few chunk × V tensors are alive.

use std::sync::Arc;

use anyhow::{ensure, Result};
use tch::{Device, Kind, Reduction, Tensor};

use crate::model::draft_vocab::DraftVocab;
use crate::model::head_config::HeadConfig;
use crate::model::teacher::Teacher;
use crate::training::distill_loss::{DistillLoss, SoftCe};

/// Loss arithmetic runs in f32 at least (as the reference's fp32 SmoothL1 under bf16 autocast),
/// and in f64 when the head runs in f64 (the gradient check).
pub fn at_least_f32(t: &Tensor) -> Tensor {
    match t.kind() {
        Kind::Half | Kind::BFloat16 => t.to_kind(Kind::Float),
        _ => t.shallow_clone(),
    }
}

/// Logits of depth i's output rows: `(i, o [n,H]) -> [n,V]` (the frozen lm_head for Clover-2
/// and EAGLE-1, Medusa's own projection of head i).
pub type DepthLogits<'a> = &'a dyn Fn(usize, &Tensor) -> Tensor;

/// How one batch's loss weighs its terms and depths, and which distillation term it uses.
#[derive(Debug, Clone)]
pub struct LossWeights {
    pub v_w: f64,
    pub p_w: f64,
    pub decay: f64,
    pub heads_coefficient: f64,
    /// `depth_weighting = "exp"`'s γ: depth i weighs exp(−i/γ)·heads_coefficient instead of
    /// decay^i·heads_coefficient (DFlash, DSpark; docs/losses.md §6). None: the reference's.
    pub depth_gamma: Option<f64>,
    /// The distillation term (`distill_loss`, docs/losses.md); soft cross-entropy by default.
    pub distill: Arc<dyn DistillLoss>,
}

impl LossWeights {
    /// The weights the head's options ask for: each head's reference recipe unless a weight is
    /// set (docs/heads.md §3), with the reference's soft cross-entropy and decay.
    pub fn reference(cfg: &HeadConfig) -> Self {
        let arch = crate::model::kinds::arch_of(cfg.options.head);
        LossWeights {
            v_w: arch.regression_weight(&cfg.options),
            p_w: arch.distillation_weight(&cfg.options),
            decay: cfg.options.decay,
            heads_coefficient: cfg.options.heads_coefficient,
            depth_gamma: None,
            distill: Arc::new(SoftCe),
        }
    }
    /// decay^i · heads_coefficient: 1, 0.7, 0.49, 0.343, 0.2401 for the reference; with a
    /// `depth_gamma` γ, exp(−i/γ) · heads_coefficient.
    pub fn depth_weight(&self, depth: usize) -> f64 {
        let shape = match self.depth_gamma {
            Some(gamma) => (-(depth as f64) / gamma).exp(),
            None => self.decay.powi(depth as i32),
        };
        shape * self.heads_coefficient
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

/// The masked positions of one batch (M of them) and their regression targets: everything of the
/// teacher side but its distribution (every depth's rows are a subset: depth i uses t' >= i).
pub struct TargetRows {
    /// Batch row of each masked position [M] i64.
    pub batch: Tensor,
    /// Position t' of each masked position [M] i64, ascending within a batch row.
    pub pos: Tensor,
    /// Post-norm h_{t'+1} [M,H], at least f32: the regression target.
    pub h: Tensor,
    /// Padded sequence length T of the batch.
    pub seq_len: i64,
}

/// The masked positions t' (loss_mask[t'] = 1) of the pre-norm states u [B,T,H] under the shifted
/// 0/1 loss mask [B,T] (`shift_for_training`), in row-major order, with h_{t'+1} =
/// final_norm(u_{t'+1}). Runs under no_grad.
pub fn target_rows(teacher: &Teacher, u: &Tensor, mask: &Tensor) -> TargetRows {
    tch::no_grad(|| {
        let (b, t) = (u.size()[0], u.size()[1]);
        let flat = mask.reshape([b * t]).nonzero().squeeze_dim(1);
        let (batch, pos) = (flat.divide_scalar_mode(t, "floor"), flat.remainder(t));
        let u_next = u.reshape([b * t, -1]).index_select(0, &(&flat + 1));
        let h = at_least_f32(&teacher.final_norm(&u_next));
        TargetRows {
            batch,
            pos,
            h,
            seq_len: t,
        }
    })
}

/// The teacher side of one batch, at the positions t' where loss_mask[t'] = 1 (every depth's
/// rows are a subset: depth i uses the positions t' >= i), with the whole distribution [M,V].
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
    let teacher_logits = |h: &Tensor| teacher_lm_head(teacher, h);
    targets_of_rows(target_rows(teacher, u, mask), &teacher_logits)
}

/// The rows' teacher distribution from `teacher_logits` (post-norm rows h -> logits).
fn targets_of_rows(rows: TargetRows, teacher_logits: &dyn Fn(&Tensor) -> Tensor) -> DistillTargets {
    let TargetRows {
        batch,
        pos,
        h,
        seq_len,
    } = rows;
    tch::no_grad(|| {
        let logp = teacher_log_probs(teacher_logits, &h);
        DistillTargets {
            batch,
            pos,
            top1: logp.argmax(-1, false),
            probs: logp.exp(),
            h,
            seq_len,
        }
    })
}

/// The teacher's logits of post-norm rows h (f32 or wider), in the teacher's kind.
fn teacher_lm_head(teacher: &Teacher, h: &Tensor) -> Tensor {
    teacher.lm_head(&h.to_kind(teacher.kind()))
}

/// The rows whose teacher argmax is in the draft vocabulary (EAGLE-3 leaves the others out of
/// the loss: the draft cannot propose that token, so nothing there is worth learning). The
/// argmax over the full vocabulary is taken `chunk` rows at a time (all at once for 0).
fn rows_in_vocab(
    teacher: &Teacher,
    rows: TargetRows,
    vocab: &DraftVocab,
    chunk: usize,
) -> TargetRows {
    let m = rows.h.size()[0];
    if m == 0 {
        return rows;
    }
    tch::no_grad(|| {
        let step = if chunk == 0 { m } else { chunk as i64 };
        let top1: Vec<Tensor> = (0..m)
            .step_by(step as usize)
            .map(|start| {
                let len = step.min(m - start);
                teacher_lm_head(teacher, &rows.h.narrow(0, start, len)).argmax(-1, false)
            })
            .collect();
        let keep = vocab
            .contains(&Tensor::cat(&top1, 0))
            .nonzero()
            .squeeze_dim(1);
        TargetRows {
            batch: rows.batch.index_select(0, &keep),
            pos: rows.pos.index_select(0, &keep),
            h: rows.h.index_select(0, &keep),
            seq_len: rows.seq_len,
        }
    })
}

/// log_softmax of the teacher's logits of rows h, in at least f32.
fn teacher_log_probs(teacher_logits: &dyn Fn(&Tensor) -> Tensor, h: &Tensor) -> Tensor {
    let logits = at_least_f32(&teacher_logits(h));
    logits.log_softmax(-1, logits.kind())
}

/// One depth's loss terms and its top-1 agreement with the teacher.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DepthLoss {
    /// The regression term.
    pub vloss: f64,
    /// The distillation term (`LossWeights::distill`).
    pub ploss: f64,
    /// (v_w·vloss + p_w·ploss)·w_i, w_i = `LossWeights::depth_weight(i)`
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
    /// The teacher's argmax token at each of the M masked positions [M] i64 (the unigram
    /// baseline of `evaluate`).
    pub teacher_top1: Tensor,
}

/// What the loss of one batch is computed from: the teacher side from the pre-norm states u
/// [B,T,H] and the shifted 0/1 mask [B,T], and the per-depth outputs `outs`
/// (`DraftHead::depth_outputs`) with their logits `lm_head`.
pub struct BatchLoss<'a> {
    pub teacher: &'a Teacher,
    pub u: &'a Tensor,
    pub mask: &'a Tensor,
    pub outs: &'a [Tensor],
    pub lm_head: DepthLogits<'a>,
    pub weights: &'a LossWeights,
    /// 0 materialises the teacher distribution and every depth's logits at once
    /// (`teacher_targets` + `clover_loss`); > 0 walks the masked positions `chunk` at a time
    /// (`clover_loss_chunked`). Same values and gradients up to round-off.
    pub chunk: usize,
    /// A head trained with `draft_vocab = N`: `lm_head` gives draft-space logits [n,N]
    /// (`DraftHead::loss_logits_at`); the teacher's distribution is restricted to the same N
    /// tokens and renormalised, and positions whose teacher argmax falls outside them are left
    /// out, normaliser included (EAGLE-3).
    pub vocab: Option<&'a DraftVocab>,
    /// When these rows are one data-parallel share of a batch: the whole batch's N_i
    /// (`training::batches::depth_counts`), so each depth's sums are divided by the batch's
    /// N_i + 1 and the shares' losses and gradients add up to the batch's. `DepthLoss::count`
    /// stays this share's rows. `None`: the rows here are the whole batch.
    pub counts: Option<&'a [i64]>,
}

impl BatchLoss<'_> {
    /// The batch's per-depth loss.
    pub fn compute(&self) -> Result<LossParts> {
        let (teacher, vocab, chunk) = (self.teacher, self.vocab, self.chunk);
        if let Some(counts) = self.counts {
            ensure!(
                counts.len() == self.outs.len(),
                "{} normaliser counts for {} depths",
                counts.len(),
                self.outs.len()
            );
            // The counts come from the loss masks; a draft vocabulary drops rows by the
            // teacher's argmax, which only the rank holding them knows.
            ensure!(
                vocab.is_none(),
                "a draft vocabulary cannot train on shares of a batch across data-parallel ranks"
            );
        }
        let mut rows = target_rows(teacher, self.u, self.mask);
        if let Some(vocab) = vocab {
            rows = rows_in_vocab(teacher, rows, vocab, chunk);
        }
        let teacher_logits = |h: &Tensor| {
            let logits = teacher_lm_head(teacher, h);
            match vocab {
                Some(vocab) => vocab.restrict(&logits),
                None => logits,
            }
        };
        if chunk == 0 {
            let targets = targets_of_rows(rows, &teacher_logits);
            return Ok(clover_loss_over(
                self.outs,
                &targets,
                self.lm_head,
                self.weights,
                self.counts,
            ));
        }
        chunked_loss_over(
            self.outs,
            &rows,
            &teacher_logits,
            self.lm_head,
            self.weights,
            chunk,
            self.counts,
        )
    }
}

/// The per-depth loss of `outs` (o_i with T-i rows, from `DraftHead::depth_outputs`). `lm_head`
/// maps [n,H] to logits [n,V] (the frozen teacher head).
pub fn clover_loss(
    outs: &[Tensor],
    targets: &DistillTargets,
    lm_head: DepthLogits,
    weights: &LossWeights,
) -> LossParts {
    clover_loss_over(outs, targets, lm_head, weights, None)
}

/// `clover_loss` with the normaliser counts of `batch_loss_of_share`.
fn clover_loss_over(
    outs: &[Tensor],
    targets: &DistillTargets,
    lm_head: DepthLogits,
    weights: &LossWeights,
    counts: Option<&[i64]>,
) -> LossParts {
    let mut terms = Vec::with_capacity(outs.len());
    let mut depths = Vec::with_capacity(outs.len());
    for (i, o) in outs.iter().enumerate() {
        let (term, parts) = depth_loss(i, o, targets, lm_head, weights, counts.map(|c| c[i]));
        terms.push(term);
        depths.push(parts);
    }
    LossParts {
        total: sum_terms(terms, &targets.h),
        depths,
        teacher_top1: targets.top1.shallow_clone(),
    }
}

fn sum_terms(terms: Vec<Tensor>, like: &Tensor) -> Tensor {
    terms
        .into_iter()
        .reduce(|acc, term| acc + term)
        .unwrap_or_else(|| Tensor::zeros([], (Kind::Float, like.device())))
}

/// Depth i's rows of o_i paired with the masked positions t' >= i, in at least f32 (G5: row t
/// pairs with target position t+i, so these are the rows t = t'-i with mask_i = 1), and their
/// regression targets. `sel` indexes the M masked positions; it is ascending.
struct DepthRows {
    sel: Tensor,
    o: Tensor,
    h: Tensor,
    n: i64,
    /// N_i of the normaliser N_i + 1: `n`, or the whole batch's when this is a share of it.
    batch_n: i64,
}

fn depth_rows(
    (i, o): (usize, &Tensor),
    batch: &Tensor,
    pos: &Tensor,
    h: &Tensor,
    t: i64,
    batch_n: Option<i64>,
) -> DepthRows {
    let d = i as i64;
    let sel = pos.ge(d).nonzero().squeeze_dim(1);
    let n = sel.size()[0];
    let rows = batch.index_select(0, &sel) * (t - d) + pos.index_select(0, &sel) - d;
    let hdim = o.size()[2];
    let o_sel = at_least_f32(&o.reshape([-1, hdim]).index_select(0, &rows));
    let h = h.index_select(0, &sel).to_kind(o_sel.kind());
    DepthRows {
        sel,
        o: o_sel,
        h,
        n,
        batch_n: batch_n.unwrap_or(n),
    }
}

impl DepthRows {
    fn denom(&self) -> f64 {
        self.batch_n as f64 + 1.0
    }

    /// The regression term Σ mean_H SmoothL1(o, h) / (n + 1), on plain autograd ([n,H] only).
    fn vloss(&self) -> Tensor {
        let k = self.o.kind();
        self.o
            .smooth_l1_loss(&self.h, Reduction::None, 1.0)
            .mean_dim(-1, false, k)
            .sum(k)
            / self.denom()
    }

    /// The weighted depth term and its values; `hits` teacher-forced top-1 agreements.
    fn finish(
        &self,
        i: usize,
        vloss: &Tensor,
        ploss: &Tensor,
        hits: i64,
        weights: &LossWeights,
    ) -> (Tensor, DepthLoss) {
        let term = (vloss * weights.v_w + ploss * weights.p_w) * weights.depth_weight(i);
        let top1 = if self.n > 0 {
            hits as f64 / self.n as f64
        } else {
            0.0
        };
        let parts = DepthLoss {
            vloss: vloss.double_value(&[]),
            ploss: ploss.double_value(&[]),
            loss: term.double_value(&[]),
            top1,
            count: self.n,
        };
        (term, parts)
    }
}

fn depth_loss(
    i: usize,
    o: &Tensor,
    targets: &DistillTargets,
    lm_head: DepthLogits,
    weights: &LossWeights,
    batch_n: Option<i64>,
) -> (Tensor, DepthLoss) {
    let r = depth_rows(
        (i, o),
        &targets.batch,
        &targets.pos,
        &targets.h,
        targets.seq_len,
        batch_n,
    );
    let k = r.o.kind();
    let logits = at_least_f32(&lm_head(i, &r.o)).to_kind(k);
    let probs = targets.probs.index_select(0, &r.sel).to_kind(k);
    let ploss = weights.distill.sum_over_rows(&probs, &logits) / r.denom();
    let hits = logits
        .argmax(-1, false)
        .eq_tensor(&targets.top1.index_select(0, &r.sel))
        .sum(Kind::Int64)
        .int64_value(&[]);
    r.finish(i, &r.vloss(), &ploss, hits, weights)
}

/// `clover_loss` over chunks of `chunk` masked positions: no more than about chunk × V logits are
/// alive at once, forward or backward. Per chunk, the teacher's distribution of its positions
/// (`teacher_logits` maps post-norm rows h to logits) is computed once and shared by every depth;
/// depth i's rows in the chunk (its positions t' >= i: a contiguous run of its rows, since both
/// are in row-major order) get their distillation term and its gradient g with respect to those
/// rows in a local graph on a detached copy, freed before the next chunk. The collected g goes
/// back through the head as the surrogate (o·g).sum()/(n+1), adjusted so that `total` still has
/// the loss's value. The regression term stays on plain autograd. Under no_grad (or when `outs`
/// need no gradient) no local graph is built.
pub fn clover_loss_chunked(
    outs: &[Tensor],
    rows: &TargetRows,
    teacher_logits: &dyn Fn(&Tensor) -> Tensor,
    lm_head: DepthLogits,
    weights: &LossWeights,
    chunk: usize,
) -> Result<LossParts> {
    chunked_loss_over(outs, rows, teacher_logits, lm_head, weights, chunk, None)
}

/// `clover_loss_chunked` with the normaliser counts of `batch_loss_of_share`.
fn chunked_loss_over(
    outs: &[Tensor],
    rows: &TargetRows,
    teacher_logits: &dyn Fn(&Tensor) -> Tensor,
    lm_head: DepthLogits,
    weights: &LossWeights,
    chunk: usize,
    counts: Option<&[i64]>,
) -> Result<LossParts> {
    ensure!(chunk > 0, "clover_loss_chunked: chunk must be >= 1");
    let chunk = i64::try_from(chunk)?;
    let pos: Vec<i64> = Vec::try_from(&rows.pos.to_device(Device::Cpu))?;
    let m = pos.len() as i64;
    let depths: Vec<DepthRows> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let batch_n = counts.map(|c| c[i]);
            depth_rows(
                (i, o),
                &rows.batch,
                &rows.pos,
                &rows.h,
                rows.seq_len,
                batch_n,
            )
        })
        .collect();
    let device = rows.h.device();
    let mut sums: Vec<ChunkedDepth> = depths
        .iter()
        .map(|r| ChunkedDepth::new(r.o.kind(), device))
        .collect();
    let mut teacher_top1 = Vec::new();
    for start in (0..m).step_by(chunk as usize) {
        let len = chunk.min(m - start);
        let (probs, top1) = tch::no_grad(|| {
            let logp = teacher_log_probs(teacher_logits, &rows.h.narrow(0, start, len));
            (logp.exp(), logp.argmax(-1, false))
        });
        let here = &pos[start as usize..(start + len) as usize];
        for (i, (r, acc)) in depths.iter().zip(sums.iter_mut()).enumerate() {
            let depth_head = |o: &Tensor| lm_head(i, o);
            let teacher = ChunkTeacher {
                probs: &probs,
                top1: &top1,
                pos: here,
            };
            acc.add_chunk(i, r, &teacher, &depth_head, weights.distill.as_ref());
        }
        teacher_top1.push(top1);
    }
    let (terms, parts): (Vec<Tensor>, Vec<DepthLoss>) = depths
        .iter()
        .zip(&sums)
        .enumerate()
        .map(|(i, (r, acc))| acc.finish(i, r, weights))
        .unzip();
    let teacher_top1 = if teacher_top1.is_empty() {
        Tensor::zeros([0], (Kind::Int64, device))
    } else {
        Tensor::cat(&teacher_top1, 0)
    };
    Ok(LossParts {
        total: sum_terms(terms, &rows.h),
        depths: parts,
        teacher_top1,
    })
}

/// The teacher side of one chunk: its positions' distribution [len,V], argmax [len] and
/// positions t'.
struct ChunkTeacher<'a> {
    probs: &'a Tensor,
    top1: &'a Tensor,
    pos: &'a [i64],
}

/// One depth's running sums over the chunks: its distillation term, top-1 hits, the term's
/// gradient with respect to each chunk's rows, and how many of its rows are done.
struct ChunkedDepth {
    term: Tensor,
    hits: Tensor,
    grads: Vec<Tensor>,
    done: i64,
}

impl ChunkedDepth {
    fn new(kind: Kind, device: Device) -> Self {
        ChunkedDepth {
            term: Tensor::zeros([], (kind, device)),
            hits: Tensor::zeros([], (Kind::Int64, device)),
            grads: Vec::new(),
            done: 0,
        }
    }

    /// Adds depth i's rows of one chunk (its positions t' >= i).
    fn add_chunk(
        &mut self,
        i: usize,
        r: &DepthRows,
        teacher: &ChunkTeacher,
        lm_head: &dyn Fn(&Tensor) -> Tensor,
        loss: &dyn DistillLoss,
    ) {
        let len = teacher.pos.len() as i64;
        let local: Vec<i64> = (0..len)
            .filter(|&j| teacher.pos[j as usize] >= i as i64)
            .collect();
        let cnt = local.len() as i64;
        if cnt == 0 {
            return;
        }
        let (p, t1) = if cnt == len {
            (teacher.probs.shallow_clone(), teacher.top1.shallow_clone())
        } else {
            let idx = Tensor::from_slice(&local).to_device(teacher.probs.device());
            (
                teacher.probs.index_select(0, &idx),
                teacher.top1.index_select(0, &idx),
            )
        };
        let oc = r.o.narrow(0, self.done, cnt).detach();
        self.done += cnt;
        let (c, h, g) = distill_rows(&oc, &p, &t1, lm_head, loss, r.o.requires_grad());
        self.term = &self.term + c;
        self.hits = &self.hits + h;
        self.grads.extend(g);
    }

    /// The depth's weighted term, with the collected gradients sent back through its rows.
    fn finish(&self, i: usize, r: &DepthRows, weights: &LossWeights) -> (Tensor, DepthLoss) {
        let ploss_value = &self.term / r.denom();
        let ploss = if self.grads.is_empty() {
            ploss_value
        } else {
            let g = Tensor::cat(&self.grads, 0);
            let surrogate = (&r.o * g).sum(r.o.kind()) / r.denom();
            // Value: exactly ploss_value (x - x = 0); gradient: g / (n + 1).
            &surrogate - surrogate.detach() + ploss_value
        };
        r.finish(i, &r.vloss(), &ploss, self.hits.int64_value(&[]), weights)
    }
}

/// The distillation term `loss` summed over the rows o [c,H] (detached) against the teacher's
/// distribution p, their top-1 agreements with `teacher_top1`, and, when `want_grad`, the sum's
/// gradient with respect to o. Every [c,V] tensor lives only inside this call.
fn distill_rows(
    o: &Tensor,
    p: &Tensor,
    teacher_top1: &Tensor,
    lm_head: &dyn Fn(&Tensor) -> Tensor,
    loss: &dyn DistillLoss,
    want_grad: bool,
) -> (Tensor, Tensor, Option<Tensor>) {
    let run = || {
        let o = o.set_requires_grad(want_grad);
        let k = o.kind();
        let logits = at_least_f32(&lm_head(&o)).to_kind(k);
        let term = loss.sum_over_rows(p, &logits);
        let hits = logits
            .argmax(-1, false)
            .eq_tensor(teacher_top1)
            .sum(Kind::Int64);
        let grad = want_grad.then(|| {
            let mut g = Tensor::run_backward(&[&term], &[&o], false, false);
            g.remove(0)
        });
        (term.detach(), hits, grad)
    };
    if want_grad {
        tch::with_grad(run)
    } else {
        tch::no_grad(run)
    }
}
