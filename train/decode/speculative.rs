//! Tree-attention speculative decoding, batch 1 (docs/clover2.md §4.3-§4.5): the decode loop.
//!
//! One step: the tree policy drafts its tree (`decode::tree_policy`: the static tree unrolled by
//! top-k per row, or one grown from the draft's confidence), the teacher verifies all tree
//! tokens in ONE forward (`decode::verify`), the longest acceptable path is kept, and the
//! accepted pre-norm states with their next tokens are appended to the drafter's own
//! (append-only, G9) cache. All per-step work stays on the device; the only device-to-host copy
//! per step is one small packed i64 tensor for the acceptance bookkeeping.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use tch::{Kind, Tensor};

use crate::decode::drafter::{check_tree_for, drafter_for, Drafter};
use crate::decode::sampling::{
    apply_stop_rules, check_context, pick_next, Answer, Sampling, Timed,
};
use crate::decode::tree::Tree;
use crate::decode::tree_policy::{TreeMode, TreePolicy};
use crate::decode::verify::{verify, Accepted};
use crate::model::head::DraftHead;
use crate::model::layers::KvCache;
use crate::model::teacher::Teacher;

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
    let policy = mode.policy(teacher.device());
    check_request(teacher, policy.as_ref(), prompt_ids, max_new, &sampling)?;
    crate::rng::seeded_if(!sampling.is_greedy(), sampling.seed, || {
        let _guard = tch::no_grad_guard();
        let decode = Decode {
            teacher,
            policy: policy.as_ref(),
            sampling: &sampling,
            max_new,
            stop_ids,
        };
        decode.run(drafter, prompt_ids)
    })
}

/// Refuses, before any work, a prompt or tree this decode cannot serve.
fn check_request(
    teacher: &Teacher,
    policy: &dyn TreePolicy,
    prompt_ids: &[i64],
    max_new: usize,
    sampling: &Sampling,
) -> Result<()> {
    let cap = teacher.config.max_position_embeddings;
    let depth = policy.max_depth() as i64;
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
        policy.top_k() as i64 <= teacher.config.vocab_size,
        "tree top-k {} exceeds the vocabulary ({})",
        policy.top_k(),
        teacher.config.vocab_size
    );
    policy.check(sampling)
}

/// What one speculative decode reads throughout.
struct Decode<'a> {
    teacher: &'a Teacher,
    policy: &'a dyn TreePolicy,
    sampling: &'a Sampling,
    max_new: usize,
    stop_ids: &'a [i64],
}

/// The draft's depth-0 row after the last commit: logits [1,V] and the state it steps from.
struct Depth0Row {
    logits: Tensor,
    state: Tensor,
}

impl Decode<'_> {
    fn run(&self, drafter: &mut dyn Drafter, prompt_ids: &[i64]) -> Result<(Timed, SpecStats)> {
        let device = self.teacher.device();
        let mut stats = SpecStats {
            max_depth: self.policy.max_depth(),
            ..Default::default()
        };
        drafter.reset();
        // Prefill: the root token, and the draft's view of the whole prompt (each state paired
        // with the next token, the last one with the root, G4).
        let start = Instant::now();
        let mut cache = self.teacher.new_cache(1);
        let prompt = Tensor::from_slice(prompt_ids).to_device(device);
        let positions = Tensor::arange(prompt_ids.len() as i64, (Kind::Int64, device)).unsqueeze(0);
        // The states the drafter reads: u, or the teacher layers it names (EAGLE-3).
        let (u, drafted_from) = self.teacher.forward_tapped(
            &prompt.unsqueeze(0),
            &positions,
            None,
            Some(&mut cache),
            drafter.teacher_layers(),
        );
        let mut root = pick_next(
            &self.teacher.logits(&u.select(1, -1)),
            self.sampling.temperature,
        );
        let mut tokens = vec![root.int64_value(&[0])];
        let prefill_seconds = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let stopped = 'gen: {
            if let Some(stopped) = apply_stop_rules(&mut tokens, self.max_new, self.stop_ids) {
                break 'gen stopped;
            }
            let rest = prompt.narrow(0, 1, prompt_ids.len() as i64 - 1);
            let next_ids = Tensor::cat(&[rest, root.shallow_clone()], 0);
            let mut row = self.extend(drafter, &drafted_from, &next_ids, &mut stats)?;
            loop {
                if cache.len() + self.policy.max_depth() as i64
                    >= self.teacher.config.max_position_embeddings
                {
                    break 'gen false;
                }
                let (accepted, u) = self.step(drafter, &mut cache, &row, &root, &mut stats)?;
                tokens.extend_from_slice(&accepted.tokens[1..]);
                tokens.push(accepted.bonus);
                if let Some(stopped) = apply_stop_rules(&mut tokens, self.max_new, self.stop_ids) {
                    break 'gen stopped;
                }
                // The accepted states, each paired with the token after it; the last with the
                // bonus.
                let nodes: Vec<i64> = accepted.nodes.iter().map(|&i| i as i64).collect();
                let nodes = Tensor::from_slice(&nodes).to_device(device);
                let mut next: Vec<i64> = accepted.tokens[1..].to_vec();
                next.push(accepted.bonus);
                let next = Tensor::from_slice(&next).to_device(device);
                root = next.narrow(0, next.size()[0] - 1, 1);
                row = self.extend(
                    drafter,
                    &u.index_select(0, &nodes).unsqueeze(0),
                    &next,
                    &mut stats,
                )?;
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
    }

    /// Hands the drafter newly committed states u [1,n,H] with their next tokens [n].
    fn extend(
        &self,
        drafter: &mut dyn Drafter,
        u: &Tensor,
        next_ids: &Tensor,
        stats: &mut SpecStats,
    ) -> Result<Depth0Row> {
        let t0 = Instant::now();
        let (logits, state) = drafter.extend(u, &next_ids.unsqueeze(0))?;
        stats.draft_seconds += t0.elapsed().as_secs_f64();
        Ok(Depth0Row { logits, state })
    }

    /// One verification step: the policy drafts this step's tree, the teacher verifies it.
    /// Returns the accepted path and the tree's states the drafter reads (pre-norm u, or its
    /// teacher layers').
    fn step(
        &self,
        drafter: &mut dyn Drafter,
        cache: &mut KvCache,
        row: &Depth0Row,
        root: &Tensor,
        stats: &mut SpecStats,
    ) -> Result<(Accepted, Tensor)> {
        let t0 = Instant::now();
        let drafted = self
            .policy
            .draft(drafter, &row.logits, &row.state, self.sampling)?;
        stats.draft_seconds += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let (accepted, u) = verify(
            self.teacher,
            cache,
            drafted.plan(),
            (root, &drafted.tokens, drafted.q.as_ref()),
            self.sampling,
            drafter.teacher_layers(),
        )?;
        stats.verify_seconds += t1.elapsed().as_secs_f64();
        stats.accepted.push(accepted.nodes.len() - 1);
        Ok((accepted, u))
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
