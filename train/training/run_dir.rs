//! A training run's output directory: the entries `clover train` writes there, the lock that
//! keeps two runs out of one directory, and what a fresh, resumed or overwriting start does with
//! what it finds. Nothing else in the directory is ever touched.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::data::jobfiles::{atomic_write, DirLock};
use crate::outputs::{marker_of, refuse_overlap, write_marker, Named, MARKER};

/// The command a run directory's marker names.
pub const TRAIN_COMMAND: &str = "clover train";
/// What a run writes in its `out_dir`: the only entries `--overwrite` removes.
pub const RUN_ENTRIES: [&str; 4] = ["checkpoints", "metrics.jsonl", "eval.jsonl", "tensorboard"];
/// The lock file a run holds (`DirLock`'s name for the `train` worker).
const LOCK_WORKER: &str = "train";

/// How a run starts in its `out_dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// A new run: refused where another run's checkpoints or logs are.
    #[default]
    Fresh,
    /// Continue from the newest checkpoint there.
    Resume,
    /// Start over: the previous run's checkpoints and logs are removed first (only a directory
    /// `clover train` wrote).
    Overwrite,
}

/// The `out_dir` of the run in progress, locked until dropped.
pub struct RunDir {
    pub path: PathBuf,
    _lock: DirLock,
}

impl RunDir {
    /// Claims `out` for a run started as `start`, before any work: `out` is none of `inputs`,
    /// no other run is writing it, and what a previous run left is continued, removed or
    /// refused as `start` says.
    pub fn open(out: &Path, start: Start, inputs: &[Named]) -> Result<Self> {
        ensure!(
            !out.as_os_str().is_empty() && !out.to_string_lossy().trim().is_empty(),
            "out_dir is empty: name the run's output directory"
        );
        refuse_overlap(("out_dir", out), inputs)?;
        ensure!(
            !out.exists() || out.is_dir(),
            "out_dir {} is a file, not a directory",
            out.display()
        );
        let previous: Vec<&str> = RUN_ENTRIES
            .into_iter()
            .filter(|e| out.join(e).exists())
            .collect();
        // Refusals come before the lock, so a refused run leaves not even a lock file behind.
        match start {
            Start::Fresh if !previous.is_empty() => bail!(
                "out_dir {} holds another run ({}); pass --resume to continue it, or --overwrite \
                 to start over (removes its checkpoints, metrics and TensorBoard logs)",
                out.display(),
                previous.join(", ")
            ),
            Start::Overwrite if !previous.is_empty() => ensure_written_by_train(out)?,
            _ => {}
        }
        let lock = DirLock::acquire(out, LOCK_WORKER)?;
        if start == Start::Overwrite && !previous.is_empty() {
            for entry in &previous {
                remove_entry(&out.join(entry))?;
            }
            eprintln!(
                "--overwrite: removed the previous run's {}",
                previous.join(", ")
            );
        }
        write_marker(out, TRAIN_COMMAND)?;
        Ok(RunDir {
            path: out.to_path_buf(),
            _lock: lock,
        })
    }

    /// After a resume from `step`: the records a killed run logged past its last checkpoint
    /// are dropped, so the resumed run's records do not repeat them.
    pub fn rewind_logs_to(&self, step: u64) -> Result<()> {
        for name in ["metrics.jsonl", "eval.jsonl"] {
            truncate_jsonl_after(&self.path.join(name), step)?;
        }
        Ok(())
    }
}

/// `--overwrite` removes only what `clover train` wrote: its marker, or (a run from before
/// markers) nothing in the directory but a run's entries.
fn ensure_written_by_train(out: &Path) -> Result<()> {
    if let Some(owner) = marker_of(out)? {
        ensure!(
            owner == TRAIN_COMMAND,
            "out_dir {} is the output of `{owner}`; --overwrite removes only a training run's \
             files",
            out.display()
        );
        return Ok(());
    }
    let lock = format!(".lock-{LOCK_WORKER}");
    for entry in std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        ensure!(
            RUN_ENTRIES.contains(&name.as_str()) || name == lock || name == MARKER,
            "out_dir {} holds {name:?}, which clover train does not write: --overwrite removes \
             only a training run's own directory; choose another out_dir",
            out.display()
        );
    }
    Ok(())
}

fn remove_entry(path: &Path) -> Result<()> {
    let removed = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    removed.with_context(|| format!("removing {}", path.display()))
}

/// Keeps the records of a JSONL log whose `step` is at most `step` (a missing log is left so).
fn truncate_jsonl_after(file: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Ok(());
    };
    let mut kept = String::new();
    let mut dropped = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not a JSON record", file.display(), i + 1))?;
        match record.get("step").and_then(|s| s.as_u64()) {
            Some(s) if s > step => dropped += 1,
            _ => {
                kept.push_str(line);
                kept.push('\n');
            }
        }
    }
    if dropped > 0 {
        atomic_write(file, kept.as_bytes())?;
        eprintln!(
            "{}: dropped {dropped} records past step {step}, logged after the checkpoint resumed",
            file.display()
        );
    }
    Ok(())
}
