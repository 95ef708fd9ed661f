//! `clover doctor`: the libtorch this process loaded, CUDA availability and devices, paths.

use anyhow::Result;

pub(crate) fn doctor() -> Result<()> {
    let exe = std::env::current_exe()?;
    println!("clover {}", env!("CARGO_PKG_VERSION"));
    println!("executable:      {}", exe.display());
    println!("libtorch:        {}", torch_version());
    let cuda = tch::Cuda::is_available();
    println!("cuda available:  {cuda}");
    println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
    let count = tch::Cuda::device_count();
    println!("cuda devices:    {count}");
    for i in 0..count {
        println!("  cuda:{i}");
    }
    println!("cpu threads:     {}", tch::get_num_threads());
    println!("working dir:     {}", std::env::current_dir()?.display());
    for var in ["LIBTORCH", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES"] {
        println!(
            "{var:<16} {}",
            std::env::var(var).unwrap_or_else(|_| "(unset)".into())
        );
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

/// The libtorch version, from the `version.py` of the torch package the library came from
/// (libtorch_cpu.so lives in torch/lib/), or from libtorch's own build-version file.
fn torch_version() -> String {
    let Some(lib) = loaded_libtorch() else {
        return "unknown (libtorch_cpu.so not found in the process maps)".into();
    };
    let root = lib.parent().and_then(|d| d.parent());
    let from_py = root
        .and_then(|r| std::fs::read_to_string(r.join("version.py")).ok())
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("__version__ = ")
                    .map(|v| v.trim_matches(['\'', '"']).to_string())
            })
        });
    let from_build = root.and_then(|r| std::fs::read_to_string(r.join("build-version")).ok());
    let version = from_py
        .or(from_build.map(|v| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    format!("{version} ({})", lib.display())
}
