//! Tree drafting for heads whose depths >= 1 attend over the tree (`HeadArch::attends_over_tree`:
//! EAGLE-1 and EAGLE-3, docs/heads.md §1.3, §6.4). Unlike Clover-2's and Medusa's depths >= 1, such a head's
//! decoder layer runs at every depth: a tree node at depth k attends to the committed
//! prefix, to its own ancestors in the tree and to itself, at position L + k - 1. The drafter
//! keeps its KV cache in two parts: committed rows (append-only, as G9) and this step's tree rows
//! after them, dropped at the next `extend`.
//!
//! Its "state" handed to `draft_tree` is not a feature vector but the draft-row id [n] i64 of
//! each node (row 0: the last committed position), which `draft_tree` gathers by parent like any
//! state; features and the ancestor relation are kept here.

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

use crate::decode::drafter::Drafter;
use crate::model::arch::TokenRows;
use crate::model::head::DraftHead;
use crate::model::layers::KvCache;

pub struct TreeAttentionDrafter<'h> {
    head: &'h DraftHead,
    cache: KvCache,
    /// Committed rows at the front of the cache.
    committed: i64,
    /// Predicted feature of every draft row [R,H]; row 0 is the last committed position's.
    features: Tensor,
    /// ancestors[i][j]: row j is row i or one of its ancestors [R,R] bool.
    ancestors: Tensor,
    /// Depth of the next `step`.
    depth: i64,
}

impl<'h> TreeAttentionDrafter<'h> {
    pub fn new(head: &'h DraftHead) -> Self {
        let device = head.device();
        Self {
            cache: head.new_cache(1),
            head,
            committed: 0,
            features: Tensor::zeros([0], (head.stream_kind(), device)),
            ancestors: Tensor::zeros([0, 0], (Kind::Bool, device)),
            depth: 1,
        }
    }
}

impl Drafter for TreeAttentionDrafter<'_> {
    fn reset(&mut self) {
        self.cache = self.head.new_cache(1);
        self.committed = 0;
    }

    fn extend(&mut self, u: &Tensor, next_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = next_ids.size()[1];
        let device = u.device();
        // Forget the last step's tree rows: only committed positions stay (G9).
        self.cache.truncate(self.committed);
        let positions =
            Tensor::arange_start(self.committed, self.committed + n, (Kind::Int64, device))
                .unsqueeze(0);
        let (f, _) = self
            .head
            .depth0(u, next_ids, &positions, None, Some(&mut self.cache));
        self.committed += n;
        let last = f.select(1, n - 1);
        self.features = last.shallow_clone();
        self.ancestors = Tensor::ones([1, 1], (Kind::Bool, device));
        self.depth = 1;
        let row0 = Tensor::zeros([1], (Kind::Int64, device));
        Ok((self.head.logits_at(0, &last), row0))
    }

    fn step(&mut self, states: &Tensor, tokens: &Tensor) -> Result<(Tensor, Tensor)> {
        ensure!(
            states.kind() == Kind::Int64,
            "TreeAttentionDrafter::step takes the draft-row ids it returned, got {:?}",
            states.kind()
        );
        let device = tokens.device();
        let n = tokens.size()[0];
        let rows = self.features.size()[0];
        // Row i sees: every committed position, its parent's ancestor chain (row 0 excepted: it is
        // already a committed position) and itself.
        let chain = self.ancestors.index_select(0, states);
        let own = Tensor::eye(n, (Kind::Bool, device));
        let new_rows = Tensor::cat(&[chain, own], 1);
        let mask = Tensor::cat(
            &[
                Tensor::ones([n, self.committed], (Kind::Bool, device)),
                new_rows.narrow(1, 1, rows - 1 + n),
            ],
            1,
        )
        .view([1, 1, n, -1]);
        let positions = Tensor::full(
            [1, n],
            self.committed + self.depth - 1,
            (Kind::Int64, device),
        );
        let parents = self.features.index_select(0, states).unsqueeze(0);
        let placed = TokenRows {
            next_ids: &tokens.reshape([1, n]),
            positions: &positions,
            mask: Some(&mask),
        };
        let f = self
            .head
            .tree_forward(&parents, &placed, Some(&mut self.cache))?
            .squeeze_dim(0);
        let padded = Tensor::cat(
            &[
                self.ancestors.shallow_clone(),
                Tensor::zeros([rows, n], (Kind::Bool, device)),
            ],
            1,
        );
        self.ancestors = Tensor::cat(&[padded, new_rows], 0);
        self.features = Tensor::cat(&[&self.features, &f], 0);
        let logits = self.head.logits_at(self.depth, &f);
        self.depth += 1;
        let ids = Tensor::arange_start(rows, rows + n, (Kind::Int64, device));
        Ok((logits, ids))
    }

    fn teacher_layers(&self) -> Option<&[i64]> {
        self.head.teacher_layers()
    }
}
