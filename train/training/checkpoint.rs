//! Training checkpoints: head weights, AdamW moments and the run state in one directory, written
//! atomically, pruned to the newest few, and resolved from what a user names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
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
}

pub(crate) fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
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

/// Writes a checkpoint into a temp dir and renames it into place (readers never see half of one),
/// then deletes all but the newest `keep` checkpoints older than it. Weights that are not all
/// finite are never saved: a checkpoint on disk is always a good one.
pub(crate) fn save_checkpoint(
    out: &Path,
    head: &DraftHead,
    opt: &AdamW,
    state: &CheckpointState,
    teacher: &Teacher,
    keep: usize,
) -> Result<PathBuf> {
    let saved = head.saved_tensors();
    check_finite_tensors(&saved).with_context(|| {
        format!(
            "step {}: the head's weights are not finite; the checkpoint was not saved",
            state.step
        )
    })?;
    let dir = checkpoints_dir(out);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let final_dir = dir.join(checkpoint_name(state.step));
    // All or nothing: a failed write (a full disk) leaves no partial checkpoint behind.
    publish_dir(&final_dir, |tmp| {
        write_tensors(&tmp.join(CK_HEAD), &saved)?;
        opt.save(&tmp.join(CK_OPTIM))?;
        std::fs::write(tmp.join(CK_STATE), serde_json::to_string_pretty(state)?)
            .with_context(|| format!("writing {}", tmp.join(CK_STATE).display()))?;
        let teacher_cfg = teacher.dir.join("config.json");
        std::fs::copy(&teacher_cfg, tmp.join(CK_TEACHER_CONFIG))
            .with_context(|| format!("copying {}", teacher_cfg.display()))?;
        Ok(())
    })?;
    // Only checkpoints older than this one are pruned: never the one just written, never one
    // a later step wrote.
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

pub(crate) fn load_state(ck: &Path) -> Result<CheckpointState> {
    let f = ck.join(CK_STATE);
    let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", f.display()))
}

/// A checkpoint dir from what a user may name: the dir itself, a training out dir (its newest
/// checkpoint), or `<out>/latest`.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(CK_STATE).exists() {
        return Ok(path.to_path_buf());
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
