//! Unrolling a drafter over a static tree: top-k of each draft row, then one step per depth on
//! the expanded nodes.

use anyhow::Result;
use tch::Tensor;

use crate::decode::drafter::Drafter;
use crate::decode::sampling::Sampling;
use crate::decode::verify::VerifyPlan;

/// Top-k of each draft row [r,V] -> tokens [r,k]. Greedy: the k largest logits (docs/clover2.md §4.3).
/// Sampling: k draws WITHOUT replacement from the processed distribution q, in draw order
/// (exponential race: argsort of q / Exp(1), which is the Gumbel-top-k trick); q [r,V] is
/// returned for the acceptance test.
pub fn draft_topk(logits: &Tensor, k: usize, sampling: &Sampling) -> (Tensor, Option<Tensor>) {
    if sampling.is_greedy() {
        return (logits.topk(k as i64, -1, true, true).1, None);
    }
    let q = sampling.probs(logits);
    let race = &q / q.empty_like().exponential_(1.0);
    (race.topk(k as i64, -1, true, true).1, Some(q))
}

/// Unroll the draft over the tree: depth 0's row, then one step per draft depth on the expanded
/// nodes (each continuing its parent's state). Returns tokens [R,K] and, when sampling, q [R,V].
pub fn draft_tree(
    drafter: &mut dyn Drafter,
    logits0: &Tensor,
    state0: &Tensor,
    plan: &VerifyPlan,
    sampling: &Sampling,
) -> Result<(Tensor, Option<Tensor>)> {
    let k = plan.tree.top_k;
    let (mut tokens, q) = draft_topk(logits0, k, sampling);
    let mut all_tokens = vec![tokens.shallow_clone()];
    let mut all_q: Vec<Tensor> = q.into_iter().collect();
    let mut state = state0.shallow_clone();
    for (gather, parents) in plan
        .tensors
        .draft_gather
        .iter()
        .zip(&plan.tensors.draft_parent_rows)
    {
        let children = tokens.flatten(0, -1).index_select(0, gather);
        let (logits, next_state) = drafter.step(&state.index_select(0, parents), &children)?;
        let (t, q) = draft_topk(&logits, k, sampling);
        all_tokens.push(t.shallow_clone());
        all_q.extend(q);
        tokens = t;
        state = next_state;
    }
    let q = (!all_q.is_empty()).then(|| Tensor::cat(&all_q, 0));
    Ok((Tensor::cat(&all_tokens, 0), q))
}
