//! Tree-attention speculative decoding, batch 1 (docs/clover2.md §4.3-§4.5).
//!
//! One step: the draft unrolls the static tree (top-k per row, an RNN step on the expanded
//! nodes), the teacher verifies all tree tokens in ONE forward with the tree mask and depth
//! position ids over its KV-cached prefix, the longest acceptable path is kept (greedy match at
//! T = 0, lossless tree speculative sampling at T > 0), the teacher's KV cache is compacted to
//! root + accepted, and the accepted pre-norm states with their next tokens are appended to the
//! draft's own (append-only, G9) cache. All per-step work stays on the device; the only
//! device-to-host copy per step is one small packed i64 tensor for the acceptance bookkeeping.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::decode::dynamic::{draft_dynamic, DynamicTree};
use crate::decode::eagle_drafter::EagleDrafter;
use crate::decode::sampling::{
    apply_stop_rules, check_context, pick_next, sample_rows, Answer, Sampling, Timed,
};
use crate::decode::tree::{Tree, TreeTensors};
pub use crate::model::draft_vocab::DraftVocab;
use crate::model::head::DraftHead;
use crate::model::head_config::HeadKind;
use crate::model::layers::KvCache;
use crate::model::teacher::Teacher;

/// What speculative decoding needs from a draft model. `DraftHead` implements it through
/// [`HeadDrafter`]; tests plug in other drafters (e.g. a noisy oracle) to drive deep acceptance.
pub trait Drafter {
    /// Start a new generation: forget all committed positions.
    fn reset(&mut self);
    /// Append committed positions: teacher pre-norm states `u` [1,n,H], each paired with the
    /// token that follows it, `next_ids` [1,n] (G4). Returns depth-0 (logits [1,V], state [1,H])
    /// at the last position.
    fn extend(&mut self, u: &Tensor, next_ids: &Tensor) -> Result<(Tensor, Tensor)>;
    /// One depth >= 1 step on parent `states` [n,H] and the chosen tokens [n]:
    /// (logits [n,V], states [n,H]). States are opaque to the caller, which only gathers their
    /// rows by parent (`EagleDrafter`'s are draft-row ids [n]).
    fn step(&mut self, states: &Tensor, tokens: &Tensor) -> Result<(Tensor, Tensor)>;
}

/// Per-generation speculative statistics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpecStats {
    /// Accepted draft tokens per verification step (root and bonus not counted, before any
    /// truncation by the stop rules).
    pub accepted: Vec<usize>,
    /// Depth of the tree used.
    pub max_depth: usize,
    /// Seconds spent drafting: the depth-0 call on the newly committed states (the prompt's at
    /// the start, the accepted path's after each step) and the tree expansion. The device is
    /// synchronized only when a step reads its accepted path, so on CUDA this and
    /// `verify_seconds` are host-side split times.
    pub draft_seconds: f64,
    /// Seconds in the teacher's tree forward, acceptance and KV compaction.
    pub verify_seconds: f64,
}

impl SpecStats {
    /// Tree-verification steps (teacher forwards after the prefill).
    pub fn steps(&self) -> usize {
        self.accepted.len()
    }

    /// Tokens committed by the verification steps: accepted drafts + one teacher token each.
    pub fn committed(&self) -> usize {
        self.accepted.iter().map(|a| a + 1).sum()
    }

    /// tau = committed tokens / verification steps, the teacher's own token counted (docs/clover2.md §5).
    pub fn tau(&self) -> f64 {
        self.committed() as f64 / self.steps().max(1) as f64
    }

    /// Steps that accepted at least d drafts, for d = 1..=max_depth.
    pub fn accepted_at_least(&self) -> Vec<usize> {
        (1..=self.max_depth)
            .map(|d| self.accepted.iter().filter(|&&a| a >= d).count())
            .collect()
    }
}

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
pub struct VerifyPlan<'t> {
    pub tree: &'t Tree,
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

impl<'t> VerifyPlan<'t> {
    pub fn new(tree: &'t Tree, device: Device) -> Self {
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
            tree,
            tensors: tree.to_device(device),
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

/// Which tree each step drafts and verifies.
#[derive(Debug, Clone, Copy)]
pub enum TreeMode<'t> {
    /// The same tree every step.
    Static(&'t Tree),
    /// A tree grown from the draft's confidence every step (EAGLE-2).
    Dynamic(DynamicTree),
}

impl TreeMode<'_> {
    /// Deepest draft depth of any step's tree.
    pub fn max_depth(&self) -> usize {
        match self {
            TreeMode::Static(tree) => tree.max_depth(),
            TreeMode::Dynamic(shape) => shape.depth,
        }
    }

    fn top_k(&self) -> usize {
        match self {
            TreeMode::Static(tree) => tree.top_k,
            TreeMode::Dynamic(shape) => shape.top_k,
        }
    }
}

/// Speculative decoding of one prompt with any drafter and a static tree (see
/// [`generate_with_mode`]).
pub fn generate_with_drafter(
    teacher: &Teacher,
    drafter: &mut dyn Drafter,
    tree: &Tree,
    prompt_ids: &[i64],
    max_new: usize,
    sampling: Sampling,
    stop_ids: &[i64],
) -> Result<(Timed, SpecStats)> {
    generate_with_mode(
        teacher,
        drafter,
        TreeMode::Static(tree),
        prompt_ids,
        max_new,
        sampling,
        stop_ids,
    )
}

/// Speculative decoding of one prompt with any drafter, batch 1. Same stop rules and output as
/// `generate::generate` (the stop id is not returned; `max_new` caps the answer), so at T = 0 the
/// answers must be identical. It also ends (`stopped` false) when the next tree would run past
/// `max_position_embeddings`, possibly a few tokens before plain decoding would.
pub fn generate_with_mode(
    teacher: &Teacher,
    drafter: &mut dyn Drafter,
    mode: TreeMode,
    prompt_ids: &[i64],
    max_new: usize,
    sampling: Sampling,
    stop_ids: &[i64],
) -> Result<(Timed, SpecStats)> {
    let cap = teacher.config.max_position_embeddings;
    let depth = mode.max_depth() as i64;
    ensure!(
        !prompt_ids.is_empty(),
        "cannot generate from an empty prompt"
    );
    ensure!(max_new > 0, "max_new must be at least 1");
    teacher.check_token_ids(prompt_ids).context("the prompt")?;
    check_context(prompt_ids.len(), max_new, cap)?;
    ensure!(
        prompt_ids.len() as i64 + depth < cap,
        "prompt of {} tokens leaves no room for a depth-{depth} tree in the context of {cap}",
        prompt_ids.len()
    );
    ensure!(
        mode.top_k() as i64 <= teacher.config.vocab_size,
        "tree top-k {} exceeds the vocabulary ({})",
        mode.top_k(),
        teacher.config.vocab_size
    );
    if let TreeMode::Static(tree) = mode {
        ensure!(
            sampling.is_greedy() || tree.children_are_contiguous(),
            "sampling at T > 0 needs every node's children to be ranks 0..m-1 (a drawn but \
             unverified draft token would break losslessness)"
        );
    }
    if let TreeMode::Dynamic(shape) = mode {
        shape.check()?;
    }
    crate::rng::seeded_if(!sampling.is_greedy(), sampling.seed, || {
        let _guard = tch::no_grad_guard();
        let device = teacher.device();
        let static_plan = match mode {
            TreeMode::Static(tree) => Some(VerifyPlan::new(tree, device)),
            TreeMode::Dynamic(_) => None,
        };
        let mut stats = SpecStats {
            max_depth: mode.max_depth(),
            ..Default::default()
        };
        drafter.reset();

        // Prefill: the root token, and the draft's view of the whole prompt (each state paired with
        // the next token, the last one with the root, G4).
        let start = Instant::now();
        let mut cache = teacher.new_cache(1);
        let prompt = Tensor::from_slice(prompt_ids).to_device(device);
        let positions = Tensor::arange(prompt_ids.len() as i64, (Kind::Int64, device)).unsqueeze(0);
        let u = teacher.forward(&prompt.unsqueeze(0), &positions, None, Some(&mut cache));
        let mut root = pick_next(&teacher.logits(&u.select(1, -1)), sampling.temperature);
        let mut tokens = vec![root.int64_value(&[0])];
        let prefill_seconds = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let stopped = 'gen: {
            if let Some(stopped) = apply_stop_rules(&mut tokens, max_new, stop_ids) {
                break 'gen stopped;
            }
            let rest = prompt.narrow(0, 1, prompt_ids.len() as i64 - 1);
            let next_ids = Tensor::cat(&[rest, root.shallow_clone()], 0);
            let t0 = Instant::now();
            let (mut logits0, mut state0) = drafter.extend(&u, &next_ids.unsqueeze(0))?;
            stats.draft_seconds += t0.elapsed().as_secs_f64();
            loop {
                let committed = cache.len();
                if committed + depth >= cap {
                    break 'gen false;
                }
                let t0 = Instant::now();
                // This step's plan: the static tree's, or the one of the tree just grown.
                let grown = match mode {
                    TreeMode::Dynamic(shape) => Some(draft_dynamic(
                        drafter, &logits0, &state0, &shape, &sampling,
                    )?),
                    TreeMode::Static(_) => None,
                };
                let grown_plan = grown.as_ref().map(|g| VerifyPlan::new(&g.tree, device));
                let plan = grown_plan
                    .as_ref()
                    .or(static_plan.as_ref())
                    .expect("a static tree has its plan");
                let (draft_tokens, q_rows) = match &grown {
                    Some(g) => (
                        g.tokens.shallow_clone(),
                        g.q.as_ref().map(Tensor::shallow_clone),
                    ),
                    None => draft_tree(drafter, &logits0, &state0, plan, &sampling)?,
                };
                stats.draft_seconds += t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                let (accepted, u) = verify(
                    teacher,
                    &mut cache,
                    plan,
                    &root,
                    &draft_tokens,
                    q_rows.as_ref(),
                    &sampling,
                )?;
                stats.verify_seconds += t1.elapsed().as_secs_f64();
                stats.accepted.push(accepted.nodes.len() - 1);
                tokens.extend_from_slice(&accepted.tokens[1..]);
                tokens.push(accepted.bonus);
                if let Some(stopped) = apply_stop_rules(&mut tokens, max_new, stop_ids) {
                    break 'gen stopped;
                }
                // The accepted states, each paired with the token after it; the last with the bonus.
                let nodes: Vec<i64> = accepted.nodes.iter().map(|&i| i as i64).collect();
                let nodes = Tensor::from_slice(&nodes).to_device(device);
                let mut next: Vec<i64> = accepted.tokens[1..].to_vec();
                next.push(accepted.bonus);
                let next = Tensor::from_slice(&next).to_device(device);
                root = next.narrow(0, next.size()[0] - 1, 1);
                let t0 = Instant::now();
                (logits0, state0) =
                    drafter.extend(&u.index_select(0, &nodes).unsqueeze(0), &next.unsqueeze(0))?;
                stats.draft_seconds += t0.elapsed().as_secs_f64();
            }
        };
        let timed = Timed {
            answer: Answer {
                token_ids: tokens,
                stopped,
            },
            prefill_seconds,
            decode_seconds: start.elapsed().as_secs_f64(),
        };
        Ok((timed, stats))
    })
}

/// One teacher forward over the tree tokens (tree mask, depth positions after the committed
/// prefix), acceptance, and compaction of the KV cache to root + accepted. Returns the accepted
/// path and the tree's pre-norm states [n,H].
fn verify(
    teacher: &Teacher,
    cache: &mut KvCache,
    plan: &VerifyPlan,
    root: &Tensor,
    draft_tokens: &Tensor,
    q_rows: Option<&Tensor>,
    sampling: &Sampling,
) -> Result<(Accepted, Tensor)> {
    let committed = cache.len();
    let tree_tokens = plan.tree_tokens(root, draft_tokens);
    let positions = (&plan.tensors.position_ids + committed).unsqueeze(0);
    let mask = plan.tensors.verify_mask(committed);
    let u = teacher
        .forward(
            &tree_tokens.unsqueeze(0),
            &positions,
            Some(&mask),
            Some(cache),
        )
        .squeeze_dim(0);
    let logits = teacher.logits(&u);
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
    Ok((accepted, u))
}

/// The Clover-2 draft head as a [`Drafter`], with its own append-only KV cache (G9): it only ever
/// sees committed positions, so it never needs rollback. With a [`DraftVocab`] its logits cover
/// only that vocabulary's tokens (FR-Spec). Medusa drafts through it too (its "state" is h and
/// its steps pick head `depth`).
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

/// Size of the vocabulary a head drafts from: the sliced `vocab` (`--draft-vocab`), the head's
/// trained one, or None for the teacher's whole vocabulary.
pub fn drafting_vocab(head: &DraftHead, vocab: Option<&DraftVocab>) -> Option<usize> {
    vocab.or(head.draft_vocab()).map(DraftVocab::len)
}

/// The drafter of any head kind: EAGLE-1 needs tree attention over its own drafts
/// (`EagleDrafter`); Clover-2 and Medusa step each node from its parent alone (`HeadDrafter`),
/// from `vocab` when one is given (`DraftHead::slice_vocab` refuses one for Medusa, and eval for
/// EAGLE-1).
pub fn drafter_for<'h>(
    head: &'h DraftHead,
    vocab: Option<&'h DraftVocab>,
) -> Box<dyn Drafter + 'h> {
    match head.config().options.head {
        HeadKind::Eagle1 => Box::new(EagleDrafter::new(head)),
        HeadKind::Clover2 | HeadKind::Medusa => Box::new(HeadDrafter::new(head).with_vocab(vocab)),
    }
}

/// The deepest tree `head` can draft, where it has a limit: Medusa has one head per depth;
/// Clover-2 and EAGLE-1 step to any depth.
pub fn deepest_draft(head: &DraftHead) -> Option<usize> {
    let opts = &head.config().options;
    (opts.head == HeadKind::Medusa).then_some(opts.num_depths as usize)
}

/// Checks a tree can be drafted by `head` (see [`deepest_draft`]).
pub fn check_tree_for(head: &DraftHead, tree: &Tree) -> Result<()> {
    if let Some(deepest) = deepest_draft(head) {
        ensure!(
            tree.max_depth() <= deepest,
            "the tree is {} deep but the Medusa head has only {deepest} heads",
            tree.max_depth()
        );
    }
    Ok(())
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
        let opts = &self.head.config().options;
        ensure!(
            opts.head != HeadKind::Medusa || depth < opts.num_depths,
            "Medusa head asked for depth {depth} but has {} heads",
            opts.num_depths
        );
        let (o, s) = self.head.step_at(depth, states, tokens);
        self.depth += 1;
        Ok((self.logits(depth, &o), s))
    }
}

/// Speculative decoding of one prompt with a draft head of any kind (see [`generate_with_drafter`]).
pub fn generate_speculative(
    teacher: &Teacher,
    head: &DraftHead,
    tree: &Tree,
    prompt_ids: &[i64],
    max_new: usize,
    sampling: Sampling,
    stop_ids: &[i64],
) -> Result<(Timed, SpecStats)> {
    check_tree_for(head, tree)?;
    let mut drafter = drafter_for(head, None);
    generate_with_drafter(
        teacher,
        drafter.as_mut(),
        tree,
        prompt_ids,
        max_new,
        sampling,
        stop_ids,
    )
}
