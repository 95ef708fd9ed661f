//! Training batches: a deterministic data order (SplitMix64 from seed and epoch), length-bucketed
//! batches under a token budget, and padded device tensors with the shifted loss mask.

use anyhow::{ensure, Context, Result};
use tch::{Kind, Tensor};

use crate::data::shards::Sample;
use crate::model::teacher::Teacher;
use crate::training::loss::shift_for_training;

/// SplitMix64: a tiny deterministic RNG for data order, reproducible from (seed, epoch).
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// How samples are grouped into optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batching {
    /// One batch per step of at most `batch_tokens` padded tokens, cut from length-sorted
    /// windows of `window` shuffled samples (fast for small models: little padding).
    Tokens { batch_tokens: usize, window: usize },
    /// The reference's: `per_step` shuffled conversations per step, cut into micro-batches of at
    /// most `micro_batch_tokens` padded tokens whose gradients are accumulated.
    Conversations {
        per_step: usize,
        micro_batch_tokens: usize,
    },
}

/// One optimizer step's micro-batches (sample indices); token batching has exactly one.
pub type Step = Vec<Vec<usize>>;

/// The steps of one epoch, a pure function of (lengths, batching, seed, epoch): every sample
/// appears once, and a resume replays the same steps.
pub fn epoch_steps(lengths: &[usize], batching: Batching, seed: u64, epoch: u64) -> Vec<Step> {
    match batching {
        Batching::Tokens {
            batch_tokens,
            window,
        } => epoch_batches(lengths, batch_tokens, window, seed, epoch)
            .into_iter()
            .map(|batch| vec![batch])
            .collect(),
        Batching::Conversations {
            per_step,
            micro_batch_tokens,
        } => {
            let mut rng = epoch_rng(seed, epoch);
            let mut order: Vec<usize> = (0..lengths.len()).collect();
            rng.shuffle(&mut order);
            order
                .chunks(per_step.max(1))
                .map(|step| cut_sorted(step, lengths, micro_batch_tokens))
                .collect()
        }
    }
}

fn epoch_rng(seed: u64, epoch: u64) -> SplitMix64 {
    SplitMix64::new(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407))
}

/// Sorts `samples` by length and cuts them, in order, into batches of at most `budget` padded
/// tokens (rows x longest row); a sample longer than the budget gets a batch of its own.
fn cut_sorted(samples: &[usize], lengths: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut sorted = samples.to_vec();
    sorted.sort_by_key(|&i| lengths[i]);
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in sorted {
        // Sorted ascending, so the newcomer is the longest row.
        if !current.is_empty() && lengths[i] * (current.len() + 1) > budget {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Length-bucketed batches of one epoch: shuffle, sort by length within windows of `window`
/// samples, cut batches of at most `batch_tokens` padded tokens, shuffle the batch order.
pub fn epoch_batches(
    lengths: &[usize],
    batch_tokens: usize,
    window: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut rng = epoch_rng(seed, epoch);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut order);
    let mut batches: Vec<Vec<usize>> = order
        .chunks(window.max(1))
        .flat_map(|window| cut_sorted(window, lengths, batch_tokens))
        .collect();
    rng.shuffle(&mut batches);
    batches
}

/// A padded batch on the device: the head's inputs and the shifted mask.
pub struct Batch {
    /// Teacher pre-norm states [B,T,H].
    pub u: Tensor,
    /// What the head reads: `u`, or the concatenated states of its teacher layers [B,T,kH]
    /// (EAGLE-3, `make_batch_reading`).
    pub features: Tensor,
    /// x_{t+1} at position t [B,T] (G4).
    pub next_ids: Tensor,
    /// Shifted 0/1 loss mask [B,T] f32 (last real position and padding are 0).
    pub mask: Tensor,
    /// Real (unpadded) tokens.
    pub tokens: usize,
    /// Input ids [B,T] (padding 0), for the chained eval.
    pub ids: Tensor,
}

fn truncated(s: &Sample, max_len: usize) -> (&[i64], &[u8]) {
    let n = s.input_ids.len().min(max_len);
    (&s.input_ids[..n], &s.loss_mask[..s.loss_mask.len().min(n)])
}

/// N_i of §2.2 for a batch of `samples` and depths 0..`depths`: the masked positions t' >= i
/// under the shifted loss mask, exactly as `make_batch` builds it. Data-parallel ranks compute it
/// for a whole batch of which each holds a share (`loss::BatchLoss::counts`).
pub fn depth_counts(samples: &[&Sample], max_len: usize, depths: usize) -> Vec<i64> {
    let mut counts = vec![0i64; depths];
    for s in samples {
        let (ids, mask) = truncated(s, max_len);
        let (_, shifted) = shift_for_training(ids, mask);
        for (t, _) in shifted.iter().enumerate().filter(|(_, &m)| m != 0.0) {
            for count in counts.iter_mut().take((t + 1).min(depths)) {
                *count += 1;
            }
        }
    }
    counts
}

/// One rank's part of an optimizer step under data parallelism.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// Which of the step's micro-batches this part belongs to.
    pub micro_batch: usize,
    /// The sample indices this rank computes.
    pub rows: Vec<usize>,
    /// Whether `rows` is only part of the micro-batch (its normaliser then counts all its rows).
    pub partial: bool,
}

/// Rank `rank`'s shares of `step` among `world` ranks, a pure function of the step (so of seed,
/// epoch and step), disjoint and covering the step: with at least `world` micro-batches each rank
/// takes whole micro-batches in turn; with fewer (token batching has one) each micro-batch's rows
/// are dealt out in turn (they are length-sorted, so the shares are alike in size).
pub fn rank_shares(step: &Step, rank: usize, world: usize) -> Vec<Share> {
    if world <= 1 || step.len() >= world {
        return step
            .iter()
            .enumerate()
            .filter(|(j, _)| j % world.max(1) == rank)
            .map(|(j, rows)| Share {
                micro_batch: j,
                rows: rows.clone(),
                partial: false,
            })
            .collect();
    }
    step.iter()
        .enumerate()
        .map(|(j, rows)| Share {
            micro_batch: j,
            rows: rows.iter().skip(rank).step_by(world).copied().collect(),
            partial: true,
        })
        .filter(|share| !share.rows.is_empty())
        .collect()
}

/// Right-pads samples into tensors; `states` (offline) are their cached [T,H] teacher states,
/// otherwise the teacher runs under no_grad.
pub fn make_batch(
    teacher: &Teacher,
    samples: &[&Sample],
    states: Option<Vec<Tensor>>,
    max_len: usize,
) -> Result<Batch> {
    make_batch_reading(teacher, samples, states, max_len, None)
}

/// `make_batch` for a head that reads the states of teacher `layers` (EAGLE-3): the teacher
/// runs in the loop and hands those too. A distillation cache holds only u, so it cannot serve
/// such a head.
pub fn make_batch_reading(
    teacher: &Teacher,
    samples: &[&Sample],
    states: Option<Vec<Tensor>>,
    max_len: usize,
    layers: Option<&[i64]>,
) -> Result<Batch> {
    ensure!(
        layers.is_none() || states.is_none(),
        "this head reads teacher layers {:?}, which a distillation cache does not hold: train it \
         online (leave out distill_cache)",
        layers.unwrap_or_default()
    );
    let device = teacher.device();
    ensure!(!samples.is_empty(), "empty batch");
    let width = samples
        .iter()
        .map(|s| truncated(s, max_len).0.len())
        .max()
        .unwrap_or(0);
    ensure!(width >= 2, "samples need at least 2 tokens");
    let b = samples.len();
    let (mut ids, mut next, mut mask) = (
        vec![0i64; b * width],
        vec![0i64; b * width],
        vec![0f32; b * width],
    );
    let mut tokens = 0;
    for (r, s) in samples.iter().enumerate() {
        let (sid, smask) = truncated(s, max_len);
        teacher
            .check_token_ids(sid)
            .with_context(|| format!("sample {:?}", s.id))?;
        let (n_ids, n_mask) = shift_for_training(sid, smask);
        let o = r * width;
        ids[o..o + sid.len()].copy_from_slice(sid);
        next[o..o + sid.len()].copy_from_slice(&n_ids);
        mask[o..o + sid.len()].copy_from_slice(&n_mask);
        tokens += sid.len();
    }
    let shape = [b as i64, width as i64];
    let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
    let (u, features) = match states {
        Some(states) => {
            let h = teacher.config.hidden_size;
            let rows: Vec<Tensor> = states
                .iter()
                .map(|st| {
                    let n = st.size()[0].min(width as i64);
                    let st = st.narrow(0, 0, n).to_kind(teacher.kind());
                    st.constant_pad_nd([0, 0, 0, width as i64 - n])
                })
                .collect();
            let u = Tensor::stack(&rows, 0).to_device(device);
            ensure!(
                u.size() == [b as i64, width as i64, h],
                "cached states have shape {:?}",
                u.size()
            );
            (u.shallow_clone(), u)
        }
        None => {
            let positions = Tensor::arange(width as i64, (Kind::Int64, device))
                .unsqueeze(0)
                .expand(shape, true);
            // Right padding is harmless under causal attention: real rows never see it.
            tch::no_grad(|| teacher.forward_tapped(&ids, &positions, None, None, layers))
        }
    };
    Ok(Batch {
        u,
        features,
        next_ids: Tensor::from_slice(&next).view(shape).to_device(device),
        mask: Tensor::from_slice(&mask).view(shape).to_device(device),
        tokens,
        ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucketed_batches_cover_each_sample_once_within_the_token_budget() {
        let lengths: Vec<usize> = (0..50).map(|i| 5 + (i * 37) % 40).collect();
        let batches = epoch_batches(&lengths, 120, 16, 9, 2);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        for b in &batches {
            let longest = b.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(
                b.len() == 1 || longest * b.len() <= 120,
                "batch {b:?} over budget"
            );
        }
        assert_eq!(
            batches,
            epoch_batches(&lengths, 120, 16, 9, 2),
            "deterministic from (seed, epoch)"
        );
        assert_ne!(
            batches,
            epoch_batches(&lengths, 120, 16, 9, 3),
            "reshuffled each epoch"
        );
    }

    #[test]
    fn rank_shares_are_disjoint_cover_the_step_and_deal_whole_micro_batches_when_enough() {
        let step: Step = vec![vec![4, 1, 7], vec![0, 2], vec![3, 5, 6, 8, 9]];
        for world in 1..=5 {
            let shares: Vec<Vec<Share>> =
                (0..world).map(|r| rank_shares(&step, r, world)).collect();
            let mut seen: Vec<usize> = shares
                .iter()
                .flatten()
                .flat_map(|s| s.rows.clone())
                .collect();
            seen.sort();
            assert_eq!(seen, (0..10).collect::<Vec<_>>(), "world {world}");
            for share in shares.iter().flatten() {
                assert_eq!(share.partial, world > step.len(), "world {world}");
                assert!(share
                    .rows
                    .iter()
                    .all(|i| step[share.micro_batch].contains(i)));
            }
        }
        assert_eq!(
            rank_shares(&step, 1, 2)[0].rows,
            vec![0, 2],
            "whole micro-batch 1"
        );
        let last = Share {
            micro_batch: 2,
            rows: vec![8],
            partial: true,
        };
        assert_eq!(
            rank_shares(&step, 3, 4),
            vec![last],
            "rows dealt in turn, empty shares left out"
        );
    }

    #[test]
    fn depth_counts_are_the_masked_positions_at_or_after_each_depth() {
        let sample = |mask: Vec<u8>| Sample {
            id: String::new(),
            input_ids: (0..mask.len() as i64).collect(),
            loss_mask: mask,
        };
        let (a, b) = (sample(vec![0, 1, 1, 0, 1, 1]), sample(vec![1, 1, 1]));
        // Shifted (last position off): a at t' = 1, 2, 4; b at t' = 0, 1. Truncation to 5
        // drops a's t' = 4 (it becomes the last position).
        assert_eq!(depth_counts(&[&a, &b], 10, 3), vec![5, 4, 2]);
        assert_eq!(depth_counts(&[&a, &b], 5, 3), vec![4, 3, 1]);
    }

    #[test]
    fn conversation_steps_hold_a_fixed_count_in_micro_batches_within_budget() {
        let lengths: Vec<usize> = (0..50).map(|i| 5 + (i * 37) % 40).collect();
        let batching = Batching::Conversations {
            per_step: 16,
            micro_batch_tokens: 100,
        };
        let steps = epoch_steps(&lengths, batching, 9, 0);
        let sizes: Vec<usize> = steps.iter().map(|s| s.iter().map(Vec::len).sum()).collect();
        assert_eq!(
            sizes,
            vec![16, 16, 16, 2],
            "16 conversations a step, the rest last"
        );
        let mut seen: Vec<usize> = steps.iter().flatten().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        for micro in steps.iter().flatten() {
            let longest = micro.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(
                longest * micro.len() <= 100,
                "micro-batch {micro:?} over budget"
            );
        }
        assert!(
            steps.iter().any(|s| s.len() > 1),
            "budget forces accumulation"
        );
        assert_eq!(steps, epoch_steps(&lengths, batching, 9, 0));
        assert_ne!(steps, epoch_steps(&lengths, batching, 9, 1));
    }
}
