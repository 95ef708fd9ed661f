//! `clover calibrate`: what a tree search needs to know about a head on a device.
//!
//! (a) The head's acceptance table, on calibration texts (the prepared data's eval split, never
//! the evaluation prompts): for each depth d and sibling rank r < top_k, the probability that
//! the teacher's greedy token is the head's rank-r draft, given that its parent was accepted.
//! One teacher forward gives the teacher's argmax at every position; the drafter decoding uses
//! for the head's kind is then extended along the text and, from every answer position, steps
//! along the teacher's own greedy chain (so EAGLE-1 drafts with its context, and a Medusa head
//! only to the depths it has heads for). A depth counts a position only while the text follows
//! that chain (the regenerated data is the teacher's greedy output, so it nearly always does)
//! and the parent was within the top-k.
//!
//! (b) This device's costs, each the median of `repeats` timings after `warmup` untimed ones:
//! the teacher's verification of n = 1..64 tree tokens (forward, logits, argmax, one host read)
//! after a few context lengths, one draft step on m expanded nodes (RNN step, logits, top-k),
//! the depth-0 draft call on two accepted states, and one plain decoding step (averaged over the
//! same contexts). Run it with the thread settings the decoding will use (on a small shared CPU,
//! `OMP_NUM_THREADS=1`): the costs are only as true as the conditions they were measured in.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::checks::Problems;
use crate::decode::drafter::{deepest_draft, drafter_for, drafting_vocab, DraftVocab, Drafter};
use crate::decode::tree_search::{Costs, Curve};
use crate::model::head::DraftHead;
use crate::model::layers::causal_mask;
use crate::model::teacher::Teacher;
use crate::progress::Progress;

/// A tokenized calibration text: the whole conversation and its answer mask.
#[derive(Debug, Clone)]
pub struct CalibrationText {
    pub input_ids: Vec<i64>,
    pub loss_mask: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// Sibling ranks measured per depth.
    pub top_k: usize,
    /// Depths measured (at most the head's trained depths is sensible, more is allowed).
    pub max_depth: usize,
    /// Largest number of tree tokens whose verification is timed.
    pub max_tree_tokens: usize,
    /// Context lengths the verification is timed after.
    pub contexts: Vec<usize>,
    pub warmup: usize,
    pub repeats: usize,
    /// 0: the greedy table; > 0: the table of lossless tree sampling at this temperature.
    pub temperature: f64,
    /// Seeds the draws of the sampled table.
    pub seed: i64,
}

impl Default for CalibrateOptions {
    fn default() -> Self {
        Self {
            top_k: 10,
            max_depth: 5,
            max_tree_tokens: 64,
            contexts: vec![128, 512],
            warmup: 2,
            repeats: 5,
            temperature: 0.0,
            seed: 0,
        }
    }
}

/// Verification time after one context length.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyCurve {
    pub context: usize,
    pub ms: Curve,
}

/// A calibration file (`calib.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    /// `cpu` or `cuda:N`, as eval reports spell it (older files' `Cpu` / `Cuda(0)` read too).
    #[serde(deserialize_with = "crate::model::device::deserialize_device_name")]
    pub device: String,
    pub dtype: String,
    /// Size of the draft vocabulary the head was measured with (None = the full vocabulary).
    pub draft_vocab: Option<usize>,
    pub top_k: usize,
    /// The decoding temperature the table is for (0 = greedy).
    #[serde(default)]
    pub temperature: f64,
    /// acceptance[d][r]: P(the rank-r draft at depth d+1 is the one committed | parent accepted).
    pub acceptance: Vec<Vec<f64>>,
    /// Positions measured at each depth.
    pub trials: Vec<usize>,
    /// Verification per context length; `costs.verify_ms` is their mean.
    pub verify_by_context: Vec<VerifyCurve>,
    pub costs: Costs,
}

impl Calibration {
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading calibration {}: {e}", path.display()))?;
        let calib: Calibration = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "calibration {}: not a `clover calibrate` file ({e})",
                path.display()
            )
        })?;
        calib.validate(&format!("calibration {}", path.display()))?;
        Ok(calib)
    }

    /// Refuses, all at once, tables and costs no measurement gives: an empty acceptance table
    /// or cost curve (the search would read past its end), probabilities outside [0, 1], costs
    /// that are not positive times (the search would predict infinite speed).
    fn validate(&self, origin: &str) -> Result<()> {
        let mut p = Problems::default();
        p.require(
            !self.acceptance.is_empty() && self.acceptance.iter().all(|r| !r.is_empty()),
            "acceptance",
            "empty table: every depth needs at least one rank",
        );
        p.require(
            self.acceptance
                .iter()
                .flatten()
                .all(|a| (0.0..=1.0).contains(a)),
            "acceptance",
            "probabilities must lie in [0, 1]",
        );
        self.costs.check_measured(&mut p);
        for (i, curve) in self.verify_by_context.iter().enumerate() {
            curve
                .ms
                .check(&format!("verify_by_context[{i}].ms"), &mut p);
        }
        p.into_result(origin)
    }

    pub fn write(&self, path: &std::path::Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(self)?)
            .map_err(|e| anyhow::anyhow!("writing calibration {}: {e}", path.display()))
    }
}

/// Calibration texts from questions: each question's first turn in the chat template, answered
/// greedily by the teacher with at most `max_new` tokens (the answer is what the acceptance is
/// measured on, as on regenerated data). For calibrating on prompts like the evaluation's
/// without using the evaluation prompts themselves.
pub fn answered_texts(
    teacher: &Teacher,
    chat: &crate::formats::chat::ChatTokenizer,
    prompts: &[String],
    max_new: usize,
) -> Result<Vec<CalibrationText>> {
    use crate::formats::chat::{Message, Role};
    let mut bar = Progress::new("calibrate (teacher answers)", prompts.len() as u64);
    let mut texts = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let ids = chat.encode_prompt(&[Message::new(Role::User, prompt.clone())])?;
        let cfg = crate::decode::generate::GenerationConfig {
            max_new_tokens: max_new,
            temperature: 0.0,
            seed: 0,
            stop_ids: chat.stop_ids(),
        };
        let answer = crate::decode::generate::generate(teacher, &ids, &cfg)?
            .answer
            .token_ids;
        let loss_mask = (0..ids.len() + answer.len())
            .map(|j| u8::from(j >= ids.len()))
            .collect();
        texts.push(CalibrationText {
            input_ids: ids.into_iter().chain(answer).collect(),
            loss_mask,
        });
        bar.inc(1);
    }
    bar.finish();
    Ok(texts)
}

/// Measure the acceptance table and the costs, drafting through the drafter decoding uses for
/// this head's kind (`drafter_for`), from `vocab` when one is given. A Medusa head is measured
/// at the depths it has heads for (`deepest_draft`), however many `opts.max_depth` asks.
pub fn calibrate(
    teacher: &Teacher,
    head: &DraftHead,
    vocab: Option<&DraftVocab>,
    texts: &[CalibrationText],
    opts: &CalibrateOptions,
) -> Result<Calibration> {
    ensure!(!texts.is_empty(), "no calibration texts");
    for (i, text) in texts.iter().enumerate() {
        teacher
            .check_token_ids(&text.input_ids)
            .with_context(|| format!("calibration text {i}"))?;
    }
    ensure!(
        opts.top_k >= 1 && opts.max_depth >= 1,
        "top-k and depth must be at least 1"
    );
    let depths = deepest_draft(head).map_or(opts.max_depth, |d| d.min(opts.max_depth));
    ensure!(
        deepest_draft(head) != Some(1),
        "a Medusa head with one head drafts no step: there is no tree to search beyond depth 1"
    );
    let mut drafter = drafter_for(head, vocab);
    let drafter = drafter.as_mut();
    let _guard = tch::no_grad_guard();
    let (acceptance, trials) = if opts.temperature > 0.0 {
        crate::rng::seeded(opts.seed, || {
            measure_sampled_acceptance(teacher, drafter, texts, opts, depths)
        })?
    } else {
        measure_acceptance(teacher, drafter, texts, opts, depths)?
    };
    let verify_by_context = measure_verify(teacher, opts)?;
    let mean: Vec<(usize, f64)> = verify_by_context[0]
        .ms
        .points
        .iter()
        .enumerate()
        .map(|(i, &(n, _))| {
            let sum: f64 = verify_by_context.iter().map(|c| c.ms.points[i].1).sum();
            (n, sum / verify_by_context.len() as f64)
        })
        .collect();
    let context = opts.contexts[0];
    let costs = Costs {
        verify_ms: Curve::new(mean)?,
        draft_step_ms: measure_draft_steps(teacher, drafter, context, opts)?,
        depth0_ms: measure_depth0(teacher, drafter, context, opts)?,
        // Averaged over the same contexts as verification, so plain and tree steps compare alike.
        plain_ms: opts
            .contexts
            .iter()
            .map(|&c| measure_plain(teacher, c, opts))
            .sum::<Result<f64>>()?
            / opts.contexts.len() as f64,
    };
    Ok(Calibration {
        device: crate::model::device::device_name(teacher.device()),
        dtype: format!("{:?}", teacher.kind()),
        draft_vocab: drafting_vocab(head, vocab),
        top_k: opts.top_k,
        temperature: opts.temperature,
        acceptance,
        trials,
        verify_by_context,
        costs,
    })
}

/// acceptance[d][r] and the positions counted per depth.
fn measure_acceptance(
    teacher: &Teacher,
    drafter: &mut dyn Drafter,
    texts: &[CalibrationText],
    opts: &CalibrateOptions,
    depths: usize,
) -> Result<(Vec<Vec<f64>>, Vec<usize>)> {
    let k = opts.top_k;
    let mut hits = vec![vec![0usize; k]; depths];
    let mut trials = vec![0usize; depths];
    let mut bar = Progress::new("calibrate (acceptance)", texts.len() as u64);
    for text in texts {
        let ids = &text.input_ids;
        let (u, logits) = teacher_pass(teacher, ids);
        let pred = Vec::<i64>::try_from(logits.argmax(-1, false).to_device(tch::Device::Cpu))?;
        // Roots: answer positions whose next text token is the teacher's greedy token.
        let roots: Vec<usize> = (0..ids.len() - 1)
            .filter(|&t| text.loss_mask.get(t + 1) == Some(&1) && ids[t + 1] == pred[t])
            .collect();
        walk_roots(drafter, (&u, ids), &roots, depths, |t, d, logits| {
            // Depth d+1 drafted from root t predicts pred[t+d+1].
            if t + d + 1 >= ids.len() {
                return Ok(None);
            }
            trials[d] += 1;
            let top = logits.topk(k as i64, -1, true, true).1;
            let top = Vec::<i64>::try_from(top.to_device(tch::Device::Cpu).view([-1]))?;
            let Some(r) = top.iter().position(|&x| x == pred[t + d + 1]) else {
                return Ok(None);
            };
            hits[d][r] += 1;
            // The next depth continues while the text still follows the greedy chain.
            let follows = t + d + 2 < ids.len() && ids[t + d + 2] == pred[t + d + 1];
            Ok(follows.then_some(pred[t + d + 1]))
        })?;
        bar.inc(1);
    }
    bar.finish();
    let hits = hits
        .iter()
        .map(|h| h.iter().map(|&c| c as f64).collect())
        .collect();
    Ok((rates(hits, &trials), trials))
}

/// Drafts from every root of one text as decoding would: the drafter is extended over the
/// text's positions up to the root (each state u_t paired with x_{t+1}, G4), then steps along a
/// chain of tokens. `score(root, d, logits)` reads depth d+1's logits and names the token the
/// chain continues with, or None where it ends. Extending in order reuses the drafter's cache,
/// and each extend drops the tree rows of the previous root's chain, as between decoding steps.
fn walk_roots(
    drafter: &mut dyn Drafter,
    (u, ids): (&Tensor, &[i64]),
    roots: &[usize],
    depths: usize,
    mut score: impl FnMut(usize, usize, &Tensor) -> Result<Option<i64>>,
) -> Result<()> {
    let device = u.device();
    let next = Tensor::from_slice(&ids[1..]).to_device(device).unsqueeze(0);
    drafter.reset();
    let mut committed = 0usize;
    for &root in roots {
        let n = (root + 1 - committed) as i64;
        let (mut logits, mut state) = drafter.extend(
            &u.narrow(1, committed as i64, n),
            &next.narrow(1, committed as i64, n),
        )?;
        committed = root + 1;
        for d in 0..depths {
            match score(root, d, &logits)? {
                Some(token) if d + 1 < depths => {
                    let token = Tensor::from_slice(&[token]).to_device(device);
                    (logits, state) = drafter.step(&state, &token)?;
                }
                _ => break,
            }
        }
    }
    Ok(())
}

/// The teacher's pre-norm states u [1,T,H] and logits [T,V] of one text.
fn teacher_pass(teacher: &Teacher, ids: &[i64]) -> (Tensor, Tensor) {
    let device = teacher.device();
    let input = Tensor::from_slice(ids).to_device(device).unsqueeze(0);
    let positions = Tensor::arange(ids.len() as i64, (Kind::Int64, device)).unsqueeze(0);
    let u = teacher.forward(&input, &positions, None, None);
    let logits = teacher.logits(&u.squeeze_dim(0));
    (u, logits)
}

/// Hits per depth and rank over the positions tried at that depth.
fn rates(hits: Vec<Vec<f64>>, trials: &[usize]) -> Vec<Vec<f64>> {
    hits.into_iter()
        .zip(trials)
        .map(|(h, &n)| {
            h.into_iter()
                .map(|c| if n > 0 { c / n as f64 } else { 0.0 })
                .collect()
        })
        .collect()
}

/// The acceptance table of lossless tree sampling at `opts.temperature` (`accept_sampling`):
/// at every answer position of a text and every depth, the draft's children are drawn from its
/// q without replacement (Gumbel top-k) and walked through the same residual chain as decoding,
/// but with the probabilities themselves: child j is the committed one with probability
/// Π_{i<j}(1 - a_i)·a_j, a_j = min(1, p_j(x_j)/q_j(x_j)). Those expectations are summed, so
/// acceptance[d][r] estimates P(rank r is committed | the parent was). The path continues along
/// the text's own tokens (which the teacher's state needs), each position weighted alike: an
/// approximation of conditioning on the sampled parent.
fn measure_sampled_acceptance(
    teacher: &Teacher,
    drafter: &mut dyn Drafter,
    texts: &[CalibrationText],
    opts: &CalibrateOptions,
    depths: usize,
) -> Result<(Vec<Vec<f64>>, Vec<usize>)> {
    let (k, temp) = (opts.top_k as i64, opts.temperature);
    let device = teacher.device();
    let mut hits: Vec<Tensor> = (0..depths)
        .map(|_| Tensor::zeros([k], (Kind::Double, device)))
        .collect();
    let mut trials = vec![0usize; depths];
    let mut bar = Progress::new("calibrate (sampled acceptance)", texts.len() as u64);
    for text in texts {
        let ids = &text.input_ids;
        let (u, logits) = teacher_pass(teacher, ids);
        let p_all = (logits.to_kind(Kind::Float) / temp).softmax(-1, Kind::Float);
        let roots: Vec<usize> = (0..ids.len() - 1)
            .filter(|&t| text.loss_mask.get(t + 1) == Some(&1))
            .collect();
        walk_roots(drafter, (&u, ids), &roots, depths, |t, d, logits| {
            // Depth d+1 from root t drafts the token after position t+d+1.
            let at = t + d + 1;
            if at >= ids.len() {
                return Ok(None);
            }
            let p = p_all.narrow(0, at as i64, 1);
            let q = (logits.to_kind(Kind::Float) / temp).softmax(-1, Kind::Float);
            hits[d] += committed_by_rank(&p, &q, k).sum_dim_intlist(0, false, Kind::Double);
            trials[d] += 1;
            // The parent of the next depth: the text's own token after position t+d+1.
            Ok(ids.get(at + 1).copied())
        })?;
        bar.inc(1);
    }
    bar.finish();
    let hits = hits
        .iter()
        .map(|h| Vec::<f64>::try_from(h.to_device(tch::Device::Cpu)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((rates(hits, &trials), trials))
}

/// For rows of teacher p and draft q [n,V]: draws k children from q without replacement
/// (Gumbel top-k) and returns [n,k], the probability that child j is the one `accept_sampling`
/// commits: Π_{i<j}(1 - a_i)·a_j with a_j = min(1, p_j(x_j)/q_j(x_j)), where q_j is q without
/// the earlier children, renormalised, and p_j the residual norm(max(p_{j-1} - q_{j-1}, 0)).
pub fn committed_by_rank(p: &Tensor, q: &Tensor, k: i64) -> Tensor {
    let tiny = 1e-30;
    let uniform =
        Tensor::rand(q.size().as_slice(), (Kind::Float, q.device())).clamp(1e-20, 1.0 - 1e-7);
    let gumbel = -(-uniform.log()).log();
    let children = (q.clamp_min(tiny).log() + gumbel).topk(k, -1, true, true).1;
    let (mut p, mut q) = (p.shallow_clone(), q.shallow_clone());
    let mut survive = Tensor::ones([p.size()[0], 1], (Kind::Float, p.device()));
    let mut out = Vec::with_capacity(k as usize);
    for j in 0..k {
        let x = children.narrow(1, j, 1);
        let qn = &q / q.sum_dim_intlist(-1, true, Kind::Float).clamp_min(tiny);
        let qx = qn.gather(1, &x, false);
        let a = (p.gather(1, &x, false) / qx.clamp_min(tiny))
            .clamp_max(1.0)
            .where_self(&qx.gt(0.0), &qx.zeros_like());
        out.push(&survive * &a);
        survive = survive * (1.0 - a);
        let residual = (&p - &qn).clamp_min(0.0);
        let mass = residual.sum_dim_intlist(-1, true, Kind::Float);
        p = (residual / mass.clamp_min(tiny)).where_self(&mass.gt(0.0), &p);
        q = q.scatter_value(1, &x, 0.0);
    }
    Tensor::cat(&out, 1)
}

/// Median of the milliseconds `run` reports over `repeats` runs after `warmup` untimed ones:
/// `run` times its own measured part (see [`time_ms`]), so it may prepare each run untimed.
fn median_ms(opts: &CalibrateOptions, mut run: impl FnMut() -> Result<f64>) -> Result<f64> {
    for _ in 0..opts.warmup {
        run()?;
    }
    let mut times = (0..opts.repeats.max(1))
        .map(|_| run())
        .collect::<Result<Vec<f64>>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Milliseconds `f` takes.
fn time_ms(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

/// Tree sizes timed: every n up to 8, where small trees live, then about 1.5x apart up to the
/// maximum (the curve is interpolated between them).
fn tree_sizes(max: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = (1..=max.min(8)).collect();
    sizes.extend(
        [12, 16, 24, 32, 48, 64, 96, 128]
            .iter()
            .filter(|&&n| n < max)
            .copied(),
    );
    if max > 8 {
        sizes.push(max);
    }
    sizes
}

/// A teacher KV cache holding `context` tokens.
fn prefilled_cache(teacher: &Teacher, context: usize) -> crate::model::layers::KvCache {
    let device = teacher.device();
    let mut cache = teacher.new_cache(1);
    let vocab = teacher.config.vocab_size;
    let ids = (Tensor::arange(context as i64, (Kind::Int64, device)) * 7919).remainder(vocab);
    let pos = Tensor::arange(context as i64, (Kind::Int64, device)).unsqueeze(0);
    let _ = teacher.forward(&ids.unsqueeze(0), &pos, None, Some(&mut cache));
    cache
}

fn measure_verify(teacher: &Teacher, opts: &CalibrateOptions) -> Result<Vec<VerifyCurve>> {
    let device = teacher.device();
    let cap = teacher.config.max_position_embeddings as usize;
    let sizes = tree_sizes(opts.max_tree_tokens);
    let mut bar = Progress::new(
        "calibrate (verify costs)",
        (sizes.len() * opts.contexts.len()) as u64,
    );
    let mut curves = Vec::new();
    for &context in &opts.contexts {
        ensure!(
            context + opts.max_tree_tokens < cap,
            "calibration context {context} + {} tree tokens exceeds the teacher's {cap} positions",
            opts.max_tree_tokens
        );
        let mut cache = prefilled_cache(teacher, context);
        let mut points = Vec::new();
        for &n in &sizes {
            let c = context as i64;
            let ids = Tensor::ones([1, n as i64], (Kind::Int64, device));
            let pos = Tensor::arange_start(c, c + n as i64, (Kind::Int64, device)).unsqueeze(0);
            // The cost of a tree forward does not depend on the mask's pattern: a chain will do.
            let mask = causal_mask(c, n as i64, device);
            let ms = median_ms(opts, || {
                time_ms(|| {
                    let u = teacher.forward(&ids, &pos, Some(&mask), Some(&mut cache));
                    let pred = teacher.logits(&u.squeeze_dim(0)).argmax(-1, false);
                    let _ = pred.sum(Kind::Int64).int64_value(&[]);
                    cache.truncate(c);
                    Ok(())
                })
            })?;
            points.push((n, ms));
            bar.inc(1);
        }
        curves.push(VerifyCurve {
            context,
            ms: Curve::new(points)?.monotone(),
        });
    }
    bar.finish();
    Ok(curves)
}

/// Zero states and token 1 at `context` positions: what a cost measurement commits (the cost
/// does not depend on the values).
fn blank_prefix(teacher: &Teacher, context: usize) -> (Tensor, Tensor) {
    let device = teacher.device();
    let (c, h) = (context as i64, teacher.config.hidden_size);
    (
        Tensor::zeros([1, c, h], (teacher.kind(), device)),
        Tensor::ones([1, c], (Kind::Int64, device)),
    )
}

/// One depth-1 step on m nodes after a `context`-position prefix. Each run first commits one
/// position untimed, which puts the drafter back at depth 1 (and drops EAGLE-1's tree rows) as
/// a decoding step does; the prefix grows by those few positions.
fn measure_draft_steps(
    teacher: &Teacher,
    drafter: &mut dyn Drafter,
    context: usize,
    opts: &CalibrateOptions,
) -> Result<Curve> {
    let device = teacher.device();
    let (u, ids) = blank_prefix(teacher, context);
    drafter.reset();
    let _ = drafter.extend(&u, &ids)?;
    let (u1, ids1) = (u.narrow(1, 0, 1), ids.narrow(1, 0, 1));
    let mut points = Vec::new();
    for m in [1usize, 2, 4, 8, 16, 32] {
        let parents = Tensor::zeros([m as i64], (Kind::Int64, device));
        let tokens = Tensor::ones([m as i64], (Kind::Int64, device));
        let ms = median_ms(opts, || {
            let (_, state0) = drafter.extend(&u1, &ids1)?;
            let states = state0.index_select(0, &parents);
            time_ms(|| {
                let (logits, _) = drafter.step(&states, &tokens)?;
                let top = logits.topk(opts.top_k as i64, -1, true, true).1;
                let _ = top.sum(Kind::Int64).int64_value(&[]);
                Ok(())
            })
        })?;
        points.push((m, ms));
    }
    Ok(Curve::new(points)?.monotone())
}

/// The depth-0 call on two accepted states after a `context`-position prefix (which grows by
/// the two positions each run commits).
fn measure_depth0(
    teacher: &Teacher,
    drafter: &mut dyn Drafter,
    context: usize,
    opts: &CalibrateOptions,
) -> Result<f64> {
    let (u, ids) = blank_prefix(teacher, context);
    drafter.reset();
    let _ = drafter.extend(&u, &ids)?;
    let (u2, ids2) = (u.narrow(1, 0, 2), ids.narrow(1, 0, 2));
    median_ms(opts, || {
        time_ms(|| {
            let (logits, _) = drafter.extend(&u2, &ids2)?;
            let top = logits.topk(opts.top_k as i64, -1, true, true).1;
            let _ = top.sum(Kind::Int64).int64_value(&[]);
            Ok(())
        })
    })
}

fn measure_plain(teacher: &Teacher, context: usize, opts: &CalibrateOptions) -> Result<f64> {
    let device = teacher.device();
    let mut cache = prefilled_cache(teacher, context);
    let c = context as i64;
    let ids = Tensor::ones([1, 1], (Kind::Int64, device));
    let pos = Tensor::from_slice(&[c]).to_device(device).unsqueeze(0);
    median_ms(opts, || {
        time_ms(|| {
            let u = teacher.forward(&ids, &pos, None, Some(&mut cache));
            let _ = teacher
                .logits(&u.select(1, 0))
                .argmax(-1, false)
                .int64_value(&[0]);
            cache.truncate(c);
            Ok(())
        })
    })
}

/// `clover calibrate`: load the teacher and head, measure, write `out`.
pub fn run(
    model: &std::path::Path,
    draft: &std::path::Path,
    run_on: &crate::model::device::RunOn,
    texts: &[CalibrationText],
    draft_vocab: Option<&[i64]>,
    opts: &CalibrateOptions,
    out: &std::path::Path,
) -> Result<()> {
    let (device, kind) = run_on.resolve()?;
    let teacher = Teacher::load(model, device, kind)?;
    let head = crate::model::head::load_head(draft, &teacher)?;
    let vocab = match draft_vocab {
        Some(ids) => Some(head.slice_vocab(ids, opts.top_k)?),
        None => None,
    };
    let calib = calibrate(&teacher, &head, vocab.as_ref(), texts, opts)?;
    calib.write(out)?;
    let search = crate::decode::tree_search::best_tree(
        &calib.acceptance,
        &calib.costs,
        crate::decode::tree_search::SearchLimits {
            max_nodes: 32,
            max_depth: opts.max_depth,
        },
    );
    let first: Vec<String> = calib
        .acceptance
        .iter()
        .map(|row| format!("{:.3}", row[0]))
        .collect();
    println!(
        "acceptance of rank 0 per depth [{}] over {:?} positions; plain step {:.2} ms, depth-0 \
         draft {:.2} ms, verify 1/8/32 tokens {:.2}/{:.2}/{:.2} ms",
        first.join(", "),
        calib.trials,
        calib.costs.plain_ms,
        calib.costs.depth0_ms,
        calib.costs.verify_ms.at(1),
        calib.costs.verify_ms.at(8),
        calib.costs.verify_ms.at(32)
    );
    println!(
        "best tree (<= 32 nodes): {} -> expected tau {:.3}, {:.1} tokens/s against {:.1} plain",
        serde_json::to_string(&search.paths)?,
        search.expected_tau,
        search.tokens_per_s,
        search.plain_tokens_per_s
    );
    eprintln!("calibration written to {}", out.display());
    Ok(())
}
