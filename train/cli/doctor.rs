//! `clover doctor`: the libtorch this process loaded, CUDA availability and devices, paths; as
//! text for a person, or with `--json` as one object for scripts (which parse it rather than
//! match a wording that may change).

use anyhow::Result;

use crate::model::device::device_name;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Print one JSON object {"cuda_available", "devices", "torch_version", ...} instead.
    #[arg(long)]
    pub json: bool,
}

/// What `doctor` found.
#[derive(Debug, serde::Serialize)]
struct Findings {
    clover_version: &'static str,
    executable: String,
    /// The torch package's version ("unknown" where it cannot be read).
    torch_version: String,
    /// The libtorch_cpu.so this process loaded, when found.
    libtorch: Option<String>,
    cuda_available: bool,
    cudnn_available: bool,
    /// Every device a command can run on, as `--device` names it: "cpu", then "cuda:N".
    devices: Vec<String>,
    cpu_threads: i32,
    working_dir: String,
    /// LIBTORCH, LD_LIBRARY_PATH, CUDA_VISIBLE_DEVICES (None where unset).
    environment: std::collections::BTreeMap<&'static str, Option<String>>,
}

fn findings() -> Result<Findings> {
    let lib = loaded_libtorch();
    let cuda_devices = tch::Cuda::device_count().max(0) as usize;
    Ok(Findings {
        clover_version: env!("CARGO_PKG_VERSION"),
        executable: std::env::current_exe()?.display().to_string(),
        torch_version: lib
            .as_deref()
            .and_then(torch_version)
            .unwrap_or_else(|| "unknown".into()),
        libtorch: lib.map(|p| p.display().to_string()),
        cuda_available: tch::Cuda::is_available(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        devices: std::iter::once(tch::Device::Cpu)
            .chain((0..cuda_devices).map(tch::Device::Cuda))
            .map(device_name)
            .collect(),
        cpu_threads: tch::get_num_threads(),
        working_dir: std::env::current_dir()?.display().to_string(),
        environment: ["LIBTORCH", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES"]
            .into_iter()
            .map(|var| (var, std::env::var(var).ok()))
            .collect(),
    })
}

pub(crate) fn doctor(args: &DoctorArgs) -> Result<()> {
    let f = findings()?;
    if args.json {
        println!("{}", serde_json::to_string(&f)?);
        return Ok(());
    }
    println!("clover {}", f.clover_version);
    println!("executable:      {}", f.executable);
    match &f.libtorch {
        Some(lib) => println!("libtorch:        {} ({lib})", f.torch_version),
        None => {
            println!("libtorch:        unknown (libtorch_cpu.so not found in the process maps)")
        }
    }
    println!("cuda available:  {}", f.cuda_available);
    println!("cudnn available: {}", f.cudnn_available);
    println!("cuda devices:    {}", f.devices.len() - 1);
    for device in &f.devices[1..] {
        println!("  {device}");
    }
    println!("cpu threads:     {}", f.cpu_threads);
    println!("working dir:     {}", f.working_dir);
    for (var, value) in &f.environment {
        println!("{var:<16} {}", value.as_deref().unwrap_or("(unset)"));
    }
    Ok(())
}

/// The libtorch library this process loaded, found in /proc/self/maps (Linux).
fn loaded_libtorch() -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .map(std::path::PathBuf::from)
}

/// The version of the libtorch at `lib`: the `version.py` of the torch package it came from
/// (libtorch_cpu.so lives in torch/lib/), or libtorch's own build-version file.
fn torch_version(lib: &std::path::Path) -> Option<String> {
    let root = lib.parent()?.parent()?;
    let from_py = std::fs::read_to_string(root.join("version.py"))
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("__version__ = ")
                    .map(|v| v.trim_matches(['\'', '"']).to_string())
            })
        });
    from_py.or_else(|| {
        std::fs::read_to_string(root.join("build-version"))
            .ok()
            .map(|v| v.trim().to_string())
    })
}
