//! Drafting: what speculative decoding needs from a draft model (`Drafter`), the drafter of
//! each head (chosen by the head's capabilities, never by its kind), and the unrolling of a
//! drafter over a static tree.

pub mod head_step;
pub mod tree_attention;
pub mod unroll;

use anyhow::{ensure, Result};
use tch::Tensor;

use crate::decode::tree::Tree;
pub use crate::model::draft_vocab::DraftVocab;
use crate::model::head::DraftHead;

pub use head_step::HeadDrafter;
pub use tree_attention::TreeAttentionDrafter;

/// What speculative decoding needs from a draft model. `DraftHead` implements it through
/// [`HeadDrafter`] or [`TreeAttentionDrafter`]; tests plug in other drafters (e.g. a noisy oracle) to drive deep acceptance.
pub trait Drafter {
    /// Start a new generation: forget all committed positions.
    fn reset(&mut self);
    /// Append committed positions: teacher pre-norm states `u` [1,n,H] (or the states of
    /// `teacher_layers`, concatenated), each paired with the
    /// token that follows it, `next_ids` [1,n] (G4). Returns depth-0 (logits [1,V], state [1,H])
    /// at the last position.
    fn extend(&mut self, u: &Tensor, next_ids: &Tensor) -> Result<(Tensor, Tensor)>;
    /// One depth >= 1 step on parent `states` [n,H] and the chosen tokens [n]:
    /// (logits [n,V], states [n,H]). States are opaque to the caller, which only gathers their
    /// rows by parent (`TreeAttentionDrafter`'s are draft-row ids [n]).
    fn step(&mut self, states: &Tensor, tokens: &Tensor) -> Result<(Tensor, Tensor)>;
    /// The teacher layers whose inputs (concatenated) `extend` takes in place of u, for a
    /// drafter that reads them (EAGLE-3, `DraftHead::teacher_layers`); None: u.
    fn teacher_layers(&self) -> Option<&[i64]> {
        None
    }
}

/// Size of the vocabulary a head drafts from: the sliced `vocab` (`--draft-vocab`), the head's
/// trained one, or None for the teacher's whole vocabulary.
pub fn drafting_vocab(head: &DraftHead, vocab: Option<&DraftVocab>) -> Option<usize> {
    vocab.or(head.draft_vocab()).map(DraftVocab::len)
}

/// The drafter of any head: one whose later depths attend over the tree
/// (`HeadArch::attends_over_tree`, EAGLE) drafts through `TreeAttentionDrafter`; the others step
/// each node from its parent alone (`HeadDrafter`), from `vocab` when one is given
/// (`DraftHead::slice_vocab` refuses one to heads that do not take it).
pub fn drafter_for<'h>(
    head: &'h DraftHead,
    vocab: Option<&'h DraftVocab>,
) -> Box<dyn Drafter + 'h> {
    match head.arch().attends_over_tree() {
        true => Box::new(TreeAttentionDrafter::new(head)),
        false => Box::new(HeadDrafter::new(head).with_vocab(vocab)),
    }
}

/// The deepest tree `head` can draft, where it has a limit (`HeadArch::deepest_draft`:
/// Medusa has one block per depth; the others step to any depth).
pub fn deepest_draft(head: &DraftHead) -> Option<usize> {
    head.arch().deepest_draft(&head.config().options)
}

/// Checks a tree can be drafted by `head` (see [`deepest_draft`]).
pub fn check_tree_for(head: &DraftHead, tree: &Tree) -> Result<()> {
    if let Some(deepest) = deepest_draft(head) {
        ensure!(
            tree.max_depth() <= deepest,
            "the tree is {} deep but the {} head drafts at most {deepest} depths",
            tree.max_depth(),
            head.arch().kind().name()
        );
    }
    Ok(())
}
