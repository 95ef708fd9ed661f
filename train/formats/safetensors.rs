//! Writing named tensors as safetensors (host, contiguous), shared by checkpoints and export.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use tch::{Device, Tensor};

/// Writes named tensors as safetensors atomically enough for a file inside a temp dir (CPU,
/// contiguous: safetensors needs plain row-major host buffers).
pub fn write_tensors(file: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let host: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&host, file).with_context(|| format!("writing {}", file.display()))
}
