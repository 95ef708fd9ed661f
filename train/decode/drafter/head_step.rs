//! The drafter of heads whose depths >= 1 step each tree node from its parent's state alone
//! (Clover-2's weight-tied step, Medusa's blocks), with the head's own append-only KV cache.

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

use crate::decode::drafter::{deepest_draft, Drafter};
use crate::model::draft_vocab::DraftVocab;
use crate::model::head::DraftHead;
use crate::model::layers::KvCache;

/// A stepping draft head as a [`Drafter`], with its own append-only KV cache (G9): it only ever
/// sees committed positions, so it never needs rollback. With a [`DraftVocab`] its logits cover
/// only that vocabulary's tokens (FR-Spec). Medusa's "state" is h and its steps pick block
/// `depth`.
pub struct HeadDrafter<'h> {
    head: &'h DraftHead,
    cache: KvCache,
    vocab: Option<&'h DraftVocab>,
    /// Depth of the next `step` (1 after `extend`).
    depth: i64,
}

impl<'h> HeadDrafter<'h> {
    pub fn new(head: &'h DraftHead) -> Self {
        Self {
            cache: head.new_cache(1),
            head,
            vocab: None,
            depth: 1,
        }
    }

    /// Draft from the lm_head rows of `vocab` only.
    pub fn with_vocab(mut self, vocab: Option<&'h DraftVocab>) -> Self {
        self.vocab = vocab;
        self
    }

    /// Draft logits of depth `depth`'s outputs `o` [n,H] -> [n,V] (teacher ids; -inf outside a
    /// draft vocab).
    pub fn logits(&self, depth: i64, o: &Tensor) -> Tensor {
        match &self.vocab {
            Some(v) => v.logits(o),
            None => self.head.logits_at(depth, o),
        }
    }
}

impl Drafter for HeadDrafter<'_> {
    fn reset(&mut self) {
        self.cache = self.head.new_cache(1);
    }

    fn extend(&mut self, u: &Tensor, next_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = next_ids.size()[1];
        let start = self.cache.len();
        // Draft position ids continue from the draft cache length (G9).
        let positions =
            Tensor::arange_start(start, start + n, (Kind::Int64, u.device())).unsqueeze(0);
        let (o0, s0) = self
            .head
            .depth0(u, next_ids, &positions, None, Some(&mut self.cache));
        let logits = self.logits(0, &o0.select(1, n - 1));
        self.depth = 1;
        Ok((logits, s0.select(1, n - 1)))
    }

    fn step(&mut self, states: &Tensor, tokens: &Tensor) -> Result<(Tensor, Tensor)> {
        let depth = self.depth;
        if let Some(deepest) = deepest_draft(self.head) {
            ensure!(
                (depth as usize) < deepest,
                "the {} head was asked for depth {depth} but drafts at most {deepest} depths",
                self.head.arch().kind().name()
            );
        }
        let (o, s) = self.head.step_at(depth, states, tokens);
        self.depth += 1;
        Ok((self.logits(depth, &o), s))
    }
}
