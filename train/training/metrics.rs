//! What a training run records: step and eval records in JSONL and TensorBoard, and the
//! non-finite loss stop.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::training::loss::DepthLoss;

/// What a run did, step by step (also appended to `<out>/metrics.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub depth_loss: Vec<f64>,
    pub depth_top1: Vec<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalRecord {
    pub step: u64,
    pub loss: f64,
    /// Teacher-forced per-depth top-1 (as in training).
    pub forced_top1: Vec<f64>,
    /// Chained draft: depth k fed its own argmax; fraction of starts with depths 0..=k all right.
    pub chained_top1: Vec<f64>,
    pub starts: usize,
    /// Accuracy of always predicting the most frequent teacher token on these targets.
    pub unigram_top1: f64,
    /// Estimated tau (tokens per target forward) of the default tree, greedy, along the
    /// teacher's path (`training::tau_estimate`): it ranks checkpoints, it is not served tau.
    /// The `tau_*` fields are absent (0) in the records of older runs.
    #[serde(default)]
    pub tau_est_default_tree: f64,
    /// The same for a chain of `tau_chain_depth` drafts, greedy.
    #[serde(default)]
    pub tau_est_chain: f64,
    /// The same chain sampled at T = 1 (expected tau from the acceptance probabilities).
    #[serde(default)]
    pub tau_est_chain_t1: f64,
    #[serde(default)]
    pub tau_chain_depth: usize,
    /// Start positions of the estimate (on the teacher's own path); with none the estimates
    /// are 1.
    #[serde(default)]
    pub tau_starts: usize,
}

/// Appends one record. JSON has no NaN or inf (serde writes them as `null`, which no reader of
/// a float takes), so a record holding one is refused, naming its fields.
pub(crate) fn append_jsonl<T: Serialize>(file: &Path, rec: &T) -> Result<()> {
    let value = serde_json::to_value(rec)?;
    let nulls = null_fields(&value, "");
    anyhow::ensure!(
        nulls.is_empty(),
        "{}: refusing to log a non-finite value in {}",
        file.display(),
        nulls.join(", ")
    );
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .with_context(|| format!("opening {}", file.display()))?;
    writeln!(f, "{value}").with_context(|| format!("writing {}", file.display()))
}

/// The paths (`depth_loss[2]`) of the nulls in `value`: our records have no optional fields, so
/// each is a float that was not finite.
fn null_fields(value: &serde_json::Value, at: &str) -> Vec<String> {
    use serde_json::Value;
    match value {
        Value::Null => vec![at.to_string()],
        Value::Array(items) => items
            .iter()
            .enumerate()
            .flat_map(|(i, v)| null_fields(v, &format!("{at}[{i}]")))
            .collect(),
        Value::Object(fields) => fields
            .iter()
            .flat_map(|(k, v)| {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                null_fields(v, &path)
            })
            .collect(),
        _ => vec![],
    }
}

/// Stops training on a NaN/inf loss, naming the step and depth and the checkpoint that is kept.
pub(crate) fn check_finite(
    step: u64,
    depths: &[DepthLoss],
    last_good: Option<&Path>,
) -> Result<()> {
    for (i, d) in depths.iter().enumerate() {
        if !(d.loss.is_finite() && d.vloss.is_finite() && d.ploss.is_finite()) {
            let kept = last_good
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none yet".into());
            bail!(
                "non-finite loss at step {step}, depth {i} (loss {}, regression {}, distillation {}); \
                 training stopped without saving; last good checkpoint: {kept}",
                d.loss,
                d.vloss,
                d.ploss
            );
        }
    }
    Ok(())
}

pub(crate) fn log_step(
    tb: &mut tensorboard_rs::summary_writer::SummaryWriter,
    rec: &StepRecord,
    tok_s: f64,
) {
    let s = rec.step as usize;
    tb.add_scalar("train/loss", rec.loss as f32, s);
    for (i, (l, a)) in rec.depth_loss.iter().zip(&rec.depth_top1).enumerate() {
        tb.add_scalar(&format!("train/loss_depth{i}"), *l as f32, s);
        tb.add_scalar(&format!("train/top1_depth{i}"), *a as f32, s);
    }
    tb.add_scalar("train/lr", rec.lr as f32, s);
    tb.add_scalar("train/grad_norm", rec.grad_norm as f32, s);
    tb.add_scalar("train/tokens_per_s", tok_s as f32, s);
}

pub(crate) fn log_eval(tb: &mut tensorboard_rs::summary_writer::SummaryWriter, ev: &EvalRecord) {
    let s = ev.step as usize;
    tb.add_scalar("eval/loss", ev.loss as f32, s);
    for (i, a) in ev.chained_top1.iter().enumerate() {
        tb.add_scalar(&format!("eval/chained_top1_depth{i}"), *a as f32, s);
    }
    for (i, a) in ev.forced_top1.iter().enumerate() {
        tb.add_scalar(&format!("eval/forced_top1_depth{i}"), *a as f32, s);
    }
    tb.add_scalar("eval/unigram_top1", ev.unigram_top1 as f32, s);
    tb.add_scalar(
        "eval/tau_est_default_tree",
        ev.tau_est_default_tree as f32,
        s,
    );
    tb.add_scalar("eval/tau_est_chain", ev.tau_est_chain as f32, s);
    tb.add_scalar("eval/tau_est_chain_t1", ev.tau_est_chain_t1 as f32, s);
}
