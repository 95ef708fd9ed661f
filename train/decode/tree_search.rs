//! The tree that maximises expected committed tokens per second, from a head's acceptance table and
//! a device's measured costs (`clover calibrate`, `clover eval --tree auto`).
//!
//! Model (greedy verification, docs/clover2.md §4.6): the draft at depth d and sibling rank r is
//! accepted, given that its parent was, with probability `acceptance[d-1][r]`; the ranks of one
//! depth are disjoint events (the teacher has one argmax), so a node is accepted with the product
//! of its path's entries and a step commits `1 + Σ_nodes P(node)` tokens in expectation. A step of
//! a tree costs the depth-0 draft call, one draft step per depth that has internal nodes (as a
//! function of how many it expands), and the teacher's verification of all its tokens; plain
//! decoding commits 1 token per plain step. The answer is whichever is faster, plain decoding
//! included, so the search never chooses a loss its own measurements can see.
//!
//! Search (Medusa's greedy growth, bounded like Sequoia's): for each depth bound D <= max_depth,
//! nodes are added one at a time in order of their acceptance probability (a node becomes a
//! candidate once its parent and its next-lower-ranked sibling are in, so every node's children
//! are ranks 0..m-1, as lossless sampling needs), and every prefix of that order is scored with
//! the full cost model. Without draft-step costs the prefix of size n is the most probable
//! n-node tree whenever the table falls with rank, so the search is exact there; the depth
//! bounds cover the trade-off between one more draft step and wider, shallower trees.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::checks::Problems;

/// A measured curve: (x, milliseconds) points with increasing x, read by linear interpolation
/// and extrapolated from the last two points (flat with a single point).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    pub points: Vec<(usize, f64)>,
}

impl Curve {
    pub fn new(mut points: Vec<(usize, f64)>) -> Result<Self> {
        points.sort_by_key(|p| p.0);
        let curve = Self { points };
        let mut p = Problems::default();
        curve.check("points", &mut p);
        p.into_result("cost curve")?;
        Ok(curve)
    }

    /// Records what no curve can be (`field` names it): no points (`at` would have nothing to
    /// read), a size measured twice or out of order, a time that is negative or not finite.
    pub fn check(&self, field: &str, p: &mut Problems) {
        self.check_times(field, p, |ms| ms >= 0.0, "a finite time >= 0");
    }

    /// As `check`, for a curve a device measured: every time is > 0 as well (a step that costs
    /// nothing would be infinitely fast, and no measurement reads 0).
    pub fn check_measured(&self, field: &str, p: &mut Problems) {
        self.check_times(field, p, |ms| ms > 0.0, "a finite time > 0");
    }

    fn check_times(&self, field: &str, p: &mut Problems, ok: fn(f64) -> bool, what: &str) {
        let points = &self.points;
        p.require(!points.is_empty(), field, "no points: a curve needs one");
        p.require(
            points.windows(2).all(|w| w[0].0 < w[1].0),
            field,
            "sizes must increase: each is measured once",
        );
        if let Some(bad) = points.iter().find(|q| !(q.1.is_finite() && ok(q.1))) {
            p.require(
                false,
                field,
                format!("{} ms at size {} is not {what}", bad.1, bad.0),
            );
        }
    }

    /// The same curve made non-decreasing by taking, at each x, the least time measured at x
    /// or any larger x. Contention from other processes only ever adds time, so a point above a
    /// later one is noise; this keeps the cheapest consistent reading (a larger tree never costs
    /// less to verify).
    pub fn monotone(&self) -> Self {
        let mut points = self.points.clone();
        for i in (0..points.len().saturating_sub(1)).rev() {
            points[i].1 = points[i].1.min(points[i + 1].1);
        }
        Self { points }
    }

    /// Milliseconds at `x`.
    pub fn at(&self, x: usize) -> f64 {
        let p = &self.points;
        let x = x as f64;
        let seg = match p.iter().position(|q| q.0 as f64 >= x) {
            _ if p.len() == 1 => return p[0].1,
            Some(0) => (0, 1),
            Some(i) => (i - 1, i),
            None => (p.len() - 2, p.len() - 1),
        };
        let (x0, y0) = (p[seg.0].0 as f64, p[seg.0].1);
        let (x1, y1) = (p[seg.1].0 as f64, p[seg.1].1);
        (y0 + (y1 - y0) * (x - x0) / (x1 - x0)).max(0.0)
    }
}

/// What one decoding step costs on a device, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    /// Teacher verification (forward, logits, acceptance) of n tree tokens, root included.
    pub verify_ms: Curve,
    /// One draft step at depth >= 1 (RNN step, logits, top-k) on m expanded nodes.
    pub draft_step_ms: Curve,
    /// The depth-0 draft call on the accepted states plus the root row's logits and top-k.
    pub depth0_ms: f64,
    /// One plain greedy decoding step.
    pub plain_ms: f64,
}

impl Costs {
    /// Records every cost no device measures: see `Curve::check_measured`; the two single times
    /// must be finite and > 0 as well.
    pub fn check_measured(&self, p: &mut Problems) {
        self.verify_ms.check_measured("costs.verify_ms", p);
        self.draft_step_ms.check_measured("costs.draft_step_ms", p);
        for (field, ms) in [
            ("costs.depth0_ms", self.depth0_ms),
            ("costs.plain_ms", self.plain_ms),
        ] {
            p.require(
                ms.is_finite() && ms > 0.0,
                field,
                format!("{ms} is not a finite time > 0"),
            );
        }
    }
}

/// Bounds of the search.
#[derive(Debug, Clone, Copy)]
pub struct SearchLimits {
    /// Draft nodes, the root not counted.
    pub max_nodes: usize,
    pub max_depth: usize,
}

/// The chosen tree and what the model expects of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchResult {
    /// Draft paths; empty = plain decoding.
    pub paths: Vec<Vec<usize>>,
    /// Expected committed tokens per step (tau).
    pub expected_tau: f64,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    pub plain_tokens_per_s: f64,
}

impl SearchResult {
    pub fn is_plain(&self) -> bool {
        self.paths.is_empty()
    }
}

/// Expected tau of a tree under `acceptance` (nodes outside the table are never accepted).
pub fn expected_tau(paths: &[Vec<usize>], acceptance: &[Vec<f64>]) -> f64 {
    1.0 + paths
        .iter()
        .map(|p| path_probability(p, acceptance))
        .sum::<f64>()
}

fn path_probability(path: &[usize], acceptance: &[Vec<f64>]) -> f64 {
    path.iter()
        .enumerate()
        .map(|(d, &r)| {
            acceptance
                .get(d)
                .and_then(|row| row.get(r))
                .copied()
                .unwrap_or(0.0)
        })
        .product()
}

/// Milliseconds of one step with this tree (`paths` non-empty).
pub fn step_ms(paths: &[Vec<usize>], costs: &Costs) -> f64 {
    let depth = paths.iter().map(Vec::len).max().unwrap_or(0);
    let draft: f64 = (1..depth)
        .map(|d| {
            let internal = paths
                .iter()
                .filter(|p| {
                    p.len() == d && paths.iter().any(|c| c.len() == d + 1 && c[..d] == p[..])
                })
                .count();
            if internal > 0 {
                costs.draft_step_ms.at(internal)
            } else {
                0.0
            }
        })
        .sum();
    costs.depth0_ms + draft + verify_floor_ms(paths.len() + 1, costs)
}

/// Verifying `n` tree tokens runs the teacher's forward over them all, plus the acceptance walk:
/// never less than one plain step. A measured curve below the plain step is timing noise (two
/// separately timed medians), and trusting it would let a tree that commits nothing extra look
/// faster than plain decoding.
fn verify_floor_ms(n: usize, costs: &Costs) -> f64 {
    costs.verify_ms.at(n).max(costs.plain_ms)
}

/// Committed tokens per second of a tree (plain decoding for no paths).
pub fn tokens_per_s(paths: &[Vec<usize>], acceptance: &[Vec<f64>], costs: &Costs) -> f64 {
    if paths.is_empty() {
        return 1000.0 / costs.plain_ms;
    }
    1000.0 * expected_tau(paths, acceptance) / step_ms(paths, costs)
}

/// The fastest tree within `limits` (plain decoding when no tree beats it).
pub fn best_tree(acceptance: &[Vec<f64>], costs: &Costs, limits: SearchLimits) -> SearchResult {
    let plain = 1000.0 / costs.plain_ms;
    let mut best: (f64, Vec<Vec<usize>>) = (plain, Vec::new());
    let table_depth = acceptance.len().min(limits.max_depth);
    for depth_bound in 1..=table_depth {
        let order = growth_order(acceptance, depth_bound, limits.max_nodes);
        for n in 1..=order.len() {
            let paths = &order[..n];
            let speed = tokens_per_s(paths, acceptance, costs);
            if speed > best.0 {
                best = (speed, paths.to_vec());
            }
        }
    }
    let (speed, paths) = best;
    SearchResult {
        expected_tau: expected_tau(&paths, acceptance),
        step_ms: if paths.is_empty() {
            costs.plain_ms
        } else {
            step_ms(&paths, costs)
        },
        tokens_per_s: speed,
        plain_tokens_per_s: plain,
        paths,
    }
}

/// Up to `max_nodes` paths of depth <= `depth_bound`, most probable first; a node is a
/// candidate once its parent and its next-lower-ranked sibling are in.
fn growth_order(acceptance: &[Vec<f64>], depth_bound: usize, max_nodes: usize) -> Vec<Vec<usize>> {
    let rank_ok = |d: usize, r: usize| acceptance.get(d).is_some_and(|row| r < row.len());
    let mut order: Vec<Vec<usize>> = Vec::new();
    let mut frontier: Vec<(f64, Vec<usize>)> = Vec::new();
    if rank_ok(0, 0) {
        frontier.push((acceptance[0][0], vec![0]));
    }
    while order.len() < max_nodes && !frontier.is_empty() {
        // Highest probability first; on ties the shorter, lower-ranked path (stable order).
        let i = (0..frontier.len())
            .max_by(|&a, &b| {
                let (pa, qa) = (&frontier[a].0, &frontier[a].1);
                let (pb, qb) = (&frontier[b].0, &frontier[b].1);
                pa.total_cmp(pb)
                    .then_with(|| (qb.len(), qb).cmp(&(qa.len(), qa)))
            })
            .unwrap();
        let (p, path) = frontier.swap_remove(i);
        let d = path.len();
        let r = *path.last().unwrap();
        if d < depth_bound && rank_ok(d, 0) {
            let mut child = path.clone();
            child.push(0);
            frontier.push((p * acceptance[d][0], child));
        }
        if rank_ok(d - 1, r + 1) {
            let parent_p = path_probability(&path[..d - 1], acceptance);
            let mut sibling = path.clone();
            *sibling.last_mut().unwrap() = r + 1;
            frontier.push((parent_p * acceptance[d - 1][r + 1], sibling));
        }
        order.push(path);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_nodes: usize, max_depth: usize) -> SearchLimits {
        SearchLimits {
            max_nodes,
            max_depth,
        }
    }

    fn costs(verify: Vec<(usize, f64)>, step: f64, depth0: f64, plain: f64) -> Costs {
        Costs {
            verify_ms: Curve::new(verify).unwrap(),
            draft_step_ms: Curve::new(vec![(1, step)]).unwrap(),
            depth0_ms: depth0,
            plain_ms: plain,
        }
    }

    #[test]
    fn curve_interpolates_and_extrapolates() {
        let c = Curve::new(vec![(4, 20.0), (1, 10.0)]).unwrap();
        assert_eq!(c.at(1), 10.0);
        assert!((c.at(2) - 10.0 - 10.0 / 3.0).abs() < 1e-12);
        assert!((c.at(7) - 30.0).abs() < 1e-12);
        assert!(Curve::new(vec![(1, 1.0), (1, 2.0)]).is_err());
        let noisy = Curve::new(vec![(1, 5.0), (2, 9.0), (3, 6.0), (4, 8.0)]).unwrap();
        let m = noisy.monotone();
        assert_eq!(m.points, vec![(1, 5.0), (2, 6.0), (3, 6.0), (4, 8.0)]);
    }

    #[test]
    fn plain_decoding_when_drafting_cannot_pay() {
        // Verifying even 2 tokens costs twice a plain step: no tree can commit 2 per step.
        let acc = vec![vec![0.9, 0.05], vec![0.9]];
        let c = costs(vec![(1, 10.0), (64, 640.0)], 0.0, 0.0, 10.0);
        let r = best_tree(&acc, &c, limits(8, 2));
        assert!(r.is_plain(), "{r:?}");
        assert_eq!(r.tokens_per_s, 100.0);
        // A head that is never right never pays either, however cheap the tree.
        let zero = vec![vec![0.0; 3]; 3];
        let c = costs(vec![(1, 10.0), (64, 10.0)], 0.0, 0.1, 10.0);
        assert!(best_tree(&zero, &c, limits(8, 3)).is_plain());
    }

    /// Verification timed below a plain step (noise between two medians, as seen on a busy
    /// 2-core CPU: 72 ms against 92 ms) must not make a tree that accepts nothing look faster.
    #[test]
    fn a_tree_that_accepts_nothing_never_beats_plain_decoding() {
        let acc = vec![vec![0.0; 4], vec![0.0; 4]];
        let c = costs(vec![(1, 72.0), (4, 88.0)], 2.3, 8.9, 92.0);
        let r = best_tree(&acc, &c, limits(4, 2));
        assert!(r.paths.is_empty(), "chose {:?}", r.paths);
        assert_eq!(r.tokens_per_s, 1000.0 / 92.0);
    }

    #[test]
    fn hand_made_table_gives_the_known_optimum() {
        // Verification is free up to 3 tokens then expensive; draft steps cost 1 ms. With these
        // numbers the chain [0],[0,0] (tau 1 + .6 + .48 = 2.08, 1+1+10 = 12 ms: 173/s) beats
        // [0],[1] (tau 1.9, 11 ms: 172.7/s), [0] alone (1.6/11 ms: 145/s) and plain (100/s).
        let acc = vec![vec![0.6, 0.3], vec![0.8, 0.1]];
        let c = costs(vec![(1, 10.0), (3, 10.0), (4, 40.0)], 1.0, 1.0, 10.0);
        let r = best_tree(&acc, &c, limits(8, 2));
        assert_eq!(r.paths, vec![vec![0], vec![0, 0]]);
        assert!((r.expected_tau - 2.08).abs() < 1e-12);
        assert!((r.tokens_per_s - 2080.0 / 12.0).abs() < 1e-9);
        // A dearer draft step flips it to the flat tree (1.9 / 11 ms).
        let c = costs(vec![(1, 10.0), (3, 10.0), (4, 40.0)], 1.5, 1.0, 10.0);
        let r = best_tree(&acc, &c, limits(8, 2));
        assert_eq!(r.paths, vec![vec![0], vec![1]]);
        // The depth bound is honoured.
        let c = costs(vec![(1, 10.0), (3, 10.0), (4, 40.0)], 1.0, 1.0, 10.0);
        let r = best_tree(&acc, &c, limits(8, 1));
        assert_eq!(r.paths, vec![vec![0], vec![1]]);
    }

    /// Every tree of up to `max_nodes` draft nodes, depth <= depth, ranks < k, children
    /// contiguous: grown one admissible node at a time, each set kept once (sorted).
    fn all_trees(max_nodes: usize, depth: usize, k: usize) -> Vec<Vec<Vec<usize>>> {
        let mut seen = std::collections::BTreeSet::new();
        let mut layer: Vec<Vec<Vec<usize>>> = vec![vec![]];
        for _ in 0..max_nodes {
            let mut next = Vec::new();
            for set in &layer {
                let mut options: Vec<Vec<usize>> = vec![vec![0]];
                for p in set {
                    if p.len() < depth {
                        options.push([p.clone(), vec![0]].concat());
                    }
                    let r = *p.last().unwrap();
                    if r + 1 < k {
                        let mut sibling = p.clone();
                        *sibling.last_mut().unwrap() = r + 1;
                        options.push(sibling);
                    }
                }
                for o in options {
                    if set.contains(&o) {
                        continue;
                    }
                    let mut grown = set.clone();
                    grown.push(o);
                    grown.sort();
                    if seen.insert(grown.clone()) {
                        next.push(grown);
                    }
                }
            }
            layer = next;
        }
        seen.into_iter().collect()
    }

    #[test]
    fn search_matches_brute_force_without_draft_step_costs() {
        // Rank-decreasing tables and a convex verification curve; every contiguous tree of up to
        // 5 nodes, depth 3, top-3 is scored and the search must reach the best score.
        let tables = [
            vec![
                vec![0.5, 0.2, 0.1],
                vec![0.7, 0.1, 0.05],
                vec![0.6, 0.3, 0.0],
            ],
            vec![
                vec![0.3, 0.25, 0.2],
                vec![0.2, 0.1, 0.1],
                vec![0.9, 0.05, 0.01],
            ],
            vec![
                vec![0.9, 0.05, 0.01],
                vec![0.9, 0.05, 0.01],
                vec![0.9, 0.05, 0.01],
            ],
        ];
        let trees = all_trees(5, 3, 3);
        // Sanity of the enumeration: trees of 1 node: {[0]}; of 2: {[0],[1]}, {[0],[0,0]}.
        assert_eq!(trees.iter().filter(|t| t.len() == 1).count(), 1);
        assert_eq!(trees.iter().filter(|t| t.len() == 2).count(), 2);
        for acc in &tables {
            for verify in [
                vec![(1, 10.0), (2, 10.5), (4, 12.0), (6, 16.0)],
                vec![(1, 10.0), (6, 11.0)],
                vec![(1, 10.0), (2, 15.0), (6, 40.0)],
            ] {
                let c = costs(verify, 0.0, 0.5, 10.0);
                let brute = trees
                    .iter()
                    .map(|t| tokens_per_s(t, acc, &c))
                    .fold(1000.0 / c.plain_ms, f64::max);
                let r = best_tree(acc, &c, limits(5, 3));
                assert!(
                    (r.tokens_per_s - brute).abs() < 1e-9 * brute,
                    "search {} vs brute force {brute} ({:?})",
                    r.tokens_per_s,
                    r.paths
                );
            }
        }
    }
}
