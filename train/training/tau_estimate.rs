//! A training-time estimate of tau, the tokens committed per target forward pass (1 + the
//! accepted drafts), from the held-out data along the teacher's own path (docs/clover2.md §5.2).
//! It ranks checkpoints (the run keeps the best by it); it is not the tau `clover eval` serves.
//!
//! Per start position the draft's depths are run along the teacher's tokens, exactly the
//! situation of a verification step whose earlier drafts were all accepted
//! (`training::teacher_path`), and two figures are taken per depth d:
//! - r_d, the rank of the teacher's greedy token among depth d's logits (0 = the draft's top);
//! - α_d = Σ_v min(p_T(v), q_T(v)) = 1 − TV(p_T, q_T), the chance that a token drawn from the
//!   draft's q_T is accepted by the residual rule of `decode::speculative::accept_sampling`
//!   against the teacher's p_T.
//!
//! Greedy, a tree node with path [p_0..p_k] is accepted iff r_j = p_j for every j ≤ k, so a
//! start commits 1 + the length of the longest prefix (r_0..r_{k-1}) that is a path of the tree.
//! Sampled, a chain of N commits 1 + Σ_{k=1..N} Π_{j<k} α_j in expectation. Both are averaged
//! over the starts.

use crate::checks::Problems;
use crate::decode::tree::{Tree, MAX_CHAIN};
use crate::model::head_config::HeadOptions;

/// The rank of a token the head cannot draft: past its last depth (Medusa) or outside its draft
/// vocabulary. It matches no path.
pub const NOT_DRAFTED: u32 = u32::MAX;

/// The chain length of the estimate when the config names none, where the head has that many
/// depths: the chain of 7 that newer papers report.
pub const DEFAULT_CHAIN: usize = 7;

/// The temperature of the sampled chain estimate (`tau_est_chain_t1`).
pub const SAMPLED_TEMPERATURE: f64 = 1.0;

/// What the draft did at one start, per depth: the teacher token's rank and, for the depths of
/// the sampled chain, the acceptance probability α.
#[derive(Debug, Clone, PartialEq)]
pub struct StartDrafts {
    pub ranks: Vec<u32>,
    pub alphas: Vec<f64>,
}

/// The estimates of one held-out evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TauEstimate {
    /// Greedy, the default tree (`mc_sim_7b_63`).
    pub default_tree: f64,
    /// Greedy, a chain of `chain_depth` drafts.
    pub chain: f64,
    /// At T = `SAMPLED_TEMPERATURE`, a chain of `chain_depth` drafts.
    pub chain_t1: f64,
    pub chain_depth: usize,
    /// Starts averaged over; with none every estimate is 1 (nothing measured: no draft counted).
    pub starts: usize,
}

/// Drafts of `tree` accepted at a start whose teacher tokens have `ranks`: the walk from the root
/// descends into the child whose sibling rank is the teacher token's, while there is one.
pub fn tree_accepted(tree: &Tree, ranks: &[u32]) -> usize {
    let mut node = 0;
    let mut accepted = 0;
    for &rank in ranks {
        let child = tree.children[node]
            .iter()
            .find(|&&c| tree.paths[c].last().map(|&r| r as u32) == Some(rank));
        match child {
            Some(&c) => {
                node = c;
                accepted += 1;
            }
            None => break,
        }
    }
    accepted
}

/// Expected committed tokens of a chain whose depth j is accepted with probability `alphas[j]`
/// once the earlier ones were: 1 + Σ_k Π_{j<k} α_j (the draft at depth k counts only when all
/// before it were accepted).
pub fn chain_expected_tau(alphas: &[f64]) -> f64 {
    let mut all_accepted = 1.0;
    let mut tau = 1.0;
    for &a in alphas {
        all_accepted *= a;
        tau += all_accepted;
    }
    tau
}

/// Sums of the per-start figures of one evaluation.
pub struct TauEstimator {
    tree: Tree,
    chain: Tree,
    chain_depth: usize,
    tree_sum: f64,
    chain_sum: f64,
    sampled_sum: f64,
    starts: usize,
}

impl TauEstimator {
    /// An estimator of the default tree and a chain of `chain_depth` (1 to `MAX_CHAIN`) drafts.
    pub fn new(chain_depth: usize) -> anyhow::Result<Self> {
        Ok(TauEstimator {
            tree: Tree::default_tree(),
            chain: Tree::chain(chain_depth)?,
            chain_depth,
            tree_sum: 0.0,
            chain_sum: 0.0,
            sampled_sum: 0.0,
            starts: 0,
        })
    }

    /// Depths every start needs ranks for: the deeper of the tree and the chain.
    pub fn depths(&self) -> usize {
        self.tree.max_depth().max(self.chain_depth)
    }

    /// Depths every start needs α for: the sampled chain's.
    pub fn sampled_depths(&self) -> usize {
        self.chain_depth
    }

    /// Adds one start (ranks for `depths()`, α for `sampled_depths()`).
    pub fn add(&mut self, start: &StartDrafts) {
        debug_assert!(start.ranks.len() >= self.depths());
        debug_assert!(start.alphas.len() >= self.chain_depth);
        self.tree_sum += tree_accepted(&self.tree, &start.ranks) as f64;
        self.chain_sum += tree_accepted(&self.chain, &start.ranks) as f64;
        self.sampled_sum += chain_expected_tau(&start.alphas[..self.chain_depth]) - 1.0;
        self.starts += 1;
    }

    pub fn finish(&self) -> TauEstimate {
        let mean = |sum: f64| 1.0 + sum / self.starts.max(1) as f64;
        TauEstimate {
            default_tree: mean(self.tree_sum),
            chain: mean(self.chain_sum),
            chain_t1: mean(self.sampled_sum),
            chain_depth: self.chain_depth,
            starts: self.starts,
        }
    }
}

/// The deepest chain the head drafts (`HeadArch::deepest_draft`, as decoding's
/// `decode::drafter::deepest_draft`).
fn deepest(head: &HeadOptions) -> usize {
    crate::model::kinds::arch_of(head.head)
        .deepest_draft(head)
        .unwrap_or(MAX_CHAIN)
}

/// The chain length of the estimate: `tau_chain_depth` when set, else `num_depths` up to
/// `DEFAULT_CHAIN`.
pub fn chain_depth(configured: Option<usize>, head: &HeadOptions) -> usize {
    configured.unwrap_or((head.num_depths.max(1) as usize).min(DEFAULT_CHAIN))
}

/// `tau_chain_depth`'s range, checked with the rest of the training config at load.
pub fn check_chain_depth(configured: Option<usize>, head: &HeadOptions, p: &mut Problems) {
    let Some(n) = configured else {
        return;
    };
    let most = deepest(head).min(MAX_CHAIN);
    p.require(
        (1..=most).contains(&n),
        "tau_chain_depth",
        format!(
            "{n}: the estimate's chain needs 1 to {most} drafts ({} head with num_depths = {})",
            head.head.name(),
            head.num_depths
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::head_config::HeadKind;

    fn start(ranks: &[u32], alphas: &[f64]) -> StartDrafts {
        StartDrafts {
            ranks: ranks.to_vec(),
            alphas: alphas.to_vec(),
        }
    }

    /// The default tree's paths (docs/clover2.md §4.1) walked by hand.
    #[test]
    fn default_tree_accepts_the_longest_prefix_that_is_a_path() {
        let tree = Tree::default_tree();
        for (ranks, want) in [
            // Top draft at every depth: the deepest path [0,0,0,0,0].
            (vec![0, 0, 0, 0, 0], 5),
            // [0,0,0,0,1] is a path too.
            (vec![0, 0, 0, 0, 1], 5),
            // [0,0,0,0,2] is not; [0,0,0,0] is.
            (vec![0, 0, 0, 0, 2], 4),
            // Depth 0 wrong beyond rank 3: nothing.
            (vec![4, 0, 0, 0, 0], 0),
            (vec![NOT_DRAFTED, 0, 0, 0, 0], 0),
            // [3] and [3,0] are paths, [3,0,0] is not.
            (vec![3, 0, 0, 0, 0], 2),
            // [1,0,0] is the only depth-3 path under [1].
            (vec![1, 0, 0, 0, 0], 3),
            (vec![1, 1, 0, 0, 0], 2),
            (vec![1, 2, 0, 0, 0], 1),
            // [0,2,1] is a path, [0,2,2] is not.
            (vec![0, 2, 1, 0, 0], 3),
            (vec![0, 2, 2, 0, 0], 2),
            (vec![2, 1, 0, 0, 0], 2),
        ] {
            assert_eq!(tree_accepted(&tree, &ranks), want, "ranks {ranks:?}");
        }
    }

    #[test]
    fn chain_accepts_the_leading_top_drafts() {
        let chain = Tree::chain(3).unwrap();
        assert_eq!(tree_accepted(&chain, &[0, 0, 0, 0, 0]), 3, "capped at 3");
        assert_eq!(tree_accepted(&chain, &[0, 0, 1, 0, 0]), 2);
        assert_eq!(tree_accepted(&chain, &[1, 0, 0, 0, 0]), 0);
    }

    #[test]
    fn chain_expectation_is_the_sum_of_running_products() {
        assert_eq!(chain_expected_tau(&[]), 1.0);
        assert_eq!(chain_expected_tau(&[1.0, 1.0, 1.0]), 4.0);
        assert_eq!(chain_expected_tau(&[0.0, 1.0, 1.0]), 1.0);
        // 1 + 0.5 + 0.5·0.25 + 0.5·0.25·0.8, each product exact in binary.
        let tau = chain_expected_tau(&[0.5, 0.25, 0.8]);
        assert!((tau - 1.725).abs() <= 4.0 * f64::EPSILON, "{tau}");
    }

    /// Three starts by hand: tree 1 + (5 + 3 + 0)/3 ([0,2,1] is a path, [0,2,1,0] is not), chain of 3 1 + (3 + 1 + 0)/3, sampled
    /// chain 1 + ((0.5 + 0.25 + 0.125) + 1 + 0)/3.
    #[test]
    fn estimator_averages_over_starts() {
        let mut est = TauEstimator::new(3).unwrap();
        assert_eq!((est.depths(), est.sampled_depths()), (5, 3));
        est.add(&start(&[0, 0, 0, 0, 1], &[0.5, 0.5, 0.5]));
        est.add(&start(&[0, 2, 1, 0, 0], &[1.0, 0.0, 1.0]));
        est.add(&start(&[7, 0, 0, 0, 0], &[0.0, 1.0, 1.0]));
        let e = est.finish();
        let close = |a: f64, b: f64| (a - b).abs() <= 8.0 * f64::EPSILON;
        assert!(close(e.default_tree, 1.0 + 8.0 / 3.0), "{e:?}");
        assert!(close(e.chain, 1.0 + 4.0 / 3.0), "{e:?}");
        assert!(close(e.chain_t1, 1.0 + 1.875 / 3.0), "{e:?}");
        assert_eq!((e.chain_depth, e.starts), (3, 3));
        // A chain longer than the tree needs ranks that deep.
        assert_eq!(TauEstimator::new(7).unwrap().depths(), 7);
    }

    #[test]
    fn no_starts_estimate_one() {
        let e = TauEstimator::new(5).unwrap().finish();
        assert_eq!(
            (e.default_tree, e.chain, e.chain_t1, e.starts),
            (1.0, 1.0, 1.0, 0)
        );
    }

    #[test]
    fn chain_depth_defaults_to_the_heads_depths_up_to_seven() {
        let mut head = HeadOptions::default();
        assert_eq!(chain_depth(None, &head), 5);
        head.num_depths = 9;
        assert_eq!(chain_depth(None, &head), DEFAULT_CHAIN);
        assert_eq!(chain_depth(Some(2), &head), 2);
        let problems = |n: usize, head: &HeadOptions| {
            let mut p = Problems::default();
            check_chain_depth(Some(n), head, &mut p);
            p.into_result("cfg").err().map(|e| format!("{e:#}"))
        };
        assert_eq!(problems(9, &head), None);
        assert!(problems(0, &head).unwrap().contains("tau_chain_depth"));
        assert!(problems(MAX_CHAIN + 1, &head).is_some());
        head.head = HeadKind::Medusa;
        let err = problems(10, &head).unwrap();
        assert!(err.contains("1 to 9 drafts"), "{err}");
    }
}
