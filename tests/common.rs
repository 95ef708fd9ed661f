//! Paths and small helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use tch::Tensor;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests").join("fixtures").join(name)
}

/// The imported SmolLM2 teacher. `make setup` creates it; a test that needs it fails loudly
/// instead of skipping when it is absent.
pub fn smollm2_dir() -> PathBuf {
    let dir = std::env::var("CLOVER_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            repo_root()
                .join("checkpoints")
                .join("smollm2-135m-instruct")
        });
    assert!(
        dir.join("config.json").exists(),
        "{} is missing: run `make setup` to fetch and import the SmolLM2 teacher",
        dir.display()
    );
    dir
}

/// A fresh, empty scratch directory for one test, unique per test area, name and process.
pub fn scratch_dir(area: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("clover-{area}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Named tensors of a safetensors file.
pub fn read_golden(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}
