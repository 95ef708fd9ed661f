//! Dynamic draft trees (EAGLE-2): each step grows the tree from the draft's own confidence.
//!
//! Depth 1 holds the root row's top-k drafts. At each further depth the `top_k` most confident
//! nodes of the previous depth are expanded (one batched draft step), each contributing its own
//! top-k children. A node's confidence is the product of the draft probabilities along its path;
//! at the end the `tokens - 1` most confident nodes are kept (the root makes `tokens`). That set
//! is closed under ancestors (a child is never more confident than its parent; ties go to the
//! shallower node) and, because a node's confidence is capped by its lower-ranked sibling's, every
//! node's kept children are ranks 0..m-1, which lossless sampling needs (a drawn but unverified
//! draft would bias the residual). The kept paths become an ordinary [`Tree`], so verification,
//! acceptance and KV compaction are the static tree's code.

use std::collections::HashMap;

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

use crate::decode::drafter::unroll::draft_topk;
use crate::decode::drafter::Drafter;
use crate::decode::sampling::Sampling;
use crate::decode::tree::Tree;

/// Size of a dynamic tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynamicTree {
    /// Verified tokens per step, the root included.
    pub tokens: usize,
    /// Draft depths.
    pub depth: usize,
    /// Children per expanded node, and nodes expanded per depth.
    pub top_k: usize,
}

impl DynamicTree {
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.tokens >= 2,
            "--tree-tokens must be at least 2 (the root and one draft)"
        );
        ensure!(self.depth >= 1, "--tree-depth must be at least 1");
        ensure!(self.top_k >= 1, "--tree-topk must be at least 1");
        Ok(())
    }
}

/// One step's tree: its paths as a [`Tree`], and the draft rows in that tree's row order.
pub struct DraftedTree {
    pub tree: Tree,
    /// [R, top_k] draft tokens of the tree's internal nodes (row order of `tree.draft_rows`).
    pub tokens: Tensor,
    /// [R, V] processed draft distributions of those rows, when sampling.
    pub q: Option<Tensor>,
}

/// An expanded node: the draft row it produced (its children's tokens and q).
struct Expansion {
    tokens: Tensor,
    q: Option<Tensor>,
}

/// A candidate node: its path of ranks and its confidence.
#[derive(Clone)]
struct Candidate {
    path: Vec<usize>,
    score: f64,
}

/// Grow one dynamic tree from the depth-0 draft row.
pub fn draft_dynamic(
    drafter: &mut dyn Drafter,
    logits0: &Tensor,
    state0: &Tensor,
    shape: &DynamicTree,
    sampling: &Sampling,
) -> Result<DraftedTree> {
    let mut growth = Growth::from_root(logits0, state0, shape.top_k, sampling);
    for _ in 1..shape.depth {
        growth.expand_layer(drafter, sampling, logits0.device())?;
    }
    growth.into_tree(shape.tokens, sampling)
}

/// A dynamic tree while it grows: every node drafted so far and the last depth's nodes.
struct Growth {
    top_k: usize,
    /// The draft row of each expanded node, by the node's path.
    expansions: HashMap<Vec<usize>, Expansion>,
    /// Every drafted node.
    candidates: Vec<Candidate>,
    /// The last depth's nodes, their tokens [n] and their parents' states [n,..].
    layer: Vec<Candidate>,
    layer_tokens: Tensor,
    layer_states: Tensor,
}

impl Growth {
    /// Depth 1: the root row's top-k.
    fn from_root(logits0: &Tensor, state0: &Tensor, k: usize, sampling: &Sampling) -> Self {
        let (tokens, q, probs) = expand_row(logits0, k, sampling);
        let root_scores = child_scores(&probs, 1.0);
        let layer: Vec<Candidate> = (0..k)
            .map(|r| Candidate {
                path: vec![r],
                score: root_scores[r],
            })
            .collect();
        let mut expansions = HashMap::new();
        let layer_tokens = tokens.view([-1]);
        expansions.insert(vec![], Expansion { tokens, q });
        Growth {
            top_k: k,
            expansions,
            candidates: layer.clone(),
            layer,
            layer_tokens,
            // Row 0 k times, whatever the state's rank (a tree-attending drafter's states are
            // row ids [1], the others' feature rows [1,H]).
            layer_states: state0.repeat_interleave_self_int(k as i64, 0, None),
        }
    }

    /// The next depth: the `top_k` most confident nodes of this depth (ties: lower rank first)
    /// are expanded in one batched draft step, each contributing its own top-k children.
    fn expand_layer(
        &mut self,
        drafter: &mut dyn Drafter,
        sampling: &Sampling,
        device: Device,
    ) -> Result<()> {
        let k = self.top_k;
        let layer = &self.layer;
        let mut order: Vec<usize> = (0..layer.len()).collect();
        order.sort_by(|&a, &b| layer[b].score.total_cmp(&layer[a].score).then(a.cmp(&b)));
        order.truncate(k);
        let pick = Tensor::from_slice(&order.iter().map(|&i| i as i64).collect::<Vec<_>>())
            .to_device(device);
        let (logits, states) = drafter.step(
            &self.layer_states.index_select(0, &pick),
            &self.layer_tokens.index_select(0, &pick),
        )?;
        let (tokens, q, probs) = expand_row(&logits, k, sampling);
        let mut next = Vec::with_capacity(order.len() * k);
        for (row, &i) in order.iter().enumerate() {
            let parent = &self.layer[i];
            let scores = child_scores(&probs.get(row as i64), parent.score);
            for (r, &score) in scores.iter().enumerate() {
                next.push(Candidate {
                    path: [parent.path.clone(), vec![r]].concat(),
                    score,
                });
            }
            self.expansions.insert(
                parent.path.clone(),
                Expansion {
                    tokens: tokens.get(row as i64).unsqueeze(0),
                    q: q.as_ref().map(|q| q.get(row as i64).unsqueeze(0)),
                },
            );
        }
        self.layer_tokens = tokens.view([-1]);
        self.layer_states = states.repeat_interleave_self_int(k as i64, 0, None);
        self.candidates.extend(next.iter().cloned());
        self.layer = next;
        Ok(())
    }

    /// The `tokens - 1` most confident nodes as an ordinary tree, with the draft rows of its
    /// internal nodes.
    fn into_tree(mut self, tokens: usize, sampling: &Sampling) -> Result<DraftedTree> {
        // Shallower first on ties keeps ancestors before descendants.
        self.candidates.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then((a.path.len(), &a.path).cmp(&(b.path.len(), &b.path)))
        });
        self.candidates.truncate(tokens - 1);
        let paths: Vec<Vec<usize>> = self.candidates.into_iter().map(|c| c.path).collect();
        let tree = Tree::from_paths(&paths, self.top_k)?;
        let rows: Vec<&Expansion> = internal_paths(&tree)
            .iter()
            .map(|p| &self.expansions[p])
            .collect();
        let tokens = Tensor::cat(&rows.iter().map(|e| &e.tokens).collect::<Vec<_>>(), 0);
        let q = if sampling.is_greedy() {
            None
        } else {
            let rows: Vec<&Tensor> = rows
                .iter()
                .map(|e| e.q.as_ref().expect("sampling keeps q"))
                .collect();
            Some(Tensor::cat(&rows, 0))
        };
        Ok(DraftedTree { tree, tokens, q })
    }
}

/// Paths of the tree's internal nodes in draft-row order.
fn internal_paths(tree: &Tree) -> Vec<Vec<usize>> {
    let mut rows: Vec<(usize, Vec<usize>)> = tree
        .draft_rows
        .iter()
        .enumerate()
        .filter_map(|(node, row)| row.map(|r| (r, tree.paths[node].clone())))
        .collect();
    rows.sort();
    rows.into_iter().map(|(_, p)| p).collect()
}

/// Top-k of draft rows [r,V]: tokens [r,k], q [r,V] when sampling, and each token's draft
/// probability [r,k] on the host (the processed q when sampling, softmax at T = 1 when greedy).
fn expand_row(logits: &Tensor, k: usize, sampling: &Sampling) -> (Tensor, Option<Tensor>, Tensor) {
    let (tokens, q) = draft_topk(logits, k, sampling);
    let probs = match &q {
        Some(q) => q.gather(1, &tokens, false),
        None => logits
            .to_kind(Kind::Float)
            .softmax(-1, Kind::Float)
            .gather(1, &tokens, false),
    };
    (tokens, q, probs.to_device(Device::Cpu))
}

/// Children's confidences: parent · p_r, each capped by the lower-ranked sibling's so that kept
/// children are always ranks 0..m-1.
fn child_scores(probs: &Tensor, parent: f64) -> Vec<f64> {
    let p = Vec::<f64>::try_from(probs.view([-1]).to_kind(Kind::Double)).unwrap_or_default();
    let mut out = Vec::with_capacity(p.len());
    let mut cap = f64::INFINITY;
    for x in p {
        cap = cap.min(parent * x);
        out.push(cap);
    }
    out
}
