//! Training checkpoints: head weights, AdamW moments and the run state in one directory, written
//! atomically, pruned to the newest few, and resolved from what a user names. Beside the step
//! checkpoints a run keeps `best`, the one whose held-out tau estimate of the default tree is
//! the highest so far (`training::tau_estimate`), never pruned.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::data::jobfiles::publish_dir;
use crate::formats::safetensors::write_tensors;
use crate::model::finite::check_finite_tensors;
use crate::model::head::{read_head_tensors, DraftHead};
use crate::model::head_config::HeadConfig;
use crate::model::teacher::Teacher;
use crate::training::config::TrainConfig;
use crate::training::optimizer::AdamW;

/// Per-run state saved in a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CheckpointState {
    /// Optimizer steps done.
    pub(crate) step: u64,
    /// Data position: epoch and batch index within it of the next batch.
    pub(crate) epoch: u64,
    pub(crate) batch_in_epoch: usize,
    /// The data RNG is a pure function of (seed, epoch), so this is its whole state.
    pub(crate) seed: u64,
    pub(crate) adam_step: i64,
    pub(crate) head: HeadConfig,
    pub(crate) config: TrainConfig,
    /// What the training rows held (ids and loss masks), so a resume on changed data is refused;
    /// absent in checkpoints of older versions.
    #[serde(default)]
    pub(crate) data_fingerprint: Option<String>,
    /// The run's best evaluation so far (what `checkpoints/best` holds); absent in checkpoints of
    /// older versions and before the first evaluation after step 0.
    #[serde(default)]
    pub(crate) best: Option<Best>,
}

/// The evaluation a `best` checkpoint was kept for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Best {
    pub step: u64,
    pub tau_est_default_tree: f64,
}

impl Best {
    /// Whether an evaluation with estimate `tau` at `step` replaces this one: a higher estimate,
    /// or (two records of one run, the later discarded by a resume) the same at an earlier step.
    pub fn beaten_by(&self, step: u64, tau: f64) -> bool {
        tau > self.tau_est_default_tree || (tau == self.tau_est_default_tree && step < self.step)
    }
}

/// The name of the best checkpoint, in the checkpoints directory and after a run dir
/// (`<out>/best`, as `<out>/latest`).
pub const BEST: &str = "best";

pub(crate) fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Where the run in `out` keeps its best checkpoint.
pub fn best_checkpoint(out: &Path) -> PathBuf {
    checkpoints_dir(out).join(BEST)
}

/// What the best checkpoint of the run in `out` records, if it has one.
pub(crate) fn recorded_best(out: &Path) -> Result<Option<Best>> {
    let dir = best_checkpoint(out);
    if !dir.join(CK_STATE).exists() {
        return Ok(None);
    }
    Ok(load_state(&dir)?.best)
}

fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Checkpoints in `out`, oldest first.
pub fn list_checkpoints(out: &Path) -> Result<Vec<PathBuf>> {
    let dir = checkpoints_dir(out);
    if !dir.exists() {
        return Ok(vec![]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Files of a checkpoint dir.
pub const CK_HEAD: &str = "head.safetensors";
pub const CK_OPTIM: &str = "optim.safetensors";
pub const CK_STATE: &str = "state.json";
/// The teacher's config.json, kept so `export` needs nothing else.
pub const CK_TEACHER_CONFIG: &str = "teacher_config.json";

/// Writes a step checkpoint (`write_checkpoint`), then deletes all but the newest `keep`
/// checkpoints older than it.
pub(crate) fn save_checkpoint(
    out: &Path,
    head: &DraftHead,
    opt: &AdamW,
    state: &CheckpointState,
    teacher: &Teacher,
    keep: usize,
) -> Result<PathBuf> {
    let final_dir = checkpoints_dir(out).join(checkpoint_name(state.step));
    write_checkpoint(&final_dir, head, opt, state, teacher)?;
    // Only checkpoints older than this one are pruned: never the one just written, never one
    // a later step wrote, never `best` (no step name).
    let older: Vec<PathBuf> = list_checkpoints(out)?
        .into_iter()
        .filter(|p| p.file_name() < final_dir.file_name())
        .collect();
    for old in older
        .iter()
        .take((older.len() + 1).saturating_sub(keep.max(1)))
    {
        std::fs::remove_dir_all(old)
            .with_context(|| format!("removing old checkpoint {}", old.display()))?;
    }
    Ok(final_dir)
}

/// Writes `checkpoints/best` (replacing the previous best the same all-or-nothing way).
pub(crate) fn save_best(
    out: &Path,
    head: &DraftHead,
    opt: &AdamW,
    state: &CheckpointState,
    teacher: &Teacher,
) -> Result<PathBuf> {
    let dir = best_checkpoint(out);
    write_checkpoint(&dir, head, opt, state, teacher)?;
    Ok(dir)
}

/// Writes a checkpoint into a temp dir and renames it into place at `final_dir` (readers never
/// see half of one). Weights that are not all finite are never saved: a checkpoint on disk is
/// always a good one.
fn write_checkpoint(
    final_dir: &Path,
    head: &DraftHead,
    opt: &AdamW,
    state: &CheckpointState,
    teacher: &Teacher,
) -> Result<()> {
    let saved = head.saved_tensors();
    check_finite_tensors(&saved).with_context(|| {
        format!(
            "step {}: the head's weights are not finite; the checkpoint was not saved",
            state.step
        )
    })?;
    // All or nothing: a failed write (a full disk) leaves no partial checkpoint behind.
    publish_dir(final_dir, |tmp| {
        write_tensors(&tmp.join(CK_HEAD), &saved)?;
        opt.save(&tmp.join(CK_OPTIM))?;
        std::fs::write(tmp.join(CK_STATE), serde_json::to_string_pretty(state)?)
            .with_context(|| format!("writing {}", tmp.join(CK_STATE).display()))?;
        let teacher_cfg = teacher.dir.join("config.json");
        std::fs::copy(&teacher_cfg, tmp.join(CK_TEACHER_CONFIG))
            .with_context(|| format!("copying {}", teacher_cfg.display()))?;
        Ok(())
    })
}

pub(crate) fn load_state(ck: &Path) -> Result<CheckpointState> {
    let f = ck.join(CK_STATE);
    let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", f.display()))
}

/// A checkpoint dir from what a user may name: the dir itself, a training out dir (its newest
/// checkpoint), `<out>/latest`, or `<out>/best` (`<out>/checkpoints/best`).
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(CK_STATE).exists() {
        return Ok(path.to_path_buf());
    }
    if path.file_name().is_some_and(|n| n == BEST) {
        let out = path.parent().unwrap_or(path);
        let best = best_checkpoint(out);
        if best.join(CK_STATE).exists() {
            return Ok(best);
        }
        bail!(
            "{}: no best checkpoint at {} (a run keeps one from its first held-out evaluation \
             after step 0 on; eval_every = 0 keeps none)",
            path.display(),
            best.display()
        );
    }
    let named_latest = path.file_name().is_some_and(|n| n == "latest");
    let out = if named_latest {
        path.parent().unwrap_or(path)
    } else {
        path
    };
    list_checkpoints(out)?.pop().with_context(|| {
        format!(
            "{}: not a checkpoint, and no checkpoints under {}",
            path.display(),
            checkpoints_dir(out).display()
        )
    })
}

/// The head config and tensors of a checkpoint dir (used by `export`).
pub fn read_checkpoint_head(ck: &Path) -> Result<(HeadConfig, BTreeMap<String, Tensor>)> {
    let state = load_state(ck)?;
    let tensors = read_head_tensors(&ck.join(CK_HEAD), &state.head)?;
    Ok((state.head, tensors))
}
