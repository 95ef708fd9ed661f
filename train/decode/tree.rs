//! Static speculation trees (docs/clover2.md §4.1, §4.2, §4.4).
//!
//! A tree is a list of paths; each entry `j` of a path means "the j-th of the parent's top-k draft
//! tokens". From it we build, with EXPLICIT parent indices (gotcha G11; the reference's draft-side
//! builder assumes the parents at each depth form a prefix of the previous depth's internal nodes):
//! - the verification buffers that the teacher forward over the tree tokens needs
//!   (`attn_mask`, `position_ids`, `tree_indices`, `retrieve_indices`), and
//! - the draft-side expansion plan: per depth, which top-k entries of which draft rows become
//!   expanded (internal) nodes, as gather indices, and which parent state each one continues.
//!
//! Node order is the reference's: the root is node 0, then the paths sorted by (length, path).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

/// Name of the default tree (EAGLE-1 / Clover-2 `mc_sim_7b_63`: 25 draft nodes + the root).
pub const DEFAULT_TREE: &str = "mc_sim_7b_63";

/// Top-k the reference drafts per row (`top_k=10` in clover2.py, `TOPK=10` in utils.py).
pub const DEFAULT_TOP_K: usize = 10;

/// The longest chain `Tree::chain` builds: far past any head's useful depth (acceptance decays
/// geometrically with depth), and a bound on the tokens one verification step carries.
pub const MAX_CHAIN: usize = 32;

/// The `mc_sim_7b_63` tree of docs/clover2.md §4.1.
pub fn mc_sim_7b_63() -> Vec<Vec<usize>> {
    let p = |s: &[usize]| s.to_vec();
    vec![
        p(&[0]),
        p(&[1]),
        p(&[2]),
        p(&[3]),
        p(&[0, 0]),
        p(&[0, 1]),
        p(&[0, 2]),
        p(&[1, 0]),
        p(&[1, 1]),
        p(&[2, 0]),
        p(&[2, 1]),
        p(&[3, 0]),
        p(&[0, 0, 0]),
        p(&[0, 0, 1]),
        p(&[0, 0, 2]),
        p(&[0, 1, 0]),
        p(&[0, 1, 1]),
        p(&[0, 2, 0]),
        p(&[0, 2, 1]),
        p(&[1, 0, 0]),
        p(&[0, 0, 0, 0]),
        p(&[0, 0, 0, 1]),
        p(&[0, 0, 0, 2]),
        p(&[0, 0, 0, 0, 0]),
        p(&[0, 0, 0, 0, 1]),
    ]
}

/// One draft step (depth k >= 1): the internal nodes at depth k, in node order.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftStep {
    /// Tree node index of each expanded node.
    pub nodes: Vec<usize>,
    /// Index of each node's token in the flattened [rows_{k-1} * top_k] top-k of the previous
    /// draft step's rows (reference `tree_indices` of `utils_c.py`).
    pub gather: Vec<i64>,
    /// Row (within the previous step's rows) whose state each node continues; repeated parents are
    /// what the reference calls `repeat_nums`.
    pub parent_rows: Vec<i64>,
}

/// A speculation tree with its verification buffers and draft plan (all host-side; see
/// [`TreeTensors`] for the device copies).
#[derive(Debug, Clone)]
pub struct Tree {
    /// Top-k per draft row; every path entry must be < top_k.
    pub top_k: usize,
    /// Node paths in node order; `paths[0]` is the root (empty path).
    pub paths: Vec<Vec<usize>>,
    /// Parent node of each node (the root's parent is itself, 0).
    pub parents: Vec<usize>,
    /// Children of each node, in rank order.
    pub children: Vec<Vec<usize>>,
    /// [n, n]: a node may attend to itself and its ancestors (root included).
    pub attn_mask: Vec<Vec<bool>>,
    /// Depth of each node (root 0) = its position offset from the committed length.
    pub position_ids: Vec<i64>,
    /// Index of each node's token in `[root] ++ flatten(draft top-k rows)`.
    pub tree_indices: Vec<i64>,
    /// Root-to-leaf paths as node indices, padded with -1, sorted like the reference.
    pub retrieve_indices: Vec<Vec<i64>>,
    /// Draft row of each internal node (root = row 0), `None` for leaves.
    pub draft_rows: Vec<Option<usize>>,
    /// Draft steps for depths 1..max_depth-1 (one per depth that has internal nodes).
    pub draft_plan: Vec<DraftStep>,
}

impl Tree {
    /// The built-in `mc_sim_7b_63` tree with the reference's top-k.
    pub fn default_tree() -> Self {
        Self::from_paths(&mc_sim_7b_63(), DEFAULT_TOP_K).expect("mc_sim_7b_63 is a valid tree")
    }

    /// A chain of `n` drafts: each depth's top draft only, paths [0], [0,0], ... n deep (the
    /// tree of plain speculative decoding). `n` is 1 to [`MAX_CHAIN`].
    pub fn chain(n: usize) -> Result<Self> {
        ensure!(
            (1..=MAX_CHAIN).contains(&n),
            "a chain of {n} drafts: use 1 to {MAX_CHAIN} (chain:1 .. chain:{MAX_CHAIN})"
        );
        let paths: Vec<Vec<usize>> = (1..=n).map(|depth| vec![0; depth]).collect();
        Self::from_paths(&paths, DEFAULT_TOP_K)
    }

    /// Read a JSON list of paths from `path`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading tree file {}", path.display()))?;
        let paths: Vec<Vec<usize>> = serde_json::from_str(&text).with_context(|| {
            format!(
                "tree file {}: expected a JSON list of paths like [[0],[1],[0,0]]",
                path.display()
            )
        })?;
        Self::from_paths(&paths, DEFAULT_TOP_K)
            .with_context(|| format!("tree file {}", path.display()))
    }

    /// Build all buffers from a list of paths (any order; every prefix of a path must be listed).
    pub fn from_paths(paths: &[Vec<usize>], top_k: usize) -> Result<Self> {
        let sorted = sorted_paths(paths, top_k)?;
        let n = sorted.len() + 1;
        let mut all = Vec::with_capacity(n);
        all.push(Vec::new());
        all.extend(sorted);
        let index_of = |p: &[usize]| all.iter().position(|q| q.as_slice() == p);

        let mut parents = vec![0usize; n];
        let mut children = vec![Vec::new(); n];
        for i in 1..n {
            let parent_path = &all[i][..all[i].len() - 1];
            let parent = index_of(parent_path).with_context(|| {
                format!(
                    "tree path {:?} has no parent path {:?} in the tree",
                    all[i], parent_path
                )
            })?;
            parents[i] = parent;
            children[parent].push(i);
        }
        // Sorting by path makes each node's children come in rank order already.
        let mut tree = Tree {
            top_k,
            position_ids: all.iter().map(|p| p.len() as i64).collect(),
            paths: all,
            parents,
            children,
            attn_mask: Vec::new(),
            tree_indices: Vec::new(),
            retrieve_indices: Vec::new(),
            draft_rows: Vec::new(),
            draft_plan: Vec::new(),
        };
        tree.attn_mask = tree.build_attn_mask();
        tree.retrieve_indices = tree.build_retrieve_indices();
        tree.build_draft_plan();
        tree.tree_indices = tree.build_tree_indices();
        Ok(tree)
    }

    /// Number of verified tokens (draft nodes + root).
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Always false: a tree has at least its root.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Deepest path length (= number of draft depths the head must unroll).
    pub fn max_depth(&self) -> usize {
        self.paths.iter().map(|p| p.len()).max().unwrap_or(0)
    }

    /// Number of draft rows whose top-k the draft produces (root row + one per internal non-root node).
    pub fn n_draft_rows(&self) -> usize {
        self.draft_rows.iter().filter(|r| r.is_some()).count()
    }

    /// Ancestors of `node` from the root down to `node` itself.
    pub fn ancestry(&self, node: usize) -> Vec<usize> {
        let mut chain = vec![node];
        let mut cur = node;
        while cur != 0 {
            cur = self.parents[cur];
            chain.push(cur);
        }
        chain.reverse();
        chain
    }

    /// Whether every node's children have ranks 0..m-1 without gaps. Lossless tree sampling needs
    /// this: a draft token drawn (without replacement) at a skipped rank would never be verified.
    pub fn children_are_contiguous(&self) -> bool {
        self.children.iter().all(|ch| {
            ch.iter()
                .enumerate()
                .all(|(r, &c)| *self.paths[c].last().unwrap() == r)
        })
    }

    fn build_attn_mask(&self) -> Vec<Vec<bool>> {
        let n = self.len();
        let mut mask = vec![vec![false; n]; n];
        for (i, row) in mask.iter_mut().enumerate() {
            for a in self.ancestry(i) {
                row[a] = true;
            }
        }
        mask
    }

    /// Leaves (nodes without children), each as its node chain from the root, padded with -1 to
    /// max_depth + 1, sorted with -1 ordered after every node (the reference's `custom_sort`).
    fn build_retrieve_indices(&self) -> Vec<Vec<i64>> {
        let width = self.max_depth() + 1;
        let mut rows: Vec<Vec<i64>> = (0..self.len())
            .filter(|&i| self.children[i].is_empty())
            .map(|leaf| {
                let mut row: Vec<i64> = self.ancestry(leaf).iter().map(|&a| a as i64).collect();
                row.resize(width, -1);
                row
            })
            .collect();
        let key = |r: &Vec<i64>| {
            r.iter()
                .map(|&x| if x < 0 { i64::MAX } else { x })
                .collect::<Vec<_>>()
        };
        rows.sort_by_key(key);
        rows
    }

    /// Assign draft rows to internal nodes (root row 0, then per depth in node order) and build the
    /// per-depth gather plan from explicit parents.
    fn build_draft_plan(&mut self) {
        let n = self.len();
        let mut draft_rows = vec![None; n];
        draft_rows[0] = Some(0);
        let mut next_row = 1;
        let mut plan = Vec::new();
        // Rows of the previous step, relative to that step: the root alone for depth 1.
        let mut prev_step_rows: Vec<usize> = vec![0];
        for depth in 1..self.max_depth() {
            let nodes: Vec<usize> = (1..n)
                .filter(|&i| self.paths[i].len() == depth && !self.children[i].is_empty())
                .collect();
            if nodes.is_empty() {
                break;
            }
            let mut gather = Vec::with_capacity(nodes.len());
            let mut parent_rows = Vec::with_capacity(nodes.len());
            for &node in &nodes {
                let parent = self.parents[node];
                let parent_row = prev_step_rows
                    .iter()
                    .position(|&p| p == parent)
                    .expect("parent of an internal node is internal at the previous depth");
                let rank = *self.paths[node].last().unwrap();
                gather.push((parent_row * self.top_k + rank) as i64);
                parent_rows.push(parent_row as i64);
                draft_rows[node] = Some(next_row);
                next_row += 1;
            }
            prev_step_rows = nodes.clone();
            plan.push(DraftStep {
                nodes,
                gather,
                parent_rows,
            });
        }
        self.draft_rows = draft_rows;
        self.draft_plan = plan;
    }

    /// Node i's token sits in the draft top-k row of its parent at the column of its rank.
    fn build_tree_indices(&self) -> Vec<i64> {
        let mut idx = vec![0i64];
        for i in 1..self.len() {
            let parent_row = self.draft_rows[self.parents[i]].expect("parents are internal");
            let rank = *self.paths[i].last().unwrap();
            idx.push(1 + (parent_row * self.top_k + rank) as i64);
        }
        idx
    }

    /// Device copies of the buffers.
    pub fn to_device(&self, device: Device) -> TreeTensors {
        let n = self.len() as i64;
        let flat_mask: Vec<bool> = self.attn_mask.iter().flatten().copied().collect();
        let width = (self.max_depth() + 1) as i64;
        let retrieve: Vec<i64> = self.retrieve_indices.iter().flatten().copied().collect();
        TreeTensors {
            attn_mask: Tensor::from_slice(&flat_mask)
                .view([n, n])
                .to_device(device),
            position_ids: Tensor::from_slice(&self.position_ids).to_device(device),
            tree_indices: Tensor::from_slice(&self.tree_indices).to_device(device),
            retrieve_indices: Tensor::from_slice(&retrieve)
                .view([self.retrieve_indices.len() as i64, width])
                .to_device(device),
            draft_gather: self
                .draft_plan
                .iter()
                .map(|s| Tensor::from_slice(&s.gather).to_device(device))
                .collect(),
            draft_parent_rows: self
                .draft_plan
                .iter()
                .map(|s| Tensor::from_slice(&s.parent_rows).to_device(device))
                .collect(),
        }
    }
}

/// Device-resident tree buffers, built once per generation.
#[derive(Debug)]
pub struct TreeTensors {
    /// bool [n, n]
    pub attn_mask: Tensor,
    /// i64 [n]
    pub position_ids: Tensor,
    /// i64 [n]
    pub tree_indices: Tensor,
    /// i64 [paths, max_depth+1], -1 padded
    pub retrieve_indices: Tensor,
    /// per draft step: i64 gather indices into the flattened previous top-k
    pub draft_gather: Vec<Tensor>,
    /// per draft step: i64 parent state rows
    pub draft_parent_rows: Vec<Tensor>,
}

impl TreeTensors {
    /// Teacher mask for verifying the tree after `prefix_len` committed positions:
    /// bool [1, 1, n, prefix_len + n], prefix fully visible, tree part = ancestors (docs/clover2.md G16).
    pub fn verify_mask(&self, prefix_len: i64) -> Tensor {
        let n = self.attn_mask.size()[0];
        let device = self.attn_mask.device();
        let prefix = Tensor::ones([n, prefix_len], (Kind::Bool, device));
        Tensor::cat(&[prefix, self.attn_mask.shallow_clone()], 1).view([1, 1, n, prefix_len + n])
    }
}

/// Validate and sort paths by (length, path) like the reference's `sorted_tree_choices`.
fn sorted_paths(paths: &[Vec<usize>], top_k: usize) -> Result<Vec<Vec<usize>>> {
    ensure!(!paths.is_empty(), "tree has no paths");
    let mut sorted = paths.to_vec();
    for p in &sorted {
        ensure!(
            !p.is_empty(),
            "tree contains an empty path (the root is implicit)"
        );
        if let Some(&bad) = p.iter().find(|&&j| j >= top_k) {
            bail!("tree path {p:?}: entry {bad} is not below top-k {top_k}");
        }
    }
    sorted.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        bail!("tree path {:?} is listed twice", w[0]);
    }
    Ok(sorted)
}

/// The default tree's buffers against docs/clover2.md §4.2 / §4.4, and explicit parents (G11).
#[cfg(test)]
mod tests {
    use super::*;

    fn default_tree() -> Tree {
        Tree::default_tree()
    }

    #[test]
    fn default_tree_has_26_tokens_and_depth_counts() {
        let t = default_tree();
        assert_eq!(t.len(), 26);
        assert_eq!(t.max_depth(), 5);
        let mut counts = [0usize; 6];
        for p in &t.paths {
            counts[p.len()] += 1;
        }
        assert_eq!(counts, [1, 4, 8, 8, 3, 2]);
        assert_eq!(t.retrieve_indices.len(), 15);
    }

    #[test]
    fn default_position_ids_are_depths() {
        let want: Vec<i64> = std::iter::once(0)
            .chain([1; 4])
            .chain([2; 8])
            .chain([3; 8])
            .chain([4; 3])
            .chain([5; 2])
            .collect();
        assert_eq!(default_tree().position_ids, want);
    }

    #[test]
    fn default_tree_indices_equal_spec() {
        let want = vec![
            0, 1, 2, 3, 4, 11, 12, 13, 21, 22, 31, 32, 41, 51, 52, 53, 61, 62, 71, 72, 81, 91, 92,
            93, 101, 102,
        ];
        assert_eq!(default_tree().tree_indices, want);
    }

    #[test]
    fn default_retrieve_indices_equal_spec() {
        let m = -1;
        let want: Vec<Vec<i64>> = vec![
            vec![0, 1, 5, 13, 21, 24],
            vec![0, 1, 5, 13, 21, 25],
            vec![0, 1, 5, 13, 22, m],
            vec![0, 1, 5, 13, 23, m],
            vec![0, 1, 5, 14, m, m],
            vec![0, 1, 5, 15, m, m],
            vec![0, 1, 6, 16, m, m],
            vec![0, 1, 6, 17, m, m],
            vec![0, 1, 7, 18, m, m],
            vec![0, 1, 7, 19, m, m],
            vec![0, 2, 8, 20, m, m],
            vec![0, 2, 9, m, m, m],
            vec![0, 3, 10, m, m, m],
            vec![0, 3, 11, m, m, m],
            vec![0, 4, 12, m, m, m],
        ];
        assert_eq!(default_tree().retrieve_indices, want);
    }

    #[test]
    fn default_attn_mask_is_diagonal_root_and_ancestors() {
        let t = default_tree();
        // Spell the mask out from the paths independently of the builder: j is visible to i iff
        // path(j) is a prefix of path(i).
        let paths = &t.paths;
        for i in 0..26 {
            for j in 0..26 {
                let want = paths[i].starts_with(&paths[j]);
                assert_eq!(t.attn_mask[i][j], want, "mask[{i}][{j}]");
            }
        }
        // Spot checks from docs/clover2.md §4.4: column 0 everywhere, diagonal, and node 24 = [0,0,0,0,0]
        // sees exactly 0,1,5,13,21,24.
        assert!((0..26).all(|i| t.attn_mask[i][0] && t.attn_mask[i][i]));
        let row24: Vec<usize> = (0..26).filter(|&j| t.attn_mask[24][j]).collect();
        assert_eq!(row24, vec![0, 1, 5, 13, 21, 24]);
        assert_eq!(
            t.attn_mask.iter().flatten().filter(|&&b| b).count(),
            26 + 25 + 21 + 13 + 5 + 2
        );
    }

    #[test]
    fn default_draft_plan_equals_spec_4_2() {
        let t = default_tree();
        let internal: Vec<usize> = t.draft_plan.iter().map(|s| s.nodes.len()).collect();
        assert_eq!(internal, vec![4, 4, 1, 1]);
        let gathers: Vec<Vec<i64>> = t.draft_plan.iter().map(|s| s.gather.clone()).collect();
        assert_eq!(
            gathers,
            vec![vec![0, 1, 2, 3], vec![0, 1, 2, 10], vec![0], vec![0]]
        );
        let repeat_nums: Vec<Vec<usize>> = t
            .draft_plan
            .iter()
            .map(|s| run_lengths(&s.parent_rows))
            .collect();
        assert_eq!(repeat_nums, vec![vec![4], vec![3, 1], vec![1], vec![1]]);
        let expanded: Vec<Vec<Vec<usize>>> = t
            .draft_plan
            .iter()
            .map(|s| s.nodes.iter().map(|&n| t.paths[n].clone()).collect())
            .collect();
        assert_eq!(
            expanded,
            vec![
                vec![vec![0], vec![1], vec![2], vec![3]],
                vec![vec![0, 0], vec![0, 1], vec![0, 2], vec![1, 0]],
                vec![vec![0, 0, 0]],
                vec![vec![0, 0, 0, 0]],
            ]
        );
        assert_eq!(t.n_draft_rows(), 11);
    }

    fn run_lengths(v: &[i64]) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for (i, x) in v.iter().enumerate() {
            if i > 0 && v[i - 1] == *x {
                *out.last_mut().unwrap() += 1;
            } else {
                out.push(1);
            }
        }
        out
    }

    /// G11: here the depth-2 internal node hangs under the SECOND depth-1 node only, so the parents
    /// are not a prefix of the previous depth; the reference's bias counter would gather from row 0.
    #[test]
    fn explicit_parents_handle_non_prefix_trees() {
        let paths = vec![vec![0], vec![1], vec![1, 0], vec![1, 0, 3], vec![0, 2]];
        let t = Tree::from_paths(&paths, 4).unwrap();
        // node order: root, [0], [1], [0,2], [1,0], [1,0,3]
        assert_eq!(t.paths[4], vec![1, 0]);
        assert_eq!(t.draft_plan.len(), 2);
        // depth 1: internal [0] and [1] from the root row
        assert_eq!(t.draft_plan[0].gather, vec![0, 1]);
        // depth 2: only [1,0] is internal; its parent [1] is row 1 of step 1 -> 1*4 + 0
        assert_eq!(t.draft_plan[1].gather, vec![4]);
        assert_eq!(t.draft_plan[1].parent_rows, vec![1]);
        // draft rows: root 0, [0] 1, [1] 2, [1,0] 3 -> [1,0,3] at 1 + 3*4 + 3
        assert_eq!(
            t.tree_indices,
            vec![0, 1, 2, 1 + 4 + 2, 1 + 2 * 4, 1 + 3 * 4 + 3]
        );
        assert!(!t.children_are_contiguous()); // [0] has only child rank 2
    }

    #[test]
    fn chain_is_one_top_draft_per_depth() {
        let t = Tree::chain(3).unwrap();
        assert_eq!(t.paths, vec![vec![], vec![0], vec![0, 0], vec![0, 0, 0]]);
        assert_eq!(t.parents, vec![0, 0, 1, 2]);
        assert_eq!((t.len(), t.max_depth()), (4, 3));
        assert_eq!(t.retrieve_indices, vec![vec![0, 1, 2, 3]]);
        // One draft row per internal node, each expanding its rank-0 entry.
        assert_eq!(t.tree_indices, vec![0, 1, 11, 21]);
        assert!(t.children_are_contiguous());
        assert_eq!(Tree::chain(MAX_CHAIN).unwrap().max_depth(), MAX_CHAIN);
        for n in [0, MAX_CHAIN + 1] {
            let err = Tree::chain(n).unwrap_err().to_string();
            assert!(err.contains(&format!("1 to {MAX_CHAIN}")), "{err}");
        }
    }

    #[test]
    fn bad_trees_are_rejected() {
        assert!(
            Tree::from_paths(&[vec![0, 1]], 10).is_err(),
            "missing parent"
        );
        assert!(
            Tree::from_paths(&[vec![0], vec![0]], 10).is_err(),
            "duplicate"
        );
        assert!(
            Tree::from_paths(&[vec![10]], DEFAULT_TOP_K).is_err(),
            "rank >= top-k"
        );
        assert!(Tree::from_paths(&[], 10).is_err(), "empty");
    }
}
