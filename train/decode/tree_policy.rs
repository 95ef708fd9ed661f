//! The seam where a tree policy plans a decode step: which tree this step drafts and verifies.
//! The static policy unrolls the same tree every step (its verify plan built once); the grown
//! policy (EAGLE-2) grows a tree from the draft's confidence each step. A new policy is one more
//! `TreePolicy`.

use anyhow::{ensure, Result};
use tch::{Device, Tensor};

use crate::decode::drafter::unroll::draft_tree;
use crate::decode::drafter::Drafter;
use crate::decode::dynamic::{draft_dynamic, DynamicTree};
use crate::decode::sampling::Sampling;
use crate::decode::tree::Tree;
use crate::decode::verify::VerifyPlan;

/// Which tree each step drafts and verifies, as asked for.
#[derive(Debug, Clone, Copy)]
pub enum TreeMode<'t> {
    /// The same tree every step.
    Static(&'t Tree),
    /// A tree grown from the draft's confidence every step (EAGLE-2).
    Dynamic(DynamicTree),
}

impl<'t> TreeMode<'t> {
    /// Deepest draft depth of any step's tree.
    pub fn max_depth(&self) -> usize {
        match self {
            TreeMode::Static(tree) => tree.max_depth(),
            TreeMode::Dynamic(shape) => shape.depth,
        }
    }

    /// The policy that plans each step of this mode on `device`.
    pub fn policy(self, device: Device) -> Box<dyn TreePolicy> {
        match self {
            TreeMode::Static(tree) => Box::new(StaticTree {
                plan: VerifyPlan::new(tree, device),
            }),
            TreeMode::Dynamic(shape) => Box::new(GrownTree { shape, device }),
        }
    }
}

/// One step's drafted tree: its verify plan, its draft tokens [R,K] and, when sampling, the
/// draft distributions q [R,V] of its rows.
pub struct DraftedStep<'p> {
    plan: PlanOf<'p>,
    pub tokens: Tensor,
    pub q: Option<Tensor>,
}

enum PlanOf<'p> {
    /// The static tree's plan, built once.
    Kept(&'p VerifyPlan),
    /// The plan of the tree grown this step.
    Grown(VerifyPlan),
}

impl DraftedStep<'_> {
    pub fn plan(&self) -> &VerifyPlan {
        match &self.plan {
            PlanOf::Kept(plan) => plan,
            PlanOf::Grown(plan) => plan,
        }
    }
}

/// How the trees of a decode are planned.
pub trait TreePolicy {
    /// Deepest draft depth of any step's tree.
    fn max_depth(&self) -> usize;
    /// Candidates per drafted row.
    fn top_k(&self) -> usize;
    /// Refuses a policy that cannot decode losslessly under `sampling`.
    fn check(&self, sampling: &Sampling) -> Result<()>;
    /// Drafts this step's tree from depth 0's row (logits [1,V], state).
    fn draft<'p>(
        &'p self,
        drafter: &mut dyn Drafter,
        logits0: &Tensor,
        state0: &Tensor,
        sampling: &Sampling,
    ) -> Result<DraftedStep<'p>>;
}

/// The same tree every step.
struct StaticTree {
    plan: VerifyPlan,
}

impl TreePolicy for StaticTree {
    fn max_depth(&self) -> usize {
        self.plan.tree.max_depth()
    }

    fn top_k(&self) -> usize {
        self.plan.tree.top_k
    }

    fn check(&self, sampling: &Sampling) -> Result<()> {
        ensure!(
            sampling.is_greedy() || self.plan.tree.children_are_contiguous(),
            "sampling at T > 0 needs every node's children to be ranks 0..m-1 (a drawn but \
             unverified draft token would break losslessness)"
        );
        Ok(())
    }

    fn draft<'p>(
        &'p self,
        drafter: &mut dyn Drafter,
        logits0: &Tensor,
        state0: &Tensor,
        sampling: &Sampling,
    ) -> Result<DraftedStep<'p>> {
        let (tokens, q) = draft_tree(drafter, logits0, state0, &self.plan, sampling)?;
        Ok(DraftedStep {
            plan: PlanOf::Kept(&self.plan),
            tokens,
            q,
        })
    }
}

/// A tree grown from the draft's confidence every step (EAGLE-2).
struct GrownTree {
    shape: DynamicTree,
    device: Device,
}

impl TreePolicy for GrownTree {
    fn max_depth(&self) -> usize {
        self.shape.depth
    }

    fn top_k(&self) -> usize {
        self.shape.top_k
    }

    fn check(&self, _sampling: &Sampling) -> Result<()> {
        self.shape.check()
    }

    fn draft<'p>(
        &'p self,
        drafter: &mut dyn Drafter,
        logits0: &Tensor,
        state0: &Tensor,
        sampling: &Sampling,
    ) -> Result<DraftedStep<'p>> {
        let grown = draft_dynamic(drafter, logits0, state0, &self.shape, sampling)?;
        Ok(DraftedStep {
            plan: PlanOf::Grown(VerifyPlan::owning(grown.tree, self.device)),
            tokens: grown.tokens,
            q: grown.q,
        })
    }
}
