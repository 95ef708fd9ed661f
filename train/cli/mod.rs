//! The `clover` command line: one subcommand per pipeline stage, each handed to the library.

use anyhow::Result;

pub mod bench;
pub mod doctor;
pub mod generate;
pub mod train;
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
    ImportGguf(crate::formats::import::ImportGgufArgs),
    /// Conversation data: import the packaged chats, tokenize, regenerate answers.
    #[command(subcommand)]
    Data(DataCommand),
    /// Cache the teacher's pre-norm hidden states over prepared data (distillation targets).
    Distill(crate::training::targets::DistillArgs),
    /// Train the Clover-2 draft head (per-depth distillation loss) from a TOML config.
    Train(crate::cli::train::TrainArgs),
    /// Write a trained head as safetensors with the reference's tensor names, plus config.json.
    Export(crate::training::export::ExportArgs),
    /// Speculative vs plain decoding on held-out prompts: tau, acceptance per depth, speed.
    Eval(crate::decode::eval::EvalArgs),
    /// Answer a prompt with the teacher (plain decoding).
    Generate(crate::cli::generate::GenerateArgs),
    /// Measure teacher prefill and decode tokens/s (CPU, and CUDA when present) as JSON.
    Bench(crate::cli::bench::BenchArgs),
    /// Measure training tokens/s and peak memory of the full online training step as JSON.
    BenchTrain(crate::training::bench::BenchTrainArgs),
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Tokenize ShareGPT JSON/JSONL/parquet into parquet shards with an assistant loss mask.
    Prepare(crate::data::prepare::PrepareArgs),
    /// Self-distillation: replace every assistant turn by the teacher's own answer.
    Regenerate(crate::data::regenerate::RegenerateArgs),
    /// Convert the PyPI chitchat-dataset's dataset.json to ShareGPT form.
    ImportChitchat(crate::data::chitchat::ImportChitchatArgs),
}

pub fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Doctor => crate::cli::doctor::doctor(),
        Command::Data(DataCommand::Prepare(args)) => crate::data::prepare::run_prepare(&args),
        Command::Data(DataCommand::Regenerate(args)) => crate::data::regenerate::run(&args),
        Command::Data(DataCommand::ImportChitchat(args)) => {
            crate::data::chitchat::run_import_chitchat(&args)
        }
        Command::Distill(args) => crate::training::targets::run(&args),
        Command::Train(args) => crate::cli::train::run(&args),
        Command::Export(args) => crate::training::export::run(&args),
        Command::Eval(args) => crate::decode::eval::run(&args),
        Command::ImportGguf(args) => crate::formats::import::run(&args),
        Command::Generate(args) => crate::cli::generate::run(&args),
        Command::Bench(args) => crate::cli::bench::run(&args),
        Command::BenchTrain(args) => crate::training::bench::run_bench(&args),
    }
}
