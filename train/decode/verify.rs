//! Verification: one teacher forward over the drafted tree (tree mask, depth positions over
//! the KV-cached prefix), acceptance of the longest acceptable path (greedy match at T = 0,
//! lossless tree speculative sampling at T > 0), and compaction of the teacher's KV cache to
//! root + accepted.

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use crate::decode::sampling::{sample_rows, Sampling};
use crate::decode::tree::{Tree, TreeTensors};
use crate::model::layers::KvCache;
use crate::model::teacher::Teacher;

/// The accepted path of one verification step.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// Tree nodes from the root to the last accepted node.
    pub nodes: Vec<usize>,
    /// Their tokens (the root first).
    pub tokens: Vec<i64>,
    /// The teacher's token after the last accepted node.
    pub bonus: i64,
}

/// Device buffers for drafting and verifying one tree.
pub struct VerifyPlan {
    /// The tree it plans (owned: a grown tree's plan outlives the drafting that made it).
    pub tree: Tree,
    pub tensors: TreeTensors,
    /// retrieve_indices with -1 replaced by n (an appended pad slot).
    retrieve_ext: Tensor,
    /// [n, max_children] child node of each node by rank, n where there is none.
    child_nodes_ext: Tensor,
    /// [n, max_children] bool
    has_child: Tensor,
    /// Draft row of each node (leaves: 0, never read).
    node_rows: Tensor,
    max_children: usize,
}

impl VerifyPlan {
    pub fn new(tree: &Tree, device: Device) -> Self {
        Self::owning(tree.clone(), device)
    }

    /// As `new`, keeping `tree` itself (a tree grown for one step is not copied).
    pub fn owning(tree: Tree, device: Device) -> Self {
        let n = tree.len() as i64;
        let width = tree.max_depth() as i64 + 1;
        let retrieve: Vec<i64> = tree
            .retrieve_indices
            .iter()
            .flatten()
            .map(|&i| if i < 0 { n } else { i })
            .collect();
        let max_children = tree.children.iter().map(Vec::len).max().unwrap_or(0);
        let mut child_nodes = Vec::with_capacity(tree.len() * max_children);
        for ch in &tree.children {
            for j in 0..max_children {
                child_nodes.push(ch.get(j).map_or(n, |&c| c as i64));
            }
        }
        let node_rows: Vec<i64> = tree
            .draft_rows
            .iter()
            .map(|r| r.unwrap_or(0) as i64)
            .collect();
        let child_nodes_ext = Tensor::from_slice(&child_nodes)
            .view([n, max_children as i64])
            .to_device(device);
        Self {
            tensors: tree.to_device(device),
            tree,
            retrieve_ext: Tensor::from_slice(&retrieve)
                .view([-1, width])
                .to_device(device),
            has_child: child_nodes_ext.lt(n),
            child_nodes_ext,
            node_rows: Tensor::from_slice(&node_rows).to_device(device),
            max_children,
        }
    }

    /// Tree tokens [n] from the root token [1] and the draft's top-k rows [R,K].
    pub fn tree_tokens(&self, root: &Tensor, draft_tokens: &Tensor) -> Tensor {
        let candidates = Tensor::cat(&[root.reshape([1]), draft_tokens.flatten(0, -1)], 0);
        candidates.index_select(0, &self.tensors.tree_indices)
    }
}

/// Greedy acceptance (docs/clover2.md §4.5 step 4): per root-to-leaf path, the number of leading drafts
/// equal to the teacher's argmax at their parent; the longest path wins, the first on ties
/// (argmax returns the first maximum); the bonus is the teacher's argmax after it.
pub fn accept_greedy(plan: &VerifyPlan, tree_tokens: &Tensor, logits: &Tensor) -> Result<Accepted> {
    let device = tree_tokens.device();
    let pred = logits.argmax(-1, false);
    // Pads are made on the device: a host upload here would stall the queue mid-step.
    let pad = |t: &Tensor, v: i64| {
        Tensor::cat(
            &[
                t.shallow_clone(),
                Tensor::full([1], v, (Kind::Int64, device)),
            ],
            0,
        )
    };
    // Pads differ (-1 vs -2), so a padded slot never matches.
    let shape = plan.retrieve_ext.size();
    let flat = plan.retrieve_ext.flatten(0, -1);
    let cart = pad(tree_tokens, -1)
        .index_select(0, &flat)
        .view([shape[0], shape[1]]);
    let cart_pred = pad(&pred, -2)
        .index_select(0, &flat)
        .view([shape[0], shape[1]]);
    let width = shape[1];
    let matches = cart
        .narrow(1, 1, width - 1)
        .eq_tensor(&cart_pred.narrow(1, 0, width - 1));
    let acc = matches
        .to_kind(Kind::Int64)
        .cumprod(1, Kind::Int64)
        .sum_dim_intlist(1, false, Kind::Int64);
    let best = acc.argmax(0, true);
    let packed = Tensor::cat(
        &[
            acc.index_select(0, &best),
            plan.retrieve_ext.index_select(0, &best).view([-1]),
            cart.index_select(0, &best).view([-1]),
            cart_pred.index_select(0, &best).view([-1]),
        ],
        0,
    );
    let host =
        Vec::<i64>::try_from(packed.to_device(Device::Cpu)).context("reading the accepted path")?;
    let a = host[0] as usize;
    let w = width as usize;
    let nodes: Vec<usize> = host[1..2 + a].iter().map(|&i| i as usize).collect();
    let tokens = host[1 + w..2 + w + a].to_vec();
    let bonus = host[1 + 2 * w + a];
    Ok(Accepted {
        nodes,
        tokens,
        bonus,
    })
}

/// Lossless tree speculative sampling (EAGLE-1's multi-candidate rejection scheme, docs/clover2.md §4.5
/// step 4). `p` [n,V]: the teacher's PROCESSED distribution after each tree node; `q_rows` [R,V]:
/// the processed draft distribution of each draft row, from which that row's children were drawn
/// without replacement in rank order.
///
/// At each node, child j (rank j) is accepted with probability min(1, p_j(x)/q_j(x)), where q_j is
/// q with the earlier siblings removed and renormalized (the law x was actually drawn from) and
/// p_j is the residual after the earlier rejections: p_{j+1} = norm(max(p_j - q_j, 0)). The first
/// accepted child is descended into; when all children are rejected, or at a leaf, the bonus token
/// is drawn from the current (residual) p. Each step is standard speculative sampling, so the
/// output law is exactly p.
///
/// Knowingly different from the reference (G10): when the whole path is accepted the reference
/// draws the bonus from softmax of the UNPROCESSED logits, which is only right at T = 1; we use the
/// processed p at every temperature, which makes the sampler lossless.
///
/// Everything is computed for all nodes at once on the device (the residual chain is sequential
/// only over sibling rank, <= max_children iterations); one packed copy brings the accept flags
/// and per-node bonus samples to the host for the walk.
pub fn accept_sampling(
    plan: &VerifyPlan,
    tree_tokens: &Tensor,
    p: &Tensor,
    q_rows: &Tensor,
) -> Result<Accepted> {
    let device = tree_tokens.device();
    let n = plan.tree.len() as i64;
    let mc = plan.max_children as i64;
    let tiny = 1e-30;
    let tokens_ext = Tensor::cat(
        &[
            tree_tokens.shallow_clone(),
            Tensor::zeros([1], (Kind::Int64, device)),
        ],
        0,
    );
    let child_tokens = tokens_ext
        .index_select(0, &plan.child_nodes_ext.flatten(0, -1))
        .view([n, mc]);
    let mut p = p.to_kind(Kind::Float);
    let mut q = q_rows.to_kind(Kind::Float).index_select(0, &plan.node_rows);
    let mut accepts = Vec::with_capacity(plan.max_children);
    for j in 0..mc {
        let has = plan.has_child.select(1, j).unsqueeze(1);
        let x = child_tokens.select(1, j).unsqueeze(1);
        let qn = &q / q.sum_dim_intlist(-1, true, Kind::Float).clamp_min(tiny);
        let qx = qn.gather(1, &x, false);
        let ratio =
            (p.gather(1, &x, false) / qx.clamp_min(tiny)).where_self(&qx.gt(0.0), &qx.zeros_like());
        let u = Tensor::rand([n, 1], (Kind::Float, device));
        accepts.push(u.lt_tensor(&ratio).logical_and(&has));
        let residual = (&p - &qn).clamp_min(0.0);
        let mass = residual.sum_dim_intlist(-1, true, Kind::Float);
        // A zero residual means p == q_j: the rejection above then had probability 0.
        let update = has.logical_and(&mass.gt(0.0));
        p = (residual / mass.clamp_min(tiny)).where_self(&update, &p);
        q = q.scatter_value(1, &x, 0.0).where_self(&has, &q);
    }
    let bonus = sample_rows(&p);
    let packed = Tensor::cat(
        &[
            Tensor::cat(&accepts, 1).to_kind(Kind::Int64).view([-1]),
            bonus,
            tree_tokens.shallow_clone(),
        ],
        0,
    );
    let host =
        Vec::<i64>::try_from(packed.to_device(Device::Cpu)).context("reading acceptance flags")?;
    let (flags, rest) = host.split_at((n * mc) as usize);
    let (bonus, tokens) = rest.split_at(n as usize);
    let mut node = 0usize;
    let mut nodes = vec![0usize];
    'walk: loop {
        for (j, &child) in plan.tree.children[node].iter().enumerate() {
            if flags[node * mc as usize + j] != 0 {
                node = child;
                nodes.push(child);
                continue 'walk;
            }
        }
        break;
    }
    Ok(Accepted {
        tokens: nodes.iter().map(|&i| tokens[i]).collect(),
        bonus: bonus[node],
        nodes,
    })
}

/// One teacher forward over the tree tokens (tree mask, depth positions after the committed
/// prefix), acceptance, and compaction of the KV cache to root + accepted. The drafted step is
/// (root, draft tokens, their q rows when sampling). Returns the accepted path and the tree's
/// pre-norm states [n,H], or with `layers` (EAGLE-3) those layers' states [n,kH].
pub fn verify(
    teacher: &Teacher,
    cache: &mut KvCache,
    plan: &VerifyPlan,
    (root, draft_tokens, q_rows): (&Tensor, &Tensor, Option<&Tensor>),
    sampling: &Sampling,
    layers: Option<&[i64]>,
) -> Result<(Accepted, Tensor)> {
    let committed = cache.len();
    let tree_tokens = plan.tree_tokens(root, draft_tokens);
    let positions = (&plan.tensors.position_ids + committed).unsqueeze(0);
    let mask = plan.tensors.verify_mask(committed);
    let (u, drafted_from) = teacher.forward_tapped(
        &tree_tokens.unsqueeze(0),
        &positions,
        Some(&mask),
        Some(cache),
        layers,
    );
    let logits = teacher.logits(&u.squeeze_dim(0));
    let accepted = match q_rows {
        None => accept_greedy(plan, &tree_tokens, &logits)?,
        Some(q) => accept_sampling(plan, &tree_tokens, &sampling.probs(&logits), q)?,
    };
    let nodes: Vec<i64> = accepted
        .nodes
        .iter()
        .map(|&i| i as i64 + committed)
        .collect();
    cache.compact(
        committed,
        &Tensor::from_slice(&nodes).to_device(teacher.device()),
    );
    Ok((accepted, drafted_from.squeeze_dim(0)))
}
