//! `clover distill`: cache the teacher's pre-norm states over prepared data.

use std::path::PathBuf;

use anyhow::Result;

use crate::model::device::RunOn;
use crate::outputs::claim_job_dir;

#[derive(clap::Args, Debug)]
pub struct DistillArgs {
    /// Prepared data directory (output of `clover data prepare`).
    #[arg(long)]
    pub data: PathBuf,
    /// Teacher model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Output cache directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Device, and the stored states' dtype: bf16 (auto) or f16; the teacher computes in that
    /// dtype on CUDA and in f32 on the CPU (where 16-bit matmuls are slow).
    #[command(flatten)]
    pub run_on: RunOn,
    /// Which part of the shards this worker computes, as i/N (default: RANK/WORLD_SIZE when
    /// launched by torchrun or srun, else all of them).
    #[arg(long, default_value = "0/1")]
    pub shard: String,
    /// Tokens per teacher forward pass (samples are batched by length up to this budget).
    #[arg(long, value_parser = crate::checks::positive, default_value_t = 8192)]
    pub batch_tokens: usize,
    /// Stop after writing this many shards in this run (the rest is left for a rerun).
    #[arg(long, value_parser = crate::checks::positive)]
    pub max_shards: Option<usize>,
}

impl DistillArgs {
    /// The library's plain options for this command line.
    pub fn options(&self) -> crate::training::targets::DistillOptions {
        crate::training::targets::DistillOptions {
            data: self.data.clone(),
            model: self.model.clone(),
            out: self.out.clone(),
            run_on: self.run_on.clone(),
            shard: self.shard.clone(),
            batch_tokens: self.batch_tokens,
            max_shards: self.max_shards,
        }
    }
}

pub fn run(args: &DistillArgs) -> Result<()> {
    claim_job_dir(
        &args.out,
        &[("--data", &args.data), ("--model", &args.model)],
        "clover distill",
        &crate::training::targets::is_output_file,
    )?;
    let mut options = args.options();
    // Under torchrun or srun each rank computes its part: RANK/WORLD_SIZE.
    options.shard = crate::distributed::shard_or_launch(&options.shard)?;
    crate::training::targets::run(&options)
}
