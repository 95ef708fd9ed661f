//! Held-out evaluation during training: the loss, teacher-forced and chained per-depth top-1,
//! and the tau estimate (`training::tau_estimate`).

use std::collections::BTreeMap;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::data::shards::Sample;
use crate::model::head::DraftHead;
use crate::model::teacher::Teacher;
use crate::training::batches::{epoch_batches, make_batch_reading, Batch};
use crate::training::config::TrainConfig;
use crate::training::loss::BatchLoss;
use crate::training::metrics::EvalRecord;
use crate::training::tau_estimate::{chain_depth, TauEstimator, SAMPLED_TEMPERATURE};
use crate::training::teacher_path::{path_drafts, path_starts, teacher_greedy};

/// Held-out loss (the training loss, token-weighted over batches, chunked by `loss_chunk` as in
/// training) and the chained draft's
/// per-depth top-1 (as the reference's `getkacc_model`: depth k is fed the draft's own argmax;
/// accuracy at k = share of starts whose depths 0..=k all match the teacher's greedy tokens).
/// Starts are positions t whose root token x_{t+1} is the teacher's own greedy choice (getkacc
/// skips the others: at greedy inference the root always is) and whose next K targets are masked.
/// The tau estimate takes its own starts: those whose next tokens all lie on the teacher's path
/// (`training::teacher_path`), its chain `tau_chain_depth` drafts long.
pub fn evaluate(
    head: &DraftHead,
    teacher: &Teacher,
    eval: &[Sample],
    cfg: &TrainConfig,
    step: u64,
) -> Result<EvalRecord> {
    tch::no_grad(|| {
        let k_depths = head.config().options.num_depths as usize;
        let trained = head.trained_depths() as usize;
        let weights = cfg.loss_weights(head.config());
        let lm_head = |i: usize, o: &Tensor| head.loss_logits_at(i as i64, o);
        let lengths: Vec<usize> = eval
            .iter()
            .map(|s| s.input_ids.len().min(cfg.max_len))
            .collect();
        let mut order: Vec<usize> = (0..eval.len()).collect();
        order.sort_by_key(|&i| lengths[i]);
        let (mut loss_sum, mut loss_weight) = (0.0, 0.0);
        let mut forced = vec![(0.0, 0i64); trained];
        let mut chained = vec![0i64; k_depths];
        let mut starts = 0usize;
        let mut unigram: BTreeMap<i64, i64> = BTreeMap::new();
        let mut tau = TauEstimator::new(chain_depth(cfg.tau_chain_depth, &head.config().options))?;
        let batches = epoch_batches(&lengths, cfg.tokens_per_pass(), eval.len().max(1), 0, 0);
        for idx in batches {
            let samples: Vec<&Sample> = idx.iter().map(|&i| &eval[i]).collect();
            let batch =
                make_batch_reading(teacher, &samples, None, cfg.max_len, head.teacher_layers())?;
            let outs = head.depth_outputs(&batch.features, &batch.next_ids);
            let parts = BatchLoss {
                teacher,
                u: &batch.u,
                mask: &batch.mask,
                outs: &outs,
                lm_head: &lm_head,
                weights: &weights,
                chunk: head.loss_chunk(cfg.loss_chunk),
                vocab: head.draft_vocab(),
                counts: None,
            }
            .compute()?;
            let n = parts.depths.first().map_or(0, |d| d.count) as f64;
            loss_sum += parts.depths.iter().map(|d| d.loss).sum::<f64>() * n;
            loss_weight += n;
            for (i, d) in parts.depths.iter().enumerate() {
                forced[i].0 += d.top1 * d.count as f64;
                forced[i].1 += d.count;
            }
            for t in Vec::<i64>::try_from(&parts.teacher_top1.to_device(Device::Cpu))? {
                *unigram.entry(t).or_default() += 1;
            }
            let greedy = teacher_greedy(teacher, &batch.u);
            let (hits, n_starts) = chained_hits(head, &batch, &greedy, k_depths)?;
            for (c, h) in chained.iter_mut().zip(hits) {
                *c += h;
            }
            starts += n_starts;
            estimate_tau(head, teacher, (&batch, &greedy), &mut tau)?;
        }
        let total_targets: i64 = unigram.values().sum();
        let best = unigram.values().max().copied().unwrap_or(0);
        let tau = tau.finish();
        Ok(EvalRecord {
            step,
            loss: loss_sum / loss_weight.max(1.0),
            forced_top1: forced.iter().map(|(s, c)| s / (*c).max(1) as f64).collect(),
            chained_top1: chained
                .iter()
                .map(|&c| c as f64 / starts.max(1) as f64)
                .collect(),
            starts,
            unigram_top1: best as f64 / total_targets.max(1) as f64,
            tau_est_default_tree: tau.default_tree,
            tau_est_chain: tau.chain,
            tau_est_chain_t1: tau.chain_t1,
            tau_chain_depth: tau.chain_depth,
            tau_starts: tau.starts,
        })
    })
}

/// Adds the batch's starts on the teacher's path to the tau estimate.
fn estimate_tau(
    head: &DraftHead,
    teacher: &Teacher,
    (batch, greedy): (&Batch, &Tensor),
    tau: &mut TauEstimator,
) -> Result<()> {
    let starts = path_starts(batch, greedy, tau.depths())?;
    let depths = (tau.depths(), tau.sampled_depths(), SAMPLED_TEMPERATURE);
    for start in path_drafts(head, teacher, batch, greedy, &starts, depths)? {
        tau.add(&start);
    }
    Ok(())
}

/// Chained-draft hits per depth for one batch, and the number of start positions. `greedy`
/// [B,T] is the teacher's greedy token after every position.
fn chained_hits(
    head: &DraftHead,
    batch: &Batch,
    greedy: &Tensor,
    k_depths: usize,
) -> Result<(Vec<i64>, usize)> {
    let (b, t) = (batch.u.size()[0], batch.u.size()[1]);
    let k = k_depths as i64;
    let mask: Vec<f32> = Vec::try_from(batch.mask.reshape([-1]).to_device(Device::Cpu))?;
    let ids: Vec<i64> = Vec::try_from(batch.ids.reshape([-1]).to_device(Device::Cpu))?;
    let greedy_v: Vec<i64> = Vec::try_from(greedy.reshape([-1]).to_device(Device::Cpu))?;
    let (bu, tu) = (b as usize, t as usize);
    let mut rows = Vec::new();
    for r in 0..bu {
        for p in 0..tu.saturating_sub(k_depths) {
            let o = r * tu + p;
            let targets_masked = (0..k_depths).all(|d| mask[o + d] > 0.5);
            if targets_masked && ids[o + 1] == greedy_v[o] {
                rows.push((r * tu + p) as i64);
            }
        }
    }
    if rows.is_empty() {
        return Ok((vec![0; k_depths], 0));
    }
    let rows_t = Tensor::from_slice(&rows).to_device(batch.u.device());
    let positions = Tensor::arange(t, (Kind::Int64, batch.u.device()))
        .unsqueeze(0)
        .expand([b, t], true);
    let (o0, s0) = head.depth0(&batch.features, &batch.next_ids, &positions, None, None);
    let hdim = o0.size()[2];
    let mut o = o0.reshape([-1, hdim]).index_select(0, &rows_t);
    let mut s = s0.reshape([-1, hdim]).index_select(0, &rows_t);
    let greedy_flat = greedy.reshape([-1]);
    let mut alive = Tensor::ones([rows.len() as i64], (Kind::Bool, batch.u.device()));
    let mut hits = Vec::with_capacity(k_depths);
    for d in 0..k {
        let y = head.logits_at(d, &o).argmax(-1, false);
        // Depth d at row p predicts x_{p+2+d}: the teacher's greedy token after position p+1+d.
        let want = greedy_flat.index_select(0, &(&rows_t + 1 + d));
        alive = alive.logical_and(&y.eq_tensor(&want));
        hits.push(alive.sum(Kind::Int64).int64_value(&[]));
        if d + 1 < k {
            let (on, sn) = head.step_at(d + 1, &s, &y);
            o = on;
            s = sn;
        }
    }
    Ok((hits, rows.len()))
}
