//! File-system helpers for resumable jobs: atomic writes and a record of the inputs a job's
//! output directory was made from, so a rerun with other inputs fails instead of mixing outputs.

use std::path::Path;

use anyhow::{ensure, Context, Result};

/// Write a file under a temporary name and rename it, so readers never see half a file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))
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
