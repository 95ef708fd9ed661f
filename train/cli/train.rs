//! `clover train` and `clover bench-train`: load a training config and run the trainer.

use crate::training::config::TrainConfig;
use crate::training::config::TrainOptions;
use crate::training::trainer::train;
use crate::training::trainer::Source;
use std::path::PathBuf;

use anyhow::Result;
use tch::Kind;

use crate::data::shards::{read_split, Split};
use crate::model::device::parse_device;
use crate::model::teacher::Teacher;
use crate::training::targets::DistillCache;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// TOML training config (see configs/*.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Continue from the newest checkpoint in the config's out dir.
    #[arg(long)]
    pub resume: bool,
    /// Which overrides apply: `cuda` applies the config's [cuda] table, `cpu` ignores it, `auto`
    /// applies it when the run lands on a CUDA device.
    #[arg(long, default_value = "auto")]
    pub profile: String,
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let cfg = TrainConfig::load(&args.config, &args.profile)?;
    let device = parse_device(&cfg.device)?;
    let teacher_kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let teacher = Teacher::load(&cfg.model_dir, device, teacher_kind)?;
    let source = match &cfg.distill_cache {
        Some(dir) => Source::Offline(DistillCache::open(dir)?),
        None => Source::Online(read_split(&cfg.data_dir, Split::Train)?),
    };
    let eval = read_split(&cfg.data_dir, Split::Eval)?;
    let outcome = train(
        &cfg,
        &teacher,
        source,
        eval,
        args.resume,
        &TrainOptions::default(),
    )?;
    if let Some(last) = outcome.evals.last() {
        eprintln!(
            "final eval: loss {:.4}, chained top-1 per depth {:?} (unigram baseline {:.3})",
            last.loss, last.chained_top1, last.unigram_top1
        );
    }
    if let Some(ck) = outcome.last_checkpoint {
        eprintln!("last checkpoint: {}", ck.display());
    }
    Ok(())
}
