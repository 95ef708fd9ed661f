//! `clover calibrate`: what a tree search needs to know about a head on a device.
//!
//! (a) The head's acceptance table, on calibration texts (the prepared data's eval split, never
//! the evaluation prompts): for each depth d and sibling rank r < top_k, the probability that
//! the teacher's greedy token is the head's rank-r draft, given that its parent was accepted.
//! One teacher forward gives the teacher's argmax at every position; the head then unrolls along
//! the teacher's own greedy chain from every answer position at once. A depth counts a position
//! only while the text follows that chain (the regenerated data is the teacher's greedy output,
//! so it nearly always does) and the parent was within the top-k.
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
use crate::decode::speculative::{Drafter, HeadDrafter};
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

/// Measure the acceptance table and the costs.
pub fn calibrate(
    teacher: &Teacher,
    drafter: &mut HeadDrafter,
    head: &DraftHead,
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
    let _guard = tch::no_grad_guard();
    let (acceptance, trials) = if opts.temperature > 0.0 {
        crate::rng::seeded(opts.seed, || {
            measure_sampled_acceptance(teacher, drafter, head, texts, opts)
        })?
    } else {
        measure_acceptance(teacher, drafter, head, texts, opts)?
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
        draft_step_ms: measure_draft_steps(teacher, drafter, opts)?,
        depth0_ms: measure_depth0(teacher, drafter, context, opts),
        // Averaged over the same contexts as verification, so plain and tree steps compare alike.
        plain_ms: opts
            .contexts
            .iter()
            .map(|&c| measure_plain(teacher, c, opts))
            .sum::<f64>()
            / opts.contexts.len() as f64,
    };
    Ok(Calibration {
        device: crate::model::device::device_name(teacher.device()),
        dtype: format!("{:?}", teacher.kind()),
        draft_vocab: drafter.vocab_len(),
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
    drafter: &mut HeadDrafter,
    head: &DraftHead,
    texts: &[CalibrationText],
    opts: &CalibrateOptions,
) -> Result<(Vec<Vec<f64>>, Vec<usize>)> {
    let (k, depths) = (opts.top_k, opts.max_depth);
    let mut hits = vec![vec![0usize; k]; depths];
    let mut trials = vec![0usize; depths];
    let mut bar = Progress::new("calibrate (acceptance)", texts.len() as u64);
    let device = teacher.device();
    for text in texts {
        let ids = &text.input_ids;
        let (u, positions, logits) = teacher_pass(teacher, ids);
        let pred = Vec::<i64>::try_from(logits.argmax(-1, false).to_device(tch::Device::Cpu))?;
        // The draft pairs the state at t with x_{t+1} (G4); the last state with the teacher's token.
        let mut next: Vec<i64> = ids[1..].to_vec();
        next.push(pred[ids.len() - 1]);
        let next_t = Tensor::from_slice(&next).to_device(device).unsqueeze(0);
        let (o0, s0) = head.depth0(&u, &next_t, &positions, None, None);
        // Roots: answer positions whose next text token is the teacher's greedy token.
        let mut rows: Vec<usize> = (0..ids.len() - 1)
            .filter(|&t| text.loss_mask.get(t + 1) == Some(&1) && ids[t + 1] == pred[t])
            .collect();
        let mut out = o0.squeeze_dim(0);
        let mut state = s0.squeeze_dim(0);
        for d in 0..depths {
            // Depth d+1 drafts from row t predict pred[t+d+1]; keep rows where it exists.
            rows.retain(|&t| t + d + 1 < ids.len());
            if rows.is_empty() {
                break;
            }
            let idx = Tensor::from_slice(&rows.iter().map(|&t| t as i64).collect::<Vec<_>>())
                .to_device(device);
            let o = out.index_select(0, &idx);
            let s = state.index_select(0, &idx);
            let top = drafter
                .logits(d as i64, &o)
                .topk(k as i64, -1, true, true)
                .1;
            let top = Vec::<i64>::try_from(top.to_device(tch::Device::Cpu).view([-1]))?;
            let mut accepted = Vec::new();
            for (i, &t) in rows.iter().enumerate() {
                trials[d] += 1;
                let target = pred[t + d + 1];
                if let Some(r) = top[i * k..(i + 1) * k].iter().position(|&x| x == target) {
                    hits[d][r] += 1;
                    accepted.push(i);
                }
            }
            // The next depth continues accepted rows whose text still follows the greedy chain.
            let keep: Vec<usize> = accepted
                .into_iter()
                .filter(|&i| {
                    rows[i] + d + 2 < ids.len() && ids[rows[i] + d + 2] == pred[rows[i] + d + 1]
                })
                .collect();
            if keep.is_empty() {
                break;
            }
            let keep_idx = Tensor::from_slice(&keep.iter().map(|&i| i as i64).collect::<Vec<_>>())
                .to_device(device);
            let tokens: Vec<i64> = keep.iter().map(|&i| pred[rows[i] + d + 1]).collect();
            let (o_next, s_next) = head.step(
                &s.index_select(0, &keep_idx),
                &Tensor::from_slice(&tokens).to_device(device),
            );
            rows = keep.iter().map(|&i| rows[i]).collect();
            // Re-index: row j of the new tensors belongs to rows[j]; store at a dense index.
            out = scatter_rows(&o_next, &rows, ids.len());
            state = scatter_rows(&s_next, &rows, ids.len());
        }
        bar.inc(1);
    }
    bar.finish();
    let hits = hits
        .iter()
        .map(|h| h.iter().map(|&c| c as f64).collect())
        .collect();
    Ok((rates(hits, &trials), trials))
}

/// The teacher's pre-norm states u [1,T,H], positions [1,T] and logits [T,V] of one text.
fn teacher_pass(teacher: &Teacher, ids: &[i64]) -> (Tensor, Tensor, Tensor) {
    let device = teacher.device();
    let input = Tensor::from_slice(ids).to_device(device).unsqueeze(0);
    let positions = Tensor::arange(ids.len() as i64, (Kind::Int64, device)).unsqueeze(0);
    let u = teacher.forward(&input, &positions, None, None);
    let logits = teacher.logits(&u.squeeze_dim(0));
    (u, positions, logits)
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
    drafter: &mut HeadDrafter,
    head: &DraftHead,
    texts: &[CalibrationText],
    opts: &CalibrateOptions,
) -> Result<(Vec<Vec<f64>>, Vec<usize>)> {
    let (k, depths, temp) = (opts.top_k as i64, opts.max_depth, opts.temperature);
    let device = teacher.device();
    let mut hits: Vec<Tensor> = (0..depths)
        .map(|_| Tensor::zeros([k], (Kind::Double, device)))
        .collect();
    let mut trials = vec![0usize; depths];
    let mut bar = Progress::new("calibrate (sampled acceptance)", texts.len() as u64);
    for text in texts {
        let ids = &text.input_ids;
        let len = ids.len() as i64;
        let (u, positions, logits) = teacher_pass(teacher, ids);
        let p_all = (logits.to_kind(Kind::Float) / temp).softmax(-1, Kind::Float);
        // The draft pairs the state at t with x_{t+1} (G4); the last state's partner is unused.
        let mut next: Vec<i64> = ids[1..].to_vec();
        next.push(0);
        let next_t = Tensor::from_slice(&next).to_device(device).unsqueeze(0);
        let (o0, s0) = head.depth0(&u, &next_t, &positions, None, None);
        let roots: Vec<i64> = (0..len - 1)
            .filter(|&t| text.loss_mask.get(t as usize + 1) == Some(&1))
            .collect();
        let mut o = o0.squeeze_dim(0);
        let mut state = s0.squeeze_dim(0);
        if !roots.is_empty() {
            let idx = Tensor::from_slice(&roots).to_device(device);
            o = o.index_select(0, &idx);
            state = state.index_select(0, &idx);
        }
        let mut rows = roots;
        for d in 0..depths {
            // Depth d+1 from row t drafts the token after position t+d+1; keep rows where the
            // text has it.
            let keep: Vec<i64> = (0..rows.len() as i64)
                .filter(|&i| rows[i as usize] + d as i64 + 1 < len)
                .collect();
            if keep.is_empty() {
                break;
            }
            let keep_idx = Tensor::from_slice(&keep).to_device(device);
            rows = keep.iter().map(|&i| rows[i as usize]).collect();
            o = o.index_select(0, &keep_idx);
            state = state.index_select(0, &keep_idx);
            let at = Tensor::from_slice(&rows).to_device(device) + (d as i64 + 1);
            let p = p_all.index_select(0, &at);
            let q =
                (drafter.logits(d as i64, &o).to_kind(Kind::Float) / temp).softmax(-1, Kind::Float);
            hits[d] += committed_by_rank(&p, &q, k).sum_dim_intlist(0, false, Kind::Double);
            trials[d] += rows.len();
            if d + 1 < depths {
                // The parent of the next depth: the text's token after position t+d+1 (rows
                // without one are dropped at the next depth's filter).
                let parent_at = (&at + 1).clamp_max(len - 1);
                let parent = Tensor::from_slice(ids)
                    .to_device(device)
                    .index_select(0, &parent_at);
                let (on, sn) = head.step(&state, &parent);
                o = on;
                state = sn;
            }
        }
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

/// Rows [m,H] placed at positions `rows` of a zero [len,H] tensor, so the loop can keep
/// indexing by text position.
fn scatter_rows(values: &Tensor, rows: &[usize], len: usize) -> Tensor {
    let h = values.size()[1];
    let idx = Tensor::from_slice(&rows.iter().map(|&t| t as i64).collect::<Vec<_>>())
        .to_device(values.device());
    Tensor::zeros([len as i64, h], (values.kind(), values.device())).index_copy(0, &idx, values)
}

/// Median milliseconds of `f` over `repeats` runs after `warmup` untimed ones.
fn median_ms(opts: &CalibrateOptions, mut f: impl FnMut()) -> f64 {
    for _ in 0..opts.warmup {
        f();
    }
    let mut times: Vec<f64> = (0..opts.repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
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
                let u = teacher.forward(&ids, &pos, Some(&mask), Some(&mut cache));
                let pred = teacher.logits(&u.squeeze_dim(0)).argmax(-1, false);
                let _ = pred.sum(Kind::Int64).int64_value(&[]);
                cache.truncate(c);
            });
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

fn measure_draft_steps(
    teacher: &Teacher,
    drafter: &mut HeadDrafter,
    opts: &CalibrateOptions,
) -> Result<Curve> {
    let device = teacher.device();
    let h = teacher.config.hidden_size;
    let mut points = Vec::new();
    for m in [1usize, 2, 4, 8, 16, 32] {
        let states = Tensor::zeros([m as i64, h], (teacher.kind(), device));
        let tokens = Tensor::ones([m as i64], (Kind::Int64, device));
        let ms = median_ms(opts, || {
            let (logits, _) = drafter.step(&states, &tokens).expect("draft step");
            let top = logits.topk(opts.top_k as i64, -1, true, true).1;
            let _ = top.sum(Kind::Int64).int64_value(&[]);
        });
        points.push((m, ms));
    }
    Ok(Curve::new(points)?.monotone())
}

fn measure_depth0(
    teacher: &Teacher,
    drafter: &mut HeadDrafter,
    context: usize,
    opts: &CalibrateOptions,
) -> f64 {
    let device = teacher.device();
    let h = teacher.config.hidden_size;
    drafter.reset();
    let c = context as i64;
    let u = Tensor::zeros([1, c, h], (teacher.kind(), device));
    let ids = Tensor::ones([1, c], (Kind::Int64, device));
    let _ = drafter.extend(&u, &ids).expect("draft prefill");
    let u2 = u.narrow(1, 0, 2);
    let ids2 = ids.narrow(1, 0, 2);
    median_ms(opts, || {
        let (logits, _) = drafter.extend(&u2, &ids2).expect("depth-0 call");
        let top = logits.topk(opts.top_k as i64, -1, true, true).1;
        let _ = top.sum(Kind::Int64).int64_value(&[]);
        drafter.rewind(c);
    })
}

fn measure_plain(teacher: &Teacher, context: usize, opts: &CalibrateOptions) -> f64 {
    let device = teacher.device();
    let mut cache = prefilled_cache(teacher, context);
    let c = context as i64;
    let ids = Tensor::ones([1, 1], (Kind::Int64, device));
    let pos = Tensor::from_slice(&[c]).to_device(device).unsqueeze(0);
    median_ms(opts, || {
        let u = teacher.forward(&ids, &pos, None, Some(&mut cache));
        let _ = teacher
            .logits(&u.select(1, 0))
            .argmax(-1, false)
            .int64_value(&[0]);
        cache.truncate(c);
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
    let mut drafter = HeadDrafter::new(&head).with_vocab(vocab.as_ref());
    let calib = calibrate(&teacher, &mut drafter, &head, texts, opts)?;
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
