//! What a command may write over. Every command that writes checks its output here before any
//! work, so a user's files are never lost to a mistyped path:
//!
//! - an output is never one of the command's inputs, never inside one and never around one
//!   (replacing a directory that holds an input would delete the input);
//! - an existing directory is written into or replaced only when it is empty or a previous output
//!   of the same command, recognised by the marker file that command leaves in it
//!   ([`claim_job_dir`], [`check_replaceable`]); replacing a finished one takes `--overwrite`;
//! - an existing file is replaced only with `--overwrite` ([`claim_file`]), and its directory is
//!   checked writable before the work, not after it.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

/// The file a command leaves in each directory it writes: the command's name, one line.
pub const MARKER: &str = ".clover-output";

/// An input or output as the user named it: the option (`--data`) and the path.
pub type Named<'a> = (&'a str, &'a Path);

/// `path` as the file system resolves it, for paths that need not exist yet: the longest
/// existing ancestor canonicalised (symlinks resolved), the rest appended with `.` and `..`
/// applied, so two spellings of one place compare equal.
pub fn resolved(path: &Path) -> Result<PathBuf> {
    let absolute =
        std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let mut base: &Path = &absolute;
    let mut canonical = loop {
        if let Ok(found) = base.canonicalize() {
            break found;
        }
        match base.parent() {
            Some(parent) => base = parent,
            None => break PathBuf::from("/"),
        }
    };
    for part in absolute
        .strip_prefix(base)
        .unwrap_or(Path::new(""))
        .components()
    {
        match part {
            Component::ParentDir => {
                canonical.pop();
            }
            Component::Normal(name) => canonical.push(name),
            _ => {}
        }
    }
    Ok(canonical)
}

/// Refuses an output that is one of `inputs`, lies inside one, or holds one.
pub fn refuse_overlap(output: Named, inputs: &[Named]) -> Result<()> {
    let (out_flag, out) = output;
    let out_at = resolved(out)?;
    for &(flag, input) in inputs {
        let in_at = resolved(input)?;
        let relation = if out_at == in_at {
            "is"
        } else if out_at.starts_with(&in_at) {
            "lies inside"
        } else if in_at.starts_with(&out_at) {
            "holds"
        } else {
            continue;
        };
        bail!(
            "{out_flag} {} {relation} the input {flag} {}: clover never writes over its own \
             inputs; choose another {out_flag}",
            out.display(),
            input.display()
        );
    }
    Ok(())
}

/// What an output directory held when a command claimed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Absent or empty: a new output.
    New,
    /// A previous output of the same command.
    Previous,
}

/// Claims `out`, the output directory of a resumable job (`--out` of distill or regenerate),
/// for `command` (its name as the user types it, `clover distill`): none of `inputs`, and new or
/// the same command's, which a rerun continues. A directory holding anything else is refused,
/// naming a few of its entries; `legacy` recognises a previous output written before markers
/// existed (its entries are all ones the command writes). The marker is written at once, so an
/// interrupted run's output is still known.
pub fn claim_job_dir(
    out: &Path,
    inputs: &[Named],
    command: &str,
    legacy: &dyn Fn(&str) -> bool,
) -> Result<()> {
    refuse_overlap(("--out", out), inputs)?;
    inspect_dir(out, command, legacy)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_marker(out, command)
}

/// For a command that publishes its output whole (a temporary directory renamed over `dir`, the
/// marker written inside it): `dir` must be new, or `command`'s own and `overwrite` given.
pub fn check_replaceable(
    dir: &Path,
    command: &str,
    overwrite: bool,
    legacy: &dyn Fn(&str) -> bool,
) -> Result<Found> {
    let found = inspect_dir(dir, command, legacy)?;
    ensure!(
        found == Found::New || overwrite,
        "{} holds a previous `{command}` output; pass --overwrite to replace it, or choose \
         another output",
        dir.display()
    );
    Ok(found)
}

/// Whether `dir` is new or `command`'s own; an error naming what else it holds.
fn inspect_dir(dir: &Path, command: &str, legacy: &dyn Fn(&str) -> bool) -> Result<Found> {
    if !dir.exists() {
        return Ok(Found::New);
    }
    ensure!(
        dir.is_dir(),
        "{} is a file, not a directory: `{command}` writes a directory there",
        dir.display()
    );
    let names = entry_names(dir)?;
    if names.is_empty() {
        return Ok(Found::New);
    }
    if let Some(owner) = marker_of(dir)? {
        ensure!(
            owner == command,
            "{} is the output of `{owner}`, not of `{command}`; choose another output",
            dir.display()
        );
        return Ok(Found::Previous);
    }
    let foreign: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !legacy(n))
        .collect();
    if foreign.is_empty() {
        return Ok(Found::Previous);
    }
    bail!(
        "{} holds files `{command}` did not write ({}); clover never replaces them: choose \
         another output",
        dir.display(),
        crate::checks::first_few(&foreign)
    )
}

fn entry_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// The command named by `dir`'s marker, if it has one.
pub fn marker_of(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(MARKER);
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(text.trim().to_string()))
}

/// Marks `dir` as `command`'s output (in a directory that is about to be published, too).
pub fn write_marker(dir: &Path, command: &str) -> Result<()> {
    let path = dir.join(MARKER);
    std::fs::write(&path, format!("{command}\n"))
        .with_context(|| format!("writing {}", path.display()))
}

/// Checks a file output before the work: not a directory, replaced only with `--overwrite`, and
/// its directory writable now (created if absent), so a long run never fails at its last step.
pub fn claim_file(file: &Path, flag: &str, overwrite: bool) -> Result<()> {
    if file.exists() {
        ensure!(
            !file.is_dir(),
            "{flag} {} is a directory; name a file",
            file.display()
        );
        ensure!(
            overwrite,
            "{flag} {} exists; pass --overwrite to replace it, or choose another file",
            file.display()
        );
    }
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{flag} {}: cannot create {}", file.display(), dir.display()))?;
    let probe = dir.join(format!(".clover-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| {
        format!(
            "{flag} {}: {} is not writable",
            file.display(),
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Whether the process `pid` of this machine is alive (Linux's /proc; elsewhere assumed alive,
/// so nothing of a live writer is ever removed).
pub fn process_alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    Path::new(&format!("/proc/{pid}")).exists()
}
