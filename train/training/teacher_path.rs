//! The draft head run along the teacher's own path at held-out start positions, as speculative
//! decoding runs it when every earlier draft of a step was accepted: for the tau estimate
//! (`training::tau_estimate`, docs/clover2.md §5.2).
//!
//! A start is a position p of a held-out row whose next tokens are the teacher's greedy choices
//! (x_{p+1+i} = argmax of the teacher after position p+i, for every depth the estimate needs) and
//! whose targets are all masked. There depth 0 reads the teacher's states up to p with the root
//! token x_{p+1}, and depth d ≥ 1 is fed the teacher's token x_{p+1+d}: the token the draft had to
//! propose at depth d − 1 to be accepted. Depth d's target is the teacher's greedy token after
//! position p + 1 + d, and its distribution there is the teacher's p_T.
//!
//! Heads that step from the carried state (Clover-2, Medusa) do so as their decoders do
//! (`DraftHead::step_at`, for Clover-2 the same as the teacher-forced `depth_outputs`). A head
//! whose later depths attend over the tree (`HeadArch::attends_over_tree`: EAGLE-1, which trains
//! depth 0 alone) runs its decoder layer on its own predicted features: here, as in
//! `decode::drafter::tree_attention`, the row of depth d sits at position p + d and attends to the
//! teacher's rows 0..=p and to its own chain (depths 1..=d of the same start), never to other
//! starts.
//! (The held-out chained top-1 of `training::evaluate` steps EAGLE-1 without that context.)

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::model::arch::TokenRows;
use crate::model::head::DraftHead;
use crate::model::teacher::Teacher;
use crate::training::batches::Batch;
use crate::training::tau_estimate::{StartDrafts, NOT_DRAFTED};

/// Rows of logits alive at a time (teacher or draft, each [rows, V]).
const CHUNK: usize = 256;

/// The teacher's greedy token after every position of the batch [B,T], from its pre-norm states
/// `u` [B,T,H], in chunks of `CHUNK` rows.
pub fn teacher_greedy(teacher: &Teacher, u: &Tensor) -> Tensor {
    let (b, t) = (u.size()[0], u.size()[1]);
    let flat = u.reshape([b * t, -1]);
    let chunk = CHUNK as i64;
    let parts: Vec<Tensor> = (0..b * t)
        .step_by(CHUNK)
        .map(|s| {
            teacher
                .logits(&flat.narrow(0, s, (b * t - s).min(chunk)))
                .argmax(-1, false)
        })
        .collect();
    Tensor::cat(&parts, 0).view([b, t])
}

/// The batch's starts on the teacher's path for `depths` depths, as flat indices r·T + p in
/// ascending order: targets p..p+depths masked, and x_{p+1+i} the teacher's greedy token after
/// p + i for every i < depths.
pub fn path_starts(batch: &Batch, greedy: &Tensor, depths: usize) -> Result<Vec<i64>> {
    let t = batch.ids.size()[1] as usize;
    let host = |x: &Tensor| x.reshape([-1]).to_device(Device::Cpu);
    let mask: Vec<f32> = Vec::try_from(host(&batch.mask))?;
    let ids: Vec<i64> = Vec::try_from(host(&batch.ids))?;
    let greedy: Vec<i64> = Vec::try_from(host(greedy))?;
    let rows = ids.len() / t.max(1);
    let mut starts = Vec::new();
    for r in 0..rows {
        for p in 0..t.saturating_sub(depths) {
            let o = r * t + p;
            let masked = (0..depths).all(|d| mask[o + d] > 0.5);
            let on_path = (0..depths).all(|i| ids[o + 1 + i] == greedy[o + i]);
            if masked && on_path {
                starts.push(o as i64);
            }
        }
    }
    Ok(starts)
}

/// What the draft does at each start along the teacher's path: the rank of the teacher's token
/// in each of `depths` depths' logits (`NOT_DRAFTED` past the head's last depth or outside its
/// draft vocabulary) and, for the first `sampled_depths`, the acceptance probability
/// Σ_v min(p_T, q_T) at `temperature`.
pub fn path_drafts(
    head: &DraftHead,
    teacher: &Teacher,
    batch: &Batch,
    greedy: &Tensor,
    starts: &[i64],
    (depths, sampled_depths, temperature): (usize, usize, f64),
) -> Result<Vec<StartDrafts>> {
    let mut drafts = vec![
        StartDrafts {
            ranks: vec![NOT_DRAFTED; depths],
            alphas: vec![0.0; sampled_depths],
        };
        starts.len()
    ];
    if starts.is_empty() {
        return Ok(drafts);
    }
    let reach = crate::decode::drafter::deepest_draft(head).map_or(depths, |d| depths.min(d));
    let greedy = greedy.reshape([-1]);
    let outs = match head.arch().attends_over_tree() {
        true => attending_outputs(head, batch, &greedy, starts, reach)?,
        false => stepped_outputs(head, batch, &greedy, starts, reach),
    };
    let u = batch.u.reshape([-1, batch.u.size()[2]]);
    for c0 in (0..starts.len()).step_by(CHUNK) {
        let c = CHUNK.min(starts.len() - c0);
        let chunk = &starts[c0..c0 + c];
        let outs: Vec<Tensor> = outs
            .iter()
            .map(|o| o.narrow(0, c0 as i64, c as i64))
            .collect();
        let sampled = reach.min(sampled_depths);
        let teacher_p = TeacherRows::new(teacher, &u, chunk, sampled, temperature);
        for (d, o) in outs.iter().enumerate() {
            let logits = head.logits_at(d as i64, o).to_kind(Kind::Float);
            let rows = Tensor::from_slice(chunk).to_device(u.device()) + (1 + d as i64);
            let target = greedy.index_select(0, &rows);
            let ranks = ranks_of(&logits, &target)?;
            let alphas = match d < sampled {
                true => Some(acceptance(&teacher_p.at_depth(d), &logits, temperature)?),
                false => None,
            };
            for (i, s) in drafts[c0..c0 + c].iter_mut().enumerate() {
                s.ranks[d] = ranks[i];
                if let Some(a) = &alphas {
                    s.alphas[d] = a[i];
                }
            }
        }
    }
    Ok(drafts)
}

/// Depth outputs [starts, H] of a stepping head (Clover-2, Medusa): depth 0 over the whole
/// batch, then the carried state of each start stepped with the teacher's tokens.
fn stepped_outputs(
    head: &DraftHead,
    batch: &Batch,
    greedy: &Tensor,
    starts: &[i64],
    reach: usize,
) -> Vec<Tensor> {
    let (b, t) = (batch.u.size()[0], batch.u.size()[1]);
    let device = batch.u.device();
    let rows = Tensor::from_slice(starts).to_device(device);
    let positions = Tensor::arange(t, (Kind::Int64, device))
        .unsqueeze(0)
        .expand([b, t], true);
    let (o0, s0) = head.depth0(&batch.u, &batch.next_ids, &positions, None, None);
    let flat = |x: &Tensor| x.reshape([b * t, -1]).index_select(0, &rows);
    let mut state = flat(&s0);
    let mut outs = vec![flat(&o0)];
    for d in 1..reach as i64 {
        let tokens = greedy.index_select(0, &(&rows + d));
        let (o, s) = head.step_at(d, &state, &tokens);
        outs.push(o);
        state = s;
    }
    outs.truncate(reach);
    outs
}

/// A tree-attending head's depth outputs [starts, H] with the decoder's context (module doc),
/// one batch row at a time and at most `CHUNK` of its starts per pass, so the attention stays
/// T + CHUNK·depth keys wide.
fn attending_outputs(
    head: &DraftHead,
    batch: &Batch,
    greedy: &Tensor,
    starts: &[i64],
    reach: usize,
) -> Result<Vec<Tensor>> {
    let t = batch.u.size()[1];
    let mut per_depth: Vec<Vec<Tensor>> = (0..reach).map(|_| Vec::new()).collect();
    let mut i = 0;
    while i < starts.len() {
        let row = starts[i] / t;
        let same_row = starts[i..].iter().take_while(|&&s| s / t == row).count();
        let positions: Vec<i64> = starts[i..i + same_row].iter().map(|s| s % t).collect();
        let mut cache = head.new_cache(1);
        let all = Tensor::arange(t, (Kind::Int64, batch.u.device())).unsqueeze(0);
        let (features, _) = head.depth0(
            &batch.u.narrow(0, row, 1),
            &batch.next_ids.narrow(0, row, 1),
            &all,
            None,
            Some(&mut cache),
        );
        let features = features.squeeze_dim(0);
        for group in positions.chunks(CHUNK) {
            let chain =
                attending_chain(head, (&features, &mut cache), greedy, row * t, group, reach)?;
            for (d, o) in chain.into_iter().enumerate() {
                per_depth[d].push(o);
            }
            cache.truncate(t);
        }
        i += same_row;
    }
    Ok(per_depth
        .into_iter()
        .map(|parts| Tensor::cat(&parts, 0))
        .collect())
}

/// The chains of one row's starts at `positions`: `features` [T,H] are depth 0's outputs over
/// the row, whose keys `cache` holds; each depth's rows are appended after them.
fn attending_chain(
    head: &DraftHead,
    (features, cache): (&Tensor, &mut crate::model::layers::KvCache),
    greedy: &Tensor,
    row_offset: i64,
    positions: &[i64],
    reach: usize,
) -> Result<Vec<Tensor>> {
    let device = features.device();
    let t = features.size()[0];
    let n = positions.len() as i64;
    let pos = Tensor::from_slice(positions).to_device(device);
    // Start p's rows see the teacher's rows 0..=p and, at each depth, their own chain only.
    let context = Tensor::arange(t, (Kind::Int64, device))
        .unsqueeze(0)
        .le_tensor(&pos.unsqueeze(1));
    let own = Tensor::eye(n, (Kind::Bool, device));
    let mut f = features.index_select(0, &pos);
    let mut outs = vec![f.shallow_clone()];
    for d in 1..reach as i64 {
        let tokens = greedy.index_select(0, &(&pos + row_offset + d));
        let mask =
            Tensor::cat(&[context.shallow_clone(), own.repeat([1, d])], 1).view([1, 1, n, -1]);
        let placed = TokenRows {
            next_ids: &tokens.unsqueeze(0),
            positions: &(&pos + d).unsqueeze(0),
            mask: Some(&mask),
        };
        f = head
            .tree_forward(&f.unsqueeze(0), &placed, Some(&mut *cache))?
            .squeeze_dim(0);
        outs.push(f.shallow_clone());
    }
    outs.truncate(reach);
    Ok(outs)
}

/// The rank of each row's `target` among its `logits` [n,V]: how many tokens score strictly
/// higher. A target the head cannot score (-inf outside a draft vocabulary, or not finite) is
/// `NOT_DRAFTED`.
fn ranks_of(logits: &Tensor, target: &Tensor) -> Result<Vec<u32>> {
    let at = logits.gather(1, &target.unsqueeze(1), false);
    let above = logits.gt_tensor(&at).sum_dim_intlist(1, false, Kind::Int64);
    let scorable = at.squeeze_dim(1).isfinite();
    let above: Vec<i64> = Vec::try_from(above.to_device(Device::Cpu))?;
    let scorable: Vec<bool> = Vec::try_from(scorable.to_device(Device::Cpu))?;
    Ok(above
        .iter()
        .zip(scorable)
        .map(|(&a, ok)| if ok { a as u32 } else { NOT_DRAFTED })
        .collect())
}

/// Σ_v min(p(v), q(v)) per row, q = softmax(logits / T): the acceptance probability of one draft
/// token drawn from q (1 − TV), clamped to [0, 1] against round-off.
fn acceptance(p: &Tensor, logits: &Tensor, temperature: f64) -> Result<Vec<f64>> {
    let q = (logits / temperature).softmax(-1, Kind::Float);
    let alpha = p.minimum(&q).sum_dim_intlist(1, false, Kind::Double);
    let alpha: Vec<f64> = Vec::try_from(alpha.clamp(0.0, 1.0).to_device(Device::Cpu))?;
    Ok(alpha)
}

/// The teacher's p_T at the target positions of a chunk of starts for depths 0..`depths`,
/// computed once for the union of those positions (consecutive starts share most of them).
struct TeacherRows {
    /// p_T [union, V].
    probs: Tensor,
    /// Index into `probs` of each start's target at each depth: [depth][start].
    index: Vec<Tensor>,
}

impl TeacherRows {
    fn new(teacher: &Teacher, u: &Tensor, starts: &[i64], depths: usize, temperature: f64) -> Self {
        let device = u.device();
        let mut union: Vec<i64> = (0..depths as i64)
            .flat_map(|d| starts.iter().map(move |&s| s + 1 + d))
            .collect();
        union.sort_unstable();
        union.dedup();
        let probs = match union.is_empty() {
            true => Tensor::zeros([0], (Kind::Float, device)),
            false => {
                let rows = Tensor::from_slice(&union).to_device(device);
                let logits = teacher
                    .logits(&u.index_select(0, &rows))
                    .to_kind(Kind::Float);
                (logits / temperature).softmax(-1, Kind::Float)
            }
        };
        let index = (0..depths as i64)
            .map(|d| {
                let at: Vec<i64> = starts
                    .iter()
                    .map(|&s| union.binary_search(&(s + 1 + d)).unwrap_or(0) as i64)
                    .collect();
                Tensor::from_slice(&at).to_device(device)
            })
            .collect();
        TeacherRows { probs, index }
    }

    fn at_depth(&self, d: usize) -> Tensor {
        self.probs.index_select(0, &self.index[d])
    }
}
