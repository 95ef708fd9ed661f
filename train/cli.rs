//! The `clover` command line: one subcommand per pipeline stage.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "clover",
    version,
    about = "Train and evaluate Clover-2 speculative-decoding draft heads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the libtorch version, CUDA availability and devices, and the paths in use.
    Doctor,
    /// Convert a llama.cpp GGUF file into an HF-style model directory.
    ImportGguf(crate::import::ImportGgufArgs),
    /// Conversation data: import the packaged chats, tokenize, regenerate answers.
    #[command(subcommand)]
    Data(DataCommand),
    /// Cache the teacher's pre-norm hidden states over prepared data (distillation targets).
    Distill(crate::targets::DistillArgs),
    /// Train the Clover-2 draft head (per-depth distillation loss) from a TOML config.
    Train(crate::trainer::TrainArgs),
    /// Write a trained head as safetensors with the reference's tensor names, plus config.json.
    Export(crate::export::ExportArgs),
    /// Speculative vs plain decoding on held-out prompts: tau, acceptance per depth, speed.
    Eval(crate::eval::EvalArgs),
    /// Answer a prompt with the teacher (plain decoding).
    Generate(crate::generate::GenerateArgs),
    /// Measure teacher prefill and decode tokens/s (CPU, and CUDA when present) as JSON.
    Bench(crate::bench::BenchArgs),
    /// Measure training tokens/s and peak memory of the full online training step as JSON.
    BenchTrain(crate::trainer::BenchTrainArgs),
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Tokenize ShareGPT JSON/JSONL/parquet into parquet shards with an assistant loss mask.
    Prepare(crate::data::PrepareArgs),
    /// Self-distillation: replace every assistant turn by the teacher's own answer.
    Regenerate(crate::regenerate::RegenerateArgs),
    /// Convert the PyPI chitchat-dataset's dataset.json to ShareGPT form.
    ImportChitchat(crate::data::ImportChitchatArgs),
}

pub fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Doctor => doctor(),
        Command::Data(DataCommand::Prepare(args)) => crate::data::run_prepare(&args),
        Command::Data(DataCommand::Regenerate(args)) => crate::regenerate::run(&args),
        Command::Data(DataCommand::ImportChitchat(args)) => crate::data::run_import_chitchat(&args),
        Command::Distill(args) => crate::targets::run(&args),
        Command::Train(args) => crate::trainer::run(&args),
        Command::Export(args) => crate::export::run(&args),
        Command::Eval(args) => crate::eval::run(&args),
        Command::ImportGguf(args) => crate::import::run(&args),
        Command::Generate(args) => crate::generate::run(&args),
        Command::Bench(args) => crate::bench::run(&args),
        Command::BenchTrain(args) => crate::trainer::run_bench(&args),
    }
}

fn doctor() -> Result<()> {
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
