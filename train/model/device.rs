//! Where and in what precision a command runs: one device and dtype policy for every command.
//! Every command takes `--device auto|cpu|cuda|cuda:N` and `--dtype auto|f32|f16|bf16` through
//! [`RunOn`]; the training config names its device with the same words.

use std::str::FromStr;

use anyhow::{bail, ensure, Result};
use tch::{Device, Kind};

/// A device as a user names it; whether it exists is checked by [`DeviceChoice::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 when CUDA is available, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, String> {
        match name {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(DeviceChoice::Cuda(i)),
                _ => Err(format!(
                    "unknown device {other:?} (use auto, cpu, cuda or cuda:N)"
                )),
            },
        }
    }
}

impl DeviceChoice {
    /// The libtorch device, refusing CUDA where there is none.
    pub fn resolve(self) -> Result<Device> {
        Ok(match self {
            DeviceChoice::Auto => Device::cuda_if_available(),
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda(i) => {
                ensure!(
                    tch::Cuda::is_available(),
                    "device cuda:{i} asked for, but CUDA is not available (`clover doctor` tells why)"
                );
                ensure!(
                    i < tch::Cuda::device_count() as usize,
                    "CUDA device {i} does not exist ({} visible)",
                    tch::Cuda::device_count()
                );
                Device::Cuda(i)
            }
        })
    }
}

/// A device as every file and report the project writes names it: the words `--device` reads
/// (`cpu`, `cuda:N`), so a report's device can be given back to a command as it stands.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

/// A device name as a file wrote it, in [`device_name`]'s spelling: calibration files written
/// before it spelled devices as tch's `Debug` does (`Cpu`, `Cuda(0)`) and must still read.
pub fn normalized_device_name(written: &str) -> String {
    match written
        .strip_prefix("Cuda(")
        .and_then(|rest| rest.strip_suffix(')'))
    {
        Some(index) => format!("cuda:{index}"),
        None => written.to_lowercase(),
    }
}

/// Serde's reading of a device name field, older spellings included (see
/// [`normalized_device_name`]).
pub fn deserialize_device_name<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<String, D::Error> {
    let written = <String as serde::Deserialize>::deserialize(deserializer)?;
    Ok(normalized_device_name(&written))
}

/// A dtype as a user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DtypeChoice {
    /// f32 on the CPU (where 16-bit matmuls are slow), bf16 on CUDA.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl DtypeChoice {
    /// The compute dtype on `device`.
    pub fn kind_on(self, device: Device) -> Kind {
        match self {
            DtypeChoice::Auto if device == Device::Cpu => Kind::Float,
            DtypeChoice::Auto => Kind::BFloat16,
            DtypeChoice::F32 => Kind::Float,
            DtypeChoice::F16 => Kind::Half,
            DtypeChoice::Bf16 => Kind::BFloat16,
        }
    }
}

fn device_choice(text: &str) -> std::result::Result<DeviceChoice, String> {
    text.parse()
}

/// Where and in what precision a command runs the teacher (and the draft head with it).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunOn {
    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = device_choice)]
    pub device: DeviceChoice,
    /// auto (f32 on the CPU, bf16 on CUDA), f32, f16 or bf16.
    #[arg(long, value_enum, default_value_t = DtypeChoice::Auto)]
    pub dtype: DtypeChoice,
}

impl RunOn {
    pub fn cpu() -> Self {
        Self {
            device: DeviceChoice::Cpu,
            dtype: DtypeChoice::Auto,
        }
    }

    pub fn resolve(&self) -> Result<(Device, Kind)> {
        let device = self.device.resolve()?;
        Ok((device, self.dtype.kind_on(device)))
    }
}

/// A device from its name (as the training config gives it).
pub fn parse_device(name: &str) -> Result<Device> {
    match name.parse::<DeviceChoice>() {
        Ok(choice) => choice.resolve(),
        Err(msg) => bail!("{msg}"),
    }
}
