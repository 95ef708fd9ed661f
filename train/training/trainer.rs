//! `clover train`: distil a Clover-2 draft head from a frozen teacher (docs/clover2.md §2).
//!
//! Online mode runs the teacher under no_grad inside the loop; offline mode reads its pre-norm
//! states from a `targets::DistillCache`. Batches are bucketed by length. Checkpoints hold the
//! head, the AdamW moments, the step, the RNG seed and the data position, so `--resume` replays
//! the uninterrupted run exactly.
//!
//! Data parallel (a `distributed::Group`): every rank starts from rank 0's weights, computes its
//! share of each step (`batches::rank_shares`, a function of seed, epoch and step) with the loss
//! normalised over the whole micro-batch, the gradients are summed over the ranks in buckets,
//! and every rank clips and steps the same summed gradient. Rank 0 alone evaluates and writes
//! checkpoints, metrics and TensorBoard; every rank shows its progress.
//!
//! Every held-out evaluation after step 0 whose tau estimate of the default tree beats the best
//! so far writes `checkpoints/best` (`checkpoint::save_best`); the checkpoints record that best,
//! so a resumed run goes on comparing against it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use tch::Tensor;
use tensorboard_rs::summary_writer::SummaryWriter;

use crate::data::shards::Sample;
use crate::data::vocab::frequent_tokens;
use crate::distributed::Group;
use crate::model::finite::non_finite_count;
use crate::model::head::{read_head_tensors, DraftHead};
use crate::model::teacher::Teacher;
use crate::progress::Progress;
use crate::training::batches::{depth_counts, epoch_steps, make_batch_reading, rank_shares, Step};
use crate::training::checkpoint::{
    checkpoints_dir, list_checkpoints, load_state, recorded_best, save_best, save_checkpoint, Best,
    CheckpointState, CK_HEAD, CK_OPTIM,
};
use crate::training::config::{TrainConfig, TrainOptions};
use crate::training::evaluate::evaluate;
use crate::training::loss::{BatchLoss, DepthLoss, LossWeights};
use crate::training::metrics::{
    append_jsonl, check_finite, log_eval, log_step, EvalRecord, StepRecord,
};
use crate::training::optimizer::{clip_grads_by_value, grad_norm, lr_factor, zero_grads, AdamW};
use crate::training::run_dir::{RunDir, Start};
use crate::training::targets::DistillCache;

#[derive(Debug, Default)]
pub struct TrainOutcome {
    pub steps: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
    pub last_checkpoint: Option<PathBuf>,
    /// The best evaluation so far (what `checkpoints/best` holds), including a resumed run's.
    pub best: Option<Best>,
}

/// Where the teacher states come from.
pub enum Source {
    /// Run the frozen teacher in the loop.
    Online(Vec<Sample>),
    /// Read its pre-norm states from a distillation cache (train split, same order).
    Offline(DistillCache),
}

impl Source {
    fn samples(&self) -> &[Sample] {
        match self {
            Source::Online(s) => s,
            Source::Offline(c) => c.samples(),
        }
    }
}

fn states_for(source: &Source, batch: &[usize]) -> Result<Option<Vec<Tensor>>> {
    match source {
        Source::Online(_) => Ok(None),
        Source::Offline(cache) => batch
            .iter()
            .map(|&i| cache.get(i).map(|x| x.1))
            .collect::<Result<Vec<_>>>()
            .map(Some),
    }
}

/// Per-depth figures of one step, summed over its micro-batches.
#[derive(Default)]
struct StepSums {
    loss: Vec<f64>,
    top1: Vec<f64>,
    tokens: usize,
}

/// Columns of a `MicroFigures` row: a depth's loss, its top-1 hits, its rows.
const LOSS: i64 = 0;
const HITS: i64 = 1;
const ROWS: i64 = 2;

/// Each micro-batch's per-depth (loss, top-1 hits, rows) [micro-batches, depths, 3] and real
/// tokens [micro-batches], f64 on the CPU. Shares of one micro-batch add up (their losses are
/// normalised over the whole micro-batch), so summing this over data-parallel ranks gives the
/// figures of the whole step.
struct MicroFigures {
    depths: Tensor,
    tokens: Tensor,
}

impl MicroFigures {
    fn new(micro_batches: usize, depths: usize) -> Self {
        let opts = (tch::Kind::Double, tch::Device::Cpu);
        MicroFigures {
            depths: Tensor::zeros([micro_batches as i64, depths as i64, 3], opts),
            tokens: Tensor::zeros([micro_batches as i64], opts),
        }
    }

    fn add(&mut self, micro_batch: usize, depths: &[DepthLoss], tokens: usize) {
        let row = self.depths.get(micro_batch as i64);
        for (i, d) in depths.iter().enumerate() {
            let cell = row.get(i as i64);
            let hits = (d.top1 * d.count as f64).round();
            for (col, value) in [(LOSS, d.loss), (HITS, hits), (ROWS, d.count as f64)] {
                let _ = cell.get(col).g_add_scalar_(value);
            }
        }
        let _ = self
            .tokens
            .get(micro_batch as i64)
            .g_add_scalar_(tokens as f64);
    }

    /// The step's sums: per micro-batch, its loss and its top-1 fraction (0 without rows, as
    /// `DepthLoss::top1`).
    fn sums(&self) -> Result<StepSums> {
        let table: Vec<f64> = Vec::try_from(self.depths.flatten(0, -1))?;
        let tokens: Vec<f64> = Vec::try_from(&self.tokens)?;
        let depths = self.depths.size()[1] as usize;
        let mut sums = StepSums {
            loss: vec![0.0; depths],
            top1: vec![0.0; depths],
            tokens: 0,
        };
        for (micro, cells) in table.chunks(depths * 3).enumerate() {
            for (i, cell) in cells.chunks(3).enumerate() {
                sums.loss[i] += cell[LOSS as usize];
                let rows = cell[ROWS as usize];
                sums.top1[i] += if rows > 0.0 {
                    cell[HITS as usize] / rows
                } else {
                    0.0
                };
            }
            sums.tokens += tokens[micro] as usize;
        }
        Ok(sums)
    }
}

impl StepSums {
    /// The step's record: losses and top-1 as means over the micro-batches, the same average
    /// the accumulated gradient takes.
    fn record(&self, step: u64, lr: f64, grad_norm: f64, micro_batches: usize) -> StepRecord {
        let mean = |v: &[f64]| -> Vec<f64> { v.iter().map(|x| x / micro_batches as f64).collect() };
        let depth_loss = mean(&self.loss);
        StepRecord {
            step,
            loss: depth_loss.iter().sum(),
            depth_loss,
            depth_top1: mean(&self.top1),
            lr,
            grad_norm,
            tokens: self.tokens,
        }
    }
}

/// The training loop. `eval` is the held-out split (the teacher runs on it online).
pub fn train(
    cfg: &TrainConfig,
    teacher: &Teacher,
    source: Source,
    eval: Vec<Sample>,
    start: Start,
    opts: &TrainOptions,
    group: Option<&Group>,
) -> Result<TrainOutcome> {
    let eval = &eval[..eval.len().min(cfg.eval_samples)];
    let mut run = Run::set_up(cfg, teacher, &source, start, group)?;
    if start == Start::Resume {
        run.resume()?;
    }
    if run.step == 0 {
        // The untrained head's figures, the baseline the eval curve starts from.
        run.evaluate(eval)?;
    }
    while run.step < run.total_steps {
        run.train_step(&source, opts)?;
        if run.eval_due() {
            run.evaluate(eval)?;
        }
        if run.checkpoint_due() {
            run.checkpoint()?;
        }
        if opts.halt_after_step == Some(run.step) {
            break;
        }
    }
    if let Some(group) = group {
        run.check_replicas(group)?;
    }
    run.bar.finish();
    Ok(run.outcome)
}

/// Trained (loss-mask 1) tokens of `samples` within `max_len`.
fn trained_tokens(samples: &[Sample], max_len: usize) -> usize {
    samples
        .iter()
        .map(|s| {
            s.loss_mask
                .iter()
                .take(max_len)
                .filter(|&&m| m != 0)
                .count()
        })
        .sum()
}

/// FNV-1a over every training row's ids and loss mask, in order, as 16 hex digits.
fn data_fingerprint(samples: &[Sample]) -> String {
    let mut hash = Fnv::default();
    for s in samples {
        hash.write(&(s.input_ids.len() as u64).to_le_bytes());
        for (&id, &m) in s.input_ids.iter().zip(&s.loss_mask) {
            hash.write(&id.to_le_bytes());
            hash.write(&[m as u8]);
        }
    }
    format!("{:016x}", hash.0)
}

/// A batch's rows for a message: their sample ids and, offline, the cache shards they sit in.
fn describe_rows(source: &Source, rows: &[usize]) -> String {
    let ids: Vec<&str> = rows
        .iter()
        .take(8)
        .map(|&i| source.samples()[i].id.as_str())
        .collect();
    let more = rows.len().saturating_sub(ids.len());
    let mut text = format!(
        "samples {}{}",
        ids.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    );
    if let Source::Offline(cache) = source {
        let mut shards: Vec<String> = rows
            .iter()
            .map(|&i| cache.shard_file_of(i).display().to_string())
            .collect();
        shards.sort();
        shards.dedup();
        text.push_str(&format!(" from {}", shards.join(", ")));
    }
    text
}

/// FNV-1a, 64 bits: cheap, stable across runs and machines.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// FNV-1a over the f32 bits of every parameter, in name order: equal weights, equal value.
fn weights_fingerprint(params: &BTreeMap<String, Tensor>) -> Result<u64> {
    let mut hash = Fnv::default();
    for p in params.values() {
        let values: Vec<f32> = Vec::try_from(p.to_kind(tch::Kind::Float).flatten(0, -1))?;
        for v in values {
            hash.write(&v.to_bits().to_le_bytes());
        }
    }
    Ok(hash.0)
}

/// The best a resumed run goes on from: the one its checkpoint recorded, or the one
/// `checkpoints/best` holds where that is better (a best written by the killed run after the
/// checkpoint it resumes from: its step is replayed exactly, so it stands).
fn resumed_best(recorded: Option<Best>, on_disk: Option<Best>) -> Option<Best> {
    match (recorded, on_disk) {
        (Some(r), Some(d)) if r.beaten_by(d.step, d.tau_est_default_tree) => Some(d),
        (Some(r), _) => Some(r),
        (None, d) => d,
    }
}

/// One training run's state: the head and optimizer, the data position, the logs.
struct Run<'a> {
    cfg: &'a TrainConfig,
    teacher: &'a Teacher,
    head: DraftHead,
    params: BTreeMap<String, Tensor>,
    opt: AdamW,
    weights: LossWeights,
    /// Lengths of the training samples (truncated to max_len), which decide the batches.
    lengths: Vec<usize>,
    /// This epoch's steps (`batch_in_epoch` counts them).
    batches: Vec<Step>,
    step: u64,
    epoch: u64,
    batch_in_epoch: usize,
    total_steps: u64,
    schedule_steps: u64,
    /// TensorBoard, on the rank that writes (the only one, or rank 0).
    tb: Option<SummaryWriter>,
    /// The locked `out_dir`, on the rank that writes.
    run_dir: Option<RunDir>,
    /// What the training rows hold, so a resume on changed data is refused.
    data_fingerprint: String,
    /// The best evaluation so far, by the tau estimate of the default tree.
    best: Option<Best>,
    bar: Progress,
    outcome: TrainOutcome,
    group: Option<&'a Group>,
}

/// `draft_vocab = N`: a new head gets the N most frequent answer tokens of its training rows
/// (in teacher-id order, as EAGLE-3's `d2t`); a head from `init_from` must already have N.
/// Resuming recomputes the same vocabulary from the same data, and `load_tensors` checks it
/// against the checkpoint's.
fn give_draft_vocab(head: &mut DraftHead, samples: &[Sample], group: Option<&Group>) -> Result<()> {
    let Some(n) = head.config().options.draft_vocab else {
        return Ok(());
    };
    ensure!(
        group.is_none_or(|g| g.world == 1),
        "draft_vocab with data-parallel training is not supported yet: the per-depth normaliser \
         of a batch split across ranks would need every rank's teacher argmax"
    );
    match head.draft_vocab() {
        Some(have) => ensure!(
            have.len() == n,
            "init_from's head has a draft vocabulary of {} tokens, the config asks for {n}",
            have.len()
        ),
        None => {
            let mut ids = frequent_tokens(samples, n, head.config().vocab_size as usize)?;
            ids.sort_unstable();
            head.set_draft_vocab(&ids)?;
        }
    }
    Ok(())
}

/// The training rows a run uses (`max_train_samples` of them) and their lengths after
/// truncation to `max_len`, checked: something to learn, a cache of this teacher and data, rows
/// within the teacher's context and the batch budget.
fn training_rows<'s>(
    cfg: &TrainConfig,
    teacher: &Teacher,
    source: &'s Source,
) -> Result<(&'s [Sample], Vec<usize>)> {
    let n_train = source
        .samples()
        .len()
        .min(cfg.max_train_samples.unwrap_or(usize::MAX));
    ensure!(n_train > 0, "no training samples");
    let trained = &source.samples()[..n_train];
    ensure!(
        trained_tokens(trained, cfg.max_len) > 0,
        "{}: no training row has a trained token (every loss-mask value is 0 within max_len = \
         {}): the run would change nothing",
        cfg.data_dir.display(),
        cfg.max_len
    );
    if let Source::Offline(cache) = source {
        cache.check_against(&cfg.model_dir, &cfg.data_dir, teacher.config.hidden_size)?;
    }
    let lengths: Vec<usize> = trained
        .iter()
        .map(|s| s.input_ids.len().min(cfg.max_len))
        .collect();
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let context = teacher.config.max_position_embeddings as usize;
    ensure!(
        longest <= context,
        "the longest training row has {longest} tokens after truncation to max_len = {}, more \
         than the teacher's context of {context} positions ({}/config.json \
         max_position_embeddings): set max_len to {context} or less",
        cfg.max_len,
        cfg.model_dir.display()
    );
    let (budget_key, budget) = match cfg.micro_batch_tokens {
        Some(tokens) => ("micro_batch_tokens", tokens),
        None => ("batch_tokens", cfg.batch_tokens),
    };
    ensure!(
        longest <= budget,
        "{budget_key} = {budget} is below the longest training row ({longest} tokens after \
         truncation to max_len = {}): raise {budget_key} or lower max_len",
        cfg.max_len
    );
    Ok((trained, lengths))
}

/// The run's optimizer steps: `max_steps`, or `epochs` passes of `steps_per_epoch`.
fn run_length(cfg: &TrainConfig, steps_per_epoch: usize) -> Result<u64> {
    let total_steps = match (cfg.max_steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => e * steps_per_epoch as u64,
        (None, None) => bail!("set max_steps or epochs in the training config"),
    };
    // With `epochs` the step count is known only now (with `max_steps`, `validate` checked it
    // at load): the warm-up must fit in it too.
    ensure!(
        cfg.max_steps.is_some() || cfg.warmup_steps == 0 || cfg.warmup_steps < total_steps,
        "warmup_steps = {} must be below the run's {total_steps} steps (or 0)",
        cfg.warmup_steps
    );
    Ok(total_steps)
}

/// The head a run trains: `init_from`'s or the reference init, with its draft vocabulary and
/// compute dtype.
fn build_head(
    cfg: &TrainConfig,
    teacher: &Teacher,
    trained: &[Sample],
    group: Option<&Group>,
) -> Result<DraftHead> {
    let mut head = match &cfg.init_from {
        Some(dir) => {
            DraftHead::load(dir, teacher).with_context(|| format!("init_from {}", dir.display()))?
        }
        None => DraftHead::new(teacher, cfg.head_config(teacher), cfg.seed as i64)?,
    };
    give_draft_vocab(&mut head, trained, group)?;
    if let Some(kind) = cfg.autocast_kind(teacher.device()) {
        head.set_compute_kind(kind);
    }
    Ok(head)
}

/// The run's bar (or plain lines), labelled with its rank in a group.
fn progress_bar(cfg: &TrainConfig, group: Option<&Group>, total_steps: u64) -> Progress {
    let label = match group {
        Some(g) => format!("train rank {}/{}", g.rank, g.world),
        None => "train".to_string(),
    };
    if cfg.progress {
        Progress::new(&label, total_steps)
    } else {
        Progress::hidden(&label)
    }
}

impl<'a> Run<'a> {
    /// Checks the data against the config, builds the head (reference init or `init_from`) and
    /// its optimizer, and opens the logs.
    fn set_up(
        cfg: &'a TrainConfig,
        teacher: &'a Teacher,
        source: &Source,
        start: Start,
        group: Option<&'a Group>,
    ) -> Result<Self> {
        let writes = group.is_none_or(Group::is_first);
        let run_dir = if writes {
            Some(RunDir::open(&cfg.out_dir, start, &cfg.inputs())?)
        } else {
            None
        };
        let (trained, lengths) = training_rows(cfg, teacher, source)?;
        let batches = epoch_steps(&lengths, cfg.batching(), cfg.seed, 0);
        let total_steps = run_length(cfg, batches.len())?;
        let head = build_head(cfg, teacher, trained, group)?;
        let params = head.named_tensors();
        if let Some(group) = group {
            // `init_from` or the seeded init: either way every rank starts from rank 0's.
            group.broadcast_from_first(&params.values().collect::<Vec<_>>())?;
        }
        let opt = AdamW::new(&params, cfg.betas, cfg.adam_eps, cfg.weight_decay);
        let bar = progress_bar(cfg, group, total_steps);
        Ok(Run {
            weights: cfg.loss_weights(head.config()),
            cfg,
            teacher,
            head,
            params,
            opt,
            lengths,
            batches,
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            total_steps,
            schedule_steps: cfg.schedule_steps.unwrap_or(total_steps),
            tb: writes.then(|| SummaryWriter::new(cfg.out_dir.join("tensorboard"))),
            run_dir,
            data_fingerprint: data_fingerprint(trained),
            best: None,
            bar,
            outcome: TrainOutcome::default(),
            group,
        })
    }

    /// Continues from the newest checkpoint: weights, AdamW moments, step and data position.
    fn resume(&mut self) -> Result<()> {
        let cfg = self.cfg;
        let last = list_checkpoints(&cfg.out_dir)?.pop().with_context(|| {
            format!(
                "--resume: no checkpoint under {}",
                checkpoints_dir(&cfg.out_dir).display()
            )
        })?;
        let state = load_state(&last)?;
        let changes = cfg.changes_from(&state.config);
        ensure!(
            state.head == *self.head.config(),
            "{}: the head this checkpoint holds differs from the training config's (changed: {})",
            last.display(),
            changes.join("; ")
        );
        if !changes.is_empty() {
            eprintln!(
                "resuming with settings changed since {}:\n  {}",
                last.display(),
                changes.join("\n  ")
            );
        }
        self.check_same_data(&last, state.data_fingerprint.as_deref())?;
        let tensors = read_head_tensors(&last.join(CK_HEAD), &state.head)?;
        self.head.load_tensors(&tensors)?;
        self.opt.load(&last.join(CK_OPTIM), state.adam_step)?;
        (self.step, self.epoch, self.batch_in_epoch) =
            (state.step, state.epoch, state.batch_in_epoch);
        self.batches = self.steps_of_epoch(self.epoch);
        self.bar.resume_from(self.step);
        self.outcome.last_checkpoint = Some(last.clone());
        self.best = resumed_best(state.best, recorded_best(&cfg.out_dir)?);
        self.outcome.best = self.best;
        if let Some(run_dir) = &self.run_dir {
            run_dir.rewind_logs_to(self.step)?;
        }
        eprintln!("resuming from {} (step {})", last.display(), self.step);
        Ok(())
    }

    /// A checkpoint continues only on the rows it was trained on.
    fn check_same_data(&self, checkpoint: &std::path::Path, saved: Option<&str>) -> Result<()> {
        match saved {
            Some(saved) => ensure!(
                saved == self.data_fingerprint,
                "{}: the training data changed since this checkpoint (data fingerprint {saved}, \
                 now {} for {}): resume on the data it was trained on, or start over with \
                 --overwrite or another out_dir",
                checkpoint.display(),
                self.data_fingerprint,
                self.cfg.data_dir.display()
            ),
            None => eprintln!(
                "warning: {} records no data fingerprint (written by an older clover): cannot \
                 check that the training data is unchanged",
                checkpoint.display()
            ),
        }
        Ok(())
    }

    /// The next step's micro-batches, starting a new epoch (reshuffled) when this one is used up.
    fn next_step(&mut self) -> Step {
        if self.batch_in_epoch >= self.batches.len() {
            self.epoch += 1;
            self.batch_in_epoch = 0;
            self.batches = self.steps_of_epoch(self.epoch);
        }
        self.batch_in_epoch += 1;
        self.batches[self.batch_in_epoch - 1].clone()
    }

    /// The steps of `epoch`: a pure function of the seed and the epoch, so a resume replays them.
    fn steps_of_epoch(&self, epoch: u64) -> Vec<Step> {
        epoch_steps(&self.lengths, self.cfg.batching(), self.cfg.seed, epoch)
    }

    /// Every rank must end with rank 0's weights: each prints its weights' fingerprint and
    /// compares it with rank 0's.
    fn check_replicas(&self, group: &Group) -> Result<()> {
        let mine = weights_fingerprint(&self.params)?;
        let first = Tensor::from_slice(&[mine as i64]);
        group.broadcast_host_from_first(&[&first])?;
        let first = first.int64_value(&[0]) as u64;
        self.bar.println(format!(
            "rank {}: weights fingerprint {mine:016x} after step {}",
            group.rank, self.step
        ));
        ensure!(
            mine == first,
            "rank {}: weights differ from rank 0's after step {} (fingerprint {mine:016x} vs \
             {first:016x})",
            group.rank,
            self.step
        );
        Ok(())
    }

    /// Whether this process writes checkpoints, metrics and TensorBoard (rank 0 of a group).
    fn writes(&self) -> bool {
        self.tb.is_some()
    }

    /// One optimizer step: each micro-batch's loss (own normaliser, NaN check) and backward,
    /// gradients averaged over the micro-batches (and summed over the ranks, each of which
    /// computed its share), then clip, AdamW, logs.
    fn train_step(&mut self, source: &Source, opts: &TrainOptions) -> Result<()> {
        let started = Instant::now();
        let micro_batches = self.next_step();
        let step = self.step + 1;
        zero_grads(&self.params);
        // The depths the loss sees (EAGLE-1: one).
        let depths = self.head.trained_depths() as usize;
        let mut figures = MicroFigures::new(micro_batches.len(), depths);
        let (rank, world) = self.group.map_or((0, 1), |g| (g.rank, g.world));
        for share in rank_shares(&micro_batches, rank, world) {
            let counts = share.partial.then(|| {
                let whole = &micro_batches[share.micro_batch];
                let samples: Vec<&Sample> = whole.iter().map(|&i| &source.samples()[i]).collect();
                depth_counts(&samples, self.cfg.max_len, depths)
            });
            let of = micro_batches.len();
            let (parts, tokens) =
                self.accumulate(source, &share.rows, (step, of), counts.as_deref(), opts)?;
            figures.add(share.micro_batch, &parts, tokens);
        }
        if let Some(group) = self.group {
            self.sum_gradients(group)?;
            group.sum_host(&[&figures.depths, &figures.tokens])?;
        }
        let sums = figures.sums()?;
        let lr = self.cfg.lr * lr_factor(self.step, self.cfg.warmup_steps, self.schedule_steps);
        let gnorm = grad_norm(&self.params);
        if !gnorm.is_finite() {
            bail!(self.non_finite_gradient(step, gnorm, &sums, source, &micro_batches));
        }
        clip_grads_by_value(&self.params, self.cfg.clip_value);
        self.opt.update(&self.params, lr);
        self.step = step;
        let tokens_per_s = sums.tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let rec = sums.record(step, lr, gnorm, micro_batches.len());
        if let Some(tb) = self.tb.as_mut() {
            log_step(tb, &rec, tokens_per_s);
            tb.flush();
            append_jsonl(&self.cfg.out_dir.join("metrics.jsonl"), &rec)?;
        }
        self.bar
            .set_message(format!("loss {:.4} | {tokens_per_s:.0} tok/s", rec.loss));
        self.bar.set_position(step);
        self.outcome.steps.push(rec);
        Ok(())
    }

    /// The stop message of a step whose gradient is not finite: nothing was applied, and the
    /// message names the step, each depth's loss, the parameters hit and the batch's rows.
    fn non_finite_gradient(
        &self,
        step: u64,
        gnorm: f64,
        sums: &StepSums,
        source: &Source,
        micro_batches: &Step,
    ) -> String {
        let hit: Vec<&str> = self
            .params
            .iter()
            .filter(|(_, p)| {
                let g = p.grad();
                g.defined() && non_finite_count(&g) > 0
            })
            .map(|(name, _)| name.as_str())
            .collect();
        let rows: Vec<usize> = micro_batches.iter().flatten().copied().collect();
        format!(
            "non-finite gradient at step {step} (norm {gnorm}; depth losses {:?}) in {}; the \
             update was not applied and training stopped; batch rows: {}; last good checkpoint: \
             {}",
            sums.loss,
            hit.join(", "),
            describe_rows(source, &rows),
            self.outcome
                .last_checkpoint
                .as_ref()
                .map_or("none yet".into(), |p| p.display().to_string())
        )
    }

    /// Sums the gradients over the ranks (in buckets). A rank without rows this step has none
    /// yet: a zero backward gives it zeros to contribute.
    fn sum_gradients(&self, group: &Group) -> Result<()> {
        if self.params.values().any(|p| !p.grad().defined()) {
            let zero = self
                .params
                .values()
                .map(|p| p.sum(p.kind()) * 0.0)
                .reduce(|a, b| a + b);
            if let Some(zero) = zero {
                zero.backward();
            }
        }
        let grads: Vec<Tensor> = self.params.values().map(|p| p.grad()).collect();
        group.sum(&grads.iter().collect::<Vec<_>>())
    }

    /// Forward, loss and backward of one micro-batch (or this rank's share of it, normalised by
    /// the whole micro-batch's `counts`), its loss scaled by 1/`of` so the accumulated gradient
    /// is the mean over the step's `of` micro-batches. Returns its per-depth figures and its real
    /// token count.
    fn accumulate(
        &mut self,
        source: &Source,
        idx: &[usize],
        (step, of): (u64, usize),
        counts: Option<&[i64]>,
        opts: &TrainOptions,
    ) -> Result<(Vec<DepthLoss>, usize)> {
        let (cfg, teacher) = (self.cfg, self.teacher);
        let samples: Vec<&Sample> = idx.iter().map(|&i| &source.samples()[i]).collect();
        let batch = make_batch_reading(
            teacher,
            &samples,
            states_for(source, idx)?,
            cfg.max_len,
            self.head.teacher_layers(),
        )?;
        // EAGLE-1's input noise: one seed per (run, step, micro-batch), so a resumed run draws
        // the same noise.
        let noise_seed = (cfg.seed as i64)
            .wrapping_mul(1_000_003)
            .wrapping_add((step as i64) * 4096 + idx.first().copied().unwrap_or(0) as i64);
        let outs = self
            .head
            .training_outputs(&batch.features, &batch.next_ids, noise_seed);
        let head = &self.head;
        let lm_head = |i: usize, o: &Tensor| head.loss_logits_at(i as i64, o);
        let mut parts = BatchLoss {
            teacher,
            u: &batch.u,
            mask: &batch.mask,
            outs: &outs,
            lm_head: &lm_head,
            weights: &self.weights,
            chunk: head.loss_chunk(cfg.loss_chunk),
            vocab: head.draft_vocab(),
            counts,
        }
        .compute()?;
        if opts.inject_nan_at_step == Some(step) {
            parts.depths[0].loss = f64::NAN;
            parts.total = parts.total * f64::NAN;
        }
        check_finite(step, &parts.depths, self.outcome.last_checkpoint.as_deref())?;
        (parts.total / of as f64).backward();
        Ok((parts.depths, batch.tokens))
    }

    fn eval_due(&self) -> bool {
        let every = self.cfg.eval_every;
        every > 0 && (self.step % every == 0 || self.step == self.total_steps)
    }

    fn checkpoint_due(&self) -> bool {
        self.step % self.cfg.save_every.max(1) == 0 || self.step == self.total_steps
    }

    /// Held-out figures at this step (nothing when evaluation is off or there is no eval split).
    /// Only the writing rank evaluates; the others go on to the next step and wait for it there.
    fn evaluate(&mut self, eval: &[Sample]) -> Result<()> {
        let Some(tb) = self.tb.as_mut() else {
            return Ok(());
        };
        if self.cfg.eval_every == 0 || eval.is_empty() {
            return Ok(());
        }
        let ev = evaluate(&self.head, self.teacher, eval, self.cfg, self.step)?;
        log_eval(tb, &ev);
        tb.flush();
        append_jsonl(&self.cfg.out_dir.join("eval.jsonl"), &ev)?;
        let kept = self.keep_if_best(&ev)?;
        if self.step > 0 {
            self.bar.println(format!(
                "step {}: eval loss {:.4}, chained top-1 {:?} (unigram {:.3}); estimated tau \
                 (ranks checkpoints, is not served tau): default tree {:.3}, chain of {} {:.3}, \
                 T=1 {:.3} ({} starts){}",
                self.step,
                ev.loss,
                ev.chained_top1
                    .iter()
                    .map(|a| format!("{a:.3}"))
                    .collect::<Vec<_>>(),
                ev.unigram_top1,
                ev.tau_est_default_tree,
                ev.tau_chain_depth,
                ev.tau_est_chain,
                ev.tau_est_chain_t1,
                ev.tau_starts,
                if kept { "; new best" } else { "" }
            ));
        }
        self.outcome.evals.push(ev);
        Ok(())
    }

    /// Writes `checkpoints/best` when this evaluation's default-tree estimate beats the best so
    /// far (a tie keeps the earlier). Step 0's untrained head is no candidate, nor an evaluation
    /// without starts on the teacher's path (it measured nothing).
    fn keep_if_best(&mut self, ev: &EvalRecord) -> Result<bool> {
        let tau = ev.tau_est_default_tree;
        let beats = self.best.is_none_or(|b| b.beaten_by(ev.step, tau));
        if ev.step == 0 || ev.tau_starts == 0 || !beats {
            return Ok(false);
        }
        // Recorded first, so the best checkpoint's own state names it.
        self.best = Some(Best {
            step: ev.step,
            tau_est_default_tree: tau,
        });
        let state = self.state();
        save_best(
            &self.cfg.out_dir,
            &self.head,
            &self.opt,
            &state,
            self.teacher,
        )
        .context("training stopped; the previous best checkpoint is kept")?;
        self.outcome.best = self.best;
        Ok(true)
    }

    /// What a checkpoint written now records.
    fn state(&self) -> CheckpointState {
        CheckpointState {
            data_fingerprint: Some(self.data_fingerprint.clone()),
            step: self.step,
            epoch: self.epoch,
            batch_in_epoch: self.batch_in_epoch,
            seed: self.cfg.seed,
            adam_step: self.opt.step,
            head: self.head.config().clone(),
            config: self.cfg.clone(),
            best: self.best,
        }
    }

    /// Rank 0 of a group alone writes it (every rank holds the same weights and moments).
    fn checkpoint(&mut self) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let state = self.state();
        let saved = save_checkpoint(
            &self.cfg.out_dir,
            &self.head,
            &self.opt,
            &state,
            self.teacher,
            self.cfg.keep_last,
        );
        let last_good = self.outcome.last_checkpoint.as_ref();
        self.outcome.last_checkpoint = Some(saved.with_context(|| {
            format!(
                "training stopped; last good checkpoint: {}",
                last_good.map_or("none yet".into(), |p| p.display().to_string())
            )
        })?);
        Ok(())
    }
}
