//! File-system helpers for resumable jobs: atomic writes of files and whole directories, a
//! lock on a job's output directory, and a record of the inputs that directory was made from, so
//! a rerun with other inputs fails instead of mixing outputs.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

/// Write a file under a temporary name and rename it, so readers never see half a file. On a
/// failed write (a full disk) the temporary file is removed.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if let Err(err) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(err).with_context(|| format!("cannot write {}", tmp.display()));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))
}

/// A file written piece by piece under a temporary name and renamed into place by [`commit`]
/// (`AtomicFile::commit`), so readers never see half of it; dropped uncommitted (an error on the
/// way), the temporary file is removed.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<std::io::BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let file = File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            writer: Some(std::io::BufWriter::new(file)),
        })
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let writer = self.writer.as_mut().expect("written before commit");
        writer
            .write_all(bytes)
            .with_context(|| format!("cannot write {}", self.tmp.display()))
    }

    /// Flushes the file and renames it over `path`.
    pub fn commit(mut self) -> Result<()> {
        let writer = self.writer.take().expect("committed once");
        let written = writer
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all())
            .with_context(|| format!("cannot write {}", self.tmp.display()))
            .and_then(|()| {
                std::fs::rename(&self.tmp, &self.path)
                    .with_context(|| format!("cannot rename to {}", self.path.display()))
            });
        if written.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        written
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Builds a directory all-or-nothing: `fill` writes into a temporary sibling of `dir`, which then
/// replaces `dir` by a rename. If `fill` fails (a full disk, a bad tensor) the temporary directory
/// is removed and `dir`, if it existed, is left as it was.
pub fn publish_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir
        .file_name()
        .with_context(|| format!("{} has no directory name", dir.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    clean_dead_writers(&parent, &name, dir)?;
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(err) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err);
    }
    let old = parent.join(format!(".old-{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).with_context(|| format!("moving aside {}", dir.display()))?;
    }
    if let Err(err) = std::fs::rename(&tmp, dir) {
        let _ = std::fs::rename(&old, dir);
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()));
    }
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

/// What killed writers of `dir` left in `parent`: their temporary directories are removed, and a
/// previous `dir` one had moved aside (`.old-NAME-PID`) is put back when `dir` is missing (it was
/// killed between the two renames), else removed. Only dead writers' leftovers are touched.
fn clean_dead_writers(parent: &Path, name: &str, dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(parent) {
        Ok(entries) => entries,
        Err(_) => return Ok(()),
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some((kind, pid)) = leftover_of(&file_name, name) else {
            continue;
        };
        if crate::outputs::process_alive(pid) {
            continue;
        }
        let path = entry.path();
        if kind == "old" && !dir.exists() {
            std::fs::rename(&path, dir)
                .with_context(|| format!("restoring {} from {}", dir.display(), path.display()))?;
            eprintln!("restored {} left aside by a killed run", dir.display());
        } else {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {} of a killed run", path.display()))?;
        }
    }
    Ok(())
}

/// `.tmp-NAME-PID` or `.old-NAME-PID`: the kind and the writer's process id.
fn leftover_of<'a>(file_name: &'a str, name: &str) -> Option<(&'a str, u32)> {
    let rest = file_name.strip_prefix('.')?;
    let (kind, rest) = rest.split_once('-')?;
    if kind != "tmp" && kind != "old" {
        return None;
    }
    let pid = rest.strip_prefix(name)?.strip_prefix('-')?;
    Some((kind, pid.parse().ok()?))
}

/// An exclusive lock on one worker's share of a job's output directory (`<dir>/.lock-<worker>`,
/// `flock`), held until dropped, so two runs writing the same output cannot interleave while
/// workers with different `--shard`s still share the directory. The lock dies with the process,
/// so a killed run never leaves a stale one behind.
pub struct DirLock {
    _file: File,
}

impl DirLock {
    pub fn acquire(dir: &Path, worker: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!(".lock-{worker}"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "{} is being written by another clover process (it holds {}); wait for it to \
                 finish or use another --out",
                dir.display(),
                path.display()
            ),
            Err(std::fs::TryLockError::Error(err)) => {
                Err(err).with_context(|| format!("locking {}", path.display()))
            }
        }
    }
}

/// Record `inputs` at `path` on the first run; on a rerun, require the same inputs.
pub fn pin_inputs<T>(path: &Path, inputs: &T) -> Result<()>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if path.exists() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let existing: T = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a clover job manifest", path.display()))?;
        ensure!(
            &existing == inputs,
            "{} was made from other inputs ({existing:?}, now {inputs:?}); use a fresh --out",
            path.display()
        );
        return Ok(());
    }
    atomic_write(path, serde_json::to_string_pretty(inputs)?.as_bytes())
}
