//! Where and in what precision a command runs: one device and dtype policy for every command.

use anyhow::{bail, ensure, Result};
use tch::{Device, Kind};

/// Where and in what precision a command runs the teacher (and the draft head with it).
#[derive(clap::Args, Debug, Clone)]
pub struct RunOn {
    /// cpu, cuda, cuda:N or auto (CUDA when available).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, f16 or bf16 (default: f32 on the CPU, where 16-bit matmuls are slow; bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
}

impl RunOn {
    pub fn cpu() -> Self {
        Self {
            device: "cpu".into(),
            dtype: None,
        }
    }

    pub fn resolve(&self) -> Result<(Device, Kind)> {
        let device = parse_device(&self.device)?;
        let kind = match self.dtype.as_deref() {
            Some(name) => parse_kind(name)?,
            None if device == Device::Cpu => Kind::Float,
            None => Kind::BFloat16,
        };
        Ok((device, kind))
    }
}

/// Parse a device name: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available).
pub fn parse_device(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "auto" => Device::cuda_if_available(),
        "cuda" => {
            ensure!(
                tch::Cuda::is_available(),
                "--device cuda asked for, but CUDA is not available"
            );
            Device::Cuda(0)
        }
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => {
                ensure!(
                    i < tch::Cuda::device_count() as usize,
                    "CUDA device {i} does not exist"
                );
                Device::Cuda(i)
            }
            _ => bail!("unknown device {other:?} (use cpu, cuda, cuda:N or auto)"),
        },
    })
}

/// Parse a dtype name: f32, f16, bf16.
pub fn parse_kind(name: &str) -> Result<Kind> {
    Ok(match name {
        "f32" | "float32" => Kind::Float,
        "f16" | "float16" | "fp16" => Kind::Half,
        "bf16" | "bfloat16" => Kind::BFloat16,
        other => bail!("unknown dtype {other:?} (use f32, f16 or bf16)"),
    })
}
