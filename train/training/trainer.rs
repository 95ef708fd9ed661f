//! `clover train`: distil a Clover-2 draft head from a frozen teacher (docs/clover2.md §2).
//!
//! Online mode runs the teacher under no_grad inside the loop; offline mode reads its pre-norm
//! states from a `targets::DistillCache`. Batches are bucketed by length. Checkpoints hold the
//! head, the AdamW moments, the step, the RNG seed and the data position, so `--resume` replays
//! the uninterrupted run exactly.

use crate::training::batches::epoch_batches;
use crate::training::batches::make_batch;
use crate::training::checkpoint::checkpoints_dir;
use crate::training::checkpoint::list_checkpoints;
use crate::training::checkpoint::load_state;
use crate::training::checkpoint::save_checkpoint;
use crate::training::checkpoint::CheckpointState;
use crate::training::checkpoint::CK_HEAD;
use crate::training::checkpoint::CK_OPTIM;
use crate::training::config::TrainConfig;
use crate::training::config::TrainOptions;
use crate::training::evaluate::evaluate;
use crate::training::metrics::append_jsonl;
use crate::training::metrics::check_finite;
use crate::training::metrics::log_eval;
use crate::training::metrics::log_step;
use crate::training::metrics::EvalRecord;
use crate::training::metrics::StepRecord;
use crate::training::optimizer::clip_grads_by_value;
use crate::training::optimizer::grad_norm;
use crate::training::optimizer::lr_factor;
use crate::training::optimizer::zero_grads;
use crate::training::optimizer::AdamW;
use std::path::PathBuf;
use std::time::Instant;

use crate::progress::Progress;
use anyhow::{bail, ensure, Context, Result};
use tch::{Kind, Tensor};

use crate::data::shards::Sample;
use crate::model::head::{read_head_tensors, DraftHead};
use crate::model::teacher::Teacher;
use crate::training::loss::{batch_loss, LossWeights};
use crate::training::targets::DistillCache;

#[derive(Debug, Default)]
pub struct TrainOutcome {
    pub steps: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
    pub last_checkpoint: Option<PathBuf>,
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

/// The training loop. `eval` is the held-out split (the teacher runs on it online).
pub fn train(
    cfg: &TrainConfig,
    teacher: &Teacher,
    source: Source,
    eval: Vec<Sample>,
    resume: bool,
    opts: &TrainOptions,
) -> Result<TrainOutcome> {
    std::fs::create_dir_all(&cfg.out_dir)
        .with_context(|| format!("creating {}", cfg.out_dir.display()))?;
    let device = teacher.device();
    let n_train = source
        .samples()
        .len()
        .min(cfg.max_train_samples.unwrap_or(usize::MAX));
    ensure!(n_train > 0, "no training samples");
    if let Source::Offline(cache) = &source {
        cache.check_against(&cfg.model_dir, &cfg.data_dir, teacher.config.hidden_size)?;
    }
    let lengths: Vec<usize> = source.samples()[..n_train]
        .iter()
        .map(|s| s.input_ids.len().min(cfg.max_len))
        .collect();
    let longest = lengths.iter().copied().max().unwrap_or(0);
    ensure!(
        longest <= cfg.batch_tokens,
        "batch_tokens = {} is below the longest training row ({longest} tokens after truncation to \
         max_len = {}): raise batch_tokens or lower max_len",
        cfg.batch_tokens,
        cfg.max_len
    );
    let batches_per_epoch =
        epoch_batches(&lengths, cfg.batch_tokens, cfg.bucket_window, cfg.seed, 0).len();
    let total_steps = match (cfg.max_steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => e * batches_per_epoch as u64,
        (None, None) => bail!("set max_steps or epochs in the training config"),
    };
    let schedule_steps = cfg.schedule_steps.unwrap_or(total_steps);

    let head_cfg = cfg.head_config(teacher);
    let mut head = match &cfg.init_from {
        Some(dir) => {
            DraftHead::load(dir, teacher).with_context(|| format!("init_from {}", dir.display()))?
        }
        None => DraftHead::new(teacher, head_cfg.clone(), cfg.seed as i64)?,
    };
    if device.is_cuda() && cfg.bf16_on_cuda {
        head.set_compute_kind(Kind::BFloat16);
    }
    let params = head.named_tensors();
    let mut opt = AdamW::new(&params, cfg.betas, cfg.adam_eps, cfg.weight_decay);
    let (mut step, mut epoch, mut batch_in_epoch) = (0u64, 0u64, 0usize);
    let mut outcome = TrainOutcome::default();
    if resume {
        let last = list_checkpoints(&cfg.out_dir)?.pop().with_context(|| {
            format!(
                "--resume: no checkpoint under {}",
                checkpoints_dir(&cfg.out_dir).display()
            )
        })?;
        let state = load_state(&last)?;
        let changes = cfg.changes_from(&state.config);
        ensure!(
            state.head == *head.config(),
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
        let tensors = read_head_tensors(&last.join(CK_HEAD), &state.head)?;
        head.load_tensors(&tensors)?;
        opt.load(&last.join(CK_OPTIM), state.adam_step)?;
        (step, epoch, batch_in_epoch) = (state.step, state.epoch, state.batch_in_epoch);
        outcome.last_checkpoint = Some(last.clone());
        eprintln!("resuming from {} (step {step})", last.display());
    }
    let weights = LossWeights::reference(head.config());
    let mut tb =
        tensorboard_rs::summary_writer::SummaryWriter::new(cfg.out_dir.join("tensorboard"));
    let metrics = cfg.out_dir.join("metrics.jsonl");
    let mut bar = if cfg.progress {
        Progress::new("train", total_steps)
    } else {
        Progress::hidden("train")
    };
    bar.set_position(step);
    let lm_head = |o: &Tensor| head.logits(o);
    if step == 0 && cfg.eval_every > 0 && !eval.is_empty() {
        // The untrained head's figures, the baseline the eval curve starts from.
        let ev = evaluate(
            &head,
            teacher,
            &eval[..eval.len().min(cfg.eval_samples)],
            cfg,
            0,
        )?;
        log_eval(&mut tb, &ev);
        append_jsonl(&cfg.out_dir.join("eval.jsonl"), &ev)?;
        outcome.evals.push(ev);
    }
    let mut batches = epoch_batches(
        &lengths,
        cfg.batch_tokens,
        cfg.bucket_window,
        cfg.seed,
        epoch,
    );

    while step < total_steps {
        if batch_in_epoch >= batches.len() {
            epoch += 1;
            batch_in_epoch = 0;
            batches = epoch_batches(
                &lengths,
                cfg.batch_tokens,
                cfg.bucket_window,
                cfg.seed,
                epoch,
            );
        }
        let started = Instant::now();
        let idx = &batches[batch_in_epoch];
        let samples: Vec<&Sample> = idx.iter().map(|&i| &source.samples()[i]).collect();
        let batch = make_batch(teacher, &samples, states_for(&source, idx)?, cfg.max_len)?;
        let outs = head.depth_outputs(&batch.u, &batch.next_ids, None);
        let mut parts = batch_loss(
            teacher,
            &batch.u,
            &batch.mask,
            &outs,
            &lm_head,
            &weights,
            cfg.loss_chunk,
        )?;
        if opts.inject_nan_at_step == Some(step + 1) {
            parts.depths[0].loss = f64::NAN;
            parts.total = parts.total * f64::NAN;
        }
        check_finite(step + 1, &parts.depths, outcome.last_checkpoint.as_deref())?;
        let lr = cfg.lr * lr_factor(step, cfg.warmup_steps, schedule_steps);
        zero_grads(&params);
        parts.total.backward();
        let gnorm = grad_norm(&params);
        clip_grads_by_value(&params, cfg.clip_value);
        opt.update(&params, lr);
        step += 1;
        batch_in_epoch += 1;
        let secs = started.elapsed().as_secs_f64();
        let rec = StepRecord {
            step,
            loss: parts.depths.iter().map(|d| d.loss).sum(),
            depth_loss: parts.depths.iter().map(|d| d.loss).collect(),
            depth_top1: parts.depths.iter().map(|d| d.top1).collect(),
            lr,
            grad_norm: gnorm,
            tokens: batch.tokens,
        };
        log_step(&mut tb, &rec, batch.tokens as f64 / secs.max(1e-9));
        append_jsonl(&metrics, &rec)?;
        bar.set_message(format!(
            "loss {:.4} | {:.0} tok/s",
            rec.loss,
            batch.tokens as f64 / secs.max(1e-9)
        ));
        bar.set_position(step);
        outcome.steps.push(rec);

        if cfg.eval_every > 0
            && (step % cfg.eval_every == 0 || step == total_steps)
            && !eval.is_empty()
        {
            let ev = evaluate(
                &head,
                teacher,
                &eval[..eval.len().min(cfg.eval_samples)],
                cfg,
                step,
            )?;
            log_eval(&mut tb, &ev);
            append_jsonl(&cfg.out_dir.join("eval.jsonl"), &ev)?;
            bar.println(format!(
                "step {step}: eval loss {:.4}, chained top-1 {:?} (unigram {:.3})",
                ev.loss,
                ev.chained_top1
                    .iter()
                    .map(|a| format!("{a:.3}"))
                    .collect::<Vec<_>>(),
                ev.unigram_top1
            ));
            outcome.evals.push(ev);
        }
        if step % cfg.save_every.max(1) == 0 || step == total_steps {
            let state = CheckpointState {
                step,
                epoch,
                batch_in_epoch,
                seed: cfg.seed,
                adam_step: opt.step,
                head: head.config().clone(),
                config: cfg.clone(),
            };
            outcome.last_checkpoint = Some(save_checkpoint(
                &cfg.out_dir,
                &head,
                &opt,
                &state,
                teacher,
                cfg.keep_last,
            )?);
        }
        tb.flush();
        if opts.halt_after_step == Some(step) {
            break;
        }
    }
    bar.finish();
    Ok(outcome)
}
